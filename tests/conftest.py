"""Shared test helpers: tiny random models built from configs, no network."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

REPO = Path(__file__).resolve().parents[1]

# One temporary cache and log dir for the whole test run, set before anything composes a config: no test
# reads or writes the user's ~/.cache/loki; the toy's world is generated here once per run (its weights are shipped).
_SESSION_DIR = Path(tempfile.mkdtemp(prefix="loki-tests-"))
os.environ["LOKI_CACHE"] = str(_SESSION_DIR / "cache")
os.environ["LOKI_LOG_DIR"] = str(_SESSION_DIR / "logs")
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


def pytest_sessionfinish(session, exitstatus):
    shutil.rmtree(_SESSION_DIR, ignore_errors=True)


def optimizer_step(optimizer, loss_and_grad, closure: bool) -> None:
    """One optimizer step as Lightning takes it (`closure`: forward and backward inside `optimizer.step`) or
    as a plain loop does (backward first, then `step()`); `loss_and_grad` runs the forward and backward."""
    if closure:
        optimizer.step(loss_and_grad)
    else:
        loss_and_grad()
        optimizer.step()


def compose_config(config_name: str = "train", *overrides: str):
    """A config composed as the entry point would (conf/<config_name>.yaml plus overrides), no Hydra run."""
    from hydra import compose, initialize_config_dir

    import loki.recipe  # noqa: F401  registers the ${method:} resolver train.yaml uses

    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        return compose(config_name, overrides=list(overrides))


def run_train(run_dir: Path, *overrides: str) -> dict:
    """`python train.py <overrides>` in-process: compose train.yaml, then the recipe, writing to run_dir."""
    from loki import recipe

    cfg = compose_config("train", *overrides, f"paths.output_dir={run_dir}")
    return recipe.run(cfg)
