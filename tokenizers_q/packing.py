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
_ROWS_PER_CHUNK = 8 * 2**15  # a multiple of 8, so each chunk packs into whole bytes
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
        sizes = torch.tensor(self.codebook_sizes, device=codes.device)
        bad = (codes < 0) | (codes >= sizes)
        if bad.any():
            pos = bad.nonzero()[0].tolist()
            raise ValueError(
                f"{what} out of range: value {int(codes[tuple(pos)])} at index {tuple(pos)} "
                f"is outside [0, {self.codebook_sizes[pos[-1]]}) of codebook {pos[-1]}"
            )


def pack_codes(codes: torch.Tensor, spec: TokenSpec) -> torch.Tensor:
    """Pack codes into bytes, ``spec.bits`` bits per codebook, least significant bit first.

    Shapes:
        - codes: (*, num_codebooks), integer
        - output: (ceil(numel / num_codebooks * bits_per_token / 8),), uint8
    """
    spec.check_codes(codes)
    flat = codes.reshape(-1, spec.num_codebooks).long().cpu()
    shifts = [torch.arange(b) for b in spec.bits]
    out = []
    for start in range(0, flat.shape[0], _ROWS_PER_CHUNK):
        rows = flat[start : start + _ROWS_PER_CHUNK]
        bits = torch.cat([(rows[:, c : c + 1] >> s) & 1 for c, s in enumerate(shifts)], dim=1).reshape(-1)
        bits = torch.nn.functional.pad(bits, (0, (-bits.numel()) % 8)).reshape(-1, 8)
        out.append((bits << torch.arange(8)).sum(-1).to(torch.uint8))
    return torch.cat(out) if out else torch.zeros(0, dtype=torch.uint8)


def unpack_codes(packed: torch.Tensor, spec: TokenSpec, shape: tuple[int, ...]) -> torch.Tensor:
    """Inverse of :func:`pack_codes`; validates byte count and code ranges.

    Shapes:
        - packed: (num_bytes,), uint8
        - output: ``shape`` = (*, num_codebooks), int64
    """
    shape = tuple(int(s) for s in shape)
    if not shape or shape[-1] != spec.num_codebooks:
        raise ValueError(f"shape must end with num_codebooks={spec.num_codebooks}, got {shape}")
    if packed.dtype != torch.uint8 or packed.dim() != 1:
        raise ValueError(f"packed codes must be a 1-D uint8 tensor, got {packed.dtype} {tuple(packed.shape)}")
    num_tokens = math.prod(shape) // spec.num_codebooks
    expected = math.ceil(num_tokens * spec.bits_per_token / 8)
    if packed.numel() != expected:
        raise ValueError(
            f"packed codes hold {packed.numel()} bytes but shape {shape} at {spec.bits_per_token} bits "
            f"per token needs {expected}: the data does not match its header"
        )
    bytes_per_chunk = _ROWS_PER_CHUNK * spec.bits_per_token // 8
    offsets = torch.tensor([0, *spec.bits]).cumsum(0).tolist()
    out = []
    packed = packed.cpu().long()
    for start in range(0, packed.numel(), bytes_per_chunk):
        bits = ((packed[start : start + bytes_per_chunk, None] >> torch.arange(8)) & 1).reshape(-1)
        rows = min(_ROWS_PER_CHUNK, num_tokens - (start // bytes_per_chunk) * _ROWS_PER_CHUNK)
        bits = bits[: rows * spec.bits_per_token].reshape(rows, spec.bits_per_token)
        cols = [(bits[:, lo:hi] << torch.arange(hi - lo)).sum(-1) for lo, hi in zip(offsets[:-1], offsets[1:])]
        out.append(torch.stack(cols, dim=1))
    codes = torch.cat(out) if out else torch.zeros(0, spec.num_codebooks, dtype=torch.long)
    codes = codes.reshape(shape)
    spec.check_codes(codes, what="unpacked codes (corrupt data?)")
    return codes


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
        codes = unpack_codes(tensors.pop(_CODES_KEY), spec, tuple(config["shape"]))
    except (ValueError, KeyError, TypeError) as err:
        raise ValueError(f"{path} is a corrupt token file: {err}") from None
    if expected_spec is not None and spec != expected_spec:
        raise ValueError(f"{path} holds tokens of {spec}, but {expected_spec} was expected")
    return TokenFile(codes, spec, config.get("metadata", {}), tensors, config.get("fingerprint"))
