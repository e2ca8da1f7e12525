"""Exact mid-epoch resume: a run SIGKILLed after a mid-epoch checkpoint and resumed from it ends with the
same weights, bit for bit, as a run never interrupted (the resumed run trains on the batches it had not yet
seen, in the same order, then on the next epoch's). The killed run is a forked process (in-process tests)
or a `python train.py` process (DDP) that SIGKILLs itself (tests/resume_kill.py) a step after the checkpoint.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch.utils.data import DataLoader
from torch.utils.data.distributed import DistributedSampler

from loki.data.chat.datamodule import ResumableSampler
from tests.conftest import run_train

ROOT = Path(__file__).resolve().parents[1]
KILL = ("+callbacks.kill._target_=tests.resume_kill.KillAtStep",)
MODES = {"hook": ["loki.impl=hook"], "rows": ["loki.impl=rows"], "lora": ["loki.impl=rows", "lora=r16"]}


def write_conversations(path: Path, n: int = 10) -> Path:
    rows = [{"conversations": [{"from": "human", "value": f"what is {i} + {i}?"}, {"from": "gpt", "value": str(2 * i)}]} for i in range(n)]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def settings(tmp_path: Path, steps: int, every: int) -> list[str]:
    """The tiny model on 10 one-turn conversations, 2 a batch, no validation, evaluation or attribution."""
    return [
        "model=tiny", "task=tiny_rerank", f"task.data.path={write_conversations(tmp_path / 'train.jsonl')}",
        "task.data.val_path=null", "task.data.batch_size=2", f"trainer.max_steps={steps}", "trainer.max_epochs=10",
        f"checkpoint_every_n_steps={every}", "evaluate.retention=false", "evaluate.task=false", "evaluate.task_val=false",
        "evaluate.validation_task_metric=false", "logger=none", "loki.strategy=random", "loki.q=0.25",
        f"paths.cache_dir={tmp_path / 'cache'}", "trainer.enable_progress_bar=false",
    ]


def final_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    weights = {}
    for shard in sorted((run_dir / "model").glob("*.safetensors")):
        weights.update(load_file(shard))
    assert weights, f"no exported weights in {run_dir}"
    return weights


def assert_bit_identical(resumed: dict, uninterrupted: dict) -> None:
    assert resumed.keys() == uninterrupted.keys()
    for name, tensor in uninterrupted.items():
        assert torch.equal(resumed[name], tensor), name


def checkpoint_place(run_dir: Path) -> tuple[int, dict]:
    """(global step, the data module's recorded place in its epoch) of the run's last.ckpt."""
    checkpoint = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    return checkpoint["global_step"], checkpoint["ChatSFTDataModule"]["train_order"]


@pytest.mark.parametrize("mode", MODES)
def test_a_run_killed_mid_epoch_resumes_to_the_uninterrupted_weights(mode, tmp_path):
    # 5 batches an epoch; checkpoints at steps 3 and 6; killed at step 4, resumed from step 3 (epoch 0,
    # batch 3 of 5) to step 7, crossing into epoch 1.
    base = settings(tmp_path, steps=7, every=3) + MODES[mode]
    assert run_train(tmp_path / "uninterrupted", *base)["steps"] == 7
    killed = multiprocessing.get_context("fork").Process(target=run_train, args=(tmp_path / "killed", *base, *KILL, "+callbacks.kill.step=4"))
    killed.start()
    killed.join(timeout=300)
    assert killed.exitcode == -signal.SIGKILL
    assert not (tmp_path / "killed" / "model").exists()  # it never finished
    step, place = checkpoint_place(tmp_path / "killed")
    assert step == 3 and (place["epoch"], place["batches"]) == (0, 3)
    resumed = run_train(tmp_path / "resumed", *base, f"ckpt_path={tmp_path / 'killed' / 'checkpoints' / 'last.ckpt'}")
    assert resumed["steps"] == 7
    assert_bit_identical(final_weights(tmp_path / "resumed"), final_weights(tmp_path / "uninterrupted"))


@pytest.mark.slow
def test_a_ddp_run_killed_mid_epoch_resumes_to_the_uninterrupted_weights(tmp_path):
    # 2 processes, 5 conversations each: 3 batches (2, 2, 1) an epoch. Checkpoint at step 2 (epoch 0, batch
    # 2 of 3), both ranks killed at step 3, resumed to step 5 (epoch 1, batch 2).
    base = settings(tmp_path, steps=5, every=2) + ["trainer=ddp_cpu", "loki.impl=hook"]
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", WANDB_MODE="disabled")

    def train(run: str, *extra: str) -> int:
        command = [sys.executable, str(ROOT / "train.py"), *base, f"hydra.run.dir={tmp_path / run}", *extra]
        proc = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
        try:
            output, _ = proc.communicate(timeout=300)
        finally:
            try:  # rank 1 is rank 0's child: never leave it behind
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        assert proc.returncode in (0, -signal.SIGKILL), output[-3000:]
        return proc.returncode

    assert train("uninterrupted") == 0
    assert train("killed", *KILL, "+callbacks.kill.step=3") == -signal.SIGKILL
    step, place = checkpoint_place(tmp_path / "killed")
    assert step == 2 and (place["epoch"], place["batches"], place["num_replicas"]) == (0, 2, 2)
    assert train("resumed", f"ckpt_path={tmp_path / 'killed' / 'checkpoints' / 'last.ckpt'}") == 0
    assert_bit_identical(final_weights(tmp_path / "resumed"), final_weights(tmp_path / "uninterrupted"))


def test_the_sampler_keeps_the_usual_orders_and_resumes_inside_an_epoch():
    data = list(range(11))
    # One process: the order torch's DataLoader(shuffle=True, generator=seed) gave, epoch after epoch.
    loader = DataLoader(data, batch_size=2, shuffle=True, generator=torch.Generator().manual_seed(3))
    sampler = ResumableSampler(data, seed=3)
    for epoch in range(3):
        sampler.set_epoch(epoch)
        assert list(sampler) == [int(i) for batch in loader for i in batch]
    # Two processes: the order of the DistributedSampler Lightning would inject, on each rank.
    for rank in range(2):
        usual, ours = DistributedSampler(data, num_replicas=2, rank=rank, seed=3), ResumableSampler(data, 3, num_replicas=2, rank=rank)
        usual.set_epoch(1), ours.set_epoch(1)
        assert list(ours) == list(usual)
    # Resumed 4 samples into epoch 1: that epoch's remaining samples once, then whole epochs as before.
    full = ResumableSampler(data, seed=3)
    orders = {epoch: (full.set_epoch(epoch), list(full))[1] for epoch in (1, 2)}
    resumed = ResumableSampler(data, seed=3)
    resumed.resume_at(1, 4)
    assert list(resumed) == orders[1][4:]
    assert list(resumed) == orders[1]  # the skip applies to one pass only
    resumed.set_epoch(2)
    assert list(resumed) == orders[2]
