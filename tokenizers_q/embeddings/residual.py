"""Residual quantization (RVQ) of embedding vectors: fitting, beam-search coding, decoding and refinement.

Each of ``M`` codebooks spans the whole vector and codes what the previous ones left. Codebooks are first
fitted greedily by :func:`~tokenizers_q.kmeans.residual_kmeans`, then refined jointly: alternations of beam
encoding and the least-squares fit of all codebooks to the vectors through those codes (additive-quantizer
refinement).
"""

from __future__ import annotations

import torch

from tokenizers_q.kmeans import residual_kmeans

MAX_REFINE_ENTRIES = 8192  # refinement solves a dense (M * K)^2 system in float64: 512 MiB at most
REFINE_ROWS = 8192  # vectors accumulated into the normal equations at once


def rvq_encode(x: torch.Tensor, codebooks: torch.Tensor, beam: int = 1) -> torch.Tensor:
    """Beam search over residual levels: keeps the ``beam`` best partial codes per vector (1: greedy).

    Shapes:
        - x: (N, dim) float32; codebooks: (M, K, dim)
        - output: (N, M) int64 codes
    """
    n, dim = x.shape
    codes = torch.zeros(n, 1, 0, dtype=torch.long, device=x.device)
    residual = x[:, None]
    for m in range(codebooks.shape[0]):
        book = codebooks[m]  # (K, dim)
        # |r - c|^2 = |r|^2 - 2 r.c + |c|^2 for every candidate, per vector and beam entry
        cand = residual.pow(2).sum(-1, keepdim=True) - 2 * residual @ book.T + book.pow(2).sum(-1)
        width = min(beam, cand.shape[1] * cand.shape[2])
        flat = cand.reshape(n, -1).topk(width, largest=False).indices
        parent, entry = flat // book.shape[0], flat % book.shape[0]
        codes = torch.cat([codes.gather(1, parent[..., None].expand(-1, -1, m)), entry[..., None]], -1)
        residual = residual.gather(1, parent[..., None].expand(-1, -1, dim)) - book[entry]
    return codes[:, 0]


def rvq_decode(codes: torch.Tensor, codebooks: torch.Tensor) -> torch.Tensor:
    """The sum of the codebook entries of codes.

    Shapes:
        - codes: (N, M) integer; codebooks: (M, K, dim)
        - output: (N, dim) float32
    """
    return torch.stack([codebooks[m][codes[:, m]] for m in range(codebooks.shape[0])]).sum(0)


def refine_codebooks(x: torch.Tensor, codes: torch.Tensor, codebooks: torch.Tensor) -> torch.Tensor:
    """All codebooks at once, the least-squares fit of ``x`` by the sum of its codes' entries:
    ``(B^T B + l I) C = B^T x + l C_old`` with ``B`` the one-hot code matrix; entries no vector uses keep
    their value (the ridge ``l`` pulls towards the current codebooks).

    Shapes:
        - x: (N, dim) float32; codes: (N, M) int64; codebooks: (M, K, dim)
        - output: codebooks (M, K, dim) float32
    """
    num, size, dim = codebooks.shape
    width = num * size
    flat = codes + torch.arange(num, device=codes.device) * size  # (N, M) rows of B^T B
    gram = torch.zeros(width * width, dtype=torch.float64, device=x.device)
    rhs = torch.zeros(width, dim, dtype=torch.float64, device=x.device)
    for start in range(0, len(x), REFINE_ROWS):
        rows = flat[start : start + REFINE_ROWS]
        gram += torch.bincount((rows[:, :, None] * width + rows[:, None, :]).flatten(), minlength=width * width)
        for m in range(num):
            rhs.index_add_(0, rows[:, m], x[start : start + REFINE_ROWS].double())
    gram = gram.view(width, width)
    ridge = 1e-3 * gram.diagonal().mean()
    old = codebooks.reshape(width, dim).double()
    factor = torch.linalg.cholesky(gram + ridge * torch.eye(width, dtype=torch.float64, device=x.device))
    return torch.cholesky_solve(rhs + ridge * old, factor).reshape(codebooks.shape).float()


def fit_rvq(
    x: torch.Tensor,
    num_codebooks: int,
    codebook_size: int,
    kmeans_iters: int,
    refine_iters: int,
    beam: int,
    generator: torch.Generator,
) -> torch.Tensor:
    """Residual k-means codebooks, then ``refine_iters`` alternations of beam encoding and
    :func:`refine_codebooks`.

    Shapes:
        - x: (N, dim) float32
        - output: codebooks (M, K, dim) float32
    """
    codebooks = residual_kmeans(x, num_codebooks, codebook_size, kmeans_iters, generator=generator).codebooks
    for _ in range(refine_iters):
        codebooks = refine_codebooks(x, rvq_encode(x, codebooks, beam), codebooks)
    return codebooks
