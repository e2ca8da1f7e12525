"""The pieces both studies share (studies/): the LR chooser, the typed result keys, the metrics accessor
for both metrics.json layouts, and the one config schema both study configs are checked against."""

from __future__ import annotations

import math

import pytest
from omegaconf import OmegaConf

from loki.errors import LokiError
from studies import metrics
from studies.arms import Arm, run_arms
from studies.config import StudyConfig, from_hydra
from studies.keys import SuppressionKey
from studies.lr import Selection, choose_lr
from tests.conftest import compose_config


def test_choose_lr_by_validation_loss_takes_the_lowest_and_by_accuracy_the_highest():
    runs = {1e-3: {"val_loss": 0.9, "task_metrics_val": {"acc": 0.2}},
            3e-3: {"val_loss": 0.4, "task_metrics_val": {"acc": 0.5}},
            1e-2: {"val_loss": 0.7, "task_metrics_val": {"acc": 0.6}}}
    assert choose_lr(runs, "val_loss") == 3e-3  # 0.4 < 0.7 < 0.9
    assert choose_lr(runs, "task_val") == 1e-2  # 0.6 > 0.5 > 0.2
    # a selection given as a record: the same rule with any reader
    assert choose_lr(runs, Selection("neg", lambda r: -r["val_loss"], higher_is_better=True)) == 3e-3


def test_choose_lr_breaks_ties_toward_the_smaller_lr_in_both_directions():
    tied = {1e-2: {"val_loss": 0.5, "task_metrics_val": {"acc": 0.7}}, 1e-3: {"val_loss": 0.5, "task_metrics_val": {"acc": 0.7}}}
    assert choose_lr(tied, "val_loss") == 1e-3 and choose_lr(tied, "task_val") == 1e-3


def test_choose_lr_refuses_a_run_without_the_metric_by_its_lr():
    with pytest.raises(LokiError, match=r"lr=0.01 has no task_val"):
        choose_lr({1e-3: {"task_metrics_val": {"acc": 0.5}}, 1e-2: {"task_metrics_val": {}}}, "task_val")
    with pytest.raises(LokiError, match=r"lr=0.003 has no val_loss"):
        choose_lr({3e-3: {"val_loss": None}}, "val_loss")
    with pytest.raises(LokiError, match="at least one finished run"):
        choose_lr({}, "val_loss")


def test_task_metrics_read_from_both_metrics_layouts():
    old = {"retention": {"before": {"retention/toy_facts_test/acc": 0.25, "retention/mmlu/acc": 0.4},
                         "after": {"retention/toy_facts_test/acc": 0.75, "retention/toy_facts_val/acc": 0.5, "retention/mmlu/acc": 0.3}}}
    new = {"primary_metric": "acc", "task_metrics": {"acc": 0.75, "logprob": -1.0}, "task_metrics_val": {"acc": 0.5},
           "retention": {"after": {"retention/mmlu/acc": 0.3}}}
    for run in (old, new):
        assert metrics.task_metric(run) == 0.75 and metrics.task_metric(run, stage="val") == 0.5
        assert metrics.retention(run) == {"retention/mmlu/acc": 0.3}  # the task never counts as retention
    assert metrics.base_task_metric(old) == 0.25 and math.isnan(metrics.base_task_metric(new))
    assert metrics.task_metric({"task_metrics": {"task/ndcg@10": 0.4, "ndcg@10_shuffled": 0.1}}, "ndcg@10") == 0.4
    assert math.isnan(metrics.task_metric({}, "ndcg@10")) and math.isnan(metrics.forgetting_avg({}))


def test_suppression_keys_are_records_that_spell_the_earlier_json_keys():
    ranked, random = SuppressionKey(0.1, "lowest", "paper", "abs"), SuppressionKey(0.05, "random")
    assert ranked == SuppressionKey(0.1, "lowest", "paper", "abs") and len({ranked, SuppressionKey(0.1, "lowest", "paper", "abs")}) == 1
    assert (ranked.real_label, random.real_label) == ("paper|abs|0.1|lowest", "-|-|0.05|random")
    assert (ranked.toy_label, random.toy_label) == ("suppress-lowest-abs-q0.1", "suppress-random-q0.05")
    assert SuppressionKey(0.2, "highest", "captum", "signed").toy_label == "suppress-highest-q0.2"
    assert SuppressionKey.from_real_label("paper|abs|0.1|lowest") == ranked and SuppressionKey.from_real_label("-|-|0.05|random") == random
    with pytest.raises(ValueError, match="kind"):
        SuppressionKey(0.1, "middle", "paper", "abs")
    with pytest.raises(ValueError, match="random rows"):
        SuppressionKey(0.1, "random", "paper", "abs")


def test_an_arm_without_a_grid_takes_its_familys_chosen_lr():
    calls = []

    def run(arm, lr, seed):
        calls.append((arm.name, lr, seed))
        return {"val_loss": {1e-3: 0.5, 1e-2: 0.2}.get(lr, 0.9)}

    arms = [Arm("a", (), (0, 1), "loki", lr_grid=(1e-3, 1e-2), sweep=True), Arm("b", (), (0,), "loki", lr_grid=(1e-3, 1e-2)),
            Arm("c", (), (0, 1), "full")]
    results = run_arms(arms, run, "val_loss")
    assert results["a"].lr == 1e-2 and len(results["a"].runs) == 2 and set(results["a"].grid_runs) == {1e-3, 1e-2}
    assert results["b"].lr == 1e-2 and ("b", 1e-3, 0) not in calls  # b borrows a's choice, no grid of its own
    assert results["c"].lr is None and ("c", None, 1) in calls  # no grid, no family choice: the config's LR


def test_both_study_configs_validate_against_the_one_schema(tmp_path):
    toy = from_hydra(compose_config("study", f"out={tmp_path}"))
    assert (toy.kind, toy.select_lr_by, toy.implant.arms, toy.implant.max_steps) == ("toy", "val_loss", None, None)
    assert toy.suppression.random_seeds == toy.implant.seeds == [0, 1, 2] and "loki-q0.1" in toy.implant.lr_grid
    quick = from_hydra(compose_config("study", f"out={tmp_path}", "quick=40", "seeds=[0]", "arms=[]"))
    assert quick.implant.max_steps == 40 and quick.implant.seeds == [0] and quick.implant.arms == []
    for name in ("smollm135m", "smollm135m_paper"):
        real = from_hydra(compose_config("study", f"study={name}"))
        assert (real.kind, real.name, real.select_lr_by) == ("real", name, "task_val") and real.recipes


@pytest.mark.parametrize("override, message", [
    ("study.select_lr_by=val_acc", "study.select_lr_by must be one of val_loss, task_val, got 'val_acc'."),
    ("study.suppression.qs=[0.1,1.5]", "study.suppression.qs must be a number in (0, 1), got 1.5."),
    ("study.implant.arms=[full,lora-r8]", "study.implant.arms must be a list of arms"),
    ("++study.implant.lr_grid.adam=[1e-3]", "study.implant.lr_grid's keys must name LR families of full, loki, lora, got 'adam'."),
    ("study.kind=huge", "study.kind must be one of toy, real, got 'huge'."),
    ("++study.implant.epochs=3", "study.implant.epochs is not a study setting"),
])
def test_a_bad_study_value_is_refused_with_one_sentence(override, message):
    cfg = compose_config("study", "study=smollm135m", override)
    with pytest.raises(LokiError) as err:
        from_hydra(cfg)
    assert str(err.value).startswith(message) and str(err.value).count(". ") == 0


def test_a_toy_lr_grid_must_name_toy_arms(tmp_path):
    with pytest.raises(LokiError, match="lr_grid's keys must name arms of full, "):
        from_hydra(compose_config("study", f"out={tmp_path}", "++lr_grid.lora-r8=[1e-3]"))
    values = OmegaConf.to_container(compose_config("study", "study=smollm135m").study, resolve=True)
    assert StudyConfig.from_dict(values).implant.lr_grid["loki"] == [3e-4, 1e-3, 3e-3]
