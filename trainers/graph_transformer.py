"""Lightning module training the graph transformer on node tokens (GQT stage 2)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from tokenizers_q.models.graph_transformer import GraphTransformer
from tokenizers_q.packing import TokenSpec, load_tokens
from tokenizers_q.trainers.artifacts import load_graph_tokenizer
from tokenizers_q.trainers.module import Step, TrainingModule
from tokenizers_q.trainers.node_tokens import check_node_tokens, sequence_neighbours

_ENCODE_FEATURES = "write the token file with tokq encode --features (write_node_tokens(..., features=True))"


def _feature_dim(extras: dict, path) -> int:
    """The node feature size of a token file's extras, or a clear error naming how to write them."""
    if "features" not in extras:
        raise ValueError(f"ego_features needs node features, and {path} holds none: {_ENCODE_FEATURES}")
    return int(extras["features"].shape[1])


class GraphTransformerModule(TrainingModule):
    r"""Node classification from node tokens and PPR neighbourhoods.

    The layout (TokenSpec, classes, neighbours, tokenizer checkpoint) is read from
    ``token_file`` when given, else from the :class:`NodeTokenDataModule` in
    ``configure_model``; it is stored in the hyper-parameters so checkpoints rebuild the model.

    Args:
        token_file: a node token file to read the layout from.
        spec, num_classes, num_neighbours: the layout given directly instead.
        tokenizer: graph tokenizer checkpoint (for ``init_from_codebook``); default: the token file's.
        dim, depth, num_heads, mlp_ratio, dropout, gating, token_dropout, ego_dropout: see
            :class:`~tokenizers_q.models.GraphTransformer`
            (checkpoints saved with ``heads`` still load).
        ego_features: read each node's own features as one more token (the token file must hold them:
            ``tokq encode --features``). Default: False.
        init_from_codebook: start code embeddings from the tokenizer's codebooks. Default: False.
        label_smoothing: of the cross-entropy. Default: 0.
        lr, weight_decay, warmup_steps, min_lr_ratio: AdamW with warm-up and cosine decay.
            Defaults: 1e-3, 0.05, 50, 0.05.
    """

    renamed_arguments = {"heads": "num_heads"}

    def __init__(
        self,
        token_file: str | None = None,
        spec: dict | None = None,
        num_classes: int | None = None,
        num_neighbours: int | None = None,
        tokenizer: str | None = None,
        dim: int = 128,
        depth: int = 2,
        num_heads: int = 4,
        mlp_ratio: float = 2.0,
        dropout: float = 0.1,
        gating: bool = True,
        token_dropout: float = 0.0,
        ego_dropout: float = 0.0,
        ego_features: bool = False,
        feature_dim: int | None = None,
        init_from_codebook: bool = False,
        label_smoothing: float = 0.0,
        lr: float = 1e-3,
        weight_decay: float = 0.05,
        warmup_steps: int = 50,
        min_lr_ratio: float = 0.05,
    ):
        super().__init__()
        if token_file is not None and (spec is None or num_classes is None or num_neighbours is None):
            tokens = load_tokens(token_file)
            check_node_tokens(tokens, token_file)
            spec, num_classes = spec or tokens.spec.to_dict(), num_classes or tokens.metadata["num_classes"]
            num_neighbours = num_neighbours if num_neighbours is not None else sequence_neighbours(tokens.metadata)
            tokenizer = tokenizer or tokens.metadata.get("checkpoint")
            if ego_features and feature_dim is None:
                feature_dim = _feature_dim(tokens.extras, token_file)
        self.save_hyperparameters()
        self.model: GraphTransformer | None = None
        if spec is not None and num_classes is not None and num_neighbours is not None:
            if ego_features and feature_dim is None:
                raise ValueError("ego_features needs feature_dim (or a token_file holding node features)")
            self._build(spec, num_classes, num_neighbours, tokenizer, feature_dim)

    def _build(self, spec, num_classes: int, num_neighbours: int, tokenizer: str | None, feature_dim) -> None:
        hp = self.hparams
        spec = spec if isinstance(spec, TokenSpec) else TokenSpec.from_dict(spec)
        feature_dim = feature_dim if hp.ego_features else None
        hp.update(
            spec=spec.to_dict(),
            num_classes=num_classes,
            num_neighbours=num_neighbours,
            tokenizer=tokenizer,
            feature_dim=feature_dim,
        )
        self.model = GraphTransformer(
            list(spec.codebook_sizes),
            num_classes,
            num_neighbours,
            hp.dim,
            hp.depth,
            hp.num_heads,
            hp.mlp_ratio,
            hp.dropout,
            hp.gating,
            feature_dim,
            hp.token_dropout,
            hp.get("ego_dropout", 0.0),
        )

    def configure_model(self) -> None:
        if self.model is not None:
            return
        data = self.trainer.datamodule if self._trainer is not None else None
        if data is None or not hasattr(data, "num_neighbours"):
            raise ValueError("the token layout is unknown: give token_file, or train with a NodeTokenDataModule")
        data.setup()
        tokenizer = self.hparams.tokenizer or data.metadata.get("checkpoint")
        feature_dim = self.hparams.feature_dim
        if self.hparams.ego_features and feature_dim is None:
            feature_dim = data.feature_dim
            if feature_dim is None:
                raise ValueError(f"ego_features needs node features, and {data.path} holds none: {_ENCODE_FEATURES}")
        self._build(data.spec, data.num_classes, data.num_neighbours, tokenizer, feature_dim)

    def forward(self, codes, scores, valid, features: torch.Tensor | None = None) -> torch.Tensor:
        """Class logits (B, num_classes) of node sequences (see :class:`GraphTransformer`)."""
        return self.model(codes, scores, valid, features)

    def _check_data(self) -> None:
        data = self.trainer.datamodule if self._trainer is not None else None
        spec = getattr(data, "spec", None)
        if spec is not None and spec.to_dict() != self.hparams.spec:
            raise ValueError(
                f"the node tokens hold {spec} codes, this model was built for {TokenSpec.from_dict(self.hparams.spec)}"
            )

    def on_fit_start(self) -> None:
        self._check_data()
        if self.hparams.init_from_codebook and self.trainer.ckpt_path is None:
            if self.hparams.tokenizer is None:
                raise ValueError("init_from_codebook needs the tokenizer checkpoint (tokenizer=...)")
            vectors = load_graph_tokenizer(self.hparams.tokenizer).quantizer.code_vectors()
            self.model.init_embeddings_from([v.to(self.device) for v in vectors])

    def losses(self, batch, stage: str) -> Step:
        codes, scores, valid, labels, *features = batch
        logits = self(codes, scores, valid, features[0] if features and self.hparams.ego_features else None)
        loss = F.cross_entropy(logits, labels, label_smoothing=self.hparams.label_smoothing)
        accuracy = (logits.argmax(-1) == labels).float().mean()
        shown = () if stage == "train" else ("loss", "accuracy")
        return Step({"loss": loss, "accuracy": accuracy}, batch_size=len(labels), shown=shown)
