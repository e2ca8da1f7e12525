"""lm-evaluation-harness on the in-memory model (loki.eval.lm_harness), offline: local task YAMLs over the
MMLU fixture, a tiny random model; plus the result flattening and the eval=paper config."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from loki.errors import LokiError
from loki.eval.lm_harness import HEADLINE, PAPER_TASKS, flatten_results, require_lm_eval

ROOT = Path(__file__).resolve().parents[1]
TASKS = ROOT / "tests" / "fixtures" / "lm_eval"


def test_flatten_results_keeps_metrics_and_the_headline_score():
    results = {
        "gsm8k": {"alias": "gsm8k", "exact_match,strict-match": 0.25, "exact_match_stderr,strict-match": 0.1,
                  "exact_match,flexible-extract": 0.5, "sample_len": 4},
        "hellaswag": {"acc,none": 0.3, "acc_norm,none": 0.4, "acc_norm_stderr,none": 0.01},
        "mine": {"f1,none": 0.7},
    }
    out = flatten_results(results, {"mine": "f1,none"})
    assert out == {
        "retention/lm_eval/gsm8k/exact_match_strict-match": 0.25,
        "retention/lm_eval/gsm8k/exact_match_flexible-extract": 0.5,
        "retention/lm_eval/gsm8k/n": 4.0,
        "retention/lm_eval/gsm8k/score": 0.25,
        "retention/lm_eval/hellaswag/acc": 0.3,
        "retention/lm_eval/hellaswag/acc_norm": 0.4,
        "retention/lm_eval/hellaswag/score": 0.4,
        "retention/lm_eval/mine/f1": 0.7,
        "retention/lm_eval/mine/score": 0.7,
    }


def test_paper_config_names_the_six_benchmarks_with_a_headline_each():
    from omegaconf import OmegaConf

    cfg = OmegaConf.load(ROOT / "conf" / "eval" / "paper.yaml")
    assert tuple(cfg.lm_eval.tasks) == PAPER_TASKS == ("triviaqa", "gsm8k", "hellaswag", "winogrande", "humaneval", "ifeval")
    assert dict(cfg.lm_eval.headline) == HEADLINE
    for line in (ROOT / "conf" / "eval" / "paper.yaml").read_text().splitlines():
        if ":" in line and not line.lstrip().startswith("#"):
            assert "#" in line, f"setting without a comment: {line!r}"


def test_missing_lm_eval_names_the_extra(monkeypatch):
    require_lm_eval({"tasks": []})  # nothing asked: nothing needed
    monkeypatch.setitem(sys.modules, "lm_eval", None)
    with pytest.raises(LokiError, match=r'pip install -e "\.\[paper-eval\]"'):
        require_lm_eval({"tasks": ["gsm8k"]})


def test_local_tasks_on_a_tiny_model_agree_with_retention_cloze(chat_tokenizer, monkeypatch):
    pytest.importorskip("lm_eval", reason='lm-eval not installed (pip install -e ".[paper-eval]")')
    from loki.eval import run_retention
    from tests.conftest import make_tiny_model

    monkeypatch.chdir(ROOT)  # the task YAMLs name the fixture relative to the repo root
    model = make_tiny_model(vocab=len(chat_tokenizer), seed=3)
    cfg = {
        "batch_size": 4,
        "benchmarks": {
            # the same rows and text as the lm-eval multiple-choice task: "Question: ...\nAnswer:" + " <choice>"
            "cloze": {"path": "tests/fixtures/mmlu/test.jsonl", "mode": "cloze", "chat_template": False, "per_subject": None},
        },
        "lm_eval": {
            "tasks": ["loki_fixture_mc", "loki_fixture_gen"],
            "include_path": str(TASKS),
            "headline": {"loki_fixture_mc": "acc,none", "loki_fixture_gen": "exact_match,none"},
            "batch_size": 4,
        },
    }
    got = run_retention(model, chat_tokenizer, cfg)
    assert got["retention/lm_eval/loki_fixture_mc/n"] == 12 and got["retention/lm_eval/loki_fixture_gen/n"] == 12
    assert got["retention/lm_eval/loki_fixture_mc/score"] == got["retention/lm_eval/loki_fixture_mc/acc"]
    assert got["retention/lm_eval/loki_fixture_mc/acc"] == pytest.approx(got["retention/cloze/acc"])
    assert 0.0 <= got["retention/lm_eval/loki_fixture_gen/score"] <= 1.0
    assert not any("stderr" in key for key in got)
