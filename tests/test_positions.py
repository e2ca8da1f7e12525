"""The published positions format: reading, writing, and refusing files that do not fit the model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from loki.errors import LokiError
from loki.positions import check_q, load_positions, rows_per_layer, save_positions, validate_positions
from loki.recipe import method_label, published_positions_path

REFERENCE = Path(__file__).resolve().parents[1] / "loki" / "published"


@pytest.mark.parametrize(
    "model, q, layers, hidden, k",
    [
        ("Qwen2.5-0.5B-Instruct", 0.05, 24, 896, 44),
        ("Qwen2.5-0.5B-Instruct", 0.1, 24, 896, 89),
        ("Qwen2.5-0.5B-Instruct", 0.2, 24, 896, 179),
        ("Qwen2.5-0.5B-Instruct", 0.3, 24, 896, 268),
        ("Llama-3.1-8B-Instruct", 0.1, 32, 4096, 409),
        ("Llama-3.1-8B-Instruct", 0.2, 32, 4096, 819),
        ("Llama-3.1-8B-Instruct", 0.3, 32, 4096, 1228),
    ],
)
def test_published_files_load_and_match_floor_q_d(model, q, layers, hidden, k):
    path = published_positions_path(model, q)
    positions = validate_positions(load_positions(path), layers, hidden)
    assert len(positions) == layers
    assert {len(layer) for layer in positions} == {k}
    assert rows_per_layer(q, hidden) == k  # hand numbers above come from the authors' README


def test_round_trip_keeps_order(tmp_path):
    positions = [[5, 1, 3], [0, 2, 4]]
    path = save_positions(positions, tmp_path / "p.json")
    assert json.loads(path.read_text()) == positions
    assert load_positions(path) == positions


@pytest.mark.parametrize("q", [0, 1, -0.1, 1.5, "0.1", True])
def test_q_outside_open_interval_rejected(q):
    with pytest.raises(LokiError, match="between 0 and 1"):
        check_q(q)


@pytest.mark.parametrize(
    "positions, match",
    [
        ([[0, 1]], "has 1 layers but the model has 2"),
        ([[0, 1], [0, 1], [0, 1]], "has 3 layers but the model has 2"),
        ([[0, 1], [0, 8]], "row index 8 outside"),
        ([[0, -1], [0, 1]], "row index -1 outside"),
        ([[0, 0], [0, 1]], "lists row 0 more than once"),
        ([list(range(8)) + [0], [0]], "lists 9 rows but the model has only 8"),
        ([[], []], "selects no rows"),
    ],
)
def test_positions_that_do_not_fit_are_rejected(positions, match):
    with pytest.raises(LokiError, match=match):
        validate_positions(positions, num_layers=2, hidden_size=8)


def test_unreadable_files_are_one_sentence(tmp_path):
    with pytest.raises(LokiError, match="does not exist"):
        load_positions(tmp_path / "missing.json")
    bad = tmp_path / "bad.json"
    bad.write_text("[[1, 2], [3,")
    with pytest.raises(LokiError, match="not valid JSON"):
        load_positions(bad)
    wrong = tmp_path / "wrong.json"
    wrong.write_text(json.dumps({"layers": [[1]]}))
    with pytest.raises(LokiError, match="one list of row indices per layer"):
        load_positions(wrong)
    floats = tmp_path / "floats.json"
    floats.write_text(json.dumps([[1.5]]))
    with pytest.raises(LokiError, match="other than integer"):
        load_positions(floats)


def test_published_lookup_names_what_exists():
    with pytest.raises(LokiError, match=r"published q in %: 10, 20, 30, 5"):
        published_positions_path("Qwen2.5-0.5B-Instruct", 0.07)
    with pytest.raises(LokiError, match="Llama-3.1-8B-Instruct"):
        published_positions_path("tiny", 0.1)


def test_method_labels():
    assert method_label(False, 0, None, None) == "full"
    assert method_label(False, 16, None, None) == "lora-r16"
    assert method_label(True, 0, 0.1, "layer_balanced") == "loki-q0.1"
    assert method_label(True, 8, 0.05, "global_lowest") == "loki-q0.05-global_lowest+lora-r8"
