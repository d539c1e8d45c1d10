"""KV caches: the per-layer cache contract, the full-precision cache, and the multi-layer container.

An attention layer calls ``layer_cache.update(keys, values)`` with the new tokens'
keys and values and attends over what it returns: every token so far, as the
cache can reconstruct them. Caches are append-only: what was stored for earlier
tokens never changes.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable

import torch

from tokenizers_q.checks import check_finite
from tokenizers_q.kv.buffer import TokenBuffer


def check_kv(keys: torch.Tensor, values: torch.Tensor, expected: tuple[int, int, int] | None, dtype) -> None:
    """Raise a clear error unless keys and values are finite (B, H, T, D) float tensors matching the cache so far."""
    for name, t in (("keys", keys), ("values", values)):
        if not isinstance(t, torch.Tensor) or not t.dtype.is_floating_point or t.dim() != 4:
            got = f"{t.dtype} of shape {tuple(t.shape)}" if isinstance(t, torch.Tensor) else type(t).__name__
            raise ValueError(f"{name} must be a float tensor (batch, heads, tokens, head_dim), got {got}")
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
    """The keys and values of one attention layer. Subclasses implement ``_append`` and ``stored_bits``."""

    def __init__(self):
        self.layout: tuple[int, int, int] | None = None  # (batch, heads, head_dim)
        self.dtype: torch.dtype | None = None
        self.num_tokens = 0

    def update(self, keys: torch.Tensor, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Append the new tokens and return the keys and values of every token so far.

        Shapes:
            - keys, values: (B, H, T_new, D)
            - output: two (B, H, T_total, D) tensors in the input's dtype
        """
        check_kv(keys, values, self.layout, self.dtype)
        if self.layout is None:
            self.layout, self.dtype = (keys.shape[0], keys.shape[1], keys.shape[3]), keys.dtype
        self.num_tokens += keys.shape[2]
        return self._append(keys, values)

    def _append(self, keys: torch.Tensor, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def stored_bits(self) -> int:
        """Every bit this cache holds for its tokens: codes, scales, offsets, codebooks, full-precision parts."""
        raise NotImplementedError

    def bits_per_element(self) -> float:
        """Stored bits over the number of key and value elements cached (2 * B * H * T * D)."""
        if not self.num_tokens:
            return 0.0
        batch, heads, dim = self.layout
        return self.stored_bits() / (2 * batch * heads * self.num_tokens * dim)


class FullPrecisionLayerCache(LayerCache):
    """Keys and values stored as given (the reference every compressed cache is measured against)."""

    def __init__(self):
        super().__init__()
        self.keys, self.values = TokenBuffer(), TokenBuffer()

    def _append(self, keys, values):
        self.keys.append(keys)
        self.values.append(values)
        return self.keys.tensor(), self.values.tensor()

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
