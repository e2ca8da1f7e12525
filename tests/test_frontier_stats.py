"""The frontier's statistics (studies.frontier.stats) on hand-made points with hand-computed numbers:
fronts, least forgetting at a level, common levels, the bootstrap (paired items, seeds, inf), the items
files; and the report (studies.frontier.report) built from them."""

from __future__ import annotations

import json
from pathlib import Path
import math

import numpy as np
import pytest

from loki.errors import LokiError
from studies.frontier import stats


def pt(pid, method, task, kl, lr=1e-4, seed=0, alpha=1.0, lm=None, avg=None, graded=None):
    return {"id": pid, "method": method, "lr": lr, "seed": seed, "alpha": alpha, "task": task,
            "task_graded": graded, "forgetting": {"kl": kl, "lm_loss_delta": lm, "avg": avg}}


def ids(points):
    return [p["id"] for p in points]


# ------------------------------------------------------------------------------------------ fronts

A = [
    pt("a1", "A", 0.5, 0.10, lr=1e-4),
    pt("a2", "A", 0.7, 0.20, lr=3e-4),
    pt("a2-half", "A", 0.7, 0.20, lr=3e-4, alpha=0.5),  # ties a2: same lr and seed, lower alpha
    pt("a4", "A", 0.6, 0.30, lr=1e-3),                  # dominated by a2 (less task, more forgetting)
    pt("a5", "A", 0.8, 0.40, lr=1e-3, alpha=0.5),
    pt("a6", "A", 0.7, 0.25, lr=1e-3),                  # same task as a2, more forgetting: dominated
    pt("a7", "A", 0.65, 0.20, lr=1e-3),                 # same forgetting as a2, less task: dominated
]


def test_front_drops_dominated_points_and_keeps_one_of_a_tie():
    assert ids(stats.pareto_front(A)) == ["a1", "a2", "a5"]  # by task; a2 (alpha 1) represents its tie


def test_tie_representative_is_lowest_lr_then_lowest_seed_then_highest_alpha():
    tie = [pt("hi-lr", "A", 0.7, 0.2, lr=1e-3), pt("s1", "A", 0.7, 0.2, lr=1e-4, seed=1),
           pt("s0-a.5", "A", 0.7, 0.2, lr=1e-4, seed=0, alpha=0.5), pt("s0-a.75", "A", 0.7, 0.2, lr=1e-4, seed=0, alpha=0.75)]
    for order in (tie, tie[::-1]):
        assert ids(stats.pareto_front(order)) == ["s0-a.75"]


def test_front_of_one_point_and_of_points_without_the_measure():
    one = [pt("x", "B", 0.4, 0.05)]
    assert ids(stats.pareto_front(one)) == ["x"]
    assert stats.pareto_front([pt("y", "B", 0.4, None)], measure="kl") == []
    assert ids(stats.pareto_front(one + [pt("z", "B", 0.9, None, lm=0.3)], measure="lm_loss_delta")) == ["z"]


def test_least_forgetting_at_a_level():
    assert stats.least_forgetting_at(A, 0.5) == 0.10
    assert stats.least_forgetting_at(A, 0.55) == 0.20   # a1 is below; a2 (0.7, 0.2) is the least above
    assert stats.least_forgetting_at(A, 0.75) == 0.40   # only a5 reaches
    assert stats.least_forgetting_at(A, 0.9) is None    # never reached
    assert stats.least_forgetting_point(A, 0.65)["id"] == "a2"  # a2, a2-half and a7 tie at 0.2: a2 first
    # 18 of 30 right reaches the level 0.6 however the level was computed
    level = 0.1 * 6
    assert level != 18 / 30 and stats.least_forgetting_at([pt("p", "A", 18 / 30, 0.3)], level) == 0.3


def test_common_levels_every_method_reaches():
    by = {"A": A, "B": [pt("b1", "B", 0.4, 0.1), pt("b2", "B", 0.6, 0.2)]}
    # top = min(0.8, 0.6) = 0.6; bottom = max(0.5, 0.4) = 0.5; k = 4 -> 0.525, 0.55, 0.575, 0.6
    assert stats.common_levels(by, k=4) == pytest.approx([0.525, 0.55, 0.575, 0.6])
    assert stats.common_levels(by, k=2, base_task=0.56) == pytest.approx([0.58, 0.6])  # the base raises the bottom
    assert stats.common_levels({"A": A, "C": [pt("c", "C", 0.5, 0.1)]}, k=3) == [0.5]  # bottom >= top: the top only
    for method, points in by.items():
        for level in stats.common_levels(by, k=4):
            assert stats.least_forgetting_at(points, level) is not None
    with pytest.raises(LokiError, match="k must be"):
        stats.common_levels(by, k=0)


# -------------------------------------------------------------------------------------- bootstrap


def item_rows(correct, kl=None, nll=None, tokens=None, logprob=None):
    """One point's items in the file layout: {"task": [...], "retention": {...}}."""
    logprob = logprob if logprob is not None else [-0.1 if c else -2.0 for c in correct]
    retention = {}
    if kl is not None:
        retention["kl"] = [{"kl": v} for v in kl]
    if nll is not None:
        retention["text"] = [{"nll": a, "tokens": b} for a, b in zip(nll, tokens)]
    retention["mmlu"] = [{"id": f"m{i}", "correct": True, "logprob": -1.0} for i in range(3)]  # letter/cloze: not read
    return {"task": [{"id": f"q{i}", "correct": c, "logprob": lp} for i, (c, lp) in enumerate(zip(correct, logprob))],
            "retention": retention}


def test_n_boot_zero_gives_the_estimate_without_items():
    table = stats.matched_table(A + [pt("base", "base", 0.3, 0.0)], None, [0.55, 0.9], "kl", n_boot=0)
    assert list(table) == ["A"]  # the base model is a reference, not a method
    reached, never = table["A"]
    assert (reached["estimate"], reached["low"], reached["high"], reached["point"]) == (0.2, 0.2, 0.2, "a2")
    assert never["estimate"] is None and never["high"] == math.inf and never["unreached"] == 1.0


def test_constant_items_reproduce_the_estimate_in_every_replicate():
    points = [pt("p", "A", 1.0, 0.3), pt("q", "A", 0.0, 0.1), pt("r", "B", 1.0, 0.2, seed=3)]
    items = stats.items_from_rows({
        "p": item_rows([True] * 4, kl=[0.3] * 5),
        "q": item_rows([False] * 4, kl=[0.1] * 5),
        "r": item_rows([True] * 4, kl=[0.2] * 5),
    })
    table = stats.matched_table(points, items, [0.5], "kl", n_boot=200, seed=1)
    for method, value in (("A", 0.3), ("B", 0.2)):
        cell = table[method][0]
        assert cell["estimate"] == cell["low"] == cell["high"] == pytest.approx(value)
        assert np.allclose(cell["replicates"], value) and cell["unreached"] == 0.0


def test_interval_over_two_prompts_is_hand_computed():
    # one point, every test item right, KL items [0, 1]: a replicate's KL is 0, 0.5 or 1 with
    # probabilities 1/4, 1/2, 1/4, so the 2.5 % and 97.5 % quantiles are 0 and 1
    items = stats.items_from_rows({"p": item_rows([True] * 3, kl=[0.0, 1.0])})
    cell = stats.matched_table([pt("p", "A", 1.0, 0.5)], items, [1.0], "kl", n_boot=1000)["A"][0]
    assert (cell["estimate"], cell["low"], cell["high"]) == (0.5, 0.0, 1.0)
    shares = [np.mean(cell["replicates"] == v) for v in (0.0, 0.5, 1.0)]
    assert shares == pytest.approx([0.25, 0.5, 0.25], abs=0.05)


def test_ranked_queries_weigh_by_their_weight_in_the_task_value_and_its_bootstrap():
    """A ranking task's items: {"value", "weight"} per query, no logprob. The task value is the weighted mean;
    with two queries of values 1 and 0 weighing 3 and 1 (0.75), a replicate draws each query 0-2 times, so
    it gives 1 (q0 twice), 0.75 (each once) or 0 (q1 twice), with probabilities 1/4, 1/2, 1/4."""
    rows = {"task": [{"id": "s/q0", "value": 1.0, "weight": 3.0}, {"id": "s/q1", "value": 0.0, "weight": 1.0}],
            "retention": {"kl": [{"kl": 0.2}]}}
    items = stats.items_from_rows({"p": rows})
    assert items.points["p"].weight.tolist() == [3.0, 1.0] and np.isnan(items.points["p"].logprob).all()
    rng = np.random.default_rng(0)
    task, _ = stats.point_replicates(["p"], items, "kl", "task", 4000, rng)
    shares = [np.mean(np.isclose(task[0], v)) for v in (1.0, 0.75, 0.0)]
    assert shares == pytest.approx([0.25, 0.5, 0.25], abs=0.03)
    cell = stats.matched_table([pt("p", "A", 0.75, 0.2)], items, [0.75], "kl", n_boot=200)["A"][0]
    assert cell["estimate"] == 0.2 and cell["unreached"] == pytest.approx(0.25, abs=0.1)  # q1 twice: 0 < 0.75
    with pytest.raises(LokiError, match="records task 0.5 but its items give 0.75"):  # the plain mean is not the value
        stats.matched_table([pt("p", "A", 0.5, 0.2)], items, [0.5], "kl", n_boot=20)
    with pytest.raises(LokiError, match="'task_graded' needs each test item's logprob"):
        stats.point_replicates(["p"], items, "kl", "task_graded", 5, rng)
    with pytest.raises(LokiError, match="needs 'value' \\(or 'correct'\\)"):
        stats.items_from_rows({"p": {"task": [{"id": "q"}], "retention": {}}})


def test_seed_resampling_when_one_seed_drives_the_min():
    # seed 0 forgets 0.1, seed 1 forgets 0.5, both reach the level: the min is 0.5 only when the draw of
    # two seeds is (1, 1), probability 1/4
    points = [pt("s0", "A", 1.0, 0.1, seed=0), pt("s1", "A", 1.0, 0.5, seed=1),
              pt("s1-half", "A", 1.0, 0.6, seed=1, alpha=0.5)]  # an interpolation point goes with its seed
    items = stats.items_from_rows({"s0": item_rows([True] * 4, kl=[0.1] * 3), "s1": item_rows([True] * 4, kl=[0.5] * 3),
                                   "s1-half": item_rows([True] * 4, kl=[0.6] * 3)})
    cell = stats.matched_table(points, items, [0.5], "kl", n_boot=1000, seed=0)["A"][0]
    assert (cell["estimate"], cell["low"], cell["high"]) == pytest.approx((0.1, 0.1, 0.5))
    assert set(np.unique(cell["replicates"].round(12))) == {0.1, 0.5}
    assert np.mean(np.isclose(cell["replicates"], 0.5)) == pytest.approx(0.25, abs=0.05)

    # seed 1 never reaches the level: a replicate of seed 1 only does not reach it (inf)
    points = [points[0], pt("s1", "A", 0.0, 0.05, seed=1), pt("s1-half", "A", 0.0, 0.01, seed=1, alpha=0.5)]
    items = stats.items_from_rows({"s0": item_rows([True] * 4, kl=[0.1] * 3), "s1": item_rows([False] * 4, kl=[0.05] * 3),
                                   "s1-half": item_rows([False] * 4, kl=[0.01] * 3)})
    cell = stats.matched_table(points, items, [0.5], "kl", n_boot=1000, seed=0)["A"][0]
    assert cell["estimate"] == 0.1 and cell["high"] == math.inf and cell["low"] == pytest.approx(0.1)
    assert cell["unreached"] == pytest.approx(0.25, abs=0.05)


def test_resampling_is_paired_across_points():
    rng = np.random.default_rng(0)
    correct = [bool(v) for v in rng.integers(0, 2, 12)]
    kl = list(rng.random(7))
    base = {"nll": list(rng.random(5) * 10), "tokens": [3, 4, 5, 6, 7]}
    items = stats.items_from_rows(
        {"x": item_rows(correct, kl=kl, nll=[v + 1.0 for v in base["nll"]], tokens=base["tokens"]),
         "y": item_rows([not c for c in correct], kl=[2 * v for v in kl], nll=base["nll"], tokens=base["tokens"])},
        base=item_rows(correct, kl=[0.0] * 7, nll=base["nll"], tokens=base["tokens"]),
    )
    task, kl_reps = stats.point_replicates(["x", "y"], items, "kl", "task", 300, np.random.default_rng(5))
    assert np.allclose(task[0] + task[1], 1.0)  # complementary answers: the same items drawn for both
    assert np.std(task[0]) > 0.05                # ... and the draws do vary
    assert np.allclose(kl_reps[1], 2 * kl_reps[0]) and np.std(kl_reps[0]) > 0
    _, lm = stats.point_replicates(["x", "y"], items, "lm_loss_delta", "task", 300, np.random.default_rng(5))
    assert np.allclose(lm[1], 0.0, atol=1e-12)  # y's texts are the base's: the base uses the same draw
    # x adds 1 nat per text: delta = n_drawn_texts / drawn tokens, so it varies with the draw
    assert np.all(lm[0] > 0) and np.std(lm[0]) > 0


def test_lm_loss_delta_and_graded_axis_from_items():
    # base: (2 + 4) / (1 + 3) = 1.5 nats; after: (3 + 4) / 4 = 1.75; delta 0.25
    base = item_rows([True, False], nll=[2.0, 4.0], tokens=[1, 3])
    after = item_rows([True, True], nll=[3.0, 4.0], tokens=[1, 3], logprob=[-0.5, -1.5])
    items = stats.items_from_rows({"p": after}, base=base)
    task, delta = stats._identity_values(["p"], items, "lm_loss_delta", "task_graded", {})
    assert task[0] == pytest.approx(-1.0) and delta[0] == pytest.approx(0.25)
    point = pt("p", "A", 1.0, None, lm=0.25, graded=-1.0)
    cell = stats.matched_table([point], items, [-1.0], "lm_loss_delta", n_boot=50, task_key="task_graded")["A"][0]
    assert cell["estimate"] == 0.25 and cell["unreached"] < 1.0


def test_items_that_disagree_with_the_recorded_point_are_refused():
    items = stats.items_from_rows({"p": item_rows([True, False], kl=[0.1])})
    with pytest.raises(LokiError, match="records task 0.9 but its items give 0.5"):
        stats.matched_table([pt("p", "A", 0.9, 0.1)], items, [0.5], "kl", n_boot=10)
    with pytest.raises(LokiError, match="no per-item results for point"):
        stats.matched_table([pt("p", "A", 0.5, 0.1), pt("q", "A", 0.5, 0.1)], items, [0.5], "kl", n_boot=10)


def test_avg_is_passed_through_and_only_task_items_and_seeds_vary():
    items = stats.items_from_rows({"p": item_rows([True, False], kl=[0.1]), "q": item_rows([True, True], kl=[0.1], )})
    points = [pt("p", "A", 0.5, 0.1, avg=1.0), pt("q", "A", 1.0, 0.1, avg=3.0)]
    cell = stats.matched_table(points, items, [0.5], "avg", n_boot=400)["A"][0]
    # p reaches 0.5 unless its draw is (wrong, wrong) (1/4); then q (avg 3) is the least
    assert cell["estimate"] == 1.0 and set(np.unique(cell["replicates"])) == {1.0, 3.0}
    assert np.mean(cell["replicates"] == 3.0) == pytest.approx(0.25, abs=0.07)


def test_avg_is_recomputed_from_the_questions_resampled_with_the_base():
    # the paper's Avg = 100 * mean over benchmarks of (acc_base - acc) / acc_base, over the benchmarks whose base
    # accuracy is not 0. "cloze": base 4/4, the point 2/4 (rows 2, 3 wrong): 50 % lost. "zero": the base gets
    # nothing right, so it leaves N (whatever the point does). Task items: all right, so every draw reaches 1.0.
    def rows(cloze, zero):
        return {"task": [{"id": "q0", "correct": True, "logprob": -0.1}],
                "retention": {"cloze": [{"id": f"c{i}", "correct": c, "logprob": -1.0} for i, c in enumerate(cloze)],
                              "zero": [{"id": f"z{i}", "correct": c, "logprob": -1.0} for i, c in enumerate(zero)]}}
    items = stats.items_from_rows({"p": rows([True, True, False, False], [True, True])},
                                  base=rows([True, True, True, True], [False, False]))
    assert stats.avg_from_items(items)
    cell = stats.matched_table([pt("p", "A", 1.0, None, avg=50.0)], items, [1.0], "avg", n_boot=2000)["A"][0]
    assert cell["estimate"] == 50.0
    # each replicate: 100 * (the share of the 4 draws that land on rows 2 and 3), a Binomial(4, 1/2) / 4
    reps = cell["replicates"]
    assert set(np.unique(reps)) <= {0.0, 25.0, 50.0, 75.0, 100.0}
    assert np.mean(reps == 100.0) == pytest.approx(1 / 16, abs=0.02) and np.mean(reps) == pytest.approx(50.0, abs=2.0)
    # a recorded Avg that the questions do not give is refused, like any other measure
    with pytest.raises(LokiError, match="records avg 40.0 but its items give 50.0"):
        stats.matched_table([pt("p", "A", 1.0, None, avg=40.0)], items, [1.0], "avg", n_boot=10)
    # without the base's rows the Avg is taken as recorded
    assert not stats.avg_from_items(stats.items_from_rows({"p": rows([True] * 4, [True] * 2)}))


def test_percentile_keeps_inf_and_separated():
    assert stats.percentile(np.array([0.0, 1.0, 2.0, 3.0, 4.0]), 0.5) == 2.0
    assert stats.percentile(np.array([0.0, 1.0, 2.0, 3.0]), 0.5) == 1.5
    assert stats.percentile(np.array([0.0, 1.0, math.inf, math.inf]), 0.5) == math.inf
    assert stats.percentile(np.array([0.0, 1.0, 2.0, math.inf]), 0.5) == 1.5
    assert stats.separated((0.1, 0.2), (0.25, 0.3)) and stats.separated((0.25, 0.3), (0.1, 0.2))
    assert not stats.separated((0.1, 0.26), (0.25, 0.3)) and not stats.separated((0.1, 0.2), (0.2, 0.3))
    assert stats.separated((0.1, math.inf), (0.01, 0.05)) and not stats.separated((0.1, math.inf), (0.2, 0.3))
    assert not stats.separated(None, (0.1, 0.2))


# -------------------------------------------------------------------------------------- the files


def test_load_items_reads_the_layout_and_refuses_other_items(tmp_path):
    folder = tmp_path / "items"
    folder.mkdir()
    (folder / "A__lr0.001__seed0__a1.json").write_text(json.dumps(item_rows([True, False], kl=[0.2, 0.4], nll=[3.0], tokens=[2])))
    (folder / "base.json").write_text(json.dumps(item_rows([False, False], kl=[0.0, 0.0], nll=[2.0], tokens=[2])))
    (tmp_path / "points.jsonl").write_text(json.dumps(pt("A__lr0.001__seed0__a1", "A", 0.5, 0.3, lm=0.5)) + "\n")
    points, items = stats.load_frontier(tmp_path)
    assert ids(points) == ["A__lr0.001__seed0__a1"] and list(items.points) == ["A__lr0.001__seed0__a1"]
    got = items.points["A__lr0.001__seed0__a1"]
    assert got.value.tolist() == [1.0, 0.0] and got.kl["kl"].tolist() == [0.2, 0.4]
    assert got.nll["text"].tolist() == [3.0] and got.tokens["text"].tolist() == [2.0] and set(got.kl) == {"kl"}
    assert items.base is not None and items.base.nll["text"].tolist() == [2.0]
    cell = stats.matched_table(points, items, [0.5], "lm_loss_delta", n_boot=20)["A"][0]
    assert cell["estimate"] == 0.5  # (3 - 2) / 2 tokens
    (folder / "other.json").write_text(json.dumps(item_rows([True, False, True], kl=[0.2, 0.4])))
    with pytest.raises(LokiError, match="list 3 task items"):
        stats.load_items(tmp_path)
    assert stats.load_items(tmp_path / "nowhere").points == {}


# ----------------------------------------------------------------------------------------- report

REPORT_POINTS = [
    pt("base", "base", 0.25, 0.0, lr=None, seed=None, alpha=0.0),
    pt("L1", "loki", 1.0, 0.5, lr=1e-3),
    pt("L2", "loki", 0.5, 0.1, lr=1e-3, alpha=0.5),
    pt("F1", "full", 1.0, 0.3, lr=1e-4),
    pt("F2", "full", 0.25, 0.02, lr=1e-5),
    pt("G1", "ft2", 1.0, 2.0, lr=1e-2),
    pt("N1", "never", 0.0, 0.01, lr=1e-4),
]
REPORT_ITEMS = {
    "L1": item_rows([True] * 4, kl=[0.0, 1.0]), "L2": item_rows([True, True, False, False], kl=[0.1, 0.1]),
    "F1": item_rows([True] * 4, kl=[0.3, 0.3]), "F2": item_rows([True, False, False, False], kl=[0.02, 0.02]),
    "G1": item_rows([True] * 4, kl=[2.0, 2.0]), "N1": item_rows([False] * 4, kl=[0.01, 0.01]),
}


def test_markdown_has_the_fronts_and_hand_computed_matched_cells():
    from studies.frontier import report

    items = stats.items_from_rows(REPORT_ITEMS, base=item_rows([True, False, False, False], kl=[0.0, 0.0]))
    text = report.frontier_markdown(REPORT_POINTS, items, measures=("kl", "lm_loss_delta"), task_keys=("task",),
                                    levels=[1.0], n_boot=1000, title="Tiny")
    assert text.startswith("# Tiny\n") and "lm_loss" not in text  # no point has an lm_loss_delta: no section
    for row in ("| loki | 0.001 | 0 | 0.5 | 0.500 | 0.100 |", "| loki | 0.001 | 0 | 1 | 1.000 | 0.500 |",
                "| full | 1e-05 | 0 | 1 | 0.250 | 0.020 |", "| full | 0.0001 | 0 | 1 | 1.000 | 0.300 |"):
        assert row in text
    assert "| base |" not in text and "Base model: task 0.250" in text
    # loki at task >= 1: L1 always reaches, its KL is 0, 0.5 or 1 (1/4, 1/2, 1/4); L2 reaches only when all
    # four draws are right (1/16), which cannot lift the low quantile above 0 nor lower the top below 1
    assert "| loki | 0.500 [0.000, 1.000] |" in text
    assert "| full | 0.300 [0.300, 0.300] |" in text  # F2 reaches 1 only on four draws of item 0 (0.4 %)
    assert "| ft2 | 2.000 [2.000, 2.000] |" in text and "| never | not reached |" in text
    line = next(l for l in text.splitlines() if l.startswith("- task >= 1.000:"))
    assert line == ("- task >= 1.000: separated: loki < ft2, full < ft2; overlap: loki/full; "
                    "not both reached: loki/never, full/never, ft2/never")


def test_markdown_without_items_and_with_common_levels():
    from studies.frontier import report

    points = [p for p in REPORT_POINTS if p["method"] in ("base", "loki", "full")]
    text = report.frontier_markdown(points, None, measures=("kl",), task_keys=("task",), k=2)
    # levels: top = min(1, 1) = 1; bottom = max(0.5, 0.25, base 0.25) = 0.5 -> 0.75 and 1
    assert "| method | task >= 0.750 | task >= 1.000 |" in text
    assert "| loki | 0.500 | 0.500 |" in text and "| full | 0.300 | 0.300 |" in text
    assert "no bootstrap: no per-item results" in text and "Separation" not in text


def test_plot_writes_a_png_and_wandb_rows(tmp_path):
    from studies.frontier import report

    points = [dict(p, forgetting=dict(p["forgetting"], lm_loss_delta=p["forgetting"]["kl"] / 2)) for p in REPORT_POINTS]
    path = report.frontier_plot(points, tmp_path / "sub" / "frontier.png", measures=("kl", "lm_loss_delta", "avg"))
    assert path.is_file() and path.stat().st_size > 1000 and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    columns, rows = report.wandb_table(points)
    assert len(rows) == len(points) and all(len(r) == len(columns) for r in rows)
    row = dict(zip(columns, rows[1]))
    assert (row["id"], row["method"], row["lr"], row["alpha"], row["task"], row["kl"], row["lm_loss_delta"]) == \
        ("L1", "loki", 1e-3, 1.0, 1.0, 0.5, 0.25)


def test_items_written_by_run_retention_reproduce_recorded_points(tmp_path):
    """The runner's path on a tiny model: task items from the cloze scorer, retention items from
    run_retention, the point's forgetting from forgetting_report; written in the layout, loaded back,
    and the bootstrap's identity check accepts them (kl and lm_loss_delta, on both task axes)."""
    from loki.eval import forgetting_report, run_retention
    from loki.eval.retention import load_rows, score_cloze
    from loki.tokenizer import build_chat_tokenizer
    from tests.conftest import make_tiny_model

    mmlu = "tests/fixtures/mmlu/test.jsonl"
    tok = build_chat_tokenizer()
    cfg = {"batch_size": 4, "benchmarks": {
        "kl": {"path": mmlu, "mode": "kl", "offset": 2, "per_subject": None, "prompt": "letter", "top_k": 16},
        "qa": {"mode": "lm_loss", "path": mmlu, "offset": 0, "per_subject": None, "chat_template": False, "max_samples": 5}}}
    rows = load_rows({"path": mmlu, "offset": 0, "per_subject": None})
    (tmp_path / "items").mkdir()
    measured = {}
    for pid, seed, stage in (("base", 0, "before"), ("m__a1", 1, "after"), ("m__a.5", 2, "after")):
        model = make_tiny_model(vocab=len(tok), seed=seed)
        task_items, retention_items = [], {}
        task = score_cloze(model, tok, rows, 4, items=task_items)
        retention = run_retention(model, tok, cfg, reference_dir=tmp_path / "ref", stage=stage, items=retention_items)
        measured[pid] = (task, retention)
        (tmp_path / "items" / f"{pid}.json").write_text(json.dumps({"task": task_items, "retention": retention_items}))
    points = []
    for pid, alpha in (("m__a1", 1.0), ("m__a.5", 0.5)):
        task, retention = measured[pid]
        report = forgetting_report(measured["base"][1], retention)
        points.append(pt(pid, "m", task["acc"], report["kl"]["kl"], alpha=alpha, graded=task["logprob"],
                         lm=report["lm_loss"]["qa"]["delta"]))
    items = stats.load_items(tmp_path)
    assert set(items.points) == {"m__a1", "m__a.5"} and items.base is not None
    for task_key in ("task", "task_graded"):
        level = min(stats.task_value(p, task_key) for p in points) - 100.0  # every replicate reaches it
        for measure in ("kl", "lm_loss_delta"):
            cell = stats.matched_table(points, items, [level], measure, n_boot=50, task_key=task_key)["m"][0]
            assert cell["estimate"] == min(stats.forgetting_value(p, measure) for p in points)
            assert cell["low"] <= cell["high"] < math.inf


def test_one_se_lr_takes_the_smallest_lr_within_one_standard_error_of_the_best():
    from studies.frontier.stats import one_se_lr

    def run(lr, val, seed=0, alpha=1.0):
        return {"method": "m", "lr": lr, "seed": seed, "alpha": alpha, "task_val": val, "n_task": 100}

    # best 0.5 over 100 questions: SE 0.05, so >= 0.45 qualifies; 1e-3 (0.46) is the smallest such LR
    points = [run(1e-4, 0.30), run(1e-3, 0.46), run(1e-2, 0.50), run(1e-2, 0.9, alpha=0.5)]
    assert one_se_lr(points, "m") == 1e-3
    # seeds are averaged: 1e-3's mean falls to 0.43, below the threshold
    assert one_se_lr([*points, run(1e-3, 0.40, seed=1)], "m") == 1e-2
    assert one_se_lr(points, "other") is None


def test_smollm135m_lr_defaults_are_the_verdict_grids_one_se_lrs():
    """conf/model/smollm135m.yaml's loki_lr and finetune_lr are what the committed grid gives (issue 19)."""
    from studies.frontier.stats import one_se_lr
    from tests.conftest import compose_config

    root = Path(__file__).resolve().parents[1]
    points = [json.loads(line) for line in (root / "docs" / "frontier_data" / "smollm135m" / "points.jsonl").read_text().splitlines()]
    model = compose_config("train", "model=smollm135m").model
    assert one_se_lr(points, "loki-q0.1") == model.loki_lr == 1e-2
    assert one_se_lr(points, "full") == model.finetune_lr == 1e-4


# ------------------------------------------------------------------------------------ paired effect


def test_paired_effect_over_seeds_with_items_that_never_vary():
    """Seed 0: the variant answers every question the modified run misses, at half the KL; seed 1: equal on
    both. Each point's items are all alike, so they never vary under resampling and only the seed draw moves
    the replicates: both seeds (half of the draws), seed 0 twice or seed 1 twice (a quarter each)."""
    items = stats.items_from_rows({
        "v0": item_rows([True] * 4, kl=[0.2] * 3), "m0": item_rows([False] * 4, kl=[0.4] * 3),
        "v1": item_rows([True] * 4, kl=[0.3] * 3), "m1": item_rows([True] * 4, kl=[0.3] * 3)})
    pairs = [(pt("v0", "V", 1.0, 0.2, seed=0), pt("m0", "M", 0.0, 0.4, seed=0)),
             (pt("v1", "V", 1.0, 0.3, seed=1), pt("m1", "M", 1.0, 0.3, seed=1))]
    exact = stats.paired_effect(pairs, items, "kl", n_boot=0)
    # task: mean(+1, 0) = 0.5; KL: the geometric mean of 0.5 and 1 = sqrt(0.5)
    assert exact["kind"] == "ratio" and exact["pairs"] == 2
    assert exact["task"] == {"estimate": pytest.approx(0.5), "low": pytest.approx(0.5), "high": pytest.approx(0.5)}
    assert exact["forgetting"]["estimate"] == pytest.approx(math.sqrt(0.5))
    boot = stats.paired_effect(pairs, items, "kl", n_boot=400, seed=3)
    assert boot["task"]["low"] == pytest.approx(0.0) and boot["task"]["high"] == pytest.approx(1.0)
    assert boot["forgetting"]["low"] == pytest.approx(0.5) and boot["forgetting"]["high"] == pytest.approx(1.0)


def test_paired_effect_resamples_the_items_of_both_points_of_a_pair_alike():
    """One pair whose variant has exactly half the KL on every text: any draw of the texts keeps the ratio
    at 0.5 (the draw is shared); the task difference varies with the drawn questions; the LM-loss change is
    the difference of the two points' deltas against the same base draw."""
    items = stats.items_from_rows({
        "v": item_rows([True, True, False, True, False, True], kl=[0.1, 0.4, 0.2], nll=[2.0, 3.0], tokens=[1, 2]),
        "m": item_rows([True, False, False, False, False, True], kl=[0.2, 0.8, 0.4], nll=[3.0, 3.0], tokens=[1, 2])},
        base=item_rows([False] * 6, kl=[0.0] * 3, nll=[2.0, 2.0], tokens=[1, 2]))
    # lm_loss_delta: v (5/3 - 4/3) = 1/3, m (6/3 - 4/3) = 2/3; difference -1/3
    pairs = [(pt("v", "V", 4 / 6, 0.7 / 3, lm=1 / 3), pt("m", "M", 2 / 6, 1.4 / 3, lm=2 / 3))]
    boot = stats.paired_effect(pairs, items, "kl", n_boot=300, seed=1)
    assert boot["forgetting"] == {"estimate": pytest.approx(0.5), "low": pytest.approx(0.5), "high": pytest.approx(0.5)}
    assert boot["task"]["estimate"] == pytest.approx(1 / 3) and boot["task"]["low"] < 1 / 3 < boot["task"]["high"]
    lm = stats.paired_effect(pairs, items, "lm_loss_delta", n_boot=300, seed=1)
    assert lm["kind"] == "difference" and lm["forgetting"]["estimate"] == pytest.approx(-1 / 3)
    assert lm["forgetting"]["low"] < -1 / 3 < lm["forgetting"]["high"]  # the texts' draw moves it
    with pytest.raises(LokiError, match="records kl"):
        stats.paired_effect([(pt("v", "V", 4 / 6, 0.9, lm=1 / 3), pairs[0][1])], items, "kl", n_boot=0)
    with pytest.raises(LokiError, match="bootstraps kl, lm_loss_delta"):
        stats.paired_effect(pairs, items, "avg")
