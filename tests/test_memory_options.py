"""Memory options of the model config (gradient checkpointing, attention implementation, compile) and the
sharded trainer configs (FSDP, DeepSpeed ZeRO-2): what they do, what the validator allows, what it refuses."""

from __future__ import annotations

import pytest
import torch
from hydra.utils import instantiate

from loki.config import check_train_config
from loki.errors import LokiError
from loki.implant import attach_optimizer, install
from loki.models import apply_memory_options, attention_for_attribution, enable_gradient_checkpointing, load_model_and_tokenizer
from tests.conftest import compose_config, make_tiny_model, run_train

POSITIONS = [[1, 5, 17, 30], [0, 2, 3, 31]]


@pytest.mark.parametrize("mode", ["rows", "hook", "full"])
def test_gradient_checkpointing_trains_the_same(mode):
    g = torch.Generator().manual_seed(3)
    batches = [torch.randint(3, 259, (2, 12), generator=g) for _ in range(3)]
    results = []
    for checkpointing in (False, True):
        model = make_tiny_model("qwen2").train()
        if checkpointing:
            enable_gradient_checkpointing(model)
            assert model.is_activation_checkpointing
        handle = install(model, POSITIONS, impl=mode) if mode != "full" else None
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.1)
        if handle is not None:
            attach_optimizer(handle, optimizer)
        for ids in batches:
            optimizer.zero_grad()
            model(input_ids=ids, labels=ids).loss.backward()
            optimizer.step()
        results.append({k: v.detach().clone() for k, v in model.state_dict().items()})
    plain, checkpointed = results
    base = make_tiny_model("qwen2").state_dict()
    moved = 0
    for name, value in plain.items():
        torch.testing.assert_close(checkpointed[name], value, rtol=1e-5, atol=1e-6)
        moved += int(not torch.equal(base.get(name, value), value)) if name in base else 1
    assert moved > 0  # something trained


def test_gradient_checkpointing_reaches_frozen_models_rows():
    """LoKI freezes everything, embeddings included: the checkpointed layers still pass gradients to the rows."""
    model = make_tiny_model("qwen2").train()
    enable_gradient_checkpointing(model)
    install(model, POSITIONS, impl="rows")
    ids = torch.randint(3, 259, (2, 10))
    model(input_ids=ids, labels=ids).loss.backward()
    rows = [m.rows for m in model.modules() if hasattr(m, "rows")]
    assert rows and all(r.grad is not None and r.grad.abs().sum() > 0 for r in rows)


TINY_MODEL = {
    "name": "t",
    "source": "random",
    "config": {"model_type": "qwen2", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
               "num_attention_heads": 4, "num_key_value_heads": 2},
}


@pytest.mark.parametrize("impl", ["eager", "sdpa"])
def test_attn_implementation_passes_through_at_load(impl):
    model, _ = load_model_and_tokenizer({**TINY_MODEL, "attn_implementation": impl})
    assert model.config._attn_implementation == impl
    done = apply_memory_options(model, {**TINY_MODEL, "attn_implementation": impl})
    assert done == {"gradient_checkpointing": False, "attn_implementation": impl, "compile": False}


def test_attribution_switches_to_an_attention_it_can_mask(monkeypatch):
    import loki.kva

    model, _ = load_model_and_tokenizer({**TINY_MODEL, "attn_implementation": "eager"})
    monkeypatch.setattr(loki.kva, "_MASKED_ATTENTION_IMPLEMENTATIONS", ("sdpa",))  # pretend eager could not mask
    with attention_for_attribution(model, needs_mask=True):
        assert model.config._attn_implementation == "sdpa"
    assert model.config._attn_implementation == "eager"
    with attention_for_attribution(model, needs_mask=False):  # scope=sequence: any attention works
        assert model.config._attn_implementation == "eager"


TINY = ("model=tiny", "task=tiny_rerank")


@pytest.mark.parametrize(
    "override, message",
    [
        ("model.gradient_checkpointing=yes", "model.gradient_checkpointing must be true or false"),
        ("model.compile=1", "model.compile must be true or false"),
        ("model.attn_implementation=flash", "model.attn_implementation must be one of eager, sdpa, flash_attention_2 (or null)"),
    ],
)
def test_validator_checks_the_memory_options(override, message):
    with pytest.raises(LokiError, match=message.replace("(", r"\(").replace(")", r"\)")):
        check_train_config(compose_config("train", *TINY, override))


@pytest.mark.parametrize("trainer", ["fsdp", "deepspeed_zero2"])
def test_hook_is_refused_with_a_sharded_strategy_and_rows_is_allowed(trainer):
    with pytest.raises(LokiError, match=r"loki.impl=hook cannot run with trainer.strategy="):
        check_train_config(compose_config("train", *TINY, f"trainer={trainer}", "loki.impl=hook"))
    check_train_config(compose_config("train", *TINY, f"trainer={trainer}", "loki.impl=rows"))
    check_train_config(compose_config("train", *TINY, f"trainer={trainer}", "loki.impl=hook", "lora=r16"))  # LoRA rows


@pytest.mark.parametrize("trainer", ["fsdp", "deepspeed_zero2"])
def test_8b_full_fine_tuning_baseline_composes_sharded_with_checkpointing(trainer):
    cfg = compose_config("train", "model=llama8b", "loki=off", f"trainer={trainer}")
    check_train_config(cfg)
    assert cfg.model.gradient_checkpointing is True and cfg.model.dtype == "bfloat16"
    assert cfg.trainer.precision == "bf16-mixed" and cfg.trainer.accelerator == "gpu"
    if trainer == "deepspeed_zero2":
        assert cfg.trainer.strategy == "deepspeed_stage_2"  # a name: deepspeed is imported only when built
    else:
        strategy = instantiate(cfg.trainer.strategy)  # builds without CUDA; Lightning's Trainer then refuses CPU
        from lightning.pytorch.strategies import FSDPStrategy

        assert isinstance(strategy, FSDPStrategy)
        assert strategy.kwargs["use_orig_params"] is True and strategy.kwargs.get("auto_wrap_policy") is not None


def test_fsdp_cannot_run_on_cpu_processes():
    """Lightning refuses FSDP without a GPU, so the sharded path (gather, merge, export) is a GPU check."""
    import lightning.pytorch as pl

    from loki.models import fsdp_strategy

    with pytest.raises(Exception, match="GPU"):
        pl.Trainer(accelerator="cpu", devices=2, strategy=fsdp_strategy(use_orig_params=True), logger=False)


@pytest.mark.slow
def test_train_with_gradient_checkpointing_exports_a_plain_model(tmp_path):
    metrics = run_train(
        tmp_path / "run", *TINY, "trainer.max_steps=2", "trainer.max_epochs=5", "evaluate.validation_task_metric=false",
        "evaluate.retention=false", "evaluate.task=false", "loki=off", "model.gradient_checkpointing=true",
        f"paths.cache_dir={tmp_path / 'cache'}",
    )
    assert metrics["steps"] == 2
    from transformers import AutoModelForCausalLM

    tuned = AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "model")
    assert not tuned.is_activation_checkpointing


def test_rebuild_from_a_gathered_state_dict_equals_the_in_place_merge():
    """The FSDP finish path (FullModelGather): base weights + the same implant + the gathered LightningModule
    state dict, merged, give what LoKI's in-place merge gives on one device."""
    from types import SimpleNamespace

    from loki.implant import merge
    from loki.lightning import LokiCallback
    from loki.recipe import rebuild_trained_model

    cfg = compose_config("train", *TINY)
    model, _ = load_model_and_tokenizer(cfg.model)
    positions = [[1, 5, 17, 30]] * 4
    handle = install(model, positions, impl="rows")
    with torch.no_grad():
        for m in model.modules():
            if hasattr(m, "rows"):
                m.rows.add_(0.5)
    state = {f"model.{k}": v.clone() for k, v in model.state_dict().items()}  # as lightning_module_state_dict keys it
    merge(model, handle)
    setup = SimpleNamespace(loki_callback=LokiCallback(positions, impl="rows"), positions=positions, peft_lora=False)
    rebuilt = rebuild_trained_model(cfg, setup, state)
    expected = model.state_dict()
    assert rebuilt.state_dict().keys() == expected.keys()
    for name, value in rebuilt.state_dict().items():
        assert torch.equal(value, expected[name]), name
