"""Transformers on the tokens of each image tokenizer: the same model and step budget for every quantizer.

    python scripts/bench_image.py --seeds 0          # first: the tokenizers (runs/bench_image/<q>-seed0)
    python scripts/bench_transformer.py              # then: AR and MaskGIT on each one's tokens
    python scripts/bench_transformer.py --quantizers vq fsq --steps 300 --samples 500

For each tokenizer: encode Fashion-MNIST train and test to token files, train a
class-conditional autoregressive model and a MaskGIT model on the training
tokens, then measure on the test split: the AR model's negative log-likelihood
(bits per image: the size an entropy coder driven by the model would reach),
MaskGIT's masked-token accuracy, the Fréchet distance of class-balanced samples
to held-out images on the features of the library's Fashion-MNIST classifier
(not comparable to ImageNet FID), and sampling speed. ``recon FD`` is the
distance of the tokenizer's own reconstructions: the floor for its samples.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import lightning as L
import torch

from tokenizers_q.metrics import frechet_distance
from tokenizers_q.models.feature_classifier import FeatureClassifier
from tokenizers_q.packing import save_tokens
from tokenizers_q.trainers import AutoregressiveTokenModule, MaskedTokenModule, TokenDataModule, load_tokenizer
from tokenizers_q.trainers.cli import datamodule_from_checkpoint, encode_split

QUANTIZERS = ("vq", "rvq", "fsq", "bsq", "lfq", "pq")
MODELS = {"ar": AutoregressiveTokenModule, "maskgit": MaskedTokenModule}


@torch.no_grad()
def features(classifier: FeatureClassifier, images: torch.Tensor, batch: int = 500) -> torch.Tensor:
    return torch.cat([classifier.features(images[i : i + batch]) for i in range(0, len(images), batch)])


def encode_files(ckpt: Path, out: Path, name: str, train_images: int) -> dict[str, Path]:
    tokenizer = load_tokenizer(ckpt)
    data = datamodule_from_checkpoint(ckpt, {"max_train_images": train_images})
    paths = {}
    for split in ("train", "test"):
        codes, labels = encode_split(tokenizer, data, split)
        paths[split] = save_tokens(
            out / f"{name}-{split}.safetensors",
            codes,
            tokenizer.quantizer.spec,
            {"checkpoint": str(ckpt)},
            {"labels": labels},
        )
    return paths


def run_quantizer(name: str, ckpt: Path, args, classifier, real: torch.Tensor, real_features: torch.Tensor) -> dict:
    tokenizer = load_tokenizer(ckpt)
    files = encode_files(ckpt, Path(args.out), name, args.train_images)
    row = {"bits_per_token": tokenizer.quantizer.spec.bits_per_token}
    with torch.no_grad():
        recon = torch.cat([tokenizer.decode(tokenizer.encode(real[i : i + 500])) for i in range(0, len(real), 500)])
    row["recon_fd"] = frechet_distance(features(classifier, recon), real_features)
    labels = torch.arange(args.samples) % 10
    for kind, cls in MODELS.items():
        L.seed_everything(0, verbose=False)
        model = cls(
            token_file=str(files["train"]), num_classes=10, dim=args.dim, depth=args.depth, num_heads=args.heads
        )
        row["uniform_bits_per_image"] = row["bits_per_token"] * model.seq_len
        data = TokenDataModule(str(files["train"]), test_tokens=str(files["test"]), batch_size=64)
        trainer = L.Trainer(
            max_steps=args.steps,
            limit_val_batches=0,
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            gradient_clip_val=1.0,
        )
        start = time.perf_counter()
        trainer.fit(model, data)
        row[f"{kind}_train_min"] = (time.perf_counter() - start) / 60
        torch.manual_seed(0)
        result = trainer.test(model, data, verbose=False)[0]
        if kind == "ar":
            row["ar_bits_per_image"] = result["test/bits_per_image"]
        else:
            row["maskgit_accuracy"] = result["test/masked_accuracy"]
        model.eval()
        torch.manual_seed(0)
        start = time.perf_counter()
        images = torch.cat(
            [model.sample_images(tokenizer, len(chunk), chunk) for chunk in labels.split(args.sample_batch)]
        )
        row[f"{kind}_images_per_s"] = args.samples / (time.perf_counter() - start)
        row[f"{kind}_fd"] = frechet_distance(features(classifier, images), real_features)
        print(f"{name} {kind}: {row}", file=sys.stderr, flush=True)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokenizers", default="runs/bench_image", help="folder of bench_image.py's runs")
    parser.add_argument("--quantizers", nargs="+", default=list(QUANTIZERS), choices=QUANTIZERS)
    parser.add_argument("--steps", type=int, default=800)
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--depth", type=int, default=4)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--samples", type=int, default=1000)
    parser.add_argument("--train-images", type=int, default=20000, help="training images to encode")
    parser.add_argument("--sample-batch", type=int, default=250)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default="runs/bench_transformer")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    classifier = FeatureClassifier.pretrained()
    rows = {}
    real = None
    for name in args.quantizers:
        ckpt = Path(args.tokenizers) / f"{name}-seed0" / "version_0" / "checkpoints" / "last.ckpt"
        if not ckpt.is_file():
            sys.exit(f"no tokenizer checkpoint at {ckpt}: run scripts/bench_image.py first (or pass --tokenizers)")
        if real is None:  # held-out images: the test split of the tokenizers' data
            data = datamodule_from_checkpoint(ckpt, {})
            real = torch.cat([x for x, _ in data.dataloader("test")])[: max(args.samples, 2000)]
            real_features = features(classifier, real)
            train = torch.cat([data.splits["train"][i][0][None] for i in range(len(real))])
            floor = frechet_distance(features(classifier, train), real_features)
        rows[name] = run_quantizer(name, ckpt, args, classifier, real, real_features)

    head = (
        "| quantizer | bits/token | AR bits/image (test NLL) | AR FD | AR img/s | MaskGIT masked acc | MaskGIT FD "
        "| MaskGIT img/s | recon FD |"
    )
    print(head)
    print("|---" * 9 + "|")
    for name, r in rows.items():
        print(
            f"| {name} | {r['bits_per_token']} | {r['ar_bits_per_image']:.1f} | {r['ar_fd']:.2f} | "
            f"{r['ar_images_per_s']:.0f} | {r['maskgit_accuracy']:.3f} | {r['maskgit_fd']:.2f} | "
            f"{r['maskgit_images_per_s']:.0f} | {r['recon_fd']:.2f} |"
        )
    minutes = sum(r["ar_train_min"] + r["maskgit_train_min"] for r in rows.values())
    print(
        f"\n{args.steps} steps of batch 64 per model (dim {args.dim}, depth {args.depth}, {args.heads} heads), "
        f"{args.threads} thread(s), {minutes:.0f} min of training in all; FD over {args.samples} class-balanced "
        f"samples vs {len(real)} test images; train vs test images: FD {floor:.2f}; uniform bits/image: "
        + ", ".join(f"{n} {r['uniform_bits_per_image']}" for n, r in rows.items())
    )


if __name__ == "__main__":
    main()
