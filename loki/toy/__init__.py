"""The toy world and toy model: an offline, minutes-sized stand-in for a real LLM and its benchmarks.

- `load_toy_model(cfg)` -> (model, tokenizer): the shipped reference weights (loki/toy/reference, sha256
  checked), or with `model.build=true` a local build, cached on first use (loki.toy.build).
- `toy_path(name, cfg)` and the OmegaConf resolver `${toy:NAME}` (registered on import of this package)
  give the world's files: benchmark, rerank_train, beir, facts, pretrain, world, model, dir.

Submodules are imported lazily so that `python -m loki.toy.build` runs cleanly and importing this
package (to register the resolver) stays cheap.
"""

from typing import Any

from omegaconf import OmegaConf


def _resolve_toy_path(name: str, *, _root_: Any) -> str:
    from loki.toy.paths import resolve_toy_path

    return resolve_toy_path(name, _root_=_root_)


OmegaConf.register_new_resolver("toy", _resolve_toy_path, replace=True)


def __getattr__(name: str) -> Any:
    if name in ("load_toy_model", "ToySettings"):
        from loki.toy import build

        return getattr(build, name)
    if name == "toy_path":
        from loki.toy.paths import toy_path

        return toy_path
    raise AttributeError(f"module 'loki.toy' has no attribute {name!r}")


__all__ = ["ToySettings", "load_toy_model", "toy_path"]
