"""Analyse a base model with KVA: score MMLU prompts into the store train.py reads (`loki.scores=auto`).

    python attribute.py model=tiny data.path=tests/fixtures/mmlu/test.jsonl   # offline smoke run
    python attribute.py model=qwen0.5b                                       # the paper's setting
    python attribute.py model=qwen0.5b trainer.devices=2 trainer.strategy=ddp # one share per GPU

An interrupted run resumes when started again with the same settings (finished samples are skipped).
"""

from __future__ import annotations

import sys

import hydra
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

import loki.toy  # noqa: F401  registers the ${toy:...} resolver that the toy model config uses
from loki.errors import LokiError


def run(cfg: DictConfig) -> None:
    from loki.attribution import HEATMAP_FILE, check_kva_settings, run_attribution
    from loki.data.chat import resolve_path
    from loki.data.mmlu import load_mmlu
    from loki.models import load_model_and_tokenizer

    kva = _plain(cfg.kva)
    data = _plain(cfg.data)
    check_kva_settings(kva)
    if data["path"]:  # recorded absolute in meta.json: the working directory, else the repo root
        data["path"] = str(resolve_path(data["path"]).resolve())
    # Data before the model: a missing dataset fails in seconds, not after a multi-GB download.
    rows = load_mmlu(
        **{k: data[k] for k in ("source", "path", "split", "subjects", "per_subject", "max_samples", "seed")}
    )
    model, tokenizer = load_model_and_tokenizer(cfg.model)
    logger = instantiate(cfg.logger) if cfg.get("logger") and cfg.logger.get("_target_") else None
    store = run_attribution(
        model,
        tokenizer,
        rows,
        out_dir=cfg.out_dir,
        model_name=cfg.model.name,
        kva=kva,
        data=data,
        batch_size=cfg.batch_size,
        trainer_kwargs=_plain(cfg.trainer),
        logger=logger,
        heatmap_q=cfg.heatmap.q,
        progress=cfg.progress,
    )
    if store is not None:  # rank 0
        L, D = store.shape
        print(f"KVA scores of {store.num_samples} samples ([{L} layers x {D} rows] each) in {store.dir}")
        if cfg.heatmap.q:
            print(f"heatmap: {store.dir / HEATMAP_FILE}")


def _plain(node) -> dict:
    """A resolved plain dict of a config node (recorded in meta.json, passed as kwargs)."""
    return OmegaConf.to_container(node, resolve=True)


@hydra.main(version_base="1.3", config_path="conf", config_name="attribute")
def main(cfg: DictConfig) -> None:
    try:
        run(cfg)
    except LokiError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
