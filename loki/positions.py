"""The positions format the LoKI authors published: a JSON list with one list of row indices per layer.

Row `j` of layer `l` is row `j` of that layer's `down_proj.weight` (shape [hidden, intermediate]), so
indices live in [0, hidden_size). Per layer, layer-balanced selection keeps k = floor(q * hidden_size).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from pathlib import Path

from loki.errors import LokiError

Positions = list[list[int]]


def rows_per_layer(q: float, hidden_size: int) -> int:
    """k = floor(q * D), the per-layer quota of trainable rows; rejects q outside (0, 1)."""
    check_q(q)
    # Round before flooring so that 0.1 * 4096 = 409.6000000000000 is not taken as 409.59999.
    return int(math.floor(round(q * hidden_size, 9)))


def check_q(q: float) -> float:
    if not isinstance(q, (int, float)) or isinstance(q, bool) or not (0.0 < float(q) < 1.0):
        raise LokiError(f"loki.q must be a fraction strictly between 0 and 1 (0.05 means 5 %), got {q!r}.")
    return float(q)


def load_positions(source: str | os.PathLike | Sequence[Sequence[int]]) -> Positions:
    """Positions from a JSON file path or an in-memory list of lists (checked for shape, not the model)."""
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:
            raise LokiError(f"positions file {path} does not exist.") from None
        except (OSError, UnicodeDecodeError) as err:
            raise LokiError(f"positions file {path} cannot be read ({err}).") from None
        except json.JSONDecodeError as err:
            raise LokiError(f"positions file {path} is not valid JSON ({err.msg} at line {err.lineno}).") from None
        where = str(path)
    else:
        data, where = source, "positions"
    if not isinstance(data, list) or not all(isinstance(layer, (list, tuple)) for layer in data):
        raise LokiError(f"{where} must be a JSON list with one list of row indices per layer.")
    out: Positions = []
    for l, layer in enumerate(data):
        if not all(isinstance(i, int) and not isinstance(i, bool) for i in layer):
            raise LokiError(f"{where}: layer {l} holds something other than integer row indices.")
        out.append([int(i) for i in layer])
    return out


def validate_positions(positions: Positions, num_layers: int, hidden_size: int, where: str = "positions") -> Positions:
    """Check positions against a model's shape: one list per layer, unique indices in [0, hidden_size)."""
    if len(positions) != num_layers:
        raise LokiError(
            f"{where} has {len(positions)} layers but the model has {num_layers}; it was made for another model."
        )
    for l, layer in enumerate(positions):
        if len(layer) > hidden_size:
            raise LokiError(f"{where}: layer {l} lists {len(layer)} rows but the model has only {hidden_size}.")
        bad = [i for i in layer if not 0 <= i < hidden_size]
        if bad:
            raise LokiError(
                f"{where}: layer {l} has row index {bad[0]} outside [0, {hidden_size}); it was made for another model."
            )
        if len(set(layer)) != len(layer):
            dup = next(i for i in layer if layer.count(i) > 1)
            raise LokiError(f"{where}: layer {l} lists row {dup} more than once.")
    if sum(len(layer) for layer in positions) == 0:
        raise LokiError(f"{where} selects no rows at all, so nothing would train.")
    return positions


def save_positions(positions: Positions, path: str | os.PathLike) -> Path:
    """Write positions in the published format (plain JSON list of lists of ints)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps([[int(i) for i in layer] for layer in positions]))
    return path
