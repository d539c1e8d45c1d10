"""Batched, optionally sample-weighted k-means with k-means++ or random seeding, and residual k-means.

Used to initialise codebooks, and by product, weight and KV quantization; :func:`residual_kmeans` fits the
residual codebooks of vector-codebook weights and of the embedding codec's RVQ. Every step runs in float32
through the chunked :func:`~tokenizers_q.search.nearest` search, so memory stays bounded for large ``N``
and ``K``.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

from tokenizers_q.checks import check_choice, check_finite, check_float_tensor, check_int, max_magnitude
from tokenizers_q.search import check_metric, nearest

INITS = ("kmeans++", "random")


class KMeansResult(NamedTuple):
    """Outcome of :func:`kmeans`.

    Shapes (with a leading ``B`` axis when the input was batched):
        - centroids: (K, D), float32
        - assignments: (N,), int64
        - cluster_weights: (K,), float32 (sample counts, or summed weights)
        - inertia: () float32, weighted sum of distances to the assigned centroid
    """

    centroids: torch.Tensor
    assignments: torch.Tensor
    cluster_weights: torch.Tensor
    inertia: torch.Tensor


def _distance_to(x: torch.Tensor, sq_norms: torch.Tensor, center: torch.Tensor, metric: str) -> torch.Tensor:
    """Distance from each row of ``x`` (B, N, D) to one centre per problem (B, D).

    A matrix-vector product plus the precomputed row norms ``sq_norms`` (B, N):
    no (B, N, D) temporary, which keeps k-means++ seeding fast for large K.
    """
    dots = torch.bmm(x, center.unsqueeze(-1)).squeeze(-1)
    if metric == "cosine":
        return (1.0 - dots).clamp_min_(0.0)
    return (sq_norms - 2.0 * dots + center.pow(2).sum(-1, keepdim=True)).clamp_min_(0.0)


def _seed_random(x, weights, k, generator):
    idx = torch.multinomial(weights, k, replacement=x.shape[1] < k, generator=generator)
    return torch.gather(x, 1, idx.unsqueeze(-1).expand(-1, -1, x.shape[-1]))


def _seed_kmeanspp(x, weights, k, metric, generator):
    """k-means++ (Arthur & Vassilvitskii): each new centre drawn with probability ~ w * D^2."""
    b, _, d = x.shape
    rows = torch.arange(b, device=x.device)
    centroids = x.new_empty(b, k, d)
    first = torch.multinomial(weights, 1, generator=generator).squeeze(1)
    centroids[:, 0] = x[rows, first]
    sq_norms = x.pow(2).sum(-1)
    min_dist = _distance_to(x, sq_norms, centroids[:, 0], metric)
    for j in range(1, k):
        prob = min_dist * weights
        # once every point coincides with a centre (N <= K), fall back to the weights
        prob = torch.where(prob.sum(-1, keepdim=True) > 0, prob, weights)
        pick = torch.multinomial(prob, 1, generator=generator).squeeze(1)
        centroids[:, j] = x[rows, pick]
        torch.minimum(min_dist, _distance_to(x, sq_norms, centroids[:, j], metric), out=min_dist)
    return centroids


@torch.no_grad()
def kmeans(
    x: torch.Tensor,
    num_clusters: int,
    kmeans_iters: int = 10,
    weights: torch.Tensor | None = None,
    init: str | torch.Tensor = "kmeans++",
    metric: str = "l2",
    generator: torch.Generator | None = None,
    max_elements: int | None = None,
) -> KMeansResult:
    """Cluster the rows of ``x`` into ``num_clusters`` centroids (Lloyd's algorithm).

    Args:
        x: samples; a leading axis ``B`` runs ``B`` independent problems at once.
        num_clusters: number of centroids ``K``. ``N < K`` is allowed: centroids
            then repeat samples.
        kmeans_iters: Lloyd iterations after seeding (0 keeps the seeds).
        weights: non-negative sample weights (e.g. Fisher information); uniform if None.
        init: ``"kmeans++"`` (D^2 seeding), ``"random"`` (weighted sample of rows), or initial centroids
            (K, D) / (B, K, D) to continue from (warm start).
        metric: ``"l2"``, or ``"cosine"`` for spherical k-means (unit-norm centroids).
        generator: random generator for reproducible seeding.
        max_elements: memory budget of the nearest-centroid search (default: per device).

    Shapes:
        - x: (N, D) or (B, N, D)
        - weights: (N,) or (B, N)
        - output: see :class:`KMeansResult`
    """
    check_metric(metric, ("l2", "cosine"))
    if not isinstance(init, torch.Tensor):
        check_choice("init", init, INITS)
    check_int("num_clusters", num_clusters)
    check_int("kmeans_iters", kmeans_iters, 0)
    check_float_tensor("x", x)
    batched = x.dim() == 3
    if x.dim() not in (2, 3) or x.shape[-2] == 0:
        raise ValueError(f"kmeans expects x of shape (N, D) or (B, N, D) with N >= 1, got {tuple(x.shape)}")
    check_finite(x, "kmeans: x", max_magnitude(x.shape[-1]))
    xb = (x if batched else x.unsqueeze(0)).float()
    if metric == "cosine":
        xb = F.normalize(xb, dim=-1)
    if weights is None:
        wb = torch.ones(xb.shape[:2], device=xb.device)
    else:
        wb = (weights if batched else weights.unsqueeze(0)).float()
        if wb.shape != xb.shape[:2]:
            raise ValueError(f"weights must have shape {tuple(x.shape[:-1])}, got {tuple(weights.shape)}")
        if not torch.isfinite(wb).all() or (wb < 0).any() or (wb.sum(-1) <= 0).any():
            raise ValueError("weights must be finite, non-negative, with a positive sum")
    if isinstance(init, torch.Tensor):
        centroids = (init if batched else init.unsqueeze(0)).to(xb).clone()
        if centroids.shape != (xb.shape[0], num_clusters, xb.shape[-1]):
            want = (num_clusters, xb.shape[-1]) if not batched else (xb.shape[0], num_clusters, xb.shape[-1])
            raise ValueError(f"initial centroids must have shape {want}, got {tuple(init.shape)}")
        check_finite(centroids, "kmeans: initial centroids", max_magnitude(xb.shape[-1]))
    elif init == "kmeans++":
        centroids = _seed_kmeanspp(xb, wb, num_clusters, metric, generator)
    else:
        centroids = _seed_random(xb, wb, num_clusters, generator)

    b, _, d = xb.shape
    weighted = xb * wb.unsqueeze(-1)
    for _ in range(kmeans_iters):
        assign, _ = nearest(xb, centroids, metric, max_elements, check_values=False)
        sums = xb.new_zeros(b, num_clusters, d).scatter_add_(1, assign.unsqueeze(-1).expand(-1, -1, d), weighted)
        counts = wb.new_zeros(b, num_clusters).scatter_add_(1, assign, wb)
        updated = sums / counts.clamp_min(1e-12).unsqueeze(-1)
        if metric == "cosine":
            updated = F.normalize(updated, dim=-1)
        centroids = torch.where(counts.unsqueeze(-1) > 0, updated, centroids)  # empty clusters stay put

    assign, dist = nearest(xb, centroids, metric, max_elements, check_values=False)
    counts = wb.new_zeros(b, num_clusters).scatter_add_(1, assign, wb)
    inertia = (dist * wb).sum(-1)
    if not batched:
        return KMeansResult(centroids[0], assign[0], counts[0], inertia[0])
    return KMeansResult(centroids, assign, counts, inertia)


class ResidualKMeansResult(NamedTuple):
    """Outcome of :func:`residual_kmeans`.

    Shapes:
        - codebooks: (num_quantizers, codebook_size, D), float32
        - codes: (N, num_quantizers), int64: the entry of each codebook that codes each row
    """

    codebooks: torch.Tensor
    codes: torch.Tensor


@torch.no_grad()
def residual_kmeans(
    x: torch.Tensor,
    num_quantizers: int,
    codebook_size: int,
    kmeans_iters: int = 10,
    weights: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    max_elements: int | None = None,
) -> ResidualKMeansResult:
    """Residual codebooks: codebook ``m`` is the k-means of what codebooks ``0 .. m-1`` leave of ``x``.

    Each row is coded by one entry of every codebook (its nearest at that level, greedily); the sum of its
    entries approximates the row. The codebooks are fitted one after another with :func:`kmeans`
    (k-means++ seeding from ``generator``), so a seeded generator gives the same codebooks.

    Args:
        x: samples.
        num_quantizers: residual codebooks ``M``.
        codebook_size: entries per codebook ``K``.
        kmeans_iters: Lloyd iterations per codebook.
        weights: non-negative sample weights (uniform if None), the same at every level.
        generator: random generator for reproducible seeding.
        max_elements: memory budget of the nearest-centroid search (default: per device).

    Shapes:
        - x: (N, D); weights: (N,)
        - output: see :class:`ResidualKMeansResult`
    """
    check_float_tensor("x", x)
    check_int("num_quantizers", num_quantizers)
    if x.dim() != 2:
        raise ValueError(f"residual_kmeans expects x of shape (N, D), got {tuple(x.shape)}")
    residual = x.float()
    codebooks, codes = [], []
    for _ in range(num_quantizers):
        fit = kmeans(residual, codebook_size, kmeans_iters, weights, generator=generator, max_elements=max_elements)
        codebooks.append(fit.centroids)
        codes.append(fit.assignments)
        residual = residual - fit.centroids[fit.assignments]
    return ResidualKMeansResult(torch.stack(codebooks), torch.stack(codes, -1))
