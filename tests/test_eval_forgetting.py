"""The paper's forgetting score, the per-benchmark report, the printed table, and loki.evaluate."""

from __future__ import annotations

import json
import math

import pytest

from loki.eval import format_report, forgetting_report, forgetting_score


def test_forgetting_score_on_known_numbers():
    # (0.8 - 0.6) / 0.8 = 0.25, (0.5 - 0.55) / 0.5 = -0.1, (0.4 - 0.4) / 0.4 = 0 -> 100/3 * 0.15 = 5
    before = {"a": 0.8, "b": 0.5, "c": 0.4}
    after = {"a": 0.6, "b": 0.55, "c": 0.4}
    assert forgetting_score(before, after) == pytest.approx(5.0)
    assert forgetting_score({"a": 0.0, "b": 0.5}, {"a": 0.2, "b": 0.25}) == pytest.approx(50.0)  # zero left out
    assert math.isnan(forgetting_score({}, {}))


def test_forgetting_report_per_benchmark():
    before = {"retention/mmlu/acc": 0.5, "retention/mmlu/logprob": -1.2, "retention/mmlu/n": 10.0,
              "retention/lm_eval/arc_easy/acc": 0.8}
    after = {"retention/mmlu/acc": 0.4, "retention/mmlu/logprob": -1.5, "retention/mmlu/n": 10.0,
             "retention/lm_eval/arc_easy/acc": 0.8}
    report = forgetting_report(before, after)
    assert report["avg"] == pytest.approx(100 / 2 * ((0.5 - 0.4) / 0.5 + 0.0))
    assert report["n"] == 2 and report["measure"] == "acc"
    assert report["benchmarks"]["mmlu"]["acc"] == pytest.approx({"before": 0.5, "after": 0.4, "delta": -0.1})
    assert report["benchmarks"]["mmlu"]["logprob"]["delta"] == pytest.approx(-0.3)
    assert "n" not in report["benchmarks"]["mmlu"]
    assert report["benchmarks"]["lm_eval/arc_easy"]["acc"]["delta"] == 0.0

    table = format_report({"model": "tiny", "task_metrics": {"map@1": 0.5}, "forgetting": report})
    assert "map@1" in table and "mmlu/acc" in table and "-0.1000" in table and "10.0000 %" in table


def test_evaluate_reloads_an_exported_run(tmp_path, chat_tokenizer):
    from omegaconf import OmegaConf

    from tests.conftest import make_tiny_model
    from loki.evaluate import main

    run = tmp_path / "run"
    make_tiny_model(vocab=len(chat_tokenizer)).save_pretrained(run / "model")
    chat_tokenizer.save_pretrained(run / "model")
    cfg = OmegaConf.create(
        {
            "paths": {"output_dir": "${hydra:runtime.output_dir}"},  # unresolvable outside Hydra: must not be touched
            "task": {"name": "tiny_rerank", "eval": OmegaConf.load("conf/task/tiny_rerank.yaml").eval},
            "eval": {"batch_size": 4, "benchmarks": {"mmlu": {"path": "tests/fixtures/mmlu/test.jsonl", "per_subject": None}}},
        }
    )
    (run / ".hydra").mkdir()
    OmegaConf.save(cfg, run / ".hydra" / "config.yaml")
    before = {"retention/mmlu/acc": 0.5}
    (run / "metrics.json").write_text(json.dumps({"model": "tiny", "retention": {"before": before}}))

    assert main([f"run_dir={run}", "device=cpu", "eval.benchmarks.mmlu.max_samples=4"]) == 0
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["model"] == "tiny" and "map@1" in metrics["task_metrics"]
    assert metrics["retention"]["after"]["retention/mmlu/n"] == 4
    after_acc = metrics["retention"]["after"]["retention/mmlu/acc"]
    assert metrics["forgetting"]["avg"] == pytest.approx(100 * (0.5 - after_acc) / 0.5)

    assert main([f"run_dir={tmp_path / 'missing'}"]) == 2
