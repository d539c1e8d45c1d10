"""The searchable form of an embedding codec's database: its codes in scan order, ADC search and re-ranking.

:class:`CodeIndex` is built from a codec's database once (:meth:`EmbeddingCodec.scan_index` keeps it until the
database changes): the vectors grouped by list, the codes in that order, and per vector the score term that
does not depend on the query. :meth:`CodeIndex.search` probes each query's nearest lists and scores their
vectors with the :mod:`~tokenizers_q.embeddings.adc` kernels; :func:`exact_rerank` re-scores candidates exactly
against the original vectors.
"""

from __future__ import annotations

import math
from functools import cached_property
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from tokenizers_q.embeddings.adc import (
    SCORE_BUDGET,
    list_tables,
    query_tables,
    scan_long_lists,
    scan_short_lists,
)
from tokenizers_q.embeddings.product import pq_decode

if TYPE_CHECKING:
    from tokenizers_q.embeddings.codec import EmbeddingCodec

QUERY_BLOCK = 1024  # queries scored together: their lookup tables are one embedding_bag weight
TERMS_ROWS = 65536  # vectors decoded at once for their query-independent terms


class CodeIndex:
    """How search reads a codec's database.

    Attributes:
        codec: the codec whose database this is.
        order: database row of each scan position (None: storage order, without a partition).
        bounds: each list's first scan position, and the end.
        codes: the codes in scan order, uint8 (int32 above 256 entries per codebook); without a partition
            and with one byte per code it is the database itself, otherwise one more copy of the codes.
        metric: the scoring metric, ``"l2"`` or ``"ip"`` (a cosine codec scores unit vectors by inner product).

    Shapes:
        - order: (N,) int64; bounds: (num_lists + 1,) int64; codes: (N, num_codebooks)
    """

    def __init__(self, codec: EmbeddingCodec):
        self.codec = codec
        self.metric = "l2" if codec.metric == "l2" else "ip"
        lists, codes = codec.unpack(codec.database)
        self.order = None if codec.num_lists == 1 else lists.argsort(stable=True)
        self.bounds = F.pad(torch.bincount(lists, minlength=codec.num_lists).cumsum(0), (1, 0))
        if codec.num_lists == 1 and codec.codebook_size == 256:  # the packed codes are the codes themselves
            codes = codec.database
        elif self.order is not None:
            codes = codes[self.order]
        self.codes = codes.to(torch.uint8 if codec.codebook_size <= 256 else torch.int32)

    def members(self, list_id: int) -> torch.Tensor:
        """Database rows (int64) of the vectors in list ``list_id``, in storage order."""
        lo, hi = int(self.bounds[list_id]), int(self.bounds[list_id + 1])
        if self.order is None:
            return torch.arange(lo, hi, device=self.bounds.device)
        return self.order[lo:hi]

    def rows(self, positions: torch.Tensor) -> torch.Tensor:
        """Database rows of scan positions (position -1, for none, stays -1)."""
        if self.order is None:
            return positions
        return torch.where(positions >= 0, self.order[positions.clamp(min=0)], -1)

    @cached_property
    def entries(self) -> torch.Tensor:
        """(N, M) int32 in scan order: each code as a row of a query's flattened lookup table."""
        offsets = torch.arange(self.codec.num_codebooks, device=self.codes.device, dtype=torch.int32)
        return self.codes.int() + offsets * self.codec.codebook_size

    @cached_property
    def terms(self) -> torch.Tensor | None:
        """(N,) float32 in scan order, each vector's query-independent score under L2: RVQ its stored norm;
        PQ/OPQ ``2 (centroid R).e + |e|^2`` of its coded rotated residual ``e``, so that ``|q - centroid -
        e R^T|^2 = |q|^2 - 2 q.centroid + |centroid|^2 - 2 (q R).e`` + this. None under IP."""
        codec = self.codec
        if self.metric == "ip":
            return None
        if codec.stores_norms:
            return codec.norms if self.order is None else codec.norms[self.order]
        lists = torch.repeat_interleave(torch.arange(codec.num_lists, device=self.codes.device), self.bounds.diff())
        terms = self.codes.new_zeros(len(self.codes), dtype=torch.float32)
        for start in range(0, len(self.codes), TERMS_ROWS):  # bounded memory: decode a chunk at a time
            residual = pq_decode(self.codes[start : start + TERMS_ROWS].long(), codec.codebooks)
            centroids = codec.centroids[lists[start : start + TERMS_ROWS]] @ codec.rotation
            terms[start : start + TERMS_ROWS] = 2 * (centroids * residual).sum(-1) + residual.pow(2).sum(-1)
        return terms

    def list_terms(self, lists: torch.Tensor) -> torch.Tensor:
        """PQ/OPQ under L2, the query-independent lookup table of each of ``lists`` (:func:`list_tables`).

        Shapes:
            - lists: (L,) int64; output: (L, M * K) float32
        """
        codec = self.codec
        return list_tables(codec.centroids[lists], codec.rotation, codec.codebooks)

    def search(
        self, queries: torch.Tensor, k: int, nprobe: int, rerank: int = 0, vectors: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The ``k`` best database vectors of each query by ADC, in blocks of :data:`QUERY_BLOCK` queries;
        with ``rerank``, that many ADC candidates re-ranked against ``vectors`` (:func:`exact_rerank`). Arguments
        are those of :meth:`EmbeddingCodec.search`, already checked (queries normalised for a cosine codec).

        Shapes:
            - queries: (Q, dim) float32; vectors: (N, dim)
            - output: scores (Q, k) float32, database rows (Q, k) int64 (-1 and +-inf past the probed vectors)
        """
        found = [
            self.scan(queries[s : s + QUERY_BLOCK], rerank or k, nprobe) for s in range(0, len(queries), QUERY_BLOCK)
        ]
        scores, ids = torch.cat([f[0] for f in found]), torch.cat([f[1] for f in found])
        if rerank:
            scores, ids = exact_rerank(queries, ids, vectors, k, self.codec.metric)
        return scores, ids

    def scan(self, queries: torch.Tensor, k: int, nprobe: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Scores and database rows of the ``k`` best vectors in each query's ``nprobe`` nearest lists
        (squared distances under L2, inner products under IP).

        Shapes:
            - queries: (Q, dim) float32
            - output: scores (Q, k) float32, database rows (Q, k) int64
        """
        codec, largest = self.codec, self.metric == "ip"
        # per (query, list): -2 q.centroid + |centroid|^2 (L2; |q|^2 is added at the end) or q.centroid (IP);
        # the per-vector terms hold the rest of |q - centroid - e|^2 that does not depend on q
        dots = queries @ codec.centroids.T  # (Q, num_lists)
        shift = dots if largest else -2 * dots + codec.centroids.pow(2).sum(-1)
        probe = shift.topk(nprobe, dim=1, largest=largest).indices  # (Q, nprobe)
        if codec.stores_norms:  # RVQ: the stored norm already holds |centroid|^2
            shift = -2 * dots
        rotation = None if codec.method == "rvq" else codec.rotation
        tables = query_tables(queries, codec.codebooks, rotation, self.metric).reshape(len(queries), -1)
        on_long_list = (self.bounds.diff() >= codec.codebook_size)[probe]  # (Q, nprobe)
        found = []
        if on_long_list.any():
            terms = self.terms if codec.stores_norms else None  # PQ/OPQ terms are folded into the tables
            list_terms = self.list_terms if not largest and not codec.stores_norms else None
            found.append(
                scan_long_lists(
                    tables, shift, probe, on_long_list, k, self.codes, self.bounds, terms, list_terms, self.metric
                )
            )
        if not on_long_list.all():
            found.append(
                scan_short_lists(
                    tables, shift, probe, ~on_long_list, k, self.entries, self.bounds, self.terms, self.metric
                )
            )
        scores, positions = torch.cat([f[0] for f in found], 1), torch.cat([f[1] for f in found], 1)
        top = scores.topk(k, dim=1, largest=largest)
        scores, ids = top.values, self.rows(positions.gather(1, top.indices))
        if not largest:  # add the queries' own norms: true squared distances
            scores = scores + queries.pow(2).sum(-1, keepdim=True)
        return scores, ids


def exact_rerank(
    queries: torch.Tensor, ids: torch.Tensor, vectors: torch.Tensor, k: int, metric: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``k`` best of the candidates ``ids`` by their exact scores against the original ``vectors``: squared
    distances (``"l2"``), inner products (``"ip"``) or cosine similarities (``"cosine"``: the queries are unit
    vectors, the gathered vectors are normalised). Only the candidates' rows of ``vectors`` are read (it may be
    memory-mapped); candidates -1 stay last.

    Shapes:
        - queries: (Q, dim) float32; ids: (Q, R) int64 database rows; vectors: (N, dim)
        - output: scores (Q, k) float32, database rows (Q, k) int64
    """
    largest, dim = metric != "l2", queries.shape[1]
    scores, best = [], []
    step = max(1, SCORE_BUDGET // (ids.shape[1] * dim))  # queries per chunk of gathered vectors
    for start in range(0, len(ids), step):
        chunk, query = ids[start : start + step], queries[start : start + step]
        found = vectors[chunk.clamp(min=0).flatten()].to(query).reshape(*chunk.shape, dim)
        if metric == "cosine":
            found = F.normalize(found, dim=-1)
        exact = torch.bmm(found, query[:, :, None])[..., 0]  # q.x (Q, R)
        if metric == "l2":
            exact = found.pow(2).sum(-1) - 2 * exact + query.pow(2).sum(-1, keepdim=True)
        exact = exact.masked_fill(chunk < 0, -math.inf if largest else math.inf)
        top = exact.topk(k, dim=1, largest=largest)
        scores.append(top.values)
        best.append(chunk.gather(1, top.indices))
    return torch.cat(scores), torch.cat(best)
