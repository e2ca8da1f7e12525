"""Where the layers and down-projections are, for each tested family; a clear refusal otherwise."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, GPT2Config

from loki import arch
from loki.errors import LokiError
from tests.conftest import make_tiny_model


@pytest.mark.parametrize("model_type", arch.SUPPORTED_MODEL_TYPES)
def test_dims_and_down_projs_of_each_tested_family(model_type):
    extra = {"head_dim": 8} if model_type == "qwen3" else {}
    model = make_tiny_model(model_type, layers=3, hidden=32, intermediate=48, **extra)
    d = arch.dims(model)
    assert (d.num_layers, d.hidden_size, d.intermediate_size) == (3, 32, 48)
    projs = arch.down_projs(model)
    assert [p.weight.shape for p in projs] == [torch.Size([32, 48])] * 3
    assert projs[1] is model.model.layers[1].mlp.down_proj


def test_model_without_down_proj_is_refused_naming_the_families():
    model = AutoModelForCausalLM.from_config(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=50))
    with pytest.raises(LokiError, match=r"model type 'gpt2' has no decoder layers.*qwen2, qwen3, llama, mistral"):
        arch.dims(model)
