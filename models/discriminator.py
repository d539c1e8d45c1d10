"""PatchGAN discriminator (Isola et al., pix2pix) with hinge loss and VQGAN's adaptive weight."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from tokenizers_q.checks import check_int


class PatchDiscriminator(nn.Module):
    r"""Classifies overlapping patches as real or reconstructed.

    Args:
        in_channels: image channels. Default: 3.
        base_channels: channels of the first layer, doubled per layer (at most x8). Default: 64.
        num_layers: strided layers; more layers see larger patches. Default: 3.

    Shapes:
        - input: (B, in_channels, H, W)
        - output: (B, 1, h, w) patch logits
    """

    def __init__(self, in_channels: int = 3, base_channels: int = 64, num_layers: int = 3):
        super().__init__()
        for name, value in (("in_channels", in_channels), ("base_channels", base_channels), ("num_layers", num_layers)):
            check_int(name, value)
        layers: list[nn.Module] = [nn.Conv2d(in_channels, base_channels, 4, 2, 1), nn.LeakyReLU(0.2)]
        channels = base_channels
        for i in range(1, num_layers + 1):
            out = base_channels * min(2**i, 8)
            stride = 2 if i < num_layers else 1
            layers += [nn.Conv2d(channels, out, 4, stride, 1), nn.GroupNorm(1, out), nn.LeakyReLU(0.2)]
            channels = out
        layers.append(nn.Conv2d(channels, 1, 4, 1, 1))
        self.net = nn.Sequential(*layers)
        self.num_layers = num_layers
        self.min_size = 3 * 2**num_layers  # each stride-2 layer halves, the two last 4x4 convs take 2 pixels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4 or min(x.shape[-2:]) < self.min_size:
            raise ValueError(
                f"expected images (B, C, H, W) of at least {self.min_size}x{self.min_size} for "
                f"{self.num_layers} layers, got {tuple(x.shape)}; use fewer layers for small images"
            )
        return self.net(x)


def hinge_d_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    """Discriminator hinge loss: mean(relu(1 - real)) + mean(relu(1 + fake)), halved."""
    return 0.5 * (F.relu(1.0 - logits_real).mean() + F.relu(1.0 + logits_fake).mean())


def hinge_g_loss(logits_fake: torch.Tensor) -> torch.Tensor:
    """Generator loss against a hinge discriminator: -mean(fake)."""
    return -logits_fake.mean()


def adaptive_gan_weight(rec_loss: torch.Tensor, g_loss: torch.Tensor, last_layer: torch.Tensor) -> torch.Tensor:
    """VQGAN's balance: ||grad rec|| / ||grad gan|| at the decoder's last layer, clamped to [0, 1e4]."""
    rec_grad = torch.autograd.grad(rec_loss, last_layer, retain_graph=True)[0]
    g_grad = torch.autograd.grad(g_loss, last_layer, retain_graph=True)[0]
    return (rec_grad.norm() / (g_grad.norm() + 1e-4)).clamp(0.0, 1e4).detach()
