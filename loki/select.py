"""Selection: from KVA scores to trainable rows (docs/method.md "Selection"); plain tensors in, positions out.

Scores are [N, L, D] (samples x layers x rows), given whole or as an iterable of sample chunks
[n_i, L, D]; only per-(layer, row) tallies are kept, so memory does not grow with N.

Strategies (k = floor(q * D) rows per layer; n = int(L * D * q) rows in total for the global ones):

* layer_balanced (the paper's Eqs. 6-9): for each sample and layer, take the k lowest scores; count,
  per (layer, row), how many samples took it; per layer keep the k most frequent rows.
* layer_balanced_highest: the mirror image (k highest per sample; most frequent).
* global_lowest / global_highest: the same with no per-layer quota. For each sample, take the n
  lowest (highest) scores over all L*D (layer, row) pairs; count over samples; keep the n most
  frequent pairs anywhere. Layers then hold different numbers of rows (possibly none). n = int(L*D*q)
  is the LoKI authors' count (Qwen2.5-0.5B, 24 x 896 at q = 0.1: 2,150 rows), which can exceed the
  layer-balanced total L*k (2,136 there) by up to L-1.
* random: k rows per layer drawn uniformly with a seeded generator (a control; scores give only shape).
* smallest_norm: the k rows of smallest L2 norm in each layer's down_proj weight (a control with no
  attribution at all; `smallest_norm_positions` takes the weights, not scores).

Per-layer quota (the paper's future work; an option of the two layer_balanced strategies): quota=[k_0, ...,
k_{L-1}] gives layer l its own k_l in place of k, by the same rule (each sample takes its k_l lowest scores
in layer l; the layer keeps its k_l most frequent rows); quota=[k]*L is the plain strategy, row for row.
`adaptive_quota` spreads the same total L*k over layers in inverse proportion to a per-layer measure
(`layer_mass`: mean |score|, or the damage of suppressing the layer's rows), at least a floor each and
at most D; `layer_quota` does the integer split (largest remainder, water-filled under the cap).

Ties, everywhere, are broken deterministically: within a sample, equal scores are taken in row order
(lower index first); among equally frequent rows, the lower mean score wins (higher for the *_highest
strategies), then the lower index (for global: layer-major flat index l*D + j).

score="signed" ranks the scores as stored (most negative = lowest, the paper's reading);
score="abs" ranks their magnitudes (lowest = least contribution either way). Each layer's list is in
rank order (most frequent first), as in the published positions files.
"""

from __future__ import annotations

import argparse
import math
import operator
import sys
from collections.abc import Iterable, Iterator, Sequence
from fractions import Fraction
from pathlib import Path

import torch

from loki.errors import LokiError
from loki.positions import Positions, check_q, rows_per_layer, save_positions

SCORE_STRATEGIES = ("layer_balanced", "layer_balanced_highest", "global_lowest", "global_highest", "random")
# Strategies that read no attribution score: random draws rows from the shape, smallest_norm reads the weights.
NO_SCORE_STRATEGIES = ("random", "smallest_norm")
STRATEGIES = (*SCORE_STRATEGIES, "smallest_norm")
SCORE_MODES = ("signed", "abs")
# Per-layer row budgets: uniform = k = floor(q*D) in every layer (the paper); mass = the same total by
# `adaptive_quota` over each layer's attribution mass (`layer_mass`); damage = the same over each layer's
# suppression damage (`loki.damage.layer_damage`); *_shuffled = those counts in a random layer order
# (`shuffled_quota`), the control for which layers get more.
QUOTAS = ("uniform", "mass", "damage", "mass_shuffled", "damage_shuffled")
# Samples handled at once inside a chunk: bounds the temporaries (a few bytes per score).
_SAMPLES_PER_STEP = 64


def select_positions(
    scores: torch.Tensor | Iterable[torch.Tensor],
    q: float,
    strategy: str = "layer_balanced",
    seed: int = 0,
    score: str = "signed",
    expected_shape: tuple[int, int] | None = None,
    quota: Sequence[int] | None = None,
) -> Positions:
    """Rows to train per layer, in the published positions format (a list of L lists of row indices).

    scores: a tensor [N, L, D] or an iterable of chunks [n_i, L, D] (streamed; never concatenated).
    expected_shape: (L, D) of the model the positions are for; a mismatch is an error.
    quota: rows per layer (L ints in [1, D]) in place of k = floor(q*D), for the layer_balanced strategies
    only (see `adaptive_quota`); q is then only range-checked.
    """
    check_q(q)
    if strategy == "smallest_norm":
        raise LokiError("strategy 'smallest_norm' reads the down_proj weights, not scores; use smallest_norm_positions(weights, q).")
    if strategy not in SCORE_STRATEGIES:
        raise LokiError(f"strategy must be one of {', '.join(SCORE_STRATEGIES)}, got {strategy!r}.")
    if score not in SCORE_MODES:
        raise LokiError(f"score must be 'signed' or 'abs', got {score!r}.")
    if quota is not None:
        if not strategy.startswith("layer_balanced"):
            raise LokiError(f"a per-layer quota applies to the layer_balanced strategies only, not to {strategy!r}.")
        quota = _int_list(quota, "quota")
    tally = _Tally(q, strategy, score, expected_shape, quota)
    for chunk in _chunks(scores):
        tally.add(chunk)
    return tally.positions(seed)


def random_positions(num_layers: int, hidden_size: int, q: float, seed: int = 0) -> Positions:
    """k = floor(q*D) rows per layer, drawn uniformly without replacement by one generator seeded once
    (layer 0 first): the `random` strategy, which needs only the model's shape."""
    k = rows_per_layer(check_q(q), hidden_size)
    if k == 0:
        raise LokiError(f"q={q} selects no row of {hidden_size}; use q >= {1 / hidden_size:.3g}.")
    generator = torch.Generator().manual_seed(int(seed))
    return [torch.randperm(hidden_size, generator=generator)[:k].tolist() for _ in range(num_layers)]


def smallest_norm_positions(weights: Iterable[torch.Tensor], q: float) -> Positions:
    """The `smallest_norm` control: per layer, the k = floor(q*D) rows of smallest L2 norm of its down_proj
    weight [D, F], smallest first; equal norms are taken in row order (lower index first).

    weights: one [D, F] tensor per layer, in layer order. Norms are computed in float64, so bf16 or fp16
    weights rank the same as their float32 copies."""
    positions: Positions = []
    for layer, weight in enumerate(weights):
        if weight.ndim != 2:
            raise LokiError(f"down_proj weight of layer {layer} has shape {tuple(weight.shape)}; expected [hidden, intermediate].")
        hidden = weight.shape[0]
        k = rows_per_layer(check_q(q), hidden)
        if k == 0:
            raise LokiError(f"q={q} selects no row of {hidden}; use q >= {1 / hidden:.3g}.")
        norms = weight.detach().to(device="cpu", dtype=torch.float64).norm(dim=1)
        positions.append(torch.sort(norms, stable=True).indices[:k].tolist())  # stable: ties in row order
    if not positions:
        raise LokiError("smallest_norm got no down_proj weights (zero layers), so there is nothing to select from.")
    return positions


def layer_quota(weights: Sequence[float] | torch.Tensor, total: int, floor: int = 0, cap: int | None = None) -> list[int]:
    """Split `total` rows over L layers in proportion to `weights` (one non-negative finite float per layer):
    every layer gets `floor`, and the remaining total - L*floor goes by the weights, rounded with the
    largest-remainder (Hamilton) method; equal remainders go to the lower layer index first. No layer gets
    more than `cap` (default: total): a layer whose share would pass it is fixed at the cap and the rest is
    re-split over the others by their weights (water-filling). All-zero weights split equally. The result
    sums to `total` exactly.

    Shares are computed in exact rational arithmetic on the floats given, so a tie is a tie of the inputs,
    never of rounding."""
    if isinstance(weights, torch.Tensor):
        if weights.ndim != 1:
            raise LokiError(f"layer weights must be one number per layer (a 1-D tensor), got shape {tuple(weights.shape)}.")
        weights = weights.tolist()
    try:
        weights = [float(w) for w in weights]
    except (TypeError, ValueError):
        raise LokiError("layer weights must be a sequence of numbers, one per layer.") from None
    if not weights:
        raise LokiError("layer weights are empty; give one weight per layer.")
    bad = [i for i, w in enumerate(weights) if not (math.isfinite(w) and w >= 0)]
    if bad:
        raise LokiError(f"layer weights must be non-negative and finite, but layer {bad[0]} has {weights[bad[0]]}.")
    layers = len(weights)
    total, floor = _count(total, "total"), _count(floor, "floor")
    cap = total if cap is None else _count(cap, "cap")
    if layers * floor > total:
        raise LokiError(f"a floor of {floor} rows in each of {layers} layers needs {layers * floor}, more than the total of {total}.")
    if total > layers * cap:
        raise LokiError(f"a total of {total} rows does not fit in {layers} layers of at most {cap} rows each.")

    share = [Fraction(w) for w in weights]
    quota: list[Fraction | int] = [0] * layers
    free = list(range(layers))  # layers not yet fixed at the cap
    left = total
    while True:
        # Split `left` over the free layers: floor each, the rest by weight (equally where all weigh 0).
        weight_sum = sum(share[i] for i in free)
        spread = left - floor * len(free)
        for i in free:
            quota[i] = floor + (spread * share[i] / weight_sum if weight_sum else Fraction(spread, len(free)))
        over = [i for i in free if quota[i] > cap]
        if not over:
            break
        for i in over:  # fixed at the cap; the next round re-splits what they would have had above it
            quota[i] = cap
            left -= cap
        free = [i for i in free if i not in over]
    # Largest remainder over the free layers (the capped ones are whole already). Each free share is at
    # most cap, an integer, so rounding one up never passes the cap.
    whole = {i: math.floor(quota[i]) for i in free}
    short = left - sum(whole.values())
    for i in sorted(free, key=lambda i: (-(quota[i] - whole[i]), i))[:short]:
        whole[i] += 1
    return [int(whole.get(i, quota[i])) for i in range(layers)]


def adaptive_quota(mass_or_damage: Sequence[float] | torch.Tensor, q: float, hidden_size: int, floor_ratio: float = 0.5) -> list[int]:
    """Rows per layer for `select_positions(..., quota=)`: the layer-balanced total L*k (k = floor(q*D))
    spread in inverse proportion to a per-layer measure, with at least floor(floor_ratio*k) (and 1) rows
    and at most D per layer (`layer_quota`).

    mass_or_damage: one positive number per layer saying how much the layer as a whole matters, e.g.
    `layer_mass(scores)` (mean |attribution score|) or the loss increase when its rows are suppressed.
    Why inverse: LoKI trains the rows that matter least, so a layer whose rows matter less overall can
    take more of the budget with less risk to what the model knows; the floor keeps every layer trainable."""
    k = rows_per_layer(check_q(q), hidden_size)
    if k == 0:
        raise LokiError(f"q={q} selects no row of {hidden_size}; use q >= {1 / hidden_size:.3g}.")
    if isinstance(floor_ratio, bool) or not isinstance(floor_ratio, (int, float)) or not 0.0 <= floor_ratio <= 1.0:
        raise LokiError(f"floor_ratio must be a fraction of k between 0 and 1, got {floor_ratio!r}.")
    try:
        measure = torch.as_tensor(mass_or_damage).detach().to(device="cpu", dtype=torch.float64)
    except (TypeError, ValueError, RuntimeError):
        raise LokiError("the per-layer measure must be a sequence of numbers, one per layer.") from None
    if measure.ndim != 1 or len(measure) == 0:
        raise LokiError(f"the per-layer measure must be one number per layer, got shape {tuple(measure.shape)}.")
    if not (torch.isfinite(measure).all() and (measure > 0).all()):
        layer = int((~(torch.isfinite(measure) & (measure > 0))).nonzero()[0])
        raise LokiError(
            f"the per-layer measure must be positive and finite (it is inverted), but layer {layer} has "
            f"{measure[layer].item()}; clip it to a small positive value."
        )
    layers = len(measure)
    floor = max(1, int(math.floor(round(floor_ratio * k, 9))))  # rounded like rows_per_layer
    return layer_quota((1.0 / measure).tolist(), total=layers * k, floor=floor, cap=hidden_size)


def shuffled_quota(quota: Sequence[int], seed: int) -> list[int]:
    """The same per-layer row counts given to the layers in a random order (a torch permutation seeded by
    `seed`): the control for an adaptive quota, which keeps how unequal the spread is and drops which layers
    get more. The total, the floor and the cap still hold, since every count is one the quota had."""
    generator = torch.Generator().manual_seed(int(seed))
    order = torch.randperm(len(quota), generator=generator).tolist()
    return [int(quota[i]) for i in order]


def layer_mass(scores: torch.Tensor | Iterable[torch.Tensor], expected_shape: tuple[int, int] | None = None) -> torch.Tensor:
    """Per-layer attribution mass: the mean |score| over samples and rows, float64 [L], in one streaming
    pass over scores given as for `select_positions` (a tensor [N, L, D] or chunks [n_i, L, D])."""
    return row_mass(scores, expected_shape).mean(dim=1)


def row_mass(scores: torch.Tensor | Iterable[torch.Tensor], expected_shape: tuple[int, int] | None = None) -> torch.Tensor:
    """Per-row attribution mass: each row's mean |score| over samples, float64 [L, D], in one streaming pass
    (the weights of the |KVA|-weighted L2 pull, `loki.implant.kva_row_weights`)."""
    shape = tuple(expected_shape) if expected_shape is not None else None
    sums = None
    samples = 0
    for chunk_index, chunk in enumerate(_chunks(scores)):
        chunk = _score_chunk(chunk, f"score chunk {chunk_index}", shape)
        shape = tuple(chunk.shape[1:])
        if sums is None:
            sums = torch.zeros(shape, dtype=torch.float64)
        for offset, part in zip(range(0, len(chunk), _SAMPLES_PER_STEP), chunk.split(_SAMPLES_PER_STEP)):
            part_sums = part.double().abs().sum(dim=0)  # float64 per step: bounded temporaries
            if not torch.isfinite(part_sums).all():
                _raise_not_finite(part, offset, samples, chunk_index)
            sums += part_sums
        samples += len(chunk)
    if samples == 0:
        raise LokiError("no scores were given (zero samples), so there is no attribution mass to measure.")
    return sums / samples


def global_rows(q: float, num_layers: int, hidden_size: int) -> int:
    """n = int(L * D * q), the global strategies' total (the LoKI authors' count); rounded before flooring
    like `rows_per_layer`, so a product such as 409.6 is never read as 409.59999."""
    check_q(q)
    return int(math.floor(round(num_layers * hidden_size * q, 9)))


class _Tally:
    """Running counts of how often each (layer, row) was taken, and running score sums for ties."""

    def __init__(self, q, strategy, score, expected_shape, quota=None):
        self.q, self.strategy, self.score = q, strategy, score
        self.highest = strategy.endswith("highest")
        self.per_layer = strategy.startswith("layer_balanced")
        self.shape = tuple(expected_shape) if expected_shape is not None else None
        self.counts = self.sums = None
        self.k = self.total = None
        self.quota = quota  # rows per layer for the layer_balanced strategies; [k]*L unless given
        self.samples = self.chunks = 0

    def add(self, chunk: torch.Tensor) -> None:
        chunk = self._checked(chunk)
        layers, hidden = self.shape
        for offset, part in zip(range(0, len(chunk), _SAMPLES_PER_STEP), chunk.split(_SAMPLES_PER_STEP)):
            # Work on "badness" where lower = taken first: negate for the *_highest strategies.
            values = part.float()
            if self.score == "abs":
                values = values.abs()
            if self.highest:
                values = -values
            part_sums = values.sum(dim=0).double()  # float32 within a step, float64 across steps
            if not torch.isfinite(part_sums).all():  # cheaper than checking every score first
                self._raise_not_finite(part, offset)
            self.sums += part_sums
            if self.strategy == "random":
                continue
            if self.per_layer:
                taken = self._taken_per_layer(values)
            else:
                taken = _lowest_k(values.reshape(len(values), -1), self.total)
            self.counts += torch.bincount(taken.flatten(), minlength=layers * hidden).view(layers, hidden)
        self.samples += len(chunk)
        self.chunks += 1

    def positions(self, seed: int) -> Positions:
        if self.samples == 0:
            raise LokiError("no scores were given (zero samples), so there is nothing to select from.")
        layers, hidden = self.shape
        if self.strategy == "random":
            return random_positions(layers, hidden, self.q, seed)
        if self.per_layer:
            return [_rank(self.counts[l], self.sums[l])[: self.quota[l]].tolist() for l in range(layers)]
        best = _rank(self.counts.flatten(), self.sums.flatten())[: self.total]
        out: Positions = [[] for _ in range(layers)]
        for flat_index in best.tolist():
            out[flat_index // hidden].append(flat_index % hidden)
        return out

    def _taken_per_layer(self, values: torch.Tensor) -> torch.Tensor:
        """Flat indices l*D + j of each sample's quota[l] lowest rows in each layer l."""
        layers, hidden = self.shape
        most = max(self.quota)
        uniform = min(self.quota) == most
        # One top-k of the largest quota; in (value, index) order, its first quota[l] entries are the
        # quota[l] lowest with the same tie rule, so a smaller layer quota is a prefix.
        taken = _lowest_k(values, most, ordered=not uniform) + torch.arange(layers)[:, None] * hidden
        if uniform:
            return taken
        within = torch.arange(most) < torch.tensor(self.quota)[:, None]  # [L, most]
        return taken[within.expand_as(taken)]

    def _raise_not_finite(self, part: torch.Tensor, offset: int):
        _raise_not_finite(part, offset, self.samples, self.chunks)

    def _checked(self, chunk) -> torch.Tensor:
        chunk = _score_chunk(chunk, f"score chunk {self.chunks}", self.shape)
        if self.shape is None:
            self.shape = tuple(chunk.shape[1:])
        if self.counts is None:
            self.k = rows_per_layer(self.q, self.shape[1])
            self.total = global_rows(self.q, *self.shape)
            if self.strategy.startswith("global") and self.total == 0:
                rows = self.shape[0] * self.shape[1]
                raise LokiError(f"q={self.q} selects no row of {rows}; use q >= {1 / rows:.3g}.")
            if self.quota is not None:
                _check_quota(self.quota, *self.shape)
            elif not self.strategy.startswith("global") and self.k == 0:
                raise LokiError(f"q={self.q} selects no row of {self.shape[1]}; use q >= {1 / self.shape[1]:.3g}.")
            else:
                self.quota = [self.k] * self.shape[0]
            self.counts = torch.zeros(self.shape, dtype=torch.int64)
            self.sums = torch.zeros(self.shape, dtype=torch.float64)
        return chunk


def _score_chunk(chunk, where: str, shape: tuple[int, int] | None) -> torch.Tensor:
    """chunk as a floating CPU tensor [n, L, D]; with `shape` given, (L, D) must match it."""
    if not isinstance(chunk, torch.Tensor):
        chunk = torch.as_tensor(chunk)
    if chunk.ndim == 2:  # a single sample [L, D]
        chunk = chunk[None]
    if chunk.ndim != 3:
        raise LokiError(f"{where} has shape {tuple(chunk.shape)}; expected [samples, layers, hidden].")
    if not (chunk.is_floating_point()):
        chunk = chunk.float()
    if shape is not None and tuple(chunk.shape[1:]) != shape:
        raise LokiError(
            f"{where} has {chunk.shape[1]} layers x {chunk.shape[2]} rows but {shape[0]} x "
            f"{shape[1]} were expected; the scores were made for another model."
        )
    return chunk.cpu()


def _raise_not_finite(part: torch.Tensor, offset: int, samples_before: int, chunk_index: int):
    first = offset + int((~torch.isfinite(part).flatten(1).all(dim=1)).nonzero()[0])
    raise LokiError(
        f"sample {samples_before + first} (row {first} of score chunk {chunk_index}) has NaN or infinite "
        f"scores; re-run attribution for it or drop it."
    )


def _count(value, name: str) -> int:
    """A non-negative int argument (bools refused: True is not a row count)."""
    try:
        if isinstance(value, bool):
            raise TypeError
        value = operator.index(value)
    except TypeError:
        raise LokiError(f"{name} must be a whole number of rows, got {value!r}.") from None
    if value < 0:
        raise LokiError(f"{name} must not be negative, got {value}.")
    return value


def _int_list(values, name: str) -> list[int]:
    if isinstance(values, torch.Tensor):
        values = values.tolist()
    try:
        return [_count(v, f"each {name} entry") for v in values]
    except TypeError:
        raise LokiError(f"{name} must be a list of row counts, one per layer, got {values!r}.") from None


def _check_quota(quota: list[int], layers: int, hidden: int) -> None:
    if len(quota) != layers:
        raise LokiError(f"quota has {len(quota)} entries but the scores have {layers} layers; give one per layer.")
    bad = [l for l, k in enumerate(quota) if not 1 <= k <= hidden]
    if bad:
        raise LokiError(f"quota for layer {bad[0]} is {quota[bad[0]]} rows; each layer needs 1 to {hidden} (its row count).")


def _lowest_k(values: torch.Tensor, k: int, ordered: bool = False) -> torch.Tensor:
    """Indices [..., k] of the k lowest entries along the last dim; equal values are taken in index order.

    ordered: return them in (value, index) order, so that the first m are the m lowest by the same rule;
    otherwise their order is unspecified (topk's order among equal values, and the repair below, differ)."""
    if k >= values.shape[-1]:  # every entry (only a quota of D rows asks): no cut, so no tie to split
        return torch.sort(values, dim=-1, stable=True).indices[..., :k]
    lowest, index = values.topk(k + 1, dim=-1, largest=False, sorted=True)
    index, kth = index[..., :k], lowest[..., k - 1]
    # Where the k-th and (k+1)-th values are equal the cut splits a tie, and topk's pick among equal
    # values is unspecified: redo those (rare) rows by rule.
    split_tie = lowest[..., k] == kth
    if split_tie.any():
        rows, cut = values[split_tie], kth[split_tie][:, None]
        below, at = rows < cut, rows == cut
        room = k - below.sum(dim=-1, keepdim=True)
        take = below | (at & (at.cumsum(dim=-1) <= room))
        index[split_tie] = take.nonzero()[:, 1].view(-1, k)
    if ordered:
        # Index order first, then a stable sort by value: equal values stay in index order.
        index = index.sort(dim=-1).values
        index = index.gather(-1, torch.sort(values.gather(-1, index), dim=-1, stable=True).indices)
    return index


def _rank(counts: torch.Tensor, sums: torch.Tensor) -> torch.Tensor:
    """Indices by count (high first), then score sum (low first), then index (low first)."""
    order = torch.arange(len(counts))
    order = order[torch.sort(sums[order], stable=True).indices]
    return order[torch.sort(counts[order], descending=True, stable=True).indices]


def _chunks(scores) -> Iterator[torch.Tensor]:
    if isinstance(scores, torch.Tensor):
        yield scores
        return
    if isinstance(scores, (str, Path)):
        raise LokiError("select_positions takes tensors; use load_score_chunks(path) to read a scores file.")
    yield from scores


# --------------------------------------------------------------------------------------------------
# Files: what `python -m loki.select --scores PATH` accepts.


def load_score_chunks(path: str | Path) -> Iterator[torch.Tensor]:
    """Score chunks from PATH: a .pt file holding a tensor [N, L, D] or a dict with key "scores",
    a .npy array [N, L, D] (memory-mapped), or a directory of such files (read in name order)."""
    path = Path(path)
    if not path.exists():
        raise LokiError(f"scores path {path} does not exist.")
    if (path / "meta.json").is_file():  # an attribution store (attribute.py's output)
        from loki.store import ScoreStore

        yield from ScoreStore(path).iter_chunks()
        return
    files = sorted(p for p in path.iterdir() if p.suffix in (".pt", ".npy")) if path.is_dir() else [path]
    if not files:
        raise LokiError(f"scores directory {path} holds no .pt or .npy files.")
    for file in files:
        yield from _load_file(file)


def _load_file(file: Path) -> Iterator[torch.Tensor]:
    if file.suffix == ".npy":
        import numpy as np

        array = np.load(file, mmap_mode="r")
        for start in range(0, len(array), _SAMPLES_PER_STEP):
            yield torch.from_numpy(np.ascontiguousarray(array[start : start + _SAMPLES_PER_STEP]))
        return
    try:
        data = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as err:  # corrupt or not a torch file
        raise LokiError(f"scores file {file} cannot be read as a torch file ({err}).") from None
    if isinstance(data, dict):
        if "scores" not in data:
            raise LokiError(f"scores file {file} holds a dict without a 'scores' entry.")
        data = data["scores"]
    if not isinstance(data, torch.Tensor):
        raise LokiError(f"scores file {file} holds a {type(data).__name__}, not a [samples, layers, hidden] tensor.")
    yield data


def compare_positions(a: Positions, b: Positions) -> list[dict]:
    """Per layer: rows in both, rows in each, and the overlap as a fraction of A's rows."""
    if len(a) != len(b):
        raise LokiError(f"the two positions files have {len(a)} and {len(b)} layers; they are for different models.")
    rows = []
    for layer, (rows_a, rows_b) in enumerate(zip(a, b)):
        both = len(set(rows_a) & set(rows_b))
        rows.append({"layer": layer, "both": both, "a": len(rows_a), "b": len(rows_b), "overlap": both / len(rows_a) if rows_a else float("nan")})
    return rows


def format_comparison(rows: list[dict], name_a: str, name_b: str) -> str:
    lines = [f"A = {name_a}", f"B = {name_b}", "| layer | rows in A | rows in B | in both | overlap (of A) |", "|---:|---:|---:|---:|---:|"]
    lines += [f"| {r['layer']} | {r['a']} | {r['b']} | {r['both']} | {r['overlap']:.1%} |" for r in rows]
    total_a, total_both = sum(r["a"] for r in rows), sum(r["both"] for r in rows)
    lines.append(f"| all | {total_a} | {sum(r['b'] for r in rows)} | {total_both} | {total_both / max(1, total_a):.1%} |")
    return "\n".join(lines)


# argparse, not Hydra: a file-to-file tool over a score store and positions files that composes no model,
# task or trainer config, so there is nothing for Hydra's config groups to do.
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m loki.select",
        description="KVA scores -> positions JSON (--scores/--q/--out), or the per-layer overlap of two positions files (--compare).",
    )
    parser.add_argument("--scores", help="an attribution store directory, a .pt / .npy file [N, L, D], or a directory of them")
    parser.add_argument("--q", type=float, help="fraction of rows per layer, e.g. 0.05")
    parser.add_argument("--strategy", default="layer_balanced", choices=SCORE_STRATEGIES)  # smallest_norm needs the model: train.py
    parser.add_argument("--score", default="signed", choices=SCORE_MODES)
    parser.add_argument("--seed", type=int, default=0, help="for --strategy random")
    parser.add_argument("--out", help="positions JSON to write")
    parser.add_argument("--compare", nargs=2, metavar=("A.json", "B.json"), help="print each layer's overlap of two positions files")
    args = parser.parse_args(argv)
    try:
        if args.compare:
            from loki.positions import load_positions

            a, b = (load_positions(p) for p in args.compare)
            print(format_comparison(compare_positions(a, b), *args.compare))
            return 0
        if not (args.scores and args.q is not None and args.out):
            parser.error("selection needs --scores, --q and --out (or use --compare A.json B.json)")
        positions = select_positions(load_score_chunks(args.scores), args.q, strategy=args.strategy, seed=args.seed, score=args.score)
        path = save_positions(positions, args.out)
    except LokiError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"wrote {sum(map(len, positions))} rows over {len(positions)} layers to {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
