"""The C++ loops of attention from KV codes against the same sums in torch ops."""

import pytest
import torch

from tokenizers_q.kv import KIVIConfig, KIVILayerCache, loops
from tokenizers_q.kv.buffer import PackedTokens
from tokenizers_q.kv.kivi import _coded_mix, _coded_scores
from tokenizers_q.packing import TokenSpec


@pytest.fixture(autouse=True)
def built(monkeypatch):
    """The loops, and buffers with spare room (their rows are strided views, as in long runs)."""
    from tokenizers_q.kv import buffer

    monkeypatch.setattr(buffer, "GROWTH", 1 / 2)
    if loops.cpu_loops(torch.zeros(1)) is None:
        pytest.fail("the C++ loops did not build on this machine (see the warning)")


@pytest.mark.parametrize("bits", list(range(1, 17)))
def test_code_loops_sum_the_entries_their_codes_pick(bits):
    """Scores and masses read every code width from the packed rows of a growing buffer (2 sequences x 3 heads,
    so the rows are strided views), equal to gathers and scatters on the unpacked codes."""
    g = torch.Generator().manual_seed(bits)
    books, entries, count = 3, 2**bits if bits < 12 else 300, 4
    stored = PackedTokens(TokenSpec((2**bits,)), books)
    for tokens in (40, 24, 5):  # two appends of whole octets, then a tail that stays unpacked
        stored.append(torch.randint(0, min(entries, 2**bits), (2, 3, tokens, books), generator=g))
    rows, width = stored.packed_rows()
    assert width == bits and rows.shape[:2] == (2, 3) and not rows.is_contiguous()
    codes = stored.codes()[:, :, :64]  # the whole octets
    lookup = torch.randn(2, 3, count, books, entries, generator=g)
    flat = (codes + torch.arange(books) * entries).reshape(2, 3, 1, -1).expand(-1, -1, count, -1)
    expected = lookup.reshape(2, 3, count, -1).gather(-1, flat).reshape(2, 3, count, 64, books).sum(-1)
    torch.testing.assert_close(loops.code_scores(lookup, rows, bits, 64), expected)
    probs = torch.rand(2, 3, count, 64, generator=g)
    mass = torch.zeros(2, 3, count, books * entries).scatter_add_(
        -1, flat, probs[..., None].expand(-1, -1, -1, -1, books).reshape(2, 3, count, -1)
    )
    torch.testing.assert_close(loops.code_mass(probs, rows, bits, books, entries), mass.reshape(lookup.shape))


@pytest.mark.parametrize("dim", [64, 128, 48])  # 48: head_dim not unrolled
@pytest.mark.parametrize("bits", [1, 2, 4, 8])
def test_kivi_loops_equal_the_products_of_the_levels(bits, dim):
    """Two sequences, 2 key/value heads with 3 queries each, levels, scales and offsets read from the cache's
    own growing buffers."""
    group = 16
    cache = KIVILayerCache(KIVIConfig(bits, bits, group_size=group, window=0))
    g = torch.Generator().manual_seed(dim + bits)
    for tokens in (64, 32):
        cache.append(torch.randn(2, 2, tokens, dim, generator=g), torch.randn(2, 2, tokens, dim, generator=g))
    assert cache.quantized_tokens == 96 and cache._whole_bytes()
    key_bytes, value_bytes = (cache._token_bytes(stored["levels"]) for stored in (cache.keys, cache.values))
    assert not key_bytes.is_contiguous()  # the buffer's spare room: strided rows
    keys = cache.keys["scale"].tensor(), cache.keys["offset"].tensor()
    values = cache.values["scale"].tensor(), cache.values["offset"].tensor()
    queries = torch.randn(2, 2, 3, dim, generator=g)
    torch.testing.assert_close(
        loops.kivi_scores(queries, key_bytes, *keys, bits),
        _coded_scores(queries, key_bytes, *keys, bits),
        rtol=1e-5,
        atol=1e-4,
    )
    probs = torch.softmax(torch.randn(2, 2, 3, 96, generator=g), -1)
    torch.testing.assert_close(
        loops.kivi_mix(probs, value_bytes, *values, bits), _coded_mix(probs, value_bytes, *values, bits)
    )


def test_loops_are_not_asked_off_the_cpu_and_refuse_a_mismatched_layout():
    meta = torch.empty(1, 1, 8, 16, device="meta")
    assert loops.kivi_scores(meta, meta, meta, meta, 2) is None
    codes = torch.zeros(1, 1, 10, dtype=torch.uint8)
    with pytest.raises(RuntimeError, match="codes hold 10 bytes, too few for 64 tokens of 3 codes of 4 bits"):
        loops.code_scores(torch.zeros(1, 1, 1, 3, 16), codes, 4, 64)
    with pytest.raises(RuntimeError, match="KIVI loops take 1, 2, 4 or 8 bits, got 3"):
        loops.kivi_scores(
            torch.zeros(1, 1, 1, 16),
            torch.zeros(1, 1, 32, 6, dtype=torch.uint8),
            *[torch.zeros(1, 1, 2, 16, dtype=torch.float16)] * 2,
            3,
        )
