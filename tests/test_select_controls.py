"""The cheap row-selection controls at LoKI's q: random rows and the smallest-norm rows of each down_proj."""

from __future__ import annotations

import math

import pytest
import torch
from omegaconf import OmegaConf

from loki import arch
from loki.errors import LokiError
from loki.select import random_positions, select_positions, smallest_norm_positions
from tests.conftest import compose_config, make_tiny_model


def test_smallest_norm_matches_hand_computed_norms_with_ties_by_lower_index():
    layer0 = torch.tensor([[3.0, 4.0], [1.0, 0.0], [0.0, 0.5], [0.0, -1.0]])  # norms 5, 1, 0.5, 1
    layer1 = torch.tensor([[0.0, 0.0], [2.0, 0.0], [0.0, 0.0], [-0.1, 0.0]])  # norms 0, 2, 0, 0.1
    # q = 0.5 of D = 4: k = 2 rows per layer, smallest first; equal norms in row order.
    assert smallest_norm_positions([layer0, layer1], 0.5) == [[2, 1], [0, 2]]
    # q = 0.75: k = 3; layer 0's two rows of norm 1 both fit, lower index first.
    assert smallest_norm_positions([layer0, layer1], 0.75) == [[2, 1, 3], [0, 2, 3]]


@pytest.mark.parametrize("q", [0.05, 0.1, 0.3])
def test_smallest_norm_on_a_model_is_floor_qD_rows_of_least_norm(q):
    model = make_tiny_model("llama", layers=3, hidden=40)
    weights = [proj.weight for proj in arch.down_projs(model)]
    positions = smallest_norm_positions(weights, q)
    k = math.floor(q * 40 + 1e-9)
    assert [len(rows) for rows in positions] == [k, k, k]
    for weight, rows in zip(weights, positions):
        # The oracle: each row's norm by a plain Python sum, then sorted by (norm, index).
        norms = [math.sqrt(sum(float(x) ** 2 for x in row)) for row in weight.tolist()]
        expected = sorted(range(len(norms)), key=lambda j: (norms[j], j))[:k]
        assert rows == expected
        assert max(norms[j] for j in rows) <= min(norms[j] for j in range(40) if j not in rows)


def test_random_control_is_floor_qD_distinct_rows_and_matches_the_score_path():
    positions = random_positions(num_layers=5, hidden_size=50, q=0.1, seed=3)
    assert [len(rows) for rows in positions] == [5] * 5
    assert all(len(set(rows)) == 5 and all(0 <= r < 50 for r in rows) for rows in positions)
    # The strategy needs no scores, but it must pick what the score path always picked (same runs reproduce).
    scores = torch.randn(4, 5, 50)
    assert select_positions(scores, 0.1, strategy="random", seed=3) == positions
    assert random_positions(5, 50, 0.1, seed=4) != positions


@pytest.mark.parametrize("strategy", ["random", "smallest_norm"])
def test_resolve_positions_runs_no_attribution_for_the_controls(strategy, tmp_path):
    from loki.recipe import resolve_positions

    model = make_tiny_model("qwen2", layers=2, hidden=32)
    missing_store = tmp_path / "no-store-here"
    cfg = OmegaConf.create(
        {
            "model": {"name": "tiny"},
            "loki": {"q": 0.1, "positions": None, "scores": str(missing_store), "analyse_if_missing": False, "strategy": strategy, "seed": 0, "score": "abs", "quota": "uniform"},
        }
    )
    positions, source = resolve_positions(cfg, model, tokenizer=None)
    assert [len(rows) for rows in positions] == [3, 3]  # floor(0.1 * 32)
    assert "no attribution" in source and not missing_store.exists()
    if strategy == "smallest_norm":
        assert positions == smallest_norm_positions([p.weight for p in arch.down_projs(model)], 0.1)


def test_controls_pass_the_config_check_without_a_store_and_scores_cannot_pick_smallest_norm():
    from loki.config import check_train_config

    cfg = compose_config("train", "model=tiny", "task=tiny_rerank", "loki.strategy=smallest_norm", "loki.scores=/no/such/store")
    check_train_config(cfg)  # a control reads no store, so a missing one is no error
    with pytest.raises(LokiError, match="smallest_norm"):
        select_positions(torch.zeros(1, 2, 8), 0.5, strategy="smallest_norm")
    with pytest.raises(LokiError, match="selects no row"):
        smallest_norm_positions([torch.ones(8, 4)], 0.1)
