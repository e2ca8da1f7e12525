"""W&B offline: one run per job, the resolved config, training telemetry, the run's files as an artifact.

wandb (0.2x/0.3x) writes no config.yaml or wandb-summary.json offline: everything is in the run's `.wandb`
file, a LevelDB-style log of protobuf records, read here with `wandb_records`.
"""

from __future__ import annotations

import struct
from pathlib import Path

import pytest

from tests.conftest import run_train

TINY = ("model=tiny", "task=tiny_rerank", "trainer.max_steps=2", "evaluate.retention=false", "export=false",
        "evaluate.validation_task_metric=false")


def wandb_records(path: Path):
    """Every protobuf Record of a `.wandb` file: a 7-byte header, then 32 KiB blocks of records, each
    with a 7-byte header (crc32 u32, length u16, type u8: 1 full, 2 first, 3 middle, 4 last)."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = Path(path).read_bytes()
    assert data[:4] == b":W&B", f"not a .wandb file: {path}"
    pos, block, buf = 7, 32768, b""
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:  # a block's tail too short for a header is padding
            pos += left
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if length == 0 and kind == 0:
            break
        buf += data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):
            record = pb.Record()
            record.ParseFromString(buf)
            buf = b""
            yield record


def wandb_run(run_dir: Path, wait_s: float = 30.0) -> dict:
    """What one offline W&B run under <run dir>/wandb holds: id, name, group, config keys, logged keys, artifacts.

    wandb's service process writes the `.wandb` file; on a loaded machine its last records can land a moment
    after `wandb.finish()` returns, so the file is read again until it holds the run's exit record (or
    `wait_s` passes, and the caller's assertions then say what is missing)."""
    import time

    deadline = time.monotonic() + wait_s
    while True:
        try:
            out = _read_wandb_run(run_dir)
        except Exception:  # a record still being written does not parse yet
            if time.monotonic() > deadline:
                raise
            out = {"exit": None}
        if out["exit"] is not None or time.monotonic() > deadline:
            return out
        time.sleep(0.5)


def _read_wandb_run(run_dir: Path) -> dict:
    runs = sorted((run_dir / "wandb").glob("offline-run-*"))
    assert len(runs) == 1, f"expected one W&B run in {run_dir}, found {runs}"
    (file,) = runs[0].glob("*.wandb")
    out: dict = {"config": set(), "history": set(), "artifacts": {}, "exit": None}
    for record in wandb_records(file):
        kind = record.WhichOneof("record_type")
        if kind == "run":
            out.update(id=record.run.run_id, name=record.run.display_name, group=record.run.run_group)
        elif kind == "config":
            out["config"].update(u.key for u in record.config.update)
        elif kind == "history":
            out["history"].update(i.key or "/".join(i.nested_key) for i in record.history.item)
        elif kind == "artifact":
            out["artifacts"][record.artifact.type] = sorted(e.path for e in record.artifact.manifest.contents)
        elif kind == "exit":
            out["exit"] = record.exit.exit_code
    return out


@pytest.fixture
def wandb_offline(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    for key, sub in (("WANDB_DIR", "wandb"), ("WANDB_CACHE_DIR", "wandb-cache"), ("WANDB_DATA_DIR", "wandb-data"), ("WANDB_CONFIG_DIR", "wandb-config")):
        monkeypatch.setenv(key, str(tmp_path / sub))
    monkeypatch.setenv("WANDB_SILENT", "true")
    return tmp_path


@pytest.mark.slow
def test_one_run_logs_config_telemetry_and_files_then_finishes(wandb_offline):
    import wandb

    tmp_path = wandb_offline
    run_dir = tmp_path / "run"
    run_train(run_dir, *TINY, "logger=wandb", "loki.q=0.25", "seed=3", f"paths.cache_dir={tmp_path / 'cache'}")
    assert wandb.run is None  # finished at the end of the job: the next job opens its own run
    run = wandb_run(run_dir)
    assert run["name"].startswith("loki-q0.25-s3-") and run["group"] == "tiny_rerank"
    assert {"loki", "optimizer", "trainer", "task", "seed"} <= run["config"]  # the resolved config
    assert {"perf/tokens_per_s", "perf/peak_memory_gb", "train/grad_norm", "final/task_metrics/map@1"} <= run["history"]
    assert {"metrics.json", "positions.json", "heatmap.png"} <= set(run["artifacts"]["loki-run"])
    assert run["exit"] == 0


def test_telemetry_counts_tokens_and_gradients():
    import torch

    from loki.lightning.telemetry import count_tokens, grad_norm, peak_memory_gb

    assert count_tokens({"input_ids": torch.ones(2, 5), "attention_mask": torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])}) == 8
    assert count_tokens({"input_ids": torch.ones(2, 5)}) == 10
    a, b = torch.nn.Parameter(torch.zeros(2)), torch.nn.Parameter(torch.zeros(1))
    assert grad_norm([a, b]) is None
    a.grad, b.grad = torch.tensor([3.0, 0.0]), torch.tensor([4.0])
    assert grad_norm([a, b]) == pytest.approx(5.0)
    assert peak_memory_gb(torch.device("cpu")) > 0
