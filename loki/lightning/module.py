"""The fine-tuning LightningModule (the attribution predict loop is `loki.lightning.attribution.KVAModule`).

The fine-tuning module is deliberately plain: the HF model lives at `self.model` (where LokiCallback
finds it), the loss is the causal-LM loss over `labels` (-100 = ignored), and the optimizer is built over
every parameter that still requires a gradient, so whatever LoKI, LoRA or nothing left trainable is what
trains. `loss` (LossConfig) may compute that loss with the output head on labelled positions only, and
may add a KL anchor to the base model's distributions on fixed prompts (loki.losses), for every method.
Callbacks may add penalty terms (`penalties`: name -> a callable returning a scalar), such as LoKI's L2
pull of the trained rows towards the base (loki.implant.RowPull); each is logged as `train/<name>`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

import lightning.pytorch as pl
import torch
from torch import nn

from loki.errors import LokiError
from loki.losses import AnchorTargets, anchor_kl, labelled_lm_loss
from loki.schema import LossConfig, LrScheduleConfig


LR_SCHEDULES = ("cosine", "linear", "constant")


def warmup_decay_lambda(warmup_steps: int, total_steps: int, kind: str = "cosine", min_ratio: float = 0.0) -> Callable[[int], float]:
    """LR multiplier: linear warm-up to 1, then cosine or linear decay to `min_ratio`, or constant."""
    if kind not in LR_SCHEDULES:  # checked now, not when warm-up ends
        raise LokiError(f"lr_schedule.kind must be one of {', '.join(LR_SCHEDULES)}, got {kind!r}.")

    def factor(step: int) -> float:
        if warmup_steps > 0 and step < warmup_steps:
            return (step + 1) / warmup_steps
        if kind == "constant":
            return 1.0
        span = max(1, total_steps - warmup_steps)
        progress = min(1.0, (step - warmup_steps) / span)
        if kind == "linear":
            decay = 1.0 - progress
        else:  # cosine
            decay = 0.5 * (1.0 + math.cos(math.pi * progress))
        return min_ratio + (1.0 - min_ratio) * decay

    return factor


class CausalLMModule(pl.LightningModule):
    """Supervised fine-tuning of `model` on batches of input_ids / attention_mask / labels."""

    def __init__(
        self,
        model: nn.Module,
        optimizer: Callable[..., torch.optim.Optimizer],
        lr_schedule: LrScheduleConfig | Mapping[str, Any] | None = None,
        loss: LossConfig | Mapping[str, Any] | None = None,
        anchor: AnchorTargets | None = None,
    ) -> None:
        super().__init__()
        self.model = model
        self.optimizer_factory = optimizer  # a partial from hydra (`_partial_: true`): takes the params
        if lr_schedule is None:  # no schedule given: the optimizer's lr throughout
            lr_schedule = LrScheduleConfig(kind="constant", warmup_ratio=0.0)
        self.lr_schedule = lr_schedule if isinstance(lr_schedule, LrScheduleConfig) else LrScheduleConfig(**lr_schedule)
        warmup_decay_lambda(0, 1, self.lr_schedule.kind)  # a bad kind fails at construction
        self.loss_config = loss if isinstance(loss, LossConfig) else LossConfig(**(loss or {}))
        if float(self.loss_config.anchor_weight) > 0 and anchor is None:
            raise LokiError("loss.anchor_weight > 0 needs the base model's anchor distributions (loki.losses.anchor_targets).")
        self.anchor = anchor
        self._anchor_order: torch.Tensor | None = None  # a seeded permutation of the anchor prompts, walked in batches
        self.penalties: dict[str, Callable[[], torch.Tensor]] = {}  # added to the training loss (set by callbacks in setup)

    def on_fit_start(self) -> None:
        # from_pretrained returns eval mode, retention "before" may leave it so, and Lightning keeps module
        # modes: train in train mode (dropout on, as the HF Trainer does), set here, after LokiCallback's
        # install (setup) and before Lightning checks the modes at the start of training.
        self.train()

    def forward(self, **batch: torch.Tensor):
        return self.model(**batch)

    def _loss(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        if self.loss_config.logits == "labelled":
            return labelled_lm_loss(self.model, batch)
        # position_ids: packed rows restart positions at each example (loki.data.chat packing)
        out = self.model(
            input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask"), position_ids=batch.get("position_ids"), labels=batch["labels"]
        )
        return out.loss

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss = self._loss(batch)
        size = batch["input_ids"].shape[0]
        self.log("train/loss", loss, prog_bar=True, batch_size=size)
        weight = float(self.loss_config.anchor_weight)
        if weight > 0:
            kl = anchor_kl(self.model, self.anchor.batch(self._anchor_rows(self.global_step)))
            self.log("train/anchor_kl", kl, batch_size=size)
            loss = loss + weight * kl
        for name, penalty in self.penalties.items():
            value = penalty()
            self.log(f"train/{name}", value.detach(), batch_size=size)
            loss = loss + value.to(loss.device)
        return loss

    def _anchor_rows(self, step: int) -> torch.Tensor:
        """The anchor prompts of optimizer step `step`: consecutive slices of one seeded permutation, so a
        resumed run reads the same prompts at the same step."""
        count, per_step = len(self.anchor), min(int(self.loss_config.anchor_batch), len(self.anchor))
        if self._anchor_order is None:
            self._anchor_order = torch.randperm(count, generator=torch.Generator().manual_seed(int(self.loss_config.anchor_seed)))
        start = (step * per_step) % count
        return self._anchor_order[(torch.arange(per_step) + start) % count]

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss = self._loss(batch)
        self.log("val/loss", loss, prog_bar=True, sync_dist=True, batch_size=batch["input_ids"].shape[0])
        return loss

    def configure_optimizers(self):
        params = [p for p in self.model.parameters() if p.requires_grad]
        optimizer = self.optimizer_factory(params)
        kind = self.lr_schedule.kind
        if kind == "constant" and not self.lr_schedule.warmup_ratio:
            return optimizer
        total = int(self.trainer.estimated_stepping_batches)
        warmup = int(round(float(self.lr_schedule.warmup_ratio) * total))
        factor = warmup_decay_lambda(warmup, total, kind, float(self.lr_schedule.min_ratio))
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
