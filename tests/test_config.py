"""Every option of every config group composes with train.yaml and resolves (no missing keys, no typos)."""

from __future__ import annotations

from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.hydra_config import HydraConfig
from omegaconf import OmegaConf, open_dict

from loki.errors import LokiError
from tests.conftest import compose_config

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"
import loki.recipe  # noqa: F401  (registers the ${method:} resolver)


def _options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


GROUP_OPTIONS = [
    (group, option)
    for group in ("model", "task", "loki", "kva", "data", "lora", "optimizer", "trainer", "logger", "callbacks", "eval", "paths", "experiment")
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
    from loki import recipe

    cfg = compose_config("train", "model=qwen0.5b", "task=reranker", "loki.q=0.05", f"paths.output_dir={tmp_path}")
    with pytest.raises(LokiError) as err:
        recipe.run(cfg)
    message = str(err.value)
    assert message.startswith("could not load model 'Qwen/Qwen2.5-0.5B-Instruct'") and "model.pretrained=" in message
    assert "\n" not in message


# One case per user-facing key: the sentence names the key, what was given and what is allowed.
BAD_TRAIN_VALUES = [
    ("loki.q=1.5", "loki.q must be a number in (0, 1), got 1.5."),
    ("loki.q=null", "loki.q must be a number in (0, 1), got None."),
    ("loki.impl=columns", "loki.impl must be one of hook, rows, got 'columns'."),
    ("loki.strategy=lowest", "loki.strategy must be one of layer_balanced, layer_balanced_highest, global_lowest, global_highest, random, smallest_norm, got 'lowest'."),
    ("loki.score=magnitude", "loki.score must be one of signed, abs, got 'magnitude'."),
    ("loki.positions=/no/such/positions.json", "loki.positions must be null, published, or an existing positions JSON file, got '/no/such/positions.json'."),
    ("loki.scores=/missing/dir", "loki.scores must be auto or the directory of a finished attribution store, got '/missing/dir'."),
    ("loki.analyse_if_missing=maybe", "loki.analyse_if_missing must be true or false, got 'maybe'."),
    ("lr_schedule.kind=cosin", "lr_schedule.kind must be one of cosine, linear, constant, got 'cosin'."),
    ("lr_schedule.warmup_ratio=1.5", "lr_schedule.warmup_ratio must be a number in [0, 1), got 1.5."),
    ("model.dtype=bf16", "model.dtype must be one of float32, bfloat16, float16 (or null), got 'bf16'."),
    ("model.source=hub", "model.source must be one of"),
    ("lora.rank=-1", "lora.rank must be an integer >= 0, got -1."),
    ("lora.dropout=1.0", "lora.dropout must be a number in [0, 1), got 1.0."),
    ("optimizer.lr=0", "optimizer.lr must be a positive number, got 0."),
    ("kva.recipe=gradients", "kva.recipe must be one of paper, published, captum, got 'gradients'."),
    ("kva.steps=0", "kva.steps must be an integer >= 1, got 0."),
    ("kva.scope=everywhere", "kva.scope must be one of target, sequence (or null), got 'everywhere'."),
    ("kva.recipe=captum kva.scope=target", "kva settings do not fit together: scope='target' does not fit recipe='captum'"),
    ("data.prompt=essay", "data.prompt must be one of letter, cloze, got 'essay'."),
    ("data.per_subject=0", "data.per_subject must be an integer >= 1 (or null), got 0."),
    ("data.path=/no/such/mmlu.jsonl", "data.path must be an existing file or directory in the MMLU schema (or null for data.source), got '/no/such/mmlu.jsonl'."),
    ("data.per_subject=null", "eval.benchmarks.mmlu (offset=2, per_subject=null: rows 2 onwards of each subject) overlaps the attribution prompts"),
    ("ckpt_path=/no/such.ckpt", "ckpt_path must be an existing checkpoint file (or null), got '/no/such.ckpt'."),
    # task.* and the retention benchmarks, checked by their schemas (loki/tasks/, loki/schema.py)
    ("task.eval.kind=rank", "task.eval.kind must be one of bfcl, cloze_qa, facts, reranker, got 'rank'."),
    ("task.eval.primary=ndcg@5", "task.eval.primary must be one of "),
    ("task.eval.candidates=top", "task.eval.candidates must be one of bm25, all, judged, or an existing run TSV file, got 'top'."),
    ("task.eval.ks=[0]", "task.eval.ks must be a non-empty list of integers >= 1, got [0]."),
    ("task.eval.batch_size=0", "task.eval.batch_size must be an integer >= 1, got 0."),
    ("task.eval.max_queries=-3", "task.eval.max_queries must be an integer >= 1 (or null), got -3."),
    ("task.eval.use_title=maybe", "task.eval.use_title must be true or false, got 'maybe'."),
    ("task.eval.split=''", "task.eval.split must be a non-empty string, got ''."),
    ("task.name=''", "task.name must be a non-empty string, got ''."),
    ("task.data=null +task.data._target_=1", "task.data must be null or a DataModule config with a _target_"),
    ("eval.benchmarks.mmlu.mode=essay", "eval.benchmarks.mmlu.mode must be one of letter, cloze, kl, lm_loss, got 'essay'."),
    ("eval.benchmarks.mmlu_kl.positions=first", "eval.benchmarks.mmlu_kl.positions must be one of last, all, got 'first'."),
    ("eval.benchmarks.mmlu_kl.top_k=0", "eval.benchmarks.mmlu_kl.top_k must be an integer >= 1 (or null), got 0."),
    ("eval.benchmarks.mmlu_lm_loss.prompt=essay", "eval.benchmarks.mmlu_lm_loss.prompt must be one of letter, cloze, text (or null), got 'essay'."),
    ("eval.benchmarks.mmlu_cloze.chat_template=yes", "eval.benchmarks.mmlu_cloze.chat_template must be true or false, got 'yes'."),
    ("eval.benchmarks.mmlu.max_samples=0", "eval.benchmarks.mmlu.max_samples must be an integer >= 1 (or null), got 0."),
    ("eval.benchmarks.mmlu.enabled=sometimes", "eval.benchmarks.mmlu.enabled must be true or false, got 'sometimes'."),
    ("eval.batch_size=0", "eval.batch_size must be an integer >= 1, got 0."),
    ("eval.lm_eval.tasks=hellaswag", "eval.lm_eval.tasks must be a list of names, got 'hellaswag'."),
    ("eval.lm_eval.bootstrap_iters=-1", "eval.lm_eval.bootstrap_iters must be an integer >= 0, got -1."),
    ("evaluate.task_val=often", "evaluate.task_val must be true or false, got 'often'."),
    # the Lightning and torch edges, checked by their schemas (loki/schema.py, chosen by _target_)
    ("optimizer.weight_decay=-0.1", "optimizer.weight_decay must be a number in [0, inf], got -0.1."),
    ("optimizer.betas=[0.9]", "optimizer.betas must be two numbers in [0, 1), got [0.9]."),
    ("optimizer.betas=[0.9,1.0]", "optimizer.betas must be a number in [0, 1), got 1.0."),
    ("optimizer.eps=0", "optimizer.eps must be a positive number, got 0."),
    ("optimizer._partial_=false", "optimizer._partial_ must be true (the module passes the parameters), got False."),
    ("trainer.precision=bf16-half", "trainer.precision must be one of transformer-engine, "),
    ("trainer.devices=0", "trainer.devices must be an integer >= 1, got 0."),
    ("trainer.strategy=5", "trainer.strategy must be a strategy name or a `_target_` mapping, got 5."),
    ("trainer.max_steps=-5", "trainer.max_steps must be an integer >= -1, got -5."),
    ("trainer.max_epochs=1.5", "trainer.max_epochs must be an integer >= -1 (or null), got 1.5."),
    ("trainer.accumulate_grad_batches=0", "trainer.accumulate_grad_batches must be an integer >= 1, got 0."),
    ("trainer.gradient_clip_val=-1", "trainer.gradient_clip_val must be a number in [0, inf] (or null), got -1."),
    ("trainer.val_check_interval=1.5", "trainer.val_check_interval must be a fraction of an epoch in (0, 1] or a step count >= 1, got 1.5."),
    ("trainer.log_every_n_steps=0", "trainer.log_every_n_steps must be an integer >= 1, got 0."),
    ("trainer.num_sanity_val_steps=-2", "trainer.num_sanity_val_steps must be an integer >= -1, got -2."),
    ("trainer.deterministic=sometimes", "trainer.deterministic must be true or false, got 'sometimes'."),
    ("trainer.enable_model_summary=1", "trainer.enable_model_summary must be true or false, got 1."),
    ("logger.name=''", "logger.name must be a non-empty string, got ''."),
    ("logger=wandb logger.tags=loki", "logger.tags must be a list of names (or null), got 'loki'."),
    ("logger=wandb logger.log_model=maybe", "logger.log_model must be true or false, got 'maybe'."),
    ("logger=wandb logger.project=''", "logger.project must be a non-empty string, got ''."),
    ("callbacks.checkpoint.save_top_k=-2", "callbacks.checkpoint.save_top_k must be an integer >= -1, got -2."),
    ("checkpoint_every_n_steps=0", "callbacks.checkpoint.every_n_train_steps must be an integer >= 1 (or null), got 0."),
    ("callbacks.checkpoint.save_last=often", "callbacks.checkpoint.save_last must be true or false, got 'often'."),
    ("callbacks.lr_monitor.logging_interval=batch", "callbacks.lr_monitor.logging_interval must be one of step, epoch (or null), got 'batch'."),
    ("paths.cache_dir=''", "paths.cache_dir must be a non-empty string, got ''."),
]


@pytest.mark.parametrize("bad, sentence", BAD_TRAIN_VALUES, ids=[b for b, _ in BAD_TRAIN_VALUES])
def test_every_bad_value_stops_with_one_sentence_before_loading(bad, sentence, monkeypatch):
    from loki import recipe
    from loki.config import check_train_config

    def must_not_load(*args, **kwargs):
        raise AssertionError("a model was loaded before the config was checked")

    monkeypatch.setattr(recipe, "load_model_and_tokenizer", must_not_load)
    cfg = compose_config("train", "model=tiny", "task=tiny_rerank", *bad.split())
    with pytest.raises(LokiError) as err:
        check_train_config(cfg)
    assert str(err.value).startswith(sentence) and "\n" not in str(err.value)
    with pytest.raises(LokiError):  # and the recipe checks before it loads anything
        recipe.setup(cfg)


def test_positions_file_without_q_is_accepted(tmp_path):
    from loki.config import check_train_config

    positions = tmp_path / "positions.json"
    positions.write_text("[[0], [1], [2], [3]]")
    check_train_config(compose_config("train", "model=tiny", "task=tiny_rerank", f"loki.positions={positions}", "loki.q=null"))


@pytest.mark.parametrize("bad, sentence", [
    ("kva.batch_size=0", "kva.batch_size must be an integer >= 1, got 0."),
    ("kva.target=gold_letter", "kva.target must be one of predicted, gold, got 'gold_letter'."),
    ("data.offset=-1", "data.offset must be an integer >= 0, got -1."),
    ("trainer.num_nodes=0", "trainer.num_nodes must be an integer >= 1, got 0."),
])
def test_attribute_config_is_checked_too(bad, sentence):
    from loki.config import check_attribute_config

    with pytest.raises(LokiError) as err:
        check_attribute_config(compose_config("attribute", "model=tiny", bad))
    assert str(err.value).startswith(sentence)


def test_the_edge_groups_are_typed_yet_take_the_lightning_keys_they_do_not_name():
    from hydra.errors import ConfigCompositionException
    from omegaconf import OmegaConf

    from loki import schema
    from loki.config import check_train_config

    cfg = compose_config("train", "model=tiny", "task=tiny_rerank")
    types = {g: OmegaConf.get_type(cfg[g]) for g in ("optimizer", "trainer", "logger", "paths")}
    assert types == {"optimizer": schema.AdamWSchema, "trainer": schema.TrainerSchema, "logger": schema.CSVLoggerSchema, "paths": schema.PathsSchema}
    assert OmegaConf.get_type(cfg.callbacks.checkpoint) is schema.CheckpointSchema
    assert cfg.trainer.gradient_clip_val == 1.0 and cfg.optimizer.betas == [0.9, 0.95]  # the defaults, held by the schema
    # A Trainer argument the schema does not name is added with `+`; a callback is removed with `~` or added.
    extra = compose_config("train", "model=tiny", "task=tiny_rerank", "+trainer.num_nodes=2", "~callbacks.checkpoint",
                           "+callbacks.stop={_target_: lightning.pytorch.callbacks.EarlyStopping, monitor: val_loss}")
    assert extra.trainer.num_nodes == 2 and set(extra.callbacks) == {"lr_monitor", "stop"}
    check_train_config(extra)
    with pytest.raises(ConfigCompositionException, match="trainer.max_step"):  # a typo is refused at composition
        compose_config("train", "model=tiny", "trainer.max_step=5")
    # Another optimizer class is that class's to check: only the AdamW schema's checks apply to AdamW.
    assert schema.validate_edge({"_target_": "torch.optim.SGD", "lr": 0.1, "momentum": 2}, "optimizer") is None
    with pytest.raises(LokiError, match="optimizer.eps must be a positive number"):
        schema.validate_edge({"_target_": "torch.optim.AdamW", "lr": 0.1, "eps": -1, "foreach": True}, "optimizer")
