"""Trained tokenizers and token models as artifacts: export a run once, use the file anywhere, safely.

``tokq export --ckpt run.ckpt --output tok.safetensors`` writes the module's weights plus a JSON description
of how to build it (``class_path``/``init_args``, the same config LightningCLI trained it from) and of its
data module, as one ``tokenizers_q.exported_module`` artifact (:mod:`tokenizers_q.files`). Every loader that
a user points at a model to *use* it goes through :func:`load_module`, which takes that file or a Lightning
``.ckpt``: a checkpoint is read with ``torch.load(weights_only=True)`` (no pickled code runs) and both are
built through :func:`tokenizers_q.instantiate.instantiate` (only library and ``torch.nn`` classes), never
through ``load_from_checkpoint``, which would import any ``_class_path`` or ``_instantiator`` it holds.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch import nn

from tokenizers_q.files import read_artifact, state_fingerprint, write_artifact
from tokenizers_q.instantiate import check_buildable, instantiate, resolve_class

FORMAT = "tokenizers_q.exported_module"
VERSION = 1
CHECKPOINT_CLASS_KEY = "module_class"  # checkpoints of modules built in Python name their class here


def _class_path(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def _init_args(hparams: dict, source: str | Path) -> dict:
    args = {k: v for k, v in hparams.items() if not k.startswith("_")}
    modules = [k for k, v in args.items() if isinstance(v, nn.Module)]
    if modules:
        raise ValueError(
            f"{source}: the hyper-parameters {modules} are module objects, not configs; build the module from "
            "class_path/init_args configs (as tokq fit does) so that it can be rebuilt from a file"
        )
    return args


class ModuleFile(NamedTuple):
    """What an export or a checkpoint holds: how to build the module and its data module (``class_path``/
    ``init_args`` dicts, None when the file does not say) and the module's state dict."""

    module: dict | None
    datamodule: dict | None
    state: dict[str, torch.Tensor]


def _read_checkpoint(path: Path) -> ModuleFile:
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise ValueError(
            f"{path} could not be loaded safely (torch.load with weights_only=True refused it: "
            f"{str(err).splitlines()[0]}). Only load checkpoints of your own runs; for files from others, ask "
            "for an exported artifact (tokq export --ckpt run.ckpt --output model.safetensors)"
        ) from None
    if not isinstance(ckpt, dict) or not isinstance(ckpt.get("state_dict"), dict):
        raise ValueError(f"{path} is not a Lightning checkpoint (no state_dict)")
    hparams = dict(ckpt.get("hyper_parameters") or {})
    class_path = hparams.get("_class_path") or ckpt.get(CHECKPOINT_CLASS_KEY)
    module = {"class_path": class_path, "init_args": _init_args(hparams, path)}
    data_hparams = dict(ckpt.get("datamodule_hyper_parameters") or {})
    datamodule = None
    if data_hparams:
        datamodule = {"class_path": data_hparams.get("_class_path"), "init_args": _init_args(data_hparams, path)}
    return ModuleFile(module, datamodule, ckpt["state_dict"])


def read_module_file(path: str | os.PathLike) -> ModuleFile:
    """The description and weights in an exported artifact or a Lightning checkpoint (read safely; nothing is
    built yet)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no exported module or checkpoint at {path}")
    if path.suffix == ".ckpt":
        return _read_checkpoint(path)
    config, tensors = read_artifact(path, FORMAT, VERSION)[1:]
    return ModuleFile(config.get("module"), config.get("datamodule"), tensors)


def load_module(path: str | os.PathLike, base: type[nn.Module]) -> nn.Module:
    """The module in an exported artifact or a Lightning checkpoint, in eval mode on the CPU.

    Args:
        path: a ``.safetensors`` file written by :func:`export_module`, or a ``.ckpt`` of one's own run.
        base: the kind of module expected (e.g. ``AutoencoderModule``); checked before anything is built.
    """
    config, _, state = read_module_file(path)
    if not config:
        raise ValueError(f"{path} does not say how to build its module (no module config)")
    class_path = config.get("class_path") or _class_path(base)  # Python-built modules: the expected class
    cls = resolve_class(class_path, (nn.Module,))
    if not issubclass(cls, base):
        raise ValueError(f"{path} holds {cls.__name__}, not {base.__name__}")
    with warnings.catch_warnings():  # Lightning warns when injected parts are saved as hyper-parameters
        warnings.filterwarnings("ignore", message=r"Attribute '\w+' is an instance of `nn.Module`")
        try:
            module = instantiate({"class_path": class_path, "init_args": config.get("init_args") or {}}, (base,))
        except TypeError as err:  # a config that does not fit the class (a module built in Python, an edit)
            raise ValueError(
                f"{path}: its config does not build {cls.__name__} ({err}); parts passed as module objects are not "
                "saved as configs: build the module from class_path/init_args configs (as tokq fit does)"
            ) from None
    try:
        module.load_state_dict(state, strict=True)
    except RuntimeError as err:
        raise ValueError(f"{path}: the weights do not fit the {cls.__name__} its config builds: {err}") from None
    return module.eval()


def load_datamodule(path: str | os.PathLike, default: type, overrides: dict[str, Any] | None = None):
    """The data module a run trained on (its saved settings with ``overrides`` applied; None values ignored).

    Built through the allow-list like the module; ``default`` is used when the file names no class.
    """
    import lightning as L

    config = read_module_file(path).datamodule
    if not config:
        raise ValueError(f"{path} holds no data module settings; it was not trained with a LightningDataModule")
    init_args = dict(config.get("init_args") or {})
    init_args.update({k: v for k, v in (overrides or {}).items() if v is not None})
    class_path = config.get("class_path") or _class_path(default)
    return instantiate({"class_path": class_path, "init_args": init_args}, (L.LightningDataModule,))


def export_module(source: str | os.PathLike | nn.Module, path: str | os.PathLike, datamodule=None) -> Path:
    """Write a trained module (a checkpoint path, or the module itself) as an exported artifact.

    Args:
        source: a Lightning ``.ckpt`` or an exported artifact, or a module whose ``hparams`` hold configs.
        path: the ``.safetensors`` file to write (atomically).
        datamodule: with a module ``source``: the data module it trained on (its hyper-parameters are kept).
    """
    if isinstance(source, nn.Module):
        hparams = dict(getattr(source, "hparams", {}) or {})
        module = {"class_path": hparams.get("_class_path") or _class_path(type(source))}
        module["init_args"] = _init_args(hparams, type(source).__name__)
        data = None
        if datamodule is not None:
            data_hparams = dict(getattr(datamodule, "hparams", {}) or {})
            data_class = data_hparams.get("_class_path") or _class_path(type(datamodule))
            data = {"class_path": data_class, "init_args": _init_args(data_hparams, type(datamodule).__name__)}
        file = ModuleFile(module, data, source.state_dict())
    else:
        file = read_module_file(source)
        if not file.module or not file.module.get("class_path"):
            raise ValueError(f"{source} does not say which module it holds (no _class_path): export it from Python")
    check_buildable(file.module)  # refuse to write what no loader would build
    if file.datamodule:
        import lightning as L

        data = file.datamodule if file.datamodule.get("class_path") else file.datamodule.get("init_args")
        check_buildable(data, (L.LightningDataModule,))
    config = {"module": file.module, "datamodule": file.datamodule}
    return write_artifact(path, FORMAT, VERSION, config, file.state)


def tokenizer_fingerprint(tokenizer: nn.Module) -> str:
    """The fingerprint of what defines a tokenizer's codes: its quantizer's tensors (codebooks, projections),
    class and TokenSpec. Token files carry it; decoding with another tokenizer is refused."""
    quantizer = tokenizer.quantizer
    extra = {"class": type(quantizer).__name__, "spec": quantizer.spec.to_dict()}
    return state_fingerprint(quantizer.state_dict(), extra)
