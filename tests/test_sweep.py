"""`python train.py -m ...`: each job once, in its own run dir, with one process and with DDP; a failing job
is recorded and the sweep goes on; the job's value is the task's primary metric."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
from omegaconf import open_dict

from loki import sweep
from loki.errors import LokiError
from tests.conftest import compose_config

ROOT = Path(__file__).resolve().parents[1]
TINY = ("model=tiny", "task=tiny_rerank", "trainer.max_steps=2", "evaluate.retention=false", "export=false")


# ------------------------------------------------------------------------------------- DDP children


def test_a_ddp_child_runs_its_parents_job_only():
    job = json.dumps({"overrides": ["model=tiny", "loki.q=0.1", "hydra.verbose=true"], "run_dir": '/runs/a "b"/0'})
    argv = ["train.py", "-m", "loki.q=0.05,0.1"]
    assert sweep.child_argv(argv, {"LOCAL_RANK": "1", sweep.JOB_ENV: job}) == [
        "train.py", "model=tiny", "loki.q=0.1", "hydra.verbose=true",
        'hydra.run.dir="/runs/a \\"b\\"/0"', "hydra.output_subdir=null", "hydra.job.name=train_ddp_process_1",
    ]
    assert "-m" not in sweep.child_argv(argv, {"LOCAL_RANK": "3", sweep.JOB_ENV: job})
    # rank 0, a plain process, torchrun/SLURM ranks without the job description: argv stays as it is
    assert sweep.child_argv(argv, {"LOCAL_RANK": "0", sweep.JOB_ENV: job}) is None
    assert sweep.child_argv(argv, {}) is None
    assert sweep.child_argv(argv, {"LOCAL_RANK": "1", "RANK": "1"}) is None


def _hydra_job(tmp_path: Path, overrides: list[str], multirun: bool = True):
    """Make HydraConfig look like one job of a sweep (what hydra.main sets up), for in-process tests."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode
    from omegaconf import read_write

    cfg = compose_config("train", *TINY, *overrides, f"paths.output_dir={tmp_path / 'sweep' / '0'}")
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        full = compose("train", overrides=[*TINY, *overrides], return_hydra_config=True)
    hydra_cfg = full.hydra
    with read_write(hydra_cfg), open_dict(hydra_cfg):
        hydra_cfg.mode = RunMode.MULTIRUN if multirun else RunMode.RUN
        hydra_cfg.sweep.dir = str(tmp_path / "sweep")
        hydra_cfg.runtime.output_dir = str(tmp_path / "sweep" / "0")
        hydra_cfg.job.num = 0
        hydra_cfg.overrides.task = [*TINY, *overrides]
        hydra_cfg.overrides.hydra = ["hydra.mode=MULTIRUN", "hydra.verbose=true", "hydra/launcher=basic"]
    HydraConfig.instance().set_config(full)
    return cfg


@pytest.fixture
def clean_hydra():
    from hydra.core.hydra_config import HydraConfig

    yield
    HydraConfig.instance().cfg = None


def test_a_job_announces_itself_to_children_and_restores_the_environment(tmp_path, monkeypatch, clean_hydra):
    cfg = _hydra_job(tmp_path, ["loki.q=0.1"])
    for key in sweep.DDP_ENV + (sweep.JOB_ENV,):
        monkeypatch.delenv(key, raising=False)
    seen = {}

    def fake_recipe(cfg):  # what Lightning's launcher leaves behind in rank 0's environment
        seen.update(json.loads(os.environ[sweep.JOB_ENV]))
        os.environ.update(LOCAL_RANK="0", NODE_RANK="0", WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT="12345")
        return {"task_metrics": {"map@1": 0.25}}

    assert sweep.run_job(cfg, fake_recipe) == 0.25
    assert seen == {"overrides": ["hydra.verbose=true", *TINY, "loki.q=0.1"], "run_dir": str(tmp_path / "sweep" / "0")}
    assert not any(key in os.environ for key in sweep.DDP_ENV + (sweep.JOB_ENV,))  # the next job launches afresh
    (line,) = (tmp_path / "sweep" / sweep.SUMMARY_FILE).read_text().splitlines()
    assert json.loads(line) | {"overrides": None} == {
        "job": 0, "overrides": None, "run_dir": str(tmp_path / "sweep" / "0"), "status": "ok", "primary": "map@1", "value": 0.25,
    }


def test_a_failing_job_is_recorded_and_the_sweep_goes_on(tmp_path, clean_hydra):
    cfg = _hydra_job(tmp_path, ["loki.q=2"])

    def failing(cfg):
        raise LokiError("loki.q must be a number in (0, 1), got 2.")

    value = sweep.run_job(cfg, failing)
    assert math.isnan(value)  # Optuna marks a NaN trial failed and goes on; None would stop the study
    assert (tmp_path / "sweep" / "0" / sweep.ERROR_FILE).read_text().strip() == "loki.q must be a number in (0, 1), got 2."
    record = json.loads((tmp_path / "sweep" / sweep.SUMMARY_FILE).read_text())
    assert record["status"] == "failed" and record["error"].startswith("loki.q must be") and record["value"] is None
    # Outside a sweep the sentence still reaches train.py, which prints it and exits with status 2.
    cfg = _hydra_job(tmp_path, ["loki.q=2"], multirun=False)
    with pytest.raises(LokiError):
        sweep.run_job(cfg, failing)


def test_primary_metric_is_the_tasks_own():
    cfg = compose_config("train", *TINY)
    assert sweep.primary_metric(cfg, {"task_metrics": {"map@1": 0.5, "map@10": 0.9}}) == ("map@1", 0.5)
    assert math.isnan(sweep.primary_metric(cfg, {})[1])


# --------------------------------------------------------------------------------- true sweeps (slow)


def _sweep(tmp_path: Path, *overrides: str, extra_env: dict | None = None) -> Path:
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", LOKI_CACHE=str(tmp_path / "cache"),
               LOKI_LOG_DIR=str(tmp_path / "logs"), WANDB_MODE="disabled", OMP_NUM_THREADS="1")
    env.update(extra_env or {})
    proc = subprocess.run(
        [sys.executable, str(ROOT / "train.py"), "-m", *TINY, *overrides],
        capture_output=True, text=True, env=env, timeout=900, cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    sweeps = list((tmp_path / "logs" / "train" / "multiruns").iterdir())
    assert len(sweeps) == 1, sweeps  # no second multirun dir (a DDP child running the sweep again)
    assert not (tmp_path / "logs" / "train" / "runs").exists()  # nor stray single-run dirs
    jobs = sorted(p for p in sweeps[0].iterdir() if p.is_dir())
    assert [p.name for p in jobs] == ["0", "1"]  # exactly the two jobs
    for job, q in zip(jobs, ("0.25", "0.5")):
        metrics = json.loads((job / "metrics.json").read_text())
        assert metrics["method"] == f"loki-q{q}" and metrics["steps"] >= 1  # 7 rows, batch 4: one step per epoch on 2 ranks
    summary = [json.loads(line) for line in (sweeps[0] / sweep.SUMMARY_FILE).read_text().splitlines()]
    assert [(r["job"], r["status"], r["primary"]) for r in summary] == [(0, "ok", "map@1"), (1, "ok", "map@1")]
    return sweeps[0]


@pytest.mark.slow
def test_a_sweep_in_one_process_runs_each_job_once(tmp_path):
    _sweep(tmp_path, "loki.q=0.25,0.5")


@pytest.mark.slow
def test_a_ddp_sweep_runs_each_job_once_with_its_own_wandb_run(tmp_path):
    """The acceptance run: trainer=ddp_cpu (2 processes) x 2 jobs, each with its metrics.json and W&B run."""
    pytest.importorskip("wandb")
    from tests.test_wandb import wandb_run

    env = {"WANDB_MODE": "offline", "WANDB_SILENT": "true"}
    env.update({key: str(tmp_path / sub) for key, sub in (("WANDB_DIR", "wandb"), ("WANDB_CACHE_DIR", "wandb-cache"),
                                                          ("WANDB_DATA_DIR", "wandb-data"), ("WANDB_CONFIG_DIR", "wandb-config"))})
    sweep_dir = _sweep(tmp_path, "loki.q=0.25,0.5", "trainer=ddp_cpu", "logger=wandb", extra_env=env)
    runs = []
    for job, q in (("0", "0.25"), ("1", "0.5")):
        assert (sweep_dir / job / "train_ddp_process_1.log").exists()  # rank 1 ran this job, in this dir
        run = wandb_run(sweep_dir / job)
        assert run["name"].startswith(f"loki-q{q}-s0-") and run["exit"] == 0
        assert {"perf/tokens_per_s", "train/grad_norm"} <= run["history"]
        runs.append(run["id"])
    assert len(set(runs)) == 2
