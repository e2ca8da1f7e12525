"""LoKI (Low-damage Knowledge Implanting) on PyTorch Lightning and Hydra."""

from loki.errors import LokiError

__all__ = ["LokiError"]
__version__ = "0.1.0"
