"""The peft baselines (LoRA, DoRA, PiSSA, CorDA-kpm, OSF): each trains only its own parameters and merges into a
plain Hugging Face checkpoint whose logits are the adapted model's."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from loki.errors import LokiError
from loki.peft_methods import VARIANTS, apply_peft, build_peft_config, method_name, rebuild_config
from tests.conftest import compose_config, make_tiny_model

ADAPTER_MARKERS = {"lora": ("lora_",), "dora": ("lora_",), "pissa": ("lora_",), "corda": ("lora_",), "osf": ("osf_svd_params",)}
# Parameters outside every target linear layer: all-linear never adapts embeddings, norms or the LM head.
UNTARGETED = ("embed_tokens", "norm", "lm_head")


def _ids(seed: int, rows: int = 2, length: int = 10) -> torch.Tensor:
    return torch.randint(0, 259, (rows, length), generator=torch.Generator().manual_seed(seed))


def _adapted(variant: str):
    base = make_tiny_model("qwen2")
    original = {k: v.clone() for k, v in base.state_dict().items()}
    config = build_peft_config(variant, rank=4, alpha=8, dropout=0.0, target_modules="all-linear", effective_rank=0.5)
    knowledge = [_ids(100 + i, rows=1, length=12 + i)[0].tolist() for i in range(6)] if variant == "corda" else None
    return apply_peft(base, config, knowledge), original, config


def _train(model, steps: int = 3) -> None:
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-2, weight_decay=0.1)  # decay: a frozen parameter in the optimizer would move
    model.train()
    for step in range(steps):
        ids = _ids(step)
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()


@pytest.mark.parametrize("variant", VARIANTS)
def test_each_variant_trains_only_its_own_parameters_and_merges_to_a_plain_checkpoint(variant, tmp_path):
    torch.manual_seed(0)
    model, original, _ = _adapted(variant)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(any(m in n for m in ADAPTER_MARKERS[variant]) for n in trainable)
    after_init = {n: p.detach().clone() for n, p in model.named_parameters()}
    _train(model)
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, after_init[n])}
    assert changed and changed <= trainable  # every frozen parameter bit-identical, and training moved something
    for name, value in model.named_parameters():
        if any(part in name for part in UNTARGETED):
            plain = name.replace("base_model.model.", "", 1)
            assert torch.equal(value, original[plain]), name  # no variant touches what it does not target

    ids = _ids(7)
    with torch.no_grad():
        adapted_logits = model(input_ids=ids).logits
    merged = model.merge_and_unload()
    assert type(merged).__name__ == "Qwen2ForCausalLM" and set(merged.state_dict()) == set(original)
    with torch.no_grad():
        merged_logits = merged(input_ids=ids).logits
    torch.testing.assert_close(merged_logits, adapted_logits, rtol=1e-5, atol=1e-5)
    merged.save_pretrained(tmp_path / "model")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "model").eval()
    with torch.no_grad():
        assert torch.equal(reloaded(input_ids=ids).logits, merged_logits)  # a plain checkpoint, nothing peft inside


@pytest.mark.parametrize("variant", ["pissa", "corda", "osf"])
def test_svd_initialised_variants_start_at_the_base_models_function(variant):
    # PiSSA and CorDA rewrite the target weights as residuals; OSF re-parametrises them: at init the adapted model
    # must still compute the base model (up to float rounding), or the "before" measurements would be wrong.
    model, original, _ = _adapted(variant)
    base = make_tiny_model("qwen2")
    ids = _ids(3)
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, base(input_ids=ids).logits, rtol=1e-4, atol=1e-4)
    if variant != "osf":
        residual = model.base_model.model.model.layers[0].mlp.down_proj.base_layer.weight
        assert not torch.equal(residual, original["model.layers.0.mlp.down_proj.weight"])


@pytest.mark.parametrize("variant", ["pissa", "corda", "osf", "dora"])
def test_a_trained_state_loads_into_a_rebuilt_adapter(variant):
    # FSDP rebuilds the trained model from its state dict on rank 0: a plain-initialised adapter of the same
    # shapes (no SVD, no knowledge set) must take the whole state, residual weights included.
    model, _, config = _adapted(variant)
    _train(model, steps=1)
    state = model.state_dict()
    from peft import get_peft_model

    rebuilt = get_peft_model(make_tiny_model("qwen2"), rebuild_config(config))
    rebuilt.load_state_dict(state, strict=True)
    ids = _ids(5)
    with torch.no_grad():
        torch.testing.assert_close(rebuilt(input_ids=ids).logits, model(input_ids=ids).logits, rtol=0, atol=0)


def test_corda_uses_its_cache_and_needs_a_knowledge_set(tmp_path):
    cache = tmp_path / "corda.pt"
    config = build_peft_config("corda", rank=4, alpha=8, dropout=0.0, target_modules="all-linear", corda_cache_file=cache)
    knowledge = [_ids(i, rows=1, length=12)[0].tolist() for i in range(6)]
    first = apply_peft(make_tiny_model("qwen2"), config, knowledge)
    assert cache.is_file()
    again = build_peft_config("corda", rank=4, alpha=8, dropout=0.0, target_modules="all-linear", corda_cache_file=cache)
    second = apply_peft(make_tiny_model("qwen2"), again, knowledge_prompts=None)  # from the cache: no prompts needed
    for (name, a), (_, b) in zip(first.named_parameters(), second.named_parameters()):
        assert torch.equal(a, b), name
    fresh = build_peft_config("corda", rank=4, alpha=8, dropout=0.0, target_modules="all-linear")
    with pytest.raises(LokiError, match="knowledge set"):
        apply_peft(make_tiny_model("qwen2"), fresh, knowledge_prompts=[])


def test_variant_configs_compose_check_and_label():
    from loki.config import check_train_config
    from loki.recipe import method_label

    for group, label in [("dora", "dora-r16"), ("pissa", "pissa-r16"), ("corda", "corda-r16"), ("osf", "osf"), ("r16", "lora-r16")]:
        cfg = compose_config("train", "model=tiny", "task=tiny_rerank", "loki=off", f"lora={group}")
        check_train_config(cfg)
        assert method_label(False, cfg.lora.rank, None, None, cfg.lora.variant) == label
    assert method_name("lora", 16) == "lora-r16" and method_label(False, 0, None, None) == "full"
    with pytest.raises(LokiError, match="lora.variant=dora runs only with loki=off"):
        check_train_config(compose_config("train", "model=tiny", "task=tiny_rerank", "lora=dora"))
    with pytest.raises(LokiError, match="lora.variant must be one of"):
        check_train_config(compose_config("train", "model=tiny", "task=tiny_rerank", "loki=off", "lora=r16", "lora.variant=vera"))
    with pytest.raises(LokiError, match="lora.rank must be an integer >= 1"):
        check_train_config(compose_config("train", "model=tiny", "task=tiny_rerank", "loki=off", "lora=pissa", "lora.rank=0"))
    with pytest.raises(LokiError, match="lora.effective_rank"):
        check_train_config(compose_config("train", "model=tiny", "task=tiny_rerank", "loki=off", "lora=osf", "lora.effective_rank=1.5"))


def test_recipe_builds_corda_over_the_attribution_prompts(tmp_path):
    # The recipe's knowledge set is the `data` group's prompts (what KVA reads), cached per settings.
    from loki import recipe
    from loki.models import load_model_and_tokenizer

    cfg = compose_config("train", "model=tiny", "task=tiny_rerank", "loki=off", "lora=corda", "lora.rank=2", f"paths.cache_dir={tmp_path}")
    model, tokenizer = load_model_and_tokenizer(cfg.model)
    adapted, config = recipe._peft_model(cfg, model, tokenizer, torch.device("cpu"))
    assert config.init_lora_weights == "corda" and config.corda_config.corda_method == "kpm"
    assert len(list((tmp_path / "corda").glob("tiny-*.pt"))) == 1
    assert {n for n, p in adapted.named_parameters() if p.requires_grad} and all(
        "lora_" in n for n, p in adapted.named_parameters() if p.requires_grad
    )


def test_corda_cache_key_ignores_run_defaults_and_follows_what_the_decomposition_reads(tmp_path):
    # The decomposition depends on the base model, the knowledge set, rank, targets and mode; the model's
    # default LRs and implementation choice do not change it, so a new default LR must not remake it.
    from loki.recipe import corda_cache_file

    base = ("train", "model=tiny", "task=tiny_rerank", "loki=off", "lora=corda", f"paths.cache_dir={tmp_path}")
    key = corda_cache_file(compose_config(*base))
    assert key.parent == tmp_path / "corda" and key.name.startswith("tiny-")
    for same in ("model.loki_lr=0.3", "model.finetune_lr=0.2", "model.loki_impl=rows", "model.gradient_checkpointing=true"):
        assert corda_cache_file(compose_config(*base, same)) == key, same
    for other in ("lora.rank=2", "data.per_subject=3", "model.dtype=bfloat16", "lora.corda_method=ipm"):
        assert corda_cache_file(compose_config(*base, other)) != key, other
