"""Lean checkpoints: a LoKI run's Lightning checkpoint holds the trainable state, optimizer and loop state,
the positions and the base model's identity, never the frozen weights; resume rebuilds the run from the
base model and equals an uninterrupted run exactly. The baselines keep Lightning's normal checkpoints.
"""

from __future__ import annotations

import glob
import io

import lightning.pytorch as pl
import pytest
import torch

from tests.conftest import make_tiny_model
from tests.ddp_implant_worker import MODES, POSITIONS, TinyCausalLM, make_trainer, token_batches
from tests.test_implant import assert_only_selected_rows_moved, base_state
from loki.errors import LokiError
from loki.lightning import LokiCallback
from loki.store import model_identity

TRAINABLE_KEYS = {
    "hook": [f"model.model.layers.{l}.mlp.down_proj.weight" for l in range(2)],
    "rows": [f"model.model.layers.{l}.mlp.down_proj.rows" for l in range(2)],
    "lora": [f"model.model.layers.{l}.mlp.down_proj.lora_{f}" for l in range(2) for f in "AB"],
}


def fit(mode: str | None, steps: int, tmp_path=None, ckpt_path=None, model=None, positions=POSITIONS, module_cls=TinyCausalLM):
    """Fit `steps` steps (mode None: no LoKI); with `tmp_path`, checkpoint every step there."""
    pl.seed_everything(0, verbose=False)
    module = module_cls(model if model is not None else make_tiny_model())
    callbacks = [LokiCallback(positions, model_name="tiny", **MODES[mode])] if mode else []
    if tmp_path is not None:
        callbacks.append(pl.callbacks.ModelCheckpoint(dirpath=tmp_path, save_top_k=-1))
    trainer = make_trainer(steps, callbacks, enable_checkpointing=tmp_path is not None)
    # One batch per epoch: Lightning restarts a plain DataLoader from its first batch on resume, so the
    # resumed run sees the same data as the uninterrupted one (as in tests/test_implant.py).
    trainer.fit(module, token_batches(samples=2), ckpt_path=ckpt_path)
    assert trainer.global_step == steps
    return module, {k: v.clone() for k, v in module.model.state_dict().items()}


def checkpoint_at(tmp_path, step: int) -> str:
    (path,) = glob.glob(str(tmp_path / f"*step={step}.ckpt"))
    return path


def load(path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=False)


def tensors(obj):
    if torch.is_tensor(obj):
        yield obj
    elif isinstance(obj, dict):
        for value in obj.values():
            yield from tensors(value)
    elif isinstance(obj, (list, tuple)):
        for value in obj:
            yield from tensors(value)


def serialized_size(checkpoint: dict) -> int:
    buffer = io.BytesIO()
    torch.save(checkpoint, buffer)
    return buffer.getbuffer().nbytes


_runs: dict = {}


def interrupted(mode: str, tmp_path_factory):
    """(checkpoint path at step 2, uninterrupted 4-step weights), once per mode."""
    if mode not in _runs:
        folder = tmp_path_factory.mktemp(f"lean-{mode}")
        fit(mode, 2, folder)
        _runs[mode] = (checkpoint_at(folder, 2), fit(mode, 4)[1])
    return _runs[mode]


@pytest.mark.slow
@pytest.mark.parametrize("mode", MODES)
def test_checkpoint_holds_the_trainable_state_and_no_frozen_weight(mode, tmp_path_factory):
    path, _ = interrupted(mode, tmp_path_factory)
    checkpoint = load(path)
    assert checkpoint["state_dict"] == {}
    lean = checkpoint["loki"]
    assert lean["base_model"] == model_identity(make_tiny_model(), "tiny")
    assert lean["mode"] == mode and set(lean["trainable"]) == set(TRAINABLE_KEYS[mode])
    k, f, r = 4, 64, 2
    shapes = {"hook": [(k, f)] * 2, "rows": [(k, f)] * 2, "lora": [(k, r), (r, f)] * 2}[mode]
    assert sorted(tuple(t.shape) for t in lean["trainable"].values()) == sorted(shapes)
    trainable = sum(t.numel() for t in lean["trainable"].values())
    # Weights, Adam's two moments (hook: compacted to the selected rows) and a few scalars; a single
    # frozen matrix (the embedding is 259 x 32) would break the bound.
    assert sum(t.numel() for t in tensors(checkpoint)) <= 3 * trainable + 64
    if mode == "hook":
        assert {item["name"] for item in lean["compact_optimizer_state"]} == {"exp_avg", "exp_avg_sq"}


@pytest.mark.slow
@pytest.mark.parametrize("mode", MODES)
def test_resume_from_a_lean_checkpoint_equals_an_uninterrupted_run_exactly(mode, tmp_path_factory):
    path, uninterrupted = interrupted(mode, tmp_path_factory)
    _, resumed = fit(mode, 4, ckpt_path=path)
    assert_only_selected_rows_moved(resumed, base_state())
    for name in uninterrupted:
        assert torch.equal(resumed[name], uninterrupted[name]), name


@pytest.mark.slow
def test_lean_is_a_fraction_of_a_full_checkpoint_and_a_full_one_still_resumes(tmp_path, monkeypatch):
    # A full checkpoint: what Lightning writes without the lean hook (the state dict of the LoKI layout).
    monkeypatch.setattr(LokiCallback, "on_save_checkpoint", lambda self, trainer, module, checkpoint: None)
    fit("rows", 2, tmp_path)
    full_path = checkpoint_at(tmp_path, 2)
    full = load(full_path)
    monkeypatch.undo()
    fit("rows", 2, tmp_path / "lean")
    lean = load(checkpoint_at(tmp_path / "lean", 2))
    ratio = serialized_size(lean) / serialized_size(full)
    print(f"lean/full checkpoint size on the tiny model (rows): {ratio:.3f}")
    assert ratio < 0.25
    assert "loki" not in full and len(full["state_dict"]) > len(lean["loki"]["trainable"])
    _, resumed = fit("rows", 4, ckpt_path=full_path)  # checkpoints written before lean ones still resume
    _, uninterrupted = fit("rows", 4)
    for name in uninterrupted:
        assert torch.equal(resumed[name], uninterrupted[name]), name


def _one_sentence(err: LokiError) -> str:
    message = str(err)
    assert "\n" not in message and message.endswith(".")
    return message


@pytest.mark.slow
def test_a_checkpoint_of_another_base_model_is_refused(tmp_path_factory):
    path, _ = interrupted("rows", tmp_path_factory)
    with pytest.raises(LokiError, match="resume from the base model the checkpoint was trained from") as err:
        fit("rows", 4, ckpt_path=path, model=make_tiny_model(seed=1))
    _one_sentence(err.value)


@pytest.mark.slow
@pytest.mark.parametrize("other", [[[2, 5, 17, 30], [0, 2, 3, 31]], [[1, 5, 17], [0, 2, 3]]], ids=["same-k", "other-k"])
def test_a_checkpoint_of_other_positions_is_refused(other, tmp_path_factory):
    # Other k would otherwise surface as a tensor size mismatch; the check comes first.
    path, _ = interrupted("rows", tmp_path_factory)
    with pytest.raises(LokiError, match="positions_sha1") as err:
        fit("rows", 4, ckpt_path=path, positions=other)
    _one_sentence(err.value)


@pytest.mark.slow
def test_baselines_keep_lightning_checkpoints(tmp_path):
    # Full fine-tuning (loki=off): every weight trains, so every weight is saved.
    module, _ = fit(None, 1, tmp_path / "full")
    checkpoint = load(checkpoint_at(tmp_path / "full", 1))
    assert "loki" not in checkpoint and set(checkpoint["state_dict"]) == set(module.state_dict())
    # peft LoRA: Lightning's normal checkpoint of the peft model.
    from peft import LoraConfig, get_peft_model

    peft_model = get_peft_model(make_tiny_model(), LoraConfig(r=2, lora_alpha=4, target_modules=["down_proj"]))
    module, _ = fit(None, 1, tmp_path / "peft", model=peft_model)
    checkpoint = load(checkpoint_at(tmp_path / "peft", 1))
    assert "loki" not in checkpoint and set(checkpoint["state_dict"]) == set(module.state_dict())
    assert any("lora_A" in key for key in checkpoint["state_dict"])
    # The LoKI run gives the module its strict loading back when fit ends.
    assert fit("rows", 1)[0].strict_loading is True
