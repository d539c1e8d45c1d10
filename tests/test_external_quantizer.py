"""VectorQuantizePytorch: vector-quantize-pytorch's quantizers behind the library's contract."""

from __future__ import annotations

import copy
import sys

import pytest
import torch
import yaml
from helpers import assert_quantizer, cli_config

from tokenizers_q import Quantizer, VectorQuantizePytorch, list_quantizers
from tokenizers_q.instantiate import instantiate
from tokenizers_q.memory import shared_bits
from tokenizers_q.quantizers.external import WRAPPED_CLASSES

vqp = pytest.importorskip("vector_quantize_pytorch")

DIM = 16
# one small configuration of every allowed class, at input dim 16, and its token layout
CASES = {
    "VectorQuantize": (dict(dim=DIM, codebook_size=32), (32,), None),
    "ResidualVQ": (dict(dim=DIM, num_quantizers=3, codebook_size=16), (16,) * 3, None),
    "FSQ": (dict(levels=[8, 5, 5], dim=DIM), (200,), ((8, 5, 5),)),
    "LFQ": (dict(dim=DIM, codebook_size=2**8), (256,), ((2,) * 8,)),
    "SimVQ": (dict(dim=DIM, codebook_size=32), (32,), None),
    "LatentQuantize": (dict(levels=[5, 5, 4], dim=DIM), (100,), ((5, 5, 4),)),
    "ResidualFSQ": (dict(levels=[5, 5, 5], num_quantizers=2, dim=DIM), (125,) * 2, ((5, 5, 5),) * 2),
    "ResidualLFQ": (dict(dim=DIM, num_quantizers=2, codebook_size=2**6), (64,) * 2, ((2,) * 6,) * 2),
    "ResidualSimVQ": (dict(dim=DIM, num_quantizers=2, codebook_size=16), (16,) * 2, None),
}
VARIANTS = {  # options with state or several code columns
    "vq-kmeans-dead-codes": (
        "VectorQuantize",
        dict(dim=DIM, codebook_size=32, kmeans_init=True, codebook_dim=8, threshold_ema_dead_code=2),
    ),
    "vq-heads": (
        "VectorQuantize",
        dict(dim=DIM, codebook_size=16, heads=2, separate_codebook_per_head=True, codebook_dim=4),
    ),
    "vq-learnable": (
        "VectorQuantize",
        dict(dim=DIM, codebook_size=16, ema_update=False, learnable_codebook=True, rotation_trick=False),
    ),
    "rvq-kmeans": ("ResidualVQ", dict(dim=DIM, num_quantizers=2, codebook_size=16, kmeans_init=True)),
    "fsq-codebooks": ("FSQ", dict(levels=[5, 5], dim=DIM, num_codebooks=2)),
    "lfq-codebooks": ("LFQ", dict(dim=DIM, codebook_size=2**4, num_codebooks=2, commitment_loss_weight=0.25)),
    "latent-identity": ("LatentQuantize", dict(levels=[8, 3, 9], dim=3)),
}


def test_every_allowed_class_has_a_case_and_is_not_registered():
    assert set(CASES) == set(WRAPPED_CLASSES)
    # the registry's contract tests build quantizers from the library's own keywords: the adapter is named by
    # class_path instead (test_quantizer_contract.py pins list_quantizers())
    assert "vqp" not in list_quantizers()


@pytest.mark.parametrize("name", sorted(CASES))
def test_contract(name):
    kwargs, sizes, factors = CASES[name]
    q = VectorQuantizePytorch(name, kwargs)
    assert isinstance(q, Quantizer) and q.dim == DIM
    assert q.spec.codebook_sizes == sizes and q.spec.factors == factors
    # the whole contract (tests/helpers.py) holds for every allowed class and configuration
    out = assert_quantizer(q, torch.randn(4, 50, DIM))
    assert out.codes.shape == (4, 50, len(sizes))
    assert {"usage", "perplexity"} <= set(out.metrics)
    assert f"name={name}" in repr(q)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # bf16 under autocast, as in the trainers
        half = q(torch.randn(2, 64, DIM).bfloat16())
    assert half.quantized.dtype == torch.bfloat16 and torch.isfinite(half.quantized.float()).all()
    q.spec.check_codes(half.codes)


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_contract_variants(variant):
    name, kwargs = VARIANTS[variant]
    q = VectorQuantizePytorch(name, kwargs, channel_first=True)
    x = torch.randn(2, q.dim, 6, 5)
    out = assert_quantizer(q, x)
    assert out.codes.shape == (2, 6, 5, q.spec.num_codebooks)


def _wrapped_input(name: str, x: torch.Tensor) -> torch.Tensor:
    """Rows (N, dim) as the wrapped class reads them."""
    return x.t().unsqueeze(0) if name == "LatentQuantize" else x.unsqueeze(0)


@pytest.mark.parametrize("case", sorted(CASES) + sorted(VARIANTS))
def test_codes_and_state_match_the_wrapped_module(case):
    name, kwargs = VARIANTS[case] if case in VARIANTS else (case, CASES[case][0])
    torch.manual_seed(3)
    raw = getattr(vqp, name)(**kwargs)
    torch.manual_seed(3)
    q = VectorQuantizePytorch(name, kwargs)
    q.wrapped.load_state_dict(raw.state_dict())  # the wrapped module's keys, unchanged
    x = torch.randn(300, q.dim)
    for step in range(2):  # training: codes, output, loss, and the updated statistics agree
        torch.manual_seed(10 + step)
        want = raw.train()(_wrapped_input(name, x))
        torch.manual_seed(10 + step)
        got = q.train()(x)
        assert torch.equal(got.codes, want[1].reshape(300, -1).long())
        quantized = want[0][0].t() if name == "LatentQuantize" else want[0][0]
        torch.testing.assert_close(got.quantized, quantized)
        loss = want[2].sum() if len(want) > 2 else torch.zeros(())
        torch.testing.assert_close(got.loss, loss.float())
        for key, value in raw.state_dict().items():
            torch.testing.assert_close(q.wrapped.state_dict()[key], value, msg=key)
    with torch.no_grad():  # eval
        want = raw.eval()(_wrapped_input(name, x))[1].reshape(300, -1).long()
    assert torch.equal(q.eval().encode(x), want)


def test_update_false_changes_no_state_and_restores_training_flags():
    q = VectorQuantizePytorch("ResidualVQ", dict(dim=DIM, num_quantizers=2, codebook_size=8, kmeans_init=True))
    before = copy.deepcopy(q.state_dict())
    x = torch.randn(64, DIM)
    codes = q.encode(x)  # training mode: no k-means initialisation, no EMA step
    assert q.training and all(m.training for m in q.modules())
    assert all(torch.equal(before[k], v) for k, v in q.state_dict().items())
    assert torch.equal(codes, torch.zeros_like(codes))  # the codebooks are still the zeros k-means will replace
    q.wrapped.layers[1].eval()
    q(x)  # a training step initialises and updates, and keeps each submodule's own flag
    assert not bool(before["wrapped.layers.0._codebook.initted"]) and bool(q.wrapped.layers[0]._codebook.initted)
    assert q.wrapped.layers[0].training and not q.wrapped.layers[1].training


def test_codebooks_code_vectors_and_bits():
    vq = VectorQuantizePytorch("VectorQuantize", dict(dim=DIM, codebook_size=32, codebook_dim=8))
    assert vq.codebooks() == [vq.wrapped._codebook.embed] and vq.codebooks()[0].shape == (1, 32, 8)
    assert shared_bits(vq) == 32 * (32 * 8 + 2 * 8 * DIM + 8 + DIM)  # codebook + both projections, float32
    vectors = vq.code_vectors()
    assert len(vectors) == 1 and vectors[0].shape == (32, DIM)
    rvq = VectorQuantizePytorch("ResidualVQ", CASES["ResidualVQ"][0])
    assert len(rvq.codebooks()) == 3
    stages = rvq.code_vectors()
    assert [v.shape for v in stages] == [(16, DIM)] * 3
    torch.testing.assert_close(stages[1], rvq.wrapped.layers[1].codebook)
    assert VectorQuantizePytorch("FSQ", CASES["FSQ"][0]).codebooks() == []
    simvq = VectorQuantizePytorch("SimVQ", CASES["SimVQ"][0])
    assert simvq.codebooks() == [simvq.wrapped.frozen_codebook]


def test_errors_name_the_argument():
    with pytest.raises(ValueError, match=r"name must be one of \('FSQ', .*'VectorQuantize'\), got 'VQQ'"):
        VectorQuantizePytorch("VQQ", {"dim": 4})
    with pytest.raises(ValueError, match="kwargs of VectorQuantize need 'dim'"):
        VectorQuantizePytorch("VectorQuantize", {"codebook_size": 8})
    with pytest.raises(ValueError, match="cannot determine the dim of ResidualFSQ"):
        VectorQuantizePytorch("ResidualFSQ", {"levels": [5, 5], "num_quantizers": 2})
    with pytest.raises(ValueError, match="vector_quantize_pytorch.LFQ refused kwargs .*power of 2"):
        VectorQuantizePytorch("LFQ", {"dim": 4, "codebook_size": 100})
    with pytest.raises(ValueError, match="does not take channel_first=True for FSQ: .*pass channel_first to"):
        VectorQuantizePytorch("FSQ", {"levels": [5, 5], "channel_first": True})
    with pytest.raises(ValueError, match="quantize_dropout=True .*code -1"):
        VectorQuantizePytorch(
            "ResidualVQ", {"dim": 4, "num_quantizers": 2, "codebook_size": 8, "quantize_dropout": True}
        )
    with pytest.raises(ValueError, match=r"LatentQuantize levels must be powers of two .*got \[7, 6\]"):
        VectorQuantizePytorch("LatentQuantize", {"levels": [7, 6, 5], "dim": 4})
    q = VectorQuantizePytorch("VectorQuantize", {"dim": 8, "codebook_size": 8})
    with pytest.raises(ValueError, match=r"last dim 8, got shape \(2, 3, 9\)"):
        q(torch.randn(2, 3, 9))
    q = VectorQuantizePytorch("FSQ", {"levels": [5, 5], "dim": 8}, channel_first=True)
    with pytest.raises(ValueError, match=r"channel dim \(axis 1\) 8, got shape \(2, 4, 3, 3\)"):
        q.encode(torch.randn(2, 4, 3, 3))
    with pytest.raises(ValueError, match="out of range: value 25"):
        q.decode(torch.full((1, 1), 25))


def test_missing_package_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "vector_quantize_pytorch", None)
    with pytest.raises(ImportError, match=r"pip install 'tokenizers_q\[vqp\]'"):
        VectorQuantizePytorch("FSQ", {"levels": [5, 5]})


# -- configs, the trainers, files ------------------------------------------------------------------
FSQ_YAML = """
quantizer:
  class_path: tokenizers_q.VectorQuantizePytorch
  init_args: {name: FSQ, kwargs: {levels: [8, 5, 5, 5], dim: 8}, channel_first: true}
"""


def test_yaml_config_trains_an_autoencoder():
    import lightning as L
    from torch.utils.data import DataLoader, TensorDataset

    from tokenizers_q.models import Decoder, Encoder
    from tokenizers_q.trainers import AutoencoderModule

    quantizer = instantiate(yaml.safe_load(FSQ_YAML)["quantizer"], (Quantizer,))
    assert quantizer.spec.codebook_sizes == (1000,) and quantizer.channel_first
    # nested class_path dicts in kwargs are built through the allow-list (SimVQ's codebook transform)
    simvq = instantiate(
        {
            "class_path": "tokenizers_q.VectorQuantizePytorch",
            "init_args": {
                "name": "SimVQ",
                "kwargs": {
                    "dim": 8,
                    "codebook_size": 16,
                    "codebook_transform": {
                        "class_path": "torch.nn.Linear",
                        "init_args": {"in_features": 8, "out_features": 8},
                    },
                },
            },
        }
    )
    assert isinstance(simvq.wrapped.code_transform, torch.nn.Linear)
    torch.manual_seed(0)
    encoder = Encoder(in_channels=1, base_channels=8, channel_mult=[1, 2, 2], latent_dim=8)
    decoder = Decoder(out_channels=1, base_channels=8, channel_mult=[1, 2, 2], latent_dim=8)
    module = AutoencoderModule(encoder, decoder, quantizer, warmup_steps=1)
    images = DataLoader(TensorDataset(torch.rand(12, 1, 16, 16)), batch_size=4)
    trainer = L.Trainer(
        max_steps=3,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    before = copy.deepcopy(module.encoder.state_dict())
    trainer.fit(module, images)
    assert trainer.global_step == 3
    assert any(not torch.equal(v, module.encoder.state_dict()[k]) for k, v in before.items())
    codes = module.eval().encode(torch.rand(2, 1, 16, 16))
    assert codes.shape == (2, 4, 4, 1) and module.decode(codes).shape == (2, 1, 16, 16)


def test_cli_fit_export_and_load_give_the_same_codes(image_folder, tmp_path):
    from tokenizers_q.trainers import load_tokenizer
    from tokenizers_q.trainers.artifacts import export_module
    from tokenizers_q.trainers.cli import main as tokq

    quantizer = {
        "class_path": "tokenizers_q.VectorQuantizePytorch",
        "init_args": {
            "name": "VectorQuantize",
            "kwargs": {"dim": 8, "codebook_size": 16, "kmeans_init": True, "threshold_ema_dead_code": 1},
            "channel_first": True,
        },
    }
    tokq(["fit", "--config", str(cli_config(image_folder, quantizer, tmp_path))])
    run = tmp_path / "run" / "version_0"
    exported = export_module(run / "checkpoints" / "last.ckpt", tmp_path / "tokenizer.safetensors")
    images = torch.rand(3, 1, 16, 16)
    models = [
        load_tokenizer(path) for path in (run / "checkpoints" / "last.ckpt", exported, run / "tokenizer.safetensors")
    ]
    assert isinstance(models[1].quantizer, VectorQuantizePytorch) and bool(
        models[1].quantizer.wrapped._codebook.initted
    )
    codes = [model.encode(images) for model in models]
    assert codes[0].shape == (3, 4, 4, 1)
    assert all(torch.equal(c, codes[0]) for c in codes[1:])
    torch.testing.assert_close(models[1].decode(codes[1]), models[0].decode(codes[0]))


# -- DDP: the codebooks synchronise once a process group exists ---------------------------------------
def _ddp_worker(rank: int, world: int, store: str, out: str) -> None:
    torch.set_num_threads(1)
    torch.manual_seed(0)  # the same initial state on both ranks, built before the group exists (as Lightning does)
    synced = VectorQuantizePytorch(
        "VectorQuantize", dict(dim=8, codebook_size=16, kmeans_init=True, kmeans_iters=3, threshold_ema_dead_code=2)
    )
    ema = VectorQuantizePytorch("VectorQuantize", dict(dim=8, codebook_size=16))
    raw = vqp.VectorQuantize(dim=8, codebook_size=16, kmeans_init=True, kmeans_iters=3)
    torch.distributed.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    try:
        g = torch.Generator().manual_seed(100 + rank)  # different data on each rank
        for _ in range(4):
            x = torch.randn(64, 8, generator=g) * (1 + rank)
            torch.manual_seed(7)
            synced(x), ema(x), raw(x.unsqueeze(0))
        states = {"synced": synced.state_dict(), "ema": ema.state_dict(), "raw": raw.state_dict()}
        torch.save(states, f"{out}/rank{rank}.pt")
    finally:
        torch.distributed.destroy_process_group()


def test_ddp_ranks_keep_identical_codebooks(tmp_path):
    import torch.multiprocessing as mp

    mp.spawn(_ddp_worker, args=(2, str(tmp_path / "store"), str(tmp_path)), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    for name in ("synced", "ema"):
        for key, value in ranks[0][name].items():
            assert torch.equal(value, ranks[1][name][key]), (name, key)
    assert bool(ranks[0]["synced"]["wrapped._codebook.initted"])
    # vector-quantize-pytorch alone decided at construction (no group yet) not to synchronise: the ranks diverged
    assert not torch.equal(ranks[0]["raw"]["_codebook.embed"], ranks[1]["raw"]["_codebook.embed"])
    # synchronised EMA statistics are those of one process on both ranks' batches together
    torch.manual_seed(0)
    VectorQuantizePytorch(
        "VectorQuantize", dict(dim=8, codebook_size=16, kmeans_init=True, kmeans_iters=3, threshold_ema_dead_code=2)
    )
    reference = VectorQuantizePytorch("VectorQuantize", dict(dim=8, codebook_size=16))
    gens = [torch.Generator().manual_seed(100 + r) for r in range(2)]
    for _ in range(4):
        reference(torch.cat([torch.randn(64, 8, generator=g) * (1 + r) for r, g in enumerate(gens)]))
    for key, value in reference.state_dict().items():
        torch.testing.assert_close(ranks[0]["ema"][key], value, msg=key)
