"""Integer grids: scalar quantization in groups along one axis, min-max (asymmetric) or abs-max (symmetric).

The scalar core shared by KV-cache quantizers (KIVI: keys per channel over groups
of tokens, values per token) and weight quantization (per output channel or per
group of inputs). Every group of ``group_size`` consecutive elements along
``axis`` gets its own scale (and, asymmetric, its own offset); an element is
stored as an integer level in ``[0, 2^bits)``. Any group size fits any length:
where it does not divide it, the last group is shorter (576 inputs in groups of
128 are four groups of 128 and one of 64).
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from tokenizers_q.checks import check_float_tensor, check_int

METADATA_BITS = 16  # scales and offsets are stored in float16 / bfloat16


class GridCodes(NamedTuple):
    """A tensor on an integer grid.

    Shapes:
        - levels: the input's shape, uint8 (bits <= 8) or int16, values in [0, 2^bits)
        - scale, offset: the input's shape with ``axis`` moved last and replaced by its
          number of groups (``ceil(size / group_size)``), float16 as stored (offset is None when symmetric)
    """

    levels: torch.Tensor
    scale: torch.Tensor
    offset: torch.Tensor | None
    bits: int
    axis: int
    group_size: int


def _check(x: torch.Tensor, bits: int, axis: int, group_size: int | None) -> tuple[int, int]:
    check_float_tensor("x", x)
    check_int("bits", bits, 1, 16)
    if x.dim() == 0 or not -x.dim() <= axis < x.dim():
        raise ValueError(f"axis {axis} is out of range for a tensor of shape {tuple(x.shape)}")
    axis = axis % x.dim()
    group_size = max(1, x.shape[axis]) if group_size is None else check_int("group_size", group_size)
    return axis, group_size


def nearest_level(values: torch.Tensor, levels: torch.Tensor) -> torch.Tensor:
    """Index of the nearest of ascending ``levels`` (L,) for every value (a search among the midpoints).

    Shapes:
        - values: any; output: the same shape, int64 in [0, L)
    """
    return torch.bucketize(values, (levels[1:] + levels[:-1]) / 2)


def grouped(x: torch.Tensor, group_size: int) -> torch.Tensor:
    """The last axis of ``x`` cut into groups of ``group_size``; a shorter last group is filled up with copies of
    the axis's last element (which changes no group's min, max or abs-max).

    Shapes:
        - x: (*, L); output: (*, ceil(L / group_size), group_size)
    """
    length = x.shape[-1]
    fill = -length % group_size
    if fill:
        x = torch.cat([x, x[..., -1:].expand(*x.shape[:-1], fill)], -1)
    return x.reshape(*x.shape[:-1], -1, group_size)


def ungrouped(groups: torch.Tensor, length: int) -> torch.Tensor:
    """The inverse of :func:`grouped`: (*, G, group_size) -> (*, length)."""
    return groups.reshape(*groups.shape[:-2], -1)[..., :length]


def quantize_grid(
    x: torch.Tensor,
    bits: int,
    axis: int = -1,
    group_size: int | None = None,
    symmetric: bool = False,
    clip_search: int = 0,
) -> GridCodes:
    """Round ``x`` to a ``bits``-bit grid per group of ``group_size`` elements along ``axis``.

    Min-max (asymmetric): ``level = round((x - min) / scale)``, ``scale = (max - min) / (2^bits - 1)``.
    Abs-max (symmetric): ``level = round(x / scale) + 2^(bits-1) - 1`` with ``scale = max|x| / (2^(bits-1) - 1)``,
    so zero is exact (``bits >= 2``).

    Args:
        x: floating-point tensor.
        bits: 1..16.
        axis: the axis grouped. Default: -1.
        group_size: elements per group along ``axis`` (the last group is shorter where it does not divide the
            axis). Default: the whole axis.
        symmetric: abs-max grid centred on zero. Default: False.
        clip_search: try this many clipping ratios from 1 down to 0.5 of the range (the grid's ends shrunk
            towards zero) and keep, per group, the one of least squared error: rare large values are then
            clipped instead of widening every step (the MSE-optimal grid of near-Gaussian groups sits well
            inside their range at 2-4 bits). 0: the full range. Default: 0.
    """
    axis, group_size = _check(x, bits, axis, group_size)
    check_int("clip_search", clip_search, 0)
    if symmetric and bits < 2:
        raise ValueError("a symmetric grid needs bits >= 2 (one level each side of zero)")
    moved = x.movedim(axis, -1).float()
    groups = grouped(moved, group_size)
    levels, scale, offset = _round_to_grid(groups, bits, symmetric, 1.0)
    if clip_search:
        error = _grid_error(groups, levels, scale, offset, bits)
        for step in range(1, clip_search):
            candidate = _round_to_grid(groups, bits, symmetric, 1.0 - 0.5 * step / clip_search)
            candidate_error = _grid_error(groups, *candidate, bits)
            better = candidate_error < error
            error = torch.where(better, candidate_error, error)
            levels = torch.where(better, candidate[0], levels)
            scale = torch.where(better, candidate[1], scale)
            offset = None if offset is None else torch.where(better, candidate[2], offset)
    offset = None if offset is None else offset.squeeze(-1)
    dtype = torch.uint8 if bits <= 8 else torch.int16
    levels = ungrouped(levels.to(dtype), moved.shape[-1]).movedim(-1, axis)
    return GridCodes(levels, scale.squeeze(-1), offset, bits, axis, group_size)


def _round_to_grid(groups: torch.Tensor, bits: int, symmetric: bool, ratio: float):
    """Levels, scale and offset (None when symmetric) of ``groups`` (*, G, g) on a grid spanning ``ratio`` of their
    range; scale and offset (*, G, 1) as stored."""
    tiny = torch.finfo(torch.float16).tiny
    if symmetric:
        half = 2 ** (bits - 1) - 1
        scale = _stored((groups.abs().amax(-1, keepdim=True) / half * ratio).clamp_min(tiny))
        return torch.round(groups / scale.float()).clamp(-half, half) + half, scale, None
    low, high = groups.amin(-1, keepdim=True) * ratio, groups.amax(-1, keepdim=True) * ratio
    low = _stored(low)
    scale = _stored(((high - low.float()) / (2**bits - 1)).clamp_min(tiny))
    return torch.round((groups - low.float()) / scale.float()).clamp(0, 2**bits - 1), scale, low


def _grid_error(groups, levels, scale, offset, bits: int) -> torch.Tensor:
    """Squared error (*, G, 1) of each group's grid values."""
    if offset is None:
        values = (levels - (2 ** (bits - 1) - 1)) * scale.float()
    else:
        values = levels * scale.float() + offset.float()
    return (values - groups).pow(2).sum(-1, keepdim=True)


def _stored(values: torch.Tensor) -> torch.Tensor:
    """Metadata as stored (float16); the levels are computed from these rounded values."""
    stored = values.to(torch.float16)
    if not torch.isfinite(stored).all():
        raise ValueError(f"values up to {values.abs().max().item():.3g} exceed float16 scales and offsets")
    return stored


def dequantize_grid(codes: GridCodes, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The grid values of ``codes`` as a ``dtype`` tensor of the original shape."""
    moved = codes.levels.movedim(codes.axis, -1)
    groups = grouped(moved, codes.group_size).float()
    if codes.offset is None:
        values = (groups - (2 ** (codes.bits - 1) - 1)) * codes.scale.float()[..., None]
    else:
        values = groups * codes.scale.float()[..., None] + codes.offset.float()[..., None]
    return ungrouped(values, moved.shape[-1]).movedim(-1, codes.axis).to(dtype)


def grid_bits_per_element(bits: int, group_size: int, symmetric: bool = False) -> float:
    """Stored bits per element: the level plus the group's float16 scale (and offset) shared by its elements."""
    check_int("group_size", group_size)
    return bits + (1 if symmetric else 2) * METADATA_BITS / group_size
