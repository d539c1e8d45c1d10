"""Keys and values rotated per head before quantization (a randomized Hadamard rotation, QuaRot style)."""

from __future__ import annotations

from tokenizers_q.hadamard import HadamardRotation
from tokenizers_q.kv.cache import LayerCache


class RotatedLayerCache(LayerCache):
    r"""Stores ``k R`` and ``v R`` in an ``inner`` cache, ``R`` an orthogonal Hadamard rotation of head_dim.

    Outlier channels (a few channels many times larger than the rest) spread over a block of channels, so
    grids per token (KIVI's values) and codebooks lose less; grids per channel (KIVI's keys) already give an
    outlier channel its own scale and gain nothing, so each side can be left as it is. ``R`` is orthogonal, so
    attention needs no key or value back: with rotated keys the queries are rotated too
    (``q R . k R = q . k``), and with rotated values the mix is rotated back once per query
    (``p (v R) R^T = p v``); the inner cache attends from its codes as before. Nothing more is stored
    (``R`` comes from a seed).

    Args:
        inner: the cache that stores (and compresses) the rotated keys and values.
        head_dim: the rotated width.
        seed: the rotation's random signs. Default: 0.
        rotate_keys, rotate_values: which side is rotated. Default: both.

    Shapes:
        - keys, values: (B, H, T_new, head_dim); queries: (B, Hq, Tq, head_dim)
    """

    def __init__(
        self, inner: LayerCache, head_dim: int, seed: int = 0, rotate_keys: bool = True, rotate_values: bool = True
    ):
        super().__init__()
        if not isinstance(inner, LayerCache):
            raise TypeError(f"inner must be a LayerCache, got {type(inner).__name__}")
        if not (rotate_keys or rotate_values):
            raise ValueError("a rotated cache rotates its keys, its values or both: set rotate_keys or rotate_values")
        self.inner, self.rotation = inner, HadamardRotation(head_dim, seed)
        self.rotate_keys, self.rotate_values = rotate_keys, rotate_values

    def _in(self, x, rotated: bool):
        return self.rotation.rotate(x) if rotated else x

    def _out(self, x, rotated: bool):
        return self.rotation.unrotate(x) if rotated else x

    def _append(self, keys, values):
        self.inner.append(self._in(keys, self.rotate_keys), self._in(values, self.rotate_values))

    def tensors(self, dtype=None):
        keys, values = self.inner.tensors(dtype or self.dtype)
        return self._out(keys, self.rotate_keys), self._out(values, self.rotate_values)

    def attend(self, queries, scale=None, mask=None):
        mixed = self.inner.attend(self._in(queries, self.rotate_keys), scale, mask)
        return self._out(mixed, self.rotate_values)

    def stored_bits(self) -> int:
        return self.inner.stored_bits()
