"""Graph tokenizer + graph transformer (GQT) against MLP, GCN, GraphSAGE and GPR-GNN on the same graphs and splits.

    python scripts/bench_graph.py                                   # 3 homophily levels + BA-house, 3 seeds
    python scripts/bench_graph.py --graphs csbm-0.5 --seeds 0 --tokenizer-steps 100 --epochs 5
    python scripts/bench_graph.py --graphs --ppr-nodes 0 --scale-nodes 1000000   # the scale row alone

For each graph and seed: the baselines train full-batch on the raw features; the
token transformer trains a GraphTokenizerModule (stage 1, self-supervised, labels
unseen), writes node tokens with top-k PPR neighbours, and trains a
GraphTransformerModule on those tokens alone (stage 2). Every model is tested at
its best validation epoch. Prints markdown tables: test accuracy (mean +- std),
bits per node, code usage per RVQ level, wall time, and PPR time on a 100k-node graph.
The scale row tokenizes a generated graph of ``--scale-nodes`` nodes end to end (tokenizer
trained on sampled subgraphs, then encode + PPR + token file) with the wall time and peak
resident memory of each stage.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import resource
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import lightning as L
import torch
import torch.nn.functional as F
from torch import nn
from torch_geometric.nn import GCNConv, SAGEConv
from torch_geometric.nn.conv.gcn_conv import gcn_norm

from tokenizers_q.models.graph_encoder import ENCODERS, propagate
from tokenizers_q.models.ppr import ppr_topk
from tokenizers_q.packing import load_tokens
from tokenizers_q.trainers.graph_data import GraphDataModule, contextual_sbm, edge_homophily
from tokenizers_q.trainers.graph_tokenizer import GraphTokenizerModule
from tokenizers_q.trainers.graph_transformer import GraphTransformerModule
from tokenizers_q.trainers.node_tokens import NodeTokenDataModule, write_node_tokens

GRAPHS = ("csbm-0.9", "csbm-0.5", "csbm-0.2", "ba_house")
BASELINES = ("MLP", "GCN", "SAGE", "GPRGNN")
EGO_NOTE = ", an ego token of each node's own features"


class Baseline(nn.Module):
    """Two layers of Linear (MLP), GCNConv or SAGEConv with ReLU and dropout 0.5; ``GPRGNN`` (Chien et al.,
    2021, the heterophily baseline): the MLP's logits ``H``, then ``sum_k gamma_k Â^k H`` for k = 0..10 with
    learned ``gamma`` (started at PPR weights, free to turn negative: a high-pass filter)."""

    def __init__(self, kind: str, in_dim: int, hidden: int, classes: int, hops: int = 10, alpha: float = 0.1):
        super().__init__()
        layer = {"MLP": nn.Linear, "GPRGNN": nn.Linear, "GCN": GCNConv, "SAGE": SAGEConv}[kind]
        self.kind, self.first, self.second = kind, layer(in_dim, hidden), layer(hidden, classes)
        if kind == "GPRGNN":
            gamma = alpha * (1 - alpha) ** torch.arange(hops + 1.0)
            self.gamma = nn.Parameter(torch.cat([gamma[:-1], (1 - alpha) ** torch.tensor([float(hops)])]))

    def forward(self, x, edge_index):
        args = () if self.kind in ("MLP", "GPRGNN") else (edge_index,)
        h = F.dropout(
            F.relu(self.first(F.dropout(x, 0.5, self.training) if self.kind == "GPRGNN" else x, *args)),
            0.5,
            self.training,
        )
        h = self.second(h, *args)
        if self.kind != "GPRGNN":
            return h
        edges, weight = gcn_norm(edge_index, None, x.shape[0], add_self_loops=True)
        out = self.gamma[0] * h
        for gamma in self.gamma[1:]:
            h = propagate(h, edges, weight)
            out = out + gamma * h
        return out


def train_baseline(kind: str, data, seed: int, epochs: int = 300) -> float:
    """Full-batch Adam (lr 0.01, weight decay 5e-4); test accuracy at the best validation epoch."""
    torch.manual_seed(seed)
    model = Baseline(kind, data.x.shape[1], 64, int(data.y.max()) + 1)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01, weight_decay=5e-4)
    best_val, test_at_best = -1.0, 0.0
    for _ in range(epochs):
        model.train()
        loss = F.cross_entropy(model(data.x, data.edge_index)[data.train_mask], data.y[data.train_mask])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        model.eval()
        with torch.no_grad():
            correct = model(data.x, data.edge_index).argmax(-1) == data.y
        val, test = correct[data.val_mask].float().mean().item(), correct[data.test_mask].float().mean().item()
        if val > best_val:
            best_val, test_at_best = val, test
    return test_at_best


def trainer(folder: Path, **kwargs) -> L.Trainer:
    """A quiet Trainer (no logger, progress bar or model summary unless ``kwargs`` say otherwise)."""
    settings = {"logger": False, "enable_progress_bar": False, "enable_model_summary": False, **kwargs}
    return L.Trainer(default_root_dir=folder, **settings)


def token_transformer(data_module: GraphDataModule, seed: int, args, folder: Path) -> dict:
    """Stage 1 (tokenizer), node tokens, stage 2 (transformer); test accuracy at the best validation epoch."""
    L.seed_everything(seed, verbose=False)
    start = time.perf_counter()
    if args.quantizer == "pq":  # one code per channel group (conv hops: one per propagation channel)
        quantizer = {"num_groups": args.levels, "quantizer": "vq", "codebook_size": args.codes}
    else:
        quantizer = {"num_quantizers": args.levels, "codebook_size": args.codes}
    tokenizer = GraphTokenizerModule(conv=args.conv, quantizer=args.quantizer, quantizer_kwargs=quantizer)
    trainer(folder, max_steps=args.tokenizer_steps, limit_val_batches=0, enable_checkpointing=False).fit(
        tokenizer, data_module
    )
    tokenizer_seconds = time.perf_counter() - start
    graph = data_module.data
    path = write_node_tokens(
        tokenizer,
        graph,
        folder / "nodes.safetensors",
        ppr_k=args.ppr_k,
        features=args.ego_features,
        semantic_k=args.semantic_k,
    )
    stats = tokenizer.code_statistics(graph)
    code_bits, codebook_bits = tokenizer.bits_per_node(), float(tokenizer.shared_bits())

    start = time.perf_counter()
    L.seed_everything(seed, verbose=False)
    nodes = NodeTokenDataModule(str(path), batch_size=256, seed=seed)
    model = GraphTransformerModule(
        dim=args.dim,
        depth=args.depth,
        num_heads=4,
        dropout=0.2,
        lr=2e-3,
        ego_features=args.ego_features,
        token_dropout=args.token_dropout,
        ego_dropout=args.ego_dropout,
    )
    best = L.pytorch.callbacks.ModelCheckpoint(dirpath=folder / "ckpt", monitor="val/accuracy", mode="max")
    fit = trainer(folder, max_epochs=args.epochs, callbacks=[best], gradient_clip_val=1.0)
    fit.fit(model, nodes)
    test = fit.test(model, nodes, ckpt_path="best", verbose=False)[0]["test/accuracy"]
    return {
        "accuracy": test,
        "usage": stats["usage"],
        "code_bits": code_bits,
        "codebook_bits": codebook_bits,
        "tokenizer_s": tokenizer_seconds,
        "transformer_s": time.perf_counter() - start,
    }


def make_data(name: str, seed: int, num_nodes: int, batch_nodes: int | None = None, fanouts=None) -> GraphDataModule:
    """The graph ``name`` (``csbm-<homophily>`` or ``ba_house``); with ``batch_nodes`` its loaders yield sampled
    subgraphs (the tokenizer then trains on them)."""
    sampling = {"batch_nodes": batch_nodes, "fanouts": fanouts}
    if name == "ba_house":
        data = GraphDataModule(graph="ba_house", seed=seed, **sampling)
    else:
        homophily = float(name.split("-")[1])
        data = GraphDataModule(graph="csbm", num_nodes=num_nodes, homophily=homophily, seed=seed, **sampling)
    data.setup()
    return data


def mean_std(values: list[float], scale: float = 100.0, digits: int = 1) -> str:
    values = [v * scale for v in values]
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return f"{statistics.mean(values):.{digits}f} +- {statistics.stdev(values):.{digits}f}"


def ppr_timing(num_nodes: int, k: int) -> str:
    graph = contextual_sbm(num_nodes=num_nodes, num_features=2, avg_degree=10, seed=0)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.perf_counter()
    ppr_topk(graph.edge_index, num_nodes, k=k, batch_size=8192)
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return (
        f"PPR top-{k} on a {num_nodes}-node graph ({graph.num_edges} directed edges): {seconds:.1f} s, "
        f"peak RSS {peak / 1e6:.1f} GB (was {before / 1e6:.1f} GB before)"
    )


def print_accuracy_tables(results: dict[str, dict[str, list]], args) -> None:
    print(f"| graph | edge homophily | {' | '.join(BASELINES)} | token transformer | tokens - max(MLP, GCN) |")
    print("|---|---|" + "---|" * (len(BASELINES) + 2))
    for name, row in results.items():
        tokens = [t["accuracy"] for t in row["tokens"]]
        gap = [t - max(m, g) for t, m, g in zip(tokens, row["MLP"], row["GCN"])]  # the target: >= -1 point
        cells = " | ".join(mean_std(row[k]) for k in BASELINES)
        print(f"| {name} | {row['homophily']:.2f} | {cells} | {mean_std(tokens)} | {mean_std(gap)} |")
    print(f"\nTest accuracy (%), mean +- std over seeds {args.seeds}.\n")
    print(
        "| graph | nodes | feature bits/node (float32) | code bits/node | + codebook amortised | usage per level "
        "| baseline s | tokenizer s | transformer s |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for name, row in results.items():
        first = row["tokens"][0]
        amortised = first["code_bits"] + first["codebook_bits"] / row["nodes"]
        usage = ", ".join(
            f"{100 * statistics.mean(t['usage'][level] for t in row['tokens']):.0f}%" for level in range(args.levels)
        )
        times = [statistics.mean(row["baseline_s"])] + [
            statistics.mean(t[key] for t in row["tokens"]) for key in ("tokenizer_s", "transformer_s")
        ]
        print(
            f"| {name} | {row['nodes']} | {32 * row['features']} | {first['code_bits']:.0f} | {amortised:.0f} | "
            f"{usage} | {' | '.join(f'{t:.0f}' for t in times)} |"
        )
    ego = f"{EGO_NOTE} (dropout {args.ego_dropout})" if args.ego_features else ""
    print(
        f"\n{args.conv} tokenizer, {args.levels} {args.quantizer.upper()} levels x {args.codes} codes, "
        f"{args.tokenizer_steps} tokenizer "
        f"steps ({'full batch' if args.batch_nodes is None else f'subgraphs of {args.batch_nodes} seeds'}), "
        f"transformer dim {args.dim} depth {args.depth}, {args.epochs} epochs, top-{args.ppr_k} PPR neighbours"
        f"{f' and {args.semantic_k} feature-similar nodes' if args.semantic_k else ''}"
        f"{ego}, token dropout {args.token_dropout}; "
        f"{torch.get_num_threads()} threads."
    )


def resident_bytes() -> int:
    """This process's resident memory now (Linux ``/proc/self/statm``)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@contextlib.contextmanager
def measured(name: str, stages: dict[str, tuple[float, int]]):
    """Record the wall time and peak resident memory (sampled every 20 ms) of the block as ``stages[name]``."""
    peak, stop = [resident_bytes()], threading.Event()

    def watch() -> None:
        while not stop.wait(0.02):
            peak[0] = max(peak[0], resident_bytes())

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    start = time.perf_counter()
    try:
        yield
    finally:
        stop.set()
        watcher.join()
        stages[name] = (time.perf_counter() - start, max(peak[0], resident_bytes()))


def scale_row(args, folder: Path) -> str:
    """A generated graph of ``args.scale_nodes`` nodes tokenized end to end: the tokenizer trains on sampled
    subgraphs (``GraphDataModule(batch_nodes=...)``), then ``write_node_tokens`` encodes every node, finds
    its top-k PPR neighbours and writes the token file. Markdown: wall time and peak RSS of every stage."""
    stages: dict[str, tuple[float, int]] = {}
    L.seed_everything(0, verbose=False)
    with measured("graph (contextual SBM, h = 0.5)", stages):
        data = GraphDataModule(
            graph=contextual_sbm(num_nodes=args.scale_nodes, homophily=0.5, avg_degree=10, seed=0),
            batch_nodes=args.batch_nodes or 512,
            fanouts=args.fanouts,
        )
        data.setup()
    graph = data.data
    tokenizer = GraphTokenizerModule(quantizer_kwargs={"num_quantizers": args.levels, "codebook_size": args.codes})
    name = f"tokenizer: {args.scale_steps} steps of {data.hparams.batch_nodes} seeds, fanouts {args.fanouts}"
    with measured(name, stages):
        fit = trainer(
            folder,
            max_steps=args.scale_steps,
            limit_val_batches=0,
            enable_checkpointing=False,
            enable_progress_bar=True,
        )
        fit.fit(tokenizer, data)
    with measured("encode alone (all nodes)", stages):
        tokenizer.encode(graph)
    path = folder / "scale.safetensors"
    with measured(f"write_node_tokens: encode + PPR top-{args.ppr_k} + token file", stages):
        write_node_tokens(tokenizer, graph, path, ppr_k=args.ppr_k, progress=True)
    codes = load_tokens(path).codes
    usage = [len(torch.unique(codes[:, level])) / args.codes for level in range(codes.shape[1])]
    total = sum(seconds for stage, (seconds, _) in stages.items() if not stage.startswith("encode alone"))
    lines = [
        f"Scale: {graph.num_nodes} nodes, {graph.num_edges} directed edges, {graph.x.shape[1]} features; "
        f"{torch.get_num_threads()} threads.\n",
        "| stage | wall s | peak RSS GB |",
        "|---|---|---|",
        *(f"| {stage} | {seconds:.0f} | {peak / 1e9:.2f} |" for stage, (seconds, peak) in stages.items()),
        f"| **end to end** (graph, training, write_node_tokens) | **{total:.0f}** | "
        f"**{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9:.2f}** (process peak) |",
        f"\n{codes.shape[1]} x {args.codes} codes ({tokenizer.bits_per_node():.0f} bits per node), "
        f"usage per level over all nodes: {', '.join(f'{100 * u:.0f}%' for u in usage)}; "
        f"token file {path.stat().st_size / 1e6:.0f} MB.",
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--graphs", nargs="*", default=list(GRAPHS), choices=GRAPHS, help="none: the scale row only")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--num-nodes", type=int, default=4000)
    parser.add_argument("--tokenizer-steps", type=int, default=300)
    parser.add_argument("--conv", default="gcn", choices=list(ENCODERS), help="tokenizer GNN layers (hops: HopEncoder)")
    parser.add_argument("--quantizer", default="rvq", choices=["rvq", "pq"], help="pq: one code per channel group")
    parser.add_argument("--levels", type=int, default=3, help="RVQ levels or PQ groups")
    parser.add_argument("--codes", type=int, default=256, help="codes per level")
    parser.add_argument(
        "--ego-features", action="store_true", help="the transformer also reads each node's own features"
    )
    parser.add_argument("--ego-dropout", type=float, default=0.0, help="transformer: dropout on the ego path")
    parser.add_argument("--token-dropout", type=float, default=0.0, help="transformer: code tokens hidden in training")
    parser.add_argument("--ppr-k", type=int, default=16)
    parser.add_argument("--semantic-k", type=int, default=0, help="most feature-similar nodes in each sequence")
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--depth", type=int, default=2)
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--ppr-nodes", type=int, default=100_000, help="graph size of the PPR timing (0: skip)")
    parser.add_argument("--scale-nodes", type=int, default=0, help="graph size of the end-to-end scale row (0: skip)")
    parser.add_argument("--scale-steps", type=int, default=500, help="scale row: tokenizer training steps")
    parser.add_argument(
        "--batch-nodes",
        type=int,
        help="tokenizer on sampled subgraphs of this many seeds (default: full batch; scale: 512)",
    )
    parser.add_argument("--fanouts", type=int, nargs="+", default=[5, 5], help="sampled in-neighbours per hop")
    args = parser.parse_args()
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    logging.getLogger("lightning.fabric").setLevel(logging.ERROR)

    results: dict[str, dict[str, list]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.graphs:
            for seed in args.seeds:
                data = make_data(name, seed, args.num_nodes, args.batch_nodes, args.fanouts)
                row = results.setdefault(name, {m: [] for m in (*BASELINES, "tokens", "baseline_s")})
                row["homophily"] = edge_homophily(data.data.edge_index, data.data.y)
                row["nodes"], row["features"] = data.data.num_nodes, data.data.x.shape[1]
                start = time.perf_counter()
                for kind in BASELINES:
                    row[kind].append(train_baseline(kind, data.data, seed))
                row["baseline_s"].append((time.perf_counter() - start) / len(BASELINES))
                row["tokens"].append(token_transformer(data, seed, args, Path(tmp) / f"{name}-{seed}"))
                done = {k: round(v[-1], 3) for k, v in row.items() if k in BASELINES}
                print(f"{name} seed {seed}: {done} tokens {row['tokens'][-1]}", file=sys.stderr, flush=True)

    if results:
        print_accuracy_tables(results, args)
    if args.ppr_nodes:
        print("\n" + ppr_timing(args.ppr_nodes, args.ppr_k))
    if args.scale_nodes:
        with tempfile.TemporaryDirectory() as tmp:
            print("\n" + scale_row(args, Path(tmp)))


if __name__ == "__main__":
    main()
