"""The schema both studies share: `python -m studies` converts its Hydra config (conf/study.yaml with
conf/study/<name>.yaml) into a `StudyConfig` and checks every value before any model loads.

The toy study (study=toy) and the real-model study (study=smollm135m, smollm135m_paper) are two configs
of this one schema; `kind` says which program reads it. A bad value is refused with one sentence: the
key, the value given, what is allowed.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from loki.errors import LokiError
from studies.arms import REAL_ARMS, TOY_ARMS
from studies.lr import SELECTIONS

KINDS = ("toy", "real")
SCORES = ("signed", "abs")  # loki.score: the most negative first (the paper) or by magnitude
STAGES = ("suppression", "implant")
DEFAULT_SELECTION = {"toy": "val_loss", "real": "task_val"}  # what each study chose its LRs by before the merge


def refuse(key: str, allowed: str, value: Any) -> None:
    raise LokiError(f"study.{key} must be {allowed}, got {value!r}.")


def _check_number(key: str, value: Any, low: float, high: float | None = None, whole: bool = False) -> None:
    kinds = (int,) if whole else (int, float)
    if isinstance(value, bool) or not isinstance(value, kinds) or value <= low or (high is not None and value >= high):
        span = f"> {low:g}" if high is None else f"in ({low:g}, {high:g})"
        refuse(key, f"{'an integer' if whole else 'a number'} {span}", value)


def _check_names(key: str, values: Any, allowed: Any, what: str) -> None:
    if not isinstance(values, (list, tuple)):
        refuse(key, f"a list of {what}", values)
    for value in values:
        if value not in allowed:
            refuse(key, f"a list of {what} ({', '.join(map(str, allowed))})", value)


@dataclass
class SuppressionConfig:
    """Zero rows without training, measure retention (the paper's Figure 3)."""

    enabled: bool = True
    qs: list[float] = field(default_factory=lambda: [0.05, 0.1, 0.2, 0.3])
    scores: list[str] = field(default_factory=lambda: list(SCORES))
    random_seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    cached_only: bool = False  # tabulate only what is already measured

    def check(self) -> None:
        for q in self.qs:
            _check_number("suppression.qs", q, 0.0, 1.0)
        _check_names("suppression.scores", self.scores, SCORES, "scores")
        for seed in self.random_seeds:
            _check_number("suppression.random_seeds", seed, -1, whole=True)


@dataclass
class ImplantConfig:
    """The training arms: ordinary train.py runs, an LR grid on the first seed, the chosen LR for the rest."""

    enabled: bool = True
    arms: list[str] | None = None  # None: every arm of the study's table
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    lr_grid: dict[str, list[float]] = field(default_factory=dict)  # toy: arm -> LRs; real: LR family -> LRs
    grid_arms: list[str] | None = None  # arms that try every LR of their grid (None: every arm with a grid)
    headline: list[str] | None = None  # arms that run every seed (None: all; the others run the first)
    max_steps: int | None = None  # step budget of every run (None: the task's own)
    batch_size: int | None = None  # task.data.batch_size of every run (None: the task's own)
    task: str | None = None  # train.py task= of every run (None: the overrides' or train.yaml's)
    recipe: str | None = None  # KVA recipe of the store LoKI arms select from (real study)
    score: str | None = None  # loki.score of the LoKI arms (real study)
    overrides: list[str] = field(default_factory=list)  # train.py overrides of the training runs only
    cached_only: bool = False  # tabulate only the runs already finished


@dataclass
class StudyConfig:
    """One study. Keys under `implant` and `suppression` mean the same in both kinds; the real study adds a
    model, KVA recipes and retention sizes, and writes its tables into `doc`."""

    kind: str
    name: str
    out: str
    threads: int = 1
    overrides: list[str] = field(default_factory=list)  # train.py overrides for every run
    select_lr_by: str | None = None  # val_loss (lower wins) | task_val (higher wins); None: the kind's own
    task_metric: str = "ndcg@10"  # the task metric the toy tables show
    graded: str = "logprob"  # the graded retention measure the toy tables show
    suppression: SuppressionConfig = field(default_factory=SuppressionConfig)
    implant: ImplantConfig = field(default_factory=ImplantConfig)
    # the real-model study
    model: str | None = None  # train.py model=
    recipes: list[str] = field(default_factory=list)  # KVA recipes: one store each
    attribution: dict[str, list[str]] = field(default_factory=dict)  # recipe -> train.py overrides of its attribution
    retention: dict[str, dict] = field(default_factory=dict)  # MMLU benchmark -> settings over conf/eval's
    stages: list[str] | None = None  # None: every stage
    doc: str | None = None  # a page whose <!-- real-study --> block gets the tables
    png: str | None = None  # where the plot is copied
    command: str | None = None  # the command the tables say made them

    def __post_init__(self):
        if isinstance(self.suppression, dict):
            self.suppression = _build(SuppressionConfig, self.suppression, "suppression")
        if isinstance(self.implant, dict):
            self.implant = _build(ImplantConfig, self.implant, "implant")
        if self.kind not in KINDS:
            refuse("kind", "one of " + ", ".join(KINDS), self.kind)
        if self.select_lr_by is None:
            self.select_lr_by = DEFAULT_SELECTION[self.kind]
        if self.select_lr_by not in SELECTIONS:
            refuse("select_lr_by", "one of " + ", ".join(SELECTIONS), self.select_lr_by)
        if not isinstance(self.out, str) or not self.out:
            refuse("out", "a directory", self.out)
        _check_number("threads", self.threads, 0, whole=True)
        self.suppression.check()
        imp = self.implant
        if not imp.seeds:
            refuse("implant.seeds", "a non-empty list of seeds", imp.seeds)
        for seed in imp.seeds:
            _check_number("implant.seeds", seed, -1, whole=True)
        table = TOY_ARMS if self.kind == "toy" else REAL_ARMS
        if imp.arms is not None:
            _check_names("implant.arms", imp.arms, table, "arms")
        for key in ("grid_arms", "headline"):
            if getattr(imp, key) is not None:
                _check_names(f"implant.{key}", getattr(imp, key), table, "arms")
        families = sorted(table) if self.kind == "toy" else sorted({family for family, _ in REAL_ARMS.values()})
        for name, lrs in imp.lr_grid.items():
            if name not in families:
                what = "arms" if self.kind == "toy" else "LR families"
                raise LokiError(f"study.implant.lr_grid's keys must name {what} of {', '.join(families)}, got {name!r}.")
            for lr in lrs:
                _check_number(f"implant.lr_grid.{name}", lr, 0.0)
        if imp.max_steps is not None:
            _check_number("implant.max_steps", imp.max_steps, 0, whole=True)
        if imp.score is not None and imp.score not in SCORES:
            refuse("implant.score", "one of " + ", ".join(SCORES), imp.score)
        if self.kind == "real":
            self._check_real()

    def _check_real(self) -> None:
        if not isinstance(self.model, str) or not self.model:
            refuse("model", "a train.py model name", self.model)
        if not self.recipes:
            refuse("recipes", "a non-empty list of KVA recipes", self.recipes)
        for recipe in self.recipes:
            if recipe not in self.attribution:
                refuse("attribution", f"a list of overrides for every recipe (missing {recipe!r})", self.attribution)
        if self.stages is not None:
            _check_names("stages", self.stages, STAGES, "stages")
        if self.implant.enabled and self.implant.arms and (self.implant.recipe is None or self.implant.score is None):
            refuse("implant.recipe", "a KVA recipe (with implant.score) when implant arms run", self.implant.recipe)

    def runs_stage(self, stage: str) -> bool:
        return self.stages is None or stage in self.stages

    @classmethod
    def from_dict(cls, values: dict) -> StudyConfig:
        return _build(cls, values, "")


def _build(cls, values: dict, prefix: str):
    """`cls(**values)`, refusing a key the schema does not have by name."""
    names = {f.name for f in dataclasses.fields(cls)}
    for key in values:
        if key not in names:
            raise LokiError(f"study.{prefix + '.' if prefix else ''}{key} is not a study setting; the settings there are {', '.join(sorted(names))}.")
    return cls(**values)


def from_hydra(cfg) -> StudyConfig:
    """The `study` node of a composed conf/study.yaml as a checked StudyConfig (`out: null` -> this run's dir)."""
    from omegaconf import OmegaConf

    values = OmegaConf.to_container(cfg.study, resolve=True)
    if values.get("out") is None:
        values["out"] = str(cfg.paths.output_dir)
    return StudyConfig.from_dict(values)
