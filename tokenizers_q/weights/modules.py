"""Modules holding quantized weights: codes plus scales or codebooks, dequantized for the matmul."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from tokenizers_q.compiled import Compiled
from tokenizers_q.weights.config import WeightQuantConfig
from tokenizers_q.weights.kernels import kernel_layout, layout_linear, layout_of, to_layout

BLOCK_WEIGHTS = 2**18  # weights dequantized at a time by the blocked matmul (1 MiB of float32; measured best)


def _dequantized(config: WeightQuantConfig, tensors: dict, shape: tuple[int, int], dtype: torch.dtype):
    """The weight of ``tensors`` in ``dtype``: unpacking, lookups, scaling and the cast in one fused loop."""
    return config.dequantize(tensors, shape).to(dtype)


def _vector_product(config: WeightQuantConfig, tensors: dict, shape: tuple[int, int], x: torch.Tensor):
    """``W x`` for one input row, fused with the dequantization (:meth:`WeightQuantConfig.vector_product`)."""
    return config.vector_product(tensors, shape, x)


# one graph per method and shape: dynamic shapes ran 3-bit grids 10x slower
_COMPILED = Compiled("quantized matmuls", dynamic=False)


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
        if self.cache_weight and not self._tuned():  # a weight of tensors being tuned changes every step
            self._cached = weight
        return weight

    def _tuned(self) -> bool:
        """Whether a stored tensor takes gradients (while :func:`~tokenizers_q.weights.distill_` tunes it)."""
        return any(getattr(self, n).requires_grad for n in self.stored)

    def _load_from_state_dict(self, *args, **kwargs):
        self._cached = None
        return super()._load_from_state_dict(*args, **kwargs)

    def stored_bits(self) -> int:
        """Every stored bit of the weight (codes, scales, offsets, codebooks) in its stored dtype; no bias."""
        return sum(getattr(self, n).numel() * getattr(self, n).element_size() * 8 for n in self.stored)

    def bits_per_weight(self) -> float:
        """:meth:`stored_bits` over the number of weights."""
        return self.stored_bits() / (self.shape[0] * self.shape[1])

    def extra_repr(self) -> str:
        return f"shape={self.shape}, method={self.config.method}, bits_per_weight={self.bits_per_weight():.3f}"


class QuantizedLinear(QuantizedWeight):
    """A quantized ``nn.Linear``: ``y = x W^T + b``, on torch's packed int4 / int8 kernels where the method
    allows (``layout``, see :mod:`tokenizers_q.weights.kernels`), else with ``W`` dequantized from its codes.

    Dequantizing runs under ``torch.compile`` (:attr:`compile_dequantize`): a single input row is multiplied
    by one fused loop over the codes, more rows by blocks of output rows dequantized by one fused loop each,
    then multiplied. With gradients, or with compiling off or failed, eager blocks do the same.

    Shapes:
        - input: (*, in_features); output: (*, out_features)
    """

    #: dequantize under ``torch.compile`` (set False on a layer, or on the class, to stay eager)
    compile_dequantize: bool = True

    def __init__(self, shape, config, tensors, bias: torch.Tensor | None = None, cache_weight: bool = False):
        layout = layout_of(tensors)
        if layout is None and not cache_weight:
            layout = kernel_layout(config, tuple(shape), next(iter(tensors.values())).device)
            if layout is not None:  # held in the kernel's layout from now on (and saved so)
                levels = config.linear_parts(tuple(shape))[1].levels(tensors, tuple(shape))
                tensors = to_layout(layout, levels, tensors)
        super().__init__(shape, config, tensors, cache_weight)
        self.layout = layout
        self.out_features, self.in_features = self.shape
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = None if self.bias is None else self.bias.to(x.dtype)
        # the packed kernels have no backward: gradients to the input, or to stored tensors being tuned (distill_)
        differentiable = torch.is_grad_enabled() and (x.requires_grad or self._tuned())
        on_kernel = self.layout is not None and not self.cache_weight and x.device.type == "cpu" and not differentiable
        if not on_kernel and (self._cached is not None or self.cache_weight or self.layout is not None):
            return F.linear(x, self.dequantized().to(x.device, x.dtype), bias)
        before, config, after = self.config.linear_parts(self.shape)  # x W^T = after(before(x) V^T)
        rows = x.reshape(-1, self.in_features)
        if on_kernel and before is not None:  # the kernels read bfloat16 rows: rotate them in bfloat16 (3x faster)
            rows = rows.to(torch.bfloat16)
        rows = rows if before is None else before(rows)
        tensors = {n: getattr(self, n) for n in self.stored}
        if on_kernel:
            out = layout_linear(self.layout, rows, tensors)
        else:
            out = self._blocked_linear(config, tensors, rows, differentiable)
        out = (out if after is None else after(out)).to(x.dtype).reshape(*x.shape[:-1], self.out_features)
        return out if bias is None else out + bias

    def _blocked_linear(self, config, tensors: dict, rows: torch.Tensor, differentiable: bool) -> torch.Tensor:
        """``rows V^T`` (``V`` the weight ``config`` stores in ``tensors``) a block of output rows at a time: each
        block is dequantized into a small buffer that stays in cache (no float copy of the whole matrix is ever
        made) and multiplied at once."""
        compiled = self.compile_dequantize and not differentiable
        if compiled and rows.shape[0] == 1:
            out = _COMPILED(_vector_product, config, tensors, self.shape, rows)
            if out is not None:
                return out[None]
        aligned = config.select_rows(tensors, self.shape, slice(0, 1)) is not None
        step = max(8, BLOCK_WEIGHTS // self.in_features) if aligned else self.out_features  # else one block
        blocks = [(start, min(self.out_features, start + step)) for start in range(0, self.out_features, step)]

        def block(start: int, stop: int) -> torch.Tensor:
            part = config.select_rows(tensors, self.shape, slice(start, stop)) if aligned else tensors
            shape = (stop - start, self.in_features)
            weight = _COMPILED(_dequantized, config, part, shape, rows.dtype) if compiled else None
            return config.dequantize(part, shape).to(rows.dtype) if weight is None else weight

        if differentiable:  # gradients flow to the input through ordinary products
            return torch.cat([block(*b) @ rows.t() for b in blocks]).t()
        out = torch.empty(self.out_features, rows.shape[0], dtype=rows.dtype, device=rows.device)
        for start, stop in blocks:
            torch.mm(block(start, stop), rows.t(), out=out[start:stop])
        return out.t()

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
        selected = self.config.select_rows(tensors, self.shape, rows)
        if selected is None:  # rows that do not start on whole bytes
            return F.embedding(ids, self.dequantized(), self.padding_idx)
        vectors = self.config.dequantize(selected, (rows.numel(), self.embedding_dim))
        return F.embedding(inverse.reshape(ids.shape), vectors)
