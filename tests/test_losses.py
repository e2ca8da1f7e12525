"""loki.losses: the labelled-positions loss equals the model's own, and the KL anchor is 0 at the base and
matches independent computations (value and gradient) away from it; then the module and train.py wiring."""

from __future__ import annotations

import json
import math

import pytest
import torch

from loki.errors import LokiError
from loki.lightning.module import CausalLMModule
from loki.losses import AnchorTargets, anchor_kl, anchor_targets, coarse_kl, labelled_lm_loss, pad_prompts
from tests.conftest import compose_config, make_tiny_model, run_train


def _batch(vocab: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """Right-padded rows whose labels cover only an answer span (-100 elsewhere), as chat SFT data has."""
    g = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(3, vocab, (3, 9), generator=g)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, 7:] = 0
    attention_mask[2, 5:] = 0
    labels = torch.full_like(input_ids, -100)
    labels[0, 5:9] = input_ids[0, 5:9]
    labels[1, 4:7] = input_ids[1, 4:7]
    labels[2, 2:5] = input_ids[2, 2:5]
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_labelled_loss_equals_the_models_own_loss_and_gradient(family):
    model = make_tiny_model(family, tie_word_embeddings=family == "qwen2")
    batch = _batch(model.config.vocab_size)
    own = model(**batch).loss
    own_grads = torch.autograd.grad(own, list(model.parameters()))
    ours = labelled_lm_loss(model, batch)
    our_grads = torch.autograd.grad(ours, list(model.parameters()))
    torch.testing.assert_close(ours, own, rtol=1e-6, atol=1e-6)
    for a, b in zip(our_grads, own_grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
    # the head ran on the labelled positions only: 4 + 3 + 3 labels, none at position 0, each read one
    # position earlier (of 27 positions)
    seen = []
    handle = model.get_output_embeddings().register_forward_hook(lambda m, i, o: seen.append(o.shape))
    labelled_lm_loss(model, batch)
    handle.remove()
    assert seen == [torch.Size([10, model.config.vocab_size])]


def test_labelled_loss_refuses_a_batch_without_labels():
    model = make_tiny_model("llama")
    batch = _batch(model.config.vocab_size)
    batch["labels"][:] = -100
    with pytest.raises(LokiError, match="no labelled token"):
        labelled_lm_loss(model, batch)


def _coarse_kl_by_hand(base_logits: torch.Tensor, model_logits: torch.Tensor, k: int) -> torch.Tensor:
    """The KL of the two distributions over {the base's k most likely tokens, the rest}, from probabilities
    (float64, Python loops over positions): the oracle for coarse_kl."""
    total = []
    for b, m in zip(base_logits.double(), model_logits.double()):
        p, q = torch.softmax(b, -1), torch.softmax(m, -1)
        top = torch.topk(p, k).indices
        rest = torch.ones_like(p, dtype=torch.bool)
        rest[top] = False
        pk, qk = p[top], q[top]
        value = (pk * (pk / qk).log()).sum()
        p_rest, q_rest = p[rest].sum(), q[rest].sum()
        if p_rest > 0:
            value = value + p_rest * (p_rest / q_rest).log()
        total.append(value)
    return torch.stack(total).mean()


def test_coarse_kl_matches_the_coarsened_distributions_and_the_full_kl():
    g = torch.Generator().manual_seed(1)
    base_logits, model_logits = torch.randn(6, 11, generator=g) * 2, torch.randn(6, 11, generator=g) * 2
    base_lp = torch.log_softmax(base_logits, -1)
    # k = whole vocabulary: the plain KL, as torch computes it
    full = torch.nn.functional.kl_div(torch.log_softmax(model_logits, -1), base_lp, log_target=True, reduction="batchmean")
    torch.testing.assert_close(coarse_kl(base_lp, None, model_logits), full, rtol=1e-5, atol=1e-6)
    for k in (1, 3, 10):
        values, index = base_lp.topk(k, dim=-1)
        ours = coarse_kl(values, index, model_logits)
        torch.testing.assert_close(ours.double(), _coarse_kl_by_hand(base_logits, model_logits, k), rtol=1e-5, atol=1e-6)
        assert ours <= full + 1e-6  # coarsening never increases a KL
    # the gradient with respect to the model's logits, against autograd through the oracle
    values, index = torch.log_softmax(base_logits.double(), -1).topk(3, dim=-1)  # float64 throughout
    logits = model_logits.clone().double().requires_grad_(True)
    ours = torch.autograd.grad(coarse_kl(values, index, logits), logits)[0]
    oracle = torch.autograd.grad(_coarse_kl_by_hand(base_logits, logits, 3), logits)[0]
    torch.testing.assert_close(ours, oracle, rtol=1e-6, atol=1e-9)


def test_coarse_kl_of_two_point_distributions_by_hand():
    # base (0.5, 0.25, 0.25) kept to its top 1 token; model (0.25, 0.25, 0.5):
    # KL = 0.5 log(0.5/0.25) + 0.5 log(0.5/0.75)
    base_lp = torch.log(torch.tensor([[0.5, 0.25, 0.25]]))
    model_logits = torch.log(torch.tensor([[0.25, 0.25, 0.5]]))
    value = coarse_kl(base_lp[:, :1], torch.tensor([[0]]), model_logits)
    assert value.item() == pytest.approx(0.5 * math.log(2) + 0.5 * math.log(0.5 / 0.75), rel=1e-6)


def test_anchor_kl_is_zero_at_the_base_and_matches_an_independent_pass_when_perturbed():
    model = make_tiny_model("llama", vocab=40)
    prompts = [[5, 9, 3, 7, 1], [2, 8], [4, 4, 6, 11]]
    input_ids, mask = pad_prompts(prompts, pad_id=0)
    assert mask.tolist() == [[1, 1, 1, 1, 1], [1, 1, 0, 0, 0], [1, 1, 1, 1, 0]]
    full = anchor_targets(model, prompts, pad_id=0, top_k=None)
    top = anchor_targets(model, prompts, pad_id=0, top_k=5)
    assert full.log_probs.shape == (11, 40) and top.log_probs.shape == (11, 5)
    assert anchor_kl(model, full).abs().item() < 1e-6 and anchor_kl(model, top).abs().item() < 1e-6
    base_logits = [model(input_ids=torch.tensor([p])).logits[0] for p in prompts]  # one prompt at a time, no padding
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    model_logits = [model(input_ids=torch.tensor([p])).logits[0] for p in prompts]
    oracle = _coarse_kl_by_hand(torch.cat(base_logits).detach(), torch.cat(model_logits), 5)
    ours = anchor_kl(model, top)
    torch.testing.assert_close(ours.double(), oracle, rtol=1e-4, atol=1e-7)
    assert ours > 1e-4
    # gradient with respect to the weights, against the oracle's
    params = [p for p in model.parameters()]
    ours_grad = torch.autograd.grad(anchor_kl(model, top), params)
    oracle_logits = torch.cat([model(input_ids=torch.tensor([p])).logits[0] for p in prompts])
    oracle_grad = torch.autograd.grad(_coarse_kl_by_hand(torch.cat(base_logits).detach(), oracle_logits, 5), params)
    for a, b in zip(ours_grad, oracle_grad):
        torch.testing.assert_close(a.double(), b.double(), rtol=1e-3, atol=1e-7)
    # a batch of prompts 2 and 0 takes exactly their positions
    part = top.batch(torch.tensor([2, 0]))
    assert part.input_ids.tolist() == [[4, 4, 6, 11, 0], [5, 9, 3, 7, 1]]
    torch.testing.assert_close(part.log_probs, torch.cat([top.log_probs[7:11], top.log_probs[0:5]]))


def test_training_step_adds_the_weighted_anchor_kl():
    model = make_tiny_model("llama", vocab=40)
    prompts = [[5, 9, 3, 7, 1], [2, 8], [4, 4, 6, 11]]
    targets = anchor_targets(model, prompts, pad_id=0, top_k=4)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    loss_config = {"anchor_weight": 0.7, "anchor_batch": 2, "anchor_seed": 3}
    module = CausalLMModule(model, optimizer=torch.optim.SGD, loss=loss_config, anchor=targets)
    module.log = lambda *a, **k: None  # no trainer here
    batch = _batch(40)
    rows = module._anchor_rows(0)
    expected_rows = torch.randperm(3, generator=torch.Generator().manual_seed(3))[:2]
    assert rows.tolist() == expected_rows.tolist()
    total = module.training_step(batch, 0)
    expected = model(**batch).loss + 0.7 * anchor_kl(model, targets.batch(expected_rows))
    torch.testing.assert_close(total, expected)
    # step 1 reads the permutation's next two prompts, wrapping around
    order = torch.randperm(3, generator=torch.Generator().manual_seed(3))
    assert module._anchor_rows(1).tolist() == [order[2].item(), order[0].item()]
    with pytest.raises(LokiError, match="anchor"):
        CausalLMModule(model, optimizer=torch.optim.SGD, loss={"anchor_weight": 0.1})


def test_loss_settings_are_checked():
    from loki.config import check_train_config

    for override, match in (("loss.logits=every", "loss.logits"), ("loss.anchor_weight=-1", "loss.anchor_weight"), ("loss.anchor_top_k=0", "loss.anchor_top_k")):
        with pytest.raises(LokiError, match=match):
            check_train_config(compose_config("train", "model=tiny", "task=tiny_rerank", override))


@pytest.mark.slow
def test_train_py_runs_with_the_anchor_and_the_labelled_loss(tmp_path):
    """Both options through train.py: full fine-tuning runs, and LoKI with the anchor still moves only its rows."""
    common = ("model=tiny", "task=tiny_rerank", "trainer.max_steps=2", "trainer.max_epochs=5", "evaluate.validation_task_metric=false",
              "evaluate.retention=false", f"paths.cache_dir={tmp_path / 'cache'}", "logger=none",
              "loss.logits=labelled", "loss.anchor_weight=0.5", "loss.anchor_prompts=3", "loss.anchor_batch=2")
    metrics = run_train(tmp_path / "full", *common, "loki.enabled=false", "export.format=none")
    assert metrics["steps"] == 2
    run_train(tmp_path / "loki", *common, "loki.q=0.25", "loki.impl=rows")
    from transformers import AutoModelForCausalLM

    from loki.models import load_model_and_tokenizer

    base, _ = load_model_and_tokenizer(compose_config("train", *common).model)
    tuned = AutoModelForCausalLM.from_pretrained(tmp_path / "loki" / "model")
    positions = json.loads((tmp_path / "loki" / "positions.json").read_text())
    moved = 0
    for name, before in base.state_dict().items():
        after = tuned.state_dict()[name]
        if name.endswith("mlp.down_proj.weight"):
            keep = torch.ones(before.shape[0], dtype=torch.bool)
            keep[positions[int(name.split(".layers.")[1].split(".")[0])]] = False
            assert torch.equal(before[keep], after[keep]), name
            moved += int((before[~keep] != after[~keep]).any(dim=1).sum())
        else:
            assert torch.equal(before, after), name
    assert moved > 0


def test_anchor_targets_are_cached_per_base_model_and_anchor_settings(tmp_path, monkeypatch):
    """build_anchor computes the base distributions once per model, prompts and anchor settings: the second
    run reads exactly the same tensors from the cache without a pass over the prompts, and a setting that
    changes the targets (top_k, prompt count, a peft config) or only the run (an LR) keys its own file or not."""
    from types import SimpleNamespace

    import loki.losses
    from loki.models import load_model_and_tokenizer
    from loki.recipe import anchor_cache_file, attribution_prompt_ids, build_anchor

    base = ("train", "model=tiny", "task=tiny_rerank", f"paths.cache_dir={tmp_path}", "loss.anchor_weight=1", "loss.anchor_prompts=3", "loss.anchor_top_k=4")
    cfg = compose_config(*base)
    model, tokenizer = load_model_and_tokenizer(cfg.model)
    setup = SimpleNamespace(model=model, tokenizer=tokenizer, device=torch.device("cpu"))
    first = build_anchor(cfg, setup)
    prompts, pad_id = attribution_prompt_ids(cfg, tokenizer, 3)
    direct = anchor_targets(model, prompts, pad_id, top_k=4)  # the independent pass
    key = anchor_cache_file(cfg, model)
    assert key.is_file() and key.parent == tmp_path / "anchor"

    def no_pass(*args, **kwargs):
        raise AssertionError("the cached anchor ran the model again")

    monkeypatch.setattr(loki.losses, "anchor_targets", no_pass)
    second = build_anchor(cfg, setup)
    for name in ("input_ids", "attention_mask", "log_probs", "token_ids"):
        assert torch.equal(getattr(first, name), getattr(direct, name)), name
        assert torch.equal(getattr(second, name), getattr(direct, name)), name
    assert anchor_cache_file(compose_config(*base, "model.loki_lr=0.3", "optimizer.lr=0.2"), model) == key
    for other in ("loss.anchor_top_k=5", "loss.anchor_prompts=2", "data.per_subject=3"):
        assert anchor_cache_file(compose_config(*base, other), model) != key, other
    assert anchor_cache_file(compose_config(*base, "loki=off", "lora=pissa"), model) != anchor_cache_file(compose_config(*base, "loki=off"), model)
