"""KIVI: asymmetric min-max integer KV caches, keys per channel and values per token (Liu et al., 2024)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tokenizers_q.grids import METADATA_BITS, GridCodes, dequantize_grid, quantize_grid
from tokenizers_q.kv.cache import LayerCache


@dataclass(frozen=True)
class KIVIConfig:
    r"""Settings of a KIVI cache.

    Args:
        key_bits: bits per key element (1..8). Default: 2.
        value_bits: bits per value element (1..8). Default: 2.
        group_size: tokens sharing a key scale per channel, and channels sharing a
            value scale per token. Default: 32.
        residual: the most recent tokens kept in full precision (at least this many,
            fewer than ``residual + group_size``). Default: 128.
        window_dtype: floating dtype the window is stored in (e.g. ``torch.float16`` under a
            float32 model), or None for the input's dtype. Default: None.
    """

    key_bits: int = 2
    value_bits: int = 2
    group_size: int = 32
    residual: int = 128
    window_dtype: torch.dtype | None = None

    def __post_init__(self):
        for name in ("key_bits", "value_bits"):
            value = getattr(self, name)
            if not isinstance(value, int) or not 1 <= value <= 8:
                raise ValueError(f"{name} must be an int in [1, 8], got {value!r}")
        if not isinstance(self.group_size, int) or self.group_size < 1:
            raise ValueError(f"group_size must be a positive int, got {self.group_size!r}")
        if not isinstance(self.residual, int) or self.residual < 0:
            raise ValueError(f"residual must be a non-negative int, got {self.residual!r}")
        if self.window_dtype is not None and not (
            isinstance(self.window_dtype, torch.dtype) and self.window_dtype.is_floating_point
        ):
            raise ValueError(f"window_dtype must be a floating torch dtype or None, got {self.window_dtype!r}")

    def make_layer(self) -> KIVILayerCache:
        return KIVILayerCache(self)


class KIVILayerCache(LayerCache):
    r"""One layer's KIVI cache: quantized groups of past tokens plus a full-precision window.

    New tokens enter the window; whenever it holds ``residual + group_size`` tokens,
    its oldest ``group_size`` tokens are quantized as one group (keys per channel over
    the group's tokens, values per token over groups of channels) and appended to
    the quantized past, which is never re-quantized. Attention reads the
    dequantized past (kept as a working copy) followed by the window;
    :meth:`stored_bits` counts the compressed form: levels, float16 scales and
    offsets, and the window in its own dtype.
    """

    def __init__(self, config: KIVIConfig):
        super().__init__()
        self.config = config
        self.key_groups: list[GridCodes] = []
        self.value_groups: list[GridCodes] = []
        self.past_keys: torch.Tensor | None = None
        self.past_values: torch.Tensor | None = None
        self.window_keys: torch.Tensor | None = None
        self.window_values: torch.Tensor | None = None

    def _append(self, keys, values):
        config, dim = self.config, keys.shape[-1]
        if dim % min(config.group_size, dim):
            raise ValueError(f"head_dim {dim} must be divisible by the value group size {config.group_size}")
        dtype = keys.dtype
        if config.window_dtype is not None:
            keys, values = keys.to(config.window_dtype), values.to(config.window_dtype)
        if self.window_keys is None:
            self.window_keys, self.window_values = keys, values
        else:
            self.window_keys = torch.cat([self.window_keys, keys], 2)
            self.window_values = torch.cat([self.window_values, values], 2)
        size = config.group_size
        while self.window_keys.shape[2] >= config.residual + size:
            self._quantize_group(self.window_keys[:, :, :size].to(dtype), self.window_values[:, :, :size].to(dtype))
            self.window_keys, self.window_values = self.window_keys[:, :, size:], self.window_values[:, :, size:]
        window_keys, window_values = self.window_keys.to(dtype), self.window_values.to(dtype)
        if self.past_keys is None:
            return window_keys, window_values
        return torch.cat([self.past_keys, window_keys], 2), torch.cat([self.past_values, window_values], 2)

    def _quantize_group(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        config = self.config
        key_codes = quantize_grid(keys, config.key_bits, axis=2)  # per channel over the group's tokens
        value_codes = quantize_grid(
            values, config.value_bits, axis=3, group_size=min(config.group_size, values.shape[3])
        )
        self.key_groups.append(key_codes)
        self.value_groups.append(value_codes)
        new_keys, new_values = dequantize_grid(key_codes, keys.dtype), dequantize_grid(value_codes, values.dtype)
        self.past_keys = new_keys if self.past_keys is None else torch.cat([self.past_keys, new_keys], 2)
        self.past_values = new_values if self.past_values is None else torch.cat([self.past_values, new_values], 2)

    def stored_bits(self) -> int:
        bits = 0
        for codes in (*self.key_groups, *self.value_groups):
            bits += codes.levels.numel() * codes.bits + METADATA_BITS * (codes.scale.numel() + codes.offset.numel())
        if self.window_keys is not None:
            bits += (self.window_keys.numel() + self.window_values.numel()) * self.window_keys.element_size() * 8
        return bits
