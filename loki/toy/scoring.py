"""Small, self-contained scorers the toy build and its fine-tune check use (plain torch, no Lightning).

The project's evaluators live in loki.eval; these exist so that the build can check its own threshold
without depending on them, and they follow the same conventions:
- cloze: the question is the user turn of a chat prompt; each choice's text is scored as the assistant's
  reply by the summed log-probability of its tokens; the highest wins. The graded measure is the mean
  log-probability of the correct choice after normalising over the four choices (chance = log 1/4).
- reranker: the expectation over the digit tokens 1-7 of the assistant's first token.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from loki.toy.world import rerank_user_turn


def _encode(tokenizer, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def _right_padded(sequences: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, seq in enumerate(sequences):
        ids[row, : len(seq)] = torch.tensor(seq)
        mask[row, : len(seq)] = 1
    return ids, mask


def question_prompt_ids(tokenizer, question: str) -> list[int]:
    """The question as a chat user turn followed by the assistant's generation prompt."""
    messages = [{"role": "user", "content": question}]
    return _encode(tokenizer, tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False))


@torch.no_grad()
def cloze_choice_logprobs(model, tokenizer, rows: list[dict], batch_size: int = 128) -> torch.Tensor:
    """[N, 4] summed log-probability of each choice's tokens as the reply to its question."""
    items: list[tuple[list[int], int]] = []  # (prompt + choice ids, number of choice tokens)
    for row in rows:
        prompt = question_prompt_ids(tokenizer, row["question"])
        for choice in row["choices"]:
            answer = _encode(tokenizer, choice)
            items.append((prompt + answer, len(answer)))
    model.eval()
    scores = []
    for start in range(0, len(items), batch_size):
        chunk = items[start : start + batch_size]
        ids, mask = _right_padded([seq for seq, _ in chunk], tokenizer.pad_token_id)
        logprobs = F.log_softmax(model(input_ids=ids, attention_mask=mask).logits.float(), dim=-1)
        for row, (seq, n_answer) in enumerate(chunk):
            positions = torch.arange(len(seq) - n_answer, len(seq))
            targets = ids[row, positions]
            scores.append(logprobs[row, positions - 1, targets].sum())
    return torch.stack(scores).view(len(rows), -1)


def cloze_metrics(model, tokenizer, rows: list[dict]) -> dict[str, float]:
    """Cloze accuracy and the graded measure (mean normalised log-prob of the correct choice)."""
    scores = cloze_choice_logprobs(model, tokenizer, rows)
    answers = torch.tensor([int(row["answer"]) for row in rows])
    accuracy = (scores.argmax(dim=-1) == answers).float().mean().item()
    normalised = F.log_softmax(scores, dim=-1).gather(1, answers[:, None]).squeeze(1)
    return {"cloze_accuracy": accuracy, "graded_logprob": normalised.mean().item(), "chance_logprob": math.log(0.25)}


def digit_token_ids(tokenizer) -> list[int]:
    ids = [_encode(tokenizer, str(d)) for d in range(1, 8)]
    assert all(len(i) == 1 for i in ids), "digits 1-7 must be single tokens"
    return [i[0] for i in ids]


@torch.no_grad()
def rerank_scores(model, tokenizer, system_prompt: str, pairs: list[tuple[str, str]], batch_size: int = 128) -> torch.Tensor:
    """Expected 1-7 relatedness for each (query, text) pair, read at the assistant's first token."""
    digits = torch.tensor(digit_token_ids(tokenizer))
    values = torch.arange(1, 8, dtype=torch.float32)
    prompts = []
    for query, text in pairs:
        messages = [{"role": "system", "content": system_prompt}, {"role": "user", "content": rerank_user_turn(query, text)}]
        prompts.append(_encode(tokenizer, tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)))
    model.eval()
    out = []
    for start in range(0, len(prompts), batch_size):
        chunk = prompts[start : start + batch_size]
        ids, mask = _right_padded(chunk, tokenizer.pad_token_id)
        logits = model(input_ids=ids, attention_mask=mask).logits
        last = torch.tensor([len(p) - 1 for p in chunk])
        probs = F.softmax(logits[torch.arange(len(chunk)), last][:, digits].float(), dim=-1)
        out.append(probs @ values)
    return torch.cat(out)


def rerank_metrics(model, tokenizer, system_prompt: str, corpus: list[dict], queries: list[dict], qrels: list[tuple[str, str, int]]) -> dict[str, float]:
    """Rerank the whole corpus for every query: NDCG@1, NDCG@10 and P@1 (top document is a best match)."""
    grades: dict[str, dict[str, int]] = {}
    for query_id, doc_id, grade in qrels:
        grades.setdefault(query_id, {})[doc_id] = int(grade)
    pairs = [(q["text"], d["text"]) for q in queries for d in corpus]
    scores = rerank_scores(model, tokenizer, system_prompt, pairs).view(len(queries), len(corpus))
    ndcg1, ndcg10, p1 = [], [], []
    for row, query in enumerate(queries):
        relevant = grades.get(query["_id"], {})
        order = torch.argsort(scores[row], descending=True, stable=True).tolist()
        ranked = [relevant.get(corpus[i]["_id"], 0) for i in order]
        ideal = sorted(relevant.values(), reverse=True)

        def dcg(gains: list[int], k: int) -> float:
            return sum((2**g - 1) / math.log2(i + 2) for i, g in enumerate(gains[:k]))

        ndcg1.append(dcg(ranked, 1) / max(dcg(ideal, 1), 1e-9))
        ndcg10.append(dcg(ranked, 10) / max(dcg(ideal, 10), 1e-9))
        p1.append(float(bool(ideal) and ranked[0] == ideal[0]))
    n = len(queries)
    return {"ndcg@1": sum(ndcg1) / n, "ndcg@10": sum(ndcg10) / n, "p@1": sum(p1) / n}
