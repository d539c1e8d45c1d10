"""Node token files: a graph's node codes with labels, split masks and PPR neighbourhoods.

``write_node_tokens`` turns a graph tokenizer and a graph into one self-contained
token file; :class:`NodeTokenDataModule` serves it to the graph transformer as
per-node sequences (the node, its top-k PPR neighbours and, where written, its most
feature-similar nodes).
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch.utils.data import Dataset, Subset
from torch_geometric.data import Data

from tokenizers_q.checks import check_int
from tokenizers_q.models.ppr import ppr_topk
from tokenizers_q.models.similar_nodes import similar_nodes
from tokenizers_q.packing import TokenFile, load_tokens, save_tokens
from tokenizers_q.trainers.artifacts import tokenizer_fingerprint
from tokenizers_q.trainers.data import SPLITS, SplitDataModule
from tokenizers_q.trainers.graph_data import check_graph, check_split_classes

NODE_EXTRAS = ("labels", "ppr_index", "ppr_score", *(f"{s}_mask" for s in SPLITS))


def write_node_tokens(
    tokenizer,
    data: Data,
    path: str | Path,
    ppr_k: int = 16,
    ppr_alpha: float = 0.15,
    metadata: dict | None = None,
    features: bool = False,
    progress: bool = False,
    semantic_k: int = 0,
) -> Path:
    """Encode every node of ``data`` with a :class:`~tokenizers_q.trainers.GraphTokenizerModule` and write
    codes (N, num_codebooks), labels, split masks and the top-``ppr_k`` PPR neighbours to ``path``; with
    ``features`` also the node features (N, F) float32, for a transformer reading each node's own features
    as an ego token (``GraphTransformerModule(ego_features=True)``); with ``semantic_k`` also each node's
    ``semantic_k`` most feature-similar nodes (:func:`~tokenizers_q.models.similar_nodes.similar_nodes`,
    exact, O(N^2 F)), which the node's sequence reads after its PPR neighbours; ``progress`` shows progress
    bars."""
    check_graph(data, need_labels=True)
    masks = {f"{s}_mask": data[f"{s}_mask"] for s in SPLITS if f"{s}_mask" in data}
    if len(masks) != len(SPLITS):
        raise ValueError(f"the graph needs train/val/test node masks, it has {sorted(masks) or 'none'}")
    check_int("semantic_k", semantic_k, minimum=0)
    codes = tokenizer.encode(data)
    index, score = ppr_topk(data.edge_index, data.num_nodes, k=ppr_k, alpha=ppr_alpha, progress=progress)
    semantic = {}
    if semantic_k:
        similar, similarity = similar_nodes(data.x, semantic_k, progress=progress)
        semantic = {"semantic_index": similar, "semantic_score": similarity}
    info = {
        "kind": "nodes",
        "num_nodes": data.num_nodes,
        "num_classes": int(data.y.max()) + 1,
        "ppr_k": ppr_k,
        "ppr_alpha": ppr_alpha,
        "semantic_k": semantic_k,
        "quantizer": type(tokenizer.quantizer).__name__,
        "code_bits": tokenizer.bits_per_node(),
        "codebook_bits": float(tokenizer.shared_bits()),
        **(metadata or {}),
    }
    extras = {
        "labels": data.y.long(),
        "ppr_index": index,
        "ppr_score": score,
        **{k: v.bool() for k, v in masks.items()},
        **({"features": data.x.float()} if features else {}),
        **semantic,
    }
    return save_tokens(path, codes, tokenizer.quantizer.spec, info, extras, tokenizer_fingerprint(tokenizer))


def check_node_tokens(tokens: TokenFile, path: str | Path) -> None:
    """Raise a clear error unless a token file holds node tokens as ``write_node_tokens`` writes them."""
    missing = [name for name in NODE_EXTRAS if name not in tokens.extras]
    if tokens.metadata.get("kind") != "nodes" or missing:
        raise ValueError(
            f"{path} is not a node token file (missing {missing or 'kind=nodes'}): write one with tokq encode "
            "on a graph tokenizer checkpoint"
        )
    n = tokens.codes.shape[0]
    if tokens.codes.dim() != 2:
        raise ValueError(f"{path}: node codes must be (N, num_codebooks), got {tuple(tokens.codes.shape)}")
    for name in NODE_EXTRAS:
        if tokens.extras[name].shape[0] != n:
            raise ValueError(f"{path}: {name} has {tokens.extras[name].shape[0]} rows for {n} nodes")
    index = tokens.extras["ppr_index"]
    if index.numel() and (int(index.min()) < -1 or int(index.max()) >= n):
        raise ValueError(f"{path}: ppr_index holds nodes outside [0, {n}) (-1 marks padding)")
    semantic_k = int(tokens.metadata.get("semantic_k", 0))
    if semantic_k:
        similar = tokens.extras.get("semantic_index")
        if similar is None or tuple(similar.shape) != (n, semantic_k) or "semantic_score" not in tokens.extras:
            got = None if similar is None else tuple(similar.shape)
            raise ValueError(f"{path}: semantic_k = {semantic_k} needs semantic_index ({n}, {semantic_k}), got {got}")
        if int(similar.min()) < 0 or int(similar.max()) >= n:
            raise ValueError(f"{path}: semantic_index holds nodes outside [0, {n})")


def sequence_neighbours(metadata: dict) -> int:
    """Neighbours in every node's sequence of a node token file: its PPR neighbours, then its similar nodes."""
    return int(metadata["ppr_k"]) + int(metadata.get("semantic_k", 0))


class NodeTokenDataset(Dataset):
    r"""Per-node sequences of a node token file: the node followed by its PPR neighbours, then its similar
    nodes where the file holds them (scored by their cosine similarity).

    Items: ``(codes (1 + k, C) int64, scores (1 + k,) float, valid (1 + k,) bool, label ())``, then the node's
    features (F,) float32 where the file holds them; the node itself has score 1; padding (fewer than k
    neighbours) has valid False.
    """

    def __init__(self, tokens: TokenFile):
        self.codes = tokens.codes.long()
        self.labels = tokens.extras["labels"].long()
        index, scores = tokens.extras["ppr_index"].long(), tokens.extras["ppr_score"].float()
        if int(tokens.metadata.get("semantic_k", 0)):  # check_node_tokens: then semantic_index is there
            index = torch.cat([index, tokens.extras["semantic_index"].long()], dim=1)
            scores = torch.cat([scores, tokens.extras["semantic_score"].float()], dim=1)
        nodes = torch.arange(len(index))[:, None]
        self.nodes = torch.cat([nodes, index.clamp_min(0)], dim=1)
        self.valid = torch.cat([torch.ones_like(nodes, dtype=torch.bool), index >= 0], dim=1)
        self.scores = torch.cat([torch.ones(len(index), 1), scores], dim=1)
        self.features = tokens.extras["features"].float() if "features" in tokens.extras else None

    def __len__(self) -> int:
        return len(self.nodes)

    def __getitem__(self, i: int):
        item = self.codes[self.nodes[i]], self.scores[i], self.valid[i], self.labels[i]
        return item if self.features is None else (*item, self.features[i])


class NodeTokenDataModule(SplitDataModule):
    r"""Train / val / test nodes of a node token file (written by ``tokq encode`` on a graph tokenizer).

    Args:
        tokens: the node token file.
        batch_size: nodes per batch. Default: 256.
        num_workers: Default: 0.
        seed: seed of the training order. Default: 0.
    """

    item_name = "tokens"

    def __init__(self, tokens: str, batch_size: int = 256, num_workers: int = 0, seed: int = 0):
        super().__init__()
        self.save_hyperparameters()
        self.path, self.batch_size, self.num_workers, self.seed = tokens, batch_size, num_workers, seed
        self.splits: dict[str, Dataset] = {}
        self.spec, self.metadata = None, {}

    def setup(self, stage: str | None = None) -> None:
        if self.splits:
            return
        tokens = load_tokens(self.path)
        check_node_tokens(tokens, self.path)
        full = NodeTokenDataset(tokens)
        masks = {split: tokens.extras[f"{split}_mask"] for split in SPLITS}
        check_split_classes(tokens.extras["labels"], masks, self.path)
        for split in SPLITS:
            nodes = torch.nonzero(tokens.extras[f"{split}_mask"].bool()).flatten().tolist()
            self.splits[split] = Subset(full, nodes)
        self.spec, self.metadata = tokens.spec, tokens.metadata

    @property
    def num_classes(self) -> int:
        self.setup()
        return int(self.metadata["num_classes"])

    @property
    def feature_dim(self) -> int | None:
        """Node feature size of the file (None: it holds no features)."""
        self.setup()
        features = self.splits["train"].dataset.features
        return None if features is None else features.shape[1]

    @property
    def num_neighbours(self) -> int:
        self.setup()
        return sequence_neighbours(self.metadata)
