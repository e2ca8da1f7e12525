"""benchmarks/gpu_check.py --dry-run: the GPU-day script runs end to end on the CPU with a tiny model."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "gpu_check.py"


@pytest.mark.slow
def test_dry_run_passes_and_prints_one_table():
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, str(SCRIPT), "--dry-run"], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    table = done.stdout.split("check ", 1)[1]
    for line in ("frozen rows bit-identical, bf16-mixed, hook", "frozen rows bit-identical, bf16-mixed, rows",
                 "frozen rows bit-identical, bf16-mixed, lora", "evaluation on the device", "fp32 master rows",
                 "KVA paper", "KVA published", "KVA captum", "train step, loki rows", "train step, loki hook",
                 "train step, peft lora r16", "train step, full"):
        assert line in table, line
    assert "0 failed" in done.stdout


def test_a_failed_check_exits_non_zero(monkeypatch):
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    gpu_check = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gpu_check)
    for name in ("check_frozen_rows", "check_eval_on_device", "measure_kva", "measure_training"):
        monkeypatch.setattr(gpu_check, name, lambda *a, **k: None)

    def broken(*args, **kwargs):
        raise AssertionError("rows are bfloat16")

    monkeypatch.setattr(gpu_check, "check_fp32_master_rows", broken)
    monkeypatch.setattr(gpu_check, "rows", [])
    assert gpu_check.main(["--dry-run"]) == 1
    assert gpu_check.rows == [("fp32 master rows", "raised AssertionError: rows are bfloat16", "FAIL")]
