"""Issue 20's variants as train.py options: soft selection (per-row learning rates by rank), the
adaptive per-layer quota (loki.quota=mass) and the L2 pull of the rows towards the base (loki.l2sp), checked
against hand-computed updates and an independent selection from the same store. The KL anchor's tests are in test_losses.py, the quota's maths in
test_select_quota.py."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from loki.config import check_train_config
from loki.errors import LokiError
from loki.implant import RowPull, attach_optimizer, attach_row_scales, install, kva_row_weights, merge, soft_scales
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


# ---- the L2 pull (L2-SP) -------------------------------------------------------------------------


def test_row_mass_and_kva_row_weights_by_hand():
    from loki.select import layer_mass, row_mass

    scores = torch.tensor([[[1.0, -2.0, 0.0], [4.0, 0.5, -1.0]], [[-3.0, 2.0, 1.0], [0.0, -0.5, 3.0]]])  # [N=2, L=2, D=3]
    mass = row_mass(iter(scores.split(1)))  # streamed, one sample per chunk
    assert mass.tolist() == [[2.0, 2.0, 0.5], [2.0, 0.5, 2.0]]
    assert layer_mass(scores).tolist() == [1.5, 1.5]
    # rows (0,2), (0,0) and (1,1): masses 0.5, 2 and 0.5, mean 1
    assert kva_row_weights(mass, [[2, 0], [1]]) == [[0.5, 2.0], [0.5]]
    assert kva_row_weights(mass, [[], [0, 2]]) == [[], [1.0, 1.0]]
    with pytest.raises(LokiError, match="positive"):
        kva_row_weights(torch.zeros(2, 3), [[1], [2]])


POSITIONS = [[5, 1, 9], [], [0, 12]]


def _tiny_pull(impl, lora_rank=0):
    model = make_tiny_model("llama", layers=3, hidden=16, intermediate=24, vocab=50)
    base = [layer.mlp.down_proj.weight.detach().clone() for layer in model.model.layers]
    handle = install(model, POSITIONS, impl=impl, lora_rank=lora_rank)
    weights = [[1.0, 0.5, 2.0], [], [0.25, 1.5]]
    return model, base, handle, RowPull(handle, 0.3, weights), weights


@pytest.mark.parametrize("impl, lora_rank", [("hook", 0), ("rows", 0), ("rows", 2)])
def test_row_pull_value_and_gradient_against_the_merged_weights(impl, lora_rank):
    model, base, handle, pull, weights = _tiny_pull(impl, lora_rank)
    assert pull().item() == 0.0  # at the base weights
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():  # move every trainable tensor (for hook: only its selected rows can be trained)
        for p in handle.trainable_parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=generator))
    value = pull()
    value.backward()
    grads = {id(p): p.grad.clone() for p in handle.trainable_parameters()}
    params = handle.trainable_parameters()
    merge(model, handle)
    merged = [layer.mlp.down_proj.weight.detach() for layer in model.model.layers]
    # oracle: the merged weights' selected rows against the base, weighted by hand (for hook the noise moved
    # every row of the masked weights, but only the selected rows are pulled)
    delta = {(l, r): merged[l][r] - base[l][r] for l, rows in enumerate(POSITIONS) for r in rows}
    if impl == "rows":
        for l, rows in enumerate(POSITIONS):  # rows and LoRA leave every other row bit-identical
            others = [r for r in range(16) if r not in rows]
            assert torch.equal(merged[l][others], base[l][others])
    expected = 0.5 * 0.3 * sum(w * delta[(l, r)].double().pow(2).sum() for l, rows in enumerate(POSITIONS) for r, w in zip(rows, weights[l]))
    torch.testing.assert_close(value.double(), expected, rtol=1e-5, atol=1e-9)
    if lora_rank == 0:  # d pull / d W[r] = 0.3 * w_r * (W[r] - W0[r]); zero on every other row
        for i, (l, rows) in enumerate((l, rows) for l, rows in enumerate(POSITIONS) if rows):
            grad = grads[id(params[i])]
            index = sorted(rows)
            by_row = dict(zip(rows, weights[l]))
            for j, r in enumerate(index):
                want = 0.3 * by_row[r] * delta[(l, r)]
                torch.testing.assert_close(grad[r] if impl == "hook" else grad[j], want, rtol=1e-5, atol=1e-8)
            if impl == "hook":
                others = [r for r in range(16) if r not in rows]
                assert torch.equal(grad[others], torch.zeros_like(grad[others]))


@pytest.mark.parametrize("impl", ["hook", "rows"])
def test_an_sgd_step_on_the_pull_alone_shrinks_each_row_towards_the_base(impl):
    """W[r] - W0[r] becomes (1 - lr * weight * w_r) (W[r] - W0[r]); everything else stays bit-identical."""
    model, base, handle, pull, weights = _tiny_pull(impl)
    with torch.no_grad():
        for p in handle.trainable_parameters():
            p.add_(0.1)
    optimizer = torch.optim.SGD(handle.trainable_parameters(), lr=0.5)
    attach_optimizer(handle, optimizer)
    pull().backward()
    optimizer.step()
    merge(model, handle)
    for l, (rows, ws) in enumerate(zip(POSITIONS, weights)):
        weight = model.model.layers[l].mlp.down_proj.weight.detach()
        for r, w in zip(rows, ws):
            torch.testing.assert_close(weight[r] - base[l][r], torch.full((24,), (1 - 0.5 * 0.3 * w) * 0.1), rtol=1e-4, atol=1e-6)
        if impl == "rows":
            others = [r for r in range(16) if r not in rows]
            assert torch.equal(weight[others], base[l][others])


def test_row_pull_is_checked():
    model = make_tiny_model("llama", hidden=16, intermediate=24, vocab=50)
    handle = install(model, [[1, 2], [3]], impl="rows")
    with pytest.raises(LokiError, match="one weight per selected row"):
        RowPull(handle, 1.0, [[1.0], [1.0]])
    with pytest.raises(LokiError, match="0 or more"):
        RowPull(handle, -1.0)


# ---- the suppression-damage quota ----------------------------------------------------------------


def _oracle_damage(model, prompts, positions):
    """Independent: a copy of the model per layer with the rows zeroed, one prompt at a time, torch's kl_div."""
    import copy

    def last(m, p):
        return torch.log_softmax(m(input_ids=torch.tensor([p])).logits[0, -1].double(), dim=-1)

    out = []
    with torch.no_grad():
        base = [last(model, p) for p in prompts]
        for layer, rows in enumerate(positions):
            other = copy.deepcopy(model)
            other.model.layers[layer].mlp.down_proj.weight[rows] = 0.0
            kls = [torch.nn.functional.kl_div(last(other, p), b, log_target=True, reduction="sum") for p, b in zip(prompts, base)]
            out.append(float(torch.stack(kls).mean()) if rows else 0.0)
    return out


def test_a_shuffled_quota_keeps_the_counts_and_moves_them_between_layers():
    from loki.select import shuffled_quota

    quota = [80, 73, 57, 49, 45, 42, 36, 74]
    orders = {tuple(shuffled_quota(quota, seed)) for seed in range(20)}
    assert all(sorted(order) == sorted(quota) and sum(order) == sum(quota) for order in orders)
    assert len(orders) > 15  # seeds give different layer orders
    assert shuffled_quota(quota, 7) == shuffled_quota(quota, 7)  # a pure function of the seed
    # the permutation is torch's for that seed: layer i takes the count of layer order[i]
    order = torch.randperm(len(quota), generator=torch.Generator().manual_seed(7)).tolist()
    assert shuffled_quota(quota, 7) == [quota[i] for i in order]


def test_two_processes_needing_the_same_suppression_damage_measure_it_once(tmp_path, monkeypatch):
    """Two shards of a frontier reaching the damage quota at once: the second waits on the cache entry's lock
    and reads what the first wrote (flock locks separate open files, so two threads stand in for them)."""
    import threading
    import time

    from omegaconf import OmegaConf

    from loki import damage as damage_module
    from loki import recipe

    calls = []

    def slow_damage(model, prompts, positions, pad_id):
        calls.append(len(prompts))
        time.sleep(0.5)  # long enough that the other thread arrives while this one measures
        return torch.tensor([0.25, 0.5], dtype=torch.float64)

    monkeypatch.setattr(damage_module, "layer_damage", slow_damage)
    monkeypatch.setattr(recipe, "attribution_prompt_ids", lambda cfg, tokenizer, count: ([[1, 2]] * count, 0))
    monkeypatch.setattr(recipe, "eval_device", lambda cfg: "cpu")
    cfg = OmegaConf.create({"loki": {"damage_prompts": 3}})
    results = []
    threads = [threading.Thread(target=lambda: results.append(recipe.suppression_damage(cfg, torch.nn.Linear(2, 2), None, [[0], [1]], tmp_path)))
               for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert calls == [3] and len(results) == 2
    for result in results:
        torch.testing.assert_close(result, torch.tensor([0.25, 0.5], dtype=torch.float64), rtol=0, atol=0)


def test_layer_damage_against_zeroed_copies_and_the_weights_come_back():
    from loki.damage import layer_damage

    model = make_tiny_model("llama", layers=3, hidden=16, intermediate=24, vocab=50).double().eval()
    with torch.no_grad():  # larger FFN outputs, so that zeroing a few rows moves the answer well above rounding
        for layer in model.model.layers:
            layer.mlp.down_proj.weight.mul_(20.0)
    prompts = [[3, 7, 9, 1], [4, 4], [10, 11, 12, 13, 14, 15, 2]]  # different lengths: right padding must not matter
    positions = [[1, 5, 9], [0, 2], []]
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    damage = layer_damage(model, prompts, positions, pad_id=0, batch_size=2)
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())  # restored bit for bit
    assert damage.dtype == torch.float64 and damage[2] == 0.0 and (damage[:2] > 0).all()
    torch.testing.assert_close(damage, torch.tensor(_oracle_damage(model, prompts, positions), dtype=torch.float64), rtol=1e-9, atol=1e-12)
    assert damage[0] > 1e-6 and damage[1] > 1e-6  # far above float64 rounding
    with torch.no_grad():  # rows that are already zero: zeroing them changes nothing
        model.model.layers[1].mlp.down_proj.weight[[0, 2]] = 0.0
    assert layer_damage(model, prompts, positions, pad_id=0)[1] == 0.0


@pytest.mark.parametrize(
    "overrides, match",
    [
        (("loki.quota=layers",), "loki.quota"),
        (("loki.quota=mass", "loki.strategy=random"), "loki.quota"),
        (("loki.quota_floor=2",), "loki.quota_floor"),
        (("loki.soft=true", "lora.rank=4"), "loki.soft"),
        (("loki.soft=true", "loki.q=0.3", "loki.soft_span=4"), "loki.soft_span"),
        (("loki.soft=yes",), "loki.soft"),
        (("loki.quota=damage", "loki.strategy=smallest_norm"), "loki.quota"),
        (("loki.quota=damage", "loki.damage_prompts=0"), "loki.damage_prompts"),
        (("loki.l2sp=-0.1",), "loki.l2sp"),
        (("loki.l2sp_rows=norm",), "loki.l2sp_rows"),
        (("loki.l2sp=1", "loki.impl=rows", "trainer.strategy=fsdp"), "loki.l2sp"),
        (("loki.l2sp=1", "loki.strategy=smallest_norm"), "loki.l2sp_rows"),
    ],
)
def test_variant_settings_are_checked(overrides, match):
    with pytest.raises(LokiError, match=match):
        check_train_config(compose_config("train", "model=tiny", "task=tiny_rerank", *overrides))


def test_method_labels_name_the_variants():
    cfg = compose_config("train", "model=tiny", "task=tiny_rerank", "loki.quota=mass", "loki.soft=true", "loki.q=0.2")
    assert cfg.method_name == "loki-q0.2-mass-soft"
    assert compose_config("train", "model=tiny", "task=tiny_rerank").method_name == "loki-q0.1"
    assert compose_config("train", "model=tiny", "task=tiny_rerank", "loki.l2sp=0.5").method_name == "loki-q0.1-l2sp"
    assert compose_config("train", "model=tiny", "task=tiny_rerank", "loki.quota=damage").method_name == "loki-q0.1-damage"
    cfg = compose_config("train", "model=tiny", "task=tiny_rerank", "loki.l2sp=0.5", "loki.l2sp_rows=uniform", "loki.strategy=random")
    assert cfg.method_name == "loki-q0.1-random-l2sp_uniform"


TINY = ("model=tiny", "task=tiny_rerank", "trainer.max_steps=2", "trainer.max_epochs=5", "evaluate.validation_task_metric=false",
        "evaluate.retention=false", "export.format=none", "logger=none")


@pytest.mark.slow
def test_train_py_with_the_mass_quota_and_soft_selection(tmp_path):
    from loki import attribution
    from loki.select import adaptive_quota, layer_mass, select_positions, shuffled_quota
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
    # its control: the same counts in the order loki.seed shuffles them, and the rows each layer then keeps
    metrics = run_train(tmp_path / "shuffled", *TINY, cache, "loki.q=0.25", "loki.quota=mass_shuffled", "loki.quota_floor=0.5", "loki.seed=3")
    shuffled = shuffled_quota(quota, 3)
    positions = json.loads((tmp_path / "shuffled" / "positions.json").read_text())
    assert [len(layer) for layer in positions] == shuffled and sorted(shuffled) == sorted(quota)
    assert positions == select_positions(store.iter_chunks(), 0.25, score="abs", quota=shuffled)
    assert metrics["method"] == "loki-q0.25-mass_shuffled"
    # the damage quota: the uniform selection's per-layer suppression KL, cached beside the store, spread the same way
    metrics = run_train(tmp_path / "damage", *TINY, cache, "loki.q=0.25", "loki.quota=damage", "loki.damage_prompts=4")
    (cached,) = (store.dir / "damage").glob("*.json")
    damage = torch.tensor(json.loads(cached.read_text())["damage"], dtype=torch.float64)
    assert json.loads(cached.read_text())["prompts"] == 4 and (damage > 0).all()
    quota = adaptive_quota(damage, 0.25, 64)
    positions = json.loads((tmp_path / "damage" / "positions.json").read_text())
    assert [len(layer) for layer in positions] == quota and sum(quota) == 4 * 16
    assert positions == select_positions(store.iter_chunks(), 0.25, score="abs", quota=quota)
    assert metrics["method"] == "loki-q0.25-damage"
    metrics = run_train(tmp_path / "soft", *TINY, cache, "loki.q=0.125", "loki.soft=true")
    positions = json.loads((tmp_path / "soft" / "positions.json").read_text())
    assert [len(layer) for layer in positions] == [16] * 4  # the selection at q = 0.125 x 2
    assert positions == select_positions(store.iter_chunks(), 0.25, score="abs")
    assert metrics["method"] == "loki-q0.125-soft"
    # the |KVA|-weighted L2 pull: the same rows; a huge pull holds them nearer the base than no pull does
    from loki.implant.adapter import read_adapter
    from loki.models import load_model_and_tokenizer

    adapter = [o for o in TINY if not o.startswith("export.")] + [cache, "loki.q=0.25", "export.format=adapter", "trainer.max_steps=3"]
    moved = {}
    for name, weight in (("free", "0"), ("pulled", "1e6")):
        metrics = run_train(tmp_path / name, *adapter, f"loki.l2sp={weight}")
        positions, rows, _ = read_adapter(tmp_path / name / "adapter")
        assert positions == [sorted(layer) for layer in select_positions(store.iter_chunks(), 0.25, score="abs")]  # stored sorted
        moved[name] = rows
    assert metrics["method"] == "loki-q0.25-l2sp"
    base, _ = load_model_and_tokenizer(compose_config("train", *TINY).model)
    for layer, index in enumerate(positions):
        start = base.model.layers[layer].mlp.down_proj.weight.detach()[index]
        free, pulled = ((moved[name][layer].float() - start).norm() for name in ("free", "pulled"))
        assert 0 < pulled < 0.5 * free, (layer, float(pulled), float(free))
