"""Trained tokenizers and token models as artifacts: export a run once, use the file anywhere, safely.

``tokq export --ckpt run.ckpt --output tok.safetensors`` writes the module's weights plus a JSON description
of how to build it (``class_path``/``init_args``, the same config LightningCLI trained it from) and of its
data module, as one ``tokenizers_q.exported_module`` artifact (:mod:`tokenizers_q.files`). Every loader that
a user points at a model to *use* it goes through :func:`load_module` (``load_tokenizer``, ``load_token_model``,
``load_graph_tokenizer`` and ``load_kv_tokenizer`` only name the kind expected), which takes that file or a
Lightning ``.ckpt`` and builds the class it names (the ``module_class`` tag every training module writes, or
LightningCLI's ``_class_path``): a checkpoint is read with ``torch.load(weights_only=True)`` (no pickled code
runs) and both are built through :func:`tokenizers_q.instantiate.instantiate` (only library and ``torch.nn``
classes), never through ``load_from_checkpoint``, which would import any ``_class_path`` or ``_instantiator``
it holds. Arguments a class renamed (its ``renamed_arguments``) are read under their current names.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch import nn

from tokenizers_q.files import current_arguments, read_artifact, state_fingerprint, write_artifact
from tokenizers_q.instantiate import check_buildable, instantiate, resolve_class

FORMAT = "tokenizers_q.exported_module"
VERSION = 1
#: the one tag of checkpoints: every module's ``on_save_checkpoint`` names its class under this key (LightningCLI
#: also writes ``_class_path`` into the hyper-parameters; where both are present they must name one class)
MODULE_CLASS_KEY = "module_class"


def class_path(cls: type) -> str:
    """The dotted path of a class, as configs name it."""
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
    ``init_args`` dicts, None when the file does not say), the module's state dict, and the file it came from."""

    module: dict | None
    datamodule: dict | None
    state: dict[str, torch.Tensor]
    source: str = "the module file"


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
    given, tagged = hparams.get("_class_path"), ckpt.get(MODULE_CLASS_KEY)
    if given and tagged and given != tagged and resolve_class(given) is not resolve_class(tagged):
        raise ValueError(f"{path} names two module classes: {given!r} (hyper-parameters) and {tagged!r}")
    module = {"class_path": given or tagged, "init_args": _init_args(hparams, path)}
    data_hparams = dict(ckpt.get("datamodule_hyper_parameters") or {})
    datamodule = None
    if data_hparams:
        datamodule = {"class_path": data_hparams.get("_class_path"), "init_args": _init_args(data_hparams, path)}
    return ModuleFile(module, datamodule, ckpt["state_dict"], str(path))


def read_module_file(path: str | os.PathLike) -> ModuleFile:
    """The description and weights in an exported artifact or a Lightning checkpoint (read safely; nothing is
    built yet). Read a file once with it and hand the result to :func:`load_module` and :func:`load_datamodule`."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no exported module or checkpoint at {path}")
    if path.suffix == ".ckpt":
        return _read_checkpoint(path)
    config, tensors = read_artifact(path, FORMAT, VERSION)[1:]
    return ModuleFile(config.get("module"), config.get("datamodule"), tensors, str(path))


def _module_file(source: str | os.PathLike | ModuleFile) -> ModuleFile:
    return source if isinstance(source, ModuleFile) else read_module_file(source)


def _current_config(file: ModuleFile, base: type[nn.Module] = nn.Module) -> tuple[type[nn.Module], dict]:
    """The module class a file names (checked against ``base`` before anything is built) and its config with
    arguments saved under earlier names (the class's ``renamed_arguments``) under their current ones."""
    config = file.module
    if not config:
        raise ValueError(f"{file.source} does not say how to build its module (no module config)")
    path = config.get("class_path")
    if not path:  # an untagged checkpoint of a module built in Python: the expected class, when one is given
        if base is nn.Module:
            raise ValueError(f"{file.source} does not say which module it holds (no class path)")
        path = class_path(base)
    cls = resolve_class(path, (nn.Module,))
    if not issubclass(cls, base):
        raise ValueError(f"{file.source} holds {cls.__name__}, not {base.__name__}")
    init_args = config.get("init_args") or {}
    renamed = getattr(cls, "renamed_arguments", None)
    if renamed:
        init_args = current_arguments(init_args, f"{file.source} ({cls.__name__})", renamed)
    return cls, {"class_path": path, "init_args": init_args}


def load_module(source: str | os.PathLike | ModuleFile, base: type[nn.Module] = nn.Module) -> nn.Module:
    """The module in an exported artifact or a Lightning checkpoint, of the class the file names, in eval mode
    on the CPU: the one loader of trained modules (the ``load_*`` functions below only name the kind expected).

    Args:
        source: a ``.safetensors`` file written by :func:`export_module`, a ``.ckpt`` of one's own run, or what
            :func:`read_module_file` read from either.
        base: the kind of module expected (e.g. ``AutoencoderModule``); checked before anything is built.
    """
    file = _module_file(source)
    cls, config = _current_config(file, base)
    loss_only = getattr(cls, "loss_only_arguments", ())  # parts of the training loss only: built without them
    config = {**config, "init_args": {k: v for k, v in config["init_args"].items() if k not in loss_only}}
    with warnings.catch_warnings():  # Lightning warns when injected parts are saved as hyper-parameters
        warnings.filterwarnings("ignore", message=r"Attribute '\w+' is an instance of `nn.Module`")
        try:
            module = instantiate(config, (base,))
        except TypeError as err:  # a config that does not fit the class (a module built in Python, an edit)
            raise ValueError(
                f"{file.source}: its config does not build {cls.__name__} ({err}); parts passed as module objects "
                "are not saved as configs: build the module from class_path/init_args configs (as tokq fit does)"
            ) from None
    try:
        module.load_state_dict(file.state, strict=True)
    except RuntimeError as err:
        raise ValueError(f"{file.source}: the weights do not fit the {cls.__name__} its config builds: {err}") from None
    return module.eval()


def load_tokenizer(path: str | os.PathLike | ModuleFile):
    """The image tokenizer (:class:`~tokenizers_q.trainers.AutoencoderModule`) in an export or a checkpoint."""
    from tokenizers_q.trainers.autoencoder import AutoencoderModule

    return load_module(path, AutoencoderModule)


def load_token_model(path: str | os.PathLike | ModuleFile):
    """A transformer on tokens (MaskGIT or autoregressive) in an export or a checkpoint."""
    from tokenizers_q.trainers.token_module import TokenModule

    file = _module_file(path)
    model = load_module(file, TokenModule)
    if type(model) is TokenModule:
        raise ValueError(
            f"{file.source} holds a bare TokenModule, not a transformer on tokens (MaskGIT or autoregressive)"
        )
    return model


def load_graph_tokenizer(path: str | os.PathLike | ModuleFile):
    """The graph tokenizer (:class:`~tokenizers_q.trainers.GraphTokenizerModule`) in an export or a checkpoint."""
    from tokenizers_q.trainers.graph_tokenizer import GraphTokenizerModule

    return load_module(path, GraphTokenizerModule)


def load_kv_tokenizer(path: str | os.PathLike | ModuleFile):
    """The KV tokenizer (:class:`~tokenizers_q.trainers.KVTokenizerModule`) in an export or a checkpoint."""
    from tokenizers_q.trainers.kv_tokenizer import KVTokenizerModule

    return load_module(path, KVTokenizerModule)


def load_datamodule(source: str | os.PathLike | ModuleFile, default: type, overrides: dict[str, Any] | None = None):
    """The data module a run trained on (its saved settings with ``overrides`` applied; None values ignored).

    Built through the allow-list like the module; ``default`` is used when the file names no class.
    """
    import lightning as L

    file = _module_file(source)
    config = file.datamodule
    if not config:
        raise ValueError(f"{file.source} holds no data module settings; it was not trained with a LightningDataModule")
    init_args = dict(config.get("init_args") or {})
    init_args.update({k: v for k, v in (overrides or {}).items() if v is not None})
    path = config.get("class_path") or class_path(default)
    return instantiate({"class_path": path, "init_args": init_args}, (L.LightningDataModule,))


def export_module(source: str | os.PathLike | nn.Module, path: str | os.PathLike, datamodule=None) -> Path:
    """Write a trained module (a checkpoint path, or the module itself) as an exported artifact.

    Args:
        source: a Lightning ``.ckpt`` or an exported artifact, or a module whose ``hparams`` hold configs.
        path: the ``.safetensors`` file to write (atomically).
        datamodule: with a module ``source``: the data module it trained on (its hyper-parameters are kept).
    """
    if isinstance(source, nn.Module):
        hparams = dict(getattr(source, "hparams", {}) or {})
        module = {"class_path": hparams.get("_class_path") or class_path(type(source))}
        module["init_args"] = _init_args(hparams, type(source).__name__)
        data = None
        if datamodule is not None:
            data_hparams = dict(getattr(datamodule, "hparams", {}) or {})
            data_class = data_hparams.get("_class_path") or class_path(type(datamodule))
            data = {"class_path": data_class, "init_args": _init_args(data_hparams, type(datamodule).__name__)}
        file = ModuleFile(module, data, source.state_dict(), type(source).__name__)
    else:
        file = read_module_file(source)
    _, module_config = _current_config(file)  # the class the file names, its arguments under their current names
    check_buildable(module_config)  # refuse to write what no loader would build
    if file.datamodule:
        import lightning as L

        data = file.datamodule if file.datamodule.get("class_path") else file.datamodule.get("init_args")
        check_buildable(data, (L.LightningDataModule,))
    config = {"module": module_config, "datamodule": file.datamodule}
    return write_artifact(path, FORMAT, VERSION, config, file.state)


def tokenizer_fingerprint(tokenizer: nn.Module) -> str:
    """The fingerprint of what defines a tokenizer's codes: its quantizer's tensors (codebooks, projections),
    class and TokenSpec. Token files carry it; decoding with another tokenizer is refused."""
    quantizer = tokenizer.quantizer
    extra = {"class": type(quantizer).__name__, "spec": quantizer.spec.to_dict()}
    return state_fingerprint(quantizer.state_dict(), extra)
