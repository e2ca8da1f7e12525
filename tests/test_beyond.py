"""Issue 20's variants as train.py options: soft selection (per-row learning rates by rank) and the
adaptive per-layer quota (loki.quota=mass), checked against hand-computed updates and an independent
selection from the same store. The KL anchor's tests are in test_losses.py, the quota's maths in
test_select_quota.py."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from loki.config import check_train_config
from loki.errors import LokiError
from loki.implant import attach_optimizer, attach_row_scales, install, merge, soft_scales
from loki.implant.guard import RowStepScale
from tests.conftest import compose_config, make_tiny_model, optimizer_step, run_train


def test_soft_scales_fall_linearly_with_rank():
    assert soft_scales([[3, 1], [0, 2, 4, 5], []]) == [[1.0, 0.5], [1.0, 0.75, 0.5, 0.25], []]


def test_row_step_scale_scales_sgd_updates_row_by_row():
    weight = torch.nn.Parameter(torch.tensor([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]]))
    optimizer = torch.optim.SGD([weight], lr=0.5, weight_decay=0.1)
    RowStepScale(optimizer, [(weight, torch.tensor([0, 2]), torch.tensor([1.0, 0.25]))])
    weight.grad = torch.tensor([[1.0, -1.0], [2.0, 2.0], [4.0, 0.0]])
    optimizer.step()
    # plain step: w - 0.5 (g + 0.1 w); row 0 scale 1, row 1 not selected (full step), row 2 a quarter of it
    expected = torch.tensor([
        [1.0 - 0.5 * (1.0 + 0.1), 2.0 - 0.5 * (-1.0 + 0.2)],
        [3.0 - 0.5 * (2.0 + 0.3), 4.0 - 0.5 * (2.0 + 0.4)],
        [5.0 - 0.25 * 0.5 * (4.0 + 0.5), 6.0 - 0.25 * 0.5 * (0.0 + 0.6)],
    ])
    torch.testing.assert_close(weight.detach(), expected)


@pytest.mark.parametrize("impl, closure", [("hook", False), ("rows", False), ("hook", True), ("rows", True)])
def test_one_soft_adamw_step_is_the_scaled_full_step(impl, closure):
    """Lightning steps with a closure (forward and backward inside optimizer.step): the same scaled step."""
    positions = [[5, 1, 9], [0, 12]]
    scales = soft_scales(positions)
    batch = torch.randint(0, 50, (2, 7), generator=torch.Generator().manual_seed(1))
    updates = []
    for scaled in (True, False):
        model = make_tiny_model("llama", hidden=16, intermediate=24, vocab=50)
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        handle = install(model, positions, impl=impl)
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.1)
        if scaled:
            attach_row_scales(handle, optimizer, scales)
        attach_optimizer(handle, optimizer)

        def loss_and_grad():
            loss = model(input_ids=batch, labels=batch).loss
            loss.backward()
            return loss

        optimizer_step(optimizer, loss_and_grad, closure)
        merge(model, handle)
        after = dict(model.named_parameters())
        for name, value in before.items():  # everything but the selected rows is bit-identical
            if "down_proj" not in name:
                assert torch.equal(after[name], value), name
        updates.append([after[f"model.layers.{i}.mlp.down_proj.weight"].detach() - before[f"model.layers.{i}.mlp.down_proj.weight"] for i in range(2)])
    for layer, (rows, factors) in enumerate(zip(positions, scales)):
        unselected = torch.ones(16, dtype=torch.bool)
        unselected[rows] = False
        assert torch.equal(updates[0][layer][unselected], torch.zeros_like(updates[0][layer][unselected]))
        for row, factor in zip(rows, factors):
            torch.testing.assert_close(updates[0][layer][row], factor * updates[1][layer][row], rtol=1e-5, atol=1e-8)


def test_soft_selection_refuses_lora_on_the_rows():
    model = make_tiny_model("llama", hidden=16, intermediate=24, vocab=50)
    handle = install(model, [[1, 2], [3, 4]], impl="rows", lora_rank=1)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    with pytest.raises(LokiError, match="not to LoRA"):
        attach_row_scales(handle, optimizer, soft_scales([[1, 2], [3, 4]]))


@pytest.mark.parametrize(
    "overrides, match",
    [
        (("loki.quota=layers",), "loki.quota"),
        (("loki.quota=mass", "loki.strategy=random"), "loki.quota"),
        (("loki.quota_floor=2",), "loki.quota_floor"),
        (("loki.soft=true", "lora.rank=4"), "loki.soft"),
        (("loki.soft=true", "loki.q=0.3", "loki.soft_span=4"), "loki.soft_span"),
        (("loki.soft=yes",), "loki.soft"),
    ],
)
def test_variant_settings_are_checked(overrides, match):
    with pytest.raises(LokiError, match=match):
        check_train_config(compose_config("train", "model=tiny", "task=tiny_rerank", *overrides))


def test_method_labels_name_the_variants():
    cfg = compose_config("train", "model=tiny", "task=tiny_rerank", "loki.quota=mass", "loki.soft=true", "loki.q=0.2")
    assert cfg.method_name == "loki-q0.2-mass-soft"
    assert compose_config("train", "model=tiny", "task=tiny_rerank").method_name == "loki-q0.1"


TINY = ("model=tiny", "task=tiny_rerank", "trainer.max_steps=2", "trainer.max_epochs=5", "evaluate.validation_task_metric=false",
        "evaluate.retention=false", "export.format=none", "logger=none")


@pytest.mark.slow
def test_train_py_with_the_mass_quota_and_soft_selection(tmp_path):
    from loki import attribution
    from loki.select import adaptive_quota, layer_mass, select_positions
    from loki.store import ScoreStore

    cache = f"paths.cache_dir={tmp_path / 'cache'}"
    run_train(tmp_path / "uniform", *TINY, cache, "loki.q=0.25")  # analyses first: the store the variants read
    metrics = run_train(tmp_path / "mass", *TINY, cache, "loki.q=0.25", "loki.quota=mass", "loki.quota_floor=0.5")
    positions = json.loads((tmp_path / "mass" / "positions.json").read_text())
    store = ScoreStore(attribution.default_store(compose_config("train", *TINY, cache)))
    quota = adaptive_quota(layer_mass(store.iter_chunks()), 0.25, 64)  # independent: the select maths on the same store
    assert [len(layer) for layer in positions] == quota and sum(quota) == 4 * 16 and min(quota) >= 8
    assert positions == select_positions(store.iter_chunks(), 0.25, score="abs", quota=quota)
    assert metrics["method"] == "loki-q0.25-mass"
    metrics = run_train(tmp_path / "soft", *TINY, cache, "loki.q=0.125", "loki.soft=true")
    positions = json.loads((tmp_path / "soft" / "positions.json").read_text())
    assert [len(layer) for layer in positions] == [16] * 4  # the selection at q = 0.125 x 2
    assert positions == select_positions(store.iter_chunks(), 0.25, score="abs")
    assert metrics["method"] == "loki-q0.125-soft"
