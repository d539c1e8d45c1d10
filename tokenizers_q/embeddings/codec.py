"""Compressed embedding tables searched without decompression: PQ, OPQ and residual quantization with ADC.

``fit`` learns codebooks on a sample, ``add`` encodes database vectors in bounded
batches, ``search`` ranks the database by asymmetric distances: each query is
compared with codebook entries once (a lookup table per query), and each database
vector's distance is the sum of its codes' table entries.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from tokenizers_q.files import atomic_write, read_safetensors
from tokenizers_q.kmeans import kmeans
from tokenizers_q.packing import TokenSpec, pack_codes, unpack_codes
from tokenizers_q.search import nearest

METHODS = ("pq", "opq", "rvq")
METRICS = ("l2", "ip")
HEADER_KEY = "tokenizers_q.embeddings"


class EmbeddingCodec(nn.Module):
    r"""Codes for embedding vectors and search over them.

    Args:
        dim: embedding size.
        method: ``"pq"`` (product quantization: ``num_codebooks`` sub-vectors of ``dim / num_codebooks``),
            ``"opq"`` (PQ after a learned rotation), or ``"rvq"`` (residual quantization: each codebook
            codes what the previous ones left). Default: ``"pq"``.
        num_codebooks: codes per vector (M). Default: 16.
        bits: bits per code (``2^bits`` entries per codebook); ``num_codebooks * bits`` must be a multiple
            of 8. Default: 8 (16 bytes per vector with the defaults).
        metric: ``"l2"`` (squared distance, smaller is closer) or ``"ip"`` (inner product, larger is
            closer). Default: ``"l2"``.
        beam: RVQ encoding keeps this many best partial codes per level (1: greedy). Default: 1.
        num_iters: k-means iterations per codebook. Default: 20.
        opq_iters: OPQ alternations of PQ fitting and rotation update. Default: 8.
        seed: k-means seeding. Default: 0.

    Shapes:
        - x, queries: (N, dim) float; packed codes: (N, num_codebooks * bits / 8) uint8
        - search output: scores (Q, k) float32 and database ids (Q, k) int64
    """

    def __init__(
        self,
        dim: int,
        method: str = "pq",
        num_codebooks: int = 16,
        bits: int = 8,
        metric: str = "l2",
        beam: int = 1,
        num_iters: int = 20,
        opq_iters: int = 8,
        seed: int = 0,
    ):
        super().__init__()
        if method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {method!r}")
        if metric not in METRICS:
            raise ValueError(f"metric must be one of {METRICS}, got {metric!r}")
        for name, value in (("dim", dim), ("num_codebooks", num_codebooks), ("beam", beam)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if not isinstance(bits, int) or not 1 <= bits <= 16 or (num_codebooks * bits) % 8:
            raise ValueError(f"bits must be in [1, 16] with num_codebooks * bits a multiple of 8, got {bits!r}")
        if method != "rvq" and dim % num_codebooks:
            raise ValueError(f"num_codebooks {num_codebooks} must divide dim {dim} for {method}")
        self.config = dict(
            dim=dim, method=method, num_codebooks=num_codebooks, bits=bits, metric=metric, beam=beam,
            num_iters=num_iters, opq_iters=opq_iters, seed=seed,
        )  # fmt: skip
        self.dim, self.method, self.metric = dim, method, metric
        self.num_codebooks, self.bits, self.beam = num_codebooks, bits, beam
        sub = dim if method == "rvq" else dim // num_codebooks
        self.register_buffer("codebooks", torch.zeros(num_codebooks, 2**bits, sub))
        self.register_buffer("rotation", torch.eye(dim))
        self.register_buffer("database", torch.zeros(0, self.code_bytes, dtype=torch.uint8))
        self.register_buffer("norms", torch.zeros(0))  # RVQ under L2: |decoded|^2 per database vector
        self.register_buffer("fitted", torch.tensor(False))

    @property
    def code_bytes(self) -> int:
        return self.num_codebooks * self.bits // 8

    @property
    def bytes_per_vector(self) -> int:
        """Stored bytes per database vector: its codes, plus a float32 norm for RVQ under L2."""
        return self.code_bytes + (4 if self.method == "rvq" and self.metric == "l2" else 0)

    @property
    def spec(self) -> TokenSpec:
        return TokenSpec((2**self.bits,) * self.num_codebooks)

    # -- fitting ---------------------------------------------------------------------------------
    @torch.no_grad()
    def fit(self, x: torch.Tensor) -> EmbeddingCodec:
        """Learn the codebooks (and the OPQ rotation) from training vectors; returns ``self``."""
        x = self._check(x, "training vectors")
        if x.shape[0] < 2**self.bits:
            raise ValueError(
                f"need at least {2**self.bits} training vectors for {2**self.bits} codes, got {x.shape[0]}"
            )
        generator = torch.Generator(device=x.device).manual_seed(self.config["seed"])
        if self.method == "rvq":
            residual = x
            for m in range(self.num_codebooks):
                fit = kmeans(residual, 2**self.bits, self.config["num_iters"], generator=generator)
                self.codebooks[m] = fit.centroids
                residual = residual - fit.centroids[fit.assignments]
        else:
            rotation = torch.eye(self.dim, device=x.device)
            rounds = self.config["opq_iters"] if self.method == "opq" else 1
            for _ in range(rounds):
                rotated = x @ rotation
                self._fit_pq(rotated, generator)
                if self.method == "opq":  # orthogonal Procrustes: rotation best mapping x to its codes
                    u, _, vt = torch.linalg.svd(x.T @ self._decode_rotated(self._encode_rotated(rotated)))
                    rotation = u @ vt
            self.rotation.copy_(rotation if self.method == "opq" else torch.eye(self.dim, device=x.device))
            if self.method == "opq":  # codebooks for the final rotation
                self._fit_pq(x @ self.rotation, generator)
        self.fitted.fill_(True)
        return self

    def _fit_pq(self, rotated: torch.Tensor, generator: torch.Generator) -> None:
        subs = rotated.reshape(rotated.shape[0], self.num_codebooks, -1).transpose(0, 1).contiguous()
        self.codebooks.copy_(kmeans(subs, 2**self.bits, self.config["num_iters"], generator=generator).centroids)

    # -- codes -----------------------------------------------------------------------------------
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
    def codes(self, x: torch.Tensor) -> torch.Tensor:
        """Unpacked codes (N, num_codebooks) int64 of vectors."""
        x = self._check(x, "vectors")
        self._check_fitted()
        return self._encode_rvq(x) if self.method == "rvq" else self._encode_rotated(x @ self.rotation)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Packed codes (N, code_bytes) uint8 of vectors."""
        codes = self.codes(x)
        return pack_codes(codes, self.spec).reshape(codes.shape[0], self.code_bytes).to(x.device)

    @torch.no_grad()
    def decode(self, packed: torch.Tensor) -> torch.Tensor:
        """Vectors (N, dim) float32 of packed codes."""
        codes = self._unpack(packed)
        decoded = self._decode_rotated(codes)
        return decoded if self.method == "rvq" else decoded @ self.rotation.T

    def _unpack(self, packed: torch.Tensor) -> torch.Tensor:
        if packed.dtype != torch.uint8 or packed.dim() != 2 or packed.shape[1] != self.code_bytes:
            raise ValueError(
                f"expected packed codes (N, {self.code_bytes}) uint8 from this codec, "
                f"got {packed.dtype} {tuple(packed.shape)}"
            )
        n = packed.shape[0]
        return unpack_codes(packed.reshape(-1), self.spec, (n, self.num_codebooks)).to(packed.device)

    # -- database and search ---------------------------------------------------------------------
    def add(self, x: torch.Tensor, batch_size: int = 65536, progress: bool = False) -> None:
        """Encode database vectors in batches of ``batch_size`` (bounded memory) and append them."""
        self._check_fitted()
        starts = range(0, x.shape[0], batch_size)
        packed, norms = [], []
        for start in tqdm(starts, desc="encode", disable=not progress):
            batch = self._check(x[start : start + batch_size], "database vectors")
            packed.append(self.encode(batch))
            if self.method == "rvq" and self.metric == "l2":
                norms.append(self.decode(packed[-1]).pow(2).sum(-1))
        self.database = torch.cat([self.database, *packed])
        if norms:
            self.norms = torch.cat([self.norms, *norms])

    @torch.no_grad()
    def search(self, queries: torch.Tensor, k: int, chunk: int = 65536) -> tuple[torch.Tensor, torch.Tensor]:
        """The ``k`` best database vectors of each query by asymmetric distance (codes never decoded)."""
        queries = self._check(queries, "queries")
        size = self.database.shape[0]
        if not isinstance(k, int) or not 1 <= k <= size:
            raise ValueError(f"k must be an int in [1, {size}] (the database size), got {k!r}")
        tables = self._tables(queries)  # (Q, M, K)
        best_scores, best_ids = None, None
        for start in range(0, size, chunk):
            codes = self._unpack(self.database[start : start + chunk])  # (n, M)
            scores = sum(tables[:, m, codes[:, m]] for m in range(self.num_codebooks))  # (Q, n)
            if self.method == "rvq" and self.metric == "l2":
                scores = scores + self.norms[start : start + chunk]
            ids = torch.arange(start, start + codes.shape[0], device=queries.device).expand_as(scores)
            if best_scores is not None:
                scores, ids = torch.cat([best_scores, scores], 1), torch.cat([best_ids, ids], 1)
            top = scores.topk(min(k, scores.shape[1]), dim=1, largest=self.metric == "ip")
            best_scores, best_ids = top.values, ids.gather(1, top.indices)
        if self.metric == "l2":  # add the queries' own norms: true squared distances
            best_scores = best_scores + queries.pow(2).sum(-1, keepdim=True)
        return best_scores, best_ids

    def _tables(self, queries: torch.Tensor) -> torch.Tensor:
        """Per query and codebook, the score contribution of every entry (Q, M, K)."""
        if self.method == "rvq":  # |q - sum c|^2 = |q|^2 - 2 sum q.c + |sum c|^2 (norm stored per vector)
            dots = torch.einsum("qd,mkd->qmk", queries, self.codebooks)
            return dots if self.metric == "ip" else -2 * dots
        subs = (queries @ self.rotation).reshape(queries.shape[0], self.num_codebooks, -1)
        dots = torch.einsum("qms,mks->qmk", subs, self.codebooks)
        if self.metric == "ip":
            return dots
        return self.codebooks.pow(2).sum(-1)[None] - 2 * dots  # |q_m|^2 added once at the end

    def to_faiss(self):
        """An equivalent FAISS index holding this database's codes (``IndexPQ``; OPQ inside an
        ``IndexPreTransform``), to serve the same codes with FAISS (needs ``faiss-cpu``)."""
        import faiss

        self._check_fitted()
        if self.method == "rvq":
            raise ValueError("FAISS export covers PQ and OPQ codecs; this one is rvq")
        metric = faiss.METRIC_L2 if self.metric == "l2" else faiss.METRIC_INNER_PRODUCT
        index = faiss.IndexPQ(self.dim, self.num_codebooks, self.bits, metric)
        faiss.copy_array_to_vector(self.codebooks.detach().cpu().float().numpy().ravel(), index.pq.centroids)
        index.is_trained = True
        faiss.copy_array_to_vector(self.database.cpu().numpy().ravel(), index.codes)
        index.ntotal = self.database.shape[0]
        if self.method == "pq":
            return index
        transform = faiss.LinearTransform(self.dim, self.dim, False)
        faiss.copy_array_to_vector(self.rotation.T.contiguous().cpu().numpy().ravel(), transform.A)
        transform.is_trained = True
        wrapped = faiss.IndexPreTransform(transform, index)
        transform.this.disown()  # the wrapper owns and frees both parts
        index.this.disown()
        wrapped.own_fields = True
        return wrapped

    # -- checks and files ------------------------------------------------------------------------
    def _check(self, x: torch.Tensor, what: str) -> torch.Tensor:
        if not isinstance(x, torch.Tensor) or not x.dtype.is_floating_point or x.dim() != 2:
            raise ValueError(f"{what} must be a float tensor (N, {self.dim}), got {getattr(x, 'shape', x)!r}")
        if x.shape[1] != self.dim:
            raise ValueError(f"{what} have dim {x.shape[1]}, this codec codes dim {self.dim}")
        return x.float().to(self.codebooks.device)

    def _check_fitted(self) -> None:
        if not bool(self.fitted):
            raise ValueError("this codec is not fitted yet: call fit(training_vectors) first")

    def save(self, path: str | Path) -> Path:
        """Codebooks, rotation, database codes and norms with the config, to a safetensors file (atomically)."""
        from safetensors.torch import save_file

        tensors = {k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()}
        header = json.dumps(self.config)
        return atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata={HEADER_KEY: header}))

    @classmethod
    def load(cls, path: str | Path) -> EmbeddingCodec:
        """The codec saved by :meth:`save`."""
        config, state = read_safetensors(path, HEADER_KEY, "embedding codec")
        codec = cls(**config)
        codec.database = torch.zeros_like(state["database"])
        codec.norms = torch.zeros_like(state["norms"])
        codec.load_state_dict(state)
        return codec
