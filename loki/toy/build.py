"""The toy model: a tiny Qwen2 pretrained on the toy world, shipped as reference weights or built locally.

    python -m loki.toy.build [key=value ...]              # build if missing, print a summary
    python -m loki.toy.build --write-reference            # build the default toy, copy it into loki/toy/reference/

**Reference (the default, `model.build=false`).** The default toy's weights and tokenizer ship with the
package in `loki/toy/reference/` (model.safetensors, config, tokenizer files, manifest.json). Loading
checks the sha256 of every file against the manifest, and the weights against `model.reference_sha256`
in conf/model/toy.yaml, so every machine trains from the same model. Other settings than the reference's
(e.g. `model.seed=1`) need `model.build=true`.

**Build (`model.build=true`).** Pretrains locally, cached by hash under `<cache_dir>/toy/<build-hash>/`
(the hash covers every ToySettings field and BUILD_FORMAT):

    world/       benchmark.jsonl, rerank_train.jsonl, beir/{corpus,queries}.jsonl, beir/qrels/test.tsv,
                 facts.jsonl, pretrain.txt (written first; cheap; see loki.toy.paths)
    model/       save_pretrained() of the model and its tokenizer (loads with AutoModelForCausalLM)
    manifest.json  settings, weights sha256, CPU capability, library versions, cloze accuracy, graded measure

Determinism: the world comes from `random.Random(seed)` in pure Python, so its files are the same on every
machine and are always generated locally (the reference ships only the weights). Pretraining runs with a
fixed thread count, `torch.use_deterministic_algorithms(True)`, a seeded init and a seeded data order: the
same settings give the same weights on the same machine, torch build and CPU kernels. Across machines
they need not: floating-point kernels differ with the CPU capability (AVX-512 against AVX2) and library
versions, and the differences grow over training. That is why the reference weights ship, and why a build
of the reference settings warns when its weights differ from them.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import shutil
import sys
import platform
import time
import warnings
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

BUILD_FORMAT = 5  # bump when the build procedure changes so old caches are not reused

# The shipped default toy (loki/toy/reference): weights, config and tokenizer; manifest.json holds the sha256s.
REFERENCE_DIR = Path(__file__).resolve().parent / "reference"
REFERENCE_WEIGHTS = "model.safetensors"


@dataclass(frozen=True)
class ToySettings:
    """Everything that determines the toy build (and its hash). The same values give the same weights on one
    machine and library set; on another CPU (AVX-512 against AVX2) or other versions they may not, hence the
    shipped reference. These are the `model=toy` config's defaults (loki.schema registers them)."""

    seed: int = 0                           # seeds the world (names, facts, task data), the init and the data order
    num_entities: int = 60                  # invented lands; 6 relations each, so 360 facts and benchmark questions
    num_rerank_train: int = 6000            # reranker training conversations (query, product text, 1-7 score): one epoch = 357 steps of 16
    num_eval_queries: int = 20              # BEIR queries; the corpus holds 4 products per query plus 20 unrelated ones
    vocab_size: int = 768                   # byte-level BPE trained on the toy texts (digits stay one token each)
    hidden_size: int = 128                  # D: rows of each down_proj.weight; q=0.05 keeps floor(0.05*128)=6 rows per layer
    intermediate_size: int = 512            # F: columns of each down_proj.weight
    num_hidden_layers: int = 4              # L: decoder layers
    num_attention_heads: int = 4            # head dim 32
    num_key_value_heads: int = 2            # grouped-query attention, as in Qwen2.5
    max_position_embeddings: int = 256      # longest sequence; reranker prompts are about 70 tokens
    pretrain_steps: int = 600               # optimizer steps of pretraining (about 20 epochs of the toy corpus)
    batch_size: int = 64                    # pretraining sequences per step
    lr: float = 3e-3                        # pretraining peak learning rate (AdamW, cosine decay to 10 %)
    warmup_steps: int = 30                  # linear warm-up steps of pretraining
    weight_decay: float = 0.01              # pretraining AdamW weight decay
    threads: int = 1                        # torch threads during the build: fixed (results depend on it); 1 stays fast on a shared CPU

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
        from loki.files import settings_digest

        return settings_digest({"format": BUILD_FORMAT, **asdict(self)}, 12)


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
    texts = world.statements + world.product_texts + [q for q, _ in world.qa_pairs() + world.number_qa] + [RERANKER_SYSTEM_PROMPT]
    texts += [turn["value"] for row in world.rerank_train[:200] for turn in row["conversations"]]
    return build_chat_tokenizer(texts, vocab_size=vocab_size)


def pretraining_texts(world: ToyWorld, tokenizer) -> list[str]:
    """Fact statements, the same facts as chat Q/A (so the chat template is familiar), number Q/A and product prose.

    The product prose gives the model the task's vocabulary as language, not the scoring skill. The
    number questions (answers 1-7, loki.toy.world.number_question) make the digits answers the model
    already gives in the chat format; the reranking rule itself only ever appears in fine-tuning.
    """
    chat = [
        tokenizer.apply_chat_template([{"role": "user", "content": q}, {"role": "assistant", "content": a}], tokenize=False)
        for q, a in world.qa_pairs() + world.number_qa
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


def build_environment() -> dict:
    """What a build's floating-point results depend on besides its settings: CPU kernels and library versions."""
    import safetensors
    import tokenizers
    import transformers

    return {
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "machine": platform.machine(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "tokenizers": tokenizers.__version__,
        "safetensors": safetensors.__version__,
    }


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
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
        **build_environment(),
    }
    tmp = root / f"model.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    publish_dir(tmp, root / "model")
    (root / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


def _cfg_value(cfg: Any, key: str, default: Any = None) -> Any:
    if cfg is None:
        return default
    value = cfg.get(key) if hasattr(cfg, "get") else getattr(cfg, key, None)
    return default if value is None else value


def wants_build(cfg: Any = None) -> bool:
    """`model.build`: true = pretrain locally (cached); false (default) = the shipped reference weights."""
    value = _cfg_value(cfg, "build", False)
    if isinstance(value, str):
        return value.strip().lower() in ("1", "true", "yes")
    return bool(value)


def reference_manifest(directory: str | Path = REFERENCE_DIR) -> dict:
    path = Path(directory) / "manifest.json"
    if not path.exists():
        raise LokiError(f"the reference toy is missing ({path}); reinstall the package, or pass model.build=true to build the toy locally.")
    return json.loads(path.read_text())


def check_reference(cfg: Any = None, directory: str | Path = REFERENCE_DIR) -> dict:
    """The reference manifest, after checking that the config names the reference toy and every file's sha256."""
    manifest = reference_manifest(directory)
    settings = ToySettings.from_cfg(cfg)
    if settings.build_hash() != manifest["build_hash"]:
        reference = ToySettings(**manifest["settings"])
        changed = ", ".join(f"model.{k}={v}" for k, v in asdict(settings).items() if asdict(reference)[k] != v) or f"build format {BUILD_FORMAT}"
        raise LokiError(
            f"the shipped toy is the default one, but this config asks for another ({changed}); pass model.build=true to build it locally."
        )
    expected = _cfg_value(cfg, "reference_sha256")
    if expected and expected != manifest["files"][REFERENCE_WEIGHTS]:
        raise LokiError(
            f"model.reference_sha256 is {expected} but the shipped toy's manifest gives {manifest['files'][REFERENCE_WEIGHTS]}; "
            "conf/model/toy.yaml and loki/toy/reference/ must come from the same release."
        )
    for name, digest in manifest["files"].items():
        actual = file_sha256(Path(directory) / name) if (Path(directory) / name).exists() else "missing"
        if actual != digest:
            raise LokiError(f"the shipped toy's {name} has sha256 {actual}, not {digest}; reinstall the package (or pass model.build=true).")
    return manifest


def ensure_built(cfg: Any = None, log_every: int = 0) -> tuple[Path, dict]:
    """The build dir and manifest of the toy a config names, building it first if missing.

    A build of the reference settings whose weights differ from the shipped ones warns (once per build):
    expected across CPUs and library versions, see the module docstring."""
    settings, cache_dir = ToySettings.from_cfg(cfg), cache_dir_of(cfg)
    root = build_dir(settings, cache_dir)
    manifest_path = root / "manifest.json"
    if not manifest_path.exists():
        with exclusive_lock(root.parent / f"{root.name}.build.lock"):
            if not manifest_path.exists():
                manifest = build_toy(settings, cache_dir, log_every=log_every)
                _warn_if_not_reference(manifest)
    ensure_world(settings, cache_dir)  # a cache from before the world files were split out, or files removed
    return root, json.loads(manifest_path.read_text())


def _warn_if_not_reference(manifest: dict) -> None:
    try:
        reference = reference_manifest()
    except LokiError:
        return
    if manifest["build_hash"] == reference["build_hash"] and manifest["weights_sha256"] != reference["weights_sha256"]:
        ours = {k: manifest.get(k) for k in ("cpu_capability", "torch", "transformers")}
        theirs = {k: reference.get(k) for k in ("cpu_capability", "torch", "transformers")}
        warnings.warn(
            f"this build of the reference toy settings gave other weights than the shipped reference "
            f"(built here with {ours}, the reference with {theirs}): results will differ from the documented ones. "
            "Leave model.build=false to use the reference.",
            stacklevel=3,
        )


def toy_model_dir(cfg: Any = None) -> Path:
    """The model directory a config loads: the checked reference, or the local build (built if missing)."""
    if wants_build(cfg):
        return ensure_built(cfg)[0] / "model"
    check_reference(cfg)
    ensure_world(ToySettings.from_cfg(cfg), cache_dir_of(cfg))
    return REFERENCE_DIR


def load_toy_model(cfg: Any = None):
    """(model, tokenizer) of the toy a model config describes: the shipped reference, or a local build."""
    model_dir = toy_model_dir(cfg)
    dtype_name = _cfg_value(cfg, "dtype", "float32")
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=getattr(torch, dtype_name))
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    return model.eval(), tokenizer


REFERENCE_FILES = ("config.json", "generation_config.json", REFERENCE_WEIGHTS, "tokenizer.json", "tokenizer_config.json", "chat_template.jinja")


def write_reference(cfg: Any = None, directory: str | Path = REFERENCE_DIR, log_every: int = 0) -> dict:
    """Copy a local build (built if missing) into `directory` as the shipped reference; returns its manifest."""
    root, manifest = ensure_built(cfg, log_every=log_every)
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    files = {}
    for name in REFERENCE_FILES:
        if (root / "model" / name).exists():
            shutil.copyfile(root / "model" / name, directory / name)
            files[name] = file_sha256(directory / name)
    reference = {**build_environment(), **manifest, "files": files}  # a build from before the manifest kept its environment
    (directory / "manifest.json").write_text(json.dumps(reference, indent=2) + "\n")
    return reference


def _parse_overrides(argv: list[str]) -> dict[str, str]:
    overrides = {}
    for arg in argv:
        key, sep, value = arg.partition("=")
        if not sep or key not in {f.name for f in fields(ToySettings)} | {"cache_dir"}:
            raise SystemExit(f"usage: python -m loki.toy.build [--write-reference] [key=value ...] with keys from ToySettings or cache_dir; got {arg!r}")
        overrides[key] = value
    return overrides


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    reference = "--write-reference" in argv
    overrides = _parse_overrides([a for a in argv if a != "--write-reference"])
    settings = ToySettings.from_cfg(overrides)
    cache_dir = cache_dir_of(overrides)
    root = build_dir(settings, cache_dir)
    existed = (root / "manifest.json").exists()
    print(f"toy build {settings.build_hash()} -> {root} ({'cached' if existed else 'building'})", flush=True)
    if reference:
        manifest = write_reference(overrides | {"cache_dir": str(cache_dir)}, log_every=50)
        print(f"  reference written to {REFERENCE_DIR}; set model.reference_sha256 in conf/model/toy.yaml to {manifest['files'][REFERENCE_WEIGHTS]}")
    else:
        _, manifest = ensure_built(overrides | {"cache_dir": str(cache_dir)}, log_every=50)
    for key in ("parameters", "vocab_size", "benchmark_questions", "build_seconds", "cloze_accuracy", "graded_logprob", "chance_logprob", "cpu_capability", "weights_sha256"):
        print(f"  {key:20s} {manifest.get(key)}")


if __name__ == "__main__":
    main()
