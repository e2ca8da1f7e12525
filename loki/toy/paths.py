"""Where the toy world's files are, for configs: `toy_path(name, cfg)` and the `${toy:NAME}` resolver.

NAME is one of: benchmark (MMLU-schema jsonl), rerank_train (ShareGPT jsonl), beir (BEIR dir),
facts, pretrain, world (the world dir), model (the model dir: the shipped reference, or with
`model.build=true` the local build's, which exists once `load_toy_model` has run), dir (the build dir,
which holds the world). The world files are written on first request (cheap, pure Python, no model
build), so a config can point at them before the model is loaded.
"""

from __future__ import annotations

from typing import Any

from loki.errors import LokiError
from loki.toy.build import REFERENCE_DIR, ToySettings, build_dir, cache_dir_of, ensure_world, wants_build
from loki.toy.world import WORLD_FILES

NAMES = tuple(WORLD_FILES) + ("world", "model", "dir")


def toy_path(name: str, cfg: Any = None) -> str:
    """Absolute path of one of the toy's files (see NAMES) for the toy a model config describes."""
    if name not in NAMES:
        raise LokiError(f"unknown toy path '{name}'; use one of {', '.join(NAMES)}.")
    settings, cache_dir = ToySettings.from_cfg(cfg), cache_dir_of(cfg)
    if name == "dir":
        return str(build_dir(settings, cache_dir))
    if name == "model":
        return str(build_dir(settings, cache_dir) / "model" if wants_build(cfg) else REFERENCE_DIR)
    world_dir = ensure_world(settings, cache_dir)
    return str(world_dir if name == "world" else world_dir / WORLD_FILES[name])


def resolve_toy_path(name: str, *, _root_: Any) -> str:
    """OmegaConf resolver: `${toy:benchmark}` reads the root config's `model` node when it is the toy
    (its seed, sizes and cache_dir), else the default toy under `paths.cache_dir`."""
    model = _root_.get("model") if hasattr(_root_, "get") else None
    if model is not None and model.get("source") == "toy":
        return toy_path(name, model)
    paths = _root_.get("paths") if hasattr(_root_, "get") else None
    cache = paths.get("cache_dir") if paths is not None else None
    return toy_path(name, {"cache_dir": cache} if cache else None)
