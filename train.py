"""Fine-tune a causal LM with LoKI: select rows (analysing first if needed), implant, evaluate, export.

    python train.py                                           # the offline toy default
    python train.py model=qwen0.5b task=reranker loki.q=0.05  # the paper's reranker setting
    python train.py loki=off                                  # full fine-tuning baseline
    python train.py loki=off lora=r16                         # peft LoRA baseline
"""

from __future__ import annotations

import logging
import sys
import time

import hydra
import lightning.pytorch as pl
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from loki.errors import LokiError
from loki import recipe
from loki.recipe import method_label

log = logging.getLogger("loki.train")
OmegaConf.register_new_resolver("method", method_label, replace=True)


def run(cfg: DictConfig) -> dict:
    started = time.time()
    pl.seed_everything(cfg.seed, workers=True)
    setup = recipe.setup(cfg)  # model, tokenizer, positions, datamodule, callbacks: all checks before training
    retention_before = recipe.evaluate_retention(cfg, setup, stage="before")
    module = recipe.build_module(cfg, setup)
    trainer = instantiate(cfg.trainer, callbacks=setup.callbacks, logger=setup.logger, default_root_dir=setup.run_dir)
    trainer.fit(module, datamodule=setup.datamodule, ckpt_path=cfg.ckpt_path)
    if not trainer.is_global_zero:
        return {}
    model = recipe.plain_model(module, setup)  # LoKI/LoRA merged: an ordinary HF model from here on
    metrics = recipe.finish(cfg, setup, model, retention_before, trainer, started)
    return metrics


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def main(cfg: DictConfig) -> None:
    try:
        run(cfg)
    except LokiError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
