"""The authors' presets (LLaMA-Factory settings), optimizer.lr_scale_with_q, and the SLURM launcher config."""

from __future__ import annotations

from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate

from loki.errors import LokiError
from loki.recipe import apply_lr_scale_with_q, lr_multiplier, published_positions_path
from tests.conftest import compose_config

ROOT = Path(__file__).resolve().parents[1]
NEW_YAML = ["conf/experiment/paper_qwen0.5b_reranker.yaml", "conf/experiment/paper_llama8b_toolace.yaml", "conf/hydra/launcher/submitit_slurm.yaml",
            "conf/model_task/smollm135m_toy_rerank.yaml"]


def _compose(*overrides: str):
    import loki.recipe  # noqa: F401  the ${method:} resolver

    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return compose("train", overrides=list(overrides), return_hydra_config=True)


@pytest.mark.parametrize(
    "name, q_sweep, warmup, epochs, packing, batch, model",
    [
        ("paper_qwen0.5b_reranker", "0.05,0.1,0.2,0.3", 0.01, 1, True, 1, "Qwen2.5-0.5B-Instruct"),
        ("paper_llama8b_toolace", "0.1,0.2,0.3", 0.1, 3, False, 4, "Llama-3.1-8B-Instruct"),
    ],
)
def test_paper_presets_mirror_the_authors_settings(name, q_sweep, warmup, epochs, packing, batch, model):
    cfg = _compose(f"experiment={name}")
    assert cfg.model.name == model and cfg.experiment_name == name and cfg.logger.group == name
    assert cfg.optimizer.lr == 1e-5 and cfg.optimizer.weight_decay == 0.0 and list(cfg.optimizer.betas) == [0.9, 0.999]
    assert cfg.lr_schedule.warmup_ratio == warmup and cfg.trainer.max_epochs == epochs
    assert cfg.task.data.max_length == 8192 and cfg.task.data.packing is packing and cfg.task.data.batch_size == batch
    assert cfg.trainer.accumulate_grad_batches == 1 and cfg.trainer.val_check_interval == 0.1
    assert cfg.trainer.precision == "bf16-mixed"
    assert cfg.hydra.sweeper.params["loki.q"] == q_sweep
    for q in q_sweep.split(","):  # every swept q has the authors' published positions
        assert published_positions_path(model, float(q)).exists()


def test_the_toolace_preset_sweeps_lora_and_lowers_the_rate_at_larger_q():
    cfg = _compose("experiment=paper_llama8b_toolace")
    assert cfg.hydra.sweeper.params.lora == "none,r16"
    job = compose_config("train", "experiment=paper_llama8b_toolace", "loki.q=0.3", "lora=r16")
    assert apply_lr_scale_with_q(job) == pytest.approx(0.4)
    assert job.optimizer.lr == pytest.approx(0.4e-5) and "lr_scale_with_q" not in job.optimizer
    assert job.lr_scale.base_lr == pytest.approx(1e-5)


def test_the_projects_own_presets_still_compose():
    assert compose_config("train", "experiment=qwen0.5b_reranker").loki.q == 0.05
    assert compose_config("train", "experiment=llama8b_toolace").loki.q == 0.1


def test_smollm135m_on_the_toy_reranker_is_sized_for_a_cpu_unless_the_pair_config_is_dropped():
    quick = compose_config("train", "model=smollm135m", "task=toy_rerank")  # conf/model_task/smollm135m_toy_rerank.yaml
    assert quick.model.name == "SmolLM2-135M-Instruct-Q4_1" and quick.task.name == "toy_rerank"
    assert quick.trainer.max_steps == 25 and quick.trainer.max_epochs == -1 and quick.task.eval.max_queries == 5
    assert {b.max_samples for b in quick.eval.benchmarks.values()} == {64} and quick.eval.batch_size == 1
    assert quick.loki.positions is None and quick.loki.use_shipped  # the shipped positions stand in for the store
    assert compose_config("train", "model=smollm135m", "task=toy_rerank", "trainer.max_steps=40").trainer.max_steps == 40
    whole = compose_config("train", "model=smollm135m", "task=toy_rerank", "~model_task")
    assert whole.trainer.max_steps == -1 and whole.trainer.max_epochs == 1 and whole.task.eval.max_queries is None
    assert {b.max_samples for b in whole.eval.benchmarks.values()} == {None}
    for other in (("model=smollm135m", "task=toy_facts"), ("model=tiny", "task=toy_rerank")):  # no pair config: untouched
        assert compose_config("train", *other).trainer.max_steps == -1


def test_lr_multiplier_is_piecewise_linear_in_q():
    assert lr_multiplier(None, 0.3) == 1.0
    for q, want in ((0.05, 1.0), (0.1, 1.0), (0.2, 0.7), (0.3, 0.4), (0.5, 0.4)):
        assert lr_multiplier("paper", q) == pytest.approx(want)
    assert lr_multiplier([[0.3, 0.5], [0.1, 2.0]], 0.2) == pytest.approx(1.25)  # points in any order
    for bad in ("fast", [[0.1]], [[0.1, -1.0]], [[0.1, 1.0], [0.1, 2.0]], [[1.5, 1.0]]):
        with pytest.raises(LokiError, match="optimizer.lr_scale_with_q"):
            lr_multiplier(bad, 0.1)


def test_lr_scale_with_q_applies_to_loki_only_and_leaves_a_plain_adamw():
    cfg = compose_config("train", "model=tiny", "loki.q=0.2", "optimizer.lr_scale_with_q=[[0.1,1.0],[0.3,0.4]]")
    assert apply_lr_scale_with_q(cfg) == pytest.approx(0.7) and cfg.optimizer.lr == pytest.approx(0.7 * cfg.model.loki_lr)
    import torch

    optimizer = instantiate(cfg.optimizer)([torch.nn.Parameter(torch.zeros(1))])  # no stray key reaches AdamW
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.7 * cfg.model.loki_lr)
    off = compose_config("train", "model=tiny", "loki=off", "optimizer.lr_scale_with_q=paper")
    assert apply_lr_scale_with_q(off) == 1.0 and off.optimizer.lr == off.model.finetune_lr
    default = compose_config("train", "model=tiny", "loki.q=0.3")
    assert apply_lr_scale_with_q(default) == 1.0 and default.optimizer.lr == default.model.loki_lr


def test_every_new_setting_has_a_comment():
    for rel in NEW_YAML:
        for number, line in enumerate((ROOT / rel).read_text().splitlines(), 1):
            if line.strip() and not line.lstrip().startswith(("#", "- ")) and not line.rstrip().endswith(":"):
                assert "#" in line, f"{rel}:{number} has no comment: {line}"


def test_the_slurm_launcher_runs_multi_node_lightning_ddp(monkeypatch):
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    cfg = _compose("hydra/launcher=submitit_slurm", "trainer=gpu", "trainer.devices=4", "+trainer.num_nodes=2")
    launcher = cfg.hydra.launcher
    assert launcher._target_.endswith("submitit_launcher.SlurmLauncher")
    assert (launcher.tasks_per_node, launcher.gpus_per_node, launcher.nodes) == (4, 4, 2)  # one task per GPU, 8 ranks
    assert cfg.trainer.num_nodes == 2 and cfg.trainer.strategy == "ddp"
    assert instantiate(launcher).params["tasks_per_node"] == 4  # the plugin takes every field
    single = _compose("hydra/launcher=submitit_slurm", "trainer=gpu", "trainer.devices=2")
    assert single.hydra.launcher.nodes == 1

    # Inside such a job SLURM, not Lightning, starts the ranks: Lightning's SLURMEnvironment reads them, and
    # loki.device agrees on which process is rank 0 (evaluates, exports, writes summaries).
    from lightning.fabric.plugins.environments import SLURMEnvironment

    from loki.device import global_rank

    for key in ("RANK", "LOCAL_RANK", "NODE_RANK", "GROUP_RANK"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("SLURM_NTASKS", "8")
    monkeypatch.setenv("SLURM_NTASKS_PER_NODE", "4")
    monkeypatch.setenv("SLURM_JOB_NAME", "train")
    monkeypatch.setenv("SLURM_PROCID", "5")
    monkeypatch.setenv("SLURM_LOCALID", "1")
    monkeypatch.setenv("SLURM_NODEID", "1")
    monkeypatch.setenv("SLURM_NODELIST", "node[1-2]")
    assert SLURMEnvironment.detect()
    env = SLURMEnvironment()
    assert env.creates_processes_externally and (env.global_rank(), env.local_rank(), env.node_rank(), env.world_size()) == (5, 1, 1, 8)
    assert global_rank() == 5
