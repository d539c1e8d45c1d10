"""A short distillation of a quantized model's continuous parts towards the float model it came from.

After :func:`~tokenizers_q.weights.quantize_` every code is fixed, but the scales, offsets, level tables
and codebooks the codes index, and the model's norms and biases, are still real numbers. Tuning them on
calibration batches to reproduce the float model's outputs recovers much of what rounding lost at 2-3 bits
(the continuous half of PV-tuning; TernaryBERT's distillation), and changes no stored size: each tuned
tensor is written back in its stored dtype.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from tokenizers_q.checks import check_choice, check_int
from tokenizers_q.weights.modules import QuantizedWeight
from tokenizers_q.weights.quantize import run_batch

LOSSES = ("mse", "kl")


def model_output(output) -> torch.Tensor:
    """The tensor a model's output stands for: ``last_hidden_state``, else ``logits``, else the first tensor."""
    for name in ("last_hidden_state", "logits"):
        value = getattr(output, name, None)
        if isinstance(value, torch.Tensor):
            return value
    if isinstance(output, (tuple, list)):
        output = output[0]
    if not isinstance(output, torch.Tensor):
        raise TypeError(f"cannot read a tensor from the model's output {type(output).__name__}: pass output=")
    return output


def distill_(
    model: nn.Module,
    teacher: nn.Module,
    calibration: Iterable,
    steps: int = 100,
    lr: float = 1e-3,
    loss: str = "mse",
    output: Callable = model_output,
    run: Callable = run_batch,
    progress: bool = True,
) -> list[float]:
    r"""Tune ``model``'s continuous parts in place so that its outputs match ``teacher``'s on ``calibration``.

    Tuned: every floating-point stored tensor of its quantized layers (scales, offsets, tables, codebooks) and
    the parameters of its other modules of fewer than two dimensions (norms, biases); codes and float weight
    matrices stay as they are. Each tensor's learning rate is ``lr`` times its RMS, so scales of 1e-3 and
    norms of 1 move alike. Tuned tensors are written back in their stored dtype.

    Args:
        model: a model quantized by :func:`~tokenizers_q.weights.quantize_`.
        teacher: the float model it was made from (not changed).
        calibration: batches, fed by ``run(model, batch)``; cycled for ``steps`` steps.
        steps: Adam steps. Default: 100.
        lr: the learning rate relative to each tensor's RMS. Default: 1e-3.
        loss: ``"mse"`` between outputs (relative to the teacher's mean square), or ``"kl"`` from the
            teacher's softmax over the last axis (logits). Default: ``"mse"``.
        output: reads the output tensor from a model's output. Default: :func:`model_output`.

    Returns:
        the loss of every step.
    """
    check_int("steps", steps, 0)
    check_choice("loss", loss, LOSSES)
    if not lr > 0:
        raise ValueError(f"lr must be positive, got {lr!r}")
    batches = list(calibration)
    if not batches:
        raise ValueError("distill_ needs calibration batches")
    layers = [m for m in model.modules() if isinstance(m, QuantizedWeight)]
    if not layers:
        raise ValueError("the model has no quantized layers: run quantize_ first")
    flags = {id(p): p.requires_grad for p in model.parameters()}
    tuned = _tunable(model, layers)
    groups = [{"params": [p], "lr": lr * float(p.detach().pow(2).mean().sqrt().clamp_min(1e-8))} for p in tuned]
    optimizer = torch.optim.Adam(groups)
    was_training, teacher_training = model.training, teacher.training
    model.eval(), teacher.eval()
    losses = []
    try:
        for batch in tqdm(itertools.islice(itertools.cycle(batches), steps), total=steps, disable=not progress):
            with torch.no_grad():
                target = output(run(teacher, batch)).float()
            predicted = output(run(model, batch)).float()
            if loss == "mse":
                value = (predicted - target).pow(2).mean() / target.pow(2).mean().clamp_min(1e-12)
            else:
                value = F.kl_div(
                    predicted.log_softmax(-1), target.log_softmax(-1), log_target=True, reduction="batchmean"
                )
            optimizer.zero_grad(set_to_none=True)
            value.backward()
            optimizer.step()
            losses.append(value.item())
    finally:
        _store(layers, tuned, flags)
        model.train(was_training), teacher.train(teacher_training)
    return losses


def _tunable(model: nn.Module, layers: list[QuantizedWeight]) -> list[nn.Parameter]:
    """Turn the layers' float stored tensors into float32 parameters, and switch on the gradients of the
    model's norms and biases; returns what is tuned."""
    tuned = []
    for layer in layers:
        layer._cached = None
        for name in layer.stored:
            tensor = getattr(layer, name)
            if tensor.dtype.is_floating_point:
                parameter = nn.Parameter(tensor.detach().float().clone())
                parameter.stored_dtype = tensor.dtype
                delattr(layer, name)
                setattr(layer, name, parameter)
                tuned.append(parameter)
    quantized = {id(t) for t in tuned}
    for module in model.modules():
        for parameter in module.parameters(recurse=False):
            if id(parameter) not in quantized and parameter.dim() < 2 and parameter.dtype.is_floating_point:
                parameter.requires_grad_(True)
                tuned.append(parameter)
    return tuned


def _store(layers: list[QuantizedWeight], tuned: list[nn.Parameter], flags: dict[int, bool]) -> None:
    """Write the tuned stored tensors back as buffers in their stored dtype; the other tuned parameters get
    back the ``requires_grad`` they had (``flags``)."""
    for layer in layers:
        for name in layer.stored:
            value = getattr(layer, name)
            if isinstance(value, nn.Parameter) and hasattr(value, "stored_dtype"):
                delattr(layer, name)
                layer.register_buffer(name, value.detach().to(value.stored_dtype))
        layer._cached = None
    for parameter in tuned:
        if id(parameter) in flags:
            parameter.requires_grad_(flags[id(parameter)])
