"""One config contract, checked once, before any data or model is loaded.

Every user-facing value of `train.py` and `attribute.py` is checked here. A bad value stops the run with
one sentence that names the key, what was given and what is allowed (a `LokiError`; the entry points
print it and exit with status 2). The checks read the allowed values from the modules that use them, so
the two never disagree.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from loki.errors import LokiError
from loki import checks, schema

schema.register()  # the typed group schemas, in Hydra's ConfigStore before any config is composed

MODEL_DTYPES = ("float32", "bfloat16", "float16")


_WARNED: set[str] = set()


def warn_renamed(old: str, new: str) -> None:
    """One line, once per process, for a config key that was renamed but is still read."""
    if old not in _WARNED:
        _WARNED.add(old)
        warnings.warn(f"{old} is deprecated: it is now {new} ({old} still works for now).", FutureWarning, stacklevel=3)


class _Checker:
    """Reads dotted keys from a resolved config and raises one sentence per bad value."""

    def __init__(self, cfg: DictConfig):
        self.cfg = cfg

    def get(self, key: str) -> Any:
        try:
            value = OmegaConf.select(self.cfg, key, throw_on_missing=True)
            return OmegaConf.to_container(value, resolve=True) if OmegaConf.is_config(value) else value
        except Exception as err:  # an interpolation that cannot resolve, a missing mandatory value
            raise LokiError(f"{key} could not be read from the config ({err}).") from None

    def resolvable(self, key: str) -> dict:
        """The mapping at `key`, resolved; a value whose interpolation cannot resolve here
        (`${hydra:runtime.output_dir}` in a config composed outside a Hydra run) reads as null."""
        node = OmegaConf.select(self.cfg, key)
        values: dict = {}
        for name in node or {}:
            child = node._get_node(name)
            if isinstance(child, DictConfig) and not child._is_interpolation():
                values[name] = self.resolvable(f"{key}.{name}")
                continue
            try:
                values[name] = self.get(f"{key}.{name}")
            except Exception:
                if not child._is_interpolation():
                    raise
                values[name] = None
        return values

    # Each check reads the key's value and hands it to loki.checks (one sentence per bad value).

    def fail(self, key: str, allowed: str, value: Any) -> None:
        checks.fail(key, allowed, value)

    def one_of(self, key: str, choices: Sequence[Any], optional: bool = False) -> Any:
        return checks.one_of(key, self.get(key), choices, optional)

    def boolean(self, key: str) -> bool:
        return checks.boolean(key, self.get(key))

    def integer(self, key: str, low: int | None = None, optional: bool = False) -> int | None:
        return checks.integer(key, self.get(key), low, optional)

    def number(self, key: str, low: float, high: float, low_open: bool = False, high_open: bool = False, optional: bool = False) -> float | None:
        return checks.number(key, self.get(key), low, high, low_open, high_open, optional)

    def positive(self, key: str) -> float:
        return checks.positive(key, self.get(key))

    def string_list(self, key: str) -> None:
        checks.string_list(key, self.get(key))

    def run(self, checks: Sequence[Callable[[], Any]]) -> None:
        for check in checks:
            check()


def _check_model(c: _Checker) -> None:
    from loki import models

    sources = getattr(models, "SOURCES", ("pretrained", "random", "toy", "gguf"))
    name = c.get("model.name")
    if not isinstance(name, str) or not name.strip():
        c.fail("model.name", "a non-empty name (it keys the score store and the retention cache)", name)
    c.one_of("model.source", sources)
    c.one_of("model.dtype", MODEL_DTYPES, optional=True)
    # Memory and speed options (loki.models): absent keys mean off / the loader's default.
    c.one_of("model.attn_implementation", getattr(models, "ATTN_IMPLEMENTATIONS", ("eager", "sdpa", "flash_attention_2")), optional=True)
    for key in ("model.gradient_checkpointing", "model.compile"):
        if c.get(key) is not None:
            c.boolean(key)


def sharded_strategy(strategy: Any) -> str | None:
    """"fsdp" or "deepspeed" when a trainer.strategy value (a name or a `_target_` dict) shards the model."""
    name = strategy.get("_target_", "") if isinstance(strategy, dict) else str(strategy or "")
    lowered = name.lower()
    if "fsdp" in lowered:
        return "fsdp"
    if "deepspeed" in lowered:
        return "deepspeed"
    return None


def _check_sharded(c: _Checker) -> None:
    sharded = sharded_strategy(c.get("trainer.strategy"))
    if sharded and c.get("loki.enabled") and c.get("loki.impl") == "hook" and not c.get("lora.rank"):
        raise LokiError(
            f"loki.impl=hook cannot run with trainer.strategy={sharded} (its row-masking hooks and weight-decay guard "
            "see flattened, sharded parameters and would silently train unselected rows); use loki.impl=rows."
        )
    if sharded and c.get("loki.enabled") and float(c.get("loki.l2sp") or 0) > 0:
        raise LokiError(
            f"loki.l2sp cannot run with trainer.strategy={sharded} (the L2 pull reads whole rows, which that strategy "
            "shards); use a single device or trainer.strategy=ddp."
        )


def _check_kva_and_data(c: _Checker) -> None:
    import loki.kva
    from loki.attribution import PROMPT_STYLES, TARGET_MODES
    from loki.kva import OBJECTIVES, SCOPES

    if c.get("kva.recipe") is not None:  # the old name of kva.variant: still read, with a warning
        warn_renamed("kva.recipe", "kva.variant")
        c.one_of("kva.recipe", loki.kva.RECIPES)
    else:
        c.one_of("kva.variant", loki.kva.RECIPES)
    c.integer("kva.steps", low=1)
    c.one_of("kva.scope", SCOPES, optional=True)
    c.one_of("kva.objective", OBJECTIVES)
    if c.get("kva.times_activation") is not None:
        c.boolean("kva.times_activation")
    c.one_of("kva.target", TARGET_MODES)
    c.integer("kva.batch_size", low=1)
    c.number("kva.heatmap_q", 0, 1, low_open=True, high_open=True, optional=True)
    from loki.attribution import check_kva_settings

    check_kva_settings(c.get("kva"))  # the recipe's fixed scope / activation factor
    c.one_of("data.prompt", PROMPT_STYLES)
    c.string_list("data.subjects")
    c.integer("data.offset", low=0)
    c.integer("data.per_subject", low=1, optional=True)
    c.integer("data.max_samples", low=1, optional=True)
    c.integer("data.seed")
    path = c.get("data.path")
    if path is not None:
        from loki.data.chat import resolve_path

        if not resolve_path(path).exists():
            c.fail("data.path", "an existing file or directory in the MMLU schema (or null for data.source)", path)
    elif not c.get("data.source"):
        c.fail("data.source", "a dataset name when data.path is null", c.get("data.source"))


def check_attribute_config(cfg: DictConfig) -> None:
    """Every value `attribute.py` reads, checked before any data or model is loaded."""
    c = _Checker(cfg)
    _check_model(c)
    _check_kva_and_data(c)
    c.boolean("progress")
    out_dir = c.get("out_dir")
    if not isinstance(out_dir, str) or not out_dir:
        c.fail("out_dir", "auto or a directory", out_dir)
    if isinstance(c.get("trainer.devices"), int):  # else "auto" or a device list: Lightning checks those
        c.integer("trainer.devices", low=1)
    c.integer("trainer.num_nodes", low=1)
    schema.validate_edge(c.resolvable("logger"), "logger")
    schema.validate_paths(c.resolvable("paths"))


def _check_peft(c: _Checker) -> None:
    """The `lora` group's variant keys (loki.peft_methods): which peft baseline, and its own settings."""
    from loki.peft_methods import CORDA_METHODS, VARIANTS

    variant = c.get("lora.variant")
    if variant is None:  # a lora config written before variants existed: plain LoRA
        return
    c.one_of("lora.variant", VARIANTS)
    if variant == "lora":
        return
    if c.get("loki.enabled"):
        raise LokiError(f"lora.variant={variant} runs only with loki=off (LoKI trains plain LoRA on its rows); use lora=r16 with LoKI, or loki=off.")
    if variant == "osf":
        value = c.get("lora.effective_rank")
        if value is not None and (isinstance(value, bool) or not (isinstance(value, int) and value >= 1 or isinstance(value, float) and 0 < value <= 1)):
            c.fail("lora.effective_rank", "an integer >= 1, a fraction in (0, 1], or null", value)
        return
    c.integer("lora.rank", low=1)
    if variant == "pissa":
        c.integer("lora.pissa_niter", low=1, optional=True)
    if variant == "corda":
        c.one_of("lora.corda_method", CORDA_METHODS)
        _check_kva_and_data(c)  # the knowledge set is the attribution prompts
        if c.get("evaluate.retention"):
            from loki.eval import check_disjoint

            check_disjoint(c.get("data"), c.get("eval"))  # CorDA must not preserve exactly what retention measures


# DataModules built on the chat SFT loader -> their own keys beside ChatDataConfig's
CHAT_DATA_MODULES = {
    schema.CHAT_DATA_TARGET: ((), {}),
    "loki.toy.facts_task.FactsDataModule": (("facts_seed", "facts_lands"), {"path": "train.jsonl"}),  # it writes its file
}


def _check_task(c: _Checker) -> None:
    """`task.*`: its name, its training data's target, and its evaluator's settings and primary metric
    (by the kind's schema in loki.tasks), before anything loads."""
    from loki.tasks import eval_config

    task = c.get("task")
    if not isinstance(task, dict):
        c.fail("task", "a task config (conf/task/)", task)
    checks.text("task.name", task.get("name"))
    if "primary" in task:  # the pre-task-interface spelling of conf/task/toy_facts.yaml
        raise LokiError(f"task.primary is no longer read; the primary metric is task.eval.primary (got task.primary={task['primary']!r}).")
    data = task.get("data")
    if data is not None and not (isinstance(data, dict) and isinstance(data.get("_target_"), str)):
        c.fail("task.data", "null or a DataModule config with a _target_", data)
    if data is not None and data["_target_"] in CHAT_DATA_MODULES:  # another DataModule checks its own settings
        extra, filled = CHAT_DATA_MODULES[data["_target_"]]
        schema.validate_chat_data(data, extra=extra, filled=filled)
    if task.get("eval") is not None:
        eval_config(task["eval"])


PEFT_ADAPTER_VARIANTS = ("lora", "dora")  # peft variants whose save_pretrained applies to the unchanged base


def _check_export(c: _Checker) -> None:
    """export.format: full | adapter | none; the older export=true|false still works, with one warning line."""
    from loki.implant.adapter import EXPORT_FORMATS

    value = c.get("export")
    if isinstance(value, bool):
        warn_renamed(f"export={str(value).lower()}", f"export.format={'full' if value else 'none'}")
        return
    if not isinstance(value, dict):
        c.fail("export", "a block {format: full|adapter|none} (export.format=...)", value)
    fmt = c.one_of("export.format", EXPORT_FORMATS)
    alpha = value.get("alpha", 1.0)
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0 < alpha <= 1:
        c.fail("export.alpha", "a number in (0, 1]: the run's share of theta_0 + alpha (theta_run - theta_0), 1 for the run itself", alpha)
    if alpha != 1 and fmt == "adapter":
        c.fail("export.format", "full or none with export.alpha < 1 (an interpolated run is exported whole)", fmt)
    if fmt == "adapter" and not c.get("loki.enabled"):
        if int(c.get("lora.rank") or 0) == 0:
            c.fail("export.format", "full or none for a full fine-tuning (loki=off without LoRA changes every weight, so it has no adapter)", fmt)
        variant = c.get("lora.variant") or "lora"
        if variant not in PEFT_ADAPTER_VARIANTS:
            c.fail("export.format", f"full or none with lora.variant={variant} (its peft adapter needs a converted base; adapters exist for {', '.join(PEFT_ADAPTER_VARIANTS)})", fmt)


def _check_edges(c: _Checker) -> None:
    """optimizer, trainer, logger, callbacks and paths, each by its schema (loki.schema: chosen by `_target_`)."""
    for group in ("optimizer", "trainer", "logger"):
        schema.validate_edge(c.resolvable(group), group)
    for name in OmegaConf.select(c.cfg, "callbacks") or {}:
        schema.validate_edge(c.resolvable(f"callbacks.{name}"), f"callbacks.{name}")
    schema.validate_paths(c.resolvable("paths"))


def check_train_config(cfg: DictConfig) -> None:
    """Every value `train.py` reads, checked before any data or model is loaded."""
    from loki.implant import IMPLS
    from loki.lightning.module import LR_SCHEDULES
    from loki.implant.pull import L2SP_ROWS
    from loki.select import NO_SCORE_STRATEGIES, QUOTAS, SCORE_MODES, STRATEGIES

    c = _Checker(cfg)
    _check_model(c)
    c.integer("seed")
    c.boolean("loki.enabled")
    c.integer("lora.rank", low=0)
    c.number("lora.dropout", 0, 1, high_open=True)
    alpha = c.get("lora.alpha")
    if alpha is not None:
        c.positive("lora.alpha")
    c.one_of("lr_schedule.kind", LR_SCHEDULES)
    c.number("lr_schedule.warmup_ratio", 0, 1, high_open=True)
    c.number("lr_schedule.min_ratio", 0, 1)
    c.positive("optimizer.lr")
    _check_edges(c)
    for key in ("evaluate.retention", "evaluate.task", "evaluate.validation_task_metric"):
        c.boolean(key)
    _check_export(c)
    schema.validate_evaluate(c.get("evaluate"))
    schema.validate_loss(c.get("loss"))
    _check_task(c)
    if c.get("evaluate.retention"):
        schema.validate_retention(c.get("eval"))  # every benchmark's settings, by the schema
        from loki.eval.lm_harness import require_lm_eval

        require_lm_eval(c.get("eval").get("lm_eval"))
    ckpt = c.get("ckpt_path")
    if ckpt is not None and not Path(str(ckpt)).expanduser().is_file():
        c.fail("ckpt_path", "an existing checkpoint file (or null)", ckpt)
    _check_peft(c)
    if not c.get("loki.enabled"):
        return
    c.one_of("loki.impl", IMPLS)
    from loki.implant import check_precision

    check_precision(c.get("loki.impl"), int(c.get("lora.rank")), c.get("model.dtype"))  # hook on bf16 weights is refused
    _check_sharded(c)
    c.one_of("loki.strategy", STRATEGIES)
    c.one_of("loki.score", SCORE_MODES)
    c.integer("loki.seed")
    c.one_of("loki.quota", QUOTAS)
    c.number("loki.quota_floor", 0, 1)
    c.integer("loki.damage_prompts", low=1)
    c.boolean("loki.soft")
    if c.get("loki.soft"):
        c.number("loki.soft_span", 1, float("inf"))
        if int(c.get("lora.rank")):
            c.fail("loki.soft", "false with lora.rank > 0 (per-row learning rates apply to the rows themselves)", True)
        if c.get("loki.positions") is not None:
            c.fail("loki.soft", "false when loki.positions is given (soft selection selects at q*soft_span itself)", True)
        q = c.get("loki.q")
        if isinstance(q, (int, float)) and 0 < q and float(q) * float(c.get("loki.soft_span")) >= 1:
            c.fail("loki.soft_span", f"below 1/loki.q = {1 / float(c.get('loki.q')):g} (q*soft_span is the fraction of rows that train)", c.get("loki.soft_span"))
    positions = c.get("loki.positions")
    c.number("loki.l2sp", 0, float("inf"))
    c.one_of("loki.l2sp_rows", L2SP_ROWS)
    if float(c.get("loki.l2sp")) > 0 and c.get("loki.l2sp_rows") == "kva":
        if positions is not None:
            c.fail("loki.l2sp_rows", "uniform when loki.positions is given (the |KVA| weights are made from the scores)", "kva")
        if c.get("loki.strategy") in NO_SCORE_STRATEGIES:
            c.fail("loki.l2sp_rows", "uniform with loki.strategy=" + str(c.get("loki.strategy")) + " (it reads no scores to weight the rows by)", "kva")
    if c.get("loki.quota") != "uniform":
        if positions is not None:
            c.fail("loki.quota", "uniform when loki.positions is given (a per-layer quota is made from the scores)", c.get("loki.quota"))
        if not str(c.get("loki.strategy")).startswith("layer_balanced"):
            c.fail("loki.quota", "uniform with loki.strategy=" + str(c.get("loki.strategy")) + " (a quota applies to the layer_balanced strategies)", c.get("loki.quota"))
    if positions is None or positions == "published":
        # selection (and the published files, which are per q) need q
        c.number("loki.q", 0, 1, low_open=True, high_open=True)
    else:
        c.number("loki.q", 0, 1, low_open=True, high_open=True, optional=True)
        if not isinstance(positions, str) or not Path(positions).expanduser().is_file():
            c.fail("loki.positions", "null, published, or an existing positions JSON file", positions)
    if positions is None and c.get("loki.strategy") not in NO_SCORE_STRATEGIES:  # the controls read no store
        scores = c.get("loki.scores")
        if scores != "auto":
            from loki.store import ScoreStore

            if not isinstance(scores, str) or not ScoreStore.exists(Path(scores).expanduser()):
                c.fail("loki.scores", "auto or the directory of a finished attribution store", scores)
        c.boolean("loki.analyse_if_missing")
        c.boolean("loki.use_shipped")
        _check_kva_and_data(c)  # read only when selecting from scores
        if c.get("evaluate.retention"):
            from loki.eval import check_disjoint

            # Retention is never measured on the prompts the attribution stage reads.
            check_disjoint(c.get("data"), c.get("eval"))
    # lora.rank > k needs the model's width: LokiCallback checks it right after the model is loaded.
