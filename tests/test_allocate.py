"""Bits per matrix under a budget: sensitive layers get more, the total stays within the budget."""

import copy

import pytest
import torch
from torch import nn

from tokenizers_q.weights import (
    IntGridConfig,
    allocate_bits,
    collect_hessians,
    model_bits_per_weight,
    output_error,
    quantize_,
)

CONFIGS = [IntGridConfig(bits, group_size=32, symmetric=False) for bits in (2, 3, 4)]


def model_and_data():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 64), nn.GELU(), nn.Linear(64, 64), nn.GELU(), nn.Linear(64, 64))
    with torch.no_grad():
        model[2].weight[:, ::7] *= 20  # outlier columns: the middle layer's grids lose most of its outputs
    return model, [torch.randn(32, 64) for _ in range(4)]


def test_output_error_is_the_summed_squared_output_error():
    weight, restored, inputs = torch.randn(8, 16), torch.randn(8, 16), torch.randn(100, 16)
    hessian = inputs.T @ inputs
    expected = ((inputs @ restored.T - inputs @ weight.T) ** 2).sum()
    assert output_error(weight, restored, hessian) == pytest.approx(expected.item(), rel=1e-5)


def test_the_budget_holds_and_the_sensitive_layer_gets_the_most_bits():
    model, batches = model_and_data()
    chosen = allocate_bits(model, CONFIGS, budget=3.0 + 1.0, calibration=batches, progress=False)
    assert set(chosen) == {"0", "2", "4"}
    assert chosen["2"].bits == max(c.bits for c in chosen.values())
    quantized = copy.deepcopy(model)
    quantize_(quantized, None, overrides=chosen, progress=False, verbose=False)
    assert model_bits_per_weight(quantized) <= 4.0


def test_allocation_beats_a_uniform_choice_at_the_same_bits():
    model, batches = model_and_data()
    uniform = copy.deepcopy(model)
    quantize_(uniform, CONFIGS[1], progress=False, verbose=False)
    budget = model_bits_per_weight(uniform)
    mixed = copy.deepcopy(model)
    quantize_(mixed, None, overrides=allocate_bits(model, CONFIGS, budget, batches, progress=False), verbose=False)
    assert model_bits_per_weight(mixed) <= budget + 1e-9
    names = ["0", "2", "4"]
    hessians = collect_hessians(model, names, batches)

    def total_error(quantized):
        modules = dict(quantized.named_modules())
        return sum(
            output_error(dict(model.named_modules())[n].weight, modules[n].dequantized(), hessians[n]) for n in names
        )

    assert total_error(mixed) < total_error(uniform)


def test_bad_budgets_and_configs_are_refused():
    model, batches = model_and_data()
    with pytest.raises(ValueError, match=r"budget 1.0 bits per weight is below the cheapest choice \(3.000\)"):
        allocate_bits(model, CONFIGS, 1.0, batches, progress=False)
    with pytest.raises(ValueError, match="budget must be a positive number"):
        allocate_bits(model, CONFIGS, 0, batches, progress=False)
    with pytest.raises(TypeError, match="configs must be a non-empty sequence"):
        allocate_bits(model, [], 4.0, batches, progress=False)
