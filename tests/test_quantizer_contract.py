"""Every registered quantizer honours the same contract (tests/helpers.py)."""

import pytest
import torch
from conftest import CONFIGS, VARIANTS
from helpers import assert_quantizer

from tokenizers_q import Quantizer, create_quantizer, list_quantizers


def test_registry_covers_every_quantizer():
    assert list_quantizers() == ["bsq", "fsq", "lfq", "pq", "rvq", "vq"]
    assert set(CONFIGS) == set(list_quantizers())


def test_unknown_name_lists_the_valid_ones():
    with pytest.raises(ValueError, match="unknown quantizer 'vqq'; choose one of: bsq, fsq, lfq, pq, rvq, vq"):
        create_quantizer("vqq")


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_contract(name):
    q = create_quantizer(name, **CONFIGS[name])
    assert isinstance(q, Quantizer)
    assert_quantizer(q, torch.randn(4, 50, q.dim))


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_contract_variants(variant):
    name, kwargs = VARIANTS[variant]
    q = create_quantizer(name, **kwargs)
    assert_quantizer(q, torch.randn(3, 40, q.dim))


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_channel_first_maps(name):
    q = create_quantizer(name, channel_first=True, **CONFIGS[name])
    x = torch.randn(2, q.dim, 6, 5)
    out = assert_quantizer(q, x)
    assert out.codes.shape == (2, 6, 5, q.spec.num_codebooks)
    # channel-first and channel-last agree on the same vectors
    last = create_quantizer(name, **CONFIGS[name])
    last.load_state_dict(q.state_dict())
    q.eval(), last.eval()
    torch.testing.assert_close(q(x).quantized.movedim(1, -1), last(x.movedim(1, -1)).quantized)


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_bf16_autocast_input_is_safe(name):
    q = create_quantizer(name, **CONFIGS[name])
    x = torch.randn(2, 64, q.dim)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = q(x.bfloat16())
    assert out.quantized.dtype == torch.bfloat16
    assert torch.isfinite(out.quantized.float()).all() and torch.isfinite(out.loss)
    q.spec.check_codes(out.codes)


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_bad_inputs_raise_clear_errors(name):
    q = create_quantizer(name, **CONFIGS[name])
    with pytest.raises(ValueError, match=f"last dim {q.dim}, got shape \\(2, 3, {q.dim + 1}\\)"):
        q(torch.randn(2, 3, q.dim + 1))
    bad = torch.randn(2, 3, q.dim)
    bad[1, 2, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN or inf"):
        q(bad)
    bad[1, 2, 0] = float("inf")
    with pytest.raises(ValueError, match="NaN or inf"):
        q.encode(bad)
    with pytest.raises(TypeError, match="floating-point input, got dtype torch.int64"):
        q(torch.ones(2, q.dim, dtype=torch.long))
    codes = q.encode(torch.randn(2, 3, q.dim))
    with pytest.raises(TypeError, match="integer tensor, got dtype torch.float32"):
        q.decode(codes.float())
    too_big = codes.clone()
    too_big[0, 0, -1] = q.spec.codebook_sizes[-1]
    with pytest.raises(ValueError, match=f"value {q.spec.codebook_sizes[-1]} .* outside"):
        q.decode(too_big)
    with pytest.raises(ValueError, match="out of range: value -1"):
        q.decode(codes - codes - 1)
    with pytest.raises(ValueError, match=f"shape \\(..., {q.spec.num_codebooks}\\)"):
        q.decode(torch.zeros(2, 3, q.spec.num_codebooks + 1, dtype=torch.long))


def test_extra_repr_shows_sizes():
    assert "codebook_size=32" in repr(create_quantizer("vq", dim=16, codebook_size=32))
    assert "levels=[8, 5, 5]" in repr(create_quantizer("fsq", levels=[8, 5, 5]))
    assert "bits=8" in repr(create_quantizer("bsq", codebook_size=256))
    assert "num_quantizers=3" in repr(create_quantizer("rvq", dim=8, num_quantizers=3, codebook_size=4))
    assert "num_groups=2, group_dim=4" in repr(create_quantizer("pq", dim=8, num_groups=2, codebook_size=4))


def test_token_specs():
    assert create_quantizer("vq", dim=4, codebook_size=1000).spec.bits_per_token == 10
    rvq = create_quantizer("rvq", dim=4, num_quantizers=3, codebook_size=1024)
    assert rvq.spec.codebook_sizes == (1024,) * 3 and rvq.spec.bits_per_token == 30
    fsq = create_quantizer("fsq", levels=[8, 5, 5, 5])
    assert fsq.spec.codebook_sizes == (1000,) and fsq.spec.factors == ((8, 5, 5, 5),)
    bsq = create_quantizer("bsq", dim=32, codebook_size=2**16)
    assert bsq.spec.bits == (16,) and bsq.spec.factors == ((2,) * 16,)
    pq = create_quantizer("pq", dim=16, num_groups=4, codebook_size=256)
    assert pq.spec.num_codebooks == 4 and pq.spec.bits_per_token == 32


@pytest.mark.parametrize(
    ("name", "kwargs", "message"),
    [
        ("vq", dict(dim=0, codebook_size=8), "dim must be a positive int, got 0"),
        ("vq", dict(dim=4, codebook_size=8, decay=1.5), "decay must be in \\[0, 1\\), got 1.5"),
        ("vq", dict(dim=4, codebook_size=8, commitment_weight=-1), "commitment_weight=-1"),
        ("fsq", dict(levels=[8, 1]), "levels must be a non-empty list of ints >= 2"),
        ("bsq", dict(dim=4, codebook_size=100), "power of 2 >= 2, got 100"),
        ("lfq", dict(), "needs dim or codebook_size"),
        ("pq", dict(dim=10, num_groups=4, codebook_size=8), "dim=10, num_groups=4"),
        ("rvq", dict(dim=4, num_quantizers=2, quantize_dropout_cutoff_index=2, codebook_size=4), "\\[0, 2\\)"),
        ("rvq", dict(dim=4, quantizer="nope"), "unknown quantizer 'nope'"),
    ],
)
def test_invalid_construction_names_the_argument(name, kwargs, message):
    with pytest.raises(ValueError, match=message):
        create_quantizer(name, **kwargs)
