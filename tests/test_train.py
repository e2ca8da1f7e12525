"""`train.py` end to end on the tiny model: analyse, select, implant, evaluate, export — and the result
differs from the base model only in the selected rows."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

ROOT = Path(__file__).resolve().parents[1]
MMLU_FIXTURE = ROOT / "tests" / "fixtures" / "mmlu" / "test.jsonl"


def _train(tmp_path: Path, *overrides: str) -> tuple[subprocess.CompletedProcess, Path]:
    run_dir = tmp_path / "run"
    env = dict(os.environ, HF_HUB_OFFLINE="1", LOKI_CACHE=str(tmp_path / "cache"), WANDB_MODE="disabled")
    proc = subprocess.run(
        [sys.executable, str(ROOT / "train.py"), "model=tiny", "task=tiny_rerank", f"hydra.run.dir={run_dir}",
         "trainer.max_steps=3", "trainer.max_epochs=5", "evaluate.validation_task_metric=false", *overrides],
        capture_output=True, text=True, env=env, timeout=600, cwd=tmp_path,
    )
    return proc, run_dir


@pytest.mark.slow
def test_train_py_runs_the_whole_pipeline_and_touches_only_selected_rows(tmp_path):
    proc, run_dir = _train(tmp_path, "loki.q=0.25", "loki.impl=rows")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"run dir: {run_dir}" in proc.stdout
    # Attribution ran first (no scores existed) and wrote its store where loki.scores=auto finds it.
    assert (tmp_path / "cache" / "attribution" / "tiny" / "meta.json").exists()
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["method"] == "loki-q0.25" and metrics["steps"] == 3
    assert set(metrics["retention"]) == {"before", "after"}
    assert "map@1" in metrics["task_metrics"] and "avg" in metrics["forgetting"]
    positions = json.loads((run_dir / "positions.json").read_text())
    assert [len(layer) for layer in positions] == [16] * 4  # floor(0.25 * 64) rows in each of 4 layers
    assert metrics["trainable"]["trainable_effective"] == 4 * 16 * 128

    # The export is a plain HF checkpoint; against the base model (same seed), only selected rows moved.
    from loki.models import load_model_and_tokenizer

    base, _ = load_model_and_tokenizer({"source": "random", "seed": 0, "config": _tiny_config()})
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


def _tiny_config() -> dict:
    from omegaconf import OmegaConf

    return OmegaConf.to_container(OmegaConf.load(ROOT / "conf" / "model" / "tiny.yaml").config)


@pytest.mark.slow
def test_train_py_full_fine_tuning_baseline_resumes_from_its_checkpoint(tmp_path):
    proc, run_dir = _train(tmp_path, "loki=off", "evaluate.retention=false", "export=false")
    assert proc.returncode == 0, proc.stderr[-3000:]
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["method"] == "full"
    assert metrics["trainable"]["trainable_effective"] == metrics["trainable"]["total"]
    assert not (tmp_path / "cache" / "attribution").exists()  # no analysis without LoKI
    # Resume: continue the 3-step run from its last checkpoint up to 5 steps, in a new run dir.
    resumed = tmp_path / "resumed"
    proc, _ = _train(tmp_path, "loki=off", "evaluate.retention=false", "export=false", "trainer.max_steps=5",
                     f"ckpt_path={run_dir / 'checkpoints' / 'last.ckpt'}", f"hydra.run.dir={resumed}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads((resumed / "metrics.json").read_text())["steps"] == 5


@pytest.mark.slow
def test_scores_of_other_weights_under_the_same_name_are_refused(tmp_path):
    proc, _ = _train(tmp_path, "loki.q=0.25", "evaluate.retention=false", "export=false")
    assert proc.returncode == 0, proc.stderr[-3000:]
    # Same model.name, other random weights: the stored scores do not belong to this model.
    proc, _ = _train(tmp_path, "loki.q=0.25", "model.seed=1", f"hydra.run.dir={tmp_path / 'other'}")
    assert proc.returncode == 2
    assert "were computed for other weights than this 'tiny'" in proc.stderr.strip().splitlines()[-1]
