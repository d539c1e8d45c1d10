"""Run-time layouts of integer-grid weights for torch's packed weight-only matmul kernels.

``quantize_`` stores an integer-grid linear layer in the layout its matmul runs on, chosen when the
module is built (:func:`kernel_layout`) and saved and loaded as is:

- ``"int4pack"``: 4-bit grids in groups of 32/64/128/256 input channels, on the CPU: the nibbles in the
  order of ``aten._convert_weight_to_int4pack_for_cpu`` and the kernel's bfloat16 ``scales_and_zeros``
  (group, out, 2), multiplied by ``aten._weight_int4pack_mm_for_cpu`` (the kernel of torchao's int4
  weight-only). The same 32 bits per group as a float16 scale and offset; symmetric grids store their zero
  too (4.25 bits per weight at groups of 128, not 4.125), and scales are rounded to bfloat16.
- ``"int8pack"``: symmetric 8-bit grids per output channel: int8 weights and float16 scales, multiplied by
  ``aten._weight_int8pack_mm`` (from 32 input rows on, by bfloat16 products of int8 blocks: 1.8x faster at 64).

Both kernels take bfloat16 activations on this CPU (float32 ones run 5-60x slower there): inputs are
rounded to bfloat16 for the product and the result comes back in the input's dtype.
:func:`layout_weight` gives the weights a layout holds, exactly.
"""

from __future__ import annotations

import functools

import torch

INT4_GROUP_SIZES = (32, 64, 128, 256)
INT8_KERNEL_MAX_ROWS = 32  # from 32 input rows on, blocked bfloat16 products beat _weight_int8pack_mm (measured)
LAYOUT_KEYS = {"int4pack": "int4pack", "int8pack": "int8"}  # layout -> the tensor that holds its weights


def _has(op: str) -> bool:
    return hasattr(torch.ops.aten, op)


def kernel_layout(config, shape: tuple[int, int], device: torch.device) -> str | None:
    """The packed layout a linear layer of ``config`` and ``shape`` runs on, on ``device``; None: codes (a
    rotated method: the layout of the weight it multiplies, see ``WeightQuantConfig.linear_parts``)."""
    config = config.linear_parts(shape)[1]
    if getattr(config, "method", None) != "int" or device.type != "cpu":
        return None
    out_features, in_features = shape
    if (
        config.bits == 4
        and config.granularity == "group"
        and config.group_size in INT4_GROUP_SIZES
        and in_features % config.group_size == 0
        and out_features % 8 == 0
        and _has("_weight_int4pack_mm_for_cpu")
    ):
        return "int4pack"
    if config.bits == 8 and config.granularity == "channel" and config.symmetric and _has("_weight_int8pack_mm"):
        return "int8pack"
    return None


def layout_of(tensors: dict[str, torch.Tensor]) -> str | None:
    """The layout stored tensors are in (by their names); None: the codes layout."""
    return next((layout for layout, key in LAYOUT_KEYS.items() if key in tensors), None)


@functools.lru_cache(maxsize=8)
def _int4pack_order(out_features: int, in_features: int) -> torch.Tensor:
    """For each nibble of the CPU int4 layout, the (row-major) index of the weight it holds.

    The layout is a fixed permutation of nibbles: packing the index digits 4 bits at a time reads it off
    (0.4 s for 4M weights). Only dequantizing an int4pack layer needs it (inspection, gradients to the input,
    another device); it is then kept for the 8 latest shapes, 4 bytes per weight.
    """
    index = torch.arange(out_features * in_features, dtype=torch.int64).reshape(out_features, in_features)
    order = torch.zeros(out_features * in_features, dtype=torch.int64)
    for digit in range(-(-max(1, (index.numel() - 1).bit_length()) // 4)):
        levels = ((index >> (4 * digit)) & 15).to(torch.int32)
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(levels, 1)
        order |= _nibbles(packed).long() << (4 * digit)
    return order.int()


def _nibbles(packed: torch.Tensor) -> torch.Tensor:
    return torch.stack([packed & 15, packed >> 4], -1).reshape(-1)


def to_layout(layout: str, levels: torch.Tensor, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The stored tensors of ``layout`` from the grid ``levels`` (out, in) and the codes-layout ``tensors``."""
    scale = tensors["scale"]
    if layout == "int4pack":
        # the kernel computes (q - 8) * scale + zero; the codes layout (q - 7) * scale or q * scale + offset
        offset = tensors.get("offset")
        zero = scale.float() if offset is None else offset.float() + 8 * scale.float()
        scales_and_zeros = torch.stack([scale.float(), zero], -1).transpose(0, 1).to(torch.bfloat16).contiguous()
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(levels.to(torch.int32), 1)
        return {"int4pack": packed, "scales_and_zeros": scales_and_zeros}
    if layout == "int8pack":
        return {"int8": (levels.to(torch.int16) - 127).to(torch.int8), "scale": scale}
    raise ValueError(f"unknown weight layout {layout!r}; layouts: {', '.join(LAYOUT_KEYS)}")


def layout_weight(layout: str, tensors: dict[str, torch.Tensor], shape: tuple[int, int]) -> torch.Tensor:
    """The float32 weight (out, in) a layout's tensors hold."""
    if layout == "int8pack":
        return tensors["int8"].float() * tensors["scale"].float().reshape(-1, 1)
    packed = tensors["int4pack"]
    levels = torch.empty(shape[0] * shape[1], dtype=torch.uint8, device=packed.device)
    levels[_int4pack_order(*shape).to(levels.device)] = _nibbles(packed)
    scales_and_zeros = tensors["scales_and_zeros"].float()  # (groups, out, 2)
    groups = scales_and_zeros.shape[0]
    scale, zero = scales_and_zeros[..., 0].t()[..., None], scales_and_zeros[..., 1].t()[..., None]
    weight = (levels.reshape(shape[0], groups, -1).float() - 8) * scale + zero
    return weight.reshape(shape)


def layout_linear(layout: str, x: torch.Tensor, tensors: dict[str, torch.Tensor]) -> torch.Tensor:
    """``x @ W^T`` on the packed kernel of ``layout`` (bfloat16 inside), in ``x``'s dtype.

    Shapes:
        - x: (*, in_features); output: (*, out_features)
    """
    rows = x.reshape(-1, x.shape[-1]).to(torch.bfloat16).contiguous()  # the kernels read dense rows
    if layout == "int4pack":
        scales_and_zeros = tensors["scales_and_zeros"]
        group_size = x.shape[-1] // scales_and_zeros.shape[0]
        out = torch.ops.aten._weight_int4pack_mm_for_cpu(rows, tensors["int4pack"], group_size, scales_and_zeros)
    elif rows.shape[0] < INT8_KERNEL_MAX_ROWS:
        out = torch.ops.aten._weight_int8pack_mm(rows, tensors["int8"], tensors["scale"].reshape(-1).to(torch.bfloat16))
    else:  # many rows: bfloat16 products of int8 weight blocks (exact in bfloat16), scaled after
        weight = tensors["int8"]
        out = torch.empty(weight.shape[0], rows.shape[0], dtype=torch.bfloat16, device=x.device)
        for start in range(0, weight.shape[0], 256):
            torch.mm(weight[start : start + 256].to(torch.bfloat16), rows.t(), out=out[start : start + 256])
        out = out.t() * tensors["scale"].reshape(-1).to(torch.bfloat16)
    return out.to(x.dtype).reshape(*x.shape[:-1], out.shape[-1])
