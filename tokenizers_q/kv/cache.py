"""KV caches: the per-layer cache contract, the full-precision cache, and the multi-layer container.

An attention layer either calls ``layer_cache.update(keys, values)`` with the new tokens' keys and
values and attends over what it returns (every token so far, made from the stored form), or calls
``append(keys, values)`` and then ``attend(queries)``, which reads the stored form directly (codes,
scales, codebook tables) without making the keys and values. Caches are append-only: what was stored
for earlier tokens never changes.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable

import torch

from tokenizers_q.checks import check_finite, check_float_tensor
from tokenizers_q.kv.buffer import TokenBuffer


def check_kv(keys: torch.Tensor, values: torch.Tensor, expected: tuple[int, int, int] | None, dtype) -> None:
    """Raise a clear error unless keys and values are finite (B, H, T, D) float tensors matching the cache so far."""
    for name, t in (("keys", keys), ("values", values)):
        check_float_tensor(name, t)
        if t.dim() != 4:
            raise ValueError(f"{name} must be (batch, heads, tokens, head_dim), got shape {tuple(t.shape)}")
        check_finite(t, f"{name} tensor", hint="look for an overflow in the model (e.g. float16 activations)")
    if keys.shape != values.shape:
        raise ValueError(f"keys {tuple(keys.shape)} and values {tuple(values.shape)} must have the same shape")
    if expected is not None:
        batch, heads, dim = keys.shape[0], keys.shape[1], keys.shape[3]
        if (batch, heads, dim) != expected:
            raise ValueError(
                f"this cache holds (batch, heads, head_dim) = {expected}, got {(batch, heads, dim)} for the new tokens"
            )
        if dtype is not None and keys.dtype != dtype:
            raise ValueError(f"this cache holds {dtype} keys and values, got {keys.dtype}")


class LayerCache:
    """The keys and values of one attention layer. Subclasses implement ``_append`` (store), ``tensors``
    (read back) and ``stored_bits``, and override ``attend`` where they can attend from their codes."""

    def __init__(self):
        self.layout: tuple[int, int, int] | None = None  # (batch, heads, head_dim)
        self.dtype: torch.dtype | None = None
        self.num_tokens = 0

    def append(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Store the new tokens' keys and values (B, H, T_new, D)."""
        check_kv(keys, values, self.layout, self.dtype)
        if self.layout is None:
            self.layout, self.dtype = (keys.shape[0], keys.shape[1], keys.shape[3]), keys.dtype
        self.num_tokens += keys.shape[2]
        self._append(keys, values)

    def update(self, keys: torch.Tensor, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Append the new tokens and return the keys and values of every token so far (made from the stored
        form; the cache keeps nothing of them).

        Shapes:
            - keys, values: (B, H, T_new, D)
            - output: two (B, H, T_total, D) tensors in the input's dtype
        """
        self.append(keys, values)
        return self.tensors(keys.dtype)

    def _append(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        raise NotImplementedError

    def tensors(self, dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Every cached token's keys and values (B, H, T, D) in ``dtype`` (default: the cache's)."""
        raise NotImplementedError

    def attend(
        self, queries: torch.Tensor, scale: float | None = None, mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """``softmax(q k^T * scale + mask) v`` over every cached token (here through :meth:`tensors`; caches
        with codes override it to read them directly). See :func:`attention` for the shapes."""
        heads = self._heads()
        keys, values = self.tensors(torch.float32)
        return attention(queries, lambda q: q @ keys.transpose(-1, -2), lambda p: p @ values, heads, scale, mask)

    def _heads(self) -> int:
        if self.layout is None:
            raise ValueError("the cache is empty: append keys and values before attending")
        return self.layout[1]

    def stored_bits(self) -> int:
        """Every bit this cache holds for its tokens: codes, scales, offsets, codebooks, full-precision parts."""
        raise NotImplementedError

    def bits_per_element(self) -> float:
        """Stored bits over the number of key and value elements cached (2 * B * H * T * D)."""
        if not self.num_tokens:
            return 0.0
        batch, heads, dim = self.layout
        return self.stored_bits() / (2 * batch * heads * self.num_tokens * dim)


def attention(
    queries: torch.Tensor,
    scores: Callable[[torch.Tensor], torch.Tensor],
    mix: Callable[[torch.Tensor], torch.Tensor],
    heads: int,
    scale: float | None = None,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Attention of ``queries`` over a cache that scores queries (``scores``) and mixes its values by
    probabilities (``mix``), with grouped-query heads: key/value head ``h`` serves query heads
    ``h * r ... (h + 1) * r - 1`` (``r = Hq / H``, as ``repeat_kv`` orders them).

    Args:
        scale: of the scores. Default: ``head_dim ** -0.5``.
        mask: bool (True attends) or additive float, broadcastable to (B, Hq, Tq, T); None attends to all.

    Shapes:
        - queries: (B, Hq, Tq, D)
        - scores: (B, H, r * Tq, D) float32 -> (B, H, r * Tq, T); mix: (B, H, r * Tq, T) -> (B, H, r * Tq, D)
        - output: (B, Hq, Tq, D) in the queries' dtype
    """
    batch, query_heads, count, dim = queries.shape
    if query_heads % heads:
        raise ValueError(f"{query_heads} query heads cannot share {heads} key/value heads evenly")
    grouped = queries.float().reshape(batch, heads, query_heads // heads * count, dim)
    logits = scores(grouped).reshape(batch, query_heads, count, -1) * (dim**-0.5 if scale is None else scale)
    if mask is not None:
        logits = logits.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else logits + mask
    probs = torch.softmax(logits, -1).reshape(batch, heads, query_heads // heads * count, -1)
    return mix(probs).reshape(batch, query_heads, count, dim).to(queries.dtype)


class FullPrecisionLayerCache(LayerCache):
    """Keys and values stored as given (the reference every compressed cache is measured against)."""

    def __init__(self):
        super().__init__()
        self.keys, self.values = TokenBuffer(), TokenBuffer()

    def _append(self, keys, values):
        self.keys.append(keys)
        self.values.append(values)

    def tensors(self, dtype=None):
        dtype = dtype or self.dtype
        return self.keys.tensor().to(dtype), self.values.tensor().to(dtype)

    def stored_bits(self) -> int:
        return self.keys.stored_bits() + self.values.stored_bits()


class KVCache:
    """One :class:`LayerCache` per attention layer, made on first use by ``make_layer`` (default: full precision).

    ``cache[i].update(keys, values)`` in layer ``i``; ``bits_per_element()`` over all layers.
    """

    def __init__(self, make_layer: Callable[[], LayerCache] = FullPrecisionLayerCache):
        self.make_layer = make_layer
        self.layers: list[LayerCache] = []

    def __getitem__(self, index: int) -> LayerCache:
        while len(self.layers) <= index:
            self.layers.append(self.make_layer())
        return self.layers[index]

    def __len__(self) -> int:
        return len(self.layers)

    @property
    def num_tokens(self) -> int:
        return self.layers[0].num_tokens if self.layers else 0

    def bits_per_element(self) -> float:
        return total_bits_per_element(self.layers)


def total_bits_per_element(layers: Iterable[LayerCache]) -> float:
    """Stored bits of several layer caches over all the key and value elements they cache."""
    layers = [layer for layer in layers if layer.layout is not None]
    elements = sum(2 * math.prod(layer.layout) * layer.num_tokens for layer in layers)
    return sum(layer.stored_bits() for layer in layers) / elements if elements else 0.0
