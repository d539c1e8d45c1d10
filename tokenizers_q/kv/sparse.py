"""Dense-and-sparse KV caches: an attention sink and rare outliers kept exactly (KVQuant, Hooper et al., 2024).

Two kinds of elements hurt low-bit KV caches out of proportion to their number:
the first tokens of a sequence, which most heads attend to heavily (the
attention sink), and a small share of elements far outside their channel's
usual range, which stretch every grid and codebook they fall into. The wrapper
keeps the first ``sink_tokens`` tokens in full precision, and stores every
element outside calibrated per-channel bounds as a sparse float16 entry while
the inner cache sees it clamped to the bounds.
"""

from __future__ import annotations

import torch

from tokenizers_q.checks import check_finite, check_int
from tokenizers_q.grids import METADATA_BITS
from tokenizers_q.kv.buffer import TokenBuffer
from tokenizers_q.kv.cache import LayerCache

#: bits of one sparse outlier: its float16 value and a 32-bit index
OUTLIER_BITS = METADATA_BITS + 32


def outlier_bounds(x: torch.Tensor, fraction: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Per head and channel, the bounds leaving ``fraction / 2`` of calibration elements below and above.

    Shapes:
        - x: (B, H, T, D) calibration keys or values
        - output: lower and upper bounds, each (H, D)
    """
    if x.dim() != 4:
        raise ValueError(f"expected calibration keys or values (B, H, T, D), got {tuple(x.shape)}")
    if not 0 < fraction < 1:
        raise ValueError(f"fraction must be in (0, 1), got {fraction!r}")
    check_finite(x, "outlier_bounds: calibration keys or values")
    rows = x.float().permute(1, 3, 0, 2).reshape(x.shape[1], x.shape[3], -1).sort(-1).values
    count = rows.shape[-1]
    tail = min(int(fraction / 2 * count), count - 1)
    return rows[..., tail].clone(), rows[..., count - 1 - tail].clone()  # not views of every sorted element


class DenseAndSparseLayerCache(LayerCache):
    r"""An ``inner`` cache for the dense part, plus a full-precision sink and sparse float16 outliers.

    Args:
        inner: cache storing every token after the sink, with outliers clamped to the bounds.
        sink_tokens: first tokens kept in full precision (not given to ``inner``). Default: 1.
        key_bounds, value_bounds: ``(lower, upper)`` per head and channel from :func:`outlier_bounds`,
            or None to keep no outliers. Default: None.

    :meth:`stored_bits` adds the sink in its dtype and :data:`OUTLIER_BITS` per outlier to the inner cache's.
    """

    def __init__(
        self,
        inner: LayerCache,
        sink_tokens: int = 1,
        key_bounds: tuple[torch.Tensor, torch.Tensor] | None = None,
        value_bounds: tuple[torch.Tensor, torch.Tensor] | None = None,
    ):
        super().__init__()
        if not isinstance(inner, LayerCache):
            raise TypeError(f"inner must be a LayerCache, got {type(inner).__name__}")
        check_int("sink_tokens", sink_tokens, 0)
        self.inner, self.sink_tokens, self.bounds = inner, sink_tokens, (key_bounds, value_bounds)
        self.sink: list[torch.Tensor] | None = None
        # per keys / values: each outlier's int32 index ``t * B * H * D + (b * H + h) * D + d`` (t counted in
        # the inner cache; the index of an element never changes as tokens come) and its float16 value
        self.outliers = [(TokenBuffer(0), TokenBuffer(0)) for _ in range(2)]

    def _append(self, keys, values):
        start = self.num_tokens - keys.shape[2]
        take = max(0, min(self.sink_tokens - start, keys.shape[2]))
        if take:
            new_sink = [keys[:, :, :take].clone(), values[:, :, :take].clone()]  # not views of the caller's
            self.sink = new_sink if self.sink is None else [torch.cat(p, 2) for p in zip(self.sink, new_sink)]
            keys, values = keys[:, :, take:], values[:, :, take:]
        if keys.shape[2] == 0 and self.sink is not None:  # every new token went to the sink
            return
        dense = [self._split(i, x, start + take - self.sink_tokens) for i, x in enumerate((keys, values))]
        self.inner.append(*dense)

    def tensors(self, dtype=None):
        """The sink, then the inner cache's tokens with the outliers put back (a new tensor)."""
        dtype = dtype or self.dtype
        if self.inner.layout is None:  # every token so far is in the sink
            if self.sink is None:
                raise ValueError("the cache is empty: append keys and values first")
            return self.sink[0].to(dtype), self.sink[1].to(dtype)
        past = list(self.inner.tensors(dtype))
        for i, (where, kept) in enumerate(self.outliers):
            if where.length:
                batch, heads, tokens, dim = past[i].shape
                where = where.tensor().long()
                token, element = where // (batch * heads * dim), where % (batch * heads * dim)
                flat = (element // dim * tokens + token) * dim + element % dim  # in (B, H, T, D) order
                values = kept.tensor().to(past[i].dtype)
                past[i] = past[i].reshape(-1).index_put((flat,), values).reshape(past[i].shape)
        if self.sink is not None:
            past = [torch.cat([s.to(dtype), p], 2) for s, p in zip(self.sink, past)]
        return past[0], past[1]

    def _split(self, index: int, x: torch.Tensor, offset: int) -> torch.Tensor:
        """Record the elements of ``x`` outside the bounds as outliers; return ``x`` clamped to them."""
        bounds = self.bounds[index]
        if bounds is None:
            return x
        lower, upper = (b.to(x.device, x.dtype)[None, :, None, :] for b in bounds)
        if lower.shape[1] != x.shape[1] or lower.shape[3] != x.shape[3]:
            raise ValueError(
                f"the bounds are for {lower.shape[1]} heads of dim {lower.shape[3]}, "
                f"got {x.shape[1]} heads of dim {x.shape[3]}"
            )
        outside = (x < lower) | (x > upper)
        batch, heads, tokens, dim = x.shape
        b, h, t, d = outside.nonzero().T
        position = (t + offset) * (batch * heads * dim) + (b * heads + h) * dim + d
        if position.numel() and int(position.max()) >= 2**31:
            raise ValueError(
                f"outlier index {int(position.max())} exceeds the 32 bits it is stored in: cache fewer tokens"
            )
        self.outliers[index][0].append(position.int())
        self.outliers[index][1].append(x[b, h, t, d].to(torch.float16))
        return torch.minimum(torch.maximum(x, lower), upper)

    def num_outliers(self) -> int:
        return sum(kept.length for _, kept in self.outliers)

    def stored_bits(self) -> int:
        bits = self.inner.stored_bits() + OUTLIER_BITS * self.num_outliers()
        if self.sink is not None:
            bits += sum(s.numel() * s.element_size() * 8 for s in self.sink)
        return bits
