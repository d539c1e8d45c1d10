"""Bits per matrix under a total budget: each layer gets the method that buys the most output error per bit."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence

import torch
from torch import nn
from tqdm.auto import tqdm

from tokenizers_q.weights.config import WeightQuantConfig
from tokenizers_q.weights.quantize import collect_hessians, default_filter, run_batch


def output_error(weight: torch.Tensor, restored: torch.Tensor, hessian: torch.Tensor) -> float:
    """``tr(E H E^T)`` with ``E = restored - weight``: the summed squared error of the layer's outputs on the
    calibration inputs whose second moments are ``H``.

    Shapes:
        - weight, restored: (out, in); hessian: (in, in)
    """
    error = (restored - weight).detach().double()
    return float(((error @ hessian.double()) * error).sum())


def allocate_bits(
    model: nn.Module,
    configs: Sequence[WeightQuantConfig],
    budget: float,
    calibration: Iterable,
    filter_fn: Callable[[nn.Module, str], bool] | None = None,
    run: Callable = run_batch,
    progress: bool = True,
) -> dict[str, WeightQuantConfig]:
    r"""A method per linear layer among ``configs`` so that the stored bits average at most ``budget`` per weight
    and the summed relative output error (:func:`output_error` on the calibration inputs over the layer's
    output energy ``tr(W H W^T)``, so that layers of large and small activations compare) is as small as a
    greedy choice makes it: every layer starts at its cheapest method, then the upgrade of best error saved per extra
    bit that still fits is taken, until none fits (sensitive layers get more bits).

    Every layer is quantized by every config once to measure it; pass the result as ``overrides`` to
    :func:`~tokenizers_q.weights.quantize_` (``quantize_(model, None, overrides=chosen, calibration=...)``).

    Args:
        configs: the methods to choose from, e.g. the same grid at 2, 3 and 4 bits.
        budget: the most stored bits per weight, over all selected layers together.
        calibration: batches, fed by ``run(model, batch)``, for the input statistics.
        filter_fn: which layers (as in ``quantize_``). Default: every ``nn.Linear``.

    Returns:
        ``{dotted layer name: config}`` for every selected layer.
    """
    configs = list(configs)
    if not configs or not all(isinstance(c, WeightQuantConfig) for c in configs):
        raise TypeError(f"configs must be a non-empty sequence of WeightQuantConfig, got {configs!r}")
    if not budget > 0:
        raise ValueError(f"budget must be a positive number of bits per weight, got {budget!r}")
    filter_fn = filter_fn or default_filter
    layers = {n: m for n, m in model.named_modules() if n and isinstance(m, nn.Linear) and filter_fn(m, n)}
    if not layers:
        raise ValueError("no layer to allocate bits to: the filter selects no nn.Linear")
    hessians = collect_hessians(model, list(layers), calibration, run)
    costs: dict[str, list[tuple[int, float, int]]] = {}  # name -> (stored bits, output error, config index)
    for name, layer in tqdm(layers.items(), desc="allocate bits", disable=not progress):
        weight, hessian = layer.weight.detach().float(), hessians[name]
        energy = max(output_error(torch.zeros_like(weight), weight, hessian), 1e-30)  # tr(W H W^T)
        options = []
        for index, config in enumerate(configs):
            tensors = config.quantize(weight, hessian if config.needs_hessian else None)
            restored = config.dequantize(tensors, tuple(weight.shape))
            bits = sum(8 * t.numel() * t.element_size() for t in tensors.values())
            options.append((bits, output_error(weight, restored, hessian) / energy, index))
        costs[name] = sorted(options)
    total_weights = sum(layer.weight.numel() for layer in layers.values())
    allowed = budget * total_weights
    chosen = {name: 0 for name in costs}  # position in the layer's options, cheapest first
    spent = sum(costs[name][0][0] for name in costs)
    if spent > allowed:
        cheapest = spent / total_weights
        raise ValueError(f"budget {budget} bits per weight is below the cheapest choice ({cheapest:.3f})")
    while True:
        best = None
        for name, position in chosen.items():
            bits, error, _ = costs[name][position]
            for later in range(position + 1, len(costs[name])):
                more_bits, less_error, _ = costs[name][later]
                extra, saved = more_bits - bits, error - less_error
                if saved > 0 and spent + extra <= allowed:
                    gain = saved / max(extra, 1)
                    if best is None or gain > best[0]:
                        best = (gain, name, later, extra)
        if best is None:
            break
        _, name, later, extra = best
        chosen[name], spent = later, spent + extra
    return {name: configs[costs[name][position][2]] for name, position in chosen.items()}
