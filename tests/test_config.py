"""Every option of every config group composes with train.yaml and resolves (no missing keys, no typos)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.hydra_config import HydraConfig
from omegaconf import OmegaConf, open_dict



ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"
import loki.recipe  # noqa: F401  (registers the ${method:} resolver)


def _options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


GROUP_OPTIONS = [
    (group, option)
    for group in ("model", "task", "loki", "lora", "optimizer", "trainer", "logger", "callbacks", "eval", "paths", "experiment")
    for option in _options(group)
]


def _compose(overrides: list[str], config_name: str = "train"):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(config_name, overrides=overrides, return_hydra_config=True)
    HydraConfig.instance().set_config(cfg)
    return cfg


def test_every_group_has_options():
    for group in ("model", "task", "loki", "lora", "optimizer", "trainer", "logger", "experiment", "paths", "hydra"):
        assert (CONF / group).is_dir() and list((CONF / group).glob("*.yaml")), group


@pytest.mark.parametrize("group, option", GROUP_OPTIONS, ids=[f"{g}={o}" for g, o in GROUP_OPTIONS])
def test_group_option_composes_and_resolves(group, option, tmp_path, monkeypatch):
    monkeypatch.setenv("LOKI_CACHE", str(tmp_path / "cache"))
    cfg = _compose([f"{group}={option}", f"hydra.run.dir={tmp_path}/run"])
    OmegaConf.set_readonly(cfg.hydra, False)
    cfg.hydra.runtime.output_dir = str(tmp_path / "run")
    assert cfg.hydra.job.chdir is False  # outputs go to paths.output_dir, the working dir stays put
    HydraConfig.instance().set_config(cfg)
    with open_dict(cfg):
        del cfg["hydra"]  # sweep-only keys (hydra.job.num) are unset outside a multirun
    resolved = OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)
    assert resolved["paths"]["output_dir"] == str(tmp_path / "run")
    assert resolved["paths"]["cache_dir"] == str(tmp_path / "cache")
    assert resolved["optimizer"]["lr"] > 0


def test_paper_command_composes():
    cfg = _compose(["model=qwen0.5b", "task=reranker", "loki.q=0.05"])
    assert cfg.model.pretrained == "Qwen/Qwen2.5-0.5B-Instruct"
    assert cfg.loki.q == 0.05 and cfg.loki.enabled
    assert cfg.optimizer.lr == cfg.model.loki_lr == 1e-4  # LoKI's own default step for this model
    assert _compose(["model=qwen0.5b", "loki=off"]).optimizer.lr == 1e-5  # the baselines' step
    assert cfg.method_name == "loki-q0.05"


def test_paper_command_fails_fast_offline_with_one_sentence(tmp_path):
    env = dict(os.environ, HF_HUB_OFFLINE="1", LOKI_CACHE=str(tmp_path / "cache"), LOKI_LOG_DIR=str(tmp_path / "logs"))
    proc = subprocess.run(
        [sys.executable, str(ROOT / "train.py"), "model=qwen0.5b", "task=reranker", "loki.q=0.05"],
        capture_output=True, text=True, env=env, timeout=240, cwd=tmp_path,
    )
    assert proc.returncode == 2, proc.stderr[-2000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: could not load model 'Qwen/Qwen2.5-0.5B-Instruct'")
    assert "model.pretrained=" in last and "Traceback" not in proc.stderr


@pytest.mark.parametrize("bad, match", [("loki.q=1.5", "strictly between 0 and 1"), ("loki.impl=columns", "loki.impl must be")])
def test_bad_settings_stop_before_loading_anything(bad, match, tmp_path):
    env = dict(os.environ, HF_HUB_OFFLINE="1", LOKI_CACHE=str(tmp_path / "cache"), LOKI_LOG_DIR=str(tmp_path / "logs"))
    proc = subprocess.run(
        [sys.executable, str(ROOT / "train.py"), "model=qwen0.5b", bad],
        capture_output=True, text=True, env=env, timeout=240, cwd=tmp_path,
    )
    assert proc.returncode == 2 and match in proc.stderr.strip().splitlines()[-1], proc.stderr[-2000:]
