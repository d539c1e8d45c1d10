import subprocess
import sys


def test_core_import_pulls_in_neither_lightning_nor_wandb():  # quantizers, KV caches, weights, embeddings
    code = (
        "import sys, tokenizers_q, tokenizers_q.kv, tokenizers_q.weights, tokenizers_q.embeddings;"
        "from tokenizers_q import create_quantizer;"
        "[create_quantizer(n, dim=8, **kw) for n, kw in [('vq', {'codebook_size': 4}), ('rvq', {'codebook_size': 4}),"
        "('bsq', {}), ('lfq', {}), ('pq', {'codebook_size': 4})]]; create_quantizer('fsq', levels=[5, 5]);"
        "bad = [m for m in sys.modules if m.split('.')[0] in ('lightning', 'pytorch_lightning', 'wandb')];"
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_trainers_import_without_transformers():
    """``transformers`` (the extra hf) is imported only by the functions that run a transformers model."""
    code = (
        "import importlib.metadata as md, sys;"
        "version = md.version;"  # torchmetrics decides from the installed metadata whether to import transformers
        "md.version = lambda name: (_ for _ in ()).throw(md.PackageNotFoundError(name)) "
        "if name.lower() == 'transformers' else version(name);"
        "sys.modules['transformers'] = None;"  # any import of it fails
        "from tokenizers_q.trainers import *;"
        "import tokenizers_q.trainers as trainers, tokenizers_q.trainers.cli, tokenizers_q.models;"
        "missing = [name for name in trainers.__all__ if name not in globals()];"
        "assert not missing, missing;"
        "assert 'KVTokenizerModule' in globals() and 'collect_attention_inputs' in globals()"
    )
    subprocess.run([sys.executable, "-W", "ignore", "-c", code], check=True)


def test_attention_inputs_live_in_the_core():
    code = (
        "import sys; from tokenizers_q.kv.attention_inputs import collect_attention_inputs, read_attention_inputs;"
        "bad = [m for m in sys.modules if m.split('.')[0] in ('lightning', 'pytorch_lightning', 'transformers')];"
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_models_and_trainers_install_under_the_namespace():
    import tokenizers_q.models
    import tokenizers_q.trainers

    assert tokenizers_q.models.__name__ == "tokenizers_q.models"
    assert tokenizers_q.trainers.__name__ == "tokenizers_q.trainers"


def test_tokq_help_lists_every_verb(capsys):
    from tokenizers_q.trainers.cli import main

    main(["--help"])
    usage = capsys.readouterr().out.splitlines()[0]
    for verb in ("fit", "validate", "test", "predict", "encode", "decode", "sample", "inspect", "export"):
        assert verb in usage, (verb, usage)


def test_configs_saved_under_earlier_argument_names_still_load():
    import pytest

    from tokenizers_q.files import current_arguments
    from tokenizers_q.weights import KMeansConfig, NF4Config, WeightQuantConfig

    with pytest.warns(
        DeprecationWarning, match=r"a kmeans config was saved with renamed arguments \(num_iters -> kmeans_iters\)"
    ):
        config = WeightQuantConfig.from_dict({"method": "kmeans", "bits": 3, "num_iters": 7})
    assert config == KMeansConfig(3, kmeans_iters=7)
    with pytest.warns(DeprecationWarning, match="block_size -> group_size"):
        assert WeightQuantConfig.from_dict({"method": "nf4", "block_size": 32}) == NF4Config(group_size=32)
    assert current_arguments({"kmeans_iters": 3}, "x") == {"kmeans_iters": 3}  # current names: no warning
