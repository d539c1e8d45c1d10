"""Randomized Hadamard rotations, and weights quantized after one (incoherence processing)."""

import pytest
import torch

from tokenizers_q.hadamard import HadamardRotation, hadamard_block
from tokenizers_q.weights import (
    GaussianGridConfig,
    IntGridConfig,
    NF4Config,
    QuantizedLinear,
    RotatedConfig,
    WeightQuantConfig,
    gaussian_levels,
)


def test_the_block_is_the_largest_power_of_two_dividing_the_width():
    assert [hadamard_block(w) for w in (576, 384, 1536, 7, 2048)] == [64, 128, 256, 1, 256]


@pytest.mark.parametrize("width", [576, 384, 8])
def test_rotation_is_orthogonal_and_its_own_inverse(width):
    rotation = HadamardRotation(width, seed=3)
    matrix = rotation.rotate(torch.eye(width))  # R
    assert torch.allclose(matrix @ matrix.T, torch.eye(width), atol=1e-5)
    x, y = torch.randn(5, width), torch.randn(7, width)
    assert torch.allclose(rotation.rotate(x) @ rotation.rotate(y).T, x @ y.T, atol=1e-4)  # dot products kept
    assert torch.allclose(rotation.unrotate(rotation.rotate(x)), x, atol=1e-5)
    hessian = x.T @ x
    assert torch.allclose(rotation.conjugate(hessian), matrix.T @ hessian @ matrix, atol=1e-3)
    assert not torch.equal(HadamardRotation(width, seed=4).signs, rotation.signs)
    with pytest.raises(ValueError, match=f"reads \\(..., {width}\\), got \\(5, {width + 1}\\)"):
        rotation.rotate(torch.randn(5, width + 1))


def test_rotation_spreads_an_outlier_column():
    x = torch.randn(64, 256)
    x[:, 3] *= 50  # one outlier channel
    rotated = HadamardRotation(256).rotate(x)
    assert rotated.abs().amax() < 0.25 * x.abs().amax()


@pytest.mark.parametrize("inner", [IntGridConfig(3, group_size=64), NF4Config(64)])
def test_rotated_weights_with_outliers_quantize_with_less_error(inner):
    torch.manual_seed(0)
    weight = torch.randn(64, 256)
    weight[:, ::37] *= 20  # outlier input channels, as in language models
    plain = inner.dequantize(inner.quantize(weight), (64, 256))
    config = RotatedConfig(inner, seed=1)
    tensors = config.quantize(weight)
    rotated = config.dequantize(tensors, (64, 256))
    assert (rotated - weight).norm() < 0.85 * (plain - weight).norm()  # measured: 0.78 (int3), 0.57 (NF4)
    assert tensors.keys() == inner.quantize(weight).keys()  # nothing stored beyond the inner method's tensors
    layer = QuantizedLinear((64, 256), config, tensors)
    assert layer.bits_per_weight() == QuantizedLinear((64, 256), inner, inner.quantize(weight)).bits_per_weight()
    x = torch.randn(3, 256)
    assert torch.allclose(config.vector_product(tensors, (64, 256), x[:1]), (rotated @ x[0]), atol=1e-3)
    assert torch.allclose(config.dequantize_rows(tensors, (64, 256), 8, 16), rotated[8:16])


def test_rotated_gptq_runs_on_the_rotated_hessian_and_saves_as_a_dict():
    torch.manual_seed(0)
    weight, inputs = torch.randn(32, 128), torch.randn(256, 128) @ torch.randn(128, 128)
    hessian = inputs.T @ inputs / 256
    config = RotatedConfig(IntGridConfig(3, group_size=32, gptq=True))
    assert config.needs_hessian
    restored = config.dequantize(config.quantize(weight, hessian), (32, 128))
    plain = RotatedConfig(IntGridConfig(3, group_size=32))
    rounded = plain.dequantize(plain.quantize(weight), (32, 128))
    output_error = lambda w: ((w - weight) @ inputs.T).norm()  # noqa: E731
    assert output_error(restored) < output_error(rounded)
    stored = config.to_dict()
    assert stored == {"method": "hadamard", "inner": IntGridConfig(3, group_size=32, gptq=True).to_dict(), "seed": 0,
                      "max_block": 256, "rotate_outputs": False}  # fmt: skip
    assert WeightQuantConfig.from_dict(stored) == config
    with pytest.raises(TypeError, match="inner must be a \\(non-rotated\\) WeightQuantConfig"):
        RotatedConfig(config)


@pytest.mark.parametrize("inner", [IntGridConfig(8, group_size=32), GaussianGridConfig(4, group_size=32)])
def test_two_sided_rotation_reads_back_its_weight_rows_and_products(inner):
    torch.manual_seed(0)
    weight = torch.randn(96, 64)
    weight[::7] *= 10  # rows of very different norms
    config = RotatedConfig(inner, seed=2, rotate_outputs=True)
    tensors = config.quantize(weight)
    restored = config.dequantize(tensors, (96, 64))
    one_sided = RotatedConfig(inner, seed=2)
    assert (restored - weight).norm() < (one_sided.dequantize(one_sided.quantize(weight), (96, 64)) - weight).norm()
    assert (restored - weight).norm() < 0.1 * weight.norm()
    x = torch.randn(1, 64)
    torch.testing.assert_close(config.vector_product(tensors, (96, 64), x), restored @ x[0], rtol=1e-4, atol=1e-3)
    torch.testing.assert_close(config.dequantize_rows(tensors, (96, 64), 10, 20), restored[10:20])
    assert WeightQuantConfig.from_dict(config.to_dict()) == config


def test_gaussian_levels_are_the_lloyd_max_quantizer_of_a_standard_normal():
    assert torch.allclose(gaussian_levels(1), torch.tensor([-0.7979, 0.7979]), atol=1e-3)
    assert torch.allclose(gaussian_levels(2), torch.tensor([-1.5104, -0.4528, 0.4528, 1.5104]), atol=2e-3)
    samples = torch.randn(200_000, generator=torch.Generator().manual_seed(0))
    for bits in (2, 3):  # each level is the mean of the samples nearest to it (the Lloyd condition)
        levels = gaussian_levels(bits)
        cell = (samples[:, None] - levels).abs().argmin(1)
        means = torch.stack([samples[cell == i].mean() for i in range(2**bits)])
        assert torch.allclose(means, levels, atol=0.02)


def test_gaussian_grids_beat_uniform_grids_on_gaussian_weights_at_equal_bits():
    weight = torch.randn(64, 512, generator=torch.Generator().manual_seed(0))
    for bits in (2, 3, 4):  # bits + 16/64 against bits + 32/128: both bits + 0.25 per weight
        gaussian = GaussianGridConfig(bits, group_size=64)
        uniform = IntGridConfig(bits, group_size=128, symmetric=False, clip_search=20)
        assert (roundtrip(gaussian, weight) - weight).norm() < (roundtrip(uniform, weight) - weight).norm()
        layer = QuantizedLinear((64, 512), gaussian, gaussian.quantize(weight))
        assert layer.bits_per_weight() == bits + 16 / 64
    with pytest.raises(ValueError, match="act_order orders the columns of GPTQ"):
        GaussianGridConfig(act_order=True)


def roundtrip(config, weight):
    return config.dequantize(config.quantize(weight), tuple(weight.shape))
