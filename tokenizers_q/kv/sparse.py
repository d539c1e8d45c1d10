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

from tokenizers_q.checks import check_finite
from tokenizers_q.grids import METADATA_BITS
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
    return rows[..., tail], rows[..., count - 1 - tail]


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
        if not isinstance(sink_tokens, int) or sink_tokens < 0:
            raise ValueError(f"sink_tokens must be a non-negative int, got {sink_tokens!r}")
        self.inner, self.sink_tokens, self.bounds = inner, sink_tokens, (key_bounds, value_bounds)
        self.sink: list[torch.Tensor] | None = None
        # per keys / values: the (b, h, t, d) positions (4, n) and float16 values (n,) of outliers
        self.outliers: list[tuple[torch.Tensor, torch.Tensor] | None] = [None, None]

    def _append(self, keys, values):
        start = self.num_tokens - keys.shape[2]
        take = max(0, min(self.sink_tokens - start, keys.shape[2]))
        if take:
            new_sink = [keys[:, :, :take], values[:, :, :take]]
            self.sink = new_sink if self.sink is None else [torch.cat(p, 2) for p in zip(self.sink, new_sink)]
            keys, values = keys[:, :, take:], values[:, :, take:]
        if keys.shape[2] == 0 and self.inner.num_tokens == 0:  # every token so far is in the sink (or none came)
            return (keys, values) if self.sink is None else (self.sink[0], self.sink[1])
        dense = [self._split(i, x, start + take - self.sink_tokens) for i, x in enumerate((keys, values))]
        past = list(self.inner.update(*dense))
        for i, outliers in enumerate(self.outliers):
            if outliers is not None:
                where, kept = outliers
                past[i] = past[i].index_put(tuple(where), kept.to(past[i].dtype))
        if self.sink is not None:
            past = [torch.cat([s, p], 2) for s, p in zip(self.sink, past)]
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
        where = outside.nonzero().T
        where[2] += offset  # positions within the inner cache
        kept = x[outside].to(torch.float16)
        if self.outliers[index] is not None:
            where = torch.cat([self.outliers[index][0], where], 1)
            kept = torch.cat([self.outliers[index][1], kept])
        self.outliers[index] = (where, kept)
        return torch.minimum(torch.maximum(x, lower), upper)

    def num_outliers(self) -> int:
        return sum(o[1].numel() for o in self.outliers if o is not None)

    def stored_bits(self) -> int:
        bits = self.inner.stored_bits() + OUTLIER_BITS * self.num_outliers()
        if self.sink is not None:
            bits += sum(s.numel() * s.element_size() * 8 for s in self.sink)
        return bits
