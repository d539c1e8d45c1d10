"""Integer grids: the scalar core of KV-cache and weight quantization."""

import pytest
import torch

from tokenizers_q.grids import dequantize_grid, grid_bits_per_element, quantize_grid


@pytest.mark.parametrize("bits, symmetric", [(b, False) for b in (1, 2, 3, 4, 8)] + [(b, True) for b in (2, 3, 4, 8)])
def test_round_trip_error_is_at_most_half_a_step(bits, symmetric):
    x = torch.randn(3, 8, 32)
    codes = quantize_grid(x, bits, axis=-1, group_size=8, symmetric=symmetric)
    assert codes.levels.shape == x.shape and codes.levels.dtype == torch.uint8
    assert int(codes.levels.max()) < 2**bits and codes.scale.shape == (3, 8, 4)
    error = (dequantize_grid(codes) - x).abs().reshape(3, 8, 4, 8)
    step = codes.scale.float()[..., None]
    assert (error <= step / 2 + 1e-4).all()


def test_grid_values_and_group_extremes_are_exact():
    x = torch.tensor([[0.0, 1.0, 2.0, 3.0], [-1.0, 0.5, 2.0, 3.5]])
    assert torch.equal(dequantize_grid(quantize_grid(x, 2)), x)  # four evenly spaced values per row
    y = torch.randn(4, 16)
    back = dequantize_grid(quantize_grid(y, 4, group_size=4)).reshape(4, 4, 4)
    groups = y.reshape(4, 4, 4)
    assert torch.allclose(back.amin(-1), groups.amin(-1), atol=2e-3)  # min and max of each group survive
    assert torch.allclose(back.amax(-1), groups.amax(-1), atol=2e-3)


def test_axis_choice_groups_the_right_elements():
    keys = torch.randn(2, 16, 8)  # (heads, tokens, channels): KIVI keys per channel over groups of tokens
    codes = quantize_grid(keys, 4, axis=1, group_size=4)
    assert codes.scale.shape == (2, 8, 4)  # (heads, channels, token groups)
    column = keys[0, 4:8, 3]
    expected = (column.max() - column.min()) / 15
    assert torch.allclose(codes.scale[0, 3, 1].float(), expected, rtol=1e-3)


def test_symmetric_grid_keeps_zero_exact():
    x = torch.tensor([[0.0, 0.3, -0.7, 1.1]])
    back = dequantize_grid(quantize_grid(x, 4, symmetric=True))
    assert back[0, 0] == 0 and (back - x).abs().max() < 1.1 / 7 / 2 + 1e-3


def test_bits_per_element_counts_the_metadata():
    assert grid_bits_per_element(4, 128) == 4 + 32 / 128
    assert grid_bits_per_element(2, 32, symmetric=True) == 2 + 16 / 32
    x = torch.randn(64, 128)
    codes = quantize_grid(x, 4, group_size=128)
    stored = codes.levels.numel() * 4 + 16 * (codes.scale.numel() + codes.offset.numel())
    assert stored / x.numel() == grid_bits_per_element(4, 128)


@pytest.mark.parametrize("symmetric", [False, True])
def test_a_group_size_that_does_not_divide_the_axis_leaves_a_shorter_last_group(symmetric):
    x = torch.randn(3, 10)
    codes = quantize_grid(x, 4, axis=1, group_size=4, symmetric=symmetric)
    assert codes.levels.shape == (3, 10) and codes.scale.shape == (3, 3)
    for span, group in ((slice(0, 4), 0), (slice(4, 8), 1), (slice(8, 10), 2)):  # each group as if alone
        alone = quantize_grid(x[:, span], 4, axis=1, symmetric=symmetric)
        assert torch.equal(codes.levels[:, span], alone.levels)
        assert torch.equal(codes.scale[:, group], alone.scale[:, 0])
    assert torch.allclose(
        dequantize_grid(codes)[:, 8:], dequantize_grid(quantize_grid(x[:, 8:], 4, axis=1, symmetric=symmetric))
    )


def test_bad_input():
    with pytest.raises(ValueError, match="bits must be an int in \\[1, 16\\], got 0"):
        quantize_grid(torch.randn(4), 0)
    with pytest.raises(ValueError, match="group_size must be a positive int, got 0"):
        quantize_grid(torch.randn(10), 4, group_size=0)
    with pytest.raises(TypeError, match="x must be floating point, got dtype torch.int64"):
        quantize_grid(torch.arange(4), 4)
    with pytest.raises(ValueError, match="axis 2 is out of range"):
        quantize_grid(torch.randn(4, 4), 4, axis=2)
    with pytest.raises(ValueError, match="symmetric grid needs bits >= 2"):
        quantize_grid(torch.randn(4), 1, symmetric=True)
    with pytest.raises(ValueError, match="exceed float16"):
        quantize_grid(torch.tensor([0.0, 1e6]), 4)


@pytest.mark.parametrize("symmetric", [False, True])
def test_clip_search_keeps_per_group_the_ratio_of_least_error(symmetric):
    x = torch.randn(8, 256, generator=torch.Generator().manual_seed(0))
    x[:, ::31] *= 8  # rare large values: the full range wastes most levels on them
    full = quantize_grid(x, 3, group_size=64, symmetric=symmetric)
    searched = quantize_grid(x, 3, group_size=64, symmetric=symmetric, clip_search=20)
    assert torch.equal(quantize_grid(x, 3, group_size=64, symmetric=symmetric, clip_search=1).levels, full.levels)

    def group_error(codes):
        return (dequantize_grid(codes) - x).pow(2).reshape(8, 4, 64).sum(-1)

    assert (group_error(searched) <= group_error(full) + 1e-6).all()  # never worse, group by group
    assert group_error(searched).sum() < 0.9 * group_error(full).sum()  # measured: 0.86 (asymmetric), 0.84
    for ratio in (0.75, 0.5):  # and at least as good as any single ratio it tried
        assert group_error(searched).sum() <= group_error_at(x, ratio, symmetric) + 1e-4
    with pytest.raises(ValueError, match="clip_search must be a non-negative int, got -1"):
        quantize_grid(x, 3, clip_search=-1)


def group_error_at(x, ratio, symmetric):
    """Squared error of a grid over ``ratio`` of every group's range, computed directly."""
    groups = x.reshape(8, 4, 64)
    if symmetric:
        scale = (groups.abs().amax(-1, keepdim=True) / 3 * ratio).half().float()
        values = (torch.round(groups / scale).clamp(-3, 3)) * scale
    else:
        low = (groups.amin(-1, keepdim=True) * ratio).half().float()
        scale = ((groups.amax(-1, keepdim=True) * ratio - low) / 7).half().float()
        values = torch.round((groups - low) / scale).clamp(0, 7) * scale + low
    return (values - groups).pow(2).sum()
