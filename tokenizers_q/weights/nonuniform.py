"""Non-uniform weights: per output row, ``2^bits`` levels learned by k-means (SqueezeLLM, Kim et al., 2024)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tokenizers_q.checks import check_choice
from tokenizers_q.kmeans import kmeans
from tokenizers_q.weights.config import (
    WeightQuantConfig,
    check_bits,
    check_weight,
    lookup,
    pack_levels,
    register_weight_config,
)
from tokenizers_q.weights.gptq import gptq

WEIGHTINGS = ("none", "activation")


@register_weight_config("kmeans")
@dataclass(frozen=True)
class KMeansConfig(WeightQuantConfig):
    r"""Each output row gets its own ``2^bits`` float16 levels, fitted by 1-d k-means to the row's weights.

    Args:
        bits: 1..8 (code bits per weight). Default: 3.
        weighting: ``"activation"`` weights each input column by the mean squared input it
            sees on calibration batches (the Hessian diagonal), so columns that matter get
            levels close to them; ``"none"`` for plain k-means. Default: ``"none"``.
        gptq: GPTQ error compensation with calibration data (the levels stay those of k-means). Default: False.
        act_order: with ``gptq``, quantize columns by decreasing input energy. Default: False.
        kmeans_iters: k-means iterations. Default: 25.
        seed: k-means seeding. Default: 0.
    """

    bits: int = 3
    weighting: str = "none"
    gptq: bool = False
    act_order: bool = False
    kmeans_iters: int = 25
    seed: int = 0

    def __post_init__(self):
        check_bits(self.bits, 1, 8)
        check_choice("weighting", self.weighting, WEIGHTINGS)
        if self.act_order and not self.gptq:
            raise ValueError("act_order orders the columns of GPTQ: set gptq=True")

    @property
    def needs_hessian(self) -> bool:
        return self.gptq or self.weighting == "activation"

    def quantize(self, weight, hessian=None):
        check_weight(weight, hessian, self.needs_hessian)
        weight = weight.float()
        weights = None
        if self.weighting == "activation":
            importance = hessian.diagonal().float().clamp_min(0) + 1e-8
            weights = importance.expand_as(weight)
        generator = torch.Generator(device=weight.device).manual_seed(self.seed)
        fit = kmeans(weight[..., None], 2**self.bits, self.kmeans_iters, weights, generator=generator)
        table = fit.centroids[..., 0].to(torch.float16)  # (out, 2^bits)
        levels_of = table.float()
        if self.gptq:
            levels = torch.zeros(weight.shape, dtype=torch.long, device=weight.device)

            def column(values, index, pending):
                levels[:, index] = (values[:, None] - levels_of).abs().argmin(1)
                return levels_of.gather(1, levels[:, index : index + 1])[:, 0]

            gptq(weight, hessian, column, act_order=self.act_order)
        else:
            levels = (weight[..., None] - levels_of[:, None, :]).abs().argmin(-1)
        return {"codes": pack_levels(levels, self.bits), "table": table}

    def row_tensors(self):
        return ("table",)

    def dequantize(self, tensors, shape):
        return lookup(tensors["codes"], self.bits, tuple(shape), tensors["table"])  # each row its own levels
