"""The attribution stage as a Lightning predict loop: KVA over MMLU prompts, streamed to a resumable store.

- `KVAModule`: a frozen HF model whose `predict_step` runs `loki.kva.attribute` (with gradients).
- `ScoreWriter`: each rank streams its batches to its own shard files; rank 0 marks the store complete.
- `run_attribution`: the whole stage (checks, resume, predict, heatmap); `attribute.py` calls it, and so
  does `train.py` when `loki.scores=auto` finds no store for its settings.
The store format is `loki.store`'s.
"""

from __future__ import annotations

import logging
import math
import time
import uuid
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import BasePredictionWriter
from torch.utils.data import DataLoader

from loki import arch
from loki.attribution import PadCollate, build_prompts, check_kva_settings, check_prompts, context_length, prompt_format
from loki.device import global_rank, pad_token_id
from loki.errors import LokiError
from loki.kva import attribute
from loki.lightning.progress import SamplesProgressBar
from loki.store import HEATMAP_FILE, ScoreStore, id_sort_key, mark_complete, prepare_store, store_meta, stored_ids, write_shard

log = logging.getLogger(__name__)

# The keyword arguments of loki.kva.attribute that a stage's `kva` settings carry.
ATTRIBUTE_KWARGS = ("recipe", "steps", "scope", "objective", "times_activation")
ESTIMATE_AFTER = 8  # prompts timed before the whole stage's time is estimated (a run this short prints no estimate)
LONG_ATTRIBUTION_S = 120.0  # an estimate at least this long comes with how to shorten the stage
PUBLISHED_DIR = Path(__file__).resolve().parents[1] / "published"  # loki.positions=published (loki/recipe.py)
estimate_clock = time.monotonic  # what AttributionEstimate times with (tests put a fake clock here)


def format_duration(seconds: float) -> str:
    """'45 s', '12 min', '1 h 10 min': as precise as an estimate deserves."""
    seconds = max(0.0, float(seconds))
    if seconds < 90:
        return f"{seconds:.0f} s"
    minutes = round(seconds / 60)
    return f"{minutes} min" if minutes < 60 else f"{minutes // 60} h {minutes % 60:02d} min"


class AttributionEstimate(pl.Callback):
    """Says how big the attribution stage is before its first prompt, and, once the first `after`
    prompts are scored, how long the whole stage should take at their rate. When that is at least
    `long_s`, the estimate is a warning that also says how to shorten the stage: fewer prompts per
    subject or in all, or the published positions where this model has some. Prompts run longest
    first, so the estimate errs long."""

    def __init__(
        self,
        prompts: int,
        layers: int,
        rows: int,
        model_name: str,
        data: dict,
        after: int = ESTIMATE_AFTER,
        long_s: float = LONG_ATTRIBUTION_S,
        clock=None,
    ):
        self.prompts, self.layers, self.rows = int(prompts), int(layers), int(rows)
        self.model_name, self.data = model_name, data
        self.after, self.long_s, self.clock = int(after), float(long_s), clock or estimate_clock
        self.started, self.done, self.reported = 0.0, 0, False

    def on_predict_start(self, trainer, pl_module) -> None:
        self.done, self.reported = 0, False
        if trainer.is_global_zero:
            log.info(
                "Attribution: %d prompts x %d layers x %d rows each (%d process(es)); timing the first %d prompts.",
                self.prompts, self.layers, self.rows, trainer.world_size, min(self.after, self.prompts),
            )
        self.started = self.clock()

    def on_predict_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        if self.reported:
            return
        self.done += len(batch["ids"])
        per_process = math.ceil(self.prompts / max(1, trainer.world_size))
        if self.done < min(self.after, per_process):
            return
        self.reported = True
        if self.done >= per_process or not trainer.is_global_zero:  # finished already: nothing to estimate
            return
        rate = (self.clock() - self.started) / self.done
        total = rate * per_process
        message = (
            f"Attribution: {rate:.2f} s per prompt over the first {self.done} prompts, so about "
            f"{format_duration(total)} for all {self.prompts} prompts x {self.layers} layers "
            f"({format_duration(total - rate * self.done)} left; the longest prompts go first, so this errs long)"
        )
        if total < self.long_s:
            log.info(message + ".")
            return
        log.warning(message + "; to shorten it: " + "; ".join(self.shorter()) + ".")

    def shorter(self) -> list[str]:
        """The settings that make this stage shorter, as overrides a user can paste."""
        per_subject, max_samples = self.data.get("per_subject"), self.data.get("max_samples")
        ways = [
            f"data.per_subject=N (fewer prompts per MMLU subject; now {per_subject})" if per_subject else "data.per_subject=N (prompts per MMLU subject)",
            f"data.max_samples=N (at most N prompts in all; now {max_samples})" if max_samples else "data.max_samples=N (at most N prompts in all)",
        ]
        if (PUBLISHED_DIR / self.model_name).is_dir():
            ways.append(f"or loki.positions=published (the positions published for {self.model_name}: no attribution at all)")
        return ways


class KVAModule(pl.LightningModule):
    """A frozen causal LM whose predict step returns KVA scores [B, L, D] for a batch of prompts.

    Needs `Trainer(inference_mode=False)`: attribution takes gradients with respect to activations.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        steps: int = 7,
        scope: str | None = None,
        objective: str = "prob",
        times_activation: bool | None = None,
        recipe: str = "paper",
    ):
        super().__init__()
        self.model = model.eval()
        self.model.requires_grad_(False)  # only activations need gradients, never weights
        # None: the recipe's own scope / activation factor (loki.kva.resolve_recipe)
        self.kva_settings = {"recipe": recipe, "steps": int(steps), "scope": scope, "objective": objective, "times_activation": times_activation}

    def predict_step(self, batch: dict, batch_idx: int = 0, dataloader_idx: int = 0) -> dict:
        if torch.is_inference_mode_enabled():
            raise LokiError("KVA needs gradients: build the Trainer with inference_mode=False.")
        with torch.enable_grad():
            scores = attribute(self.model, batch["input_ids"], batch["attention_mask"], targets=batch.get("targets"), **self.kva_settings)
        finite = torch.isfinite(scores).flatten(1).all(dim=1)
        if not bool(finite.all()):
            bad = batch["ids"][int((~finite).nonzero()[0])]
            raise LokiError(f"the attribution of sample '{bad}' is NaN or infinite; check the model's weights and dtype.")
        return {"ids": list(batch["ids"]), "scores": scores.detach().float().cpu()}


class ScoreWriter(BasePredictionWriter):
    """Streams each rank's batches to its own shard files; at the end rank 0 checks and marks the store complete."""

    def __init__(self, out_dir: str | Path, expected_ids: Iterable[str] = ()):
        super().__init__(write_interval="batch")
        self.out_dir = Path(out_dir)
        self.expected_ids = set(expected_ids)
        # A fresh session per process and launch: a resumed run never overwrites an earlier run's shards.
        self.session = f"{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:12]}"

    def write_on_batch_end(self, trainer, pl_module, prediction, batch_indices, batch, batch_idx, dataloader_idx=0):
        name = f"rank{trainer.global_rank:04d}-{self.session}-{dataloader_idx}-{batch_idx:06d}"
        write_shard(self.out_dir, name, prediction["ids"], prediction["scores"])
        # Lightning's predict loop records SIGTERM but never acts on it (its fit and evaluation loops do):
        # stop here, after the batch's shard is on disk, so a killed run resumes where it stopped.
        if getattr(trainer, "received_sigterm", False):
            from lightning.pytorch.utilities.exceptions import SIGTERMException

            raise SIGTERMException()

    def on_predict_end(self, trainer, pl_module):
        trainer.strategy.barrier("kva-shards-written")  # every rank's shards are on disk before rank 0 checks
        if trainer.is_global_zero:
            mark_complete(self.out_dir, self.expected_ids)
        trainer.strategy.barrier("kva-store-complete")


def run_attribution(
    model: torch.nn.Module,
    tokenizer: Any,
    rows: Sequence[dict],
    *,
    out_dir: str | Path,
    model_name: str,
    kva: dict,
    data: dict,
    batch_size: int = 8,
    trainer_kwargs: dict | None = None,
    logger: Any = None,
    callbacks: Sequence[pl.Callback] = (),
    heatmap_q: float | None = 0.05,
    progress: bool = True,
) -> ScoreStore | None:
    """Score `rows` into the store at `out_dir`, skipping samples already there; returns the store on rank 0.

    `kva`: recipe, steps, scope, objective, times_activation, target; `data`: how the rows were chosen
    (recorded in the store's meta).
    """
    kva = check_kva_settings(kva)
    if int(batch_size) < 1:
        raise LokiError(f"kva.batch_size must be a positive integer, got {batch_size!r}.")
    arch.dims(model)  # an unsupported architecture stops here
    style = data.get("prompt") or "letter"
    prompts = build_prompts(rows, tokenizer, kva["target"], data.get("system_prompt"), style)
    check_prompts(prompts, context_length(model))
    rank = global_rank()
    meta = store_meta(model, tokenizer, model_name, kva, data, prompt_format(style))
    out_dir = prepare_store(out_dir, meta, write=rank == 0)
    expected = [p["id"] for p in prompts]
    done = stored_ids(out_dir)
    # Longest first: the slowest batches show up early in the ETA; similar lengths share a batch (less padding).
    remaining = sorted((p for p in prompts if p["id"] not in done), key=lambda p: (-len(p["input_ids"]), id_sort_key(p["id"])))
    if done:
        log.info("Resuming %s: %d of %d samples already scored.", out_dir, len(expected) - len(remaining), len(expected))

    if remaining:
        loader = DataLoader(
            remaining, batch_size=int(batch_size), shuffle=False, collate_fn=PadCollate(pad_token_id(tokenizer), kva["target"] == "gold")
        )
        kwargs = dict(trainer_kwargs or {})
        kwargs.update(
            inference_mode=False,  # gradients in predict_step
            logger=logger if logger is not None else False,
            enable_checkpointing=False,
            enable_model_summary=False,
            enable_progress_bar=False,  # SamplesProgressBar instead: counted in samples, not batches
            default_root_dir=str(out_dir),  # never the working directory
            callbacks=[
                ScoreWriter(out_dir, expected),
                *([SamplesProgressBar(len(remaining))] if progress else []),
                AttributionEstimate(len(remaining), arch.dims(model).num_layers, arch.dims(model).hidden_size, model_name, data),
                *callbacks,
            ],
        )
        trainer = pl.Trainer(**kwargs)
        # KVAModule freezes the model; hand it back as it came (train.py fine-tunes it next).
        flags, was_training = [(p, p.requires_grad) for p in model.parameters()], model.training
        try:
            module = KVAModule(model, **{k: kva[k] for k in ATTRIBUTE_KWARGS if kva.get(k) is not None})
            trainer.predict(module, dataloaders=loader, return_predictions=False)
        finally:
            for parameter, flag in flags:
                parameter.requires_grad_(flag)
            model.train(was_training)
        if not trainer.is_global_zero:
            return None
    elif rank != 0:
        return None
    elif not ScoreStore.exists(out_dir):
        mark_complete(out_dir, expected)  # a run killed after its last shard but before marking completion

    store = ScoreStore(out_dir)
    if heatmap_q:
        from loki.plots import log_figure, selection_heatmap

        try:
            fig = selection_heatmap(store, float(heatmap_q), out_dir / HEATMAP_FILE)
        except LokiError as err:  # e.g. q*D < 1 on a tiny model: the scores are fine, only the picture is skipped
            log.warning("No heatmap: %s", err)
        else:
            if logger is not None:
                log_figure(logger, fig, out_dir / HEATMAP_FILE)
            import matplotlib.pyplot as plt

            plt.close(fig)
    return store
