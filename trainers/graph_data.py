"""Graphs for tokenizers: any PyG ``Data``, a generated contextual SBM, or the BA-house graph.

Node classification data sets are one graph with train / val / test node masks.
Every loader yields the whole graph (full-batch training; the masks say which
nodes a split scores), or with ``batch_nodes`` sampled subgraphs around batches of
nodes (:class:`~tokenizers_q.models.neighbour_sampler.NeighbourSampler`), for graphs
whose full-batch activations do not fit in memory.

A user's graph file is read without running code it holds: a safetensors graph (see :func:`save_graph`),
or a ``torch.save``-d ``Data`` / dict of tensors loaded with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import os
import pickle
import random
import re
import shlex
import warnings
from pathlib import Path

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader
from torch_geometric.data import Data
from torch_geometric.utils import coalesce, remove_self_loops, to_undirected

from tokenizers_q.checks import check_choice, check_int
from tokenizers_q.files import atomic_write
from tokenizers_q.models.neighbour_sampler import NeighbourSampler
from tokenizers_q.models.ppr import check_edge_index
from tokenizers_q.trainers.data import SPLITS

GRAPHS = ("csbm", "ba_house")
IN_MEMORY = "<in-memory Data>"  # what the hyper-parameters record for a Data given directly
GRAPH_FILES = (".safetensors", ".pt", ".pth")
# the tensors of a safetensors graph: name -> what it must be (N nodes of x, E edges of edge_index)
GRAPH_TENSORS = {
    "x": "floating-point (N, F) node features",
    "edge_index": "int64 (2, E) with values in [0, N)",
    "y": "int64 (N,) node labels",
    "train_mask": "bool (N,)",
    "val_mask": "bool (N,)",
    "test_mask": "bool (N,)",
    "edge_attr": "floating-point (E, ...) edge features",
    "edge_weight": "floating-point (E,) edge weights",
}


def contextual_sbm(
    num_nodes: int = 4000,
    num_classes: int = 4,
    homophily: float = 0.5,
    avg_degree: float = 10.0,
    num_features: int = 32,
    feature_noise: float = 4.0,
    seed: int = 0,
) -> Data:
    r"""A contextual stochastic block model with a set edge homophily.

    Balanced classes; each edge joins a uniformly drawn node to a node of its own
    class with probability ``homophily``, else to a node of another class; the
    graph is undirected without self-loops or duplicates. Features are the class
    mean (entries ~ N(0, 1)) plus Gaussian noise of standard deviation ``feature_noise``.
    Sampling edges directly scales to millions of nodes (PyG's
    ``stochastic_blockmodel_graph`` builds an N x N probability matrix).

    Shapes:
        - x: (N, num_features) float32; edge_index: (2, E) int64; y: (N,) int64
    """
    check_int("num_classes", num_classes, minimum=2)
    check_int("num_nodes", num_nodes, minimum=num_classes)  # at least one node per class
    check_int("num_features", num_features)
    if not 0.0 <= homophily <= 1.0:
        raise ValueError(f"homophily must be in [0, 1], got {homophily}")
    if avg_degree <= 0 or feature_noise < 0:
        raise ValueError(f"avg_degree must be > 0 and feature_noise >= 0, got {avg_degree} and {feature_noise}")
    g = torch.Generator().manual_seed(seed)
    y = torch.randperm(num_nodes, generator=g) % num_classes
    members = torch.argsort(y, stable=True)  # nodes grouped by class
    sizes = torch.bincount(y, minlength=num_classes)
    starts = torch.cumsum(sizes, 0) - sizes
    num_edges = round(num_nodes * avg_degree / 2)
    src = torch.randint(0, num_nodes, (num_edges,), generator=g)
    same = torch.rand(num_edges, generator=g) < homophily
    shift = torch.randint(1, num_classes, (num_edges,), generator=g)
    target_class = torch.where(same, y[src], (y[src] + shift) % num_classes)
    offset = (torch.rand(num_edges, generator=g) * sizes[target_class]).long()
    dst = members[starts[target_class] + offset]
    edge_index, _ = remove_self_loops(torch.stack([src, dst]))
    edge_index = coalesce(to_undirected(edge_index, num_nodes=num_nodes), num_nodes=num_nodes)
    means = torch.randn(num_classes, num_features, generator=g)
    x = means[y] + feature_noise * torch.randn(num_nodes, num_features, generator=g)
    return Data(x=x, edge_index=edge_index, y=y)


def ba_house(num_base_nodes: int = 300, num_motifs: int = 80, num_features: int = 10, seed: int = 0) -> Data:
    """PyG's BA-shapes graph: a Barabási-Albert base with "house" motifs attached; labels come from
    structure only (0: base, 1-3: house positions); features are constant ones."""
    from torch_geometric.datasets import ExplainerDataset
    from torch_geometric.datasets.graph_generator import BAGraph

    states = torch.get_rng_state(), np.random.get_state(), random.getstate()
    torch.manual_seed(seed), np.random.seed(seed), random.seed(seed)  # PyG draws from all three
    try:
        data = ExplainerDataset(BAGraph(num_base_nodes, 5), "house", num_motifs=num_motifs)[0]
    finally:
        torch.set_rng_state(states[0]), np.random.set_state(states[1]), random.setstate(states[2])
    return Data(x=torch.ones(data.num_nodes, num_features), edge_index=data.edge_index, y=data.y)


def edge_homophily(edge_index: torch.Tensor, y: torch.Tensor) -> float:
    """Share of edges joining nodes of the same class."""
    return (y[edge_index[0]] == y[edge_index[1]]).float().mean().item()


def check_graph(data: Data, need_labels: bool = False) -> Data:
    """Raise a clear error unless ``data`` is a node-feature graph the tokenizers can use."""
    if not isinstance(data, Data):
        raise TypeError(f"expected a torch_geometric.data.Data graph, got {type(data).__name__}")
    if data.x is None:
        raise ValueError("the graph has no node features (data.x is None): add features, e.g. constant ones")
    if data.x.dim() != 2 or not data.x.dtype.is_floating_point:
        raise ValueError(f"data.x must be float node features (N, F), got {data.x.dtype} of {tuple(data.x.shape)}")
    if data.edge_index is None:
        raise ValueError("the graph has no edges (data.edge_index is None)")
    check_edge_index(data.edge_index, data.x.shape[0])
    if need_labels and (data.y is None or data.y.shape[:1] != data.x.shape[:1]):
        got = None if data.y is None else tuple(data.y.shape)
        raise ValueError(f"node labels data.y of shape ({data.x.shape[0]},) are needed, got {got}")
    return data


def split_masks(num_nodes: int, val_fraction: float, test_fraction: float, seed: int) -> dict[str, torch.Tensor]:
    """Random disjoint boolean node masks ``{"train", "val", "test"}`` of the given shares."""
    if val_fraction < 0 or test_fraction < 0 or val_fraction + test_fraction >= 1:
        raise ValueError(f"val_fraction + test_fraction must be in [0, 1), got {val_fraction} + {test_fraction}")
    order = torch.randperm(num_nodes, generator=torch.Generator().manual_seed(seed))
    n_val, n_test = round(val_fraction * num_nodes), round(test_fraction * num_nodes)
    parts = {"val": order[:n_val], "test": order[n_val : n_val + n_test], "train": order[n_val + n_test :]}
    masks = {}
    for split, nodes in parts.items():
        masks[split] = torch.zeros(num_nodes, dtype=torch.bool)
        masks[split][nodes] = True
    return masks


def check_split_classes(labels: torch.Tensor, masks: dict[str, torch.Tensor], source: str = "the graph") -> None:
    """Warn, naming the classes, when the training nodes lack a class of ``labels`` or the validation or
    test nodes have none of one (its accuracy there is then unmeasured, or never learned); negative labels
    are unlabelled nodes.

    Shapes:
        - labels: (N,) int64; masks: {split: (N,) bool}
    """
    classes = torch.unique(labels[labels >= 0]).tolist()  # negative: unlabelled
    for split, mask in masks.items():
        present = set(torch.unique(labels[mask.bool()]).tolist())
        missing = [c for c in classes if c not in present]
        if missing:
            warnings.warn(
                f"the {split} nodes of {source} hold no node of classes {missing} (of {len(classes)} classes): "
                + ("the model never sees them in training" if split == "train" else f"{split} accuracy omits them")
                + "; give train/val/test masks of your own, or another split seed",
                UserWarning,
                stacklevel=2,
            )


def _check_graph_tensors(tensors: dict[str, torch.Tensor], source: str) -> None:
    """Raise a ValueError naming ``source`` and the tensor unless ``tensors`` make a graph of
    :data:`GRAPH_TENSORS`."""

    def bad(name: str, got: str) -> ValueError:
        return ValueError(f"{source}: tensor {name!r} must be {GRAPH_TENSORS[name]}, got {got}")

    unknown = sorted(set(tensors) - set(GRAPH_TENSORS))
    if unknown:
        raise ValueError(f"{source}: unknown tensors {unknown}; a graph file holds only {list(GRAPH_TENSORS)}")
    for name in ("x", "edge_index"):
        if name not in tensors:
            raise ValueError(f"{source}: tensor {name!r} is missing; it must be {GRAPH_TENSORS[name]}")
    described = {name: f"{t.dtype} of shape {tuple(t.shape)}" for name, t in tensors.items()}
    x, edge_index = tensors["x"], tensors["edge_index"]
    if not x.dtype.is_floating_point or x.dim() != 2 or x.shape[0] < 1:
        raise bad("x", described["x"] + ("" if x.shape[:1] != (0,) else " (no nodes)"))
    num_nodes = x.shape[0]
    if edge_index.dtype != torch.int64 or edge_index.dim() != 2 or edge_index.shape[0] != 2:
        raise bad("edge_index", described["edge_index"])
    if edge_index.numel():
        low, high = int(edge_index.min()), int(edge_index.max())
        if low < 0 or high >= num_nodes:
            raise bad("edge_index", f"node {low if low < 0 else high}, outside [0, {num_nodes}) (N = x.shape[0])")
    num_edges = edge_index.shape[1]
    for name, t in tensors.items():
        if name == "y":
            ok = t.dtype == torch.int64 and tuple(t.shape) == (num_nodes,)
        elif name.endswith("_mask"):
            ok = t.dtype == torch.bool and tuple(t.shape) == (num_nodes,)
        elif name == "edge_attr":
            ok = t.dtype.is_floating_point and t.dim() >= 1 and t.shape[0] == num_edges
        elif name == "edge_weight":
            ok = t.dtype.is_floating_point and tuple(t.shape) == (num_edges,)
        else:
            continue
        if not ok:
            raise bad(name, f"{described[name]} (N = {num_nodes}, E = {num_edges})")


def save_graph(data: Data, path: str | os.PathLike) -> Path:
    """Write a PyG ``Data`` as a safetensors graph that :class:`GraphDataModule` (``graph=path``) reads.

    Keeps the tensors of :data:`GRAPH_TENSORS` (integer ``edge_index`` / ``y`` are stored as int64) and
    warns about any other attribute, which is not written. The file is replaced atomically.
    """
    from safetensors.torch import save_file

    check_graph(data)
    tensors, dropped = {}, []
    for name, value in data.to_dict().items():
        if name not in GRAPH_TENSORS or not isinstance(value, torch.Tensor):
            if name != "num_nodes" or value != data.x.shape[0]:
                dropped.append(name)
            continue
        if name in ("edge_index", "y") and not value.dtype.is_floating_point and value.dtype != torch.bool:
            value = value.long()
        tensors[name] = value.detach().cpu().contiguous().clone()  # safetensors refuses tensors sharing memory
    _check_graph_tensors(tensors, f"save_graph({Path(path).name})")
    if dropped:
        warnings.warn(f"save_graph writes only {list(GRAPH_TENSORS)}; not written: {dropped}", stacklevel=2)
    return atomic_write(path, lambda tmp: save_file(tensors, tmp))


def _conversion_command(path: Path) -> str:
    code = (
        "import torch; from tokenizers_q.trainers.graph_data import save_graph; "
        f"save_graph(torch.load({str(path)!r}, weights_only=False), {str(path.with_suffix('.safetensors'))!r})"
    )
    return f'python -c "{code}"' if not set(code) & set('"$`\\!') else f"python -c {shlex.quote(code)}"


def _load_torch_graph(path: Path) -> Data | dict:
    """``torch.load(weights_only=True)``, allowing PyG's ``Data`` and what it pickles, nothing else."""
    from torch_geometric.data.data import DataEdgeAttr, DataTensorAttr
    from torch_geometric.data.storage import GlobalStorage

    allowed = [Data, DataEdgeAttr, DataTensorAttr, GlobalStorage]
    try:
        if hasattr(torch.serialization, "safe_globals"):  # torch >= 2.5: only for this load
            with torch.serialization.safe_globals(allowed):
                return torch.load(path, map_location="cpu", weights_only=True)
        torch.serialization.add_safe_globals(allowed)
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        reason = re.search(r"WeightsUnpickler error: *(.*)", str(err))
        if reason is None or not reason.group(1).strip():  # not a pickle at all (torch gives no reason)
            raise ValueError(f"{path} is not a readable torch.save file") from None
        found = re.search(r"GLOBAL (\S+) was not an allowed global", reason.group(1))
        needs = f"it needs {found.group(1)}" if found else reason.group(1).strip()
        raise ValueError(
            f"{path} was refused: loading it would run code ({needs}; torch.load(weights_only=True) allows only "
            "tensors, PyG Data and plain containers). If you trust this file, convert it once to a safetensors "
            f"graph and give that instead:\n    {_conversion_command(path)}"
        ) from None
    except Exception as err:  # a truncated or foreign file: zip / pickle errors of many types
        raise ValueError(f"{path} is not a readable torch.save file: {err}") from None


def load_graph(path: str | os.PathLike) -> Data:
    """Read a user's graph file without running code it holds: a safetensors graph (:func:`save_graph`),
    or a ``torch.save``-d PyG ``Data`` or dict of tensors (``.pt`` / ``.pth``, ``torch.load(weights_only=True)``)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no graph file at {path}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            tensors = load_file(str(path))
        except Exception as err:  # safetensors raises its own error types for corrupt files
            raise ValueError(f"{path} is not a readable safetensors file: {err}") from None
        _check_graph_tensors(tensors, str(path))
        return Data(**tensors)
    data = _load_torch_graph(path)
    if isinstance(data, dict):
        if not all(isinstance(key, str) for key in data):
            raise ValueError(f"{path} holds a dict whose keys are not all attribute names: {list(data)[:5]}")
        data = Data(**data)
    if not isinstance(data, Data):
        raise ValueError(f"{path} holds a {type(data).__name__}, not a PyG Data or a dict of tensors")
    return data


class GraphDataModule(L.LightningDataModule):
    r"""One graph for node-level tokenizers, trained full-batch or on sampled subgraphs.

    Args:
        graph: ``"csbm"`` (generated contextual SBM), ``"ba_house"`` (PyG's BA-shapes), the path of a user's
            graph (a PyG data set's ``dataset[0]``, say): a ``.safetensors`` graph written by :func:`save_graph`,
            or a ``torch.save``-d PyG ``Data`` (``.pt`` / ``.pth``, loaded with ``weights_only=True``: a file
            that would run code is refused, with the command converting it), or a ``Data`` itself (from Python;
            checkpoints then record no graph and ``tokq encode`` needs ``--graph``).
        num_nodes, num_classes, homophily, avg_degree, num_features, feature_noise: contextual SBM settings
            (see :func:`contextual_sbm`).
        val_fraction, test_fraction: node shares of the validation and test masks, used when the graph
            has no ``train_mask`` / ``val_mask`` / ``test_mask`` of its own. Default: 0.2 and 0.2.
        ppr_k: personalised-PageRank neighbours per node stored with the node tokens. Default: 16.
        ppr_alpha: PPR restart probability. Default: 0.15.
        semantic_k: most feature-similar nodes stored with the node tokens, read after the PPR neighbours
            (exact search, O(N^2 F): for graphs up to about 10^5 nodes). Default: 0.
        seed: seed of the generated graph and of the split. Default: 0.
        batch_nodes: None: every loader yields the whole graph. A number: mini-batches, each the subgraph
            around ``batch_nodes`` seed nodes (all nodes, shuffled, in training; the split's nodes in
            validation and test) with ``fanouts`` sampled in-neighbours per hop; the tokenizer's losses score
            the seeds only (the other nodes lack part of their neighbourhood). Default: None.
        fanouts: in-neighbours drawn per node at each hop, one entry per GNN layer. Default: [10, 10].
        num_workers: loader processes sampling subgraphs (with ``batch_nodes``). Default: 0.
    """

    def __init__(
        self,
        graph: str | Data = "csbm",
        num_nodes: int = 4000,
        num_classes: int = 4,
        homophily: float = 0.5,
        avg_degree: float = 10.0,
        num_features: int = 32,
        feature_noise: float = 4.0,
        val_fraction: float = 0.2,
        test_fraction: float = 0.2,
        ppr_k: int = 16,
        ppr_alpha: float = 0.15,
        semantic_k: int = 0,
        seed: int = 0,
        batch_nodes: int | None = None,
        fanouts: list[int] | None = None,
        num_workers: int = 0,
    ):
        super().__init__()
        if batch_nodes is not None:
            check_int("batch_nodes", batch_nodes)
        check_int("semantic_k", semantic_k, minimum=0)
        check_int("num_workers", num_workers, minimum=0)
        fanouts = [10, 10] if fanouts is None else list(fanouts)
        if not fanouts or not all(isinstance(f, int) and f >= 1 for f in fanouts):
            raise ValueError(f"fanouts must be a non-empty list of positive in-neighbour counts, got {fanouts}")
        self.given = graph if isinstance(graph, Data) else None
        known = graph in (*GRAPHS, IN_MEMORY) or str(graph).endswith(GRAPH_FILES)
        if self.given is None and not known:
            raise ValueError(
                f"graph must be one of {GRAPHS}, a .safetensors graph (save_graph), a .pt file of a PyG Data, "
                f"or a Data, got {graph!r}"
            )
        self.save_hyperparameters(ignore=["graph"])
        self.hparams.graph = IN_MEMORY if self.given is not None else graph
        self.data: Data | None = None

    def _load(self) -> Data:
        hp = self.hparams
        if hp.graph == "csbm":
            keys = ("num_nodes", "num_classes", "homophily", "avg_degree", "num_features", "feature_noise", "seed")
            return contextual_sbm(**{k: hp[k] for k in keys})
        if hp.graph == "ba_house":
            return ba_house(seed=hp.seed)
        if hp.graph == IN_MEMORY:
            if self.given is None:
                raise ValueError(
                    "this data module held a graph in memory, which checkpoints do not keep: give graph= "
                    "(tokq encode --graph my_graph.safetensors)"
                )
            return self.given.clone()
        return load_graph(hp.graph)

    def setup(self, stage: str | None = None) -> None:
        if self.data is not None:
            return
        data = check_graph(self._load())
        if any(getattr(data, f"{s}_mask", None) is None for s in SPLITS):
            masks = split_masks(
                data.num_nodes, self.hparams.val_fraction, self.hparams.test_fraction, self.hparams.seed
            )
            for split, mask in masks.items():
                data[f"{split}_mask"] = mask
        if data.y is not None:
            check_split_classes(data.y, {s: data[f"{s}_mask"] for s in SPLITS}, self.hparams.graph)
        self.data = data

    @property
    def num_features(self) -> int:
        self.setup()
        return self.data.x.shape[1]

    @property
    def num_classes(self) -> int:
        self.setup()
        return int(self.data.y.max()) + 1 if self.data.y is not None else 0

    def dataloader(self, split: str = "train") -> DataLoader:
        """A loader yielding the whole graph once (``split`` only names the mask a step scores), or with
        ``batch_nodes`` the sampled subgraphs around batches of nodes: all nodes shuffled for ``"train"``,
        the split's nodes in order (draws seeded by ``seed``) otherwise."""
        check_choice("split", split, SPLITS)
        self.setup()
        hp = self.hparams
        if hp.batch_nodes is None:
            return DataLoader([self.data], batch_size=None)
        if split == "train":
            nodes, generator = range(self.data.num_nodes), None
        else:
            nodes = torch.nonzero(self.data[f"{split}_mask"]).flatten().tolist()
            generator = torch.Generator().manual_seed(hp.seed)
        sampler = NeighbourSampler(self.data, hp.fanouts, generator)
        return DataLoader(
            nodes,
            batch_size=hp.batch_nodes,
            shuffle=split == "train",
            collate_fn=sampler,
            num_workers=hp.num_workers,
            persistent_workers=hp.num_workers > 0,
        )

    def train_dataloader(self) -> DataLoader:
        return self.dataloader("train")

    def val_dataloader(self) -> DataLoader:
        return self.dataloader("val")

    def test_dataloader(self) -> DataLoader:
        return self.dataloader("test")
