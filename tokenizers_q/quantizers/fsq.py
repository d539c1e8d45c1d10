"""Finite scalar quantization (Mentzer et al., 2023): an implicit grid codebook."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from tokenizers_q.metrics import code_counts, usage_metrics
from tokenizers_q.packing import TokenSpec
from tokenizers_q.quantizers.base import Quantizer, QuantizerOutput, projections, register_quantizer, straight_through


@register_quantizer("fsq")
class FSQ(Quantizer):
    r"""Bound each channel with tanh and round it to one of ``levels[i]`` values.

    The codebook is the implicit grid of ``prod(levels)`` points; nothing is
    learned in the quantizer itself, so there is no loss and no dead code.
    Codes are the mixed-radix index of the grid point (first level least
    significant), identical to vector-quantize-pytorch's ``FSQ`` indices.

    Args:
        levels: number of values per channel, each >= 2.
        dim: size of the channel axis; a linear projection maps it to
            ``len(levels)`` channels and back when they differ. Default: ``len(levels)``.
        channel_first: input is (B, dim, *spatial). Default: False.

    Shapes:
        - input: (*, dim), or (B, dim, *spatial) with ``channel_first``
        - quantized: same as input; codes: (*, 1), int64 in [0, prod(levels))
    """

    def __init__(self, levels: Sequence[int], dim: int | None = None, channel_first: bool = False):
        levels = list(levels)
        if not levels or any(not isinstance(lv, int) or isinstance(lv, bool) or lv < 2 for lv in levels):
            raise ValueError(f"levels must be a non-empty list of ints >= 2, got {levels!r}")
        super().__init__(dim if dim is not None else len(levels), channel_first)
        self.levels = levels
        self.codebook_size = math.prod(levels)
        self.project_in, self.project_out = projections(self.dim, len(levels))
        lv = torch.tensor(levels, dtype=torch.float32)
        eps = 1e-3
        self.register_buffer("_half_l", (lv - 1) * (1 + eps) / 2, persistent=False)
        self.register_buffer("_offset", torch.where(torch.tensor(levels) % 2 == 0, 0.5, 0.0), persistent=False)
        self.register_buffer("_half_width", torch.floor(lv / 2), persistent=False)
        basis = torch.cumprod(torch.tensor([1] + levels[:-1], dtype=torch.long), dim=0)
        self.register_buffer("_basis", basis, persistent=False)
        self.register_buffer("_levels", torch.tensor(levels, dtype=torch.long), persistent=False)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, levels={self.levels}, codebook_size={self.codebook_size}"

    @property
    def spec(self) -> TokenSpec:
        return TokenSpec((self.codebook_size,), (tuple(self.levels),))

    def _forward_flat(self, z: torch.Tensor, update: bool) -> QuantizerOutput:
        h = self.project_in(z).float()
        shift = torch.atanh(self._offset / self._half_l)
        bounded = torch.tanh(h + shift) * self._half_l - self._offset
        rounded = bounded.round()
        grid = straight_through(bounded, rounded)
        level_idx = (rounded + self._half_width).long()
        codes = (level_idx * self._basis).sum(-1, keepdim=True)
        quantized = self.project_out(grid / self._half_width)
        metrics = usage_metrics(code_counts(codes, self.codebook_size))
        return QuantizerOutput(quantized, codes, h.new_zeros(()), metrics)

    def _decode_flat(self, codes: torch.Tensor) -> torch.Tensor:
        level_idx = (codes // self._basis) % self._levels
        return self.project_out((level_idx.float() - self._half_width) / self._half_width)
