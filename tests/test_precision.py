"""fp32 master rows: with bf16/fp16 weights, LoKI's trainable rows and LoRA factors train in float32.

The oracle is the same run in float32: 50 AdamW steps at lr 1e-5 must move the selected rows as the
fp32 run does, to bf16 rounding, while a pure-bf16 parameter (the old behaviour) loses most of the update
because each step is below half an ulp of a typical weight.
"""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch
from torch import nn

from tests.conftest import make_tiny_model
from tests.ddp_implant_worker import MODES, POSITIONS, TinyCausalLM, make_trainer, token_batches
from tests.test_implant import assert_only_selected_rows_moved
from loki.errors import LokiError
from loki.implant import LokiDownProj, check_precision, install, merge
from loki.lightning import LokiCallback

DOWN = "model.layers.{}.mlp.down_proj.weight"


def train_rows(dtype: torch.dtype, mode: str = "rows", pure_low_precision: bool = False, steps: int = 50, lr: float = 1e-5):
    """(base state, merged state) after `steps` AdamW steps on the tiny model held in `dtype`."""
    torch.manual_seed(0)
    model = make_tiny_model().to(dtype)
    base = {k: v.clone() for k, v in model.state_dict().items()}
    options = MODES[mode]
    handle = install(model, POSITIONS, options["impl"], options.get("lora_rank", 0), options.get("lora_alpha"))
    if pure_low_precision:  # the old behaviour: the trainable block in the weight's own dtype
        for proj in model.modules():
            if isinstance(proj, LokiDownProj):
                proj.rows = nn.Parameter(proj.rows.detach().to(dtype))
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    batches = list(token_batches(samples=8))
    for step in range(steps):
        (ids,) = batches[step % len(batches)]
        optimizer.zero_grad()
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
    state_dtypes = {t.dtype for p in params for t in optimizer.state[p].values() if torch.is_tensor(t) and t.dim() > 0}
    # The selected rows before the one rounding at merge: the masters, or base + (alpha/r) A B in fp32.
    effective = []
    with torch.no_grad():
        for proj in model.modules():
            if isinstance(proj, LokiDownProj):
                if proj.lora_rank == 0:
                    effective.append(proj.rows.float().clone())
                else:
                    base_rows = proj.weight.index_select(0, proj.row_index).float()
                    effective.append(base_rows + proj.lora_scaling * (proj.lora_A.float() @ proj.lora_B.float()))
    merge(model, handle)
    return base, {k: v.clone() for k, v in model.state_dict().items()}, state_dtypes, effective


_fp32_runs: dict = {}


def fp32_run(mode: str):
    if mode not in _fp32_runs:
        _fp32_runs[mode] = train_rows(torch.float32, mode)
    return _fp32_runs[mode]


def follows_fp32(run: tuple, run32: tuple) -> tuple[bool, str]:
    """Whether the selected rows moved as in the fp32 run: the same update before the merge's rounding
    (projected on the fp32 one, within 10 %; LoRA's deltas are below one bf16 ulp, so they are compared
    before rounding) and the same merged weights up to bf16 rounding (mean error under half an ulp)."""
    (base, state, _, effective), (base32, state32, _, effective32) = run, run32
    report = []
    ok = True
    for layer in range(len(POSITIONS)):
        rows = torch.tensor(POSITIONS[layer])
        key = DOWN.format(layer)
        moved32 = effective32[layer] - base32[key][rows]
        moved = effective[layer] - base[key][rows].float()
        kept = float((moved * moved32).sum() / (moved32 * moved32).sum())  # 1.0: the whole fp32 update
        reference = state32[key].to(state[key].dtype)[rows].float()  # the fp32 result, rounded once
        ulp = torch.finfo(state[key].dtype).eps * reference.abs().clamp_min(1e-6)
        err_ulp = ((state[key][rows].float() - reference).abs() / ulp).mean().item()
        ok &= 0.9 <= kept <= 1.1 and err_ulp < 0.5
        report.append(f"layer {layer}: kept {kept:.2f} of the fp32 update, mean error {err_ulp:.2f} ulp")
    return ok, "; ".join(report)


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["rows", "lora"])
def test_bf16_rows_move_as_the_fp32_run(mode):
    run = base, state, optimizer_dtypes, _ = train_rows(torch.bfloat16, mode)
    ok, report = follows_fp32(run, fp32_run(mode))
    assert ok, report
    assert optimizer_dtypes == {torch.float32}  # Adam's moments follow the fp32 masters
    assert all(v.dtype == torch.bfloat16 for v in state.values())  # merged back in the model's dtype
    assert_only_selected_rows_moved(state, base)  # everything else bit-identical in bf16 too


@pytest.mark.slow
def test_a_pure_bf16_parameter_fails_the_same_check():
    # The control that makes the test above able to fail: the same run with bf16 rows keeps a fraction
    # of the update (about 0.1-0.2 of it projected on the fp32 one here, and errors of several ulp).
    run = _, _, optimizer_dtypes, _ = train_rows(torch.bfloat16, "rows", pure_low_precision=True)
    ok, report = follows_fp32(run, fp32_run("rows"))
    assert not ok, report
    assert optimizer_dtypes == {torch.bfloat16}


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("mode", ["rows", "lora"])
def test_trainable_tensors_are_fp32_masters_cast_in_forward(dtype, mode):
    model = make_tiny_model().to(dtype)
    base = {k: v.clone() for k, v in model.state_dict().items()}
    options = MODES[mode]
    handle = install(model, POSITIONS, options["impl"], options.get("lora_rank", 0), options.get("lora_alpha"))
    trainable = handle.trainable_parameters()
    assert trainable and all(p.dtype == torch.float32 for p in trainable)
    (ids,) = next(iter(token_batches()))
    logits = model(input_ids=ids).logits
    assert logits.dtype == dtype
    logits.float().sum().backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in trainable)
    merge(model, handle)
    state = model.state_dict()
    # Nothing trained: the masters round back to exactly the weights they were copied from.
    assert all(torch.equal(state[k], base[k]) and state[k].dtype == dtype for k in base)


def test_hook_with_low_precision_weights_is_refused_before_touching_the_model():
    model = make_tiny_model().to(torch.bfloat16)
    with pytest.raises(LokiError, match="use loki.impl=rows") as err:
        install(model, POSITIONS, "hook")
    message = str(err.value)
    assert "\n" not in message and message.endswith(".") and "bfloat16" in message
    assert all(p.requires_grad for p in model.parameters())
    assert not any(p._backward_hooks for p in model.parameters())
    # The config validator's form: the dtype name from model.dtype.
    with pytest.raises(LokiError, match="float16 down_proj weights"):
        check_precision("hook", 0, "float16")
    check_precision("hook", 0, "float32")
    check_precision("rows", 0, "bfloat16")
    check_precision("hook", 2, torch.bfloat16)  # LoRA on the rows: fp32 factors, whatever impl says
    install(make_tiny_model().to(torch.bfloat16), POSITIONS, "hook", lora_rank=2)


@pytest.mark.slow
def test_lightning_fit_on_bf16_weights_keeps_fp32_optimizer_state():
    pl.seed_everything(0, verbose=False)
    module = TinyCausalLM(make_tiny_model().to(torch.bfloat16), lr=1e-3)
    base = {k: v.clone() for k, v in module.model.state_dict().items()}
    seen = {}

    class Spy(pl.Callback):
        def on_train_batch_end(self, trainer, pl_module, *args):
            optimizer = trainer.optimizers[0]
            seen["state"] = {t.dtype for s in optimizer.state.values() for t in s.values() if t.dim() > 0}

    callback = LokiCallback(POSITIONS, impl="rows")
    make_trainer(3, [callback, Spy()]).fit(module, token_batches(samples=6))
    assert seen["state"] == {torch.float32}
    state = module.model.state_dict()
    assert all(v.dtype == torch.bfloat16 for v in state.values())
    assert_only_selected_rows_moved(state, base)


def test_a_trainer_precision_that_converts_the_masters_is_refused():
    # bf16-true converts the whole module after setup, fp32 masters included: refused before training.
    module = TinyCausalLM(make_tiny_model())
    trainer = make_trainer(2, [LokiCallback(POSITIONS, impl="rows")], precision="bf16-true")
    with pytest.raises(LokiError, match="precision=bf16-mixed") as err:
        trainer.fit(module, token_batches())
    assert "\n" not in str(err.value) and str(err.value).endswith(".")
    assert trainer.global_step == 0
