"""The Analyse stage as a recipe, shared by `attribute.py` and `train.py` (which analyses when
`loki.scores=auto` finds no store): composed `kva` and `data` settings -> MMLU rows -> KVA -> the store.

Both entry points compose the same config groups (conf/kva/, conf/data/), and the store's directory
comes from one function of those settings (`loki.store.store_dir`), so they always agree on where a
store is and never reuse one made with other settings.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from loki.store import ScoreStore, store_dir

# load_mmlu's arguments among the data settings
MMLU_ARGS = ("source", "path", "split", "subjects", "offset", "per_subject", "max_samples", "seed")


def settings(cfg: DictConfig) -> tuple[dict, dict]:
    """The resolved `kva` and `data` settings as plain dicts; a local data path made absolute (it is
    recorded in the store's meta, and the working directory must not matter)."""
    from loki.attribution import check_kva_settings
    from loki.data.chat import resolve_path

    kva = check_kva_settings(OmegaConf.to_container(cfg.kva, resolve=True))  # the recipe's defaults filled in
    data = OmegaConf.to_container(cfg.data, resolve=True)
    if data.get("path"):
        data["path"] = str(resolve_path(data["path"]).resolve())
    return kva, data


def default_store(cfg: DictConfig) -> Path:
    """Where the store of this model and these settings lives (`loki.scores=auto`, `out_dir=auto`)."""
    kva, data = settings(cfg)
    return store_dir(cfg.paths.cache_dir, cfg.model.name, kva, data)


def load_rows(data: dict) -> list[dict]:
    from loki.data.mmlu import load_mmlu

    return load_mmlu(**{key: data[key] for key in MMLU_ARGS if key in data})


def run(
    cfg: DictConfig,
    model: Any = None,
    tokenizer: Any = None,
    out_dir: str | Path | None = None,
    trainer_kwargs: dict | None = None,
    logger: Any = None,
    progress: bool = True,
) -> ScoreStore | None:
    """Analyse `cfg.model` (or the given, already loaded model) into its store; the store on rank 0."""
    from loki.lightning.kva import run_attribution
    from loki.models import attention_for_attribution

    kva, data = settings(cfg)
    # Data before the model: a missing dataset fails in seconds, not after a multi-GB download.
    rows = load_rows(data)
    if model is None:
        from loki.models import load_model_and_tokenizer

        model, tokenizer = load_model_and_tokenizer(cfg.model)
    # The target-scope path passes its own attention mask, which flash attention cannot take: sdpa while
    # analysing, the configured attention afterwards.
    with attention_for_attribution(model, needs_mask=kva["scope"] == "target"):
        return run_attribution(
            model,
            tokenizer,
            rows,
            out_dir=out_dir or store_dir(cfg.paths.cache_dir, cfg.model.name, kva, data),
            model_name=cfg.model.name,
            kva=kva,
            data=data,
            batch_size=kva.get("batch_size", 8),
            trainer_kwargs=trainer_kwargs,
            logger=logger,
            heatmap_q=kva.get("heatmap_q"),
            progress=progress,
        )
