"""LPIPS-style perceptual distance (Zhang et al., 2018) on frozen VGG16 features, for image tokenizers.

VQGAN and LlamaGen train their autoencoders with LPIPS as the perceptual loss. This module computes
the same kind of distance on torchvision's VGG16 ``features`` layers, from a weights file already on
disk: nothing is ever downloaded.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from tokenizers_q.checks import check_choice, check_finite, check_float_tensor, check_int

VGG16_FILE = "vgg16-397923af.pth"  # the name torchvision caches ImageNet VGG16 weights under
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
REDUCTIONS = ("mean", "sum", "none")

# torchvision's VGG16 ``features``: 3x3 convolutions (each followed by a ReLU) and 2x2 max-pools ("M").
_VGG16_CFG = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M")


# The kind of each module of ``features``, in order: "conv", "relu" or "pool".
_KINDS = tuple(kind for item in _VGG16_CFG for kind in (("pool",) if item == "M" else ("conv", "relu")))
_POOL_INDICES = tuple(index for index, kind in enumerate(_KINDS) if kind == "pool")
_VGG16_KEYS = frozenset(
    f"{index}.{part}" for index, kind in enumerate(_KINDS) if kind == "conv" for part in ("weight", "bias")
)


def _relu_names() -> dict[str, int]:
    """``{"relu1_1": 1, "relu1_2": 3, ..., "relu5_3": 29}``: each ReLU's index in ``features``."""
    names, block, conv = {}, 1, 1
    for index, kind in enumerate(_KINDS):
        if kind == "pool":
            block, conv = block + 1, 1
        elif kind == "relu":
            names[f"relu{block}_{conv}"] = index
            conv += 1
    return names


VGG16_LAYERS = _relu_names()


def _vgg16_features(depth: int) -> nn.Sequential:
    """The first ``depth`` modules of torchvision's ``vgg16().features`` (same indices, same state-dict keys)."""
    layers: list[nn.Module] = []
    channels = 3
    for item in _VGG16_CFG:
        if item == "M":
            layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
        else:
            layers += [nn.Conv2d(channels, item, kernel_size=3, padding=1), nn.ReLU(inplace=True)]
            channels = item
    return nn.Sequential(*layers[:depth])


def default_weights_path() -> Path:
    """Where torchvision caches its ImageNet VGG16 weights: ``torch.hub.get_dir()/checkpoints/vgg16-397923af.pth``."""
    return Path(torch.hub.get_dir()) / "checkpoints" / VGG16_FILE


def _read_state_dict(path: Path) -> dict:
    """The tensors of a ``.safetensors`` file, or a ``torch.save``'d state dict loaded with ``weights_only=True``."""
    try:
        if path.suffix == ".safetensors":
            from safetensors import safe_open

            with safe_open(str(path), framework="pt", device="cpu") as file:  # reads only the tensors it needs
                return {key: file.get_tensor(key) for key in file.keys() if not key.startswith("classifier.")}  # noqa: SIM118
        try:  # memory-maps the zip format, so that a full VGG16 file does not read its 120M classifier weights
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError:  # torchvision's own file is in the legacy format, which cannot be memory-mapped
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # corrupted file, or a pickle holding more than tensors
        raise ValueError(
            f"PerceptualLoss: cannot read VGG16 weights from {path}: {type(error).__name__}: {error}"
        ) from error
    if not isinstance(state, dict):
        raise ValueError(f"PerceptualLoss: {path} holds a {type(state).__name__}, expected a VGG16 state dict")
    return state


def _features_state(state: dict, path: Path, features: nn.Sequential) -> dict[str, torch.Tensor]:
    """The entries of ``state`` that ``features`` needs, under its own keys; a ``ValueError`` at the first bad key."""
    full = any(isinstance(key, str) and key.startswith("features.") for key in state)
    prefix = "features." if full else ""
    loaded = {}
    for key, value in state.items():
        if full and not (isinstance(key, str) and key.startswith(prefix)):
            continue  # the classifier of a full VGG16 state dict
        name = key[len(prefix) :] if isinstance(key, str) else key
        if name not in _VGG16_KEYS:
            raise ValueError(
                f"PerceptualLoss: {path} is not a torchvision VGG16 state dict: unexpected key {key!r} "
                f"(expected {prefix}N.weight and {prefix}N.bias of the convolutions in features)"
            )
        loaded[name] = value
    for name, expected in features.state_dict().items():
        key = prefix + name
        if name not in loaded:
            raise ValueError(f"PerceptualLoss: {path} lacks the VGG16 key {key!r}")
        value = loaded[name]
        if not isinstance(value, torch.Tensor) or not value.dtype.is_floating_point:
            raise ValueError(f"PerceptualLoss: {path}: {key!r} is not a floating-point tensor")
        if value.shape != expected.shape:
            raise ValueError(
                f"PerceptualLoss: {path}: {key!r} has shape {tuple(value.shape)}, VGG16 has {tuple(expected.shape)}"
            )
        check_finite(value, f"PerceptualLoss: {path}: {key!r}", hint="the weights file is damaged")
    return {name: loaded[name] for name in features.state_dict()}


class PerceptualLoss(nn.Module):
    r"""LPIPS-style distance between images on frozen VGG16 features (Zhang et al., 2018).

    Images in [0, 1] are normalised with the ImageNet mean and std and run through torchvision's
    VGG16 ``features`` up to the last requested layer. At each layer the activations are unit-normalised
    over channels (``f / (||f||_2 + eps)``), and the squared difference between the two images is averaged
    over channels and positions; the layers are summed. Unlike LPIPS the channels are weighted uniformly:
    LPIPS's learned linear ("lin") weights are a separate download and are not available offline, so this
    is LPIPS's uncalibrated baseline variant, with values on a different scale than published LPIPS.

    The VGG16 weights come from a file, never from the network. The VGG is frozen, always in eval mode,
    and kept out of ``state_dict()`` and ``parameters()``: a checkpoint of the module that holds this loss
    does not carry its 15M weights, and rebuilding that module from its configuration re-reads the file.
    It still follows ``.to()``, ``.cuda()``, ``.half()`` and the like.

    Args:
        weights: a file of torchvision's VGG16 weights: its own ``vgg16-397923af.pth`` (read with
            ``weights_only=True``) or a ``.safetensors`` file of the same tensors; either the full VGG16
            state dict (``features.N.weight``; the classifier is ignored) or only its ``features`` part.
            None: torchvision's cached ``torch.hub.get_dir()/checkpoints/vgg16-397923af.pth``, which must exist.
        layers: the VGG16 ReLU outputs compared, from ``relu1_1`` to ``relu5_3``. Default: LPIPS's five,
            ``("relu1_2", "relu2_2", "relu3_3", "relu4_3", "relu5_3")``.
        resize: bilinearly resize both images to ``resize x resize`` before the VGG (e.g. 224); None: as given.
        reduction: ``"mean"`` or ``"sum"`` over the batch, or ``"none"`` for one distance per image.
            Default: ``"mean"``.
        eps: added to the channel norm before dividing. Default: 1e-10 (as LPIPS).

    Shapes:
        - x, y: (B, 3, H, W) or (B, 1, H, W) (grey, repeated to 3 channels), values in [0, 1]; H and W at least
          ``min_size`` (2 to the number of max-pools before the last layer, 16 for ``relu5_3``)
        - output: () for ``"mean"`` and ``"sum"``, (B,) for ``"none"``

    Raises:
        FileNotFoundError: ``weights`` does not exist, or is None and torchvision's cache has no VGG16 file.
        ValueError: the file cannot be read, or is not a VGG16 state dict (names the first bad key).
    """

    def __init__(
        self,
        weights: str | os.PathLike | None = None,
        layers: Sequence[str] = ("relu1_2", "relu2_2", "relu3_3", "relu4_3", "relu5_3"),
        resize: int | None = None,
        reduction: str = "mean",
        eps: float = 1e-10,
    ):
        super().__init__()
        if isinstance(layers, str):
            layers = (layers,)
        layers = tuple(layers)
        if not layers:
            raise ValueError("layers must name at least one VGG16 layer, got ()")
        for layer in layers:
            check_choice("layers", layer, VGG16_LAYERS)
        if len(set(layers)) != len(layers):
            raise ValueError(f"layers must not repeat a layer, got {layers}")
        self.layers = tuple(sorted(layers, key=VGG16_LAYERS.__getitem__))
        depth = VGG16_LAYERS[self.layers[-1]] + 1
        self.min_size = 2 ** sum(index < depth for index in _POOL_INDICES)  # each max-pool halves the size
        if resize is not None:
            check_int("resize", resize, minimum=self.min_size)
        self.resize = resize
        self.reduction = check_choice("reduction", reduction, REDUCTIONS)
        if not eps > 0:
            raise ValueError(f"eps must be positive, got {eps}")
        self.eps = float(eps)
        self.weights = None if weights is None else str(weights)
        self.weights_path = self._resolve(weights)

        features = _vgg16_features(depth)
        features.load_state_dict(_features_state(_read_state_dict(self.weights_path), self.weights_path, features))
        features.requires_grad_(False).eval()
        # Not a registered submodule: out of state_dict(), parameters() and the parent's train()/requires_grad_();
        # _apply below moves it with the module.
        object.__setattr__(self, "features", features)
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)

    @staticmethod
    def _resolve(weights) -> Path:
        if weights is not None:
            path = Path(weights)
            if not path.is_file():
                raise FileNotFoundError(f"PerceptualLoss: weights file {path} does not exist (VGG16 weights expected)")
            return path
        path = default_weights_path()
        if not path.is_file():
            raise FileNotFoundError(
                f"PerceptualLoss needs torchvision's ImageNet VGG16 weights: pass weights=<path of a .pth or "
                f".safetensors file of VGG16>, or place torchvision's {VGG16_FILE} at {path} (the cache where "
                f"it is looked for when weights is None), or train without it (tokq fit ... --model.init_args."
                f"perceptual null). Nothing is downloaded."
            )
        return path

    def _apply(self, fn, recurse=True):
        if recurse:
            self.features._apply(fn)
        return super()._apply(fn, recurse)

    def train(self, mode: bool = True) -> PerceptualLoss:
        """Sets this module's flag; the VGG stays in eval mode."""
        super().train(mode)
        self.features.eval()
        return self

    def _prepare(self, name: str, x: torch.Tensor) -> torch.Tensor:
        check_float_tensor(name, x)
        if x.dim() != 4 or x.shape[1] not in (1, 3):
            raise ValueError(
                f"PerceptualLoss: {name} must be images (B, 3, H, W) or (B, 1, H, W), got {tuple(x.shape)}"
            )
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        if self.resize is not None and tuple(x.shape[-2:]) != (self.resize, self.resize):
            x = F.interpolate(x, size=(self.resize, self.resize), mode="bilinear", align_corners=False, antialias=True)
        elif min(x.shape[-2:]) < self.min_size:
            raise ValueError(
                f"PerceptualLoss: {name} images must be at least {self.min_size}x{self.min_size} to reach "
                f"{self.layers[-1]}, got {tuple(x.shape)}; pass resize= or compare shallower layers"
            )
        return (x.to(self.mean.dtype) - self.mean) / self.std

    def layer_features(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """The VGG16 activations of images ``x`` (in [0, 1]) at each of ``layers``, before unit normalisation.

        Shapes:
            - x: (B, 3, H, W) or (B, 1, H, W)
            - output: ``{layer: (B, C_layer, H_layer, W_layer)}``
        """
        return self._features(self._prepare("x", x))

    def _features(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        wanted = {VGG16_LAYERS[layer]: layer for layer in self.layers}
        out = {}
        for index, module in enumerate(self.features):
            x = module(x)
            if index in wanted:
                out[wanted[index]] = x
        return out

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        a, b = self._prepare("x", x), self._prepare("y", y)
        if a.shape != b.shape:
            raise ValueError(
                f"PerceptualLoss: x and y must be images of one size, got {tuple(x.shape)} and {tuple(y.shape)}"
            )
        batch = a.shape[0]
        distance = a.new_zeros(batch)
        for f in self._features(torch.cat([a, b])).values():
            f = f / (torch.linalg.vector_norm(f, dim=1, keepdim=True) + self.eps)
            distance = distance + (f[:batch] - f[batch:]).pow(2).mean(dim=(1, 2, 3))
        if self.reduction == "none":
            return distance
        return distance.sum() if self.reduction == "sum" else distance.mean()

    def extra_repr(self) -> str:
        return (
            f"weights={str(self.weights_path)!r}, layers={self.layers}, resize={self.resize}, "
            f"reduction={self.reduction!r}"
        )
