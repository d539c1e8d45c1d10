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
