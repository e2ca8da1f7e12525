"""Analyse a base model with KVA: score MMLU prompts into the store train.py reads (`loki.scores=auto`).

    python attribute.py model=tiny                                              # offline smoke run
    python attribute.py model=qwen0.5b                                          # the paper's setting
    python attribute.py model=qwen0.5b kva.recipe=published                     # as the authors' positions were made
    python attribute.py model=qwen0.5b trainer.devices=2 trainer.strategy=ddp   # one share per GPU

An interrupted run resumes when started again with the same settings (finished samples are skipped).
"""

from __future__ import annotations

import sys

import hydra
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

import loki.toy  # noqa: F401  registers the ${toy:...} resolver that the toy model config uses
from loki import attribution
from loki.config import check_attribute_config
from loki.errors import LokiError
from loki.store import HEATMAP_FILE


def run(cfg: DictConfig) -> None:
    check_attribute_config(cfg)  # every user-facing value, before data or model loading
    out_dir = None if cfg.out_dir == "auto" else cfg.out_dir
    logger = instantiate(cfg.logger) if cfg.get("logger") and cfg.logger.get("_target_") else None
    store = attribution.run(cfg, out_dir=out_dir, trainer_kwargs=OmegaConf.to_container(cfg.trainer, resolve=True), logger=logger, progress=cfg.progress)
    if store is not None:  # rank 0
        L, D = store.shape
        print(f"KVA scores of {store.num_samples} samples ([{L} layers x {D} rows] each) in {store.dir}")
        if cfg.kva.heatmap_q:
            print(f"heatmap: {store.dir / HEATMAP_FILE}")


@hydra.main(version_base="1.3", config_path="conf", config_name="attribute")
def main(cfg: DictConfig) -> None:
    try:
        run(cfg)
    except LokiError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
