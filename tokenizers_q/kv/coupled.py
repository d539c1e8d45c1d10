"""Coupled quantization of KV caches (CQ, "KV Cache is 1 Bit Per Channel", Zhang et al., 2024).

Channels of each head are split into groups of ``group_size``; each group of a key
(or value) vector is replaced by the index of its nearest centroid among
``codebook_size`` learned jointly for those channels by (optionally Fisher-weighted)
k-means on calibration keys and values. Coupling channels lets 8-bit codes over
4 channels (2 bits per channel) or 8 channels (1 bit per channel) keep the
channels' joint structure that per-channel grids lose.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from tokenizers_q.checks import check_codebook_size, check_int
from tokenizers_q.files import CODEBOOK_BITS, RENAMED_ARGUMENTS, current_arguments
from tokenizers_q.grids import METADATA_BITS
from tokenizers_q.kmeans import kmeans
from tokenizers_q.kv.buffer import PackedTokens
from tokenizers_q.kv.cache import LayerCache, check_kv
from tokenizers_q.kv.tables import CodewordTables, table_attention, tables_pay
from tokenizers_q.packing import TokenSpec
from tokenizers_q.search import nearest


@dataclass(frozen=True)
class CQConfig:
    r"""Settings of coupled quantization.

    Args:
        group_size: channels coupled in one code (must divide head_dim). Default: 4.
        codebook_size: centroids per channel group, a power of two in [2, 65536]. Default: 256 (8-bit codes:
            2 bits per channel at 4 channels).
        kmeans_iters: k-means iterations. Default: 20.
        seed: k-means seeding. Default: 0.
    """

    group_size: int = 4
    codebook_size: int = 256
    kmeans_iters: int = 20
    seed: int = 0

    def __post_init__(self):
        check_int("group_size", self.group_size)
        check_codebook_size(self.codebook_size)
        check_int("kmeans_iters", self.kmeans_iters, 0)

    @property
    def code_bits(self) -> int:
        """Bits of one code: ``log2(codebook_size)``."""
        return self.codebook_size.bit_length() - 1

    def bits_per_element(self) -> float:
        """Code bits per key or value channel (the shared centroids not counted)."""
        return self.code_bits / self.group_size

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, stored: dict, what: str = "CQ settings") -> CQConfig:
        """Settings as saved by :meth:`to_dict`; files of the earlier names (``channels``, and ``bits`` for
        ``codebook_size = 2^bits``) load with a ``DeprecationWarning``."""
        return cls(**current_arguments(stored, what, {**RENAMED_ARGUMENTS, "channels": "group_size"}, CODEBOOK_BITS))


class CoupledCodebooks:
    r"""One layer's centroids for keys and values, per head and channel group.

    Shapes:
        - keys, values: (heads, head_dim / group_size, codebook_size, group_size), float16
    """

    def __init__(self, keys: torch.Tensor, values: torch.Tensor, config: CQConfig):
        if keys.shape != values.shape or keys.dim() != 4:
            raise ValueError(f"key and value codebooks must share a 4-d shape, got {keys.shape} and {values.shape}")
        # stored in float16, as counted by stored_bits
        self.keys, self.values, self.config = keys.to(torch.float16), values.to(torch.float16), config

    @classmethod
    def fit(
        cls,
        keys: torch.Tensor,
        values: torch.Tensor,
        config: CQConfig,
        key_weights: torch.Tensor | None = None,
        value_weights: torch.Tensor | None = None,
    ) -> CoupledCodebooks:
        """k-means on calibration keys and values of one layer (weights: e.g. Fisher information per vector).

        Shapes:
            - keys, values: (B, H, T, D) calibration activations
            - key_weights, value_weights: (B, H, T) non-negative, or None
        """
        check_kv(keys, values, None, None)
        dim = keys.shape[-1]
        if dim % config.group_size:
            raise ValueError(f"group_size={config.group_size} must divide head_dim {dim}")
        generator = torch.Generator(device=keys.device).manual_seed(config.seed)
        books = []
        for x, w in ((keys, key_weights), (values, value_weights)):
            groups = _groups(x, config.group_size)  # (H * G, B * T, c)
            weights = None
            if w is not None:
                weights = w.permute(1, 0, 2).reshape(x.shape[1], 1, -1).expand(-1, dim // config.group_size, -1)
                weights = weights.reshape(groups.shape[:2])
            result = kmeans(groups, config.codebook_size, config.kmeans_iters, weights, generator=generator)
            shape = (x.shape[1], dim // config.group_size, config.codebook_size, config.group_size)
            books.append(result.centroids.reshape(shape))
        return cls(books[0], books[1], config)

    def stored_bits(self) -> int:
        """The centroids in float16."""
        return (self.keys.numel() + self.values.numel()) * METADATA_BITS


def _groups(x: torch.Tensor, group_size: int) -> torch.Tensor:
    """(B, H, T, D) -> (H * D / group_size, B * T, group_size): one k-means / search problem per head and group."""
    b, h, t, d = x.shape
    return (
        x.float()
        .reshape(b, h, t, d // group_size, group_size)
        .permute(1, 3, 0, 2, 4)
        .reshape(h * d // group_size, b * t, group_size)
    )


class CQLayerCache(LayerCache):
    r"""One layer's coupled-quantization cache: every token stored as codes (no full-precision window).

    The codes are held packed at ``log2(codebook_size)`` bits each (:class:`~tokenizers_q.kv.buffer.PackedTokens`);
    ``update`` returns the centroids they name and keeps nothing of them. ``stored_bits`` counts the codes
    and, with ``count_codebooks``, the layer's centroids (amortised over the tokens of this cache; off when
    they are shared by many sequences).
    """

    def __init__(self, codebooks: CoupledCodebooks, count_codebooks: bool = False):
        super().__init__()
        self.codebooks, self.count_codebooks = codebooks, count_codebooks
        spec, groups = TokenSpec((codebooks.config.codebook_size,)), codebooks.keys.shape[1]
        self.codes = (PackedTokens(spec, groups), PackedTokens(spec, groups))  # keys, values: (B, H, T, groups)

    def _append(self, keys, values):
        heads, groups, _, channels = self.codebooks.keys.shape
        if keys.shape[1] != heads or keys.shape[3] != groups * channels:
            raise ValueError(
                f"the codebooks were fitted for {heads} heads of dim {groups * channels}, "
                f"got {keys.shape[1]} heads of dim {keys.shape[3]}"
            )
        batch, _, tokens, _ = keys.shape
        for x, book, stored in zip((keys, values), self._books(keys.device), self.codes):
            codes, _ = nearest(_groups(x, channels), book.reshape(heads * groups, -1, channels))
            codes = codes.reshape(heads, groups, batch, tokens).permute(2, 0, 3, 1)  # (B, H, T, groups)
            stored.append(codes)

    def _books(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        return tuple(b.to(device, torch.float32) for b in (self.codebooks.keys, self.codebooks.values))

    def tensors(self, dtype=None):
        """Every token's keys and values (B, H, T, D), made from the codes (a new tensor each call)."""
        dtype = dtype or self.dtype
        heads, groups, size, channels = self.codebooks.keys.shape
        out = []
        all_codes = [stored.codes() for stored in self.codes]  # (B, H, T, groups) each
        device = all_codes[0].device
        group = torch.arange(heads * groups, device=device).reshape(1, heads, 1, groups)  # each its own centroids
        for book, codes in zip(self._books(device), all_codes):
            vectors = book.reshape(-1, channels)[codes + group * size]  # (B, H, T, groups, channels)
            out.append(vectors.reshape(*codes.shape[:3], groups * channels).to(dtype))
        return out[0], out[1]

    def stored_bits(self) -> int:
        bits = sum(stored.stored_bits() for stored in self.codes)
        return bits + (self.codebooks.stored_bits() if self.count_codebooks else 0)

    def attend(self, queries, scale=None, mask=None):
        """Attention from the codes through tables of ``q . centroid`` (:mod:`tokenizers_q.kv.tables`): no key
        or value is made. Many queries at once (a prefill) attend through :meth:`tensors`, which is then
        cheaper."""
        heads, groups, _, channels = self.codebooks.keys.shape
        if not tables_pay(queries, heads, groups):
            return super().attend(queries, scale, mask)
        offsets = tuple(range(0, groups * channels, channels))
        tables = tuple(
            CodewordTables(book.new_zeros(heads, groups * channels), book, offsets)
            for book in self._books(queries.device)
        )
        return table_attention(queries, self.codes, tables, heads, scale, mask)
