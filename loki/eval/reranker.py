"""The LB reranker task: prompt format, the expected-relatedness score, and BEIR ranking metrics.

Score of a (query, document) pair: the model reads the reranker prompt in its chat template; at the
assistant's first token take the logits of the digit tokens "1".."7", softmax over those seven only
(renormalised), and return the expectation sum_d d * p(d), a continuous score in [1, 7] with few ties
(the LB reranker's own scoring).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from loki.errors import LokiError

RERANKER_SYSTEM_PROMPT = (
    "Given a query and a piece of text, output a score of 1-7 based on how related the query is to the text. "
    "1 means least related and 7 is most related."
)
DIGITS = "1234567"


def reranker_user_turn(query: str, text: str) -> str:
    return f"<<<Query>>>\n{query}\n\n<<<Context>>>\n{text}"


def reranker_messages(query: str, text: str) -> list[dict[str, str]]:
    return [
        {"role": "system", "content": RERANKER_SYSTEM_PROMPT},
        {"role": "user", "content": reranker_user_turn(query, text)},
    ]


def _encode(tokenizer, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])  # the template wrote any BOS


def _prompt_text(tokenizer, query: str, text: str) -> str:
    return tokenizer.apply_chat_template(reranker_messages(query, text), add_generation_prompt=True, tokenize=False)


def digit_token_ids(tokenizer) -> list[int]:
    """Ids of "1".."7" as the model emits each right after the generation prompt (each must be one token)."""
    from loki.tokenizer import single_token_ids

    return single_token_ids(tokenizer, _prompt_text(tokenizer, "q", "t"), DIGITS, "digit")


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


def _model_device(model) -> torch.device:
    try:
        return next(model.parameters()).device
    except (StopIteration, AttributeError):
        return torch.device("cpu")


@torch.no_grad()
def last_token_logits(model, sequences: Sequence[Sequence[int]], pad_token_id: int, batch_size: int = 8) -> list[torch.Tensor]:
    """The next-token logits after each sequence, batched with right padding (exact: causal attention
    never looks at the padding on the right, and positions stay 0..n-1). Longest first for even batches."""
    device = _model_device(model)
    order = sorted(range(len(sequences)), key=lambda i: -len(sequences[i]))
    out: list[torch.Tensor | None] = [None] * len(sequences)
    for start in range(0, len(order), batch_size):
        chunk = order[start : start + batch_size]
        width = max(len(sequences[i]) for i in chunk)
        input_ids = torch.full((len(chunk), width), pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for row, i in enumerate(chunk):
            n = len(sequences[i])
            input_ids[row, :n] = torch.tensor(list(sequences[i]), dtype=torch.long)
            attention_mask[row, :n] = 1
        logits = model(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device)).logits
        last = attention_mask.sum(1).to(logits.device) - 1
        picked = logits[torch.arange(len(chunk), device=logits.device), last].float().cpu()
        for row, i in enumerate(chunk):
            out[i] = picked[row]
    return out  # type: ignore[return-value]


def score_pairs(
    model, tokenizer, pairs: Sequence[tuple[str, str]], batch_size: int = 8, max_length: int = 1024
) -> torch.Tensor:
    """Expected relatedness in [1, 7] for each (query, document text) pair."""
    if not pairs:
        return torch.empty(0)
    digit_ids = digit_token_ids(tokenizer)
    prompts = [_fit_prompt(tokenizer, q, t, max_length) for q, t in pairs]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    logits = last_token_logits(model, prompts, pad, batch_size)
    digit_logits = torch.stack([row[digit_ids] for row in logits])
    return expected_relatedness(digit_logits)


def retrieval_metrics(
    scores: Mapping[str, Mapping[str, float]], qrels: Mapping[str, Mapping[str, int]], ks: Sequence[int] = (1, 10)
) -> dict[str, float]:
    """MAP@k, Recall@k, NDCG@k (graded relevance) and P@k with torchmetrics, averaged over queries.

    `scores[q][d]` is the score of candidate d for query q; relevance comes from `qrels` (score > 0 is
    relevant; NDCG uses the graded value). A query's relevant documents missing from its candidates
    count as misses for recall (its denominator is the number of relevant candidates, as torchmetrics
    computes it, so the candidate choice should include the relevant documents; see loki.data.beir).
    """
    from torchmetrics.retrieval import RetrievalMAP, RetrievalNormalizedDCG, RetrievalPrecision, RetrievalRecall

    preds, relevance, indexes = [], [], []
    for qi, (query_id, doc_scores) in enumerate(scores.items()):
        for doc_id, score in doc_scores.items():
            preds.append(float(score))
            relevance.append(int(qrels.get(query_id, {}).get(doc_id, 0)))
            indexes.append(qi)
    preds_t = torch.tensor(preds, dtype=torch.float64)
    graded = torch.tensor(relevance, dtype=torch.long).clamp(min=0)
    binary = graded > 0
    index_t = torch.tensor(indexes, dtype=torch.long)
    out = {}
    for k in ks:
        out[f"map@{k}"] = float(RetrievalMAP(top_k=k)(preds_t, binary, indexes=index_t))
        out[f"recall@{k}"] = float(RetrievalRecall(top_k=k)(preds_t, binary, indexes=index_t))
        out[f"ndcg@{k}"] = float(RetrievalNormalizedDCG(top_k=k)(preds_t, graded, indexes=index_t))
        out[f"p@{k}"] = float(RetrievalPrecision(top_k=k)(preds_t, binary, indexes=index_t))
    return out


def _doc_text(doc: Mapping[str, str], use_title: bool) -> str:
    return f"{doc['title']}\n{doc['text']}" if use_title and doc.get("title") else doc["text"]


def evaluate_reranker(model, tokenizer, cfg: Mapping[str, Any], stage: str = "test") -> dict[str, float]:
    """Score every candidate of every query of a BEIR set and return the ranking metrics (+ counts).

    `stage="val"` reads `val_split` / `val_max_queries` instead of `split` / `max_queries`."""
    from loki.data.beir import load_beir

    get = cfg.get
    val = stage == "val"
    beir = load_beir(
        path=get("path"),
        source=get("source"),
        split=(get("val_split") or get("split", "test")) if val else get("split", "test"),
        max_queries=get("val_max_queries") if val else get("max_queries"),
        candidates=get("candidates", "all"),
        num_negatives=int(get("num_negatives", 0) or 0),
        top_n=get("top_n"),
        seed=int(get("seed", 0) or 0),
    )
    use_title = bool(get("use_title", True))
    keys = [(q, d) for q, docs in beir.candidates.items() for d in docs]
    pairs = [(beir.queries[q], _doc_text(beir.corpus[d], use_title)) for q, d in keys]
    values = score_pairs(model, tokenizer, pairs, int(get("batch_size", 8)), int(get("max_length", 1024)))
    scores: dict[str, dict[str, float]] = {q: {} for q in beir.queries}
    for (q, d), value in zip(keys, values.tolist()):
        scores[q][d] = value
    metrics = retrieval_metrics(scores, beir.qrels, tuple(get("ks", (1, 10))))
    metrics["num_queries"] = float(len(beir.queries))
    metrics["num_pairs"] = float(len(pairs))
    return metrics
