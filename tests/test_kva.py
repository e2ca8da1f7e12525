"""KVA: the fast paths in loki.kva against the plain definition, written here independently."""

from __future__ import annotations

import pytest
import torch

from loki.errors import LokiError
from loki.kva import attribute
from tests.conftest import make_tiny_model

LAYERS, HIDDEN, INTER = 3, 32, 64


def oracle(model, input_ids, attention_mask, *, targets=None, steps=7, scope="target", objective="prob",
           times_activation=False):
    """The definition, one prompt at a time: for each layer and step, a hook scales that layer's
    down_proj output (at t, or everywhere), the whole model runs, and autograd gives d f / d (scaled z)[t]."""
    layers = model.model.layers
    out = torch.zeros(input_ids.shape[0], len(layers), model.config.hidden_size)
    for b in range(input_ids.shape[0]):
        ids = input_ids[b][attention_mask[b].bool()][None]  # the prompt alone, unpadded
        t = ids.shape[1] - 1
        with torch.no_grad():
            clean_z = []
            hooks = [l.mlp.down_proj.register_forward_hook(lambda m, i, o: clean_z.append(o[0, t].clone()))
                     for l in layers]
            logits = model(ids).logits[0, t]
            for h in hooks:
                h.remove()
        y = int(logits.argmax()) if targets is None else int(targets[b])
        for l, layer in enumerate(layers):
            total = torch.zeros(model.config.hidden_size)
            for k in range(1, steps + 1):
                leaf = {}

                def scale(module, inputs, output, alpha=k / steps):
                    if scope == "sequence":
                        leaf["z"] = (output.detach() * alpha).requires_grad_(True)
                        return leaf["z"]
                    leaf["z"] = (output.detach()[0, t] * alpha).requires_grad_(True)
                    return torch.cat([output.detach()[:, :t], leaf["z"][None, None], output.detach()[:, t + 1:]], 1)

                hook = layer.mlp.down_proj.register_forward_hook(scale)
                with torch.enable_grad():
                    logits = model(ids).logits[0, t]
                    f = logits.softmax(-1)[y] if objective == "prob" else logits[y]
                    (grad,) = torch.autograd.grad(f, leaf["z"])
                hook.remove()
                total += grad[0, t] if scope == "sequence" else grad
            out[b, l] = total / steps
            if times_activation:
                out[b, l] *= clean_z[l]
    return out


def _model(model_type):
    return make_tiny_model(model_type, layers=LAYERS, hidden=HIDDEN, intermediate=INTER, seed=1)


@pytest.fixture(scope="module")
def models():
    return {"qwen2": _model("qwen2"), "llama": _model("llama")}


@pytest.fixture(scope="module")
def mixed_batch():
    """Rows of different lengths: unpadded, left-padded, right-padded, left-padded."""
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 250, (4, 8), generator=g)
    mask = torch.tensor([
        [1, 1, 1, 1, 1, 1, 1, 1],
        [0, 0, 0, 1, 1, 1, 1, 1],
        [1, 1, 1, 1, 0, 0, 0, 0],
        [0, 1, 1, 1, 1, 1, 1, 1],
    ])
    ids = ids.masked_fill(mask == 0, 0)
    return ids, mask


def _assert_close(actual, expected):
    scale = expected.abs().max()
    assert scale > 0
    torch.testing.assert_close(actual, expected, rtol=1e-4, atol=1e-5 * float(scale))


@pytest.mark.parametrize("model_type", ["qwen2", "llama"])
@pytest.mark.parametrize("scope", ["target", "sequence"])
@pytest.mark.parametrize("objective,times_activation", [("prob", False), ("logit", True)])
def test_fast_paths_equal_the_definition(models, mixed_batch, model_type, scope, objective, times_activation):
    model = models[model_type]
    ids, mask = mixed_batch
    settings = dict(steps=3, scope=scope, objective=objective, times_activation=times_activation)
    fast = attribute(model, ids, mask, **settings)
    assert fast.dtype == torch.float32 and fast.shape == (4, LAYERS, HIDDEN)
    _assert_close(fast, oracle(model, ids, mask, **settings))


@pytest.mark.parametrize("scope", ["target", "sequence"])
def test_default_seven_steps_and_other_objective_combinations(models, mixed_batch, scope):
    model = models["qwen2"]
    ids, mask = mixed_batch
    for objective, times_activation in [("prob", True), ("logit", False)]:
        settings = dict(scope=scope, objective=objective, times_activation=times_activation)
        _assert_close(attribute(model, ids[1:3], mask[1:3], **settings), oracle(model, ids[1:3], mask[1:3], **settings))


def test_scopes_differ(models, mixed_batch):
    # Guards against one scope silently computing the other.
    ids, mask = mixed_batch
    target = attribute(models["llama"], ids[:1], mask[:1], steps=3, scope="target")
    sequence = attribute(models["llama"], ids[:1], mask[:1], steps=3, scope="sequence")
    assert (target - sequence).abs().max() > 1e-3 * target.abs().max()


@pytest.mark.parametrize("scope", ["target", "sequence"])
def test_one_step_is_the_plain_gradient(models, mixed_batch, scope):
    # With m = 1 the only step is alpha = 1: the gradient of the unmodified model w.r.t. z_l[t].
    model = models["llama"]
    ids, mask = mixed_batch
    row = ids[2][mask[2].bool()][None]
    t = row.shape[1] - 1
    z = []

    def keep(module, inputs, output):
        output.retain_grad()
        z.append(output)

    hooks = [layer.mlp.down_proj.register_forward_hook(keep) for layer in model.model.layers]
    logits = model(row).logits[0, t]
    for h in hooks:
        h.remove()
    f = logits.softmax(-1)[logits.argmax()]
    grads = torch.autograd.grad(f, z)
    expected = torch.stack([g[0, t] for g in grads])[None]
    actual = attribute(model, ids[2:3], mask[2:3], steps=1, scope=scope)
    _assert_close(actual, expected)
    assert all(p.grad is None for p in model.parameters())


@pytest.mark.parametrize("scope", ["target", "sequence"])
def test_batch_gives_the_rows_of_single_prompts(models, mixed_batch, scope):
    model = models["qwen2"]
    ids, mask = mixed_batch
    batch = attribute(model, ids[:3], mask[:3], steps=2, scope=scope)
    for b in range(3):
        alone = attribute(model, ids[b : b + 1, mask[b].bool()], steps=2, scope=scope)
        torch.testing.assert_close(batch[b : b + 1], alone, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("scope", ["target", "sequence"])
def test_gold_targets_and_step_chunks(models, mixed_batch, scope):
    model = models["llama"]
    ids, mask = mixed_batch
    gold = torch.tensor([5, 17, 200])
    fast = attribute(model, ids[1:4], mask[1:4], targets=gold, steps=3, scope=scope, steps_per_pass=2)
    _assert_close(fast, oracle(model, ids[1:4], mask[1:4], targets=gold, steps=3, scope=scope))
    own = attribute(model, ids[1:4], mask[1:4], steps=3, scope=scope)
    assert (fast - own).abs().max() > 1e-6  # the gold targets were really used


def test_model_state_is_restored(models, mixed_batch):
    model = _model("qwen2").train()
    model.model.layers[0].mlp.down_proj.weight.requires_grad_(False)
    flags = [p.requires_grad for p in model.parameters()]
    ids, mask = mixed_batch
    attribute(model, ids[:2], mask[:2], steps=2)
    assert model.training and [p.requires_grad for p in model.parameters()] == flags
    assert all(p.grad is None for p in model.parameters())


def test_bad_input_is_one_sentence(models, mixed_batch):
    model = models["qwen2"]
    ids, mask = mixed_batch
    with pytest.raises(LokiError, match="scope"):
        attribute(model, ids, mask, scope="everything")
    with pytest.raises(LokiError, match="objective"):
        attribute(model, ids, mask, objective="loss")
    with pytest.raises(LokiError, match="no real token"):
        attribute(model, ids[:2], torch.tensor([[1] * 8, [0] * 8]))
    with pytest.raises(LokiError, match="targets"):
        attribute(model, ids, mask, targets=torch.tensor([1, 2]))
    with pytest.raises(LokiError, match="steps"):
        attribute(model, ids, mask, steps=0)


@pytest.mark.parametrize(
    "model_type,extra,generic",
    [
        ("qwen2", {}, True),  # the generic path: layer l rerun with a down_proj hook
        ("qwen3", {"head_dim": 8}, False),
        ("mistral", {"sliding_window": 4}, False),  # window shorter than the prompts
    ],
)
@pytest.mark.parametrize("scope", ["target", "sequence"])
def test_other_families_and_the_generic_path(monkeypatch, mixed_batch, model_type, extra, generic, scope):
    import loki.arch

    if generic:  # no family row: the generic path, which assumes nothing about the layer's residual
        monkeypatch.setattr(loki.arch, "FAMILIES", {})
    model = make_tiny_model(model_type, layers=2, hidden=HIDDEN, intermediate=INTER, seed=2, **extra)
    ids, mask = mixed_batch
    settings = dict(steps=2, scope=scope)
    _assert_close(attribute(model, ids, mask, **settings), oracle(model, ids, mask, **settings))
