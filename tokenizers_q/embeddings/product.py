"""Product quantization (PQ) and optimised PQ (OPQ) of embedding vectors: fitting, coding and decoding.

A vector is rotated (OPQ; the identity for PQ) and cut into ``M`` sub-vectors of ``dim / M`` entries; each
sub-vector is coded by its nearest entry of its own codebook. OPQ alternates PQ fitting (k-means, warm-started
from the previous codebooks after the first alternation) with the orthogonal Procrustes rotation that best maps
the vectors to their decoded codes.
"""

from __future__ import annotations

import torch

from tokenizers_q.kmeans import kmeans
from tokenizers_q.search import nearest

OPQ_KMEANS_ITERS = 4  # k-means iterations per OPQ alternation after the first, warm-started


def pq_encode(rotated: torch.Tensor, codebooks: torch.Tensor) -> torch.Tensor:
    """The nearest entry of each sub-vector's codebook.

    Shapes:
        - rotated: (N, dim) vectors already rotated; codebooks: (M, K, dim / M)
        - output: (N, M) int64 codes
    """
    subs = rotated.reshape(rotated.shape[0], codebooks.shape[0], -1).transpose(0, 1).contiguous()
    return nearest(subs, codebooks)[0].T


def pq_decode(codes: torch.Tensor, codebooks: torch.Tensor) -> torch.Tensor:
    """The concatenated codebook entries of codes, in the rotated space.

    Shapes:
        - codes: (N, M) integer; codebooks: (M, K, dim / M)
        - output: (N, dim) float32
    """
    return torch.cat([codebooks[m][codes[:, m]] for m in range(codebooks.shape[0])], -1)


def fit_pq(
    rotated: torch.Tensor,
    num_codebooks: int,
    codebook_size: int,
    kmeans_iters: int,
    generator: torch.Generator,
    init: str | torch.Tensor = "kmeans++",
) -> torch.Tensor:
    """k-means of every sub-vector, all sub-spaces at once (``init``: codebooks to continue from).

    Shapes:
        - rotated: (N, dim); init (a tensor): (M, K, dim / M)
        - output: codebooks (M, K, dim / M) float32
    """
    subs = rotated.reshape(rotated.shape[0], num_codebooks, -1).transpose(0, 1).contiguous()
    return kmeans(subs, codebook_size, kmeans_iters, init=init, generator=generator).centroids


def fit_opq(
    x: torch.Tensor,
    num_codebooks: int,
    codebook_size: int,
    kmeans_iters: int,
    opq_iters: int,
    generator: torch.Generator,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The rotation and codebooks of OPQ (``opq_iters`` alternations; 0: PQ, the identity rotation).

    Shapes:
        - x: (N, dim) float32
        - output: rotation (dim, dim), codebooks (M, K, dim / M), float32
    """
    rotation = torch.eye(x.shape[1], device=x.device)
    codebooks = None
    for step in range(opq_iters):
        rotated = x @ rotation
        iters = OPQ_KMEANS_ITERS if step else kmeans_iters
        init = "kmeans++" if codebooks is None else codebooks
        codebooks = fit_pq(rotated, num_codebooks, codebook_size, iters, generator, init)
        # orthogonal Procrustes: the rotation best mapping the vectors to their codes
        u, _, vt = torch.linalg.svd(x.T @ pq_decode(pq_encode(rotated, codebooks), codebooks))
        rotation = u @ vt
    init = "kmeans++" if codebooks is None else codebooks
    return rotation, fit_pq(x @ rotation, num_codebooks, codebook_size, kmeans_iters, generator, init)
