"""Retention of general ability: MMLU-schema multiple choice, scored two ways, plus a graded measure.

- `letter`: the lettered zero-shot prompt in the chat template (loki.data.mmlu); the prediction is the
  letter A-D with the highest next-token logit (instruct models on MMLU).
- `cloze`: each choice's text is scored as a continuation of the question (lm-eval's HellaSwag-style
  scoring): `acc` picks the highest summed log-probability, `acc_norm` the highest per byte of the
  choice text (lm-eval's length normalisation).

Graded measures, because 4-way accuracy saturates and hides damage: `logprob` is the mean log of the
probability of the correct choice renormalised over the four choices (letters' softmax, or softmax
over the choices' summed log-probabilities), `prob` the mean of that probability (0.25 = chance).

Keys returned: `retention/<benchmark>/<measure>`; `<benchmark>` is the key under `eval.benchmarks`.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from loki.eval.reranker import _model_device, last_token_logits

log = logging.getLogger(__name__)


def _pad_id(tokenizer) -> int:
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


def _encode(tokenizer, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def _summarise(choice_scores: torch.Tensor, answers: torch.Tensor) -> dict[str, float]:
    """Accuracy and the graded measures from [N, C] scores (logits or summed log-probabilities)."""
    log_probs = torch.log_softmax(choice_scores.double(), dim=-1)
    gold = log_probs[torch.arange(len(answers)), answers]
    return {
        "acc": float((choice_scores.argmax(-1) == answers).double().mean()),
        "logprob": float(gold.mean()),
        "prob": float(gold.exp().mean()),
    }


def score_letter(model, tokenizer, examples: Sequence[Mapping], batch_size: int = 8) -> dict[str, float]:
    from loki.data.mmlu import letter_token_ids, mc_prompt_ids

    letter_ids = letter_token_ids(tokenizer)
    prompts = [mc_prompt_ids(tokenizer, ex) for ex in examples]
    logits = last_token_logits(model, prompts, _pad_id(tokenizer), batch_size)
    letter_logits = torch.stack([row[letter_ids] for row in logits])
    answers = torch.tensor([int(ex["answer"]) for ex in examples])
    return _summarise(letter_logits, answers)


@torch.no_grad()
def continuation_logprobs(
    model, contexts: Sequence[Sequence[int]], continuations: Sequence[Sequence[int]], pad_token_id: int, batch_size: int = 8
) -> list[float]:
    """Sum of log p(continuation token | everything before it) for each (context, continuation) pair."""
    device = _model_device(model)
    sequences = [list(c) + list(x) for c, x in zip(contexts, continuations)]
    order = sorted(range(len(sequences)), key=lambda i: -len(sequences[i]))
    out = [0.0] * len(sequences)
    for start in range(0, len(order), batch_size):
        chunk = order[start : start + batch_size]
        width = max(len(sequences[i]) for i in chunk)
        input_ids = torch.full((len(chunk), width), pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for row, i in enumerate(chunk):  # right padding: exact for causal attention
            input_ids[row, : len(sequences[i])] = torch.tensor(sequences[i], dtype=torch.long)
            attention_mask[row, : len(sequences[i])] = 1
        logits = model(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device)).logits
        for row, i in enumerate(chunk):
            n_ctx, n_cont = len(contexts[i]), len(continuations[i])
            # logits at position p predict token p+1: the continuation is predicted from n_ctx-1 .. n_ctx+n_cont-2
            step_logits = logits[row, n_ctx - 1 : n_ctx + n_cont - 1].float()
            targets = torch.tensor(list(continuations[i]), device=step_logits.device)
            out[i] = float(torch.log_softmax(step_logits, -1).gather(-1, targets[:, None]).sum())
    return out


def cloze_context(tokenizer, example: Mapping, chat_template: bool = True) -> tuple[str, str]:
    """(context text, separator before each choice): the question in a user turn with the generation
    prompt, or lm-eval's plain "Question: ...\\nAnswer:" with a space before the choice."""
    if chat_template:
        messages = [{"role": "user", "content": str(example["question"])}]
        return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False), ""
    return f"Question: {example['question']}\nAnswer:", " "


def score_cloze(
    model, tokenizer, examples: Sequence[Mapping], batch_size: int = 8, chat_template: bool = True
) -> dict[str, float]:
    contexts, continuations, choice_bytes = [], [], []
    for ex in examples:
        context, separator = cloze_context(tokenizer, ex, chat_template)
        context_ids = _encode(tokenizer, context)
        for choice in ex["choices"]:
            contexts.append(context_ids)
            continuations.append(_encode(tokenizer, separator + str(choice)))
            choice_bytes.append(max(1, len((separator + str(choice)).encode("utf-8"))))
    sums = continuation_logprobs(model, contexts, continuations, _pad_id(tokenizer), batch_size)
    n_choices = len(examples[0]["choices"])
    scores = torch.tensor(sums, dtype=torch.float64).view(len(examples), n_choices)
    per_byte = scores / torch.tensor(choice_bytes, dtype=torch.float64).view(len(examples), n_choices)
    answers = torch.tensor([int(ex["answer"]) for ex in examples])
    out = _summarise(scores, answers)
    out["acc_norm"] = float((per_byte.argmax(-1) == answers).double().mean())
    return out


def run_benchmark(model, tokenizer, name: str, bench: Mapping[str, Any], batch_size: int = 8) -> dict[str, float]:
    from loki.data.chat import resolve_path
    from loki.data.mmlu import load_mmlu
    from loki.errors import LokiError

    get = bench.get
    path = get("path")
    examples = load_mmlu(
        source=get("source", "cais/mmlu"),
        path=resolve_path(path) if path else None,
        split=get("split", "test"),
        subjects=get("subjects"),
        per_subject=get("per_subject", 50),
        max_samples=get("max_samples"),
        seed=int(get("seed", 0) or 0),
    )
    mode = get("mode", "letter")
    if mode == "letter":
        scores = score_letter(model, tokenizer, examples, batch_size)
    elif mode == "cloze":
        scores = score_cloze(model, tokenizer, examples, batch_size, bool(get("chat_template", True)))
    else:
        raise LokiError(f"eval.benchmarks.{name}.mode must be 'letter' or 'cloze', got {mode!r}.")
    scores["n"] = float(len(examples))
    return {f"retention/{name}/{measure}": value for measure, value in scores.items()}


def run_lm_eval(model, tokenizer, lm_eval_cfg: Mapping[str, Any] | None) -> dict[str, float]:
    """Optional lm-evaluation-harness tasks on the in-memory model; {} (with a warning) without lm_eval."""
    tasks = list((lm_eval_cfg or {}).get("tasks") or [])
    if not tasks:
        return {}
    try:
        import lm_eval
        from lm_eval.models.huggingface import HFLM
    except ImportError:
        log.warning(
            "eval.lm_eval.tasks=%s skipped: lm-evaluation-harness is not installed (pip install lm-eval).", tasks
        )
        return {}
    get = lm_eval_cfg.get
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=int(get("batch_size", 8)))
    results = lm_eval.simple_evaluate(
        model=lm,
        tasks=tasks,
        num_fewshot=get("num_fewshot"),
        limit=get("limit"),
        apply_chat_template=bool(get("apply_chat_template", False)),
    )["results"]
    out = {}
    for task, measures in results.items():
        for key, value in measures.items():
            measure, _, filter_name = key.partition(",")
            if isinstance(value, (int, float)) and not isinstance(value, bool) and "stderr" not in measure:
                suffix = measure if filter_name in ("", "none") else f"{measure}_{filter_name}"
                out[f"retention/lm_eval/{task}/{suffix}"] = float(value)
    return out


def run_retention(model, tokenizer, retention_cfg: Mapping[str, Any]) -> dict[str, float]:
    """Every benchmark under `retention_cfg.benchmarks` (name -> settings), then the lm-eval tasks."""
    was_training = getattr(model, "training", False)
    model.eval()
    try:
        out: dict[str, float] = {}
        batch_size = int(retention_cfg.get("batch_size", 8))
        for name, bench in (retention_cfg.get("benchmarks") or {}).items():
            if bench is None or not bench.get("enabled", True):
                continue
            out.update(run_benchmark(model, tokenizer, name, bench, batch_size))
        out.update(run_lm_eval(model, tokenizer, retention_cfg.get("lm_eval")))
        return out
    finally:
        if was_training:
            model.train()

