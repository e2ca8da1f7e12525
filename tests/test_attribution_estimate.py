"""Before a long attribution: its size, an estimate of its time from the first prompts' rate, and how to
shorten it. A fake clock makes the rate exact: 20 s per prompt over the first 8 prompts."""

from __future__ import annotations

import logging

import pytest

import loki.lightning.attribution as stage
from loki.data.mmlu import load_mmlu
from loki.lightning.attribution import AttributionEstimate, format_duration
from tests.test_attribution import CPU, DATA, FIXTURE, KVA, tiny  # noqa: F401  (tiny: the model fixture)


def fake_clock(per_call: list[float]):
    times = iter(per_call)
    return lambda: next(times)


def attribute(tiny, rows, tmp_path, caplog):  # noqa: F811
    model, tokenizer = tiny
    with caplog.at_level(logging.INFO, logger=stage.__name__):
        stage.run_attribution(
            model, tokenizer, rows, out_dir=tmp_path / "store", model_name="tiny", kva=KVA, data=DATA,
            batch_size=4, trainer_kwargs=CPU, heatmap_q=None, progress=False,
        )
    return [r.getMessage() for r in caplog.records if r.name == stage.__name__ and r.getMessage().startswith("Attribution")]


def test_a_long_attribution_says_its_size_time_and_how_to_shorten_it(tiny, tmp_path, caplog, monkeypatch):  # noqa: F811
    rows = load_mmlu(path=FIXTURE)
    n = len(rows)
    assert 20.0 * n >= stage.LONG_ATTRIBUTION_S  # so that 20 s a prompt makes a long stage
    monkeypatch.setattr(stage, "estimate_clock", fake_clock([0.0, 160.0]))  # started at 0, 8 prompts done at 160 s
    size, estimate = attribute(tiny, rows, tmp_path, caplog)
    assert size.startswith(f"Attribution: {n} prompts x 4 layers x 64 rows each")  # the tiny model: 4 layers, D = 64
    warning = next(r for r in caplog.records if r.getMessage() == estimate)
    assert warning.levelno == logging.WARNING
    total, left = 20.0 * n, 20.0 * (n - 8)
    assert f"20.00 s per prompt over the first 8 prompts, so about {format_duration(total)} for all {n} prompts x 4 layers" in estimate
    assert f"({format_duration(left)} left;" in estimate
    assert "data.per_subject=N" in estimate and "now 50" in estimate and "data.max_samples=N" in estimate
    assert "loki.positions=published" not in estimate  # nothing is published for the tiny model


def test_a_short_attribution_says_only_its_size(tiny, tmp_path, caplog, monkeypatch):  # noqa: F811
    rows = load_mmlu(path=FIXTURE)[:6]  # fewer than the 8 prompts an estimate is timed on: done by then
    monkeypatch.setattr(stage, "estimate_clock", fake_clock([0.0, 600.0]))
    assert attribute(tiny, rows, tmp_path, caplog) == ["Attribution: 6 prompts x 4 layers x 64 rows each (1 process(es)); timing the first 6 prompts."]


def test_published_positions_are_offered_where_they_exist():
    ways = AttributionEstimate(2850, 24, 896, "Qwen2.5-0.5B-Instruct", {"per_subject": 50, "max_samples": None}).shorter()
    assert ways[-1].startswith("or loki.positions=published")
    assert len(AttributionEstimate(2850, 4, 64, "tiny", {}).shorter()) == 2


@pytest.mark.parametrize("seconds, text", [(44.6, "45 s"), (200, "3 min"), (4200, "1 h 10 min"), (-1, "0 s")])
def test_durations_read_as_an_estimate(seconds, text):
    assert format_duration(seconds) == text
