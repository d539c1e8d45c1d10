"""Embedding compression: codes for embedding tables and search over them.

``codec.py`` (:class:`EmbeddingCodec`: fit, encode, decode, add, search, save, load), ``index.py``
(:class:`CodeIndex`: the database in scan order, ADC search, exact re-ranking), ``adc.py`` (the scan kernels),
``product.py`` (PQ, OPQ), ``residual.py`` (RVQ), ``faiss_export.py`` (an equivalent FAISS index).
"""

from tokenizers_q.embeddings.codec import EmbeddingCodec
from tokenizers_q.embeddings.index import CodeIndex

__all__ = ["CodeIndex", "EmbeddingCodec"]
