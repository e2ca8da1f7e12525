"""LoKI (Low-damage Knowledge Implanting) on PyTorch Lightning and Hydra.

The public names load lazily (PEP 562), so `import loki.kva` (plain torch) pulls in no Lightning:
    from loki import LokiCallback, KVAModule, attribute, select_positions, load_positions
"""

from __future__ import annotations

import importlib

from loki.errors import LokiError

# public name -> module that defines it
_LAZY = {
    "LokiCallback": "loki.lightning.callback",
    "KVAModule": "loki.lightning.attribution",
    "CausalLMModule": "loki.lightning.module",
    "run_attribution": "loki.lightning.attribution",
    "attribute": "loki.kva",
    "select_positions": "loki.select",
    "load_positions": "loki.positions",
    "validate_positions": "loki.positions",
    "install": "loki.implant",
    "merge": "loki.implant",
    "export_model": "loki.implant",
}

__all__ = ["LokiError", *_LAZY]
__version__ = "0.1.0"


def __getattr__(name: str):
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value  # later look-ups skip this function
        return value
    raise AttributeError(f"module 'loki' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
