"""Sampled subgraphs for mini-batch tokenizer training, and encoding large graphs by sparse products."""

import pytest
import torch

pytest.importorskip("torch_geometric")

from torch_geometric.data import Data  # noqa: E402
from torch_geometric.utils import k_hop_subgraph  # noqa: E402

from tokenizers_q.models.neighbour_sampler import NeighbourSampler  # noqa: E402
from tokenizers_q.trainers.graph_data import GraphDataModule, contextual_sbm  # noqa: E402
from tokenizers_q.trainers.graph_tokenizer import GraphTokenizerModule  # noqa: E402

SMALL_RVQ = {"num_quantizers": 2, "codebook_size": 16}


def _edges(edge_index: torch.Tensor, num_nodes: int) -> set[int]:
    return set((edge_index[0] * num_nodes + edge_index[1]).tolist())


def test_a_subgraph_holds_seeds_first_and_only_graph_edges_into_earlier_hops():
    graph = contextual_sbm(num_nodes=400, num_features=4, seed=0)
    graph.edge_weight = torch.rand(graph.num_edges)
    seeds = torch.tensor([17, 3, 250, 99])
    sub = NeighbourSampler(graph, fanouts=(3, 2), generator=torch.Generator().manual_seed(0))(seeds)
    assert torch.equal(sub.n_id[:4], seeds) and sub.batch_size == 4
    assert len(torch.unique(sub.n_id)) == len(sub.n_id) == sub.num_nodes
    assert torch.equal(sub.x, graph.x[sub.n_id]) and torch.equal(sub.y, graph.y[sub.n_id])
    assert torch.equal(graph.edge_index[:, sub.e_id], sub.n_id[sub.edge_index])  # e_id names the same edges
    assert torch.equal(sub.edge_weight, graph.edge_weight[sub.e_id])
    assert _edges(sub.n_id[sub.edge_index], 400) <= _edges(graph.edge_index, 400)
    source, target = sub.edge_index
    assert (source > target).sum() > 0 and bool((target < sub.num_nodes).all())
    in_degree = torch.bincount(target, minlength=sub.num_nodes)
    assert int(in_degree[:4].max()) <= 3  # the seeds' fanout
    hop_one = sub.n_id[4 : 4 + len(torch.unique(source[target < 4]))]
    assert set(hop_one.tolist()) == set(sub.n_id[source[target < 4]].tolist()) - set(seeds.tolist())


def test_a_fanout_above_every_degree_gives_the_whole_k_hop_neighbourhood():
    graph = contextual_sbm(num_nodes=300, num_features=4, avg_degree=4, seed=1)
    seeds = torch.tensor([5, 6, 7])
    sub = NeighbourSampler(graph, fanouts=(1000, 1000))(seeds)
    nodes, edge_index, _, _ = k_hop_subgraph(seeds, 2, graph.edge_index, num_nodes=300)
    assert set(sub.n_id.tolist()) == set(nodes.tolist())
    # every in-edge of the seeds and of their in-neighbours, as a two-layer GNN reads them
    inner = set(sub.n_id[: sub.batch_size + int((sub.edge_index[1] < 3).sum())].tolist())
    wanted = {e for e in _edges(graph.edge_index, 300) if e % 300 in inner}
    assert _edges(sub.n_id[sub.edge_index], 300) == wanted


def test_draws_follow_the_generator_and_cover_the_neighbours():
    graph = contextual_sbm(num_nodes=200, num_features=4, avg_degree=30, seed=2)
    seeds = torch.arange(10)

    def sample(seed):
        return NeighbourSampler(graph, fanouts=(5,), generator=torch.Generator().manual_seed(seed))(seeds)

    assert torch.equal(sample(0).edge_index, sample(0).edge_index)
    assert not torch.equal(sample(0).n_id, sample(1).n_id)
    seen = set()
    for seed in range(60):  # draws reach every in-neighbour of node 0, not only the first ones
        sub = sample(seed)
        seen |= set(sub.n_id[sub.edge_index[0][sub.edge_index[1] == 0]].tolist())
    assert seen == set(graph.edge_index[0][graph.edge_index[1] == 0].tolist())


def test_sampler_errors_name_the_value():
    graph = contextual_sbm(num_nodes=50, num_features=4, seed=0)
    with pytest.raises(ValueError, match="fanouts must be a non-empty list"):
        NeighbourSampler(graph, fanouts=())
    with pytest.raises(ValueError, match="fanout must be"):
        NeighbourSampler(graph, fanouts=(3, 0))
    with pytest.raises(TypeError, match="expected a torch_geometric.data.Data"):
        NeighbourSampler({"x": graph.x})
    sampler = NeighbourSampler(graph)
    with pytest.raises(ValueError, match="seed node 50 is outside"):
        sampler([1, 50])
    with pytest.raises(ValueError, match="must be distinct"):
        sampler([1, 1])
    with pytest.raises(ValueError, match="no seed nodes"):
        sampler([])
    with pytest.raises(ValueError, match="fanouts must be a non-empty list"):
        GraphDataModule(batch_nodes=8, fanouts=[0])


def test_the_data_module_yields_subgraphs_around_every_node_once_an_epoch():
    data = GraphDataModule(num_nodes=300, num_features=4, batch_nodes=64, fanouts=[4, 4])
    batches = list(data.train_dataloader())
    assert len(batches) == 5 and all(b.batch_size <= 64 for b in batches)
    seeds = torch.cat([b.n_id[: b.batch_size] for b in batches])
    assert sorted(seeds.tolist()) == list(range(300))
    val = list(data.val_dataloader())
    val_seeds = torch.cat([b.n_id[: b.batch_size] for b in val])
    assert torch.equal(val_seeds, torch.nonzero(data.data.val_mask).flatten())
    assert all(torch.equal(b.val_mask, data.data.val_mask[b.n_id]) for b in val)
    whole = GraphDataModule(num_nodes=300, num_features=4).train_dataloader()
    assert [b.num_nodes for b in whole] == [300]


def test_a_tokenizer_trains_on_sampled_subgraphs_with_a_real_trainer(tmp_path):
    import copy

    import lightning as L

    settings = {"num_nodes": 600, "num_features": 8, "homophily": 0.9, "feature_noise": 1.0}
    data = GraphDataModule(**settings, batch_nodes=100, fanouts=[5, 5])
    graph = contextual_sbm(**settings)
    torch.manual_seed(0)
    module = GraphTokenizerModule(in_dim=8, hidden_dim=32, latent_dim=16, quantizer_kwargs=SMALL_RVQ, lr=3e-3)
    untrained = copy.deepcopy(module)
    sizes = []

    class Record(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            sizes.append((batch.num_nodes, batch.batch_size))

    trainer = L.Trainer(
        max_steps=60,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        limit_val_batches=0,
        default_root_dir=tmp_path,
        callbacks=[Record()],
    )
    trainer.fit(module, data)
    assert len(sizes) == 60 and all(n < 600 and b <= 100 for n, b in sizes)  # subgraphs, never the whole graph

    def whole_graph_loss(tokenizer):
        torch.manual_seed(1)  # the same masks and corruptions for both
        return tokenizer.train()._loss_terms(graph)[0]["loss"].item()

    assert whole_graph_loss(module) < 0.8 * whole_graph_loss(untrained)
    assert module.encode(graph).shape == (600, 2)


@pytest.mark.parametrize("conv", ["gcn", "sage", "gat"])
def test_encoding_by_sparse_products_equals_message_passing(conv):
    graph = contextual_sbm(num_nodes=300, num_features=8, seed=0)
    loops_and_repeats = {
        "simple": graph.edge_index,
        "self-loops": torch.cat([graph.edge_index, torch.tensor([[0, 4], [0, 4]])], 1),
        "repeated edges": torch.cat([graph.edge_index, graph.edge_index[:, :40]], 1),
    }
    tokenizer = GraphTokenizerModule(in_dim=8, hidden_dim=16, latent_dim=8, conv=conv, quantizer_kwargs=SMALL_RVQ)
    tokenizer.eval()
    for name, edge_index in loops_and_repeats.items():
        data = Data(x=graph.x, edge_index=edge_index)
        with torch.no_grad():
            by_edges = tokenizer.encoder(graph.x, edge_index)
            used = tokenizer._adjacency(data)
            by_product = tokenizer.encoder(graph.x, used)
        torch.testing.assert_close(by_product, by_edges, atol=1e-5, rtol=1e-5, msg=name)
        sparse = conv != "gat" and name != "repeated edges"
        assert used.layout == (torch.sparse_csr if sparse else torch.strided), name
        assert torch.equal(tokenizer.encode(data), tokenizer.quantizer.encode(by_product))


def test_the_losses_of_a_sampled_subgraph_score_its_seeds_only():
    from tokenizers_q.models.graph_ssl import LatentPrediction, MaskedFeatureReconstruction, scaled_cosine_error

    torch.manual_seed(0)
    graph = contextual_sbm(num_nodes=50, num_features=6, seed=0)
    tokenizer = GraphTokenizerModule(in_dim=6, hidden_dim=8, latent_dim=8, quantizer_kwargs=SMALL_RVQ)
    latent = torch.randn(50, 8)
    bgrl: LatentPrediction = tokenizer.bgrl
    with torch.no_grad():
        target = bgrl.teacher.eval()(graph.x, graph.edge_index)[:5]
        expected = 2 - 2 * torch.nn.functional.cosine_similarity(bgrl.predictor(latent[:5]), target).mean()
    bgrl.eval()
    torch.testing.assert_close(bgrl.loss(latent, graph.x, graph.edge_index, scored=5), expected)
    mae: MaskedFeatureReconstruction = tokenizer.mae.eval()
    mask = torch.arange(50) % 2 == 0
    masked = torch.where(mask[:, None], mae.remask_token, latent)
    reconstruction = mae.decoder(masked, graph.edge_index)[:5]
    first = scaled_cosine_error(reconstruction[mask[:5]], graph.x[:5][mask[:5]], mae.gamma)
    rest = scaled_cosine_error(reconstruction[~mask[:5]], graph.x[:5][~mask[:5]], mae.gamma)
    got = mae.loss(latent, graph.x, graph.edge_index, mask, scored=5)
    torch.testing.assert_close(got, first + mae.visible_weight * rest)
    assert not torch.allclose(got, mae.loss(latent, graph.x, graph.edge_index, mask))  # None: every node
