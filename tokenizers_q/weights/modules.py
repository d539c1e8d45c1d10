"""Modules holding quantized weights: codes plus scales or codebooks, dequantized for the matmul."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from tokenizers_q.weights.config import WeightQuantConfig
from tokenizers_q.weights.kernels import kernel_layout, layout_linear, layout_of, to_layout

BLOCK_WEIGHTS = 2**18  # weights dequantized at a time by the blocked matmul (1 MiB of float32; measured best)


class QuantizedWeight(nn.Module):
    r"""Base: the stored tensors of one weight matrix as buffers, and their dequantization.

    Args:
        shape: (rows, columns) of the original weight.
        config: the method that made ``tensors``.
        tensors: packed codes and float16 tables (every one counts in :meth:`bits_per_weight`).
        cache_weight: keep the dequantized weight after the first use (faster, uses its memory). Default: False.
    """

    def __init__(
        self, shape: tuple[int, int], config: WeightQuantConfig, tensors: dict[str, torch.Tensor], cache_weight=False
    ):
        super().__init__()
        self.shape, self.config, self.cache_weight = tuple(shape), config, cache_weight
        self.stored = list(tensors)
        for name, tensor in tensors.items():
            self.register_buffer(name, tensor)
        self._cached: torch.Tensor | None = None

    def dequantized(self) -> torch.Tensor:
        """The float32 weight (rows, columns)."""
        if self._cached is not None:
            return self._cached
        weight = self.config.dequantize({n: getattr(self, n) for n in self.stored}, self.shape)
        if self.cache_weight:
            self._cached = weight
        return weight

    def _load_from_state_dict(self, *args, **kwargs):
        self._cached = None
        return super()._load_from_state_dict(*args, **kwargs)

    def bits_per_weight(self) -> float:
        """Every stored bit (codes, scales, offsets, codebooks) over the number of weights; no bias."""
        stored = sum(getattr(self, n).numel() * getattr(self, n).element_size() * 8 for n in self.stored)
        return stored / (self.shape[0] * self.shape[1])

    def extra_repr(self) -> str:
        return f"shape={self.shape}, method={self.config.method}, bits_per_weight={self.bits_per_weight():.3f}"


class QuantizedLinear(QuantizedWeight):
    """A quantized ``nn.Linear``: ``y = x W^T + b``, on torch's packed int4 / int8 kernels where the method
    allows (``layout``, see :mod:`tokenizers_q.weights.kernels`), else with ``W`` dequantized from its codes.

    Shapes:
        - input: (*, in_features); output: (*, out_features)
    """

    def __init__(self, shape, config, tensors, bias: torch.Tensor | None = None, cache_weight: bool = False):
        layout = layout_of(tensors)
        if layout is None and not cache_weight:
            layout = kernel_layout(config, tuple(shape), next(iter(tensors.values())).device)
            if layout is not None:  # held in the kernel's layout from now on (and saved so)
                levels = config.levels(tensors, tuple(shape))
                tensors = to_layout(layout, levels, tensors)
        super().__init__(shape, config, tensors, cache_weight)
        self.layout = layout
        self.out_features, self.in_features = self.shape
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = None if self.bias is None else self.bias.to(x.dtype)
        differentiable = torch.is_grad_enabled() and x.requires_grad  # the packed kernels have no backward
        if self.layout is not None and not self.cache_weight and x.device.type == "cpu" and not differentiable:
            tensors = {n: getattr(self, n) for n in self.stored}
            out = layout_linear(self.layout, x, tensors)
            return out if bias is None else out + bias
        if self._cached is not None or self.cache_weight or self.layout is not None:
            return F.linear(x, self.dequantized().to(x.device, x.dtype), bias)
        return self._blocked_linear(x, bias)

    def _blocked_linear(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """``x W^T`` a block of output rows at a time: each block is dequantized into a small buffer that stays
        in cache (no float copy of the whole matrix is ever made) and multiplied at once."""
        rows = x.reshape(-1, self.in_features)
        tensors = {n: getattr(self, n) for n in self.stored}
        step = max(8, BLOCK_WEIGHTS // self.in_features)
        blocks = ((start, min(self.out_features, start + step)) for start in range(0, self.out_features, step))
        if torch.is_grad_enabled() and x.requires_grad:  # gradients flow to x through ordinary products
            parts = [self.config.dequantize_rows(tensors, self.shape, *b).to(x.dtype) @ rows.t() for b in blocks]
            out = torch.cat(parts)
        else:
            out = torch.empty(self.out_features, rows.shape[0], dtype=x.dtype, device=x.device)
            for start, stop in blocks:
                block = self.config.dequantize_rows(tensors, self.shape, start, stop).to(x.dtype)
                torch.mm(block, rows.t(), out=out[start:stop])
        out = out.t().reshape(*x.shape[:-1], self.out_features)
        return out if bias is None else out + bias

    def extra_repr(self) -> str:
        return super().extra_repr() + (f", layout={self.layout}" if self.layout else "")


class QuantizedEmbedding(QuantizedWeight):
    """A quantized ``nn.Embedding`` (rows are the embedding vectors).

    Shapes:
        - input: (*) int64 ids; output: (*, embedding_dim)
    """

    def __init__(self, shape, config, tensors, padding_idx: int | None = None, cache_weight: bool = False):
        super().__init__(shape, config, tensors, cache_weight)
        self.num_embeddings, self.embedding_dim = self.shape
        self.padding_idx = padding_idx

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        """Only the rows ``ids`` name are dequantized (a decode step reads one row, not the whole table)."""
        if self._cached is not None or self.cache_weight:
            return F.embedding(ids, self.dequantized(), self.padding_idx)
        rows, inverse = torch.unique(ids.reshape(-1), return_inverse=True)
        if rows.numel() and (rows[0] < 0 or rows[-1] >= self.num_embeddings):
            bad = int(rows[0] if rows[0] < 0 else rows[-1])
            raise IndexError(f"embedding id {bad} is out of range for {self.num_embeddings} rows")
        tensors = {n: getattr(self, n) for n in self.stored}
        selected = self.config.gather_rows(tensors, self.shape, rows)
        if selected is None:  # rows that do not start on whole bytes
            return F.embedding(ids, self.dequantized(), self.padding_idx)
        vectors = self.config.dequantize(selected, (rows.numel(), self.embedding_dim))
        return F.embedding(inverse.reshape(ids.shape), vectors)
