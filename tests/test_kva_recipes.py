"""KVA recipes: attribute(recipe=...) against each recipe's definition, written here naively and
independently of loki.kva (forward hooks on down_proj, a whole model run per layer and step, plain
autograd, one unpadded prompt at a time), and recipe="captum" against Captum itself when installed."""

from __future__ import annotations

import pytest
import torch

from loki.errors import LokiError
from loki.kva import RECIPES, attribute, resolve_recipe
from tests.conftest import make_tiny_model

LAYERS, HIDDEN, INTER = 3, 32, 64


# --------------------------------------------------------------------------------------------------
# The naive definitions.


def _down_proj_outputs(model, ids):
    """Every layer's down_proj output [S, D] on the prompt ids [1, S], and the logits at its last token."""
    outputs = []
    hooks = [
        layer.mlp.down_proj.register_forward_hook(lambda m, i, o: outputs.append(o[0].detach().clone()))
        for layer in model.model.layers
    ]
    try:
        with torch.no_grad():
            logits = model(ids).logits[0, -1]
    finally:
        for hook in hooks:
            hook.remove()
    return outputs, logits


def _gradient_with_replaced_output(model, ids, layer, replacement, y, objective):
    """Run the whole model with `layer`'s down_proj output replaced by `replacement` [S, D]; return
    d f / d replacement [S, D], f read at the last token."""
    leaf = replacement.clone().requires_grad_(True)
    hook = layer.mlp.down_proj.register_forward_hook(lambda m, i, o: leaf[None])
    try:
        with torch.enable_grad():
            logits = model(ids).logits[0, -1]
            f = logits.softmax(-1)[y] if objective == "prob" else logits[y]
            (grad,) = torch.autograd.grad(f, leaf)
    finally:
        hook.remove()
    return grad


def naive(model, input_ids, attention_mask, recipe, *, steps=7, scope=None, objective="prob", targets=None):
    """[B, L, D] scores by the definitions in docs/method.md "KVA", one prompt at a time."""
    m = steps
    if recipe == "paper":
        alphas, weights = [k / m for k in range(1, m + 1)], [1 / m] * m
    elif recipe == "published":
        alphas, weights = [k / m for k in range(0, m)], [1 / m] * m
    else:  # captum's riemann_trapezoid: i/(m-1), weights 1/m halved at both ends
        alphas = [i / (m - 1) for i in range(m)]
        weights = [1 / (2 * m)] + [1 / m] * (m - 2) + [1 / (2 * m)]
    scope = scope or {"paper": "target", "published": "target", "captum": "sequence"}[recipe]

    layers = model.model.layers
    out = torch.zeros(input_ids.shape[0], len(layers), model.config.hidden_size)
    for b in range(input_ids.shape[0]):
        ids = input_ids[b][attention_mask[b].bool()][None]  # the prompt alone, unpadded
        t = ids.shape[1] - 1
        z, logits = _down_proj_outputs(model, ids)
        y = int(logits.argmax()) if targets is None else int(targets[b])
        if recipe == "captum":
            base, _ = _down_proj_outputs(model, torch.zeros_like(ids))  # Captum's input baseline: token 0
        else:
            base = [torch.zeros_like(zl) for zl in z]
        for l, layer in enumerate(layers):
            total = torch.zeros(model.config.hidden_size)
            for alpha, weight in zip(alphas, weights):
                interpolated = base[l] + alpha * (z[l] - base[l])
                if scope == "target":  # only position t moves
                    replacement = z[l].clone()
                    replacement[t] = interpolated[t]
                else:
                    replacement = interpolated
                grad = _gradient_with_replaced_output(model, ids, layer, replacement, y, objective)
                total += weight * grad[t]
            if recipe == "published":
                total *= z[l][t]
            elif recipe == "captum":
                total *= z[l][t] - base[l][t]
            out[b, l] = total
    return out


# --------------------------------------------------------------------------------------------------
# Fixtures.


def _model(model_type, **extra):
    return make_tiny_model(model_type, layers=LAYERS, hidden=HIDDEN, intermediate=INTER, seed=3, **extra)


@pytest.fixture(scope="module")
def models():
    return {"qwen2": _model("qwen2"), "llama": _model("llama")}


@pytest.fixture(scope="module")
def mixed_batch():
    """Left- and right-padded rows of different lengths in one batch."""
    g = torch.Generator().manual_seed(7)
    ids = torch.randint(3, 250, (4, 9), generator=g)
    mask = torch.tensor([
        [0, 0, 1, 1, 1, 1, 1, 1, 1],  # left-padded
        [1, 1, 1, 1, 1, 0, 0, 0, 0],  # right-padded
        [1, 1, 1, 1, 1, 1, 1, 1, 1],  # unpadded
        [1, 1, 1, 1, 1, 1, 1, 0, 0],  # right-padded
    ])
    return ids.masked_fill(mask == 0, 0), mask


def _assert_close(actual, expected):
    """Float tolerance relative to the largest score."""
    scale = float(expected.abs().max())
    assert scale > 0
    torch.testing.assert_close(actual, expected, rtol=1e-4, atol=1e-5 * scale)


# (recipe, scope) pairs: every recipe with its default scope, and paper's other scope.
CASES = [("paper", None), ("paper", "sequence"), ("published", None), ("captum", None)]


# --------------------------------------------------------------------------------------------------
# Each recipe equals its definition.


@pytest.mark.parametrize("model_type", ["qwen2", "llama"])
@pytest.mark.parametrize("recipe,scope", CASES)
def test_recipe_equals_its_definition(models, mixed_batch, model_type, recipe, scope):
    model = models[model_type]
    ids, mask = mixed_batch
    fast = attribute(model, ids, mask, recipe=recipe, scope=scope)
    assert fast.dtype == torch.float32 and fast.shape == (4, LAYERS, HIDDEN)
    _assert_close(fast, naive(model, ids, mask, recipe, scope=scope))


@pytest.mark.parametrize("recipe", RECIPES)
def test_gold_targets_logit_objective_and_step_chunks(models, mixed_batch, recipe):
    # steps_per_pass splits the steps (and captum's unequal end weights) over several passes.
    model = models["llama"]
    ids, mask = mixed_batch
    gold = torch.tensor([5, 17, 200, 3])
    settings = dict(steps=4, objective="logit", targets=gold)
    fast = attribute(model, ids, mask, recipe=recipe, steps_per_pass=3, **settings)
    _assert_close(fast, naive(model, ids, mask, recipe, **settings))


@pytest.mark.parametrize("recipe", ["published", "captum"])
@pytest.mark.parametrize(
    "model_type,extra,generic",
    [
        ("qwen2", {}, True),  # the generic path: layer l rerun with a down_proj hook
        ("mistral", {"sliding_window": 4}, False),  # window shorter than the prompts
    ],
)
def test_other_layouts(monkeypatch, mixed_batch, recipe, model_type, extra, generic):
    import loki.arch

    if generic:  # no family row: the generic path, which assumes nothing about the layer's residual
        monkeypatch.setattr(loki.arch, "FAMILIES", {})
    model = make_tiny_model(model_type, layers=2, hidden=HIDDEN, intermediate=INTER, seed=4, **extra)
    ids, mask = mixed_batch
    _assert_close(attribute(model, ids, mask, recipe=recipe, steps=3), naive(model, ids, mask, recipe, steps=3))


# --------------------------------------------------------------------------------------------------
# Padding: every row of a mixed left/right-padded batch gets its batch-of-1 result.


@pytest.mark.parametrize("model_type", ["qwen2", "llama"])
@pytest.mark.parametrize("recipe,scope", CASES)
def test_mixed_padding_gives_each_row_its_single_prompt_result(models, mixed_batch, model_type, recipe, scope):
    model = models[model_type]
    ids, mask = mixed_batch
    batch = attribute(model, ids, mask, recipe=recipe, scope=scope, steps=3)
    for b in range(ids.shape[0]):
        alone = attribute(model, ids[b : b + 1, mask[b].bool()], recipe=recipe, scope=scope, steps=3)
        torch.testing.assert_close(batch[b : b + 1], alone, rtol=1e-4, atol=1e-6 * float(alone.abs().max()))


# --------------------------------------------------------------------------------------------------
# recipe="captum" against Captum's LayerIntegratedGradients, one call per layer (the authors' way).


@pytest.mark.parametrize("model_type", ["qwen2", "llama"])
def test_captum_recipe_equals_captum_itself(models, mixed_batch, model_type):
    captum_attr = pytest.importorskip("captum.attr")
    model = models[model_type]
    ids, mask = mixed_batch
    ours = attribute(model, ids, mask, recipe="captum")
    for b in range(ids.shape[0]):
        row = ids[b][mask[b].bool()][None]
        with torch.no_grad():
            y = int(model(row).logits[0, -1].argmax())

        def forward_func(batch_ids):
            return model(batch_ids).logits[:, -1].softmax(-1)[:, y]

        expected = []
        for layer in model.model.layers:
            lig = captum_attr.LayerIntegratedGradients(forward_func, layer.mlp.down_proj)
            attributions = lig.attribute(
                row, baselines=torch.zeros_like(row), n_steps=7, method="riemann_trapezoid"
            )
            expected.append(attributions[0, -1].detach())
        _assert_close(ours[b], torch.stack(expected))


# --------------------------------------------------------------------------------------------------
# Regression, defaults, and refusals.


@pytest.mark.parametrize("settings", [{}, {"scope": "sequence"}, {"times_activation": True, "steps": 3}])
def test_paper_is_the_default(models, mixed_batch, settings):
    ids, mask = mixed_batch
    model = models["qwen2"]
    assert torch.equal(attribute(model, ids, mask, recipe="paper", **settings), attribute(model, ids, mask, **settings))


def test_recipes_differ(models, mixed_batch):
    # Guards against one recipe silently computing another (published vs paper-with-activation differ
    # only in the integration points).
    ids, mask = mixed_batch
    model = models["llama"]
    paper = attribute(model, ids, mask, recipe="paper", times_activation=True)
    published = attribute(model, ids, mask, recipe="published")
    captum = attribute(model, ids, mask, recipe="captum")
    for a, b in [(paper, published), (paper, captum), (published, captum)]:
        assert (a - b).abs().max() > 1e-3 * a.abs().max()


def test_recipe_defaults():
    assert RECIPES == ("paper", "published", "captum")
    assert resolve_recipe("paper") == ("target", False)
    assert resolve_recipe("paper", "sequence", True) == ("sequence", True)
    assert resolve_recipe("published") == ("target", True)
    assert resolve_recipe("captum") == ("sequence", True)
    assert resolve_recipe("captum", "sequence", True, steps=2) == ("sequence", True)


@pytest.mark.parametrize(
    "settings,message",
    [
        ({"recipe": "knowledge-neurons"}, "recipe must be one of paper, published, captum, got 'knowledge-neurons'"),
        ({"recipe": "published", "scope": "sequence"}, "scope='sequence' does not fit recipe='published'"),
        ({"recipe": "captum", "scope": "target"}, "scope='target' does not fit recipe='captum'"),
        ({"recipe": "published", "times_activation": False}, "times_activation=False does not fit recipe='published'"),
        ({"recipe": "captum", "times_activation": False}, "times_activation=False does not fit recipe='captum'"),
        ({"recipe": "captum", "steps": 1}, "steps=1 does not fit recipe='captum'"),
        ({"recipe": "paper", "scope": "everything"}, "scope must be one of target, sequence"),
    ],
)
def test_contradictory_options_are_refused(models, mixed_batch, settings, message):
    ids, mask = mixed_batch
    with pytest.raises(LokiError, match=message.replace("(", r"\(")) as error:
        attribute(models["qwen2"], ids, mask, **settings)
    assert str(error.value).count(". ") == 0 and str(error.value).endswith(".")  # one sentence
