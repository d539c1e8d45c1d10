"""The one file format of the library (artifacts), and writes that a killed run never damages.

Every file the library writes (token files, quantized models, embedding codecs, exported tokenizers and
token models) is an *artifact*: a safetensors file whose metadata holds one JSON header::

    {"format": "tokenizers_q.token_file", "version": 2, "config": {...},
     "tensors": {"codes": {"dtype": "uint8", "shape": [1200], "xxh3_128": "..."},
                 "lm_head.weight": {"alias": "embed.weight"}}}

and, under a second key, the checksum of that header text. :func:`read_artifact` checks the header's own
checksum, the format, the version, and every tensor's dtype, shape and checksum *before* the caller builds
anything from it, and raises ``ValueError`` naming the file, the tensor and the problem. Tensors that share
memory (tied weights) are stored once and come back as one tensor. Nothing is ever unpickled.

Checksums are XXH3-128 (about 25 GB/s on one core, 14x SHA-256): they catch corruption, not a forger, who
could rewrite them; safety against files from others comes from never unpickling and from building only
allow-listed classes (:mod:`tokenizers_q.instantiate`).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import warnings
from collections.abc import Callable, Collection, Mapping
from pathlib import Path
from typing import Any, NamedTuple

import torch
import xxhash

HEADER_KEY = "tokenizers_q"
HEADER_CHECKSUM_KEY = "tokenizers_q.xxh3_128"
CHECKSUM = "xxh3_128"
TENSOR_ALIGNMENT = 64  # bytes: what torch's CPU allocator gives; safetensors' views into a file may start anywhere


#: arguments stored under their earlier names, read by :func:`current_arguments`
RENAMED_ARGUMENTS = {"num_iters": "kmeans_iters", "block_size": "group_size", "refine_steps": "refine_iters"}
#: ``bits`` of a codebook (``2^bits`` entries) stored where ``codebook_size`` is now asked for
CODEBOOK_BITS = {"bits": ("codebook_size", lambda bits: 2**bits)}


def current_arguments(
    arguments: Mapping[str, Any],
    what: str,
    renamed: Mapping[str, str] = RENAMED_ARGUMENTS,
    converted: Mapping[str, tuple[str, Callable[[Any], Any]]] | None = None,
) -> dict:
    """A stored configuration under the current argument names: files written before a renaming load as they
    did, with a ``DeprecationWarning`` naming ``what``.

    Args:
        renamed: earlier name -> current name; default :data:`RENAMED_ARGUMENTS` (the names renamed across the
            library); a class passes its own where a name changed only there.
        converted: earlier name -> (current name, how its value becomes the current one), e.g.
            :data:`CODEBOOK_BITS`.
    """
    converted = converted or {}
    old = [name for name in arguments if name in renamed or name in converted]
    if old:
        names = ", ".join(f"{name} -> {renamed[name] if name in renamed else converted[name][0]}" for name in old)
        warnings.warn(f"{what} was saved with renamed arguments ({names}); save it again", DeprecationWarning, 2)
    current = {}
    for name, value in arguments.items():
        if name in converted:
            name, value = converted[name][0], converted[name][1](value)
        current[renamed.get(name, name)] = value
    return current


def atomic_write(path: str | os.PathLike, write: Callable[[str], object]) -> Path:
    """Call ``write(tmp_path)`` on a temporary file beside ``path``, flush it to disk, then rename it into place.

    The temporary file lies in a private hidden folder ``.name.*`` beside ``path`` (so that whatever ``write``
    itself writes next to its file stays there too). On any exception (``KeyboardInterrupt`` included) the
    folder is removed and ``path`` keeps its old content; a SIGKILL can leave a ``.name.*`` folder behind,
    never a half-written ``path``.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    folder = tempfile.mkdtemp(prefix=f".{path.stem}.", dir=path.parent)
    tmp = os.path.join(folder, path.name)
    umask = os.umask(0)
    os.umask(umask)
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    return path


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # some platforms cannot open a directory; the rename is then as durable as they allow
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def tensor_checksum(tensor: torch.Tensor, digest: Any | None = None) -> str:
    """XXH3-128 of a tensor's bytes in C order (any dtype, any device); feeds ``digest`` when given."""
    flat = tensor.detach().reshape(-1).contiguous().cpu()
    digest = digest if digest is not None else xxhash.xxh3_128()
    if flat.numel():
        digest.update(flat.view(torch.uint8).numpy())
    return digest.hexdigest()


def text_checksum(text: str) -> str:
    return xxhash.xxh3_128(text.encode()).hexdigest()


def state_fingerprint(tensors: Mapping[str, torch.Tensor], extra: Mapping[str, Any] | None = None) -> str:
    """A short stable fingerprint of named tensors (names, dtypes, shapes, bytes) and a JSON-able ``extra``."""
    digest = xxhash.xxh3_128(json.dumps(extra or {}, sort_keys=True).encode())
    for name in sorted(tensors):
        t = tensors[name]
        digest.update(f"{name}:{str(t.dtype)}:{list(t.shape)};".encode())
        tensor_checksum(t, digest)
    return digest.hexdigest()


class Artifact(NamedTuple):
    """What :func:`read_artifact` returns: the version written, the config, and the verified tensors."""

    version: int
    config: dict[str, Any]
    tensors: dict[str, torch.Tensor]


def artifact_kind(format: str) -> str:
    """The words for a format in messages: ``"tokenizers_q.token_file"`` -> ``"token file"``."""
    return format.removeprefix("tokenizers_q.").replace("_", " ")


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def write_artifact(
    path: str | os.PathLike, format: str, version: int, config: Mapping[str, Any], tensors: Mapping[str, torch.Tensor]
) -> Path:
    """Write ``tensors`` and the JSON-serialisable ``config`` as an artifact of ``format``/``version``, atomically.

    Tensors sharing memory (the same storage, offset, shape and strides: tied weights) are written once.
    """
    from safetensors.torch import save_file

    stored: dict[str, torch.Tensor] = {}
    entries: dict[str, dict] = {}
    seen: dict[tuple, str] = {}
    storages: set[int] = set()
    for name, tensor in tensors.items():
        if not isinstance(tensor, torch.Tensor):
            raise TypeError(f"artifact tensor {name!r} must be a torch.Tensor, got {type(tensor).__name__}")
        tensor = tensor.detach()
        key = (tensor.device, tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tensor.dtype)
        key += (tuple(tensor.shape), tensor.stride())
        if tensor.numel() and key in seen:
            entries[name] = {"alias": seen[key]}
            continue
        seen[key] = name
        data = tensor.cpu().contiguous()
        if data.untyped_storage().data_ptr() in storages:  # a view of a tensor already stored: safetensors refuses it
            data = data.clone()
        storages.add(data.untyped_storage().data_ptr())
        stored[name] = data
        entries[name] = {
            "dtype": _dtype_name(tensor.dtype),
            "shape": list(tensor.shape),
            CHECKSUM: tensor_checksum(tensor),
        }
    header = {"format": format, "version": version, "config": dict(config), "tensors": entries}
    try:
        text = json.dumps(header)
    except TypeError as err:
        raise TypeError(f"the config of a {format} artifact must be JSON-serialisable: {err}") from None
    metadata = {HEADER_KEY: text, HEADER_CHECKSUM_KEY: text_checksum(text)}
    return atomic_write(path, lambda tmp: save_file(stored, tmp, metadata=metadata))


def read_artifact(path: str | os.PathLike, format: str, versions: int | Collection[int]) -> Artifact:
    """Read and verify an artifact of ``format`` written with one of ``versions``.

    Raises:
        FileNotFoundError: no file at ``path``.
        ValueError: not a safetensors file, not an artifact of ``format``, another version, a header or tensor
            whose checksum, dtype or shape does not match, a tensor missing or unexpected. The message names
            the file and, where it applies, the tensor.
    """
    from safetensors import safe_open

    path = Path(path)
    versions = {versions} if isinstance(versions, int) else set(versions)
    kind = artifact_kind(format)
    if not path.is_file():
        raise FileNotFoundError(f"no {kind} at {path}")
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
            names = set(f.keys())
            header = _verified_header(path, metadata, format, versions)
            entries = header["tensors"]
            stored = {n: e for n, e in entries.items() if "alias" not in e}
            if names != set(stored):
                missing, unexpected = sorted(set(stored) - names), sorted(names - set(stored))
                raise ValueError(f"{path}: tensors missing {missing}, unexpected {unexpected}")
            tensors = {}
            for name, entry in stored.items():
                tensor = f.get_tensor(name)
                _verify_tensor(path, name, tensor, entry)  # the bytes as stored (a copy would normalise bools)
                if tensor.data_ptr() % TENSOR_ALIGNMENT:  # packed kernels (int8pack) crash on misaligned storage
                    tensor = tensor.clone()
                tensors[name] = tensor
    except ValueError:
        raise
    except Exception as err:  # safetensors raises its own error types for truncated or corrupt files
        raise ValueError(f"{path} is not a readable {kind}: {err}") from None
    for name, entry in entries.items():
        if "alias" in entry:
            if entry["alias"] not in tensors:
                raise ValueError(f"{path}: tensor {name!r} is an alias of {entry['alias']!r}, which the file lacks")
            tensors[name] = tensors[entry["alias"]]
    return Artifact(header["version"], header["config"], tensors)


def _verified_header(path: Path, metadata: Mapping[str, str], format: str, versions: set[int]) -> dict:
    text = metadata.get(HEADER_KEY)
    if text is None:
        raise ValueError(f"{path} is a safetensors file but not a tokenizers_q artifact (no {HEADER_KEY!r} header)")
    if text_checksum(text) != metadata.get(HEADER_CHECKSUM_KEY):
        raise ValueError(f"{path}: the header does not match its checksum (the file was edited or is corrupt)")
    try:
        header = json.loads(text)
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: the header is not JSON ({err})") from None
    if not isinstance(header, dict) or not isinstance(header.get("tensors"), dict):
        raise ValueError(f"{path}: the header is not a tokenizers_q artifact header")
    if header.get("format") != format:
        raise ValueError(
            f"{path} holds a {header.get('format')!r} artifact, not a {artifact_kind(format)} ({format!r})"
        )
    if header.get("version") not in versions:
        raise ValueError(
            f"{path} is {format} version {header.get('version')!r}; this library reads version(s) {sorted(versions)}"
        )
    if not isinstance(header.get("config"), dict):
        raise ValueError(f"{path}: the header has no config object")
    return header


def _verify_tensor(path: Path, name: str, tensor: torch.Tensor, entry: Mapping[str, Any]) -> None:
    if _dtype_name(tensor.dtype) != entry.get("dtype") or list(tensor.shape) != entry.get("shape"):
        raise ValueError(
            f"{path}: tensor {name!r} is {_dtype_name(tensor.dtype)} {list(tensor.shape)}, "
            f"the header says {entry.get('dtype')} {entry.get('shape')}"
        )
    if tensor_checksum(tensor) != entry.get(CHECKSUM):
        raise ValueError(f"{path}: tensor {name!r} does not match its checksum (the file is corrupt)")
