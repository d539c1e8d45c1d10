"""Compressed embedding tables searched without decompression: PQ, OPQ and residual quantization with ADC.

``fit`` learns a coarse partition (optional, IVF-style) and codebooks on a sample, ``add`` encodes database
vectors in bounded batches (from a tensor, a memory-mapped array or any iterable of batches), ``search``
ranks the database by asymmetric distances (:mod:`~tokenizers_q.embeddings.index`). With a partition,
vectors are coded relative to their list's centroid and a query scans only its ``nprobe`` nearest lists.
Optional exact re-ranking reads the original vectors of the best candidates. The quantizers themselves are
in :mod:`~tokenizers_q.embeddings.product` (PQ, OPQ) and :mod:`~tokenizers_q.embeddings.residual` (RVQ).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from tokenizers_q.checks import (
    check_choice,
    check_codebook_size,
    check_finite,
    check_float_tensor,
    check_int,
    max_magnitude,
)
from tokenizers_q.embeddings.index import CodeIndex
from tokenizers_q.embeddings.product import fit_opq, pq_decode, pq_encode
from tokenizers_q.embeddings.residual import MAX_REFINE_ENTRIES, fit_rvq, rvq_decode, rvq_encode
from tokenizers_q.files import CODEBOOK_BITS, current_arguments, read_artifact, write_artifact
from tokenizers_q.kmeans import kmeans
from tokenizers_q.packing import TokenSpec, pack_codes, unpack_codes
from tokenizers_q.search import METRICS, check_metric, nearest

METHODS = ("pq", "opq", "rvq")
FORMAT = "tokenizers_q.embedding_codec"
VERSION = 1


class EmbeddingCodec(nn.Module):
    r"""Codes for embedding vectors and search over them.

    Args:
        dim: embedding size.
        method: ``"pq"`` (product quantization: ``num_codebooks`` sub-vectors of ``dim / num_codebooks``),
            ``"opq"`` (PQ after a learned rotation), or ``"rvq"`` (residual quantization: each codebook
            codes what the previous ones left). Default: ``"pq"``.
        num_codebooks: codes per vector (M). Default: 16.
        codebook_size: entries per codebook (K), a power of two in [2, 65536]; each code takes
            ``log2(codebook_size)`` bits. Default: 256.
        metric: ``"l2"`` (squared distance, smaller is closer), ``"ip"`` (inner product, larger is closer) or
            ``"cosine"`` (vectors and queries are normalised, then compared by inner product: cosine
            similarity, larger is closer; :meth:`decode` returns unit vectors). Default: ``"l2"``.
        num_lists: coarse partition size (IVF); 1 stores no list ids and scans everything. Vectors are
            coded as residuals from their list's centroid, and the list id is part of each code
            (``ceil(log2 num_lists)`` bits). Default: 1.
        beam: RVQ encoding keeps this many best partial codes per level (1: greedy). Default: 1.
        kmeans_iters: k-means iterations per codebook. Default: 20.
        opq_iters: OPQ alternations of PQ fitting (k-means warm-started from the previous codebooks) and
            rotation update. Default: 20.
        refine_iters: RVQ alternations of beam encoding and a joint least-squares update of all codebooks
            (additive-quantizer refinement; needs ``num_codebooks * codebook_size <= 8192``, 0 to skip).
            Default: 2.
        seed: training-sample and k-means seeding. Default: 0.

    Arguments from ``codebook_size`` on are keyword-only. A code holds the list id and ``num_codebooks``
    codes, exactly packed and padded to whole bytes (:attr:`code_bytes`); RVQ under L2 also stores each
    vector's decoded squared norm as float32 (:meth:`bits_per_vector` counts it). Files saved with ``bits``
    (``codebook_size = 2^bits``) load with a ``DeprecationWarning``.

    Shapes:
        - x, queries: (N, dim) float; packed codes: (N, code_bytes) uint8
        - codebooks: (num_codebooks, codebook_size, dim / num_codebooks) (PQ, OPQ) or
          (num_codebooks, codebook_size, dim) (RVQ); centroids: (num_lists, dim); rotation: (dim, dim)
        - search output: scores (Q, k) float32 and database ids (Q, k) int64 (id -1, score +-inf where
          the probed lists hold fewer than k vectors)
    """

    def __init__(
        self,
        dim: int,
        method: str = "pq",
        num_codebooks: int = 16,
        *,
        codebook_size: int = 256,
        metric: str = "l2",
        num_lists: int = 1,
        beam: int = 1,
        kmeans_iters: int = 20,
        opq_iters: int = 20,
        refine_iters: int = 2,
        seed: int = 0,
    ):
        super().__init__()
        check_choice("method", method, METHODS)
        check_metric(metric, METRICS)
        for name, value in (("dim", dim), ("num_codebooks", num_codebooks), ("num_lists", num_lists), ("beam", beam)):
            check_int(name, value)
        check_codebook_size(codebook_size)
        for name, value in (("kmeans_iters", kmeans_iters), ("opq_iters", opq_iters), ("refine_iters", refine_iters)):
            check_int(name, value, 0)
        check_int("seed", seed, 0)
        if method == "rvq" and refine_iters and num_codebooks * codebook_size > MAX_REFINE_ENTRIES:
            raise ValueError(
                f"refine_iters needs num_codebooks * codebook_size <= {MAX_REFINE_ENTRIES} (a dense joint solve), "
                f"got {num_codebooks} x {codebook_size}: use refine_iters=0"
            )
        if method != "rvq" and dim % num_codebooks:
            raise ValueError(f"num_codebooks {num_codebooks} must divide dim {dim} for {method}")
        self.config = dict(
            dim=dim, method=method, num_codebooks=num_codebooks, codebook_size=codebook_size, metric=metric,
            num_lists=num_lists, beam=beam, kmeans_iters=kmeans_iters, opq_iters=opq_iters,
            refine_iters=refine_iters, seed=seed,
        )  # fmt: skip
        self.dim, self.method, self.metric = dim, method, metric
        self.num_codebooks, self.codebook_size = num_codebooks, codebook_size
        self.num_lists, self.beam = num_lists, beam
        sizes = ((num_lists,) if num_lists > 1 else ()) + (codebook_size,) * num_codebooks
        padding = -TokenSpec(sizes).bits_per_token % 8
        self.spec = TokenSpec(sizes + ((2**padding,) if padding else ()))  # padded to whole bytes per vector
        sub = dim if method == "rvq" else dim // num_codebooks
        self.register_buffer("centroids", torch.zeros(num_lists, dim))
        self.register_buffer("codebooks", torch.zeros(num_codebooks, codebook_size, sub))
        self.register_buffer("rotation", torch.eye(dim))
        self.register_buffer("database", torch.zeros(0, self.code_bytes, dtype=torch.uint8))
        self.register_buffer("norms", torch.zeros(0))  # RVQ under L2: |decoded|^2 per database vector
        self.register_buffer("fitted", torch.tensor(False))
        self._index: CodeIndex | None = None  # see scan_index
        self._index_key = None

    @property
    def code_bits(self) -> int:
        """Bits of one code: ``log2(codebook_size)``."""
        return self.codebook_size.bit_length() - 1

    @property
    def code_bytes(self) -> int:
        """Bytes of one vector's packed code: its list id and codes, padded to whole bytes."""
        return self.spec.bits_per_token // 8

    @property
    def stores_norms(self) -> bool:
        """Whether each database vector also stores its decoded squared norm (float32): RVQ under L2."""
        return self.method == "rvq" and self.metric == "l2"

    def bits_per_vector(self) -> int:
        """Stored bits of one database vector: its packed code (list id included, padded to whole bytes),
        plus 32 for its float32 norm where one is stored (RVQ under L2)."""
        return 8 * self.code_bytes + (32 if self.stores_norms else 0)

    def stored_bits(self) -> int:
        """Bits of the whole database this codec holds: everything :meth:`add` keeps (the packed codes with
        their list ids, and the norms of RVQ under L2), ``len(database) * bits_per_vector()``. The codec's own
        tables (codebooks, centroids, rotation) are not counted."""
        return sum(8 * t.numel() * t.element_size() for t in (self.database, self.norms))

    @property
    def _whole_bytes(self) -> bool:
        """Every code (list id included) takes exactly one byte."""
        return self.spec.bits == (8,) * self.spec.num_codebooks

    # -- fitting ---------------------------------------------------------------------------------
    @torch.no_grad()
    def fit(self, x: torch.Tensor, max_vectors: int | None = 131072) -> EmbeddingCodec:
        """Learn the partition, codebooks (and OPQ rotation) from training vectors; returns ``self``.

        Args:
            x: training vectors (N, dim); may be memory-mapped (``torch.from_numpy(np.load(path,
                mmap_mode="c"))``): only a seeded random sample of ``max_vectors`` rows is read.
            max_vectors: training sample size (None: all rows).
        """
        check_float_tensor("training vectors", x)
        if max_vectors is not None:
            check_int("max_vectors", max_vectors)
        seed = self.config["seed"]
        if max_vectors is not None and x.shape[0] > max_vectors:
            x = x[torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(seed))[:max_vectors].sort().values]
        x = self._check(x, "training vectors")
        needed = max(self.codebook_size, self.num_lists)
        if x.shape[0] < needed:
            raise ValueError(f"need at least {needed} training vectors for {needed} codes, got {x.shape[0]}")
        generator = torch.Generator(device=x.device).manual_seed(seed)
        iters = self.config["kmeans_iters"]
        if self.num_lists > 1:
            self.centroids.copy_(kmeans(x, self.num_lists, iters, generator=generator).centroids)
        residual = x - self.centroids[self._assign(x)]
        sizes = (self.num_codebooks, self.codebook_size, iters)
        if self.method == "rvq":
            self.codebooks.copy_(fit_rvq(residual, *sizes, self.config["refine_iters"], self.beam, generator))
        else:
            opq_iters = self.config["opq_iters"] if self.method == "opq" else 0
            rotation, codebooks = fit_opq(residual, *sizes, opq_iters, generator)
            self.rotation.copy_(rotation)
            self.codebooks.copy_(codebooks)
        self.fitted.fill_(True)
        return self

    def check_fitted(self) -> None:
        """Raise a ``ValueError`` unless :meth:`fit` has run (or a fitted codec was loaded)."""
        if not bool(self.fitted):
            raise ValueError("this codec is not fitted yet: call fit(training_vectors) first")

    # -- codes -----------------------------------------------------------------------------------
    def _assign(self, x: torch.Tensor) -> torch.Tensor:
        """List id (N,) of each vector: its nearest centroid."""
        if self.num_lists == 1:
            return torch.zeros(x.shape[0], dtype=torch.long, device=x.device)
        return nearest(x, self.centroids)[0]

    @torch.no_grad()
    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Packed codes (N, code_bytes) uint8 of vectors."""
        x = self._check(x, "vectors")
        self.check_fitted()
        lists = self._assign(x)
        residual = x - self.centroids[lists]
        if self.method == "rvq":
            codes = rvq_encode(residual, self.codebooks, self.beam)
        else:
            codes = pq_encode(residual @ self.rotation, self.codebooks)
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
        lists, codes = self.unpack(packed)
        if self.method == "rvq":
            return self.centroids[lists] + rvq_decode(codes, self.codebooks)
        return self.centroids[lists] + pq_decode(codes, self.codebooks) @ self.rotation.T

    def unpack(self, packed: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """List ids and codes of packed codes from this codec (list ids are 0 without a partition).

        Shapes:
            - packed: (N, code_bytes) uint8
            - output: list ids (N,), codes (N, num_codebooks), int64
        """
        expected = f"expected packed codes (N, {self.code_bytes}) uint8 from this codec"
        if not isinstance(packed, torch.Tensor) or packed.dtype != torch.uint8:
            raise TypeError(f"{expected}, got {type(packed).__name__} {getattr(packed, 'dtype', '')}")
        if packed.dim() != 2 or packed.shape[1] != self.code_bytes:
            raise ValueError(f"{expected}, got {tuple(packed.shape)}")
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
        self.check_fitted()
        check_int("batch_size", batch_size)
        if isinstance(x, torch.Tensor):
            batches = (x[start : start + batch_size] for start in range(0, x.shape[0], batch_size))
            total = math.ceil(x.shape[0] / batch_size)
        else:
            batches, total = iter(x), None
        packed, norms = [], []
        for batch in tqdm(batches, total=total, desc="encode", unit="batch", disable=not progress):
            packed.append(self.encode(batch))
            if self.stores_norms:
                norms.append(self.decode(packed[-1]).pow(2).sum(-1))
        self.database = torch.cat([self.database, *packed])
        if norms:
            self.norms = torch.cat([self.norms, *norms])

    def scan_index(self) -> CodeIndex:
        """The database as search reads it (:class:`~tokenizers_q.embeddings.index.CodeIndex`: codes grouped
        by list), kept until the database changes (grows, is replaced, or is written in place)."""
        key = (self.database.data_ptr(), self.database.shape[0], self.database._version)
        if self._index is None or self._index_key != key:
            self._index, self._index_key = CodeIndex(self), key
        return self._index

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
            scores (Q, k): squared distances (L2), inner products (IP) or cosine similarities (cosine);
            ids (Q, k) int64.
        """
        queries = self._check(queries, "queries")
        self.check_fitted()
        size = self.database.shape[0]
        if not size:
            raise ValueError("the database is empty: add(vectors) before search")
        check_int("k", k, 1, size)
        check_int("nprobe", nprobe, 1, self.num_lists)
        if rerank:
            check_int("rerank", rerank, k, size)
            if vectors is None:
                raise ValueError(f"rerank needs the original vectors ({size}, {self.dim}) in database order, got None")
            check_float_tensor("vectors", vectors)
            if tuple(vectors.shape) != (size, self.dim):
                raise ValueError(
                    f"rerank needs the original vectors ({size}, {self.dim}) in database order, "
                    f"got {tuple(vectors.shape)}"
                )
        return self.scan_index().search(queries, k, nprobe, rerank, vectors)

    def to_faiss(self):
        """An equivalent FAISS index holding this database's codes (see :mod:`tokenizers_q.embeddings.faiss_export`)."""
        from tokenizers_q.embeddings.faiss_export import to_faiss

        return to_faiss(self)

    # -- checks and files ------------------------------------------------------------------------
    def _check(self, x: torch.Tensor, what: str) -> torch.Tensor:
        """``x`` as float32 on the codec's device (unit rows under cosine), after the checks of its type,
        shape and values."""
        check_float_tensor(what, x)
        if x.dim() != 2:
            raise ValueError(f"{what} must be a float tensor (N, {self.dim}), got shape {tuple(x.shape)}")
        if x.shape[1] != self.dim:
            raise ValueError(f"{what} have dim {x.shape[1]}, this codec codes dim {self.dim}")
        check_finite(x, f"EmbeddingCodec: the {what} tensor", max_magnitude(self.dim))
        x = x.float().to(self.codebooks.device)
        return F.normalize(x, dim=-1) if self.metric == "cosine" else x

    def save(self, path: str | Path) -> Path:
        """Partition, codebooks, rotation, database codes and norms with the config, as a
        ``tokenizers_q.embedding_codec`` artifact (atomically)."""
        return write_artifact(path, FORMAT, VERSION, self.config, self.state_dict())

    @classmethod
    def load(cls, path: str | Path) -> EmbeddingCodec:
        """The codec saved by :meth:`save`, verified before it is built; files saved with ``bits`` (and the
        library's earlier argument names) load with a ``DeprecationWarning``."""
        config, state = read_artifact(path, FORMAT, VERSION)[1:]
        what = f"the embedding codec {path}"
        try:
            arguments = current_arguments(config, what, converted=CODEBOOK_BITS)
            codec = cls(**arguments)
            codec.database = torch.zeros_like(state["database"])
            codec.norms = torch.zeros_like(state["norms"])
            codec.load_state_dict(state)
        except (TypeError, KeyError, RuntimeError, ValueError) as err:
            raise ValueError(f"{path} is not a valid embedding codec: {err}") from None
        return codec
