"""``quantize_``: swap a model's linear (and embedding) layers for quantized ones in place; save and load them."""

from __future__ import annotations

import fnmatch
from collections.abc import Callable, Iterable
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from tokenizers_q.checks import check_finite
from tokenizers_q.files import read_artifact, write_artifact
from tokenizers_q.weights.config import WeightQuantConfig
from tokenizers_q.weights.gptq import HessianAccumulator
from tokenizers_q.weights.modules import QuantizedEmbedding, QuantizedLinear, QuantizedWeight

FORMAT = "tokenizers_q.quantized_model"
VERSION = 1


def default_filter(module: nn.Module, name: str) -> bool:
    """Linear layers that are not quantized yet."""
    return isinstance(module, nn.Linear)


def run_batch(model: nn.Module, batch):
    """``model(**batch)`` for a dict, ``model(*batch)`` for a tuple or list, else ``model(batch)``: its output."""
    if isinstance(batch, dict):
        return model(**batch)
    if isinstance(batch, (tuple, list)):
        return model(*batch)
    return model(batch)


def _config_for(name: str, config: WeightQuantConfig | None, overrides: dict) -> WeightQuantConfig | None:
    for pattern, override in overrides.items():
        if fnmatch.fnmatchcase(name, pattern):
            return override
    return config


@torch.no_grad()
def collect_hessians(
    model: nn.Module, names: list[str], calibration: Iterable, run: Callable = run_batch
) -> dict[str, torch.Tensor]:
    """Input second moments ``H = X^T X / N`` of the named linear layers over calibration batches.

    ``run(model, batch)`` feeds one batch (default: ``model(**batch)`` for dicts, ``model(*batch)``
    for tuples, else ``model(batch)``).
    """
    modules = dict(model.named_modules())
    accumulators = {n: HessianAccumulator(modules[n].weight.shape[1], f"module {n!r}") for n in names}
    handles = [
        modules[n].register_forward_hook(lambda m, args, out, acc=accumulators[n]: acc.add(args[0])) for n in names
    ]
    try:
        for batch in calibration:
            run(model, batch)
    finally:
        for handle in handles:
            handle.remove()
    empty = [n for n, acc in accumulators.items() if acc.count == 0]
    if empty:
        raise ValueError(f"the calibration batches never reached {empty[:3]}{'...' if len(empty) > 3 else ''}")
    for n, acc in accumulators.items():  # finite inputs whose products overflow float32
        check_finite(acc.hessian, f"the input second moments of module {n!r}", hint="rescale the calibration inputs")
    return {n: acc.hessian for n, acc in accumulators.items()}


def quantize_(
    model: nn.Module,
    config: WeightQuantConfig | None,
    filter_fn: Callable[[nn.Module, str], bool] | None = None,
    overrides: dict[str, WeightQuantConfig | None] | None = None,
    calibration: Iterable | None = None,
    run: Callable = run_batch,
    cache_weight: bool = False,
    sequential: bool = False,
    progress: bool = True,
    verbose: bool = True,
) -> list[dict]:
    r"""Quantize the weights of ``model`` in place: every module that ``filter_fn`` selects is swapped
    for a :class:`QuantizedLinear` (or :class:`QuantizedEmbedding`) made by its config.

    Args:
        model: any ``nn.Module``.
        config: the method for every selected module (None: only ``overrides``).
        filter_fn: ``(module, dotted_name) -> bool``. Default: every ``nn.Linear`` (``nn.Embedding``
            tables are quantized when a filter selects them). Quantized modules are never selected again.
        overrides: ``{glob pattern of dotted names: config or None}``; the first matching pattern
            wins, None keeps the module in full precision (e.g. ``{"*.0.*": IntGridConfig(8)}``).
        calibration: batches for methods that need input statistics (GPTQ, activation
            weighting, codebook refinement), fed by ``run(model, batch)``.
        cache_weight: keep dequantized weights after first use. Default: False.
        sequential: collect each module's input statistics just before quantizing it, with the
            modules before it already quantized (as GPTQ does; one calibration pass per module),
            instead of once from the full-precision model. Default: False.
        progress, verbose: a progress bar; print the summary table. Defaults: True.

    Returns:
        one row per quantized module: name, method, bits per weight, weight relative error.
    """
    if config is not None and not isinstance(config, WeightQuantConfig):
        raise TypeError(f"config must be a WeightQuantConfig, got {type(config).__name__}")
    overrides = dict(overrides or {})
    for pattern, override in overrides.items():
        if override is not None and not isinstance(override, WeightQuantConfig):
            raise TypeError(f"override {pattern!r} must be a WeightQuantConfig or None, got {type(override).__name__}")
    filter_fn = filter_fn or default_filter
    plan = []
    for name, module in model.named_modules():
        if not name or isinstance(module, QuantizedWeight) or not filter_fn(module, name):
            continue
        if not isinstance(module, (nn.Linear, nn.Embedding)):
            raise TypeError(f"{name} is a {type(module).__name__}: only nn.Linear and nn.Embedding can be quantized")
        chosen = _config_for(name, config, overrides)
        if chosen is not None:
            plan.append((name, module, chosen))
    for name, module, _ in plan:  # before any module is swapped: a failure leaves the model as it was
        check_finite(module.weight, f"quantize_: the weight of module {name!r}", hint="fix those weights first")
    needing = [name for name, module, chosen in plan if chosen.needs_hessian]
    if needing and calibration is None:
        raise ValueError(f"{needing[0]} uses a config that needs calibration batches: pass calibration=")
    if any(isinstance(m, nn.Embedding) for n, m, c in plan if n in needing):
        raise ValueError("embedding tables take no calibration-based method (GPTQ, weighting, refinement)")
    hessians = collect_hessians(model, needing, calibration, run) if needing and not sequential else {}
    rows = []
    for name, module, chosen in tqdm(plan, desc="quantize", disable=not progress):
        weight = module.weight.detach().float()
        if sequential and name in needing:
            hessians = collect_hessians(model, [name], calibration, run)
        tensors = chosen.quantize(weight, hessians.get(name))
        if isinstance(module, nn.Linear):
            new = QuantizedLinear(tuple(weight.shape), chosen, tensors, module.bias, cache_weight)
        else:
            new = QuantizedEmbedding(tuple(weight.shape), chosen, tensors, module.padding_idx, cache_weight)
        error = ((new.dequantized() - weight).norm() / weight.norm().clamp_min(1e-12)).item()
        _replace(model, name, new.to(weight.device))
        rows.append({"module": name, "method": chosen.method, "bits": new.bits_per_weight(), "error": error})
    if verbose:
        print(format_summary(rows))
    return rows


def _replace(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, new)


def format_summary(rows: list[dict]) -> str:
    """A markdown table of :func:`quantize_` rows, with the weight-count-weighted total."""
    lines = ["| module | method | bits/weight | weight rel. error |", "|---|---|---|---|"]
    lines += [f"| {r['module']} | {r['method']} | {r['bits']:.3f} | {r['error']:.4f} |" for r in rows]
    return "\n".join(lines)


def model_bits_per_weight(model: nn.Module) -> float:
    """Stored bits over weights of every quantized module in ``model`` (biases and other parameters left out)."""
    quantized = [m for m in model.modules() if isinstance(m, QuantizedWeight)]
    weights = sum(m.shape[0] * m.shape[1] for m in quantized)
    return sum(m.bits_per_weight() * m.shape[0] * m.shape[1] for m in quantized) / weights if weights else 0.0


def save_quantized(model: nn.Module, path: str | Path) -> Path:
    """Write the whole state dict of a quantized model and its quantization configs as a
    ``tokenizers_q.quantized_model`` artifact (tied tensors stored once)."""
    layout = {
        name: {
            "kind": "embedding" if isinstance(m, QuantizedEmbedding) else "linear",
            "shape": list(m.shape),
            "config": m.config.to_dict(),
            "padding_idx": getattr(m, "padding_idx", None),
        }
        for name, m in model.named_modules()
        if isinstance(m, QuantizedWeight)
    }
    if not layout:
        raise ValueError("the model has no quantized modules: run quantize_ first")
    config = {"model_class": type(model).__name__, "modules": layout}
    return write_artifact(path, FORMAT, VERSION, config, model.state_dict())


def _check_architecture(model: nn.Module, config: dict, state: dict[str, torch.Tensor], path: Path) -> None:
    """Refuse, before changing ``model``, a file saved from another architecture."""
    if config.get("model_class") != type(model).__name__:
        raise ValueError(f"{path} was saved from a {config.get('model_class')}, this model is a {type(model).__name__}")
    modules = dict(model.named_modules())
    quantized = config["modules"]
    for name, entry in quantized.items():
        module = modules.get(name)
        expected = nn.Embedding if entry["kind"] == "embedding" else nn.Linear
        shape = None
        if isinstance(module, QuantizedWeight):
            shape = list(module.shape)
        elif isinstance(module, expected):
            shape = list(module.weight.shape)
        if shape != entry["shape"]:
            found = "nothing" if module is None else f"a {type(module).__name__} of shape {shape}"
            raise ValueError(
                f"{path} quantized {name!r}, a {entry['kind']} of shape {entry['shape']}; this model has {found}"
            )
    prefixes = tuple(f"{name}." for name in quantized)
    own = {k: v for k, v in model.state_dict().items() if not k.startswith(prefixes) or k.endswith(".bias")}
    saved = {k: v for k, v in state.items() if not k.startswith(prefixes) or k.endswith(".bias")}
    if own.keys() != saved.keys():
        missing, unexpected = sorted(own.keys() - saved.keys())[:5], sorted(saved.keys() - own.keys())[:5]
        raise ValueError(f"{path} does not fit this model: it lacks {missing} and holds {unexpected} it does not have")
    for key, tensor in own.items():
        if tensor.shape != saved[key].shape:
            raise ValueError(
                f"{path} holds {key!r} of shape {list(saved[key].shape)}, this model's is {list(tensor.shape)}"
            )


def load_quantized(model: nn.Module, path: str | Path, cache_weight: bool = False) -> nn.Module:
    """Rebuild the quantized modules saved by :func:`save_quantized` in ``model`` (the same architecture,
    freshly built) and load every tensor; returns ``model``. The file is verified (checksums, format) and
    checked against ``model``'s architecture before ``model`` is changed."""
    path = Path(path)
    config, state = read_artifact(path, FORMAT, VERSION)[1:]
    try:
        _check_architecture(model, config, state, path)
        configs = {name: WeightQuantConfig.from_dict(e["config"]) for name, e in config["modules"].items()}
    except (KeyError, TypeError) as err:
        raise ValueError(f"{path} is a corrupt quantized model file: {err!r}") from None
    for name, entry in config["modules"].items():
        prefix = f"{name}."
        tensors = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix) and k != f"{name}.bias"}
        if entry["kind"] == "linear":
            bias = state.get(f"{name}.bias")
            new = QuantizedLinear(tuple(entry["shape"]), configs[name], tensors, bias, cache_weight)
        else:
            new = QuantizedEmbedding(tuple(entry["shape"]), configs[name], tensors, entry["padding_idx"], cache_weight)
        _replace(model, name, new)
    model.load_state_dict(state, strict=True)
    return model
