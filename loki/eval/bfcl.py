"""Function calling scored with the Berkeley Function Calling Leaderboard's own code (`bfcl-eval`).

Flow per test entry, as BFCL runs a local "prompting" model (its OSS handler): the package's system
prompt listing the functions (`system_prompt_pre_processing_chat_model`, with its language hint) ->
the model's chat template -> greedy generation -> the package's decoder
(`default_decode_ast_prompting`) -> the package's `ast_checker` against `possible_answer`. Irrelevance
entries are correct when the output decodes to no function call (BFCL's relevance rule).

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

from loki.errors import LokiError
from loki.eval.reranker import _model_device

log = logging.getLogger(__name__)

AST_CATEGORIES = ("simple", "multiple", "parallel", "parallel_multiple", "irrelevance")
# BFCL v3+ renamed the Python "simple" set; users may say either.
CATEGORY_ALIASES = {"simple": "simple_python"}
# A registry key of a locally served prompting model (underscore_to_dot=False): what the checker is told.
CHECKER_MODEL_NAME = "Qwen/Qwen3-8B"
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
    if "irrelevance" not in name:
        answer_file = root / "possible_answer" / file.name
        if not answer_file.is_file():
            raise LokiError(f"BFCL category '{category}' has no possible answers at '{answer_file}'.")
        by_id = {a["id"]: a["ground_truth"] for a in bfcl.load_file(answer_file)}
        answers = [by_id[e["id"]] for e in entries]
    if max_samples is not None and int(max_samples) < len(entries):
        entries = entries[: int(max_samples)]
        answers = answers[: int(max_samples)] if answers is not None else None
    entries = bfcl.add_hint(copy.deepcopy(entries))  # as BFCL's generation step does
    return entries, answers


def entry_messages(entry: Mapping[str, Any]) -> list[dict[str, str]]:
    """The first (only, for AST categories) turn with BFCL's function-listing system prompt in front."""
    bfcl = _import_bfcl()
    return bfcl.system_prompt(copy.deepcopy(entry["question"][0]), entry["function"], entry["id"])


@torch.no_grad()
def generate_responses(
    model, tokenizer, prompts: Sequence[list[dict]], max_new_tokens: int = 256, batch_size: int = 4, max_length: int = 4096
) -> list[str]:
    """Greedy completions of chat prompts, left-padded in batches; special tokens stripped."""
    device = _model_device(model)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
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
        width = max(len(encoded[i]) for i in chunk)
        input_ids = torch.full((len(chunk), width), pad, dtype=torch.long)
        attention_mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for row, i in enumerate(chunk):
            n = len(encoded[i])
            input_ids[row, width - n :] = torch.tensor(encoded[i], dtype=torch.long)
            attention_mask[row, width - n :] = 1
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


def check_response(entry: Mapping[str, Any], response: str, ground_truth: Any, category: str) -> dict[str, Any]:
    """BFCL's verdict on one raw model response: {"valid": bool, "error_type": ...}."""
    bfcl = _import_bfcl()
    name = CATEGORY_ALIASES.get(category, category)
    if "irrelevance" in name:
        try:
            decoded = bfcl.decode(response, bfcl.ReturnFormat.PYTHON, False)
            has_call = not bfcl.is_empty_output(decoded)
        except Exception:  # not decodable as calls: BFCL counts that as "no call"
            has_call = False
        return {"valid": not has_call, "error_type": "irrelevance_error:decoder_success" if has_call else None}
    try:
        decoded = bfcl.decode(response, bfcl.ReturnFormat.PYTHON, False)
    except Exception:
        return {"valid": False, "error_type": "ast_decoder:decoder_failed"}
    if not bfcl.is_call_format(decoded):
        return {"valid": False, "error_type": "ast_decoder:decoder_wrong_output_format"}
    verdict = bfcl.ast_checker(entry["function"], decoded, ground_truth, bfcl.Language.PYTHON, name, CHECKER_MODEL_NAME)
    return {"valid": bool(verdict["valid"]), "error_type": verdict.get("error_type")}


def evaluate_bfcl(model, tokenizer, cfg: Mapping[str, Any], stage: str = "test") -> dict[str, float]:
    """Per-category accuracy (`bfcl/<category>/acc`), their unweighted mean (`bfcl/overall/acc`, as the
    leaderboard averages categories) and the accuracy over all entries (`bfcl/overall/acc_micro`).

    `stage="val"` caps each category at `val_max_samples` instead of `max_samples`."""
    get = cfg.get
    categories = list(get("categories") or AST_CATEGORIES)
    per_category = get("val_max_samples") if stage == "val" else get("max_samples")
    metrics: dict[str, float] = {}
    correct_total = count_total = 0
    for category in categories:
        entries, answers = load_category(category, get("data_dir"), per_category)
        responses = generate_responses(
            model,
            tokenizer,
            [entry_messages(e) for e in entries],
            int(get("max_new_tokens", 256)),
            int(get("batch_size", 4)),
            int(get("max_length", 4096)),
        )
        verdicts = [
            check_response(e, r, answers[i] if answers is not None else None, category)
            for i, (e, r) in enumerate(zip(entries, responses))
        ]
        correct = sum(v["valid"] for v in verdicts)
        metrics[f"bfcl/{category}/acc"] = correct / len(verdicts)
        correct_total += correct
        count_total += len(verdicts)
        if get("log_responses", False):
            for e, r, v in zip(entries, responses, verdicts):
                log.info("bfcl %s: %s -> %s", e["id"], json.dumps(r), v)
    metrics["bfcl/overall/acc"] = sum(metrics[f"bfcl/{c}/acc"] for c in categories) / len(categories)
    metrics["bfcl/overall/acc_micro"] = correct_total / max(count_total, 1)
    return metrics
