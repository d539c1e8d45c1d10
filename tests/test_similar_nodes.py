"""Feature-similarity neighbours: exact parity with a full similarity matrix, and their place in node tokens."""

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("torch_geometric")

from tokenizers_q.models.similar_nodes import similar_nodes  # noqa: E402
from tokenizers_q.packing import load_tokens, save_tokens  # noqa: E402
from tokenizers_q.trainers.graph_data import GraphDataModule  # noqa: E402
from tokenizers_q.trainers.graph_tokenizer import GraphTokenizerModule  # noqa: E402
from tokenizers_q.trainers.graph_transformer import GraphTransformerModule  # noqa: E402
from tokenizers_q.trainers.node_tokens import NodeTokenDataModule, check_node_tokens, write_node_tokens  # noqa: E402

SMALL_RVQ = {"num_quantizers": 2, "codebook_size": 16}


@pytest.mark.parametrize("batch_size", [7, 1024])
def test_similar_nodes_match_the_full_similarity_matrix(batch_size):
    x = torch.randn(500, 12, generator=torch.Generator().manual_seed(0))
    index, score = similar_nodes(x, k=5, batch_size=batch_size)
    normed = F.normalize(x, dim=1)
    full = (normed @ normed.T).fill_diagonal_(float("-inf"))
    expected = full.topk(5, dim=1)
    torch.testing.assert_close(score, expected.values)
    assert torch.equal(index, expected.indices)
    assert not (index == torch.arange(500)[:, None]).any()  # never the node itself


def test_similar_nodes_errors_name_the_value():
    with pytest.raises(ValueError, match="k = 10 similar nodes asked of a graph of 10 nodes"):
        similar_nodes(torch.randn(10, 3), k=10)
    with pytest.raises(ValueError, match="float node features"):
        similar_nodes(torch.ones(10, 3, dtype=torch.long))
    with pytest.raises(ValueError, match="batch_size"):
        similar_nodes(torch.randn(10, 3), k=2, batch_size=0)


def test_node_sequences_read_similar_nodes_after_the_ppr_neighbours(tmp_path):
    data = GraphDataModule(num_nodes=80, num_features=4, semantic_k=3)
    data.setup()
    tokenizer = GraphTokenizerModule(in_dim=4, hidden_dim=8, latent_dim=8, quantizer_kwargs=SMALL_RVQ)
    path = write_node_tokens(tokenizer, data.data, tmp_path / "s.safetensors", ppr_k=4, semantic_k=3)
    tokens = load_tokens(path)
    similar, similarity = similar_nodes(data.data.x, 3)
    assert torch.equal(tokens.extras["semantic_index"], similar) and tokens.metadata["semantic_k"] == 3
    nodes = NodeTokenDataModule(str(path), batch_size=8)
    assert nodes.num_neighbours == 7
    codes, scores, valid, labels = next(iter(nodes.dataloader("val")))
    first = nodes.splits["val"].indices[0]
    assert codes.shape == (8, 8, 2)  # the node, 4 PPR neighbours, 3 similar nodes
    assert torch.equal(codes[0, 5:], tokens.codes[similar[first]].long())
    torch.testing.assert_close(scores[0, 5:], similarity[first])
    model = GraphTransformerModule(token_file=str(path), dim=16)
    assert model.hparams.num_neighbours == 7 and model(codes, scores, valid).shape == (8, 4)

    broken = dict(tokens.extras)
    broken["semantic_index"] = similar[:, :2]
    save_tokens(tmp_path / "broken.safetensors", tokens.codes, tokens.spec, tokens.metadata, broken)
    with pytest.raises(ValueError, match=r"semantic_k = 3 needs semantic_index \(80, 3\), got \(80, 2\)"):
        check_node_tokens(load_tokens(tmp_path / "broken.safetensors"), "broken.safetensors")
    with pytest.raises(ValueError, match="semantic_k"):
        write_node_tokens(tokenizer, data.data, tmp_path / "x.safetensors", semantic_k=-1)
