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


def test_a_shard_runs_its_share_then_the_missing_runs_no_live_process_holds(tmp_path, monkeypatch):
    """Shard 0/2 alone: its own runs in order, then its partner's from the end, skipping a run whose claim
    another process holds (here: this test) and any already measured; the held run is made once its claim
    is free (its process gone), while the shard waits for the first pass."""
    from loki.files import try_lock
    from studies.frontier.run import Frontier, design

    frontier = _toy_frontier(methods=[{"name": "full", "overrides": ["loki=off"], "lrs": [1e-4, 2e-4, 3e-4, 4e-4, 5e-4]}],
                             alphas=[], interpolate_top=0)
    runner = Frontier(frontier, tmp_path, shard=(0, 2))
    made = []

    def fake_run(key, alphas):  # writes the unit's point files, as a measured run does
        made.append(key.lr)
        for a in (1.0, *alphas):
            runner.point_path(key.point_id(a)).parent.mkdir(parents=True, exist_ok=True)
            runner.point_path(key.point_id(a)).write_text("{}")

    monkeypatch.setattr(runner, "run_unit", fake_run)
    units = design(frontier)  # lrs 1e-4 .. 5e-4: shard 0 has 1, 3, 5; its partner 2, 4
    fake_run(*units[3])        # 4e-4 is measured already
    made.clear()
    with try_lock(runner.claim_path(units[1][0])) as held:  # 2e-4 is held by a live process
        assert held
        runner.run_share(units)
        assert made == [1e-4, 3e-4, 5e-4]
        with try_lock(runner.claim_path(units[1][0])) as again:
            assert not again  # a second claim on a held run fails without waiting
    monkeypatch.setattr(runner, "collect", lambda: [])
    runner.wait_for_first_pass(poll_seconds=0)  # the claim is free now: the run is made, and nothing waits
    assert made == [1e-4, 3e-4, 5e-4, 2e-4] and not runner.missing(units)


def test_a_base_measured_under_other_eval_settings_is_refused(tmp_path):
    """base.json carries the digest of the settings it was measured under (model, task, overrides, eval);
    a design whose settings differ is refused rather than compared with a stale base."""
    from studies.frontier.run import Frontier

    runner = Frontier(_toy_frontier(), tmp_path)
    other = Frontier(_toy_frontier(overrides=["task.facts.seed=1", "task.facts.lands=3"]), tmp_path)
    assert runner.base_digest() != other.base_digest()
    assert runner.base_digest() == Frontier(_toy_frontier(steps=9, methods=_toy_frontier().methods[1:]), tmp_path).base_digest()
    (tmp_path / "base.json").write_text(json.dumps({"settings": other.base_digest(), "task_metrics": {}}))
    with pytest.raises(LokiError, match="were made with other model, task or eval settings"):
        runner.base()
    assert other.base()["settings"] == other.base_digest()
    (tmp_path / "base.json").write_text(json.dumps({"task_metrics": {}}))  # written before the digest: taken as is
    assert Frontier(_toy_frontier(), tmp_path).base() == {"task_metrics": {}}


def test_the_base_digest_does_not_depend_on_where_the_cache_is(tmp_path, monkeypatch):
    """The facts task's data lives in the cache (task.eval.cache_dir): the same base measured under another
    LOKI_CACHE (another machine) has the same digest; a base.json stamped with the legacy digest (absolute
    paths) is accepted and stamped again with today's."""
    from studies.frontier.run import Frontier, cache_relative

    assert cache_relative({"a": "/c/x/y", "b": ["/c", "/cx/y", "rel/c"], "n": 3}, "/c/") == \
        {"a": "${cache}/x/y", "b": ["${cache}", "/cx/y", "rel/c"], "n": 3}
    digests, legacy = [], []
    for cache in ("one", "two"):
        monkeypatch.setenv("LOKI_CACHE", str(tmp_path / cache))
        runner = Frontier(_toy_frontier(), tmp_path / "out")
        assert str(runner.base_cfg.task.eval.cache_dir) == str(tmp_path / cache)  # the path is in the settings ...
        digests.append(runner.base_digest())
        legacy.append(runner.base_digest(legacy=True))
    assert digests[0] == digests[1] and legacy[0] != legacy[1]  # ... but not in the digest
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "base.json").write_text(json.dumps({"settings": legacy[1], "task_metrics": {}}))
    assert runner.base()["settings"] == digests[1]
    assert json.loads((tmp_path / "out" / "base.json").read_text())["settings"] == digests[1]


@pytest.mark.slow
def test_a_ranking_task_frontier_bootstraps_over_its_queries(tmp_path):
    """The toy reranker (NDCG@10, no graded axis): each point lists one item per query, whose mean is its
    recorded NDCG@10, and the report's matched table is bootstrapped from them."""
    from studies.frontier import stats
    from studies.frontier.run import main

    out = tmp_path / "frontier"
    frontier = _toy_frontier(task="toy_rerank", steps=2, alphas=[], interpolate_top=0, n_boot=50,
                             overrides=["task.eval.max_queries=3", "task.eval.batch_size=100", "evaluate.validation_task_metric=false"],
                             methods=[{"name": "full", "overrides": ["loki=off"], "lrs": [1e-3]}])
    main(frontier, out)
    points = {p["id"]: p for p in map(json.loads, (out / "points.jsonl").read_text().splitlines())}
    assert set(points) == {"base", "full__lr0.001__seed0__a1"}
    for pid, point in points.items():
        assert point["task_metric"] == "ndcg@10" and point["n_task"] == 3 and point["task_graded"] is None
        rows = json.loads((out / "items" / f"{pid}.json").read_text())["task"]
        assert len(rows) == 3 and sum(r["value"] for r in rows) / 3 == pytest.approx(point["task"], abs=1e-12)
        assert all(r["value"] == r["ndcg@10"] for r in rows)
    table = stats.matched_table(list(points.values()), stats.load_items(out), [0.0], "kl", n_boot=50)
    assert len(table["full"][0]["replicates"]) == 50
    report = (out / "frontier.md").read_text()
    assert "against gold log-prob" not in report and "no bootstrap" not in report


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


@pytest.mark.slow
def test_export_point_exports_the_model_the_frontier_measured_at_that_point(tmp_path):
    """export_point trains the point's run again (same overrides, LR, seed, budget) and exports
    theta_0 + alpha (theta_run - theta_0): the very weights the runner measured for that point."""
    import torch
    from transformers import AutoModelForCausalLM

    from loki import recipe
    from loki.interpolate import weight_delta
    from studies.frontier.run import Frontier, RunKey, compose_train, export_point, train_overrides

    frontier = _toy_frontier(methods=[{"name": "full", "overrides": ["loki=off"], "lrs": [3e-3]}])
    runner = Frontier(frontier, tmp_path / "f")
    key = RunKey("full", 3e-3, 0)
    _, setup = recipe.train(compose_train(train_overrides(frontier, frontier.methods[0], key, tmp_path / "run")))
    measured = setup.model.eval()
    weight_delta(runner.base_state(), measured).apply(measured, 0.5)
    metrics = export_point(frontier, tmp_path / "f", key.point_id(0.5))
    assert metrics["export_dir"] == str(tmp_path / "f" / "exports" / "full__lr0.003__seed0__a0.5" / "model")
    exported = AutoModelForCausalLM.from_pretrained(metrics["export_dir"]).state_dict()
    for name, value in measured.state_dict().items():
        assert torch.equal(exported[name], value), name
    with pytest.raises(LokiError, match="is not a point id"):
        export_point(frontier, tmp_path / "f", "full__0.003")
    with pytest.raises(LokiError, match="names method 'lora', which frontier 't' does not have"):
        export_point(frontier, tmp_path / "f", "lora__lr0.001__seed0__a0.5")


@pytest.mark.parametrize("name", sorted(p.stem for p in (Path(__file__).resolve().parents[1] / "conf" / "frontier").glob("*.yaml")))
def test_every_shipped_frontier_validates_and_its_runs_compose(name):
    """Each conf/frontier/<name>.yaml passes its checks, and every run of its design composes as train.py would."""
    from omegaconf import OmegaConf

    from loki import checks
    from studies.frontier.run import FrontierConfig, RunKey, compose_train, design, train_overrides

    from tests.conftest import compose_config

    # composed as the command composes it (a design may build on another through its defaults list)
    raw = OmegaConf.to_container(compose_config("frontier", f"frontier={name}").frontier, resolve=True)
    with checks.located("frontier"):
        frontier = FrontierConfig(**raw)
    for method in frontier.methods:
        key = RunKey(method.name, float(method.lrs[0]), frontier.seeds[0])
        cfg = compose_train(train_overrides(frontier, method, key, Path("/tmp/unused")))
        assert cfg.optimizer.lr == method.lrs[0] and cfg.trainer.max_steps == frontier.steps
    assert len(design(frontier)) == sum(len(m.lrs) for m in frontier.methods) * len(frontier.seeds)


def _point(method, lr, task, kl, seed=0, alpha=1.0):
    return {"id": f"{method}__lr{lr:g}__seed{seed}__a{alpha:g}", "method": method, "lr": lr, "seed": seed, "alpha": alpha,
            "task": task, "forgetting": {"kl": kl}}


def test_front_runs_are_the_runs_the_matched_tables_read_at_each_level_and_its_slack():
    from studies.frontier.run import FrontierConfig, front_runs, front_seed_design

    frontier = FrontierConfig(name="t", seeds=[0], front_seeds=[1, 2], front_slack=0.1, levels=[0.5], measures=["kl"],
                              interpolate_top=1, alphas=[0.5],
                              methods=[{"name": "A", "overrides": [], "lrs": [1.0, 2.0, 3.0]},
                                       {"name": "B", "overrides": [], "lrs": [1.0, 2.0]}])
    points = [
        {"id": "base", "method": "base", "lr": None, "seed": None, "alpha": 0.0, "task": 0.2, "forgetting": {"kl": 0.0}},
        _point("A", 1.0, 0.30, 0.10), _point("A", 2.0, 0.55, 0.20), _point("A", 3.0, 0.70, 0.50),
        _point("A", 3.0, 0.62, 0.25, alpha=0.5),  # the interpolation wins A's level 0.6, so its run (lr 3) is read
        _point("B", 1.0, 0.45, 0.05), _point("B", 2.0, 0.80, 0.30),
        _point("A", 1.0, 0.90, 0.00, seed=1),  # a second-pass point: not read when choosing the second pass
    ]
    # levels 0.4, 0.5, 0.6: A reads lr 2 (0.55, 0.2), lr 2, then lr 3's interpolation; B reads lr 1, lr 2, lr 2
    assert front_runs(frontier, points) == [("A", 2.0), ("A", 3.0), ("B", 1.0), ("B", 2.0)]
    frontier.front_slack = 0.0  # level 0.5 alone
    assert front_runs(frontier, points) == [("A", 2.0), ("B", 2.0)]
    second = [(k.method, k.lr, k.seed, a) for k, a in front_seed_design(frontier, points)]
    assert second == [("A", 2.0, 1, ()), ("A", 2.0, 2, ()), ("B", 2.0, 1, (0.5,)), ("B", 2.0, 2, (0.5,))]


def test_front_seeds_must_be_new_seeds():
    from loki import checks

    with pytest.raises(LokiError) as err, checks.located("frontier"):
        _toy_frontier(seeds=[0, 1], front_seeds=[1, 2])
    assert str(err.value).startswith("frontier.front_seeds must be a list of integer seeds, none of them in frontier.seeds")


def test_the_runner_adds_the_front_seeds_pass_after_the_first_pass(tmp_path, monkeypatch):
    """A frontier whose runs are stand-ins (a table of task and KL per run): the first pass, then seeds 1 and 2
    of the runs the matched table reads, and points.jsonl holds both passes."""
    from studies.frontier import run as frontier_run

    table = {("loki-q0.1", 1e-2): (0.3, 0.1), ("loki-q0.1", 3e-2): (0.6, 0.4), ("full", 1e-3): (0.5, 0.2), ("full", 3e-3): (0.7, 0.3)}
    made = []

    def fake_unit(self, key, alphas):
        made.append((key.method, key.lr, key.seed))
        task, kl = table[(key.method, key.lr)]
        for alpha in (1.0, *alphas):
            self.write_point(dict(_point(key.method, key.lr, task * alpha, kl * alpha, key.seed, alpha), id=key.point_id(alpha)), {})

    monkeypatch.setattr(frontier_run.Frontier, "run_unit", fake_unit)
    monkeypatch.setattr(frontier_run.Frontier, "base", lambda self: {"task_metrics": {"acc": 0.2}, "primary": "acc",
                                                                   "task_metrics_val": {}, "retention": {}})
    frontier = _toy_frontier(front_seeds=[1, 2], levels=[0.55], measures=["kl"])
    runner = frontier_run.Frontier(frontier, tmp_path / "f")
    points = runner.run()
    # level 0.55: loki reaches it with lr 3e-2 (0.6) or its 0.5 interpolation (0.3, no); full with lr 3e-3 (0.7)
    # or its interpolation (0.35, no) and lr 1e-3 (0.5, no): so lr 3e-2 and 3e-3 get seeds 1 and 2
    assert made[4:] == [("loki-q0.1", 3e-2, 1), ("loki-q0.1", 3e-2, 2), ("full", 3e-3, 1), ("full", 3e-3, 2)]
    assert len(points) == 1 + 6 + 4 * 2  # the base, the first pass (4 runs, 2 interpolations), 4 runs with theirs


def test_the_estimate_of_what_remains_prices_each_point_at_its_own_methods_rate():
    """A method with slow runs (an anchored one) is priced at its own rate, not the design's mean; a method
    with no measured run at the design's mean."""
    from studies.frontier.publish import rates, remaining_cpu

    def point(method, alpha, train, evaluated):
        return {"method": method, "alpha": alpha, "seconds_train": train, "seconds_eval": {"task": evaluated}}

    speed = rates([{"method": "base"}, point("fast", 1.0, 90.0, 10.0), point("fast", 1.0, 190.0, 10.0), point("fast", 0.5, 0.0, 30.0),
                   point("slow", 1.0, 1000.0, 100.0)])
    # runs: fast 100, 200; slow 1100 -> mean 1400 / 3; interpolations: fast 30
    assert speed["run"] == pytest.approx(1400 / 3) and speed["interpolation"] == 30.0 and speed["cpu_seconds"] == 1430.0
    assert speed["methods"] == {"fast": {"run": 150.0, "interpolation": 30.0}, "slow": {"run": 1100.0, "interpolation": None}}
    left = [("slow__lr0.1__seed1__a1", True), ("slow__lr0.1__seed1__a0.5", False), ("fast__lr0.1__seed1__a1", True),
            ("new__lr0.1__seed0__a1", True), ("new__lr0.1__seed0__a0.5", False)]
    cpu, at_mean = remaining_cpu(left, speed)
    # slow run 1100 + slow interpolation (none of its own: mean 30) + fast run 150 + new run (mean 1400/3) + new interpolation 30
    assert cpu == pytest.approx(1100 + 30 + 150 + 1400 / 3 + 30) and at_mean == 3


def test_publish_writes_the_page_with_its_status_estimate_and_raw_points(tmp_path, monkeypatch):
    """Half a first pass of stand-in runs: the page names what remains and estimates it from the measured rates."""
    from studies.frontier import run as frontier_run
    from studies.frontier.publish import publish

    def fake_unit(self, key, alphas):
        for alpha in (1.0, *alphas):
            point = dict(_point(key.method, key.lr, 0.5 * alpha, 0.2 * alpha, key.seed, alpha), id=key.point_id(alpha),
                         seconds_train=(220.0 if key.method == "full" else 100.0) if alpha == 1.0 else 0.0,
                         seconds_eval={"task": 10.0, "retention": 10.0})
            self.write_point(point, {})

    monkeypatch.setattr(frontier_run.Frontier, "run_unit", fake_unit)
    monkeypatch.setattr(frontier_run.Frontier, "base", lambda self: {"task_metrics": {"acc": 0.2}, "primary": "acc",
                                                                   "task_metrics_val": {}, "retention": {}, "seconds": 7.0})
    frontier = _toy_frontier(front_seeds=[1], measures=["kl"], variants={"loki-q0.1": "full"}, variants_page="variants_t")
    out = tmp_path / "f"
    runner = frontier_run.Frontier(frontier, out)
    out.mkdir(parents=True)
    (out / "base.json").write_text(json.dumps(runner.base()))
    for key, alphas in frontier_run.design(frontier)[0::2]:  # shard 0/2's runs: loki 1e-2, full 1e-3 (the other shard never ran)
        runner.run_unit(key, alphas)
    points = runner.collect()
    frontier_run.write_report(frontier, out, points)
    page = publish(frontier, out, points, docs_dir=tmp_path / "docs")
    text = page.read_text()
    assert "first pass: 2 of 6 points; front-seeds pass: chosen once the first pass is whole" in text and "**Partial" in text
    assert "- loki-q0.1: 0.03 s0, 0.03 s0 a0.5" in text and "- full: 0.003 s0, 0.003 s0 a0.5" in text
    # left: a loki run at loki's own rate (100 + 20 s), a full run at full's (220 + 20 s), and 2 interpolation
    # points (no rate measured yet, by any method: 0 s) = 360 s of CPU: 6 min, 3 on two processes
    assert "(over the design: 180 s a trained run with its evaluation, no interpolation point timed yet, so they count as 0 s" in text
    assert "2 of the points left have no rate of their method's own" in text
    assert "the 2 runs and 2 interpolation points left take about 6 min of CPU time, 3 min on two processes" in text
    data = tmp_path / "docs" / "frontier_data" / "t"
    assert sorted(p.name for p in (data / "items").iterdir()) == ["full__lr0.001__seed0__a1.json", "loki-q0.1__lr0.01__seed0__a1.json"]
    assert len((data / "points.jsonl").read_text().splitlines()) == 3 and (tmp_path / "docs" / "frontier_t.png").is_file()
    assert "## Results" in text and "### " in text  # the report, one heading level down
    variants = (tmp_path / "docs" / "variants_t.md").read_text()  # the design names variants: their page too
    assert variants.startswith("# Variants of frontier t") and "**Partial" in variants and "| loki-q0.1 | kl | full |" in variants
    # restore: a fresh clone gets the published points (not the base) back, byte for byte, and a rerun skips them
    from studies.frontier.publish import restore

    fresh = tmp_path / "fresh"
    assert restore(frontier, fresh, docs_dir=tmp_path / "docs") == 2
    for name in ("full__lr0.001__seed0__a1.json", "loki-q0.1__lr0.01__seed0__a1.json"):
        assert (fresh / "points" / name).read_bytes() == (out / "points" / name).read_bytes()
        assert (fresh / "items" / name).read_bytes() == (out / "items" / name).read_bytes()
    assert not (fresh / "points" / "base.json").exists() and not (fresh / "base.json").exists()
    assert restore(frontier, fresh, docs_dir=tmp_path / "docs") == 0  # nothing overwritten


def test_reuse_from_copies_a_sibling_frontiers_point_only_under_the_same_settings(tmp_path):
    from studies.frontier.run import Frontier, RunKey

    first = Frontier(_toy_frontier(name="a"), tmp_path / "a")
    key = RunKey("full", 1e-3, 0)
    method = first.frontier.methods[1]
    point_id = key.point_id(1.0)
    first.write_point({"id": point_id, "settings": first.settings_digest(method, key, 1.0), "task": 0.5}, {"task": [{"correct": True}]})
    # the same method, LR, seed and design under another name (with one more method): copied, items too
    second = Frontier(_toy_frontier(name="b", reuse_from=["a"], methods=[*_toy_frontier().methods, {"name": "osf", "overrides": ["loki=off", "lora=osf"], "lrs": [1e-4]}]),
                      tmp_path / "b")
    digest = second.settings_digest(second.frontier.methods[1], key, 1.0)
    assert digest == first.settings_digest(method, key, 1.0)
    assert second.reuse(point_id, digest)["task"] == 0.5
    assert json.loads((tmp_path / "b" / "items" / f"{point_id}.json").read_text()) == {"task": [{"correct": True}]}
    # another budget: another digest, so nothing is copied and the point is made anew
    third = Frontier(_toy_frontier(name="c", reuse_from=["a"], steps=5), tmp_path / "c")
    assert third.reuse(point_id, third.settings_digest(third.frontier.methods[1], key, 1.0)) is None
    assert not (tmp_path / "c" / "points" / f"{point_id}.json").exists()
    # a report alone (no run) copies it too, and lists it among the points
    fourth = Frontier(_toy_frontier(name="d", reuse_from=["a"]), tmp_path / "d")
    fourth._base = {"task_metrics": {"acc": 0.25}, "task_metrics_val": {}, "primary": "acc", "retention": {}}
    assert point_id in [p.get("id") for p in fourth.collect()]
    assert (tmp_path / "d" / "items" / f"{point_id}.json").is_file()



def test_reuse_from_copies_the_base_only_under_the_same_base_settings(tmp_path, monkeypatch):
    from studies.frontier.run import Frontier

    first = Frontier(_toy_frontier(name="a"), tmp_path / "a")
    (tmp_path / "a" / "items").mkdir(parents=True)
    (tmp_path / "a" / "base_reference").mkdir()
    (tmp_path / "a" / "base_reference" / "mmlu_kl.kl.pt").write_bytes(b"base distributions")
    (tmp_path / "a" / "items" / "base.json").write_text('{"task": [{"correct": false}]}')
    (tmp_path / "a" / "base.json").write_text(json.dumps({"settings": first.base_digest(), "task_metrics": {"acc": 0.25}}))

    def no_measuring(self):
        raise AssertionError("the base was measured again")

    monkeypatch.setattr(Frontier, "load_base", no_measuring)
    # another budget and one more method: the points differ, the base's settings do not, so it is copied whole
    second = Frontier(_toy_frontier(name="b", reuse_from=["a"], steps=5), tmp_path / "b")
    assert second.base()["task_metrics"] == {"acc": 0.25}
    assert (tmp_path / "b" / "base_reference" / "mmlu_kl.kl.pt").read_bytes() == b"base distributions"
    assert json.loads((tmp_path / "b" / "items" / "base.json").read_text()) == {"task": [{"correct": False}]}
    # other overrides (another task size): another base, which is measured, not copied
    third = Frontier(_toy_frontier(name="c", reuse_from=["a"], overrides=["task.facts.seed=1", "task.facts.lands=3"]), tmp_path / "c")
    with pytest.raises(AssertionError, match="measured again"):
        third.base()
    assert not (tmp_path / "c" / "base.json").exists()


def test_a_grown_grid_keeps_its_points_and_points_stamped_with_the_grid_are_restamped(tmp_path):
    from studies.frontier.run import Frontier, RunKey

    key = RunKey("full", 1e-3, 0)
    point_id = key.point_id(1.0)
    first = Frontier(_toy_frontier(name="a"), tmp_path / "a")
    method = first.frontier.methods[1]
    today, with_grid = first.accepted_digests(method, key, 1.0)
    assert today != with_grid  # the digest of before named the whole grid
    # one more LR in full's grid: this point's settings are the same, so its digest is too
    grown = _toy_frontier(name="a", methods=[_toy_frontier().methods[0], {"name": "full", "overrides": ["loki=off"], "lrs": [3e-4, 1e-3, 3e-3]}])
    assert Frontier(grown, tmp_path / "a").settings_digest(grown.methods[1], key, 1.0) == today
    # ... but not other overrides under the same label
    changed = _toy_frontier(name="a", methods=[_toy_frontier().methods[0], {"name": "full", "overrides": ["loki=off", "lora=r16"], "lrs": [1e-3]}])
    assert Frontier(changed, tmp_path / "a").settings_digest(changed.methods[1], key, 1.0) != today
    # a point stamped before (with the grid) is reused under the same grid and stamped with today's digest
    first.write_point({"id": point_id, "settings": with_grid, "task": 0.5}, {"task": []})
    assert first.reuse(point_id, first.accepted_digests(method, key, 1.0))["task"] == 0.5
    assert json.loads(first.point_path(point_id).read_text())["settings"] == today
    # and a point of other settings is still refused
    first.write_point({"id": point_id, "settings": "0123456789abcdef", "task": 0.5}, {"task": []})
    with pytest.raises(LokiError, match="was made with other settings"):
        first.reuse(point_id, first.accepted_digests(method, key, 1.0))
