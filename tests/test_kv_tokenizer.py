"""KV tokenizers: recorded attention activations, the codec, Lightning training, caches from a trained tokenizer."""

import lightning as L
import pytest
import torch

transformers = pytest.importorskip("transformers")

from helpers import tiny_llama  # noqa: E402

from tokenizers_q.kv import QuantizerLayerCache, apply_rotary  # noqa: E402
from tokenizers_q.kv.attention_inputs import collect_attention_inputs, read_attention_inputs  # noqa: E402
from tokenizers_q.kv.hf import hf_cache, hf_rotary  # noqa: E402
from tokenizers_q.models import KVCodec  # noqa: E402
from tokenizers_q.trainers import KVActivationDataModule, KVTokenizerModule, load_kv_tokenizer  # noqa: E402
from tokenizers_q.trainers.kv_tokenizer import causal_attention  # noqa: E402

SMALL_RVQ = {"num_quantizers": 2, "codebook_size": 16}


@pytest.fixture(scope="module")
def llama():
    return tiny_llama()


@pytest.fixture(scope="module")
def activations(llama):
    g = torch.Generator().manual_seed(0)
    return collect_attention_inputs(llama, [torch.randint(1, 128, (64,), generator=g) for _ in range(12)])


def trainer(steps: int, **kwargs) -> L.Trainer:
    options = dict(logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    return L.Trainer(max_steps=steps, num_sanity_val_steps=0, **{**options, **kwargs})


def test_recorded_activations_are_what_the_model_caches_and_attends(llama, activations):
    assert activations["queries"].shape == (12, 2, 4, 64, 16) and activations["keys"].shape == (12, 2, 2, 64, 16)
    ids = torch.randint(1, 128, (1, 64), generator=torch.Generator().manual_seed(0))
    cache = transformers.DynamicCache()
    outputs = []
    hooks = [
        layer.self_attn.o_proj.register_forward_hook(lambda m, a, o: outputs.append(a[0]))
        for layer in llama.model.layers
    ]
    with torch.no_grad():
        llama(ids, past_key_values=cache, use_cache=True)
    for hook in hooks:
        hook.remove()
    cos, sin = activations["cos"], activations["sin"]
    for layer in range(2):
        keys = apply_rotary(activations["keys"][0, layer : layer + 1].float(), cos, sin)
        torch.testing.assert_close(keys, cache.layers[layer].keys, atol=2e-3, rtol=2e-3)  # float16 storage
        queries = apply_rotary(activations["queries"][0, layer : layer + 1].float(), cos, sin)
        attended = causal_attention(queries, keys, activations["values"][0, layer : layer + 1].float())
        torch.testing.assert_close(attended.transpose(1, 2).reshape(1, 64, 64), outputs[layer], atol=2e-3, rtol=2e-3)


def test_codec_starts_as_its_quantizer_and_keeps_the_contract():
    torch.manual_seed(0)
    codec = KVCodec(16, "rvq", SMALL_RVQ)
    x = torch.randn(500, 16)
    out = codec(x)  # k-means initialisation on this batch
    codec.eval()
    codes = codec.encode(x)
    assert torch.equal(codes, codec.quantizer.encode(x))  # identity maps: the quantizer's own codes
    torch.testing.assert_close(codec.decode(codes), codec(x).quantized)
    assert torch.equal(codec(x).codes, codes)
    codec.train()
    before = {k: v.clone() for k, v in codec.state_dict().items()}
    assert torch.equal(codec.encode(x), codes)  # encoding changes no state, in training mode too
    assert all(torch.equal(before[k], v) for k, v in codec.state_dict().items())
    assert [v.shape for v in codec.quantizer.code_vectors()] == [(16, 16), (16, 16)]
    out.quantized.sum().backward()
    assert codec.encoder.weight.grad is not None and codec.decoder.weight.grad.abs().sum() > 0
    assert codec.spec.bits_per_token == 8


def test_attention_loss_beats_kv_reconstruction_loss_on_held_out_attention(activations):
    errors = {}
    for name, weights in {"attention": (1.0, 0.1), "reconstruction": (0.0, 1.0)}.items():
        torch.manual_seed(0)
        data = KVActivationDataModule(activations, window=32, val_sequences=3, batch_size=4)
        assert data.layout == {"num_layers": 2, "query_heads": 4, "kv_heads": 2, "head_dim": 16}
        module = KVTokenizerModule(
            num_layers=2,
            head_dim=16,
            quantizer_kwargs=SMALL_RVQ,
            attention_weight=weights[0],
            reconstruction_weight=weights[1],
        )
        module.calibrate(data.activations("train"))  # k-means on the training sequences only
        trainer(150).fit(module, data)
        errors[name] = trainer(1).validate(module, data, verbose=False)[0]["val/attention_error"]
    assert errors["attention"] < errors["reconstruction"]


def test_fisher_information_of_keys_and_values(llama):
    ids = [torch.randint(1, 128, (16,), generator=torch.Generator().manual_seed(i)) for i in range(2)]
    data = collect_attention_inputs(llama, ids, fisher=True)
    assert data["key_fisher"].shape == data["value_fisher"].shape == (2, 2, 2, 16)
    # the last token's key and value only serve the last prediction, which has no target
    assert (data["key_fisher"][..., -1] == 0).all() and (data["value_fisher"][..., -1] == 0).all()
    assert (data["key_fisher"][..., :-1] > 0).all() and (data["value_fisher"][..., 0] > 0).all()
    assert all(p.requires_grad for p in llama.parameters()) and all(p.grad is None for p in llama.parameters())
    plain = collect_attention_inputs(llama, ids)
    assert torch.equal(plain["keys"], data["keys"]) and "key_fisher" not in plain


def test_trained_tokenizer_round_trips_a_checkpoint_and_serves_generation(llama, activations, tmp_path):
    torch.manual_seed(0)
    data = KVActivationDataModule(activations, window=32, val_sequences=2, batch_size=4)
    module = KVTokenizerModule(num_layers=2, head_dim=16, quantizer="vq", quantizer_kwargs={"codebook_size": 64})
    fit = trainer(10, default_root_dir=tmp_path, enable_checkpointing=True)
    fit.fit(module, data)
    loaded = load_kv_tokenizer(fit.checkpoint_callback.best_model_path)
    assert loaded.bits_per_element() == module.bits_per_element() == 6 / 16  # a method, as on caches
    x = activations["keys"][0, 1].float()
    assert torch.equal(loaded.key_codecs[1].encode(x), module.eval().key_codecs[1].encode(x))
    ids = torch.randint(1, 128, (1, 20), generator=torch.Generator().manual_seed(1))
    cache = hf_cache(loaded.layer_caches(hf_rotary(llama), sink_tokens=1))
    llama.generate(ids, past_key_values=cache, max_new_tokens=5, do_sample=False, attention_mask=torch.ones_like(ids))
    inner = cache.layers[0].inner.inner.inner  # pre-RoPE -> sink -> codes
    assert isinstance(inner, QuantizerLayerCache) and inner.num_tokens == 20 + 5 - 1 - 1
    # 6-bit codes for 16 channels (16 tokens packed, the last 7 waiting for an eighth as uint8), plus the
    # float32 sink token, over 24 tokens
    assert cache.bits_per_element() == pytest.approx(((16 * 6 + 7 * 8) / 16 + 32) / 24)


def test_kv_tokenizer_errors(activations, tmp_path):
    with pytest.raises(ValueError, match="num_layers must be a positive int, got 0"):
        KVTokenizerModule(num_layers=0, head_dim=16)
    with pytest.raises(ValueError, match="both 0: nothing to train"):
        KVTokenizerModule(num_layers=1, head_dim=16, attention_weight=0, reconstruction_weight=0)
    with pytest.raises(ValueError, match="this tokenizer has 3 layers of head_dim 16, got activations of 2 layers"):
        KVTokenizerModule(num_layers=3, head_dim=16, quantizer_kwargs=SMALL_RVQ).calibrate(activations)
    with pytest.raises(ValueError, match="pass the model's rotary tables"):
        KVTokenizerModule(num_layers=2, head_dim=16, quantizer_kwargs=SMALL_RVQ).layer_caches()
    with pytest.raises(ValueError, match=r"window must be an int in \[1, 64\]"):
        KVActivationDataModule(activations, window=65)
    with pytest.raises(ValueError, match=r"val_sequences must be an int in \[0, 11\], got 12"):
        KVActivationDataModule(activations, window=32, val_sequences=12)
    with pytest.raises(ValueError, match="lack \\['cos', 'sin'\\]"):
        KVActivationDataModule({k: v for k, v in activations.items() if k not in ("cos", "sin")})
    with pytest.raises(FileNotFoundError, match="no attention activations at"):
        KVActivationDataModule(tmp_path / "missing.safetensors")
    with pytest.raises(ValueError, match="token sequences \\(T,\\) of one length"):
        collect_attention_inputs(None, [torch.zeros(3, dtype=torch.long), torch.zeros(4, dtype=torch.long)])
    torch.save({"tokenizer_kind": "graph"}, tmp_path / "other.ckpt")
    with pytest.raises(ValueError, match="other.ckpt is not a Lightning checkpoint"):
        load_kv_tokenizer(tmp_path / "other.ckpt")
    image = {"state_dict": {}, "hyper_parameters": {"_class_path": "tokenizers_q.trainers.AutoencoderModule"}}
    torch.save(image, tmp_path / "image.ckpt")
    with pytest.raises(ValueError, match="image.ckpt holds AutoencoderModule, not KVTokenizerModule"):
        load_kv_tokenizer(tmp_path / "image.ckpt")


def test_activations_saved_to_a_file_are_served_alike(llama, tmp_path):
    ids = [torch.randint(1, 128, (16,), generator=torch.Generator().manual_seed(i)) for i in range(3)]
    data = collect_attention_inputs(llama, ids, tmp_path / "kv.safetensors")
    assert all(torch.equal(v, data[k]) for k, v in read_attention_inputs(tmp_path / "kv.safetensors").items())
    loaded = KVActivationDataModule(tmp_path / "kv.safetensors", window=8, val_sequences=1)
    loaded.setup()
    assert len(loaded.splits["train"]) == 4 and len(loaded.splits["val"]) == 2
    item = loaded.splits["val"][1]  # sequence 2, tokens 8..15
    assert torch.equal(item["keys"], data["keys"][2, :, :, 8:16].float())
    assert torch.equal(item["cos"], data["cos"][8:16])
