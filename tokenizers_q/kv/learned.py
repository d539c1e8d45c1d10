"""KV caches through any library quantizer (VQ, RVQ, PQ, FSQ, ...) over per-head key and value vectors."""

from __future__ import annotations

import torch

from tokenizers_q.checks import check_finite, check_int
from tokenizers_q.kv.buffer import PackedTokens
from tokenizers_q.kv.cache import LayerCache
from tokenizers_q.kv.tables import quantizer_tables, table_attention, tables_pay
from tokenizers_q.memory import shared_bits
from tokenizers_q.quantizers import Quantizer, create_quantizer


def calibrate_quantizer(name: str, vectors: torch.Tensor, passes: int = 4, **kwargs) -> Quantizer:
    """A registered codebook quantizer (VQ, RVQ, PQ) fitted to calibration vectors: its k-means initialisation
    on the first pass, then ``passes - 1`` passes of its own EMA updates; returned in eval mode. Quantizers
    without a codebook (FSQ, BSQ/LFQ) learn projections and need training instead.

    Shapes:
        - vectors: (N, head_dim) keys or values of one layer (all heads and tokens)
    """
    if vectors.dim() != 2:
        raise ValueError(f"expected calibration vectors (N, head_dim), got {tuple(vectors.shape)}")
    check_int("passes", passes)
    check_finite(vectors, "calibrate_quantizer: vectors")
    quantizer = create_quantizer(name, dim=vectors.shape[1], **kwargs).to(vectors.device).train()
    if not quantizer.codebooks():
        raise ValueError(
            f"{name!r} has no codebook that k-means calibrates (its projections are learned): train it instead"
        )
    with torch.no_grad():
        for _ in range(passes):
            quantizer(vectors.float())
    return quantizer.eval()


class QuantizerLayerCache(LayerCache):
    r"""One layer's cache storing every key and value vector as the codes of a library quantizer.

    Args:
        key_quantizer, value_quantizer: quantizers with ``dim == head_dim`` (e.g. from
            :func:`calibrate_quantizer`, or trained by ``KVTokenizerModule``); used in eval mode.
        count_codebooks: add the quantizers' parameters and codebooks (:func:`~tokenizers_q.memory.shared_bits`)
            to :meth:`stored_bits` (off when they are shared by many sequences). Default: False.
    """

    def __init__(self, key_quantizer: Quantizer, value_quantizer: Quantizer, count_codebooks: bool = False):
        super().__init__()
        if key_quantizer.dim != value_quantizer.dim:
            raise ValueError(f"key and value quantizers differ in dim: {key_quantizer.dim} vs {value_quantizer.dim}")
        self.quantizers = (key_quantizer.eval(), value_quantizer.eval())
        self.count_codebooks = count_codebooks
        # keys, values: (B, H, T, codebooks), packed at their width
        self.codes = tuple(PackedTokens(q.spec, q.spec.num_codebooks) for q in self.quantizers)

    def _append(self, keys, values):
        if keys.shape[-1] != self.quantizers[0].dim:
            raise ValueError(f"the quantizers read head_dim {self.quantizers[0].dim}, got {keys.shape[-1]}")
        for quantizer, x, stored in zip(self.quantizers, (keys, values), self.codes):
            stored.append(quantizer.encode(x.float()))

    def tensors(self, dtype=None):
        """Every token's keys and values (B, H, T, D), decoded from the codes (a new tensor each call; the
        cache keeps only the packed codes)."""
        dtype = dtype or self.dtype
        out = []
        with torch.no_grad():
            for quantizer, stored in zip(self.quantizers, self.codes):
                out.append(quantizer.decode(stored.codes()).to(dtype))
        return out[0], out[1]

    def stored_bits(self) -> int:
        """The packed codes, and with ``count_codebooks`` the quantizers' tables."""
        bits = sum(stored.stored_bits() for stored in self.codes)
        if self.count_codebooks:
            bits += sum(shared_bits(quantizer) for quantizer in self.quantizers)
        return bits

    def attend(self, queries, scale=None, mask=None):
        """Attention from the codes through tables of ``q . codeword`` (:mod:`tokenizers_q.kv.tables`) where the
        quantizers decode to sums over their codebooks (VQ, RVQ, PQ); through :meth:`tensors` for others, and
        for many queries at once (a prefill)."""
        tables = tuple(quantizer_tables(q, q.dim) for q in self.quantizers)
        heads = self._heads()
        if None in tables or not tables_pay(queries, heads, max(t.tables.shape[1] for t in tables)):
            return super().attend(queries, scale, mask)
        return table_attention(queries, self.codes, tables, heads, scale, mask)
