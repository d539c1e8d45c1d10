"""KV caches through any library quantizer (VQ, RVQ, PQ, FSQ, ...) over per-head key and value vectors."""

from __future__ import annotations

import torch

from tokenizers_q.checks import check_finite
from tokenizers_q.grids import METADATA_BITS
from tokenizers_q.kv.cache import LayerCache
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
    if not isinstance(passes, int) or passes < 1:
        raise ValueError(f"passes must be a positive int, got {passes!r}")
    check_finite(vectors, "calibrate_quantizer: vectors")
    quantizer = create_quantizer(name, dim=vectors.shape[1], **kwargs).to(vectors.device).train()
    if not any(n.endswith("embed") for n, _ in quantizer.named_buffers()):
        raise ValueError(
            f"{name!r} has no codebook that k-means calibrates (its projections are learned): train it instead"
        )
    with torch.no_grad():
        for _ in range(passes):
            quantizer(vectors.float())
    return quantizer.eval()


def codebook_bits(module: torch.nn.Module) -> int:
    """Bits of a quantizer's (or codec's) shared tensors in float16: its parameters and codebooks."""
    tensors = [*module.parameters(), *(b for n, b in module.named_buffers() if n.endswith("embed"))]
    return METADATA_BITS * sum(t.numel() for t in tensors)


class QuantizerLayerCache(LayerCache):
    r"""One layer's cache storing every key and value vector as the codes of a library quantizer.

    Args:
        key_quantizer, value_quantizer: quantizers with ``dim == head_dim`` (e.g. from
            :func:`calibrate_quantizer`, or trained by ``KVTokenizerModule``); used in eval mode.
        count_codebooks: add the quantizers' parameters and codebooks in float16 to :meth:`stored_bits`
            (off when they are shared by many sequences). Default: False.
    """

    def __init__(self, key_quantizer: Quantizer, value_quantizer: Quantizer, count_codebooks: bool = False):
        super().__init__()
        if key_quantizer.dim != value_quantizer.dim:
            raise ValueError(f"key and value quantizers differ in dim: {key_quantizer.dim} vs {value_quantizer.dim}")
        self.quantizers = (key_quantizer.eval(), value_quantizer.eval())
        self.count_codebooks = count_codebooks
        self.codes: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.past: list[torch.Tensor] | None = None

    def _append(self, keys, values):
        if keys.shape[-1] != self.quantizers[0].dim:
            raise ValueError(f"the quantizers read head_dim {self.quantizers[0].dim}, got {keys.shape[-1]}")
        codes = tuple(q.encode(x.float()) for q, x in zip(self.quantizers, (keys, values)))
        with torch.no_grad():
            decoded = [q.decode(c).to(x.dtype) for q, c, x in zip(self.quantizers, codes, (keys, values))]
        self.codes.append(codes)
        self.past = decoded if self.past is None else [torch.cat([p, d], 2) for p, d in zip(self.past, decoded)]
        return self.past[0], self.past[1]

    def stored_bits(self) -> int:
        bits = 0
        for codes in self.codes:
            for quantizer, c in zip(self.quantizers, codes):
                bits += c[..., 0].numel() * quantizer.spec.bits_per_token
        if self.count_codebooks:
            bits += sum(codebook_bits(quantizer) for quantizer in self.quantizers)
        return bits
