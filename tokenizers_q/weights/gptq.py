"""Error compensation with calibration data (GPTQ, Frantar et al., 2023) and the input statistics it needs.

Columns of a weight matrix are quantized one at a time; the error each column
makes is spread over the columns not yet quantized, weighted by the inverse of
``H = X^T X`` (the second moments of the layer's inputs), so that the layer's
outputs on the calibration inputs change as little as possible.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from tokenizers_q.checks import check_finite

#: ``quantize_column(column, index, pending) -> dequantized column``; ``pending`` (out, n) holds the
#: current (compensated) values of this column and the next ones of its block, for group statistics
ColumnQuantizer = Callable[[torch.Tensor, int, torch.Tensor], torch.Tensor]


class HessianAccumulator:
    """``H = sum_i x_i x_i^T / N`` over every input row a linear or embedding layer sees.

    Args:
        in_features: size of the input rows.
        name: how errors name the layer, e.g. its dotted name in the model. Default: ``"layer"``.

    Shapes:
        - inputs: (..., in_features); hessian: (in_features, in_features) float32
    """

    def __init__(self, in_features: int, name: str = "layer"):
        self.hessian = torch.zeros(in_features, in_features)
        self.count = 0
        self.name = name

    def add(self, inputs: torch.Tensor) -> None:
        """Accumulate a batch of inputs; raises on NaN or inf (they would make ``H`` non-positive-definite)."""
        check_finite(inputs, f"the calibration input of {self.name}", hint="clean or drop those calibration batches")
        rows = inputs.detach().reshape(-1, inputs.shape[-1]).float()
        self.hessian = self.hessian.to(rows.device)
        total = self.count + rows.shape[0]
        self.hessian.mul_(self.count / total).addmm_(rows.T, rows, alpha=1 / total)
        self.count = total


def gptq(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    quantize_column: ColumnQuantizer,
    block_size: int = 128,
    damp: float = 0.01,
    act_order: bool = False,
) -> torch.Tensor:
    """Quantize ``weight`` column by column with GPTQ error compensation; returns the dequantized weight.

    Args:
        weight: (out, in) float weights.
        hessian: (in, in) input second moments.
        quantize_column: rounds one (compensated) column, see :data:`ColumnQuantizer`; it records its codes.
        block_size: columns updated together (lazy batch updates); groups must not straddle blocks.
        damp: added to the diagonal, as a fraction of its mean (numerical stability).
        act_order: quantize columns in decreasing order of their input energy (``H`` diagonal), so the
            columns that matter most are rounded while the most columns can still absorb their error.
            ``quantize_column`` still receives original column indices; its group statistics must then
            not depend on ``pending`` (static groups).
    """
    if not 0 <= damp < 1:
        raise ValueError(f"damp must be in [0, 1), got {damp!r}")
    w = weight.detach().clone().float()
    h = hessian.detach().clone().float().to(w.device)
    columns = w.shape[1]
    dead = h.diagonal() == 0
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    h.diagonal().add_(damp * h.diagonal().mean())
    order = torch.argsort(h.diagonal(), descending=True) if act_order else torch.arange(columns, device=w.device)
    w, h = w[:, order], h[order][:, order]
    inverse = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)
    out = torch.zeros_like(w)
    for start in range(0, columns, block_size):
        stop = min(start + block_size, columns)
        block, errors = w[:, start:stop].clone(), torch.zeros(w.shape[0], stop - start, device=w.device)
        block_inverse = inverse[start:stop, start:stop]
        for j in range(stop - start):
            q = quantize_column(block[:, j], int(order[start + j]), block[:, j:])
            out[:, start + j] = q
            error = (block[:, j] - q) / block_inverse[j, j]
            block[:, j:] -= error[:, None] * block_inverse[j, j:][None]
            errors[:, j] = error
        w[:, stop:] -= errors @ inverse[start:stop, stop:]
    return out[:, torch.argsort(order)]
