"""Embedding codecs: round trips, ADC search equal to brute force on decoded vectors, files, errors."""

import pytest
import torch

from tokenizers_q.embeddings import EmbeddingCodec


def mixture(n=3000, dim=32, seed=0):
    """Clustered vectors with correlated channels, like real embeddings."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(20, dim, generator=g) * 3
    mixing = torch.randn(dim, dim, generator=g) / dim**0.5
    return (centres[torch.randint(0, 20, (n,), generator=g)] + torch.randn(n, dim, generator=g)) @ mixing


def relative_error(codec, x):
    return ((codec.decode(codec.encode(x)) - x).pow(2).sum() / x.pow(2).sum()).item()


@pytest.mark.parametrize("method", ["pq", "opq", "rvq"])
def test_round_trip_error_falls_with_more_codebooks(method):
    x = mixture()
    coarse = EmbeddingCodec(32, method, num_codebooks=4, bits=6, opq_iters=3).fit(x)
    fine = EmbeddingCodec(32, method, num_codebooks=8, bits=6, opq_iters=3).fit(x)
    packed = fine.encode(x)
    assert packed.dtype == torch.uint8 and packed.shape == (3000, 6)  # 8 codes x 6 bits, exactly packed
    assert relative_error(fine, x) < 0.9 * relative_error(coarse, x) < 0.2


def test_opq_and_beam_search_beat_their_plain_versions():
    x = mixture()
    assert relative_error(EmbeddingCodec(32, "opq", 4, 6, opq_iters=3).fit(x), x) < relative_error(
        EmbeddingCodec(32, "pq", 4, 6).fit(x), x
    )
    greedy = EmbeddingCodec(32, "rvq", 4, 6).fit(x)
    beam = EmbeddingCodec(32, "rvq", 4, 6, beam=8).fit(x)
    assert relative_error(beam, x) < relative_error(greedy, x)


@pytest.mark.parametrize("method", ["pq", "opq", "rvq"])
@pytest.mark.parametrize("metric", ["l2", "ip"])
def test_adc_search_equals_brute_force_on_decoded_vectors(method, metric):
    x, queries = mixture(), mixture(50, seed=1)
    codec = EmbeddingCodec(32, method, num_codebooks=4, bits=8, metric=metric, opq_iters=3).fit(x)
    codec.add(x, batch_size=700)
    scores, ids = codec.search(queries, k=10, chunk=1000)
    decoded = codec.decode(codec.database)
    brute = torch.cdist(queries, decoded).pow(2) if metric == "l2" else queries @ decoded.T
    want = brute.topk(10, dim=1, largest=metric == "ip")
    torch.testing.assert_close(scores, want.values, rtol=1e-4, atol=1e-3)
    torch.testing.assert_close(brute.gather(1, ids), want.values, rtol=1e-4, atol=1e-3)  # same neighbours up to ties
    assert codec.bytes_per_vector == 4 + (4 if method == "rvq" and metric == "l2" else 0)


def test_save_and_load_give_the_same_codes_and_search(tmp_path):
    x = mixture()
    codec = EmbeddingCodec(32, "opq", 8, 4, opq_iters=3).fit(x)
    codec.add(x[:500])
    loaded = EmbeddingCodec.load(codec.save(tmp_path / "codec.safetensors"))
    assert torch.equal(loaded.encode(x[500:600]), codec.encode(x[500:600]))
    assert all(torch.equal(a, b) for a, b in zip(loaded.search(x[:5], 3), codec.search(x[:5], 3)))


def test_fitting_is_deterministic_with_a_seed():
    x = mixture()
    assert torch.equal(
        EmbeddingCodec(32, "pq", 4, 6, seed=3).fit(x).codebooks, EmbeddingCodec(32, "pq", 4, 6, seed=3).fit(x).codebooks
    )


def test_bad_input_is_reported(tmp_path):
    x = mixture()
    codec = EmbeddingCodec(32, "pq", 4, 8)
    with pytest.raises(ValueError, match="not fitted yet"):
        codec.encode(x)
    codec.fit(x)
    with pytest.raises(ValueError, match="have dim 16, this codec codes dim 32"):
        codec.encode(torch.randn(3, 16))
    with pytest.raises(ValueError, match=r"expected packed codes \(N, 4\) uint8 from this codec"):
        codec.decode(EmbeddingCodec(32, "pq", 8, 8).fit(x).encode(x[:3]))
    codec.add(x[:20])
    with pytest.raises(ValueError, match=r"k must be an int in \[1, 20\]"):
        codec.search(x[:2], k=21)
    with pytest.raises(ValueError, match="num_codebooks 5 must divide dim 32"):
        EmbeddingCodec(32, "pq", 5, 8)
    with pytest.raises(ValueError, match="multiple of 8"):
        EmbeddingCodec(32, "pq", 4, 3)
    with pytest.raises(ValueError, match="method must be one of"):
        EmbeddingCodec(32, "lsq")
    with pytest.raises(ValueError, match="need at least 256 training vectors"):
        EmbeddingCodec(32, "pq", 4, 8).fit(x[:100])
    (tmp_path / "bad.safetensors").write_bytes(b"garbage")
    with pytest.raises(ValueError, match="not a readable safetensors file"):
        EmbeddingCodec.load(tmp_path / "bad.safetensors")


@pytest.mark.parametrize("method, bits", [("pq", 8), ("opq", 8), ("pq", 4)])
def test_faiss_export_returns_our_neighbours(method, bits):
    faiss = pytest.importorskip("faiss")
    x, queries = mixture(), mixture(40, seed=2)
    codec = EmbeddingCodec(32, method, num_codebooks=8, bits=bits, opq_iters=3).fit(x)
    codec.add(x)
    index = codec.to_faiss()
    assert index.ntotal == 3000
    distances, ids = index.search(queries.numpy(), 10)
    ours, our_ids = codec.search(queries, 10)
    torch.testing.assert_close(torch.from_numpy(distances), ours, rtol=1e-4, atol=1e-3)
    brute = torch.cdist(queries, codec.decode(codec.database)).pow(2)
    torch.testing.assert_close(brute.gather(1, torch.from_numpy(ids)), ours, rtol=1e-4, atol=1e-3)  # up to ties
    del faiss
