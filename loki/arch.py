"""Where the decoder layers and the FFN down-projections live, for each supported model family.

The method only needs two things from a model: its list of decoder layers and, in each layer, the
FFN down-projection `nn.Linear` whose weight has shape [hidden_size, intermediate_size]. Hugging Face
Qwen2, Qwen3, Llama and Mistral decoders (and others built the same way) keep them at `<base>.layers[i].mlp.down_proj`.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from loki.errors import LokiError

@dataclass(frozen=True)
class Family:
    """What the project knows about one model family (`model_type` as in the HF config). The one table of
    family facts: `kva.py`, `models.py` and the checks read it. Adding a family: one row here, plus a tiny
    config of it in the tests (tests/test_arch.py)."""

    model_type: str
    # The decoder layer ends with `hidden = r + mlp(post_attention_layernorm(r))`, r being the input of
    # post_attention_layernorm, so the scaled output of layer l is r_l + alpha * z_l exactly (KVA's fast path).
    residual_add: bool = True


# Families that are tested; others with the same layout (`<base>.layers[i].mlp.down_proj`) also load.
FAMILIES = {f.model_type: f for f in (Family("qwen2"), Family("qwen3"), Family("llama"), Family("mistral"))}
SUPPORTED_MODEL_TYPES = tuple(FAMILIES)


def family(model: nn.Module) -> Family | None:
    """The family row of a model (a peft wrapper is seen through), None for an untested family."""
    config = getattr(_unwrap(model), "config", None)
    return FAMILIES.get(getattr(config, "model_type", None))


def residual_add(model: nn.Module) -> bool:
    """True when every decoder layer of the model adds its FFN output to the residual as in `Family`."""
    row = family(model)
    return bool(row and row.residual_add) and all(hasattr(layer, "post_attention_layernorm") for layer in decoder_layers(model))


def final_norm(model: nn.Module) -> nn.Module | None:
    """The norm after the last decoder layer (the owner of `layers` keeps it as `norm`)."""
    layers = decoder_layers(model)
    owner = next((m for m in _unwrap(model).modules() if getattr(m, "layers", None) is layers), None)
    return getattr(owner, "norm", None)


def is_decoder_layer(module: nn.Module) -> bool:
    """A Hugging Face decoder layer (the unit FSDP wraps and gradient checkpointing recomputes)."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    return isinstance(module, GradientCheckpointingLayer)


@dataclass(frozen=True)
class Dims:
    """Shapes the method cares about: L layers, D = hidden size (rows), F = intermediate size."""

    num_layers: int
    hidden_size: int
    intermediate_size: int


def _unwrap(model: nn.Module) -> nn.Module:
    # peft wraps the HF model as PeftModel.base_model.model; follow that chain to the HF model.
    while hasattr(model, "base_model") and model.base_model is not model:
        model = model.base_model
        if hasattr(model, "model") and hasattr(model, "peft_config"):
            model = model.model
    return model


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The decoder layers of a causal LM (or of its bare decoder), in order."""
    model = _unwrap(model)
    for owner in (getattr(model, "model", None), model):
        layers = getattr(owner, "layers", None)
        if isinstance(layers, nn.ModuleList) and len(layers) > 0:
            # down_proj may be a LoKI wrapper during training: accept any module that carries a weight.
            if all(hasattr(getattr(getattr(l, "mlp", None), "down_proj", None), "weight") for l in layers):
                return layers
    model_type = getattr(getattr(model, "config", None), "model_type", type(model).__name__)
    raise LokiError(
        f"model type '{model_type}' has no decoder layers with an `mlp.down_proj` Linear; "
        f"supported families are {', '.join(SUPPORTED_MODEL_TYPES)}."
    )


def down_projs(model: nn.Module) -> list[nn.Module]:
    """The FFN down-projection of every decoder layer; weight shape [hidden, intermediate]."""
    return [layer.mlp.down_proj for layer in decoder_layers(model)]


def dims(model: nn.Module) -> Dims:
    projs = down_projs(model)
    hidden, inter = projs[0].weight.shape  # nn.Linear layout: [out=hidden, in=intermediate]
    return Dims(num_layers=len(projs), hidden_size=int(hidden), intermediate_size=int(inter))
