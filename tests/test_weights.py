"""Weight quantization: each method against a direct computation, exact bits, GPTQ, quantize_, save/load."""

import dataclasses

import pytest
import torch
from torch import nn

from tokenizers_q.files import current_arguments
from tokenizers_q.kmeans import residual_kmeans
from tokenizers_q.weights import (
    NF4_LEVELS,
    GaussianGridConfig,
    HessianAccumulator,
    IntGridConfig,
    KMeansConfig,
    NF4Config,
    QuantizedEmbedding,
    QuantizedLinear,
    TernaryConfig,
    VectorCodebookConfig,
    WeightQuantConfig,
    load_quantized,
    model_bits_per_weight,
    quantize_,
    save_quantized,
)
from tokenizers_q.weights.config import unpack_levels

ALL_CONFIGS = [
    IntGridConfig(4, group_size=32),
    IntGridConfig(3, granularity="channel", symmetric=False),
    IntGridConfig(8, granularity="tensor"),
    IntGridConfig(4, group_size=32, gptq=True),
    NF4Config(32),
    TernaryConfig(),
    TernaryConfig("channel"),
    KMeansConfig(3),
    KMeansConfig(3, weighting="activation", gptq=True),
    IntGridConfig(3, group_size=32, symmetric=False, gptq=True, act_order=True),
    VectorCodebookConfig(group_size=4, codebook_size=16),
    VectorCodebookConfig(group_size=8, codebook_size=16, num_quantizers=2, refine_iters=5),
]


def weight(rows=32, cols=128, seed=0):
    return torch.randn(rows, cols, generator=torch.Generator().manual_seed(seed))


def roundtrip(config, w, hessian=None):
    return config.dequantize(config.quantize(w, hessian), tuple(w.shape))


def mlp(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(128, 64), nn.GELU(), nn.Linear(64, 32))


def calibration(seed=0):
    g = torch.Generator().manual_seed(seed)
    mixing = torch.randn(128, 128, generator=g) / 8  # correlated inputs: where GPTQ helps
    return [torch.randn(64, 128, generator=g) @ mixing for _ in range(2)]


def test_integer_grids_match_a_direct_computation():
    w = weight()
    groups = w.reshape(32, 4, 32)
    scale = (groups.abs().amax(-1, keepdim=True) / 7).half().float()
    want = (torch.round(groups / scale).clamp(-7, 7) * scale).reshape(32, 128)
    torch.testing.assert_close(roundtrip(IntGridConfig(4, group_size=32), w), want)
    low, high = w.amin(1, keepdim=True).half().float(), w.amax(1, keepdim=True)
    step = ((high - low) / 7).half().float()
    want = torch.round((w - low) / step).clamp(0, 7) * step + low
    torch.testing.assert_close(roundtrip(IntGridConfig(3, granularity="channel", symmetric=False), w), want)


def test_nf4_ternary_and_kmeans_match_direct_computations():
    w = weight()
    blocks = w.reshape(32, 2, 64)
    absmax = blocks.abs().amax(-1, keepdim=True).half().float()
    nearest = (blocks[..., None] / absmax[..., None] - NF4_LEVELS).abs().argmin(-1)
    torch.testing.assert_close(roundtrip(NF4Config(), w), (NF4_LEVELS[nearest] * absmax).reshape(32, 128))
    scale = w.abs().mean().half().float()
    torch.testing.assert_close(roundtrip(TernaryConfig(), w), torch.round(w / scale).clamp(-1, 1) * scale)
    tensors = KMeansConfig(2).quantize(w)
    table = tensors["table"].float()
    assert table.shape == (32, 4) and tensors["table"].dtype == torch.float16
    got = KMeansConfig(2).dequantize(tensors, (32, 128))
    want = table.gather(1, (w[..., None] - table[:, None]).abs().argmin(-1))
    torch.testing.assert_close(got, want)  # each weight -> the nearest level of its own row


def test_vector_codebooks_sum_the_nearest_entries():
    w = weight()
    config = VectorCodebookConfig(group_size=4, codebook_size=16)
    tensors = config.quantize(w)
    books, scale = tensors["codebooks"].float(), tensors["scale"].float()
    assert books.shape == (1, 16, 4)
    torch.testing.assert_close(scale, w.pow(2).mean(1).sqrt().half().float())
    groups = (w / scale[:, None]).reshape(-1, 4)
    index = torch.cdist(groups, books[0]).argmin(1)
    torch.testing.assert_close(config.dequantize(tensors, (32, 128)), books[0][index].reshape(32, 128) * scale[:, None])
    two = VectorCodebookConfig(group_size=4, codebook_size=16, num_quantizers=2)
    assert (roundtrip(two, w) - w).norm() < 0.9 * (roundtrip(config, w) - w).norm()  # the residual stage helps


def test_vector_codebooks_are_the_residual_kmeans_of_the_scaled_groups():
    w = weight()
    config = VectorCodebookConfig(group_size=4, codebook_size=16, num_quantizers=2, kmeans_iters=5, seed=3)
    tensors = config.quantize(w)
    groups = (w / tensors["scale"].float()[:, None]).reshape(-1, 4)
    want = residual_kmeans(groups, 2, 16, 5, generator=torch.Generator().manual_seed(3))
    assert torch.equal(tensors["codebooks"], want.codebooks.half())
    assert torch.equal(unpack_levels(tensors["codes"], 4, (32, 32, 2)).reshape(-1, 2), want.codes)


VECTOR_EARLIER_NAMES = {"dim": 8, "codebook_size": 16, "num_codebooks": 2, "refine_steps": 5, "kmeans_iters": 3}
VECTOR_CURRENT = VectorCodebookConfig(group_size=8, codebook_size=16, num_quantizers=2, refine_iters=5, kmeans_iters=3)


def test_vector_configs_of_the_earlier_names_are_read_with_a_warning():
    names = "dim -> group_size, num_codebooks -> num_quantizers, refine_steps -> refine_iters"
    with pytest.warns(DeprecationWarning, match=names):
        arguments = current_arguments(VECTOR_EARLIER_NAMES, "a vector config", VectorCodebookConfig.renamed_arguments)
    assert VectorCodebookConfig(**arguments) == VECTOR_CURRENT
    assert WeightQuantConfig.from_dict(VECTOR_CURRENT.to_dict()) == VECTOR_CURRENT
    with pytest.raises(TypeError, match="unexpected keyword argument 'dim'"):
        VectorCodebookConfig(dim=4)  # no alias in the constructor: only stored configs are read under old names


def test_saved_vector_configs_of_the_earlier_names_load_with_a_warning():
    with pytest.warns(DeprecationWarning) as caught:
        config = WeightQuantConfig.from_dict({"method": "vector", **VECTOR_EARLIER_NAMES})
    assert config == VECTOR_CURRENT and "dim -> group_size" in str(caught[0].message)


def test_vector_config_arguments_are_checked():
    with pytest.raises(ValueError, match=r"codebook_size must be an int in \[2, 65536\], got 1"):
        VectorCodebookConfig(codebook_size=1)
    with pytest.raises(TypeError, match="group_size must be an int, got 4.0"):
        VectorCodebookConfig(group_size=4.0)
    with pytest.raises(ValueError, match="num_quantizers must be a positive int, got 0"):
        VectorCodebookConfig(num_quantizers=0)
    with pytest.raises(ValueError, match="refine_iters must be a non-negative int, got -1"):
        VectorCodebookConfig(refine_iters=-1)
    with pytest.raises(ValueError, match="group_size 3 must divide the input width 128"):
        VectorCodebookConfig(group_size=3).quantize(weight())


@pytest.mark.parametrize(
    "config, bits",
    [
        (IntGridConfig(4, group_size=128), 4 + 32 / 128),  # the int4 kernel's layout holds a zero per group too
        (IntGridConfig(4, group_size=64, symmetric=False), 4 + 32 / 64),
        (IntGridConfig(3, granularity="channel"), 3 + 16 / 256),
        (IntGridConfig(8, granularity="channel"), 8 + 16 / 256),
        (IntGridConfig(2, granularity="tensor"), 2 + 16 / (64 * 256)),
        (NF4Config(64), 4 + 16 / 64),
        (TernaryConfig(), 2 + 16 / (64 * 256)),
        (KMeansConfig(3), 3 + 8 * 16 / 256),
        (VectorCodebookConfig(group_size=4, codebook_size=256), 2 + (256 * 4 * 16 + 64 * 16) / (64 * 256)),
        (
            VectorCodebookConfig(group_size=8, codebook_size=16, num_quantizers=3),
            3 * 4 / 8 + (3 * 16 * 8 * 16 + 64 * 16) / (64 * 256),
        ),
    ],
)
def test_bits_per_weight_count_every_stored_byte(config, bits):
    layer = QuantizedLinear((64, 256), config, config.quantize(weight(64, 256)))
    assert layer.bits_per_weight() == pytest.approx(bits)


def test_gptq_lowers_the_output_error_on_calibration_inputs():
    w, inputs = weight(64, 128), torch.cat(calibration())
    accumulator = HessianAccumulator(128)
    for part in inputs.split(50):
        accumulator.add(part)
    torch.testing.assert_close(accumulator.hessian, inputs.T @ inputs / len(inputs), rtol=1e-4, atol=1e-5)
    for plain, compensated in [
        (IntGridConfig(3, group_size=32), IntGridConfig(3, group_size=32, gptq=True)),
        (IntGridConfig(3, granularity="channel"), IntGridConfig(3, granularity="channel", gptq=True)),
        (KMeansConfig(2), KMeansConfig(2, gptq=True)),
        (IntGridConfig(3, group_size=32), IntGridConfig(3, group_size=32, gptq=True, act_order=True)),
        (IntGridConfig(3, granularity="tensor"), IntGridConfig(3, granularity="tensor", gptq=True, act_order=True)),
        (KMeansConfig(2), KMeansConfig(2, gptq=True, act_order=True)),
    ]:
        errors = [
            ((inputs @ (roundtrip(c, w, accumulator.hessian) - w).T).norm() / (inputs @ w.T).norm()).item()
            for c in (plain, compensated)
        ]
        assert errors[1] < 0.8 * errors[0], (plain, errors)


def test_codebook_refinement_lowers_the_output_error():
    w, inputs = weight(64, 128), torch.cat(calibration())
    hessian = inputs.T @ inputs / len(inputs)
    errors = [
        ((inputs @ (roundtrip(VectorCodebookConfig(codebook_size=16, refine_iters=s), w, hessian) - w).T).norm()).item()
        for s in (0, 100)
    ]
    assert errors[1] < errors[0]


@pytest.mark.parametrize("config", ALL_CONFIGS, ids=str)
def test_quantize_swaps_layers_saves_and_loads_identically(config, tmp_path):
    model, batches = mlp(), calibration()
    reference = model(batches[0])
    rows = quantize_(model, config, calibration=batches, progress=False, verbose=False)
    assert [r["module"] for r in rows] == ["0", "2"] and all(isinstance(model[i], QuantizedLinear) for i in (0, 2))
    out = model(batches[0])
    assert torch.isfinite(out).all() and 0 < (out - reference).norm() / reference.norm() < 1.0
    again = quantize_(model, IntGridConfig(8), progress=False, verbose=False)
    assert again == [] and torch.equal(model(batches[0]), out)  # quantize_ twice does not re-quantize
    path = save_quantized(model, tmp_path / "model.safetensors")
    loaded = load_quantized(mlp(seed=1), path)
    assert torch.equal(loaded(batches[0]), out)
    assert model_bits_per_weight(loaded) == model_bits_per_weight(model)
    assert WeightQuantConfig.from_dict(config.to_dict()) == config


def test_overrides_filters_and_embeddings(tmp_path):
    model = nn.Sequential(nn.Embedding(100, 64, padding_idx=0), nn.Linear(64, 64), nn.Linear(64, 8))
    ids = torch.randint(0, 100, (4, 7))
    reference = model(ids)
    rows = quantize_(
        model,
        IntGridConfig(4, group_size=32),
        filter_fn=lambda m, name: isinstance(m, (nn.Linear, nn.Embedding)),
        overrides={"0": NF4Config(32), "2": None},
        progress=False,
        verbose=False,
    )
    assert [(r["module"], r["method"]) for r in rows] == [("0", "nf4"), ("1", "int")]
    assert isinstance(model[0], QuantizedEmbedding) and isinstance(model[2], nn.Linear)
    assert (model(ids) - reference).norm() / reference.norm() < 0.2
    assert torch.equal(model[0](torch.zeros(1, dtype=torch.long)), torch.zeros(1, 64))  # padding row stays zero
    loaded = load_quantized(
        nn.Sequential(nn.Embedding(100, 64, padding_idx=0), nn.Linear(64, 64), nn.Linear(64, 8)),
        save_quantized(model, tmp_path / "m.safetensors"),
    )
    assert torch.equal(loaded(ids), model(ids))


def test_cached_weights_are_reused_and_reset_on_load():
    model = mlp()
    quantize_(model, IntGridConfig(4, group_size=64), cache_weight=True, progress=False, verbose=False)
    first = model[0].dequantized()
    assert model[0].dequantized() is first
    model.load_state_dict(model.state_dict())
    assert model[0].dequantized() is not first


def test_summary_is_printed(capsys):
    quantize_(mlp(), IntGridConfig(4, group_size=64), progress=False)
    printed = capsys.readouterr().out
    assert "| module | method | bits/weight | weight rel. error |" in printed and "| 0 | int | 4.500 |" in printed


def test_bad_configs_and_inputs_are_reported(tmp_path):
    with pytest.raises(ValueError, match="bits must be an int in \\[2, 8\\], got 0"):
        IntGridConfig(0)
    with pytest.raises(ValueError, match="granularity must be one of"):
        IntGridConfig(4, granularity="row")
    with pytest.raises(ValueError, match="group_size must be a positive int, got 0"):
        IntGridConfig(4, group_size=0)
    with pytest.raises(ValueError, match="codebook_size must be a power of two"):
        VectorCodebookConfig(codebook_size=100)
    with pytest.raises(ValueError, match="act_order orders the columns of GPTQ: set gptq=True"):
        IntGridConfig(4, act_order=True)
    with pytest.raises(ValueError, match="weighting must be one of"):
        KMeansConfig(weighting="fisher")
    with pytest.raises(ValueError, match="needs calibration batches: pass calibration="):
        quantize_(mlp(), IntGridConfig(4, gptq=True), progress=False, verbose=False)
    with pytest.raises(TypeError, match="only nn.Linear and nn.Embedding can be quantized"):
        quantize_(mlp(), IntGridConfig(4, group_size=64), filter_fn=lambda m, n: isinstance(m, nn.GELU), verbose=False)
    with pytest.raises(TypeError, match="config must be a WeightQuantConfig"):
        quantize_(mlp(), {"bits": 4})
    with pytest.raises(ValueError, match="unknown weight config"):
        WeightQuantConfig.from_dict({"method": "int5"})
    with pytest.raises(ValueError, match="no quantized modules"):
        save_quantized(mlp(), tmp_path / "plain.safetensors")
    with pytest.raises(FileNotFoundError, match="no quantized model at"):
        load_quantized(mlp(), tmp_path / "missing.safetensors")
    (tmp_path / "corrupt.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match="is not a readable quantized model"):
        load_quantized(mlp(), tmp_path / "corrupt.safetensors")
    model = mlp()
    quantize_(model, IntGridConfig(4, group_size=64), progress=False, verbose=False)
    path = save_quantized(model, tmp_path / "model.safetensors")
    with pytest.raises(ValueError, match=r"quantized '2', a linear of shape \[32, 64\]; this model has nothing"):
        load_quantized(nn.Sequential(nn.Linear(128, 64)), path)


def test_load_quantized_refuses_another_architecture_before_changing_it(tmp_path):
    model = mlp()
    quantize_(model, IntGridConfig(4, group_size=64), progress=False, verbose=False)
    path = save_quantized(model, tmp_path / "model.safetensors")
    others = {
        "a Linear of shape \\[32, 128\\]": nn.Sequential(nn.Linear(128, 64), nn.GELU(), nn.Linear(128, 32)),
        "a GELU of shape None": nn.Sequential(nn.Linear(128, 64), nn.GELU(), nn.GELU()),
        "it lacks \\['3.bias', '3.weight'\\]": nn.Sequential(
            nn.Linear(128, 64), nn.GELU(), nn.Linear(64, 32), nn.Linear(4, 4)
        ),
        "quantized '0', a linear of shape \\[64, 128\\]; this model has a Linear of shape \\[63, 128\\]": nn.Sequential(
            nn.Linear(128, 63), nn.GELU(), nn.Linear(64, 32)
        ),
        "was saved from a Sequential, this model is a ModuleList": nn.ModuleList([nn.Linear(128, 64)]),
    }
    for message, other in others.items():
        before = {k: v.clone() for k, v in other.state_dict().items()}
        with pytest.raises(ValueError, match=message):
            load_quantized(other, path)
        after = other.state_dict()
        assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before), message
    restored = load_quantized(mlp(seed=1), path)
    x = torch.randn(4, 128)
    assert torch.equal(restored(x), model(x))
    normed = nn.Sequential(nn.Linear(128, 64), nn.LayerNorm(64))  # a tensor no config describes
    quantize_(normed, IntGridConfig(4, group_size=64), progress=False, verbose=False)
    path = save_quantized(normed, tmp_path / "normed.safetensors")
    with pytest.raises(ValueError, match=r"holds '1.weight' of shape \[64\], this model's is \[63\]"):
        load_quantized(nn.Sequential(nn.Linear(128, 64), nn.LayerNorm(63)), path)


def test_a_failed_save_keeps_the_previous_file(tmp_path, monkeypatch):
    model = mlp()
    quantize_(model, IntGridConfig(4, group_size=64), progress=False, verbose=False)
    path = save_quantized(model, tmp_path / "model.safetensors")
    before = path.read_bytes()
    import safetensors.torch

    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(safetensors.torch, "save_file", broken)
    with pytest.raises(OSError, match="disk full"):
        save_quantized(model, path)
    assert path.read_bytes() == before and len(list(tmp_path.iterdir())) == 1


def test_sequential_statistics_see_the_quantized_layers_before():
    batches = calibration()
    outputs = {}
    for sequential in (False, True):
        model = mlp()
        reference = model(batches[0]).detach()
        quantize_(
            model, IntGridConfig(2, group_size=32, gptq=True), calibration=batches, sequential=sequential, verbose=False
        )
        outputs[sequential] = (model(batches[0]) - reference).norm().item()
    assert outputs[True] != outputs[False] and outputs[True] < outputs[False] * 1.05


@pytest.mark.parametrize(
    "config",
    [
        IntGridConfig(4, group_size=128),
        IntGridConfig(3, group_size=128, symmetric=False),
        IntGridConfig(4, group_size=128, gptq=True),
        IntGridConfig(4, group_size=128, gptq=True, act_order=True),
        NF4Config(group_size=64),
        GaussianGridConfig(4, group_size=128),
        GaussianGridConfig(4, group_size=128, gptq=True, act_order=True),
    ],
)
def test_any_group_size_quantizes_any_width(config):
    """576 inputs (SmolLM2's width) in groups of 128: four whole groups and one of 64, each as if alone."""
    w = weight(16, 576)
    hessian = torch.eye(576) if config.needs_hessian else None
    tensors = config.quantize(w, hessian)
    groups = -(-576 // config.group_size)
    assert tensors["scale"].shape == (16, groups)
    restored = config.dequantize(tensors, (16, 576))
    assert restored.shape == (16, 576)
    if not config.needs_hessian:  # without compensation the last group is quantized exactly as if alone
        tail = 576 - (groups - 1) * config.group_size
        alone = roundtrip(dataclasses.replace(config, group_size=tail), w[:, -tail:].contiguous())
        assert torch.equal(restored[:, -tail:], alone)
    relative_error = (restored - w).pow(2).mean() / w.pow(2).mean()
    assert relative_error < {4: 0.02, 3: 0.06}[config.row_code_bits(1)]  # as at a width groups divide
    layer = QuantizedLinear((16, 576), config, tensors)  # every group's scale (and offset) counted, the short one too
    scale_bits = 16 * tensors["scale"].numel() * (1 if "offset" not in tensors else 2)
    assert layer.stored_bits() == 16 * config.row_code_bits(576) + scale_bits
