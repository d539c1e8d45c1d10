"""Randomized Hadamard rotations, and weights quantized after one (incoherence processing)."""

import pytest
import torch

from tokenizers_q.hadamard import HadamardRotation, hadamard_block
from tokenizers_q.weights import IntGridConfig, NF4Config, QuantizedLinear, RotatedConfig, WeightQuantConfig


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
                      "max_block": 256}  # fmt: skip
    assert WeightQuantConfig.from_dict(stored) == config
    with pytest.raises(TypeError, match="inner must be a \\(non-rotated\\) WeightQuantConfig"):
        RotatedConfig(config)
