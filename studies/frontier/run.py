"""The frontier runner: for one model and one task, every method over its LR grid and seeds on one step
budget, each trained run evaluated in memory, plus interpolation points, written as points and per-item
results; then the fronts and the matched-level table (`studies.frontier.report`).

    python -m studies.frontier frontier=toy                        # the README's small example (minutes)
    python -m studies.frontier frontier=smollm135m_facts shard=0/2 # two processes, one per core ...
    python -m studies.frontier frontier=smollm135m_facts shard=1/2 # ... then any process writes the report
    python -m studies.frontier frontier=smollm135m_facts report_only=true

Every trained point is an ordinary train.py run (composed from conf/train.yaml with the method's
overrides, `optimizer.lr`, `seed` and the step budget), so whatever train.py supports a method can use.
The runner then evaluates the trained model itself, in memory (no checkpoint, no export): the task on its
test items (and its validation items), and retention against the base model measured once. For the runs
with a method's largest LRs it also evaluates `theta_0 + alpha (theta_run - theta_0)` for each alpha
(`loki.interpolate`), reusing the trained model's memory.

Outputs under `out` (see `studies.frontier.stats` for the item files' layout):
- `points/<id>.json` (one per evaluated model, written when it is done: a stopped frontier resumes) and
  `points.jsonl` (all of them); `items/<id>.json` and `items/base.json` (per-item results);
- `runs/<method>/lr<lr>/seed<seed>/` (each run's dir: config.yaml, metrics.json);
- `frontier.md` and `frontier.png`.
With `front_seeds`, a second pass follows the first: once every first-pass point exists (each shard waits
for the others), the runs that the matched tables read (`front_runs`: each method's least-forgetting point
at each matched level and at level -+ `front_slack`) are run again at each of those seeds, interpolation
points included. Every shard chooses the same runs from the same points.
Shards (`shard=i/n`): each takes every n-th run of a pass, then helps with the others' runs still missing,
from the end of the list. A run is claimed first (`claims/<run>.lock`, a lock the system drops when its
process dies), so no run is made twice at once, and a shard whose partner died finishes the pass.
A point is reused only under the settings it was made with (its `settings` digest: the design's model,
task, budget, overrides and eval, and the point's method label and overrides, LR, seed and alpha; not the
rest of the method's LR grid, so a grid grows without remaking its points); otherwise the runner stops and
names the point.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from loki import checks
from loki.errors import LokiError

log = logging.getLogger(__name__)

CONF_DIR = Path(__file__).resolve().parents[2] / "conf"


# ------------------------------------------------------------------------------------------- config


@dataclass
class MethodSpec:
    """One method of the frontier: a label, its train.py overrides, and its LR grid."""

    name: Any = None               # label in the tables (e.g. loki-q0.1, full, lora-r16)
    overrides: Any = field(default_factory=list)  # train.py overrides that make the method (e.g. [loki=off, lora=dora])
    lrs: Any = field(default_factory=list)  # optimizer.lr grid, from "learns little" to "clearly forgets"

    def __post_init__(self) -> None:
        k = checks.key
        checks.text(k("name"), self.name)
        if "/" in self.name or self.name.startswith("."):
            checks.fail(k("name"), "a label without '/' (it names a folder)", self.name)
        checks.string_list(k("overrides"), self.overrides, optional=False)
        if not (isinstance(self.lrs, (list, tuple)) and self.lrs and all(isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0 for v in self.lrs)):
            checks.fail(k("lrs"), "a non-empty list of positive learning rates", self.lrs)


@dataclass
class FrontierConfig:
    """`frontier`: the design (conf/frontier/<name>.yaml)."""

    name: Any = None               # names the output folder and the report
    model: Any = "toy"             # train.py model=
    task: Any = "toy_facts"        # train.py task=
    steps: Any = 30                # optimizer steps of every run (trainer.max_steps): the equal budget
    seeds: Any = field(default_factory=lambda: [0])  # seeds of every run (the first pass)
    front_seeds: Any = field(default_factory=list)  # second pass: these seeds again for each run the matched tables read (`front_runs`)
    front_slack: Any = 0.0         # ... at each matched level and at level +- this (task units): the runs near the reported fronts too
    methods: Any = field(default_factory=list)  # MethodSpec entries
    alphas: Any = field(default_factory=lambda: [0.25, 0.5, 0.75])  # interpolation points of a run (alpha = 1 is the run)
    interpolate_top: Any = 2       # each method's N largest LRs get interpolation points (0: none)
    overrides: Any = field(default_factory=list)  # train.py overrides of every run (retention sizes, batch, ...)
    measures: Any = field(default_factory=lambda: ["kl", "lm_loss_delta", "avg"])  # forgetting measures of the report
    levels: Any = None             # task levels of the matched table (null: a few every method reaches)
    n_boot: Any = 1000             # bootstrap replicates of the intervals
    task_val: Any = False          # also score each trained run on the task's validation items (to choose an LR by them; the tables do not read it)
    threads: Any = 1               # torch threads per process (one process per core is faster on small matrices)
    reuse_from: Any = field(default_factory=list)  # other frontiers' names (folders beside this one) whose base and points of the same settings are copied, not remade
    variants: Any = None           # {variant method: the method it modifies}: publish also writes `variants_page` (studies/frontier/variants.py)
    reference: Any = None          # the paper's method among the methods, which every variant is compared with too
    variants_page: Any = None      # docs/<this>.md, the variants' page (needs `variants`)
    paired: Any = None             # {method: [methods]}: frontier.md also sets their runs side by side at the same LR and seed, for methods whose LR means the same (LoKI and its row controls)

    def __post_init__(self) -> None:
        k = checks.key
        checks.text(k("name"), self.name)
        checks.text(k("model"), self.model)
        checks.text(k("task"), self.task)
        checks.integer(k("steps"), self.steps, low=1)
        if not (isinstance(self.seeds, (list, tuple)) and self.seeds and all(isinstance(s, int) and not isinstance(s, bool) for s in self.seeds)):
            checks.fail(k("seeds"), "a non-empty list of integer seeds", self.seeds)
        if not (isinstance(self.front_seeds, (list, tuple)) and all(isinstance(s, int) and not isinstance(s, bool) for s in self.front_seeds)
                and not set(self.front_seeds) & set(self.seeds)):
            checks.fail(k("front_seeds"), "a list of integer seeds, none of them in frontier.seeds", self.front_seeds)
        checks.number(k("front_slack"), self.front_slack, 0.0, 1.0)
        if not isinstance(self.methods, (list, tuple)) or not self.methods:
            checks.fail(k("methods"), "a non-empty list of {name, overrides, lrs}", self.methods)
        methods = []
        for i, spec in enumerate(self.methods):
            with checks.located(f"{k('methods')}[{i}]"):
                methods.append(spec if isinstance(spec, MethodSpec) else MethodSpec(**dict(spec)))
        names = [m.name for m in methods]
        if len(set(names)) != len(names):
            checks.fail(k("methods"), "methods with distinct names", names)
        self.methods = methods
        if not (isinstance(self.alphas, (list, tuple)) and all(isinstance(a, (int, float)) and 0 < a < 1 for a in self.alphas)):
            checks.fail(k("alphas"), "a list of numbers in (0, 1)", self.alphas)
        checks.integer(k("interpolate_top"), self.interpolate_top, low=0)
        checks.string_list(k("overrides"), self.overrides, optional=False)
        checks.string_list(k("reuse_from"), self.reuse_from, optional=False)
        for measure in self.measures:
            checks.one_of(k("measures"), measure, ("kl", "lm_loss_delta", "avg"))
        if self.levels is not None and not (isinstance(self.levels, (list, tuple)) and all(isinstance(v, (int, float)) for v in self.levels)):
            checks.fail(k("levels"), "null or a list of task levels", self.levels)
        checks.integer(k("n_boot"), self.n_boot, low=0)
        checks.boolean(k("task_val"), self.task_val)
        if self.variants is not None:
            if not (isinstance(self.variants, Mapping) and self.variants
                    and all(v in names and m in names and v != m for v, m in self.variants.items())):
                checks.fail(k("variants"), "a mapping {variant: the method it modifies} of distinct method names of the design", self.variants)
            self.variants = dict(self.variants)
        if self.reference is not None and self.reference not in names:
            checks.fail(k("reference"), "null or a method name of the design", self.reference)
        checks.text(k("variants_page"), self.variants_page, optional=True)
        if (self.variants_page is None) != (self.variants is None):
            checks.fail(k("variants_page"), "set exactly when frontier.variants is (the page's name under docs/)", self.variants_page)
        checks.integer(k("threads"), self.threads, low=1)
        if self.paired is not None:
            if not (isinstance(self.paired, Mapping) and self.paired and all(
                    m in names and isinstance(others, (list, tuple)) and others and all(o in names and o != m for o in others)
                    for m, others in self.paired.items())):
                checks.fail(k("paired"), "a mapping {method: [other methods]} of method names of the design", self.paired)
            self.paired = {m: list(others) for m, others in self.paired.items()}


def cache_relative(value: Any, cache_dir: str) -> Any:
    """`value` (nested dicts and lists) with every string path under `cache_dir` written as `${cache}/...`."""
    root = os.path.normpath(cache_dir)
    if isinstance(value, Mapping):
        return {k: cache_relative(v, cache_dir) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [cache_relative(v, cache_dir) for v in value]
    if isinstance(value, str) and os.path.isabs(value):
        path = os.path.normpath(value)
        if path == root or path.startswith(root + os.sep):
            return "${cache}" + path[len(root):]
    return value


def parse_shard(value: Any) -> tuple[int, int]:
    """`i/n` -> (i, n): this process takes every n-th unit of work, starting at i."""
    try:
        index, count = (int(v) for v in str(value).split("/"))
    except ValueError:
        index, count = -1, 0
    if not 0 <= index < count:
        checks.fail("shard", "i/n with 0 <= i < n (e.g. 0/2 and 1/2 for two processes)", value)
    return index, count


# -------------------------------------------------------------------------------------------- units


@dataclass(frozen=True)
class RunKey:
    """One trained run of the design."""

    method: str
    lr: float
    seed: int

    @property
    def folder(self) -> str:
        return f"{self.method}/lr{self.lr:g}/seed{self.seed}"

    def point_id(self, alpha: float = 1.0) -> str:
        return f"{self.method}__lr{self.lr:g}__seed{self.seed}__a{alpha:g}"


def design(frontier: FrontierConfig) -> list[tuple[RunKey, tuple[float, ...]]]:
    """Every run, with the alphas of its interpolation points (a method's `interpolate_top` largest LRs)."""
    units = []
    for method in frontier.methods:
        top = sorted(method.lrs, reverse=True)[: frontier.interpolate_top]
        for lr in method.lrs:
            for seed in frontier.seeds:
                alphas = tuple(frontier.alphas) if lr in top else ()
                units.append((RunKey(method.name, float(lr), int(seed)), alphas))
    return units


def front_runs(frontier: FrontierConfig, points: Sequence[Mapping[str, Any]], k: int = 4) -> list[tuple[str, float]]:
    """The runs (method, lr) that the first pass puts where the report reads: for each forgetting measure
    and each method, the run of its least-forgetting point (trained or interpolated) at or above each
    matched level (`frontier.levels`, or the report's `k` common levels), and at each level -+
    `front_slack`. In the design's order. These get `front_seeds` in the second pass."""
    from studies.frontier import stats

    first = [p for p in points if p.get("method") == stats.BASE or p.get("seed") in set(frontier.seeds)]
    methods = stats.by_method(first)
    levels = frontier.levels
    if levels is None:
        base = next((p for p in first if p.get("method") == stats.BASE), None)
        levels = stats.common_levels(methods, k=k, base_task=None if base is None else stats.task_value(base))
    slack = float(frontier.front_slack)
    wanted = sorted({v for level in levels for v in ((level - slack, level, level + slack) if slack else (level,))})
    chosen = set()
    for measure in frontier.measures:
        for method, method_points in methods.items():
            for level in wanted:
                point = stats.least_forgetting_point(method_points, level, measure)
                if point is not None:
                    chosen.add((method, float(point["lr"])))
    return [(m.name, float(lr)) for m in frontier.methods for lr in m.lrs if (m.name, float(lr)) in chosen]


def front_seed_design(frontier: FrontierConfig, points: Sequence[Mapping[str, Any]]) -> list[tuple[RunKey, tuple[float, ...]]]:
    """The second pass: each `front_runs` run at each of `front_seeds`, with its interpolation points
    where its LR is among its method's largest (as in the first pass)."""
    alphas_of = {(key.method, key.lr): alphas for key, alphas in design(frontier)}
    return [(RunKey(method, lr, int(seed)), alphas_of[(method, lr)])
            for method, lr in front_runs(frontier, points) for seed in frontier.front_seeds]


def train_overrides(frontier: FrontierConfig, method: MethodSpec, key: RunKey, run_dir: Path) -> list[str]:
    """train.py overrides of one run: the design's, the method's, then what the frontier fixes. The run
    trains only (no model-task pair config: the design fixes the sizes); the runner evaluates the trained model
    in memory, so train.py measures nothing, writes no
    checkpoint and exports nothing."""
    return [
        f"model={frontier.model}", f"task={frontier.task}", "~model_task", *frontier.overrides, *method.overrides,
        f"optimizer.lr={key.lr}", f"seed={key.seed}",
        f"trainer.max_steps={frontier.steps}", "trainer.max_epochs=-1", "++trainer.enable_progress_bar=false",
        f"paths.output_dir={run_dir}", "logger=none", "~callbacks.checkpoint",
        "export.format=none", "evaluate.retention=false", "evaluate.task=false", "evaluate.task_val=false",
        "evaluate.validation_task_metric=false",
    ]


def _shown_path(path: Path) -> str:
    """A run dir as points.jsonl records it: relative to the checkout when it lies inside (the committed points
    then name no machine's folders), else absolute."""
    from loki.schema import PROJECT_ROOT

    path = Path(path).resolve()
    return str(path.relative_to(PROJECT_ROOT)) if path.is_relative_to(PROJECT_ROOT) else str(path)


def compose_train(overrides: Sequence[str]):
    from hydra import compose, initialize_config_dir

    import loki.recipe  # noqa: F401  registers the ${method:} resolver and the schemas

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose("train", overrides=list(overrides))


# ------------------------------------------------------------------------------------------ running


class Frontier:
    """The runner's state for one process: the base model (loaded once), its measurements, the task."""

    def __init__(self, frontier: FrontierConfig, out: Path, shard: tuple[int, int] = (0, 1)):
        self.frontier = frontier
        self.out = Path(out)
        self.shard = shard
        self.base_cfg = compose_train(train_overrides(frontier, frontier.methods[0], RunKey("base", 1.0, 0), self.out / "base"))
        from loki.tasks import Task

        self.task = Task.from_config(self.base_cfg.task)  # the same task for every point of the design
        self._base: dict | None = None
        self._base_state: dict | None = None
        self.timings: dict[str, float] = {}

    # -- settings and files

    def settings_digest(self, method: MethodSpec | None, key: RunKey | None, alpha: float, with_grid: bool = False) -> str:
        """What a point depends on: the design's model, task, budget and overrides, the eval settings, and
        the run's method (label and overrides), LR, seed and alpha; not the method's other LRs, so that a grid
        can grow without remaking its points. `with_grid`: the digest of before (the method's whole LR grid
        in it), which points made then carry (`accepted_digests`)."""
        from omegaconf import OmegaConf

        from loki.files import settings_digest

        spec = asdict(method) if method else None
        if spec is not None and not with_grid:
            spec.pop("lrs")
        record = {
            "model": self.frontier.model, "task": self.frontier.task, "steps": self.frontier.steps,
            "overrides": list(self.frontier.overrides),
            "eval": OmegaConf.to_container(self.base_cfg.eval, resolve=True),
            "method": spec, "lr": key.lr if key else None,
            "seed": key.seed if key else None, "alpha": alpha,
        }
        return settings_digest(record, 16)

    def accepted_digests(self, method: MethodSpec | None, key: RunKey | None, alpha: float) -> tuple[str, str]:
        """(today's digest, the digest with the grid) of a point: a point stamped with either was made with
        these settings (the second under this very grid)."""
        return self.settings_digest(method, key, alpha), self.settings_digest(method, key, alpha, with_grid=True)

    def base_digest(self, legacy: bool = False) -> str:
        """What the base's measurements depend on: the design's model, task and overrides, and the eval settings,
        with paths under the cache dir written relative to it (the task's data lives there: the same base on
        another machine, or under another LOKI_CACHE, has the same digest). `legacy`: the digest of before
        that, with those paths absolute, which base.json files written then carry (accepted, `base_digests`)."""
        from omegaconf import OmegaConf

        from loki.files import settings_digest

        record = {"model": self.frontier.model, "task": self.frontier.task, "overrides": list(self.frontier.overrides),
                  "eval": OmegaConf.to_container(self.base_cfg.eval, resolve=True),
                  "task_eval": OmegaConf.to_container(self.base_cfg.task.get("eval") or {}, resolve=True)}
        if not legacy:
            record = cache_relative(record, str(self.base_cfg.paths.cache_dir))
        return settings_digest(record, 16)

    def base_digests(self) -> tuple[str, str]:
        """(today's base digest, the legacy one): a base.json stamped with either was measured with these settings."""
        return self.base_digest(), self.base_digest(legacy=True)

    def point_path(self, point_id: str) -> Path:
        return self.out / "points" / f"{point_id}.json"

    def reuse(self, point_id: str, digests: str | Sequence[str]) -> dict | None:
        """The point `point_id` if it was made (here or in a `reuse_from` frontier) with these settings, else
        None. `digests`: today's digest first, then any other that means the same settings
        (`accepted_digests`); a point stamped with another of them is stamped again with today's."""
        digests = (digests,) if isinstance(digests, str) else tuple(digests)
        path = self.point_path(point_id)
        if not path.is_file() and not self.copy_from_siblings(point_id, digests):
            return None
        point = json.loads(path.read_text())
        if point.get("settings") not in digests:
            raise LokiError(
                f"frontier point {point_id} in {self.out} was made with other settings; "
                "use another frontier.name (or out=...) or delete that point to remake it."
            )
        if point["settings"] != digests[0]:
            from loki.files import write_atomic

            point["settings"] = digests[0]
            write_atomic(path, json.dumps(point, indent=1, sort_keys=True).encode())
        return point

    def copy_from_siblings(self, point_id: str, digests: Sequence[str]) -> bool:
        """Copy point `point_id` (and its items) from a `reuse_from` frontier where it was made with exactly
        this point's settings (one of `digests`: model, task, budget, overrides, eval, method, LR, seed, alpha)."""
        for name in self.frontier.reuse_from:
            other = self.out.parent / name
            source = other / "points" / f"{point_id}.json"
            if not source.is_file() or json.loads(source.read_text()).get("settings") not in digests:
                continue
            items = other / "items" / f"{point_id}.json"
            if not items.is_file():
                continue
            point = json.loads(source.read_text())
            self.write_point(point, json.loads(items.read_text()))
            log.info("frontier %s: point %s reused from frontier %s (same settings).", self.frontier.name, point_id, name)
            return True
        return False

    def write_point(self, point: dict, items: dict) -> None:
        from loki.files import write_atomic

        for folder in ("items", "points"):
            (self.out / folder).mkdir(parents=True, exist_ok=True)
        write_atomic(self.out / "items" / f"{point['id']}.json", json.dumps(items).encode())
        write_atomic(self.point_path(point["id"]), json.dumps(point, indent=1, sort_keys=True).encode())

    # -- the base model

    def copy_base_from_siblings(self) -> bool:
        """Copy the base's measurements (base.json, its items, the stored base distributions) from a `reuse_from`
        frontier that measured them with exactly this base's settings: the points copied from it and the points
        made here are then measured against one base, and the base is not measured twice."""
        import shutil

        from loki.files import write_atomic

        for name in self.frontier.reuse_from:
            other = self.out.parent / name
            source, items, reference = other / "base.json", other / "items" / "base.json", other / "base_reference"
            if not (source.is_file() and items.is_file() and reference.is_dir()):
                continue
            if json.loads(source.read_text()).get("settings") not in self.base_digests():
                continue
            (self.out / "items").mkdir(parents=True, exist_ok=True)
            shutil.copytree(reference, self.out / "base_reference", dirs_exist_ok=True)
            write_atomic(self.out / "items" / "base.json", items.read_bytes())
            write_atomic(self.out / "base.json", source.read_bytes())  # last: its presence says the base is whole
            log.info("frontier %s: base measurements reused from frontier %s (same settings).", self.frontier.name, name)
            return True
        return False

    def base(self) -> dict:
        """The base model's measurements (alpha = 0 of every run), made once: task metrics and items,
        retention with the per-text base values, and the stored base distributions the KL reads."""
        if self._base is not None:
            return self._base
        from loki.files import exclusive_lock, write_atomic

        path = self.out / "base.json"
        self.out.mkdir(parents=True, exist_ok=True)
        with exclusive_lock(self.out / ".base.lock"):
            if not path.is_file() and not self.copy_base_from_siblings():
                started = time.time()
                from loki.eval import check_disjoint

                check_disjoint(self.base_cfg.data, self.base_cfg.eval)  # retention never reads the attribution prompts
                model, tokenizer = self.load_base()
                record, items = self.measure(model, tokenizer, stage="before", with_val=bool(self.frontier.task_val))
                (self.out / "items").mkdir(parents=True, exist_ok=True)
                write_atomic(self.out / "items" / "base.json", json.dumps(items).encode())
                record["seconds"] = round(time.time() - started, 1)
                record["settings"] = self.base_digest()
                write_atomic(path, json.dumps(record, indent=1, sort_keys=True).encode())
        base = json.loads(path.read_text())
        today, legacy = self.base_digests()
        if base.get("settings") == legacy != today:  # stamped before paths were cache-relative
            base["settings"] = today
            write_atomic(path, json.dumps(base, indent=1, sort_keys=True).encode())
        if base.get("settings", today) != today:  # a base.json of before the digest is taken as is
            raise LokiError(
                f"the base measurements {path} were made with other model, task or eval settings than frontier "
                f"{self.frontier.name!r}; use another frontier.name (or out=...), or delete the folder to remake it."
            )
        self._base = base
        return self._base

    def load_base(self):
        from loki.models import load_model_and_tokenizer

        model, tokenizer = load_model_and_tokenizer(self.base_cfg.model)
        return model.eval(), tokenizer

    def base_state(self) -> dict:
        """theta_0 (a copy of the base's weights), once per process: PiSSA and CorDA rewrite the base they
        train on, so interpolation reads the original here."""
        if self._base_state is None:
            model, _ = self.load_base()
            self._base_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        return self._base_state

    # -- measuring one model

    def measure(self, model, tokenizer, stage: str = "after", with_val: bool = True) -> tuple[dict, dict]:
        """(record, items) of one model: the task on its test (and validation) items, and retention
        ("before": the base, which stores its distributions; "after": compared with them). Interpolation
        points skip the validation items (only a trained run's LR is chosen on them), and so does the base
        unless the design asks for them (`task_val`)."""
        from loki.eval import run_retention

        task = self.task
        started = time.time()
        task_items: list = []
        test = task.evaluate(model, tokenizer, "test", items=task_items)
        val = task.evaluate(model, tokenizer, "val") if task.has_val and with_val else {}
        task_seconds = time.time() - started
        retention_items: dict = {}
        started = time.time()
        retention = run_retention(model, tokenizer, self.base_cfg.eval, reference_dir=self.out / "base_reference",
                                  stage=stage, items=retention_items)
        record = {
            "task_metrics": test, "task_metrics_val": val, "primary": task.primary, "retention": retention,
            "seconds_eval": {"task": round(task_seconds, 2), "retention": round(time.time() - started, 2)},
        }
        return record, {"task": task_items, "retention": retention_items}

    def point_record(self, measured: dict, method: str, key: RunKey | None, alpha: float, steps: int, run_dir: str | None) -> dict:
        """One points.jsonl row from a measured model and the base's retention."""
        from loki.eval import forgetting_report

        base = self.base()
        report = forgetting_report(base["retention"], measured["retention"])
        kl = list(report["kl"].values())
        lm = [row["delta"] for row in report["lm_loss"].values()]
        avg = report["avg"]
        test, primary = measured["task_metrics"], measured["primary"]
        graded = test.get("logprob")
        return {
            "method": method, "lr": key.lr if key else None, "seed": key.seed if key else None, "alpha": alpha,
            "steps": steps, "task": test.get(primary), "task_metric": primary,
            "task_graded": graded, "task_val": measured["task_metrics_val"].get(primary),
            "forgetting": {
                "kl": sum(kl) / len(kl) if kl else None,
                "lm_loss_delta": sum(lm) / len(lm) if lm else None,
                "avg": None if avg is None or (isinstance(avg, float) and math.isnan(avg)) else avg,
            },
            "n_task": _task_count(test),
            "n_retention": {b: int(v) for b, v in _counts(measured["retention"]).items()},
            "run_dir": run_dir, "seconds_eval": measured["seconds_eval"],
        }

    # -- one run and its interpolation points

    def run_unit(self, key: RunKey, alphas: Sequence[float]) -> list[dict]:
        method = next(m for m in self.frontier.methods if m.name == key.method)
        wanted = [(1.0, key.point_id(1.0))] + [(a, key.point_id(a)) for a in alphas]
        accepted = {a: self.accepted_digests(method, key, a) for a, _ in wanted}
        digests = {a: accepted[a][0] for a, _ in wanted}
        done = {a: self.reuse(pid, accepted[a]) for a, pid in wanted}
        if all(done.values()):
            return list(done.values())
        from loki import recipe

        self.base()
        run_dir = self.out / "runs" / key.folder
        cfg = compose_train(train_overrides(self.frontier, method, key, run_dir))
        started = time.time()
        metrics, setup = recipe.train(cfg)
        train_seconds = time.time() - started
        model, tokenizer = setup.model, setup.tokenizer
        model.eval()
        points = []
        delta = None
        for alpha, point_id in wanted:
            if done[alpha] is not None:
                points.append(done[alpha])
                continue
            if alpha != 1.0:
                if delta is None:
                    from loki.interpolate import weight_delta

                    delta = weight_delta(self.base_state(), model)
                delta.apply(model, alpha)
            measured, items = self.measure(model, tokenizer, with_val=bool(self.frontier.task_val) and alpha == 1.0)
            point = self.point_record(measured, key.method, key, alpha, int(metrics.get("steps", 0)), _shown_path(run_dir))
            point.update(id=point_id, settings=digests[alpha], seconds_train=round(train_seconds, 1) if alpha == 1.0 else 0.0,
                         val_loss=metrics.get("val_loss"), trainable=metrics.get("trainable"))
            self.write_point(point, items)
            points.append(point)
        return points

    def run(self) -> list[dict]:
        """This process's share of the design, then (for the last shard or a single process) the report."""
        import torch

        torch.set_num_threads(int(self.frontier.threads))
        self.out.mkdir(parents=True, exist_ok=True)
        units = design(self.frontier)
        index, count = self.shard
        mine = units[index::count]
        log.info("frontier %s: %d runs in the design, %d for shard %d/%d", self.frontier.name, len(units), len(mine), index, count)
        self.base()
        self.run_share(units)
        if self.frontier.front_seeds:
            second = front_seed_design(self.frontier, self.wait_for_first_pass())
            log.info("frontier %s: %d runs in the front-seeds pass, %d for shard %d/%d", self.frontier.name, len(second),
                     len(second[index::count]), index, count)
            self.run_share(second)
        return self.collect()

    def claim_path(self, key: RunKey) -> Path:
        return self.out / "claims" / f"{key.point_id(1.0)}.lock"

    def run_share(self, units: Sequence[tuple[RunKey, tuple[float, ...]]]) -> None:
        """This shard's runs of `units` in order, then the other shards' that are still missing, from the end
        of the list (where a live partner comes last): a shard that finishes early helps, and one whose
        partner died finishes the pass. Each run is claimed first (a lock that dies with its process), so
        no run is made twice at once; a run another process holds is left to it."""
        index, count = self.shard
        mine = units[index::count]
        others = [u for i, u in enumerate(units) if i % count != index][::-1]
        for key, alphas in list(mine) + [u for u in others if self.missing([u])]:
            self.claimed_unit(key, alphas)

    def claimed_unit(self, key: RunKey, alphas: Sequence[float]) -> bool:
        """Run (or reuse) one unit if no other process holds its claim; False when one does."""
        from loki.files import try_lock

        with try_lock(self.claim_path(key)) as claimed:
            if claimed:
                self.run_unit(key, alphas)
            return claimed

    def missing(self, units: Sequence[tuple[RunKey, tuple[float, ...]]]) -> list[str]:
        return [key.point_id(a) for key, alphas in units for a in (1.0, *alphas) if not self.point_path(key.point_id(a)).is_file()]

    def wait_for_first_pass(self, poll_seconds: float = 30.0) -> list[dict]:
        """Every first-pass point (the other shards' too: the second pass is chosen from all of them)."""
        units = design(self.frontier)
        while True:
            missing = self.missing(units)
            if not missing:
                return self.collect()
            for unit in units:  # a run whose claim is free has no live process behind it (its process died): make it
                if self.missing([unit]):
                    self.claimed_unit(*unit)
            missing = self.missing(units)
            if missing:
                log.info("frontier %s: waiting for %d first-pass points of other shards (%s ...)", self.frontier.name, len(missing), missing[0])
                time.sleep(poll_seconds)

    # -- assembling

    def collect(self) -> list[dict]:
        """Every finished point (base, runs, interpolations) into points.jsonl; missing ones are listed. A point
        missing here but made with the same settings in a `reuse_from` frontier is copied first, as a run would."""
        base = self.base()
        points = [self.base_point(base)]
        missing = []
        methods = {m.name: m for m in self.frontier.methods}

        def gather(units):
            for key, alphas in units:
                for alpha in (1.0, *alphas):
                    path = self.point_path(key.point_id(alpha))
                    if not path.is_file() and self.frontier.reuse_from:
                        self.copy_from_siblings(key.point_id(alpha), self.accepted_digests(methods[key.method], key, alpha))
                    if path.is_file():
                        points.append(json.loads(path.read_text()))
                    else:
                        missing.append(key.point_id(alpha))

        gather(design(self.frontier))
        if self.frontier.front_seeds and not missing:  # the second pass is known once the first is whole
            gather(front_seed_design(self.frontier, list(points)))
        lines = "".join(json.dumps(p, sort_keys=True) + "\n" for p in points)
        from loki.files import write_atomic

        write_atomic(self.out / "points.jsonl", lines.encode())
        if missing:
            log.warning("frontier %s: %d points not measured yet: %s", self.frontier.name, len(missing), ", ".join(missing[:8]))
        return points

    def base_point(self, base: dict) -> dict:
        test, primary = base["task_metrics"], base["primary"]
        return {
            "id": "base", "method": "base", "lr": None, "seed": None, "alpha": 0.0, "steps": 0,
            "task": test.get(primary), "task_metric": primary, "task_graded": test.get("logprob"),
            "task_val": base["task_metrics_val"].get(primary),
            "forgetting": {"kl": 0.0, "lm_loss_delta": 0.0, "avg": 0.0},
            "n_task": _task_count(test),
            "n_retention": {b: int(v) for b, v in _counts(base["retention"]).items()}, "run_dir": None,
        }


def _task_count(metrics: Mapping[str, float]) -> int | None:
    """Test items measured: questions (`n`) or ranked queries (`num_queries`)."""
    return int(metrics.get("n", metrics.get("num_queries", 0))) or None


def _counts(retention: Mapping[str, float]) -> dict[str, float]:
    """Benchmark -> items measured, from retention's `retention/<bench>/n` keys."""
    out = {}
    for key, value in retention.items():
        if key.startswith("retention/") and key.endswith("/n"):
            out[key[len("retention/"):-2]] = value
    return out


def write_report(frontier: FrontierConfig, out: Path, points: list[dict], logger: Any = None) -> Path:
    """frontier.md and frontier.png from the points and their items (studies.frontier.report)."""
    from studies.frontier import report, stats

    items = stats.load_items(out)
    text = report.frontier_markdown(points, items, measures=tuple(frontier.measures), levels=frontier.levels,
                                    n_boot=int(frontier.n_boot), title=f"Frontier: {frontier.name}")
    if frontier.paired:
        from studies.frontier.variants import paired_section

        measures = [m for m in frontier.measures if m in stats.BOOTSTRAPPED]
        lines = ["## The same LR and seed", "",
                 "Each method's trained runs beside another's with the same LR and seed (`frontier.paired`): the change at fixed "
                 "training settings, for methods whose LR means the same thing. Not a comparison at an equal task metric: the task "
                 "difference is stated with it.", ""]
        for method, others in frontier.paired.items():
            for other in others:
                lines += paired_section(points, method, other, measures, items=items, n_boot=int(frontier.n_boot), labels=(method, other))
        text = text.rstrip() + "\n\n" + "\n".join(lines).rstrip() + "\n"
    path = out / "frontier.md"
    path.write_text(text)
    report.frontier_plot(points, out / "frontier.png", measures=tuple(frontier.measures))
    if logger is not None:
        _log_wandb(logger, points)
    return path


def _log_wandb(logger: Any, points: list[dict]) -> None:
    import wandb

    from studies.frontier import report

    columns, rows = report.wandb_table(points)
    logger.log({"frontier/points": wandb.Table(columns=columns, data=rows)})


def export_point(frontier: FrontierConfig, out: Path, point_id: str) -> dict:
    """Train the run of one point of the design again (the same overrides, LR, seed and budget) and export it
    as a Hugging Face model at the point's alpha (`export.alpha`): an interpolation point the tables chose,
    as a model of its own. Writes `out/exports/<point id>/` (model/, metrics.json); returns the run's metrics."""
    from loki import recipe

    parts = str(point_id).split("__")
    try:
        name, lr, seed, alpha = parts[0], float(parts[1][2:]), int(parts[2][4:]), float(parts[3][1:])
        assert len(parts) == 4 and parts[1].startswith("lr") and parts[2].startswith("seed") and parts[3].startswith("a")
    except (IndexError, ValueError, AssertionError):
        raise LokiError(f"export_point={point_id!r} is not a point id (<method>__lr<lr>__seed<seed>__a<alpha>, as in points.jsonl).") from None
    method = next((m for m in frontier.methods if m.name == name), None)
    if method is None:
        raise LokiError(f"export_point={point_id!r} names method {name!r}, which frontier {frontier.name!r} does not have.")
    key = RunKey(name, lr, seed)
    overrides = [o for o in train_overrides(frontier, method, key, out / "exports" / str(point_id)) if o != "export.format=none"]
    return recipe.run(compose_train([*overrides, "export.format=full", f"export.alpha={alpha:g}"]))


def main(frontier: FrontierConfig, out: Path, shard: str = "0/1", report_only: bool = False, logger: Any = None,
         publish: bool = False, restore: bool = False) -> Path:
    if restore:  # the committed points first (docs/frontier_data/<name>/), so a fresh clone resumes where they stopped
        from studies.frontier.publish import restore as restore_points

        log.info("frontier %s: %d published points restored into %s", frontier.name, restore_points(frontier, out), out)
    runner = Frontier(frontier, out, parse_shard(shard))
    started, cpu = time.time(), os.times()
    points = runner.collect() if report_only else runner.run()
    path = write_report(frontier, out, points, logger)
    if publish:  # docs/frontier_<name>.md with the raw points beside it (studies.frontier.publish)
        from studies.frontier.publish import publish as publish_page

        print(f"frontier: page {publish_page(frontier, out, points)}")
    used = os.times()
    log.info("frontier %s: %.0f s wall, %.0f s CPU in this process", frontier.name, time.time() - started,
             (used.user - cpu.user) + (used.system - cpu.system))
    print(f"frontier: {len(points)} points; report {path}")
    return path
