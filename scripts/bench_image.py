"""Image tokenizers side by side: the same encoder/decoder and step budget for every quantizer.

    python scripts/bench_image.py                       # Fashion-MNIST: vq rvq fsq bsq lfq pq, seeds 0 1
    python scripts/bench_image.py --quantizers vq fsq --seeds 0 --max-steps 300
    python scripts/bench_image.py --data photos --quantizers vq fsq rvq pq --seeds 0 --max-steps 1500
    python scripts/bench_image.py --data photos --quantizers vq-16 fsq-16 bsq-16 lfq-16 vqp-fsq-16 --seeds 0

Each (quantizer, seed) trains in a fresh process through the ``tokq fit`` command line, then is measured on
the held-out images. ``--data fashion_mnist``: ``configs/image/<q>.yaml`` (32x32 grey, 8x8 tokens of ~10 bits),
the whole test split. ``--data photos``: ``configs/image/photo32.yaml`` with each row's quantizer, on 32x32
crops of scikit-image's colour photos split by photo (:mod:`tokenizers_q.trainers.photo_crops`), held-out
crops of photos never trained on, beside three classical coders at the same bits: the mean colour of each
4x4 patch from a k-means palette (bilinear upsampling), and JPEG / WebP at the tokens' byte size (Pillow; the
smallest file they can write is shown where that is larger). Rows ending in ``-16`` / ``-18`` code 16 / 18 bits
per token; ``vqp-*`` rows are vector-quantize-pytorch modules through :class:`tokenizers_q.VectorQuantizePytorch`.
Prints one markdown table, mean +- std over seeds.
"""

from __future__ import annotations

import argparse
import io
import json
import math
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
FASHION_QUANTIZERS = ("vq", "rvq", "fsq", "bsq", "lfq", "pq")
#: the photo rows: the quantizer that replaces photo32.yaml's, for a latent of PHOTO_DIM channels
PHOTO_DIM = 32
#: LlamaGen's factorised codes: an 8-d L2-normalised lookup
FACTORISED = {"codebook_dim": 8, "use_cosine_sim": True}


def _vq(size: int) -> dict:
    args = {"dim": PHOTO_DIM, "codebook_size": size, **FACTORISED, "threshold_ema_dead_code": 1.0}
    return {"class_path": "tokenizers_q.VQ", "init_args": args}


def _ours(name: str, **args) -> dict:
    return {"class_path": f"tokenizers_q.{name}", "init_args": {"dim": PHOTO_DIM, **args}}


def _vqp(name: str, **args) -> dict:
    return {"class_path": "tokenizers_q.VectorQuantizePytorch", "init_args": {"name": name, "kwargs": args}}


# Rows state every argument that differs from the class's default: `--model.init_args.quantizer` with another
# class_path keeps the config's init_args that the new class also takes (photo32.yaml's codebook_dim: 8 reaches RVQ).
PHOTO_QUANTIZERS = {
    "vq": _vq(1024),
    "fsq": _ours("FSQ", levels=[16, 8, 8]),  # a 3-d grid: above [8, 5, 5, 5] and every other split tried (README)
    "rvq": _ours(
        "RVQ", num_quantizers=2, codebook_dim=8, quantizer_kwargs={"codebook_size": 32, "threshold_ema_dead_code": 1.0}
    ),
    "pq": _ours(
        "PQ", num_groups=2, quantizer_kwargs={**FACTORISED, "codebook_size": 32, "threshold_ema_dead_code": 1.0}
    ),
    "bsq": _ours("BSQ", codebook_size=1024),
    "lfq": _ours("LFQ", codebook_size=1024),
    "vq-16": _vq(2**16),
    "fsq-16": _ours("FSQ", levels=[8, 8, 8, 5, 5, 5]),
    "fsq3-16": _ours("FSQ", levels=[64, 32, 32]),  # a 3-d grid, as the 10-bit row
    "bsq-16": _ours("BSQ", codebook_size=2**16),
    "lfq-16": _ours("LFQ", codebook_size=2**16),
    "rvq-16": _ours(
        "RVQ", num_quantizers=2, codebook_dim=8, quantizer_kwargs={"codebook_size": 256, "threshold_ema_dead_code": 1.0}
    ),
    "pq-16": _ours("PQ", num_groups=2, quantizer_kwargs={"codebook_size": 256, "threshold_ema_dead_code": 1.0}),
    "vqp-vq-16": _vqp("VectorQuantize", dim=PHOTO_DIM, codebook_size=2**16, codebook_dim=8, use_cosine_sim=True),
    "vqp-fsq-16": _vqp("FSQ", dim=PHOTO_DIM, levels=[8, 8, 8, 5, 5, 5]),
    "vqp-lfq-16": _vqp("LFQ", dim=PHOTO_DIM, codebook_size=2**16),
    "vq-18": _vq(2**18),
    "fsq-18": _ours("FSQ", levels=[8, 8, 8, 8, 8, 8]),
    "bsq-18": _ours("BSQ", codebook_size=2**18),
    "lfq-18": _ours("LFQ", codebook_size=2**18),
}
for _name in PHOTO_QUANTIZERS:
    PHOTO_QUANTIZERS[_name]["init_args"].setdefault("channel_first", True)
COLUMNS = (
    ("psnr", 2),
    ("ssim", 3),
    ("mean_error", 3),
    ("usage", 3),
    ("train_usage", 3),
    ("perplexity", 0),
    ("train_images_per_s", 0),
    ("train_minutes", 1),
)


def run_cell(data: str, quantizer: str, seed: int, max_steps: int, out: str, root: str | None) -> dict:
    """Train and test one tokenizer in this process; returns its measurements."""
    import torch

    from tokenizers_q.trainers.cli import lightning_cli

    config = f"{quantizer}.yaml" if data == "fashion_mnist" else "photo32.yaml"
    argv = ["fit", "--config", str(ROOT / "configs" / "image" / config), "--seed_everything", str(seed)]
    argv += ["--trainer.max_steps", str(max_steps), "--trainer.val_check_interval", str(max_steps)]
    argv += ["--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false"]
    argv += ["--trainer.logger.init_args.save_dir", out, "--trainer.logger.init_args.name", f"{quantizer}-seed{seed}"]
    if data == "photos":
        argv += ["--model.init_args.quantizer", json.dumps(PHOTO_QUANTIZERS[quantizer])]
        if "bsq" in quantizer or "lfq" in quantizer:  # entropy weight from 3x, annealed (Open-MAGVIT2, MaskBit)
            argv += ["--model.init_args.entropy_annealing_steps", str(max_steps // 3)]
            argv += ["--model.init_args.entropy_annealing_factor", "3.0"]
        argv += ["--data.init_args.root", f"{root}/train", "--data.init_args.test_root", f"{root}/test"]
    elif root:
        argv += ["--data.init_args.root", root]
    start = time.perf_counter()
    cli = lightning_cli(argv)
    seconds = time.perf_counter() - start
    model = cli.model.eval()
    loader = cli.datamodule.dataloader("test")
    images, recons = [], []
    for batch in loader:
        codes = model.encode(batch[0])
        images.append(batch[0])
        recons.append(model.decode(codes))
    stats = model.code_statistics(loader)
    train_usage = model.code_statistics(cli.datamodule.dataloader("train"))["usage"]
    return {
        "bits_per_token": model.quantizer.spec.bits_per_token,
        "bits_per_image": model.bits_per_image(tuple(codes.shape)),
        **quality(torch.cat(recons), torch.cat(images)),
        "usage": statistics.mean(stats["usage"]) if stats["usage"] else math.nan,
        "train_usage": statistics.mean(train_usage) if train_usage else math.nan,
        "perplexity": statistics.mean(stats["perplexity"]) if stats["perplexity"] else math.nan,
        "train_images_per_s": max_steps * cli.datamodule.batch_size / seconds,
        "train_minutes": seconds / 60,
    }


# -- classical coders at the same bits (photos) -------------------------------------------------------------
def read_folder(root: Path):
    """All images of an ImageFolder as float (N, 3, H, W) in [0, 1]."""
    import numpy as np
    import torch
    from PIL import Image

    files = sorted(root.glob("*/*.png"))
    images = np.stack([np.asarray(Image.open(f).convert("RGB")) for f in files])
    return torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255.0


def quality(recon, x) -> dict:
    """PSNR (the mean of each image's PSNR), SSIM and the largest per-channel mean error of reconstructions
    (B, C, H, W) of images ``x`` in [0, 1]; every row of the table is measured by this."""
    from torchmetrics.functional.image import peak_signal_noise_ratio, structural_similarity_index_measure

    psnr = peak_signal_noise_ratio(recon, x, data_range=1.0, reduction="none", dim=(1, 2, 3)).mean()
    ssim = structural_similarity_index_measure(recon, x, data_range=1.0)
    mean_error = (recon - x).mean((0, 2, 3)).abs().max()
    return {"psnr": psnr.item(), "ssim": ssim.item(), "mean_error": mean_error.item()}


def patch_palette(train, test, patch: int = 4, bits: int = 10, seed: int = 0) -> dict:
    """Each ``patch`` x ``patch`` patch's mean colour, coded as the nearest of a k-means palette of 2^bits colours
    fitted on the training images' patch means; decoded by bilinear upsampling of the patch colours."""
    import torch
    import torch.nn.functional as F

    from tokenizers_q import kmeans
    from tokenizers_q.search import nearest

    means = F.avg_pool2d(train, patch).permute(0, 2, 3, 1).reshape(-1, 3)
    palette = kmeans(means, 2**bits, 20, generator=torch.Generator().manual_seed(seed)).centroids
    test_means = F.avg_pool2d(test, patch)
    codes, _ = nearest(test_means.permute(0, 2, 3, 1).reshape(-1, 3), palette)
    coded = palette[codes].reshape(*test_means.shape[:1], *test_means.shape[2:], 3).permute(0, 3, 1, 2)
    recon = F.interpolate(coded, size=test.shape[-2:], mode="bilinear", align_corners=False).clamp(0, 1)
    tokens = test_means.shape[-1] * test_means.shape[-2]
    counts = torch.bincount(codes, minlength=2**bits)
    return {**quality(recon, test), "bits_per_image": tokens * bits, "usage": (counts > 0).float().mean().item()}


def encode(image, codec: str, quality: int) -> bytes:
    """``image`` (PIL) as a ``codec`` file at ``quality``."""
    buffer = io.BytesIO()
    image.save(buffer, format=codec, quality=quality)
    return buffer.getvalue()


def classical_codec(test, codec: str, max_bytes: int) -> dict:
    """JPEG or WebP (Pillow) of each image at the highest quality whose file fits ``max_bytes``; where even the
    lowest quality does not fit, the lowest quality's file (its size is reported)."""
    import numpy as np
    import torch
    from PIL import Image

    recons, sizes = [], []
    for image in test:
        pil = Image.fromarray((image.permute(1, 2, 0) * 255).round().byte().numpy())
        best, low, high = None, 1, 95
        while low <= high:  # file size grows with quality: binary search the largest quality that fits
            q = (low + high) // 2
            encoded = encode(pil, codec, q)
            if len(encoded) <= max_bytes:
                best, low = encoded, q + 1
            else:
                high = q - 1
        best = best if best is not None else encode(pil, codec, 1)
        sizes.append(len(best))
        decoded = np.asarray(Image.open(io.BytesIO(best)).convert("RGB"))
        recons.append(torch.from_numpy(decoded.copy()).permute(2, 0, 1).float() / 255.0)
    return {**quality(torch.stack(recons), test), "bits_per_image": 8 * statistics.mean(sizes)}


def photo_baselines(root: Path, bits_per_image: list[int]) -> dict[str, dict]:
    train, test = read_folder(root / "train"), read_folder(root / "test")
    rows = {"patch palette (1024 colours)": patch_palette(train, test)}
    for bits in sorted(set(bits_per_image)):
        for codec in ("JPEG", "WebP"):
            rows[f"{codec} at {bits // 8} bytes"] = classical_codec(test, codec, bits // 8)
    return rows


# -- the table ------------------------------------------------------------------------------------------------
def mean_std(values: list[float], digits: int) -> str:
    if not values or any(math.isnan(v) for v in values):
        return "-"
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return f"{statistics.mean(values):.{digits}f} +- {statistics.stdev(values):.{digits}f}"


def table(rows: dict[str, list[dict]], note: str) -> str:
    head = "| method | bits/token | bits/image | PSNR dB | SSIM | max channel mean error | usage | train usage "
    lines = [head + "| perplexity | train img/s | train min |", "|---" * 11 + "|"]
    for name, cells in rows.items():
        cols = [mean_std([c[key] for c in cells if key in c], digits) for key, digits in COLUMNS]
        bits = cells[0].get("bits_per_token", "-")
        lines.append(f"| {name} | {bits} | {cells[0]['bits_per_image']:.0f} | {' | '.join(cols)} |")
    return "\n".join(lines) + "\n" + note


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", choices=("fashion_mnist", "photos"), default="fashion_mnist")
    parser.add_argument("--quantizers", nargs="+", help="rows (default: the six 10-bit quantizers)")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1])
    parser.add_argument("--max-steps", type=int, default=1200)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default="runs/bench_image")
    parser.add_argument("--root", help="Fashion-MNIST folder (default: Debian's package) or photo crops folder")
    parser.add_argument("--train-crops", type=int, default=3000, help="photos: training crops")
    parser.add_argument("--test-crops", type=int, default=500, help="photos: held-out crops")
    parser.add_argument("--no-baselines", action="store_true", help="photos: skip the classical coders")
    parser.add_argument("--cell", nargs=2, metavar=("QUANTIZER", "SEED"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    choices = FASHION_QUANTIZERS if args.data == "fashion_mnist" else tuple(PHOTO_QUANTIZERS)
    quantizers = args.quantizers or list(FASHION_QUANTIZERS)
    unknown = [q for q in quantizers if q not in choices]
    if unknown:
        parser.error(f"unknown rows {unknown} for --data {args.data}; choose from {', '.join(choices)}")

    if args.cell:
        import torch

        torch.set_num_threads(args.threads)
        result = run_cell(args.data, args.cell[0], int(args.cell[1]), args.max_steps, args.out, args.root)
        print("RESULT " + json.dumps(result))
        return

    root = args.root
    if args.data == "photos" and root is None:
        from tokenizers_q.trainers.photo_crops import write_photo_crops

        root = f"{args.out}/photos32-{args.train_crops}-{args.test_crops}"
        if not Path(root, "test").is_dir():
            write_photo_crops(root, 32, args.train_crops, args.test_crops)
    rows: dict[str, list[dict]] = {}
    # with more than one thread, OpenMP's spin-waiting on a shared machine costs more than it saves
    env = {"OMP_WAIT_POLICY": "PASSIVE", **os.environ, "OMP_NUM_THREADS": str(args.threads), "PYTHONWARNINGS": "ignore"}
    for quantizer in quantizers:
        for seed in args.seeds:
            cmd = [sys.executable, __file__, "--data", args.data, "--cell", quantizer, str(seed)]
            cmd += ["--max-steps", str(args.max_steps), "--threads", str(args.threads), "--out", args.out]
            cmd += ["--root", root] if root else []
            proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
            lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
            if proc.returncode != 0 or not lines:
                print(f"{quantizer} seed {seed} failed:\n{proc.stderr[-3000:]}", file=sys.stderr, flush=True)
                continue
            rows.setdefault(quantizer, []).append(json.loads(lines[-1][7:]))
            print(f"{quantizer} seed {seed}: {rows[quantizer][-1]}", file=sys.stderr, flush=True)
    if args.data == "photos" and not args.no_baselines:
        bits = [cells[0]["bits_per_image"] for cells in rows.values()] or [640]
        rows.update({name: [row] for name, row in photo_baselines(Path(root), bits).items()})
    if not rows:
        sys.exit("every run failed")
    seeds = len(args.seeds)
    held_out = "test split (10k images)" if args.data == "fashion_mnist" else f"{args.test_crops} held-out crops"
    note = f"{args.max_steps} steps per run, {args.threads} thread(s), {seeds} seed(s); {held_out}; PSNR: mean of each "
    note += "image's PSNR."
    print(table(rows, note))


if __name__ == "__main__":
    main()
