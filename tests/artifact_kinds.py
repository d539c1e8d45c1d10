"""The artifact kinds the file tests run over (token files, quantized models, embedding codecs, exported
modules: each written in two versions and loaded by its own loader), and readers of the safetensors layout."""

from __future__ import annotations

import functools
import json
import os
import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from tokenizers_q import TokenSpec, load_tokens, save_tokens
from tokenizers_q import packing as packing_module
from tokenizers_q.embeddings import EmbeddingCodec
from tokenizers_q.embeddings import codec as codec_module
from tokenizers_q.files import (
    HEADER_KEY,
    tensor_checksum,
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
        codec = EmbeddingCodec(16, "pq", 4, codebook_size=16, num_lists=4, kmeans_iters=4, seed=v).fit(x)
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


def _calibration_kind() -> Kind:
    from tokenizers_q.kv import CoupledCodebooks, CQConfig, calibrate_quantizer, outlier_bounds
    from tokenizers_q.kv import calibration as calibration_module

    variants = []
    for v in (0, 1):
        g = torch.Generator().manual_seed(v)
        keys, values = torch.randn(1, 2, 200, 16, generator=g), torch.randn(1, 2, 200, 16, generator=g)
        codebooks = CoupledCodebooks.fit(keys, values, CQConfig(group_size=4, codebook_size=16, kmeans_iters=3))
        quantizers = tuple(calibrate_quantizer("vq", x.reshape(-1, 16), 1, codebook_size=16) for x in (keys, values))
        bounds = outlier_bounds(keys, 0.02), outlier_bounds(values, 0.02)
        variants.append([calibration_module.LayerCalibration(codebooks, quantizers, *bounds)] * 2)

    def load(path):
        layers = calibration_module.load_calibration(path, num_layers=2, heads=2, head_dim=16)
        return [
            {
                "codebooks": (layer.codebooks.keys, layer.codebooks.values, layer.codebooks.config),
                "quantizers": [q.state_dict() for q in layer.quantizers],
                "bounds": (layer.key_bounds, layer.value_bounds),
            }
            for layer in layers
        ]

    write = lambda p, v: calibration_module.save_calibration(p, variants[v])  # noqa: E731
    return Kind("kv_calibration", calibration_module.FORMAT, calibration_module.VERSION, write, load)


BUILDERS = {"token_file": _token_kind, "quantized_model": _quantized_kind, "embedding_codec": _codec_kind}
BUILDERS["exported_module"] = _module_kind
BUILDERS["kv_calibration"] = _calibration_kind


@functools.cache
def kind_named(name: str) -> Kind:
    return BUILDERS[name]()


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


def process_umask() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return umask
