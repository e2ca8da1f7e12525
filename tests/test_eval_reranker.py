"""Reranker evaluation: the expectation score, ranking metrics on the 3-query BEIR fixture, loaders."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
from omegaconf import OmegaConf

from loki.data.beir import load_beir
from loki.errors import LokiError
from loki.eval import run_task_eval
from loki.eval.reranker import digit_token_ids, expected_relatedness, retrieval_metrics, score_pairs

BEIR = "tests/fixtures/beir"

# Digits a stub reranker gives each (query, document) of the fixture; the ranks below follow from them.
#   q1 (relevant d1:2, d2:1): d6 > d1 > d2 > rest     q2 (d3:1, d4:1): d3 > d1 > d2 > d4 > rest
#   q3 (d5:1): d1 > d2 > d5 > rest
STUB_DIGITS = {
    "how do bees make honey": {"d6": 7, "d1": 6, "d2": 5, "d3": 3, "d4": 2, "d5": 1},
    "boiling point of water": {"d3": 7, "d1": 5, "d2": 4, "d4": 3, "d5": 2, "d6": 1},
    "first computer programmer": {"d1": 7, "d2": 6, "d5": 5, "d3": 3, "d4": 2, "d6": 1},
}


def log2(x):
    return math.log(x, 2)


# Hand-computed per query (BEIR's = trec_eval's definitions: AP@k sums the precision at the relevant hits
# in the top k and divides by ALL the query's relevant documents; P@k divides by k; NDCG uses linear gains
# with 1/log2(rank+1) discounts). q2's map@1 is 1/2 (one hit over 2 relevant docs; torchmetrics said 1).
EXPECTED_PER_QUERY = {
    "map@1": [0, 1 / 2, 0],
    "recall@1": [0, 1 / 2, 0],
    "ndcg@1": [0, 1, 0],
    "p@1": [0, 1, 0],
    "map@10": [(1 / 2 + 2 / 3) / 2, (1 / 1 + 2 / 4) / 2, 1 / 3],
    "recall@10": [1, 1, 1],
    "ndcg@10": [
        (2 / log2(3) + 1 / log2(4)) / (2 / log2(2) + 1 / log2(3)),
        (1 / log2(2) + 1 / log2(5)) / (1 / log2(2) + 1 / log2(3)),
        (1 / log2(4)) / (1 / log2(2)),
    ],
    "p@10": [2 / 10, 2 / 10, 1 / 10],
}
EXPECTED = {k: sum(v) / 3 for k, v in EXPECTED_PER_QUERY.items()}


class StubReranker(torch.nn.Module):
    """Puts a huge logit on the digit STUB_DIGITS assigns to the (query, document) in each prompt,
    and a larger one on a non-digit token, which the renormalisation over digits must ignore."""

    def __init__(self, tokenizer, corpus):
        super().__init__()
        self.tokenizer, self.corpus = tokenizer, corpus
        self.digit_ids = digit_token_ids(tokenizer)
        self.anchor = torch.nn.Parameter(torch.zeros(1))

    def forward(self, input_ids, attention_mask):
        logits = torch.zeros(*input_ids.shape, len(self.tokenizer))
        for row in range(input_ids.shape[0]):
            n = int(attention_mask[row].sum())
            text = self.tokenizer.decode(input_ids[row, :n])
            query = text.split("<<<Query>>>\n")[1].split("\n\n<<<Context>>>")[0]
            doc = next(d for d, fields in self.corpus.items() if fields["text"] in text)
            logits[row, n - 1, self.digit_ids[STUB_DIGITS[query][doc] - 1]] = 60.0
            logits[row, n - 1, self.tokenizer.eos_token_id] = 90.0
        return SimpleNamespace(logits=logits)


def test_expectation_matches_hand_computation():
    # softmax over the seven digits of logits log([1, 2, 1, 1, 1, 1, 4]) -> p = [1, 2, 1, 1, 1, 1, 4] / 11
    logits = torch.log(torch.tensor([[1.0, 2, 1, 1, 1, 1, 4], [1, 1, 1, 1, 1, 1, 1]]))
    expected = torch.tensor([(1 * 1 + 2 * 2 + 3 + 4 + 5 + 6 + 7 * 4) / 11, 4.0])
    assert torch.allclose(expected_relatedness(logits), expected.float())


class FixedDigitLogits(torch.nn.Module):
    """Last-position logits = `digit_logits` on the digit ids, 50 on every other token."""

    def __init__(self, vocab, digit_ids, digit_logits):
        super().__init__()
        self.vocab, self.digit_ids, self.digit_logits = vocab, digit_ids, digit_logits

    def forward(self, input_ids, attention_mask):
        logits = torch.full((*input_ids.shape, self.vocab), 50.0)
        logits[:, :, self.digit_ids] = self.digit_logits
        return SimpleNamespace(logits=logits)


def test_score_pairs_renormalises_over_the_digits_only(chat_tokenizer):
    ids = digit_token_ids(chat_tokenizer)
    assert len(set(ids)) == 7 and [chat_tokenizer.decode([i]) for i in ids] == list("1234567")
    digit_logits = torch.log(torch.tensor([1.0, 2, 1, 1, 1, 1, 4]))
    model = FixedDigitLogits(len(chat_tokenizer), ids, digit_logits)
    scores = score_pairs(model, chat_tokenizer, [("q", "a text"), ("another query", "t")], batch_size=1)
    assert torch.allclose(scores, torch.full((2,), 51 / 11))


def test_retrieval_metrics_against_hand_computed_values():
    beir = load_beir(path=BEIR, split="test")
    scores = {qid: {d: float(v) for d, v in STUB_DIGITS[text].items()} for qid, text in beir.queries.items()}
    got = retrieval_metrics(scores, beir.qrels, ks=(1, 10))
    assert set(got) == set(EXPECTED)
    for key, value in EXPECTED.items():
        assert got[key] == pytest.approx(value, abs=1e-6), key


def test_reranker_eval_end_to_end_with_a_stub_model(chat_tokenizer):
    cfg = OmegaConf.load("conf/task/tiny_rerank.yaml").eval
    beir = load_beir(path=BEIR, split="test")
    got = run_task_eval(StubReranker(chat_tokenizer, beir.corpus), chat_tokenizer, cfg)
    assert got["num_queries"] == 3 and got["num_pairs"] == 18  # 3 queries x all 6 documents
    for key, value in EXPECTED.items():
        assert got[key] == pytest.approx(value, abs=1e-5), key


def test_per_query_values_are_the_hand_computed_ones_and_average_to_the_metric():
    beir = load_beir(path=BEIR, split="test")
    scores = {qid: {d: float(v) for d, v in STUB_DIGITS[text].items()} for qid, text in beir.queries.items()}
    per_query: dict = {}
    got = retrieval_metrics(scores, beir.qrels, ks=(1, 10), per_query=per_query)
    assert sorted(per_query) == sorted(beir.queries)  # the fixture's queries in id order match EXPECTED_PER_QUERY's
    for key, values in EXPECTED_PER_QUERY.items():
        assert [per_query[q][key] for q in sorted(per_query)] == pytest.approx(values, abs=1e-6), key
        assert got[key] == pytest.approx(sum(per_query[q][key] for q in per_query) / 3, abs=1e-12)


def test_the_task_lists_one_item_per_query_whose_weighted_mean_is_the_primary(chat_tokenizer):
    """`items`: one row per judged query, the primary metric as `value`; with two sets each query weighs
    1 / its set's queries, so that the weighted mean is the mean over sets (the unprefixed primary)."""
    from loki.tasks import Task

    cfg = OmegaConf.merge(OmegaConf.load("conf/task/tiny_rerank.yaml").eval, {"primary": "ndcg@10"})
    model = StubReranker(chat_tokenizer, load_beir(path=BEIR, split="test").corpus)
    items: list = []
    got = Task.from_config(OmegaConf.create({"name": "r", "eval": cfg})).evaluate(model, chat_tokenizer, "test", items=items)
    assert [row["id"] for row in items] == ["beir/q1", "beir/q2", "beir/q3"]  # <set>/<query>, the set named by its folder
    assert [row["value"] for row in items] == pytest.approx(EXPECTED_PER_QUERY["ndcg@10"], abs=1e-6)
    assert got["ndcg@10"] == pytest.approx(sum(row["value"] for row in items) / 3, abs=1e-12)

    from loki.eval.reranker import _query_items

    first = {"a": {"ndcg@10": 1.0}, "b": {"ndcg@10": 0.0}}  # set one: mean 0.5
    second = {"c": {"ndcg@10": 0.2}}                         # set two: mean 0.2
    rows = _query_items("one", first, "ndcg@10", True) + _query_items("two", second, "ndcg@10", True)
    weighted = sum(r["weight"] * r["value"] for r in rows) / sum(r["weight"] for r in rows)
    assert weighted == pytest.approx((0.5 + 0.2) / 2) and [r["weight"] for r in rows] == [0.5, 0.5, 1.0]
    assert [r["id"] for r in _query_items("two", second, "two/ndcg@10", True)] == ["two/c"]  # a prefixed primary: its own set
    assert _query_items("one", first, "two/ndcg@10", True) == []
    with pytest.raises(LokiError, match="not a metric of the reranker"):
        _query_items("one", first, "ndcg@5", False)


def test_reranker_eval_runs_on_a_tiny_model(chat_tokenizer):
    from tests.conftest import make_tiny_model

    cfg = OmegaConf.load("conf/task/tiny_rerank.yaml").eval
    got = run_task_eval(make_tiny_model(vocab=len(chat_tokenizer)), chat_tokenizer, cfg, stage="val")
    assert got["num_queries"] == 2  # qrels/dev.tsv judges q1 and q3
    assert all(0.0 <= got[k] <= 1.0 for k in EXPECTED)


def test_candidate_choices():
    judged = load_beir(path=BEIR, candidates="judged", num_negatives=2, seed=1)
    for q, docs in judged.candidates.items():
        assert set(judged.qrels[q]) <= set(docs) and len(docs) == len(judged.qrels[q]) + 2
    assert list(load_beir(path=BEIR, max_queries=2).queries) == ["q1", "q2"]  # the first 2 by id


def test_run_file_candidates_keep_the_top_n(tmp_path):
    run = tmp_path / "bm25.tsv"
    run.write_text("query-id\tcorpus-id\tscore\nq1\td6\t9\nq1\td1\t8\nq1\td3\t1\nq2\td3\t5\n")
    beir = load_beir(path=BEIR, candidates=str(run), top_n=2)
    assert beir.candidates == {"q1": ["d6", "d1"], "q2": ["d3"], "q3": []}


def test_bad_beir_input(tmp_path, monkeypatch):
    (tmp_path / "qrels").mkdir()
    (tmp_path / "corpus.jsonl").write_text('{"_id": "d1", "text": "x"}\n')
    (tmp_path / "queries.jsonl").write_text('{"_id": "q1", "text": "y"}\n')
    (tmp_path / "qrels" / "test.tsv").write_text("q1\td1\t1\n")
    with pytest.raises(LokiError, match="no query with a relevant document"):
        load_beir(path=tmp_path)  # BEIR skips the first line whatever it says: here the only judgement
    with pytest.raises(LokiError, match="no queries.jsonl|no qrels/dev.tsv"):
        load_beir(path=tmp_path, split="dev")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(LokiError) as err:
        load_beir(source="no-such-org/no-such-beir-set")
    assert "no-such-org/no-such-beir-set" in str(err.value) and "task.eval.path=" in str(err.value)


def test_long_documents_are_cut_not_the_prompt(chat_tokenizer):
    from loki.eval.reranker import _fit_prompt

    ids = _fit_prompt(chat_tokenizer, "bees", "honey " * 200, max_length=260)
    text = chat_tokenizer.decode(ids)
    assert len(ids) <= 260 and text.endswith("<|im_end|>\n<|im_start|>assistant\n") and "honey honey" in text


def test_task_metric_callback_logs_val_metrics(chat_tokenizer):
    import lightning.pytorch as pl

    from tests.conftest import make_tiny_model
    from loki.data.chat import ChatSFTDataModule
    from loki.eval import TaskMetricCallback

    class LM(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.model = make_tiny_model(vocab=len(chat_tokenizer))

        def training_step(self, batch, _):
            return self.model(**batch).loss

        def validation_step(self, batch, _):
            self.log("val/loss", self.model(**batch).loss)

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.0)

    cfg = OmegaConf.load("conf/task/tiny_rerank.yaml")
    data = ChatSFTDataModule(chat_tokenizer, **{k: v for k, v in cfg.data.items() if k != "_target_"})
    callback = TaskMetricCallback(cfg.eval)
    trainer = pl.Trainer(
        max_steps=1, limit_train_batches=1, limit_val_batches=1, num_sanity_val_steps=0, logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False, accelerator="cpu",
        callbacks=[callback],
    )
    trainer.fit(LM(), datamodule=data)
    assert callback.last["num_queries"] == 2  # the dev qrels
    assert "val/map@1" in trainer.callback_metrics and "val/num_queries" not in trainer.callback_metrics
    assert float(trainer.callback_metrics["val/map@1"]) == pytest.approx(callback.last["map@1"])


# ------------------------------------------------------------------------ lightblue's reference score


def test_reference_score_matches_hand_computation():
    from loki.eval.reranker import reference_digit_probs, reference_relatedness

    digit_ids = list(range(10, 17))  # "1".."7" at ids 10..16 of a 32-token vocabulary
    # Row 0, probabilities proportional to weights: digits 1..7 -> 1, 2, 4, 8, 16, 32, 64; 14 other tokens
    # 3 each; the 11 left 0.5 each (Z = 127 + 42 + 5.5 = 174.5). The top 14 are digits 7..3 and nine of the
    # 3s, so digits 1 and 2 are cut (p = 0): (8 + 16 + 32 + 64) / 4Z - (0 + 0 + 4 + 8) / 4Z = 108 / 698.
    w0 = torch.full((32,), 0.5)
    w0[digit_ids] = torch.tensor([1.0, 2, 4, 8, 16, 32, 64])
    w0[:10] = 3.0
    w0[17:21] = 3.0
    # Row 1: digit d has weight d, the 25 others 0.25 each (Z = 28 + 6.25); every digit is in the top 14:
    # (4 + 5 + 6 + 7) / 4Z - (1 + 2 + 3 + 4) / 4Z = 12 / 137. Note p4 counts in both means.
    w1 = torch.full((32,), 0.25)
    w1[digit_ids] = torch.arange(1.0, 8.0)
    logits = torch.log(torch.stack([w0, w1])) + torch.tensor([[3.0], [-1.0]])  # a shift changes nothing
    probs = reference_digit_probs(logits, digit_ids)
    assert torch.allclose(probs[0], torch.tensor([0, 0, 4, 8, 16, 32, 64]) / 174.5)
    assert torch.allclose(probs[1], torch.arange(1.0, 8.0) / 34.25)
    assert torch.allclose(reference_relatedness(probs), torch.tensor([108 / 698, 12 / 137]))
    # The expected-digit score of row 0 ignores the cut and the other tokens: 769 / 127.
    assert float(expected_relatedness(logits[0, digit_ids])) == pytest.approx(769 / 127, rel=1e-6)
    # A digit tied with the 14th logit counts as inside; one just below it does not.
    tie = torch.zeros(32)
    tie[20:34] = 1.0  # tokens 20..31: 12 tokens at 1
    tie[[15, 16]] = 1.0  # digits 6 and 7 at 1 too: 14 tokens at 1
    tie[14] = 1.0 - 1e-4  # digit 5 just below: the 15th token
    p = reference_digit_probs(tie, digit_ids)
    assert p[5] > 0 and p[6] > 0 and p[4] == 0


class WeightedLogits(torch.nn.Module):
    """Last-position logits log(weights), the digits' weights placed at the tokenizer's digit ids."""

    def __init__(self, vocab, digit_ids, digit_weights, other_weights):
        super().__init__()
        self.weights = torch.full((vocab,), 0.5)
        others = [i for i in range(vocab) if i not in digit_ids][: len(other_weights)]
        self.weights[others] = torch.tensor(other_weights)
        self.weights[digit_ids] = torch.tensor(digit_weights)
        self.anchor = torch.nn.Parameter(torch.zeros(1))

    def forward(self, input_ids, attention_mask):
        return SimpleNamespace(logits=torch.log(self.weights).expand(*input_ids.shape, -1).clone())


def test_score_pairs_reference_by_hand(chat_tokenizer):
    ids = digit_token_ids(chat_tokenizer)
    vocab = len(chat_tokenizer)
    # digits 1..7 weigh 1, 2, 4, 8, 16, 32, 64; 14 non-digit tokens weigh 3: digits 1 and 2 fall outside
    # the top 14 (p = 0). Z = 127 + 42 + 0.5 (vocab - 21).
    model = WeightedLogits(vocab, ids, [1.0, 2, 4, 8, 16, 32, 64], [3.0] * 14)
    z = 127 + 42 + 0.5 * (vocab - 21)
    pairs = [("q", "a text"), ("another query", "t"), ("q3", "x" * 40)]
    got = score_pairs(model, chat_tokenizer, pairs, batch_size=2, score="reference")
    assert torch.allclose(got, torch.full((3,), (8 + 16 + 32 + 64 - 4 - 8) / (4 * z)))
    expected = score_pairs(model, chat_tokenizer, pairs, batch_size=2, score="expected")
    assert torch.allclose(expected, torch.full((3,), 769 / 127))
    # Digits far below 14 other tokens: every p is 0, so is the score (the expectation does not care).
    low = FixedDigitLogits(vocab, ids, torch.log(torch.tensor([1.0, 2, 1, 1, 1, 1, 4])))
    assert torch.equal(score_pairs(low, chat_tokenizer, pairs, score="reference"), torch.zeros(3))
    with pytest.raises(LokiError, match="task.eval.score must be one of reference, expected, got 'mean'"):
        score_pairs(low, chat_tokenizer, pairs, score="mean")


def test_digit_ids_are_the_ones_emitted_after_the_prompt_not_a_bare_encode(chat_tokenizer):
    """lightblue's code takes `tok.encode(str(d))[0]`: with a tokenizer that prepends BOS (Llama-3's
    encode does), that is the BOS id for every digit. The digits scored here are those the model emits
    right after the generation prompt, so a BOS-adding tokenizer changes nothing."""
    import copy

    from tokenizers import processors

    tok = copy.deepcopy(chat_tokenizer)
    bos = tok.convert_tokens_to_ids("<|endoftext|>")
    tok.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single="<|endoftext|> $A", special_tokens=[("<|endoftext|>", bos)]
    )
    assert tok.encode("1")[0] == bos  # what a bare encode of the digit starts with here
    ids = digit_token_ids(tok)
    assert ids == digit_token_ids(chat_tokenizer) and [tok.decode([i]) for i in ids] == list("1234567")


def test_the_configured_score_is_used(chat_tokenizer):
    from tests.conftest import compose_config

    assert compose_config("train", "task=toy_rerank").task.eval.score == "expected"  # the toy's shipped numbers
    cfg = OmegaConf.load("conf/task/tiny_rerank.yaml").eval
    ids = digit_token_ids(chat_tokenizer)
    model = WeightedLogits(len(chat_tokenizer), ids, [1.0, 2, 4, 8, 16, 32, 64], [3.0] * 14)
    cfg.score = "bogus"
    with pytest.raises(LokiError, match="task.eval.score"):
        run_task_eval(model, chat_tokenizer, cfg)
    cfg.score = "reference"
    got = run_task_eval(model, chat_tokenizer, cfg)  # every pair ties: trec_eval ranks by doc id, descending
    cfg.score = "expected"
    assert got == run_task_eval(model, chat_tokenizer, cfg)
