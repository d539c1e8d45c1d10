"""Storage of KV caches: tensors that grow along their token axis, and codes packed per token.

A cache appends a few tokens at a time and reads every token each step. :class:`TokenBuffer` keeps one
tensor with room to grow: when it is full it moves to one ``1 + GROWTH`` times as long, so the past is
copied once every ``GROWTH`` of its length (amortised: each token is copied about ``1 / GROWTH`` times in
all, never ``torch.cat`` of everything each step) and the spare room is at most ``GROWTH`` of what is held.
"""

from __future__ import annotations

import torch

from tokenizers_q.packing import TokenSpec, code_dtype, pack_codes, unpack_codes

GROWTH = 1 / 32  # spare room a buffer grows by, as a share of its length (3%)


class TokenBuffer:
    """A tensor ``(*lead, tokens, *rest)`` appended to along ``axis`` (tokens, or groups of tokens), with
    spare room of at most ``GROWTH`` of its length.

    Args:
        axis: the token axis. Default: 2 (``(batch, heads, tokens, ...)``).
    """

    def __init__(self, axis: int = 2):
        self.axis = axis
        self.storage: torch.Tensor | None = None
        self.length = 0

    def append(self, x: torch.Tensor) -> None:
        """Add the tokens of ``x`` (the same shape as the buffer but along ``axis``, and the same dtype)."""
        count = x.shape[self.axis]
        if self.storage is None:
            self.storage = x.clone()  # never a view of the caller's tensor
            self.length = count
            return
        if x.dtype != self.storage.dtype or x.shape[: self.axis] != self.storage.shape[: self.axis]:
            raise ValueError(
                f"cannot append {x.dtype} {tuple(x.shape)} to a buffer of {self.storage.dtype} "
                f"{tuple(self.storage.shape)} along axis {self.axis}"
            )
        needed = self.length + count
        if needed > self.storage.shape[self.axis]:
            shape = list(self.storage.shape)
            shape[self.axis] = needed + int(needed * GROWTH)
            grown = self.storage.new_empty(shape)
            grown.narrow(self.axis, 0, self.length).copy_(self.tensor())
            self.storage = grown
        self.storage.narrow(self.axis, self.length, count).copy_(x)
        self.length = needed

    def tensor(self) -> torch.Tensor:
        """The appended tokens (a view, no copy); an empty buffer has none."""
        if self.storage is None:
            raise ValueError("the buffer is empty")
        return self.storage.narrow(self.axis, 0, self.length)

    def stored_bits(self) -> int:
        """Bits of the appended tokens (the spare room is not counted; :func:`held_bytes` sees it)."""
        if self.storage is None:
            return 0
        per_token = self.storage.numel() // self.storage.shape[self.axis]
        return per_token * self.length * self.storage.element_size() * 8


class PackedTokens:
    """The codes of appended tokens, packed at their exact width across tokens: every 8 tokens of a (batch,
    head) row fill whole bytes (8 x the bits of a token), held in a :class:`TokenBuffer`; the last 0-7 tokens
    wait unpacked (in the narrowest integer dtype) until 8 are there.

    Args:
        spec: the codebooks of a token's codes, cycled over its ``width`` codes.
        width: codes per token.

    Shapes:
        - codes appended and returned: (B, H, T, width)
    """

    def __init__(self, spec: TokenSpec, width: int):
        sizes = spec.codebook_sizes * (width // spec.num_codebooks)
        if len(sizes) != width:
            raise ValueError(f"width {width} is not a multiple of the {spec.num_codebooks} codebooks of {spec}")
        self.spec, self.width = TokenSpec(sizes), width
        self.stream = TokenSpec(sizes[:1]) if len(set(sizes)) == 1 else self.spec  # one stream: the fast path
        self.octets = TokenBuffer()  # (B, H, T / 8, bytes of 8 tokens)
        self.tail: torch.Tensor | None = None  # (B, H, < 8, width)

    @property
    def length(self) -> int:
        """Tokens appended."""
        return 8 * self.octets.length + (0 if self.tail is None else self.tail.shape[2])

    def append(self, codes: torch.Tensor) -> None:
        if codes.dim() != 4 or codes.shape[3] != self.width:
            raise ValueError(f"expected codes (B, H, T, {self.width}), got {tuple(codes.shape)}")
        if self.tail is not None:  # at most 7 tokens: a bounded copy
            codes = torch.cat([self.tail.to(codes.dtype), codes], 2)
        whole = codes.shape[2] // 8 * 8
        if whole:
            rows = codes[:, :, :whole].reshape(-1, self.stream.num_codebooks)
            packed = pack_codes(rows, self.stream)
            self.octets.append(packed.reshape(codes.shape[0], codes.shape[1], whole // 8, -1))
        rest = codes[:, :, whole:]
        keep = rest.shape[2] or not self.octets.length  # (an empty tail gives the shape of no tokens yet)
        self.tail = rest.to(code_dtype(max(self.spec.bits))).clone() if keep else None

    def packed_rows(self) -> tuple[torch.Tensor, int] | None:
        """The whole octets' codes as they are stored, one row of bytes per (batch, head), and their width:
        row ``(b, h)`` is the least-significant-bit-first stream of ``8 x octets x width`` codes (a view).
        None when no octet is full or the codebooks differ in bits.

        Shapes:
            - output: (B, H, octets x bytes of 8 tokens) uint8
        """
        if not self.octets.length or self.stream.num_codebooks != 1:
            return None
        octets = self.octets.tensor()
        return octets.reshape(*octets.shape[:2], -1), self.stream.bits[0]

    def codes(self, dtype: torch.dtype = torch.long) -> torch.Tensor:
        """Every appended token's codes (B, H, T, width), unpacked (a new tensor)."""
        parts = []
        if self.octets.length:
            packed = self.octets.tensor()
            batch, heads, octets, _ = packed.shape
            per_row = self.stream.num_codebooks
            shape = (batch * heads * octets * 8 * self.width // per_row, per_row)
            codes = unpack_codes(packed.reshape(-1), self.stream, shape, dtype)
            parts.append(codes.reshape(batch, heads, -1, self.width))
        if self.tail is not None:
            parts.append(self.tail.to(dtype))
        if not parts:
            raise ValueError("no tokens were appended")
        return parts[0] if len(parts) == 1 else torch.cat(parts, 2)

    def stored_bits(self) -> int:
        """The packed bytes and the waiting tokens as held."""
        tail = 0 if self.tail is None else self.tail.numel() * self.tail.element_size() * 8
        return self.octets.stored_bits() + tail
