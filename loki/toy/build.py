"""Build (or load) the toy model: a tiny Qwen2 pretrained from scratch on the toy world, cached by hash.

    python -m loki.toy.build [key=value ...]     # build if missing, print a summary

Cache layout, under `<cache_dir>/toy/<build-hash>/` (the hash covers every ToySettings field):

    world/       benchmark.jsonl, rerank_train.jsonl, beir/{corpus,queries}.jsonl, beir/qrels/test.tsv,
                 facts.jsonl, pretrain.txt (written first; cheap; see loki.toy.paths)
    model/       save_pretrained() of the model and its tokenizer (loads with AutoModelForCausalLM)
    manifest.json  settings, weights sha256, parameter count, build seconds, cloze accuracy and graded measure

Determinism: the world comes from `random.Random(seed)`; pretraining runs with a fixed thread count,
`torch.use_deterministic_algorithms(True)`, a seeded init and a seeded data order, so the same settings
give the same weights sha256 (on the same torch build and CPU kind).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import shutil
import sys
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, Qwen2Config, Qwen2ForCausalLM

from loki.errors import LokiError
from loki.tokenizer import build_chat_tokenizer
from loki.device import pad_batch
from loki.files import exclusive_lock, publish_dir
from loki.prompts import RERANKER_SYSTEM_PROMPT
from loki.toy.world import ToyWorld, generate_world, write_world

BUILD_FORMAT = 4  # bump when the build procedure changes so old caches are not reused


@dataclass(frozen=True)
class ToySettings:
    """Everything that determines the toy build; conf/model/toy.yaml documents each field."""

    seed: int = 0
    num_entities: int = 60
    num_rerank_train: int = 6000
    num_eval_queries: int = 20
    vocab_size: int = 768
    hidden_size: int = 128
    intermediate_size: int = 512
    num_hidden_layers: int = 4
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    max_position_embeddings: int = 256
    pretrain_steps: int = 600
    batch_size: int = 64
    lr: float = 3e-3
    warmup_steps: int = 30
    weight_decay: float = 0.01
    threads: int = 1

    @classmethod
    def from_cfg(cls, cfg: Any = None) -> "ToySettings":
        """Pick this dataclass's fields out of a config node or dict; other keys (name, source...) are ignored."""
        if cfg is None:
            return cls()
        values = {}
        for f in fields(cls):
            value = cfg.get(f.name) if hasattr(cfg, "get") else getattr(cfg, f.name, None)
            if value is not None:
                values[f.name] = type(f.default)(value)
        return cls(**values)

    def build_hash(self) -> str:
        key = json.dumps({"format": BUILD_FORMAT, **asdict(self)}, sort_keys=True)
        return hashlib.sha256(key.encode()).hexdigest()[:12]


def default_cache_dir() -> Path:
    return Path(os.environ.get("LOKI_CACHE") or Path.home() / ".cache" / "loki")


def cache_dir_of(cfg: Any = None) -> Path:
    """The project cache dir a model config names (`cache_dir`), else $LOKI_CACHE or ~/.cache/loki."""
    value = None
    if cfg is not None:
        value = cfg.get("cache_dir") if hasattr(cfg, "get") else getattr(cfg, "cache_dir", None)
    return Path(value).expanduser() if value else default_cache_dir()


def build_dir(settings: ToySettings, cache_dir: str | Path) -> Path:
    return Path(cache_dir) / "toy" / settings.build_hash()


def world_of(settings: ToySettings) -> ToyWorld:
    return generate_world(seed=settings.seed, num_entities=settings.num_entities, num_rerank_train=settings.num_rerank_train, num_eval_queries=settings.num_eval_queries)


def ensure_world(settings: ToySettings, cache_dir: str | Path) -> Path:
    """The world directory of these settings, generated and written if missing (takes well under a second)."""
    root = build_dir(settings, cache_dir)
    world_dir = root / "world"
    if (world_dir / "DONE").exists():
        return world_dir
    with exclusive_lock(root.parent / f"{root.name}.world.lock"):
        if not (world_dir / "DONE").exists():
            tmp = root / f"world.tmp-{os.getpid()}"
            shutil.rmtree(tmp, ignore_errors=True)
            write_world(world_of(settings), tmp)
            (tmp / "DONE").write_text("")
            publish_dir(tmp, world_dir)
    return world_dir


# ------------------------------------------------------------------------------------------ pretraining


@contextlib.contextmanager
def deterministic_torch(threads: int):
    """Fixed thread count and deterministic kernels for the duration; the caller's settings come back."""
    old_threads, old_flag = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        torch.set_num_threads(old_threads)
        torch.use_deterministic_algorithms(old_flag)


def train_tokenizer(world: ToyWorld, vocab_size: int):
    # The tokenizer sees both domains and the chat scaffolding, so product words are not split to bytes.
    texts = world.statements + world.product_texts + [q for q, _ in world.qa_pairs()] + [RERANKER_SYSTEM_PROMPT]
    texts += [turn["value"] for row in world.rerank_train[:200] for turn in row["conversations"]]
    return build_chat_tokenizer(texts, vocab_size=vocab_size)


def pretraining_texts(world: ToyWorld, tokenizer) -> list[str]:
    """Fact statements, the same facts as chat Q/A (so the chat template is familiar) and product prose.

    The product prose gives the model the task's vocabulary as language, not the scoring skill: the
    1-7 answers only ever appear in fine-tuning.
    """
    chat = [
        tokenizer.apply_chat_template([{"role": "user", "content": q}, {"role": "assistant", "content": a}], tokenize=False)
        for q, a in world.qa_pairs()
    ]
    return world.statements + chat + world.product_texts


def new_model(settings: ToySettings, tokenizer) -> Qwen2ForCausalLM:
    config = Qwen2Config(
        vocab_size=len(tokenizer),
        hidden_size=settings.hidden_size,
        intermediate_size=settings.intermediate_size,
        num_hidden_layers=settings.num_hidden_layers,
        num_attention_heads=settings.num_attention_heads,
        num_key_value_heads=settings.num_key_value_heads,
        max_position_embeddings=settings.max_position_embeddings,
        tie_word_embeddings=True,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=None,
    )
    torch.manual_seed(settings.seed)
    return Qwen2ForCausalLM(config)


def _batch(sequences: list[list[int]], pad_id: int) -> dict[str, torch.Tensor]:
    ids, mask = pad_batch(sequences, pad_id, side="right")
    return {"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)}


def pretrain(settings: ToySettings, world: ToyWorld, tokenizer, log_every: int = 0) -> Qwen2ForCausalLM:
    """Plain seeded torch loop: AdamW, linear warm-up then cosine decay to 10 %, whole-epoch shuffles."""
    model = new_model(settings, tokenizer)
    examples = [list(tokenizer(t, add_special_tokens=False)["input_ids"]) for t in pretraining_texts(world, tokenizer)]
    too_long = max(len(e) for e in examples)
    if too_long > settings.max_position_embeddings:
        raise LokiError(f"a toy pretraining text has {too_long} tokens; raise model.max_position_embeddings above it.")
    optimizer = torch.optim.AdamW(model.parameters(), lr=settings.lr, betas=(0.9, 0.98), weight_decay=settings.weight_decay)

    def factor(step: int) -> float:
        if step < settings.warmup_steps:
            return (step + 1) / settings.warmup_steps
        progress = (step - settings.warmup_steps) / max(1, settings.pretrain_steps - settings.warmup_steps)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
    generator = torch.Generator().manual_seed(settings.seed)
    order: list[int] = []
    model.train()
    for step in range(settings.pretrain_steps):
        if len(order) < settings.batch_size:
            order += torch.randperm(len(examples), generator=generator).tolist()
        picked, order = order[: settings.batch_size], order[settings.batch_size :]
        loss = model(**_batch([examples[i] for i in picked], tokenizer.pad_token_id)).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        if log_every and (step % log_every == 0 or step == settings.pretrain_steps - 1):
            print(f"  step {step:4d}  loss {loss.item():.3f}", file=sys.stderr, flush=True)
    return model.eval()


def weights_sha256(model: torch.nn.Module) -> str:
    """sha256 over every tensor of the state dict (name, dtype, shape, bytes), in name order."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        tensor = tensor.detach().contiguous().cpu()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(tensor.view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return digest.hexdigest()


def build_toy(settings: ToySettings, cache_dir: str | Path, log_every: int = 0) -> dict:
    """Generate the world, train the tokenizer, pretrain, evaluate and write the cache dir; returns the manifest."""
    from loki.eval.retention import score_cloze  # the same scorer retention uses on the toy

    ensure_world(settings, cache_dir)
    root = build_dir(settings, cache_dir)
    started = time.time()
    world = world_of(settings)
    with deterministic_torch(settings.threads):
        tokenizer = train_tokenizer(world, settings.vocab_size)
        model = pretrain(settings, world, tokenizer, log_every=log_every)
        pretrain_seconds = time.time() - started
        scores = score_cloze(model, tokenizer, world.benchmark, batch_size=128)
        quality = {"cloze_accuracy": scores["acc"], "graded_logprob": scores["logprob"], "chance_logprob": math.log(0.25)}
    manifest = {
        "build_hash": settings.build_hash(),
        "settings": asdict(settings),
        "weights_sha256": weights_sha256(model),
        "parameters": sum(p.numel() for p in model.parameters()),
        "vocab_size": len(tokenizer),
        "pretrain_seconds": round(pretrain_seconds, 1),
        "build_seconds": round(time.time() - started, 1),
        "benchmark_questions": len(world.benchmark),
        **{k: round(v, 4) for k, v in quality.items()},
        "torch": torch.__version__,
    }
    tmp = root / f"model.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    publish_dir(tmp, root / "model")
    (root / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


def ensure_built(cfg: Any = None, log_every: int = 0) -> tuple[Path, dict]:
    """The build dir and manifest of the toy a config names, building it first if missing."""
    settings, cache_dir = ToySettings.from_cfg(cfg), cache_dir_of(cfg)
    root = build_dir(settings, cache_dir)
    manifest_path = root / "manifest.json"
    if not manifest_path.exists():
        with exclusive_lock(root.parent / f"{root.name}.build.lock"):
            if not manifest_path.exists():
                build_toy(settings, cache_dir, log_every=log_every)
    ensure_world(settings, cache_dir)  # a cache from before the world files were split out, or files removed
    return root, json.loads(manifest_path.read_text())


def load_toy_model(cfg: Any = None):
    """(model, tokenizer) of the toy a model config describes; built and cached on first use."""
    root, _ = ensure_built(cfg)
    dtype_name = (cfg.get("dtype") if cfg is not None and hasattr(cfg, "get") else None) or "float32"
    model = AutoModelForCausalLM.from_pretrained(root / "model", dtype=getattr(torch, dtype_name))
    tokenizer = AutoTokenizer.from_pretrained(root / "model")
    return model.eval(), tokenizer


def _parse_overrides(argv: list[str]) -> dict[str, str]:
    overrides = {}
    for arg in argv:
        key, sep, value = arg.partition("=")
        if not sep or key not in {f.name for f in fields(ToySettings)} | {"cache_dir"}:
            raise SystemExit(f"usage: python -m loki.toy.build [key=value ...] with keys from ToySettings or cache_dir; got {arg!r}")
        overrides[key] = value
    return overrides


def main(argv: list[str] | None = None) -> None:
    overrides = _parse_overrides(sys.argv[1:] if argv is None else argv)
    settings = ToySettings.from_cfg(overrides)
    cache_dir = cache_dir_of(overrides)
    root = build_dir(settings, cache_dir)
    existed = (root / "manifest.json").exists()
    print(f"toy build {settings.build_hash()} -> {root} ({'cached' if existed else 'building'})", flush=True)
    _, manifest = ensure_built(overrides | {"cache_dir": str(cache_dir)}, log_every=50)
    for key in ("parameters", "vocab_size", "benchmark_questions", "build_seconds", "cloze_accuracy", "graded_logprob", "chance_logprob", "weights_sha256"):
        print(f"  {key:20s} {manifest[key]}")


if __name__ == "__main__":
    main()
