"""The attribution stage (Analyse): KVA scores of every down_proj row over MMLU prompts, into a store.

One name for one stage: `attribute.py` runs it, this module holds its inputs and its run, the `kva` and
`data` config groups hold its settings, `loki.lightning.attribution` is its Lightning predict loop over
`loki.kva.attribute` (the maths), and `loki.store` keeps the results under `<cache>/attribution/`.

- Inputs, in plain torch: settings checks (`check_kva_settings`), MMLU prompts with targets, batching.
- The run (`settings`, `default_store`, `run`), shared by `attribute.py` and `train.py` (which analyses
  when `loki.scores=auto` finds no store). Both entry points compose the same config groups, and the
  store's directory comes from one function of those settings (`loki.store.store_dir`), so they always
  agree on where a store is and never reuse one made with other settings.
Nothing here imports Lightning at module level.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from loki.data.mmlu import answer_token_id, mc_prompt_ids
from loki.device import pad_batch
from loki.errors import LokiError
from loki.kva import OBJECTIVES, SCOPES, resolve_recipe
from loki.prompts import CLOZE_PROMPT_FORMAT, LETTER_PROMPT_FORMAT, cloze_context
from loki.store import ScoreStore, store_dir

TARGET_MODES = ("predicted", "gold")


def check_kva_settings(kva: dict) -> dict:
    """Cheap checks of the settings alone, before data or model loading. Returns the settings with the
    recipe's own scope and activation factor filled in where they were left null (so two spellings of
    the same recipe key the same store)."""
    if kva.get("scope") not in (*SCOPES, None):
        raise LokiError(f"kva.scope must be one of {', '.join(SCOPES)} (or null for the recipe's own), got {kva.get('scope')!r}.")
    if kva.get("objective") not in OBJECTIVES:
        raise LokiError(f"kva.objective must be one of {', '.join(OBJECTIVES)}, got {kva.get('objective')!r}.")
    if kva.get("target") not in TARGET_MODES:
        raise LokiError(f"kva.target must be one of {', '.join(TARGET_MODES)}, got {kva.get('target')!r}.")
    steps = kva.get("steps")
    if not isinstance(steps, int) or isinstance(steps, bool) or steps < 1:
        raise LokiError(f"kva.steps must be a positive integer, got {steps!r}.")
    kva = dict(kva)
    # The config calls the KVA variant `kva.variant`; `kva.recipe` is its old name (still read, and it wins,
    # since a user typed it). Inside, it is `recipe`: loki.kva.attribute's argument and the stores' meta key.
    variant = kva.pop("variant", None)
    recipe = kva.get("recipe") or variant or "paper"
    try:
        scope, times_activation = resolve_recipe(recipe, kva.get("scope"), kva.get("times_activation"), steps)
    except LokiError as err:  # name the config keys
        raise LokiError(f"kva settings do not fit together: {err}") from None
    return {**kva, "recipe": recipe, "scope": scope, "times_activation": times_activation}


PROMPT_STYLES = ("letter", "cloze")


def _cloze_prompt(tokenizer: Any, row: dict) -> tuple[list[int], int]:
    """The question alone in a user turn plus the generation prompt, and the first token of the right
    answer's text: where a model that answers in words (the toy) states its answer."""
    context, separator = cloze_context(tokenizer, row, chat_template=True)
    answer = separator + str(row["choices"][int(row["answer"])])
    return list(tokenizer(context, add_special_tokens=False)["input_ids"]), tokenizer(answer, add_special_tokens=False)["input_ids"][0]


def build_prompts(
    rows: Sequence[dict], tokenizer: Any, target: str = "predicted", system_prompt: str | None = None, style: str = "letter"
) -> list[dict]:
    """One item per MMLU row: {id, input_ids, target}; target = gold token id, or -1 (the model's argmax).

    `style="letter"`: the lettered zero-shot prompt, gold = the answer letter (instruct models);
    `style="cloze"`: the bare question, gold = the first token of the answer text (the toy)."""
    if style not in PROMPT_STYLES:
        raise LokiError(f"data.prompt must be one of {', '.join(PROMPT_STYLES)}, got {style!r}.")
    if not rows:
        raise LokiError("the attribution dataset is empty; check data.path, data.subjects and the caps.")
    if target not in TARGET_MODES:
        raise LokiError(f"kva.target must be one of {', '.join(TARGET_MODES)}, got {target!r}.")
    ids = [row["id"] for row in rows]
    if len(set(ids)) != len(ids):
        duplicate = next(i for i in ids if ids.count(i) > 1)
        raise LokiError(f"sample id '{duplicate}' occurs twice in the attribution dataset; ids must be unique.")
    if style == "cloze":
        prompts = []
        for row in rows:
            input_ids, gold = _cloze_prompt(tokenizer, row)
            prompts.append({"id": row["id"], "input_ids": input_ids, "target": gold if target == "gold" else -1})
        return prompts
    return [
        {
            "id": row["id"],
            "input_ids": mc_prompt_ids(tokenizer, row, system_prompt),
            "target": answer_token_id(tokenizer, row, system_prompt) if target == "gold" else -1,
        }
        for row in rows
    ]


def context_length(model: torch.nn.Module) -> int | None:
    config = getattr(model, "config", None)
    for key in ("max_position_embeddings", "n_positions", "max_sequence_length"):
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def check_prompts(prompts: Sequence[dict], max_length: int | None) -> None:
    """Stop before any model work on an empty dataset or a prompt the model cannot read in one pass."""
    if not prompts:
        raise LokiError("the attribution dataset is empty; check data.path, data.subjects and the caps.")
    if max_length is not None:
        for prompt in prompts:
            if len(prompt["input_ids"]) > max_length:
                raise LokiError(
                    f"the prompt of sample '{prompt['id']}' has {len(prompt['input_ids'])} tokens, more than the "
                    f"model's context of {max_length}; leave its subject out of data.subjects or use a longer-context model."
                )


def prompt_format(style: str) -> str:
    """The versioned name of a prompt style, recorded in the store's meta."""
    return CLOZE_PROMPT_FORMAT if style == "cloze" else LETTER_PROMPT_FORMAT


class PadCollate:
    """Left-pads prompts into a batch (attribute() finds the last real token with either padding side)."""

    def __init__(self, pad_token_id: int, with_targets: bool):
        self.pad_token_id = int(pad_token_id)
        self.with_targets = with_targets

    def __call__(self, items: list[dict]) -> dict:
        input_ids, attention_mask = pad_batch([item["input_ids"] for item in items], self.pad_token_id, side="left")
        targets = torch.tensor([item["target"] for item in items], dtype=torch.long) if self.with_targets else None
        return {"ids": [item["id"] for item in items], "input_ids": input_ids, "attention_mask": attention_mask, "targets": targets}


# ------------------------------------------------------------------------------------------- the run

# load_mmlu's arguments among the data settings
MMLU_ARGS = ("source", "path", "split", "subjects", "offset", "per_subject", "max_samples", "seed")


def settings(cfg: Any) -> tuple[dict, dict]:
    """The resolved `kva` and `data` settings as plain dicts; a local data path made absolute (it is
    recorded in the store's meta, and the working directory must not matter)."""
    from omegaconf import OmegaConf

    from loki.data.chat import resolve_path

    kva = check_kva_settings(OmegaConf.to_container(cfg.kva, resolve=True))  # the recipe's defaults filled in
    data = OmegaConf.to_container(cfg.data, resolve=True)
    if data.get("path"):
        data["path"] = str(resolve_path(data["path"]).resolve())
    return kva, data


def default_store(cfg: Any) -> Path:
    """Where the store of this model and these settings lives (`loki.scores=auto`, `out_dir=auto`)."""
    kva, data = settings(cfg)
    return store_dir(cfg.paths.cache_dir, cfg.model.name, kva, data)


def load_rows(data: dict) -> list[dict]:
    from loki.data.mmlu import load_mmlu

    return load_mmlu(**{key: data[key] for key in MMLU_ARGS if key in data})


def run(
    cfg: Any,
    model: Any = None,
    tokenizer: Any = None,
    out_dir: str | Path | None = None,
    trainer_kwargs: dict | None = None,
    logger: Any = None,
    progress: bool = True,
) -> ScoreStore | None:
    """Analyse `cfg.model` (or the given, already loaded model) into its store; the store on rank 0."""
    from loki.lightning.attribution import run_attribution
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
            batch_size=kva["batch_size"],
            trainer_kwargs=trainer_kwargs,
            logger=logger,
            heatmap_q=kva["heatmap_q"],
            progress=progress,
        )
