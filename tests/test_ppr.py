"""Top-k personalised PageRank: the exact series against a dense reference, pruning, memory, padding, errors."""

import os
from pathlib import Path

import pytest
import torch

pytest.importorskip("torch_geometric")

from tokenizers_q.models.ppr import ppr_topk  # noqa: E402


def random_graph(n: int, degree: int, seed: int = 0, directed: bool = False) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    src, dst = torch.randint(0, n, (2, n * degree // 2), generator=g)
    edges = torch.stack([src, dst]) if directed else torch.stack([torch.cat([src, dst]), torch.cat([dst, src])])
    return torch.unique(edges[:, edges[0] != edges[1]], dim=1)


def dense_ppr(edge_index: torch.Tensor, n: int, alpha: float) -> torch.Tensor:
    adjacency = torch.zeros(n, n, dtype=torch.float64)
    adjacency[edge_index[0], edge_index[1]] = 1.0
    isolated = adjacency.sum(1) == 0
    adjacency[isolated, isolated] = 1.0  # walkers stay on nodes without out-edges
    walk = adjacency / adjacency.sum(1, keepdim=True)
    return alpha * torch.linalg.inv(torch.eye(n, dtype=torch.float64) - (1 - alpha) * walk)


# -- PPR ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("directed", [False, True])
def test_ppr_exact_mode_matches_dense_reference(directed):
    n, k = 50, 6
    edges = random_graph(n, 4, directed=directed)
    pi = dense_ppr(edges, n, 0.2)
    index, score = ppr_topk(edges, n, k=k, alpha=0.2, width=n, num_iterations=300)
    pi.fill_diagonal_(-1.0)
    expected = pi.topk(k, dim=1).values.float()
    found = index >= 0
    assert torch.allclose(score[found], expected[found], atol=1e-5)  # the best scores, in order
    chosen = torch.gather(pi, 1, index.clamp_min(0)).float()
    assert torch.allclose(chosen[found], score[found], atol=1e-5)  # and they belong to the nodes returned
    assert (expected[~found] <= 1e-12).all()  # padding only where fewer nodes are reachable


def test_ppr_default_pruning_keeps_the_top_mass():
    n, k = 600, 16
    edges = random_graph(n, 10, seed=1)
    pi = dense_ppr(edges, n, 0.15).fill_diagonal_(-1.0)
    index, _ = ppr_topk(edges, n, k=k)
    captured = torch.gather(pi, 1, index).sum() / pi.topk(k, dim=1).values.sum()
    assert captured > 0.99


@pytest.mark.skipif(not Path("/proc/self/statm").exists(), reason="reads the resident set from /proc")
def test_ppr_memory_does_not_grow_with_the_batches():
    """torch's CSR x CSR product on the CPU never frees part of its result (12 bytes per output entry, 120 MB
    per batch of 2048 sources at 20k nodes before): the resident set after a second run must match the first."""

    def resident_mb() -> float:
        return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20

    edges = random_graph(3000, 10, seed=2)
    ppr_topk(edges, 3000, k=16, batch_size=250)  # warm: the allocator's arenas
    before = resident_mb()
    ppr_topk(edges, 3000, k=16, batch_size=250)
    assert resident_mb() - before < 40  # with the leak: +180 MB over these 12 batches


def test_ppr_isolated_nodes_and_padding():
    edges = torch.tensor([[0, 1, 1, 2], [1, 0, 2, 1]])  # path 0-1-2, node 3 isolated
    index, score = ppr_topk(edges, 4, k=3)
    assert index[3].tolist() == [-1, -1, -1] and score[3].tolist() == [0.0, 0.0, 0.0]
    assert index[0, 0].item() == 1 and index[0, 1].item() == 2 and index[0, 2].item() == -1
    assert (score[0, :2] > 0).all() and score[0, 0] > score[0, 1]
    with_self, _ = ppr_topk(edges, 4, k=1, include_self=True)
    assert with_self[:, 0].tolist() == [1, 1, 1, 3]  # node 0's only neighbour outranks node 0 itself


def test_ppr_bad_input():
    with pytest.raises(ValueError, match=r"node 5, outside \[0, 5\)"):
        ppr_topk(torch.tensor([[0, 1], [1, 5]]), 5)
    with pytest.raises(TypeError, match="integer tensor"):
        ppr_topk(torch.tensor([[0.0, 1.0], [1.0, 0.0]]), 2)
    with pytest.raises(ValueError, match=r"shape \(2, E\)"):
        ppr_topk(torch.tensor([0, 1]), 2)
    with pytest.raises(ValueError, match="k must be a positive int"):
        ppr_topk(torch.tensor([[0], [1]]), 2, k=0)
    with pytest.raises(ValueError, match="alpha must be in"):
        ppr_topk(torch.tensor([[0], [1]]), 2, alpha=1.5)
    with pytest.raises(ValueError, match="width must be an int >= 5, got 3"):
        ppr_topk(torch.tensor([[0], [1]]), 2, k=4, width=3)
