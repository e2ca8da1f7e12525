"""The fine-tuning recipe train.py runs: setup (every check before any training), train, finish.

Kept out of the entry point so each step can be tested and reused (the study calls it too). Nothing here
reads the working directory: every output goes under the run dir that Hydra made.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from torch import nn

import loki.toy  # noqa: F401  registers the ${toy:...} resolver that toy configs use
from loki import arch
from loki.errors import LokiError
from loki.models import load_model_and_tokenizer
from loki.config import check_train_config
from loki.device import is_rank_zero
from loki.lightning.module import CausalLMModule
from loki.store import safe_name
from loki.positions import Positions, check_q, load_positions, rows_per_layer, save_positions, validate_positions

log = logging.getLogger(__name__)

PUBLISHED_DIR = Path(__file__).parent / "published"


def method_label(loki_enabled: bool, lora_rank: int, q: float | None, strategy: str | None) -> str:
    """Short label of what trains: full, lora-r16, loki-q0.1, loki-q0.1-global_lowest+lora-r16 ..."""
    if not loki_enabled:
        return f"lora-r{int(lora_rank)}" if lora_rank else "full"
    label = f"loki-q{q:g}" if q is not None else "loki-positions"  # a positions file may come without q
    if strategy and strategy != "layer_balanced":
        label += f"-{strategy}"
    return label + (f"+lora-r{int(lora_rank)}" if lora_rank else "")


def published_positions_path(model_name: str, q: float) -> Path:
    """The authors' file for this model and q, if they published one (q in 5/10/20/30 %)."""
    percent = round(q * 100, 6)
    folder = PUBLISHED_DIR / model_name
    path = folder / f"{percent:g}.json"
    if not path.exists():
        available = sorted(p.stem for p in folder.glob("*.json")) if folder.exists() else []
        have = sorted(p.name for p in PUBLISHED_DIR.iterdir() if p.is_dir())
        raise LokiError(
            f"no published positions for model '{model_name}' at q={q:g} "
            + (f"(published q in %: {', '.join(available)})" if available else f"(published for: {', '.join(have)})")
            + "; run the attribution stage and use loki.scores instead."
        )
    return path


def resolve_positions(cfg: DictConfig, model: nn.Module, tokenizer: Any) -> tuple[Positions, str]:
    """Positions to implant into, from a file, the published set, or attribution scores (selected here).

    Returns the validated positions and a one-line description of where they came from. With
    `loki.scores=auto`, the store of this model and the composed kva/data settings is used, analysed
    first if it does not exist yet (`loki.analyse_if_missing`); a store whose model or prompts differ
    from this run's is refused, never reused.
    """
    loki_cfg = cfg.loki
    d = arch.dims(model)
    q = loki_cfg.get("q")
    source = loki_cfg.get("positions")
    if source:
        path = published_positions_path(cfg.model.name, check_q(q)) if source == "published" else Path(source)
        positions = validate_positions(load_positions(path), d.num_layers, d.hidden_size, where=str(path))
        if q is not None and loki_cfg.get("strategy") == "layer_balanced":
            k = rows_per_layer(q, d.hidden_size)
            if any(len(layer) != k for layer in positions):
                raise LokiError(
                    f"{path} has {len(positions[0])} rows in layer 0 but loki.q={q:g} asks for k=floor(q*D)={k}; "
                    "set loki.q to match the file."
                )
        return positions, f"positions file {path}"
    check_q(q)
    from loki import analysis
    from loki.attribution import prompt_format
    from loki.select import select_positions
    from loki.store import ScoreStore, check_meta, store_meta

    if loki_cfg.get("scores", "auto") == "auto":
        store_dir = analysis.default_store(cfg)
        if not ScoreStore.exists(store_dir):
            if not loki_cfg.analyse_if_missing:
                raise LokiError(
                    f"no attribution scores for model '{cfg.model.name}' with these kva/data settings at {store_dir}; "
                    "run `python attribute.py` with the same model, kva and data settings first, or pass "
                    "loki.positions=PATH (or loki.positions=published)."
                )
            log.info("No attribution scores for %s with these settings yet: analysing first (once per base model and settings).", cfg.model.name)
            accelerator = cfg.trainer.get("accelerator", "auto")
            analysis.run(cfg, model, tokenizer, trainer_kwargs={"accelerator": accelerator, "devices": 1})
        store = ScoreStore(store_dir)
        kva, data = analysis.settings(cfg)
        wanted = store_meta(model, tokenizer, cfg.model.name, kva, data, prompt_format(data.get("prompt") or "letter"))
        check_meta(store_dir, store.meta, wanted)  # same settings by construction: this checks model and prompts
    else:
        # A store named by path may hold another prompt sample (the user chose it), but never another
        # model or other KVA settings: those change what the scores mean.
        store_dir = Path(loki_cfg.scores).expanduser()
        store = ScoreStore(store_dir)
        kva, data = analysis.settings(cfg)
        wanted = store_meta(model, tokenizer, cfg.model.name, kva, data, prompt_format(data.get("prompt") or "letter"))
        check_meta(store_dir, {k: store.meta.get(k) for k in ("model", "shape", "kva")}, {k: wanted[k] for k in ("model", "shape", "kva")})
    if tuple(store.shape) != (d.num_layers, d.hidden_size):
        raise LokiError(
            f"attribution scores in {store_dir} have shape (layers, rows) = {tuple(store.shape)} but the model has "
            f"{(d.num_layers, d.hidden_size)}; they were made for another model."
        )
    positions = select_positions(
        store.iter_chunks(),
        q,
        strategy=loki_cfg.get("strategy", "layer_balanced"),
        seed=int(loki_cfg.get("seed", 0)),
        score=loki_cfg.get("score", "signed"),
    )
    positions = validate_positions(positions, d.num_layers, d.hidden_size)
    return positions, f"{loki_cfg.get('strategy')} selection (score={loki_cfg.get('score')}) from {store.num_samples} samples in {store_dir}"


def write_json(path: str | Path, data: Any) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2, sort_keys=True, default=float))
    return path


# ----------------------------------------------------------------------------------------------- setup

OmegaConf.register_new_resolver("method", method_label, replace=True)  # ${method:...} in train.yaml


def run(cfg: DictConfig) -> dict:
    """setup (every check) -> retention before -> fit -> merge -> task + retention after -> export."""
    started = time.time()
    pl.seed_everything(cfg.seed, workers=True)
    built = setup(cfg)
    retention_before = evaluate_retention(cfg, built, stage="before")
    module = build_module(cfg, built)
    trainer = instantiate(cfg.trainer, callbacks=built.callbacks, logger=built.logger, default_root_dir=built.run_dir)
    trainer.fit(module, datamodule=built.datamodule, ckpt_path=cfg.get("ckpt_path"))
    if not trainer.is_global_zero:
        return {}
    model = plain_model(module, built)
    return finish(cfg, built, model, retention_before, trainer, started)


@dataclass
class Setup:
    """Everything a run builds before `fit`, after every input check has passed."""

    run_dir: Path
    model: nn.Module
    tokenizer: Any
    method: str
    datamodule: Any
    callbacks: list
    logger: Any
    positions: Positions | None = None
    positions_source: str = ""
    loki_callback: Any = None
    peft_lora: bool = False
    notes: dict = field(default_factory=dict)


def _lora_alpha(cfg: DictConfig) -> float | None:
    # One default for both LoRA flavours, so LoKI+LoRA and the peft baseline are compared at equal scaling.
    if int(cfg.lora.rank) == 0:
        return None
    return float(cfg.lora.alpha) if cfg.lora.alpha is not None else 2.0 * int(cfg.lora.rank)


def setup(cfg: DictConfig) -> Setup:
    check_train_config(cfg)  # every user-facing value, before any data or model is loaded
    run_dir = Path(cfg.paths.output_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    model, tokenizer = load_model_and_tokenizer(cfg.model)
    arch.dims(model)  # an unsupported architecture stops here, with the list of supported ones
    method = method_label(cfg.loki.enabled, cfg.lora.rank, cfg.loki.q, cfg.loki.strategy)
    callbacks = [instantiate(c) for c in (cfg.get("callbacks") or {}).values() if c is not None and c.get("_target_")]
    logger = instantiate(cfg.logger) if cfg.get("logger") and cfg.logger.get("_target_") else None
    if logger is None:  # LearningRateMonitor refuses to run without a logger
        callbacks = [c for c in callbacks if not isinstance(c, pl.callbacks.LearningRateMonitor)]
    out = Setup(run_dir=run_dir, model=model, tokenizer=tokenizer, method=method, datamodule=None, callbacks=callbacks, logger=logger)

    if cfg.loki.enabled:
        from loki.implant import check_positions
        from loki.lightning import LokiCallback

        out.positions, out.positions_source = resolve_positions(cfg, model, tokenizer)
        out.loki_callback = LokiCallback(
            out.positions,
            impl=cfg.loki.impl,
            lora_rank=int(cfg.lora.rank),
            lora_alpha=_lora_alpha(cfg),
            lora_dropout=float(cfg.lora.dropout),
        )
        check_positions(model, out.positions, int(cfg.lora.rank))  # lora.rank > k fails now, before data loading
        out.callbacks.insert(0, out.loki_callback)
    elif int(cfg.lora.rank) > 0:
        from peft import LoraConfig, get_peft_model

        lora = LoraConfig(
            r=int(cfg.lora.rank),
            lora_alpha=_lora_alpha(cfg),
            lora_dropout=float(cfg.lora.dropout),
            target_modules=cfg.lora.target_modules,
            task_type="CAUSAL_LM",
        )
        out.model = get_peft_model(model, lora)
        out.peft_lora = True

    out.datamodule = instantiate(cfg.task.data, tokenizer=tokenizer, seed=cfg.seed)
    if cfg.evaluate.validation_task_metric and cfg.task.get("eval") and is_rank_zero():
        from loki.eval import TaskMetricCallback

        out.callbacks.append(TaskMetricCallback(cfg.task.eval))
    return out


def build_module(cfg: DictConfig, setup: Setup) -> CausalLMModule:
    if setup.loki_callback is None:  # counted now: merging peft LoRA at the end forgets what trained
        setup.notes["trainable"] = _trainable_summary(setup.model)
    optimizer = instantiate(cfg.optimizer)
    return CausalLMModule(setup.model, optimizer=optimizer, lr_schedule=OmegaConf.to_container(cfg.lr_schedule))


# -------------------------------------------------------------------------------------------- evaluate


def _retention_cache_path(cfg: DictConfig) -> Path:
    # The base model's retention depends only on the model and the retention settings: measure it once.
    key = json.dumps(
        {"model": OmegaConf.to_container(cfg.model, resolve=True), "eval": OmegaConf.to_container(cfg.eval, resolve=True)},
        sort_keys=True,
    )
    digest = hashlib.sha256(key.encode()).hexdigest()[:16]
    return Path(cfg.paths.cache_dir) / "retention" / f"{safe_name(cfg.model.name)}-{digest}.json"


def evaluate_retention(cfg: DictConfig, setup: Setup, stage: str) -> dict | None:
    """Retention "before" (cached per model and settings, with the base model's next-token
    distributions for the KL measures beside it) or "after" (compared with those distributions)."""
    if not cfg.evaluate.retention or not is_rank_zero():
        return None
    from loki.eval import reference_ready, run_retention

    cached = _retention_cache_path(cfg)
    reference = cached.with_suffix("")  # <cache>/retention/<model>-<digest>/: the base model's distributions
    if stage == "before":
        if cached.exists() and reference_ready(cfg.eval, reference):
            return json.loads(cached.read_text())
        result = run_retention(setup.model, setup.tokenizer, cfg.eval, reference_dir=reference, stage="before")
        write_json(cached, result)
        return result
    return run_retention(setup.model, setup.tokenizer, cfg.eval, reference_dir=reference, stage="after")


def plain_model(module: CausalLMModule, setup: Setup) -> nn.Module:
    """The trained model as an ordinary HF model (LokiCallback already merged at fit end; peft merges here)."""
    model = module.model
    if setup.peft_lora:
        model = model.merge_and_unload()
    setup.model = model
    return model


def finish(cfg: DictConfig, setup: Setup, model: nn.Module, retention_before: dict | None, trainer: Any, started: float) -> dict:
    """Evaluate the trained model, export it, write metrics.json and print the summary table."""
    from loki.eval import forgetting_report, format_report, run_task_eval

    model.eval()
    metrics: dict[str, Any] = {
        "model": cfg.model.name,
        "task": cfg.task.name,
        "method": setup.method,
        "q": cfg.loki.q if cfg.loki.enabled else None,
        "positions_source": setup.positions_source,
        "trainable": setup.loki_callback.summary() if setup.loki_callback else setup.notes["trainable"],
        "steps": int(trainer.global_step),
    }
    if cfg.evaluate.task and cfg.task.get("eval"):
        metrics["task_metrics"] = run_task_eval(model, setup.tokenizer, cfg.task.eval)
    if retention_before is not None:
        retention_after = evaluate_retention(cfg, setup, stage="after")
        metrics["retention"] = {"before": retention_before, "after": retention_after}
        metrics["forgetting"] = forgetting_report(retention_before, retention_after)
    if cfg.export:
        from loki.implant import export_model

        export_model(model, setup.tokenizer, setup.run_dir / "model")
        metrics["export_dir"] = str(setup.run_dir / "model")
    if setup.positions is not None:
        save_positions(setup.positions, setup.run_dir / "positions.json")
    metrics["data"] = getattr(setup.datamodule, "stats", {})  # rows kept, skipped (and why), truncated
    metrics["seconds"] = round(time.time() - started, 1)
    write_json(setup.run_dir / "metrics.json", metrics)
    if trainer.logger is not None:
        flat = {f"final/{k}": v for k, v in _flatten(metrics).items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        trainer.logger.log_metrics(flat, step=trainer.global_step)
        trainer.logger.finalize("success")
    print(format_report(metrics))
    print(f"run dir: {setup.run_dir}")
    return metrics


def _trainable_summary(model: nn.Module) -> dict:
    """Parameter counts for the baselines (LokiCallback reports its own, allocated vs effective)."""
    total = sum(p.numel() for p in model.parameters())
    trained = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return {"total": total, "trainable_allocated": trained, "trainable_effective": trained}


def _flatten(d: dict, prefix: str = "") -> dict:
    out: dict = {}
    for key, value in d.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(_flatten(value, name + "/"))
        else:
            out[name] = value
    return out
