"""Gaussian grids: the MSE-optimal levels of a standard normal, scaled per group (HIGGS-style).

Rotated weights (:class:`~tokenizers_q.weights.rotated.RotatedConfig`) are close to Gaussian, and the
Lloyd-Max quantizer of ``N(0, 1)`` is the grid of least squared error for them. Each group of
``group_size`` consecutive weights of a row stores one float16 scale, and each weight the index of its
level: ``bits + 16 / group_size`` bits per weight, with no offset.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from tokenizers_q.checks import check_int
from tokenizers_q.grids import grouped, nearest_level, ungrouped
from tokenizers_q.weights.config import (
    WeightQuantConfig,
    check_bits,
    check_weight,
    lookup,
    pack_levels,
    register_weight_config,
)
from tokenizers_q.weights.gptq import gptq

SCALE_FITS = 3  # alternations of nearest-level assignment and the least-squares scale of each group


@torch.compiler.disable  # computed once and cached, never traced
@functools.lru_cache(maxsize=8)
def gaussian_levels(bits: int) -> torch.Tensor:
    """The ``2^bits`` Lloyd-Max levels of a standard normal, ascending (e.g. +-0.4528, +-1.5104 at 2 bits).

    Computed once by Lloyd iterations on the density over a fine grid of [-8, 8].
    """
    check_bits(bits, 1, 8)
    x = torch.linspace(-8, 8, 32_001, dtype=torch.float64)
    density = torch.exp(-0.5 * x**2)
    levels = torch.linspace(-2.5, 2.5, 2**bits, dtype=torch.float64) * (1.0 if bits > 1 else 0.3)
    for _ in range(300):
        cell = torch.bucketize(x, (levels[1:] + levels[:-1]) / 2)
        mass = torch.zeros_like(levels).index_add_(0, cell, density)
        levels = torch.zeros_like(levels).index_add_(0, cell, density * x) / mass
    return levels.float()


def _fit_scales(groups: torch.Tensor, levels: torch.Tensor) -> torch.Tensor:
    """Scales (out, G) of groups (out, G, g): from their RMS, refined by alternating nearest levels and the
    least-squares scale for them; float16 as stored."""
    scale = groups.pow(2).mean(-1, keepdim=True).sqrt().clamp_min(torch.finfo(torch.float16).tiny)
    for _ in range(SCALE_FITS):
        chosen = levels[nearest_level(groups / scale, levels)]
        fitted = (groups * chosen).sum(-1, keepdim=True) / chosen.pow(2).sum(-1, keepdim=True).clamp_min(1e-12)
        scale = torch.where(fitted > 0, fitted, scale)
    return scale[..., 0].to(torch.float16)


@register_weight_config("gaussian")
@dataclass(frozen=True)
class GaussianGridConfig(WeightQuantConfig):
    r"""Weights on the Lloyd-Max grid of a standard normal, one float16 scale per group of inputs.

    Meant for rotated weights: ``RotatedConfig(GaussianGridConfig(3, group_size=64, gptq=True))``.

    Args:
        bits: 1..8 (levels per weight: ``2^bits``). Default: 4.
        group_size: consecutive inputs sharing a scale (the last group of a row is shorter where it does not
            divide the width). Default: 128.
        gptq: GPTQ error compensation with calibration data (the scales stay those fitted to the weights).
            Default: False.
        act_order: with ``gptq``, quantize columns by decreasing input energy. Default: False.
    """

    bits: int = 4
    group_size: int = 128
    gptq: bool = False
    act_order: bool = False

    def __post_init__(self):
        check_bits(self.bits, 1, 8)
        check_int("group_size", self.group_size)
        if self.act_order and not self.gptq:
            raise ValueError("act_order orders the columns of GPTQ: set gptq=True")

    @property
    def needs_hessian(self) -> bool:
        return self.gptq

    def _scales(self, weight: torch.Tensor, levels: torch.Tensor) -> torch.Tensor:
        """The float16 scale (out, groups) of least squared error per group (a shorter last group fitted alone)."""
        whole = weight.shape[1] // self.group_size * self.group_size
        parts = [grouped(weight[:, :whole], self.group_size)] if whole else []
        if whole < weight.shape[1]:
            parts.append(weight[:, None, whole:])
        return torch.cat([_fit_scales(part, levels) for part in parts], 1)

    def quantize(self, weight, hessian=None):
        check_weight(weight, hessian, self.needs_hessian)
        weight = weight.float()
        levels = gaussian_levels(self.bits).to(weight.device)
        scale = self._scales(weight, levels)
        column_scale = ungrouped(scale.float()[..., None].expand(-1, -1, self.group_size), weight.shape[1])
        if self.gptq:
            indices = torch.zeros(weight.shape, dtype=torch.long, device=weight.device)

            def column(values, index, pending):
                indices[:, index] = nearest_level(values / column_scale[:, index], levels)
                return levels[indices[:, index]] * column_scale[:, index]

            gptq(weight, hessian, column, act_order=self.act_order)
        else:
            indices = nearest_level(weight / column_scale, levels)
        return {"codes": pack_levels(indices, self.bits), "scale": scale}

    def row_tensors(self):
        return ("scale",)

    def dequantize(self, tensors, shape):
        values = lookup(
            tensors["codes"], self.bits, tuple(shape), gaussian_levels(self.bits).to(tensors["codes"].device)
        )
        return ungrouped(grouped(values, self.group_size) * tensors["scale"][:, :, None].float(), shape[1])
