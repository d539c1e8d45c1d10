"""Image tokenizers side by side: the same encoder/decoder and step budget for every quantizer.

    python scripts/bench_image.py                       # vq rvq fsq bsq lfq pq, seeds 0 1, 1200 steps
    python scripts/bench_image.py --quantizers vq fsq --seeds 0 --max-steps 300

Each (quantizer, seed) trains in a fresh process from ``configs/image/<q>.yaml``
(Fashion-MNIST 32x32, 8x8 tokens of ~10 bits), then is measured on the whole
test split. Prints one markdown table, mean +- std over seeds.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

QUANTIZERS = ("vq", "rvq", "fsq", "bsq", "lfq", "pq")
COLUMNS = (("psnr", 2), ("ssim", 3), ("usage", 3), ("perplexity", 0), ("train_images_per_s", 0), ("train_minutes", 1))
ROOT = Path(__file__).resolve().parent.parent


def run_cell(quantizer: str, seed: int, max_steps: int, out: str, root: str | None) -> dict:
    """Train and test one tokenizer in this process; returns its measurements."""
    from tokenizers_q.trainers.cli import lightning_cli

    argv = ["fit", "--config", str(ROOT / "configs" / "image" / f"{quantizer}.yaml"), "--seed_everything", str(seed)]
    argv += ["--trainer.max_steps", str(max_steps), "--trainer.val_check_interval", str(max_steps)]
    argv += ["--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false"]
    argv += ["--trainer.logger.init_args.save_dir", out, "--trainer.logger.init_args.name", f"{quantizer}-seed{seed}"]
    if root:
        argv += ["--data.init_args.root", root]
    start = time.perf_counter()
    cli = lightning_cli(argv)
    seconds = time.perf_counter() - start
    results = cli.trainer.test(cli.model, datamodule=cli.datamodule, verbose=False)[0]
    model = cli.model.eval()
    loader = cli.datamodule.dataloader("test")
    stats = model.code_statistics(loader)
    codes_shape = (1, *model.encode(next(iter(loader))[0][:1]).shape[1:])
    return {
        "bits_per_token": model.quantizer.spec.bits_per_token,
        "bits_per_image": model.bits_per_image(codes_shape),
        "psnr": results["test/psnr"],
        "ssim": results["test/ssim"],
        "usage": statistics.mean(stats["usage"]) if stats["usage"] else math.nan,
        "perplexity": statistics.mean(stats["perplexity"]) if stats["perplexity"] else math.nan,
        "train_images_per_s": max_steps * cli.datamodule.batch_size / seconds,
        "train_minutes": seconds / 60,
    }


def mean_std(values: list[float], digits: int) -> str:
    if any(math.isnan(v) for v in values):
        return "-"
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return f"{statistics.mean(values):.{digits}f} +- {statistics.stdev(values):.{digits}f}"


def table(rows: dict[str, list[dict]], max_steps: int, threads: int) -> str:
    head = "| quantizer | bits/token | bits/image | PSNR dB | SSIM | usage | perplexity | train img/s | train min |"
    lines = [head, "|---" * 9 + "|"]
    for name, cells in rows.items():
        cols = [mean_std([c[key] for c in cells], digits) for key, digits in COLUMNS]
        lines.append(f"| {name} | {cells[0]['bits_per_token']} | {cells[0]['bits_per_image']} | {' | '.join(cols)} |")
    seeds = len(next(iter(rows.values())))
    note = f"\n{max_steps} steps of batch 64 per run, {threads} thread(s), {seeds} seed(s); test split (10k images)."
    return "\n".join(lines) + note


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quantizers", nargs="+", default=list(QUANTIZERS), choices=QUANTIZERS)
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1])
    parser.add_argument("--max-steps", type=int, default=1200)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default="runs/bench_image")
    parser.add_argument("--root", help="Fashion-MNIST folder (default: Debian's package)")
    parser.add_argument("--cell", nargs=2, metavar=("QUANTIZER", "SEED"), help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.cell:
        import torch

        torch.set_num_threads(args.threads)
        result = run_cell(args.cell[0], int(args.cell[1]), args.max_steps, args.out, args.root)
        print("RESULT " + json.dumps(result))
        return

    rows: dict[str, list[dict]] = {}
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "PYTHONWARNINGS": "ignore"}
    for quantizer in args.quantizers:
        for seed in args.seeds:
            cmd = [sys.executable, __file__, "--cell", quantizer, str(seed), "--max-steps", str(args.max_steps)]
            cmd += ["--threads", str(args.threads), "--out", args.out] + (["--root", args.root] if args.root else [])
            proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
            lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
            if proc.returncode != 0 or not lines:
                print(f"{quantizer} seed {seed} failed:\n{proc.stderr[-3000:]}", file=sys.stderr, flush=True)
                continue
            rows.setdefault(quantizer, []).append(json.loads(lines[-1][7:]))
            print(f"{quantizer} seed {seed}: {rows[quantizer][-1]}", file=sys.stderr, flush=True)
    if not rows:
        sys.exit("every run failed")
    print(table(rows, args.max_steps, args.threads))


if __name__ == "__main__":
    main()
