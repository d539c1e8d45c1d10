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


def test_models_and_trainers_install_under_the_namespace():
    import tokenizers_q.models
    import tokenizers_q.trainers

    assert tokenizers_q.models.__name__ == "tokenizers_q.models"
    assert tokenizers_q.trainers.__name__ == "tokenizers_q.trainers"
