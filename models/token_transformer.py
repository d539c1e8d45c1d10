"""A transformer over tokens of any library quantizer, with heads derived from the TokenSpec."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from tokenizers_q.checks import check_choice, check_int
from tokenizers_q.kv import KVCache, LayerCache
from tokenizers_q.packing import TokenSpec

POSITIONS = ("grid", "sequence")


def token_radices(spec: TokenSpec, factorised: bool) -> tuple[tuple[int, ...], ...]:
    """Per codebook, the radices its index is split into: ``(K,)`` whole, or the spec's factors.

    Factorised FSQ codes split into one digit per level, BSQ/LFQ codes into one per bit.
    """
    if factorised and spec.factors is not None:
        return spec.factors
    return tuple((k,) for k in spec.codebook_sizes)


def codes_to_digits(codes: torch.Tensor, radices: tuple[tuple[int, ...], ...]) -> torch.Tensor:
    """Mixed-radix digits of each codebook's code, least significant first.

    Shapes:
        - codes: (*, num_codebooks)
        - output: (*, num_digits), num_digits = total number of radices
    """
    digits = []
    for c, codebook_radices in enumerate(radices):
        rest = codes[..., c]
        for r in codebook_radices:
            digits.append(rest % r)
            rest = rest // r
    return torch.stack(digits, -1)


def digits_to_codes(digits: torch.Tensor, radices: tuple[tuple[int, ...], ...]) -> torch.Tensor:
    """Inverse of :func:`codes_to_digits`. Shapes: (*, num_digits) -> (*, num_codebooks)."""
    codes, i = [], 0
    for codebook_radices in radices:
        code, scale = torch.zeros_like(digits[..., 0]), 1
        for r in codebook_radices:
            code = code + digits[..., i] * scale
            scale *= r
            i += 1
        codes.append(code)
    return torch.stack(codes, -1)


class Attention(nn.Module):
    """Multi-head self-attention with an optional key/value cache for incremental decoding."""

    def __init__(self, dim: int, num_heads: int, dropout: float):
        super().__init__()
        self.num_heads, self.dropout = num_heads, dropout
        self.qkv = nn.Linear(dim, 3 * dim)
        self.out = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, causal: bool, cache: LayerCache | None = None) -> torch.Tensor:
        b, n, d = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.num_heads, d // self.num_heads).permute(2, 0, 3, 1, 4)
        if cache is None:
            y = F.scaled_dot_product_attention(
                q, k, v, is_causal=causal and n > 1, dropout_p=self.dropout if self.training else 0.0
            )
        else:  # any library KV cache, read through its attend: from the codes where it holds codes
            cache.append(k, v)
            tokens = cache.num_tokens  # the new queries sit at the end: causal masking aligns bottom-right
            mask = torch.ones(n, tokens, dtype=torch.bool, device=x.device).tril(tokens - n) if causal else None
            y = cache.attend(q, mask=mask)
        return self.out(y.transpose(1, 2).reshape(b, n, d))


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, dropout: float):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn = Attention(dim, num_heads, dropout)
        hidden = int(dim * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim), nn.Dropout(dropout))

    def forward(self, x: torch.Tensor, causal: bool, cache: LayerCache | None = None) -> torch.Tensor:
        x = x + self.attn(self.norm1(x), causal, cache)
        return x + self.mlp(self.norm2(x))


@torch.no_grad()
def init_embeddings(embeds: Sequence[nn.Embedding], code_vectors: Sequence[torch.Tensor], seed: int = 0) -> None:
    """Set each embedding table from a tokenizer's code vectors (K_c, e): a fixed random projection to the
    table's width, centred and scaled to std 0.02, so codes close in the tokenizer's latent space start close."""
    if len(code_vectors) != len(embeds):
        raise ValueError(f"got code vectors of {len(code_vectors)} codebooks, expected {len(embeds)}")
    g = torch.Generator().manual_seed(seed)
    for c, (embed, vectors) in enumerate(zip(embeds, code_vectors)):
        if vectors.dim() != 2 or vectors.shape[0] != embed.num_embeddings:
            raise ValueError(
                f"codebook {c}: expected ({embed.num_embeddings}, e) code vectors, got {tuple(vectors.shape)}"
            )
        projection = torch.randn(vectors.shape[1], embed.embedding_dim, generator=g)
        weight = (vectors.float().cpu() - vectors.float().cpu().mean(0)) @ projection
        embed.weight.copy_(weight / weight.std().clamp_min(1e-12) * 0.02)


class TokenTransformer(nn.Module):
    r"""Pre-norm transformer over token grids, for MaskGIT and autoregressive models.

    Each token holds one code per codebook (``spec.num_codebooks``: 1 for VQ,
    FSQ, BSQ, LFQ; one per level for RVQ, per group for PQ). With
    ``factorised=True`` every code is split further into its mixed-radix digits
    (``spec.factors``: per level for FSQ, per bit for BSQ/LFQ, as in MaskBit).
    Every digit (or whole code) gets its own input embedding, summed into one
    vector per token, and its own output head; the distribution of a token is the
    product of its heads' distributions.

    The sequence is one prefix token (the class embedding, or a learned start
    token when ``num_classes == 0``) followed by the grid's tokens in raster order.

    Args:
        spec: the tokens' :class:`TokenSpec` (or its ``to_dict()``).
        grid: token grid shape per example, e.g. ``(8, 8)``.
        dim: model width. Default: 256.
        depth: number of blocks. Default: 6.
        num_heads: attention heads. Default: 8.
        mlp_ratio: MLP hidden size / dim. Default: 4.
        dropout: dropout in attention and MLP. Default: 0.1.
        factorised: one head per digit instead of per codebook. Default: False.
        positions: ``"grid"`` (a learned embedding per grid axis, summed; 2D for
            images) or ``"sequence"`` (one learned embedding per raster position).
        num_classes: classes for conditioning (0: unconditional). Label ``num_classes``
            is "no class". Default: 0.

    Shapes:
        - codes: (B, L, num_codebooks), L <= prod(grid), raster order
        - output of :meth:`forward`: hidden states (B, 1 + L, dim), prefix first
        - output of :meth:`logits`: one (B, L, radix) tensor per digit
    """

    def __init__(
        self,
        spec: TokenSpec | dict,
        grid: Sequence[int],
        dim: int = 256,
        depth: int = 6,
        num_heads: int = 8,
        mlp_ratio: float = 4.0,
        dropout: float = 0.1,
        factorised: bool = False,
        positions: str = "grid",
        num_classes: int = 0,
    ):
        super().__init__()
        self.spec = spec if isinstance(spec, TokenSpec) else TokenSpec.from_dict(spec)
        self.grid = tuple(int(g) for g in grid)
        if not self.grid or any(g < 1 for g in self.grid):
            raise ValueError(f"grid must be a non-empty sequence of positive sizes, got {grid!r}")
        check_choice("positions", positions, POSITIONS)
        for name, value in (("dim", dim), ("depth", depth), ("num_heads", num_heads)):
            check_int(name, value)
        if dim % num_heads:
            raise ValueError(f"dim ({dim}) must be divisible by num_heads ({num_heads})")
        check_int("num_classes", num_classes, minimum=0)
        self.dim, self.num_classes, self.factorised, self.position_mode = dim, num_classes, factorised, positions
        self.radices = token_radices(self.spec, factorised)
        self.vocab = [r for codebook_radices in self.radices for r in codebook_radices]
        self.seq_len = math.prod(self.grid)

        self.embed = nn.ModuleList(nn.Embedding(v, dim) for v in self.vocab)
        self.mask_embed = nn.Parameter(torch.zeros(dim))
        self.prefix = nn.Embedding(num_classes + 1, dim)  # the last row: no class / start token
        if positions == "grid":
            self.position = nn.ParameterList(nn.Parameter(torch.zeros(g, dim)) for g in self.grid)
        else:
            self.position = nn.ParameterList([nn.Parameter(torch.zeros(self.seq_len, dim))])
        self.blocks = nn.ModuleList(Block(dim, num_heads, mlp_ratio, dropout) for _ in range(depth))
        self.norm = nn.LayerNorm(dim)
        self.heads = nn.ModuleList(nn.Linear(dim, v) for v in self.vocab)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.trunc_normal_(module.weight, std=0.02)
                if getattr(module, "bias", None) is not None:
                    nn.init.zeros_(module.bias)
        for p in (self.mask_embed, *self.position):
            nn.init.trunc_normal_(p, std=0.02)

    def extra_repr(self) -> str:
        return f"grid={self.grid}, vocab={self.vocab}, num_classes={self.num_classes}"

    # -- embeddings ----------------------------------------------------------------------
    def positions(self, start: int, length: int) -> torch.Tensor:
        """Position embeddings of raster positions ``start .. start + length - 1``. Shapes: (length, dim)."""
        if self.position_mode == "sequence":
            return self.position[0][start : start + length]
        index = torch.arange(start, start + length, device=self.position[0].device)
        out = 0
        for axis in reversed(range(len(self.grid))):  # raster order: the last axis varies fastest
            out = out + self.position[axis][index % self.grid[axis]]
            index = index // self.grid[axis]
        return out

    def embed_codes(self, codes: torch.Tensor) -> torch.Tensor:
        """Sum of the digit embeddings of each token. Shapes: (B, L, num_codebooks) -> (B, L, dim)."""
        self.spec.check_codes(codes)
        digits = codes_to_digits(codes, self.radices)
        return sum(embed(digits[..., i]) for i, embed in enumerate(self.embed))

    @torch.no_grad()
    def init_embeddings_from(self, code_vectors: Sequence[torch.Tensor], seed: int = 0) -> None:
        """Initialise each codebook's input embedding from the tokenizer's code vectors.

        The vectors (K_c, e) are mapped to ``dim`` by a fixed random projection and
        scaled to the default embedding scale, so codes close in the tokenizer's
        latent space start close here. Needs whole-code embeddings (not factorised).
        """
        if any(len(r) != 1 for r in self.radices):
            raise ValueError("init_embeddings_from needs one embedding per codebook (factorised=False)")
        init_embeddings(self.embed, code_vectors, seed)

    # -- the network -----------------------------------------------------------------------
    def forward(
        self,
        codes: torch.Tensor | None,
        labels: torch.Tensor | None = None,
        mask: torch.Tensor | None = None,
        causal: bool = False,
        cache: KVCache | None = None,
        start: int = 0,
        batch_size: int | None = None,
    ) -> torch.Tensor:
        """Hidden states of the prefix followed by ``codes``.

        Args:
            codes: (B, L, num_codebooks) tokens at raster positions ``start ..``; None for the prefix alone.
            labels: (B,) classes in [0, num_classes]; None: no class.
            mask: (B, L) bool, True where the token is hidden (replaced by the mask embedding).
            causal: causal attention (autoregressive).
            cache: a :class:`~tokenizers_q.kv.KVCache` for incremental decoding, empty at first; once filled,
                calls continue the cached sequence (no prefix again) with ``codes`` at raster position ``start``.
            batch_size: needed only when ``codes`` is None and ``labels`` is None.
        """
        parts = []
        continuing = cache is not None and cache.num_tokens > 0
        if not continuing and start != 0:
            raise ValueError(f"start={start} continues a sequence: pass the cache filled by the earlier calls")
        if not continuing:
            b = codes.shape[0] if codes is not None else (labels.shape[0] if labels is not None else batch_size)
            if labels is None:
                labels = torch.full((b,), self.num_classes, dtype=torch.long, device=self.prefix.weight.device)
            elif labels.min() < 0 or labels.max() > self.num_classes:
                raise ValueError(f"labels must be in [0, {self.num_classes}], got {labels.min()}..{labels.max()}")
            parts.append(self.prefix(labels).unsqueeze(1))
        if codes is not None:
            length = codes.shape[1]
            if start + length > self.seq_len:
                raise ValueError(f"{start + length} tokens exceed the grid {self.grid} ({self.seq_len} positions)")
            x = self.embed_codes(codes)
            if mask is not None:
                x = torch.where(mask.unsqueeze(-1), self.mask_embed.to(x.dtype), x)
            parts.append(x + self.positions(start, length))
        x = torch.cat(parts, 1)
        for i, block in enumerate(self.blocks):
            x = block(x, causal, None if cache is None else cache[i])
        return self.norm(x)

    def logits(self, hidden: torch.Tensor) -> list[torch.Tensor]:
        """One (B, L, radix) logit tensor per digit."""
        return [head(hidden) for head in self.heads]

    def log_prob(self, logits: list[torch.Tensor], codes: torch.Tensor) -> torch.Tensor:
        """Log-probability (nats) of each token under the factorised heads. Shapes: -> (B, L)."""
        digits = codes_to_digits(codes, self.radices)
        return sum(
            torch.gather(F.log_softmax(lg.float(), -1), -1, digits[..., i : i + 1]).squeeze(-1)
            for i, lg in enumerate(logits)
        )

    def sample(self, logits: list[torch.Tensor], temperature: float = 1.0, top_k: int = 0) -> torch.Tensor:
        """Draw tokens (B, L, num_codebooks) from the heads; ``temperature == 0`` is greedy."""
        digits = []
        for lg in logits:
            lg = lg.float()
            if temperature == 0:
                digits.append(lg.argmax(-1))
                continue
            if 0 < top_k < lg.shape[-1]:
                kth = lg.topk(top_k, -1).values[..., -1:]
                lg = lg.masked_fill(lg < kth, float("-inf"))
            probs = F.softmax(lg / temperature, -1)
            digits.append(torch.multinomial(probs.reshape(-1, probs.shape[-1]), 1).view(probs.shape[:-1]))
        return digits_to_codes(torch.stack(digits, -1), self.radices)
