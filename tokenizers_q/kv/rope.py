"""Keys quantized before the rotary position embedding (KVQuant, Hooper et al., 2024).

RoPE rotates pairs of key channels by an angle that grows with the position, so
after RoPE a channel's range is smeared over every position and per-channel
structure (the reason keys are quantized per channel) is blurred. The wrapper
un-rotates each new key with the inverse rotation of its position, lets the
inner cache store the pre-RoPE key, and rotates every reconstructed key back
before attention reads it. Rotations are exact, so with a full-precision inner
cache the wrapper returns its input up to float rounding.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from tokenizers_q.kv.cache import LayerCache

#: ``rotary(positions) -> (cos, sin)`` for a 1-d int64 tensor of positions, each (T, head_dim)
Rotary = Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


def rotary_tables(head_dim: int, base: float = 10000.0) -> Rotary:
    """The standard RoPE angles (half-split channel pairs, as in Llama): ``theta_i = base^(-2i / head_dim)``."""
    if not isinstance(head_dim, int) or head_dim < 2 or head_dim % 2:
        raise ValueError(f"head_dim must be a positive even int, got {head_dim!r}")
    inverse = base ** (-torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)

    def tables(positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        angles = positions.double()[:, None] * inverse.to(positions.device)[None]
        angles = torch.cat([angles, angles], -1)
        return angles.cos().float(), angles.sin().float()

    return tables


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, inverse: bool = False) -> torch.Tensor:
    """Rotate half-split channel pairs of ``x`` by the angles in ``cos``/``sin`` (``inverse``: rotate back).

    Shapes:
        - x: (B, H, T, D)
        - cos, sin: (T, D), broadcast over batch and heads
    """
    half = x.shape[-1] // 2
    rotated_half = torch.cat([-x[..., half:], x[..., :half]], -1)
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    return x * cos - rotated_half * sin if inverse else x * cos + rotated_half * sin


class PreRoPELayerCache(LayerCache):
    r"""Stores keys before RoPE in an ``inner`` cache; returns them rotated to their positions.

    Args:
        inner: the cache that stores (and compresses) pre-RoPE keys and the values.
        rotary: ``positions -> (cos, sin)`` of the model (e.g. :func:`rotary_tables`, or
            :func:`tokenizers_q.kv.hf.hf_rotary` for a transformers model). Positions count
            from the first token this cache saw.

    Shapes:
        - keys, values: (B, H, T_new, D) post-RoPE keys as the attention layer computed them
    """

    def __init__(self, inner: LayerCache, rotary: Rotary):
        super().__init__()
        if not isinstance(inner, LayerCache):
            raise TypeError(f"inner must be a LayerCache, got {type(inner).__name__}")
        if not callable(rotary):
            raise TypeError(f"rotary must map positions to (cos, sin), got {type(rotary).__name__}")
        self.inner, self.rotary = inner, rotary

    def _angles(self, start: int, stop: int, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        cos, sin = self.rotary(torch.arange(start, stop, device=like.device))
        if cos.shape != (stop - start, like.shape[-1]):
            raise ValueError(
                f"rotary gave tables of shape {tuple(cos.shape)}, expected {(stop - start, like.shape[-1])}"
            )
        return cos, sin

    def _append(self, keys, values):
        start = self.num_tokens - keys.shape[2]
        cos, sin = self._angles(start, self.num_tokens, keys)
        self.inner.append(apply_rotary(keys, cos, sin, inverse=True), values)

    def tensors(self, dtype=None):
        """The inner cache's keys rotated to their positions, and its values. (Attention reads these: each
        key's rotation depends on its position, so no table of the query serves every key.)"""
        past_keys, past_values = self.inner.tensors(dtype or self.dtype)
        cos, sin = self._angles(0, self.num_tokens, past_keys)
        return apply_rotary(past_keys, cos, sin), past_values

    def stored_bits(self) -> int:
        return self.inner.stored_bits()
