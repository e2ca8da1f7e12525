"""Implanting: exact freezing (hook, rows, LoRA) under weight decay, clipping, bf16, DDP and resume; export.

The oracle throughout is the untouched base model: every parameter other than the selected rows of
down_proj must be bit-identical to it (torch.equal), and every selected row must have moved.
"""

from __future__ import annotations

import glob
import json
import os
import subprocess
import sys
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from tests.conftest import make_tiny_model, optimizer_step
from tests.ddp_implant_worker import MODES, POSITIONS, VOCAB, TinyCausalLM, make_trainer, token_batches
from loki.arch import down_projs
from loki.errors import LokiError
from loki.implant import (
    LokiDownProj,
    attach_optimizer,
    export_model,
    install,
    merge,
    row_mask,
)
from loki.lightning import LokiCallback
from loki.positions import save_positions

HIDDEN, INTER, LAYERS = 32, 64, 2
REPO = Path(__file__).resolve().parent.parent
PUBLISHED = REPO / "loki" / "published" / "Qwen2.5-0.5B-Instruct" / "5.json"  # the authors' file, shipped


def base_state() -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in make_tiny_model().state_dict().items()}


def assert_only_selected_rows_moved(state: dict, base: dict, positions=POSITIONS) -> None:
    """Every frozen tensor and unselected row bit-identical to `base`; every selected row changed."""
    assert state.keys() == base.keys()
    for name, value in state.items():
        layer = next((l for l in range(LAYERS) if name == f"model.layers.{l}.mlp.down_proj.weight"), None)
        if layer is None:
            assert torch.equal(value, base[name]), f"frozen parameter {name} moved"
            continue
        selected = row_mask(positions[layer], HIDDEN)
        assert torch.equal(value[~selected], base[name][~selected]), f"unselected rows of {name} moved"
        row_moved = (value[selected] != base[name][selected]).any(dim=1)
        assert row_moved.all(), f"selected rows of {name} did not all change"


def plain_hf_left(model: nn.Module) -> None:
    """After fit: ordinary nn.Linear down_projs, no gradient hooks, everything frozen."""
    assert not any(isinstance(m, LokiDownProj) for m in model.modules())
    for proj in down_projs(model):
        assert type(proj) is nn.Linear
        assert not proj.weight._backward_hooks
    assert not any(p.requires_grad for p in model.parameters())


# ------------------------------------------------------------------ plain torch: the trap and the guard


def train_plain(impl, optimizer_factory, guard: bool, steps: int = 3, use_closure: bool = False, lora_rank: int = 0):
    torch.manual_seed(0)
    model = make_tiny_model()
    handle = install(model, POSITIONS, impl, lora_rank)
    optimizer = optimizer_factory([p for p in model.parameters() if p.requires_grad])
    if guard:
        attach_optimizer(handle, optimizer)
    for (ids,) in token_batches(samples=2 * steps):
        def closure():
            optimizer.zero_grad()
            loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            return loss

        optimizer_step(optimizer, closure, use_closure)
    merge(model, handle)
    return model.state_dict()


OPTIMIZERS = {
    "adamw": lambda ps: torch.optim.AdamW(ps, lr=1e-2, weight_decay=0.1),  # decoupled decay: taken over
    "adam_l2": lambda ps: torch.optim.Adam(ps, lr=1e-2, weight_decay=0.1),  # coupled decay: folded into grad
    "sgd_l2": lambda ps: torch.optim.SGD(ps, lr=0.5, momentum=0.9, weight_decay=0.1),
    "rmsprop": lambda ps: torch.optim.RMSprop(ps, lr=1e-3, weight_decay=0.1),  # unrecognised: snapshot
}


@pytest.mark.parametrize("optimizer", OPTIMIZERS)
def test_weight_decay_moves_masked_rows_without_the_guard(optimizer):
    # The oracle that the trap is real: a zero gradient does not keep a row still under weight decay.
    state = train_plain("hook", OPTIMIZERS[optimizer], guard=False)
    base = base_state()
    weight = state["model.layers.0.mlp.down_proj.weight"]
    unselected = ~row_mask(POSITIONS[0], HIDDEN)
    assert not torch.equal(weight[unselected], base["model.layers.0.mlp.down_proj.weight"][unselected])


@pytest.mark.parametrize("use_closure", [False, True])
@pytest.mark.parametrize("optimizer", OPTIMIZERS)
def test_guard_keeps_unselected_rows_and_decays_selected_ones_like_rows_impl(optimizer, use_closure):
    hook = train_plain("hook", OPTIMIZERS[optimizer], guard=True, use_closure=use_closure)
    assert_only_selected_rows_moved(hook, base_state())
    # Independent path: with impl=rows the optimizer decays the [k, F] parameter itself.
    rows = train_plain("rows", OPTIMIZERS[optimizer], guard=False, use_closure=use_closure)
    # A decay skipped or applied twice would differ by about lr * wd * |w| ~ 2e-5 per step for AdamW.
    # RMSprop divides by sqrt(v) with a small eps, which magnifies summation-order noise in tiny gradients.
    atol = 1e-5 if optimizer == "rmsprop" else 1e-6
    for name in hook:
        torch.testing.assert_close(hook[name], rows[name], rtol=1e-5, atol=atol)


def test_guard_leaves_optimizer_settings_as_they_were():
    model = make_tiny_model()
    handle = install(model, POSITIONS, "hook")
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.1)
    attach_optimizer(handle, optimizer)
    (ids,) = next(iter(token_batches()))
    model(input_ids=ids, labels=ids).loss.backward()
    optimizer.step()
    assert optimizer.param_groups[0]["weight_decay"] == 0.1
    merge(model, handle)
    assert not optimizer._optimizer_step_pre_hooks and not optimizer._optimizer_step_post_hooks


# ------------------------------------------------------------------ Lightning: plain, clip, bf16

VARIANTS = {"plain": {}, "clip": dict(gradient_clip_val=0.5), "bf16": dict(precision="bf16-mixed")}
_fits: dict = {}


def fit_once(mode: str, variant: str, steps: int = 3):
    """Fit one (mode, variant) and memoise it: several tests read the same run."""
    if (mode, variant) not in _fits:
        pl.seed_everything(0, verbose=False)
        module = TinyCausalLM(make_tiny_model())
        callback = LokiCallback(POSITIONS, **MODES[mode])
        trainer = make_trainer(steps, [callback], **VARIANTS[variant])
        trainer.fit(module, token_batches(samples=2 * steps))
        _fits[mode, variant] = (module, callback, trainer, {k: v.clone() for k, v in module.model.state_dict().items()})
    return _fits[mode, variant]


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("mode", MODES)
def test_fit_moves_only_selected_rows(mode, variant):
    module, callback, trainer, state = fit_once(mode, variant)
    assert trainer.global_step == 3
    assert_only_selected_rows_moved(state, base_state())
    plain_hf_left(module.model)
    optimizer = trainer.optimizers[0]
    assert not optimizer._optimizer_step_pre_hooks and not optimizer._optimizer_step_post_hooks
    assert optimizer.param_groups[0]["weight_decay"] == 0.1


@pytest.mark.parametrize("variant", VARIANTS)
def test_hook_and_rows_give_the_same_weights(variant):
    hook, rows = fit_once("hook", variant)[3], fit_once("rows", variant)[3]
    # bf16 autocast rounds matmul inputs to 8 bits of mantissa; both impls see the same rounding of the
    # same values but sum in different orders, so allow bf16-sized differences there.
    tol = dict(rtol=1e-2, atol=1e-3) if variant == "bf16" else dict(rtol=1e-5, atol=1e-6)
    for name in hook:
        torch.testing.assert_close(hook[name], rows[name], **tol)


def test_summary_counts_match_hand_formula_and_the_model():
    k, r = 4, 2
    expected = {
        "hook": (LAYERS * HIDDEN * INTER, LAYERS * k * INTER),
        "rows": (LAYERS * k * INTER, LAYERS * k * INTER),
        "lora": (LAYERS * (k * r + r * INTER), LAYERS * (k * r + r * INTER)),
    }
    total = sum(p.numel() for p in make_tiny_model().parameters())
    for mode, (allocated, effective) in expected.items():
        model = make_tiny_model()
        options = MODES[mode]
        handle = install(model, POSITIONS, options["impl"], options.get("lora_rank", 0))
        summary = handle.summary()
        assert (summary["trainable_allocated"], summary["trainable_effective"]) == (allocated, effective)
        assert summary["total_params"] == total
        assert sum(p.numel() for p in model.parameters() if p.requires_grad) == allocated
        assert summary["mode"] == mode
    assert fit_once("lora", "plain")[1].summary()["trainable_effective"] == LAYERS * (k * r + r * INTER)


def test_lora_starts_at_the_base_model():
    model, base = make_tiny_model(), make_tiny_model()
    install(model, POSITIONS, "rows", lora_rank=2)
    (ids,) = next(iter(token_batches()))
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, base(input_ids=ids).logits)


def test_setup_twice_installs_once():
    module = TinyCausalLM(make_tiny_model())
    callback = LokiCallback(POSITIONS, impl="hook")
    callback.setup(None, module, "fit")
    handle = callback.handle
    callback.setup(None, module, "fit")
    assert callback.handle is handle and len(handle.grad_hooks) == LAYERS
    assert len(module.model.model.layers[0].mlp.down_proj.weight._backward_hooks) == 1
    callback.setup(None, module, "validate")  # other stages do not implant
    callback.on_fit_end(None, module)
    plain_hf_left(module.model)


def test_optimizer_without_the_trainable_rows_fails_before_training():
    class WrongOptimizer(TinyCausalLM):
        def configure_optimizers(self):
            return torch.optim.AdamW([nn.Parameter(torch.zeros(1))], lr=1e-2)

    module = WrongOptimizer(make_tiny_model())
    trainer = make_trainer(2, [LokiCallback(POSITIONS, impl="rows")])
    with pytest.raises(LokiError, match="optimizer holds only 0 of the"):
        trainer.fit(module, token_batches())
    assert trainer.global_step == 0
    plain_hf_left(module.model)  # on_exception merged the untouched rows back


# ------------------------------------------------------------------ resume


@pytest.mark.slow
@pytest.mark.parametrize("mode", MODES)
def test_resume_matches_an_uninterrupted_run(mode, tmp_path):
    def run(steps, ckpt_path=None, checkpoint=None):
        pl.seed_everything(0, verbose=False)
        module = TinyCausalLM(make_tiny_model())
        callbacks = [LokiCallback(POSITIONS, **MODES[mode])] + ([checkpoint] if checkpoint else [])
        trainer = make_trainer(steps, callbacks, enable_checkpointing=checkpoint is not None)
        # One batch per epoch: Lightning restarts a plain DataLoader from its first batch on resume, so
        # with a single batch the resumed run sees the same data as the uninterrupted one and any
        # difference comes from the restored weights or optimizer state.
        trainer.fit(module, token_batches(samples=2), ckpt_path=ckpt_path)
        assert trainer.global_step == steps
        return module.model.state_dict()

    full = run(4)
    run(2, checkpoint=pl.callbacks.ModelCheckpoint(dirpath=tmp_path, save_top_k=-1))
    (ckpt,) = glob.glob(str(tmp_path / "*step=2.ckpt"))
    resumed = run(4, ckpt_path=ckpt)
    assert_only_selected_rows_moved(resumed, base_state())
    for name in full:
        torch.testing.assert_close(resumed[name], full[name], rtol=1e-6, atol=1e-7)


def test_resume_with_other_positions_is_refused(tmp_path):
    module = TinyCausalLM(make_tiny_model())
    checkpoint = pl.callbacks.ModelCheckpoint(dirpath=tmp_path)
    make_trainer(2, [LokiCallback(POSITIONS, impl="hook"), checkpoint], enable_checkpointing=True).fit(
        module, token_batches(samples=4)
    )
    other = [[2, 5, 17, 30], [0, 2, 3, 31]]
    trainer = make_trainer(4, [LokiCallback(other, impl="hook")])
    with pytest.raises(LokiError, match="positions_sha1"):
        trainer.fit(TinyCausalLM(make_tiny_model()), token_batches(samples=4), ckpt_path=checkpoint.best_model_path)


# ------------------------------------------------------------------ DDP


@pytest.mark.slow
def test_ddp_two_cpu_processes(tmp_path):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), str(REPO / "tests")])}
    result = subprocess.run(
        [sys.executable, str(REPO / "tests" / "ddp_implant_worker.py"), "--out", str(tmp_path)],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    base = base_state()
    for mode in MODES:
        rank0 = torch.load(tmp_path / f"{mode}_rank0.pt")
        rank1 = torch.load(tmp_path / f"{mode}_rank1.pt")
        assert_only_selected_rows_moved(rank0, base)
        for name in rank0:  # gradients were all-reduced: both ranks hold the same model
            assert torch.equal(rank0[name], rank1[name]), name


# ------------------------------------------------------------------ export


def test_export_round_trip_with_tied_embeddings(tmp_path, chat_tokenizer):
    torch.manual_seed(0)
    model = make_tiny_model(tie_word_embeddings=True)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    handle = install(model, POSITIONS, "rows", lora_rank=2)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for (ids,) in token_batches():
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    with pytest.raises(LokiError, match="merge"):
        export_model(model, chat_tokenizer, tmp_path / "too_early")
    merge(model, handle)
    out = export_model(model, chat_tokenizer, tmp_path / "model")
    assert (out / "model.safetensors").exists()
    loaded = AutoModelForCausalLM.from_pretrained(out).eval()
    assert loaded.lm_head.weight.data_ptr() == loaded.model.embed_tokens.weight.data_ptr()
    ids = torch.tensor([chat_tokenizer("LoKI keeps what the model knows.")["input_ids"]])
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=ids).logits, model.eval()(input_ids=ids).logits)
    assert AutoTokenizer.from_pretrained(out)("abc")["input_ids"] == chat_tokenizer("abc")["input_ids"]


def test_export_after_lightning_fit_gives_the_same_logits(tmp_path):
    module = fit_once("lora", "plain")[0]
    out = export_model(module.model, None, tmp_path / "model")
    loaded = AutoModelForCausalLM.from_pretrained(out).eval()
    (ids,) = next(iter(token_batches()))
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=ids).logits, module.model.eval()(input_ids=ids).logits)


# ------------------------------------------------------------------ positions files and bad input


def test_positions_file_path_and_published_format(tmp_path):
    path = save_positions(POSITIONS, tmp_path / "positions.json")
    module = TinyCausalLM(make_tiny_model())
    callback = LokiCallback(path, impl="rows")
    callback.setup(None, module, "fit")
    assert callback.summary()["rows_per_layer"] == [4, 4]
    from omegaconf import OmegaConf  # what hydra.utils.instantiate hands over

    assert LokiCallback(OmegaConf.create({"p": POSITIONS}).p).positions == POSITIONS
    with pytest.raises(LokiError, match=f"{path} has 2 layers but the model has 3"):
        LokiCallback(path).setup(None, TinyCausalLM(make_tiny_model(layers=3)), "fit")
    # The published Qwen2.5-0.5B file against that architecture (on the meta device: shapes only).
    config = AutoConfig.for_model(
        "qwen2", hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
        num_key_value_heads=2, vocab_size=151936,
    )
    with torch.device("meta"):
        qwen = AutoModelForCausalLM.from_config(config)
    summary = install(qwen, PUBLISHED, "rows").summary()
    assert summary["rows_per_layer"] == [44] * 24  # floor(0.05 * 896)
    assert summary["trainable_effective"] == 24 * 44 * 4864


def _one_sentence(err: LokiError) -> str:
    message = str(err)
    assert "\n" not in message and message.endswith(".")
    return message


@pytest.mark.parametrize(
    "positions, impl, lora_rank, match",
    [
        ([[1, 2]], "hook", 0, "has 1 layers but the model has 2"),
        ([[1, 2], [3, 32]], "hook", 0, r"row index 32 outside \[0, 32\)"),
        ([[1, -1], [3, 4]], "rows", 0, "row index -1 outside"),
        ([[1, 1], [3, 4]], "hook", 0, "lists row 1 more than once"),
        ([list(range(33)), [3]], "hook", 0, "lists 33 rows but the model has only 32"),
        ([[], []], "hook", 0, "selects no rows"),
        ([[1, "a"], [3]], "hook", 0, "other than integer"),
        (POSITIONS, "hook", 5, "lora.rank=5 is larger than the 4 selected rows"),
        (POSITIONS, "columns", 0, "loki.impl must be one of hook, rows"),
        (POSITIONS, "hook", -1, "lora.rank must be a non-negative integer"),
    ],
)
def test_bad_input_is_one_sentence_and_touches_nothing(positions, impl, lora_rank, match):
    model = make_tiny_model()
    with pytest.raises(LokiError, match=match) as err:
        install(model, positions, impl, lora_rank)
    _one_sentence(err.value)
    assert all(p.requires_grad for p in model.parameters())  # nothing was frozen before the check
    assert not any(isinstance(m, LokiDownProj) for m in model.modules())


def test_bad_files_and_models(tmp_path):
    with pytest.raises(LokiError, match="does not exist") as err:
        LokiCallback(tmp_path / "missing.json")
    _one_sentence(err.value)
    (tmp_path / "broken.json").write_text("[[1, 2], [3")
    with pytest.raises(LokiError, match="not valid JSON") as err:
        LokiCallback(tmp_path / "broken.json")
    _one_sentence(err.value)
    with pytest.raises(LokiError, match="cannot be read"):
        LokiCallback(tmp_path)  # a directory
    (tmp_path / "dict.json").write_text(json.dumps({"layers": [[1]]}))
    with pytest.raises(LokiError, match="one list of row indices per layer"):
        LokiCallback(tmp_path / "dict.json")
    with pytest.raises(LokiError, match="supported families are qwen2") as err:
        install(nn.Sequential(nn.Linear(4, 4)), [[1]])
    _one_sentence(err.value)
    with pytest.raises(LokiError, match="pl_module.model"):
        LokiCallback(POSITIONS).setup(None, pl.LightningModule(), "fit")
    model = make_tiny_model()
    install(model, POSITIONS, "rows")
    with pytest.raises(LokiError, match="already has LoKI modules"):
        install(model, POSITIONS, "rows")
