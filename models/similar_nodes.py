"""Feature-similarity ("semantic") neighbours: the nodes whose features are closest to each node's, wherever
they sit in the graph. On heterophilous graphs, where the nodes an edge or a random walk reaches are mostly
of other classes, they are the neighbours that share a node's class."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from tokenizers_q.checks import check_int
from tokenizers_q.search import top_rows


@torch.no_grad()
def similar_nodes(
    x: torch.Tensor, k: int = 8, batch_size: int = 1024, progress: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``k`` nodes of highest cosine similarity of features to every node, the node itself excluded.

    Exact: every pair is compared, ``batch_size`` nodes at a time, so time grows with ``N^2 F`` (seconds at
    100k nodes, hours at millions) and memory with ``N * batch_size``.

    Args:
        x: (N, F) node features.
        k: neighbours per node (at most N - 1). Default: 8.
        batch_size: nodes compared with all others at once. Default: 1024.
        progress: show a progress bar over the batches.

    Returns:
        index: (N, k) int64 node ids, most similar first; score: (N, k) float32 cosine similarities.
    """
    if not isinstance(x, torch.Tensor) or x.dim() != 2 or not x.dtype.is_floating_point:
        raise ValueError(
            f"x must be float node features (N, F), got {getattr(x, 'dtype', type(x))} {tuple(getattr(x, 'shape', ()))}"
        )
    check_int("k", k)
    check_int("batch_size", batch_size)
    if k >= len(x):
        raise ValueError(f"k = {k} similar nodes asked of a graph of {len(x)} nodes (at most N - 1)")
    normed = F.normalize(x.float(), dim=1)
    index, score = torch.empty(len(x), k, dtype=torch.long), torch.empty(len(x), k)
    starts = range(0, len(x), batch_size)
    if progress:
        from tqdm import tqdm

        starts = tqdm(starts, desc="similar nodes", unit="batch")
    for start in starts:
        batch = torch.arange(start, min(start + batch_size, len(x)))
        similarity = normed @ normed[batch].T  # (N, B): column b holds node batch[b]'s similarities
        similarity[batch, torch.arange(len(batch))] = float("-inf")
        values, rows = top_rows(similarity, k, largest=True)
        index[batch], score[batch] = rows.T, values.T
    return index, score
