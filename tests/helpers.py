"""Contract checks shared by the tests of every quantizer."""

from __future__ import annotations

import copy
from pathlib import Path

import torch
import yaml

from tokenizers_q import Quantizer, QuantizerOutput


def _buffers(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in module.state_dict().items()}


def assert_quantizer(q: Quantizer, x: torch.Tensor, seed: int = 0) -> QuantizerOutput:
    """Check the quantizer contract on input ``x``; returns the training-mode output.

    Output shape and code dtype/range, no NaN, a scalar loss, straight-through
    gradient to ``x``, a gradient for every trainable parameter,
    ``decode(encode(x)) == forward(x).quantized`` in eval, eval and ``encode``
    leave every buffer unchanged, seeded determinism, and a ``state_dict``
    round trip into a fresh copy.
    """
    fresh = copy.deepcopy(q)  # untrained twin, for the determinism check
    spec = q.spec
    lead = x.movedim(1, -1).shape[:-1] if q.channel_first else x.shape[:-1]

    # training step: shapes, ranges, finiteness, gradients
    q.train()
    x = x.detach().clone().requires_grad_(True)
    torch.manual_seed(seed)
    out = q(x)
    assert isinstance(out, QuantizerOutput)
    assert out.quantized.shape == x.shape and out.quantized.dtype == x.dtype
    assert out.codes.dtype == torch.long and out.codes.shape == (*lead, spec.num_codebooks)
    spec.check_codes(out.codes)
    assert torch.isfinite(out.quantized).all()
    assert out.loss.dim() == 0 and torch.isfinite(out.loss)
    assert all(v.dim() == 0 and not v.requires_grad for v in out.metrics.values())
    weight = torch.randn_like(out.quantized)
    ((out.quantized * weight).sum() + out.loss).backward()
    assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    for name, p in q.named_parameters():
        assert p.grad is not None, f"parameter {name} got no gradient"

    # eval: decode(encode(x)) reproduces forward, and nothing changes state
    q.eval()
    before = _buffers(q)
    with torch.no_grad():
        evaluated = q(x.detach())
        codes = q.encode(x.detach())
        decoded = q.decode(codes)
    assert torch.equal(codes, evaluated.codes)
    torch.testing.assert_close(decoded, evaluated.quantized, atol=1e-5, rtol=1e-5)
    q.train()
    q.encode(x.detach())  # encode in training mode must not update statistics either
    after = _buffers(q)
    for name in before:
        assert torch.equal(before[name], after[name]), f"buffer {name} changed in eval/encode"

    # the same seed gives the same output
    torch.manual_seed(seed)
    again = fresh(x.detach())
    torch.testing.assert_close(again.quantized, out.quantized.detach())
    assert torch.equal(again.codes, out.codes)

    # state_dict round trip into an untrained copy
    clone = copy.deepcopy(fresh)
    clone.load_state_dict(q.state_dict())
    clone.eval()
    q.eval()
    with torch.no_grad():
        torch.testing.assert_close(clone(x.detach()).quantized, q(x.detach()).quantized)
        assert torch.equal(clone.encode(x.detach()), q.encode(x.detach()))
    q.train()
    return out


# -- image tokenizers: a tiny folder of PNGs and a tiny tokq config ------------------------------
IMAGE_SIZE = 16
NUM_IMAGES = 40
VQ_CONFIG = {"class_path": "tokenizers_q.VQ", "init_args": {"dim": 8, "codebook_size": 32, "channel_first": True}}
FSQ_CONFIG = {"class_path": "tokenizers_q.FSQ", "init_args": {"dim": 8, "levels": [5, 5], "channel_first": True}}


def tiny_llama() -> torch.nn.Module:
    """A randomly initialised 2-layer Llama (4 query / 2 KV heads of 16 channels, RoPE), seeded, in eval mode."""
    import transformers

    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        pad_token_id=0,
    )
    return transformers.LlamaForCausalLM(config).eval()


def make_image_folder(root: Path) -> Path:
    """Two classes of 16x16 colour PNGs: blurred blobs and stripes."""
    from PIL import Image

    g = torch.Generator().manual_seed(0)
    coords = torch.linspace(-1, 1, IMAGE_SIZE)
    yy, xx = torch.meshgrid(coords, coords, indexing="ij")
    for i in range(NUM_IMAGES):
        label = ("blobs", "stripes")[i % 2]
        c = torch.rand(2, generator=g) - 0.5
        if label == "blobs":
            grey = torch.exp(-((xx - c[0]) ** 2 + (yy - c[1]) ** 2) * 6)
        else:
            grey = 0.5 + 0.5 * torch.sin((xx * c[0] + yy * c[1]) * 12 + i)
        rgb = (grey[None] * torch.rand(3, 1, 1, generator=g)).clamp(0, 1)
        (root / label).mkdir(exist_ok=True)
        Image.fromarray((rgb.permute(1, 2, 0) * 255).byte().numpy()).save(root / label / f"{i:03d}.png")
    return root


def cli_config(image_folder: Path, quantizer: dict, out: Path) -> Path:
    config = {
        "trainer": {
            "max_steps": 6,
            "val_check_interval": 3,
            "check_val_every_n_epoch": None,
            "limit_val_batches": 1,
            "log_every_n_steps": 1,
            "enable_progress_bar": False,
            "default_root_dir": str(out),
            "logger": {"class_path": "CSVLogger", "init_args": {"save_dir": str(out), "name": "run"}},
            "callbacks": [
                {"class_path": "ModelCheckpoint", "init_args": {"save_last": True}},
                {"class_path": "tokenizers_q.trainers.CodebookHealth", "init_args": {"every_n_steps": 2}},
                {"class_path": "tokenizers_q.trainers.ReconstructionGrid"},
                {"class_path": "tokenizers_q.trainers.CodebookUsagePlot"},
                {
                    "class_path": "tokenizers_q.trainers.ExportOnFitEnd",
                    "init_args": {"filename": "tokenizer.safetensors"},
                },
            ],
        },
        "model": {
            "class_path": "tokenizers_q.trainers.AutoencoderModule",
            "init_args": {
                "encoder": {
                    "class_path": "tokenizers_q.models.Encoder",
                    "init_args": {"in_channels": 1, "base_channels": 8, "channel_mult": [1, 2, 2], "latent_dim": 8},
                },
                "decoder": {
                    "class_path": "tokenizers_q.models.Decoder",
                    "init_args": {"out_channels": 1, "base_channels": 8, "channel_mult": [1, 2, 2], "latent_dim": 8},
                },
                "quantizer": quantizer,
            },
        },
        "data": {
            "class_path": "tokenizers_q.trainers.ImageDataModule",
            "init_args": {"source": "folder", "root": str(image_folder), "image_size": IMAGE_SIZE, "batch_size": 4},
        },
    }
    path = out / "config.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(config))
    return path
