"""Building objects from ``class_path``/``init_args`` configs read from files, with an allow-list.

A config saved in a checkpoint or an artifact names classes by dotted path (LightningCLI's form)::

    {"class_path": "tokenizers_q.VQ", "init_args": {"dim": 8, "codebook_size": 512}}

Importing whatever such a file names would run code from it (``"class_path": "subprocess.run"``), so
:func:`instantiate` resolves only classes *defined* in the library itself (``tokenizers_q...``) or in
``torch.nn``, and only subclasses of the bases the caller allows (``nn.Module`` by default). Anything else
is a ``ValueError`` naming the path, raised before any constructor runs.
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Sequence
from typing import Any

from torch import nn

ALLOWED_PACKAGES = ("tokenizers_q", "torch.nn")


def _allowed(module_name: str) -> bool:
    return any(module_name == p or module_name.startswith(f"{p}.") for p in ALLOWED_PACKAGES)


def resolve_class(class_path: Any, bases: Sequence[type] = (nn.Module,)) -> type:
    """The class at ``class_path`` if the allow-list admits it and it subclasses one of ``bases``.

    Raises:
        ValueError: ``class_path`` is not a dotted string, lies outside ``tokenizers_q``/``torch.nn``, names
            no public class (a function, a module, a re-exported foreign class), or a class of another kind.
    """
    if not isinstance(class_path, str) or "." not in class_path:
        raise ValueError(f"class_path must be a dotted 'package.module.Class' string, got {class_path!r}")
    module_name, _, name = class_path.rpartition(".")
    allowed = " or ".join(f"{p}." for p in ALLOWED_PACKAGES)
    if not _allowed(module_name) or not name.isidentifier() or name.startswith("_"):
        raise ValueError(f"refusing class_path {class_path!r}: only public classes under {allowed} are built")
    try:
        cls = getattr(importlib.import_module(module_name), name)
    except (ImportError, AttributeError):
        raise ValueError(f"class_path {class_path!r} names nothing that can be imported") from None
    if not inspect.isclass(cls) or not _allowed(cls.__module__):
        raise ValueError(f"refusing class_path {class_path!r}: it is not a class defined under {allowed}")
    if not issubclass(cls, tuple(bases)):
        expected = " or ".join(b.__name__ for b in bases)
        raise ValueError(f"refusing class_path {class_path!r}: {cls.__name__} is not a subclass of {expected}")
    return cls


def instantiate(config: Any, bases: Sequence[type] = (nn.Module,)) -> Any:
    """Build ``config``: every ``{"class_path", "init_args"}`` dict in it (nested ones first) becomes an object
    through :func:`resolve_class`; other dicts and lists are rebuilt item by item; plain values pass as they
    are. Nested parts may be any ``nn.Module``; the outermost class must subclass one of ``bases``. Every
    class path in ``config`` is checked before any constructor runs.
    """
    check_buildable(config, bases)
    return _walk(config, tuple(bases), build=True)


def check_buildable(config: Any, bases: Sequence[type] = (nn.Module,)) -> None:
    """Raise the ``ValueError`` that :func:`instantiate` would raise for ``config``, building nothing."""
    _walk(config, tuple(bases), build=False)


def _walk(config: Any, bases: tuple[type, ...], build: bool) -> Any:
    if isinstance(config, list):
        return [_walk(v, (nn.Module,), build) for v in config]
    if not isinstance(config, dict):
        return config
    if "class_path" not in config:
        return {k: _walk(v, (nn.Module,), build) for k, v in config.items()}
    unknown = set(config) - {"class_path", "init_args"}
    if unknown:
        raise ValueError(f"a class_path config takes only 'class_path' and 'init_args', got also {sorted(unknown)}")
    cls = resolve_class(config["class_path"], bases)
    init_args = config.get("init_args") or {}
    if not isinstance(init_args, dict):
        raise ValueError(f"init_args of {config['class_path']!r} must be a dict, got {type(init_args).__name__}")
    args = {k: _walk(v, (nn.Module,), build) for k, v in init_args.items()}
    return cls(**args) if build else None
