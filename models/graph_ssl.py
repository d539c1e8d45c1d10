"""Self-supervised objectives for graph tokenizers: masked feature reconstruction (GraphMAE),
Deep Graph Infomax and latent prediction against an EMA teacher (BGRL).

Each objective owns its extra parameters (decoder, discriminator, predictor) and
computes its loss from node representations that the tokenizer module provides,
so any encoder and any quantizer can sit in front of it.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

from tokenizers_q.models.graph_encoder import graph_conv


def scaled_cosine_error(prediction: torch.Tensor, target: torch.Tensor, gamma: float = 2.0) -> torch.Tensor:
    """GraphMAE's loss: ``mean((1 - cos(prediction, target))^gamma)``.

    Shapes:
        - prediction, target: (N, D)
        - output: () scalar
    """
    cos = F.cosine_similarity(prediction, target, dim=-1)
    return (1.0 - cos).pow(gamma).mean()


def mask_nodes(num_nodes: int, rate: float, device: torch.device) -> torch.Tensor:
    """A random boolean mask over nodes with ``round(rate * num_nodes)`` (at least one) set."""
    count = max(1, round(rate * num_nodes))
    mask = torch.zeros(num_nodes, dtype=torch.bool, device=device)
    mask[torch.randperm(num_nodes, device=device)[:count]] = True
    return mask


def drop_edges(edge_index: torch.Tensor, rate: float) -> torch.Tensor:
    """Keep each edge with probability ``1 - rate``. Shapes: (2, E) -> (2, E')."""
    if rate <= 0:
        return edge_index
    return edge_index[:, torch.rand(edge_index.shape[1], device=edge_index.device) >= rate]


class MaskedFeatureReconstruction(nn.Module):
    r"""GraphMAE: the encoder sees masked nodes' features replaced by a learned mask token;
    a one-layer GNN decoder reconstructs them from the (quantized) latents, with the
    masked nodes' latents re-masked, and the scaled cosine error scores the result.

    Args:
        in_dim: node feature size (the reconstruction target).
        latent_dim: size of the latents the decoder reads.
        conv: decoder layer type (see :func:`~tokenizers_q.models.graph_encoder.graph_conv`). Default: ``"gat"``.
        mask_rate: share of nodes masked per step. Default: 0.5.
        gamma: exponent of the scaled cosine error. Default: 2.
        visible_weight: weight of reconstructing the visible nodes' own features too (0: GraphMAE as
            published). Tokens then keep each node's own features, which heterophilous graphs need. Default: 1.
    """

    def __init__(
        self,
        in_dim: int,
        latent_dim: int,
        conv: str = "gat",
        mask_rate: float = 0.5,
        gamma: float = 2.0,
        visible_weight: float = 1.0,
    ):
        super().__init__()
        if not 0.0 < mask_rate < 1.0:
            raise ValueError(f"mask_rate must be in (0, 1), got {mask_rate}")
        if visible_weight < 0:
            raise ValueError(f"visible_weight must be >= 0, got {visible_weight}")
        self.mask_rate, self.gamma, self.visible_weight = mask_rate, gamma, visible_weight
        self.mask_token = nn.Parameter(torch.zeros(in_dim))
        self.remask_token = nn.Parameter(torch.zeros(latent_dim))
        self.decoder = graph_conv(conv, latent_dim, in_dim, heads=1)

    def mask(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Features with a random share of nodes replaced by the mask token, and that node mask (N,)."""
        mask = mask_nodes(x.shape[0], self.mask_rate, x.device)
        return torch.where(mask[:, None], self.mask_token.to(x.dtype), x), mask

    def loss(
        self,
        latent: torch.Tensor,
        x: torch.Tensor,
        edge_index: torch.Tensor,
        mask: torch.Tensor,
        scored: int | None = None,
    ):
        """Reconstruction error of the masked nodes' features from the latents of the masked graph,
        plus ``visible_weight`` times that of the visible nodes (from their own latents); only the first
        ``scored`` nodes count (the seeds of a sampled subgraph; None: all)."""
        latent = torch.where(mask[:, None], self.remask_token.to(latent.dtype), latent)
        reconstruction, x, mask = self.decoder(latent, edge_index)[:scored], x[:scored], mask[:scored]
        loss = (
            scaled_cosine_error(reconstruction[mask], x[mask], self.gamma) if mask.any() else reconstruction.sum() * 0
        )
        if self.visible_weight > 0 and not mask.all():
            loss = loss + self.visible_weight * scaled_cosine_error(reconstruction[~mask], x[~mask], self.gamma)
        return loss


class DeepGraphInfomax(nn.Module):
    r"""DGI: a bilinear discriminator tells each node's latent of the real graph from that of a
    corrupted graph (node features shuffled), both against the real graph's summary vector.

    Args:
        latent_dim: size of the node latents.

    The caller encodes the graph with ``corrupt(x)`` for the negatives.
    """

    def __init__(self, latent_dim: int):
        super().__init__()
        self.activation = nn.PReLU(latent_dim)  # DGI reads activations: their mean is an informative summary
        self.weight = nn.Parameter(torch.empty(latent_dim, latent_dim))
        nn.init.xavier_uniform_(self.weight)

    @staticmethod
    def corrupt(x: torch.Tensor) -> torch.Tensor:
        """Row-shuffled features: same marginal distribution, structure-feature pairing broken."""
        return x[torch.randperm(x.shape[0], device=x.device)]

    def loss(self, positive: torch.Tensor, negative: torch.Tensor) -> torch.Tensor:
        """Binary cross-entropy of the discriminator; latents (N, latent_dim) of the real and corrupted graph."""
        positive, negative = self.activation(positive), self.activation(negative)
        summary = torch.sigmoid(positive.mean(0))
        logits = torch.cat([positive @ (self.weight @ summary), negative @ (self.weight @ summary)])
        target = torch.cat([torch.ones(len(positive)), torch.zeros(len(negative))]).to(logits)
        return F.binary_cross_entropy_with_logits(logits, target)


class LatentPrediction(nn.Module):
    r"""BGRL: a predictor maps the online latents of one augmented view onto an EMA teacher's
    latents of another view (cosine loss; the teacher gets no gradient; the views are redrawn every step).

    Args:
        encoder: the online encoder; the teacher starts as its copy.
        latent_dim: size of the latents.
        hidden_dim: predictor width. Default: 2 * latent_dim.
        decay: EMA decay of the teacher. Default: 0.99.
        feature_drop: share of feature columns zeroed per view. Default: 0.2.
        edge_drop: share of edges dropped per view. Default: 0.2.
    """

    def __init__(
        self,
        encoder: nn.Module,
        latent_dim: int,
        hidden_dim: int | None = None,
        decay: float = 0.99,
        feature_drop: float = 0.2,
        edge_drop: float = 0.2,
    ):
        super().__init__()
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"decay must be in [0, 1), got {decay}")
        hidden_dim = hidden_dim or 2 * latent_dim
        self.predictor = nn.Sequential(nn.Linear(latent_dim, hidden_dim), nn.PReLU(), nn.Linear(hidden_dim, latent_dim))
        self.teacher = copy.deepcopy(encoder).requires_grad_(False)
        self.decay, self.feature_drop, self.edge_drop = decay, feature_drop, edge_drop

    def view(self, x: torch.Tensor, edge_index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """An augmented view: feature columns dropped, edges dropped."""
        keep = (torch.rand(x.shape[1], device=x.device) >= self.feature_drop).to(x.dtype)
        return x * keep, drop_edges(edge_index, self.edge_drop)

    def loss(
        self, online: torch.Tensor, x: torch.Tensor, edge_index: torch.Tensor, scored: int | None = None
    ) -> torch.Tensor:
        """Cosine loss between the predicted online latents and the teacher's latents of ``(x, edge_index)``,
        over the first ``scored`` nodes (None: all)."""
        with torch.no_grad():
            self.teacher.train(self.training)
            target = self.teacher(x, edge_index)[:scored]
        return 2.0 - 2.0 * F.cosine_similarity(self.predictor(online[:scored]), target, dim=-1).mean()

    @torch.no_grad()
    def update_teacher(self, encoder: nn.Module) -> None:
        """One EMA step of the teacher towards the online encoder (buffers are copied)."""
        for teacher, online in zip(self.teacher.parameters(), encoder.parameters()):
            teacher.lerp_(online, 1.0 - self.decay)
        for teacher, online in zip(self.teacher.buffers(), encoder.buffers()):
            teacher.copy_(online)
