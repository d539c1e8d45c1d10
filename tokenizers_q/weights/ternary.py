"""Ternary weights in {-1, 0, +1} times an abs-mean scale (BitNet b1.58, Ma et al., 2024)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tokenizers_q.weights.config import (
    WeightQuantConfig,
    check_weight,
    lookup,
    pack_levels,
    register_weight_config,
)

#: the value of each 2-bit level (level 3 is never stored)
TERNARY_LEVELS = torch.tensor([-1.0, 0.0, 1.0, 2.0])


@register_weight_config("ternary")
@dataclass(frozen=True)
class TernaryConfig(WeightQuantConfig):
    r"""``w ~ scale * clamp(round(w / scale), -1, 1)`` with ``scale = mean |w|``, stored as 2-bit codes.

    Args:
        granularity: one scale per ``"tensor"`` or per output ``"channel"``. Default: ``"tensor"``.
    """

    granularity: str = "tensor"

    def __post_init__(self):
        if self.granularity not in ("tensor", "channel"):
            raise ValueError(f"granularity must be 'tensor' or 'channel', got {self.granularity!r}")

    def quantize(self, weight, hessian=None):
        check_weight(weight, hessian, False)
        weight = weight.float()
        magnitude = weight.abs().mean() if self.granularity == "tensor" else weight.abs().mean(1)
        scale = magnitude.reshape(-1).clamp_min(torch.finfo(torch.float16).tiny).to(torch.float16)
        per_row = scale.float()[:, None] if self.granularity == "channel" else scale.float()
        levels = (torch.round(weight / per_row).clamp(-1, 1) + 1).to(torch.uint8)
        return {"codes": pack_levels(levels, 2), "scale": scale}

    def row_code_bits(self, columns):
        return 2 * columns

    def row_tensors(self):
        return ("scale",) if self.granularity == "channel" else ()

    def dequantize(self, tensors, shape):
        values = lookup(tensors["codes"], 2, tuple(shape), TERNARY_LEVELS.to(tensors["codes"].device))
        scale = tensors["scale"].float()
        return values * (scale[:, None] if self.granularity == "channel" else scale)
