"""Weight interpolation theta_0 + alpha (theta_run - theta_0): exact ends, the midpoint by hand, LoKI's rows only."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from loki.errors import LokiError
from loki.interpolate import down_proj_rows, interpolation_alphas, weight_delta
from tests.conftest import make_tiny_model


def _ids(seed: int) -> torch.Tensor:
    return torch.randint(0, 259, (2, 9), generator=torch.Generator().manual_seed(seed))


def _train(model, steps: int = 3, lr: float = 1e-2) -> None:
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=0.0)
    for step in range(steps):
        ids = _ids(step)
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()


def _full_finetuned(**extra):
    base = make_tiny_model("qwen2", **extra)
    run = make_tiny_model("qwen2", **extra)
    _train(run)
    return base, run


def _kl(p_logits, q_logits) -> float:
    return float(F.kl_div(F.log_softmax(q_logits, -1), F.log_softmax(p_logits, -1), log_target=True, reduction="sum"))


def test_alpha_0_is_the_base_and_alpha_1_the_run_bit_for_bit():
    base, run = _full_finetuned()
    base_state = {k: v.clone() for k, v in base.state_dict().items()}
    run_state = {k: v.clone() for k, v in run.state_dict().items()}
    delta = weight_delta(base_state, run)
    assert len(delta) > 0
    ids = _ids(11)
    delta.apply(run, 0.0)
    for name, value in run.state_dict().items():
        assert torch.equal(value, base_state[name]), name
    with torch.no_grad():
        assert _kl(base(input_ids=ids).logits, run(input_ids=ids).logits) == 0.0
    for alpha in (0.25, 0.5, 0.75, 0.3):  # several alphas in a row, written in place, then back to the run
        delta.apply(run, alpha)
    delta.apply(run, 1.0)
    for name, value in run.state_dict().items():
        assert torch.equal(value, run_state[name]), name


def test_alpha_half_is_the_hand_computed_midpoint():
    base = {"w": torch.tensor([[0.0, 2.0], [4.0, -8.0]]), "b": torch.tensor([1.0, 1.0]), "same": torch.ones(3)}
    run = {"w": torch.tensor([[2.0, 2.0], [0.0, 8.0]]), "b": torch.tensor([3.0, 1.0]), "same": torch.ones(3)}
    delta = weight_delta(base, run)
    assert set(delta.tensors) == {"w", "b"}  # unchanged tensors are not kept
    target = {k: v.clone() for k, v in run.items()}
    delta.apply(target, 0.5)
    assert torch.equal(target["w"], torch.tensor([[1.0, 2.0], [2.0, 0.0]]))
    assert torch.equal(target["b"], torch.tensor([2.0, 1.0]))
    delta.apply(target, 0.25)
    assert torch.equal(target["w"], torch.tensor([[0.5, 2.0], [3.0, -4.0]]))


def test_midpoint_of_a_model_matches_float64_arithmetic():
    base, run = _full_finetuned()
    base_state = {k: v.clone() for k, v in base.state_dict().items()}
    run_state = {k: v.clone() for k, v in run.state_dict().items()}
    weight_delta(base_state, run_state).apply(run, 0.5)
    for name, value in run.state_dict().items():
        expected = (base_state[name].double() + run_state[name].double()) / 2
        torch.testing.assert_close(value.double(), expected, rtol=1e-6, atol=1e-7)


def test_tied_embeddings_are_kept_once_and_stay_tied():
    base, run = _full_finetuned(tie_word_embeddings=True)
    delta = weight_delta(base, run)
    assert not ({"model.embed_tokens.weight", "lm_head.weight"} <= set(delta.tensors))  # one storage, kept once
    delta.apply(run, 0.5)
    assert run.lm_head.weight.data_ptr() == run.model.embed_tokens.weight.data_ptr()


def test_a_loki_run_changes_only_its_rows_and_the_delta_keeps_only_those():
    from loki.implant import install, merge

    base = make_tiny_model("qwen2")
    run = make_tiny_model("qwen2")
    positions = [[1, 5, 9], [0, 31, 2]]  # 2 layers, D = 32
    handle = install(run, positions, impl="rows")
    _train(run, lr=5e-2)
    merge(run, handle)
    delta = weight_delta(base, run)
    names = down_proj_rows(run, positions)
    assert set(delta.tensors) == set(names) == {"model.layers.0.mlp.down_proj.weight", "model.layers.1.mlp.down_proj.weight"}
    for name, rows in names.items():
        kept = delta.changed_rows(name)
        assert kept and set(kept) <= set(rows)
        dense = run.state_dict()[name] - base.state_dict()[name]
        outside = [r for r in range(32) if r not in rows]
        assert torch.count_nonzero(dense[outside]) == 0 and torch.count_nonzero(dense[rows]) > 0
    assert delta.numel() <= 6 * 64  # only rows: at most 3 rows x F=64 per layer, not two whole weights
    by_rows = weight_delta(base, run, rows=names)
    assert {n: by_rows.changed_rows(n) for n in names} == names
    # alpha = 0.5 through the row delta: the kept rows are the midpoint, every other weight is the run's (= base's) own.
    target = {k: v.clone() for k, v in run.state_dict().items()}
    by_rows.apply(target, 0.5)
    for name, value in target.items():
        expected = (base.state_dict()[name] + run.state_dict()[name]) / 2
        torch.testing.assert_close(value, expected, rtol=1e-6, atol=1e-7)
    with pytest.raises(LokiError, match="changed outside the given rows"):
        weight_delta(base, run, rows={name: rows[:1] for name, rows in names.items()})


def test_a_pissa_run_interpolates_from_the_original_base_not_the_residual():
    from loki.peft_methods import apply_peft, build_peft_config

    base = make_tiny_model("qwen2")
    original = {k: v.clone() for k, v in base.state_dict().items()}  # theta_0, before PiSSA rewrites the weights
    adapted = apply_peft(base, build_peft_config("pissa", rank=4, alpha=8, dropout=0.0, target_modules="all-linear"))
    _train(adapted)
    merged = adapted.merge_and_unload()
    delta = weight_delta(original, merged)
    fresh = make_tiny_model("qwen2")
    ids = _ids(4)
    with torch.no_grad():
        run_logits = merged(input_ids=ids).logits
        delta.apply(fresh, 0.0)
        assert _kl(make_tiny_model("qwen2")(input_ids=ids).logits, fresh(input_ids=ids).logits) == 0.0
        delta.apply(fresh, 1.0)
        assert torch.equal(fresh(input_ids=ids).logits, run_logits)


def test_bad_inputs_stop_with_one_sentence():
    with pytest.raises(LokiError, match=r"alpha must be a number in \[0, 1\]"):
        interpolation_alphas([0.5, 1.5])
    with pytest.raises(LokiError, match="must not repeat"):
        interpolation_alphas([0.5, 0.5])
    assert interpolation_alphas() == [0.25, 0.5, 0.75]
    with pytest.raises(LokiError, match="in only one of"):
        weight_delta({"a": torch.zeros(2)}, {"b": torch.zeros(2)})
    with pytest.raises(LokiError, match="has shape"):
        weight_delta({"a": torch.zeros(2)}, {"a": torch.zeros(3)})
