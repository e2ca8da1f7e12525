"""`LokiCallback`: LoKI implanting as a Lightning callback (install in `setup`, merge at the end of fit)."""

from __future__ import annotations

import os
from typing import Any

import lightning.pytorch as pl
from omegaconf import OmegaConf
from torch import nn

from loki.arch import dims
from loki.errors import LokiError
from loki.implant import LokiHandle, attach_optimizer, check_optimizer_holds, check_options, install, merge, positions_digest
from loki.positions import load_positions, validate_positions


class LokiCallback(pl.Callback):
    """Implant LoKI into `pl_module.model` for `Trainer.fit` and hand back a plain HF model at the end.

    Lightning's order in fit: `setup` (here: freeze + install, before `configure_optimizers`) ->
    checkpoint model weights restored on resume (the LoKI parameters already exist, so they load) ->
    strategy setup (DDP wrap, optimizers) -> `on_fit_start` (here: check the optimizers and attach the
    weight-decay guard) -> optimizer state restored -> training -> `on_fit_end` (here: merge).

    After fit (or an exception), `pl_module.model` is an ordinary HF model with the trained rows merged,
    no LoKI modules, no hooks, and every parameter frozen (requires_grad=False). Lightning checkpoints
    written during fit hold the LoKI layout (e.g. `down_proj.rows`) and resume with the same callback
    settings; use `export_model` (or the merged model) for a portable result.
    """

    def __init__(
        self,
        positions,
        impl: str = "hook",
        lora_rank: int = 0,
        lora_alpha: float | None = None,
        lora_dropout: float = 0.0,
    ):
        check_options(impl, lora_rank, lora_alpha, lora_dropout)
        if OmegaConf.is_config(positions):  # hydra.utils.instantiate passes a ListConfig by default
            positions = OmegaConf.to_container(positions, resolve=True)
        self.positions = load_positions(positions)  # unreadable / non-JSON files fail at construction
        self.positions_source = str(positions) if isinstance(positions, (str, os.PathLike)) else "positions"
        self.impl, self.lora_rank, self.lora_alpha, self.lora_dropout = impl, lora_rank, lora_alpha, lora_dropout
        self.handle: LokiHandle | None = None

    @staticmethod
    def _hf_model(pl_module: pl.LightningModule) -> nn.Module:
        model = getattr(pl_module, "model", None)
        if not isinstance(model, nn.Module):
            raise LokiError("LokiCallback needs the Hugging Face model at `pl_module.model`, but there is none.")
        return model

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        model = self._hf_model(pl_module)
        if self.handle is not None and not self.handle.merged and self.handle.model is model:
            return  # already installed on this model (setup called twice)
        # Checked here first so that an error names the positions file, not just "positions".
        model_dims = dims(model)
        validate_positions(self.positions, model_dims.num_layers, model_dims.hidden_size, self.positions_source)
        self.handle = install(model, self.positions, self.impl, self.lora_rank, self.lora_alpha, self.lora_dropout)

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.handle is None:
            return
        check_optimizer_holds(self.handle, trainer.optimizers)
        for optimizer in trainer.optimizers:
            attach_optimizer(self.handle, optimizer)

    def _merge(self, pl_module: pl.LightningModule) -> None:
        if self.handle is not None and not self.handle.merged:
            merge(self.handle.model, self.handle)

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._merge(pl_module)

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self._merge(pl_module)

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "fit":
            self._merge(pl_module)

    def summary(self) -> dict[str, Any]:
        """Parameter counts of the installed implant (available from `setup` on, also after fit)."""
        if self.handle is None:
            raise LokiError("LokiCallback.summary() is available once Trainer.fit has called setup.")
        return self.handle.summary()

    # Checkpoints remember what they were trained with, so a resume with other positions fails clearly.
    def state_dict(self) -> dict[str, Any]:
        return {"mode": "lora" if self.lora_rank else self.impl, "lora_rank": self.lora_rank, "positions_sha1": positions_digest(self.positions)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        mine = self.state_dict()
        for key, value in mine.items():
            if key in state_dict and state_dict[key] != value:
                raise LokiError(
                    f"the checkpoint was trained with LoKI {key}={state_dict[key]!r} but this run has {value!r}; "
                    "resume with the same positions, loki.impl and lora.rank."
                )
