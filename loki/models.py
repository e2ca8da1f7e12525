"""Build the model and tokenizer a config names: a hub/local checkpoint, a random tiny one, or the toy.

`model.source` selects how:
- `pretrained`: `AutoModelForCausalLM.from_pretrained(model.pretrained)` (hub id or local directory);
- `random`: a freshly initialised model from `model.config` (a dict of HF config fields) and a local
  byte-level tokenizer, so tests and smoke runs need no network;
- `toy`: the toy world's pretrained model (loki.toy), built and cached on first use.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from loki.errors import LokiError
from loki.tokenizer import build_chat_tokenizer

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, None: None}


def _cfg_get(cfg: Any, key: str, default: Any = None) -> Any:
    return cfg.get(key, default) if hasattr(cfg, "get") else getattr(cfg, key, default)


def load_model_and_tokenizer(cfg: Any) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    source = _cfg_get(cfg, "source", "pretrained")
    dtype = _DTYPES[_cfg_get(cfg, "dtype", "float32")]
    if source == "random":
        config_fields = dict(_cfg_get(cfg, "config"))
        model_type = config_fields.pop("model_type", "qwen2")
        tokenizer = build_chat_tokenizer()
        config_fields.setdefault("vocab_size", len(tokenizer))
        config = AutoConfig.for_model(model_type, **config_fields)
        config.pad_token_id = tokenizer.pad_token_id
        config.eos_token_id = tokenizer.eos_token_id
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(_cfg_get(cfg, "seed", 0)))
            model = AutoModelForCausalLM.from_config(config, dtype=dtype or torch.float32)
        return model, tokenizer
    if source == "toy":
        from loki.toy.build import load_toy_model  # imported lazily: only the toy needs it

        return load_toy_model(cfg)
    if source != "pretrained":
        raise LokiError(f"model.source must be 'pretrained', 'random' or 'toy', got {source!r}.")
    name = _cfg_get(cfg, "pretrained")
    try:
        tokenizer = AutoTokenizer.from_pretrained(name)
        model = AutoModelForCausalLM.from_pretrained(name, dtype=dtype)
    except OSError as err:
        raise LokiError(
            f"could not load model '{name}' (no hub access and no local copy: {str(err).splitlines()[0][:160]}); "
            "pass model.pretrained=/path/to/a/local/checkpoint, or use model=tiny or model=toy offline."
        ) from None
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token  # Llama ships no pad token; padding is masked anyway
    return model, tokenizer
