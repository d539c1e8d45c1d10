"""Token specifications, exact-bit packing of codes, and token files.

A code from a codebook of size K is stored in exactly ``ceil(log2 K)`` bits (a
10-bit code takes 10 bits, not 16). Token files are safetensors files holding
the packed bytes plus a JSON header (the :class:`TokenSpec`, the code shape and
user metadata); they are written atomically and validated on load, never pickled.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import torch

from tokenizers_q.files import read_artifact, write_artifact

FORMAT = "tokenizers_q.token_file"
VERSION = 2  # 2: the artifact header with checksums
_CODES_KEY = "codes"
MAX_BITS = 62


def _bits_for(size: int) -> int:
    return max(1, (size - 1).bit_length())


@dataclass(frozen=True)
class TokenSpec:
    """What a token is: how many codebooks, their sizes, and their bit widths.

    Args:
        codebook_sizes: size of each codebook; a token holds one code per codebook.
        factors: optional mixed-radix factorisation of each codebook's index,
            least significant digit first (FSQ levels; ``(2,) * bits`` for BSQ/LFQ;
            ``(K,)`` for a plain codebook; all-``(K,)`` factors are stored as None). Used by
            factorised transformer heads.
    """

    codebook_sizes: tuple[int, ...]
    factors: tuple[tuple[int, ...], ...] | None = None

    def __post_init__(self):
        sizes = tuple(self.codebook_sizes)
        if not sizes or any(not isinstance(s, int) or isinstance(s, bool) or s < 1 for s in sizes):
            raise ValueError(
                f"codebook_sizes must be a non-empty sequence of positive ints, got {self.codebook_sizes!r}"
            )
        if any(_bits_for(s) > MAX_BITS for s in sizes):
            raise ValueError(f"codebook sizes above 2**{MAX_BITS} are not supported, got {sizes}")
        object.__setattr__(self, "codebook_sizes", sizes)
        if self.factors is not None:
            factors = tuple(tuple(f) for f in self.factors)
            if len(factors) != len(sizes) or any(math.prod(f) != s for f, s in zip(factors, sizes)):
                raise ValueError(f"factors {factors} must multiply to the codebook sizes {sizes}")
            # all-whole factors say nothing beyond the sizes: store them as None so that equal specs compare equal
            object.__setattr__(self, "factors", None if all(len(f) == 1 for f in factors) else factors)

    @property
    def num_codebooks(self) -> int:
        return len(self.codebook_sizes)

    @property
    def bits(self) -> tuple[int, ...]:
        """Stored bits of each codebook's code."""
        return tuple(_bits_for(s) for s in self.codebook_sizes)

    @property
    def bits_per_token(self) -> int:
        return sum(self.bits)

    @classmethod
    def concat(cls, specs: list[TokenSpec]) -> TokenSpec:
        """The spec of tokens made of several quantizers' codes side by side (RVQ, PQ)."""
        factors = None
        if all(s.factors is not None for s in specs):
            factors = tuple(f for s in specs for f in s.factors)
        return cls(tuple(k for s in specs for k in s.codebook_sizes), factors)

    def to_dict(self) -> dict[str, Any]:
        return {
            "codebook_sizes": list(self.codebook_sizes),
            "factors": None if self.factors is None else [list(f) for f in self.factors],
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TokenSpec:
        if not isinstance(data, dict) or "codebook_sizes" not in data:
            raise ValueError(f"a TokenSpec dict needs 'codebook_sizes', got {data!r}")
        factors = data.get("factors")
        return cls(tuple(data["codebook_sizes"]), None if factors is None else tuple(map(tuple, factors)))

    def check_codes(self, codes: torch.Tensor, what: str = "codes") -> None:
        """Raise ``TypeError``/``ValueError`` unless ``codes`` is an integer tensor
        of shape (*, num_codebooks) with every code inside its codebook."""
        if not isinstance(codes, torch.Tensor):
            raise TypeError(f"{what} must be a torch.Tensor, got {type(codes).__name__}")
        if codes.dtype.is_floating_point or codes.dtype.is_complex or codes.dtype == torch.bool:
            raise TypeError(f"{what} must be an integer tensor, got dtype {codes.dtype}")
        if codes.dim() == 0 or codes.shape[-1] != self.num_codebooks:
            raise ValueError(
                f"{what} must have shape (..., {self.num_codebooks}) for {self.num_codebooks} codebook(s), "
                f"got shape {tuple(codes.shape)}"
            )
        if codes.numel() == 0:
            return
        columns = codes.reshape(-1, self.num_codebooks)
        low, high = columns.amin(0), columns.amax(0)  # one pass each; positions only on failure
        sizes = torch.tensor(self.codebook_sizes, device=codes.device)
        if bool(((low < 0) | (high >= sizes)).any()):
            bad = (codes < 0) | (codes >= sizes)
            pos = bad.nonzero()[0].tolist()
            raise ValueError(
                f"{what} out of range: value {int(codes[tuple(pos)])} at index {tuple(pos)} "
                f"is outside [0, {self.codebook_sizes[pos[-1]]}) of codebook {pos[-1]}"
            )


def code_dtype(bits: int) -> torch.dtype:
    """The narrowest integer dtype holding every ``bits``-bit code: uint8, int16, int32 or int64."""
    return torch.uint8 if bits <= 8 else torch.int16 if bits <= 15 else torch.int32 if bits <= 31 else torch.int64


def _fields(spec: TokenSpec) -> list[tuple[int, int, int, int]]:
    """(token, codebook, bit offset, width) of every code in a group of 8 tokens, which fills exactly
    ``bits_per_token`` bytes of the least-significant-bit-first stream."""
    fields, offset = [], 0
    for token in range(8):
        for codebook, width in enumerate(spec.bits):
            fields.append((token, codebook, offset, width))
            offset += width
    return fields


def _work_dtype(spec: TokenSpec) -> torch.dtype:
    """The narrowest integers the shifts can run in: each output byte and each code is read from bit
    patterns masked to its width, so shifts may wrap (uint8 up to 8-bit codes, int16 up to 15)."""
    widest = max(spec.bits)
    return code_dtype(widest) if widest <= 15 else torch.int32 if widest <= 24 else torch.int64


def pack_codes(codes: torch.Tensor, spec: TokenSpec) -> torch.Tensor:
    """Pack codes into bytes, ``spec.bits`` bits per codebook, least significant bit first, on the codes'
    device.

    Word-level shifts and masks: 8 tokens fill ``bits_per_token`` whole bytes, and each output byte is the OR
    of the (at most a few) shifted codes that overlap it, computed for all groups at once. Codes of 8 bits
    are stored as they are.

    Shapes:
        - codes: (*, num_codebooks), integer
        - output: (ceil(numel / num_codebooks * bits_per_token / 8),), uint8
    """
    spec.check_codes(codes)
    flat = codes.reshape(-1, spec.num_codebooks)
    n, total_bits = flat.shape[0], spec.bits_per_token
    size = -(-n * total_bits // 8)
    if spec.bits == (8,) * spec.num_codebooks:
        return flat.to(torch.uint8).reshape(-1)
    if spec.num_codebooks == 1 and spec.bits[0] in (1, 2, 4):  # whole codes per byte: OR them in place
        width, per_byte = spec.bits[0], 8 // spec.bits[0]
        work = flat.reshape(-1).to(torch.uint8)
        if size * per_byte > n:
            work = torch.cat([work, work.new_zeros(size * per_byte - n)])
        columns = work.view(size, per_byte)
        out = columns[:, 0].clone()
        for i in range(1, per_byte):
            out |= columns[:, i] << (width * i)
        return out
    groups = -(-n // 8)
    work = flat.to(_work_dtype(spec))
    if groups * 8 > n:
        work = torch.cat([work, work.new_zeros(groups * 8 - n, spec.num_codebooks)])
    planes = work.view(groups, 8, spec.num_codebooks).permute(1, 2, 0).contiguous()  # (8, C, groups)
    out = torch.empty(total_bits, groups, dtype=torch.uint8, device=codes.device)
    fields = _fields(spec)
    for byte in range(total_bits):
        start = 8 * byte
        acc = None
        for token, codebook, offset, width in fields:
            if offset + width <= start or offset >= start + 8:
                continue
            code = planes[token, codebook]
            term = code << (offset - start) if offset >= start else code >> (start - offset)
            acc = term if acc is None else acc | term
        out[byte] = acc & 0xFF
    return out.t().reshape(-1)[:size]


def unpack_codes(
    packed: torch.Tensor, spec: TokenSpec, shape: tuple[int, ...], dtype: torch.dtype | None = None
) -> torch.Tensor:
    """Inverse of :func:`pack_codes` on the bytes' device; validates byte count and (when a codebook's size
    is not a power of two) code ranges.

    Args:
        dtype: of the codes; default: the narrowest that holds the widest code (:func:`code_dtype`).

    Shapes:
        - packed: (num_bytes,), uint8
        - output: ``shape`` = (*, num_codebooks)
    """
    shape = tuple(int(s) for s in shape)
    if not shape or shape[-1] != spec.num_codebooks:
        raise ValueError(f"shape must end with num_codebooks={spec.num_codebooks}, got {shape}")
    if packed.dtype != torch.uint8 or packed.dim() != 1:
        raise ValueError(f"packed codes must be a 1-D uint8 tensor, got {packed.dtype} {tuple(packed.shape)}")
    num_tokens = math.prod(shape) // spec.num_codebooks
    total_bits = spec.bits_per_token
    expected = math.ceil(num_tokens * total_bits / 8)
    if packed.numel() != expected:
        raise ValueError(
            f"packed codes hold {packed.numel()} bytes but shape {shape} at {total_bits} bits "
            f"per token needs {expected}: the data does not match its header"
        )
    dtype = dtype or code_dtype(max(spec.bits))
    if spec.bits == (8,) * spec.num_codebooks:
        codes = packed.to(dtype).reshape(shape)
    elif spec.num_codebooks == 1 and spec.bits[0] in (1, 2, 4):  # whole codes per byte
        width, per_byte = spec.bits[0], 8 // spec.bits[0]
        out = torch.empty(packed.numel(), per_byte, dtype=torch.uint8, device=packed.device)
        for i in range(per_byte):
            torch.bitwise_and(packed >> (width * i), (1 << width) - 1, out=out[:, i])
        codes = out.reshape(-1)[:num_tokens].to(dtype).reshape(shape)
    else:
        groups = -(-num_tokens // 8)
        work = packed.to(_work_dtype(spec))
        if groups * total_bits > work.numel():
            work = torch.cat([work, work.new_zeros(groups * total_bits - work.numel())])
        planes = work.view(groups, total_bits).t().contiguous()  # (bytes per group, groups)
        out = torch.empty(groups, 8, spec.num_codebooks, dtype=dtype, device=packed.device)
        for token, codebook, offset, width in _fields(spec):
            acc = None
            for byte in range(offset // 8, (offset + width - 1) // 8 + 1):
                start = 8 * byte
                term = planes[byte] >> (offset - start) if offset >= start else planes[byte] << (start - offset)
                acc = term if acc is None else acc | term
            out[:, token, codebook] = acc & ((1 << width) - 1)
        codes = out.reshape(-1, spec.num_codebooks)[:num_tokens].reshape(shape)
    if any(size != 2**bits for size, bits in zip(spec.codebook_sizes, spec.bits)):
        spec.check_codes(codes, what="unpacked codes (corrupt data?)")
    return codes


def planes_per_group(bits: int) -> int:
    """The planes :func:`code_planes` cuts ``bits``-bit codes into: the codes of a byte at 1, 2, 4 and 8 bits,
    else 8 (the codes of a group of ``bits`` bytes)."""
    return 8 // bits if bits in (1, 2, 4, 8) else 8


def code_planes(packed: torch.Tensor, bits: int, count: int) -> list[torch.Tensor]:
    """The ``count`` codes of a one-codebook :func:`pack_codes` stream of ``bits``-bit codes (1-16), as planes:
    plane ``j`` of ``P`` holds codes ``j, j + P, j + 2P, ...`` (``P = 8 // bits`` at 1, 2, 4 and 8 bits, where a
    byte holds whole codes; else 8, the codes of one group of ``bits`` bytes).

    Each plane is strided slices, shifts and masks of the bytes, with no gather and no loop over codes:
    ``torch.compile`` fuses it into the code that consumes it (a lookup per plane, then
    ``torch.stack(planes, -1)``). In eager, :func:`unpack_codes` is faster.

    Shapes:
        - packed: (count * bits / 8,), uint8; ``count`` a multiple of ``P``
        - output: ``P`` tensors of (count / P,); uint8 at 1, 2, 4 and 8 bits, else int32
    """
    if not isinstance(bits, int) or not 1 <= bits <= 16:
        raise ValueError(f"code planes take 1 to 16 bits per code, got {bits!r}")
    per_group = planes_per_group(bits)
    if count % per_group or packed.dtype != torch.uint8 or packed.shape != (count * bits // 8,):
        raise ValueError(
            f"code planes need a multiple of {per_group} codes of {bits} bits in a 1-D uint8 tensor of "
            f"{count * bits // 8} bytes, got {count} codes in {packed.dtype} {tuple(packed.shape)}"
        )
    mask = (1 << bits) - 1
    if per_group < 8 or bits == 8:
        return [(packed >> (bits * j)) & mask for j in range(per_group)]
    group = packed.view(-1, bits)
    planes = []
    for j in range(8):
        offset = j * bits
        first, last = offset // 8, (offset + bits - 1) // 8
        word = group[:, first].int()
        for byte in range(first + 1, last + 1):
            word = word | (group[:, byte].int() << (8 * (byte - first)))
        planes.append((word >> (offset % 8)) & mask)
    return planes


class TokenFile(NamedTuple):
    """Contents of a token file: codes (*, num_codebooks) int64, their spec, the user metadata dict, extra
    tensors (e.g. labels), and the fingerprint of the tokenizer that made them (None when not recorded)."""

    codes: torch.Tensor
    spec: TokenSpec
    metadata: dict[str, Any]
    extras: dict[str, torch.Tensor]
    fingerprint: str | None = None


def save_tokens(
    path: str | os.PathLike,
    codes: torch.Tensor,
    spec: TokenSpec,
    metadata: dict[str, Any] | None = None,
    extras: dict[str, torch.Tensor] | None = None,
    fingerprint: str | None = None,
) -> Path:
    """Write codes, exactly packed, to a token file (an artifact of format ``tokenizers_q.token_file``).

    The file is written to a temporary name in the same folder and renamed into
    place, so a killed run never leaves a half-written file over a good one.

    Args:
        path: destination file.
        codes: (*, num_codebooks) integer codes.
        spec: their :class:`TokenSpec`.
        metadata: JSON-serialisable information (source data, tokenizer config...).
        extras: additional tensors stored alongside (e.g. class labels).
        fingerprint: of the tokenizer that made the codes (see :func:`~tokenizers_q.files.state_fingerprint`);
            decoding checks it.
    """
    if not isinstance(spec, TokenSpec):
        raise TypeError(f"spec must be a TokenSpec, got {type(spec).__name__} {spec!r}")
    extras = dict(extras or {})
    if _CODES_KEY in extras:
        raise ValueError(f"extras may not use the reserved name {_CODES_KEY!r}")
    config = {"spec": spec.to_dict(), "shape": list(codes.shape), "metadata": metadata or {}}
    config["fingerprint"] = fingerprint
    tensors = {_CODES_KEY: pack_codes(codes, spec), **extras}
    return write_artifact(path, FORMAT, VERSION, config, tensors)


def load_tokens(path: str | os.PathLike, expected_spec: TokenSpec | None = None) -> TokenFile:
    """Read a token file written by :func:`save_tokens`, verifying its checksums and code ranges.

    Raises ``ValueError`` naming the file when it is not a token file, is
    truncated or corrupt, or (with ``expected_spec``) holds another spec.
    """
    path = Path(path)
    config, tensors = read_artifact(path, FORMAT, VERSION)[1:]
    if _CODES_KEY not in tensors:
        raise ValueError(f"{path} is a token file without its {_CODES_KEY!r} tensor")
    try:
        spec = TokenSpec.from_dict(config["spec"])
        codes = unpack_codes(tensors.pop(_CODES_KEY), spec, tuple(config["shape"]), torch.long)
    except (ValueError, KeyError, TypeError) as err:
        raise ValueError(f"{path} is a corrupt token file: {err}") from None
    if expected_spec is not None and spec != expected_spec:
        raise ValueError(f"{path} holds tokens of {spec}, but {expected_spec} was expected")
    return TokenFile(codes, spec, config.get("metadata", {}), tensors, config.get("fingerprint"))
