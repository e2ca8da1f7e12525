"""The task interface: one object per task (data, evaluator by kind, primary metric), task metrics kept
out of the forgetting report, and every task.* / retention setting checked before anything loads."""

from __future__ import annotations

import json

import pytest
import torch

from loki.errors import LokiError
from tests.conftest import compose_config, make_tiny_model, run_train


def test_kinds_are_the_modules_of_the_package():
    from loki.tasks import kinds

    assert kinds() == ["bfcl", "cloze_qa", "facts", "reranker"]


def test_facts_task_reports_its_metric_as_the_task_metric_and_not_as_forgetting(tmp_path):
    """train.py task=toy_facts: the facts accuracy is the task metric, the forgetting Avg covers only the
    retention benchmarks, and a sweep's return value is that metric."""
    from loki.sweep import primary_metric

    overrides = ("model=tiny", "task=toy_facts", "loki=off", "trainer.max_steps=2", "trainer.max_epochs=-1",
                 "export=false", "evaluate.validation_task_metric=false")
    metrics = run_train(tmp_path / "run", *overrides)
    assert metrics["primary_metric"] == "acc"
    task = metrics["task_metrics"]
    assert set(task) >= {"acc", "logprob", "n"} and task["n"] == 60.0  # 10 lands x 6 relations, one test question each
    assert 0.0 <= task["acc"] <= 1.0 and task["logprob"] <= 0.0
    assert metrics["task_metrics_val"]["n"] == 60.0 and metrics["task_metrics_val"] != task  # another paraphrase
    benchmarks = set(metrics["forgetting"]["benchmarks"])
    assert benchmarks == {"mmlu", "mmlu_cloze", "mmlu_kl", "mmlu_lm_loss"}  # eval/tiny.yaml's, nothing else
    assert not any("toy_facts" in key for key in metrics["retention"]["after"])
    on_disk = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert on_disk["task_metrics"] == task
    cfg = compose_config("train", *overrides)
    assert primary_metric(cfg, metrics) == ("acc", task["acc"])  # what Optuna / Ax receive


def test_cloze_items_add_up_to_the_summary(tmp_path, chat_tokenizer):
    """Per-item results (for bootstrapping) agree with the aggregates they come from."""
    from loki.tasks import Task

    task = Task("facts", None, {"kind": "facts", "primary": "acc", "cache_dir": str(tmp_path), "lands": 2})
    model = make_tiny_model(vocab=len(chat_tokenizer))
    items: list = []
    got = task.evaluate(model, chat_tokenizer, "test", items=items)
    assert len(items) == got["n"] == 12
    assert sum(i["correct"] for i in items) / 12 == pytest.approx(got["acc"])
    assert sum(i["logprob"] for i in items) / 12 == pytest.approx(got["logprob"])
    assert all(i["logprob"] <= 0 for i in items)


def test_facts_log_probability_matches_an_independent_computation(tmp_path, chat_tokenizer):
    """The graded measure: log softmax over the four choices' summed token log-probabilities, at the gold."""
    from loki.data.mmlu import load_mmlu
    from loki.prompts import cloze_context
    from loki.tasks import Task

    task = Task("facts", None, {"kind": "facts", "primary": "logprob", "cache_dir": str(tmp_path), "lands": 1})
    model = make_tiny_model(vocab=len(chat_tokenizer))
    items: list = []
    task.evaluate(model, chat_tokenizer, "test", items=items)
    rows = load_mmlu(source=None, path=str(next(tmp_path.rglob("test.jsonl"))), split="test", per_subject=None)
    row = rows[0]
    context, sep = cloze_context(chat_tokenizer, row, True)
    ctx = chat_tokenizer(context, add_special_tokens=False)["input_ids"]
    sums = []
    for choice in row["choices"]:
        cont = chat_tokenizer(sep + choice, add_special_tokens=False)["input_ids"]
        ids = torch.tensor([ctx + cont])
        with torch.no_grad():
            logp = torch.log_softmax(model(ids).logits[0].double(), -1)
        sums.append(sum(float(logp[len(ctx) - 1 + j, t]) for j, t in enumerate(cont)))
    expected = float(torch.log_softmax(torch.tensor(sums, dtype=torch.float64), 0)[row["answer"]])
    assert items[0]["logprob"] == pytest.approx(expected, abs=1e-4)


def test_facts_primary_metric_is_checked_against_its_evaluator():
    from loki.config import check_train_config

    cfg = compose_config("train", "model=tiny", "task=toy_facts", "task.eval.primary=retention/toy_facts_test/acc")
    with pytest.raises(LokiError, match=r"^task.eval.primary must be one of acc, acc_norm, logprob, n, prob, got"):
        check_train_config(cfg)


def test_an_unknown_setting_of_a_task_kind_is_refused_at_composition():
    from hydra.errors import ConfigCompositionException

    with pytest.raises(ConfigCompositionException, match="nonsense"):
        compose_config("train", "model=tiny", "task=tiny_rerank", "task.eval.nonsense=1")


def test_schema_defaults_fill_what_the_yaml_leaves_out():
    """conf/eval/default.yaml names only each benchmark's mode (and what differs); the schema fills the
    rest, and an override of a key the YAML does not spell works without `+`."""
    cfg = compose_config("train", "model=qwen0.5b", "eval.benchmarks.mmlu.seed=3")
    mmlu = cfg.eval.benchmarks.mmlu
    assert (mmlu.offset, mmlu.per_subject, mmlu.split, mmlu.seed) == (50, 20, "test", 3)
    assert cfg.eval.benchmarks.mmlu_lm_loss.chat_template is False and cfg.eval.benchmarks.mmlu_kl.top_k == 256


def test_the_final_validation_metric_is_not_measured_twice(tmp_path, monkeypatch):
    """When the per-validation callback measured the task at the last optimizer step, metrics.json's
    `task_metrics_val` is that measurement, not a second evaluation of the same weights."""
    from loki.tasks import Task

    calls: list[str] = []
    real = Task.evaluate
    monkeypatch.setattr(Task, "evaluate", lambda self, model, tok, stage="test", items=None: calls.append(stage) or real(self, model, tok, stage, items))
    metrics = run_train(tmp_path / "run", "model=tiny", "task=tiny_rerank", "loki=off", "export=false", "evaluate.retention=false")
    assert calls == ["val", "test"]  # one validation at the end of the one epoch, then the test
    assert metrics["task_metrics_val"]["map@1"] >= 0 and set(metrics["task_metrics_val"]) == set(metrics["task_metrics"])
    calls.clear()
    run_train(tmp_path / "run2", "model=tiny", "task=tiny_rerank", "loki=off", "export=false", "evaluate.retention=false",
              "evaluate.validation_task_metric=false")
    assert calls == ["test", "val"]  # no callback: the end measures the validation items itself
