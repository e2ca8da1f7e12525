"""Shared test helpers: tiny random models built from configs, no network."""

from __future__ import annotations

import os

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# One thread: tiny models gain nothing from more, and on a busy 2-core machine threads fight (20-50x slower).
torch.set_num_threads(1)


def make_tiny_model(
    model_type: str = "qwen2",
    layers: int = 2,
    hidden: int = 32,
    intermediate: int = 64,
    vocab: int = 259,
    heads: int = 4,
    kv_heads: int = 2,
    seed: int = 0,
    **extra,
):
    """A small random causal LM of the given HF family, in eval mode, float32."""
    config = AutoConfig.for_model(
        model_type,
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        max_position_embeddings=512,
        **extra,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    return model.eval()


@pytest.fixture
def tiny_qwen():
    return make_tiny_model("qwen2")


@pytest.fixture
def tiny_llama():
    return make_tiny_model("llama")


@pytest.fixture
def chat_tokenizer():
    from loki.tokenizer import build_chat_tokenizer

    return build_chat_tokenizer()
