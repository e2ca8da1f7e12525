"""Training telemetry for the logger: tokens per second, gradient norm and peak memory.

`Telemetry` logs, every `log_every_n_steps` optimizer steps (the Trainer's cadence unless given) and at the
first step:

- `perf/tokens_per_s`: non-padding tokens per second over the window, all ranks (this rank's count times the
  world size: the ranks see equal-sized batches of one sampler, so this is the usual estimate);
- `perf/tokens_per_s_per_device`: the same for this rank;
- `train/grad_norm`: L2 norm of all gradients before clipping (after unscaling under fp16), the trainable
  rows only under LoKI (the other rows' gradients are masked or absent);
- `perf/peak_memory_gb`: peak allocated CUDA memory since fit started, or the process's peak RSS on CPU.

Logged straight to `trainer.logger` from global rank 0, so it shows up at any step count (the Trainer's own
`self.log` cadence would hide short runs).
"""

from __future__ import annotations

import resource
import sys
import time
from typing import Any

import lightning.pytorch as pl
import torch


def count_tokens(batch: Any) -> int:
    """Non-padding tokens of a batch (non-zero attention_mask entries, else every input id)."""
    if isinstance(batch, dict):
        mask = batch.get("attention_mask")
        if isinstance(mask, torch.Tensor):
            return int(mask.count_nonzero().item())  # 0/1 masks, or segment ids of packed rows
        ids = batch.get("input_ids")
        if isinstance(ids, torch.Tensor):
            return int(ids.numel())
    return 0


def grad_norm(parameters) -> float | None:
    """L2 norm over every gradient present (None when no parameter has one)."""
    norms = [p.grad.detach().float().norm(2) for p in parameters if p.grad is not None]
    if not norms:
        return None
    return float(torch.linalg.vector_norm(torch.stack([n.to(norms[0].device) for n in norms]), 2).item())


def peak_memory_gb(device: torch.device | None) -> float:
    """Peak CUDA memory allocated on `device`, or the peak resident memory of this process on CPU, in GiB."""
    if device is not None and device.type == "cuda" and torch.cuda.is_available():
        return torch.cuda.max_memory_allocated(device) / 2**30
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return rss / (2**30 if sys.platform == "darwin" else 2**20)


class Telemetry(pl.Callback):
    """Tokens/s, grad norm and peak memory to the Trainer's logger (see the module docstring)."""

    def __init__(self, log_every_n_steps: int | None = None):
        self.log_every_n_steps = log_every_n_steps
        self._window_start: float | None = None
        self._window_tokens = 0
        self._total_tokens = 0
        self._fit_start: float | None = None
        self._grad_norm: float | None = None
        self._pending = False  # the optimizer step about to finish is a logged one

    def _every(self, trainer: pl.Trainer) -> int:
        return max(1, int(self.log_every_n_steps or trainer.log_every_n_steps or 1))

    def _logs_at(self, trainer: pl.Trainer, step: int) -> bool:
        return step == 1 or step % self._every(trainer) == 0 or (trainer.max_steps > 0 and step >= trainer.max_steps)

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if pl_module.device.type == "cuda" and torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats(pl_module.device)
        self._fit_start = self._window_start = time.perf_counter()
        self._window_tokens = self._total_tokens = 0

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int) -> None:
        tokens = count_tokens(batch)
        self._window_tokens += tokens
        self._total_tokens += tokens

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Any) -> None:
        # Only on steps that are logged: a pass over every gradient is not free at 8B.
        self._pending = self._logs_at(trainer, trainer.global_step + 1)
        self._grad_norm = grad_norm(pl_module.parameters()) if self._pending else None

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int) -> None:
        if not self._pending:  # not an optimizer step (accumulating), or not a logged one
            return
        self._pending = False
        now = time.perf_counter()
        elapsed = max(now - (self._window_start or now), 1e-9)
        per_device = self._window_tokens / elapsed
        metrics = {
            "perf/tokens_per_s_per_device": per_device,
            "perf/tokens_per_s": per_device * trainer.world_size,
            "perf/peak_memory_gb": peak_memory_gb(pl_module.device),
        }
        if self._grad_norm is not None:
            metrics["train/grad_norm"] = self._grad_norm
        self._window_start, self._window_tokens = now, 0
        if trainer.is_global_zero and trainer.logger is not None:
            trainer.logger.log_metrics(metrics, step=trainer.global_step)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        elapsed = max(time.perf_counter() - (self._fit_start or time.perf_counter()), 1e-9)
        metrics = {
            "perf/train_tokens_per_s": self._total_tokens / elapsed * trainer.world_size,
            "perf/train_tokens": self._total_tokens * trainer.world_size,
            "perf/peak_memory_gb": peak_memory_gb(pl_module.device),
        }
        if trainer.is_global_zero and trainer.logger is not None:
            trainer.logger.log_metrics(metrics, step=trainer.global_step)
