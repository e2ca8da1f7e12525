"""Suppression without training (the paper's Figure 3 idea): zero the down_proj rows KVA ranks lowest or
highest, or random rows, and measure what the model retains. Both studies measure it with this code."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path

import torch

from studies.keys import SuppressionKey

STRATEGIES = {"lowest": "layer_balanced", "highest": "layer_balanced_highest"}  # k = floor(q D) rows per layer


def zero_rows(model: torch.nn.Module, positions: list[list[int]]) -> None:
    """Suppress knowledge vectors: set the selected rows of every down_proj.weight to zero (in place)."""
    from loki import arch

    with torch.no_grad():
        for proj, rows in zip(arch.down_projs(model), positions):
            if rows:
                proj.weight[torch.as_tensor(rows, dtype=torch.long)] = 0.0


def picks(stores: Mapping[str, object], qs: Sequence[float], scores: Sequence[str],
          random_seeds: Sequence[int]) -> Iterator[tuple[SuppressionKey, int | None, Callable[[], list[list[int]]]]]:
    """Every measurement: (key, random seed or None, the rows to zero). Ranked rows per store (recipe -> ScoreStore)
    x score x q; random rows per q x seed (they need only a store's shape)."""
    from loki.select import select_positions

    for q in qs:
        for recipe, store in stores.items():
            for score in scores:
                for kind, strategy in STRATEGIES.items():
                    yield (SuppressionKey(q, kind, recipe, score), None,
                           lambda st=store, q=q, strategy=strategy, score=score: select_positions(st.iter_chunks(), q, strategy=strategy, score=score))
        shape_of = next(iter(stores.values()), None)
        for seed in random_seeds if shape_of is not None else ():
            yield (SuppressionKey(q, "random"), seed,
                   lambda st=shape_of, q=q, seed=seed: select_positions(st.iter_chunks(), q, strategy="random", seed=seed))


def retention_after_zeroing(model, tokenizer, eval_cfg, reference: str | Path, intact: Mapping[str, torch.Tensor],
                            positions: list[list[int]]) -> dict:
    """Retention of the intact model (`intact`: its state dict) with `positions` zeroed; KL against `reference`."""
    from loki.eval import run_retention

    model.load_state_dict(intact)
    zero_rows(model, positions)
    return run_retention(model, tokenizer, eval_cfg, reference_dir=reference, stage="after")
