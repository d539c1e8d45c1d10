"""Export of an :class:`~tokenizers_q.embeddings.codec.EmbeddingCodec` to an equivalent FAISS index.

Needs ``faiss-cpu``; the index holds the codec's codebooks, centroids and packed codes. A cosine codec
exports an inner-product index over its unit vectors: normalise the queries given to FAISS
(``faiss.normalize_L2``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from tokenizers_q.packing import TokenSpec, pack_codes

if TYPE_CHECKING:
    from tokenizers_q.embeddings.codec import EmbeddingCodec


def to_faiss(codec: EmbeddingCodec):
    """An equivalent FAISS index holding this database's codes, to serve the same codes with FAISS
    (needs ``faiss-cpu``): ``IndexPQ``, or ``IndexIVFPQ`` with a partition (set its ``nprobe``);
    OPQ inside an ``IndexPreTransform``.

    Shapes:
        - FAISS's codes: ``num_codebooks * code_bits`` bits per vector (its PQ layout, without the list id)
    """
    import faiss
    import numpy as np

    codec.check_fitted()
    if codec.method == "rvq":
        raise ValueError("FAISS export covers PQ and OPQ codecs; this one is rvq")
    metric = faiss.METRIC_L2 if codec.metric == "l2" else faiss.METRIC_INNER_PRODUCT
    lists, codes = codec.unpack(codec.database)
    pq_codes = pack_codes(codes, TokenSpec((codec.codebook_size,) * codec.num_codebooks))  # FAISS's PQ layout
    if codec.num_lists == 1:
        index = faiss.IndexPQ(codec.dim, codec.num_codebooks, codec.code_bits, metric)
        faiss.copy_array_to_vector(pq_codes.numpy(), index.codes)
    else:
        quantizer = faiss.IndexFlat(codec.dim, metric)
        quantizer.add((codec.centroids @ codec.rotation).cpu().numpy())  # coarse search in the rotated space
        index = faiss.IndexIVFPQ(quantizer, codec.dim, codec.num_lists, codec.num_codebooks, codec.code_bits, metric)
        quantizer.this.disown()
        index.own_fields = True
        rows = pq_codes.numpy().reshape(len(lists), -1)
        scan = codec.scan_index()
        for lst in range(codec.num_lists):
            ids = scan.members(lst).cpu().numpy()
            chunk = np.ascontiguousarray(rows[ids])
            index.invlists.add_entries(lst, len(ids), faiss.swig_ptr(ids), faiss.swig_ptr(chunk))
    faiss.copy_array_to_vector(codec.codebooks.detach().cpu().float().numpy().ravel(), index.pq.centroids)
    index.is_trained = True
    index.ntotal = codec.database.shape[0]
    if codec.num_lists > 1:
        index.precompute_table()
    if codec.method == "pq":
        return index
    transform = faiss.LinearTransform(codec.dim, codec.dim, False)
    faiss.copy_array_to_vector(codec.rotation.T.contiguous().cpu().numpy().ravel(), transform.A)
    transform.is_trained = True
    wrapped = faiss.IndexPreTransform(transform, index)
    transform.this.disown()  # the wrapper owns and frees both parts
    index.this.disown()
    wrapped.own_fields = True
    return wrapped
