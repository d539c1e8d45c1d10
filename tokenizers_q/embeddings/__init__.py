"""Embedding compression: codes for embedding tables and search over them."""

from tokenizers_q.embeddings.codec import EmbeddingCodec

__all__ = ["EmbeddingCodec"]
