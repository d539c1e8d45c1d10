"""Speed and peak memory of tokenizers_q quantizers vs vector-quantize-pytorch, side by side.

Each (library, config) runs in a fresh process so peak RSS is its own; each
process does warm-up steps, then times train-mode forward + backward and
reports the median. Prints one markdown table with both libraries and ratios.

    python scripts/bench_quantizers.py                       # every config, default shapes
    python scripts/bench_quantizers.py --configs vq1024 fsq --shape 4 256 256 --repeats 3
    python scripts/bench_quantizers.py --device cuda        # GPU: synchronised timing, peak allocated memory
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time

from tqdm import tqdm

CONFIGS = {
    # name: (tokenizers_q constructor, vector-quantize-pytorch constructor, default input shape)
    "vq1024": (
        "VQ(dim=D, codebook_size=1024, kmeans_init=False)",
        "VectorQuantize(dim=D, codebook_size=1024)",
        (16, 1024, 256),
    ),
    "vq8192": (
        "VQ(dim=D, codebook_size=8192, kmeans_init=False)",
        "VectorQuantize(dim=D, codebook_size=8192)",
        (16, 1024, 256),
    ),
    "rvq8x1024": (
        "RVQ(dim=D, num_quantizers=8, codebook_size=1024, kmeans_init=False)",
        "ResidualVQ(dim=D, num_quantizers=8, codebook_size=1024)",
        (16, 1024, 256),
    ),
    "fsq": ("FSQ(levels=[8, 5, 5, 5], dim=D)", "FSQ(levels=[8, 5, 5, 5], dim=D)", (16, 1024, 256)),
    "bsq65536": (
        "BSQ(dim=D, codebook_size=2**16)",
        "LFQ(dim=D, codebook_size=2**16, spherical=True)",
        (16, 1024, 16),
    ),
    "lfq65536": ("LFQ(dim=D, codebook_size=2**16)", "LFQ(dim=D, codebook_size=2**16)", (16, 1024, 16)),
}
LIBRARIES = ("tokenizers_q", "vector_quantize_pytorch")


def _loss(out, library: str):
    """Sum of the output and every auxiliary loss, whatever the library returns."""
    import torch

    if library == "tokenizers_q":
        return out.quantized.square().mean() + out.loss
    total = out[0].square().mean()
    for extra in out[2:]:
        if isinstance(extra, torch.Tensor) and extra.is_floating_point():
            total = total + extra.sum()
    return total


def worker(
    library: str,
    config: str,
    shape: tuple[int, ...],
    threads: int,
    warmup: int,
    repeats: int,
    min_seconds: float,
    device: str = "cpu",
) -> dict:
    import torch

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    if library == "tokenizers_q":
        import tokenizers_q as lib
    else:
        import vector_quantize_pytorch as lib
    ctor = CONFIGS[config][0 if library == "tokenizers_q" else 1]
    module = eval(ctor, {**vars(lib), "D": shape[-1]}).to(device)  # constructor strings are the table's own
    module.train()
    x = torch.randn(*shape, device=device, requires_grad=True)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    times = []
    began = time.perf_counter()
    step = 0
    # at least `repeats` timed steps, more (up to 50) until `min_seconds` have passed: fast configs get many samples
    while step < warmup + repeats or (time.perf_counter() - began < min_seconds and len(times) < 50):
        sync()
        start = time.perf_counter()
        _loss(module(x), library).backward()
        sync()
        elapsed = time.perf_counter() - start
        x.grad = None
        if step >= warmup:
            times.append(elapsed * 1000)
        step += 1
    if device == "cuda":  # what the caching allocator handed out, at its peak
        peak_mb = torch.cuda.max_memory_allocated() / 2**20
    else:
        peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"ms": statistics.median(times), "peak_mb": peak_mb}


def run_isolated(library, config, shape, args) -> dict | None:
    cmd = [sys.executable, __file__, "--worker", library, config, "--shape", *map(str, shape)]
    cmd += ["--threads", str(args.threads), "--warmup", str(args.warmup), "--repeats", str(args.repeats)]
    cmd += ["--min-seconds", str(args.min_seconds)]
    cmd += ["--memory-limit-gb", str(args.memory_limit_gb), "--device", args.device]
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"over {args.timeout}s"}
    if done.returncode != 0:
        tail = (done.stderr.strip().splitlines() or ["?"])[-1]
        oom = "memory" in tail.lower() or done.returncode in (-9, 137)
        return {"error": f"out of memory (> {args.memory_limit_gb} GB)" if oom else tail[:80]}
    return json.loads(done.stdout.strip().splitlines()[-1])


def _fmt(result: dict, key: str) -> str:
    return result["error"] if "error" in result else f"{result[key]:.0f}" if result[key] >= 10 else f"{result[key]:.1f}"


def _ratio(ours: dict, theirs: dict, key: str, invert: bool = False) -> str:
    if "error" in ours or "error" in theirs:
        return "-"
    r = theirs[key] / ours[key] if not invert else ours[key] / theirs[key]
    return f"{r:.2f}x"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    parser.add_argument("--shape", nargs="+", type=int, help="input shape for every config (default: per config)")
    parser.add_argument("--libraries", nargs="+", default=list(LIBRARIES), choices=LIBRARIES)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3, help="at least this many timed steps")
    parser.add_argument("--min-seconds", type=float, default=3.0, help="keep timing (up to 50 steps) this long")
    parser.add_argument("--timeout", type=int, default=600, help="seconds per (library, config) process")
    parser.add_argument("--memory-limit-gb", type=float, default=16.0, help="address-space cap per process")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--worker", nargs=2, metavar=("LIBRARY", "CONFIG"), help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.worker:
        if args.device == "cpu":  # an address-space cap would break CUDA's own mappings
            limit = int(args.memory_limit_gb * 2**30)
            resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
        shape = tuple(args.shape)
        result = worker(*args.worker, shape, args.threads, args.warmup, args.repeats, args.min_seconds, args.device)
        print(json.dumps(result))
        return

    rows = []
    jobs = [(c, lib) for c in args.configs for lib in args.libraries]
    results = {}
    for config, library in tqdm(jobs, desc="benchmark", file=sys.stderr):
        shape = tuple(args.shape) if args.shape else CONFIGS[config][2]
        results[config, library] = run_isolated(library, config, shape, args)
    where = f"{args.threads} CPU thread(s)" if args.device == "cpu" else "CUDA"
    memory = "peak RSS" if args.device == "cpu" else "peak allocated GPU memory"
    print(
        f"\nTrain-mode forward + backward, {where}, median of >= {args.repeats} steps "
        f"(>= {args.min_seconds:g} s) after {args.warmup} warm-up; {memory} of a fresh process per cell.\n"
    )
    print(
        "| config | input | tokenizers_q ms | vector-quantize-pytorch ms | speed-up | "
        f"tokenizers_q {memory} MB | vector-quantize-pytorch {memory} MB | memory (ours / theirs) |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for config in args.configs:
        shape = tuple(args.shape) if args.shape else CONFIGS[config][2]
        ours = results.get((config, "tokenizers_q"), {"error": "not run"})
        theirs = results.get((config, "vector_quantize_pytorch"), {"error": "not run"})
        cells = [config, str(tuple(shape)), _fmt(ours, "ms"), _fmt(theirs, "ms"), _ratio(ours, theirs, "ms")]
        cells += [
            _fmt(ours, "peak_mb"),
            _fmt(theirs, "peak_mb"),
            _ratio(ours, theirs, "peak_mb", invert=True),
        ]
        rows.append("| " + " | ".join(cells) + " |")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
