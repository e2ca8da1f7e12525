"""The LB reranker task: prompt format, the relatedness scores, and BEIR ranking metrics.

Score of a (query, document) pair (`task.eval.score`): the model reads the reranker prompt in its chat
template; at the assistant's first token, with d the digit tokens "1".."7":
- `reference` (lightblue's `LBCrossEncoder`, which produced the numbers the paper compares against):
  p(d) = the digit's probability over the WHOLE vocabulary, kept only when the digit is among the 14
  most likely tokens (their vLLM call asks for `logprobs=14`) and 0 otherwise; the score is
  mean(p4..p7) - mean(p1..p4), in [-1/4, 1/4] (p4 sits in both means, as in their code);
- `expected`: softmax over the seven digit logits only (renormalised) and the expectation
  sum_d d * p(d), a continuous score in [1, 7] with few ties.

Evaluation (`evaluate_reranker`), as the LB reranker's was run: for each BEIR set of `task.eval.sets`
(default: its list, `loki.data.beir.LB_EVAL_SETS`), the first `max_queries` (250) judged test queries
sorted by id, BM25's top `top_n` (100) documents each, re-ranked by the model; BEIR's metrics
(`retrieval_metrics`) per set and their unweighted mean over sets.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from loki.device import pad_token_id
from loki.errors import LokiError
from loki.prompts import DIGITS, RERANKER_SYSTEM_PROMPT, reranker_messages, reranker_user_turn  # noqa: F401  (re-exported)

def _encode(tokenizer, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])  # the template wrote any BOS


def _prompt_text(tokenizer, query: str, text: str) -> str:
    return tokenizer.apply_chat_template(reranker_messages(query, text), add_generation_prompt=True, tokenize=False)


def digit_token_ids(tokenizer) -> list[int]:
    """Ids of "1".."7" as the model emits each right after the generation prompt (each must be one token)."""
    from loki.tokenizer import single_token_ids

    return single_token_ids(tokenizer, _prompt_text(tokenizer, "q", "t"), DIGITS, "digit")


# task.eval.score values: lightblue's reference score, or the expectation of the renormalised digit.
SCORES = ("reference", "expected")
# lightblue's LBCrossEncoder reads the first generated token's top-14 log-probabilities (vLLM logprobs=14).
REFERENCE_TOP_LOGPROBS = 14


def reference_digit_probs(logits: torch.Tensor, digit_ids: Sequence[int], top: int = REFERENCE_TOP_LOGPROBS) -> torch.Tensor:
    """[..., V] next-token logits -> [..., 7] probabilities of the digits over the whole vocabulary, 0 for
    a digit outside the `top` most likely tokens. A digit tied with the top-th logit counts as inside
    (vLLM's own top-k picks one of equal logits arbitrarily)."""
    logits = logits.float()
    log_probs = torch.log_softmax(logits, dim=-1)
    kth = torch.topk(logits, min(int(top), logits.shape[-1]), dim=-1).values[..., -1:]
    ids = torch.as_tensor(list(digit_ids), dtype=torch.long, device=logits.device)
    inside = logits.index_select(-1, ids) >= kth
    return torch.where(inside, log_probs.index_select(-1, ids).exp(), torch.zeros((), device=logits.device))


def reference_relatedness(digit_probs: torch.Tensor) -> torch.Tensor:
    """[..., 7] probabilities p1..p7 -> [...] mean(p4..p7) - mean(p1..p4), lightblue's score."""
    return digit_probs[..., 3:7].mean(-1) - digit_probs[..., 0:4].mean(-1)


def expected_relatedness(digit_logits: torch.Tensor) -> torch.Tensor:
    """[..., 7] logits of the digits 1..7 -> [...] expectation of the digit under their renormalised softmax."""
    probs = torch.softmax(digit_logits.float(), dim=-1)
    values = torch.arange(1, len(DIGITS) + 1, dtype=probs.dtype, device=probs.device)
    return (probs * values).sum(-1)


def _fit_prompt(tokenizer, query: str, text: str, max_length: int) -> list[int]:
    ids = _encode(tokenizer, _prompt_text(tokenizer, query, text))
    if len(ids) <= max_length:
        return ids
    # Cut the document, never the instructions or the generation prompt.
    overhead = len(_encode(tokenizer, _prompt_text(tokenizer, query, "")))
    budget = max_length - overhead
    if budget <= 0:
        raise LokiError(f"a reranker prompt without its document is already longer than max_length={max_length}.")
    text_ids = _encode(tokenizer, text)[:budget]
    ids = _encode(tokenizer, _prompt_text(tokenizer, query, tokenizer.decode(text_ids)))
    return ids[:max_length] if len(ids) > max_length else ids




@torch.no_grad()
def last_token_logits(model, sequences: Sequence[Sequence[int]], pad_token_id: int, batch_size: int = 8) -> list[torch.Tensor]:
    """The next-token logits after each sequence, batched with right padding (exact: causal attention
    never looks at the padding on the right, and positions stay 0..n-1). Longest first for even batches.
    The output head runs at each sequence's last position only (`logits_to_keep`), on the model's device."""
    from loki.eval.retention import next_token_logits

    return next_token_logits(model, sequences, pad_token_id, batch_size)


def check_score(score: Any) -> str:
    if score not in SCORES:
        raise LokiError(f"task.eval.score must be one of {', '.join(SCORES)}, got {score!r}.")
    return str(score)


def score_pairs(
    model, tokenizer, pairs: Sequence[tuple[str, str]], batch_size: int = 8, max_length: int = 1024,
    score: str = "expected",
) -> torch.Tensor:
    """The relatedness score (`score`: reference | expected, see the module doc) of each (query, document
    text) pair. Each batch's vocabulary-wide logits are reduced to the seven digits at once, so memory
    stays one batch of logits however many pairs there are."""
    from loki.eval.retention import _last, span_logits

    score = check_score(score)
    if not pairs:
        return torch.empty(0)
    digit_ids = digit_token_ids(tokenizer)
    prompts = [_fit_prompt(tokenizer, q, t, max_length) for q, t in pairs]
    digits = torch.empty(len(prompts), len(digit_ids))
    for chunk, rows in span_logits(model, prompts, _last(prompts), pad_token_id(tokenizer), batch_size):
        last = torch.cat(rows).float()  # [len(chunk), V]: one row per sequence (its last position)
        if score == "reference":
            values = reference_digit_probs(last, digit_ids)
        else:
            values = last[:, digit_ids]
        digits[torch.as_tensor(chunk)] = values.cpu()
    return reference_relatedness(digits) if score == "reference" else expected_relatedness(digits)


def retrieval_metrics(
    scores: Mapping[str, Mapping[str, float]], qrels: Mapping[str, Mapping[str, int]], ks: Sequence[int] = (1, 10),
    per_query: dict | None = None,
) -> dict[str, float]:
    """`map@k`, `ndcg@k`, `recall@k` and `p@k` exactly as BEIR's `EvaluateRetrieval.evaluate` computes
    them: trec_eval's `map_cut`, `ndcg_cut`, `recall` and `P` (through `pytrec_eval`), averaged over the
    judged queries (not rounded, where BEIR rounds to 5 decimals).

    `scores[q][d]` is the score of candidate d for query q; `qrels[q][d]` its graded relevance.
    - Judged queries: those of `scores` with at least one document of score > 0 in `qrels`; others
      are left out. A judged query with no candidates scores 0 everywhere.
    - A document whose id equals its query's id is dropped first (BEIR's `ignore_identical_ids`).
    - Relevant documents missing from the candidates count as misses: recall@k divides by all of the
      query's relevant documents, and so does MAP@k (trec_eval's map_cut: the precision at each
      relevant hit in the top k, summed, over the number of relevant documents, not min(k, R)).
    - NDCG@k: gain = the graded relevance (negative grades count 0), discount 1/log2(rank + 1), ideal
      ranking over all judged documents of the query. P@k divides by k even when fewer are ranked.
    - Ties: trec_eval orders equal scores by document id, descending (string order: "d9" before "d10"
      before "d1").
    With `per_query` (a dict), it also receives each judged query's own values ({query: {metric: value}},
    in the returned names), whose plain mean is the returned value: what a bootstrap over queries resamples.
    """
    try:
        import pytrec_eval
    except ImportError:
        raise LokiError("the reranker metrics need pytrec_eval: pip install pytrec-eval-terrier") from None
    ks = [int(k) for k in ks]
    judged = {
        str(q): {str(d): int(s) for d, s in qrels[q].items()}
        for q in scores
        if q in qrels and any(int(s) > 0 for s in qrels[q].values())
    }
    if not judged:
        raise LokiError("no query with scores has a relevant document in the qrels, so nothing can be ranked.")
    run = {q: {str(d): float(v) for d, v in scores[q].items() if str(d) != q} for q in judged}
    cuts = ",".join(str(k) for k in ks)
    measures = {f"map_cut.{cuts}", f"ndcg_cut.{cuts}", f"recall.{cuts}", f"P.{cuts}"}
    evaluated = pytrec_eval.RelevanceEvaluator(judged, measures).evaluate(run)
    names = {"map": "map_cut_{}", "ndcg": "ndcg_cut_{}", "recall": "recall_{}", "p": "P_{}"}
    each = {q: {f"{key}@{k}": evaluated.get(q, {}).get(measure.format(k), 0.0)  # pytrec_eval scores an empty run 0 already
                for k in ks for key, measure in names.items()} for q in judged}
    if per_query is not None:
        per_query.update(each)
    return {name: sum(values[name] for values in each.values()) / len(judged) for name in next(iter(each.values()))}


def _doc_text(doc: Mapping[str, str], use_title: bool) -> str:
    return f"{doc['title']}\n{doc['text']}" if use_title and doc.get("title") else doc["text"]


# A flag in the output of `candidates=judged` runs (a count-like key, 1.0): their numbers rank every
# relevant document among a few random ones, so they are not comparable with published BEIR numbers.
NOT_COMPARABLE_KEY = "candidates_judged_not_comparable"


def evaluate_reranker(model, tokenizer, cfg: Any, stage: str = "test", items: list | None = None) -> dict[str, float]:
    """Score the candidates of every query of each BEIR set and return the ranking metrics (+ counts).

    Sets: `path` (one local BEIR directory) if given, else `sets` (a list of names, hub repos or local
    directories; see `loki.data.beir.resolve_set`, with `data_dir` for local copies), else `source`.
    `cfg`: `task.eval` (loki.tasks.reranker.Config, or a mapping that gets its defaults).
    Keys: the unprefixed metrics (`ndcg@10`, ...) are the unweighted mean over the sets (for one set, its
    own values); with several sets `<set>/<metric>` gives each set, and `<set>/num_queries`,
    `<set>/num_pairs` its counts; `num_queries` / `num_pairs` are totals. `candidates=judged` adds
    `candidates_judged_not_comparable: 1.0`.

    `stage="val"` reads `val_sets` / `val_split` / `val_max_queries` instead of `sets` / `split` / `max_queries`.

    With `items` (a list), one row per judged query is appended, so that the primary metric (`cfg.primary`,
    e.g. `ndcg@10` or `<set>/ndcg@10`) can be bootstrapped over queries: {"id": "<set>/<query>", "value": the
    query's primary metric, "weight": 1 / the judged queries of its set}, and its other metrics. The primary
    equals sum(weight * value) / sum(weight) over the rows (for one set, their plain mean); a prefixed primary
    lists its own set's queries only."""
    from loki.data.beir import LB_EVAL_SETS, load_beir
    from loki.tasks import settings_of

    cfg = settings_of("reranker", cfg)
    val = stage == "val"
    split = (cfg.val_split or cfg.split) if val else cfg.split
    sets: list[str | None]
    if cfg.path:
        sets = [None]
    else:
        chosen = (cfg.val_sets or cfg.sets) if val else cfg.sets
        sets = list(chosen) if chosen else ([None] if cfg.source else list(LB_EVAL_SETS))
    candidates = str(cfg.candidates)
    per_set: dict[str, dict[str, float]] = {}
    for name in sets:
        beir = load_beir(
            path=cfg.path if name is None else None,
            source=cfg.source if name is None else None,
            name=name,
            data_dir=cfg.data_dir,
            split=split,
            max_queries=cfg.val_max_queries if val else cfg.max_queries,
            candidates=candidates,
            num_negatives=int(cfg.num_negatives),
            top_n=cfg.top_n,
            seed=int(cfg.seed),
        )
        set_name = _unique(beir.name or "beir", per_set)
        per_query: dict = {}
        per_set[set_name] = _evaluate_set(model, tokenizer, beir, cfg, per_query)
        if items is not None:
            items.extend(_query_items(set_name, per_query, str(cfg.primary), len(sets) > 1))
    metric_keys = [k for k in next(iter(per_set.values())) if k not in ("num_queries", "num_pairs")]
    out = {k: sum(m[k] for m in per_set.values()) / len(per_set) for k in metric_keys}
    out["num_queries"] = float(sum(m["num_queries"] for m in per_set.values()))
    out["num_pairs"] = float(sum(m["num_pairs"] for m in per_set.values()))
    if len(per_set) > 1:
        for set_name, metrics in per_set.items():
            out.update({f"{set_name}/{k}": v for k, v in metrics.items()})
    if candidates == "judged":
        out[NOT_COMPARABLE_KEY] = 1.0
    return out


def _unique(name: str, taken: Mapping[str, Any]) -> str:
    out, n = name, 1
    while out in taken:
        n += 1
        out = f"{name}_{n}"
    return out


def _query_items(set_name: str, per_query: Mapping[str, Mapping[str, float]], primary: str, several: bool) -> list[dict]:
    """The per-query rows of one set (`evaluate_reranker`'s `items`); none when the primary names another set."""
    prefix, _, metric = primary.rpartition("/")
    if prefix and (prefix != set_name or not several):
        return []
    if metric not in next(iter(per_query.values()), {metric: 0.0}):
        raise LokiError(f"task.eval.primary={primary!r} is not a metric of the reranker (ndcg@k, map@k, recall@k or p@k for k in task.eval.ks).")
    return [{"id": f"{set_name}/{q}", "value": values[metric], "weight": 1.0 / len(per_query), **values}
            for q, values in per_query.items()]


def _evaluate_set(model, tokenizer, beir, cfg: Any, per_query: dict | None = None) -> dict[str, float]:
    keys = [(q, d) for q, docs in beir.candidates.items() for d in docs]
    pairs = [(beir.queries[q], _doc_text(beir.corpus[d], bool(cfg.use_title))) for q, d in keys]
    values = score_pairs(model, tokenizer, pairs, int(cfg.batch_size), int(cfg.max_length), check_score(cfg.score))
    scores: dict[str, dict[str, float]] = {q: {} for q in beir.queries}
    for (q, d), value in zip(keys, values.tolist()):
        scores[q][d] = value
    metrics = retrieval_metrics(scores, beir.qrels, tuple(int(k) for k in cfg.ks), per_query)
    metrics["num_queries"] = float(len(beir.queries))
    metrics["num_pairs"] = float(len(pairs))
    return metrics
