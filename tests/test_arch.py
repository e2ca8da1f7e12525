"""The one table of model-family facts (loki.arch.FAMILIES), against the real HF classes."""

from __future__ import annotations

import pytest
import torch

from loki import arch
from tests.conftest import make_tiny_model


@pytest.mark.parametrize("model_type", arch.SUPPORTED_MODEL_TYPES)
def test_every_family_row_matches_its_model(model_type):
    extra = {"head_dim": 8} if model_type == "qwen3" else {}
    model = make_tiny_model(model_type, layers=2, **extra)
    assert arch.family(model).model_type == model_type
    assert arch.final_norm(model) is model.model.norm
    assert all(arch.is_decoder_layer(layer) for layer in arch.decoder_layers(model))
    assert not arch.is_decoder_layer(model.model.norm)
    # residual_add is the fact KVA's fast path relies on: layer output = r + mlp(post_attention_layernorm(r))
    assert arch.residual_add(model)
    layer = model.model.layers[0]
    captured = {}
    layer.post_attention_layernorm.register_forward_hook(lambda m, i, o: captured.update(r=i[0]))
    layer.mlp.register_forward_hook(lambda m, i, o: captured.update(z=o))
    out = {}
    layer.register_forward_hook(lambda m, i, o: out.update(h=o[0] if isinstance(o, tuple) else o))
    with torch.no_grad():
        model(torch.tensor([[1, 2, 3, 4]]))
    torch.testing.assert_close(out["h"], captured["r"] + captured["z"])


def test_an_unknown_family_takes_the_generic_path(monkeypatch):
    model = make_tiny_model("qwen2", layers=2)
    monkeypatch.setattr(arch, "FAMILIES", {})
    assert arch.family(model) is None and not arch.residual_add(model)
