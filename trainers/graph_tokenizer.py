"""Lightning module training a graph tokenizer (GQT stage 1): GNN -> quantizer, self-supervised."""

from __future__ import annotations

import warnings

import torch
from torch_geometric.data import Data
from torch_geometric.utils import remove_self_loops, to_torch_csr_tensor

from tokenizers_q import memory
from tokenizers_q.checks import check_choice, check_int
from tokenizers_q.metrics import code_counts, usage_metrics
from tokenizers_q.models.graph_encoder import ENCODERS, GNNEncoder, HopEncoder
from tokenizers_q.models.graph_ssl import DeepGraphInfomax, LatentPrediction, MaskedFeatureReconstruction
from tokenizers_q.quantizers import Quantizer, create_quantizer
from tokenizers_q.trainers.graph_data import check_graph
from tokenizers_q.trainers.module import Step, TrainingModule

DEFAULT_QUANTIZER = {"num_quantizers": 3, "codebook_size": 256}


class GraphTokenizerModule(TrainingModule):
    r"""Node tokens from a GNN and a quantizer, trained with switchable self-supervised losses.

    Each node gets ``num_codebooks`` codes (one per RVQ level by default: hierarchical tokens).
    The loss is ``mae_weight * masked feature reconstruction + dgi_weight * DGI +
    latent_weight * BGRL latent prediction + quantizer_weight * the quantizer's loss``;
    a weight of 0 switches a part off (its parameters are not built). Every step sees what the
    :class:`GraphDataModule` yields: the whole graph, or with ``batch_nodes`` a sampled subgraph, whose
    self-supervised losses score its seeds only (``data.batch_size``, the first nodes): the others were
    reached at the last hop and lack part of their neighbourhood, which ``encode`` never does.

    Args:
        in_dim: node feature size; default: read from the data module.
        hidden_dim, num_layers, conv, heads, norm, residual, dropout: the
            :class:`~tokenizers_q.models.GNNEncoder`. Defaults: 128, 2, ``"gcn"``, 4, ``"batch"``, True, 0.1.
            ``conv="hops"``: a :class:`~tokenizers_q.models.graph_encoder.HopEncoder` instead, with ``num_layers``
            propagation steps and the high-pass channel kept apart (pair it with ``quantizer: pq`` and one group
            per channel, ``num_layers + 2``, so every channel has a code).
        latent_dim: size of the quantized latents. Default: 64.
        quantizer: registered quantizer name. Default: ``"rvq"``.
        quantizer_kwargs: its arguments. Default: 3 levels of 256 codes (24 bits per node).
        mae_weight, dgi_weight, latent_weight, quantizer_weight: loss weights. Default: 1 each.
        mask_rate: share of nodes masked for reconstruction. Default: 0.5.
        visible_weight: weight of reconstructing the unmasked nodes' own features (0: GraphMAE as published).
            Default: 1.
        ema_decay: BGRL teacher decay. Default: 0.99.
        feature_drop, edge_drop: BGRL view augmentations. Default: 0.2 each.
        lr, weight_decay, warmup_steps, min_lr_ratio: AdamW with warm-up and cosine decay.
            Defaults: 2e-3, 1e-4, 20, 0.1.

    Shapes:
        - input: a PyG ``Data`` with x (N, in_dim) and edge_index (2, E)
        - codes: (N, num_codebooks) int64
    """

    def __init__(
        self,
        in_dim: int | None = None,
        hidden_dim: int = 128,
        num_layers: int = 2,
        conv: str = "gcn",
        heads: int = 4,
        norm: str = "batch",
        residual: bool = True,
        dropout: float = 0.1,
        latent_dim: int = 64,
        quantizer: str = "rvq",
        quantizer_kwargs: dict | None = None,
        mae_weight: float = 1.0,
        dgi_weight: float = 1.0,
        latent_weight: float = 1.0,
        quantizer_weight: float = 1.0,
        mask_rate: float = 0.5,
        visible_weight: float = 1.0,
        ema_decay: float = 0.99,
        feature_drop: float = 0.2,
        edge_drop: float = 0.2,
        lr: float = 2e-3,
        weight_decay: float = 1e-4,
        warmup_steps: int = 20,
        min_lr_ratio: float = 0.1,
    ):
        super().__init__()
        weights = {"mae_weight": mae_weight, "dgi_weight": dgi_weight, "latent_weight": latent_weight}
        if any(w < 0 for w in weights.values()) or quantizer_weight < 0:
            raise ValueError(f"loss weights must be >= 0, got {weights} and quantizer_weight={quantizer_weight}")
        check_choice("conv", conv, ENCODERS)
        if not any(weights.values()):
            raise ValueError("switch on at least one self-supervised loss (mae_weight, dgi_weight or latent_weight)")
        if quantizer_kwargs is None and quantizer == "rvq":
            quantizer_kwargs = dict(DEFAULT_QUANTIZER)
        self.save_hyperparameters()
        self.quantizer: Quantizer = create_quantizer(quantizer, dim=latent_dim, **(quantizer_kwargs or {}))
        self.encoder: GNNEncoder | None = None
        if in_dim is not None:
            self._build(in_dim)

    def _build(self, in_dim: int) -> None:
        hp = self.hparams
        hp.in_dim = in_dim
        if hp.conv == "hops":
            self.encoder = HopEncoder(in_dim, hp.hidden_dim, hp.latent_dim, hp.num_layers, True, hp.norm, hp.dropout)
        else:
            self.encoder = GNNEncoder(
                in_dim, hp.hidden_dim, hp.latent_dim, hp.num_layers, hp.conv, hp.heads, hp.norm, hp.residual, hp.dropout
            )
        self.mae = None
        if hp.mae_weight:
            self.mae = MaskedFeatureReconstruction(
                in_dim, hp.latent_dim, mask_rate=hp.mask_rate, visible_weight=hp.visible_weight
            )
        self.dgi = DeepGraphInfomax(hp.latent_dim) if hp.dgi_weight else None
        self.bgrl = None
        if hp.latent_weight:
            self.bgrl = LatentPrediction(self.encoder, hp.latent_dim, None, hp.ema_decay, hp.feature_drop, hp.edge_drop)

    def configure_model(self) -> None:
        if self.encoder is not None:
            return
        data = self.trainer.datamodule if self._trainer is not None else None
        if data is None or not hasattr(data, "num_features"):
            raise ValueError("in_dim is unknown: give in_dim or train with a GraphDataModule")
        self._build(data.num_features)

    # -- the tokenizer ---------------------------------------------------------------------
    def _check(self, data: Data) -> Data:
        check_graph(data)
        if data.x.shape[1] != self.hparams.in_dim:
            raise ValueError(
                f"this tokenizer reads {self.hparams.in_dim} node features, the graph has {data.x.shape[1]}"
            )
        return data

    @torch.no_grad()
    def encode(self, data: Data, batch_size: int = 65536) -> torch.Tensor:
        """Node codes (N, num_codebooks) of a graph, always computed in eval mode (no dropout, running
        normalisation statistics), so a fixed model gives the same tokens; nothing changes state. The encoder
        reads the whole graph once, GCN and GraphSAGE layers by a sparse adjacency product (memory of one
        value per edge, not an (E, hidden_dim) table of messages); its latents are quantized ``batch_size``
        nodes at a time (the code search holds a (batch, codebook_size) table, not one for every node)."""
        self._check(data)
        check_int("batch_size", batch_size)
        was_training = self.training
        self.eval()
        try:
            latents = self.encoder(data.x, self._adjacency(data))
            return torch.cat([self.quantizer.encode(part) for part in latents.split(batch_size)])
        finally:
            self.train(was_training)

    def _adjacency(self, data: Data) -> torch.Tensor:
        """The graph as the encoder reads it in :meth:`encode`: for GCN and GraphSAGE layers a sparse CSR
        adjacency (rows: targets, as PyG's ``adj_t``) whose products equal message passing over
        ``edge_index`` (GCN adds every self-loop itself); the edge list itself for other layers, or when an
        edge repeats (a GraphSAGE mean counts each copy, a CSR product would not)."""
        if self.hparams.conv not in ("gcn", "sage"):
            return data.edge_index
        num_nodes = data.x.shape[0]
        edge_index = remove_self_loops(data.edge_index)[0] if self.hparams.conv == "gcn" else data.edge_index
        pairs = edge_index[1] * num_nodes + edge_index[0]
        if len(torch.unique(pairs)) != len(pairs):
            return data.edge_index
        with warnings.catch_warnings():  # torch calls its sparse CSR tensors "beta"; this product is stable
            warnings.filterwarnings("ignore", message=".*[Ss]parse.*")
            return to_torch_csr_tensor(edge_index.flip(0), size=(num_nodes, num_nodes))

    @torch.no_grad()
    def code_statistics(self, data: Data) -> dict[str, list[float]]:
        """Usage (share of codes hit) and perplexity of every codebook (RVQ level) over the graph's nodes."""
        codes = self.encode(data)
        stats = [usage_metrics(code_counts(codes[:, c], k)) for c, k in enumerate(self.quantizer.spec.codebook_sizes)]
        return {name: [s[name].item() for s in stats if s] for name in ("usage", "perplexity")}

    def bits_per_node(self) -> float:
        """Exactly packed code bits per node (the quantizer's tables, shared by every node, are :meth:`shared_bits`)."""
        return float(self.quantizer.spec.bits_per_token)

    def shared_bits(self) -> int:
        """Bits of the quantizer's tables (codebooks, projections) in their stored dtype, shared by every node
        (:func:`tokenizers_q.memory.shared_bits`): amortise them over the nodes coded."""
        return memory.shared_bits(self.quantizer)

    # -- training ----------------------------------------------------------------------------
    def _loss_terms(self, data: Data) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        hp, x, edge_index = self.hparams, data.x, data.edge_index
        scored = getattr(data, "batch_size", None)  # a sampled subgraph: only its seeds have whole neighbourhoods
        out = self.quantizer(self.encoder(x, edge_index))
        losses = {"quantizer": out.loss}
        if self.dgi is not None:
            negative = self.quantizer(self.encoder(self.dgi.corrupt(x), edge_index)).quantized
            losses["dgi"] = self.dgi.loss(out.quantized[:scored], negative[:scored])
        if self.mae is not None or self.bgrl is not None:
            masked_x, mask = self.mae.mask(x) if self.mae is not None else (x, None)
            view_x, view_edges = (masked_x, edge_index) if self.bgrl is None else self.bgrl.view(masked_x, edge_index)
            online = self.quantizer(self.encoder(view_x, view_edges))
            losses["quantizer"] = losses["quantizer"] + online.loss
            if self.mae is not None:
                losses["mae"] = self.mae.loss(online.quantized, x, view_edges, mask, scored)
            if self.bgrl is not None:
                losses["latent"] = self.bgrl.loss(online.quantized, *self.bgrl.view(x, edge_index), scored)
        weights = {
            "quantizer": hp.quantizer_weight,
            "dgi": hp.dgi_weight,
            "mae": hp.mae_weight,
            "latent": hp.latent_weight,
        }
        total = sum(weights[k] * v for k, v in losses.items())
        return {**losses, "loss": total}, out.codes

    def losses(self, data: Data, stage: str) -> Step:
        self._check(data)
        losses, codes = self._loss_terms(data)
        logged = {"loss": losses["loss"], **{f"{k}_loss": v for k, v in losses.items() if k != "loss"}}
        outputs = None
        if stage != "train":
            mask = data[f"{stage}_mask"] if f"{stage}_mask" in data else torch.ones(len(codes), dtype=torch.bool)
            outputs = {"codes": codes[mask]}
        return Step(logged, outputs, batch_size=1)

    def on_train_batch_end(self, outputs, batch, batch_idx) -> None:
        if self.bgrl is not None:
            self.bgrl.update_teacher(self.encoder)

    def on_validation_epoch_end(self) -> None:
        data = self.trainer.datamodule.data if self._trainer is not None and self.trainer.datamodule else None
        if data is None:
            return
        stats = self.code_statistics(data.to(self.device))
        for level, (usage, perplexity) in enumerate(zip(stats["usage"], stats["perplexity"])):
            self.log_dict({f"val/usage_{level}": usage, f"val/perplexity_{level}": perplexity}, batch_size=1)
