"""Image tokenizers for colour photographs: colour kept, EMA weights, loss schedules, a perceptual loss that a
loaded tokenizer does not need, the offline photo crops, and the shipped photo config through ``tokq``."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import pytest
import torch
import yaml
from helpers import IMAGE_SIZE, NUM_IMAGES, make_image_folder
from torch.utils.data import DataLoader, TensorDataset

from tokenizers_q import BSQ, RVQ, VQ
from tokenizers_q.models import Decoder, Encoder, PatchDiscriminator, PerceptualLoss
from tokenizers_q.trainers import AutoencoderModule, load_tokenizer
from tokenizers_q.trainers.cli import lightning_cli
from tokenizers_q.trainers.cli import main as tokq

ROOT = Path(__file__).resolve().parent.parent


def colour_parts(norm: str, codebook_size: int = 64):
    kw = dict(base_channels=16, channel_mult=[1, 2], latent_dim=8, norm=norm)
    quantizer = VQ(dim=8, codebook_size=codebook_size, channel_first=True, threshold_ema_dead_code=1.0)
    return Encoder(in_channels=3, **kw), Decoder(out_channels=3, **kw), quantizer


def saturated_images(n: int, seed: int = 0) -> torch.Tensor:
    """Flat saturated colours (corners of the RGB cube, 0.05 / 0.95) with a square of another such colour."""
    g = torch.Generator().manual_seed(seed)
    corners = torch.tensor([[a, b, c] for a in (0.05, 0.95) for b in (0.05, 0.95) for c in (0.05, 0.95)])
    pairs = torch.randint(0, 8, (n, 2), generator=g)
    x = corners[pairs[:, 0]].view(n, 3, 1, 1).repeat(1, 1, IMAGE_SIZE, IMAGE_SIZE)
    x[:, :, 4:12, 4:12] = corners[pairs[:, 1]].view(n, 3, 1, 1)
    return x


# -- colour ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("norm, lost", [("group", (0.1, 1.0)), ("pixel", (0.1, 1.0)), ("none", (0.0, 1e-3))])
def test_the_latent_of_a_flat_colour_keeps_its_colour_only_without_normalisation(norm, lost):
    # the cause of the colour casts on small crops: GroupNorm takes its statistics over each image (and the pixel
    # norm over each latent), so a flat colour's latent loses part of its colour; a linear read-out of an interior
    # latent of a randomly initialised encoder shows how much
    torch.manual_seed(0)
    colours = torch.rand(200, 3)
    encoder = Encoder(3, base_channels=16, channel_mult=[1, 2], latent_dim=8, norm=norm)
    with torch.no_grad():
        z = encoder(colours.view(-1, 3, 1, 1).repeat(1, 1, 16, 16) * 2 - 1)[:, :, 4, 4]
    features = torch.cat([z, torch.ones(len(z), 1)], 1)
    readout = features @ torch.linalg.lstsq(features, colours).solution
    unexplained = ((readout - colours).pow(2).mean() / colours.var(0).mean()).item()
    assert lost[0] <= unexplained < lost[1], unexplained


def fit_colours(norm: str) -> dict[str, float]:
    L.seed_everything(0)
    model = AutoencoderModule(*colour_parts(norm), recon_loss="l2", warmup_steps=10)
    train = DataLoader(TensorDataset(saturated_images(256)), batch_size=32, shuffle=True)
    test = DataLoader(TensorDataset(saturated_images(128, seed=1)), batch_size=64)
    trainer = L.Trainer(
        max_steps=200, logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False
    )
    trainer.fit(model, train)
    return trainer.test(model, test, verbose=False)[0]


def test_saturated_colours_come_back_without_a_channel_bias():
    results = fit_colours("none")
    errors = [results[f"test/mean_error_{c}"] for c in range(3)]
    assert max(abs(e) for e in errors) < 0.02, errors
    assert results["test/psnr"] > 16.0


def test_the_low_pass_path_codes_and_decodes_each_patch_mean():
    torch.manual_seed(0)
    kw = dict(base_channels=8, channel_mult=[1, 2, 2], latent_dim=8, norm="none", low_pass=True)
    encoder, decoder = Encoder(3, **kw), Decoder(3, **kw)
    with torch.no_grad():  # the convolutions silent: only the linear path is left
        for conv in (encoder.net[-1], decoder.net[-1]):
            conv.weight.zero_()
            conv.bias.zero_()
        w, b = encoder.low_pass.weight[:, :, 0, 0], encoder.low_pass.bias
        inverse = torch.linalg.pinv(w)
        decoder.low_pass.weight.copy_(inverse[:, :, None, None])
        decoder.low_pass.bias.copy_(-inverse @ b)
    x = torch.rand(2, 3, 1, 1).repeat(1, 1, 16, 16)  # flat colours: the patch means are the image
    with torch.no_grad():
        z = encoder(x)
        assert z.shape == (2, 8, 4, 4)
        torch.testing.assert_close(decoder(z), x, atol=1e-5, rtol=1e-5)
    encoder.zero_grad()
    decoder(encoder(torch.rand(2, 3, 16, 16))).square().mean().backward()
    assert encoder.low_pass.weight.grad.abs().sum() > 0 and encoder.net[-1].weight.grad.abs().sum() > 0


def test_every_norm_builds_and_an_unknown_one_is_refused():
    x = torch.rand(2, 3, 16, 16)
    for norm in ("group", "pixel", "none"):
        encoder, decoder, _ = colour_parts(norm)
        assert decoder(encoder(x)).shape == x.shape
    with pytest.raises(ValueError, match="norm must be one of"):
        Encoder(3, norm="batch")


# -- EMA weights -------------------------------------------------------------------------------------------
def test_ema_weights_follow_the_live_ones_and_serve_outside_training(image_folder, tmp_path):
    torch.manual_seed(0)
    model = AutoencoderModule(*colour_parts("none"), ema_decay=0.9, warmup_steps=1)
    assert not any(p.requires_grad for p in model.ema.parameters())
    (optimizer,), _ = model.configure_optimizers()
    optimized = {id(p) for g in optimizer.param_groups for p in g["params"]}
    assert not optimized & {id(p) for p in model.ema.parameters()}
    before = {k: v.clone() for k, v in model.ema.state_dict().items()}
    live_before = {k: v.clone() for k, v in model.encoder.state_dict().items()}
    data = DataLoader(TensorDataset(saturated_images(64)), batch_size=16)
    trainer = L.Trainer(max_steps=3, logger=False, enable_checkpointing=False, enable_progress_bar=False)
    trainer.fit(model, data)
    # after n batches the average moved by the warmed-up decay min(0.9, (1 + n) / (10 + n)) towards the live weights
    name = "net.0.weight"
    live, average = model.encoder.state_dict()[name], model.ema["encoder"].state_dict()[name]
    assert not torch.equal(live, live_before[name]) and not torch.equal(average, before[f"encoder.{name}"])
    assert (average - live).abs().max() > 0  # an average, not a copy
    x = saturated_images(4)
    model.eval()
    with torch.no_grad():
        ema_codes = model.quantizer.encode(model.ema["encoder"](x * 2 - 1))
        assert torch.equal(model.encode(x), ema_codes)
        assert torch.allclose(model(x)[0], model.ema["decoder"](model.quantizer.decode(ema_codes)) * 0.5 + 0.5)
    model.train()
    assert model._coder()[0] is model.encoder
    # the averaged weights are in the state dict: a rebuilt module holds them
    again = AutoencoderModule(*colour_parts("none"), ema_decay=0.9)
    again.load_state_dict(model.state_dict())
    assert torch.equal(again.eval().encode(x), model.eval().encode(x))


def test_ema_update_is_the_warmed_up_lerp():
    torch.manual_seed(0)
    model = AutoencoderModule(*colour_parts("none"), ema_decay=0.99)
    with torch.no_grad():
        for p in model.encoder.parameters():
            p.add_(1.0)
    start = [p.clone() for p in model.ema["encoder"].parameters()]
    model.on_train_batch_end(None, None, 0)  # no trainer: 0 batches done, decay min(0.99, 1 / 10)
    for a, s, live in zip(model.ema["encoder"].parameters(), start, model.encoder.parameters()):
        torch.testing.assert_close(a, s + 0.9 * (live - s))


# -- schedules -----------------------------------------------------------------------------------------------
class Steps:
    """Stands in for the trainer's batch counter."""

    def __init__(self, module: AutoencoderModule):
        self.module, self.done = module, 0
        module._batches_done = lambda: self.done


def test_gan_weight_ramps_up_after_its_start():
    model = AutoencoderModule(
        *colour_parts("none"),
        discriminator=PatchDiscriminator(3, 8, num_layers=2),
        disc_start_step=10,
        disc_warmup_steps=4,
    )
    steps = Steps(model)
    ramp = []
    for done in (0, 9, 10, 11, 13, 20):
        steps.done = done
        ramp.append(model.gan_ramp())
    assert ramp == [0.0, 0.0, 0.25, 0.5, 1.0, 1.0]
    at_once = AutoencoderModule(*colour_parts("none"), disc_start_step=3)
    Steps(at_once).done = 3
    assert at_once.gan_ramp() == 1.0


def test_entropy_terms_anneal_from_a_multiple_to_their_weight():
    quantizer = RVQ(dim=8, num_quantizers=2, quantizer="bsq", codebook_size=16, channel_first=True)
    encoder, decoder, _ = colour_parts("none")
    model = AutoencoderModule(encoder, decoder, quantizer, entropy_annealing_steps=100, entropy_annealing_factor=3.0)
    entropy_parts = [m for m in quantizer.modules() if isinstance(m, BSQ)]
    assert len(entropy_parts) == 2 and len(model.entropy_weights) == 2
    base = entropy_parts[0].entropy_loss_weight
    steps = Steps(model)
    for done, multiple in ((0, 3.0), (50, 2.0), (100, 1.0), (500, 1.0)):
        steps.done = done
        model.on_train_batch_start(None, 0)
        assert [m.entropy_loss_weight for m in entropy_parts] == [pytest.approx(base * multiple)] * 2


def test_schedule_and_ema_arguments_are_checked():
    parts = colour_parts("none")
    with pytest.raises(ValueError, match="ema_decay must be in"):
        AutoencoderModule(*parts, ema_decay=1.0)
    with pytest.raises(ValueError, match="entropy_annealing_factor must be >= 1, got 0.5"):
        AutoencoderModule(*parts, entropy_annealing_factor=0.5)
    with pytest.raises(ValueError, match="disc_warmup_steps must be an int >= 0, got -1"):
        AutoencoderModule(*parts, disc_warmup_steps=-1)


# -- the perceptual loss in training, and loading without its backbone -------------------------------------
def vgg_file(path: Path) -> Path:
    from safetensors.torch import save_file
    from torchvision.models import vgg16

    torch.manual_seed(0)
    features = vgg16(weights=None).features[:16]  # up to relu3_3
    save_file({f"features.{k}": v.contiguous() for k, v in features.state_dict().items()}, str(path))
    return path


def test_the_perceptual_loss_trains_the_tokenizer_and_a_loaded_tokenizer_needs_no_backbone(image_folder, tmp_path):
    weights = vgg_file(tmp_path / "vgg16.safetensors")
    perceptual = {
        "class_path": "tokenizers_q.models.PerceptualLoss",
        "init_args": {"weights": str(weights), "layers": ["relu1_2", "relu2_2", "relu3_3"]},
    }
    config = photo_config(image_folder, tmp_path, {"perceptual": perceptual, "perceptual_weight": 0.5})
    cli = lightning_cli(["fit", "--config", str(config)])
    assert "train/perceptual_loss" in cli.trainer.logged_metrics
    assert not any(k.startswith("perceptual") for k in cli.model.state_dict())
    weights.unlink()  # a user of the tokenizer has no VGG weights
    run = tmp_path / "run" / "version_0"
    tokenizer = load_tokenizer(run / "checkpoints" / "last.ckpt")
    exported = load_tokenizer(run / "tokenizer.safetensors")
    assert tokenizer.perceptual is None and exported.perceptual is None
    x = torch.rand(2, 3, IMAGE_SIZE, IMAGE_SIZE)
    assert torch.equal(tokenizer.encode(x), exported.encode(x))


def test_perceptual_loss_names_the_missing_weights(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    with pytest.raises(FileNotFoundError, match="vgg16-397923af.pth"):
        PerceptualLoss()


# -- offline photo crops -------------------------------------------------------------------------------------
def test_photo_crops_are_split_by_photo_and_reproducible(tmp_path):
    pytest.importorskip("skimage")
    from PIL import Image

    from tokenizers_q.trainers.photo_crops import TEST_PHOTOS, TRAIN_PHOTOS, photo_crops, write_photo_crops

    root = write_photo_crops(tmp_path / "crops", size=16, train=14, test=4, seed=3)
    train = sorted(p.parent.name for p in (root / "train").glob("*/*.png"))
    test = sorted(p.parent.name for p in (root / "test").glob("*/*.png"))
    assert len(train) == 14 and set(train) == set(TRAIN_PHOTOS)
    assert len(test) == 4 and set(test) == set(TEST_PHOTOS)
    image = Image.open(root / "test" / "chelsea" / "00000.png")
    assert image.size == (16, 16) and image.mode == "RGB"
    again = photo_crops(TEST_PHOTOS, 4, 16, seed=4)  # the test split's seed is seed + 1
    import numpy as np

    assert np.array_equal(np.asarray(image), again["chelsea"][0])
    with pytest.raises(ValueError, match="unknown photo 'lena'"):
        photo_crops(("lena",), 1, 16)
    with pytest.raises(ValueError, match="smaller than crops of 4096"):
        photo_crops(("chelsea",), 1, 4096)


# -- the shipped photo config through tokq -----------------------------------------------------------------
def photo_config(image_folder: Path, out: Path, model_args: dict | None = None) -> Path:
    """configs/image/photo32.yaml made small: 16x16 images, narrow layers, 4 steps, the test folder's images."""
    config = yaml.safe_load((ROOT / "configs" / "image" / "photo32.yaml").read_text())
    config["trainer"].update(max_steps=4, val_check_interval=2, limit_val_batches=1, enable_progress_bar=False)
    config["trainer"]["logger"]["init_args"] = {"save_dir": str(out), "name": "run"}
    config["trainer"]["default_root_dir"] = str(out)
    model = config["model"]["init_args"]
    for part in ("encoder", "decoder"):
        model[part]["init_args"]["base_channels"] = 8
    model.update(model_args or {})
    config["data"]["init_args"].update(
        root=str(image_folder), test_root=str(image_folder), image_size=IMAGE_SIZE, batch_size=4, num_workers=0
    )
    path = out / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def test_tokq_test_and_the_python_path_agree_on_a_held_out_folder(image_folder, tmp_path):
    (tmp_path / "held_out").mkdir()
    held_out = make_image_folder(tmp_path / "held_out")
    config = photo_config(image_folder, tmp_path)
    tokq(["fit", "--config", str(config)])
    run = tmp_path / "run" / "version_0"
    ckpt = run / "checkpoints" / "last.ckpt"
    assert (run / "reconstructions" / "latest.png").is_file()  # validated although the run is short
    argv = ["test", "--config", str(config), "--ckpt_path", str(ckpt), "--trainer.logger", "false"]
    cli = lightning_cli([*argv, "--data.init_args.test_root", str(held_out)])
    logged = cli.trainer.callback_metrics
    # the README's Python path on the same images, with the same batches and per-batch averaging
    from torchmetrics.functional.image import peak_signal_noise_ratio

    tokenizer = load_tokenizer(run / "tokenizer.safetensors")
    psnr, errors, count = 0.0, torch.zeros(3), 0
    for x, _ in cli.datamodule.dataloader("test"):
        recon = tokenizer.decode(tokenizer.encode(x))
        psnr += peak_signal_noise_ratio(recon, x, data_range=1.0).item() * len(x)
        errors += (recon - x).mean((0, 2, 3)) * len(x)
        count += len(x)
    assert count == NUM_IMAGES
    assert logged["test/psnr"].item() == pytest.approx(psnr / count, abs=1e-4)
    for c in range(3):
        assert logged[f"test/mean_error_{c}"].item() == pytest.approx(errors[c].item() / count, abs=1e-5)


@pytest.mark.parametrize("size", [32, 64, 128, 256])
def test_every_photo_config_builds_and_codes_the_bits_its_header_says(size, tmp_path):
    import re

    from tokenizers_q.instantiate import instantiate

    path = ROOT / "configs" / "image" / f"photo{size}.yaml"
    config = yaml.safe_load(path.read_text())
    model = config["model"]
    if "perceptual" in model["init_args"]:
        weights = str(vgg_file(tmp_path / "vgg16.safetensors"))
        model["init_args"]["perceptual"]["init_args"] = {"weights": weights, "layers": ["relu1_2", "relu3_3"]}
    module = instantiate(model).eval()
    data = config["data"]["init_args"]
    assert data["image_size"] == size and data["channels"] == 3 and data["num_workers"] >= 2
    codes = module.encode(torch.rand(1, 3, size, size))
    claimed = re.search(r"\((?:f\d+; )?(\d+) bits per image\)", path.read_text().splitlines()[0])
    assert claimed and module.bits_per_image(tuple(codes.shape)) == int(claimed.group(1))
