"""Small exports (loki.implant.adapter): only the trained rows, applied to the base they came from, give the
full export's logits exactly; another base is refused; peft LoRA writes peft's adapter; the export config."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from loki.errors import LokiError
from loki.implant import (
    EXPORT_FORMATS,
    LokiDownProj,
    attach_optimizer,
    base_digest,
    export_format,
    export_model,
    install,
    load_adapter,
    merge,
    merge_adapter,
    save_adapter,
    save_peft_adapter,
)
from loki.implant.adapter import adapter_bytes, read_adapter
from tests.conftest import compose_config, make_tiny_model

POSITIONS = [[1, 5, 9, 30], [0, 2, 17]]  # 2 layers of D = 32 rows


def _batch(vocab: int = 259, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (2, 12), generator=generator)


def _train_loki(model, impl: str = "rows", lora_rank: int = 0, steps: int = 3):
    """A few AdamW steps of LoKI on random tokens, then merge: the run's trained plain model."""
    handle = install(model, POSITIONS, impl=impl, lora_rank=lora_rank)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=5e-2, weight_decay=0.1)
    attach_optimizer(handle, optimizer)
    model.train()
    for step in range(steps):
        ids = _batch(seed=step)
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    merge(model, handle)
    return model.eval()


def _logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.mark.parametrize("impl,lora_rank", [("hook", 0), ("rows", 0), ("rows", 2)], ids=["hook", "rows", "lora"])
def test_adapter_on_the_base_equals_the_full_export_exactly(tmp_path, impl, lora_rank):
    trained = _train_loki(make_tiny_model(seed=0), impl, lora_rank)
    full = export_model(trained, None, tmp_path / "model")
    path = save_adapter(trained, POSITIONS, tmp_path / "adapter", base_name="tiny-seed0")

    base = make_tiny_model(seed=0)
    before = _logits(base, _batch(seed=9))
    applied = load_adapter(base, tmp_path / "adapter")
    reloaded = AutoModelForCausalLM.from_pretrained(full).eval()
    ids = _batch(seed=9)
    assert torch.equal(_logits(applied, ids), _logits(reloaded, ids))
    assert not torch.equal(_logits(applied, ids), before)  # the training did move the rows
    # only the selected rows were written: every other weight is the base's, bit for bit
    fresh = make_tiny_model(seed=0).state_dict()
    for name, value in applied.state_dict().items():
        if "down_proj" not in name:
            assert torch.equal(value, fresh[name]), name
    for layer, rows in enumerate(POSITIONS):
        weight, original = applied.model.layers[layer].mlp.down_proj.weight, fresh[f"model.layers.{layer}.mlp.down_proj.weight"]
        others = [r for r in range(32) if r not in rows]
        assert torch.equal(weight[others], original[others])
    # the file holds the rows and positions only: k x F values per layer plus k int64 positions
    positions, blocks, metadata = read_adapter(path)
    assert positions == [sorted(r) for r in POSITIONS] and metadata["base_model"] == "tiny-seed0"
    assert {layer: tuple(b.shape) for layer, b in blocks.items()} == {0: (4, 64), 1: (3, 64)}
    assert path.stat().st_size < 7 * (64 * 4 + 8) + 4096  # 7 float32 rows of 64, their positions, a header


def test_unmerged_adapter_is_trainable_rows_that_merge_to_the_same_model(tmp_path):
    trained = _train_loki(make_tiny_model(seed=0), "rows")
    save_adapter(trained, POSITIONS, tmp_path / "adapter")
    ids = _batch(seed=4)
    unmerged = load_adapter(make_tiny_model(seed=0), tmp_path / "adapter", merge=False)
    blocks = [m for m in unmerged.modules() if isinstance(m, LokiDownProj)]
    assert len(blocks) == 2 and all(b.rows.requires_grad for b in blocks)
    torch.testing.assert_close(_logits(unmerged, ids), _logits(trained, ids), rtol=0, atol=1e-5)
    assert torch.equal(_logits(merge_adapter(unmerged), ids), _logits(trained, ids))


def test_bf16_adapter_keeps_the_dtype_and_the_digest_ignores_storage_dtype(tmp_path):
    trained = _train_loki(make_tiny_model(seed=0).to(torch.bfloat16), "rows")
    save_adapter(trained, POSITIONS, tmp_path / "adapter")
    _, blocks, metadata = read_adapter(tmp_path / "adapter")
    assert metadata["dtype"] == "bfloat16" and all(b.dtype == torch.bfloat16 for b in blocks.values())
    base16 = make_tiny_model(seed=0).to(torch.bfloat16)
    ids = _batch(seed=2)
    assert torch.equal(_logits(load_adapter(base16, tmp_path / "adapter"), ids), _logits(trained, ids))
    # the same bf16 weights held as float32 are the same base (the digest hashes float32 values)
    assert base_digest(make_tiny_model(seed=0).to(torch.bfloat16).float(), POSITIONS) == metadata["base_digest"]


def test_adapter_for_another_base_is_refused(tmp_path):
    save_adapter(_train_loki(make_tiny_model(seed=0)), POSITIONS, tmp_path / "adapter", base_name="tiny-seed0")
    other = make_tiny_model(seed=1)
    with pytest.raises(LokiError, match=r"made for base model 'tiny-seed0'") as caught:
        load_adapter(other, tmp_path / "adapter")
    assert "\n" not in str(caught.value)
    assert torch.equal(other.model.layers[0].mlp.down_proj.weight, make_tiny_model(seed=1).model.layers[0].mlp.down_proj.weight)
    with pytest.raises(LokiError, match="positions for 2 layers but the model has 3"):
        load_adapter(make_tiny_model(seed=0, layers=3), tmp_path / "adapter")


def test_digest_covers_only_the_rows_the_adapter_does_not_replace():
    base = make_tiny_model(seed=0)
    digest = base_digest(base, POSITIONS)
    with torch.no_grad():
        base.model.layers[1].mlp.down_proj.weight[17] += 1.0  # a selected row: the adapter overwrites it
    assert base_digest(base, POSITIONS) == digest
    with torch.no_grad():
        base.model.layers[1].mlp.down_proj.weight[16] += 1.0  # a frozen row: another base
    assert base_digest(base, POSITIONS) != digest


def test_peft_lora_adapter_round_trip_and_refusal(tmp_path):
    from peft import LoraConfig, get_peft_model

    peft_model = get_peft_model(make_tiny_model(seed=0), LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:  # zero at init: give the adapter an effect
                param.copy_(torch.randn(param.shape, generator=torch.Generator().manual_seed(len(name))) * 0.05)
    out = save_peft_adapter(peft_model, tmp_path / "adapter", base_name="tiny-seed0")
    assert (out / "adapter_config.json").is_file() and (out / "loki_adapter.json").is_file()
    merged = peft_model.merge_and_unload().eval()
    ids = _batch(seed=5)
    applied = load_adapter(make_tiny_model(seed=0), out).eval()
    assert torch.equal(_logits(applied, ids), _logits(merged, ids))
    with pytest.raises(LokiError, match="made for base model 'tiny-seed0'"):
        load_adapter(make_tiny_model(seed=1), out)


def test_adapter_size_against_the_full_export_on_disk(tmp_path):
    model = make_tiny_model(seed=0, hidden=64, intermediate=256, layers=4)
    positions = [list(range(0, 64, 10))] * 4  # 7 rows of 64 per layer, about q = 10 %
    export_model(model, None, tmp_path / "model")
    path = save_adapter(model, positions, tmp_path / "adapter")
    full = (tmp_path / "model" / "model.safetensors").stat().st_size
    tensors = 4 * 7 * (256 * 4 + 8)
    assert adapter_bytes(4, 64, 256, 0.11, 4) == tensors  # k = floor(0.11 * 64) = 7
    assert tensors <= path.stat().st_size <= tensors + 2048  # the rows and positions plus a small header
    assert path.stat().st_size < full / 20


# ------------------------------------------------------------------------------------ the export config


def test_export_format_maps_the_old_booleans():
    assert EXPORT_FORMATS == ("full", "adapter", "none")
    assert [export_format(v) for v in (True, False, {"format": "adapter"}, "none")] == ["full", "none", "adapter", "none"]


def test_export_config_checks(monkeypatch):
    from loki import config
    from loki.config import check_train_config

    base = ("model=tiny", "task=tiny_rerank", "evaluate.retention=false", "loki.positions=null")
    check_train_config(compose_config("train", *base, "export.format=adapter"))
    monkeypatch.setattr(config, "_WARNED", set())  # the warning is once per process
    with pytest.warns(FutureWarning, match=r"^export=false is deprecated: it is now export.format=none \(export=false still works"):
        check_train_config(compose_config("train", *base, "export=false"))
    with pytest.raises(LokiError, match=r"export.format must be one of full, adapter, none, got 'small'"):
        check_train_config(compose_config("train", *base, "export.format=small"))
    with pytest.raises(LokiError, match=r"export.format must be full or none for a full fine-tuning"):
        check_train_config(compose_config("train", *base, "loki=off", "export.format=adapter"))
    check_train_config(compose_config("train", *base, "loki=off", "lora=r16", "export.format=adapter"))
    with pytest.raises(LokiError, match=r"lora.variant=pissa"):
        check_train_config(compose_config("train", *base, "loki=off", "lora=pissa", "export.format=adapter"))
    check_train_config(compose_config("train", *base, "export.alpha=0.5"))
    for bad in ("0", "1.5", "true"):
        with pytest.raises(LokiError, match=r"^export.alpha must be a number in \(0, 1\]"):
            check_train_config(compose_config("train", *base, f"export.alpha={bad}"))
    with pytest.raises(LokiError, match=r"export.format must be full or none with export.alpha < 1"):
        check_train_config(compose_config("train", *base, "export.alpha=0.5", "export.format=adapter"))


# ------------------------------------------------------------------------------------ through train.py

TINY_RUN = ("model=tiny", "task=tiny_rerank", "trainer.max_steps=3", "trainer.max_epochs=5", "evaluate.validation_task_metric=false",
            "evaluate.retention=false", "evaluate.task=false", "logger=none")


@pytest.mark.slow
@pytest.mark.parametrize("method", [("loki.impl=rows",), ("loki=off", "lora=r16", "lora.rank=4", "lora.alpha=8")], ids=["loki", "peft_lora"])
def test_train_py_adapter_export_applies_to_the_base_as_the_full_export(tmp_path, method):
    from loki.models import load_model_and_tokenizer
    from loki.positions import save_positions
    from tests.conftest import run_train

    positions = save_positions([[3, 9, 40, 63], [0, 7, 8, 31], [1, 2, 50, 60], [5, 6, 11, 12]], tmp_path / "positions.json")
    common = (*TINY_RUN, f"paths.cache_dir={tmp_path / 'cache'}", f"loki.positions={positions}", "loki.q=0.0625", *method)
    adapter_run = run_train(tmp_path / "adapter_run", *common, "export.format=adapter")
    full_run = run_train(tmp_path / "full_run", *common, "export.format=full")
    assert adapter_run["export_dir"] == str(tmp_path / "adapter_run" / "adapter") and not (tmp_path / "adapter_run" / "model").exists()

    base, _ = load_model_and_tokenizer(compose_config("train", *common).model)
    applied = load_adapter(base, adapter_run["export_dir"]).eval()
    reloaded = AutoModelForCausalLM.from_pretrained(full_run["export_dir"]).eval()
    ids = _batch(vocab=reloaded.config.vocab_size, seed=1)
    assert torch.equal(_logits(applied, ids), _logits(reloaded, ids))


@pytest.mark.slow
def test_export_alpha_exports_the_interpolation_of_the_run_towards_the_base(tmp_path):
    """export.alpha=0.5: the exported model is torch.lerp(base, run, 0.5) tensor by tensor, where the run is the
    same run exported at alpha 1 (same seed); for LoKI every weight outside its rows stays the base's, bit for bit."""
    from loki.models import load_model_and_tokenizer
    from loki.positions import save_positions
    from tests.conftest import run_train

    ROWS = [[3, 9, 40, 63], [0, 7, 8, 31], [1, 2, 50, 60], [5, 6, 11, 12]]
    positions = save_positions(ROWS, tmp_path / "positions.json")
    common = (*TINY_RUN, f"paths.cache_dir={tmp_path / 'cache'}", f"loki.positions={positions}", "loki.q=0.0625",
              "optimizer.lr=1e-2", "export.format=full")
    whole = run_train(tmp_path / "whole", *common)
    half = run_train(tmp_path / "half", *common, "export.alpha=0.5")
    base, _ = load_model_and_tokenizer(compose_config("train", *common).model)
    run = AutoModelForCausalLM.from_pretrained(whole["export_dir"]).state_dict()
    got = AutoModelForCausalLM.from_pretrained(half["export_dir"]).state_dict()
    changed = 0
    for name, theta_0 in base.state_dict().items():
        if torch.equal(run[name], theta_0):
            assert torch.equal(got[name], theta_0), name
            continue
        changed += 1
        assert name.endswith("down_proj.weight"), name
        assert torch.equal(got[name], torch.lerp(theta_0, run[name], 0.5)), name
        layer = int(name.split(".layers.")[1].split(".")[0])
        moved = (run[name] != theta_0).any(dim=1).nonzero().flatten().tolist()
        assert moved and set(moved) <= set(ROWS[layer]), name
    assert changed == 4 and half["export_alpha"] == 0.5 and whole["export_alpha"] == 1.0

