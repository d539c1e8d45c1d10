"""Artifacts (tokenizers_q.files): round trips, tied tensors stored once, every corruption detected by every
loader."""

from __future__ import annotations

import re
import stat

import pytest
import torch
import xxhash
from artifact_kinds import (
    BUILDERS,
    IDS,
    TiedLM,
    kind_named,
    layout,
    layout_fragment,
    our_header,
    process_umask,
    quantized_tied_lm,
    reference,
    replace_once,
    same,
    stored_tensors,
    temporaries,
    written,
)

from tokenizers_q import load_tokens
from tokenizers_q.embeddings import EmbeddingCodec
from tokenizers_q.files import (
    CHECKSUM,
    HEADER_CHECKSUM_KEY,
    HEADER_KEY,
    artifact_kind,
    read_artifact,
    state_fingerprint,
    tensor_checksum,
    write_artifact,
)
from tokenizers_q.weights import load_quantized, save_quantized


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
    assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~process_umask()
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


def test_every_tensor_read_from_a_file_is_aligned_for_the_packed_kernels(tmp_path):
    """safetensors may hand back storage at any address; the int8 kernel crashed on such a weight (torch 2.14)."""
    from tokenizers_q.files import TENSOR_ALIGNMENT, read_artifact, write_artifact

    tensors = {"a": torch.arange(10, dtype=torch.uint8), "b": torch.arange(7, dtype=torch.int8), "c": torch.ones(3)}
    path = write_artifact(tmp_path / "aligned.safetensors", "tokenizers_q.test", 1, {}, tensors)
    loaded = read_artifact(path, "tokenizers_q.test", 1).tensors
    assert all(t.data_ptr() % TENSOR_ALIGNMENT == 0 for t in loaded.values())
    assert all(torch.equal(loaded[n], tensors[n]) for n in tensors)
