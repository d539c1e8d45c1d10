"""PerceptualLoss on a randomly initialised VGG16 written to temporary files (no pretrained weights offline)."""

from __future__ import annotations

import math
import re

import pytest
import torch
import torchvision
from safetensors.torch import save_file
from torch import nn

from tokenizers_q.models import PerceptualLoss
from tokenizers_q.models.perceptual import IMAGENET_MEAN, IMAGENET_STD, VGG16_FILE, VGG16_LAYERS


def _torchvision_features() -> nn.Sequential:
    """torchvision's ``vgg16().features`` (built without its 120M-weight classifier), initialised as torchvision does,
    with small random biases so that loading the biases is tested too."""
    torch.manual_seed(0)
    features = torchvision.models.vgg.make_layers(torchvision.models.vgg.cfgs["D"])
    for module in features:
        if isinstance(module, nn.Conv2d):
            nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            nn.init.normal_(module.bias, std=0.01)
    return features.eval()


@pytest.fixture(scope="module")
def reference() -> nn.Sequential:
    return _torchvision_features()


@pytest.fixture(scope="module")
def files(reference, tmp_path_factory) -> dict:
    """The same weights as a full VGG16 state dict (.pth, zip format), a features-only state dict in torch's legacy
    format (as torchvision's own file) and a full state dict as .safetensors."""
    root = tmp_path_factory.mktemp("vgg")
    state = {name: tensor.clone() for name, tensor in reference.state_dict().items()}
    full = {f"features.{name}": tensor for name, tensor in state.items()}
    full["classifier.0.weight"] = torch.zeros(4, 8)  # ignored
    paths = {"full": root / "vgg16_full.pth", "legacy": root / VGG16_FILE, "safetensors": root / "vgg16.safetensors"}
    torch.save(full, paths["full"])
    torch.save(state, paths["legacy"], _use_new_zipfile_serialization=False)
    save_file(full, str(paths["safetensors"]))
    return {"state": state, **paths}


@pytest.fixture(scope="module")
def loss(files) -> PerceptualLoss:
    return PerceptualLoss(files["full"])


def _images(batch: int = 2, size: int = 32, seed: int = 0) -> torch.Tensor:
    """Smooth synthetic photographs: coloured sinusoids and a bright square, in [0, 1]."""
    g = torch.Generator().manual_seed(seed)
    coords = torch.linspace(0, 1, size)
    yy, xx = torch.meshgrid(coords, coords, indexing="ij")
    freq = torch.rand(batch, 3, 2, generator=g) * 6 + 1
    phase = torch.rand(batch, 3, 1, 1, generator=g) * 2 * math.pi
    images = 0.5 + 0.3 * torch.sin(
        2 * math.pi * (freq[..., 0, None, None] * xx + freq[..., 1, None, None] * yy) + phase
    )
    images[..., size // 4 : size // 2, size // 4 : size // 2] = 0.9
    return images.clamp(0, 1)


def test_identical_images_give_zero(loss):
    x = _images()
    assert loss(x, x.clone()).item() == 0.0


def test_positive_and_symmetric(loss):
    x, y = _images(seed=0), _images(seed=1)
    d_xy, d_yx = loss(x, y), loss(y, x)
    assert d_xy.shape == () and d_xy.item() > 0
    torch.testing.assert_close(d_xy, d_yx)


def test_grows_with_the_noise_level(loss):
    x = _images(batch=1)
    noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(1))
    distances = [loss(x, x + sigma * noise).item() for sigma in (0.01, 0.03, 0.1, 0.3)]
    assert all(a < b for a, b in zip(distances, distances[1:])), distances


def test_reductions(files, loss):
    x, y = _images(batch=3), _images(batch=3, seed=1)
    per_image = PerceptualLoss(files["full"], reduction="none")(x, y)
    assert per_image.shape == (3,) and (per_image > 0).all()
    torch.testing.assert_close(per_image.mean(), loss(x, y))
    torch.testing.assert_close(per_image[1], loss(x[1:2], y[1:2]))


def test_gradient_reaches_the_images_not_the_vgg(loss):
    x = _images().requires_grad_(True)
    y = _images(seed=1).requires_grad_(True)
    loss(x, y).backward()
    for image in (x, y):
        assert image.grad is not None and torch.isfinite(image.grad).all() and image.grad.abs().sum() > 0
    assert all(not p.requires_grad and p.grad is None for p in loss.features.parameters())
    flat = torch.full((1, 3, 32, 32), 0.5, requires_grad=True)  # flat images: finite gradients too
    loss(flat, torch.zeros(1, 3, 32, 32)).backward()
    assert torch.isfinite(flat.grad).all()


def test_every_file_format_gives_the_same_distances(files, loss):
    x, y = _images(), _images(seed=1)
    expected = loss(x, y)
    for kind in ("legacy", "safetensors"):
        torch.testing.assert_close(PerceptualLoss(files[kind])(x, y), expected, rtol=0, atol=0)


def test_features_match_torchvision(files, reference):
    every_layer = PerceptualLoss(files["safetensors"], layers=tuple(VGG16_LAYERS))
    x = _images()
    ours = every_layer.layer_features(x)
    assert list(ours) == list(VGG16_LAYERS)
    h = (x - torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)) / torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    with torch.no_grad():
        for index, module in enumerate(reference):
            h = module(h)
            if index in VGG16_LAYERS.values():
                name = next(n for n, i in VGG16_LAYERS.items() if i == index)
                torch.testing.assert_close(ours[name], h, msg=name)


def test_weights_default_to_torchvisions_cache(files, tmp_path, monkeypatch, loss):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    with pytest.raises(FileNotFoundError, match=r"(?s)needs torchvision's ImageNet VGG16 weights: pass weights=.*"):
        PerceptualLoss()
    with pytest.raises(
        FileNotFoundError, match=re.escape(f"{tmp_path}/checkpoints/{VGG16_FILE}") + ".*Nothing is downloaded"
    ):
        PerceptualLoss()
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / VGG16_FILE).symlink_to(files["legacy"])
    cached = PerceptualLoss()
    assert cached.weights is None and cached.weights_path == tmp_path / "checkpoints" / VGG16_FILE
    x, y = _images(), _images(seed=1)
    torch.testing.assert_close(cached(x, y), loss(x, y))
    with pytest.raises(FileNotFoundError, match="missing.pth does not exist"):
        PerceptualLoss(tmp_path / "missing.pth")


def _bad_files(state: dict) -> dict:
    full = {f"features.{k}": v for k, v in state.items()}
    return {
        "garbage.pth": (b"not a checkpoint", "cannot read VGG16 weights"),
        "garbage.safetensors": (b"\x08\x00\x00\x00\x00\x00\x00\x00{}garbage", "cannot read VGG16 weights"),
        "unexpected.pth": ({**state, "99.weight": torch.zeros(1)}, "unexpected key '99.weight'"),
        "missing.safetensors": ({k: v for k, v in full.items() if k != "features.28.bias"}, "'features.28.bias'"),
        "shape.pth": ({**full, "features.2.weight": torch.zeros(64, 64, 1, 1)}, r"'features.2.weight' has shape"),
        "nan.pth": ({**state, "0.bias": torch.full((64,), math.nan)}, "'0.bias' holds 64 non-finite"),
        "module.pth": (nn.Linear(2, 2), "cannot read VGG16 weights"),  # weights_only: no arbitrary unpickling
        "list.pth": ([torch.zeros(1)], "holds a list"),
    }


def test_bad_files_raise_value_errors(files, tmp_path):
    for name, (content, message) in _bad_files(files["state"]).items():
        path = tmp_path / name
        if isinstance(content, bytes):
            path.write_bytes(content)
        elif name.endswith(".safetensors"):
            save_file(content, str(path))
        else:
            torch.save(content, path)
        with pytest.raises(ValueError, match=message) as error:
            PerceptualLoss(path)
        assert name in str(error.value)


def test_shallow_layers_need_only_their_weights(files, tmp_path):
    shallow = {k: v for k, v in files["state"].items() if int(k.split(".")[0]) < 15}
    torch.save(shallow, tmp_path / "shallow.pth")
    loss = PerceptualLoss(tmp_path / "shallow.pth", layers=("relu1_2", "relu3_3"))
    assert len(loss.features) == 16 and loss.min_size == 4
    assert loss(_images(size=8), _images(size=8, seed=1)).item() > 0


class _Parent(nn.Module):
    def __init__(self, weights):
        super().__init__()
        self.decoder = nn.Conv2d(3, 3, 1)
        self.perceptual = PerceptualLoss(weights)


def test_parent_checkpoint_holds_no_vgg_but_moves_it(files):
    parent = _Parent(files["full"])
    assert set(parent.state_dict()) == {"decoder.weight", "decoder.bias"}
    assert sum(p.numel() for p in parent.parameters()) == 12
    _Parent(files["safetensors"]).load_state_dict(parent.state_dict())  # strict: nothing missing
    parent.train().requires_grad_(True)
    vgg = parent.perceptual.features
    assert not vgg.training and not any(p.requires_grad for p in vgg.parameters())
    parent.to(torch.float64)
    assert vgg[0].weight.dtype == torch.float64 and parent.perceptual.mean.dtype == torch.float64
    assert parent.perceptual(_images().double(), _images(seed=1).double()).dtype == torch.float64
    parent.to("meta")
    assert vgg[0].weight.device.type == "meta" and parent.perceptual.std.device.type == "meta"


def test_grey_images_are_repeated(loss):
    x, y = _images()[:, :1], _images(seed=1)[:, :1]
    torch.testing.assert_close(loss(x, y), loss(x.expand(-1, 3, -1, -1), y.expand(-1, 3, -1, -1)))
    assert loss(x, y).item() > 0


def test_resize(files):
    resized = PerceptualLoss(files["full"], resize=32)
    x, y = _images(size=20), _images(size=20, seed=1)
    assert resized(x, y).item() > 0


def test_input_and_argument_errors(files, loss):
    x = _images()
    for bad in (x[0], x[:, :2], torch.zeros(2, 4, 32, 32)):
        with pytest.raises(ValueError, match=re.escape(f"(B, 1, H, W), got {tuple(bad.shape)}")):
            loss(bad, bad)
    with pytest.raises(ValueError, match="at least 16x16 to reach relu5_3"):
        loss(x[..., :8, :8], x[..., :8, :8])
    with pytest.raises(ValueError, match="one size"):
        loss(x, x[..., :16, :16])
    with pytest.raises(TypeError, match="floating point"):
        loss(x, (x * 255).to(torch.uint8))
    for kwargs, message in (
        (dict(layers=("relu6_1",)), "layers must be one of"),
        (dict(layers=()), "at least one"),
        (dict(layers=("relu1_2", "relu1_2")), "repeat"),
        (dict(resize=8), "resize must be an int >= 16"),
        (dict(reduction="max"), "reduction must be one of"),
    ):
        with pytest.raises(ValueError, match=message):
            PerceptualLoss(files["full"], **kwargs)
