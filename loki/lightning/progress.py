"""Progress bars. The attribution loop's, in samples (all ranks together) with samples/s and ETA, built on
Lightning's public `Callback` hooks and plain tqdm (the Trainer runs with `enable_progress_bar=False` and
this callback instead). Fine-tuning's: Lightning's rich bar with a label that is right for step budgets.
"""

from __future__ import annotations

import sys

import lightning.pytorch as pl
from lightning.pytorch.callbacks import RichProgressBar
from tqdm import tqdm


class SamplesProgressBar(pl.Callback):
    """One bar on rank 0, sized in samples; each rank scores about 1/world_size of them in step."""

    def __init__(self, total_samples: int, refresh_every: int = 1):
        self.total_samples = int(total_samples)
        self.refresh_every = max(1, int(refresh_every))
        self._done_here = 0
        self.bar: tqdm | None = None

    def on_predict_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._done_here = 0
        if trainer.is_global_zero:
            # smoothing=0: rate and ETA over the whole run so far, not the last few (uneven) batches
            self.bar = tqdm(total=self.total_samples, desc="KVA", unit="samples", file=sys.stdout, smoothing=0, dynamic_ncols=True)

    def on_predict_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        self._done_here += len(batch["ids"])
        if self.bar is None:
            return
        done = min(self.total_samples, self._done_here * trainer.world_size)  # other ranks move in step
        if (batch_idx + 1) % self.refresh_every == 0 or done == self.total_samples:
            self.bar.update(done - self.bar.n)

    def on_predict_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.bar is not None:
            self.bar.update(self.total_samples - self.bar.n)
            self.bar.close()
            self.bar = None

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def train_description(current_epoch: int, global_step: int, max_epochs: int | None, max_steps: int | None) -> str:
    """The training bar's label. An epoch budget: "Epoch 2/4" (the last epoch is max_epochs - 1). A step
    budget (max_epochs=-1, where Lightning's own bar would say "Epoch 3/-2"): "Step 7/30, epoch 3"."""
    by_steps = max_steps is not None and max_steps > 0
    by_epochs = max_epochs is not None and max_epochs >= 0
    if by_steps and not by_epochs:
        return f"Step {global_step}/{max_steps}, epoch {current_epoch}"
    label = f"Epoch {current_epoch}/{max_epochs - 1}" if by_epochs else f"Epoch {current_epoch}"
    return label + (f", step {global_step}/{max_steps}" if by_steps else "")


class TrainProgressBar(RichProgressBar):
    """Lightning's rich training bar, labelled by `train_description` and relabelled after every batch (the
    step count moves within an epoch). Only the label differs from the bar Lightning would pick."""

    def _get_train_description(self, current_epoch: int) -> str:
        # Lightning's (private) label hook, called when the epoch's task is created; tests/test_run_hygiene.py
        # checks it is still called, so a Lightning upgrade that renames it fails there.
        trainer = self.trainer
        label = train_description(current_epoch, trainer.global_step, trainer.max_epochs, trainer.max_steps)
        width = len(self.validation_description)  # same padding as Lightning's: no flicker beside "Validation"
        return f"{label:{width}}" if width > len(label) else label

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        if self.progress is not None and self.train_progress_bar_id is not None:
            label = self._get_train_description(trainer.current_epoch)
            style = self.theme.description
            self.progress.update(self.train_progress_bar_id, description=f"[{style}]{label}" if style else label)


def train_progress_bar() -> pl.Callback | None:
    """The bar a training run gets: TrainProgressBar when `rich` is installed; else None, and Lightning's
    tqdm bar (whose label has no epoch budget to get wrong) stays."""
    import importlib.util

    return TrainProgressBar() if importlib.util.find_spec("rich") is not None else None
