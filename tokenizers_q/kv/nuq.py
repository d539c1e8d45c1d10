"""Non-uniform KV levels (KVQuant's nuq): keys per channel, values per token, on levels fitted to calibration.

Keys are normalised per channel by a centre and scale measured offline (so a channel of large keys keeps
its own range and needs no per-token metadata), values per token by their abs-max (stored in float16). Each
normalised element is then replaced by the nearest of ``2^bits`` levels fitted by 1-d k-means to the layer's
normalised calibration keys (values), weighted by their Fisher information when given: levels sit where
the elements that matter most for the loss lie. Bits per element: ``key_bits`` for keys,
``value_bits + 16 / head_dim`` for values; the per-layer tables are shared by every sequence.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tokenizers_q.checks import check_int
from tokenizers_q.grids import METADATA_BITS, nearest_level
from tokenizers_q.kmeans import kmeans
from tokenizers_q.kv.buffer import PackedTokens, TokenBuffer
from tokenizers_q.kv.cache import LayerCache, check_kv
from tokenizers_q.packing import TokenSpec

MAX_FIT_VALUES = 2**18  # normalised elements k-means sees per table (a seeded sample beyond)


@dataclass(frozen=True)
class NUQConfig:
    r"""Settings of non-uniform KV quantization.

    Args:
        key_bits, value_bits: bits per key / value element, 1..8. Default: 3.
        kmeans_iters: k-means iterations of the level fits. Default: 20.
        seed: k-means seeding and sampling. Default: 0.
    """

    key_bits: int = 3
    value_bits: int = 3
    kmeans_iters: int = 20
    seed: int = 0

    def __post_init__(self):
        check_int("key_bits", self.key_bits, 1, 8)
        check_int("value_bits", self.value_bits, 1, 8)
        check_int("kmeans_iters", self.kmeans_iters, 0)
        check_int("seed", self.seed, 0)


def _levels(x: torch.Tensor, weights: torch.Tensor | None, bits: int, config: NUQConfig) -> torch.Tensor:
    """Ascending ``2^bits`` float16 levels of the elements ``x`` (any shape) by weighted 1-d k-means."""
    generator = torch.Generator(device=x.device).manual_seed(config.seed)
    flat = x.reshape(-1, 1).float()
    flat_weights = None if weights is None else weights.reshape(-1).float()
    if flat.shape[0] > MAX_FIT_VALUES:
        keep = torch.randperm(flat.shape[0], generator=generator, device=x.device)[:MAX_FIT_VALUES]
        flat, flat_weights = flat[keep], None if flat_weights is None else flat_weights[keep]
    fit = kmeans(flat, 2**bits, config.kmeans_iters, flat_weights, generator=generator)
    return fit.centroids[:, 0].sort().values.to(torch.float16)


class NUQLevels:
    r"""One layer's calibrated datatype: per-channel key centres and scales, and the levels of normalised keys
    and values, all float16 (as counted by :meth:`stored_bits`).

    Shapes:
        - key_center, key_scale: (heads, head_dim); key_levels: (2^key_bits,); value_levels: (2^value_bits,)
    """

    def __init__(self, key_center, key_scale, key_levels, value_levels, config: NUQConfig):
        if key_center.shape != key_scale.shape or key_center.dim() != 2:
            raise ValueError(f"key centre and scale must share a (heads, head_dim) shape, got {key_center.shape}")
        if key_levels.shape != (2**config.key_bits,) or value_levels.shape != (2**config.value_bits,):
            raise ValueError(
                f"levels must number 2^key_bits and 2^value_bits, got {tuple(key_levels.shape)} and "
                f"{tuple(value_levels.shape)} for {config}"
            )
        self.key_center, self.key_scale = key_center.to(torch.float16), key_scale.to(torch.float16)
        self.key_levels, self.value_levels = key_levels.to(torch.float16), value_levels.to(torch.float16)
        self.config = config

    @classmethod
    def fit(
        cls,
        keys: torch.Tensor,
        values: torch.Tensor,
        config: NUQConfig,
        key_weights: torch.Tensor | None = None,
        value_weights: torch.Tensor | None = None,
    ) -> NUQLevels:
        """Centres, scales and levels from calibration keys and values of one layer (weights: e.g. the Fisher
        information of each key / value vector).

        Shapes:
            - keys, values: (B, H, T, D); key_weights, value_weights: (B, H, T) non-negative, or None
        """
        check_kv(keys, values, None, None)
        keys, values = keys.float(), values.float()
        center = keys.mean((0, 2))  # (H, D)
        scale = (keys - center[:, None]).abs().amax((0, 2)).clamp_min(1e-6)
        normalised_keys = (keys - center[:, None]) / scale[:, None]
        normalised_values = values / values.abs().amax(-1, keepdim=True).clamp_min(1e-6)

        def spread(weights):  # a vector's weight on each of its elements
            return None if weights is None else weights[..., None].expand_as(keys)

        key_levels = _levels(normalised_keys, spread(key_weights), config.key_bits, config)
        value_levels = _levels(normalised_values, spread(value_weights), config.value_bits, config)
        return cls(center, scale, key_levels, value_levels, config)

    def stored_bits(self) -> int:
        tables = (self.key_center, self.key_scale, self.key_levels, self.value_levels)
        return METADATA_BITS * sum(t.numel() for t in tables)


class NUQLayerCache(LayerCache):
    r"""One layer's cache of keys and values on calibrated non-uniform levels (:class:`NUQLevels`).

    Keys are stored as ``key_bits`` codes per element (their normalisation is the layer's), values as
    ``value_bits`` codes per element and a float16 abs-max per token and head. ``stored_bits`` counts them and,
    with ``count_codebooks``, the layer's tables.
    """

    def __init__(self, levels: NUQLevels, count_codebooks: bool = False):
        super().__init__()
        self.levels, self.count_codebooks = levels, count_codebooks
        dim = levels.key_center.shape[1]
        self.codes = (
            PackedTokens(TokenSpec((2**levels.config.key_bits,)), dim),
            PackedTokens(TokenSpec((2**levels.config.value_bits,)), dim),
        )
        self.value_scale = TokenBuffer()  # (B, H, T, 1) float16

    def _tables(self, device):
        names = ("key_center", "key_scale", "key_levels", "value_levels")
        return [getattr(self.levels, name).to(device, torch.float32) for name in names]

    def _append(self, keys, values):
        heads, dim = self.levels.key_center.shape
        if keys.shape[1] != heads or keys.shape[3] != dim:
            raise ValueError(
                f"the levels were fitted for {heads} heads of dim {dim}, got {keys.shape[1]} heads of dim "
                f"{keys.shape[3]}"
            )
        center, scale, key_levels, value_levels = self._tables(keys.device)
        normalised = (keys.float() - center[:, None]) / scale[:, None]
        self.codes[0].append(nearest_level(normalised, key_levels))
        value_scale = values.float().abs().amax(-1, keepdim=True).clamp_min(1e-6).to(torch.float16)
        self.value_scale.append(value_scale)
        self.codes[1].append(nearest_level(values.float() / value_scale.float(), value_levels))

    def tensors(self, dtype=None):
        """Every token's keys and values (B, H, T, D), made from the codes (a new tensor each call)."""
        dtype = dtype or self.dtype
        key_codes, value_codes = (stored.codes() for stored in self.codes)
        center, scale, key_levels, value_levels = self._tables(key_codes.device)
        keys = key_levels[key_codes] * scale[:, None] + center[:, None]
        values = value_levels[value_codes] * self.value_scale.tensor().float()
        return keys.to(dtype), values.to(dtype)

    def stored_bits(self) -> int:
        bits = sum(stored.stored_bits() for stored in self.codes) + self.value_scale.stored_bits()
        return bits + (self.levels.stored_bits() if self.count_codebooks else 0)
