"""The same contracts on a CUDA device (skipped where there is none): placement, parity with the CPU, bf16."""

import copy

import lightning as L
import pytest
import torch
from conftest import CONFIGS, VARIANTS
from helpers import IMAGE_SIZE, assert_quantizer

from tokenizers_q import VQ, create_quantizer
from tokenizers_q.models import Decoder, Encoder, PatchDiscriminator
from tokenizers_q.packing import TokenSpec
from tokenizers_q.trainers import (
    AutoencoderModule,
    AutoregressiveTokenModule,
    ImageDataModule,
    MaskedTokenModule,
)

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
ALL = {**{name: (name, kwargs) for name, kwargs in CONFIGS.items()}, **VARIANTS}


@pytest.mark.parametrize("name", sorted(ALL))
def test_contract_on_cuda(name):
    kind, kwargs = ALL[name]
    q = create_quantizer(kind, **kwargs).cuda()
    out = assert_quantizer(q, torch.randn(4, 64, q.dim, device="cuda"))
    assert out.codes.device.type == "cuda"
    assert all(b.device.type == "cuda" for b in q.buffers())


@pytest.mark.parametrize("name", sorted(ALL))
def test_cuda_encodes_like_the_cpu(name):
    kind, kwargs = ALL[name]
    cpu = create_quantizer(kind, **kwargs)
    x = torch.randn(8, 128, cpu.dim)
    cpu(x)  # k-means init and one statistics update, on the CPU
    gpu = copy.deepcopy(cpu).cuda()
    cpu.eval(), gpu.eval()
    with torch.no_grad():
        expected, got = cpu(x), gpu(x.cuda())
    agree = (expected.codes == got.codes.cpu()).all(-1).float().mean()
    assert agree > 0.999  # float32 search on both; only exact ties may differ
    torch.testing.assert_close(got.quantized.cpu(), expected.quantized, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_bf16_autocast_on_cuda(name):
    q = create_quantizer(name, **CONFIGS[name]).cuda()
    x = torch.randn(4, 256, q.dim, device="cuda", requires_grad=True)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out = q(x)
    assert torch.isfinite(out.quantized.float()).all() and torch.isfinite(out.loss)
    (out.quantized.float().sum() + out.loss).backward()
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    q.spec.check_codes(out.codes)


def test_autoencoder_trains_on_cuda_in_bf16_with_a_gan(image_folder, tmp_path):
    torch.manual_seed(0)
    enc = Encoder(in_channels=1, base_channels=16, channel_mult=[1, 2], latent_dim=8)
    dec = Decoder(out_channels=1, base_channels=16, channel_mult=[1, 2], latent_dim=8)
    disc = PatchDiscriminator(1, 16, num_layers=2)
    model = AutoencoderModule(enc, dec, VQ(dim=8, codebook_size=64, channel_first=True), discriminator=disc)
    model.hparams.disc_start_step = 2
    data = ImageDataModule(source="folder", root=str(image_folder), image_size=IMAGE_SIZE, batch_size=8)
    trainer = L.Trainer(
        accelerator="cuda",
        devices=1,
        precision="bf16-mixed",
        max_steps=6,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        default_root_dir=tmp_path,
    )
    trainer.fit(model, data)
    metrics = trainer.validate(model, data, verbose=False)[0]
    assert metrics["val/psnr"] > 5 and torch.isfinite(torch.tensor(metrics["val/loss"]))
    x = next(iter(data.dataloader("test")))[0].cuda()
    model.cuda().eval()  # Lightning hands the model back on the CPU after fit / validate
    codes = model.encode(x)
    assert codes.device.type == "cuda" and torch.allclose(model.decode(codes), model(x)[0].clamp(0, 1), atol=1e-5)


@pytest.mark.parametrize("cls", [AutoregressiveTokenModule, MaskedTokenModule])
def test_token_models_sample_on_cuda(cls):
    spec = TokenSpec((16, 16), ((16,), (16,)))
    torch.manual_seed(0)
    model = cls(spec=spec.to_dict(), grid=[4, 4], num_classes=3, dim=32, depth=2, num_heads=4).cuda().eval()
    labels = torch.tensor([0, 1, 2, 3], device="cuda")
    codes = model.generate(4, labels, temperature=0)
    assert codes.device.type == "cuda" and codes.shape == (4, 4, 4, 2)
    spec.check_codes(codes)
    if cls is AutoregressiveTokenModule:
        assert torch.equal(codes, model.generate(4, labels, temperature=0, use_cache=False))


@pytest.mark.parametrize("compiled", [False, True])
@pytest.mark.parametrize("method", ["nf4", "int4", "kmeans"])
def test_quantized_layers_run_on_cuda_as_dequantize_then_matmul(method, compiled):
    from tokenizers_q.weights import IntGridConfig, KMeansConfig, NF4Config, quantize_
    from tokenizers_q.weights.modules import QuantizedLinear

    config = {"nf4": NF4Config(64), "int4": IntGridConfig(4), "kmeans": KMeansConfig(3, kmeans_iters=3)}[method]
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(256, 128)).eval().cuda()
    quantize_(model, config, progress=False, verbose=False)  # quantized on the device, held there
    layer = model[0]
    assert isinstance(layer, QuantizedLinear) and all(b.device.type == "cuda" for b in layer.buffers())
    layer.compile_dequantize = compiled
    reference = layer.dequantized()
    for rows in (1, 5):
        x = torch.randn(rows, 256, device="cuda")
        torch.testing.assert_close(model(x), x @ reference.T + layer.bias, rtol=1e-4, atol=1e-4)
        assert model(x.bfloat16()).dtype == torch.bfloat16
