"""Artifacts (tokenizers_q.files): round trips, tied tensors stored once, every corruption detected by every loader,
atomic writes that leave no temporary on errors, and files that a SIGKILL mid-write never damages."""

from __future__ import annotations

import functools
import itertools
import json
import os
import random
import re
import select
import shutil
import signal
import stat
import struct
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
import xxhash
from torch import nn

from tokenizers_q import TokenSpec, load_tokens, save_tokens
from tokenizers_q import packing as packing_module
from tokenizers_q.embeddings import EmbeddingCodec
from tokenizers_q.embeddings import codec as codec_module
from tokenizers_q.files import (
    CHECKSUM,
    HEADER_CHECKSUM_KEY,
    HEADER_KEY,
    artifact_kind,
    atomic_write,
    read_artifact,
    state_fingerprint,
    tensor_checksum,
    write_artifact,
)
from tokenizers_q.trainers import artifacts as artifacts_module
from tokenizers_q.trainers.artifacts import export_module, load_module
from tokenizers_q.trainers.graph_tokenizer import GraphTokenizerModule
from tokenizers_q.weights import IntGridConfig, load_quantized, quantize_, save_quantized
from tokenizers_q.weights import quantize as quantize_module

# -- the safetensors layout -------------------------------------------------------------------------------------------


def layout(data: bytes) -> tuple[int, dict]:
    """(offset of the data, the parsed safetensors JSON header) of a file's bytes."""
    (length,) = struct.unpack("<Q", data[:8])
    return 8 + length, json.loads(data[8 : 8 + length])


def stored_tensors(data: bytes) -> dict[str, dict]:
    return {k: v for k, v in layout(data)[1].items() if k != "__metadata__"}


def our_header(data: bytes) -> dict:
    return json.loads(layout(data)[1]["__metadata__"][HEADER_KEY])


def layout_fragment(name: str, info: dict, shape: list[int] | None = None, dtype: str | None = None) -> bytes:
    """The bytes of a tensor's entry in the safetensors JSON header, up to its shape (serde's compact output)."""
    shape = info["shape"] if shape is None else shape
    dtype = info["dtype"] if dtype is None else dtype
    return f'{json.dumps(name)}:{{"dtype":"{dtype}","shape":{json.dumps(shape, separators=(",", ":"))}'.encode()


def replace_once(data: bytes, old: bytes, new: bytes) -> bytes:
    assert len(old) == len(new) and data.count(old) == 1, (old, new, data.count(old))
    return data.replace(old, new)


def temporaries(path: Path) -> list[Path]:
    return sorted(path.parent.glob(f".{path.stem}.*"))


def same(a: Any, b: Any) -> bool:
    """Equality of nested dicts/lists of tensors (exact bytes, dtype and shape) and plain values."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return (
            isinstance(a, torch.Tensor)
            and isinstance(b, torch.Tensor)
            and a.dtype == b.dtype
            and a.shape == b.shape
            and tensor_checksum(a) == tensor_checksum(b)
        )
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    return a == b


# -- small models -----------------------------------------------------------------------------------------------------


class TiedLM(nn.Module):
    """An embedding, one hidden layer and an output head that shares the embedding matrix."""

    def __init__(self, vocab: int = 64, dim: int = 32, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.emb = nn.Embedding(vocab, dim)
        self.body = nn.Linear(dim, dim)
        self.head = nn.Linear(dim, vocab, bias=False)
        self.head.weight = self.emb.weight

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(torch.nn.functional.gelu(self.body(self.emb(ids))))


def quantized_tied_lm(vocab: int = 64, dim: int = 32, seed: int = 0) -> TiedLM:
    """A TiedLM with only its hidden layer quantized (the tied embedding/head stay in full precision)."""
    model = TiedLM(vocab, dim, seed)
    rows = quantize_(
        model,
        IntGridConfig(4, group_size=16),
        filter_fn=lambda m, name: isinstance(m, nn.Linear) and name == "body",
        progress=False,
        verbose=False,
    )
    assert [r["module"] for r in rows] == ["body"] and model.head.weight is model.emb.weight
    return model


IDS = torch.arange(64).reshape(4, 16) % 64


# -- the four artifact kinds: each writes variant 0 (A) or 1 (B) of its artifact, and loads a file back ----------------


@dataclass
class Kind:
    name: str
    format: str
    version: int
    write: Callable[[Path, int], object]  # write(path, variant)
    load: Callable[[Path], Any]  # what the library's loader gives, in comparable form


def _token_variant(v: int) -> dict:
    g = torch.Generator().manual_seed(v)
    codes = torch.stack([torch.randint(0, 1000, (50, 4), generator=g), torch.randint(0, 16, (50, 4), generator=g)], -1)
    extras = {"labels": torch.randint(0, 10, (50,), generator=g), "weights": torch.rand(50, 3, generator=g)}
    return {"codes": codes, "metadata": {"variant": v}, "extras": extras, "fingerprint": f"fp{v}"}


def _token_kind() -> Kind:
    variants = [_token_variant(v) for v in (0, 1)]

    def write(path, v):
        d = variants[v]
        save_tokens(path, d["codes"], TokenSpec((1000, 16)), d["metadata"], d["extras"], d["fingerprint"])

    def load(path):
        f = load_tokens(path)
        return {"codes": f.codes, "metadata": f.metadata, "extras": f.extras, "fingerprint": f.fingerprint}

    return Kind("token_file", packing_module.FORMAT, packing_module.VERSION, write, load)


def _quantized_kind() -> Kind:
    models = [quantized_tied_lm(seed=v) for v in (0, 1)]

    def load(path):
        model = load_quantized(TiedLM(seed=7), path)
        assert model.head.weight is model.emb.weight
        return {"state": model.state_dict(), "out": model(IDS)}

    write = lambda p, v: save_quantized(models[v], p)  # noqa: E731
    return Kind("quantized_model", quantize_module.FORMAT, quantize_module.VERSION, write, load)


def _codec_kind() -> Kind:
    codecs = []
    for v in (0, 1):
        x = torch.randn(300, 16, generator=torch.Generator().manual_seed(v))
        codec = EmbeddingCodec(16, "pq", 4, 4, num_lists=4, num_iters=4, seed=v).fit(x)
        codec.add(x[:100])
        codecs.append(codec)
    probe = torch.randn(5, 16, generator=torch.Generator().manual_seed(9))

    def load(path):
        codec = EmbeddingCodec.load(path)
        return {"state": codec.state_dict(), "codes": codec.encode(probe), "search": list(codec.search(probe, 3))}

    return Kind("embedding_codec", codec_module.FORMAT, codec_module.VERSION, lambda p, v: codecs[v].save(p), load)


def _module_kind() -> Kind:
    modules = []
    for v in (0, 1):
        torch.manual_seed(v)
        modules.append(
            GraphTokenizerModule(
                in_dim=8, hidden_dim=16, latent_dim=8, quantizer="vq", quantizer_kwargs={"codebook_size": 32}
            )
        )

    def load(path):
        module = load_module(path, GraphTokenizerModule)
        assert isinstance(module, GraphTokenizerModule) and not module.training
        return {"state": module.state_dict()}

    return Kind(
        "exported_module",
        artifacts_module.FORMAT,
        artifacts_module.VERSION,
        lambda p, v: export_module(modules[v], p),
        load,
    )


BUILDERS = {"token_file": _token_kind, "quantized_model": _quantized_kind, "embedding_codec": _codec_kind}
BUILDERS["exported_module"] = _module_kind


@functools.cache
def kind_named(name: str) -> Kind:
    return BUILDERS[name]()


@pytest.fixture(params=list(BUILDERS))
def kind(request) -> Kind:
    return kind_named(request.param)


def written(kind: Kind, folder: Path, variant: int = 0, name: str = "artifact.safetensors") -> Path:
    path = folder / name
    kind.write(path, variant)
    return path


@functools.cache
def reference(name: str, variant: int) -> Any:
    import tempfile

    with tempfile.TemporaryDirectory() as folder:
        k = kind_named(name)
        return k.load(written(k, Path(folder), variant))


# -- 1. round trips ---------------------------------------------------------------------------------------------------


def test_round_trip_keeps_config_and_tensors_of_every_dtype(tmp_path):
    g = torch.Generator().manual_seed(0)
    special = torch.tensor([1.0, float("nan"), float("inf"), -float("inf"), -0.0])
    tensors = {
        "float32": torch.randn(3, 5, generator=g),
        "special": special,
        "bfloat16": torch.randn(4, 6, generator=g).to(torch.bfloat16),
        "float16": torch.randn(7, generator=g).half(),
        "float64": torch.randn(2, 2, generator=g, dtype=torch.float64),
        "float8": torch.randn(9, generator=g).to(torch.float8_e4m3fn),
        "int64": torch.randint(-(2**40), 2**40, (4, 3), generator=g),
        "int32": torch.randint(-1000, 1000, (5,), generator=g, dtype=torch.int32),
        "int8": torch.randint(-128, 128, (6,), generator=g, dtype=torch.int8),
        "uint8": torch.randint(0, 256, (2, 3, 4), generator=g, dtype=torch.uint8),
        "bool": torch.rand(11, generator=g) > 0.5,
        "empty": torch.zeros(0, 3),
        "empty_int": torch.zeros(4, 0, dtype=torch.int64),
        "scalar": torch.tensor(3.25),
        "scalar_int": torch.tensor(7, dtype=torch.int64),
        "transposed": torch.randn(3, 4, generator=g).T,
        "grad": torch.randn(3, requires_grad=True),
    }
    config = {"name": "x", "n": 3, "ratio": 0.5, "flags": [True, False, None], "nested": {"a": [1, [2, "b"]]}}
    path = write_artifact(tmp_path / "a.safetensors", "tokenizers_q.test", 3, config, tensors)
    assert path == tmp_path / "a.safetensors" and temporaries(path) == []
    assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~_umask()
    art = read_artifact(path, "tokenizers_q.test", {2, 3})
    assert art.version == 3 and art.config == config and art.tensors.keys() == tensors.keys()
    for name, t in tensors.items():
        got = art.tensors[name]
        assert got.dtype == t.dtype and got.shape == t.shape and not got.requires_grad, name
        assert torch.equal(got.reshape(-1).view(torch.uint8), t.detach().contiguous().reshape(-1).view(torch.uint8))
    assert torch.equal(art.tensors["special"][2:], special[2:]) and art.tensors["special"][1].isnan()
    assert str(art.tensors["special"][4].item()) == "-0.0"
    header = our_header(path.read_bytes())
    assert header["format"] == "tokenizers_q.test" and header["tensors"]["bfloat16"]["dtype"] == "bfloat16"
    assert header["tensors"]["float32"][CHECKSUM] == xxhash.xxh3_128(tensors["float32"].numpy().tobytes()).hexdigest()


@pytest.mark.parametrize("config,tensors,error", [({"f": object()}, {}, "JSON-serialisable"), ({}, {"a": [1]}, "a")])
def test_unwritable_configs_and_tensors_write_nothing(tmp_path, config, tensors, error):
    with pytest.raises(TypeError, match=error):
        write_artifact(tmp_path / "a.safetensors", "tokenizers_q.test", 1, config, tensors)
    assert list(tmp_path.iterdir()) == []


def test_every_kind_loads_back_what_it_wrote(kind, tmp_path):
    a, b = (kind.load(written(kind, tmp_path, v, f"{v}.safetensors")) for v in (0, 1))
    assert same(a, reference(kind.name, 0)) and same(b, reference(kind.name, 1)) and not same(a, b)
    assert temporaries(tmp_path / "0.safetensors") == [] and temporaries(tmp_path / "1.safetensors") == []
    assert our_header((tmp_path / "0.safetensors").read_bytes())["format"] == kind.format


def test_checksums_and_fingerprints():
    t = torch.arange(12, dtype=torch.float32).reshape(3, 4)
    assert tensor_checksum(t) == xxhash.xxh3_128(t.numpy().tobytes()).hexdigest()
    assert tensor_checksum(t.T) == tensor_checksum(t.T.contiguous()) != tensor_checksum(t)
    assert tensor_checksum(torch.zeros(0)) == xxhash.xxh3_128(b"").hexdigest()
    base = state_fingerprint({"a": t, "b": t[0]}, {"k": 1})
    assert len(base) == 32 and base == state_fingerprint({"b": t[0].clone(), "a": t.clone()}, {"k": 1})
    changed = [
        state_fingerprint({"a": t + 1, "b": t[0]}, {"k": 1}),
        state_fingerprint({"a": t.double(), "b": t[0]}, {"k": 1}),
        state_fingerprint({"a": t.reshape(4, 3), "b": t[0]}, {"k": 1}),
        state_fingerprint({"c": t, "b": t[0]}, {"k": 1}),
        state_fingerprint({"a": t, "b": t[0]}, {"k": 2}),
        state_fingerprint({"a": t, "b": t[0]}),
    ]
    assert len({base, *changed}) == len(changed) + 1


# -- 2. tied tensors --------------------------------------------------------------------------------------------------


def test_tensors_given_twice_are_stored_once(tmp_path):
    big = torch.randn(256, 256)  # 256 KiB
    path = write_artifact(tmp_path / "a.safetensors", "tokenizers_q.test", 1, {}, {"a": big, "b": big, "c": big[0]})
    copy = big.numel() * 4
    assert copy < path.stat().st_size < copy + 8192
    assert our_header(path.read_bytes())["tensors"]["b"] == {"alias": "a"}
    assert set(stored_tensors(path.read_bytes())) == {"a", "c"}
    art = read_artifact(path, "tokenizers_q.test", 1)
    assert art.tensors["a"] is art.tensors["b"] and torch.equal(art.tensors["a"], big)
    assert torch.equal(art.tensors["c"], big[0])


def test_a_module_with_a_tied_head_is_stored_once_and_stays_tied(tmp_path):
    model = TiedLM(vocab=1024, dim=64)
    path = write_artifact(tmp_path / "m.safetensors", "tokenizers_q.test", 1, {}, model.state_dict())
    copy = 1024 * 64 * 4
    assert copy < path.stat().st_size < copy + 64 * 65 * 4 + 8192  # + the body layer
    tensors = read_artifact(path, "tokenizers_q.test", 1).tensors
    assert tensors["head.weight"] is tensors["emb.weight"]
    fresh = TiedLM(vocab=1024, dim=64, seed=5)
    fresh.load_state_dict(tensors)
    assert fresh.head.weight is fresh.emb.weight and torch.equal(fresh(IDS), model(IDS))


def test_views_sharing_storage_are_written_and_read_back(tmp_path):
    t = torch.arange(40.0).reshape(10, 4)
    cases = [
        {"t": t, "tail": t[1:]},
        {"tail": t[1:], "t": t},
        {"t": t, "col": t[:, 1], "flat": t.view(-1), "T": t.T, "same": t, "row": t[3]},
        {"col": t[:, 1], "t": t},
        {"tail": t[2:]},
        {"t": t, "bytes": t.view(torch.uint8), "ints": t.view(torch.int32)},
        {"e1": t[:0], "e2": t[:0], "t": t},
    ]
    for i, tensors in enumerate(cases):
        path = write_artifact(tmp_path / f"{i}.safetensors", "tokenizers_q.test", 1, {}, tensors)
        got = read_artifact(path, "tokenizers_q.test", 1).tensors
        assert got.keys() == tensors.keys(), i
        for name, want in tensors.items():
            assert got[name].dtype == want.dtype and torch.equal(got[name], want), (i, name)
        assert torch.equal(t, torch.arange(40.0).reshape(10, 4))  # writing never changes the tensors given
    path = write_artifact(tmp_path / "s.safetensors", "tokenizers_q.test", 1, {}, cases[2])
    got = read_artifact(path, "tokenizers_q.test", 1).tensors
    assert got["same"] is got["t"] and got["flat"] is not got["t"]


def test_save_quantized_stores_a_tied_full_precision_matrix_once(tmp_path):
    model = quantized_tied_lm(vocab=4096, dim=32)
    ids = torch.randint(0, 4096, (3, 9), generator=torch.Generator().manual_seed(1))
    path = save_quantized(model, tmp_path / "q.safetensors")
    copy = 4096 * 32 * 4  # 512 KiB; the quantized body is 32 x 32 x 4 bits
    assert copy < path.stat().st_size < copy + 16384
    header = our_header(path.read_bytes())["tensors"]
    assert header["head.weight"] == {"alias": "emb.weight"} and "body.codes" in header
    loaded = load_quantized(TiedLM(vocab=4096, dim=32, seed=3), path)
    assert loaded.head.weight is loaded.emb.weight and type(loaded.body) is type(model.body)
    assert torch.equal(loaded(ids), model(ids))


# -- 3. a byte flipped in any stored tensor of any kind ---------------------------------------------------------------


def test_a_byte_flip_in_every_tensor_of_every_kind_is_detected(kind, tmp_path):
    original = written(kind, tmp_path).read_bytes()
    start, _ = layout(original)
    tensors = {n: i for n, i in stored_tensors(original).items() if i["data_offsets"][1] > i["data_offsets"][0]}
    assert len(tensors) >= 2
    corrupt = tmp_path / "corrupt.safetensors"
    for name, info in tensors.items():
        begin, end = info["data_offsets"]
        data = bytearray(original)
        data[start + (begin + end) // 2] ^= 0xFF
        corrupt.write_bytes(bytes(data))
        with pytest.raises(ValueError, match=re.escape(f"{corrupt}: tensor {name!r} does not match its checksum")):
            kind.load(corrupt)
    corrupt.write_bytes(original)
    assert same(kind.load(corrupt), reference(kind.name, 0))


# -- 4. edited headers, other formats and versions, truncated files ---------------------------------------------------


def test_an_edited_token_file_header_is_detected(tmp_path):
    path = written(kind_named("token_file"), tmp_path)
    data = replace_once(path.read_bytes(), b'\\"shape\\": [50, 4, 2]', b'\\"shape\\": [4, 50, 2]')
    path.write_bytes(data)
    assert our_header(data)["config"]["shape"] == [4, 50, 2]
    with pytest.raises(ValueError, match=re.escape(f"{path}: the header does not match its checksum")):
        load_tokens(path)


def test_a_tensor_edited_with_its_checksum_updated_is_detected_by_the_header_checksum(kind, tmp_path):
    path = written(kind, tmp_path)
    data = bytearray(path.read_bytes())
    start, _ = layout(bytes(data))
    header = our_header(bytes(data))["tensors"]
    checksums = [e[CHECKSUM] for e in header.values() if CHECKSUM in e]
    name, info = next(
        (n, i) for n, i in stored_tensors(bytes(data)).items() if checksums.count(header[n][CHECKSUM]) == 1
    )
    begin, end = info["data_offsets"]
    data[start + begin] ^= 0x01
    new_checksum = xxhash.xxh3_128(bytes(data[start + begin : start + end])).hexdigest()
    path.write_bytes(replace_once(bytes(data), header[name][CHECKSUM].encode(), new_checksum.encode()))
    with pytest.raises(ValueError, match="the header does not match its checksum"):
        kind.load(path)


def test_a_permuted_shape_or_another_dtype_in_the_safetensors_layout_is_detected(kind, tmp_path):
    path = written(kind, tmp_path)
    original = path.read_bytes()
    tensors = stored_tensors(original)
    name, info = next((n, i) for n, i in tensors.items() if len(set(i["shape"])) > 1)
    path.write_bytes(
        replace_once(original, layout_fragment(name, info), layout_fragment(name, info, info["shape"][::-1]))
    )
    with pytest.raises(ValueError, match=re.escape(f"{path}: tensor {name!r} is ") + r".*, the header says"):
        kind.load(path)
    swaps = {"F32": "I32", "I64": "F64", "U8": "I8", "F16": "I16"}
    name, info = next((n, i) for n, i in tensors.items() if i["dtype"] in swaps)
    path.write_bytes(
        replace_once(original, layout_fragment(name, info), layout_fragment(name, info, dtype=swaps[info["dtype"]]))
    )
    with pytest.raises(ValueError, match=re.escape(f"{path}: tensor {name!r} is ") + r".*, the header says"):
        kind.load(path)


def test_another_format_is_refused_naming_both(tmp_path):
    names = list(BUILDERS)
    for name, other in zip(names, names[1:] + names[:1]):
        path = written(kind_named(name), tmp_path, name=f"{name}.safetensors")
        fmt, other_fmt = kind_named(name).format, kind_named(other).format
        with pytest.raises(ValueError, match=re.escape(f"{path} holds a {fmt!r} artifact, not a ")) as err:
            kind_named(other).load(path)
        assert f"({other_fmt!r})" in str(err.value) and artifact_kind(other_fmt) in str(err.value)
    path = written(kind_named("token_file"), tmp_path, name="tokens.safetensors")
    with pytest.raises(ValueError, match="'tokenizers_q.token_file' artifact, not a embedding codec"):
        EmbeddingCodec.load(path)


def test_a_newer_version_is_refused(kind, tmp_path):
    path = written(kind, tmp_path)
    version, config, tensors = read_artifact(path, kind.format, kind.version)
    assert version == kind.version
    write_artifact(path, kind.format, kind.version + 1, config, tensors)
    with pytest.raises(ValueError, match=re.escape(f"{path} is {kind.format} version {kind.version + 1};")):
        kind.load(path)
    assert read_artifact(path, kind.format, kind.version + 1).version == kind.version + 1


def test_truncated_and_foreign_files_are_refused(kind, tmp_path):
    original = written(kind, tmp_path).read_bytes()
    start, _ = layout(original)
    path = tmp_path / "cut.safetensors"
    words = artifact_kind(kind.format)
    for cut in sorted({0, 4, 8, 9, start // 2, start, start + 1, (start + len(original)) // 2, len(original) - 1}):
        path.write_bytes(original[:cut])
        with pytest.raises(ValueError, match=re.escape(f"{path} is not a readable {words}")):
            kind.load(path)
    path.write_bytes(original + b"\0" * 7)  # bytes after the last tensor
    with pytest.raises(ValueError, match=re.escape(f"{path} is not a readable {words}")):
        kind.load(path)
    from safetensors.torch import save_file

    save_file({"w": torch.zeros(3)}, str(path))
    with pytest.raises(ValueError, match=re.escape(f"{path} is a safetensors file but not a tokenizers_q artifact")):
        kind.load(path)
    save_file({"w": torch.zeros(3)}, str(path), metadata={HEADER_KEY: "[1]", HEADER_CHECKSUM_KEY: "0" * 64})
    with pytest.raises(ValueError, match="the header does not match its checksum"):
        kind.load(path)
    with pytest.raises(FileNotFoundError, match=re.escape(f"{tmp_path / 'missing.safetensors'}")):
        kind.load(tmp_path / "missing.safetensors")


# -- 5. failed writes leave the old file and no temporary -------------------------------------------------------------


def _umask() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return umask


@pytest.mark.parametrize("error", [RuntimeError, KeyboardInterrupt])
def test_a_failing_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path, error):
    path = tmp_path / "data.bin"
    path.write_bytes(b"old")
    seen = []

    def write(tmp):
        seen.append(Path(tmp))
        folder = Path(tmp).parent  # a private hidden folder beside the target, holding a file of the same name
        assert folder.parent == tmp_path and folder.name.startswith(".data.") and Path(tmp).name == "data.bin"
        Path(tmp).write_bytes(b"half-writ")
        raise error("stop")

    with pytest.raises(error, match="stop"):
        atomic_write(path, write)
    assert path.read_bytes() == b"old" and os.listdir(tmp_path) == ["data.bin"] and not seen[0].exists()
    assert atomic_write(path, lambda tmp: Path(tmp).write_bytes(b"new")) == path
    assert path.read_bytes() == b"new" and os.listdir(tmp_path) == ["data.bin"]
    assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~_umask()
    atomic_write(tmp_path / "sub" / "deeper" / "x.bin", lambda tmp: Path(tmp).write_bytes(b"x"))
    assert (tmp_path / "sub" / "deeper" / "x.bin").read_bytes() == b"x"


@pytest.mark.parametrize("error", [OSError, KeyboardInterrupt])
def test_a_failing_save_of_every_kind_keeps_the_old_file(kind, tmp_path, monkeypatch, error):
    import safetensors.torch

    path = written(kind, tmp_path)
    before = path.read_bytes()

    def broken(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"partial")
        raise error("disk full")

    monkeypatch.setattr(safetensors.torch, "save_file", broken)
    with pytest.raises(error, match="disk full"):
        kind.write(path, 1)
    assert path.read_bytes() == before and os.listdir(tmp_path) == [path.name]


# -- 6. SIGKILL at any moment of a write ------------------------------------------------------------------------------

KILLS = 20
KILL_WINDOW_S = 0.3
FORK = pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")


def _writer(write: Callable[[Path, int], object], path: Path, ready: int) -> None:
    """In the forked child: write B, A, B, ... to ``path`` until killed; never returns."""
    try:
        torch.set_num_threads(1)  # an OpenMP pool does not survive fork(); only this process is changed
        os.write(ready, b"1")
        for i in itertools.count():
            write(path, 1 - i % 2)
    except BaseException:
        traceback.print_exc(file=sys.stderr)
    finally:
        os._exit(3)


def kill_rounds(kind: Kind, path: Path, rounds: int, seed: int, write=None) -> dict[str, int]:
    """``rounds`` times: A at ``path``; a forked child writing B, A, B... there, SIGKILLed at a random moment;
    then what the kind's loader makes of ``path``: A, B or broken (neither, or refused). Temporaries are removed."""
    write = write or kind.write
    a, b = reference(kind.name, 0), reference(kind.name, 1)
    assert not same(a, b)
    rng = random.Random(seed)
    outcomes = {"A": 0, "B": 0, "broken": 0, "mid-write": 0}
    for _ in range(rounds):
        kind.write(path, 0)
        read, ready = os.pipe()
        pid = os.fork()
        if pid == 0:
            os.close(read)
            _writer(write, path, ready)
        os.close(ready)
        try:
            assert select.select([read], [], [], 30)[0], "the writer never started"
            assert os.read(read, 1) == b"1"
            time.sleep(rng.uniform(0, KILL_WINDOW_S))
            os.kill(pid, signal.SIGKILL)
        finally:
            os.close(read)
            _, status = os.waitpid(pid, 0)
        assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL, f"the writer exited: {status}"
        try:
            got = kind.load(path)
        except ValueError:
            got = None
        outcomes["A" if same(got, a) else "B" if same(got, b) else "broken"] += 1
        # a kill mid-write leaves the private ".name.*" folder (with whatever safetensors wrote inside), no other file
        ours = temporaries(path)
        assert sorted(os.listdir(path.parent)) == sorted([path.name, *(p.name for p in ours)])
        outcomes["mid-write"] += bool(ours)
        for tmp in ours:
            shutil.rmtree(tmp) if tmp.is_dir() else tmp.unlink()
    return outcomes


@FORK
def test_a_write_killed_at_any_moment_leaves_a_or_b(kind, tmp_path):
    started, threads = time.perf_counter(), torch.get_num_threads()
    outcomes = kill_rounds(kind, tmp_path / "artifact.safetensors", KILLS, seed=sum(map(ord, kind.name)))
    assert torch.get_num_threads() == threads  # the writers' set_num_threads(1) stayed in the children
    print(f"{kind.name}: {KILLS} kills in {time.perf_counter() - started:.1f} s: {outcomes}")
    assert outcomes["broken"] == 0, f"a killed write left a file that is neither A nor B: {outcomes}"
    assert outcomes["A"] + outcomes["B"] == KILLS and outcomes["B"] > 0  # the writer did write
    # (kills land mid-write, a temporary left behind, in about 25-60% of the rounds)


@FORK
def test_the_kill_test_catches_a_write_that_is_not_atomic(tmp_path):
    """The control: the same harness with a writer that writes the file in place, in two halves."""
    kind = kind_named("token_file")
    data = [written(kind, tmp_path, v, f"{v}.safetensors").read_bytes() for v in (0, 1)]
    for v in (0, 1):
        (tmp_path / f"{v}.safetensors").unlink()

    def in_place(path, v):
        with open(path, "wb") as f:
            f.write(data[v][: len(data[v]) // 2])
            f.flush()
            time.sleep(0.005)
            f.write(data[v][len(data[v]) // 2 :])

    outcomes = kill_rounds(kind, tmp_path / "artifact.safetensors", 10, seed=0, write=in_place)
    print(f"not atomic: {outcomes}")
    assert outcomes["broken"] > 0, outcomes
