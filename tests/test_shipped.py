"""Positions shipped with the package (loki/shipped.py): made from a finished store, used in place of the
attribution stage only when they were made with exactly this run's model, settings and selection."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from loki.errors import LokiError
from loki.positions import load_positions, rows_per_layer, validate_positions
from tests.conftest import compose_config, run_train

TINY = ("model=tiny", "task=tiny_rerank", "trainer.max_epochs=-1", "trainer.max_steps=1", "evaluate.validation_task_metric=false",
        "evaluate.retention=false", "evaluate.task=false", "evaluate.task_val=false", "export=false", "logger=none", "~callbacks.checkpoint")
SMOLLM = "SmolLM2-135M-Instruct-Q4_1"
SHIPPED = Path(__file__).resolve().parents[1] / "loki" / "published" / SMOLLM


def _store(cache: Path) -> Path:
    from loki import attribution

    return attribution.default_store(compose_config("train", *TINY, f"paths.cache_dir={cache}"))


def test_shipped_positions_stand_in_for_the_attribution_only_when_made_with_the_same_settings(tmp_path, monkeypatch):
    from loki import attribution, shipped

    analysed = tmp_path / "analysed"
    run_train(analysed, *TINY, f"paths.cache_dir={tmp_path / 'cache'}", "loki.use_shipped=false")
    root = tmp_path / "published"
    written = shipped.make_shipped(_store(tmp_path / "cache"), [0.1, 0.2], score="abs", root=root)
    assert sorted(p.name for p in written) == ["10.json", "20.json", "provenance.json"]
    record = json.loads((root / "tiny" / "provenance.json").read_text())
    assert record["sha256"]["10.json"] == hashlib.sha256((root / "tiny" / "10.json").read_bytes()).hexdigest()

    monkeypatch.setattr(shipped, "PUBLISHED_DIR", root)

    def no_attribution(*args, **kwargs):
        raise AssertionError("the attribution stage ran although matching positions were shipped")

    monkeypatch.setattr(attribution, "run", no_attribution)
    fresh = tmp_path / "fresh"
    run_train(fresh, *TINY, f"paths.cache_dir={tmp_path / 'empty'}")  # no store in this cache
    assert (fresh / "positions.json").read_bytes() == (analysed / "positions.json").read_bytes()
    assert not (tmp_path / "empty" / "attribution").exists()

    # Other KVA settings, another score, or use_shipped=false: the shipped file is not these positions.
    for i, other in enumerate(("kva.steps=3", "loki.score=signed", "loki.use_shipped=false")):
        with pytest.raises(LokiError, match="no attribution scores"):
            run_train(tmp_path / f"other{i}", *TINY, f"paths.cache_dir={tmp_path / 'empty'}", "loki.analyse_if_missing=false", other)
    with pytest.raises(LokiError, match="not a finished attribution store"):
        shipped.make_shipped(tmp_path / "nothing", [0.1], root=root)


@pytest.mark.parametrize("q, k", [(0.05, 28), (0.1, 57), (0.2, 115), (0.3, 172)])
def test_smollm_positions_ship_for_the_paper_q_and_are_nested(q, k):
    from loki.shipped import published_positions_path

    assert rows_per_layer(q, 576) == k  # floor(q * 576)
    positions = validate_positions(load_positions(published_positions_path(SMOLLM, q)), 30, 576)
    assert {len(layer) for layer in positions} == {k}
    # The same per-layer ranking cut at a larger q keeps every row of the smaller one.
    smaller = {0.1: 0.05, 0.2: 0.1, 0.3: 0.2}.get(q)
    if smaller is not None:
        inner = load_positions(published_positions_path(SMOLLM, smaller))
        assert all(set(a) <= set(b) for a, b in zip(inner, positions))


def test_smollm_provenance_is_what_the_default_config_would_record():
    from loki import attribution
    from loki.store import settings_record

    record = json.loads((SHIPPED / "provenance.json").read_text())
    for name, digest in record["sha256"].items():
        assert hashlib.sha256((SHIPPED / name).read_bytes()).hexdigest() == digest
    assert record["num_prompts"] == 57 * 50  # the paper's 50 prompts of each of MMLU's 57 subjects
    cfg = compose_config("train", "model=smollm135m")
    assert record["selection"] == {"strategy": cfg.loki.strategy, "score": cfg.loki.score}
    kva, data = attribution.settings(cfg)
    meta = record["store_meta"]
    assert {"kva": meta["kva"], "data": meta["data"]} == json.loads(json.dumps(settings_record(kva, data)))
    assert meta["model"]["name"] == cfg.model.name and meta["shape"] == [30, 576]
