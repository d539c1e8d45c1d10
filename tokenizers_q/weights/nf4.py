"""NF4 weights: 4-bit normal-float levels with a block-wise abs-max scale (QLoRA, Dettmers et al., 2023)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tokenizers_q.checks import check_int
from tokenizers_q.grids import grouped, ungrouped
from tokenizers_q.weights.config import (
    WeightQuantConfig,
    check_weight,
    lookup,
    pack_levels,
    register_weight_config,
)

#: the 16 NF4 levels: quantiles of a standard normal, scaled to [-1, 1], with an exact zero
NF4_LEVELS = torch.tensor(
    [
        -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
        -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
        0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
        0.7229568362236023, 1.0,
    ]
)  # fmt: skip


@register_weight_config("nf4")
@dataclass(frozen=True)
class NF4Config(WeightQuantConfig):
    r"""Each block of ``group_size`` consecutive weights of a row is divided by its abs-max (stored in
    float16) and rounded to the nearest NF4 level (4 bits).

    Args:
        group_size: weights per scale; where it does not divide the input width, the last block of each row
            is shorter. Default: 64.
    """

    group_size: int = 64

    def __post_init__(self):
        check_int("group_size", self.group_size)

    def quantize(self, weight, hessian=None):
        check_weight(weight, hessian, False)
        blocks = grouped(weight.float(), self.group_size)
        scale = blocks.abs().amax(-1).clamp_min(torch.finfo(torch.float16).tiny).to(torch.float16)
        normalised = blocks / scale.float()[..., None]
        levels = (normalised[..., None] - NF4_LEVELS.to(weight.device)).abs().argmin(-1)
        return {"codes": pack_levels(ungrouped(levels, weight.shape[1]), 4), "scale": scale}

    def row_code_bits(self, columns):
        return 4 * columns

    def row_tensors(self):
        return ("scale",)

    def dequantize(self, tensors, shape):
        values = lookup(tensors["codes"], 4, tuple(shape), NF4_LEVELS.to(tensors["codes"].device))
        if shape[1] % self.group_size == 0:
            return (values.reshape(shape[0], -1, self.group_size) * tensors["scale"][:, :, None]).reshape(shape)
        return ungrouped(grouped(values, self.group_size) * tensors["scale"][:, :, None], shape[1])
