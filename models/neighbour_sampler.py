"""Sampled subgraphs around batches of seed nodes (GraphSAGE-style neighbour sampling), for training
graph tokenizers on graphs whose full-batch activations do not fit in memory.

torch_geometric's ``NeighborLoader`` needs pyg-lib or torch-sparse; this sampler is plain torch, vectorised
over the whole frontier of a hop.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch_geometric.data import Data

from tokenizers_q.checks import check_int
from tokenizers_q.models.ppr import check_edge_index


class NeighbourSampler:
    r"""Subgraphs of seed nodes and, hop by hop, up to ``fanouts[h]`` sampled in-neighbours of every node
    the previous hop added.

    The in-edges are held once in CSR order (edges sorted by target). A node with at most ``fanout``
    in-neighbours keeps them all; one with more gets ``fanout`` draws with replacement, duplicates merged
    (so up to ``fanout``). Nodes are relabelled with the seeds first, in the order given, then each hop's
    new nodes; the sampled edges point from neighbour to node, as message passing reads them. Node-level
    attributes of the graph (``x``, ``y``, masks) are sliced to the subgraph's nodes, edge-level ones to its
    edges. Call it on node ids, or give it as a ``DataLoader``'s ``collate_fn`` over node ids, as PyG's
    ``NeighborLoader`` does.

    Args:
        data: the graph, a PyG ``Data`` with ``edge_index`` (source, target).
        fanouts: in-neighbours drawn per node at each hop; as many hops as the GNN has layers. Default: (10, 10).
        generator: the random generator of the draws. Default: torch's global one.

    Shapes:
        - seeds: (B,) distinct node ids (a tensor or a list of ints)
        - output: ``Data`` with x (n, F), edge_index (2, e) in subgraph ids, ``n_id`` (n,) the nodes' ids in
          the graph (the first B are the seeds), ``e_id`` (e,) the edges' ids, ``batch_size`` = B
    """

    def __init__(self, data: Data, fanouts: Sequence[int] = (10, 10), generator: torch.Generator | None = None) -> None:
        if not isinstance(data, Data):
            raise TypeError(f"expected a torch_geometric.data.Data graph, got {type(data).__name__}")
        if isinstance(fanouts, int) or not fanouts:
            raise ValueError(f"fanouts must be a non-empty list of in-neighbours per hop, got {fanouts!r}")
        for fanout in fanouts:
            check_int("fanout", fanout)
        self.num_nodes = data.num_nodes
        check_edge_index(data.edge_index, self.num_nodes)
        self.data, self.fanouts, self.generator = data, tuple(fanouts), generator
        source, target = data.edge_index
        self.edge_order = torch.argsort(target, stable=True)  # CSR position -> edge id
        self.sources, self.targets = source[self.edge_order], target[self.edge_order]
        self.rowptr = torch.zeros(self.num_nodes + 1, dtype=torch.long)
        self.rowptr[1:] = torch.cumsum(torch.bincount(target, minlength=self.num_nodes), 0)
        self._position = torch.full((self.num_nodes,), -1, dtype=torch.long)  # graph id -> subgraph id

    def _draw(self, frontier: torch.Tensor, fanout: int) -> torch.Tensor:
        """CSR positions of the in-edges drawn for every node of ``frontier``."""
        start = self.rowptr[frontier]
        degree = self.rowptr[frontier + 1] - start
        take = degree.clamp(max=fanout)
        owner = torch.repeat_interleave(torch.arange(len(frontier)), take)
        rank = torch.arange(len(owner)) - (torch.cumsum(take, 0) - take)[owner]
        draw = (torch.rand(len(owner), generator=self.generator) * degree[owner]).long()
        offset = torch.where(degree[owner] <= fanout, rank, draw)
        return torch.unique(start[owner] + offset)  # merges repeated draws of an edge

    def __call__(self, seeds: torch.Tensor | Sequence[int]) -> Data:
        seeds = torch.as_tensor(seeds, dtype=torch.long).flatten()
        if not len(seeds):
            raise ValueError("no seed nodes given")
        low, high = int(seeds.min()), int(seeds.max())
        if low < 0 or high >= self.num_nodes:
            raise ValueError(f"seed node {low if low < 0 else high} is outside [0, {self.num_nodes}) nodes")
        if len(torch.unique(seeds)) != len(seeds):
            raise ValueError(f"seed nodes must be distinct, got {len(seeds)} ids of {len(torch.unique(seeds))} nodes")
        position, nodes, edges = self._position, [seeds], []
        position[seeds] = torch.arange(len(seeds))
        count, frontier = len(seeds), seeds
        try:
            for fanout in self.fanouts:
                drawn = self._draw(frontier, fanout)
                sources = self.sources[drawn]
                frontier = torch.unique(sources[position[sources] < 0])
                position[frontier] = torch.arange(count, count + len(frontier))
                count += len(frontier)
                nodes.append(frontier)
                edges.append(drawn)
            n_id, drawn = torch.cat(nodes), torch.cat(edges)
            edge_index = torch.stack([position[self.sources[drawn]], position[self.targets[drawn]]])
        finally:
            position[torch.cat(nodes)] = -1
        e_id = self.edge_order[drawn]
        subgraph = Data(edge_index=edge_index, n_id=n_id, e_id=e_id, batch_size=len(seeds), num_nodes=len(n_id))
        for key, value in self.data.items():
            if key == "edge_index" or not isinstance(value, torch.Tensor):
                continue
            if self.data.is_node_attr(key):
                subgraph[key] = value[n_id]
            elif self.data.is_edge_attr(key):
                subgraph[key] = value[e_id]
        return subgraph
