"""Evaluation on the training device (the CPU standing in for it here), recorded in metrics.json, and
evaluators that run the output head only where they read logits (`logits_to_keep`), equal to full logits."""

from __future__ import annotations

import json

import pytest
import torch

from loki.errors import LokiError
from omegaconf import OmegaConf
from torch import nn

from loki.eval import retention as ret
from loki.eval.reranker import last_token_logits
from tests.conftest import make_tiny_model, run_train

TINY = ("model=tiny", "task=tiny_rerank", "trainer.max_steps=2", "trainer.max_epochs=5", "evaluate.validation_task_metric=false")


class FullLogitsOnly(nn.Module):
    """The same model behind a forward without `logits_to_keep`: the evaluators' fallback path."""

    def __init__(self, model):
        super().__init__()
        self.inner = model

    def forward(self, input_ids, attention_mask=None):
        return self.inner(input_ids=input_ids, attention_mask=attention_mask)


def _sequences(seed: int = 0, count: int = 7, vocab: int = 259) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(3, 17, (count,), generator=g).tolist()
    return [torch.randint(3, vocab, (n,), generator=g).tolist() for n in lengths]


@pytest.fixture
def tiny():
    return make_tiny_model("qwen2")


def test_eval_device_follows_cuda_then_the_trainer_accelerator(monkeypatch):
    from loki.recipe import eval_device

    cfg = lambda accelerator: OmegaConf.create({"trainer": {"accelerator": accelerator}})  # noqa: E731
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert eval_device(cfg("auto")) == torch.device("cpu")
    assert eval_device(cfg("cpu")) == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert eval_device(cfg("auto")) == torch.device("cuda", 1)  # each rank its own GPU
    assert eval_device(cfg("gpu")) == torch.device("cuda", 1)
    assert eval_device(cfg("cpu")) == torch.device("cpu")  # an explicit CPU run stays on the CPU


def test_selected_logits_run_the_head_only_where_kept(tiny):
    seqs = _sequences()
    seen = []
    handle = tiny.lm_head.register_forward_hook(lambda m, i, o: seen.append(tuple(i[0].shape)))
    out = ret.next_token_logits(tiny, seqs, pad_id=0, batch_size=3)
    handle.remove()
    assert sum(shape[0] for shape in seen) == len(seqs)  # one row of the head per sequence, no [B, T, V]
    assert all(len(shape) == 2 for shape in seen)
    full = ret.next_token_logits(FullLogitsOnly(tiny), seqs, pad_id=0, batch_size=3)
    for a, b in zip(out, full):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5)
    for a, b in zip(last_token_logits(tiny, seqs, 0, 3), full):  # the reranker's scoring path
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5)
    # Against a plain unpadded forward of each sequence alone.
    for seq, row in zip(seqs, out):
        with torch.no_grad():
            alone = tiny(input_ids=torch.tensor([seq])).logits[0, -1]
        torch.testing.assert_close(row, alone, rtol=0, atol=1e-4)


def test_cloze_lm_loss_and_kl_equal_their_full_logit_results(tiny, tmp_path):
    seqs = _sequences(1)
    contexts, continuations = [s[: len(s) // 2] for s in seqs], [s[len(s) // 2 :] for s in seqs]
    fallback = FullLogitsOnly(tiny)
    kept = ret.continuation_logprobs(tiny, contexts, continuations, 0, 3)
    full = ret.continuation_logprobs(fallback, contexts, continuations, 0, 3)
    assert kept == pytest.approx(full, abs=1e-4)

    class Tok:
        pad_token_id, eos_token_id = 0, 0

    assert ret.score_lm_loss(tiny, Tok(), seqs, 3) == pytest.approx(ret.score_lm_loss(fallback, Tok(), seqs, 3), abs=1e-5)
    for positions in ("last", "all"):
        path = tmp_path / f"{positions}.kl.pt"
        ret.write_kl_reference(fallback, seqs, path, "b", positions, 16, 0, 3)
        state = ret.read_kl_reference(path, "b", seqs, positions, 16)
        scores = ret.score_kl(tiny, seqs, state, 0, 3)  # base written on full logits, read back on kept ones
        assert scores["kl"] == pytest.approx(0.0, abs=1e-5) and scores["top1_agree"] == 1.0


@pytest.mark.slow
def test_train_records_where_each_evaluation_ran(tmp_path):
    cache = f"paths.cache_dir={tmp_path / 'cache'}"
    metrics = run_train(tmp_path / "run", *TINY, cache, "loki.q=0.25", "loki.impl=rows", "export=false")
    assert metrics["devices"] == {"retention_before": "cpu", "task": "cpu", "retention_after": "cpu"}
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["devices"] == metrics["devices"]
    # The base model's retention is cached per model and settings: the second run reads it back.
    again = run_train(tmp_path / "again", *TINY, cache, "loki.q=0.25", "loki.impl=rows", "export=false", "evaluate.task=false")
    assert again["devices"] == {"retention_before": "cached", "retention_after": "cpu"}


@pytest.mark.parametrize("arch", ["qwen2", "llama"])
def test_cloze_on_a_shared_context_cache_equals_whole_sequences(arch):
    """The question runs once and the choices continue from its repeated cache: the same sums as scoring
    every (question + choice) sequence whole, for choices of different lengths (one token included), on
    the model and on a peft LoRA around it (non-zero B, so the adapter changes the logits)."""
    from peft import LoraConfig, get_peft_model

    model = make_tiny_model(arch).eval()
    g = torch.Generator().manual_seed(3)
    context = torch.randint(3, 250, (11,), generator=g).tolist()
    choices = [torch.randint(3, 250, (n,), generator=g).tolist() for n in (1, 4, 2, 6)]
    shared = ret.shared_context_logprobs(model, context, choices, 0)
    whole = ret.continuation_logprobs(model, [context] * 4, choices, 0, 4)
    assert shared == pytest.approx(whole, abs=1e-4)
    assert len(set(round(x, 3) for x in shared)) == 4  # four different scores: nothing collapsed

    lora = get_peft_model(make_tiny_model(arch), LoraConfig(r=4, target_modules=["q_proj", "down_proj"]))
    for name, param in lora.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(param, std=0.5, generator=g)
    lora.eval()
    assert ret.shared_context_logprobs(lora, context, choices, 0) == pytest.approx(
        ret.continuation_logprobs(lora, [context] * 4, choices, 0, 4), abs=1e-4)
    assert ret.shared_context_logprobs(lora, context, choices, 0) != pytest.approx(shared, abs=1e-3)


@pytest.mark.parametrize("arch", ["qwen2", "llama"])
def test_several_contexts_in_one_pass_equal_whole_sequences(arch):
    """Contexts of different lengths run together, their choices continue each from its own length: the
    same sums as every (context + choice) scored whole, and as one context at a time."""
    model = make_tiny_model(arch).eval()
    g = torch.Generator().manual_seed(5)
    contexts = [torch.randint(3, 250, (n,), generator=g).tolist() for n in (11, 3, 7)]
    choices = [[torch.randint(3, 250, (n,), generator=g).tolist() for n in lengths] for lengths in ((1, 4, 2), (3, 1, 5), (2, 2, 1))]
    together = ret.shared_contexts_logprobs(model, contexts, choices, 0)
    whole = ret.continuation_logprobs(model, [c for c in contexts for _ in range(3)], [x for row in choices for x in row], 0, 4)
    one_by_one = [v for c, xs in zip(contexts, choices) for v in ret.shared_context_logprobs(model, c, xs, 0)]
    assert together == pytest.approx(whole, abs=1e-4) and together == pytest.approx(one_by_one, abs=1e-4)
    assert len(set(round(x, 5) for x in together)) == 9  # nine different scores: nothing collapsed
    with pytest.raises(LokiError, match="same length"):
        ret.shared_contexts_logprobs(model, contexts, [choices[0], choices[1][:2], choices[2]], 0)
