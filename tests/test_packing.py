import os

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from tokenizers_q import TokenSpec, load_tokens, pack_codes, save_tokens, unpack_codes
from tokenizers_q.files import write_artifact
from tokenizers_q.packing import code_dtype, code_planes


def reference_pack(codes: torch.Tensor, spec: TokenSpec) -> torch.Tensor:
    """The layout by definition: every code's bits, least significant first, token after token."""
    stream = [(int(code) >> i) & 1 for row in codes.tolist() for code, b in zip(row, spec.bits) for i in range(b)]
    stream += [0] * (-len(stream) % 8)
    return torch.tensor([sum(bit << i for i, bit in enumerate(stream[j : j + 8])) for j in range(0, len(stream), 8)])


@settings(max_examples=60, deadline=None)
@given(
    sizes=st.lists(st.integers(2, 2**20), min_size=1, max_size=4),
    rows=st.integers(0, 300),
    seed=st.integers(0, 2**16),
)
def test_pack_round_trip_at_exact_width(sizes, rows, seed):
    spec = TokenSpec(tuple(sizes))
    g = torch.Generator().manual_seed(seed)
    codes = torch.stack([torch.randint(0, s, (rows,), generator=g) for s in sizes], dim=-1)
    packed = pack_codes(codes, spec)
    assert packed.dtype == torch.uint8 and packed.numel() == -(-rows * spec.bits_per_token // 8)
    assert torch.equal(packed, reference_pack(codes, spec).to(torch.uint8))  # the bit stream, by definition
    unpacked = unpack_codes(packed, spec, tuple(codes.shape))
    assert unpacked.dtype == code_dtype(max(spec.bits)) and torch.equal(unpacked.long(), codes)
    assert unpack_codes(packed, spec, tuple(codes.shape), torch.long).dtype == torch.long


def test_code_dtypes_are_the_narrowest():
    assert [code_dtype(b) for b in (1, 8, 9, 15, 16, 31, 32)] == [torch.uint8] * 2 + [torch.int16] * 2 + [
        torch.int32
    ] * 2 + [torch.int64]


@pytest.mark.parametrize("bits", range(1, 17))
def test_every_width_packs_extreme_values(bits):
    spec = TokenSpec((2**bits,))
    codes = torch.tensor([[0], [2**bits - 1], [2 ** (bits - 1)], [1 % 2**bits]])
    packed = pack_codes(codes, spec)
    assert packed.numel() == -(-4 * bits // 8)
    assert torch.equal(unpack_codes(packed, spec, (4, 1)), codes)


@pytest.mark.parametrize("bits", range(1, 17))
def test_code_planes_interleave_into_the_codes(bits):
    per_group = 8 // bits if bits in (1, 2, 4, 8) else 8
    codes = torch.randint(0, 2**bits, (per_group * 29, 1), generator=torch.Generator().manual_seed(bits))
    codes[:2, 0] = torch.tensor([2**bits - 1, 0])  # the extreme values too
    planes = code_planes(pack_codes(codes, TokenSpec((2**bits,))), bits, codes.shape[0])
    assert len(planes) == per_group and all(p.shape == (29,) for p in planes)
    assert torch.equal(torch.stack([p.long() for p in planes], -1).reshape(-1), codes[:, 0])


def test_code_planes_reject_what_they_cannot_cut():
    packed = pack_codes(torch.zeros(12, 1, dtype=torch.long), TokenSpec((8,)))
    with pytest.raises(ValueError, match="need a multiple of 8 codes of 3 bits .* got 12 codes"):
        code_planes(packed, 3, 12)
    with pytest.raises(ValueError, match="1 to 16 bits per code, got 17"):
        code_planes(packed, 17, 8)


def test_large_arrays_pack_across_chunks():
    spec = TokenSpec((1000, 7))
    codes = torch.stack([torch.randint(0, 1000, (600_001,)), torch.randint(0, 7, (600_001,))], -1)
    assert torch.equal(unpack_codes(pack_codes(codes, spec), spec, codes.shape), codes)


def test_spec_properties_and_dict_round_trip():
    spec = TokenSpec((1000, 1024, 1), ((8, 5, 5, 5), (1024,), (1,)))
    assert spec.bits == (10, 10, 1) and spec.bits_per_token == 21 and spec.num_codebooks == 3
    assert TokenSpec.from_dict(spec.to_dict()) == spec
    assert TokenSpec((16, 16), ((16,), (16,))) == TokenSpec((16, 16))  # whole-code factors carry no information
    with pytest.raises(ValueError, match="must multiply to the codebook sizes"):
        TokenSpec((10,), ((3, 3),))
    with pytest.raises(ValueError, match="positive ints, got \\(0,\\)"):
        TokenSpec((0,))


def test_pack_rejects_bad_codes():
    spec = TokenSpec((10,))
    with pytest.raises(ValueError, match="value 10 at index \\(1, 0\\) is outside \\[0, 10\\)"):
        pack_codes(torch.tensor([[3], [10]]), spec)
    with pytest.raises(TypeError, match="integer tensor"):
        pack_codes(torch.tensor([[3.0]]), spec)
    with pytest.raises(ValueError, match="needs 1"):
        unpack_codes(torch.zeros(3, dtype=torch.uint8), spec, (1, 1))
    # 4-bit slots can hold 10..15: decoding such bytes reports corruption
    with pytest.raises(ValueError, match="corrupt"):
        unpack_codes(torch.tensor([0xFF], dtype=torch.uint8), spec, (2, 1))


def test_token_file_round_trip(tmp_path):
    spec = TokenSpec((1000, 16))
    codes = torch.stack([torch.randint(0, 1000, (5, 8, 8)), torch.randint(0, 16, (5, 8, 8))], -1)
    labels = torch.arange(5)
    path = save_tokens(tmp_path / "sub" / "toks.safetensors", codes, spec, {"source": "test"}, {"labels": labels})
    f = load_tokens(path, expected_spec=spec)
    assert torch.equal(f.codes, codes) and f.spec == spec
    assert f.metadata == {"source": "test"} and torch.equal(f.extras["labels"], labels)
    # 14 bits per token instead of 2 x 64: the file is small
    assert os.path.getsize(path) < 5 * 64 * 14 / 8 + 1024


def test_token_file_errors(tmp_path):
    spec = TokenSpec((256,))
    good = save_tokens(tmp_path / "good.safetensors", torch.randint(0, 256, (10, 1)), spec)
    with pytest.raises(ValueError, match="was expected"):
        load_tokens(good, expected_spec=TokenSpec((512,)))
    with pytest.raises(FileNotFoundError, match="no token file"):
        load_tokens(tmp_path / "missing.safetensors")
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(good.read_bytes()[:-5])
    with pytest.raises(ValueError, match="truncated.safetensors is not a readable token file"):
        load_tokens(truncated)
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"not a safetensors file at all")
    with pytest.raises(ValueError, match="not a readable token file"):
        load_tokens(garbage)
    from safetensors.torch import save_file

    foreign = tmp_path / "foreign.safetensors"
    save_file({"x": torch.zeros(2)}, str(foreign))
    with pytest.raises(ValueError, match="foreign.safetensors is a safetensors file but not a tokenizers_q artifact"):
        load_tokens(foreign)
    # a well-formed artifact whose header promises more codes than its data holds
    lying = tmp_path / "lying.safetensors"
    config = {"spec": {"codebook_sizes": [256]}, "shape": [10, 1], "metadata": {}}
    write_artifact(lying, "tokenizers_q.token_file", 2, config, {"codes": torch.zeros(3, dtype=torch.uint8)})
    with pytest.raises(ValueError, match="lying.safetensors is a corrupt token file: packed codes hold 3 bytes"):
        load_tokens(lying)


def test_save_tokens_needs_a_token_spec(tmp_path):
    with pytest.raises(TypeError, match=r"spec must be a TokenSpec, got tuple \(256,\)"):
        save_tokens(tmp_path / "t.safetensors", torch.zeros(2, 1, dtype=torch.long), (256,))
    assert not (tmp_path / "t.safetensors").exists()


def test_failed_save_leaves_the_previous_file_intact(tmp_path):
    spec = TokenSpec((16,))
    codes = torch.randint(0, 16, (4, 1))
    path = save_tokens(tmp_path / "t.safetensors", codes, spec)
    before = path.read_bytes()
    with pytest.raises(TypeError, match="JSON-serialisable"):
        save_tokens(path, codes, spec, metadata={"bad": object()})
    with pytest.raises(ValueError, match="out of range"):
        save_tokens(path, codes + 100, spec)
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["t.safetensors"]  # no temporary left behind
