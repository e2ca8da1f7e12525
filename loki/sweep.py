"""Hydra sweeps (`python train.py -m ...`) that run each job exactly once, with or without Lightning DDP.

The problem: Lightning's subprocess launcher starts DDP ranks 1..N-1 by re-running the script with the
original `sys.argv`. Under `-m` every child would then run the whole sweep on its own (in a second
`multiruns/` dir), and the parent, which still carries LOCAL_RANK/WORLD_SIZE from job 1, would wait for
ranks that never come in job 2.

The fix, in two halves:

- the parent wraps each job in `ddp_job()`: it publishes the job's own overrides and its run dir in the
  `LOKI_DDP_JOB` environment variable (Lightning copies the environment into every child it starts), and
  when the job ends it destroys the process group and restores the DDP environment variables Lightning set,
  so the next job launches its ranks afresh;
- a child started by Lightning (LOCAL_RANK >= 1 and `LOKI_DDP_JOB` set) calls `child_argv()` before Hydra
  parses the command line: its argv becomes a single run of that job (`hydra.run.dir=<the job's run dir>`,
  no `-m`), so it joins the parent's process group for this job and exits.

`run_job()` is what train.py's Hydra task runs: the recipe inside `ddp_job()`, the job's primary metric as
the return value (for the Optuna/Ax sweepers), and a failed job (LokiError) recorded in `<run dir>/error.txt`
and in the sweep's `summary.jsonl` without stopping the sweep.
"""

from __future__ import annotations

import json
import logging
import math
import os
import sys
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from loki.device import is_rank_zero
from loki.errors import LokiError

log = logging.getLogger(__name__)

JOB_ENV = "LOKI_DDP_JOB"  # rank 0 -> DDP children: {"overrides": [...], "run_dir": "..."} of the current job
# What Lightning's launcher (or a job's seeding) writes into os.environ; restored after each job.
DDP_ENV = ("MASTER_ADDR", "MASTER_PORT", "NODE_RANK", "LOCAL_RANK", "WORLD_SIZE", "GROUP_RANK", "RANK", "LOCAL_WORLD_SIZE", "PL_GLOBAL_SEED")
ERROR_FILE = "error.txt"
SUMMARY_FILE = "summary.jsonl"
# Hydra overrides a child must not receive: it runs one job in run mode, in the parent job's dir.
_PARENT_ONLY = ("hydra.sweep", "hydra.sweeper", "hydra/sweeper", "hydra.launcher", "hydra/launcher", "hydra.run", "hydra.mode",
                "hydra.output_subdir", "hydra.job.name", "hydra.job.num", "hydra.job.id")


# ------------------------------------------------------------------------------------------ DDP children


def child_argv(argv: Sequence[str], environ: Mapping[str, str] | None = None) -> list[str] | None:
    """The argv of one run of rank 0's current job, in a DDP child Lightning started; None elsewhere.

    A child is recognised by LOCAL_RANK >= 1 (set by Lightning's launcher) together with `LOKI_DDP_JOB`
    (set by rank 0 in `ddp_job`); torchrun, SLURM tasks and a plain run are left alone.
    """
    env = os.environ if environ is None else environ
    spec, local = env.get(JOB_ENV), env.get("LOCAL_RANK")
    if not spec or local is None or local == "0":
        return None
    job = json.loads(spec)
    run_dir = str(job["run_dir"]).replace("\\", "\\\\").replace('"', '\\"')
    return [
        argv[0],
        *job["overrides"],
        f'hydra.run.dir="{run_dir}"',  # rank 0's job dir: no new run dir, no second multirun dir
        "hydra.output_subdir=null",  # rank 0 already saved .hydra/ for this job
        f"hydra.job.name=train_ddp_process_{local}",  # its own log file, as Lightning names it
    ]


def job_spec() -> dict | None:
    """This Hydra job's overrides and run dir (None outside a Hydra run, e.g. in-process tests)."""
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return None
    hc = HydraConfig.get()
    hydra_overrides = [o for o in hc.overrides.hydra if not o.lstrip("~+").startswith(_PARENT_ONLY)]
    return {"overrides": [*hydra_overrides, *hc.overrides.task], "run_dir": str(hc.runtime.output_dir)}


def teardown_distributed() -> None:
    """Destroy the default process group if one is up, so the next job (or test) starts clean."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


@contextmanager
def ddp_job() -> Iterator[None]:
    """Around one job in the process that runs it: announce the job to DDP children, clean up after."""
    saved = {key: os.environ.get(key) for key in (*DDP_ENV, JOB_ENV)}
    spec = job_spec()
    if spec is not None and is_rank_zero():
        os.environ[JOB_ENV] = json.dumps(spec)
    try:
        yield
    finally:
        teardown_distributed()
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


# ------------------------------------------------------------------------------------------------ a job


def is_multirun() -> bool:
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


def primary_metric(cfg: DictConfig, metrics: Mapping[str, Any]) -> tuple[str | None, float]:
    """(name, value) of the task's primary metric (`task.eval.primary`) in metrics.json; NaN when absent."""
    name = OmegaConf.select(cfg, "task.eval.primary")
    value = (metrics.get("task_metrics") or {}).get(name) if name else None
    try:
        return name, float(value) if value is not None else math.nan
    except (TypeError, ValueError):
        return name, math.nan


def _job_record() -> dict:
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return {}
    hc = HydraConfig.get()
    return {"job": hc.job.get("num"), "overrides": list(hc.overrides.task), "run_dir": str(hc.runtime.output_dir)}


def append_summary(record: dict) -> Path | None:
    """One JSON line per job in `<sweep dir>/summary.jsonl` (multirun only)."""
    if not is_multirun():
        return None
    from hydra.core.hydra_config import HydraConfig

    path = Path(str(HydraConfig.get().sweep.dir)) / SUMMARY_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:  # one short append per job
        f.write(json.dumps({**_job_record(), **record}, default=str, allow_nan=True) + "\n")
    return path


def finish_wandb(exit_code: int = 0) -> None:
    """End the W&B run of this job, if one is open, so the next job of a sweep gets its own run."""
    wandb = sys.modules.get("wandb")
    if wandb is not None and getattr(wandb, "run", None) is not None:
        wandb.finish(exit_code=exit_code)


def run_job(cfg: DictConfig, fn: Callable[[DictConfig], Mapping[str, Any]]) -> float:
    """Run one job (`fn` is the recipe) and return its primary metric, NaN when failed or unmeasured.

    NaN, not None, for a failed job: the Optuna sweeper marks a NaN trial failed and goes on (None would
    count towards its `max_failure_rate` and stop the study); Hydra's basic sweeper ignores the value.
    A LokiError outside a sweep is re-raised: train.py prints it and exits with status 2.
    """
    run_dir = Path(str(OmegaConf.select(cfg, "paths.output_dir")))
    with ddp_job():
        try:
            metrics = fn(cfg)
        except LokiError as err:
            finish_wandb(exit_code=1)
            if not is_rank_zero():
                raise
            run_dir.mkdir(parents=True, exist_ok=True)
            (run_dir / ERROR_FILE).write_text(f"{err}\n")
            append_summary({"status": "failed", "error": str(err), "primary": OmegaConf.select(cfg, "task.eval.primary"), "value": None})
            if not is_multirun():
                raise
            log.error("Job failed (the sweep goes on): %s", err)
            print(f"error: {err}", file=sys.stderr)
            return math.nan
        except BaseException:
            finish_wandb(exit_code=1)
            raise
        finish_wandb()
    if not is_rank_zero() or not metrics:
        return math.nan
    name, value = primary_metric(cfg, metrics)
    append_summary({"status": "ok", "primary": name, "value": None if math.isnan(value) else value})
    return value
