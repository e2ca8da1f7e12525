"""The variants page (issue 20's docs/beyond.md): the best other method, the per-level verdicts and the page,
on hand-made points with hand-computed numbers."""

from __future__ import annotations

import pytest

from loki.errors import LokiError
from studies.frontier import stats
from studies.frontier.variants import best_other, compare, paired_runs, paired_section, summary, variant_section, variants_markdown


def pt(pid, method, task, kl, seed=0):
    return {"id": pid, "method": method, "lr": 1e-3, "seed": seed, "alpha": 1.0, "task": task, "task_graded": None,
            "forgetting": {"kl": kl, "lm_loss_delta": None, "avg": None}}


# Base at task 0.2. V, L, A and B span 0.6-1.0, so common_levels(k=2) gives 0.8 and 1.0, where each one's
# least forgetting is that of its 1.0 point.
POINTS = [
    pt("base", "base", 0.2, 0.0),
    pt("v1", "V", 0.6, 0.05), pt("v2", "V", 1.0, 0.10),    # the variant of L
    pt("l1", "L", 0.6, 0.20), pt("l2", "L", 1.0, 0.40),    # the paper's method (the reference), modified by V
    pt("a1", "A", 0.6, 0.10), pt("a2", "A", 1.0, 0.30),    # 0.30 at 0.8 and 1.0: the best other method
    pt("b1", "B", 0.6, 0.05), pt("b2", "B", 1.0, 0.50),    # 0.50, though the least at 0.6
    pt("c1", "C", 0.6, 0.01),                               # reaches 0.6 only
]


def items_for(points, n=4):
    """Items that reproduce each point exactly and never vary under resampling: every test item has the
    point's task value, every prompt its KL (so every interval is the point itself)."""
    return stats.items_from_rows({p["id"]: {"task": [{"id": f"q{i}", "value": p["task"]} for i in range(n)],
                                            "retention": {"kl": [{"kl": p["forgetting"]["kl"]}] * 3}} for p in points})


def test_best_other_is_the_lowest_mean_least_forgetting_over_the_common_levels():
    assert stats.common_levels({m: [p for p in POINTS if p["method"] == m] for m in "ABL"}, k=2, base_task=0.2) == [0.8, 1.0]
    assert best_other(POINTS, ["V", "L", "C"], "kl", k=2) == "A"  # A: 0.3 at both levels; B: 0.5
    # with C a candidate, its single point lowers the common levels to [0.6], where it forgets least (0.01 < B 0.05 < A 0.1)
    assert best_other(POINTS, ["V", "L"], "kl", k=2) == "C"
    assert best_other(POINTS, ["V", "L", "A", "B", "C"], "kl") is None


def test_per_level_verdicts_and_their_summary():
    cell = lambda e, lo, hi: {"estimate": e, "low": lo, "high": hi}  # noqa: E731
    assert compare(cell(0.1, 0.05, 0.15), cell(0.3, 0.2, 0.4)) == "less"
    assert compare(cell(0.3, 0.2, 0.4), cell(0.1, 0.05, 0.15)) == "more"
    assert compare(cell(0.1, 0.05, 0.25), cell(0.3, 0.2, 0.4)) == "overlap"
    assert compare(cell(None, 0, 0), cell(0.3, 0.2, 0.4)) == "unreached"
    assert summary(["less", "overlap", "less", "unreached"]) == "less at 2 of 4 levels, overlap at 1, unreached at 1"
    assert summary([]) == "no common level"


def test_a_variant_section_with_degenerate_intervals_separates_exactly_where_the_numbers_say():
    points = [p for p in POINTS if p["method"] != "C"]
    lines, verdicts = variant_section(points, items_for(points), "V", "L", "L", ["V", "L"], "kl", n_boot=50, k=2)
    text = "\n".join(lines)
    assert "| method | role | task >= 0.800 | task >= 1.000 |" in text
    assert "| V | the variant | 0.100 [0.100, 0.100] | 0.100 [0.100, 0.100] |" in text
    assert "| L | what it modifies, the paper's method | 0.400 [0.400, 0.400] | 0.400 [0.400, 0.400] |" in text
    assert "| A | the best other method |" in text and "| B |" not in text
    assert verdicts == {"L": "less at 2 of 2 levels", "A": "less at 2 of 2 levels"}
    missing, none = variant_section(points, None, "W", "L", "L", ["W", "L"], "kl", n_boot=0, k=2)
    assert "Not measured yet." in missing and none == {}


def test_the_page_has_a_summary_row_per_variant_and_measure():
    points = [p for p in POINTS if p["method"] != "C"]
    page = variants_markdown(points, items_for(points), {"V": "L"}, "L", ["kl"], n_boot=20, title="T")
    assert page.startswith("# T\n")
    assert "| V | kl | L | L: less at 4 of 4 levels; A: less at 4 of 4 levels |" in page  # k = 4 levels: 0.7 .. 1.0
    assert "### V: KL from the base (nats)" in page
    # V's and L's runs at 1e-3, seed 0 (the later point of each: v2 and l2): KL 0.10 against 0.40, task equal
    assert "### V against L at the same LR and seed" in page
    assert "intervals over test items and held-out texts only: one seed (0), so the seeds' spread is not in them" in page
    assert "- KL from the base (nats) (variant / modified, geometric mean): 0.250 [0.250, 0.250] (interval below 1); task change +0.000 [+0.000, +0.000]" in page


def test_paired_runs_set_each_variant_run_beside_the_modified_runs_same_lr_and_seed():
    def run(method, lr, seed, task, kl, lm, alpha=1.0):
        return {"id": f"{method}{lr}{seed}{alpha}", "method": method, "lr": lr, "seed": seed, "alpha": alpha, "task": task,
                "forgetting": {"kl": kl, "lm_loss_delta": lm, "avg": None}}

    points = [run("V", 1e-2, 1, 0.50, 0.30, -0.02), run("V", 1e-2, 0, 0.40, 0.10, 0.01), run("V", 3e-3, 0, 0.30, 0.40, 0.03),
              run("V", 1e-2, 0, 0.20, 0.01, 0.0, alpha=0.5),  # an interpolation point: not a run
              run("V", 1e-3, 0, 0.25, 0.02, 0.0),              # L has no 1e-3 run: no pair
              run("L", 1e-2, 0, 0.40, 0.40, 0.02), run("L", 1e-2, 1, 0.45, 0.60, -0.01), run("L", 3e-3, 0, 0.35, 0.20, 0.01),
              run("L", 1e-2, 2, 0.50, 0.50, 0.00)]             # V has no seed 2: no pair
    pairs = paired_runs(points, "V", "L")
    assert [(a["lr"], a["seed"], b["lr"], b["seed"]) for a, b in pairs] == [(3e-3, 0, 3e-3, 0), (1e-2, 0, 1e-2, 0), (1e-2, 1, 1e-2, 1)]
    text = "\n".join(paired_section(points, "V", "L", ["kl", "lm_loss_delta"]))
    assert "| LR | seed | task: variant | modified | kl: variant | modified | lm_loss_delta: variant | modified |" in text
    assert "| 0.003 | 0 | 0.300 | 0.350 | 0.400 | 0.200 | 0.030 | 0.010 |" in text
    assert "| 0.01 | 1 | 0.500 | 0.450 | 0.300 | 0.600 | -0.020 | -0.010 |" in text
    # task differences: -0.05, 0.0, +0.05; KL ratios 2.0, 0.25, 0.5 (lower in 2 of 3); LM-loss change 0.03 vs 0.01,
    # 0.01 vs 0.02, -0.02 vs -0.01 (lower in 2 of 3), values of both signs, so no ratio
    assert "the variant run's task minus the modified run's is -0.050 to +0.050 (higher in 1, equal in 1, lower in 1 of 3 pairs)" in text
    assert "- KL from the base (nats): lower in 2 of 3 pairs (variant / modified 0.25 to 2.00)" in text
    assert "- LM-loss change (nats/token): lower in 2 of 3 pairs\n" in text
    assert "No run of both" in "\n".join(paired_section(points, "V", "Z", ["kl"]))


@pytest.mark.parametrize("changes, sentence", [
    ({"variants": {"V": "nope"}, "variants_page": "p"}, "frontier.variants must be a mapping {variant: the method it modifies}"),
    ({"variants": {"V": "V"}, "variants_page": "p"}, "frontier.variants must be a mapping"),
    ({"variants": {"V": "L"}}, "frontier.variants_page must be set exactly when frontier.variants is"),
    ({"reference": "Z"}, "frontier.reference must be null or a method name of the design"),
    ({"paired": {"V": ["Z"]}}, "frontier.paired must be a mapping {method: [other methods]} of method names of the design"),
    ({"paired": {"V": "L"}}, "frontier.paired must be a mapping"),
    ({"paired": {"V": ["V"]}}, "frontier.paired must be a mapping"),
])
def test_bad_variant_settings_stop_with_one_sentence(changes, sentence):
    from loki import checks
    from studies.frontier.run import FrontierConfig

    settings = dict(name="t", methods=[{"name": "V", "overrides": [], "lrs": [1e-3]}, {"name": "L", "overrides": [], "lrs": [1e-3]}])
    with pytest.raises(LokiError) as err, checks.located("frontier"):
        FrontierConfig(**settings, **changes)
    assert str(err.value).startswith(sentence)


def test_a_frontier_with_paired_methods_reports_their_runs_at_the_same_lr_and_seed(tmp_path):
    """frontier.paired: the report gets a section per pair of methods, their runs side by side, with the
    names as the labels, one heading level below the section."""
    import json

    from studies.frontier.run import FrontierConfig, write_report

    frontier = FrontierConfig(name="t", measures=["kl"], n_boot=20, paired={"V": ["L"]},
                              methods=[{"name": "V", "overrides": [], "lrs": [1e-3]}, {"name": "L", "overrides": [], "lrs": [1e-3]}])
    points = [dict(p, lr=1e-3) for p in POINTS if p["method"] in ("base", "V", "L")]
    (tmp_path / "items").mkdir()
    for point_id, rows in {p["id"]: {"task": [{"id": f"q{i}", "value": p["task"]} for i in range(4)],
                                     "retention": {"kl": [{"kl": p["forgetting"]["kl"]}] * 3}} for p in points}.items():
        (tmp_path / "items" / f"{'base' if point_id == 'base' else point_id}.json").write_text(json.dumps(rows))
    text = write_report(frontier, tmp_path, points).read_text()
    assert "## The same LR and seed" in text and "\n### V against L at the same LR and seed" in text
    assert "| LR | seed | task: V | L | kl: V | L |" in text and "| 0.001 | 0 | 1.000 | 1.000 | 0.100 | 0.400 |" in text
    assert "- KL from the base (nats) (V / L, geometric mean): 0.250 [0.250, 0.250] (interval below 1)" in text
    plain = write_report(FrontierConfig(name="t", measures=["kl"], n_boot=20, methods=frontier.methods), tmp_path, points).read_text()
    assert "The same LR and seed" not in plain
