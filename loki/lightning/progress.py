"""A progress bar for the attribution loop, in samples (all ranks together) with samples/s and ETA.

Built on Lightning's public `Callback` hooks and plain tqdm, so it does not depend on the internals of
Lightning's own progress bars. The Trainer runs with `enable_progress_bar=False` and this callback instead.
"""

from __future__ import annotations

import sys

import lightning.pytorch as pl
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
