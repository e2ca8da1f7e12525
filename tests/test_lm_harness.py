"""lm-evaluation-harness on the in-memory model (loki.eval.lm_harness), offline: local task YAMLs over the
MMLU fixture, a tiny random model; plus the result flattening and the eval=paper config."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from loki.errors import LokiError
from loki.eval.lm_harness import HEADLINE, PAPER_TASKS, flatten_results, require_lm_eval, task_modules

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
        if ":" in line and not line.lstrip().startswith(("#", "-")) and line != "defaults:":  # Hydra's defaults list aside
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
            "cloze": {"path": "tests/fixtures/mmlu/test.jsonl", "mode": "cloze", "chat_template": False, "offset": 0, "per_subject": None},
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


# What the installed lm-eval task files of the paper's six tasks import beyond the standard library (read by
# hand from lm_eval/tasks/<dir>/*.py: hellaswag/utils.py imports datasets, humaneval/utils.py evaluate,
# ifeval/instructions.py langdetect, ifeval/instructions_util.py immutabledict, nltk and packaging).
PAPER_TASK_MODULES = {
    "triviaqa": (),
    "gsm8k": (),
    "hellaswag": ("datasets",),
    "winogrande": (),
    "humaneval": ("evaluate",),
    "ifeval": ("immutabledict", "langdetect", "nltk", "packaging"),
}


def test_paper_tasks_modules_come_from_the_installed_task_files():
    lm_eval = pytest.importorskip("lm_eval", reason='lm-eval not installed (pip install -e ".[paper-eval]")')
    tasks_dir = Path(lm_eval.__file__).parent / "tasks"
    for task in PAPER_TASKS:
        got = task_modules(task)
        assert tuple(got) == PAPER_TASK_MODULES[task], task
        for module in got:  # each one is an import statement in a file of the task's own dir
            sources = "\n".join(f.read_text() for f in (tasks_dir / task).glob("*.py"))
            assert f"import {module}" in sources or f"from {module}" in sources, (task, module)
    # every module is importable here, so the check passes for eval=paper
    require_lm_eval({"tasks": list(PAPER_TASKS)})


def test_a_missing_task_module_is_named_with_its_pip_install(monkeypatch):
    pytest.importorskip("lm_eval", reason='lm-eval not installed (pip install -e ".[paper-eval]")')
    import importlib

    real_import = importlib.import_module

    def without_langdetect(name, package=None):
        if name == "langdetect":
            raise ModuleNotFoundError("No module named 'langdetect'", name="langdetect")
        return real_import(name, package)

    monkeypatch.setattr(importlib, "import_module", without_langdetect)
    require_lm_eval({"tasks": ["gsm8k", "hellaswag"]})  # neither needs langdetect
    with pytest.raises(LokiError) as caught:
        require_lm_eval({"tasks": ["gsm8k", "ifeval"]})
    message = str(caught.value)
    assert "'ifeval'" in message and "'langdetect'" in message and 'pip install -e ".[paper-eval]"' in message
    assert "\n" not in message and message.endswith(".")


def test_a_local_task_module_outside_the_extra_gets_its_own_pip_install(tmp_path):
    pytest.importorskip("lm_eval", reason='lm-eval not installed (pip install -e ".[paper-eval]")')
    # a local task: its YAML includes a base YAML whose !function module imports a helper file, which
    # imports a module that is not installed (and one inside a guarded try, which is optional)
    (tmp_path / "_base.yaml").write_text("output_type: multiple_choice\nprocess_docs: !function prep.process_docs\n")
    (tmp_path / "task.yaml").write_text("include: _base.yaml\ntask: loki_local_probe\ndataset_path: json\n")
    (tmp_path / "prep.py").write_text("import json\nfrom helper import clean\n\ndef process_docs(d):\n    return d\n")
    (tmp_path / "helper.py").write_text(
        "import loki_not_a_module_xyz.sub\ntry:\n    import loki_optional_xyz\nexcept ImportError:\n    pass\n\n"
        "def clean(x):\n    return x\n"
    )
    assert task_modules("loki_local_probe", [tmp_path]) == ["loki_not_a_module_xyz"]
    # a group naming the task, and a tag on it, need the same module
    (tmp_path / "group.yaml").write_text("group: loki_local_group\ntask:\n  - loki_local_probe\n")
    assert task_modules("loki_local_group", [tmp_path]) == ["loki_not_a_module_xyz"]
    with pytest.raises(LokiError, match=r"'loki_local_probe'.*'loki_not_a_module_xyz'.*run pip install loki_not_a_module_xyz \("):
        require_lm_eval({"tasks": ["loki_local_probe"], "include_path": str(tmp_path)})


def test_the_paper_eval_extra_pulls_lm_evals_ifeval_extra():
    import importlib.metadata
    import re
    import tomllib

    pytest.importorskip("lm_eval", reason='lm-eval not installed (pip install -e ".[paper-eval]")')
    extra = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]["paper-eval"]
    lm_eval_req = next(r for r in extra if re.match(r"lm[-_]eval\b", r))
    assert "ifeval" in re.search(r"\[(.*?)\]", lm_eval_req).group(1).split(",")
    # what lm-eval's own ifeval extra installs covers what its IFEval task files import (packaging aside:
    # transformers requires it)
    requires = importlib.metadata.requires("lm_eval") or []
    ifeval_extra = {re.match(r"[\w.\-]+", r).group(0).lower() for r in requires if 'extra == "ifeval"' in r}
    assert set(task_modules("ifeval")) - {"packaging"} <= ifeval_extra
