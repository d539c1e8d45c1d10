"""KV codecs trained on the model's next-token distribution: what training sees is what the caches serve."""

import lightning as L
import pytest
import torch
import torch.nn.functional as F

transformers = pytest.importorskip("transformers")

from helpers import tiny_llama  # noqa: E402

from tokenizers_q.kv.attention_inputs import collect_attention_inputs  # noqa: E402
from tokenizers_q.kv.hf import hf_cache, hf_rotary  # noqa: E402
from tokenizers_q.trainers import (  # noqa: E402
    KVDistillationModule,
    KVTokenizerModule,
    TokenSequenceDataModule,
    load_kv_tokenizer,
)
from tokenizers_q.trainers.artifacts import export_module  # noqa: E402
from tokenizers_q.trainers.kv_distillation import coded_projections  # noqa: E402

SMALL_RVQ = {"num_quantizers": 2, "codebook_size": 16}


@pytest.fixture(scope="module")
def llama():
    return tiny_llama()


@pytest.fixture(scope="module")
def sequences():
    g = torch.Generator().manual_seed(0)
    return torch.randint(1, 128, (10, 48), generator=g)


def calibrated(llama, sequences, pre_rope: bool = True) -> KVTokenizerModule:
    torch.manual_seed(0)
    tokenizer = KVTokenizerModule(num_layers=2, head_dim=16, quantizer_kwargs=SMALL_RVQ, pre_rope=pre_rope)
    tokenizer.calibrate(collect_attention_inputs(llama, list(sequences[:8])))
    return tokenizer.eval()


def trainer(steps: int, **kwargs) -> L.Trainer:
    options = dict(logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    return L.Trainer(max_steps=steps, num_sanity_val_steps=0, **{**options, **kwargs})


@pytest.mark.parametrize("pre_rope", [True, False])
def test_coded_forward_is_what_the_tokenizers_caches_serve(llama, sequences, pre_rope):
    tokenizer = calibrated(llama, sequences, pre_rope)
    ids = sequences[8:9]
    cache = hf_cache(tokenizer.layer_caches(hf_rotary(llama), sink_tokens=1))
    with torch.no_grad():
        served = llama(ids, past_key_values=cache, use_cache=True).logits
        rotary = None if pre_rope else hf_rotary(llama)(torch.arange(ids.shape[1]))
        with coded_projections(llama, tokenizer.key_codecs, tokenizer.value_codecs, 1, rotary) as losses:
            coded = llama(ids, use_cache=False).logits
        exact = llama(ids, use_cache=False).logits
    torch.testing.assert_close(coded, served, atol=1e-4, rtol=1e-4)
    assert len(losses) == 4 and (coded - exact).abs().max() > 1e-2  # the codes change the predictions
    assert all(not layer.self_attn.k_proj._forward_hooks for layer in llama.model.layers)  # hooks removed


def test_next_token_loss_trains_the_codecs_only_and_lowers_the_kl(sequences, tmp_path):
    llama = tiny_llama()
    with torch.no_grad():  # a sharper head than the random one, so that what attention reads matters (KL ~0.5)
        llama.lm_head.weight.mul_(30)
    tokenizer = calibrated(llama, sequences)
    data = TokenSequenceDataModule(sequences, val_sequences=2, batch_size=2)
    module = KVDistillationModule(tokenizer, llama, lr=3e-3, warmup_steps=2)
    assert {k.split(".")[0] for k in module.state_dict()} == {"tokenizer"}  # the model is not saved

    def train_kl() -> float:
        return module.eval().losses({"input_ids": sequences[:8]}, "val").logged["kl"].item()

    before, before_val = train_kl(), trainer(1).validate(module, data, verbose=False)[0]
    torch.manual_seed(0)
    trainer(40).fit(module, data)
    after = trainer(1).validate(module, data, verbose=False)[0]
    assert train_kl() < 0.75 * before  # measured 0.65x (random tokens of a random model: little generalises)
    assert after["val/fp_perplexity"] == pytest.approx(before_val["val/fp_perplexity"])  # the model is unchanged
    assert all(not p.requires_grad and p.grad is None for p in llama.parameters())
    # the trained tokenizer exports and loads as any KV tokenizer
    path = export_module(module.tokenizer, tmp_path / "kv.tokq")
    loaded = load_kv_tokenizer(path)
    x = torch.randn(5, 3, 16)
    assert torch.equal(loaded.key_codecs[0].encode(x), module.tokenizer.eval().key_codecs[0].encode(x))


def test_gradients_reach_every_codec(llama, sequences):
    tokenizer = calibrated(llama, sequences).train()
    module = KVDistillationModule(tokenizer, llama)
    module.losses({"input_ids": sequences[:2]}, "train").logged["loss"].backward()
    for codec in (*tokenizer.key_codecs, *tokenizer.value_codecs):
        assert codec.encoder.weight.grad.abs().sum() > 0 and codec.decoder.weight.grad.abs().sum() > 0


def test_kl_is_zero_without_coding(llama, sequences):
    identity = torch.nn.ModuleList(_Exact() for _ in range(2))
    with torch.no_grad(), coded_projections(llama, identity, identity, 0):
        coded = llama(sequences[:2], use_cache=False).logits
    torch.testing.assert_close(F.log_softmax(coded, -1), F.log_softmax(llama(sequences[:2]).logits, -1))


class _Exact(torch.nn.Module):
    def forward(self, x):
        return type("Out", (), {"quantized": x, "loss": torch.zeros(())})()


def test_distillation_errors(llama, sequences):
    tokenizer = calibrated(llama, sequences)
    with pytest.raises(TypeError, match="tokenizer must be a KVTokenizerModule, got Linear"):
        KVDistillationModule(torch.nn.Linear(2, 2), llama)
    other = KVTokenizerModule(num_layers=3, head_dim=16, quantizer_kwargs=SMALL_RVQ)
    with pytest.raises(ValueError, match="the tokenizer has 3 layers of head_dim 16, the model 2"):
        KVDistillationModule(other, llama)
    with pytest.raises(ValueError, match="sink_tokens must be a non-negative int, got -1"):
        KVDistillationModule(tokenizer, llama, sink_tokens=-1)
    with pytest.raises(ValueError, match="has no decoder layers whose self_attn"):
        KVDistillationModule(tokenizer, torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match=r"expected input_ids \(B, T\) with T > sink_tokens=1, got \(1, 1\)"):
        KVDistillationModule(tokenizer, llama).losses({"input_ids": sequences[:1, :1]}, "train")
    codecs = (tokenizer.key_codecs[:1], tokenizer.value_codecs)
    with (
        pytest.raises(ValueError, match="2 attention layers but 1 key / 2 value codecs"),
        coded_projections(llama, *codecs),
    ):
        pass
    with pytest.raises(ValueError, match=r"sequences must be integer token ids \(N, T\), got \(48,\)"):
        TokenSequenceDataModule(sequences[0])
    with pytest.raises(ValueError, match="one length"):
        TokenSequenceDataModule([sequences[0], sequences[1, :5]])
    with pytest.raises(ValueError, match="val_sequences"):
        TokenSequenceDataModule(sequences, val_sequences=10)
