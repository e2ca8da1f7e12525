"""The frontier runner end to end on the toy, and its design, reuse and settings rules."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from loki.errors import LokiError


def _toy_frontier(**changes):
    from studies.frontier.run import FrontierConfig

    settings = dict(
        name="t", model="toy", task="toy_facts", steps=4, seeds=[0], alphas=[0.5], interpolate_top=1,
        overrides=["task.facts.seed=1", "task.facts.lands=2"],
        methods=[{"name": "loki-q0.1", "overrides": [], "lrs": [1e-2, 3e-2]},
                 {"name": "full", "overrides": ["loki=off"], "lrs": [1e-3, 3e-3]}],
        n_boot=20,
    )
    settings.update(changes)
    return FrontierConfig(**settings)


def test_design_gives_interpolation_points_to_each_methods_largest_lrs():
    from studies.frontier.run import design

    units = design(_toy_frontier(seeds=[0, 1], interpolate_top=1))
    assert len(units) == 2 * 2 * 2
    with_alphas = sorted((k.method, k.lr, k.seed) for k, a in units if a)
    assert with_alphas == [("full", 3e-3, 0), ("full", 3e-3, 1), ("loki-q0.1", 3e-2, 0), ("loki-q0.1", 3e-2, 1)]


@pytest.mark.parametrize("bad, sentence", [
    ({"steps": 0}, "frontier.steps must be an integer >= 1, got 0."),
    ({"alphas": [1.0]}, "frontier.alphas must be a list of numbers in (0, 1), got [1.0]."),
    ({"methods": [{"name": "a/b", "overrides": [], "lrs": [1e-3]}]}, "frontier.methods[0].name must be a label without '/'"),
    ({"methods": [{"name": "x", "overrides": [], "lrs": []}]}, "frontier.methods[0].lrs must be a non-empty list of positive learning rates"),
    ({"measures": ["acc"]}, "frontier.measures must be one of kl, lm_loss_delta, avg, got 'acc'."),
])
def test_bad_frontier_settings_stop_with_one_sentence(bad, sentence):
    from loki import checks

    with pytest.raises(LokiError) as err, checks.located("frontier"):
        _toy_frontier(**bad)
    assert str(err.value).startswith(sentence)


@pytest.mark.slow
def test_a_tiny_frontier_runs_end_to_end_and_resumes(tmp_path):
    """Toy model, two methods, two LRs, one seed, one alpha: all four outputs, and a rerun reuses every point."""
    from studies.frontier.run import main

    out = tmp_path / "frontier"
    frontier = _toy_frontier()
    main(frontier, out)
    for name in ("points.jsonl", "frontier.md", "frontier.png"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    points = [json.loads(line) for line in (out / "points.jsonl").read_text().splitlines()]
    ids = {p["id"] for p in points}
    assert len(points) == 1 + 4 + 2 and "base" in ids  # the base, four runs, two interpolation points
    assert all((out / "items" / f"{i}.json").is_file() for i in ids)
    by_id = {p["id"]: p for p in points}
    run, half = by_id["full__lr0.003__seed0__a1"], by_id["full__lr0.003__seed0__a0.5"]
    assert run["steps"] == 4 and run["forgetting"]["kl"] > 0 and run["n_task"] == 12  # 2 lands x 6 relations
    assert 0 < half["forgetting"]["kl"] < run["forgetting"]["kl"]  # half way back to the base forgets less
    assert by_id["base"]["forgetting"]["kl"] == 0.0
    items = json.loads((out / "items" / "full__lr0.003__seed0__a1.json").read_text())
    assert len(items["task"]) == 12 and sum(i["correct"] for i in items["task"]) / 12 == pytest.approx(run["task"])
    stamp = (out / "points" / "full__lr0.003__seed0__a1.json").stat().st_mtime_ns
    main(frontier, out)  # everything is reused: no point is measured again
    assert (out / "points" / "full__lr0.003__seed0__a1.json").stat().st_mtime_ns == stamp
    with pytest.raises(LokiError, match="was made with other settings"):
        main(_toy_frontier(steps=5), out)


@pytest.mark.slow
def test_alpha_zero_is_the_base_and_alpha_one_is_the_run(tmp_path):
    """Measured the way the frontier measures: theta(0) gives KL 0 and the base's task metric exactly,
    theta(1) gives the trained run's own numbers exactly."""
    from loki import recipe
    from loki.interpolate import weight_delta
    from studies.frontier.run import Frontier, RunKey, compose_train, train_overrides

    frontier = _toy_frontier(methods=[{"name": "full", "overrides": ["loki=off"], "lrs": [3e-3]}])
    runner = Frontier(frontier, tmp_path / "f")
    base = runner.base()
    key = RunKey("full", 3e-3, 0)
    _, setup = recipe.train(compose_train(train_overrides(frontier, frontier.methods[0], key, tmp_path / "run")))
    model = setup.model.eval()
    trained, _ = runner.measure(model, setup.tokenizer)
    delta = weight_delta(runner.base_state(), model)
    delta.apply(model, 0.0)
    at_zero, _ = runner.measure(model, setup.tokenizer)
    assert at_zero["task_metrics"] == base["task_metrics"]
    assert at_zero["retention"]["retention/toy_kl/kl"] == 0.0
    assert runner.point_record(at_zero, "full", key, 0.0, 4, None)["forgetting"]["lm_loss_delta"] == 0.0
    delta.apply(model, 1.0)
    at_one, _ = runner.measure(model, setup.tokenizer)
    assert at_one["task_metrics"] == trained["task_metrics"] and at_one["retention"] == trained["retention"]
    assert trained["retention"]["retention/toy_kl/kl"] > 0


@pytest.mark.parametrize("name", sorted(p.stem for p in (Path(__file__).resolve().parents[1] / "conf" / "frontier").glob("*.yaml")))
def test_every_shipped_frontier_validates_and_its_runs_compose(name):
    """Each conf/frontier/<name>.yaml passes its checks, and every run of its design composes as train.py would."""
    from omegaconf import OmegaConf

    from loki import checks
    from studies.frontier.run import FrontierConfig, RunKey, compose_train, design, train_overrides

    raw = OmegaConf.to_container(OmegaConf.load(Path(__file__).resolve().parents[1] / "conf" / "frontier" / f"{name}.yaml"))
    with checks.located("frontier"):
        frontier = FrontierConfig(**raw)
    for method in frontier.methods:
        key = RunKey(method.name, float(method.lrs[0]), frontier.seeds[0])
        cfg = compose_train(train_overrides(frontier, method, key, Path("/tmp/unused")))
        assert cfg.optimizer.lr == method.lrs[0] and cfg.trainer.max_steps == frontier.steps
    assert len(design(frontier)) == sum(len(m.lrs) for m in frontier.methods) * len(frontier.seeds)
