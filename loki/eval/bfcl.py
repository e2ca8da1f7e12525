"""Function calling scored with the Berkeley Function Calling Leaderboard's own code (`bfcl-eval`).

Flow per test entry, as BFCL runs a local "prompting" model (its OSS handler): the package's system
prompt listing the functions (`system_prompt_pre_processing_chat_model`, with its language hint) ->
the model's chat template -> greedy generation -> the package's decoder
(`default_decode_ast_prompting`) -> the package's `ast_checker` against `possible_answer` (Java and
JavaScript entries in their own syntax). Irrelevance entries are correct when the output decodes to no
function call, live_relevance entries when it decodes to one (BFCL's relevance rule). Every category that
needs no execution, multi-turn state or web access is scored (`AST_CATEGORIES`), and summarised as the
leaderboard does (`leaderboard_aggregates`).

bfcl-eval is imported lazily and needs only a few of its declared dependencies for this path
(see `_import_bfcl`). Its `ast_checker` module imports the package's model registry
(`constants.model_config`), which imports every API client (openai, anthropic, cohere, ...); when
those are absent we give that one import a stand-in registry whose only use by the checker,
`underscore_to_dot`, is False, as for every locally served prompting model. The checker code itself
runs unchanged.
"""

from __future__ import annotations

import copy
import functools
import json
import logging
import os
import sys
import tempfile
import types
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from loki.device import model_device, pad_batch, pad_token_id
from loki.errors import LokiError

log = logging.getLogger(__name__)

# Every category bfcl-eval scores with its AST checker or its relevance rule, offline (no execution, no
# multi-turn state, no web): the leaderboard's non-live, live and hallucination columns.
NON_LIVE_AST = ("simple_python", "simple_java", "simple_javascript", "multiple", "parallel", "parallel_multiple")
LIVE_AST = ("live_simple", "live_multiple", "live_parallel", "live_parallel_multiple")
AST_CATEGORIES = (*NON_LIVE_AST, "irrelevance", *LIVE_AST, "live_irrelevance", "live_relevance")
# The five categories this project reported first (their unweighted mean is `bfcl/core5/acc`).
CORE_CATEGORIES = ("simple", "multiple", "parallel", "parallel_multiple", "irrelevance")
# BFCL v3+ renamed the Python "simple" set; users may say either.
CATEGORY_ALIASES = {"simple": "simple_python"}
# A registry key of a locally served prompting model (underscore_to_dot=False): what the checker is told.
CHECKER_MODEL_NAME = "Qwen/Qwen3-8B"
# Where load_category keeps each entry's function docs as the file has them (what the checker reads).
CHECKER_FUNCTIONS_KEY = "checker_function"
INSTALL_HINT = (
    "pip install --no-deps bfcl-eval==2026.3.23 && pip install tree_sitter==0.21.3 tree-sitter-java==0.21.0 "
    "tree-sitter-javascript==0.21.4 tenacity"
)


class _LocalModelConfig:
    underscore_to_dot = False


class _AnyModelRegistry(dict):
    def __missing__(self, key):
        return _LocalModelConfig()


@functools.cache
def _import_bfcl() -> types.SimpleNamespace:
    """The bfcl-eval functions used here, imported on first use."""
    # Importing bfcl_eval creates result/score/lock dirs under its project root; keep them out of site-packages.
    os.environ.setdefault("BFCL_PROJECT_ROOT", str(Path(tempfile.gettempdir()) / "loki_bfcl"))
    try:
        from bfcl_eval.constants.category_mapping import VERSION_PREFIX
        from bfcl_eval.constants.enums import Language, ReturnFormat
        from bfcl_eval.constants.eval_config import PROMPT_PATH
        from bfcl_eval.model_handler.utils import default_decode_ast_prompting, system_prompt_pre_processing_chat_model
        from bfcl_eval.utils import (
            add_language_specific_hint_to_function_doc,
            is_empty_output,
            is_function_calling_format_output,
            load_file,
        )
    except ImportError as err:
        raise LokiError(f"task.eval.kind=bfcl needs the bfcl-eval package ({err}); install it with: {INSTALL_HINT}") from None
    registry_name = "bfcl_eval.constants.model_config"
    stand_in = None
    if registry_name not in sys.modules:
        try:
            import bfcl_eval.constants.model_config  # noqa: F401  (the full install: use the real registry)
        except ImportError:
            stand_in = types.ModuleType(registry_name)
            stand_in.MODEL_CONFIG_MAPPING = _AnyModelRegistry()
            sys.modules[registry_name] = stand_in
    try:
        from bfcl_eval.eval_checker.ast_eval.ast_checker import ast_checker
    finally:
        if stand_in is not None:
            del sys.modules[registry_name]  # the checker keeps its reference; nothing else sees the stand-in
    return types.SimpleNamespace(
        VERSION_PREFIX=VERSION_PREFIX,
        Language=Language,
        ReturnFormat=ReturnFormat,
        PROMPT_PATH=Path(PROMPT_PATH),
        decode=default_decode_ast_prompting,
        system_prompt=system_prompt_pre_processing_chat_model,
        add_hint=add_language_specific_hint_to_function_doc,
        is_empty_output=is_empty_output,
        is_call_format=is_function_calling_format_output,
        load_file=load_file,
        ast_checker=ast_checker,
    )


def load_category(category: str, data_dir: str | Path | None = None, max_samples: int | None = None):
    """(entries, ground truths or None) of one BFCL category from the package's data or a local copy."""
    bfcl = _import_bfcl()
    from loki.data.chat import resolve_path

    name = CATEGORY_ALIASES.get(category, category)
    root = resolve_path(data_dir) if data_dir else bfcl.PROMPT_PATH
    file = root / f"{bfcl.VERSION_PREFIX}_{name}.json"
    if not file.is_file():
        raise LokiError(f"BFCL category '{category}' has no file '{file}'; check task.eval.categories and task.eval.data_dir.")
    entries = bfcl.load_file(file)
    answers = None
    if "relevance" not in name:  # irrelevance and live_relevance entries have no ground truth
        answer_file = root / "possible_answer" / file.name
        if not answer_file.is_file():
            raise LokiError(f"BFCL category '{category}' has no possible answers at '{answer_file}'.")
        by_id = {a["id"]: a["ground_truth"] for a in bfcl.load_file(answer_file)}
        answers = [by_id[e["id"]] for e in entries]
    if max_samples is not None and int(max_samples) < len(entries):
        entries = entries[: int(max_samples)]
        answers = answers[: int(max_samples)] if answers is not None else None
    hinted = bfcl.add_hint(copy.deepcopy(entries))  # as BFCL's generation step does
    for entry, original in zip(hinted, entries):
        # BFCL's checker reads the function docs as the test file has them (the hint step rewrites
        # Java/JavaScript parameter types to "string").
        entry[CHECKER_FUNCTIONS_KEY] = original["function"]
    return hinted, answers


def entry_messages(entry: Mapping[str, Any]) -> list[dict[str, str]]:
    """The first (only, for AST categories) turn with BFCL's function-listing system prompt in front."""
    bfcl = _import_bfcl()
    return bfcl.system_prompt(copy.deepcopy(entry["question"][0]), entry["function"], entry["id"])


@torch.no_grad()
def generate_responses(
    model, tokenizer, prompts: Sequence[list[dict]], max_new_tokens: int = 256, batch_size: int = 4, max_length: int = 4096
) -> list[str]:
    """Greedy completions of chat prompts, left-padded in batches; special tokens stripped."""
    device = model_device(model)
    pad = pad_token_id(tokenizer)
    encoded = []
    for messages in prompts:
        text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        ids = list(tokenizer(text, add_special_tokens=False)["input_ids"])
        if len(ids) > max_length:
            raise LokiError(f"a BFCL prompt has {len(ids)} tokens, more than task.eval.max_length={max_length}.")
        encoded.append(ids)
    outputs: list[str] = [""] * len(encoded)
    order = sorted(range(len(encoded)), key=lambda i: -len(encoded[i]))
    for start in range(0, len(order), batch_size):
        chunk = order[start : start + batch_size]
        input_ids, attention_mask = pad_batch([encoded[i] for i in chunk], pad, side="left")
        width = input_ids.shape[1]
        generated = model.generate(
            input_ids=input_ids.to(device),
            attention_mask=attention_mask.to(device),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=pad,
            eos_token_id=tokenizer.eos_token_id,
        )
        for row, i in enumerate(chunk):
            outputs[i] = tokenizer.decode(generated[row, width:].tolist(), skip_special_tokens=True)
    return outputs


def _formats(name: str):
    """(checker language, decoder return format) of a category, as bfcl-eval's ast_file_runner picks them."""
    bfcl = _import_bfcl()
    if "javascript" in name:
        return bfcl.Language.JAVASCRIPT, bfcl.ReturnFormat.JAVASCRIPT
    if "java" in name:
        return bfcl.Language.JAVA, bfcl.ReturnFormat.JAVA
    return bfcl.Language.PYTHON, bfcl.ReturnFormat.PYTHON


def check_response(entry: Mapping[str, Any], response: str, ground_truth: Any, category: str) -> dict[str, Any]:
    """BFCL's verdict on one raw model response: {"valid": bool, "error_type": ...}.

    (Ir)relevance categories follow bfcl-eval's relevance rule: an output that decodes (as Python calls) to a
    non-empty call list is a call; irrelevance wants none, live_relevance wants one."""
    bfcl = _import_bfcl()
    name = CATEGORY_ALIASES.get(category, category)
    if "relevance" in name:
        try:
            decoded = bfcl.decode(response, bfcl.ReturnFormat.PYTHON, False)
            has_call = not bfcl.is_empty_output(decoded)
        except Exception:  # not decodable as calls: BFCL counts that as "no call"
            has_call = False
        if "irrelevance" in name:
            return {"valid": not has_call, "error_type": "irrelevance_error:decoder_success" if has_call else None}
        return {"valid": has_call, "error_type": None if has_call else "relevance_error:decoder_failed"}
    language, return_format = _formats(name)
    try:
        decoded = bfcl.decode(response, return_format, False)
    except Exception:
        return {"valid": False, "error_type": "ast_decoder:decoder_failed"}
    if not bfcl.is_call_format(decoded):
        return {"valid": False, "error_type": "ast_decoder:decoder_wrong_output_format"}
    functions = entry.get(CHECKER_FUNCTIONS_KEY, entry["function"])
    verdict = bfcl.ast_checker(functions, decoded, ground_truth, language, name, CHECKER_MODEL_NAME)
    return {"valid": bool(verdict["valid"]), "error_type": verdict.get("error_type")}


def leaderboard_aggregates(acc: Mapping[str, float], counts: Mapping[str, int]) -> dict[str, float]:
    """The BFCL leaderboard's summary columns from per-category accuracies (keys: canonical category names),
    as bfcl-eval's `generate_leaderboard_csv` computes them, over the categories present:

    - non_live: unweighted mean of [simple (unweighted mean of simple_python/java/javascript), multiple,
      parallel, parallel_multiple];
    - live: mean of live_simple/multiple/parallel/parallel_multiple weighted by their entry counts;
    - hallucination/irrelevance: unweighted mean of irrelevance and live_irrelevance;
      hallucination/relevance: live_relevance (not part of the overall, as on the leaderboard);
    - overall: the leaderboard's overall weights restricted to the AST columns (non_live 10, live 10,
      irrelevance 10, renormalised: their mean). The leaderboard's own overall also gives multi-turn and
      agentic categories 70 % of the weight; those cannot be scored offline, so this is not that number.
    A missing category is left out here (the leaderboard would count it 0).
    """
    def mean(values):
        values = [v for v in values if v is not None]
        return sum(values) / len(values) if values else None

    simple = mean([acc.get(c) for c in ("simple_python", "simple_java", "simple_javascript")])
    groups = {
        "non_live": mean([simple, *(acc.get(c) for c in ("multiple", "parallel", "parallel_multiple"))]),
        "live": None,
        "irrelevance": mean([acc.get("irrelevance"), acc.get("live_irrelevance")]),
    }
    live = [c for c in LIVE_AST if c in acc]
    if live:
        groups["live"] = sum(acc[c] * counts[c] for c in live) / sum(counts[c] for c in live)
    names = {"non_live": "bfcl/non_live/acc", "live": "bfcl/live/acc", "irrelevance": "bfcl/hallucination/irrelevance_acc"}
    out = {names[k]: v for k, v in groups.items() if v is not None}
    if "live_relevance" in acc:
        out["bfcl/hallucination/relevance_acc"] = acc["live_relevance"]
    overall = mean(list(groups.values()))
    if overall is not None:
        out["bfcl/overall/acc"] = overall
    return out


def evaluate_bfcl(model, tokenizer, cfg: Any, stage: str = "test") -> dict[str, float]:
    """Per-category accuracy (`bfcl/<category>/acc`), the leaderboard's summary columns
    (`leaderboard_aggregates`: `bfcl/non_live/acc`, `bfcl/live/acc`, `bfcl/hallucination/irrelevance_acc`,
    `bfcl/hallucination/relevance_acc`, `bfcl/overall/acc`), the unweighted mean of the five categories this project
    first reported (`bfcl/core5/acc`, when all five ran) and the accuracy over all entries
    (`bfcl/overall/acc_micro`). Categories: `categories` (default: every AST category, `AST_CATEGORIES`).

    `stage="val"` caps each category at `val_max_samples` instead of `max_samples`."""
    from loki.tasks import settings_of

    cfg = settings_of("bfcl", cfg)
    categories = list(cfg.categories or AST_CATEGORIES)
    per_category = cfg.val_max_samples if stage == "val" else cfg.max_samples
    metrics: dict[str, float] = {}
    acc: dict[str, float] = {}
    counts: dict[str, int] = {}
    correct_total = count_total = 0
    for category in categories:
        entries, answers = load_category(category, cfg.data_dir, per_category)
        responses = generate_responses(
            model,
            tokenizer,
            [entry_messages(e) for e in entries],
            int(cfg.max_new_tokens),
            int(cfg.batch_size),
            int(cfg.max_length),
        )
        verdicts = [
            check_response(e, r, answers[i] if answers is not None else None, category)
            for i, (e, r) in enumerate(zip(entries, responses))
        ]
        correct = sum(v["valid"] for v in verdicts)
        metrics[f"bfcl/{category}/acc"] = correct / len(verdicts)
        name = CATEGORY_ALIASES.get(category, category)
        acc[name], counts[name] = correct / len(verdicts), len(verdicts)
        correct_total += correct
        count_total += len(verdicts)
        if cfg.log_responses:
            for e, r, v in zip(entries, responses, verdicts):
                log.info("bfcl %s: %s -> %s", e["id"], json.dumps(r), v)
    metrics.update(leaderboard_aggregates(acc, counts))
    core = [CATEGORY_ALIASES.get(c, c) for c in CORE_CATEGORIES]
    if all(c in acc for c in core):
        metrics["bfcl/core5/acc"] = sum(acc[c] for c in core) / len(core)
    metrics["bfcl/overall/acc_micro"] = correct_total / max(count_total, 1)
    return metrics
