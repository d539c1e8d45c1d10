"""Train the Fashion-MNIST classifier whose features score samples (models/feature_classifier.py).

    python scripts/train_feature_classifier.py [--epochs 4] [--root /usr/share/datasets/fashion-mnist]

Writes models/weights/fashion_mnist_classifier.safetensors (atomically) and prints the test accuracy.
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F
from tqdm import tqdm

from tokenizers_q.files import atomic_write
from tokenizers_q.models.feature_classifier import WEIGHTS, FeatureClassifier
from tokenizers_q.trainers.data import ImageDataModule


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--root", help="Fashion-MNIST folder (default: Debian's package)")
    args = parser.parse_args()

    torch.manual_seed(0)
    data = ImageDataModule(root=args.root, batch_size=128, val_fraction=0.0)
    model = FeatureClassifier()
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=1e-4)
    loader = data.dataloader("train", shuffle=True)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(opt, 2e-3, total_steps=args.epochs * len(loader))
    start = time.perf_counter()
    for epoch in range(args.epochs):
        loader.sampler.set_epoch(epoch)
        for x, y in tqdm(loader, desc=f"epoch {epoch}", unit="batch"):
            x = x + 0.03 * torch.randn_like(x)  # light noise: features should not hinge on exact pixels
            loss = F.cross_entropy(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            scheduler.step()
    model.eval()
    with torch.no_grad():
        correct = sum((model(x).argmax(1) == y).sum().item() for x, y in data.dataloader("test"))
    accuracy = correct / len(data.splits["test"])
    from safetensors.torch import save_file

    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    atomic_write(WEIGHTS, lambda tmp: save_file(state, tmp))
    minutes = (time.perf_counter() - start) / 60
    print(f"test accuracy {accuracy:.4f} after {args.epochs} epochs ({minutes:.1f} min); wrote {WEIGHTS}")


if __name__ == "__main__":
    main()
