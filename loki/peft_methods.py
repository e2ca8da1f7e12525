"""The PEFT baselines LoKI is compared with, built from the `lora` config group (with loki=off).

Plain torch and peft: no Lightning or Hydra here, so a frontier or a test can build any of them directly.

| variant | peft config                                                   | target weights at init          |
|---------|---------------------------------------------------------------|---------------------------------|
| lora    | LoraConfig                                                    | unchanged                       |
| dora    | LoraConfig(use_dora=True)                                     | unchanged                       |
| pissa   | LoraConfig(init_lora_weights="pissa" or "pissa_niter_N")      | residual W - s B0 A0            |
| corda   | LoraConfig(init_lora_weights="corda", CordaConfig(corda_method)) after preprocess_corda over a knowledge set | residual W - s B0 A0 |
| osf     | OSFConfig(effective_rank)                                     | unchanged (adds U S V - U0 S0 V0) |

Every variant merges (`merge_and_unload`) into a plain HF model. For PiSSA and CorDA the merged weight is
residual + s B A: the change a run made is `merged - theta_0` against the original base weights, never
against the residual the adapter was trained on (`loki.interpolate` takes the original base).
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from loki.errors import LokiError

VARIANTS = ("lora", "dora", "pissa", "corda", "osf")
CORDA_METHODS = ("kpm", "ipm")  # kpm: knowledge-preserving (the baseline here); ipm: instruction-previewed


def uses_peft(loki_enabled: bool, variant: str, rank: int) -> bool:
    """Whether a run trains a peft adapter: loki off and either OSF or a LoRA-family variant of rank > 0
    (variant lora at rank 0 is full fine-tuning)."""
    return not loki_enabled and (variant == "osf" or int(rank) > 0)


def method_name(variant: str, rank: int) -> str:
    """Short label of a peft run: lora-r16, dora-r16, pissa-r16, corda-r16, osf."""
    return "osf" if variant == "osf" else f"{variant}-r{int(rank)}"


def build_peft_config(
    variant: str,
    rank: int,
    alpha: float | None,
    dropout: float,
    target_modules: str | list[str],
    pissa_niter: int | None = None,
    corda_method: str = "kpm",
    corda_cache_file: str | Path | None = None,
    effective_rank: int | float | None = None,
):
    """The peft config of one variant (a LoraConfig, or an OSFConfig for `osf`).

    alpha: LoRA's alpha (scaling alpha/r); None = 2r. pissa_niter: None = exact SVD, N = randomized SVD with
    N subspace iterations (peft's "pissa_niter_N", fast on large models). corda_cache_file: where CorDA keeps
    its per-layer decomposition, so later runs with the same model, knowledge set and rank skip the pass
    over the knowledge set. effective_rank: OSF's preserved (frozen) top singular directions per weight, an
    integer or a fraction of min(out, in) in (0, 1]; None = half.
    """
    from peft import LoraConfig, OSFConfig

    if variant not in VARIANTS:
        raise LokiError(f"lora.variant must be one of {', '.join(VARIANTS)}, got {variant!r}.")
    targets = target_modules if isinstance(target_modules, str) else list(target_modules)
    if variant == "osf":
        return OSFConfig(target_modules=targets, effective_rank=effective_rank, task_type="CAUSAL_LM")
    if int(rank) < 1:
        raise LokiError(f"lora.rank must be a positive integer for lora.variant={variant}, got {rank!r}.")
    options: dict[str, Any] = {}
    if variant == "dora":
        options["use_dora"] = True
    elif variant == "pissa":
        options["init_lora_weights"] = "pissa" if pissa_niter is None else f"pissa_niter_{int(pissa_niter)}"
    elif variant == "corda":
        from peft.tuners.lora.config import CordaConfig

        if corda_method not in CORDA_METHODS:
            raise LokiError(f"lora.corda_method must be one of {', '.join(CORDA_METHODS)}, got {corda_method!r}.")
        cache = str(corda_cache_file) if corda_cache_file is not None else None
        options["init_lora_weights"] = "corda"
        options["corda_config"] = CordaConfig(corda_method=corda_method, cache_file=cache)
    return LoraConfig(
        r=int(rank),
        lora_alpha=float(alpha) if alpha is not None else 2.0 * int(rank),
        lora_dropout=float(dropout),
        target_modules=targets,
        task_type="CAUSAL_LM",
        **options,
    )


def apply_peft(model: nn.Module, config, knowledge_prompts: Sequence[Sequence[int]] | None = None) -> nn.Module:
    """`get_peft_model(model, config)`; for CorDA first `preprocess_corda` over the knowledge prompts (token
    id lists, run one at a time), unless its cache file already holds the decomposition.

    PiSSA and CorDA overwrite the target weights of `model` with their residuals: keep a copy of the base
    state dict first if the original weights are needed later (interpolation, KL against the base)."""
    from peft import get_peft_model

    if _is_corda(config):
        from peft.tuners.lora.corda import preprocess_corda
        from peft.tuners.tuners_utils import _maybe_include_all_linear_layers

        # preprocess_corda matches target names literally; "all-linear" must be expanded first, exactly as
        # get_peft_model expands it, or no layer is decomposed.
        config = _maybe_include_all_linear_layers(config, model)
        cache = config.corda_config.cache_file
        if not (cache and Path(cache).is_file() and Path(cache).stat().st_size > 0):
            if not knowledge_prompts:
                raise LokiError("lora.variant=corda needs a knowledge set (the attribution prompts), and it is empty.")
            preprocess_corda(model, config, run_model=lambda: run_prompts(model, knowledge_prompts))
        else:
            preprocess_corda(model, config)  # reads the decomposition from the cache file
    return get_peft_model(model, config)


@torch.no_grad()
def run_prompts(model: nn.Module, prompts: Iterable[Sequence[int]]) -> None:
    """One forward pass per prompt, batch 1: CorDA's covariance hook reads one unpadded sequence per call."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    for ids in prompts:
        model(input_ids=torch.tensor([list(ids)], dtype=torch.long, device=device))
    model.train(was_training)


def rebuild_config(config):
    """The same adapter shapes with plain initialisation: for loading a trained state dict into a fresh model
    (no SVD, no knowledge set needed; the state dict brings the residual weights and the factors)."""
    config = copy.deepcopy(config)
    if getattr(config, "init_lora_weights", True) in ("corda",) or str(getattr(config, "init_lora_weights", "")).startswith("pissa"):
        config.init_lora_weights = True
        config.corda_config = None
    return config


def corda_cache_path(cache_dir: str | Path, model_name: str, key: dict) -> Path:
    """<cache_dir>/corda/<model>-<digest>.pt: one decomposition per model, knowledge set, rank, targets and mode."""
    from loki.store import safe_name

    from loki.files import settings_digest

    digest = settings_digest(key, 16)
    return Path(cache_dir) / "corda" / f"{safe_name(model_name)}-{digest}.pt"


def _is_corda(config) -> bool:
    return getattr(config, "init_lora_weights", None) == "corda"
