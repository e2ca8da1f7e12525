"""Lightning pieces shared by tests/test_implant.py, and a script that fits under DDP on 2 CPU processes.

Run as a script, it fits the hook, rows and LoRA modes one after the other with
`Trainer(accelerator="cpu", devices=2, strategy="ddp")` (Lightning relaunches this script for rank 1)
and every rank saves its final state dict as `<out>/<mode>_rank<r>.pt`.
"""

from __future__ import annotations

import argparse
import os
import sys

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # conftest's make_tiny_model
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the loki package

from conftest import make_tiny_model  # noqa: E402

from loki.lightning import LokiCallback  # noqa: E402

VOCAB = 259
# 2 layers of 32 rows: 4 selected rows per layer (q = 1/8), deliberately not contiguous.
POSITIONS = [[1, 5, 17, 30], [0, 2, 3, 31]]
MODES = {"hook": dict(impl="hook"), "rows": dict(impl="rows"), "lora": dict(impl="rows", lora_rank=2, lora_alpha=4)}


class TinyCausalLM(pl.LightningModule):
    """The usual fine-tuning module: causal LM loss, AdamW over every parameter that requires grad."""

    def __init__(self, model, lr: float = 1e-2, weight_decay: float = 0.1):
        super().__init__()
        self.model = model
        self.lr, self.weight_decay = lr, weight_decay

    def training_step(self, batch, batch_idx):
        (input_ids,) = batch
        return self.model(input_ids=input_ids, labels=input_ids).loss

    def configure_optimizers(self):
        params = [p for p in self.parameters() if p.requires_grad]
        return torch.optim.AdamW(params, lr=self.lr, weight_decay=self.weight_decay)


def token_batches(samples: int = 4, seq: int = 12, batch_size: int = 2, seed: int = 1) -> DataLoader:
    """Fixed random token sequences, not shuffled, so two runs see the same batches in the same order."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (samples, seq), generator=g)
    return DataLoader(torch.utils.data.TensorDataset(ids), batch_size=batch_size, shuffle=False)


def make_trainer(max_steps: int, callbacks, **kwargs) -> pl.Trainer:
    defaults = dict(
        accelerator="cpu",
        devices=1,
        max_steps=max_steps,
        max_epochs=100,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
    )
    defaults.update(kwargs)
    return pl.Trainer(callbacks=callbacks, **defaults)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--steps", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(1)  # two processes on a shared 2-core machine
    for mode, options in MODES.items():
        pl.seed_everything(0, verbose=False)
        module = TinyCausalLM(make_tiny_model())
        trainer = make_trainer(args.steps, [LokiCallback(POSITIONS, **options)], devices=2, strategy="ddp")
        # 8 samples: each rank gets its own 2 batches of 2 from the DistributedSampler.
        trainer.fit(module, token_batches(samples=8))
        state = {k: v.detach().clone() for k, v in module.model.state_dict().items()}
        torch.save(state, os.path.join(args.out, f"{mode}_rank{trainer.global_rank}.pt"))


if __name__ == "__main__":
    main()
