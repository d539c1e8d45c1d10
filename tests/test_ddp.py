"""Codebook statistics under real DDP: a Lightning Trainer with two CPU processes (gloo)."""

import lightning as L
import torch
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

from tokenizers_q import RVQ, VQ

DIM, BATCH, STEPS = 8, 32, 6


def _data() -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    centers = torch.randn(12, DIM, generator=g) * 3
    return centers[torch.randint(0, 12, (2 * BATCH * STEPS,), generator=g)] + 0.3 * torch.randn(
        2 * BATCH * STEPS, DIM, generator=g
    )


class CodebookModule(L.LightningModule):
    def __init__(self, out_dir: str):
        super().__init__()
        self.out_dir = out_dir
        self.encoder = torch.nn.Linear(DIM, DIM)  # learned, so DDP has gradients to synchronise
        self.vq = VQ(DIM, codebook_size=16, kmeans_iters=3)
        self.rvq = RVQ(DIM, num_quantizers=2, codebook_size=16, threshold_ema_dead_code=4.0, kmeans_iters=2)

    def training_step(self, batch, batch_idx):
        (x,) = batch
        torch.manual_seed(1000 + batch_idx)  # same seed on every rank and in the reference
        out_vq = self.vq(x)
        out_rvq = self.rvq(self.encoder(x))
        return out_rvq.loss + (out_rvq.quantized - x).pow(2).mean() + out_vq.loss

    def train_dataloader(self):
        dataset = TensorDataset(_data())
        world, rank = self.trainer.world_size, self.global_rank
        sampler = DistributedSampler(dataset, num_replicas=world, rank=rank, shuffle=False)  # rank r: rows r::2
        return DataLoader(dataset, batch_size=BATCH, sampler=sampler)

    def configure_optimizers(self):
        return torch.optim.SGD(self.encoder.parameters(), lr=0.1)

    def on_train_end(self):
        state = {k: v.detach().clone() for k, v in self.state_dict().items()}
        torch.save(state, f"{self.out_dir}/rank{self.global_rank}.pt")


def test_ddp_codebooks_agree_across_ranks_and_match_one_process(tmp_path):
    data = _data()
    trainer = L.Trainer(
        accelerator="cpu",
        devices=2,
        strategy="ddp_spawn",
        max_steps=STEPS,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        use_distributed_sampler=False,
    )
    torch.manual_seed(0)
    module = CodebookModule(str(tmp_path))
    init_state = {k: v.clone() for k, v in module.state_dict().items()}
    trainer.fit(module)

    rank0 = torch.load(tmp_path / "rank0.pt")
    rank1 = torch.load(tmp_path / "rank1.pt")
    assert rank0.keys() == rank1.keys()
    for key in rank0:
        assert torch.equal(rank0[key], rank1[key]), f"{key} differs between ranks"
    assert bool(rank0["vq.codebook.initted"]) and rank0["rvq.layers.1.codebook.cluster_size"].min() > 0

    # one process on the concatenation of both ranks' batches reaches the same VQ statistics
    reference = VQ(DIM, codebook_size=16, kmeans_iters=3)
    reference.load_state_dict({k[3:]: v for k, v in init_state.items() if k.startswith("vq.")})
    per_rank = [data[r::2] for r in range(2)]
    for step in range(STEPS):
        torch.manual_seed(1000 + step)
        reference(torch.cat([part[step * BATCH : (step + 1) * BATCH] for part in per_rank]))
    for key, value in reference.state_dict().items():
        torch.testing.assert_close(rank0[f"vq.{key}"], value, rtol=1e-5, atol=1e-5)
