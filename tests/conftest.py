import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))

# Small configurations of every registered quantizer, at input dim 16.
# test_registry_covers_every_quantizer fails when a new quantizer has no entry here.
CONFIGS = {
    "vq": dict(dim=16, codebook_size=32),
    "rvq": dict(dim=16, num_quantizers=3, codebook_size=16),
    "fsq": dict(levels=[8, 5, 5], dim=16),
    "bsq": dict(dim=16, codebook_size=2**8),
    "lfq": dict(dim=16, codebook_size=2**8),
    "pq": dict(dim=16, num_groups=4, codebook_size=16),
}

# Variants exercising each option through the full contract.
VARIANTS = {
    "vq-learnable": ("vq", dict(dim=16, codebook_size=32, ema_update=False, threshold_ema_dead_code=1.0)),
    "vq-cosine": ("vq", dict(dim=16, codebook_size=32, use_cosine_sim=True)),
    "vq-rotation": ("vq", dict(dim=16, codebook_size=32, rotation_trick=True)),
    "vq-projected": ("vq", dict(dim=16, codebook_size=32, codebook_dim=4, ema_update=False)),
    "vq-dead-codes": ("vq", dict(dim=16, codebook_size=64, threshold_ema_dead_code=2.0)),
    "rvq-fsq": ("rvq", dict(dim=16, num_quantizers=2, quantizer="fsq", levels=[5, 5, 5])),
    "rvq-dropout": ("rvq", dict(dim=16, num_quantizers=4, codebook_size=8, quantize_dropout=True)),
    "rvq-projected": ("rvq", dict(dim=16, num_quantizers=2, codebook_size=8, codebook_dim=6)),
    "pq-bsq": ("pq", dict(dim=16, num_groups=2, quantizer="bsq", codebook_size=16)),
    "pq-rvq": ("pq", dict(dim=16, num_groups=2, quantizer="rvq", num_quantizers=2, codebook_size=8)),
    "fsq-identity": ("fsq", dict(levels=[7, 5, 5, 5])),
    "bsq-projected": ("bsq", dict(dim=16, codebook_size=2**12)),
}


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def image_folder(tmp_path_factory):
    from helpers import make_image_folder

    return make_image_folder(tmp_path_factory.mktemp("images"))


@pytest.fixture(scope="session")
def trained(image_folder, tmp_path_factory):
    """The run folder of a tiny VQ image tokenizer trained for 6 steps through ``tokq fit``."""
    from helpers import VQ_CONFIG, cli_config

    from tokenizers_q.trainers.cli import main as tokq

    out = tmp_path_factory.mktemp("cli")
    tokq(["fit", "--config", str(cli_config(image_folder, VQ_CONFIG, out))])
    return out / "run" / "version_0"


@pytest.fixture(scope="session")
def other_vq(image_folder, tmp_path_factory):
    """The last checkpoint of a second VQ tokenizer (another seed, one step): the same TokenSpec as ``trained``'s,
    other codebooks."""
    from helpers import VQ_CONFIG, cli_config

    from tokenizers_q.trainers.cli import main as tokq

    out = tmp_path_factory.mktemp("other-vq")
    config = cli_config(image_folder, VQ_CONFIG, out)
    tokq(["fit", "--config", str(config), "--seed_everything", "1", "--trainer.max_steps", "1"])
    return out / "run" / "version_0" / "checkpoints" / "last.ckpt"


@pytest.fixture(params=["token_file", "quantized_model", "embedding_codec", "exported_module", "kv_calibration"])
def kind(request):
    """Each artifact kind of tests/artifact_kinds.py (the file tests run over all of them)."""
    from artifact_kinds import kind_named

    return kind_named(request.param)


@pytest.fixture(autouse=True)
def eager_fused_loops(monkeypatch):
    """Quantized layers dequantize in eager here (compiling each test's shapes would take minutes); the tests
    of the compiled paths turn it back on for their objects. KV caches attend through their C++ loops (built
    once per machine)."""
    from tokenizers_q.weights.modules import QuantizedLinear

    monkeypatch.setattr(QuantizedLinear, "compile_dequantize", False)
