"""Fine-tune a causal LM with LoKI: select rows (analysing first if needed), implant, evaluate, export.

    python train.py                                           # the offline toy default
    python train.py model=qwen0.5b task=reranker loki.q=0.05  # the paper's reranker setting
    python train.py loki=off                                  # full fine-tuning baseline
    python train.py loki=off lora=r16                         # peft LoRA baseline
"""

from __future__ import annotations

import sys

import hydra
from omegaconf import DictConfig

from loki import recipe
from loki.errors import LokiError


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def main(cfg: DictConfig) -> None:
    try:
        recipe.run(cfg)
    except LokiError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
