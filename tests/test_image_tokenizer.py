"""Image tokenizer: data sources, the Lightning module, resume, and the tokq CLI end to end."""

from __future__ import annotations

import csv
import gzip
from pathlib import Path

import lightning as L
import pytest
import torch
from helpers import FSQ_CONFIG, IMAGE_SIZE, NUM_IMAGES, cli_config
from PIL import Image

from tokenizers_q import VQ
from tokenizers_q.models import Decoder, Encoder, PatchDiscriminator
from tokenizers_q.packing import load_tokens
from tokenizers_q.trainers import AutoencoderModule, ImageDataModule, load_tokenizer
from tokenizers_q.trainers import artifacts as artifacts_module
from tokenizers_q.trainers.artifacts import MODULE_CLASS_KEY, read_module_file, tokenizer_fingerprint
from tokenizers_q.trainers.cli import datamodule_from_checkpoint
from tokenizers_q.trainers.cli import main as tokq
from tokenizers_q.trainers.data import read_idx_images, read_idx_labels


def tiny_parts(channels: int = 1, codebook_size: int = 32):
    enc = Encoder(in_channels=channels, base_channels=8, channel_mult=[1, 2, 2], latent_dim=8)
    dec = Decoder(out_channels=channels, base_channels=8, channel_mult=[1, 2, 2], latent_dim=8)
    return enc, dec, VQ(dim=8, codebook_size=codebook_size, channel_first=True, threshold_ema_dead_code=1.0)


def folder_data(root: Path, **kwargs) -> ImageDataModule:
    args = dict(source="folder", root=str(root), image_size=IMAGE_SIZE, batch_size=4, val_fraction=0.2)
    return ImageDataModule(**{**args, **kwargs})


# -- data ------------------------------------------------------------------------------------
def test_folder_splits_are_disjoint_and_cover_every_image(image_folder):
    data = folder_data(image_folder)
    data.setup()
    sizes = {k: len(v) for k, v in data.splits.items()}
    assert sum(sizes.values()) == NUM_IMAGES and sizes["test"] == 4 and sizes["val"] == 7
    x, y = next(iter(data.dataloader("test")))
    assert x.shape == (4, 1, IMAGE_SIZE, IMAGE_SIZE) and x.min() >= 0.0 and x.max() <= 1.0
    assert set(y.tolist()) <= {0, 1}
    colour = folder_data(image_folder, channels=3, image_size=8)
    assert next(iter(colour.dataloader("val")))[0].shape == (4, 3, 8, 8)


def test_a_held_out_folder_is_the_whole_test_split(image_folder, tmp_path):
    from helpers import make_image_folder

    (tmp_path / "held_out").mkdir()
    held_out = make_image_folder(tmp_path / "held_out")  # (the same images, in a folder of its own)
    data = folder_data(image_folder, test_root=str(held_out))
    data.setup()
    sizes = {k: len(v) for k, v in data.splits.items()}
    assert sizes["test"] == NUM_IMAGES and sizes["train"] + sizes["val"] == NUM_IMAGES  # nothing of root held out
    assert data.splits["test"].root == str(held_out)
    with pytest.raises(FileNotFoundError, match="image folder .*missing does not exist"):
        folder_data(image_folder, test_root=str(tmp_path / "missing")).setup()
    with pytest.raises(ValueError, match="test_root is a folder of held-out images for source='folder'"):
        ImageDataModule(source="fashion_mnist", test_root=str(held_out))


def test_training_order_depends_only_on_seed_and_epoch(image_folder):
    def first_epochs(seed):
        loader = folder_data(image_folder, seed=seed).train_dataloader()
        out = []
        for epoch in (0, 1):
            loader.sampler.set_epoch(epoch)
            out.append(torch.cat([y for _, y in loader]))
        return out

    a, b, c = first_epochs(0), first_epochs(0), first_epochs(1)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(torch.stack(a), torch.stack(c))


def test_resumable_loader_skips_what_was_trained(image_folder):
    loader = folder_data(image_folder).train_dataloader()
    loader.sampler.set_epoch(3)
    full = [x for x, _ in loader]
    it = iter(loader)
    for _ in range(3):
        next(it)
    state = loader.state_dict()
    assert state == {"epoch": 3, "batches": 3}
    resumed = folder_data(image_folder).train_dataloader()
    resumed.load_state_dict(state)
    rest = [x for x, _ in resumed]
    assert len(rest) == len(full) - 3 and all(torch.equal(a, b) for a, b in zip(rest, full[3:]))
    assert resumed.state_dict() == {"epoch": 3, "batches": len(full)}
    resumed.load_state_dict(resumed.state_dict())  # a finished epoch resumes at the next one
    assert resumed.sampler.epoch == 4


def write_idx(path: Path, array: torch.Tensor, magic: int) -> None:
    header = magic.to_bytes(4, "big") + b"".join(d.to_bytes(4, "big") for d in array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.numpy().tobytes())


def test_fashion_mnist_idx_files(tmp_path):
    images = torch.randint(0, 256, (12, 28, 28), dtype=torch.uint8)
    labels = torch.arange(12, dtype=torch.uint8) % 10
    for prefix in ("train", "t10k"):
        write_idx(tmp_path / f"{prefix}-images-idx3-ubyte.gz", images, 0x0803)
        write_idx(tmp_path / f"{prefix}-labels-idx1-ubyte.gz", labels, 0x0801)
    assert torch.equal(read_idx_images(tmp_path / "train-images-idx3-ubyte.gz"), images)
    assert torch.equal(read_idx_labels(tmp_path / "train-labels-idx1-ubyte.gz"), labels.long())
    data = ImageDataModule(root=str(tmp_path), image_size=32, batch_size=5, val_fraction=0.25)
    data.setup()
    x, y = next(iter(data.dataloader("test")))
    assert x.shape == (5, 1, 32, 32) and torch.equal(y, labels[:5].long())
    with pytest.raises(ValueError, match="not an IDX image file"):
        read_idx_images(tmp_path / "train-labels-idx1-ubyte.gz")
    raw = gzip.decompress((tmp_path / "train-images-idx3-ubyte.gz").read_bytes())
    (tmp_path / "cut-images-idx3-ubyte").write_bytes(raw[:100])
    with pytest.raises(ValueError, match="truncated"):
        read_idx_images(tmp_path / "cut-images-idx3-ubyte")


def test_data_errors(tmp_path):
    with pytest.raises(ValueError, match="source must be one of"):
        ImageDataModule(source="webdataset", root=str(tmp_path))
    with pytest.raises(ValueError, match=r"channels must be one of \(1, 3\), got 2"):
        ImageDataModule(channels=2)
    with pytest.raises(ValueError, match="needs a root folder"):
        ImageDataModule(source="folder")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        folder_data(tmp_path / "missing").setup()
    with pytest.raises(FileNotFoundError, match="no images found"):
        folder_data(tmp_path).setup()
    with pytest.raises(FileNotFoundError, match="dataset-fashion-mnist"):
        ImageDataModule(root=str(tmp_path)).setup()
    with pytest.raises(ValueError, match="no data set 'NotADataset'"):
        ImageDataModule(source="torchvision", root=str(tmp_path), dataset="NotADataset").setup()
    with pytest.raises(FileNotFoundError, match="download=True"):
        ImageDataModule(source="torchvision", root=str(tmp_path), dataset="MNIST").setup()
    with pytest.raises(ValueError, match="split must be one of"):
        ImageDataModule(root=str(tmp_path)).dataloader("holdout")


# -- the module ------------------------------------------------------------------------------
def test_autoencoder_round_trip_and_gradients():
    torch.manual_seed(0)
    model = AutoencoderModule(*tiny_parts())
    x = torch.rand(6, 1, IMAGE_SIZE, IMAGE_SIZE)
    recon, out = model(x)
    assert recon.shape == x.shape and out.codes.shape == (6, 4, 4, 1)
    (recon - x).abs().mean().add(out.loss).backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    model.eval()
    codes = model.encode(x)
    assert torch.equal(codes, model(x)[1].codes)
    assert torch.allclose(model.decode(codes), model(x)[0].clamp(0, 1), atol=1e-6)
    assert model.bits_per_image(tuple(codes.shape)) == 16 * 5
    stats = model.code_statistics([(x[:3], None), (x[3:], None)])
    assert stats["usage"] == [pytest.approx(codes.unique().numel() / 32)]
    assert 1.0 <= stats["perplexity"][0] <= codes.unique().numel()


def test_autoencoder_errors():
    enc, dec, q = tiny_parts()
    with pytest.raises(ValueError, match="recon_loss must be one of"):
        AutoencoderModule(enc, dec, q, recon_loss="huber")
    with pytest.raises(TypeError, match="must be a tokenizers_q Quantizer"):
        AutoencoderModule(enc, dec, torch.nn.Identity())
    with pytest.raises(ValueError, match="encoder latent_dim 8 must equal the quantizer's dim 16"):
        AutoencoderModule(enc, dec, VQ(dim=16, codebook_size=8, channel_first=True))
    with pytest.raises(ValueError, match=r"expected images \(B, 1, H, W\), got \(2, 3, 16, 16\)"):
        AutoencoderModule(enc, dec, q)(torch.rand(2, 3, IMAGE_SIZE, IMAGE_SIZE))


def test_gan_training_steps_both_networks(image_folder, tmp_path):
    torch.manual_seed(0)
    model = AutoencoderModule(*tiny_parts(), discriminator=PatchDiscriminator(1, 8, num_layers=2), disc_start_step=2)
    disc_before = {k: v.clone() for k, v in model.discriminator.state_dict().items()}
    trainer = L.Trainer(
        max_steps=4, logger=False, enable_checkpointing=False, enable_progress_bar=False, default_root_dir=tmp_path
    )
    trainer.fit(model, folder_data(image_folder))
    assert trainer.global_step == 4  # counts batches, not the two optimizers' steps
    changed = [not torch.equal(disc_before[k], v) for k, v in model.discriminator.state_dict().items()]
    assert any(changed)
    assert {"train/g_loss", "train/d_loss", "train/gan_weight"} <= set(trainer.logged_metrics)
    # one weight-decay rule for both optimizers; the generator's leaves the discriminator out
    (opt_g, opt_d), _ = model.configure_optimizers()
    discriminator = {id(p) for p in model.discriminator.parameters()}
    assert not discriminator & {id(p) for g in opt_g.param_groups for p in g["params"]}
    assert discriminator == {id(p) for g in opt_d.param_groups for p in g["params"]}
    assert [g["weight_decay"] for g in opt_d.param_groups] == [0.01, 0.0]
    assert all(p.dim() >= 2 for p in opt_d.param_groups[0]["params"])  # no decay on biases and norms
    with pytest.raises(ValueError, match="at least 24x24 for 3 layers, got"):
        PatchDiscriminator(1)(torch.rand(2, 1, IMAGE_SIZE, IMAGE_SIZE))


class KillAt(L.Callback):
    """Raise at a given step, as a killed process would stop."""

    def __init__(self, step: int):
        self.step = step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step == self.step:
            raise RuntimeError(f"killed at step {self.step}")


def run_fit(root: Path, image_folder: Path, max_steps: int, callbacks=(), ckpt_path=None) -> AutoencoderModule:
    L.seed_everything(0)
    model = AutoencoderModule(*tiny_parts(), warmup_steps=2)
    checkpoint = L.pytorch.callbacks.ModelCheckpoint(dirpath=root, every_n_train_steps=5, save_last=True)
    trainer = L.Trainer(
        max_steps=max_steps,
        logger=False,
        enable_progress_bar=False,
        callbacks=[checkpoint, *callbacks],
        default_root_dir=root,
    )
    trainer.fit(model, folder_data(image_folder), ckpt_path=ckpt_path, weights_only=True)
    return model


def test_resume_after_kill_matches_uninterrupted_run(image_folder, tmp_path):
    # 29 training images in batches of 4: 8 batches per epoch. Killed at step 7 (after the
    # step-5 checkpoint), resumed mid-epoch, the run crosses into epoch 1 and stops at 12.
    full = run_fit(tmp_path / "full", image_folder, 12)
    with pytest.raises(RuntimeError, match="killed at step 7"):
        run_fit(tmp_path / "killed", image_folder, 12, callbacks=[KillAt(7)])
    assert torch.load(tmp_path / "killed" / "last.ckpt", weights_only=True)["global_step"] == 5
    resumed = run_fit(tmp_path / "killed", image_folder, 12, ckpt_path=tmp_path / "killed" / "last.ckpt")
    for key, value in full.state_dict().items():
        assert torch.equal(resumed.state_dict()[key], value), key


# -- the CLI end to end (the trained fixture is in conftest.py) --------------------------------
def test_cli_fit_writes_checkpoint_logs_and_pngs(trained):
    assert (trained / "checkpoints" / "last.ckpt").is_file()
    with open(trained / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    val = [r for r in rows if r.get("val/psnr")]
    assert len(val) == 2 and all(float(r["val/psnr"]) > 0 and 0 < float(r["val/ssim"]) <= 1 for r in val)
    assert any(r.get("codebook/usage") for r in rows)
    for png in ("reconstructions/latest.png", "reconstructions/step_000006.png", "codebook_usage/latest.png"):
        with Image.open(trained / png) as im:
            assert im.size[0] > 16 and im.size[1] > 16, png


def test_cli_encode_decode_matches_the_model(trained, tmp_path, monkeypatch):
    ckpt = trained / "checkpoints" / "last.ckpt"
    assert (
        torch.load(ckpt, weights_only=True)[MODULE_CLASS_KEY] == "tokenizers_q.trainers.autoencoder.AutoencoderModule"
    )
    tokens_path = tmp_path / "tokens.safetensors"
    reads = []
    read_checkpoint = artifacts_module._read_checkpoint
    monkeypatch.setattr(artifacts_module, "_read_checkpoint", lambda path: reads.append(path) or read_checkpoint(path))
    tokq(["encode", "--ckpt", str(ckpt), "--output", str(tokens_path), "--split", "test"])
    assert reads == [ckpt]  # the module and its data module come from one read
    monkeypatch.undo()
    tokens = load_tokens(tokens_path)
    model = load_tokenizer(ckpt)
    data = datamodule_from_checkpoint(ckpt, {})
    images = torch.cat([x for x, _ in data.dataloader("test")])
    assert tokens.spec == model.quantizer.spec
    assert torch.equal(tokens.codes, model.encode(images))
    assert tokens.extras["labels"].shape == (images.shape[0],)
    assert tokens.metadata["bits_per_image"] == 16 * 5 and tokens.metadata["split"] == "test"

    grid = tmp_path / "grid.png"
    tokq(["decode", "--tokens", str(tokens_path), "--ckpt", str(ckpt), "--output", str(grid), "--num-images", "3"])
    with Image.open(grid) as im:
        assert im.size == (3 * (IMAGE_SIZE + 1) + 1, IMAGE_SIZE + 2)


def test_cli_encodes_and_tests_a_held_out_folder(trained, tmp_path):
    from helpers import make_image_folder

    (tmp_path / "held_out").mkdir()
    held_out = make_image_folder(tmp_path / "held_out")
    ckpt = trained / "checkpoints" / "last.ckpt"
    tokens_path = tmp_path / "held_out.safetensors"
    tokq(["encode", "--ckpt", str(ckpt), "--output", str(tokens_path), "--test-root", str(held_out)])
    images = torch.cat(
        [x for x, _ in datamodule_from_checkpoint(ckpt, {"test_root": str(held_out)}).dataloader("test")]
    )
    assert images.shape[0] == NUM_IMAGES  # every held-out image, not a slice of the training folder
    assert torch.equal(load_tokens(tokens_path).codes, load_tokenizer(ckpt).encode(images))
    config, test_root = trained / "config.yaml", ["--data.init_args.test_root", str(held_out)]
    tokq(["test", "--config", str(config), "--ckpt_path", str(ckpt), "--trainer.logger", "false", *test_root])


def test_cli_validate_and_test(trained):
    config = trained / "config.yaml"
    ckpt = str(trained / "checkpoints" / "last.ckpt")
    for command in ("validate", "test"):
        tokq([command, "--config", str(config), "--ckpt_path", ckpt, "--trainer.logger", "false"])


def test_cli_decode_rejects_tokens_of_another_tokenizer(trained, other_vq, image_folder, tmp_path):
    tokq(["fit", "--config", str(cli_config(image_folder, FSQ_CONFIG, tmp_path)), "--trainer.max_steps", "1"])
    fsq_ckpt = tmp_path / "run" / "version_0" / "checkpoints" / "last.ckpt"
    tokens_path = tmp_path / "fsq.safetensors"
    tokq(["encode", "--ckpt", str(fsq_ckpt), "--output", str(tokens_path)])
    vq_ckpt = trained / "checkpoints" / "last.ckpt"
    with pytest.raises(ValueError, match="decode with the tokenizer that encoded them"):
        tokq(["decode", "--tokens", str(tokens_path), "--ckpt", str(vq_ckpt), "--output", str(tmp_path / "x.png")])
    # another VQ tokenizer makes tokens of the very same TokenSpec: its fingerprint tells them apart
    vq_tokens = tmp_path / "vq.safetensors"
    tokq(["encode", "--ckpt", str(vq_ckpt), "--output", str(vq_tokens)])
    assert load_tokens(vq_tokens).fingerprint == tokenizer_fingerprint(load_tokenizer(vq_ckpt))
    assert load_tokenizer(other_vq).quantizer.spec == load_tokenizer(vq_ckpt).quantizer.spec
    grid = tmp_path / "forced.png"
    with pytest.raises(ValueError, match="vq.safetensors was encoded by another tokenizer .*pass --force"):
        tokq(["decode", "--tokens", str(vq_tokens), "--ckpt", str(other_vq), "--output", str(grid)])
    assert not grid.exists()
    tokq(["decode", "--tokens", str(vq_tokens), "--ckpt", str(other_vq), "--output", str(grid), "--force"])
    assert grid.is_file()
    with pytest.raises(FileNotFoundError, match="no exported module or checkpoint at"):
        tokq(["encode", "--ckpt", str(tmp_path / "nope.ckpt"), "--output", str(tokens_path)])


def test_exported_tokenizer_encodes_and_decodes_like_its_checkpoint(trained, tmp_path):
    ckpt = trained / "checkpoints" / "last.ckpt"
    exported = tmp_path / "share" / "tokenizer.safetensors"
    tokq(["export", "--ckpt", str(ckpt), "--output", str(exported)])
    # ExportOnFitEnd wrote the same weights and description at the end of fit
    at_fit_end = read_module_file(trained / "tokenizer.safetensors")
    assert at_fit_end.module == read_module_file(exported).module
    assert at_fit_end.datamodule == read_module_file(exported).datamodule
    assert all(torch.equal(v, read_module_file(exported).state[k]) for k, v in at_fit_end.state.items())
    from_ckpt, from_export = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    tokq(["encode", "--ckpt", str(ckpt), "--output", str(from_ckpt)])
    tokq(["encode", "--ckpt", str(exported), "--output", str(from_export)])
    a, b = load_tokens(from_ckpt), load_tokens(from_export)
    assert torch.equal(a.codes, b.codes) and a.fingerprint == b.fingerprint
    model = load_tokenizer(exported)
    assert not model.training
    for key, value in load_tokenizer(ckpt).state_dict().items():
        assert torch.equal(model.state_dict()[key], value), key
    grids = [tmp_path / "a.png", tmp_path / "b.png"]
    for grid, tokenizer in zip(grids, (ckpt, exported)):
        tokq(["decode", "--tokens", str(from_export), "--ckpt", str(tokenizer), "--output", str(grid)])
    assert grids[0].read_bytes() == grids[1].read_bytes()
    # the artifact keeps the data settings: encode needs no checkpoint
    assert datamodule_from_checkpoint(exported, {}).hparams.root == datamodule_from_checkpoint(ckpt, {}).hparams.root


def test_cli_wandb_config_logs_offline(image_folder, tmp_path):
    from helpers import VQ_CONFIG

    config = cli_config(image_folder, VQ_CONFIG, tmp_path)
    save_dir = tmp_path / "wandb-runs"
    tokq(
        ["fit", "--config", str(config), "--config", "configs/logger/wandb.yaml", "--trainer.max_steps", "2"]
        + ["--trainer.logger.init_args.save_dir", str(save_dir)]
    )
    runs = list((save_dir / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(runs) == 1 and runs[0].stat().st_size > 0
