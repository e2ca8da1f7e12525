"""Lightning glue for multi-process and compiled training: tear the process group down after fit, compile
once the implant is installed, and gather a sharded (FSDP) model before merging."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import lightning.pytorch as pl
from torch import nn


def release_process_group(trainer: Any) -> None:
    """After fit: every rank meets once, then the process group is destroyed (no-op in one process)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        trainer.strategy.barrier("loki-fit-end")
        dist.destroy_process_group()


class CompileForTraining(pl.Callback):
    """`model.compile=true`: torch.compile the HF model in place once LoKI is installed (setup, before the
    first step); `plain_model` returns it to eager execution for evaluation and export."""

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "fit":
            from loki.models import compile_model

            compile_model(pl_module.model)


class FullModelGather(pl.Callback):
    """Under FSDP the module is still sharded when fit ends, and LoKI's in-place merge would write into
    shards. So at fit end, before LokiCallback's merge: every rank takes part in
    `trainer.strategy.lightning_module_state_dict()` (Lightning's full state dict: gathered, offloaded to
    the CPU, on rank 0 only); LoKI's handle on the sharded model is marked merged (nothing is merged in
    place); rank 0 rebuilds the plain model from the base weights, installs the same implant (or peft
    LoRA), loads the gathered state and merges: `setup.gathered_model`. DDP and DeepSpeed ZeRO-2 keep whole
    weights on every rank, so this does nothing there."""

    def __init__(self, setup: Any, rebuild: Callable[[dict], nn.Module]):
        # setup: the recipe's Setup (its loki_callback and, after fit, gathered_model);
        # rebuild: gathered LightningModule state dict -> the plain merged HF model (loki.recipe.rebuild_trained_model)
        self.setup_, self.rebuild = setup, rebuild

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        from lightning.pytorch.strategies import FSDPStrategy

        if not isinstance(trainer.strategy, FSDPStrategy):
            return
        state = trainer.strategy.lightning_module_state_dict()
        implant = self.setup_.loki_callback
        if implant is not None and implant.handle is not None:
            implant.handle.merged = True  # the sharded copy is discarded; the rebuilt one is merged below
        if trainer.is_global_zero:
            self.setup_.gathered_model = self.rebuild(state)
