"""The weight-quantization config contract: frozen dataclasses that quantize and dequantize one weight matrix."""

from __future__ import annotations

import dataclasses
import math
from typing import ClassVar

import torch

from tokenizers_q.checks import check_finite, check_float_tensor, check_int
from tokenizers_q.files import RENAMED_ARGUMENTS, current_arguments
from tokenizers_q.packing import TokenSpec, code_planes, pack_codes, planes_per_group, unpack_codes

_CONFIGS: dict[str, type[WeightQuantConfig]] = {}


def register_weight_config(name: str):
    """Class decorator: makes a config loadable by :meth:`WeightQuantConfig.from_dict` under ``name``."""

    def add(cls: type[WeightQuantConfig]) -> type[WeightQuantConfig]:
        if name in _CONFIGS:
            raise ValueError(f"weight config name {name!r} is already registered by {_CONFIGS[name].__name__}")
        cls.method = name
        _CONFIGS[name] = cls
        return cls

    return add


@dataclasses.dataclass(frozen=True)
class WeightQuantConfig:
    """Base of the weight-quantization methods.

    A method turns a weight matrix (rows: output channels or embedding rows) into a
    dict of stored tensors (packed codes, float16 scales or codebooks) and back.
    Every stored byte counts towards ``bits_per_weight``.
    """

    method: ClassVar[str] = ""

    @property
    def needs_hessian(self) -> bool:
        """Whether :meth:`quantize` needs the input second moments ``H = X^T X`` of calibration batches."""
        return False

    def quantize(self, weight: torch.Tensor, hessian: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """Stored tensors of ``weight`` (out, in); ``hessian`` (in, in) when :attr:`needs_hessian`."""
        raise NotImplementedError

    def dequantize(self, tensors: dict[str, torch.Tensor], shape: tuple[int, int]) -> torch.Tensor:
        """The float32 weight (out, in) of stored tensors: one expression of unpacking, lookups and scaling
        that ``torch.compile`` fuses (see :func:`unpack_levels` and :func:`lookup`)."""
        raise NotImplementedError

    def vector_product(self, tensors: dict[str, torch.Tensor], shape: tuple[int, int], x: torch.Tensor) -> torch.Tensor:
        """``W x`` for one input row ``x`` (1, in), in ``x``'s dtype: a sum that ``torch.compile`` fuses with the
        dequantization, so no weight is written out and each code is read once.

        Shapes:
            - x: (1, in); output: (out,)
        """
        return (self.dequantize(tensors, shape).to(x.dtype) * x).sum(-1)

    def linear_parts(self, shape: tuple[int, int]) -> tuple:
        """``(before, config, after)``: ``x W^T = after(before(x) V^T)``, ``V`` the weight ``config`` stores
        (``before``/``after`` None: nothing to apply). Linear layers multiply by ``V`` (on a kernel where
        ``config`` has one); a rotated method stores ``V = W R`` and rotates the inputs instead of ``W``."""
        return None, self, None

    def dequantize_rows(
        self, tensors: dict[str, torch.Tensor], shape: tuple[int, int], start: int, stop: int
    ) -> torch.Tensor:
        """Rows ``start:stop`` of the float32 weight, reading only their codes where rows start on whole bytes."""
        selected = self.select_rows(tensors, shape, slice(start, stop))
        if selected is None:
            return self.dequantize(tensors, shape)[start:stop]
        return self.dequantize(selected, (stop - start, shape[1]))

    def row_tensors(self) -> tuple[str, ...]:
        """Names of the stored tensors holding one entry per weight row (scales, offsets, tables), besides the
        codes; the others (shared codebooks, a whole-tensor scale) serve every row."""
        return ()

    def row_code_bits(self, columns: int) -> int:
        """Bits of ``codes`` one weight row of ``columns`` weights takes."""
        return columns * self.bits

    def select_rows(
        self, tensors: dict[str, torch.Tensor], shape: tuple[int, int], rows: slice | torch.Tensor
    ) -> dict[str, torch.Tensor] | None:
        """The stored tensors of just ``rows`` (a slice of step 1, sliced without a copy, or int64 row indices),
        as those of a ``(number of rows, shape[1])`` weight; None when rows do not start on whole bytes or the
        tensors are in a kernel layout."""
        row_bits = self.row_code_bits(shape[1])
        if row_bits % 8 or "codes" not in tensors:
            return None
        per_row = row_bits // 8
        selected = dict(tensors)
        selected.update({name: tensors[name][rows] for name in self.row_tensors() if name in tensors})
        if isinstance(rows, slice):
            selected["codes"] = tensors["codes"][rows.start * per_row : rows.stop * per_row]
        else:
            byte = torch.arange(per_row, device=rows.device)
            selected["codes"] = tensors["codes"][(rows[:, None] * per_row + byte).reshape(-1)]
        return selected

    def to_dict(self) -> dict:
        return {"method": self.method, **dataclasses.asdict(self)}

    @staticmethod
    def from_dict(data: dict) -> WeightQuantConfig:
        if not isinstance(data, dict) or data.get("method") not in _CONFIGS:
            raise ValueError(f"unknown weight config {data!r}; methods: {', '.join(sorted(_CONFIGS))}")
        cls = _CONFIGS[data["method"]]
        fields = {k: v for k, v in data.items() if k != "method"}
        renamed = getattr(cls, "renamed_arguments", RENAMED_ARGUMENTS)
        return cls(**current_arguments(fields, f"a {data['method']} config", renamed))


def check_bits(bits, low: int = 1, high: int = 8) -> None:
    check_int("bits", bits, low, high)


def check_weight(weight: torch.Tensor, hessian: torch.Tensor | None, needs_hessian: bool) -> None:
    check_float_tensor("weight", weight)
    if weight.dim() != 2:
        raise ValueError(f"weight must be a matrix (out, in), got shape {tuple(weight.shape)}")
    if needs_hessian and hessian is None:
        raise ValueError("this config needs calibration data: pass calibration batches to quantize_")
    if hessian is not None and hessian.shape != (weight.shape[1], weight.shape[1]):
        raise ValueError(f"hessian must be ({weight.shape[1]}, {weight.shape[1]}), got {tuple(hessian.shape)}")
    check_finite(weight, "weight", hint="fix those weights first")
    if hessian is not None:
        check_finite(hessian, "hessian", hint="clean the calibration inputs")


def pack_levels(levels: torch.Tensor, bits: int) -> torch.Tensor:
    """Integer levels in ``[0, 2^bits)`` packed ``bits`` bits each into a 1-d uint8 tensor (on their device)."""
    return pack_codes(levels.reshape(-1, 1), TokenSpec((2**bits,)))


def _planes_fit(bits: int, shape: tuple[int, ...]) -> bool:
    """Whether :func:`code_planes` can cut each row of ``shape`` into whole planes (and is worth it: traced)."""
    return torch.compiler.is_compiling() and math.prod(shape[1:]) % planes_per_group(bits) == 0


def unpack_levels(
    packed: torch.Tensor, bits: int, shape: tuple[int, ...], dtype: torch.dtype = torch.long
) -> torch.Tensor:
    """Inverse of :func:`pack_levels`: levels of ``shape`` in ``dtype``, on the packed bytes' device (as
    :func:`code_planes` while ``torch.compile`` traces, which then fuses the unpacking into its consumer)."""
    if _planes_fit(bits, shape):
        planes = [plane.reshape(shape[0], -1).to(dtype) for plane in code_planes(packed, bits, math.prod(shape))]
        return torch.stack(planes, -1).reshape(shape)
    return unpack_codes(packed, TokenSpec((2**bits,)), (*shape, 1), dtype).reshape(shape)


def lookup(packed: torch.Tensor, bits: int, shape: tuple[int, ...], table: torch.Tensor) -> torch.Tensor:
    """``table[level]`` (float32) for the :func:`pack_levels` levels of ``shape`` (rows first).

    ``table`` is shared, ``(2^bits,)``, or one per row, ``(shape[0], 2^bits)``. While ``torch.compile``
    traces, a lookup per :func:`code_planes` plane (which it fuses with the unpacking, 2x faster than a lookup
    of the unpacked levels); in eager at 1, 2 and 4 bits with a shared table, one gather from a 256-entry table
    of bytes (each entry the ``8 / bits`` values its levels stand for), 3-4x faster than unpacking first.
    """
    count, table = math.prod(shape), table.float()
    per_row = table.dim() == 2
    offset = (torch.arange(shape[0], device=packed.device) << bits)[:, None] if per_row else 0
    if _planes_fit(bits, shape):
        flat = table.reshape(-1)
        planes = [flat[plane.reshape(shape[0], -1).long() + offset] for plane in code_planes(packed, bits, count)]
        return torch.stack(planes, -1).reshape(shape)
    if bits in (1, 2, 4) and not per_row:
        byte = torch.arange(256, device=packed.device)
        mask = (1 << bits) - 1
        byte_table = torch.stack([table[(byte >> (bits * i)) & mask] for i in range(8 // bits)], -1)
        return torch.index_select(byte_table, 0, packed.int()).reshape(-1)[:count].reshape(shape)
    levels = unpack_levels(packed, bits, shape, torch.int32)
    index = (levels.reshape(shape[0], -1) + offset).reshape(-1)
    return torch.index_select(table.reshape(-1), 0, index.int()).reshape(shape)
