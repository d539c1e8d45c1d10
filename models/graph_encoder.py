"""A GNN node encoder on torch_geometric: GCN, GAT or GraphSAGE layers with residuals and normalisation."""

from __future__ import annotations

import torch
from torch import nn
from torch_geometric.nn import GATConv, GCNConv, SAGEConv
from torch_geometric.nn.conv.gcn_conv import gcn_norm

from tokenizers_q.checks import check_choice, check_int

CONVS = ("gcn", "gat", "sage")
ENCODERS = (*CONVS, "hops")  # "hops": HopEncoder, the propagation steps kept apart
NORMS = ("batch", "layer", "none")


def graph_conv(kind: str, in_dim: int, out_dim: int, heads: int = 4) -> nn.Module:
    """One message-passing layer ``(x (N, in_dim), edge_index (2, E)) -> (N, out_dim)``."""
    check_choice("conv", kind, CONVS)
    if kind == "gcn":
        return GCNConv(in_dim, out_dim)
    if kind == "sage":
        return SAGEConv(in_dim, out_dim)
    check_int("heads", heads)
    if out_dim % heads:
        raise ValueError(f"GAT output size {out_dim} must be divisible by heads={heads}")
    return GATConv(in_dim, out_dim // heads, heads=heads)


def _norm(kind: str, dim: int) -> nn.Module:
    check_choice("norm", kind, NORMS)
    if kind == "batch":
        return nn.BatchNorm1d(dim)
    if kind == "layer":
        return nn.LayerNorm(dim)
    return nn.Identity()


class GNNEncoder(nn.Module):
    r"""Stacked message passing: input projection, then ``num_layers`` blocks of
    ``conv -> norm -> activation -> dropout`` with a residual connection, then an output projection.

    The residual path keeps each node's own features in its representation, which
    matters on heterophilous graphs where neighbours carry other classes.

    Args:
        in_dim: node feature size.
        hidden_dim: size of every hidden layer. Default: 128.
        out_dim: output size (the quantizer's ``dim``). Default: ``hidden_dim``.
        num_layers: message-passing layers. Default: 2.
        conv: ``"gcn"``, ``"gat"`` or ``"sage"``. Default: ``"gcn"``.
        heads: attention heads of GAT layers. Default: 4.
        norm: ``"batch"``, ``"layer"`` or ``"none"``. Default: ``"batch"``.
        residual: add each block's input to its output. Default: True.
        dropout: after each block. Default: 0.1.

    Shapes:
        - x: (N, in_dim) float; edge_index: (2, E) int64
        - output: (N, out_dim)
    """

    def __init__(
        self,
        in_dim: int,
        hidden_dim: int = 128,
        out_dim: int | None = None,
        num_layers: int = 2,
        conv: str = "gcn",
        heads: int = 4,
        norm: str = "batch",
        residual: bool = True,
        dropout: float = 0.1,
    ):
        super().__init__()
        for name, value in (("in_dim", in_dim), ("hidden_dim", hidden_dim), ("num_layers", num_layers)):
            check_int(name, value)
        check_choice("conv", conv, CONVS)
        check_choice("norm", norm, NORMS)
        self.in_dim, self.out_dim = in_dim, out_dim or hidden_dim
        self.input = nn.Linear(in_dim, hidden_dim)
        self.convs = nn.ModuleList(graph_conv(conv, hidden_dim, hidden_dim, heads) for _ in range(num_layers))
        self.norms = nn.ModuleList(_norm(norm, hidden_dim) for _ in range(num_layers))
        self.output = nn.Linear(hidden_dim, self.out_dim)
        self.residual, self.dropout = residual, nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, edge_index: torch.Tensor) -> torch.Tensor:
        if x.dim() != 2 or x.shape[1] != self.in_dim:
            raise ValueError(f"expected node features (N, {self.in_dim}), got {tuple(x.shape)}")
        h = self.input(x)
        for conv, norm in zip(self.convs, self.norms):
            out = self.dropout(torch.relu(norm(conv(h, edge_index))))
            h = h + out if self.residual else out
        return self.output(h)


def propagate(x: torch.Tensor, edge_index: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``A x`` for the sparse matrix of ``edge_index`` (source, target) and ``weight``: each target sums its
    sources' rows. Shapes: x (N, F), edge_index (2, E), weight (E,); output (N, F)."""
    source, target = edge_index
    return torch.zeros_like(x).index_add_(0, target, x[source] * weight[:, None])


class HopEncoder(nn.Module):
    r"""Propagation steps kept apart (NAGphormer / H2GCN / SIGN style): the channels ``X, ÂX, ..., Â^h X`` and
    the high-pass ``(I - Â) X`` (``Â`` the GCN-normalised adjacency with self-loops) each go through their own
    MLP to ``out_dim / channels`` outputs, concatenated in that order.

    A node's own features stay in a channel of their own, which on heterophilous graphs (neighbours of other
    classes) no neighbourhood average can blur; with a product quantizer of one group per channel
    (``quantizer: pq, num_groups: channels``) every channel gets a code of its own.

    Args:
        in_dim: node feature size.
        hidden_dim: hidden size of every channel's MLP. Default: 128.
        out_dim: output size, divisible by the number of channels. Default: ``hidden_dim``.
        num_hops: propagation steps ``h``. Default: 2.
        high_pass: add the ``(I - Â) X`` channel. Default: True.
        norm: ``"batch"``, ``"layer"`` or ``"none"``. Default: ``"batch"``.
        dropout: inside every MLP. Default: 0.1.

    Shapes:
        - x: (N, in_dim) float; edge_index: (2, E) int64
        - output: (N, out_dim), channel ``c`` in columns ``c * out_dim / channels`` onwards
    """

    def __init__(
        self,
        in_dim: int,
        hidden_dim: int = 128,
        out_dim: int | None = None,
        num_hops: int = 2,
        high_pass: bool = True,
        norm: str = "batch",
        dropout: float = 0.1,
    ):
        super().__init__()
        for name, value in (("in_dim", in_dim), ("hidden_dim", hidden_dim), ("num_hops", num_hops)):
            check_int(name, value)
        check_choice("norm", norm, NORMS)
        self.in_dim, self.out_dim = in_dim, out_dim or hidden_dim
        self.num_hops, self.high_pass = num_hops, high_pass
        self.channels = num_hops + 1 + high_pass
        if self.out_dim % self.channels:
            raise ValueError(f"out_dim {self.out_dim} must be divisible by the {self.channels} channels of HopEncoder")
        part = self.out_dim // self.channels
        self.mlps = nn.ModuleList(
            nn.Sequential(
                nn.Linear(in_dim, hidden_dim),
                _norm(norm, hidden_dim),
                nn.GELU(),
                nn.Dropout(dropout),
                nn.Linear(hidden_dim, part),
            )
            for _ in range(self.channels)
        )

    def forward(self, x: torch.Tensor, edge_index: torch.Tensor) -> torch.Tensor:
        if x.dim() != 2 or x.shape[1] != self.in_dim:
            raise ValueError(f"expected node features (N, {self.in_dim}), got {tuple(x.shape)}")
        edges, weight = gcn_norm(edge_index, None, x.shape[0], add_self_loops=True, dtype=x.dtype)
        hops = [x]
        for _ in range(self.num_hops):
            hops.append(propagate(hops[-1], edges, weight))
        if self.high_pass:
            hops.append(x - hops[1])
        return torch.cat([mlp(h) for mlp, h in zip(self.mlps, hops)], -1)
