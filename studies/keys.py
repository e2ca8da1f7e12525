"""Typed keys of a study's results, and their spelling in the JSON files the studies write.

The JSON files keep the strings earlier versions wrote (`suppress-lowest-abs-q0.1` in the toy study's
study.json, `paper|signed|0.1|lowest` in real_model.json), so committed results stay readable; inside the
code a result is keyed by a record.
"""

from __future__ import annotations

from dataclasses import dataclass

RANKED_KINDS = ("lowest", "highest")  # rows KVA ranks lowest / highest (the paper's Figure 3)
KINDS = (*RANKED_KINDS, "random")


@dataclass(frozen=True, order=True)
class SuppressionKey:
    """One suppression measurement: the rows of `kind` zeroed at fraction `q`, ranked by a store of `recipe`
    under loki.score `score`. Random rows depend on no store or score: both are None."""

    q: float
    kind: str
    recipe: str | None = None
    score: str | None = None

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"SuppressionKey.kind must be one of {', '.join(KINDS)}, got {self.kind!r}.")
        if (self.kind == "random") != (self.recipe is None and self.score is None):
            raise ValueError(f"SuppressionKey: random rows have no recipe or score and ranked rows have both, got {self!r}.")

    @property
    def toy_rows(self) -> str:
        """The toy study's name of the zeroed rows: lowest, highest, lowest-abs, highest-abs, random."""
        return self.kind + ("-abs" if self.score == "abs" else "")

    @property
    def toy_label(self) -> str:
        """The toy study.json key of this measurement, e.g. suppress-lowest-abs-q0.1."""
        return f"suppress-{self.toy_rows}-q{self.q:g}"

    @property
    def real_label(self) -> str:
        """The real_model.json key of this measurement, e.g. paper|signed|0.1|lowest (random: -|-|0.1|random)."""
        return f"{self.recipe or '-'}|{self.score or '-'}|{self.q:g}|{self.kind}"

    @classmethod
    def from_real_label(cls, label: str) -> SuppressionKey:
        recipe, score, q, kind = label.split("|")
        return cls(q=float(q), kind=kind, recipe=None if recipe == "-" else recipe, score=None if score == "-" else score)

