"""Asymmetric-distance (ADC) scan kernels: scores of coded database vectors against float queries.

Each query is compared with the codebook entries once (its lookup table: one score per codebook entry), and
a database vector's score is the sum of its codes' table entries, summed by ``embedding_bag``. The database
is read in scan order: vectors grouped by list, list ``l`` holding scan positions ``bounds[l]`` to
``bounds[l + 1]``. A list at least as long as a codebook is scored for all its probing queries at once
(:func:`scan_long_lists`); shorter lists are gathered per (query, list) candidate (:func:`scan_short_lists`).

Scores are those of the scoring metric: under ``"l2"`` the squared distance less the query's own squared norm
(the caller adds it once), smaller is closer; under ``"ip"`` the inner product, larger is closer.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F

from tokenizers_q.search import top_rows

SCORE_BUDGET = 2**24  # most (database vector, query) scores held at once: 64 MiB of float32


def query_tables(
    queries: torch.Tensor, codebooks: torch.Tensor, rotation: torch.Tensor | None, metric: str
) -> torch.Tensor:
    """Per query and codebook, the query-dependent score of every entry: ``q.c`` (``"ip"``) or ``-2 q.c``
    (``"l2"``), with the sub-vectors of the rotated query for PQ/OPQ (``rotation`` given) or the whole query
    for RVQ (``rotation`` None).

    Shapes:
        - queries: (Q, dim); codebooks: (M, K, dim / M) with a rotation (dim, dim), (M, K, dim) without
        - output: (Q, M, K) float32
    """
    if rotation is None:
        dots = torch.einsum("qd,mkd->qmk", queries, codebooks)
    else:
        subs = (queries @ rotation).reshape(queries.shape[0], codebooks.shape[0], -1)
        dots = torch.einsum("qms,mks->qmk", subs, codebooks)
    return dots if metric == "ip" else -2 * dots


def list_tables(centroids: torch.Tensor, rotation: torch.Tensor, codebooks: torch.Tensor) -> torch.Tensor:
    """PQ/OPQ under L2, the query-independent score of every entry within each list: ``|c|^2 + 2 (centroid
    R)_m . c``, so that ``|q - centroid - c R^T|^2 = |q|^2 - 2 q.centroid + |centroid|^2`` plus the sum over
    codebooks of (this table ``- 2 (q R)_m . c``).

    Shapes:
        - centroids: (L, dim) of the lists wanted; rotation: (dim, dim); codebooks: (M, K, dim / M)
        - output: (L, M * K) float32
    """
    subs = (centroids @ rotation).reshape(len(centroids), codebooks.shape[0], -1)
    tables = codebooks.pow(2).sum(-1) + 2 * torch.einsum("lms,mks->lmk", subs, codebooks)
    return tables.reshape(len(centroids), -1)


def scan_long_lists(
    tables: torch.Tensor,
    shift: torch.Tensor,
    probe: torch.Tensor,
    selected: torch.Tensor,
    k: int,
    codes: torch.Tensor,
    bounds: torch.Tensor,
    terms: torch.Tensor | None = None,
    list_terms: Callable[[torch.Tensor], torch.Tensor] | None = None,
    metric: str = "l2",
) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``k`` best vectors of each selected (query, probed list) pair, list by list: each list is scanned
    once for all the queries probing it, its queries' tables one ``embedding_bag`` weight (a bag column per
    query), in chunks of :data:`SCORE_BUDGET` scores.

    Args:
        tables: the queries' lookup tables (:func:`query_tables`, flattened).
        shift: per query and list, the score term of the list (its centroid's part).
        probe: the lists each query probes.
        selected: which (query, probe slot) pairs this kernel scans.
        k: vectors kept per pair.
        codes: the database's codes in scan order.
        bounds: each list's first scan position, and the end.
        terms: per scan position, a query-independent score term (RVQ's stored norms), or None.
        list_terms: the query-independent table of the given lists (:func:`list_tables`), added to the
            queries' tables, or None.
        metric: the scoring metric, ``"l2"`` or ``"ip"``.

    Shapes:
        - tables: (Q, M * K); shift: (Q, num_lists); probe, selected: (Q, nprobe)
        - codes: (N, M) integer; bounds: (num_lists + 1,); terms: (N,)
        - output: scores and scan positions (Q, nprobe * k), slot ``s`` in columns ``s * k`` to
          ``(s + 1) * k``; unfilled entries have position -1 and score +-inf
    """
    largest, num, nprobe = metric == "ip", len(tables), probe.shape[1]
    offsets = torch.arange(codes.shape[1], device=tables.device) * (tables.shape[1] // codes.shape[1])
    best = tables.new_full((num, nprobe * k), -math.inf if largest else math.inf)
    best_positions = torch.full((num, nprobe * k), -1, dtype=torch.long, device=tables.device)
    # (query, slot) pairs grouped by list: each list is scanned once for all the queries probing it
    pairs, position = (probe * nprobe + torch.arange(nprobe, device=probe.device))[selected].sort()
    position = selected.flatten().nonzero()[:, 0][position]
    lists, counts = torch.unique_consecutive(pairs // nprobe, return_counts=True)
    extra = list_terms(lists) if list_terms is not None else None
    found = []
    for i, (lst, qi, slot) in enumerate(
        zip(lists.tolist(), position.split(counts.tolist()), pairs.split(counts.tolist()))
    ):
        lo, hi = int(bounds[lst]), int(bounds[lst + 1])
        qi, slot = qi // nprobe, slot % nprobe
        weight = tables[qi]  # (q, M * K)
        if extra is not None:  # plus the list's query-independent term, summed alike
            weight = weight + extra[i]
        weight = weight.T.contiguous()  # (M * K, q): a bag column per query
        tops, top_positions = [], []
        step = max(1, SCORE_BUDGET // len(qi))
        for start in range(lo, hi, step):
            stop = min(start + step, hi)
            scores = F.embedding_bag(codes[start:stop].long() + offsets, weight, mode="sum")  # (n, q)
            if terms is not None:
                scores = scores + terms[start:stop, None]
            values, picked = top_rows(scores, k, largest=largest)
            tops.append(values)
            top_positions.append(picked + start)
        if len(tops) > 1:
            values, picked = top_rows(torch.cat(tops), k, largest=largest)
            tops, top_positions = [values], [torch.cat(top_positions).gather(0, picked)]
        columns = (slot * k)[:, None] + torch.arange(tops[0].shape[0], device=tables.device)
        found.append((qi[:, None].expand_as(columns), columns, tops[0].T + shift[qi, lst][:, None], top_positions[0].T))
    if found:
        where = tuple(torch.cat([f[i].flatten() for f in found]) for i in (0, 1))
        best[where] = torch.cat([f[2].flatten() for f in found])
        best_positions[where] = torch.cat([f[3].flatten() for f in found])
    return best, best_positions


def scan_short_lists(
    tables: torch.Tensor,
    shift: torch.Tensor,
    probe: torch.Tensor,
    selected: torch.Tensor,
    k: int,
    entries: torch.Tensor,
    bounds: torch.Tensor,
    terms: torch.Tensor | None = None,
    metric: str = "l2",
) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``k`` best vectors of each query over its selected (query, probed list) pairs: every candidate's
    table entries gathered and summed, in blocks of queries holding about :data:`SCORE_BUDGET` gathered codes.

    Args:
        tables, shift, probe, selected, k, bounds, terms, metric: as for :func:`scan_long_lists`.
        entries: the database's codes in scan order as rows of a query's flattened table (code ``c`` of
            codebook ``m`` is row ``m * K + c``).

    Shapes:
        - entries: (N, M) int32
        - output: scores and scan positions (Q, k); unfilled entries have position -1 and score +-inf
    """
    largest, num, width = metric == "ip", len(tables), tables.shape[1]
    best = tables.new_full((num, k), -math.inf if largest else math.inf)
    best_positions = torch.full((num, k), -1, dtype=torch.long, device=tables.device)
    query, slot = selected.nonzero(as_tuple=True)  # pairs in query order
    lists = probe[query, slot]
    lengths = bounds.diff()[lists]
    per_query = torch.zeros(num, dtype=torch.long, device=tables.device).index_add_(0, query, lengths)
    ends = per_query.cumsum(0)
    # blocks of queries holding about SCORE_BUDGET gathered codes each (a block has at least one query)
    per_block = max(1, SCORE_BUDGET // entries.shape[1])
    marks = torch.arange(1, int(ends[-1]) // per_block + 1, device=ends.device) * per_block
    cuts = torch.cat([ends.new_tensor([0, num]), torch.searchsorted(ends, marks, right=True)]).unique().tolist()
    for qa, qb in zip(cuts[:-1], cuts[1:]):
        in_block = (query >= qa) & (query < qb)
        b_query, b_lists, b_lengths = query[in_block] - qa, lists[in_block], lengths[in_block]
        total = int(b_lengths.sum())
        if total == 0:
            continue
        pair_of = torch.repeat_interleave(torch.arange(len(b_lists), device=tables.device), b_lengths)
        position = (
            torch.arange(total, device=tables.device) + (bounds[b_lists] - (b_lengths.cumsum(0) - b_lengths))[pair_of]
        )
        cand_query = b_query[pair_of]
        index = entries[position]
        index += (cand_query.int() * width)[:, None]
        scores = F.embedding_bag(index, tables[qa:qb].reshape(-1, 1), mode="sum")[:, 0]
        scores += shift[b_query + qa, b_lists][pair_of]
        if terms is not None:
            scores += terms[position]
        counts = per_query[qa:qb]
        starts = counts.cumsum(0) - counts
        dense = scores.new_full((qb - qa, int(counts.max())), -math.inf if largest else math.inf)
        dense.view(-1)[
            torch.arange(total, device=tables.device) + (cand_query * dense.shape[1] - starts[cand_query])
        ] = scores
        top = dense.topk(min(k, dense.shape[1]), dim=1, largest=largest)
        valid = top.indices < counts[:, None]
        picked = position[(top.indices + starts[:, None]).clamp(max=total - 1)]
        best[qa:qb, : top.values.shape[1]] = top.values
        best_positions[qa:qb, : top.values.shape[1]] = torch.where(valid, picked, -1)
    return best, best_positions
