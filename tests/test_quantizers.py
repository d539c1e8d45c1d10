"""Behaviour of each quantizer beyond the shared contract, with parity against references."""

import math

import pytest
import torch
import torch.nn.functional as F

from tokenizers_q import BSQ, FSQ, LFQ, PQ, RVQ, VQ
from tokenizers_q.quantizers.vq import rotation_trick

vqp = pytest.importorskip("vector_quantize_pytorch")


@pytest.mark.parametrize("levels", [[8, 5, 5, 5], [8, 6, 5], [7, 5, 5, 5, 5], [4, 4, 4]])
def test_fsq_codes_and_values_match_vector_quantize_pytorch(levels):
    ours, ref = FSQ(levels), vqp.FSQ(levels)
    x = torch.randn(4, 300, len(levels)) * 2
    out = ours(x)
    ref_q, ref_idx = ref(x)
    assert torch.equal(out.codes[..., 0], ref_idx.long())
    torch.testing.assert_close(out.quantized, ref_q)
    torch.testing.assert_close(ours.decode(out.codes), ref.indices_to_codes(ref_idx))


def test_fsq_grid_covers_every_code():
    fsq = FSQ([3, 4])
    codes = torch.arange(12)[:, None]
    values = fsq.decode(codes)
    assert values.unique(dim=0).shape[0] == 12
    assert values.min() == -1 and values.max() <= 1
    # every code is produced by some input: the bounded rounding reaches the whole grid
    seen = fsq.encode(torch.randn(20000, 2) * 3).unique()
    assert torch.equal(seen, torch.arange(12))


def test_vq_codes_equal_brute_force_and_vector_quantize_pytorch():
    ours = VQ(dim=32, codebook_size=300, kmeans_init=False).eval()
    ref = vqp.VectorQuantize(dim=32, codebook_size=300, kmeans_init=False).eval()
    ref._codebook.embed.copy_(ours.codebook.embed[None])
    x = torch.randn(8, 64, 32)
    codes = ours.encode(x)[..., 0]
    assert torch.equal(codes, torch.cdist(x, ours.codebook.embed[None]).argmin(-1))
    _, ref_idx, _ = ref(x)
    assert torch.equal(codes, ref_idx)


def test_vq_training_lowers_quantization_error():
    torch.manual_seed(0)
    centers = torch.randn(16, 8) * 3
    data = centers[torch.randint(0, 16, (4000,))] + 0.1 * torch.randn(4000, 8)
    for ema in (True, False):
        vq = VQ(dim=8, codebook_size=16, kmeans_init=False, ema_update=ema, decay=0.8)
        opt = torch.optim.Adam(vq.parameters(), lr=0.05) if not ema else None
        first = F.mse_loss(vq.eval()(data).quantized, data)
        vq.train()
        for step in range(60):
            out = vq(data[step * 50 % 4000 :][:500])
            if opt:
                opt.zero_grad()
                out.loss.backward()
                opt.step()
        last = F.mse_loss(vq.eval()(data).quantized, data)
        assert last < 0.5 * first, (ema, first, last)


def test_rotation_trick_keeps_value_and_rotates_gradient():
    e = torch.randn(20, 6, requires_grad=True)
    q = torch.randn(20, 6)
    out = rotation_trick(e, q)
    torch.testing.assert_close(out, q, atol=1e-5, rtol=1e-5)
    g = torch.randn(20, 6)
    (out * g).sum().backward()
    # the Jacobian is a rotation scaled by |q| / |e|: gradient norms scale accordingly, unlike STE
    ratio = q.norm(dim=-1) / e.detach().norm(dim=-1)
    torch.testing.assert_close(e.grad.norm(dim=-1), g.norm(dim=-1) * ratio, atol=1e-4, rtol=1e-4)


def test_rvq_stages_reduce_error_and_codes_decode_per_stage():
    torch.manual_seed(0)
    x = torch.randn(2000, 16)
    rvq = RVQ(dim=16, num_quantizers=4, codebook_size=32)
    for _ in range(5):
        rvq(x)
    rvq.eval()
    codes = rvq.encode(x)
    errors = []
    partial = torch.zeros_like(x)
    for i, layer in enumerate(rvq.layers):
        partial = partial + layer._decode_flat(codes[:, i : i + 1])
        errors.append(F.mse_loss(partial, x).item())
    assert errors == sorted(errors, reverse=True) and errors[-1] < 0.6 * errors[0]
    torch.testing.assert_close(partial, rvq.decode(codes))


def test_rvq_gradient_reaches_input_once():
    rvq = RVQ(dim=8, num_quantizers=4, codebook_size=8)
    x = torch.randn(100, 8, requires_grad=True)
    out = rvq(x)
    out.quantized.sum().backward()
    torch.testing.assert_close(x.grad, torch.ones_like(x))


def test_rvq_quantize_dropout_keeps_a_prefix_per_vector():
    torch.manual_seed(0)
    rvq = RVQ(dim=8, num_quantizers=4, codebook_size=8, quantize_dropout=True, quantize_dropout_cutoff_index=1)
    x = torch.randn(400, 8)
    rvq(x)  # initialise
    torch.manual_seed(1)
    out = rvq(x)
    stages = torch.stack([rvq.layers[i]._decode_flat(out.codes[:, i : i + 1]) for i in range(4)])
    prefixes = stages.cumsum(0)  # (4, N, 8): output if only the first d stages are kept
    # codebooks moved by EMA during the step, so compare with the step's own outputs via depth match
    depth = [(prefixes[:, n] - out.quantized[n]).norm(dim=-1).argmin().item() + 1 for n in range(400)]
    assert min(depth) >= 2 and set(depth) == {2, 3, 4}
    rvq.eval()
    torch.testing.assert_close(rvq(x).quantized, rvq.decode(rvq.encode(x)))  # no dropout in eval


def test_pq_groups_are_independent_quantizers():
    pq = PQ(dim=12, num_groups=3, codebook_size=16).eval()
    x = torch.randn(50, 12)
    codes = pq.encode(x)
    for g, part in enumerate(x.split(4, dim=-1)):
        assert torch.equal(codes[:, g : g + 1], pq.groups[g].encode(part))


def test_bsq_codes_lie_on_the_unit_sphere():
    bsq = BSQ(dim=10, codebook_size=2**10).eval()
    q = bsq(torch.randn(100, 10)).quantized
    torch.testing.assert_close(q.norm(dim=-1), torch.ones(100))
    assert (q.abs() - 1 / 10**0.5).abs().max() < 1e-6


@pytest.mark.parametrize("cls", [LFQ, BSQ])
@pytest.mark.parametrize("mode", ["exact", "grouped", "factorised"])
def test_entropies_match_the_softmax_over_all_codes(cls, mode):
    bits = 6 if mode != "grouped" else 14  # grouped: two exact groups of 7 bits
    q = cls(dim=bits, codebook_size=2**bits, inv_temperature=3.0, codebook_entropy=mode)
    x = torch.randn(500, bits) * 0.5
    m = q(x).metrics
    # exact soft assignment over all 2^L codes: softmax of 2 * tau * <h, c>
    h = F.normalize(x, dim=-1) if cls is BSQ else x
    bits_of = (torch.arange(2**bits)[:, None] >> torch.arange(bits)) & 1
    codebook = torch.where(bits_of.bool(), q.scale, -q.scale)
    prob = (2 * 3.0 * h @ codebook.T).softmax(-1)
    per_sample = -(prob * prob.clamp_min(1e-30).log()).sum(-1).mean()
    avg = prob.mean(0)
    exact_codebook_entropy = -(avg * avg.clamp_min(1e-30).log()).sum()
    torch.testing.assert_close(m["per_sample_entropy"], per_sample, atol=1e-4, rtol=1e-4)
    if mode == "exact":
        torch.testing.assert_close(m["codebook_entropy"], exact_codebook_entropy, atol=1e-4, rtol=1e-4)
    else:  # a sum of the groups' entropies bounds the joint entropy from above
        assert m["codebook_entropy"] > exact_codebook_entropy + 1e-3


def test_grouped_codebook_entropy_is_the_sum_of_each_groups_exact_entropy():
    x = torch.randn(300, 14) * 0.5
    grouped = LFQ(dim=14, codebook_size=2**14, inv_temperature=3.0, codebook_entropy="grouped")
    assert grouped.entropy_groups == (7, 7)
    halves = [LFQ(dim=7, codebook_size=2**7, inv_temperature=3.0, codebook_entropy="exact") for _ in range(2)]
    expected = sum(q(part).metrics["codebook_entropy"] for q, part in zip(halves, x.split(7, dim=-1)))
    torch.testing.assert_close(grouped(x).metrics["codebook_entropy"], expected)


def test_grouped_entropy_sees_correlated_bits_that_per_bit_entropy_misses():
    # every row is all ones or all zeros: each bit is balanced, only two codes are used
    x = torch.randn(400, 1).sign().expand(400, 16) + 0.01 * torch.randn(400, 16)
    entropy = {
        mode: LFQ(dim=16, codebook_size=2**16, codebook_entropy=mode)(x).metrics["codebook_entropy"]
        for mode in ("factorised", "grouped")
    }
    torch.testing.assert_close(entropy["factorised"], torch.tensor(16 * math.log(2)), rtol=1e-2, atol=0)
    torch.testing.assert_close(entropy["grouped"], torch.tensor(2 * math.log(2)), rtol=1e-2, atol=0)


def test_codebook_entropy_mode_is_checked_and_automatic():
    assert BSQ(dim=12, codebook_size=2**12).entropy_groups == (12,)
    assert BSQ(dim=16, codebook_size=2**16).entropy_groups == (8, 8)
    assert BSQ(dim=18, codebook_size=2**18).entropy_groups == (9, 9)
    assert LFQ(dim=25, codebook_size=2**25).entropy_groups == (9, 8, 8)
    assert LFQ(dim=4, codebook_entropy="factorised").entropy_groups == (1, 1, 1, 1)
    with pytest.raises(ValueError, match="codebook_entropy must be one of"):
        LFQ(dim=4, codebook_entropy="sampled")


def test_lfq_matches_vector_quantize_pytorch_up_to_bit_order():
    ours = LFQ(dim=8, codebook_size=256)
    ref = vqp.LFQ(dim=8, codebook_size=256)
    x = torch.randn(2, 100, 8)
    out = ours(x)
    ref_q, ref_idx, _ = ref(x)
    torch.testing.assert_close(out.quantized, ref_q)
    reversed_bits = ((out.codes[..., 0:1] >> torch.arange(8)) & 1).flip(-1)
    assert torch.equal((reversed_bits * 2 ** torch.arange(8)).sum(-1), ref_idx)


def test_bsq_with_65536_codes_needs_memory_linear_in_bits():
    bsq = BSQ(dim=16, codebook_size=2**16)
    x = torch.randn(16, 1024, 16, requires_grad=True)
    out = bsq(x)
    (out.quantized.sum() + out.loss).backward()
    assert out.codes.max() < 2**16 and torch.isfinite(x.grad).all()
