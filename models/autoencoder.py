"""Convolutional encoder and decoder in the VQGAN family (Esser et al., 2021).

Residual blocks with GroupNorm and SiLU, strided-convolution downsampling and
nearest-neighbour upsampling. Each stage ``i`` has ``base_channels *
channel_mult[i]`` channels; there are ``len(channel_mult) - 1`` resolution
changes, so the downsampling factor is ``2 ** (len(channel_mult) - 1)``. The
encoder emits a channel-first feature map of ``latent_dim`` channels for a
quantizer built with ``channel_first=True``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from tokenizers_q.checks import check_choice, check_int

NORMS = ("group", "pixel", "none")


class PixelNorm(nn.Module):
    """LayerNorm over the channels of each pixel alone, with a per-channel affine.

    Unlike GroupNorm it takes no statistics over the image, so a flat image keeps its colour.

    Shapes:
        - input, output: (B, C, H, W)
    """

    def __init__(self, channels: int, eps: float = 1e-6):
        super().__init__()
        self.norm = nn.LayerNorm(channels, eps=eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(x.movedim(1, -1)).movedim(-1, 1)


def _norm(channels: int, kind: str = "group") -> nn.Module:
    if kind == "pixel":
        return PixelNorm(channels)
    if kind == "none":
        return nn.Identity()
    groups = next(g for g in (32, 16, 8, 4, 2, 1) if channels % g == 0)
    return nn.GroupNorm(groups, channels, eps=1e-6)


class ResBlock(nn.Module):
    """Pre-activation residual block: (GroupNorm, SiLU, conv3x3) x 2 plus a skip.

    Shapes:
        - input: (B, in_channels, H, W)
        - output: (B, out_channels, H, W)
    """

    def __init__(self, in_channels: int, out_channels: int, dropout: float = 0.0, norm: str = "group"):
        super().__init__()
        self.body = nn.Sequential(
            _norm(in_channels, norm),
            nn.SiLU(),
            nn.Conv2d(in_channels, out_channels, 3, padding=1),
            _norm(out_channels, norm),
            nn.SiLU(),
            nn.Dropout(dropout),
            nn.Conv2d(out_channels, out_channels, 3, padding=1),
        )
        self.skip = nn.Identity() if in_channels == out_channels else nn.Conv2d(in_channels, out_channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.skip(x) + self.body(x)


def _check_stages(in_channels, base_channels, channel_mult, num_res_blocks, latent_dim):
    for name, value in (
        ("in_channels", in_channels),
        ("base_channels", base_channels),
        ("num_res_blocks", num_res_blocks),
        ("latent_dim", latent_dim),
    ):
        check_int(name, value)
    if not channel_mult:
        raise ValueError("channel_mult must list at least one stage multiplier, got none")
    for i, m in enumerate(channel_mult):
        check_int(f"channel_mult[{i}]", m)


class Encoder(nn.Module):
    r"""Image -> channel-first latent map, downsampled by ``2 ** (len(channel_mult) - 1)``.

    Args:
        in_channels: image channels (1 grey, 3 colour). Default: 3.
        base_channels: channels of the first stage. Default: 64.
        channel_mult: channel multiplier of each stage. Default: (1, 2, 2).
        num_res_blocks: residual blocks per stage. Default: 1.
        latent_dim: channels of the output map (the quantizer's ``dim``). Default: 64.
        dropout: dropout inside residual blocks. Default: 0.

    Shapes:
        - input: (B, in_channels, H, W), H and W divisible by the downsampling factor
        - output: (B, latent_dim, H / f, W / f)
    """

    def __init__(
        self,
        in_channels: int = 3,
        base_channels: int = 64,
        channel_mult: Sequence[int] = (1, 2, 2),
        num_res_blocks: int = 1,
        latent_dim: int = 64,
        dropout: float = 0.0,
        norm: str = "group",
        low_pass: bool = False,
    ):
        super().__init__()
        channel_mult = tuple(channel_mult)
        check_choice("norm", norm, NORMS)
        _check_stages(in_channels, base_channels, channel_mult, num_res_blocks, latent_dim)
        self.low_pass = nn.Conv2d(in_channels, latent_dim, 1) if low_pass else None
        self.in_channels, self.latent_dim = in_channels, latent_dim
        self.downsample_factor = 2 ** (len(channel_mult) - 1)
        layers: list[nn.Module] = [nn.Conv2d(in_channels, base_channels * channel_mult[0], 3, padding=1)]
        channels = base_channels * channel_mult[0]
        for i, mult in enumerate(channel_mult):
            for _ in range(num_res_blocks):
                layers.append(ResBlock(channels, base_channels * mult, dropout, norm))
                channels = base_channels * mult
            if i < len(channel_mult) - 1:
                layers.append(nn.Conv2d(channels, channels, 4, stride=2, padding=1))
        layers += [ResBlock(channels, channels, dropout, norm), _norm(channels, norm), nn.SiLU()]
        layers.append(nn.Conv2d(channels, latent_dim, 1))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4 or x.shape[1] != self.in_channels:
            raise ValueError(
                f"Encoder expects images of shape (B, {self.in_channels}, H, W), got {tuple(x.shape)}; "
                f"set in_channels to the data's channel count"
            )
        f = self.downsample_factor
        if x.shape[-1] % f or x.shape[-2] % f:
            raise ValueError(f"image height and width must be divisible by {f}, got {tuple(x.shape[-2:])}")
        z = self.net(x)
        return z if self.low_pass is None else z + self.low_pass(F.avg_pool2d(x, f))


class Decoder(nn.Module):
    r"""Channel-first latent map -> image; the mirror of :class:`Encoder`.

    Args: as :class:`Encoder`, with ``out_channels`` for the image channels.

    Shapes:
        - input: (B, latent_dim, h, w)
        - output: (B, out_channels, h * f, w * f)
    """

    def __init__(
        self,
        out_channels: int = 3,
        base_channels: int = 64,
        channel_mult: Sequence[int] = (1, 2, 2),
        num_res_blocks: int = 1,
        latent_dim: int = 64,
        dropout: float = 0.0,
        norm: str = "group",
        low_pass: bool = False,
    ):
        super().__init__()
        channel_mult = tuple(channel_mult)
        check_choice("norm", norm, NORMS)
        _check_stages(out_channels, base_channels, channel_mult, num_res_blocks, latent_dim)
        self.upsample_factor = 2 ** (len(channel_mult) - 1)
        self.low_pass = nn.Conv2d(latent_dim, out_channels, 1) if low_pass else None
        self.out_channels, self.latent_dim = out_channels, latent_dim
        channels = base_channels * channel_mult[-1]
        layers: list[nn.Module] = [
            nn.Conv2d(latent_dim, channels, 3, padding=1),
            ResBlock(channels, channels, dropout, norm),
        ]
        for i, mult in reversed(list(enumerate(channel_mult))):
            for _ in range(num_res_blocks):
                layers.append(ResBlock(channels, base_channels * mult, dropout, norm))
                channels = base_channels * mult
            if i > 0:
                layers += [nn.Upsample(scale_factor=2, mode="nearest"), nn.Conv2d(channels, channels, 3, padding=1)]
        layers += [_norm(channels, norm), nn.SiLU(), nn.Conv2d(channels, out_channels, 3, padding=1)]
        self.net = nn.Sequential(*layers)

    @property
    def last_layer(self) -> torch.Tensor:
        """Weight of the output convolution (for the adaptive GAN weight)."""
        return self.net[-1].weight

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        if z.dim() != 4 or z.shape[1] != self.latent_dim:
            raise ValueError(f"Decoder expects latents of shape (B, {self.latent_dim}, h, w), got {tuple(z.shape)}")
        out = self.net(z)
        if self.low_pass is not None:
            out = out + F.interpolate(self.low_pass(z), scale_factor=self.upsample_factor, mode="bilinear")
        return out
