"""Embedding codecs: round trips, ADC search equal to brute force on decoded vectors, files, errors."""

import pytest
import torch
import torch.nn.functional as F

from tokenizers_q.embeddings import EmbeddingCodec
from tokenizers_q.embeddings import adc as adc_module
from tokenizers_q.embeddings.codec import FORMAT, VERSION
from tokenizers_q.files import write_artifact
from tokenizers_q.memory import held_bytes


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
    coarse = EmbeddingCodec(32, method, num_codebooks=4, codebook_size=64, opq_iters=3).fit(x)
    fine = EmbeddingCodec(32, method, num_codebooks=8, codebook_size=64, opq_iters=3).fit(x)
    packed = fine.encode(x)
    assert packed.dtype == torch.uint8 and packed.shape == (3000, 6)  # 8 codes x 6 bits, exactly packed
    assert relative_error(fine, x) < 0.9 * relative_error(coarse, x) < 0.2


def test_rvq_refinement_lowers_the_error():
    x = mixture()
    plain = EmbeddingCodec(32, "rvq", 4, codebook_size=64, beam=4, refine_iters=0).fit(x)
    refined = EmbeddingCodec(32, "rvq", 4, codebook_size=64, beam=4, refine_iters=2).fit(x)
    assert relative_error(refined, x) < 0.97 * relative_error(plain, x)
    with pytest.raises(ValueError, match=r"refine_iters needs num_codebooks \* codebook_size <= 8192.*got 48 x 256"):
        EmbeddingCodec(32, "rvq", 48, codebook_size=256)


def test_opq_and_beam_search_beat_their_plain_versions():
    x = mixture()
    assert relative_error(EmbeddingCodec(32, "opq", 4, codebook_size=64, opq_iters=3).fit(x), x) < relative_error(
        EmbeddingCodec(32, "pq", 4, codebook_size=64).fit(x), x
    )
    greedy = EmbeddingCodec(32, "rvq", 4, codebook_size=64, refine_iters=0).fit(x)
    beam = EmbeddingCodec(32, "rvq", 4, codebook_size=64, beam=8, refine_iters=0).fit(x)
    assert relative_error(beam, x) < relative_error(greedy, x)


@pytest.mark.parametrize("method", ["pq", "opq", "rvq"])
@pytest.mark.parametrize("metric", ["l2", "ip"])
@pytest.mark.parametrize("num_lists", [1, 8, 64])  # 64 lists of ~47 < 64 codes: gathered per candidate
def test_adc_search_equals_brute_force_on_decoded_vectors(method, metric, num_lists, monkeypatch):
    monkeypatch.setattr(adc_module, "SCORE_BUDGET", 2000)  # many database chunks per list, merged
    x, queries = mixture(), mixture(50, seed=1)
    codec = EmbeddingCodec(
        32, method, 4, codebook_size=64, metric=metric, num_lists=num_lists, kmeans_iters=8, opq_iters=3
    ).fit(x)
    codec.add(x, batch_size=700)
    scores, ids = codec.search(queries, k=10, nprobe=num_lists)
    decoded = codec.decode(codec.database)
    brute = torch.cdist(queries, decoded).pow(2) if metric == "l2" else queries @ decoded.T
    want = brute.topk(10, dim=1, largest=metric == "ip")
    torch.testing.assert_close(scores, want.values, rtol=1e-4, atol=1e-3)
    torch.testing.assert_close(brute.gather(1, ids), want.values, rtol=1e-4, atol=1e-3)  # same neighbours up to ties
    code_bytes = 3 if num_lists == 1 else 4  # 24 code bits, plus the list id padded to whole bytes
    assert codec.bits_per_vector() == 8 * code_bytes + (32 if method == "rvq" and metric == "l2" else 0)


@pytest.mark.parametrize("metric", ["l2", "ip"])
def test_partitioned_search_scans_only_the_probed_lists(metric):
    x, queries = mixture(), mixture(30, seed=1)
    codec = EmbeddingCodec(32, "pq", 8, codebook_size=256, metric=metric, num_lists=16).fit(x)
    codec.add(x)
    scores, ids = codec.search(queries, k=5, nprobe=3)
    dots = queries @ codec.centroids.T
    coarse = dots if metric == "ip" else codec.centroids.pow(2).sum(-1) - 2 * dots
    probed = coarse.topk(3, dim=1, largest=metric == "ip").indices
    lists = codec.unpack(codec.database)[0]
    decoded = codec.decode(codec.database)
    brute = torch.cdist(queries, decoded).pow(2) if metric == "l2" else queries @ decoded.T
    outside = ~(lists[None, :, None] == probed[:, None, :]).any(-1)  # (Q, N): vectors of lists not probed
    brute = brute.masked_fill(outside, -torch.inf if metric == "ip" else torch.inf)
    torch.testing.assert_close(scores, brute.topk(5, dim=1, largest=metric == "ip").values, rtol=1e-4, atol=1e-3)
    assert not outside.gather(1, ids).any()


def test_probed_lists_with_fewer_than_k_vectors_fill_with_missing_ids():
    x = mixture()
    codec = EmbeddingCodec(32, "pq", 4, codebook_size=64, num_lists=16).fit(x)
    codec.add(x)
    sizes = torch.bincount(codec.unpack(codec.database)[0], minlength=16)
    scores, ids = codec.search(x[:40], k=400, nprobe=1)
    found = (ids >= 0).sum(1)
    probed = codec.unpack(codec.encode(x[:40]))[0]  # a database vector's own list is its nearest
    assert torch.equal(found, sizes[probed].clamp(max=400)) and (found < 400).any()
    assert torch.isinf(scores[ids < 0]).all() and torch.isfinite(scores[ids >= 0]).all()


def test_partition_lowers_the_error_of_the_same_codes():
    x = mixture()
    flat = EmbeddingCodec(32, "pq", 4, codebook_size=64).fit(x)
    partitioned = EmbeddingCodec(32, "pq", 4, codebook_size=64, num_lists=16).fit(x)
    assert partitioned.code_bytes == 4  # 4 list-id bits + 24 code bits, padded to whole bytes
    assert relative_error(partitioned, x) < 0.8 * relative_error(flat, x)


def test_exact_reranking_finds_the_true_neighbours():
    x, queries = mixture(), mixture(40, seed=3)
    codec = EmbeddingCodec(32, "pq", 4, codebook_size=16).fit(x)
    codec.add(x)
    exact = torch.cdist(queries, x).pow(2).topk(10, dim=1, largest=False)
    scores, ids = codec.search(queries, 10, rerank=3000, vectors=x)  # every vector re-ranked: exact search
    torch.testing.assert_close(scores, exact.values, rtol=1e-4, atol=1e-3)

    def recall(found):
        return sum(len(set(a.tolist()) & set(b.tolist())) for a, b in zip(found, exact.indices)) / exact.indices.numel()

    plain = recall(codec.search(queries, 10)[1])
    assert plain < 0.8 and recall(codec.search(queries, 10, rerank=100, vectors=x)[1]) > plain + 0.15


def test_streaming_fit_and_add_from_a_memory_map_and_batches(tmp_path):
    np = pytest.importorskip("numpy")
    x = mixture()
    np.save(tmp_path / "x.npy", x.numpy())
    mapped = torch.from_numpy(np.load(tmp_path / "x.npy", mmap_mode="c"))
    in_memory = EmbeddingCodec(32, "opq", 4, codebook_size=64, num_lists=4, opq_iters=2).fit(x, max_vectors=1000)
    streamed = EmbeddingCodec(32, "opq", 4, codebook_size=64, num_lists=4, opq_iters=2).fit(mapped, max_vectors=1000)
    assert torch.equal(in_memory.codebooks, streamed.codebooks)  # the same seeded sample of 1000 rows
    assert not torch.equal(
        EmbeddingCodec(32, "opq", 4, codebook_size=64, num_lists=4, opq_iters=2).fit(x).codebooks, streamed.codebooks
    )
    in_memory.add(x)
    streamed.add(mapped, batch_size=256)
    streamed.add(x[i : i + 100] for i in range(0, 300, 100))  # any iterable of batches
    assert torch.equal(streamed.database, torch.cat([in_memory.database, in_memory.database[:300]]))


def test_save_and_load_give_the_same_codes_and_search(tmp_path):
    x = mixture()
    codec = EmbeddingCodec(32, "opq", 8, codebook_size=16, opq_iters=3).fit(x)
    codec.add(x[:500])
    loaded = EmbeddingCodec.load(codec.save(tmp_path / "codec.safetensors"))
    assert torch.equal(loaded.encode(x[500:600]), codec.encode(x[500:600]))
    assert all(torch.equal(a, b) for a, b in zip(loaded.search(x[:5], 3), codec.search(x[:5], 3)))


def test_fitting_is_deterministic_with_a_seed():
    x = mixture()
    assert torch.equal(
        EmbeddingCodec(32, "pq", 4, codebook_size=64, seed=3).fit(x).codebooks,
        EmbeddingCodec(32, "pq", 4, codebook_size=64, seed=3).fit(x).codebooks,
    )


def test_bad_input_is_reported(tmp_path):
    x = mixture()
    codec = EmbeddingCodec(32, "pq", 4, codebook_size=256)
    with pytest.raises(ValueError, match="not fitted yet"):
        codec.encode(x)
    codec.fit(x)
    with pytest.raises(ValueError, match="have dim 16, this codec codes dim 32"):
        codec.encode(torch.randn(3, 16))
    with pytest.raises(ValueError, match=r"expected packed codes \(N, 4\) uint8 from this codec"):
        codec.decode(EmbeddingCodec(32, "pq", 8, codebook_size=256).fit(x).encode(x[:3]))
    codec.add(x[:20])
    with pytest.raises(ValueError, match=r"k must be an int in \[1, 20\], got 21"):
        codec.search(x[:2], k=21)
    with pytest.raises(ValueError, match="num_codebooks 5 must divide dim 32"):
        EmbeddingCodec(32, "pq", 5, codebook_size=256)
    with pytest.raises(ValueError, match=r"codebook_size must be an int in \[2, 65536\], got 131072"):
        EmbeddingCodec(32, "pq", 4, codebook_size=131072)
    with pytest.raises(ValueError, match="codebook_size must be a power of two .*got 100"):
        EmbeddingCodec(32, "pq", 4, codebook_size=100)
    with pytest.raises(TypeError, match="codebook_size must be an int, got '256'"):
        EmbeddingCodec(32, "pq", 4, codebook_size="256")
    with pytest.raises(TypeError, match="positional"):
        EmbeddingCodec(32, "pq", 4, 8)  # codebook_size is keyword-only: an old positional bits is refused
    with pytest.raises(ValueError, match=r"metric must be one of \('l2', 'cosine', 'ip'\), got 'dot'"):
        EmbeddingCodec(32, metric="dot")
    with pytest.raises(TypeError, match="queries must be floating point"):
        codec.search(torch.ones(2, 32, dtype=torch.long), k=1)
    with pytest.raises(TypeError, match=r"expected packed codes \(N, 4\) uint8 from this codec"):
        codec.decode(codec.database.int())
    with pytest.raises(ValueError, match=r"nprobe must be an int in \[1, 1\], got 2"):
        codec.search(x[:2], k=3, nprobe=2)
    with pytest.raises(ValueError, match=r"rerank must be an int in \[3, 20\], got 2"):
        codec.search(x[:2], k=3, rerank=2, vectors=x[:20])
    with pytest.raises(ValueError, match=r"rerank needs the original vectors \(20, 32\)"):
        codec.search(x[:2], k=3, rerank=10)
    with pytest.raises(ValueError, match="need at least 64 training vectors for 64 codes"):
        EmbeddingCodec(32, "pq", 4, codebook_size=16, num_lists=64).fit(x[:50])
    with pytest.raises(ValueError, match="method must be one of"):
        EmbeddingCodec(32, "lsq")
    with pytest.raises(ValueError, match="need at least 256 training vectors"):
        EmbeddingCodec(32, "pq", 4, codebook_size=256).fit(x[:100])
    (tmp_path / "bad.safetensors").write_bytes(b"garbage")
    with pytest.raises(ValueError, match="bad.safetensors is not a readable embedding codec"):
        EmbeddingCodec.load(tmp_path / "bad.safetensors")
    odd = write_artifact(tmp_path / "odd.safetensors", FORMAT, VERSION, {"dim": 32, "colour": "red"}, {})
    with pytest.raises(ValueError, match="odd.safetensors is not a valid embedding codec: .*'colour'"):
        EmbeddingCodec.load(odd)


@pytest.mark.parametrize(
    "method, codebook_size, num_lists",
    [("pq", 256, 1), ("opq", 256, 1), ("pq", 16, 1), ("pq", 256, 16), ("opq", 64, 16)],
)
def test_faiss_export_returns_our_neighbours(method, codebook_size, num_lists):
    faiss = pytest.importorskip("faiss")
    x, queries = mixture(), mixture(40, seed=2)
    codec = EmbeddingCodec(
        32, method, num_codebooks=8, codebook_size=codebook_size, num_lists=num_lists, opq_iters=3
    ).fit(x)
    codec.add(x)
    index = codec.to_faiss()
    assert index.ntotal == 3000
    if num_lists > 1:
        faiss.extract_index_ivf(index).nprobe = 4
    distances, ids = index.search(queries.numpy(), 10)
    ours, our_ids = codec.search(queries, 10, nprobe=min(4, num_lists))
    torch.testing.assert_close(torch.from_numpy(distances), ours, rtol=1e-4, atol=1e-3)
    brute = torch.cdist(queries, codec.decode(codec.database)).pow(2)
    torch.testing.assert_close(brute.gather(1, torch.from_numpy(ids)), ours, rtol=1e-4, atol=1e-3)  # up to ties
    del faiss


@pytest.mark.parametrize("method, metric, num_lists", [("pq", "l2", 1), ("opq", "ip", 16), ("rvq", "l2", 4)])
def test_stored_bits_count_the_held_database(method, metric, num_lists):
    x = mixture()
    codec = EmbeddingCodec(32, method, 4, codebook_size=64, metric=metric, num_lists=num_lists, opq_iters=2)
    codec.fit(x)
    assert codec.stored_bits() == 0
    codec.add(x[:1000], batch_size=300)
    codec.add(x[1000:1500])
    assert codec.stored_bits() == 1500 * codec.bits_per_vector()
    held = held_bytes([codec.database, codec.norms])  # the storages add keeps alive: codes (and norms)
    assert 0 <= 8 * held - codec.stored_bits() < 8 * 64  # equal up to storage padding
    assert (codec.norms.numel() > 0) == (method == "rvq" and metric == "l2")


def test_a_file_saved_with_bits_loads_with_a_warning(tmp_path):
    x = mixture()
    codec = EmbeddingCodec(32, "pq", 4, codebook_size=64, num_lists=4).fit(x)
    codec.add(x[:200])
    config = {("bits" if name == "codebook_size" else name): value for name, value in codec.config.items()}
    config["bits"] = 6  # the earlier argument: codebook_size = 2^bits
    old = write_artifact(tmp_path / "old.safetensors", FORMAT, VERSION, config, codec.state_dict())
    with pytest.warns(DeprecationWarning, match="bits -> codebook_size"):
        loaded = EmbeddingCodec.load(old)
    assert loaded.codebook_size == 64 and loaded.config == codec.config
    assert torch.equal(loaded.encode(x[200:300]), codec.encode(x[200:300]))
    assert all(torch.equal(a, b) for a, b in zip(loaded.search(x[:5], 3, nprobe=2), codec.search(x[:5], 3, nprobe=2)))
    config["bits"] = "six"
    bad = write_artifact(tmp_path / "bad.safetensors", FORMAT, VERSION, config, codec.state_dict())
    with (
        pytest.raises(ValueError, match="bad.safetensors is not a valid embedding codec"),
        pytest.warns(DeprecationWarning),
    ):
        EmbeddingCodec.load(bad)


@pytest.mark.parametrize("method, num_lists", [("pq", 1), ("opq", 8), ("rvq", 1)])
def test_cosine_codes_unit_vectors_and_ranks_by_inner_product(method, num_lists):
    x, queries = mixture(), mixture(30, seed=4)
    settings = dict(codebook_size=64, num_lists=num_lists, kmeans_iters=8, opq_iters=2)
    cosine = EmbeddingCodec(32, method, 4, metric="cosine", **settings).fit(x)
    ip = EmbeddingCodec(32, method, 4, metric="ip", **settings).fit(F.normalize(x, dim=-1))
    assert torch.equal(cosine.codebooks, ip.codebooks)  # cosine: the inner-product codec of the unit vectors
    cosine.add(x)
    ip.add(F.normalize(x, dim=-1))
    assert torch.equal(cosine.database, ip.database) and cosine.norms.numel() == 0
    scores, ids = cosine.search(queries, 10, nprobe=num_lists)
    want = F.normalize(queries, dim=-1) @ cosine.decode(cosine.database).T
    torch.testing.assert_close(scores, want.topk(10, dim=1).values, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(want.gather(1, ids), scores, rtol=1e-4, atol=1e-4)
    exact = F.normalize(queries, dim=-1) @ F.normalize(x, dim=-1).T  # re-ranking all: the exact cosine neighbours
    scores, ids = cosine.search(queries, 10, nprobe=num_lists, rerank=3000, vectors=x)
    torch.testing.assert_close(scores, exact.topk(10, dim=1).values, rtol=1e-4, atol=1e-4)


def test_scan_index_groups_the_database_by_list_until_it_changes():
    x = mixture()
    codec = EmbeddingCodec(32, "pq", 4, codebook_size=64, num_lists=8).fit(x)
    codec.add(x[:1000])
    index = codec.scan_index()
    assert codec.scan_index() is index  # kept while the database is unchanged
    lists, codes = codec.unpack(codec.database)
    for lst in range(8):
        members = index.members(lst)
        assert torch.equal(members, (lists == lst).nonzero()[:, 0])  # the list's rows, in storage order
        positions = torch.arange(int(index.bounds[lst]), int(index.bounds[lst + 1]))
        assert torch.equal(index.rows(positions), members) and torch.equal(
            index.codes[positions].long(), codes[members]
        )
    assert torch.equal(index.rows(torch.tensor([-1, 0])), torch.stack([torch.tensor(-1), index.order[0]]))
    codec.add(x[1000:1010])
    assert codec.scan_index() is not index and int(codec.scan_index().bounds[-1]) == 1010
    flat = EmbeddingCodec(32, "pq", 4, codebook_size=256).fit(x)
    flat.add(x[:100])
    assert flat.scan_index().codes is flat.database and flat.scan_index().order is None  # one byte per code
    assert torch.equal(flat.scan_index().members(0), torch.arange(100))


def test_check_fitted_and_unpack_are_public():
    x = mixture()
    codec = EmbeddingCodec(32, "rvq", 4, codebook_size=16, num_lists=4, kmeans_iters=4)
    with pytest.raises(ValueError, match=r"not fitted yet: call fit\(training_vectors\) first"):
        codec.check_fitted()
    codec.fit(x).check_fitted()
    assert codec.code_bits == 4 and codec.code_bytes == 3  # 2 list-id bits + 4 x 4 code bits, padded
    lists, codes = codec.unpack(codec.encode(x[:50]))
    assert lists.shape == (50,) and codes.shape == (50, 4) and codes.max() < 16 and lists.max() < 4
    assert torch.equal(lists, torch.cdist(x[:50], codec.centroids).argmin(1))
    with pytest.raises(ValueError, match=r"expected packed codes \(N, 3\) uint8 from this codec, got \(50,\)"):
        codec.unpack(codec.encode(x[:50])[:, 0])


def test_faiss_export_of_a_cosine_codec_serves_normalised_queries():
    faiss = pytest.importorskip("faiss")
    x, queries = mixture(), F.normalize(mixture(20, seed=5), dim=-1)
    codec = EmbeddingCodec(32, "opq", 8, codebook_size=64, metric="cosine", opq_iters=2).fit(x)
    codec.add(x)
    scores, ids = codec.to_faiss().search(queries.numpy(), 5)
    torch.testing.assert_close(torch.from_numpy(scores), codec.search(queries, 5)[0], rtol=1e-4, atol=1e-4)
    del faiss
