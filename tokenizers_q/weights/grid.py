"""Integer-grid weights: abs-max (symmetric) or min-max (asymmetric), per tensor, output channel or input group."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tokenizers_q.checks import check_choice, check_int
from tokenizers_q.grids import GridCodes, grouped, quantize_grid, ungrouped
from tokenizers_q.packing import code_dtype
from tokenizers_q.weights.config import (
    WeightQuantConfig,
    check_bits,
    check_weight,
    pack_levels,
    register_weight_config,
    unpack_levels,
)
from tokenizers_q.weights.gptq import gptq
from tokenizers_q.weights.kernels import layout_of, layout_weight

GRANULARITIES = ("tensor", "channel", "group")


@register_weight_config("int")
@dataclass(frozen=True)
class IntGridConfig(WeightQuantConfig):
    r"""Round weights to a ``bits``-bit integer grid.

    Args:
        bits: 2..8. Default: 4.
        granularity: one scale per ``"tensor"``, per output ``"channel"``, or per ``"group"`` of
            ``group_size`` consecutive input channels. Default: ``"group"``.
        group_size: input channels per group; where it does not divide the input width, the last group of
            each row is shorter (its scale counted like the others). Default: 128.
        symmetric: abs-max grid centred on zero (else min-max with an offset). Default: True.
        gptq: GPTQ error compensation with calibration data. Default: False.
        act_order: with ``gptq``, quantize columns by decreasing input energy; group scales are then
            fixed from the weights before compensation (static groups). Default: False.
        clip_search: clipping ratios tried per group (:func:`~tokenizers_q.grids.quantize_grid`), the one of
            least squared error kept; 0: the full range. Default: 0.
    """

    bits: int = 4
    granularity: str = "group"
    group_size: int = 128
    symmetric: bool = True
    gptq: bool = False
    act_order: bool = False
    clip_search: int = 0

    def __post_init__(self):
        check_bits(self.bits, 2, 8)
        if self.act_order and not self.gptq:
            raise ValueError("act_order orders the columns of GPTQ: set gptq=True")
        check_choice("granularity", self.granularity, GRANULARITIES)
        check_int("group_size", self.group_size)
        check_int("clip_search", self.clip_search, 0)

    @property
    def needs_hessian(self) -> bool:
        return self.gptq

    def _group(self, weight: torch.Tensor) -> int:
        return self.group_size if self.granularity == "group" else weight.shape[1]

    def quantize(self, weight, hessian=None):
        check_weight(weight, hessian, self.needs_hessian)
        weight = weight.float()
        rows = weight.reshape(1, -1) if self.granularity == "tensor" else weight
        static = quantize_grid(rows, self.bits, 1, self._group(rows), self.symmetric, self.clip_search)
        if not self.gptq:
            return self._tensors(static)
        group = self._group(weight)
        # static scales, fixed from the weights before compensation: one for the tensor, or per group with act_order
        levels = torch.zeros(weight.shape, dtype=torch.uint8)
        scales, offsets = [], []
        state = {}

        def column(values: torch.Tensor, index: int, pending: torch.Tensor) -> torch.Tensor:
            if self.granularity == "tensor":
                state["codes"] = static
            elif self.act_order:
                span = slice(index // group, index // group + 1)
                offset = None if static.offset is None else static.offset[:, span]
                state["codes"] = static._replace(scale=static.scale[:, span], offset=offset)
            elif index % group == 0:  # the group's scale from its compensated values so far
                state["codes"] = quantize_grid(pending[:, :group], self.bits, 1, None, self.symmetric, self.clip_search)
                scales.append(state["codes"].scale)
                offsets.append(state["codes"].offset)
            codes = state["codes"]
            scale, offset = codes.scale.float().reshape(-1), codes.offset
            half = 2 ** (self.bits - 1) - 1
            if self.symmetric:
                level = torch.round(values / scale).clamp(-half, half) + half
                dequantized = (level - half) * scale
            else:
                offset = offset.float().reshape(-1)
                level = torch.round((values - offset) / scale).clamp(0, 2**self.bits - 1)
                dequantized = level * scale + offset
            levels[:, index] = level.to(torch.uint8).cpu()
            return dequantized

        gptq(weight, hessian, column, block_size=group * max(1, 128 // group), act_order=self.act_order)
        if self.granularity == "tensor" or self.act_order:
            scale, offset = static.scale, static.offset
            levels = levels.reshape(rows.shape)
        else:
            scale = torch.cat(scales, 1)
            offset = None if self.symmetric else torch.cat(offsets, 1)
        return self._tensors(GridCodes(levels, scale, offset, self.bits, 1, group))

    def _tensors(self, codes: GridCodes) -> dict[str, torch.Tensor]:
        tensors = {"codes": pack_levels(codes.levels, self.bits), "scale": codes.scale}
        if codes.offset is not None:
            tensors["offset"] = codes.offset
        return tensors

    def row_tensors(self):
        return () if self.granularity == "tensor" else ("scale", "offset")

    def levels(self, tensors: dict[str, torch.Tensor], shape: tuple[int, int]) -> torch.Tensor:
        """The grid levels (out, in) of codes-layout ``tensors``."""
        return unpack_levels(tensors["codes"], self.bits, shape, code_dtype(self.bits))

    def dequantize(self, tensors, shape):
        layout = layout_of(tensors)
        if layout is not None:
            return layout_weight(layout, tensors, tuple(shape))
        levels = unpack_levels(tensors["codes"], self.bits, tuple(shape), torch.float32)
        scale, offset = tensors["scale"], tensors.get("offset")  # (rows or 1 for the tensor, groups)
        rows = levels.reshape(scale.shape[0], -1)  # a row of the weight, or all of it for one tensor scale
        values = grouped(rows, self._group(rows))
        if offset is None:
            values = (values - (2 ** (self.bits - 1) - 1)) * scale[:, :, None]
        else:
            values = values * scale[:, :, None] + offset[:, :, None]
        return ungrouped(values, rows.shape[1]).reshape(shape)
