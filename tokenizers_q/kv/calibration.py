"""Calibration files of KV caches: what calibrating a model's caches fitted, saved once and loaded safely.

Calibrating takes minutes (k-means on a model's keys and values); its results are kept per attention
layer in one artifact file (:mod:`tokenizers_q.files`: safetensors with a checksummed JSON header,
written atomically, never unpickled): coupled codebooks, calibrated quantizers (rebuilt by registered
name from their construction arguments) and outlier bounds.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence
from pathlib import Path

import torch

from tokenizers_q.files import read_artifact, write_artifact
from tokenizers_q.kv.coupled import CoupledCodebooks, CQConfig
from tokenizers_q.quantizers import Quantizer, create_quantizer

FORMAT = "tokenizers_q.kv_calibration"
VERSION = 1

Bounds = tuple[torch.Tensor, torch.Tensor]


@dataclasses.dataclass
class LayerCalibration:
    """What one attention layer's caches were calibrated with (any part may be None).

    Shapes:
        - key_bounds, value_bounds: (lower, upper), each (heads, head_dim), from
          :func:`~tokenizers_q.kv.outlier_bounds`
    """

    codebooks: CoupledCodebooks | None = None
    quantizers: tuple[Quantizer, Quantizer] | None = None
    key_bounds: Bounds | None = None
    value_bounds: Bounds | None = None

    def shape(self) -> dict[str, int]:
        """The (heads, head_dim) the layer's calibration was fitted for, as far as its parts tell."""
        shape = {}
        if self.codebooks is not None:
            heads, groups, _, channels = self.codebooks.keys.shape
            shape.update(heads=heads, head_dim=groups * channels)
        if self.quantizers is not None:
            shape["head_dim"] = self.quantizers[0].dim
        if self.key_bounds is not None:
            shape.update(heads=self.key_bounds[0].shape[0], head_dim=self.key_bounds[0].shape[1])
        return shape


def save_calibration(path: str | os.PathLike, layers: Sequence[LayerCalibration]) -> Path:
    """Write the calibration of every attention layer (in layer order) to one artifact file, atomically: a
    killed or failed save leaves any earlier file whole."""
    if not layers or not all(isinstance(layer, LayerCalibration) for layer in layers):
        raise ValueError(f"layers must be a non-empty sequence of LayerCalibration, got {layers!r}")
    entries, tensors = [], {}
    for index, layer in enumerate(layers):
        entry = {"shape": layer.shape()}
        if layer.codebooks is not None:
            entry["codebooks"] = layer.codebooks.config.to_dict()
            tensors[f"{index}.codebooks.keys"] = layer.codebooks.keys
            tensors[f"{index}.codebooks.values"] = layer.codebooks.values
        if layer.quantizers is not None:
            entry["quantizers"] = []
            for role, quantizer in zip(("keys", "values"), layer.quantizers):
                arguments = getattr(quantizer, "init_args", None)
                if arguments is None:
                    raise ValueError(
                        f"layer {index}'s {type(quantizer).__name__} has no construction arguments to save: "
                        f"build it with create_quantizer or calibrate_quantizer"
                    )
                entry["quantizers"].append(arguments)
                for name, tensor in quantizer.state_dict().items():
                    tensors[f"{index}.quantizers.{role}.{name}"] = tensor
        for role, bounds in (("key_bounds", layer.key_bounds), ("value_bounds", layer.value_bounds)):
            if bounds is not None:
                entry[role] = True
                tensors[f"{index}.{role}.lower"], tensors[f"{index}.{role}.upper"] = bounds
        entries.append(entry)
    return write_artifact(path, FORMAT, VERSION, {"layers": entries}, tensors)


def load_calibration(
    path: str | os.PathLike, num_layers: int | None = None, heads: int | None = None, head_dim: int | None = None
) -> list[LayerCalibration]:
    """Read a file of :func:`save_calibration`, verifying its checksums; with ``num_layers``, ``heads`` or
    ``head_dim`` (the model's), refuse a calibration of another model, naming both shapes."""
    path = Path(path)
    config, tensors = read_artifact(path, FORMAT, VERSION)[1:]
    entries = config.get("layers")
    if not isinstance(entries, list) or not entries:
        raise ValueError(f"{path} is a KV calibration file without layers")
    if num_layers is not None and len(entries) != num_layers:
        raise ValueError(f"{path} calibrates {len(entries)} attention layers, but the model has {num_layers}")
    expected = {k: v for k, v in (("heads", heads), ("head_dim", head_dim)) if v is not None}
    layers = []
    for index, entry in enumerate(entries):
        stored = {k: entry["shape"][k] for k in expected if k in entry.get("shape", {})}
        if stored != {k: expected[k] for k in stored}:
            raise ValueError(f"{path} was calibrated for layer {index} with {stored}, but the model has {expected}")
        try:
            layers.append(_layer(entry, index, tensors))
        except (KeyError, TypeError, ValueError) as err:
            raise ValueError(f"{path} is a corrupt KV calibration file (layer {index}): {err}") from None
    return layers


def _layer(entry: dict, index: int, tensors: dict[str, torch.Tensor]) -> LayerCalibration:
    layer = LayerCalibration()
    if "codebooks" in entry:
        config = CQConfig.from_dict(entry["codebooks"], f"layer {index}'s CQ codebooks")
        keys, values = tensors[f"{index}.codebooks.keys"], tensors[f"{index}.codebooks.values"]
        layer.codebooks = CoupledCodebooks(keys, values, config)
    if "quantizers" in entry:
        quantizers = []
        for role, arguments in zip(("keys", "values"), entry["quantizers"]):
            quantizer = create_quantizer(arguments["name"], **arguments["kwargs"])  # registered names only
            prefix = f"{index}.quantizers.{role}."
            state = {name[len(prefix) :]: t for name, t in tensors.items() if name.startswith(prefix)}
            quantizer.load_state_dict(state)
            quantizers.append(quantizer.eval())
        layer.quantizers = tuple(quantizers)
    for role in ("key_bounds", "value_bounds"):
        if entry.get(role):
            setattr(layer, role, (tensors[f"{index}.{role}.lower"], tensors[f"{index}.{role}.upper"]))
    return layer
