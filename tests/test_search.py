import pytest
import torch
import torch.nn.functional as F

from tokenizers_q import nearest


@pytest.mark.parametrize("max_elements", [1, 7, 2**22])
def test_l2_nearest_equals_brute_force_at_any_chunk_size(max_elements):
    x, codes = torch.randn(301, 12), torch.randn(50, 12)
    idx, dist = nearest(x, codes, "l2", max_elements=max_elements)
    brute = torch.cdist(x.double(), codes.double()).pow(2)
    assert torch.equal(idx, brute.argmin(-1))
    torch.testing.assert_close(dist.double(), brute.min(-1).values, atol=1e-4, rtol=1e-4)


def test_cosine_nearest_equals_brute_force():
    x, codes = torch.randn(200, 8) * 5, torch.randn(40, 8)
    idx, dist = nearest(x, codes, "cosine", max_elements=64)
    sims = F.normalize(x, dim=-1) @ F.normalize(codes, dim=-1).T
    assert torch.equal(idx, sims.argmax(-1))
    torch.testing.assert_close(dist, 1 - sims.max(-1).values, atol=1e-6, rtol=0)


def test_batched_search_equals_separate_searches():
    x, codes = torch.randn(3, 100, 6), torch.randn(3, 20, 6)
    idx, _ = nearest(x, codes, max_elements=50)
    for b in range(3):
        assert torch.equal(idx[b], nearest(x[b], codes[b])[0])


def test_half_precision_inputs_search_in_float32():
    x, codes = torch.randn(500, 16), torch.randn(64, 16)
    idx_bf16, dist = nearest(x.bfloat16(), codes.bfloat16())
    ref, _ = nearest(x.bfloat16().float(), codes.bfloat16().float())
    assert dist.dtype == torch.float32 and torch.equal(idx_bf16, ref)


def test_errors():
    with pytest.raises(ValueError, match="metric must be one of"):
        nearest(torch.randn(3, 4), torch.randn(5, 4), "dot")
    with pytest.raises(ValueError, match=r"got x \(3, 4\) and codes \(5, 3\)"):
        nearest(torch.randn(3, 4), torch.randn(5, 3))
