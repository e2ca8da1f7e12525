"""`LokiCallback`: LoKI implanting as a Lightning callback (install in `setup`, merge at the end of fit)."""

from __future__ import annotations

import os
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.strategies import DDPStrategy, DeepSpeedStrategy, SingleDeviceStrategy
from omegaconf import OmegaConf
from torch import nn

from loki.arch import dims
from loki.errors import LokiError
from loki.implant import (
    LokiHandle,
    RowPull,
    attach_optimizer,
    attach_row_scales,
    check_optimizer_holds,
    check_options,
    install,
    merge,
    positions_digest,
)
from loki.positions import load_positions, validate_positions
from loki.store import model_identity

LEAN_FORMAT = 1  # version of checkpoint["loki"], the lean checkpoint's LoKI section


class LokiCallback(pl.Callback):
    """Implant LoKI into `pl_module.model` for `Trainer.fit` and hand back a plain HF model at the end.

    Lightning's order in fit: `setup` (here: freeze + install, before `configure_optimizers`) ->
    on resume, `on_load_checkpoint` (here: check the base model and positions, put the trainable state
    back into the LoKI parameters, which already exist) -> strategy setup (DDP wrap, optimizers) ->
    `on_fit_start` (here: check the optimizers and attach the weight-decay guard) -> optimizer state
    restored -> training -> `on_fit_end` (here: merge).

    After fit (or an exception), `pl_module.model` is an ordinary HF model with the trained rows merged,
    no LoKI modules, no hooks, and every parameter frozen (requires_grad=False).

    Lean checkpoints (single device and DDP): a Lightning checkpoint written during fit holds no frozen
    weight. `checkpoint["state_dict"]` is empty and `checkpoint["loki"]` holds the trainable state (the
    `[k, F]` rows or LoRA factors; for impl=hook the selected rows of each masked weight), the positions'
    digest and the base model's identity (`loki.store.model_identity`); optimizer and loop state stay
    where Lightning keeps them (for impl=hook the all-zero optimizer state of unselected rows is stored
    compactly). Resuming rebuilds the run from the base model plus that state, and refuses a checkpoint
    of another base model or other positions. Use `export_model` (or the merged model) for a portable result.
    """

    def __init__(
        self,
        positions,
        impl: str = "hook",
        lora_rank: int = 0,
        lora_alpha: float | None = None,
        lora_dropout: float = 0.0,
        model_name: str | None = None,
        row_scales=None,
        l2sp: float = 0.0,
        l2sp_row_weights=None,
    ):
        check_options(impl, lora_rank, lora_alpha, lora_dropout)
        if row_scales is not None and lora_rank:
            raise LokiError("per-row learning rates (loki.soft) apply to the rows themselves, not to LoRA on them; use lora.rank=0.")
        self.row_scales = row_scales  # soft selection: one update factor per selected row (positions' order), or None
        if OmegaConf.is_config(l2sp_row_weights):
            l2sp_row_weights = OmegaConf.to_container(l2sp_row_weights, resolve=True)
        if not float(l2sp) >= 0:
            raise LokiError(f"loki.l2sp (the L2 pull's weight) must be 0 or more, got {l2sp!r}.")
        self.l2sp, self.l2sp_row_weights = float(l2sp), l2sp_row_weights  # L2-SP on the rows: weight, per-row weights (positions' order) or None = 1
        if OmegaConf.is_config(positions):  # hydra.utils.instantiate passes a ListConfig by default
            positions = OmegaConf.to_container(positions, resolve=True)
        self.positions = load_positions(positions)  # unreadable / non-JSON files fail at construction
        self.positions_source = str(positions) if isinstance(positions, (str, os.PathLike)) else "positions"
        self.impl, self.lora_rank, self.lora_alpha, self.lora_dropout = impl, lora_rank, lora_alpha, lora_dropout
        self.handle: LokiHandle | None = None
        self.model_name = model_name  # recorded in checkpoints beside the weights fingerprint
        self.base_identity: dict | None = None  # taken at install, before any row moves
        self.lean = False  # lean checkpoints for this fit (strategies whose state dict Lightning loads itself)
        self._module_strict_loading: bool | None = None

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
        if self.l2sp > 0:  # taken now, at the base weights (a resume loads its trained rows after setup)
            if not isinstance(getattr(pl_module, "penalties", None), dict):
                raise LokiError("loki.l2sp needs a LightningModule with a `penalties` dict (loki.lightning.CausalLMModule has one).")
            pl_module.penalties["l2sp"] = RowPull(self.handle, self.l2sp, self.l2sp_row_weights)
        strategy = getattr(trainer, "strategy", None)
        # FSDP and DeepSpeed shard and load state dicts their own way (and restore after strategy setup):
        # they keep Lightning's normal checkpoints.
        self.lean = isinstance(strategy, (SingleDeviceStrategy, DDPStrategy)) and not isinstance(strategy, DeepSpeedStrategy)
        if self.lean:
            # Taken now, before any row moves (impl=hook trains the weights the fingerprint samples).
            name = self.model_name or getattr(getattr(model, "config", None), "_name_or_path", "") or type(model).__name__
            self.base_identity = model_identity(model, name)
            # Lightning loads checkpoint["state_dict"] into the module before callbacks see the checkpoint;
            # a lean one is empty, so that load must not demand the frozen keys (restored at merge).
            self._module_strict_loading = pl_module.strict_loading
            pl_module.strict_loading = False

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.handle is None:
            return
        self._check_master_precision()
        check_optimizer_holds(self.handle, trainer.optimizers)
        for optimizer in trainer.optimizers:
            if self.row_scales is not None:  # first: its snapshot must precede the guard's weight decay, so the decay is scaled too
                attach_row_scales(self.handle, optimizer, self.row_scales)
            attach_optimizer(self.handle, optimizer)

    def _check_master_precision(self) -> None:
        # A precision plugin such as bf16-true converts the whole module after setup, fp32 masters included.
        for p in self.handle.trainable_parameters():
            if p.dtype in (torch.bfloat16, torch.float16):
                name, what = str(p.dtype).removeprefix("torch."), "weights" if self.handle.mode == "hook" else "master rows"
                raise LokiError(
                    f"the trainer's precision converted LoKI's trainable {what} to {name} (precision=bf16-true or 16-true), so small updates would round away; use "
                    "precision=bf16-mixed, with model.dtype=bfloat16 and loki.impl=rows for bf16 weights."
                )

    def _merge(self, pl_module: pl.LightningModule) -> None:
        penalties = getattr(pl_module, "penalties", None)
        if isinstance(penalties, dict):
            penalties.pop("l2sp", None)  # it reads LoKI's trainable tensors, which merge removes
        if self._module_strict_loading is not None:
            pl_module.strict_loading = self._module_strict_loading
            self._module_strict_loading = None
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
        self._check_same_settings(state_dict)

    def _check_same_settings(self, saved: dict[str, Any]) -> None:
        for key, value in self.state_dict().items():
            if key in saved and saved[key] != value:
                raise LokiError(
                    f"the checkpoint was trained with LoKI {key}={saved[key]!r} but this run has {value!r}; "
                    "resume with the same positions, loki.impl and lora.rank."
                )

    # ------------------------------------------------------------------ lean checkpoints

    def _trainable_entries(self, pl_module: pl.LightningModule) -> dict[str, tuple[torch.Tensor, torch.Tensor | None]]:
        """State-dict key -> (parameter, selected rows): rows are None where the whole parameter trains."""
        names = {id(p): name for name, p in pl_module.named_parameters(remove_duplicate=False)}
        if self.handle.mode == "hook":
            return {names[id(w)]: (w, idx) for w, idx in zip(self.handle.masked_weights, self.handle.row_indices)}
        return {names[id(p)]: (p, None) for p in self.handle.trainable_parameters()}

    def _lean_active(self) -> bool:
        return self.lean and self.handle is not None and not self.handle.merged

    def on_save_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]) -> None:
        if not self._lean_active():
            return  # after fit the model is a plain merged HF model: a normal checkpoint
        state = checkpoint["state_dict"]
        trainable = {}
        for key, (_, index) in self._trainable_entries(pl_module).items():
            value = state[key]
            trainable[key] = value if index is None else value.index_select(0, index.to(value.device))
        checkpoint["state_dict"] = {}  # the frozen weights are the base model's: never written again
        checkpoint["loki"] = {
            "format": LEAN_FORMAT,
            "base_model": self.base_identity,
            **self.state_dict(),
            "trainable": trainable,
            "compact_optimizer_state": [] if self.handle.mode != "hook" else self._compact_optimizer_state(trainer, checkpoint),
        }

    def _compact_optimizer_state(self, trainer: pl.Trainer, checkpoint: dict[str, Any]) -> list[dict[str, Any]]:
        """impl=hook: keep only the selected rows of optimizer state tensors whose unselected rows are all zero.

        A zero gradient and zero initial state keep Adam's moments and SGD's momentum at exactly zero on
        the unselected rows (the guard applies decay to selected rows only), so writing zeros back on
        load is exact. A tensor with any non-zero unselected value (e.g. the snapshot fallback of an
        optimizer with coupled decay) is kept whole.
        """
        rows = {id(w): idx for w, idx in zip(self.handle.masked_weights, self.handle.row_indices)}
        compacted = []
        for opt_i, (optimizer, saved) in enumerate(zip(trainer.optimizers, checkpoint.get("optimizer_states", []))):
            params = [p for group in optimizer.param_groups for p in group["params"]]
            for p_i, p in enumerate(params):  # saved["state"] is keyed by this order
                index, entry = rows.get(id(p)), saved["state"].get(p_i)
                if index is None or entry is None:
                    continue
                # optimizer.state_dict() shares the live per-parameter dicts: edit a copy, never the optimizer.
                entry = saved["state"][p_i] = dict(entry)
                for name, value in list(entry.items()):
                    if not (torch.is_tensor(value) and value.shape == p.shape):
                        continue
                    keep = index.to(value.device)
                    drop = torch.ones(value.shape[0], dtype=torch.bool, device=value.device)
                    drop[keep] = False
                    if value[drop].count_nonzero() == 0:
                        entry[name] = value.index_select(0, keep)
                        compacted.append({"optimizer": opt_i, "param": p_i, "name": name, "shape": tuple(value.shape), "rows": index.clone()})
        return compacted

    def on_load_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]) -> None:
        # Runs after Lightning loaded checkpoint["state_dict"] (empty for a lean checkpoint) and before the
        # optimizer state is restored, so everything the run needs is back before training.
        if not self._lean_active():
            return
        lean = checkpoint.get("loki")
        if lean is None:
            # A full checkpoint (written before lean checkpoints, or by another setup): strict loading was
            # off, so check here that it held every tensor.
            missing = set(pl_module.state_dict()) - set(checkpoint.get("state_dict", {}))
            if missing:
                raise LokiError(
                    f"the checkpoint has neither LoKI's lean state nor the full model ({len(missing)} tensors missing, "
                    f"e.g. {sorted(missing)[0]}); resume from a checkpoint written by a LoKI run."
                )
            return
        self._check_same_base_model(lean.get("base_model") or {})
        self._check_same_settings(lean)
        entries = self._trainable_entries(pl_module)
        saved = lean["trainable"]
        if set(saved) != set(entries):
            raise LokiError(
                f"the checkpoint holds LoKI state for {len(saved)} tensors but this run trains {len(entries)} "
                f"(e.g. {sorted(set(saved) ^ set(entries))[0]}); resume with the same model and LoKI settings."
            )
        with torch.no_grad():
            for key, (param, index) in entries.items():
                value = saved[key]
                target_shape = param.shape if index is None else (len(index), *param.shape[1:])
                if tuple(value.shape) != tuple(target_shape):
                    raise LokiError(
                        f"the checkpoint's {key} has shape {tuple(value.shape)} but this run's has {tuple(target_shape)}; "
                        "resume with the same model and LoKI settings."
                    )
                if index is None:
                    param.copy_(value)
                else:
                    param.index_copy_(0, index.to(param.device), value.to(device=param.device, dtype=param.dtype))
        for item in lean.get("compact_optimizer_state", []):
            entry = checkpoint["optimizer_states"][item["optimizer"]]["state"][item["param"]]
            compact = entry[item["name"]]
            full = compact.new_zeros(item["shape"])
            entry[item["name"]] = full.index_copy_(0, item["rows"].to(full.device), compact)
        lean["compact_optimizer_state"] = []  # expanded in place: a second call must not expand again

    def _check_same_base_model(self, saved: dict[str, Any]) -> None:
        mine = self.base_identity or {}
        for key in ("config_sha256", "weights_fingerprint"):
            if saved.get(key) != mine.get(key):
                what = "architecture config" if key == "config_sha256" else "weights"
                raise LokiError(
                    f"the checkpoint was trained from base model {saved.get('name')!r} with other {what} than this "
                    f"run's {mine.get('name')!r} ({key} {str(saved.get(key))[:12]} vs {str(mine.get(key))[:12]}); "
                    "resume from the base model the checkpoint was trained from."
                )
