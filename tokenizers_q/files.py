"""Writing files so that a killed run never damages what was saved before."""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path


def atomic_write(path: str | os.PathLike, write: Callable[[str], object]) -> Path:
    """Call ``write(tmp_path)`` on a temporary file beside ``path``, then rename it into place."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=path.suffix, dir=path.parent)
    os.close(fd)
    umask = os.umask(0)
    os.umask(umask)
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes the file private; give it the usual permissions
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return path


def read_safetensors(path: str | os.PathLike, header_key: str, kind: str) -> tuple[dict, dict]:
    """The JSON header under ``header_key`` and the tensors of a safetensors file written by this library;
    clear errors for a missing file, an unreadable one, or one without that header (``kind`` names the file)."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no {kind} at {path}")
    try:
        with safe_open(str(path), "pt") as f:
            header = (f.metadata() or {}).get(header_key)
        state = load_file(str(path))
    except Exception as err:  # safetensors raises its own error types for corrupt files
        raise ValueError(f"{path} is not a readable safetensors file: {err}") from None
    if header is None:
        raise ValueError(f"{path} is not {'an' if kind[0] in 'aeiou' else 'a'} {kind} file (no {header_key!r} header)")
    return json.loads(header), state
