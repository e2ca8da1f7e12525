"""The CI-sized toy study: the toy, analysed and then suppressed, with no training arm.

It asserts only what held for all three toy seeds of the full study (README, "The toy study"): zeroing
the rows with the highest |KVA| hurts retention much more than zeroing those with the lowest. That is
the check that KVA finds rows that matter. Everything else the study measures is reported, not
asserted.
"""

from __future__ import annotations

import json

import pytest

from loki import study


@pytest.mark.slow
def test_ci_sized_study_shows_the_suppression_gap(tmp_path):
    # The default toy, in the test run's cache (LOKI_CACHE, set in conftest). A smaller toy was tried
    # and is too weak: its suppression results flip between q values.
    out = tmp_path / "study"
    study.run_study(out=out, seeds=[0], arms=[])
    result = json.loads((out / "study.json").read_text())
    table = result["table"]
    before = study._primary(result["suppression"][0]["before"], "/logprob")
    for q in (0.1, 0.2, 0.3):
        # log-probabilities: more negative = worse. Rows ranked by |attribution|: zeroing the highest costs
        # at least 1.5x what zeroing the lowest costs (toy seeds 0/1/2 gave 4.4/2.5/1.9x at q=0.1,
        # 3.9/1.7/2.2x at 0.2, 3.2/2.5/2.4x at 0.3). The signed ranking's "lowest" rows are the most
        # negative attributions, which matter too: reported in the README, not asserted.
        lowest = table[f"suppress-lowest-abs-q{q:g}"]["graded"][0]
        highest = table[f"suppress-highest-abs-q{q:g}"]["graded"][0]
        assert before - highest > 1.5 * (before - lowest), (q, before, lowest, highest)
    assert (out / "study.md").read_text().startswith("| method")
