"""Per-layer quota for the layer_balanced strategies: layer_quota's rounding, select_positions(quota=),
layer_mass and adaptive_quota, against numbers worked out by hand and a brute-force oracle."""

from __future__ import annotations

import pytest
import torch

from loki.errors import LokiError
from loki.select import adaptive_quota, layer_mass, layer_quota, select_positions

# 3 samples x 2 layers x 5 rows, built so that a quota below the largest one needs the taken rows in
# (score, index) order: in sample 0, layer 0, the 3 lowest split a tie of 1s, and taken in index order
# ([0, 1, 4]) the first would be row 0, not row 4 (score 0).
TIES = torch.tensor(
    [
        [[1, 1, 1, 5, 0], [0, 0, 0, 0, 0]],
        [[3, -1, 2, 2, 2], [4, 3, 2, 1, 0]],
        [[0, 4, 0, 4, -2], [1, -1, 1, -1, 1]],
    ],
    dtype=torch.float32,
)


# ---- layer_quota ----------------------------------------------------------------------------------


def test_layer_quota_largest_remainder_by_hand():
    # floor 2 each (8), 12 left by weight 1:2:3:4 -> 1.2, 2.4, 3.6, 4.8 -> whole 1, 2, 3, 4 (10);
    # the 2 left over go to the largest remainders .8 (layer 3) and .6 (layer 2).
    quota = layer_quota([1, 2, 3, 4], total=20, floor=2)
    assert quota == [3, 4, 6, 7]
    assert sum(quota) == 20 and min(quota) >= 2


def test_layer_quota_floor_holds_for_a_zero_weight():
    # floor 3 each (9), 11 left all to layer 1; layers 0 and 2 stay at the floor.
    assert layer_quota([0, 5, 0], total=20, floor=3) == [3, 14, 3]


def test_layer_quota_ties_go_to_the_lower_index():
    assert layer_quota([1, 1, 1], total=4) == [2, 1, 1]
    # floor 1 each, 2 left: .5 each, all remainders .5 -> layers 0 and 1.
    assert layer_quota([1, 1, 1, 1], total=6, floor=1) == [2, 2, 1, 1]
    # A tensor of weights reads the same as a list.
    assert layer_quota(torch.tensor([1.0, 1.0, 1.0, 1.0]), total=6, floor=1) == [2, 2, 1, 1]


def test_layer_quota_all_zero_weights_split_equally():
    # floor 1 each, 5 left over 3: 1.67 each -> whole 1 each; 2 left over, equal remainders -> layers 0, 1.
    assert layer_quota([0, 0, 0], total=8, floor=1) == [3, 3, 2]
    assert layer_quota([0.0, 0.0], total=6) == [3, 3]


def test_layer_quota_cap_water_fills_by_hand():
    # floor 1, 9 left by 1:1:8 -> 1.9, 1.9, 8.2 > cap 5: layer 2 fixed at 5. Layers 0, 1 split the other 7:
    # floor 1 each, 5 by 1:1 -> 3.5 each -> 3, 3, and the one left over goes to layer 0 (equal remainders).
    assert layer_quota([1, 1, 8], total=12, floor=1, cap=5) == [4, 3, 5]
    # Two rounds: floor 1, 8 by 10:5:1:0 -> 6, 3.5, 1.5, 1; layer 0 > cap 4 -> fixed. The other 8 over layers
    # 1-3: floor 1 each, 5 by 5:1:0 -> 5.17, 1.83, 1; layer 1 > 4 -> fixed. The last 4 over layers 2, 3:
    # floor 1 each, 2 by 1:0 -> 3, 1.
    assert layer_quota([10, 5, 1, 0], total=12, floor=1, cap=4) == [4, 4, 3, 1]
    # Capped layers push the rest onto zero-weight layers, which then share it equally.
    assert layer_quota([0, 0, 5], total=9, floor=1, cap=3) == [3, 3, 3]
    # Without the cap the same weights would give layer 2 far more.
    assert layer_quota([1, 1, 8], total=12, floor=1) == [2, 2, 8]


def test_layer_quota_bad_input():
    with pytest.raises(LokiError, match="layer 1 has -1.0"):
        layer_quota([1, -1, 2], total=6)
    with pytest.raises(LokiError, match="non-negative and finite"):
        layer_quota([1, float("nan")], total=6)
    with pytest.raises(LokiError, match="non-negative and finite"):
        layer_quota([1, float("inf")], total=6)
    with pytest.raises(LokiError, match="needs 9, more than the total of 8"):
        layer_quota([1, 1, 1], total=8, floor=3)
    with pytest.raises(LokiError, match="does not fit in 3 layers of at most 2"):
        layer_quota([1, 1, 1], total=7, cap=2)
    with pytest.raises(LokiError, match="empty"):
        layer_quota([], total=3)
    with pytest.raises(LokiError, match="1-D tensor"):
        layer_quota(torch.ones(2, 2), total=3)
    with pytest.raises(LokiError, match="whole number"):
        layer_quota([1, 1], total=3.5)
    with pytest.raises(LokiError, match="must not be negative"):
        layer_quota([1, 1], total=4, floor=-1)


# ---- select_positions(quota=) ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def random_scores():
    g = torch.Generator().manual_seed(1)
    # Half-integers: ties within and across samples are common.
    return (torch.randn(50, 3, 20, generator=g) * 2).round() / 2


@pytest.mark.parametrize("strategy", ["layer_balanced", "layer_balanced_highest"])
@pytest.mark.parametrize("score", ["signed", "abs"])
@pytest.mark.parametrize("q", [0.05, 0.2, 0.45])
def test_uniform_quota_is_the_plain_strategy(random_scores, strategy, score, q):
    k = int(q * 20 + 1e-9)
    plain = select_positions(random_scores, q, strategy=strategy, score=score)
    assert select_positions(random_scores, q, strategy=strategy, score=score, quota=[k] * 3) == plain
    assert select_positions(iter(random_scores.split(9)), q, strategy=strategy, score=score, quota=[k] * 3) == plain


def test_quota_by_hand():
    # quota [1, 3]. Layer 0, the 1 lowest per sample: row 4 (0), row 1 (-1), row 4 (-2) -> row 4.
    # Layer 1, the 3 lowest: {0, 1, 2} (all 0: index order), {4, 3, 2}, {1, 3, 0} (-1s, then the first 1)
    #   -> rows 0-3 twice, row 4 once; sums 5, 2, 3, 0 -> rows 3, 1, 2.
    positions = select_positions(TIES, 0.4, quota=[1, 3])
    assert positions == [[4], [3, 1, 2]]
    assert [len(layer) for layer in positions] == [1, 3]


def test_quota_highest_by_hand():
    # quota [2, 1]. Layer 0, the 2 highest: {3, 0} (5, then the first 1), {0, 2}, {1, 3} -> rows 0 and 3 twice,
    #   sums 4 and 11 -> higher mean first: 3, 0. Layer 1, the highest: row 0 in every sample.
    positions = select_positions(TIES, 0.4, strategy="layer_balanced_highest", quota=[2, 1])
    assert positions == [[3, 0], [0]]


def test_quota_of_every_row():
    # A quota of D takes every row each sample, so all tie on count and rank by mean (lowest first).
    # Layer 0 sums: 4, 4, 3, 11, 0 -> 4, 2, 0, 1, 3 (rows 0 and 1 tie: index order).
    # Layer 1, the lowest: rows 0, 4, 1 once each; sums 5, 1, 2 -> row 4.
    assert select_positions(TIES, 0.4, quota=[5, 1]) == [[4, 2, 0, 1, 3], [4]]


def _oracle(scores: torch.Tensor, quota: list[int], highest: bool, use_abs: bool) -> list[list[int]]:
    """Eqs. 6-9 with per-layer k, written with Python sorting: badness is the score (negated for highest)."""
    n, layers, hidden = scores.shape
    out = []
    for l in range(layers):
        counts, sums = [0] * hidden, [0.0] * hidden
        for s in range(n):
            row = [abs(v) if use_abs else v for v in scores[s, l].tolist()]
            bad = [-v if highest else v for v in row]
            for j in sorted(range(hidden), key=lambda j: (bad[j], j))[: quota[l]]:
                counts[j] += 1
            for j in range(hidden):
                sums[j] += bad[j]
        out.append(sorted(range(hidden), key=lambda j: (-counts[j], sums[j], j))[: quota[l]])
    return out


@pytest.mark.parametrize("strategy", ["layer_balanced", "layer_balanced_highest"])
@pytest.mark.parametrize("score", ["signed", "abs"])
def test_quota_matches_brute_force_oracle(strategy, score):
    g = torch.Generator().manual_seed(7)
    scores = torch.randint(-3, 4, (30, 4, 12), generator=g).float()  # 7 values over 12 rows: many ties
    highest, use_abs = strategy.endswith("highest"), score == "abs"
    for quota in ([1, 5, 3, 11], [12, 2, 7, 1], [4, 4, 4, 6]):
        expected = _oracle(scores, quota, highest, use_abs)
        got = select_positions(iter(scores.split(8)), 0.1, strategy=strategy, score=score, quota=quota)
        assert got == expected, quota
        assert [len(layer) for layer in got] == quota


def test_quota_bad_input():
    with pytest.raises(LokiError, match="layer_balanced strategies only"):
        select_positions(TIES, 0.4, strategy="global_lowest", quota=[1, 1])
    with pytest.raises(LokiError, match="layer_balanced strategies only"):
        select_positions(TIES, 0.4, strategy="random", quota=[1, 1])
    with pytest.raises(LokiError, match="3 entries but the scores have 2 layers"):
        select_positions(TIES, 0.4, quota=[1, 1, 1])
    with pytest.raises(LokiError, match="layer 1 is 0 rows"):
        select_positions(TIES, 0.4, quota=[2, 0])
    with pytest.raises(LokiError, match="layer 0 is 6 rows; each layer needs 1 to 5"):
        select_positions(TIES, 0.4, quota=[6, 1])
    with pytest.raises(LokiError, match="whole number"):
        select_positions(TIES, 0.4, quota=[1.5, 1])
    # q still has to be a fraction, though the quota sets the counts.
    with pytest.raises(LokiError, match="strictly between 0 and 1"):
        select_positions(TIES, 1.5, quota=[1, 1])


# ---- layer_mass and adaptive_quota ----------------------------------------------------------------


def test_layer_mass_by_hand_and_streamed():
    # Layer 0 |scores|: 8 + 10 + 10 = 28 over 15 -> 28/15; layer 1: 0 + 10 + 5 = 15 over 15 -> 1.
    mass = layer_mass(TIES)
    assert mass.dtype == torch.float64 and mass.shape == (2,)
    assert torch.allclose(mass, torch.tensor([28 / 15, 1.0], dtype=torch.float64))
    scores = torch.randn(70, 3, 11, generator=torch.Generator().manual_seed(3))
    direct = scores.double().abs().mean(dim=(0, 2))
    assert torch.allclose(layer_mass(iter(scores.split(13))), direct, rtol=1e-12, atol=0)


def test_layer_mass_bad_input():
    bad = TIES.clone()
    bad[2, 0, 1] = float("nan")
    with pytest.raises(LokiError, match=r"sample 5 \(row 2 of score chunk 1\)"):
        layer_mass([TIES, bad])
    with pytest.raises(LokiError, match="another model"):
        layer_mass(TIES, expected_shape=(3, 5))
    with pytest.raises(LokiError, match="zero samples"):
        layer_mass([])


def test_adaptive_quota_by_hand():
    # q = 0.25, D = 20: k = 5, total 4 * 5 = 20, floor max(1, floor(0.5 * 5)) = 2. Weights 1/m = 1, .5, .25, .25
    # (sum 2): the 12 above the floors split 6, 3, 1.5, 1.5 -> 6, 3, 1, 1 and the last row to layer 2
    # (equal remainders .5: lower index) -> 8, 5, 4, 3.
    quota = adaptive_quota([1.0, 2.0, 4.0, 4.0], q=0.25, hidden_size=20)
    assert quota == [8, 5, 4, 3]
    assert sum(quota) == 4 * 5 and min(quota) >= 2
    # Cap at D = 10: q = 0.5 -> k = 5, total 20, floor 2. Layer 0 (weight 1 vs .01 each) would get 15.6 -> 10;
    # the other 10 over three equal layers: 2 each + 4/3 -> 3.33 each -> 4, 3, 3.
    assert adaptive_quota(torch.tensor([1.0, 100.0, 100.0, 100.0]), q=0.5, hidden_size=10) == [10, 4, 3, 3]
    # floor_ratio 1 leaves no room to move: the plain k per layer.
    assert adaptive_quota([1.0, 2.0, 4.0, 4.0], q=0.25, hidden_size=20, floor_ratio=1.0) == [5] * 4
    # Equal measures: the plain k per layer.
    assert adaptive_quota([0.3] * 3, q=0.1, hidden_size=50) == [5, 5, 5]


def test_adaptive_quota_bad_input():
    with pytest.raises(LokiError, match="layer 1 has 0.0"):
        adaptive_quota([1.0, 0.0], q=0.25, hidden_size=20)
    with pytest.raises(LokiError, match="positive and finite"):
        adaptive_quota([1.0, -2.0], q=0.25, hidden_size=20)
    with pytest.raises(LokiError, match="floor_ratio"):
        adaptive_quota([1.0, 2.0], q=0.25, hidden_size=20, floor_ratio=1.5)
    with pytest.raises(LokiError, match="selects no row"):
        adaptive_quota([1.0, 2.0], q=0.01, hidden_size=20)


def test_adaptive_selection_end_to_end():
    # Mass 28/15 and 1 -> weights 15/28 and 1 (k = 2 each, total 4, floor 1): the 2 above the floors split
    # 0.70 and 1.30 -> whole parts 0 and 1; the last row to layer 0 (remainder .70 > .30) -> [2, 2]. So the
    # adaptive selection here equals the plain one.
    quota = adaptive_quota(layer_mass(TIES), q=0.4, hidden_size=5)
    assert quota == [2, 2]
    assert select_positions(TIES, 0.4, quota=quota) == select_positions(TIES, 0.4)
