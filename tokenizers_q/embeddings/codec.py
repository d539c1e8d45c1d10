"""Compressed embedding tables searched without decompression: PQ, OPQ and residual quantization with ADC.

``fit`` learns a coarse partition (optional, IVF-style) and codebooks on a sample,
``add`` encodes database vectors in bounded batches (from a tensor, a memory-mapped
array or any iterable of batches), ``search`` ranks the database by asymmetric
distances: each query is compared with codebook entries once (a lookup table per
query), and each database vector's score is the sum of its codes' table entries,
summed by ``embedding_bag`` over many queries at once. With a partition, vectors are
coded relative to their list's centroid and a query scans only its ``nprobe``
nearest lists. Optional exact re-ranking reads the original vectors of the best
candidates.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from tokenizers_q.checks import check_finite, max_magnitude
from tokenizers_q.files import current_arguments, read_artifact, write_artifact
from tokenizers_q.kmeans import kmeans
from tokenizers_q.packing import TokenSpec, pack_codes, unpack_codes
from tokenizers_q.search import nearest, top_rows

METHODS = ("pq", "opq", "rvq")
METRICS = ("l2", "ip")
FORMAT = "tokenizers_q.embedding_codec"
VERSION = 1
SCORE_BUDGET = 2**24  # most (database row, query) scores held at once: 64 MiB of float32
MAX_REFINE_ENTRIES = 8192  # RVQ refinement solves a dense (M * K)^2 system in float64: 512 MiB at most
OPQ_KMEANS_ITERS = 4  # k-means iterations per OPQ alternation after the first, warm-started
QUERY_BLOCK = 1024  # queries scored together: their lookup tables are one embedding_bag weight


class EmbeddingCodec(nn.Module):
    r"""Codes for embedding vectors and search over them.

    Args:
        dim: embedding size.
        method: ``"pq"`` (product quantization: ``num_codebooks`` sub-vectors of ``dim / num_codebooks``),
            ``"opq"`` (PQ after a learned rotation), or ``"rvq"`` (residual quantization: each codebook
            codes what the previous ones left). Default: ``"pq"``.
        num_codebooks: codes per vector (M). Default: 16.
        bits: bits per code (``2^bits`` entries per codebook). Default: 8.
        metric: ``"l2"`` (squared distance, smaller is closer) or ``"ip"`` (inner product, larger is
            closer). Default: ``"l2"``.
        num_lists: coarse partition size (IVF); 1 stores no list ids and scans everything. Vectors are
            coded as residuals from their list's centroid, and the list id is part of each code
            (``ceil(log2 num_lists)`` bits). Default: 1.
        beam: RVQ encoding keeps this many best partial codes per level (1: greedy). Default: 1.
        kmeans_iters: k-means iterations per codebook. Default: 20.
        opq_iters: OPQ alternations of PQ fitting (k-means warm-started from the previous codebooks) and
            rotation update. Default: 20.
        refine_iters: RVQ alternations of beam encoding and a joint least-squares update of all codebooks
            (additive-quantizer refinement; needs ``num_codebooks * 2^bits <= 8192``, 0 to skip). Default: 2.
        seed: training-sample and k-means seeding. Default: 0.

    A code holds the list id and ``num_codebooks`` codes of ``bits`` bits, exactly packed and
    padded to whole bytes (:attr:`code_bytes`); RVQ under L2 also stores each vector's decoded
    squared norm as float32 (:attr:`bytes_per_vector` counts it).

    Shapes:
        - x, queries: (N, dim) float; packed codes: (N, code_bytes) uint8
        - search output: scores (Q, k) float32 and database ids (Q, k) int64 (id -1, score +-inf where
          the probed lists hold fewer than k vectors)
    """

    def __init__(
        self,
        dim: int,
        method: str = "pq",
        num_codebooks: int = 16,
        bits: int = 8,
        metric: str = "l2",
        num_lists: int = 1,
        beam: int = 1,
        kmeans_iters: int = 20,
        opq_iters: int = 20,
        refine_iters: int = 2,
        seed: int = 0,
    ):
        super().__init__()
        if method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {method!r}")
        if metric not in METRICS:
            raise ValueError(f"metric must be one of {METRICS}, got {metric!r}")
        for name, value in (("dim", dim), ("num_codebooks", num_codebooks), ("num_lists", num_lists), ("beam", beam)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if not isinstance(bits, int) or not 1 <= bits <= 16:
            raise ValueError(f"bits must be an int in [1, 16], got {bits!r}")
        if method == "rvq" and refine_iters and num_codebooks * 2**bits > MAX_REFINE_ENTRIES:
            raise ValueError(
                f"refine_iters needs num_codebooks * 2^bits <= {MAX_REFINE_ENTRIES} (a dense joint solve), got "
                f"{num_codebooks} x {2**bits}: use refine_iters=0"
            )
        if method != "rvq" and dim % num_codebooks:
            raise ValueError(f"num_codebooks {num_codebooks} must divide dim {dim} for {method}")
        self.config = dict(
            dim=dim, method=method, num_codebooks=num_codebooks, bits=bits, metric=metric, num_lists=num_lists,
            beam=beam, kmeans_iters=kmeans_iters, opq_iters=opq_iters, refine_iters=refine_iters, seed=seed,
        )  # fmt: skip
        self.dim, self.method, self.metric = dim, method, metric
        self.num_codebooks, self.bits, self.num_lists, self.beam = num_codebooks, bits, num_lists, beam
        sizes = ((num_lists,) if num_lists > 1 else ()) + (2**bits,) * num_codebooks
        padding = -TokenSpec(sizes).bits_per_token % 8
        self.spec = TokenSpec(sizes + ((2**padding,) if padding else ()))  # padded to whole bytes per vector
        sub = dim if method == "rvq" else dim // num_codebooks
        self.register_buffer("centroids", torch.zeros(num_lists, dim))
        self.register_buffer("codebooks", torch.zeros(num_codebooks, 2**bits, sub))
        self.register_buffer("rotation", torch.eye(dim))
        self.register_buffer("database", torch.zeros(0, self.code_bytes, dtype=torch.uint8))
        self.register_buffer("norms", torch.zeros(0))  # RVQ under L2: |decoded|^2 per database vector
        self.register_buffer("fitted", torch.tensor(False))
        self._search_cache = {}  # see _cached

    @property
    def code_bytes(self) -> int:
        return self.spec.bits_per_token // 8

    @property
    def bytes_per_vector(self) -> int:
        """Stored bytes per database vector: its code, plus a float32 norm for RVQ under L2."""
        return self.code_bytes + (4 if self._stores_norms else 0)

    @property
    def _whole_bytes(self) -> bool:
        """Every code (list id included) takes exactly one byte."""
        return self.spec.bits == (8,) * self.spec.num_codebooks

    @property
    def _stores_norms(self) -> bool:
        return self.method == "rvq" and self.metric == "l2"

    # -- fitting ---------------------------------------------------------------------------------
    @torch.no_grad()
    def fit(self, x: torch.Tensor, max_vectors: int | None = 131072) -> EmbeddingCodec:
        """Learn the partition, codebooks (and OPQ rotation) from training vectors; returns ``self``.

        Args:
            x: training vectors (N, dim); may be memory-mapped (``torch.from_numpy(np.load(path,
                mmap_mode="c"))``): only a seeded random sample of ``max_vectors`` rows is read.
            max_vectors: training sample size (None: all rows).
        """
        if not isinstance(x, torch.Tensor):
            raise ValueError(f"training vectors must be a float tensor (N, {self.dim}), got {type(x).__name__}")
        generator = torch.Generator().manual_seed(self.config["seed"])
        if max_vectors is not None and x.shape[0] > max_vectors:
            x = x[torch.randperm(x.shape[0], generator=generator)[:max_vectors].sort().values]
        x = self._check(x, "training vectors")
        needed = max(2**self.bits, self.num_lists)
        if x.shape[0] < needed:
            raise ValueError(f"need at least {needed} training vectors for {needed} codes, got {x.shape[0]}")
        generator = torch.Generator(device=x.device).manual_seed(self.config["seed"])
        if self.num_lists > 1:
            self.centroids.copy_(kmeans(x, self.num_lists, self.config["kmeans_iters"], generator=generator).centroids)
        residual = x - self.centroids[self._assign(x)]
        if self.method == "rvq":
            for m in range(self.num_codebooks):
                fit = kmeans(residual, 2**self.bits, self.config["kmeans_iters"], generator=generator)
                self.codebooks[m] = fit.centroids
                residual = residual - fit.centroids[fit.assignments]
            targets = x - self.centroids[self._assign(x)]
            for _ in range(self.config["refine_iters"]):
                self._refine_codebooks(targets, self._encode_rvq(targets))
        else:
            rotation = torch.eye(self.dim, device=x.device)
            for step in range(self.config["opq_iters"] if self.method == "opq" else 0):
                rotated = residual @ rotation
                iters = OPQ_KMEANS_ITERS if step else self.config["kmeans_iters"]
                self._fit_pq(rotated, generator, iters, warm=step > 0)
                # orthogonal Procrustes: the rotation best mapping the residuals to their codes
                u, _, vt = torch.linalg.svd(residual.T @ self._decode_rotated(self._encode_rotated(rotated)))
                rotation = u @ vt
            self.rotation.copy_(rotation)
            self._fit_pq(residual @ self.rotation, generator, self.config["kmeans_iters"], warm=self.method == "opq")
        self.fitted.fill_(True)
        return self

    def _fit_pq(self, rotated: torch.Tensor, generator: torch.Generator, kmeans_iters: int, warm: bool) -> None:
        """k-means of every sub-vector; ``warm`` continues from the current codebooks."""
        subs = rotated.reshape(rotated.shape[0], self.num_codebooks, -1).transpose(0, 1).contiguous()
        init = self.codebooks if warm else "kmeans++"
        self.codebooks.copy_(kmeans(subs, 2**self.bits, kmeans_iters, init=init, generator=generator).centroids)

    def _refine_codebooks(self, x: torch.Tensor, codes: torch.Tensor) -> None:
        """All RVQ codebooks at once, the least-squares fit of ``x`` by the sum of its codes' entries:
        (B^T B + l I) C = B^T x + l C_old with B the one-hot code matrix; entries no vector uses keep
        their value (the ridge ``l`` pulls towards the current codebooks)."""
        size, width = 2**self.bits, self.num_codebooks * 2**self.bits
        flat = codes + torch.arange(self.num_codebooks, device=codes.device) * size  # (N, M) rows of B^T B
        gram = torch.zeros(width * width, dtype=torch.float64, device=x.device)
        rhs = torch.zeros(width, self.dim, dtype=torch.float64, device=x.device)
        for start in range(0, len(x), 8192):
            rows = flat[start : start + 8192]
            gram += torch.bincount((rows[:, :, None] * width + rows[:, None, :]).flatten(), minlength=width * width)
            for m in range(self.num_codebooks):
                rhs.index_add_(0, rows[:, m], x[start : start + 8192].double())
        gram = gram.view(width, width)
        ridge = 1e-3 * gram.diagonal().mean()
        old = self.codebooks.reshape(width, self.dim).double()
        factor = torch.linalg.cholesky(gram + ridge * torch.eye(width, dtype=torch.float64, device=x.device))
        solved = torch.cholesky_solve(rhs + ridge * old, factor)
        self.codebooks.copy_(solved.reshape(self.codebooks.shape).float())

    # -- codes -----------------------------------------------------------------------------------
    def _assign(self, x: torch.Tensor) -> torch.Tensor:
        """List id (N,) of each vector: its nearest centroid."""
        if self.num_lists == 1:
            return torch.zeros(x.shape[0], dtype=torch.long, device=x.device)
        return nearest(x, self.centroids)[0]

    def _encode_rotated(self, rotated: torch.Tensor) -> torch.Tensor:
        subs = rotated.reshape(rotated.shape[0], self.num_codebooks, -1).transpose(0, 1).contiguous()
        return nearest(subs, self.codebooks)[0].T  # (N, M)

    def _decode_rotated(self, codes: torch.Tensor) -> torch.Tensor:
        parts = [self.codebooks[m][codes[:, m]] for m in range(self.num_codebooks)]
        return torch.cat(parts, -1) if self.method != "rvq" else torch.stack(parts).sum(0)

    def _encode_rvq(self, x: torch.Tensor) -> torch.Tensor:
        """Beam search over residual levels: keep the ``beam`` best partial codes per vector."""
        n = x.shape[0]
        codes = torch.zeros(n, 1, 0, dtype=torch.long, device=x.device)
        residual = x[:, None]
        for m in range(self.num_codebooks):
            book = self.codebooks[m]  # (K, D)
            # |r - c|^2 = |r|^2 - 2 r.c + |c|^2 for every candidate, per vector and beam entry
            cand = residual.pow(2).sum(-1, keepdim=True) - 2 * residual @ book.T + book.pow(2).sum(-1)
            width = min(self.beam, cand.shape[1] * cand.shape[2])
            flat = cand.reshape(n, -1).topk(width, largest=False).indices
            parent, entry = flat // book.shape[0], flat % book.shape[0]
            codes = torch.cat([codes.gather(1, parent[..., None].expand(-1, -1, m)), entry[..., None]], -1)
            residual = residual.gather(1, parent[..., None].expand(-1, -1, self.dim)) - book[entry]
        return codes[:, 0]

    @torch.no_grad()
    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Packed codes (N, code_bytes) uint8 of vectors."""
        x = self._check(x, "vectors")
        self._check_fitted()
        lists = self._assign(x)
        residual = x - self.centroids[lists]
        codes = self._encode_rvq(residual) if self.method == "rvq" else self._encode_rotated(residual @ self.rotation)
        columns = ([lists[:, None]] if self.num_lists > 1 else []) + [codes]
        padding = self.spec.num_codebooks - sum(c.shape[1] for c in columns)
        columns.append(codes.new_zeros(codes.shape[0], padding))
        tokens = torch.cat(columns, 1)
        if self._whole_bytes:  # every code is one byte: the packed form is the codes themselves
            return tokens.to(torch.uint8)
        return pack_codes(tokens, self.spec).reshape(x.shape[0], self.code_bytes).to(x.device)

    @torch.no_grad()
    def decode(self, packed: torch.Tensor) -> torch.Tensor:
        """Vectors (N, dim) float32 of packed codes."""
        lists, codes = self._unpack(packed)
        decoded = self._decode_rotated(codes)
        return self.centroids[lists] + (decoded if self.method == "rvq" else decoded @ self.rotation.T)

    def _unpack(self, packed: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """List ids (N,) and codes (N, num_codebooks) of packed codes."""
        if not isinstance(packed, torch.Tensor) or packed.dtype != torch.uint8 or packed.dim() != 2:
            raise ValueError(f"expected packed codes (N, {self.code_bytes}) uint8 from this codec, got {packed!r}")
        if packed.shape[1] != self.code_bytes:
            raise ValueError(
                f"expected packed codes (N, {self.code_bytes}) uint8 from this codec, got {tuple(packed.shape)}"
            )
        n = packed.shape[0]
        if self._whole_bytes:
            tokens = packed.long()
        else:
            tokens = unpack_codes(packed.reshape(-1), self.spec, (n, self.spec.num_codebooks), torch.long)
        first = 1 if self.num_lists > 1 else 0
        lists = tokens[:, 0] if first else torch.zeros(n, dtype=torch.long, device=packed.device)
        return lists, tokens[:, first : first + self.num_codebooks]

    # -- database --------------------------------------------------------------------------------
    @torch.no_grad()
    def add(self, x: torch.Tensor | Iterable[torch.Tensor], batch_size: int = 65536, progress: bool = False) -> None:
        """Encode database vectors in batches and append them; ids continue from the current size.

        Args:
            x: vectors (N, dim) (may be memory-mapped: only ``batch_size`` rows are read at a time),
                or any iterable of (n, dim) batches (a data loader, a generator over files).
            batch_size: rows encoded at once when ``x`` is a tensor; bounds the working memory.
            progress: show a progress bar.
        """
        self._check_fitted()
        if isinstance(x, torch.Tensor):
            batches = (x[start : start + batch_size] for start in range(0, x.shape[0], batch_size))
            total = math.ceil(x.shape[0] / batch_size)
        else:
            batches, total = iter(x), None
        packed, norms = [], []
        for batch in tqdm(batches, total=total, desc="encode", unit="batch", disable=not progress):
            packed.append(self.encode(batch))
            if self._stores_norms:
                norms.append(self.decode(packed[-1]).pow(2).sum(-1))
        self.database = torch.cat([self.database, *packed])
        if norms:
            self.norms = torch.cat([self.norms, *norms])

    def _cached(self, name: str, build):
        """``build()``, kept until the database changes (grows, is replaced, or is written in place)."""
        key = (self.database.data_ptr(), self.database.shape[0], self.database._version)
        if self._search_cache.get("key") != key:
            self._search_cache = {"key": key}
        if name not in self._search_cache:
            self._search_cache[name] = build()
        return self._search_cache[name]

    def _scan(self) -> tuple[torch.Tensor | None, torch.Tensor, torch.Tensor]:
        """How search reads the database (cached).

        Returns:
            order: database row of each scan position (None: storage order, without a partition).
            bounds: (num_lists + 1,) each list's first scan position, and the end.
            codes: (N, num_codebooks) uint8 (int32 above 8 bits) in scan order; without a partition and
                with 8-bit codes it is the database itself, otherwise one more copy of the codes.
        """

        def build():
            lists, codes = self._unpack(self.database)
            order = None if self.num_lists == 1 else lists.argsort(stable=True)
            bounds = F.pad(torch.bincount(lists, minlength=self.num_lists).cumsum(0), (1, 0))
            if self.num_lists == 1 and self._whole_bytes:
                codes = self.database
            elif order is not None:
                codes = codes[order]
            return order, bounds, codes.to(torch.uint8 if self.bits <= 8 else torch.int32)

        return self._cached("scan", build)

    def _terms(self) -> torch.Tensor | None:
        """(N,) float32 in scan order, each vector's query-independent score under L2 (cached): RVQ its
        stored norm; PQ/OPQ 2 (centroid R).e + |e|^2 of its coded rotated residual e, so that
        |q - centroid - e R^T|^2 = |q|^2 - 2 q.centroid + |centroid|^2 - 2 (q R).e + this. None under IP."""
        if self.metric == "ip":
            return None
        order, bounds, codes = self._scan()
        if self._stores_norms:
            return self.norms if order is None else self._cached("terms", lambda: self.norms[order])

        def build():
            lists = torch.repeat_interleave(torch.arange(self.num_lists, device=codes.device), bounds.diff())
            terms = codes.new_zeros(len(codes), dtype=torch.float32)
            for start in range(0, len(codes), 65536):  # bounded memory: decode a chunk at a time
                residual = self._decode_rotated(codes[start : start + 65536].long())
                centroids = self.centroids[lists[start : start + 65536]] @ self.rotation
                terms[start : start + 65536] = 2 * (centroids * residual).sum(-1) + residual.pow(2).sum(-1)
            return terms

        return self._cached("terms", build)

    # -- search ----------------------------------------------------------------------------------
    @torch.no_grad()
    def search(
        self,
        queries: torch.Tensor,
        k: int,
        nprobe: int = 1,
        rerank: int = 0,
        vectors: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The ``k`` best database vectors of each query by asymmetric distance (codes never decoded).

        Args:
            queries: (Q, dim) float.
            k: neighbours per query, at most the database size.
            nprobe: lists scanned per query (with a partition); ``num_lists`` scans everything.
            rerank: if > 0, rank this many ADC candidates by their exact distance to the original
                ``vectors`` (database order; may be memory-mapped: only candidate rows are read).
            vectors: the original database vectors, for ``rerank``.

        Returns:
            scores (Q, k): squared distances (L2) or inner products (IP); ids (Q, k) int64.
        """
        queries = self._check(queries, "queries")
        self._check_fitted()
        size = self.database.shape[0]
        if not size:
            raise ValueError("the database is empty: add(vectors) before search")
        if not isinstance(k, int) or not 1 <= k <= size:
            raise ValueError(f"k must be an int in [1, {size}] (the database size), got {k!r}")
        if not isinstance(nprobe, int) or not 1 <= nprobe <= self.num_lists:
            raise ValueError(f"nprobe must be an int in [1, {self.num_lists}] (num_lists), got {nprobe!r}")
        if rerank:
            if not isinstance(rerank, int) or not k <= rerank <= size:
                raise ValueError(
                    f"rerank must be 0 or an int in [{k}, {size}] (k to the database size), got {rerank!r}"
                )
            if not isinstance(vectors, torch.Tensor) or tuple(vectors.shape) != (size, self.dim):
                raise ValueError(
                    f"rerank needs the original vectors ({size}, {self.dim}) in database order, "
                    f"got {getattr(vectors, 'shape', vectors)!r}"
                )
        blocks = [
            self._adc(queries[s : s + QUERY_BLOCK], rerank or k, nprobe) for s in range(0, len(queries), QUERY_BLOCK)
        ]
        scores, ids = torch.cat([b[0] for b in blocks]), torch.cat([b[1] for b in blocks])
        if rerank:
            scores, ids = self._rerank(queries, ids, vectors, k)
        return scores, ids

    def _adc(self, queries: torch.Tensor, k: int, nprobe: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Scores and ids (Q, k) of the best vectors in each query's ``nprobe`` nearest lists. Lists at
        least as long as a codebook are scanned once for all their queries (their lookup tables become
        one ``embedding_bag`` weight); shorter lists are gathered per (query, list) candidate."""
        ip = self.metric == "ip"
        # per (query, list): -2 q.centroid + |centroid|^2 (L2; |q|^2 is added at the end) or q.centroid (IP);
        # the per-vector terms hold the rest of |q - centroid - e|^2 that does not depend on q
        dots = queries @ self.centroids.T  # (Q, num_lists)
        shift = dots if ip else -2 * dots + self.centroids.pow(2).sum(-1)
        probe = shift.topk(nprobe, dim=1, largest=ip).indices  # (Q, nprobe)
        if self._stores_norms:  # RVQ: the stored norm already holds |centroid|^2
            shift = -2 * dots
        tables = self._query_tables(queries).reshape(len(queries), -1)  # (Q, M * K)
        on_long_list = (self._scan()[1].diff() >= 2**self.bits)[probe]  # (Q, nprobe)
        found = []
        if on_long_list.any():
            found.append(self._scan_long_lists(tables, shift, probe, on_long_list, k))
        if not on_long_list.all():
            found.append(self._scan_short_lists(tables, shift, probe, ~on_long_list, k))
        scores, ids = torch.cat([f[0] for f in found], 1), torch.cat([f[1] for f in found], 1)
        top = scores.topk(k, dim=1, largest=ip)
        scores, ids = top.values, ids.gather(1, top.indices)
        if not ip:  # add the queries' own norms: true squared distances
            scores = scores + queries.pow(2).sum(-1, keepdim=True)
        return scores, ids

    def _scan_long_lists(self, tables, shift, probe, selected, k):
        """Per list, all its probing queries at once: scores (Q, nprobe * k), ids (unfilled: -1)."""
        ip, num, nprobe = self.metric == "ip", len(tables), probe.shape[1]
        order, bounds, codes = self._scan()
        terms = self._terms() if self._stores_norms else None  # PQ/OPQ terms are folded into the tables
        offsets = torch.arange(self.num_codebooks, device=tables.device) * 2**self.bits
        best = tables.new_full((num, nprobe * k), -math.inf if ip else math.inf)
        best_ids = torch.full((num, nprobe * k), -1, dtype=torch.long, device=tables.device)
        # (query, slot) pairs grouped by list: each list is scanned once for all the queries probing it
        pairs, position = (probe * nprobe + torch.arange(nprobe, device=probe.device))[selected].sort()
        position = selected.flatten().nonzero()[:, 0][position]
        lists, counts = torch.unique_consecutive(pairs // nprobe, return_counts=True)
        list_tables = self._list_tables(lists) if not ip and not self._stores_norms else None
        found = []
        for i, (lst, qi, slot) in enumerate(
            zip(lists.tolist(), position.split(counts.tolist()), pairs.split(counts.tolist()))
        ):
            lo, hi = int(bounds[lst]), int(bounds[lst + 1])
            qi, slot = qi // nprobe, slot % nprobe
            weight = tables[qi]  # (q, M * K)
            if list_tables is not None:  # plus the list's query-independent term, summed alike
                weight = weight + list_tables[i]
            weight = weight.T.contiguous()  # (M * K, q): a bag column per query
            tops, top_ids = [], []
            step = max(1, SCORE_BUDGET // len(qi))
            for start in range(lo, hi, step):
                stop = min(start + step, hi)
                scores = F.embedding_bag(codes[start:stop].long() + offsets, weight, mode="sum")  # (n, q)
                if terms is not None:
                    scores = scores + terms[start:stop, None]
                values, picked = top_rows(scores, k, largest=ip)
                tops.append(values)
                top_ids.append(picked + start)
            if len(tops) > 1:
                values, picked = top_rows(torch.cat(tops), k, largest=ip)
                tops, top_ids = [values], [torch.cat(top_ids).gather(0, picked)]
            columns = (slot * k)[:, None] + torch.arange(tops[0].shape[0], device=tables.device)
            found.append((qi[:, None].expand_as(columns), columns, tops[0].T + shift[qi, lst][:, None], top_ids[0].T))
        if found:
            where = tuple(torch.cat([f[i].flatten() for f in found]) for i in (0, 1))
            best[where] = torch.cat([f[2].flatten() for f in found])
            best_ids[where] = self._rows(torch.cat([f[3].flatten() for f in found]))
        return best, best_ids

    def _scan_short_lists(self, tables, shift, probe, selected, k):
        """Per (query, list) pair, each candidate's codes gathered and summed: scores, ids (Q, k)."""
        ip, num, width = self.metric == "ip", len(tables), tables.shape[1]
        _, bounds, scan_codes = self._scan()
        terms = self._terms()
        offsets = torch.arange(self.num_codebooks, device=tables.device, dtype=torch.int32) * 2**self.bits
        codes = self._cached("short_codes", lambda: scan_codes.int() + offsets)  # table rows, int32
        best = tables.new_full((num, k), -math.inf if ip else math.inf)
        best_ids = torch.full((num, k), -1, dtype=torch.long, device=tables.device)
        query, slot = selected.nonzero(as_tuple=True)  # pairs in query order
        lists = probe[query, slot]
        lengths = bounds.diff()[lists]
        per_query = torch.zeros(num, dtype=torch.long, device=tables.device).index_add_(0, query, lengths)
        ends = per_query.cumsum(0)
        # blocks of queries holding about SCORE_BUDGET gathered codes each (a block has at least one query)
        per_block = max(1, SCORE_BUDGET // self.num_codebooks)
        marks = torch.arange(1, int(ends[-1]) // per_block + 1, device=ends.device) * per_block
        cuts = torch.cat([ends.new_tensor([0, num]), torch.searchsorted(ends, marks, right=True)]).unique().tolist()
        for qa, qb in zip(cuts[:-1], cuts[1:]):
            in_block = (query >= qa) & (query < qb)
            b_query, b_lists, b_lengths = query[in_block] - qa, lists[in_block], lengths[in_block]
            total = int(b_lengths.sum())
            if total == 0:
                continue
            pair_of = torch.repeat_interleave(torch.arange(len(b_lists), device=tables.device), b_lengths)
            position = (
                torch.arange(total, device=tables.device)
                + (bounds[b_lists] - (b_lengths.cumsum(0) - b_lengths))[pair_of]
            )
            cand_query = b_query[pair_of]
            index = codes[position]
            index += (cand_query.int() * width)[:, None]
            scores = F.embedding_bag(index, tables[qa:qb].reshape(-1, 1), mode="sum")[:, 0]
            scores += shift[b_query + qa, b_lists][pair_of]
            if terms is not None:
                scores += terms[position]
            counts = per_query[qa:qb]
            starts = counts.cumsum(0) - counts
            dense = scores.new_full((qb - qa, int(counts.max())), -math.inf if ip else math.inf)
            dense.view(-1)[
                torch.arange(total, device=tables.device) + (cand_query * dense.shape[1] - starts[cand_query])
            ] = scores
            top = dense.topk(min(k, dense.shape[1]), dim=1, largest=ip)
            valid = top.indices < counts[:, None]
            picked = position[(top.indices + starts[:, None]).clamp(max=total - 1)]
            best[qa:qb, : top.values.shape[1]] = top.values
            best_ids[qa:qb, : top.values.shape[1]] = torch.where(valid, self._rows(picked), -1)
        return best, best_ids

    def _rows(self, positions: torch.Tensor) -> torch.Tensor:
        """Database row ids of scan positions."""
        order = self._scan()[0]
        return positions if order is None else order[positions]

    def _query_tables(self, queries: torch.Tensor) -> torch.Tensor:
        """Per query and codebook, the query-dependent score of every entry (Q, M, K): q.c (IP) or
        -2 q.c (L2), with sub-vectors of the rotated query for PQ/OPQ."""
        if self.method == "rvq":
            dots = torch.einsum("qd,mkd->qmk", queries, self.codebooks)
        else:
            subs = (queries @ self.rotation).reshape(queries.shape[0], self.num_codebooks, -1)
            dots = torch.einsum("qms,mks->qmk", subs, self.codebooks)
        return dots if self.metric == "ip" else -2 * dots

    def _list_tables(self, lists: torch.Tensor) -> torch.Tensor:
        """PQ/OPQ under L2, the query-independent score of every entry within each of ``lists``
        (len(lists), M * K): |c|^2 + 2 (centroid R)_m . c, so that |q - centroid - c R^T|^2 =
        |q|^2 - 2 q.centroid + |centroid|^2 + sum over codebooks of (this table - 2 (q R)_m . c)."""
        subs = (self.centroids[lists] @ self.rotation).reshape(len(lists), self.num_codebooks, -1)
        tables = self.codebooks.pow(2).sum(-1) + 2 * torch.einsum("lms,mks->lmk", subs, self.codebooks)
        return tables.reshape(len(lists), -1)

    def _rerank(self, queries, ids, vectors, k):
        """Exact scores of the candidates ``ids`` (Q, R) against their original vectors; the best k."""
        scores, best = [], []
        step = max(1, SCORE_BUDGET // (ids.shape[1] * self.dim))  # queries per chunk of gathered vectors
        for start in range(0, len(ids), step):
            chunk, query = ids[start : start + step], queries[start : start + step]
            found = vectors[chunk.clamp(min=0).flatten()].to(query).reshape(*chunk.shape, self.dim)
            exact = torch.bmm(found, query[:, :, None])[..., 0]  # q.x (Q, R)
            if self.metric == "l2":
                exact = found.pow(2).sum(-1) - 2 * exact + query.pow(2).sum(-1, keepdim=True)
            exact = exact.masked_fill(chunk < 0, -math.inf if self.metric == "ip" else math.inf)
            top = exact.topk(k, dim=1, largest=self.metric == "ip")
            scores.append(top.values)
            best.append(chunk.gather(1, top.indices))
        return torch.cat(scores), torch.cat(best)

    def to_faiss(self):
        """An equivalent FAISS index holding this database's codes (see :mod:`tokenizers_q.embeddings.faiss_export`)."""
        from tokenizers_q.embeddings.faiss_export import to_faiss

        return to_faiss(self)

    # -- checks and files ------------------------------------------------------------------------
    def _check(self, x: torch.Tensor, what: str) -> torch.Tensor:
        if not isinstance(x, torch.Tensor) or not x.dtype.is_floating_point or x.dim() != 2:
            raise ValueError(f"{what} must be a float tensor (N, {self.dim}), got {getattr(x, 'shape', x)!r}")
        if x.shape[1] != self.dim:
            raise ValueError(f"{what} have dim {x.shape[1]}, this codec codes dim {self.dim}")
        check_finite(x, f"EmbeddingCodec: the {what} tensor", max_magnitude(self.dim))
        return x.float().to(self.codebooks.device)

    def _check_fitted(self) -> None:
        if not bool(self.fitted):
            raise ValueError("this codec is not fitted yet: call fit(training_vectors) first")

    def save(self, path: str | Path) -> Path:
        """Partition, codebooks, rotation, database codes and norms with the config, as a
        ``tokenizers_q.embedding_codec`` artifact (atomically)."""
        return write_artifact(path, FORMAT, VERSION, self.config, self.state_dict())

    @classmethod
    def load(cls, path: str | Path) -> EmbeddingCodec:
        """The codec saved by :meth:`save`, verified before it is built."""
        config, state = read_artifact(path, FORMAT, VERSION)[1:]
        try:
            codec = cls(**current_arguments(config, f"the embedding codec {path}"))
            codec.database = torch.zeros_like(state["database"])
            codec.norms = torch.zeros_like(state["norms"])
            codec.load_state_dict(state)
        except (TypeError, KeyError, RuntimeError, ValueError) as err:
            raise ValueError(f"{path} is not a valid embedding codec: {err}") from None
        return codec
