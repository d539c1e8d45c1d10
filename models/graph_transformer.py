"""A transformer over node tokens: each node reads its own codes and those of its top-k PPR neighbours."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from tokenizers_q.checks import check_int
from tokenizers_q.models.token_transformer import init_embeddings


class GraphTransformer(nn.Module):
    r"""Node classification from discrete node tokens (GQT stage 2).

    A node's sequence is itself followed by its ``num_neighbours`` highest-PPR
    neighbours; every node contributes one token per codebook (RVQ level). A token's
    embedding is the sum of its code's embedding (one table per codebook), a
    codebook embedding and a rank embedding (0 = the node itself, r = the r-th
    neighbour), optionally multiplied by a per-channel gate computed from the
    neighbour's PPR score (token modulation by structure). Pre-norm transformer
    layers mix the tokens; attention pooling makes the node representation; a
    linear head classifies it.

    Args:
        codebook_sizes: codes per codebook, e.g. ``[256, 256, 256]`` for 3 RVQ levels.
        num_classes: output classes.
        num_neighbours: PPR neighbours per node (sequence = 1 + num_neighbours nodes).
        dim: model width. Default: 128.
        depth: transformer layers. Default: 2.
        num_heads: attention heads. Default: 4.
        mlp_ratio: feed-forward width over ``dim``. Default: 2.
        dropout: Default: 0.1.
        gating: multiply neighbour tokens by a gate from their PPR score. Default: True.
        feature_dim: read each node's own features too, projected by a two-layer MLP into one more token (the
            ego token, as GQT's released transformer does), whose output joins the pooled one: on heterophilous
            graphs, where neighbours are of other classes, the node's features are what tells its class.
            Default: None (codes only).
        ego_dropout: dropout on the node's features and inside the ego token's MLP (what a feature MLP needs
            on noisy features; 0.5 on the heterophilous benchmarks). Default: 0.
        token_dropout: in training, hide each code token with this probability (as padding; the ego token, or
            without one the node's own codes, stay): node codes are near-unique, so without it a transformer
            can memorise training nodes by their codes. Default: 0.

    Shapes:
        - codes: (B, 1 + num_neighbours, num_codebooks) int64 (any value where ``valid`` is False)
        - scores: (B, 1 + num_neighbours) float PPR scores (position 0, the node itself, is not gated)
        - valid: (B, 1 + num_neighbours) bool, False at padding (nodes with fewer neighbours)
        - features: (B, feature_dim) float, the nodes' own features (only with ``feature_dim``)
        - output: logits (B, num_classes)
    """

    def __init__(
        self,
        codebook_sizes: Sequence[int],
        num_classes: int,
        num_neighbours: int,
        dim: int = 128,
        depth: int = 2,
        num_heads: int = 4,
        mlp_ratio: float = 2.0,
        dropout: float = 0.1,
        gating: bool = True,
        feature_dim: int | None = None,
        token_dropout: float = 0.0,
        ego_dropout: float = 0.0,
    ):
        super().__init__()
        if not codebook_sizes:
            raise ValueError("codebook_sizes must list at least one codebook size, got none")
        for c, size in enumerate(codebook_sizes):
            check_int(f"codebook_sizes[{c}]", size)
        for name, value in (("num_classes", num_classes), ("dim", dim), ("depth", depth), ("num_heads", num_heads)):
            check_int(name, value)
        check_int("num_neighbours", num_neighbours, minimum=0)
        if dim % num_heads:
            raise ValueError(f"dim ({dim}) must be divisible by num_heads ({num_heads})")
        self.codebook_sizes, self.num_neighbours = list(codebook_sizes), num_neighbours
        self.embed = nn.ModuleList(nn.Embedding(k, dim) for k in codebook_sizes)
        self.codebook_embedding = nn.Parameter(torch.randn(len(codebook_sizes), dim) * 0.02)
        self.rank_embedding = nn.Parameter(torch.randn(1 + num_neighbours, dim) * 0.02)
        self.gate = nn.Sequential(nn.Linear(1, dim), nn.Sigmoid()) if gating else None
        self.feature_dim = None if feature_dim is None else check_int("feature_dim", feature_dim)
        if not 0.0 <= token_dropout < 1.0:
            raise ValueError(f"token_dropout must be in [0, 1), got {token_dropout}")
        self.token_dropout = token_dropout
        if not 0.0 <= ego_dropout < 1.0:
            raise ValueError(f"ego_dropout must be in [0, 1), got {ego_dropout}")
        self.ego_dropout = ego_dropout
        self.ego = None
        if feature_dim is not None:
            self.ego = nn.Sequential(
                nn.LayerNorm(feature_dim), nn.Linear(feature_dim, dim), nn.GELU(), nn.Linear(dim, dim)
            )
        layer = nn.TransformerEncoderLayer(
            dim, num_heads, int(dim * mlp_ratio), dropout, activation="gelu", batch_first=True, norm_first=True
        )
        self.blocks = nn.TransformerEncoder(layer, depth, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(dim)
        self.pool = nn.Linear(dim, 1)
        self.head = nn.Linear(dim, num_classes)
        for embed in self.embed:
            nn.init.normal_(embed.weight, std=0.02)

    def init_embeddings_from(self, code_vectors: Sequence[torch.Tensor], seed: int = 0) -> None:
        """Start the code embeddings from the tokenizer's code vectors (one (K_c, e) tensor per codebook)."""
        init_embeddings(self.embed, code_vectors, seed)

    def _ego_token(self, features: torch.Tensor) -> torch.Tensor:
        """The ego token of (B, feature_dim) features: the ego MLP, with ``ego_dropout`` on its input and hidden
        layer (functional, so checkpoints of models without it keep their parameter names)."""
        norm, first, activation, second = self.ego
        dropped = F.dropout(norm(features), self.ego_dropout, self.training)
        hidden = F.dropout(activation(first(dropped)), self.ego_dropout, self.training)
        return second(hidden)

    def _check(self, codes: torch.Tensor, scores: torch.Tensor, valid: torch.Tensor) -> None:
        length, width = 1 + self.num_neighbours, len(self.codebook_sizes)
        if codes.dim() != 3 or codes.shape[1:] != (length, width):
            raise ValueError(f"expected codes (B, {length}, {width}), got {tuple(codes.shape)}")
        if scores.shape != codes.shape[:2] or valid.shape != codes.shape[:2]:
            raise ValueError(
                f"scores {tuple(scores.shape)} and valid {tuple(valid.shape)} must both be {tuple(codes.shape[:2])}"
            )

    def forward(
        self, codes: torch.Tensor, scores: torch.Tensor, valid: torch.Tensor, features: torch.Tensor | None = None
    ) -> torch.Tensor:
        self._check(codes, scores, valid)
        if (features is None) != (self.ego is None):
            raise ValueError(
                f"this model reads node features of size {self.feature_dim}, none were given"
                if features is None
                else "node features were given to a model built without feature_dim"
            )
        if features is not None and features.shape != (codes.shape[0], self.feature_dim):
            raise ValueError(f"expected features ({codes.shape[0]}, {self.feature_dim}), got {tuple(features.shape)}")
        codes = torch.where(valid[..., None], codes, 0)
        tokens = torch.stack([embed(codes[..., c]) for c, embed in enumerate(self.embed)], dim=2)  # (B, S, C, dim)
        tokens = tokens + self.codebook_embedding + self.rank_embedding[:, None]
        if self.gate is not None:
            log_score = torch.log(scores.clamp_min(1e-6))[..., None]
            gate = self.gate(log_score)
            gate = torch.cat([torch.ones_like(gate[:, :1]), gate[:, 1:]], dim=1)  # the node itself is not gated
            tokens = tokens * gate[:, :, None]
        tokens = tokens.flatten(1, 2)  # (B, S * C, dim)
        padding = (~valid).repeat_interleave(len(self.embed), dim=1)
        if self.training and self.token_dropout:
            hidden = torch.rand(padding.shape, device=padding.device) < self.token_dropout
            if self.ego is None:
                hidden[:, : len(self.embed)] = False  # the node's own codes stay (with an ego token, that one does)
            padding = padding | hidden
        if self.ego is not None:  # the ego token first, never padding
            tokens = torch.cat([self._ego_token(features)[:, None], tokens], dim=1)
            padding = torch.cat([torch.zeros_like(padding[:, :1]), padding], dim=1)
        h = self.norm(self.blocks(tokens, src_key_padding_mask=padding))
        weights = self.pool(h).squeeze(-1).masked_fill(padding, float("-inf")).softmax(dim=-1)
        pooled = (weights[..., None] * h).sum(1)
        return self.head(pooled if self.ego is None else pooled + h[:, 0])  # the ego token's own output joins in
