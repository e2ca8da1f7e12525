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


def test_kl_and_lm_loss_are_reported_beside_the_avg_not_in_it():
    before = {"retention/mmlu/acc": 0.5, "retention/mmlu_kl/kl": 0.0, "retention/mmlu_kl/top1_agree": 1.0,
              "retention/mmlu_kl/n": 6.0, "retention/mmlu_lm_loss/lm_loss": 2.0, "retention/mmlu_lm_loss/n": 6.0,
              "retention/mmlu_lm_loss/tokens": 300.0}
    after = {"retention/mmlu/acc": 0.25, "retention/mmlu_kl/kl": 0.3, "retention/mmlu_kl/top1_agree": 0.5,
             "retention/mmlu_kl/n": 6.0, "retention/mmlu_lm_loss/lm_loss": 2.5, "retention/mmlu_lm_loss/n": 6.0,
             "retention/mmlu_lm_loss/tokens": 300.0}
    report = forgetting_report(before, after)
    assert report["avg"] == pytest.approx(50.0) and report["n"] == 1  # acc only
    assert report["kl"] == {"mmlu_kl": pytest.approx(0.3)}
    assert report["lm_loss"] == {"mmlu_lm_loss": pytest.approx({"before": 2.0, "after": 2.5, "delta": 0.5})}
    assert "tokens" not in report["benchmarks"]["mmlu_lm_loss"] and "n" not in report["benchmarks"]["mmlu_kl"]
    table = format_report({"forgetting": report})
    assert "KL(base || tuned) on mmlu_kl: 0.3000 nats" in table
    assert "LM loss on mmlu_lm_loss: 2.0000 -> 2.5000 nats/token (+0.5000)" in table


def test_lm_eval_headline_score_enters_the_avg():
    # hellaswag's headline is acc_norm (reported as `score`), not its plain `acc`
    before = {"retention/lm_eval/hellaswag/acc": 0.4, "retention/lm_eval/hellaswag/acc_norm": 0.5,
              "retention/lm_eval/hellaswag/score": 0.5, "retention/lm_eval/gsm8k/score": 0.2}
    after = {"retention/lm_eval/hellaswag/acc": 0.4, "retention/lm_eval/hellaswag/acc_norm": 0.4,
             "retention/lm_eval/hellaswag/score": 0.4, "retention/lm_eval/gsm8k/score": 0.2}
    report = forgetting_report(before, after)
    assert report["avg"] == pytest.approx(100 / 2 * ((0.5 - 0.4) / 0.5 + 0.0)) and report["n"] == 2


def test_evaluate_reloads_an_exported_run(tmp_path, chat_tokenizer):
    from omegaconf import OmegaConf

    from tests.conftest import make_tiny_model
    from loki.evaluate import evaluate_run

    run = tmp_path / "run"
    make_tiny_model(vocab=len(chat_tokenizer)).save_pretrained(run / "model")
    chat_tokenizer.save_pretrained(run / "model")
    cfg = OmegaConf.create(
        {
            "paths": {"output_dir": "${hydra:runtime.output_dir}"},  # unresolvable outside Hydra: must not be touched
            "task": {"name": "tiny_rerank", "eval": OmegaConf.load("conf/task/tiny_rerank.yaml").eval},
            "eval": {"batch_size": 4, "benchmarks": {"mmlu": {"path": "tests/fixtures/mmlu/test.jsonl", "offset": 0, "per_subject": None}}},
        }
    )
    (run / ".hydra").mkdir()
    OmegaConf.save(cfg, run / ".hydra" / "config.yaml")
    before = {"retention/mmlu/acc": 0.5}
    (run / "metrics.json").write_text(json.dumps({"model": "tiny", "retention": {"before": before}}))

    evaluate_run(run, {"eval": {"benchmarks": {"mmlu": {"max_samples": 4}}}}, device="cpu")
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["model"] == "tiny" and "map@1" in metrics["task_metrics"]
    assert metrics["retention"]["after"]["retention/mmlu/n"] == 4
    after_acc = metrics["retention"]["after"]["retention/mmlu/acc"]
    assert metrics["forgetting"]["avg"] == pytest.approx(100 * (0.5 - after_acc) / 0.5)

    from loki.errors import LokiError

    with pytest.raises(LokiError, match="has no .hydra/config.yaml"):
        evaluate_run(tmp_path / "missing")
