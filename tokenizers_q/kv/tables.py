"""Attention over codebook codes through tables: the asymmetric-distance trick of the embedding search.

A cache whose vectors are sums of codebook entries, ``k = base + sum_m E_m[code_m]`` (VQ, RVQ, PQ, CQ:
entry ``m`` covering channels ``offset_m : offset_m + width``), scores a query without forming any key:
one table ``q . E_m[k]`` per codebook (``codebooks x entries x width`` products), then a gather-sum by
code per token. Values mix the same way backwards: the probability mass of each entry is summed by code
(a scatter), then multiplied once with the codebooks. A decode step costs ``tokens x codebooks`` lookups
instead of ``tokens x head_dim`` products.
"""

from __future__ import annotations

import weakref
from typing import NamedTuple

import torch

from tokenizers_q.kv import loops
from tokenizers_q.kv.buffer import PackedTokens
from tokenizers_q.kv.cache import attention

MAX_ENTRIES = 4096  # larger codebooks (FSQ / BSQ over many levels) attend through their decoded vectors


class CodewordTables(NamedTuple):
    """The additive form of a cache's vectors.

    Shapes:
        - base: (heads or 1, head_dim), added to every vector
        - tables: (heads or 1, codebooks, entries, width): entry ``k`` of codebook ``m`` is added to channels
          ``offsets[m] : offsets[m] + width``
    """

    base: torch.Tensor
    tables: torch.Tensor
    offsets: tuple[int, ...]


def _flat_codes(codes: torch.Tensor, entries: int) -> torch.Tensor:
    """(B, H, T, M) codes -> (B, H, T * M) indices into the (M * entries) flattened tables."""
    book = torch.arange(codes.shape[-1], device=codes.device) * entries
    return (codes + book).reshape(*codes.shape[:2], -1)


def _per_head(equation: str, x: torch.Tensor, books: torch.Tensor) -> torch.Tensor:
    """``einsum(equation, x, books)``; codebooks shared by every head (``books`` (1, ...)) are not copied per
    head."""
    if books.shape[0] == 1:
        return torch.einsum(equation.replace(",h", ","), x, books[0])
    return torch.einsum(equation, x, books)


def _split(codes: PackedTokens, tokens_dim: torch.Tensor):
    """The C++ loops and the packed rows of the whole octets when both serve, and the codes (B, H, T', M)
    int64 that torch ops read: the tail, or all of them."""
    rows = codes.packed_rows()
    extension = None if rows is None else loops.cpu_loops(rows[0], tokens_dim)
    if extension is None:
        return None, codes.codes()
    return (extension, *rows), None if codes.tail is None else codes.tail.long()


def table_scores(queries: torch.Tensor, codes: PackedTokens, tables: CodewordTables) -> torch.Tensor:
    """``q . k`` for every query and coded token: per token, the sum over codebooks of the table entry its
    code picks (C++ loops over the packed codes on the CPU; gathers elsewhere and for the unpacked tail).

    Shapes:
        - queries: (B, H, Q, D) float32; codes: (B, H, T, M)
        - output: (B, H, Q, T)
    """
    base, books, offsets = tables
    batch, heads, count, _ = queries.shape
    width, entries = books.shape[-1], books.shape[-2]
    parts = torch.stack([queries[..., o : o + width] for o in offsets], -2)  # (B, H, Q, M, width)
    lookup = _per_head("bhqmw,hmkw->bhqmk", parts, books)
    packed, rest = _split(codes, queries)
    scores = []
    if packed is not None:
        extension, rows, bits = packed
        scores.append(extension.code_scores(lookup, rows, bits, 8 * codes.octets.length))
    if rest is not None:
        index = _flat_codes(rest, entries)[:, :, None].expand(-1, -1, count, -1)  # (B, H, Q, T' * M)
        picked = lookup.reshape(batch, heads, count, -1).gather(-1, index)
        scores.append(picked.reshape(batch, heads, count, rest.shape[2], -1).sum(-1))
    scores = scores[0] if len(scores) == 1 else torch.cat(scores, -1)
    return scores + (queries * base[None, :, None]).sum(-1, keepdim=True)


def table_mix(probs: torch.Tensor, codes: PackedTokens, tables: CodewordTables, dim: int) -> torch.Tensor:
    """``sum_t p_t v_t`` for coded values: the mass of each codebook entry (C++ loops over the packed codes
    on the CPU; a scatter elsewhere and for the unpacked tail), then one product per codebook.

    Shapes:
        - probs: (B, H, Q, T) float32; codes: (B, H, T, M)
        - output: (B, H, Q, D)
    """
    base, books, offsets = tables
    batch, heads, count, tokens = probs.shape
    codebooks, entries, width = books.shape[1:]
    packed, rest = _split(codes, probs)
    mass = probs.new_zeros(batch, heads, count, codebooks * entries)
    if packed is not None:
        extension, rows, bits = packed
        whole = 8 * codes.octets.length
        mass += extension.code_mass(probs[..., :whole], rows, bits, codebooks, entries).reshape(mass.shape)
    if rest is not None:
        index = _flat_codes(rest, entries)[:, :, None].expand(-1, -1, count, -1)
        tail = probs[..., tokens - rest.shape[2] :, None].expand(-1, -1, -1, -1, codebooks)
        mass.scatter_add_(-1, index, tail.reshape(batch, heads, count, -1))
    mass = mass.reshape(batch, heads, count, codebooks, entries)
    parts = _per_head("bhqmk,hmkw->bhqmw", mass, books)
    out = probs.sum(-1, keepdim=True) * base[None, :, None]
    for m, offset in enumerate(offsets):
        out[..., offset : offset + width] += parts[..., m, :]
    return out


_TABLES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # quantizer -> (state versions, tables)


def quantizer_tables(quantizer: torch.nn.Module, dim: int) -> CodewordTables | None:
    """The tables of a library quantizer whose decoded vectors are sums over its codebooks (VQ, RVQ, PQ, with
    their linear projections), read off by decoding each entry; None when its decoder is not such a sum
    (checked on random codes) or a codebook is larger than :data:`MAX_ENTRIES`. Made once per quantizer and
    state (shared by every cache of that quantizer), again after its tensors change."""
    state = tuple((t.data_ptr(), t._version) for t in [*quantizer.parameters(), *quantizer.buffers()])
    known = _TABLES.get(quantizer)
    if known is None or known[0] != state:
        known = _TABLES[quantizer] = (state, _read_tables(quantizer, dim))
    return known[1]


def tables_pay(queries: torch.Tensor, heads: int, codebooks: int) -> bool:
    """Whether lookups cost less than dequantizing for these queries: query rows per key/value head times
    codebooks below head_dim (a decode step, not a prefill)."""
    return queries.shape[1] // heads * queries.shape[2] * codebooks <= queries.shape[-1]


def table_attention(
    queries: torch.Tensor,
    codes: tuple[PackedTokens, PackedTokens],
    tables: tuple[CodewordTables, CodewordTables],
    heads: int,
    scale: float | None = None,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """:func:`~tokenizers_q.kv.cache.attention` of coded keys and values (each (B, H, T, M) packed) through
    their tables: scores by :func:`table_scores`, values by :func:`table_mix`."""
    (key_codes, value_codes), (key_tables, value_tables) = codes, tables
    return attention(
        queries,
        lambda q: table_scores(q, key_codes, key_tables),
        lambda p: table_mix(p, value_codes, value_tables, queries.shape[-1]),
        heads,
        scale,
        mask,
    )


@torch.no_grad()
def _read_tables(quantizer: torch.nn.Module, dim: int) -> CodewordTables | None:
    spec = quantizer.spec
    if max(spec.codebook_sizes) > MAX_ENTRIES:
        return None
    device = next((b.device for b in quantizer.buffers()), torch.device("cpu"))
    zero = torch.zeros(1, spec.num_codebooks, dtype=torch.long, device=device)
    base = quantizer.decode(zero)[0].float()
    rows = []
    for m, size in enumerate(spec.codebook_sizes):
        codes = zero.repeat(size, 1)
        codes[:, m] = torch.arange(size, device=device)
        rows.append(quantizer.decode(codes).float() - base)  # (size, D); entry 0 is zero
    generator = torch.Generator(device=device).manual_seed(0)
    probe = torch.stack(
        [torch.randint(0, size, (64,), generator=generator, device=device) for size in spec.codebook_sizes], -1
    )
    summed = base + sum(rows[m][probe[:, m]] for m in range(spec.num_codebooks))
    decoded = quantizer.decode(probe).float()
    if not torch.allclose(summed, decoded, rtol=1e-4, atol=1e-5 * decoded.abs().max().clamp_min(1)):
        return None
    offsets, width = _supports(rows, dim)
    entries = max(spec.codebook_sizes)
    books = torch.zeros(1, spec.num_codebooks, entries, width, device=device)
    for m, (row, offset) in enumerate(zip(rows, offsets)):
        books[0, m, : row.shape[0]] = row[:, offset : offset + width]
    return CodewordTables(base[None], books, offsets)


def _supports(rows: list[torch.Tensor], dim: int) -> tuple[tuple[int, ...], int]:
    """Channel offsets and the common width of the slices the codebooks touch (PQ groups); else full width."""
    spans = []
    for row in rows:
        touched = (row != 0).any(0).nonzero()[:, 0]
        spans.append((0, 0) if not touched.numel() else (int(touched[0]), int(touched[-1]) + 1))
    widths = {stop - start for start, stop in spans if stop > start}
    if len(widths) == 1:
        width = widths.pop()
        starts = tuple(start for start, _ in spans)
        if all(start + width <= dim for start in starts):
            return starts, width
    return (0,) * len(rows), dim
