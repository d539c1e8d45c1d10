"""Codebook health metrics shared by every quantizer."""

from __future__ import annotations

import torch

MAX_COUNTED_CODES = 2**20  # above this, per-code histograms are not kept


def code_counts(codes: torch.Tensor, codebook_size: int) -> torch.Tensor | None:
    """Histogram of ``codes`` over ``codebook_size`` bins; None if the codebook is too large.

    Shapes:
        - codes: (*,) int64 in [0, codebook_size)
        - output: (codebook_size,) float32
    """
    if codebook_size > MAX_COUNTED_CODES:
        return None
    flat = codes.reshape(-1)
    # index_add_ has a static output shape (unlike bincount), so torch.compile keeps one graph
    return torch.zeros(codebook_size, device=codes.device).index_add_(0, flat, torch.ones_like(flat, dtype=torch.float))


def usage_metrics(counts: torch.Tensor | None) -> dict[str, torch.Tensor]:
    """``usage`` (fraction of codes hit) and ``perplexity`` (exp of the code entropy) from counts.

    Shapes:
        - counts: (K,)
    """
    if counts is None:
        return {}
    counts = counts.detach().float()
    total = counts.sum().clamp_min(1e-12)
    probs = counts / total
    entropy = -(probs * torch.log(probs.clamp_min(1e-12))).sum()
    return {"usage": (counts > 0).float().mean(), "perplexity": entropy.exp()}


def merge_metrics(parts: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Metrics of stacked quantizers: each part under ``"{i}/name"`` plus the mean over parts."""
    merged: dict[str, torch.Tensor] = {}
    for i, part in enumerate(parts):
        for name, value in part.items():
            merged[f"{i}/{name}"] = value
    for name in parts[0] if parts else ():
        values = [part[name] for part in parts if name in part and "/" not in name]
        if len(values) == len(parts):
            merged[name] = torch.stack([v.float() for v in values]).mean()
    return merged


def frechet_distance(features_a: torch.Tensor, features_b: torch.Tensor) -> float:
    """Fréchet distance between Gaussians fitted to two feature sets (the formula of FID).

    ``|mu_a - mu_b|^2 + tr(S_a) + tr(S_b) - 2 tr((S_a S_b)^(1/2))``, computed in float64;
    the trace of the matrix square root comes from the eigenvalues of
    ``S_a^(1/2) S_b S_a^(1/2)`` (symmetric, so no complex arithmetic).

    Shapes:
        - features_a: (N, D); features_b: (M, D), N, M >= 2
    """
    if features_a.dim() != 2 or features_b.dim() != 2 or features_a.shape[1] != features_b.shape[1]:
        raise ValueError(
            f"expected (N, D) and (M, D) features, got {tuple(features_a.shape)} and {tuple(features_b.shape)}"
        )
    if min(features_a.shape[0], features_b.shape[0]) < 2:
        raise ValueError("each feature set needs at least 2 rows to estimate a covariance")
    a, b = features_a.double(), features_b.double()
    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = torch.cov(a.T), torch.cov(b.T)

    def sqrt_psd(m: torch.Tensor) -> torch.Tensor:
        values, vectors = torch.linalg.eigh(m)
        return (vectors * values.clamp_min(0).sqrt()) @ vectors.T

    root_a = sqrt_psd(cov_a)
    cross = torch.linalg.eigvalsh(root_a @ cov_b @ root_a).clamp_min(0).sqrt().sum()
    return ((mu_a - mu_b).square().sum() + cov_a.trace() + cov_b.trace() - 2 * cross).item()
