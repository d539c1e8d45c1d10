"""The weight-quantization config contract: frozen dataclasses that quantize and dequantize one weight matrix."""

from __future__ import annotations

import dataclasses
import math
from typing import ClassVar

import torch

from tokenizers_q.checks import check_finite
from tokenizers_q.packing import TokenSpec, pack_codes, unpack_codes

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
        """The float32 weight (out, in) of stored tensors."""
        return self.dequantize_rows(tensors, shape, 0, shape[0])

    def dequantize_rows(
        self, tensors: dict[str, torch.Tensor], shape: tuple[int, int], start: int, stop: int
    ) -> torch.Tensor:
        """Rows ``start:stop`` of the float32 weight, reading only their codes (what a blocked matmul needs)."""
        raise NotImplementedError

    def row_tensors(self) -> tuple[str, ...]:
        """Names of the stored tensors holding one entry per weight row (scales, offsets, tables), besides the
        codes; the others (shared codebooks, a whole-tensor scale) serve every row."""
        return ()

    def row_code_bits(self, columns: int) -> int:
        """Bits of ``codes`` one weight row of ``columns`` weights takes."""
        return columns * self.bits

    def gather_rows(
        self, tensors: dict[str, torch.Tensor], shape: tuple[int, int], rows: torch.Tensor
    ) -> dict[str, torch.Tensor] | None:
        """The stored tensors of just ``rows`` (int64 row indices), as those of a ``(len(rows), shape[1])``
        weight; None when rows do not start on whole bytes."""
        row_bytes = self.row_code_bits(shape[1])
        if row_bytes % 8 or "codes" not in tensors:
            return None
        row_bytes //= 8
        index = (rows[:, None] * row_bytes + torch.arange(row_bytes, device=rows.device)).reshape(-1)
        selected = {name: t for name, t in tensors.items() if name not in self.row_tensors()}
        selected.update({name: tensors[name][rows] for name in self.row_tensors() if name in tensors})
        selected["codes"] = tensors["codes"][index]
        return selected

    def to_dict(self) -> dict:
        return {"method": self.method, **dataclasses.asdict(self)}

    @staticmethod
    def from_dict(data: dict) -> WeightQuantConfig:
        if not isinstance(data, dict) or data.get("method") not in _CONFIGS:
            raise ValueError(f"unknown weight config {data!r}; methods: {', '.join(sorted(_CONFIGS))}")
        fields = {k: v for k, v in data.items() if k != "method"}
        return _CONFIGS[data["method"]](**fields)


def check_bits(bits, low: int = 1, high: int = 8) -> None:
    if not isinstance(bits, int) or isinstance(bits, bool) or not low <= bits <= high:
        raise ValueError(f"bits must be an int in [{low}, {high}], got {bits!r}")


def check_weight(weight: torch.Tensor, hessian: torch.Tensor | None, needs_hessian: bool) -> None:
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2 or not weight.dtype.is_floating_point:
        raise ValueError(f"expected a float weight matrix (out, in), got {getattr(weight, 'shape', weight)!r}")
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


def unpack_levels(
    packed: torch.Tensor, bits: int, shape: tuple[int, ...], dtype: torch.dtype = torch.long
) -> torch.Tensor:
    """Inverse of :func:`pack_levels`: levels of ``shape`` in ``dtype``, on the packed bytes' device."""
    return unpack_codes(packed, TokenSpec((2**bits,)), (*shape, 1), dtype).reshape(shape)


def row_bytes(packed: torch.Tensor, bits: int, shape: tuple[int, ...], start: int, stop: int) -> torch.Tensor | None:
    """The bytes holding rows ``start:stop`` of a :func:`pack_levels` tensor of ``shape`` (rows first), or None
    when rows do not start on whole bytes."""
    per_row = math.prod(shape[1:]) * bits
    if per_row % 8:
        return None
    return packed[start * per_row // 8 : stop * per_row // 8]


def unpack_rows(
    packed: torch.Tensor, bits: int, shape: tuple[int, ...], start: int, stop: int, dtype: torch.dtype = torch.uint8
) -> torch.Tensor:
    """Levels of rows ``start:stop`` of a :func:`pack_levels` tensor of ``shape`` (rows first), unpacking only
    their bytes when rows start on whole bytes."""
    rows = row_bytes(packed, bits, shape, start, stop)
    if rows is None:
        return unpack_levels(packed, bits, shape, dtype)[start:stop]
    return unpack_levels(rows, bits, (stop - start, *shape[1:]), dtype)


def lookup_rows(
    packed: torch.Tensor, bits: int, shape: tuple[int, ...], start: int, stop: int, table: torch.Tensor
) -> torch.Tensor:
    """``table[level]`` (float32) for the levels of rows ``start:stop``, shaped ``(stop - start, *shape[1:])``.

    At 1, 2 and 4 bits a byte holds whole levels: one gather from a 256-entry table of bytes (each entry the
    ``8 / bits`` values its levels stand for) replaces unpacking and a gather per level (3-4x faster).
    """
    rows = row_bytes(packed, bits, shape, start, stop) if bits in (1, 2, 4) else None
    if rows is None:
        levels = unpack_rows(packed, bits, shape, start, stop)
        return torch.index_select(table.float(), 0, levels.reshape(-1).int()).reshape(stop - start, *shape[1:])
    byte = torch.arange(256, device=packed.device)
    mask = (1 << bits) - 1
    byte_table = torch.stack([table.float()[(byte >> (bits * i)) & mask] for i in range(8 // bits)], -1)
    return torch.index_select(byte_table, 0, rows.int()).reshape(stop - start, *shape[1:])
