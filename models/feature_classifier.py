"""A small Fashion-MNIST classifier whose features score generated images (a Fréchet distance).

Pretrained Inception weights cannot be downloaded here, so sample quality is
measured on the 128-d penultimate features of this network, trained in this
repository by ``scripts/train_feature_classifier.py`` and shipped with it
(``weights/fashion_mnist_classifier.safetensors``, ~0.3 MB). The resulting
Fréchet distances are comparable between models scored with these weights, and
**not** with FID values computed on Inception features (ImageNet FID).
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

WEIGHTS = Path(__file__).parent / "weights" / "fashion_mnist_classifier.safetensors"


class FeatureClassifier(nn.Module):
    r"""Conv net for 32x32 grey images in [0, 1]: 3 stages of two 3x3 convs, then a 128-d feature layer.

    Args:
        num_classes: Default: 10.
        width: channels of the first stage (doubled per stage). Default: 16.

    Shapes:
        - input: (B, 1, 32, 32) in [0, 1]
        - :meth:`features`: (B, 128); output: (B, num_classes) logits
    """

    def __init__(self, num_classes: int = 10, width: int = 16):
        super().__init__()
        layers: list[nn.Module] = []
        channels = 1
        for stage in range(3):
            out = width * 2**stage
            for _ in range(2):
                layers += [nn.Conv2d(channels, out, 3, padding=1), nn.BatchNorm2d(out), nn.ReLU()]
                channels = out
            layers.append(nn.MaxPool2d(2))
        self.body = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(channels, 128), nn.ReLU())
        self.head = nn.Linear(128, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4 or x.shape[1:] != (1, 32, 32):
            raise ValueError(f"expected grey 32x32 images (B, 1, 32, 32), got {tuple(x.shape)}")
        return self.body(x * 2.0 - 1.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))

    @classmethod
    def pretrained(cls) -> FeatureClassifier:
        """The weights shipped with the library, in eval mode."""
        from safetensors.torch import load_file

        if not WEIGHTS.is_file():
            raise FileNotFoundError(f"{WEIGHTS} is missing: run scripts/train_feature_classifier.py")
        model = cls()
        model.load_state_dict(load_file(WEIGHTS))
        return model.eval()
