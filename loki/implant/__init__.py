"""Implanting: train only the selected rows of every layer's `down_proj.weight`; keep the rest bit-identical.

One method, one place, in three parts (like PEFT's tuner folders):
- `layer.py`: `LokiDownProj`, the trainable `[k, F]` rows or LoRA on them, and `row_mask`;
- `guard.py`: the gradient row mask and the optimizer guard that keeps weight decay off frozen rows;
- `model.py`: `install`, `attach_optimizer`, `merge`, `export_model` and the checks;
- `pull.py`: `RowPull`, an L2 pull of the trained rows towards the base (L2-SP), optionally |KVA|-weighted;
- `adapter.py`: small exports (only the trained rows) and `load_adapter`, which applies one to its base.

Plain torch: importing this package loads no Lightning, Hydra or OmegaConf. The Lightning callback is
`loki.lightning.LokiCallback`. The method is described in docs/method.md.
"""

from loki.implant.adapter import EXPORT_FORMATS, base_digest, export_format, load_adapter, merge_adapter, save_adapter, save_peft_adapter
from loki.implant.guard import RowGuard, mask_gradient
from loki.implant.layer import LokiDownProj, master_dtype, row_mask
from loki.implant.model import (
    IMPLS,
    LokiHandle,
    attach_optimizer,
    attach_row_scales,
    check_optimizer_holds,
    check_options,
    check_precision,
    check_positions,
    export_model,
    install,
    merge,
    positions_digest,
    soft_scales,
)
from loki.implant.pull import L2SP_ROWS, RowPull, kva_row_weights

__all__ = [
    "EXPORT_FORMATS",
    "IMPLS",
    "L2SP_ROWS",
    "LokiDownProj",
    "LokiHandle",
    "RowGuard",
    "RowPull",
    "attach_optimizer",
    "attach_row_scales",
    "base_digest",
    "check_optimizer_holds",
    "check_options",
    "check_precision",
    "check_positions",
    "export_format",
    "export_model",
    "install",
    "kva_row_weights",
    "load_adapter",
    "mask_gradient",
    "master_dtype",
    "merge",
    "merge_adapter",
    "positions_digest",
    "row_mask",
    "save_adapter",
    "save_peft_adapter",
    "soft_scales",
]
