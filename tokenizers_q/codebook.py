"""The codebook every vector quantizer is built on.

Nearest-code search (float32, chunked), k-means initialisation on the first
training batch, EMA updates or learnable codes, dead-code revival, and health
metrics. Under DDP every statistic is synchronised at call time, so all ranks
hold bit-identical codebooks after every step:

- EMA counts and sums are all-reduced as raw sums before the decay is applied,
  which equals a single process seeing the concatenation of all ranks' batches;
- k-means initialisation runs on the samples gathered from all ranks and rank
  0's centroids are broadcast;
- dead codes are found from the synchronised counts and replaced with samples
  drawn on rank 0 and broadcast.

Every collective runs unconditionally on every rank whenever statistics are
updated; none sits in a data-dependent branch.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from tokenizers_q.checks import check_choice, check_finite, check_int, max_magnitude
from tokenizers_q.distributed import all_gather_rows, all_reduce_sum_, broadcast_, is_distributed
from tokenizers_q.kmeans import INITS, kmeans
from tokenizers_q.metrics import code_counts, usage_metrics
from tokenizers_q.search import nearest


class CodebookOutput(NamedTuple):
    """Result of a codebook lookup.

    Shapes:
        - quantized: (N, D), float32; carries gradient to learnable codes
        - indices: (N,), int64
        - metrics: dict of detached scalars (usage, perplexity, dead_codes)
    """

    quantized: torch.Tensor
    indices: torch.Tensor
    metrics: dict[str, torch.Tensor]


class Codebook(nn.Module):
    r"""A set of ``codebook_size`` vectors of size ``dim`` with training statistics.

    Args:
        dim: size of each code vector.
        codebook_size: number of codes ``K``.
        use_cosine_sim: search and store unit-norm codes by cosine similarity
            instead of squared Euclidean distance. Default: False.
        kmeans_init: initialise the codes by k-means on the first training batch
            (gathered over all ranks). Otherwise codes start as N(0, 1) samples
            (unit-normalised for cosine). Default: True.
        kmeans_iters: Lloyd iterations of that initialisation. Default: 10.
        kmeans_seeding: ``"kmeans++"`` or ``"random"`` seeding of that k-means.
            Default: ``"kmeans++"``.
        ema_update: update codes by exponential moving averages of assigned
            vectors (no gradient); otherwise codes are an ``nn.Parameter``
            learned through the quantizer's codebook loss. Default: True.
        decay: EMA decay of cluster sizes and sums. Default: 0.99.
        eps: Laplace smoothing of EMA cluster sizes. Default: 1e-5.
        threshold_ema_dead_code: a code whose EMA cluster size falls below this
            is replaced by a vector of the current batch. 0 disables revival.
            Default: 0.
        max_elements: most entries of the distance matrix held at once (default: per device, see
            :func:`~tokenizers_q.search.nearest`).

    Shapes:
        - input: (N, dim)
        - output: :class:`CodebookOutput`
    """

    def __init__(
        self,
        dim: int,
        codebook_size: int,
        *,
        use_cosine_sim: bool = False,
        kmeans_init: bool = True,
        kmeans_iters: int = 10,
        kmeans_seeding: str = "kmeans++",
        ema_update: bool = True,
        decay: float = 0.99,
        eps: float = 1e-5,
        threshold_ema_dead_code: float = 0.0,
        max_elements: int | None = None,
    ):
        super().__init__()
        check_int("dim", dim)
        check_int("codebook_size", codebook_size)
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"decay must be in [0, 1), got {decay}")
        if threshold_ema_dead_code < 0:
            raise ValueError(f"threshold_ema_dead_code must be >= 0, got {threshold_ema_dead_code}")
        check_int("kmeans_iters", kmeans_iters, 0)
        check_choice("kmeans_seeding", kmeans_seeding, INITS)
        if max_elements is not None:
            check_int("max_elements", max_elements)
        self.dim, self.codebook_size = dim, codebook_size
        self.use_cosine_sim, self.kmeans_init, self.kmeans_iters = use_cosine_sim, kmeans_init, kmeans_iters
        self.kmeans_seeding, self.ema_update, self.decay, self.eps = kmeans_seeding, ema_update, decay, eps
        self.threshold_ema_dead_code, self.max_elements = threshold_ema_dead_code, max_elements
        self.metric = "cosine" if use_cosine_sim else "l2"

        embed = torch.randn(codebook_size, dim)
        if use_cosine_sim:
            embed = F.normalize(embed, dim=-1)
        if ema_update:
            self.register_buffer("embed", embed)
            self.register_buffer("embed_avg", embed.clone())
        else:
            self.embed = nn.Parameter(embed)
        self.register_buffer("cluster_size", torch.ones(codebook_size))
        self.register_buffer("initted", torch.tensor(not kmeans_init))
        self._initted = not kmeans_init  # Python mirror of the buffer: no tensor-to-bool sync per step

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self._initted = bool(self.initted)

    def extra_repr(self) -> str:
        mode = "ema" if self.ema_update else "learnable"
        return f"codebook_size={self.codebook_size}, dim={self.dim}, metric={self.metric}, update={mode}"

    @property
    def codes(self) -> torch.Tensor:
        """The code vectors, unit-normalised for cosine similarity. Shape: (K, dim)."""
        return F.normalize(self.embed, dim=-1) if self.use_cosine_sim else self.embed

    def lookup(self, indices: torch.Tensor) -> torch.Tensor:
        """Code vectors of ``indices``. Shapes: (*,) int64 -> (*, dim)."""
        return F.embedding(indices, self.codes)

    def assign(self, x: torch.Tensor) -> torch.Tensor:
        """Indices of the nearest codes, with no statistics. Shapes: (N, dim) float32 -> (N,) int64."""
        return nearest(x, self.codes.detach(), self.metric, self.max_elements, check_values=False)[0]

    def forward(self, x: torch.Tensor, update: bool = False) -> CodebookOutput:
        """Assign each row of ``x`` to its nearest code.

        Args:
            x: vectors to quantize.
            update: apply training statistics (k-means init, EMA, dead-code revival). An empty
                batch updates nothing in a single process; under DDP an empty rank still joins
                the collectives (contributing nothing), so no other rank waits for it.
        """
        check_finite(x, "Codebook: input", max_magnitude(self.dim))
        x = x.float()
        update = update and (x.shape[0] > 0 or is_distributed())
        if update and not self._initted:
            self._init_from(x.detach())
        indices = self.assign(x.detach())
        quantized = self.lookup(indices)
        counts = code_counts(indices, self.codebook_size)
        if update:
            all_reduce_sum_(counts)
            self._update_statistics(x.detach(), indices, counts)
        metrics = usage_metrics(counts)
        metrics["dead_codes"] = (self.cluster_size < max(self.threshold_ema_dead_code, 1.0)).sum().float()
        return CodebookOutput(quantized, indices, metrics)

    @torch.no_grad()
    def _init_from(self, x: torch.Tensor) -> None:
        samples = all_gather_rows(x)
        result = kmeans(samples, self.codebook_size, self.kmeans_iters, init=self.kmeans_seeding, metric=self.metric)
        centroids = broadcast_(result.centroids.contiguous())
        sizes = broadcast_(result.cluster_weights.contiguous()).clamp_min(1.0)
        self.embed.data.copy_(centroids)
        self.cluster_size.copy_(sizes)
        if self.ema_update:
            self.embed_avg.copy_(centroids * sizes.unsqueeze(-1))
        self.initted.fill_(True)
        self._initted = True

    @torch.no_grad()
    def _update_statistics(self, x: torch.Tensor, indices: torch.Tensor, counts: torch.Tensor) -> None:
        self.cluster_size.lerp_(counts, 1.0 - self.decay)
        if self.ema_update:
            sums = torch.zeros_like(self.embed_avg).index_add_(0, indices, x)
            all_reduce_sum_(sums)
            self.embed_avg.lerp_(sums, 1.0 - self.decay)
            total = self.cluster_size.sum()
            smoothed = (self.cluster_size + self.eps) / (total + self.codebook_size * self.eps) * total
            embed = self.embed_avg / smoothed.unsqueeze(-1)
            self.embed.copy_(F.normalize(embed, dim=-1) if self.use_cosine_sim else embed)
        if self.threshold_ema_dead_code > 0:
            self._revive_dead_codes(x)

    @torch.no_grad()
    def _revive_dead_codes(self, x: torch.Tensor) -> None:
        """Replace codes whose EMA size fell below the threshold with rank 0's batch vectors.

        A rank with an empty batch (DDP only) draws from its current codes instead; only rank 0's draw is kept.
        """
        dead = (self.cluster_size < self.threshold_ema_dead_code).unsqueeze(-1)
        source = x if x.shape[0] else self.codes.detach()
        pick = torch.randint(0, source.shape[0], (self.codebook_size,), device=x.device)
        samples = broadcast_(source[pick].contiguous())
        if self.use_cosine_sim:
            samples = F.normalize(samples, dim=-1)
        self.embed.data.copy_(torch.where(dead, samples, self.embed.data))
        if self.ema_update:
            self.embed_avg.copy_(torch.where(dead, samples * self.threshold_ema_dead_code, self.embed_avg))
        self.cluster_size.copy_(torch.where(dead.squeeze(-1), self.threshold_ema_dead_code, self.cluster_size))
