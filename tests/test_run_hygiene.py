"""A run does what its config says and nothing else (issue 18, "runs that do what their config says"):
`logger=none` means no logger, no checkpoint unless a callback asks for one, training in train mode
(dropout and lora_dropout on) whatever trains, evaluation with dropout off, the resolved config in the
run dir wherever it is, and a progress bar label that is right for step budgets."""

from __future__ import annotations

import importlib.util
import json
import warnings
from pathlib import Path
from types import SimpleNamespace

import lightning.pytorch as pl
import pytest
import torch
from torch import nn

from tests.conftest import compose_config, run_train

# Tiny model, tiny task, two steps in one epoch (7 rows at batch 4), validation at its end.
TINY = ("model=tiny", "task=tiny_rerank", "trainer.max_epochs=-1", "trainer.max_steps=2", "evaluate.validation_task_metric=false",
        "evaluate.retention=false", "export=false", "logger=none", "~callbacks.checkpoint")


# ------------------------------------------------------------------------------------- progress bar label

def test_train_description_for_epoch_and_step_budgets():
    from loki.lightning.progress import train_description

    assert train_description(3, 7, -1, 30) == "Step 7/30, epoch 3"  # Lightning's rich bar said "Epoch 3/-2"
    assert train_description(2, 10, 5, -1) == "Epoch 2/4"  # epochs 0..4
    assert train_description(0, 2, 5, 3) == "Epoch 0/4, step 2/3"  # both budgets: whichever ends first
    assert train_description(3, 7, -1, -1) == "Epoch 3"  # no budget at all: nothing to divide by


def test_the_bar_overrides_a_hook_lightning_still_calls():
    # TrainProgressBar relabels through RichProgressBar._get_train_description (private): if Lightning renames
    # it, the override would silently stop working, so this fails first.
    import inspect

    from lightning.pytorch.callbacks import RichProgressBar

    assert "_get_train_description(" in inspect.getsource(RichProgressBar.on_train_epoch_start)


# ------------------------------------------------------------------------------------- trainer options

def _options(callbacks: list, logger=None, *overrides: str) -> dict:
    from loki.recipe import trainer_options

    cfg = compose_config("train", "model=tiny", *overrides)
    return trainer_options(cfg, SimpleNamespace(callbacks=callbacks, logger=logger, run_dir=Path("unused")))


def test_trainer_gets_no_logger_and_no_checkpoint_unless_configured():
    from lightning.pytorch.callbacks import ModelCheckpoint
    from lightning.pytorch.loggers import CSVLogger

    bare = _options([])
    assert bare["logger"] is False and bare["enable_checkpointing"] is False
    trainer = pl.Trainer(**bare, accelerator="cpu")
    assert trainer.logger is None and trainer.checkpoint_callback is None  # Lightning added neither default

    checkpoint, csv = ModelCheckpoint(dirpath="unused"), CSVLogger("unused")
    configured = _options([checkpoint], csv)
    assert configured["logger"] is csv and configured["enable_checkpointing"] is True
    assert pl.Trainer(**configured, accelerator="cpu").checkpoint_callback is checkpoint
    # An explicit trainer.enable_checkpointing is the user's word: left to the Trainer's config.
    assert "enable_checkpointing" not in _options([], None, "+trainer.enable_checkpointing=true")


# ------------------------------------------------------------------------------------- a whole run

def test_logger_none_without_checkpoint_writes_only_the_run_and_evaluate_reads_it(tmp_path, monkeypatch, capfd):
    monkeypatch.chdir(tmp_path)  # Lightning's defaults would write lightning_logs/ under the working dir or the run dir
    run_dir = tmp_path / "elsewhere" / "run"  # paths.output_dir set by hand: there is no .hydra/ here
    metrics = run_train(run_dir, *TINY, "loki=off", "export=true", f"paths.cache_dir={tmp_path / 'cache'}")
    out = capfd.readouterr().out
    assert metrics["steps"] == 2
    assert not list(tmp_path.rglob("lightning_logs")) and not list(tmp_path.rglob("*.ckpt"))
    if importlib.util.find_spec("rich") is not None:  # without rich, Lightning's tqdm bar (no epoch budget shown)
        assert "Step 2/2, epoch 0" in out and "/-2" not in out  # the bar's label at the last step

    # The run dir holds its own resolved config, and loki.evaluate reads it (no .hydra/ anywhere).
    from omegaconf import OmegaConf

    from loki.evaluate import evaluate_run

    text = (run_dir / "config.yaml").read_text()
    saved = OmegaConf.load(run_dir / "config.yaml")
    assert "${" not in text and saved.paths.output_dir == str(run_dir) and saved.method_name == "full"
    assert not (run_dir / ".hydra").exists()
    again = evaluate_run(run_dir, {"eval": {"benchmarks": None}}, device="cpu")  # the task metric only
    assert again["task_metrics"] == pytest.approx(metrics["task_metrics"])  # the same model, evaluated the same way


def test_default_callbacks_still_checkpoint(tmp_path):
    run_dir = tmp_path / "run"
    overrides = [o for o in TINY if o not in ("~callbacks.checkpoint", "logger=none")]
    run_train(run_dir, *overrides, "loki=off", f"paths.cache_dir={tmp_path / 'cache'}")
    assert sorted(p.relative_to(run_dir).as_posix() for p in run_dir.rglob("*.ckpt")) == ["checkpoints/last.ckpt"]
    assert not list(tmp_path.rglob("lightning_logs"))  # the CSV logger writes under csv/


# ------------------------------------------------------------------------------------- train / eval modes

class ModeProbe(pl.Callback):
    """A callback (the recipe instantiates it from `+callbacks.probe`) that records, in training, whether every
    module is in train mode and whether two forward passes differ, and the same in validation."""

    seen: dict = {}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        seen = ModeProbe.seen
        seen.setdefault("train_all_training", []).append(all(m.training for m in pl_module.modules()))
        dropouts = [m for m in pl_module.modules() if isinstance(m, nn.Dropout) and m.p > 0]
        seen.setdefault("train_dropouts", []).append((len(dropouts), all(m.training for m in dropouts)))
        seen["attention_dropout"] = pl_module.model.config.attention_dropout  # functional dropout (no module)
        if trainer.global_step >= 1:  # LoRA factors start at a zero delta: compare after one update
            seen.setdefault("train_passes_differ", []).append(_two_passes_differ(pl_module, batch))

    def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0):
        seen = ModeProbe.seen
        seen.setdefault("val_none_training", []).append(not any(m.training for m in pl_module.model.modules()))
        seen.setdefault("val_passes_differ", []).append(_two_passes_differ(pl_module, batch))


def _two_passes_differ(pl_module, batch) -> bool:
    with torch.no_grad():
        inputs = {"input_ids": batch["input_ids"], "attention_mask": batch.get("attention_mask")}
        return not torch.equal(pl_module.model(**inputs).logits, pl_module.model(**inputs).logits)


POSITIONS = [list(range(0, 64, 4))] * 4  # 16 of the tiny model's 64 rows in each of its 4 layers: q = 0.25

# What trains, and its only dropout: the model's attention dropout (applied functionally by Qwen2's attention), or
# LoRA's nn.Dropout on the layer input (whose delta starts at 0, so it shows only after an update).
ATTENTION = ("+model.config.attention_dropout=0.3",)
LORA = ("lora=r16", "lora.rank=4", "lora.dropout=0.5", "optimizer.lr=0.05")  # a large lr: a visible delta after one step
METHODS = {
    "full": ("attention", "loki=off", *ATTENTION),
    "loki-hook": ("attention", "loki.impl=hook", *ATTENTION),
    "loki-rows": ("attention", "loki.impl=rows", *ATTENTION),
    "loki+lora": ("lora", "loki.impl=rows", *LORA),
    "peft-lora": ("lora", "loki=off", *LORA),
}


@pytest.mark.parametrize("method", list(METHODS))
def test_training_runs_in_train_mode_and_validation_in_eval_mode(method, tmp_path, monkeypatch):
    from loki import recipe

    load = recipe.load_model_and_tokenizer

    def pretrained_like(model_cfg):  # from_pretrained returns eval mode; the tiny random model is built in train mode
        model, tokenizer = load(model_cfg)
        return model.eval(), tokenizer

    monkeypatch.setattr(recipe, "load_model_and_tokenizer", pretrained_like)
    positions = tmp_path / "positions.json"
    positions.write_text(json.dumps(POSITIONS))
    dropout, *method_overrides = METHODS[method]
    overrides = [*method_overrides, f"loki.positions={positions}", "loki.q=0.25", "+callbacks.probe._target_=tests.test_run_hygiene.ModeProbe"]
    ModeProbe.seen = {}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        run_train(tmp_path / "run", *TINY, *overrides, f"paths.cache_dir={tmp_path / 'cache'}")
    seen = ModeProbe.seen
    assert seen["train_all_training"] == [True, True]  # two steps
    n_dropouts, all_on = seen["train_dropouts"][0]
    if dropout == "lora":
        assert n_dropouts > 0 and all_on and seen["attention_dropout"] == 0.0  # LoRA's dropout is the only one
    else:
        assert n_dropouts == 0 and seen["attention_dropout"] == 0.3  # the model's is the only one
    assert seen["train_passes_differ"] == [True]  # dropout draws a new mask each pass
    assert seen["val_none_training"] and all(seen["val_none_training"])
    assert seen["val_passes_differ"] and not any(seen["val_passes_differ"])  # evaluation is deterministic
    assert not [w for w in caught if "eval mode at the start of training" in str(w.message)]


# ------------------------------------------------------------------------------------- where runs go

def test_log_dir_is_the_checkouts_outputs_wherever_the_command_runs(tmp_path, monkeypatch):
    from tests.conftest import REPO

    monkeypatch.delenv("LOKI_LOG_DIR")  # the default, not the test session's dir
    monkeypatch.chdir(tmp_path)  # a command started elsewhere: a relative default would land under tmp_path
    cfg = compose_config("train", "model=tiny", "task=tiny_rerank")
    assert cfg.paths.log_dir == str(REPO.resolve() / "outputs")
    monkeypatch.setenv("LOKI_LOG_DIR", str(tmp_path / "mine"))  # the variable still moves them
    assert compose_config("train", "model=tiny", "task=tiny_rerank").paths.log_dir == str(tmp_path / "mine")


def test_frontier_records_run_dirs_relative_to_the_checkout(tmp_path):
    from studies.frontier.run import _shown_path
    from tests.conftest import REPO

    inside = REPO.resolve() / "outputs" / "frontier" / "x" / "runs" / "full" / "lr0.001" / "seed0"
    assert _shown_path(inside) == "outputs/frontier/x/runs/full/lr0.001/seed0"  # committed points name no machine's folders
    assert _shown_path(tmp_path / "run") == str((tmp_path / "run").resolve())  # outside the checkout: absolute
