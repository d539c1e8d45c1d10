"""Graph tokenizer (GQT stage 1), node tokens with PPR neighbourhoods, graph transformer (stage 2).

PPR: tests/test_ppr.py; graphs and graph files: tests/test_graph_data.py."""

import csv

import pytest
import torch

pytest.importorskip("torch_geometric")

from torch_geometric.data import Data  # noqa: E402

from tokenizers_q.models.graph_encoder import GNNEncoder, HopEncoder  # noqa: E402
from tokenizers_q.models.graph_transformer import GraphTransformer  # noqa: E402
from tokenizers_q.packing import TokenSpec, load_tokens, save_tokens  # noqa: E402
from tokenizers_q.trainers.artifacts import load_graph_tokenizer, load_module  # noqa: E402
from tokenizers_q.trainers.graph_data import (  # noqa: E402
    GraphDataModule,
    contextual_sbm,
)
from tokenizers_q.trainers.graph_tokenizer import GraphTokenizerModule  # noqa: E402
from tokenizers_q.trainers.graph_transformer import GraphTransformerModule  # noqa: E402
from tokenizers_q.trainers.node_tokens import NodeTokenDataModule, write_node_tokens  # noqa: E402

SMALL_RVQ = {"num_quantizers": 2, "codebook_size": 16}


# -- GNN encoder and SSL losses -------------------------------------------------------------------
@pytest.mark.parametrize("conv", ["gcn", "gat", "sage"])
@pytest.mark.parametrize("norm", ["batch", "layer", "none"])
def test_gnn_encoder_passes_gradients(conv, norm):
    graph = contextual_sbm(num_nodes=50, num_features=6, seed=0)
    encoder = GNNEncoder(6, hidden_dim=16, out_dim=8, conv=conv, norm=norm)
    x = graph.x.clone().requires_grad_(True)
    out = encoder(x, graph.edge_index)
    out.square().sum().backward()
    assert out.shape == (50, 8) and x.grad.abs().sum() > 0
    assert all(p.grad is not None for p in encoder.parameters())


def test_gnn_encoder_bad_input():
    with pytest.raises(ValueError, match="conv must be one of"):
        GNNEncoder(4, conv="gin")
    with pytest.raises(ValueError, match="divisible by heads"):
        GNNEncoder(4, hidden_dim=10, conv="gat", heads=4)
    with pytest.raises(ValueError, match=r"expected node features \(N, 4\)"):
        GNNEncoder(4)(torch.randn(3, 5), torch.tensor([[0], [1]]))


def test_hop_encoder_keeps_each_propagation_step_in_its_own_channel():
    from torch_geometric.utils import to_dense_adj

    graph = contextual_sbm(num_nodes=40, num_features=6, seed=0)
    encoder = HopEncoder(6, hidden_dim=16, out_dim=16, num_hops=2).eval()  # channels X, ÂX, Â²X, (I - Â)X
    # the propagation is the GCN-normalised adjacency with self-loops, applied as a dense matrix
    dense = to_dense_adj(graph.edge_index, max_num_nodes=40)[0] + torch.eye(40)
    degree = dense.sum(1).rsqrt()
    normalised = degree[:, None] * dense * degree[None, :]
    hops = [graph.x, normalised @ graph.x, normalised @ normalised @ graph.x, graph.x - normalised @ graph.x]
    expected = torch.cat([mlp(h) for mlp, h in zip(encoder.mlps, hops)], -1)
    torch.testing.assert_close(encoder(graph.x, graph.edge_index), expected, atol=1e-5, rtol=1e-4)
    # a node's own channel reads only its own features: changing every other node leaves it as it was
    changed = graph.x.clone()
    changed[1:] = torch.randn(39, 6)
    own = encoder(changed, graph.edge_index)[0, :4]
    torch.testing.assert_close(own, encoder(graph.x, graph.edge_index)[0, :4])
    x = graph.x.clone().requires_grad_(True)
    encoder.train()(x, graph.edge_index).square().sum().backward()
    assert x.grad.abs().sum() > 0 and all(p.grad is not None for p in encoder.parameters())
    with pytest.raises(ValueError, match="out_dim 10 must be divisible by the 4 channels"):
        HopEncoder(6, out_dim=10)
    with pytest.raises(ValueError, match=r"expected node features \(N, 6\)"):
        encoder(torch.randn(3, 5), graph.edge_index)


def test_a_hop_tokenizer_gives_one_code_per_channel():
    graph = contextual_sbm(num_nodes=60, num_features=8, seed=0)
    pq = {"num_groups": 4, "quantizer": "vq", "codebook_size": 16}
    tokenizer = GraphTokenizerModule(
        in_dim=8, hidden_dim=16, latent_dim=16, conv="hops", quantizer="pq", quantizer_kwargs=pq
    )
    assert tokenizer.encode(graph).shape == (60, 4) and tokenizer.bits_per_node() == 16.0
    losses, _ = tokenizer._loss_terms(graph)
    losses["loss"].backward()
    assert all(p.grad is not None for p in tokenizer.encoder.parameters())
    with pytest.raises(ValueError, match="conv must be one of"):
        GraphTokenizerModule(in_dim=8, conv="gin")


@pytest.mark.parametrize("loss", ["mae", "dgi", "latent"])
def test_each_ssl_loss_decreases(loss):
    torch.manual_seed(0)
    graph = contextual_sbm(num_nodes=200, num_features=16, homophily=0.8, feature_noise=1.0, seed=0)
    weights = {name: float(name == loss) for name in ("mae", "dgi", "latent")}
    module = GraphTokenizerModule(
        in_dim=16,
        hidden_dim=32,
        latent_dim=16,
        quantizer_kwargs=SMALL_RVQ,
        mae_weight=weights["mae"],
        dgi_weight=weights["dgi"],
        latent_weight=weights["latent"],
    )
    optimizer = torch.optim.Adam(module.parameters(), lr=3e-3)
    history = []
    for _ in range(40):
        losses, _ = module._loss_terms(graph)
        optimizer.zero_grad()
        losses["loss"].backward()
        optimizer.step()
        if module.bgrl is not None:
            module.bgrl.update_teacher(module.encoder)
        history.append(losses[loss].item())
    assert sum(history[-5:]) / 5 < 0.8 * sum(history[:5]) / 5, history


def test_encoding_in_batches_gives_the_same_codes():
    graph = contextual_sbm(num_nodes=300, num_features=8, seed=0)
    tokenizer = GraphTokenizerModule(in_dim=8, hidden_dim=16, latent_dim=8, quantizer_kwargs=SMALL_RVQ)
    assert torch.equal(tokenizer.encode(graph, batch_size=7), tokenizer.encode(graph))
    with pytest.raises(ValueError, match="batch_size"):
        tokenizer.encode(graph, batch_size=0)


def test_tokenizer_bad_settings():
    with pytest.raises(ValueError, match="at least one self-supervised loss"):
        GraphTokenizerModule(in_dim=4, mae_weight=0, dgi_weight=0, latent_weight=0)
    with pytest.raises(ValueError, match="loss weights must be >= 0"):
        GraphTokenizerModule(in_dim=4, dgi_weight=-1)
    with pytest.raises(ValueError, match="reads 4 node features, the graph has 32"):
        GraphTokenizerModule(in_dim=4, quantizer_kwargs=SMALL_RVQ).encode(contextual_sbm(num_nodes=20))


def test_node_tokens_are_stable_and_survive_a_checkpoint(tmp_path):
    import lightning as L

    graph = contextual_sbm(num_nodes=120, num_features=8, seed=0)
    data = GraphDataModule(num_nodes=120, num_features=8)
    module = GraphTokenizerModule(hidden_dim=16, latent_dim=8, quantizer="vq", quantizer_kwargs={"codebook_size": 32})
    trainer = L.Trainer(
        max_steps=3, logger=False, enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path
    )
    trainer.fit(module, data)
    module.train()  # encode runs in eval whatever the mode; nothing changes state
    before = {k: v.clone() for k, v in module.state_dict().items()}
    codes = module.encode(graph)
    assert torch.equal(codes, module.encode(graph)) and module.training
    assert all(torch.equal(before[k], v) for k, v in module.state_dict().items())
    trainer.save_checkpoint(tmp_path / "tok.ckpt")
    assert torch.equal(load_graph_tokenizer(tmp_path / "tok.ckpt").encode(graph), codes)
    assert codes.shape == (120, 1) and module.code_statistics(graph)["usage"][0] > 0


# -- graph transformer ------------------------------------------------------------------------------
def test_graph_transformer_ignores_padding_and_learns_from_tokens():
    torch.manual_seed(0)
    model = GraphTransformer([8, 8], num_classes=2, num_neighbours=3, dim=32, depth=1, num_heads=2, dropout=0.0).eval()
    codes = torch.randint(0, 8, (5, 4, 2))
    scores = torch.rand(5, 4)
    valid = torch.tensor([[True, True, False, False]] * 5)
    changed = codes.clone()
    changed[:, 2:] = (changed[:, 2:] + 3) % 8  # only padded positions differ
    assert torch.allclose(model(codes, scores, valid), model(changed, scores, valid), atol=1e-6)
    changed = codes.clone()
    changed[:, 1] = (changed[:, 1] + 3) % 8  # a real neighbour differs
    assert not torch.allclose(model(codes, scores, valid), model(changed, scores, valid), atol=1e-4)
    # the label is the first code of the node itself: the model must learn to read its tokens
    model.train()
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    codes = torch.randint(0, 8, (256, 4, 2))
    labels = (codes[:, 0, 0] < 4).long()
    valid = torch.ones(256, 4, dtype=torch.bool)
    for _ in range(60):
        loss = torch.nn.functional.cross_entropy(model(codes, torch.rand(256, 4), valid), labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert loss.item() < 0.2


def test_the_ego_token_lets_the_transformer_read_a_nodes_own_features():
    torch.manual_seed(0)
    model = GraphTransformer([8], num_classes=2, num_neighbours=2, dim=32, depth=1, num_heads=2, feature_dim=5)
    codes = torch.zeros(256, 3, 1, dtype=torch.long)  # the codes say nothing: the label is in the features
    features = torch.randn(256, 5)
    labels = (features[:, 2] > 0).long()
    valid, scores = torch.ones(256, 3, dtype=torch.bool), torch.rand(256, 3)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(80):
        loss = torch.nn.functional.cross_entropy(model(codes, scores, valid, features), labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert loss.item() < 0.2 and model.ego[1].weight.grad is not None
    with pytest.raises(ValueError, match="reads node features of size 5, none were given"):
        model(codes, scores, valid)
    with pytest.raises(ValueError, match=r"expected features \(256, 5\), got \(256, 4\)"):
        model(codes, scores, valid, features[:, :4])
    with pytest.raises(ValueError, match="given to a model built without feature_dim"):
        GraphTransformer([8], num_classes=2, num_neighbours=2, dim=32)(codes, scores, valid, features)


def test_ego_dropout_acts_in_training_only_and_keeps_parameter_names():
    torch.manual_seed(0)
    settings = {"num_classes": 2, "num_neighbours": 2, "dim": 32, "depth": 1, "num_heads": 2, "feature_dim": 5}
    plain = GraphTransformer([8], **settings, dropout=0.0)
    dropped = GraphTransformer([8], **settings, dropout=0.0, ego_dropout=0.5)
    dropped.load_state_dict(plain.state_dict())  # the same parameters: older checkpoints load
    codes, valid = torch.zeros(16, 3, 1, dtype=torch.long), torch.ones(16, 3, dtype=torch.bool)
    scores, features = torch.rand(16, 3), torch.randn(16, 5)
    plain.eval(), dropped.eval()
    torch.testing.assert_close(dropped(codes, scores, valid, features), plain(codes, scores, valid, features))
    dropped.train()
    first, second = dropped(codes, scores, valid, features), dropped(codes, scores, valid, features)
    assert not torch.allclose(first, second)  # fresh dropout masks on the ego path each call
    with pytest.raises(ValueError, match=r"ego_dropout must be in \[0, 1\), got 1.0"):
        GraphTransformer([8], **settings, ego_dropout=1.0)


def test_token_dropout_hides_code_tokens_in_training_only():
    torch.manual_seed(0)
    model = GraphTransformer(
        [8], num_classes=2, num_neighbours=3, dim=16, depth=1, num_heads=2, dropout=0.0, token_dropout=0.9
    )
    codes, scores, valid = torch.randint(0, 8, (4, 4, 1)), torch.rand(4, 4), torch.ones(4, 4, dtype=torch.bool)
    model.eval()
    assert torch.equal(model(codes, scores, valid), model(codes, scores, valid))  # nothing hidden in eval
    model.train()
    assert not torch.allclose(model(codes, scores, valid), model(codes, scores, valid))
    alone = torch.tensor([[True, False, False, False]] * 4)  # the node's own codes are never hidden
    assert torch.isfinite(model(codes, scores, alone)).all()
    with pytest.raises(ValueError, match=r"token_dropout must be in \[0, 1\), got 1.0"):
        GraphTransformer([8], num_classes=2, num_neighbours=3, dim=16, token_dropout=1.0)


def test_token_files_carry_features_for_the_ego_token(tmp_path):
    data = GraphDataModule(num_nodes=60, num_features=4)
    data.setup()
    tokenizer = GraphTokenizerModule(in_dim=4, hidden_dim=8, latent_dim=8, quantizer_kwargs=SMALL_RVQ)
    with_features = write_node_tokens(tokenizer, data.data, tmp_path / "f.safetensors", ppr_k=3, features=True)
    without = write_node_tokens(tokenizer, data.data, tmp_path / "n.safetensors", ppr_k=3)
    nodes = NodeTokenDataModule(str(with_features), batch_size=8)
    codes, scores, valid, labels, features = next(iter(nodes.dataloader("val")))  # in order
    assert features.shape == (8, 4) and nodes.feature_dim == 4
    first = nodes.splits["val"].indices[0]
    assert torch.equal(features[0], data.data.x[first])  # each node's own features, in its split's order
    model = GraphTransformerModule(token_file=str(with_features), dim=16, ego_features=True)
    assert model.hparams.feature_dim == 4 and model(codes, scores, valid, features).shape == (8, 4)
    assert NodeTokenDataModule(str(without)).feature_dim is None
    with pytest.raises(ValueError, match="holds none: write the token file with tokq encode --features"):
        GraphTransformerModule(token_file=str(without), ego_features=True)


def test_graph_transformer_bad_input_and_codebook_init():
    model = GraphTransformer([8, 4], num_classes=3, num_neighbours=2, dim=16, depth=1, num_heads=2, gating=False)
    with pytest.raises(ValueError, match=r"expected codes \(B, 3, 2\)"):
        model(torch.zeros(2, 3, 1, dtype=torch.long), torch.ones(2, 3), torch.ones(2, 3, dtype=torch.bool))
    with pytest.raises(ValueError, match="scores .* must both be"):
        model(torch.zeros(2, 3, 2, dtype=torch.long), torch.ones(2, 4), torch.ones(2, 3, dtype=torch.bool))
    with pytest.raises(ValueError, match="codebook_sizes must list at least one codebook size"):
        GraphTransformer([], num_classes=2, num_neighbours=1)
    with pytest.raises(ValueError, match=r"codebook_sizes\[1\] must be a positive int, got 0"):
        GraphTransformer([8, 0], num_classes=2, num_neighbours=1)
    with pytest.raises(TypeError, match=r"num_neighbours must be an int, got 1.5 \(float\)"):
        GraphTransformer([8], num_classes=2, num_neighbours=1.5)
    with pytest.raises(ValueError, match=r"dim \(16\) must be divisible by num_heads \(3\)"):
        GraphTransformer([8], num_classes=2, num_neighbours=1, dim=16, num_heads=3)
    vectors = [torch.randn(8, 5), torch.randn(4, 5)]
    model.init_embeddings_from(vectors)
    distances = torch.cdist(model.embed[0].weight, model.embed[0].weight)
    expected = torch.cdist(vectors[0], vectors[0])
    assert torch.corrcoef(torch.stack([distances.flatten(), expected.flatten()]))[0, 1] > 0.5


# -- the two stages through the CLI, with the shipped configs -------------------------------------
def _quiet(out) -> list[str]:
    return [
        "--trainer.enable_progress_bar=false",
        "--trainer.enable_model_summary=false",
        f"--trainer.logger.init_args.save_dir={out}",
        f"--trainer.default_root_dir={out}",
    ]


def test_two_stage_pipeline_through_the_cli(tmp_path, capsys):
    from tokenizers_q.trainers.cli import main as tokq

    tokq(
        ["fit", "--config", "configs/graph/tokenizer.yaml", *_quiet(tmp_path)]
        + ["--trainer.max_steps=30", "--trainer.check_val_every_n_epoch=10"]
        + ["--data.init_args.num_nodes=300", "--data.init_args.num_features=8", "--data.init_args.homophily=0.9"]
        + ["--data.init_args.feature_noise=1.0", "--model.init_args.hidden_dim=32", "--model.init_args.latent_dim=16"]
        + ["--model.init_args.quantizer_kwargs={num_quantizers: 2, codebook_size: 16}"]
    )
    run = tmp_path / "graph-tokenizer" / "version_0"
    ckpt = run / "checkpoints" / "last.ckpt"
    assert (run / "codebook_usage" / "latest.png").is_file()

    tokens_path = tmp_path / "nodes.safetensors"
    tokq(["encode", "--ckpt", str(ckpt), "--output", str(tokens_path), "--ppr-k", "5", "--features"])
    tokens = load_tokens(tokens_path)
    assert tokens.codes.shape == (300, 2) and tokens.spec == TokenSpec((16, 16))
    assert tokens.extras["features"].shape == (300, 8)  # for a transformer with ego_features
    assert tokens.extras["ppr_index"].shape == (300, 5) and tokens.metadata["num_classes"] == 4
    assert tokens.metadata["code_bits"] == 8 and tokens.metadata["checkpoint"] == str(ckpt.resolve())

    tokq(["inspect", "--tokens", str(tokens_path), "--plot", str(tmp_path / "usage.png")])
    assert "| 1 | 16 | 4 |" in capsys.readouterr().out and (tmp_path / "usage.png").is_file()
    with pytest.raises(ValueError, match="node tokens, which decode to no image"):
        tokq(["decode", "--tokens", str(tokens_path), "--ckpt", str(ckpt), "--output", str(tmp_path / "x.png")])

    tokq(
        ["fit", "--config", "configs/graph/transformer.yaml", *_quiet(tmp_path)]
        + [f"--data.init_args.tokens={tokens_path}", "--trainer.max_epochs=6", "--model.init_args.dim=32"]
        + ["--model.init_args.depth=1", "--model.init_args.lr=0.003", "--model.init_args.warmup_steps=2"]
        + ["--model.init_args.init_from_codebook=true"]
    )
    gt_ckpt = tmp_path / "graph-transformer" / "version_0" / "checkpoints" / "last.ckpt"
    model = load_module(gt_ckpt, GraphTransformerModule)
    data = NodeTokenDataModule(str(tokens_path), batch_size=300)
    codes, scores, valid, labels, features = next(iter(data.dataloader("test")))  # the file holds features
    with torch.no_grad():
        accuracy = (model(codes, scores, valid).argmax(-1) == labels).float().mean()
    assert accuracy > 0.6  # 4 classes, homophily 0.9: tokens and neighbourhoods carry the class


def test_mismatched_token_files_are_refused(tmp_path):
    import lightning as L

    graph = contextual_sbm(num_nodes=60, num_features=4, seed=0)
    data = GraphDataModule(num_nodes=60, num_features=4)
    data.setup()
    tokenizer = GraphTokenizerModule(in_dim=4, hidden_dim=8, latent_dim=8, quantizer_kwargs=SMALL_RVQ)
    path = write_node_tokens(tokenizer, data.data, tmp_path / "nodes.safetensors", ppr_k=3)
    model = GraphTransformerModule(spec=TokenSpec((32, 32)).to_dict(), num_classes=4, num_neighbours=3, dim=16)
    trainer = L.Trainer(max_steps=1, logger=False, enable_progress_bar=False, enable_checkpointing=False)
    with pytest.raises(ValueError, match=r"node tokens hold .*16.* this model was built for .*32"):
        trainer.fit(model, NodeTokenDataModule(str(path)))

    image_tokens = save_tokens(
        tmp_path / "images.safetensors", torch.zeros(2, 4, 4, 1, dtype=torch.long), TokenSpec((8,))
    )
    with pytest.raises(ValueError, match="not a node token file"):
        NodeTokenDataModule(str(image_tokens)).setup()
    with pytest.raises(ValueError, match="not a node token file"):
        GraphTransformerModule(token_file=str(image_tokens))
    with pytest.raises(ValueError, match="node labels data.y"):
        write_node_tokens(tokenizer, Data(x=graph.x, edge_index=graph.edge_index), tmp_path / "x.safetensors")


def test_bits_per_node_and_the_shared_tables():
    from tokenizers_q.memory import shared_bits

    tokenizer = GraphTokenizerModule(in_dim=4, hidden_dim=8, latent_dim=8, quantizer_kwargs=SMALL_RVQ)
    assert tokenizer.bits_per_node() == 8.0  # two levels of 16 codes
    assert tokenizer.shared_bits() == shared_bits(tokenizer.quantizer) >= 2 * 16 * 8 * 32  # float32 codebooks


def test_graph_transformer_checkpoints_saved_with_heads_still_load(tmp_path):
    import lightning as L

    model = GraphTransformerModule(spec=TokenSpec((8, 8)).to_dict(), num_classes=3, num_neighbours=2, dim=16)
    trainer = L.Trainer(logger=False, enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path)
    trainer.strategy.connect(model)
    trainer.save_checkpoint(tmp_path / "gt.ckpt")
    checkpoint = torch.load(tmp_path / "gt.ckpt", weights_only=True)
    checkpoint["hyper_parameters"]["heads"] = checkpoint["hyper_parameters"].pop("num_heads")
    torch.save(checkpoint, tmp_path / "old.ckpt")
    with pytest.warns(DeprecationWarning, match=r"heads -> num_heads"):
        restored = load_module(tmp_path / "old.ckpt", GraphTransformerModule)
    assert restored.hparams.num_heads == 4 and restored.model.blocks.layers[0].self_attn.num_heads == 4
    for key, value in model.state_dict().items():
        assert torch.equal(restored.state_dict()[key], value), key


def test_the_shipped_transformer_config_keeps_the_last_epoch_beside_the_best_and_resumes_from_it(tmp_path):
    """lr 0: validation accuracy never improves after the first epoch, so the best epoch is the first one; a run
    "killed" after 4 epochs must still leave its 4th epoch in last.ckpt, and a resumed run continue from there."""
    from tokenizers_q.trainers.cli import main as tokq

    data = GraphDataModule(num_nodes=80, num_features=4)
    data.setup()
    tokenizer = GraphTokenizerModule(in_dim=4, hidden_dim=8, latent_dim=8, quantizer_kwargs=SMALL_RVQ)
    tokens = write_node_tokens(tokenizer, data.data, tmp_path / "nodes.safetensors", ppr_k=3)
    options = [*_quiet(tmp_path), f"--data.init_args.tokens={tokens}", "--model.init_args.dim=16"]
    options += ["--model.init_args.depth=1", "--model.init_args.lr=0", "--data.init_args.batch_size=16"]
    folder = tmp_path / "graph-transformer" / "version_0" / "checkpoints"

    tokq(["fit", "--config", "configs/graph/transformer.yaml", *options, "--trainer.max_epochs=4"])
    last = torch.load(folder / "last.ckpt", weights_only=True)
    best = torch.load(folder / "best.ckpt", weights_only=True)
    assert last["epoch"] == 3 and best["epoch"] == 0  # the last epoch, and the best one under its own name
    steps_per_epoch = last["global_step"] // 4
    assert steps_per_epoch > 0

    tokq(
        ["fit", "--config", "configs/graph/transformer.yaml", *options, "--trainer.max_epochs=6"]
        + [f"--ckpt_path={folder / 'last.ckpt'}"]
    )
    resumed = torch.load(tmp_path / "graph-transformer" / "version_1" / "checkpoints" / "last.ckpt", weights_only=True)
    assert resumed["epoch"] == 5 and resumed["global_step"] == 6 * steps_per_epoch  # two more epochs, not six
    with open(tmp_path / "graph-transformer" / "version_1" / "metrics.csv") as f:
        epochs = {int(float(row["epoch"])) for row in csv.DictReader(f) if row["epoch"]}
    assert min(epochs) == 4, epochs  # it continued after the 4th epoch, not from the best
