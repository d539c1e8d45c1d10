"""KIVI: asymmetric min-max integer KV caches, keys per channel and values per token (Liu et al., 2024)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tokenizers_q.checks import check_int
from tokenizers_q.compiled import Compiled
from tokenizers_q.grids import quantize_grid
from tokenizers_q.kv import loops
from tokenizers_q.kv.buffer import PackedTokens, TokenBuffer
from tokenizers_q.kv.cache import LayerCache, attention
from tokenizers_q.packing import TokenSpec, code_planes

# off the CPU (the C++ loops' home); the token count grows every step: one graph for every length
_COMPILED = Compiled("attention from KIVI codes", dynamic=True)


def _fused(loop, function, *args):
    """``function(*args)`` by the C++ loop on the CPU, else compiled, else (neither available) in eager."""
    out = loop(*args)
    if out is None:
        out = _COMPILED(function, *args)
    return function(*args) if out is None else out


def _levels(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """Levels (B, H, T, D) as floats from a token's bytes (B, H, T, D * bits / 8), for 1, 2, 4 or 8 bits: a
    byte's codes as :func:`~tokenizers_q.packing.code_planes`, which the compiler fuses into the products."""
    planes = code_planes(packed.reshape(-1), bits, packed.numel() * 8 // bits)
    return torch.stack([p.reshape(packed.shape) for p in planes], -1).reshape(*packed.shape[:-1], -1).float()


def _coded_scores(queries, key_bytes, key_scale, key_offset, bits: int):
    """``q . k`` for coded keys, ``k = scale * level + offset`` per channel and group of tokens, as one
    reduction over the channels (no level or key tensor is written out when compiled).

    Shapes:
        - queries: (B, H, Q, D); key_bytes: (B, H, T, D * bits / 8); key_scale, key_offset: (B, H, groups, D)
        - output: (B, H, Q, T)
    """
    batch, heads, count, dim = queries.shape
    groups = key_scale.shape[2]
    levels = _levels(key_bytes, bits).reshape(batch, heads, 1, groups, -1, dim)
    keys = levels * key_scale.float()[:, :, None, :, None] + key_offset.float()[:, :, None, :, None]
    return (keys * queries[:, :, :, None, None]).sum(-1).reshape(batch, heads, count, -1)


def _coded_mix(probs, value_bytes, value_scale, value_offset, bits: int):
    """``sum_t p_t v_t`` for coded values, ``v = scale * level + offset`` per token and channel group, as one
    reduction over the tokens.

    Shapes:
        - probs: (B, H, Q, T); value_bytes: (B, H, T, D * bits / 8); value_scale, value_offset: (B, H, T, C)
        - output: (B, H, Q, D)
    """
    batch, heads, count, tokens = probs.shape
    channel_groups = value_scale.shape[-1]
    levels = _levels(value_bytes, bits).reshape(batch, heads, 1, tokens, channel_groups, -1)
    values = levels * value_scale.float()[:, :, None, :, :, None] + value_offset.float()[:, :, None, :, :, None]
    return (values * probs[..., None, None]).sum(3).reshape(batch, heads, count, -1)


@dataclass(frozen=True)
class KIVIConfig:
    r"""Settings of a KIVI cache.

    Args:
        key_bits: bits per key element (1..8). Default: 2.
        value_bits: bits per value element (1..8). Default: 2.
        group_size: tokens sharing a key scale per channel, and channels sharing a
            value scale per token. Default: 32.
        window: the most recent tokens kept in full precision (at least this many,
            fewer than ``window + group_size``). Default: 128.
        window_dtype: floating dtype the window is stored in (e.g. ``torch.float16`` under a
            float32 model), or None for the input's dtype. Default: None.
    """

    key_bits: int = 2
    value_bits: int = 2
    group_size: int = 32
    window: int = 128
    window_dtype: torch.dtype | None = None

    def __post_init__(self):
        for name in ("key_bits", "value_bits"):
            check_int(name, getattr(self, name), 1, 8)
        check_int("group_size", self.group_size)
        check_int("window", self.window, 0)
        if self.window_dtype is not None and not (
            isinstance(self.window_dtype, torch.dtype) and self.window_dtype.is_floating_point
        ):
            raise ValueError(f"window_dtype must be a floating torch dtype or None, got {self.window_dtype!r}")

    def make_layer(self) -> KIVILayerCache:
        return KIVILayerCache(self)


class KIVILayerCache(LayerCache):
    r"""One layer's KIVI cache: quantized groups of past tokens plus a full-precision window.

    New tokens enter the window; whenever it holds ``window + group_size`` tokens,
    its oldest ``group_size`` tokens are quantized as one group (keys per channel over
    the group's tokens, values per token over groups of channels) and appended to
    the quantized past, which is never re-quantized. The past is held as it is counted by
    :meth:`stored_bits`: levels packed at their width, float16 scales and offsets (see
    :mod:`tokenizers_q.kv.buffer`); :meth:`tensors` dequantizes it for the caller and keeps
    nothing of that, :meth:`attend` reads the codes.
    """

    #: attend through fused loops over the packed bytes (C++ on the CPU, ``torch.compile`` elsewhere); set
    #: False on a cache, or on the class, for products with the unpacked levels in eager torch
    fused_attention: bool = True

    def __init__(self, config: KIVIConfig):
        super().__init__()
        self.config = config
        # keys: levels (B, H, T, D), scale and offset (B, H, groups, D); values: levels, and scale and offset
        # (B, H, T, D / value group)
        self.keys = {"scale": TokenBuffer(), "offset": TokenBuffer()}
        self.values = {"scale": TokenBuffer(), "offset": TokenBuffer()}
        self.window_keys: torch.Tensor | None = None
        self.window_values: torch.Tensor | None = None

    @property
    def quantized_tokens(self) -> int:
        """Tokens stored as codes (the others are in the window)."""
        return self.keys["levels"].length if "levels" in self.keys else 0

    def _append(self, keys, values):
        config, dim = self.config, keys.shape[-1]
        if dim % min(config.group_size, dim):
            raise ValueError(f"head_dim {dim} must be divisible by the value group size {config.group_size}")
        dtype = keys.dtype
        if config.window_dtype is not None:
            keys, values = keys.to(config.window_dtype), values.to(config.window_dtype)
        if self.window_keys is None:  # a copy: never a view of the caller's tensors
            self.window_keys, self.window_values = keys.clone(), values.clone()
        else:  # the window is at most window + group_size tokens: bounded copies
            self.window_keys = torch.cat([self.window_keys, keys], 2)
            self.window_values = torch.cat([self.window_values, values], 2)
        size = config.group_size
        quantized = (self.window_keys.shape[2] - config.window) // size * size
        if quantized > 0:
            self._quantize(self.window_keys[:, :, :quantized].to(dtype), self.window_values[:, :, :quantized].to(dtype))
            self.window_keys = self.window_keys[:, :, quantized:].clone()
            self.window_values = self.window_values[:, :, quantized:].clone()

    def tensors(self, dtype=None):
        dtype = dtype or self.dtype
        window_keys, window_values = self.window_keys.to(dtype), self.window_values.to(dtype)
        if not self.quantized_tokens:
            return window_keys, window_values
        past_keys, past_values = self._past(dtype)
        return torch.cat([past_keys, window_keys], 2), torch.cat([past_values, window_values], 2)

    def attend(self, queries, scale=None, mask=None):
        """Attention from the codes: per group of tokens, ``q . k = (q * scale) . levels + q . offset``; values
        per token ``sum_t p_t (scale_t levels_t + offset_t)``. With :attr:`fused_attention` (1, 2, 4 or 8 bits)
        each is one loop over the packed bytes (:mod:`tokenizers_q.kv.loops` on the CPU, ``torch.compile``
        elsewhere); else products of ``q * scale`` and ``p * scale`` with the unpacked levels. No key or value
        is dequantized. Many queries at once (a prefill longer than a group) attend through :meth:`tensors`,
        then cheaper."""
        config = self.config
        if not self.quantized_tokens or queries.shape[1] // self._heads() * queries.shape[2] > config.group_size:
            return super().attend(queries, scale, mask)
        window_keys, window_values = self.window_keys.float(), self.window_values.float()
        quantized, heads = self.quantized_tokens, self._heads()
        if self.fused_attention and self._whole_bytes():
            key_bytes, value_bytes = (self._token_bytes(stored["levels"]) for stored in (self.keys, self.values))
            key_scale, key_offset = self.keys["scale"].tensor(), self.keys["offset"].tensor()
            value_scale, value_offset = self.values["scale"].tensor(), self.values["offset"].tensor()
            value_bits = config.value_bits

            def scores(q):
                coded = _fused(loops.kivi_scores, _coded_scores, q, key_bytes, key_scale, key_offset, config.key_bits)
                return torch.cat([coded, q @ window_keys.transpose(-1, -2)], -1)

            def mix(p):
                coded, recent = p[..., :quantized].contiguous(), p[..., quantized:]
                out = _fused(loops.kivi_mix, _coded_mix, coded, value_bytes, value_scale, value_offset, value_bits)
                return out + recent @ window_values

            return attention(queries, scores, mix, heads, scale, mask)
        key_levels = self.keys["levels"].codes(torch.uint8).float()  # (B, H, T, D)
        key_scale, key_offset = self.keys["scale"].tensor().float(), self.keys["offset"].tensor().float()
        value_levels = self.values["levels"].codes(torch.uint8).float()
        value_scale, value_offset = self.values["scale"].tensor().float(), self.values["offset"].tensor().float()
        batch, heads, _, dim = key_levels.shape
        groups, channel_groups = key_scale.shape[2], value_scale.shape[3]
        by_group = key_levels.reshape(batch, heads, groups, config.group_size, dim).transpose(-1, -2)

        def scores(q):  # (B, H, Q, D)
            scaled = q[:, :, None] * key_scale[:, :, :, None]  # (B, H, groups, Q, D)
            coded = scaled @ by_group + (q[:, :, None] * key_offset[:, :, :, None]).sum(-1, keepdim=True)
            coded = coded.permute(0, 1, 3, 2, 4).reshape(batch, heads, q.shape[2], quantized)
            return torch.cat([coded, q @ window_keys.transpose(-1, -2)], -1)

        def mix(p):  # (B, H, Q, T)
            coded, recent = p[..., :quantized], p[..., quantized:]
            width = dim // channel_groups
            parts = [
                (coded * value_scale[..., c][:, :, None]) @ value_levels[..., c * width : (c + 1) * width]
                for c in range(channel_groups)
            ]
            offsets = (coded @ value_offset).repeat_interleave(width, -1)
            return torch.cat(parts, -1) + offsets + recent @ window_values

        return attention(queries, scores, mix, heads, scale, mask)

    def _whole_bytes(self) -> bool:
        """Whether every quantized token's levels are whole bytes of whole codes, and each value scale group
        whole bytes (what the fused loops read)."""
        dim, config = self.layout[2], self.config
        value_group = min(config.group_size, dim)
        return value_group * config.value_bits % 8 == 0 and all(
            bits in (1, 2, 4, 8) and dim * bits % 8 == 0 and stored["levels"].tail is None
            for bits, stored in ((config.key_bits, self.keys), (config.value_bits, self.values))
        )

    def _token_bytes(self, levels: PackedTokens) -> torch.Tensor:
        """The packed levels as (B, H, T, bytes of a token): a view of the octets' storage."""
        octets = levels.octets.tensor()
        return octets.reshape(*octets.shape[:2], -1, octets.shape[-1] // 8)

    def _quantize(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Quantize whole groups of tokens (B, H, n * group_size, D) and append their codes."""
        config, (batch, heads, tokens, dim) = self.config, keys.shape
        groups = keys.reshape(batch, heads, tokens // config.group_size, config.group_size, dim)
        key_codes = quantize_grid(groups, config.key_bits, axis=3)  # per channel over each group's tokens
        value_group = min(config.group_size, dim)
        value_codes = quantize_grid(values, config.value_bits, axis=3, group_size=value_group)
        if "levels" not in self.keys:
            self.keys["levels"] = PackedTokens(TokenSpec((2**config.key_bits,)), dim)
            self.values["levels"] = PackedTokens(TokenSpec((2**config.value_bits,)), dim)
        self.keys["levels"].append(key_codes.levels.reshape(batch, heads, tokens, dim))
        self.keys["scale"].append(key_codes.scale.reshape(groups.shape[:3] + (dim,)))  # (B, H, groups, D)
        self.keys["offset"].append(key_codes.offset.reshape(groups.shape[:3] + (dim,)))
        self.values["levels"].append(value_codes.levels)
        self.values["scale"].append(value_codes.scale)  # (B, H, T, D / value group)
        self.values["offset"].append(value_codes.offset)

    def _past(self, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """The quantized tokens' keys and values (B, H, quantized_tokens, D) in ``dtype``, made from the codes."""
        config, dim = self.config, self.layout[2]
        out = []
        for stored, group in ((self.keys, None), (self.values, dim)):
            levels = stored["levels"].codes(torch.uint8).float()
            scale, offset = stored["scale"].tensor().float(), stored["offset"].tensor().float()
            batch, heads, tokens, _ = levels.shape
            if group is None:  # keys: (B, H, groups, 1, D) over each group's tokens
                levels = levels.reshape(batch, heads, -1, config.group_size, dim)
                x = levels * scale[:, :, :, None] + offset[:, :, :, None]
            else:  # values: (B, H, T, D / value group, 1) over each token's channel groups
                levels = levels.reshape(batch, heads, tokens, scale.shape[-1], -1)
                x = levels * scale[..., None] + offset[..., None]
            out.append(x.reshape(batch, heads, tokens, dim).to(dtype))
        return out[0], out[1]

    def stored_bits(self) -> int:
        bits = sum(buffer.stored_bits() for stored in (self.keys, self.values) for buffer in stored.values())
        if self.window_keys is not None:
            bits += (self.window_keys.numel() + self.window_values.numel()) * self.window_keys.element_size() * 8
        return bits
