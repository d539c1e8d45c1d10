"""Graphs for tokenizers: generated graphs, users' files read without running code, masks and splits."""

import re
import warnings

import pytest
import torch

pytest.importorskip("torch_geometric")

from torch_geometric.data import Data  # noqa: E402

from tokenizers_q.trainers.graph_data import (  # noqa: E402
    GraphDataModule,
    ba_house,
    contextual_sbm,
    edge_homophily,
    save_graph,
)


# -- graphs ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("homophily", [0.9, 0.2])
def test_contextual_sbm_has_the_set_homophily_and_is_seeded(homophily):
    graph = contextual_sbm(num_nodes=1000, num_classes=4, homophily=homophily, avg_degree=8, seed=3)
    assert abs(edge_homophily(graph.edge_index, graph.y) - homophily) < 0.03
    assert graph.is_undirected() and not graph.has_self_loops()
    assert abs(graph.num_edges / graph.num_nodes - 8) < 0.5
    again = contextual_sbm(num_nodes=1000, num_classes=4, homophily=homophily, avg_degree=8, seed=3)
    other = contextual_sbm(num_nodes=1000, num_classes=4, homophily=homophily, avg_degree=8, seed=4)
    assert torch.equal(graph.edge_index, again.edge_index) and torch.equal(graph.x, again.x)
    assert not torch.equal(graph.x, other.x)
    with pytest.raises(ValueError, match="homophily must be in"):
        contextual_sbm(homophily=1.5)


def test_ba_house_labels_come_from_structure_and_leave_the_rng_alone():
    state = torch.get_rng_state()
    graph = ba_house(num_base_nodes=60, num_motifs=10)
    assert torch.equal(torch.get_rng_state(), state)
    assert torch.bincount(graph.y).tolist() == [60, 20, 20, 10]
    assert torch.equal(graph.x, torch.ones(110, 10))
    assert torch.equal(ba_house(num_base_nodes=60, num_motifs=10).edge_index, graph.edge_index)


def test_graph_data_module_errors_on_bad_graphs(tmp_path):
    no_features = tmp_path / "no_x.pt"
    torch.save(Data(edge_index=torch.tensor([[0, 1], [1, 0]]), num_nodes=2), no_features)
    with pytest.raises(ValueError, match="no node features"):
        GraphDataModule(graph=str(no_features)).setup()
    out_of_range = tmp_path / "bad_edges.pt"
    torch.save(Data(x=torch.randn(3, 4), edge_index=torch.tensor([[0, 1], [1, 7]])), out_of_range)
    with pytest.raises(ValueError, match=r"node 7, outside \[0, 3\)"):
        GraphDataModule(graph=str(out_of_range)).setup()
    with pytest.raises(FileNotFoundError, match="no graph file"):
        GraphDataModule(graph=str(tmp_path / "missing.pt")).setup()
    with pytest.raises(ValueError, match="graph must be one of"):
        GraphDataModule(graph="cora")


def test_graph_data_module_keeps_a_users_masks(tmp_path):
    graph = contextual_sbm(num_nodes=40, seed=0)
    graph.train_mask = torch.arange(40) < 20
    graph.val_mask = (torch.arange(40) >= 20) & (torch.arange(40) < 30)
    graph.test_mask = torch.arange(40) >= 30
    path = tmp_path / "g.pt"
    torch.save(graph, path)
    data = GraphDataModule(graph=str(path))
    data.setup()
    assert torch.equal(data.data.train_mask, graph.train_mask) and data.num_features == 32
    in_memory = GraphDataModule(graph=graph)
    in_memory.setup()
    assert torch.equal(in_memory.data.x, graph.x) and in_memory.hparams.graph == "<in-memory Data>"
    with pytest.raises(ValueError, match="checkpoints do not keep: give graph="):
        GraphDataModule(**{k: v for k, v in in_memory.hparams.items()}).setup()


def test_a_split_that_leaves_out_classes_warns_naming_them(tmp_path):
    graph = contextual_sbm(num_nodes=40, num_classes=4, seed=0)
    graph.y = torch.arange(40) // 10  # nodes ordered by class, masks cut along that order
    graph.train_mask, graph.val_mask = torch.arange(40) < 20, (torch.arange(40) >= 20) & (torch.arange(40) < 30)
    graph.test_mask = torch.arange(40) >= 30
    torch.save(graph, tmp_path / "sorted.pt")
    with pytest.warns(UserWarning) as record:
        GraphDataModule(graph=str(tmp_path / "sorted.pt")).setup()
    messages = [str(w.message) for w in record]
    assert any(re.search(r"train nodes of .*sorted.pt hold no node of classes \[2, 3\] \(of 4", m) for m in messages)
    assert any("val nodes" in m and "[0, 1, 3]" in m for m in messages)
    assert any("test nodes" in m and "[0, 1, 2]" in m for m in messages)
    graph.train_mask = torch.arange(40) % 2 == 0  # every class in every split: no warning
    graph.val_mask, graph.test_mask = torch.arange(40) % 4 == 1, torch.arange(40) % 4 == 3
    torch.save(graph, tmp_path / "mixed.pt")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        GraphDataModule(graph=str(tmp_path / "mixed.pt")).setup()


class _Evil:
    """A pickle that creates a file when loaded with weights_only=False."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.mark.parametrize("wrap", ["dict", "object"])
def test_a_pickle_that_runs_code_is_refused(tmp_path, wrap):
    marker = tmp_path / "pwned"
    evil = _Evil(marker)
    path = tmp_path / "evil.pt"
    torch.save(
        {"x": torch.randn(3, 2), "edge_index": torch.tensor([[0], [1]]), "y": evil} if wrap == "dict" else evil, path
    )
    with pytest.raises(ValueError, match="evil.pt was refused: loading it would run code") as err:
        GraphDataModule(graph=str(path)).setup()
    assert not marker.exists()
    assert "save_graph(torch.load(" in str(err.value) and "evil.safetensors" in str(err.value)
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"PK not a torch file")
    with pytest.raises(ValueError, match="garbage.pt is not a readable torch.save file"):
        GraphDataModule(graph=str(garbage)).setup()


def test_the_refusal_gives_a_working_conversion_command(tmp_path):
    import datetime
    import re

    graph = contextual_sbm(num_nodes=30, num_features=4, seed=3)
    graph.created = datetime.date(2024, 1, 1)  # a class weights_only=True does not allow: a trusted file, refused
    path = tmp_path / "trusted.pt"
    torch.save(graph, path)
    with pytest.raises(ValueError, match="it needs datetime.date") as err:
        GraphDataModule(graph=str(path)).setup()
    code = re.search(r'python -c "(.*)"', str(err.value)).group(1)
    with pytest.warns(UserWarning, match=r"not written: \['created'\]"):
        exec(code, {})
    data = GraphDataModule(graph=str(tmp_path / "trusted.safetensors"))
    data.setup()
    assert torch.equal(data.data.x, graph.x) and torch.equal(data.data.y, graph.y)


def test_a_torch_saved_data_loads_with_weights_only(tmp_path, monkeypatch):
    graph = contextual_sbm(num_nodes=50, num_features=6, seed=1)
    graph.edge_attr = torch.randn(graph.num_edges, 3)
    torch.save(graph, tmp_path / "g.pt")
    torch.save(graph.to_dict(), tmp_path / "d.pth")
    calls = []
    load = torch.load
    monkeypatch.setattr(torch, "load", lambda *a, **kw: calls.append(kw.get("weights_only")) or load(*a, **kw))
    for name in ("g.pt", "d.pth"):
        data = GraphDataModule(graph=str(tmp_path / name))
        data.setup()
        assert torch.equal(data.data.x, graph.x) and torch.equal(data.data.edge_index, graph.edge_index)
        assert torch.equal(data.data.edge_attr, graph.edge_attr) and data.num_classes == 4
    assert calls == [True, True]


def test_a_safetensors_graph_round_trips(tmp_path):
    graph = contextual_sbm(num_nodes=80, num_features=5, seed=2)
    graph.train_mask = torch.arange(80) < 40
    graph.val_mask = (torch.arange(80) >= 40) & (torch.arange(80) < 60)
    graph.test_mask = torch.arange(80) >= 60
    graph.edge_weight = torch.rand(graph.num_edges)
    path = save_graph(graph, tmp_path / "sub" / "g.safetensors")
    data = GraphDataModule(graph=str(path))
    data.setup()
    for key in ("x", "edge_index", "y", "train_mask", "val_mask", "test_mask", "edge_weight"):
        assert torch.equal(data.data[key], graph[key]), key
    assert data.num_features == 5 and data.num_classes == 4 and data.hparams.graph == str(path)
    unlabelled = save_graph(Data(x=graph.x, edge_index=graph.edge_index.int()), tmp_path / "u.safetensors")
    data = GraphDataModule(graph=str(unlabelled))
    data.setup()  # no masks in the file: seeded random splits; int32 edges were stored as int64
    assert data.data.edge_index.dtype == torch.int64 and data.data.train_mask.sum() == 48
    with pytest.warns(UserWarning, match=r"not written: \['name'\]"):
        save_graph(Data(x=graph.x, edge_index=graph.edge_index, name="g"), tmp_path / "n.safetensors")


def test_bad_safetensors_graphs_name_the_tensor(tmp_path):
    from safetensors.torch import save_file

    good = {"x": torch.randn(4, 3), "edge_index": torch.tensor([[0, 1, 2], [1, 2, 3]]), "y": torch.arange(4)}
    cases = [
        (
            {"edge_index": torch.tensor([[0, 1], [1, 9]])},
            r"'edge_index' must be int64 \(2, E\).*node 9, outside \[0, 4\)",
        ),
        ({"edge_index": good["edge_index"].int()}, r"'edge_index' must be int64 \(2, E\).*got torch.int32"),
        ({"edge_index": good["edge_index"].T.contiguous()}, r"'edge_index' must be .*shape \(3, 2\)"),
        ({"x": None}, r"tensor 'x' is missing"),
        ({"x": torch.arange(4)}, r"'x' must be floating-point \(N, F\)"),
        ({"y": torch.arange(5)}, r"'y' must be int64 \(N,\).*shape \(5,\)"),
        ({"train_mask": torch.ones(4)}, r"'train_mask' must be bool \(N,\).*torch.float32"),
        ({"edge_attr": torch.randn(2, 1)}, r"'edge_attr' must be .*\(E, ...\).*E = 3"),
        ({"pos": torch.randn(4, 2)}, r"unknown tensors \['pos'\]"),
    ]
    for i, (change, message) in enumerate(cases):
        tensors = {k: v for k, v in {**good, **change}.items() if v is not None}
        path = tmp_path / f"bad{i}.safetensors"
        save_file(tensors, str(path))
        with pytest.raises(ValueError, match=rf"bad{i}.safetensors: .*{message}"):
            GraphDataModule(graph=str(path)).setup()
    (tmp_path / "corrupt.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(ValueError, match="corrupt.safetensors is not a readable safetensors file"):
        GraphDataModule(graph=str(tmp_path / "corrupt.safetensors")).setup()
    with pytest.raises(ValueError, match="'y' must be int64"):
        save_graph(Data(x=good["x"], edge_index=good["edge_index"], y=torch.rand(4)), tmp_path / "f.safetensors")
