"""Selection strategies on hand-made score arrays whose answers were worked out by hand."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from loki.errors import LokiError
from loki.select import global_rows, load_score_chunks, main, select_positions

# 3 samples x 2 layers x 5 rows; with q = 0.4, k = floor(0.4 * 5) = 2 rows per layer.
HAND = torch.tensor(
    [
        [[1, -2, 3, 0, 5], [5, -1, -1, 9, 9]],
        [[-1, -3, 2, 4, 0], [-5, 9, 9, -4, 9]],
        [[0, 0, 0, 0, 0], [9, 9, -2, 9, -3]],
    ],
    dtype=torch.float32,
)


def test_layer_balanced_by_hand():
    # Layer 0, 2 lowest per sample: {1, 3}, {1, 0}, {0, 1} (all equal: index order)
    #   -> counts row1: 3, row0: 2.
    # Layer 1: {1, 2} (tie of -1s), {0, 3}, {4, 2} -> row2: 2; rows 0, 1, 3, 4 once each, sums 9, 17, 14, 15
    #   -> row 0 (lowest mean).
    assert select_positions(HAND, 0.4) == [[1, 0], [2, 0]]


def test_layer_balanced_highest_by_hand():
    # Layer 0, 2 highest: {4, 2}, {3, 2}, {0, 1} -> row2: 2; once: rows 0, 1, 3, 4 with sums 0, -5, 4, 5 -> row 4.
    # Layer 1: {3, 4}, {1, 2} (three 9s: index order), {0, 1} -> row1: 2; once: sums row0 9, row2 6,
    #   row3 14, row4 15 -> row 4 (highest mean).
    assert select_positions(HAND, 0.4, strategy="layer_balanced_highest") == [[2, 4], [1, 4]]


def test_abs_ranks_magnitudes():
    # Layer 0 on |scores|: {3, 0}, {4, 0}, {0, 1} -> row0: 3; once: rows 1, 3, 4 with |sums| 5, 4, 5 -> row 3.
    # Layer 1 on |scores|: {1, 2}, {3, 0}, {2, 4} -> row2: 2; once: rows 0, 1, 3, 4, |sums| 19, 19, 22, 21
    #   -> rows 0 and 1 tie on mean: lower index.
    assert select_positions(HAND, 0.4, score="abs") == [[0, 3], [2, 0]]
    assert select_positions(HAND, 0.4, score="signed") != select_positions(HAND, 0.4, score="abs")
    # Non-negative scores: magnitude and sign agree, so must the selections.
    positive = HAND.abs() + 1
    assert select_positions(positive, 0.4, score="abs") == select_positions(positive, 0.4, score="signed")


def test_global_lowest_by_hand():
    # Flat index l*5 + j; 4 lowest per sample: {1, 6, 7, 3}, {5, 8, 1, 0}, {9, 7, 0, 1}.
    # Counts: 1 -> 3; 0 and 7 -> 2 (sums 0 < 6); then once: 3, 5, 6, 8, 9 with sums 4, 9, 17, 14, 15 -> 3.
    assert select_positions(HAND, 0.4, strategy="global_lowest") == [[1, 0, 3], [2]]


def test_global_highest_by_hand():
    # 4 highest per sample: {8, 9, 4, 5}, {6, 7, 9, 3}, {5, 6, 8, 0} (ties in index order).
    # Counts 2: 5, 6, 8, 9 with sums 9, 17, 14, 15 -> by higher mean 6, 9, 8, 5; layer 0 gets nothing.
    assert select_positions(HAND, 0.4, strategy="global_highest") == [[], [1, 4, 3, 0]]


def test_global_total_is_int_of_l_d_q_by_hand():
    # q = 0.3: k = floor(0.3 * 5) = 1 per layer (L*k = 2), but the global strategies keep int(2 * 5 * 0.3) = 3.
    # global_lowest, 3 lowest of the 10 flat scores per sample: {1, 6, 7}, {5, 8, 1}, {9, 7, 0} (zeros: index
    # order). Counts 2: 1, 7 (sums -5, 6); then once: 0, 5, 6, 8, 9 with sums 0, 9, 17, 14, 15 -> 0.
    assert select_positions(HAND, 0.3, strategy="global_lowest") == [[1, 0], [2]]
    # global_highest, 3 highest: {8, 9, 4} (5s at 4 and 5: index order), {6, 7, 9}, {5, 6, 8}.
    # Counts 2: 6, 8, 9 with sums 17, 14, 15 -> by higher mean 6, 9, 8; layer 0 gets nothing.
    assert select_positions(HAND, 0.3, strategy="global_highest") == [[], [1, 4, 3]]
    # The per-layer strategies keep k = 1 each.
    assert [len(layer) for layer in select_positions(HAND, 0.3)] == [1, 1]


def test_global_total_for_qwen_shape():
    # Qwen2.5-0.5B: 24 layers x 896 rows. 24 * 896 * 0.1 = 2150.4 -> 2,150 (layer-balanced: 24 * 89 = 2,136).
    assert global_rows(0.1, 24, 896) == 2150
    assert global_rows(0.05, 24, 896) == 1075  # 1075.2 (layer-balanced 24 * 44 = 1,056)
    assert global_rows(0.1, 32, 4096) == 13107  # Llama-3.1-8B: 13107.2
    assert global_rows(0.3, 2, 5) == 3
    assert global_rows(0.7, 1, 10) == 7  # 10 * 0.7 = 7.000000000000001 in floats
    # 100 * 0.57 = 56.99999999999999 in floats: plain int() would say 56; rounded first (as rows_per_layer) 57.
    assert global_rows(0.57, 1, 100) == 57
    scores = torch.randn(2, 24, 896, generator=torch.Generator().manual_seed(0))
    for strategy in ("global_lowest", "global_highest"):
        assert sum(map(len, select_positions(scores, 0.1, strategy=strategy))) == 2150
    assert sum(map(len, select_positions(scores, 0.1))) == 2136


def test_global_needs_only_one_row_in_all_layers():
    # q = 0.1 gives k = 0 per layer (error for layer_balanced) but int(10 * 0.1) = 1 row globally.
    # Lowest per sample: flat 1 (-2), 5 (-5), 9 (-3), each once; sums -5, 9, 15 -> flat 1.
    assert select_positions(HAND, 0.1, strategy="global_lowest") == [[1], []]
    with pytest.raises(LokiError, match="selects no row of 10"):
        select_positions(HAND, 0.05, strategy="global_lowest")


def test_complete_ties_fall_back_to_index_order():
    assert select_positions(torch.zeros(4, 3, 10), 0.3) == [[0, 1, 2]] * 3


def _reference_layer_balanced(scores: torch.Tensor, q: float) -> list[list[int]]:
    """Eqs. 6-9 written plainly with Python sorting, as an independent check on random data."""
    n, layers, hidden = scores.shape
    k = int(q * hidden + 1e-9)
    out = []
    for l in range(layers):
        counts = [0] * hidden
        for s in range(n):
            row = scores[s, l].tolist()
            for j in sorted(range(hidden), key=lambda j: (row[j], j))[:k]:
                counts[j] += 1
        sums = scores[:, l].double().sum(0).tolist()
        out.append(sorted(range(hidden), key=lambda j: (-counts[j], sums[j], j))[:k])
    return out


@pytest.fixture(scope="module")
def random_scores():
    g = torch.Generator().manual_seed(0)
    # Rounded so that ties within and across samples happen often.
    return (torch.randn(40, 4, 30, generator=g) * 2).round() / 2


def test_matches_plain_reference_on_random_data(random_scores):
    assert select_positions(random_scores, 0.2) == _reference_layer_balanced(random_scores, 0.2)


@pytest.mark.parametrize("strategy", ["layer_balanced", "layer_balanced_highest", "global_lowest", "global_highest", "random"])
@pytest.mark.parametrize("score", ["signed", "abs"])
def test_counts_determinism_and_chunking(random_scores, strategy, score):
    q = 0.15  # k = floor(0.15 * 30) = 4; global: int(4 * 30 * 0.15) = 18
    whole = select_positions(random_scores, q, strategy=strategy, score=score)
    assert whole == select_positions(random_scores.clone(), q, strategy=strategy, score=score)
    chunked = select_positions(iter(random_scores.split(7)), q, strategy=strategy, score=score)
    assert chunked == whole
    assert all(len(set(layer)) == len(layer) and all(0 <= j < 30 for j in layer) for layer in whole)
    if strategy.startswith("global"):
        assert sum(map(len, whole)) == 18
    else:
        assert [len(layer) for layer in whole] == [4] * 4


def test_random_is_seeded(random_scores):
    a = select_positions(random_scores, 0.2, strategy="random", seed=1)
    assert a == select_positions(random_scores, 0.2, strategy="random", seed=1)
    assert a != select_positions(random_scores, 0.2, strategy="random", seed=2)


def test_lowest_and_highest_differ(random_scores):
    low = select_positions(random_scores, 0.1)
    high = select_positions(random_scores, 0.1, strategy="layer_balanced_highest")
    assert low != high


def test_bad_input():
    with pytest.raises(LokiError, match="strictly between 0 and 1"):
        select_positions(HAND, 1.5)
    with pytest.raises(LokiError, match="strategy"):
        select_positions(HAND, 0.4, strategy="best")
    with pytest.raises(LokiError, match="score must"):
        select_positions(HAND, 0.4, score="square")
    bad = HAND.clone()
    bad[1, 1, 3] = float("nan")
    with pytest.raises(LokiError, match=r"sample 4 \(row 1 of score chunk 1\)"):
        select_positions([HAND, bad], 0.4)
    with pytest.raises(LokiError, match="sample 2 .*NaN or infinite"):
        select_positions(torch.cat([HAND[:2], torch.full((1, 2, 5), float("inf"))]), 0.4)
    with pytest.raises(LokiError, match="another model"):
        select_positions(HAND, 0.4, expected_shape=(3, 5))
    with pytest.raises(LokiError, match="chunk 1 has 2 layers x 6 rows"):
        select_positions([HAND, torch.zeros(1, 2, 6)], 0.4)
    with pytest.raises(LokiError, match="zero samples"):
        select_positions([], 0.4)
    with pytest.raises(LokiError, match="selects no row"):
        select_positions(HAND, 0.1)


def test_cli_reads_files_and_directories(tmp_path, capsys):
    expected = select_positions(HAND, 0.4)
    torch.save(HAND, tmp_path / "whole.pt")
    shards = tmp_path / "shards"
    shards.mkdir()
    torch.save({"scores": HAND[:2]}, shards / "a.pt")
    np.save(shards / "b.npy", HAND[2:].numpy())
    for source in (tmp_path / "whole.pt", shards):
        out = tmp_path / "positions.json"
        assert main(["--scores", str(source), "--q", "0.4", "--out", str(out)]) == 0
        assert json.loads(out.read_text()) == expected
    assert main(["--scores", str(tmp_path / "missing.pt"), "--q", "0.4", "--out", str(tmp_path / "x.json")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert sum(len(c) for c in load_score_chunks(shards)) == 3
