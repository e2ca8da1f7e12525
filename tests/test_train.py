"""`train.py` end to end on the tiny model: analyse, select, implant, evaluate, export — and the result
differs from the base model only in the selected rows. In-process (compose, then the recipe), plus one
true command-line run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from loki.errors import LokiError
from tests.conftest import compose_config, run_train

ROOT = Path(__file__).resolve().parents[1]
TINY = ("model=tiny", "task=tiny_rerank", "trainer.max_steps=3", "trainer.max_epochs=5", "evaluate.validation_task_metric=false")


def _train(tmp_path: Path, *overrides: str, run: str = "run") -> tuple[dict, Path]:
    run_dir = tmp_path / run
    return run_train(run_dir, *TINY, f"paths.cache_dir={tmp_path / 'cache'}", *overrides), run_dir


@pytest.mark.slow
def test_train_runs_the_whole_pipeline_and_touches_only_selected_rows(tmp_path):
    metrics, run_dir = _train(tmp_path, "loki.q=0.25", "loki.impl=rows")
    # Attribution ran first (no scores existed) and wrote its store where loki.scores=auto finds it.
    cfg = compose_config("train", *TINY, f"paths.cache_dir={tmp_path / 'cache'}")
    from loki import attribution

    assert (attribution.default_store(cfg) / "complete.json").exists()
    assert metrics["method"] == "loki-q0.25" and metrics["steps"] == 3
    assert set(metrics["retention"]) == {"before", "after"}
    assert "map@1" in metrics["task_metrics"] and "avg" in metrics["forgetting"]
    assert json.loads((run_dir / "metrics.json").read_text())["method"] == "loki-q0.25"
    positions = json.loads((run_dir / "positions.json").read_text())
    assert [len(layer) for layer in positions] == [16] * 4  # floor(0.25 * 64) rows in each of 4 layers
    assert metrics["trainable"]["trainable_effective"] == 4 * 16 * 128

    # The export is a plain HF checkpoint; against the base model (same seed), only selected rows moved.
    from loki.models import load_model_and_tokenizer

    base, _ = load_model_and_tokenizer(cfg.model)
    tuned = AutoModelForCausalLM.from_pretrained(run_dir / "model")
    base_state, tuned_state = base.state_dict(), tuned.state_dict()
    assert base_state.keys() == tuned_state.keys()
    moved_rows = 0
    for name, before in base_state.items():
        after = tuned_state[name]
        if name.endswith("mlp.down_proj.weight"):
            layer = int(name.split(".layers.")[1].split(".")[0])
            keep = torch.ones(before.shape[0], dtype=torch.bool)
            keep[positions[layer]] = False
            assert torch.equal(before[keep], after[keep]), name
            moved_rows += int((before[~keep] != after[~keep]).any(dim=1).sum())
        else:
            assert torch.equal(before, after), name
    assert moved_rows > 0  # training did change the selected rows


@pytest.mark.slow
def test_full_fine_tuning_baseline_resumes_from_its_checkpoint(tmp_path):
    metrics, run_dir = _train(tmp_path, "loki=off", "evaluate.retention=false", "export=false")
    assert metrics["method"] == "full"
    assert metrics["trainable"]["trainable_effective"] == metrics["trainable"]["total"]
    assert not (tmp_path / "cache" / "attribution").exists()  # no analysis without LoKI
    # Resume: continue the 3-step run from its last checkpoint up to 5 steps, in a new run dir.
    resumed, _ = _train(
        tmp_path, "loki=off", "evaluate.retention=false", "export=false", "trainer.max_steps=5",
        f"ckpt_path={run_dir / 'checkpoints' / 'last.ckpt'}", run="resumed",
    )
    assert resumed["steps"] == 5


@pytest.mark.slow
def test_scores_of_other_weights_under_the_same_name_are_refused(tmp_path):
    _train(tmp_path, "loki.q=0.25", "evaluate.retention=false", "export=false")
    # Same model.name and settings, other random weights: the stored scores do not belong to this model.
    with pytest.raises(LokiError, match=r"made with another model \(model\.weights_fingerprint is"):
        _train(tmp_path, "loki.q=0.25", "model.seed=1", run="other")
    # A `published` store (the default) named by path is refused for recipe=captum: the recipe is part of its identity.
    from loki import attribution

    store = attribution.default_store(compose_config("train", *TINY, f"paths.cache_dir={tmp_path / 'cache'}"))
    with pytest.raises(LokiError, match=r"other settings \(kva\.recipe is 'published' there but 'captum' now\)"):
        _train(tmp_path, "loki.q=0.25", f"loki.scores={store}", "kva.recipe=captum", run="captum")


def test_weights_fingerprint_ignores_the_load_dtype():
    """Attribute in fp32, train in bf16: the same model, the same store (and a real change is seen)."""
    from loki.store import model_identity
    from tests.conftest import make_tiny_model

    model = make_tiny_model()
    fp32 = model_identity(model, "m")
    assert model_identity(make_tiny_model().to(torch.bfloat16), "m") == fp32
    with torch.no_grad():
        model.model.layers[0].mlp.down_proj.weight.mul_(1.5)
    assert model_identity(model, "m")["weights_fingerprint"] != fp32["weights_fingerprint"]


@pytest.mark.slow
def test_command_line_smoke_run(tmp_path):
    """The one true `python train.py` process: Hydra's run dir, the printed summary, exit status 0."""
    run_dir = tmp_path / "run"
    env = dict(os.environ, HF_HUB_OFFLINE="1", LOKI_CACHE=str(tmp_path / "cache"), WANDB_MODE="disabled")
    proc = subprocess.run(
        [sys.executable, str(ROOT / "train.py"), *TINY, f"hydra.run.dir={run_dir}", "loki=off", "evaluate.retention=false"],
        capture_output=True, text=True, env=env, timeout=600, cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"run dir: {run_dir}" in proc.stdout and (run_dir / "metrics.json").exists() and (run_dir / ".hydra").is_dir()
    assert (run_dir / "model" / "config.json").exists()
    from omegaconf import OmegaConf

    saved = OmegaConf.load(run_dir / "config.yaml")  # the run's own config, Hydra's interpolations resolved
    assert saved.paths.output_dir == str(run_dir) and "${" not in (run_dir / "config.yaml").read_text()


@pytest.mark.slow
def test_metrics_record_the_last_validation_loss(tmp_path):
    # One whole epoch, so the last validation sees the final weights, which the export holds too.
    metrics, run_dir = _train(tmp_path, "loki.q=0.25", "trainer.max_steps=-1", "trainer.max_epochs=1")
    from hydra.utils import instantiate  # the task's loader, built as train.py builds it
    from transformers import AutoTokenizer

    cfg = compose_config("train", *TINY, f"paths.cache_dir={tmp_path / 'cache'}")
    tokenizer = AutoTokenizer.from_pretrained(run_dir / "model")
    datamodule = instantiate(cfg.task.data, tokenizer=tokenizer, seed=cfg.seed)
    datamodule.prepare_data()
    datamodule.setup("fit")

    def val_loss(model) -> float:  # Lightning's epoch mean: each batch's token-mean loss, weighted by its rows
        total, count = 0.0, 0
        with torch.no_grad():
            for batch in datamodule.val_dataloader():
                loss = model(input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask"), labels=batch["labels"]).loss
                total, count = total + float(loss) * len(batch["input_ids"]), count + len(batch["input_ids"])
        assert count > 0
        return total / count

    from loki.models import load_model_and_tokenizer

    tuned = AutoModelForCausalLM.from_pretrained(run_dir / "model").eval()
    assert metrics["val_loss"] == pytest.approx(val_loss(tuned), rel=1e-4)
    base, _ = load_model_and_tokenizer(cfg.model)  # the run's starting point: a loss recorded before training differs
    assert metrics["val_loss"] != pytest.approx(val_loss(base.eval()), rel=1e-3)
    assert json.loads((run_dir / "metrics.json").read_text())["val_loss"] == metrics["val_loss"]
