"""The Lightning glue, in one place: the implant callback, the fine-tuning module, the attribution loop.

- `LokiCallback` (callback.py): installs the implant in `setup`, merges it when fit ends;
- `CausalLMModule` (module.py): supervised fine-tuning with the model's own causal-LM loss;
- `KVAModule`, `ScoreWriter`, `run_attribution` (kva.py): the attribution predict loop and its store writer;
- `SamplesProgressBar` (progress.py): the attribution progress bar, on public Callback hooks only.
"""

from loki.lightning.callback import LokiCallback
from loki.lightning.attribution import KVAModule, ScoreWriter, run_attribution
from loki.lightning.module import CausalLMModule, warmup_decay_lambda
from loki.lightning.progress import SamplesProgressBar

__all__ = ["CausalLMModule", "KVAModule", "LokiCallback", "SamplesProgressBar", "ScoreWriter", "run_attribution", "warmup_decay_lambda"]
