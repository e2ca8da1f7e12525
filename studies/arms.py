"""The training arms of a study: one record per arm, the two studies' tables, and the LR-grid loop.

Every arm is an ordinary `train.py` run (composed with Hydra's compose API and run in-process through
`loki.recipe.run`), so a study measures exactly what users get. A finished run's metrics.json is its cache.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from loki.errors import LokiError
from studies.lr import Selection, choose_lr

CONF_DIR = Path(__file__).resolve().parents[1] / "conf"


@dataclass(frozen=True)
class Arm:
    """One arm: its train.py overrides, the LRs its first seed tries, and the seeds it runs.

    `family` groups arms that share a learning rate (full, lora, loki): an arm that does not `sweep` its
    grid takes the LR its family's first grid arm chose, or runs the grid itself when none did. An arm
    with an empty grid runs at the train config's own LR."""

    name: str
    overrides: tuple[str, ...]
    seeds: tuple[int, ...]
    family: str
    lr_grid: tuple[float, ...] = ()
    sweep: bool = False
    recipe: str | None = None  # the KVA recipe of the store its LoKI rows come from (None: the study's)
    score: str | None = None  # loki.score of its LoKI rows (None: the study's)


# The toy study's arms: name -> train.py overrides (q = 0.1 is the ablations' reference point, as in the paper)
TOY_ARMS: dict[str, tuple[str, ...]] = {
    "full": ("loki=off",),
    "lora-r16": ("loki=off", "lora=r16", "optimizer.lr=${model.loki_lr}"),  # without a grid: LoKI's step
    "loki-q0.05": ("loki.q=0.05",),
    "loki-q0.1": ("loki.q=0.1",),
    "loki-q0.2": ("loki.q=0.2",),
    "loki-q0.3": ("loki.q=0.3",),
    "loki-q0.1-signed": ("loki.q=0.1", "loki.score=signed"),  # the score the default (abs) is not
    "global_lowest-q0.1": ("loki.q=0.1", "loki.strategy=global_lowest"),
    "global_highest-q0.1": ("loki.q=0.1", "loki.strategy=global_highest"),
    "layer_balanced_highest-q0.1": ("loki.q=0.1", "loki.strategy=layer_balanced_highest"),
    "random-q0.1": ("loki.q=0.1", "loki.strategy=random"),
}

# The real-model study's arms: name -> (LR family, train.py overrides); LoKI rows read the implant recipe's store
REAL_ARMS: dict[str, tuple[str, tuple[str, ...]]] = {
    "full": ("full", ("loki=off",)),
    "lora-r16": ("lora", ("loki=off", "lora=r16")),
    "loki-q0.05": ("loki", ("loki.q=0.05",)),
    "loki-q0.1": ("loki", ("loki.q=0.1",)),
    "loki-q0.2": ("loki", ("loki.q=0.2",)),
    "random-q0.1": ("loki", ("loki.q=0.1", "loki.strategy=random")),
    "global_lowest-q0.1": ("loki", ("loki.q=0.1", "loki.strategy=global_lowest")),
    "global_highest-q0.1": ("loki", ("loki.q=0.1", "loki.strategy=global_highest")),
    "layer_balanced_highest-q0.1": ("loki", ("loki.q=0.1", "loki.strategy=layer_balanced_highest")),
}
# the recipe x score question at an equal task metric: LoKI q = 0.1 rows from each store, ranked each way
RECIPE_SCORE_ARMS: dict[str, tuple[str, str]] = {}  # arm -> (KVA recipe of its store, loki.score)
for _recipe in ("paper", "published", "captum"):
    for _score in ("signed", "abs"):
        REAL_ARMS[f"loki-q0.1-{_recipe}-{_score}"] = ("loki", ("loki.q=0.1",))
        RECIPE_SCORE_ARMS[f"loki-q0.1-{_recipe}-{_score}"] = (_recipe, _score)


def toy_arms(names: Sequence[str], seeds: Sequence[int], lr_grid: Mapping[str, Sequence[float]]) -> list[Arm]:
    """The toy study's arms: each its own family; an arm in `lr_grid` sweeps it, the others keep their LR."""
    return [Arm(name, TOY_ARMS[name], tuple(seeds), family=name, lr_grid=tuple(float(lr) for lr in lr_grid.get(name, ())),
                sweep=name in lr_grid) for name in names]


def real_arms(names: Sequence[str], seeds: Sequence[int], lr_grid: Mapping[str, Sequence[float]],
              grid_arms: Sequence[str], headline: Sequence[str]) -> list[Arm]:
    """The real-model study's arms: grid arms sweep their family's grid; headline arms run every seed, the rest the first."""
    arms = []
    for name in names:
        family, overrides = REAL_ARMS[name]
        recipe, score = RECIPE_SCORE_ARMS.get(name, (None, None))
        arms.append(Arm(name, overrides, tuple(seeds if name in headline else seeds[:1]), family=family,
                        lr_grid=tuple(float(lr) for lr in lr_grid.get(family, ())), sweep=name in grid_arms, recipe=recipe, score=score))
    return arms


@dataclass
class ArmResult:
    """An arm's runs: the chosen LR (None: the config's own), its grid's first-seed runs, then one run per seed."""

    lr: float | None
    grid_runs: dict[float, dict]
    runs: list[dict]


def run_arms(arms: Sequence[Arm], run: Callable[[Arm, float | None, int], dict | None], selection: Selection | str) -> dict[str, ArmResult]:
    """Run each arm: its grid on the first seed, `selection` chooses, then the other seeds at the chosen LR.

    `run(arm, lr, seed)` returns a run's metrics, or None for a run that is not there (a table of what a
    stopped study finished); an arm with no run is left out."""
    chosen_by_family: dict[str, float] = {}
    results = {}
    for arm in arms:
        if arm.sweep or (arm.lr_grid and arm.family not in chosen_by_family):
            grid = list(arm.lr_grid)
        else:
            grid = [chosen_by_family.get(arm.family)]  # None: the config's own LR
        firsts = {lr: run(arm, lr, arm.seeds[0]) for lr in grid}
        firsts = {lr: metrics for lr, metrics in firsts.items() if metrics is not None}
        if not firsts:
            continue
        best = choose_lr(firsts, selection) if len(firsts) > 1 or arm.sweep else next(iter(firsts))
        if best is not None:
            chosen_by_family.setdefault(arm.family, best)
        later = [run(arm, best, seed) for seed in arm.seeds[1:]]
        results[arm.name] = ArmResult(best, firsts if best is not None else {}, [firsts[best], *(m for m in later if m is not None)])
    return results


def compose_train(overrides: Sequence[str]):
    """train.yaml composed with `overrides`, as `python train.py <overrides>` would see it."""
    from hydra import compose, initialize_config_dir

    import loki.recipe  # noqa: F401  registers the ${method:} resolver

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose("train", overrides=list(overrides))


def train_run(overrides: Sequence[str], run_dir: Path, cached_only: bool = False) -> dict | None:
    """One train.py run in `run_dir`, whose metrics.json is read back when it finished before.

    A finished run is reused only under the overrides it ran with (study_overrides.json); other settings
    are refused by name. `cached_only`: None instead of training (tables from what a stopped study finished)."""
    from loki import recipe
    from loki.files import write_atomic

    overrides = list(overrides)
    metrics_file, settings_file = run_dir / "metrics.json", run_dir / "study_overrides.json"
    if metrics_file.exists():
        if settings_file.exists() and json.loads(settings_file.read_text()) != overrides:
            changed = sorted(set(overrides) ^ set(json.loads(settings_file.read_text())))
            raise LokiError(f"{run_dir} finished under other settings ({', '.join(changed)}); pass another out= or delete that run.")
        return json.loads(metrics_file.read_text())
    if cached_only:
        return None
    cfg = compose_train(overrides)
    run_dir.mkdir(parents=True, exist_ok=True)
    write_atomic(settings_file, json.dumps(overrides, indent=1).encode())
    return recipe.run(cfg)
