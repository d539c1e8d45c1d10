"""The shared argument checks and their exception policy: TypeError for types, ValueError for values."""

import pytest
import torch

from tokenizers_q.checks import check_choice, check_float_tensor, check_int
from tokenizers_q.kv import KIVIConfig, KIVILayerCache
from tokenizers_q.search import METRICS, check_metric, nearest
from tokenizers_q.weights import IntGridConfig


def test_check_int_names_the_argument_and_the_range():
    assert check_int("k", 3) == 3 and check_int("window", 0, 0) == 0
    with pytest.raises(TypeError, match=r"k must be an int, got True \(bool\)"):
        check_int("k", True)
    with pytest.raises(TypeError, match=r"k must be an int, got 2.0 \(float\)"):
        check_int("k", 2.0)
    with pytest.raises(ValueError, match="k must be a positive int, got 0"):
        check_int("k", 0)
    with pytest.raises(ValueError, match="window must be a non-negative int, got -1"):
        check_int("window", -1, 0)
    with pytest.raises(ValueError, match=r"bits must be an int in \[1, 8\], got 9"):
        check_int("bits", 9, 1, 8)
    with pytest.raises(ValueError, match="size must be an int >= 2, got 1"):
        check_int("size", 1, 2)


def test_check_choice_and_float_tensor():
    assert check_choice("metric", "ip", METRICS) == "ip"
    with pytest.raises(ValueError, match=r"metric must be one of \('l2', 'cosine'\), got 'ip'"):
        check_metric("ip", ("l2", "cosine"))
    with pytest.raises(TypeError, match="x must be a torch.Tensor, got list"):
        check_float_tensor("x", [1.0])
    with pytest.raises(TypeError, match="x must be floating point, got dtype torch.int64"):
        check_float_tensor("x", torch.ones(2, dtype=torch.long))


def test_one_policy_across_applications():
    """A tensor of the wrong dtype is a TypeError in the quantizers, the KV caches and the weights alike."""
    from tokenizers_q.quantizers import create_quantizer

    ints = torch.ones(4, 8, dtype=torch.long)
    with pytest.raises(TypeError, match="floating-point"):
        create_quantizer("vq", dim=8, codebook_size=4)(ints)
    with pytest.raises(TypeError, match="keys must be floating point"):
        KIVILayerCache(KIVIConfig()).update(ints.reshape(1, 1, 4, 8), ints.reshape(1, 1, 4, 8).float())
    with pytest.raises(TypeError, match="weight must be floating point"):
        IntGridConfig(4).quantize(ints)
    with pytest.raises(TypeError, match="group_size must be an int"):
        KIVIConfig(group_size="32")


def test_nearest_by_inner_product_is_the_argmax_of_dots():
    x, codes = torch.randn(50, 6), torch.randn(9, 6)
    index, distance = nearest(x, codes, "ip")
    assert torch.equal(index, (x @ codes.T).argmax(1))
    assert torch.allclose(distance, -(x @ codes.T).amax(1))
