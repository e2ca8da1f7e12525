"""The fine-tuning recipe train.py runs: setup (every check before any training), train, finish.

Kept out of the entry point so each step can be tested and reused (the study calls it too). Nothing here
reads the working directory: every output goes under the run dir that Hydra made.
"""

from __future__ import annotations

import io
import json
import logging
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf, open_dict
import torch
from torch import nn

import loki.toy  # noqa: F401  registers the ${toy:...} resolver that toy configs use
from loki import arch
from loki.errors import LokiError
from loki.implant.adapter import export_format, save_adapter, save_peft_adapter
from loki.models import apply_memory_options, load_model_and_tokenizer
from loki.config import check_train_config
from loki.device import is_rank_zero
from loki.lightning.module import CausalLMModule
from loki.lightning.sharding import CompileForTraining, FullModelGather, release_process_group
from loki.peft_methods import uses_peft
from loki.files import settings_digest
from loki.shipped import published_positions_path  # noqa: F401  (also imported from here)
from loki.store import safe_name
from loki.tasks import Task
from loki.positions import Positions, check_q, load_positions, rows_per_layer, save_positions, validate_positions

log = logging.getLogger(__name__)


def method_label(
    loki_enabled: bool, lora_rank: int, q: float | None, strategy: str | None, variant: str = "lora", quota: str = "uniform", soft: bool = False,
    l2sp: float = 0.0, l2sp_rows: str = "kva",
) -> str:
    """Short label of what trains: full, lora-r16, dora-r16, osf, loki-q0.1, loki-q0.1-mass, loki-q0.1-soft, loki-q0.1-l2sp,
    loki-q0.1-global_lowest+lora-r16 ..."""
    if not loki_enabled:
        from loki.peft_methods import method_name, uses_peft

        variant = variant or "lora"
        return method_name(variant, lora_rank) if uses_peft(False, variant, lora_rank or 0) else "full"
    label = f"loki-q{q:g}" if q is not None else "loki-positions"  # a positions file may come without q
    if strategy and strategy != "layer_balanced":
        label += f"-{strategy}"
    if quota and quota != "uniform":
        label += f"-{quota}"
    if soft:
        label += "-soft"
    if l2sp and float(l2sp) > 0:
        label += "-l2sp" if l2sp_rows == "kva" else f"-l2sp_{l2sp_rows}"
    return label + (f"+lora-r{int(lora_rank)}" if lora_rank else "")


def resolve_positions(cfg: DictConfig, model: nn.Module, tokenizer: Any) -> tuple[Positions, str]:
    """Positions to implant into, from a file, the published set, or attribution scores (selected here).

    Returns the validated positions and a one-line description of where they came from. With
    `loki.scores=auto`, the store of this model and the composed kva/data settings is used, analysed
    first if it does not exist yet (`loki.analyse_if_missing`); a store whose model or prompts differ
    from this run's is refused, never reused.
    """
    loki_cfg = cfg.loki
    d = arch.dims(model)
    q = loki_cfg.q
    source = loki_cfg.positions
    adaptive = needs_scores(loki_cfg)  # a per-layer quota or |KVA| weights are made from the scores, so no file or shipped set
    if source:
        path = published_positions_path(cfg.model.name, check_q(q)) if source == "published" else Path(source)
        positions = validate_positions(load_positions(path), d.num_layers, d.hidden_size, where=str(path))
        if q is not None and loki_cfg.strategy == "layer_balanced":
            k = rows_per_layer(q, d.hidden_size)
            if any(len(layer) != k for layer in positions):
                raise LokiError(
                    f"{path} has {len(positions[0])} rows in layer 0 but loki.q={q:g} asks for k=floor(q*D)={k}; "
                    "set loki.q to match the file."
                )
        return positions, f"positions file {path}"
    check_q(q)
    strategy = loki_cfg.strategy
    from loki.select import NO_SCORE_STRATEGIES

    if strategy in NO_SCORE_STRATEGIES:  # the cheap controls read no score store: no attribution runs
        from loki.select import random_positions, smallest_norm_positions

        if strategy == "random":
            positions = random_positions(d.num_layers, d.hidden_size, q, seed=int(loki_cfg.seed))
            source = f"random selection (seed {int(loki_cfg.seed)}), no attribution"
        else:
            positions = smallest_norm_positions((proj.weight for proj in arch.down_projs(model)), q)
            source = "smallest_norm selection (down_proj row norms), no attribution"
        return validate_positions(positions, d.num_layers, d.hidden_size), source
    from loki import attribution
    from loki.attribution import prompt_format
    from loki.select import select_positions
    from loki.store import ScoreStore, check_meta, store_meta

    if loki_cfg.scores == "auto":
        store_dir = attribution.default_store(cfg)
        if not ScoreStore.exists(store_dir):
            shipped, why_not = None, "loki.use_shipped=false" if not adaptive else f"{adaptive} needs the scores"
            if loki_cfg.use_shipped and not adaptive:  # the same positions, when shipped for exactly this store and selection
                from loki.shipped import shipped_for

                kva, data = attribution.settings(cfg)
                wanted = store_meta(model, tokenizer, cfg.model.name, kva, data, prompt_format(data.get("prompt") or "letter"))
                shipped, why_not = shipped_for(cfg.model.name, q, wanted, loki_cfg.strategy, loki_cfg.score)
            if shipped is not None:
                positions = validate_positions(load_positions(shipped), d.num_layers, d.hidden_size, where=str(shipped))
                return positions, (
                    f"shipped positions {shipped} ({loki_cfg.strategy}, score={loki_cfg.score}; made from a store with these "
                    f"exact settings; no store at {store_dir}: loki.use_shipped=false analyses instead)"
                )
            log.info("No shipped positions to use (%s).", why_not)
            if not loki_cfg.analyse_if_missing:
                raise LokiError(
                    f"no attribution scores for model '{cfg.model.name}' with these kva/data settings at {store_dir}; "
                    "run `python attribute.py` with the same model, kva and data settings first, or pass "
                    "loki.positions=PATH (or loki.positions=published)."
                )
            log.info("No attribution scores for %s with these settings yet: analysing first (once per base model and settings).", cfg.model.name)
            accelerator = cfg.trainer.accelerator
            attribution.run(cfg, model, tokenizer, trainer_kwargs={"accelerator": accelerator, "devices": 1})
        store = ScoreStore(store_dir)
        kva, data = attribution.settings(cfg)
        wanted = store_meta(model, tokenizer, cfg.model.name, kva, data, prompt_format(data.get("prompt") or "letter"))
        check_meta(store_dir, store.meta, wanted)  # same settings by construction: this checks model and prompts
    else:
        # A store named by path may hold another prompt sample (the user chose it), but never another
        # model or other KVA settings: those change what the scores mean.
        store_dir = Path(loki_cfg.scores).expanduser()
        store = ScoreStore(store_dir)
        kva, data = attribution.settings(cfg)
        wanted = store_meta(model, tokenizer, cfg.model.name, kva, data, prompt_format(data.get("prompt") or "letter"))
        check_meta(store_dir, {k: store.meta.get(k) for k in ("model", "shape", "kva")}, {k: wanted[k] for k in ("model", "shape", "kva")})
    if tuple(store.shape) != (d.num_layers, d.hidden_size):
        raise LokiError(
            f"attribution scores in {store_dir} have shape (layers, rows) = {tuple(store.shape)} but the model has "
            f"{(d.num_layers, d.hidden_size)}; they were made for another model."
        )
    quota, quota_note = None, ""
    spread = str(loki_cfg.quota).removesuffix("_shuffled")  # the measure the quota is made from
    if spread == "mass":  # one pass for each layer's mean |score|, then the selection with per-layer k
        from loki.select import adaptive_quota, layer_mass

        mass = layer_mass(store.iter_chunks(), expected_shape=(d.num_layers, d.hidden_size))
        quota = adaptive_quota(mass, q, d.hidden_size, floor_ratio=float(loki_cfg.quota_floor))
        quota_note = f", per-layer quota by attribution mass {quota}"
    elif spread == "damage":  # each layer's KL when its k selected rows alone are zeroed (cached beside the store)
        from loki.select import adaptive_quota

        uniform = select_positions(store.iter_chunks(), q, strategy=loki_cfg.strategy, seed=int(loki_cfg.seed), score=loki_cfg.score)
        damage = suppression_damage(cfg, model, tokenizer, uniform, store_dir)
        floor_value = 1e-3 * float(damage.mean())  # a layer its zeroed rows do not move at all still gets a finite share
        quota = adaptive_quota(damage.clamp_min(floor_value), q, d.hidden_size, floor_ratio=float(loki_cfg.quota_floor))
        quota_note = f", per-layer quota by suppression damage {quota}"
    if quota is not None and str(loki_cfg.quota).endswith("_shuffled"):  # the control: the same counts, layers in random order
        from loki.select import shuffled_quota

        quota = shuffled_quota(quota, int(loki_cfg.seed))
        quota_note += f", shuffled over the layers (loki.seed={int(loki_cfg.seed)}): {quota}"
    positions = select_positions(
        store.iter_chunks(),
        q,
        strategy=loki_cfg.strategy,
        seed=int(loki_cfg.seed),
        score=loki_cfg.score,
        quota=quota,
    )
    positions = validate_positions(positions, d.num_layers, d.hidden_size)
    return positions, f"{loki_cfg.strategy} selection (score={loki_cfg.score}{quota_note}) from {store.num_samples} samples in {store_dir}"


def suppression_damage(cfg: DictConfig, model: nn.Module, tokenizer: Any, positions: Positions, store_dir: Path) -> torch.Tensor:
    """`loki.damage.layer_damage` of `positions` on `loki.damage_prompts` attribution prompts spread evenly,
    cached in `<store>/damage/` under the positions and the prompt count (the store fixes model and prompts).
    Made under a lock on the cache entry: processes that need the same entry at once (two shards of a
    frontier) wait for the first to write it instead of each measuring it."""
    from loki.damage import layer_damage
    from loki.files import exclusive_lock

    count = int(cfg.loki.damage_prompts)
    path = Path(store_dir) / "damage" / f"{settings_digest({'positions': [list(map(int, r)) for r in positions], 'prompts': count}, 16)}.json"
    with exclusive_lock(path.with_suffix(".lock")):
        if path.is_file():
            return torch.tensor(json.loads(path.read_text())["damage"], dtype=torch.float64)
        chosen, pad_id = attribution_prompt_ids(cfg, tokenizer, count)
        count = len(chosen)
        model.to(eval_device(cfg))
        log.info("Suppression damage: zeroing each layer's %d selected rows in turn, KL at the last token of %d attribution prompts.", len(positions[0]), count)
        damage = layer_damage(model, chosen, positions, pad_id)
        if is_rank_zero():
            write_json(path, {"damage": damage.tolist(), "prompts": count, "measure": "mean KL(base || layer's rows zeroed) at the last token"})
        return damage


def needs_scores(loki_cfg) -> str:
    """The setting that needs this run's attribution scores themselves (not only positions), or ''."""
    if loki_cfg.quota != "uniform":
        return f"loki.quota={loki_cfg.quota}"
    if float(loki_cfg.get("l2sp") or 0) > 0 and loki_cfg.get("l2sp_rows") == "kva":
        return "loki.l2sp_rows=kva"
    return ""


def l2sp_row_weights(cfg: DictConfig, model: nn.Module, positions: Positions) -> list[list[float]] | None:
    """The L2 pull's per-row weights: None (all 1) for l2sp_rows=uniform, else each selected row's mean |score|
    in the store `resolve_positions` read, over the mean of the selection (loki.implant.kva_row_weights)."""
    if cfg.loki.l2sp_rows != "kva":
        return None
    from loki import attribution
    from loki.implant import kva_row_weights
    from loki.select import row_mass
    from loki.store import ScoreStore

    d = arch.dims(model)
    store_dir = attribution.default_store(cfg) if cfg.loki.scores == "auto" else Path(cfg.loki.scores).expanduser()
    store = ScoreStore(store_dir)
    return kva_row_weights(row_mass(store.iter_chunks(), expected_shape=(d.num_layers, d.hidden_size)), positions)


def write_json(path: str | Path, data: Any) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2, sort_keys=True, default=float))
    return path


# ----------------------------------------------------------------------------------------------- setup

OmegaConf.register_new_resolver("method", method_label, replace=True)  # ${method:...} in train.yaml


def run(cfg: DictConfig) -> dict:
    """setup (every check) -> retention before -> fit -> merge -> task + retention after -> export."""
    return train(cfg)[0]


def train(cfg: DictConfig) -> tuple[dict, Setup | None]:
    """`run`, also returning the run's `Setup`, whose `model` is the trained model as a plain HF model in
    memory (rank 0; None elsewhere): the frontier evaluates it, and its interpolations, without a checkpoint."""
    started = time.time()
    pl.seed_everything(cfg.seed, workers=True)
    apply_lr_scale_with_q(cfg)  # optimizer.lr_scale_with_q: the optimizer's lr for this q, before any check
    built = setup(cfg)
    start_logging(cfg, built)  # resolved config as hyperparameters; the telemetry callback
    retention_before = evaluate_retention(cfg, built, stage="before")
    module = build_module(cfg, built)
    trainer = instantiate(cfg.trainer, **trainer_options(cfg, built))
    trainer.fit(module, datamodule=built.datamodule, ckpt_path=cfg.ckpt_path)
    release_process_group(trainer)  # rank 0 evaluates alone from here; the other ranks return and exit
    if not trainer.is_global_zero:
        return {}, None
    if built.peft_lora and export_format(cfg.export) == "adapter":  # peft's own adapter, before plain_model merges it
        save_peft_adapter(built.gathered_model if built.gathered_model is not None else module.model, built.run_dir / "adapter", cfg.model.name)
    model = plain_model(module, built)
    interpolate_run(cfg, built, model)
    return finish(cfg, built, model, retention_before, trainer, started), built


def export_alpha(cfg: DictConfig) -> float:
    """`export.alpha` (1.0 when absent or for the older export=true|false)."""
    value = cfg.get("export")
    return float(value.get("alpha", 1.0)) if hasattr(value, "get") else 1.0


def interpolate_run(cfg: DictConfig, setup: Setup, model: nn.Module) -> None:
    """With `export.alpha` < 1, pull the trained model back to theta_0 + alpha (theta_run - theta_0) in place,
    before it is evaluated and exported: a frontier's interpolation point as a model of its own (issue 20),
    computed as the frontier computes it. theta_0 is the base as loaded again (PiSSA and CorDA rewrote the
    copy they trained)."""
    alpha = export_alpha(cfg)
    if alpha == 1.0:
        return
    from loki.interpolate import weight_delta
    from loki.models import load_model_and_tokenizer

    base, _ = load_model_and_tokenizer(cfg.model)
    run_state = model.state_dict()
    delta = weight_delta({name: value.to(run_state[name].device) if name in run_state else value
                          for name, value in base.state_dict().items()}, run_state)
    del base, run_state
    delta.apply(model, alpha)
    log.info("export.alpha=%g: the run evaluated and exported is theta_0 + %g (theta_run - theta_0) (%d tensors changed).",
             alpha, alpha, len(delta.tensors))


def trainer_options(cfg: DictConfig, setup: Setup) -> dict:
    """The Trainer arguments that make a run do only what its config says: no logger at all for
    `logger=none` (Lightning reads logger=None as "the default logger" and writes lightning_logs/), no
    checkpoint unless a configured ModelCheckpoint asks for one (Lightning adds its own otherwise), and
    a training bar whose label is right for step budgets. An explicit trainer.enable_checkpointing wins."""
    from lightning.pytorch.callbacks import ModelCheckpoint, ProgressBar

    from loki.lightning.progress import train_progress_bar

    callbacks = list(setup.callbacks)
    if cfg.trainer.enable_progress_bar and not any(isinstance(c, ProgressBar) for c in callbacks):
        bar = train_progress_bar()
        callbacks += [bar] if bar is not None else []
    options = {"callbacks": callbacks, "logger": setup.logger if setup.logger is not None else False, "default_root_dir": setup.run_dir}
    if cfg.trainer.get("enable_checkpointing") is None:
        options["enable_checkpointing"] = any(isinstance(c, ModelCheckpoint) for c in callbacks)
    return options


def save_resolved_config(cfg: DictConfig, run_dir: Path) -> Path:
    """`<run_dir>/config.yaml`: the run's config, resolved, so the run dir alone says what ran (loki.evaluate
    reads it) wherever paths.output_dir points (Hydra's .hydra/ stays in Hydra's own run dir). A key only
    Hydra can resolve (in-process use) is kept unresolved rather than failing the run."""
    from loki.files import write_atomic

    resolved: dict = {}
    for key in cfg:
        try:
            node = cfg[key]
            resolved[key] = OmegaConf.to_container(node, resolve=True, enum_to_str=True) if OmegaConf.is_config(node) else node
        except Exception as err:  # an interpolation only Hydra can resolve (in-process use)
            log.warning("config.yaml: '%s' kept unresolved (%s).", key, err)
            resolved[key] = OmegaConf.to_container(cfg, resolve=False)[key]
    return write_atomic(run_dir / "config.yaml", OmegaConf.to_yaml(OmegaConf.create(resolved)).encode())


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
    task: Any = None  # loki.tasks.Task: training data, evaluator, primary metric
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))  # where evaluation runs
    lora_config: Any = None  # the peft config of the peft baseline (LoraConfig or OSFConfig; rebuilt after an FSDP gather)
    gathered_model: nn.Module | None = None  # FSDP: the full trained model rebuilt on rank 0 at fit end


def _lora_alpha(cfg: DictConfig) -> float | None:
    # One default for both LoRA flavours, so LoKI+LoRA and the peft baseline are compared at equal scaling.
    if int(cfg.lora.rank) == 0:
        return None
    return float(cfg.lora.alpha) if cfg.lora.alpha is not None else 2.0 * int(cfg.lora.rank)


def _peft_model(cfg: DictConfig, model: nn.Module, tokenizer: Any, device: torch.device) -> tuple[nn.Module, Any]:
    """The peft baseline of the `lora` group (loki=off): LoRA, DoRA, PiSSA, CorDA or OSF, and its peft config.

    CorDA's knowledge set is the attribution prompts (the `data` group), which retention never reads; its
    decomposition is cached per model, prompts, rank, targets and mode, so an LR grid computes it once."""
    from loki.peft_methods import apply_peft, build_peft_config

    lora = cfg.lora
    variant = lora.variant
    targets = OmegaConf.to_container(lora.target_modules) if OmegaConf.is_config(lora.target_modules) else lora.target_modules
    knowledge, cache_file = None, None
    if variant == "corda":
        from loki import attribution

        _, data = attribution.settings(cfg)
        cache_file = corda_cache_file(cfg)
        if not cache_file.is_file():
            from loki.attribution import build_prompts

            rows = attribution.load_rows(data)
            prompts = build_prompts(rows, tokenizer, system_prompt=data.get("system_prompt"), style=data.get("prompt") or "letter")
            knowledge = [p["input_ids"] for p in prompts]
            log.info("CorDA: decomposing the target weights over %d attribution prompts (cached at %s).", len(knowledge), cache_file)
        model.to(device)  # the pass over the knowledge set runs where training will
    config = build_peft_config(
        variant,
        int(lora.rank),
        _lora_alpha(cfg),
        float(lora.dropout),
        targets,
        pissa_niter=lora.pissa_niter,
        corda_method=lora.corda_method,
        corda_cache_file=cache_file,
        effective_rank=lora.effective_rank,
    )
    return apply_peft(model, config, knowledge), config


def setup(cfg: DictConfig) -> Setup:
    check_train_config(cfg)  # every user-facing value, before any data or model is loaded
    run_dir = Path(cfg.paths.output_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    if is_rank_zero():
        save_resolved_config(cfg, run_dir)
    model, tokenizer = load_model_and_tokenizer(cfg.model)
    arch.dims(model)  # an unsupported architecture stops here, with the list of supported ones
    memory = apply_memory_options(model, cfg.model)  # gradient checkpointing now; compile at fit (below)
    method = method_label(
        cfg.loki.enabled, cfg.lora.rank, cfg.loki.q, cfg.loki.strategy, cfg.lora.variant, cfg.loki.quota, bool(cfg.loki.soft), cfg.loki.l2sp, cfg.loki.l2sp_rows
    )
    callbacks = [instantiate(c) for c in (cfg.get("callbacks") or {}).values() if c is not None and c.get("_target_")]
    logger = instantiate(cfg.logger) if cfg.get("logger") and cfg.logger.get("_target_") else None
    if logger is None:  # LearningRateMonitor refuses to run without a logger
        callbacks = [c for c in callbacks if not isinstance(c, pl.callbacks.LearningRateMonitor)]
    out = Setup(run_dir=run_dir, model=model, tokenizer=tokenizer, method=method, datamodule=None, callbacks=callbacks, logger=logger)
    out.task = Task.from_config(cfg.task)
    out.device = eval_device(cfg)
    out.notes["memory"] = memory
    out.notes["devices"] = {}

    if cfg.loki.enabled:
        from loki.implant import check_positions
        from loki.lightning import LokiCallback

        row_scales = None
        if cfg.loki.soft:  # soft selection: the rows of the selection at q*soft_span, updates scaled by rank
            from loki.implant import soft_scales

            wider = cfg.copy()
            with open_dict(wider):
                wider.loki.q = round(float(cfg.loki.q) * float(cfg.loki.soft_span), 9)
            out.positions, out.positions_source = resolve_positions(wider, model, tokenizer)
            row_scales = soft_scales(out.positions)
            out.notes["soft"] = {"rows": sum(map(len, out.positions)), "scale_sum": round(sum(map(sum, row_scales)), 3)}
            out.positions_source += f"; soft selection: updates scaled 1 - i/k' by rank (sum of scales {out.notes['soft']['scale_sum']:g} rows)"
        else:
            out.positions, out.positions_source = resolve_positions(cfg, model, tokenizer)
        pull_weights = None
        if float(cfg.loki.l2sp) > 0:  # L2-SP on the trained rows, |KVA|-weighted or uniform
            pull_weights = l2sp_row_weights(cfg, model, out.positions)
            out.positions_source += f"; L2 pull to the base rows, weight {float(cfg.loki.l2sp):g}, rows weighted {cfg.loki.l2sp_rows}"
        out.loki_callback = LokiCallback(
            out.positions,
            impl=cfg.loki.impl,
            lora_rank=int(cfg.lora.rank),
            lora_alpha=_lora_alpha(cfg),
            lora_dropout=float(cfg.lora.dropout),
            model_name=cfg.model.name,
            row_scales=row_scales,
            l2sp=float(cfg.loki.l2sp),
            l2sp_row_weights=pull_weights,
        )
        check_positions(model, out.positions, int(cfg.lora.rank))  # lora.rank > k fails now, before data loading
        out.callbacks.insert(0, out.loki_callback)
    elif uses_peft(False, cfg.lora.variant, int(cfg.lora.rank)):
        out.model, out.lora_config = _peft_model(cfg, model, tokenizer, out.device)
        out.peft_lora = True
    # Order in fit: FullModelGather's on_fit_end (FSDP only) runs before LokiCallback's merge; compile after install.
    out.callbacks.insert(0, FullModelGather(out, lambda state: rebuild_trained_model(cfg, out, state)))
    if memory["compile"]:
        out.callbacks.insert(2 if out.loki_callback is not None else 1, CompileForTraining())

    out.datamodule = out.task.datamodule(tokenizer, seed=cfg.seed)
    if cfg.evaluate.validation_task_metric and out.task.has_val and is_rank_zero():
        from loki.eval import TaskMetricCallback

        out.callbacks.append(TaskMetricCallback(out.task))
    return out


# ------------------------------------------------------------------------------------- device placement
#
# Evaluation runs on rank 0 only, on the training device. Before fit, rank 0 measures retention on its own
# device (Lightning's launcher starts the other ranks only inside `fit`; under torchrun they wait in the
# process-group rendezvous, so run the cached "before" once per model first, or raise the strategy's
# timeout, when it takes longer than that). After fit every rank meets once more, then the process group
# is torn down (`release_process_group`): the other ranks return and exit, and rank 0 evaluates with no
# collective left that could time out. Lightning's teardown moves a DDP / single-device model to the CPU;
# `plain_model` moves it back to the device.


def eval_device(cfg: DictConfig) -> torch.device:
    """Where this process evaluates: cuda:LOCAL_RANK when CUDA exists (unless trainer.accelerator=cpu),
    else the trainer's accelerator (mps when asked for or auto and present), else the CPU."""
    accelerator = str(cfg.trainer.accelerator or "auto").lower()
    if accelerator == "cpu":
        return torch.device("cpu")
    if torch.cuda.is_available() and accelerator in ("auto", "gpu", "cuda"):
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    mps = getattr(torch.backends, "mps", None)
    if accelerator in ("auto", "gpu", "mps") and mps is not None and mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def to_eval_device(setup: Setup, model: nn.Module | None = None) -> nn.Module:
    """The model (default: setup.model) moved to setup.device if it is elsewhere; returns it."""
    model = setup.model if model is None else model
    from loki.device import model_device

    if model_device(model) != setup.device:
        model.to(setup.device)
    return model


def _record_device(setup: Setup, stage: str, model: nn.Module | str) -> None:
    from loki.device import model_device

    setup.notes.setdefault("devices", {})[stage] = model if isinstance(model, str) else str(model_device(model))


def rebuild_trained_model(cfg: DictConfig, setup: Setup, state: dict) -> nn.Module:
    """A plain HF model holding a LightningModule state dict (`model.` prefix) of the trained run."""
    model, _ = load_model_and_tokenizer(cfg.model)
    handle = None
    if setup.loki_callback is not None:
        from loki.implant import install

        lc = setup.loki_callback
        handle = install(model, setup.positions, lc.impl, lc.lora_rank, lc.lora_alpha, lc.lora_dropout)
    elif setup.peft_lora:
        from peft import get_peft_model

        from loki.peft_methods import rebuild_config

        model = get_peft_model(model, rebuild_config(setup.lora_config))  # shapes only: the state dict brings PiSSA/CorDA residuals
    inner = {k[len("model."):]: v for k, v in state.items() if k.startswith("model.")}
    model.load_state_dict(inner, strict=True)
    if handle is not None:
        from loki.implant import merge

        merge(model, handle)
    return model


def build_module(cfg: DictConfig, setup: Setup) -> CausalLMModule:
    if setup.loki_callback is None:  # counted now: merging peft LoRA at the end forgets what trained
        setup.notes["trainable"] = _trainable_summary(setup.model)
    optimizer = instantiate(cfg.optimizer)
    loss = OmegaConf.to_container(cfg.loss)
    anchor = build_anchor(cfg, setup) if float(loss["anchor_weight"]) > 0 else None
    return CausalLMModule(setup.model, optimizer=optimizer, lr_schedule=OmegaConf.to_container(cfg.lr_schedule), loss=loss, anchor=anchor)


def attribution_prompt_ids(cfg: DictConfig, tokenizer: Any, count: int) -> tuple[list[list[int]], int]:
    """(`count` attribution prompts' token ids, spread evenly over the prompt list of the `data` group, which
    retention never reads; the pad id): the KL anchor's and the suppression damage's prompts."""
    from loki import attribution
    from loki.attribution import build_prompts

    _, data = attribution.settings(cfg)
    rows = attribution.load_rows(data)
    prompts = build_prompts(rows, tokenizer, system_prompt=data.get("system_prompt"), style=data.get("prompt") or "letter")
    count = min(count, len(prompts))
    chosen = [prompts[(i * len(prompts)) // count]["input_ids"] for i in range(count)]
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return chosen, pad_id


def build_anchor(cfg: DictConfig, setup: Setup):
    """The base model's next-token distributions on `loss.anchor_prompts` attribution prompts, spread evenly
    over the prompt list (the `data` group, which retention never reads). Made before fit, while the model
    still computes the base function: LoKI installs its rows at fit setup, and peft adapters start at zero
    (PiSSA, CorDA and OSF re-split the same weights)."""
    from loki.files import write_atomic
    from loki.losses import AnchorTargets, anchor_targets

    setup.model.to(setup.device)
    cache_file = anchor_cache_file(cfg, setup.model)
    if cache_file.is_file():  # every run of a sweep anchors to the same base: one pass over the prompts, not one per run
        targets = AnchorTargets(**torch.load(cache_file, map_location="cpu", weights_only=True))
        log.info("KL anchor: %d attribution prompts, %d positions, base top-%s kept (cached at %s).", len(targets), len(targets.log_probs), cfg.loss.anchor_top_k or "all", cache_file)
        return targets
    chosen, pad_id = attribution_prompt_ids(cfg, setup.tokenizer, int(cfg.loss.anchor_prompts))
    targets = anchor_targets(setup.model, chosen, pad_id, top_k=cfg.loss.anchor_top_k)
    if is_rank_zero():
        buffer = io.BytesIO()
        torch.save(asdict(targets), buffer)
        cache_file.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(cache_file, buffer.getvalue())
    log.info("KL anchor: %d attribution prompts, %d positions, base top-%s kept.", len(chosen), len(targets.log_probs), cfg.loss.anchor_top_k or "all")
    return targets


def anchor_cache_file(cfg: DictConfig, model: Any) -> Path:
    """Where the KL anchor's base distributions are cached: one per base model, attribution prompts, anchor
    settings, and the model as the run built it before fit (a peft method's re-split weights compute the base
    function up to rounding, so each peft config keeps its own), on its device and dtype."""
    from loki import attribution

    _, data = attribution.settings(cfg)
    peft = OmegaConf.to_container(cfg.lora, resolve=True) if uses_peft(bool(cfg.loki.enabled), cfg.lora.variant, int(cfg.lora.rank)) else None
    weight = next(model.parameters())
    key = {"model": base_model_key(cfg), "data": data, "prompts": int(cfg.loss.anchor_prompts), "top_k": cfg.loss.anchor_top_k,
           "peft": peft, "device": weight.device.type, "dtype": str(weight.dtype)}
    return Path(cfg.paths.cache_dir) / "anchor" / f"{safe_name(cfg.model.name)}-{settings_digest(key, 16)}.pt"


# -------------------------------------------------------------------------------------------- evaluate


# Model settings that change how fast it trains, how a run trains by default, or where its converted copy is
# kept, never what the base model computes: not part of the keys of what is cached per base model (retention,
# CorDA). The LR defaults once were, so a new default LR remade CorDA's hour-long decomposition.
_RUN_ONLY_MODEL_KEYS = ("gradient_checkpointing", "compile", "attn_implementation", "finetune_lr", "loki_lr", "loki_impl", "cache_dir")


def base_model_key(cfg: DictConfig) -> dict:
    """The model config as far as it decides the base model's outputs (`_RUN_ONLY_MODEL_KEYS` left out)."""
    return {k: v for k, v in OmegaConf.to_container(cfg.model, resolve=True).items() if k not in _RUN_ONLY_MODEL_KEYS}


def corda_cache_file(cfg: DictConfig) -> Path:
    """Where CorDA's decomposition for this run is cached: one per base model, knowledge set (the attribution
    prompts), rank, targets and mode (`loki.peft_methods.corda_cache_path`)."""
    from loki import attribution
    from loki.peft_methods import corda_cache_path

    lora = cfg.lora
    targets = OmegaConf.to_container(lora.target_modules) if OmegaConf.is_config(lora.target_modules) else lora.target_modules
    _, data = attribution.settings(cfg)
    key = {"model": base_model_key(cfg), "data": data, "rank": int(lora.rank), "targets": targets, "method": lora.corda_method}
    return corda_cache_path(cfg.paths.cache_dir, cfg.model.name, key)


def _retention_cache_path(cfg: DictConfig) -> Path:
    # The base model's retention depends only on the model and the retention settings: measure it once.
    digest = settings_digest({"model": base_model_key(cfg), "eval": OmegaConf.to_container(cfg.eval, resolve=True)}, 16)
    return Path(cfg.paths.cache_dir) / "retention" / f"{safe_name(cfg.model.name)}-{digest}.json"


def evaluate_retention(cfg: DictConfig, setup: Setup, stage: str) -> dict | None:
    """Retention "before" (cached per model and settings, with the base model's next-token
    distributions for the KL measures beside it) or "after" (compared with those distributions)."""
    if not cfg.evaluate.retention or not is_rank_zero():
        return None
    from loki.eval import reference_ready, run_retention

    cached = _retention_cache_path(cfg)
    reference = cached.with_suffix("")  # <cache>/retention/<model>-<digest>/: the base model's distributions
    if stage == "before" and cached.exists() and reference_ready(cfg.eval, reference):
        _record_device(setup, "retention_before", "cached")
        return json.loads(cached.read_text())
    model = to_eval_device(setup)  # on the training device (rank 0's), not where Lightning's teardown left it
    _record_device(setup, f"retention_{stage}", model)
    result = run_retention(model, setup.tokenizer, cfg.eval, reference_dir=reference, stage=stage)
    if stage == "before":
        write_json(cached, result)
    return result


def plain_model(module: CausalLMModule, setup: Setup) -> nn.Module:
    """The trained model as an ordinary HF model (LokiCallback already merged at fit end; peft merges here),
    eager (not compiled), without checkpointing hooks, on the evaluation device. Under FSDP, the model
    FullModelGather rebuilt from the gathered state dict."""
    from loki.models import disable_gradient_checkpointing, uncompile

    model = setup.gathered_model if setup.gathered_model is not None else module.model
    setup.gathered_model = None
    uncompile(model)
    if setup.peft_lora:
        model = model.merge_and_unload()
    disable_gradient_checkpointing(model)
    setup.model = model
    return to_eval_device(setup, model)


def finish(cfg: DictConfig, setup: Setup, model: nn.Module, retention_before: dict | None, trainer: Any, started: float) -> dict:
    """Evaluate the trained model, export it, write metrics.json and print the summary table."""
    from loki.eval import forgetting_report, format_report

    model.eval()
    metrics: dict[str, Any] = {
        "model": cfg.model.name,
        "task": cfg.task.name,
        "primary_metric": setup.task.primary,
        "method": setup.method,
        "q": cfg.loki.q if cfg.loki.enabled else None,
        "positions_source": setup.positions_source,
        "trainable": setup.loki_callback.summary() if setup.loki_callback else setup.notes["trainable"],
        "steps": int(trainer.global_step),
        "export_alpha": export_alpha(cfg),  # < 1: what is evaluated and exported is the run pulled back towards the base
    }
    val_loss = trainer.callback_metrics.get("val/loss")  # the last validation's loss: what an LR grid picks on
    metrics["val_loss"] = float(val_loss) if val_loss is not None else None
    if cfg.evaluate.task and setup.task.evaluator is not None:
        model = to_eval_device(setup, model)
        _record_device(setup, "task", model)
        metrics["task_metrics"] = setup.task.evaluate(model, setup.tokenizer, stage="test")
        if cfg.evaluate.task_val and setup.task.has_val:  # the validation metric an LR grid picks on
            metrics["task_metrics_val"] = _final_val_metrics(setup, trainer) or setup.task.evaluate(model, setup.tokenizer, stage="val")
    if retention_before is not None:
        retention_after = evaluate_retention(cfg, setup, stage="after")
        metrics["retention"] = {"before": retention_before, "after": retention_after}
        metrics["forgetting"] = forgetting_report(retention_before, retention_after)
    metrics["devices"] = dict(setup.notes.get("devices") or {})  # where each evaluation ran ("cached": read back)
    if export_format(cfg.export) == "full":
        from loki.implant import export_model

        export_model(model, setup.tokenizer, setup.run_dir / "model")
        metrics["export_dir"] = str(setup.run_dir / "model")
    elif export_format(cfg.export) == "adapter":  # only the trained rows (peft: its adapter, written in run)
        if not setup.peft_lora:
            save_adapter(model, setup.positions, setup.run_dir / "adapter", cfg.model.name)
        metrics["export_dir"] = str(setup.run_dir / "adapter")
    if setup.positions is not None:
        save_positions(setup.positions, setup.run_dir / "positions.json")
    metrics["data"] = getattr(setup.datamodule, "stats", {})  # rows kept, skipped (and why), truncated
    metrics["seconds"] = round(time.time() - started, 1)
    write_json(setup.run_dir / "metrics.json", metrics)
    if trainer.logger is not None:
        flat = {f"final/{k}": v for k, v in _flatten(metrics).items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        trainer.logger.log_metrics(flat, step=trainer.global_step)
        log_run_files(cfg, setup, trainer.logger)  # W&B: metrics.json, positions.json, the KVA heatmap as an artifact
        trainer.logger.finalize("success")
        from loki.sweep import finish_wandb

        finish_wandb()  # one W&B run per job: the next job of a sweep opens its own
    print(format_report(metrics))
    print(f"run dir: {setup.run_dir}")
    return metrics


def _final_val_metrics(setup: Setup, trainer: Any) -> dict | None:
    """The task's validation metrics as the per-validation callback measured them at the last optimizer
    step (the final weights), so they are not computed twice; None when the last validation came earlier."""
    from loki.eval import TaskMetricCallback

    for callback in setup.callbacks:
        if isinstance(callback, TaskMetricCallback) and callback.last and callback.last_step == trainer.global_step:
            return dict(callback.last)
    return None


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


# ------------------------------------------------------------------------------------- lr, logging, W&B

# `optimizer.lr_scale_with_q: paper`: the authors' ToolACE runs used 0.4x the q=10 % rate at q=30 %.
PAPER_LR_SCALE = ((0.1, 1.0), (0.3, 0.4))


def lr_multiplier(table: Any, q: float) -> float:
    """The lr multiplier at q from `optimizer.lr_scale_with_q`: [[q, multiplier], ...] points, linear in
    between and flat beyond the first and last point; `paper` for the authors' points; null/false: 1."""
    if table is None or table is False:
        return 1.0
    if isinstance(table, str):
        if table != "paper":
            raise LokiError(f"optimizer.lr_scale_with_q must be null, 'paper' or a list of [q, multiplier] pairs, got {table!r}.")
        table = PAPER_LR_SCALE
    try:
        points = sorted((float(a), float(b)) for a, b in table)
    except (TypeError, ValueError):
        raise LokiError(f"optimizer.lr_scale_with_q must be a list of [q, multiplier] pairs, got {table!r}.") from None
    if not points or any(m <= 0 or not 0 < x <= 1 for x, m in points) or len({x for x, _ in points}) != len(points):
        raise LokiError(
            f"optimizer.lr_scale_with_q needs distinct q in (0, 1] and multipliers > 0, got {table!r} "
            "(e.g. [[0.1, 1.0], [0.3, 0.4]])."
        )
    if q <= points[0][0]:
        return points[0][1]
    for (x0, m0), (x1, m1) in zip(points, points[1:]):
        if q <= x1:
            return m0 + (m1 - m0) * (q - x0) / (x1 - x0)
    return points[-1][1]


def apply_lr_scale_with_q(cfg: DictConfig) -> float:
    """Resolve `optimizer.lr_scale_with_q` into `optimizer.lr` and drop the key (AdamW does not take it): the
    node becomes a plain mapping, since the typed schema has the key.

    Only LoKI runs with a q scale; the baselines and a positions file without q keep the rate. The base
    rate and the multiplier are kept under `lr_scale` for the logs. Returns the multiplier.
    """
    if "lr_scale_with_q" not in (cfg.get("optimizer") or {}):
        return 1.0
    with open_dict(cfg):
        table = OmegaConf.to_container(cfg.optimizer.lr_scale_with_q, resolve=True) if OmegaConf.is_config(
            cfg.optimizer.lr_scale_with_q
        ) else cfg.optimizer.lr_scale_with_q
        cfg.optimizer = {k: v for k, v in cfg.optimizer.items_ex(resolve=False) if k != "lr_scale_with_q"}
        q = cfg.loki.q if cfg.loki.enabled else None
        multiplier = lr_multiplier(table, float(q)) if q is not None and table not in (None, False) else 1.0
        if table not in (None, False):
            lr_multiplier(table, 0.1)  # a bad table is refused even when it does not apply
        if multiplier != 1.0:
            base = float(cfg.optimizer.lr)
            cfg.optimizer.lr = base * multiplier
            cfg.lr_scale = {"base_lr": base, "multiplier": multiplier, "q": float(q)}
    return multiplier


def start_logging(cfg: DictConfig, setup: Setup) -> None:
    """Before fit: the resolved config as the logger's hyperparameters, and the telemetry callback."""
    if setup.logger is None:
        return
    try:
        params = OmegaConf.to_container(cfg, resolve=True)
    except Exception as err:  # an interpolation only Hydra can resolve (in-process use): log what resolves
        log.warning("Logging the unresolved config (%s).", err)
        params = OmegaConf.to_container(cfg, resolve=False)
    setup.logger.log_hyperparams(params)
    if cfg.telemetry:
        from loki.lightning.telemetry import Telemetry

        setup.callbacks.append(Telemetry())


def log_run_files(cfg: DictConfig, setup: Setup, logger: Any) -> None:
    """W&B only: metrics.json, positions.json and the KVA heatmap of the scores used, as one artifact."""
    from lightning.pytorch.loggers import WandbLogger

    if not isinstance(logger, WandbLogger):
        return
    import wandb

    files = [setup.run_dir / "metrics.json", setup.run_dir / "positions.json"]
    if cfg.loki.enabled and not cfg.loki.positions:
        from loki.store import HEATMAP_FILE

        if cfg.loki.scores == "auto":
            from loki import attribution

            store_dir = Path(attribution.default_store(cfg))
        else:
            store_dir = Path(str(cfg.loki.scores)).expanduser()
        files.append(store_dir / HEATMAP_FILE)
    run = logger.experiment
    artifact = wandb.Artifact(name=safe_name(f"{run.name or run.id}-files"), type="loki-run")
    for path in files:
        if path.is_file():
            artifact.add_file(str(path), name=path.name)
    if artifact.manifest.entries:
        run.log_artifact(artifact)
    heatmap = next((p for p in files[2:] if p.is_file()), None)
    if heatmap is not None:
        logger.log_image(key="attribution/heatmap", images=[str(heatmap)])
