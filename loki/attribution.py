"""The attribution stage as a Lightning predict loop: KVA over MMLU prompts, streamed to a resumable store.

Pieces, in the order a run uses them:
- `build_prompts` / `check_prompts`: chat-templated MMLU prompts with ids and targets; bad input stops here.
- `KVAModule`: a frozen HF model whose `predict_step` runs `loki.kva.attribute` (with gradients).
- `ScoreWriter`: each rank streams its batches to its own shard files; rank 0 marks the store complete.
- `ScoreStore`: reads the shards back, deduplicated, in a deterministic order (natural sort of ids).
- `run_attribution`: the whole stage (checks, resume, predict, heatmap); `attribute.py` and
  `analyse_for_training` (train.py's on-demand analysis) both call it.

On-disk store (`<out_dir>/`):
    meta.json            settings + model identity; a restart with different ones is refused
    shards/*.safetensors one file per (rank, session, batch): tensor `scores` [n, L, D] float32 and the
                         sample ids as JSON in the safetensors metadata (`ids`); written atomically
    complete.json        written by rank 0 once every sample of the run is present
    heatmap.png          where the lowest/highest q rows sit per layer
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import sys
import time
import uuid
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import BasePredictionWriter, TQDMProgressBar
from lightning.pytorch.callbacks.progress.tqdm_progress import Tqdm
from torch.utils.data import DataLoader

from loki import arch
from loki.data.mmlu import PROMPT_FORMAT, answer_token_id, mc_prompt_ids
from loki.errors import LokiError
from loki.kva import OBJECTIVES, SCOPES, attribute

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
TARGET_MODES = ("predicted", "gold")
META_FILE, COMPLETE_FILE, SHARD_DIR, HEATMAP_FILE = "meta.json", "complete.json", "shards", "heatmap.png"
ATTRIBUTE_YAML = Path(__file__).resolve().parent.parent / "conf" / "attribute.yaml"


def default_scores_dir(cache_dir: str | Path, model_name: str) -> Path:
    """Where the attribution stage writes, and where train.py's `loki.scores=auto` looks, for a model."""
    return Path(cache_dir).expanduser() / "attribution" / str(model_name).replace("/", "--")


def id_sort_key(sample_id: str) -> tuple:
    """Natural order: 'astronomy/2' before 'astronomy/10'; the store's deterministic sample order."""
    return tuple((0, int(part), "") if part.isdigit() else (1, 0, part) for part in re.split(r"(\d+)", sample_id))


# ------------------------------------------------------------------------------------------------ prompts


def check_kva_settings(kva: dict) -> None:
    """Cheap checks of the settings alone, before data or model loading."""
    if kva.get("scope") not in SCOPES:
        raise LokiError(f"kva.scope must be one of {', '.join(SCOPES)}, got {kva.get('scope')!r}.")
    if kva.get("objective") not in OBJECTIVES:
        raise LokiError(f"kva.objective must be one of {', '.join(OBJECTIVES)}, got {kva.get('objective')!r}.")
    if kva.get("target") not in TARGET_MODES:
        raise LokiError(f"kva.target must be one of {', '.join(TARGET_MODES)}, got {kva.get('target')!r}.")
    steps = kva.get("steps")
    if not isinstance(steps, int) or isinstance(steps, bool) or steps < 1:
        raise LokiError(f"kva.steps must be a positive integer, got {steps!r}.")


PROMPT_STYLES = ("letter", "cloze")
CLOZE_PROMPT_FORMAT = "mmlu-zero-shot-cloze-chat-v1"


def _cloze_prompt(tokenizer: Any, row: dict) -> tuple[list[int], int]:
    """The question alone in a user turn plus the generation prompt, and the first token of the right
    answer's text: where a model that answers in words (the toy) states its answer."""
    from loki.eval.retention import cloze_context

    context, separator = cloze_context(tokenizer, row, chat_template=True)
    answer = separator + str(row["choices"][int(row["answer"])])
    return list(tokenizer(context, add_special_tokens=False)["input_ids"]), tokenizer(answer, add_special_tokens=False)["input_ids"][0]


def build_prompts(
    rows: Sequence[dict], tokenizer: Any, target: str = "predicted", system_prompt: str | None = None, style: str = "letter"
) -> list[dict]:
    """One item per MMLU row: {id, input_ids, target}; target = gold token id, or -1 (the model's argmax).

    `style="letter"`: the lettered zero-shot prompt, gold = the answer letter (instruct models);
    `style="cloze"`: the bare question, gold = the first token of the answer text (the toy)."""
    if style not in PROMPT_STYLES:
        raise LokiError(f"data.prompt must be one of {', '.join(PROMPT_STYLES)}, got {style!r}.")
    if not rows:
        raise LokiError("the attribution dataset is empty; check data.path, data.subjects and the caps.")
    if target not in TARGET_MODES:
        raise LokiError(f"kva.target must be one of {', '.join(TARGET_MODES)}, got {target!r}.")
    ids = [row["id"] for row in rows]
    if len(set(ids)) != len(ids):
        duplicate = next(i for i in ids if ids.count(i) > 1)
        raise LokiError(f"sample id '{duplicate}' occurs twice in the attribution dataset; ids must be unique.")
    if style == "cloze":
        prompts = []
        for row in rows:
            input_ids, gold = _cloze_prompt(tokenizer, row)
            prompts.append({"id": row["id"], "input_ids": input_ids, "target": gold if target == "gold" else -1})
        return prompts
    return [
        {
            "id": row["id"],
            "input_ids": mc_prompt_ids(tokenizer, row, system_prompt),
            "target": answer_token_id(tokenizer, row, system_prompt) if target == "gold" else -1,
        }
        for row in rows
    ]


def context_length(model: torch.nn.Module) -> int | None:
    config = getattr(model, "config", None)
    for key in ("max_position_embeddings", "n_positions", "max_sequence_length"):
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def check_prompts(prompts: Sequence[dict], max_length: int | None) -> None:
    """Stop before any model work on an empty dataset or a prompt the model cannot read in one pass."""
    if not prompts:
        raise LokiError("the attribution dataset is empty; check data.path, data.subjects and the caps.")
    if max_length is not None:
        for prompt in prompts:
            if len(prompt["input_ids"]) > max_length:
                raise LokiError(
                    f"the prompt of sample '{prompt['id']}' has {len(prompt['input_ids'])} tokens, more than the "
                    f"model's context of {max_length}; leave its subject out of data.subjects or use a longer-context model."
                )


class PadCollate:
    """Left-pads prompts into a batch (attribute() finds the last real token with either padding side)."""

    def __init__(self, pad_token_id: int, with_targets: bool):
        self.pad_token_id = int(pad_token_id)
        self.with_targets = with_targets

    def __call__(self, items: list[dict]) -> dict:
        width = max(len(item["input_ids"]) for item in items)
        input_ids = torch.full((len(items), width), self.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((len(items), width), dtype=torch.long)
        for row, item in enumerate(items):
            n = len(item["input_ids"])
            input_ids[row, width - n :] = torch.tensor(item["input_ids"], dtype=torch.long)
            attention_mask[row, width - n :] = 1
        targets = torch.tensor([item["target"] for item in items], dtype=torch.long) if self.with_targets else None
        return {
            "ids": [item["id"] for item in items],
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "targets": targets,
        }


# ------------------------------------------------------------------------------------------------ module


class KVAModule(pl.LightningModule):
    """A frozen causal LM whose predict step returns KVA scores [B, L, D] for a batch of prompts.

    Needs `Trainer(inference_mode=False)`: attribution takes gradients with respect to activations.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        steps: int = 7,
        scope: str = "target",
        objective: str = "prob",
        times_activation: bool = False,
    ):
        super().__init__()
        self.model = model.eval()
        self.model.requires_grad_(False)  # only activations need gradients, never weights
        self.kva_settings = {
            "steps": int(steps),
            "scope": scope,
            "objective": objective,
            "times_activation": bool(times_activation),
        }

    def predict_step(self, batch: dict, batch_idx: int = 0, dataloader_idx: int = 0) -> dict:
        if torch.is_inference_mode_enabled():
            raise LokiError("KVA needs gradients: build the Trainer with inference_mode=False.")
        with torch.enable_grad():
            scores = attribute(
                self.model,
                batch["input_ids"],
                batch["attention_mask"],
                targets=batch.get("targets"),
                **self.kva_settings,
            )
        finite = torch.isfinite(scores).flatten(1).all(dim=1)
        if not bool(finite.all()):
            bad = batch["ids"][int((~finite).nonzero()[0])]
            raise LokiError(
                f"the attribution of sample '{bad}' is NaN or infinite; check the model's weights and dtype."
            )
        return {"ids": list(batch["ids"]), "scores": scores.detach().float().cpu()}


# ------------------------------------------------------------------------------------------------ identity


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def model_identity(model: torch.nn.Module, model_name: str) -> dict:
    """Name, a hash of the architecture config and a fingerprint of the weights (samples of a few tensors)."""
    config = model.config.to_dict() if hasattr(model, "config") else {}
    for volatile in ("transformers_version", "_name_or_path", "_commit_hash", "_attn_implementation_autoset"):
        config.pop(volatile, None)
    fingerprint = hashlib.sha256()
    named = dict(model.named_parameters())
    projs = arch.down_projs(model)
    picked = [("embed", model.get_input_embeddings().weight)] if hasattr(model, "get_input_embeddings") else []
    picked += [(f"down_proj.{i}", projs[i].weight) for i in sorted({0, len(projs) // 2, len(projs) - 1})]
    picked += [("last_param", next(reversed(named.values())))] if named else []
    for label, tensor in picked:
        flat = tensor.detach().reshape(-1)
        stride = max(1, flat.numel() // 4096)  # ~4k evenly spaced values per tensor: cheap even for 8B models
        sample = flat[::stride][:4096].float().cpu().contiguous()
        fingerprint.update(f"{label}:{tuple(tensor.shape)}:{tensor.dtype}".encode())
        fingerprint.update(sample.numpy().tobytes())
    return {
        "name": str(model_name),
        "config_sha256": _sha256(json.dumps(config, sort_keys=True, default=str).encode()),
        "weights_fingerprint": fingerprint.hexdigest(),
    }


def attribution_meta(model: torch.nn.Module, tokenizer: Any, model_name: str, kva: dict, data: dict) -> dict:
    """Everything the scores depend on; two runs may share a store only if these are equal."""
    d = arch.dims(model)
    template = getattr(tokenizer, "chat_template", None) or ""
    return {
        "format_version": FORMAT_VERSION,
        "shape": [d.num_layers, d.hidden_size],
        "model": model_identity(model, model_name),
        "kva": {key: kva[key] for key in ("steps", "scope", "objective", "times_activation", "target")},
        "prompt": {
            "format": CLOZE_PROMPT_FORMAT if data.get("prompt") == "cloze" else PROMPT_FORMAT,
            "system_prompt": data.get("system_prompt"),
            "chat_template_sha256": (
                _sha256(template.encode())
                if isinstance(template, str)
                else _sha256(json.dumps(template, sort_keys=True).encode())
            ),
            "tokenizer_size": len(tokenizer),
        },
        "data": {
            key: data.get(key) for key in ("source", "path", "split", "subjects", "per_subject", "max_samples", "seed")
        },
    }


def _first_difference(old: Any, new: Any, prefix: str = "") -> tuple[str, Any, Any] | None:
    if isinstance(old, dict) and isinstance(new, dict):
        for key in sorted(set(old) | set(new), key=str):
            found = _first_difference(old.get(key), new.get(key), f"{prefix}{key}.")
            if found:
                return found
        return None
    return None if old == new else (prefix.rstrip("."), old, new)


def _json_ready(value: Any) -> Any:
    return json.loads(json.dumps(value, default=str))  # tuples -> lists, paths -> str: compare as stored


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".tmp-{os.getpid()}-{path.name}")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def _launch_rank() -> int:
    """Global rank before the Trainer exists: Lightning's launcher sets these in the processes it starts."""
    for key in ("RANK", "LOCAL_RANK"):
        if key in os.environ:
            return int(os.environ[key]) + (int(os.environ.get("NODE_RANK", 0)) if key == "LOCAL_RANK" else 0)
    return 0


def prepare_store(out_dir: str | Path, meta: dict, write: bool = True) -> Path:
    """Create the store, or check that an existing one was made with the same settings and model."""
    out_dir = Path(out_dir)
    meta = _json_ready(meta)
    meta_path = out_dir / META_FILE
    if meta_path.exists():
        old = json.loads(meta_path.read_text())
        diff = _first_difference(old, meta)
        if diff:
            key, there, here = diff
            what = "another model" if key.startswith("model.") or key == "shape" else "other settings"
            raise LokiError(
                f"{out_dir} holds attribution scores made with {what} ({key} is {there!r} there but {here!r} now); "
                "pass another out_dir or delete that directory to start over."
            )
    elif write:
        (out_dir / SHARD_DIR).mkdir(parents=True, exist_ok=True)
        _write_atomic(meta_path, json.dumps(meta, indent=2, sort_keys=True).encode())
    return out_dir


# ------------------------------------------------------------------------------------------------ writer and store


def write_shard(out_dir: str | Path, name: str, ids: Sequence[str], scores: torch.Tensor) -> Path:
    """One atomic shard file: a crash leaves either the whole file or nothing (plus an ignored .tmp)."""
    from safetensors.torch import save_file

    shard_dir = Path(out_dir) / SHARD_DIR
    shard_dir.mkdir(parents=True, exist_ok=True)
    path = shard_dir / f"{name}.safetensors"
    tmp = shard_dir / f".tmp-{name}.safetensors"
    save_file({"scores": scores.detach().float().cpu().contiguous()}, str(tmp), metadata={"ids": json.dumps(list(ids))})
    os.replace(tmp, path)
    return path


class ScoreWriter(BasePredictionWriter):
    """Streams each rank's batches to its own shard files; at the end rank 0 checks and marks the store complete."""

    def __init__(self, out_dir: str | Path, expected_ids: Iterable[str] = ()):
        super().__init__(write_interval="batch")
        self.out_dir = Path(out_dir)
        self.expected_ids = set(expected_ids)
        # A fresh session per process and launch: a resumed run never overwrites an earlier run's shards.
        self.session = f"{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:12]}"

    def write_on_batch_end(self, trainer, pl_module, prediction, batch_indices, batch, batch_idx, dataloader_idx=0):
        name = f"rank{trainer.global_rank:04d}-{self.session}-{dataloader_idx}-{batch_idx:06d}"
        write_shard(self.out_dir, name, prediction["ids"], prediction["scores"])

    def on_predict_end(self, trainer, pl_module):
        trainer.strategy.barrier("kva-shards-written")  # every rank's shards are on disk before rank 0 checks
        if trainer.is_global_zero:
            mark_complete(self.out_dir, self.expected_ids)
        trainer.strategy.barrier("kva-store-complete")


def mark_complete(out_dir: str | Path, expected_ids: Iterable[str]) -> None:
    store = ScoreStore(out_dir)
    missing = set(expected_ids) - set(store.ids())
    if missing:
        first = min(missing, key=id_sort_key)
        raise LokiError(
            f"{len(missing)} samples (e.g. '{first}') are missing from {out_dir} after the run; rerun to finish them."
        )
    record = {
        "num_samples": store.num_samples,
        "ids_sha256": _sha256("\n".join(store.ids()).encode()),
        "finished": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
    _write_atomic(Path(out_dir) / COMPLETE_FILE, json.dumps(record, indent=2).encode())


class ScoreStore:
    """Read access to an attribution store: ids, [n, L, D] float32 chunks in natural id order, settings.

    A sample written twice (DDP samplers pad with repeats; a rerun may rewrite one) counts once: the copy
    in the first shard by file name wins.
    """

    def __init__(self, out_dir: str | Path):
        self.dir = Path(out_dir)
        meta_path = self.dir / META_FILE
        if not meta_path.exists():
            raise LokiError(f"{self.dir} is not an attribution store (no {META_FILE}); run attribute.py first.")
        self.meta = json.loads(meta_path.read_text())
        self._where: dict[str, tuple[Path, int]] = {}
        for shard in sorted((self.dir / SHARD_DIR).glob("*.safetensors")):
            if shard.name.startswith(".tmp-"):
                continue
            for row, sample_id in enumerate(_shard_ids(shard)):
                self._where.setdefault(sample_id, (shard, row))
        self._ids = sorted(self._where, key=id_sort_key)

    @staticmethod
    def exists(out_dir: str | Path) -> bool:
        """True once a run has finished every sample (an interrupted store is resumed, not used)."""
        return (Path(out_dir) / COMPLETE_FILE).exists() and (Path(out_dir) / META_FILE).exists()

    @property
    def complete(self) -> bool:
        return ScoreStore.exists(self.dir)

    @property
    def shape(self) -> tuple[int, int]:
        """(L, D): layers and rows per layer of every sample's score matrix."""
        return tuple(self.meta["shape"])

    @property
    def num_samples(self) -> int:
        return len(self._ids)

    def ids(self) -> list[str]:
        return list(self._ids)

    def iter_chunks(self, chunk_size: int = 256) -> Iterator[torch.Tensor]:
        """Float32 tensors [n, L, D], n <= chunk_size, covering every sample once in `ids()` order."""
        from safetensors import safe_open

        if chunk_size < 1:
            raise LokiError(f"chunk_size must be positive, got {chunk_size}.")
        for start in range(0, len(self._ids), chunk_size):
            chunk_ids = self._ids[start : start + chunk_size]
            by_shard: dict[Path, list[tuple[int, int]]] = {}
            for position, sample_id in enumerate(chunk_ids):
                shard, row = self._where[sample_id]
                by_shard.setdefault(shard, []).append((position, row))
            out = torch.empty(len(chunk_ids), *self.shape, dtype=torch.float32)
            for shard, wanted in by_shard.items():
                with safe_open(str(shard), framework="pt") as f:
                    rows = f.get_slice("scores")
                    for position, row in wanted:
                        out[position] = rows[row : row + 1][0].float()
            yield out

    def load(self) -> tuple[list[str], torch.Tensor]:
        """All ids and scores at once (small stores, tests)."""
        chunks = list(self.iter_chunks())
        return self.ids(), torch.cat(chunks) if chunks else torch.empty(0, *self.shape)


def _shard_ids(path: Path) -> list[str]:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return json.loads((f.metadata() or {}).get("ids", "[]"))


def stored_ids(out_dir: str | Path) -> set[str]:
    """Ids already in a store's shards (empty if there is no store yet)."""
    shard_dir = Path(out_dir) / SHARD_DIR
    if not shard_dir.exists():
        return set()
    return {
        i for shard in shard_dir.glob("*.safetensors") if not shard.name.startswith(".tmp-") for i in _shard_ids(shard)
    }


# ------------------------------------------------------------------------------------------------ progress


class SamplesProgressBar(TQDMProgressBar):
    """Progress in samples (all ranks together, estimated from rank 0) with samples/s and ETA."""

    def __init__(self, total_samples: int, refresh_rate: int = 1):
        super().__init__(refresh_rate=refresh_rate)
        self.total_samples = int(total_samples)
        self._done_here = 0

    @property
    def predict_description(self) -> str:
        return "KVA"

    def init_predict_tqdm(self):
        return Tqdm(
            desc=self.predict_description,
            total=self.total_samples,
            unit="samples",
            position=2 * self.process_position,
            disable=self.is_disabled,
            leave=True,
            dynamic_ncols=True,
            file=sys.stdout,
            smoothing=0,  # rate and ETA from the whole run so far, not the last few batches
            bar_format=self.BAR_FORMAT,
        )

    def on_predict_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0):
        pass  # one dataloader, one bar sized in samples: no per-dataloader reset to a batch count

    def on_predict_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0):
        self._done_here += len(batch["ids"])
        done = min(self.total_samples, self._done_here * trainer.world_size)
        bar = self.predict_progress_bar
        if (
            bar is not None
            and not bar.disable
            and (self._should_update(batch_idx + 1, None) or done == self.total_samples)
        ):
            bar.n = done
            bar.refresh()


# ------------------------------------------------------------------------------------------------ heatmap


def selected_positions(store: ScoreStore, q: float, highest: bool) -> list[list[int]]:
    """The layer-balanced lowest (or highest) q of rows per layer, streamed from the store."""
    from loki.select import select_positions

    strategy = "layer_balanced_highest" if highest else "layer_balanced"
    return [sorted(int(i) for i in layer) for layer in select_positions(store.iter_chunks(), q, strategy=strategy)]


def selection_heatmap(store: ScoreStore, q: float = 0.05, path: str | Path | None = None, max_bins: int = 256):
    """Figure (two panels, layers x rows): where the lowest and the highest q of rows sit in each layer.

    Rows are grouped into at most `max_bins` bins; a cell's colour is the fraction of its rows selected.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    layers, rows = store.shape
    bins = min(rows, max_bins)
    bin_of_row = torch.arange(rows) * bins // rows
    rows_per_bin = torch.bincount(bin_of_row, minlength=bins).float()
    fig, axes = plt.subplots(1, 2, figsize=(12, max(3.0, 0.18 * layers + 1.5)), sharey=True, constrained_layout=True)
    for ax, highest in zip(axes, (False, True)):
        grid = torch.zeros(layers, bins)
        for layer, selected in enumerate(selected_positions(store, q, highest)):
            grid[layer] = (
                torch.bincount(bin_of_row[torch.as_tensor(selected, dtype=torch.long)], minlength=bins).float()
                / rows_per_bin
            )
        image = ax.imshow(
            grid.numpy(),
            aspect="auto",
            origin="lower",
            cmap="viridis",
            vmin=0.0,
            interpolation="nearest",
            extent=(0, rows, -0.5, layers - 0.5),
        )
        ax.set_title(f"{'highest' if highest else 'lowest'} {q:.0%} of rows per layer")
        ax.set_xlabel(f"row of down_proj.weight (knowledge vector, {bins} bins)")
        fig.colorbar(image, ax=ax, label="fraction selected")
    axes[0].set_ylabel("layer")
    fig.suptitle(f"KVA positions: {store.meta['model']['name']}, {store.num_samples} samples")
    if path is not None:
        fig.savefig(path, dpi=120)
    return fig


def log_figure(logger: Any, fig: Any, path: Path, key: str = "attribution/heatmap") -> bool:
    """Log the heatmap to W&B (image) or TensorBoard (figure); other loggers have no image support."""
    from lightning.pytorch.loggers import TensorBoardLogger, WandbLogger

    if isinstance(logger, WandbLogger):
        logger.log_image(key=key, images=[str(path)])
        return True
    if isinstance(logger, TensorBoardLogger):
        logger.experiment.add_figure(key, fig)
        return True
    return False


# ------------------------------------------------------------------------------------------------ the stage


def run_attribution(
    model: torch.nn.Module,
    tokenizer: Any,
    rows: Sequence[dict],
    *,
    out_dir: str | Path,
    model_name: str,
    kva: dict,
    data: dict,
    batch_size: int = 8,
    trainer_kwargs: dict | None = None,
    logger: Any = None,
    callbacks: Sequence[pl.Callback] = (),
    heatmap_q: float | None = 0.05,
    progress: bool = True,
) -> ScoreStore | None:
    """Score `rows` into the store at `out_dir`, skipping samples already there; returns the store on rank 0.

    `kva`: steps, scope, objective, times_activation, target; `data`: how the rows were chosen (recorded).
    """
    check_kva_settings(kva)
    if int(batch_size) < 1:
        raise LokiError(f"batch_size must be positive, got {batch_size}.")
    arch.dims(model)  # an unsupported architecture stops here
    prompts = build_prompts(rows, tokenizer, kva["target"], data.get("system_prompt"), data.get("prompt") or "letter")
    check_prompts(prompts, context_length(model))
    rank = _launch_rank()
    out_dir = prepare_store(out_dir, attribution_meta(model, tokenizer, model_name, kva, data), write=rank == 0)
    expected = [p["id"] for p in prompts]
    done = stored_ids(out_dir)
    # Longest first: the slowest batches show up early in the ETA; similar lengths share a batch (less padding).
    remaining = sorted(
        (p for p in prompts if p["id"] not in done), key=lambda p: (-len(p["input_ids"]), id_sort_key(p["id"]))
    )
    if done:
        log.info(
            "Resuming %s: %d of %d samples already scored.", out_dir, len(expected) - len(remaining), len(expected)
        )

    if remaining:
        pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        loader = DataLoader(
            remaining, batch_size=int(batch_size), shuffle=False, collate_fn=PadCollate(pad_id, kva["target"] == "gold")
        )
        kwargs = dict(trainer_kwargs or {})
        kwargs.update(
            inference_mode=False,  # gradients in predict_step
            logger=logger if logger is not None else False,
            enable_checkpointing=False,
            enable_model_summary=False,
            enable_progress_bar=progress,
            default_root_dir=str(out_dir),  # never the working directory
            callbacks=[
                ScoreWriter(out_dir, expected),
                *([SamplesProgressBar(len(remaining))] if progress else []),
                *callbacks,
            ],
        )
        trainer = pl.Trainer(**kwargs)
        # KVAModule freezes the model; hand it back as it came (train.py fine-tunes it next).
        flags, was_training = [(p, p.requires_grad) for p in model.parameters()], model.training
        try:
            module = KVAModule(model, kva["steps"], kva["scope"], kva["objective"], kva["times_activation"])
            trainer.predict(module, dataloaders=loader, return_predictions=False)
        finally:
            for parameter, flag in flags:
                parameter.requires_grad_(flag)
            model.train(was_training)
        if not trainer.is_global_zero:
            return None
    elif rank != 0:
        return None
    elif not ScoreStore.exists(out_dir):
        mark_complete(out_dir, expected)  # a run killed after its last shard but before marking completion

    store = ScoreStore(out_dir)
    if heatmap_q:
        try:
            fig = selection_heatmap(store, float(heatmap_q), out_dir / HEATMAP_FILE)
        except LokiError as err:  # e.g. q*D < 1 on a tiny model: the scores are fine, only the picture is skipped
            log.warning("No heatmap: %s", err)
        else:
            if logger is not None:
                log_figure(logger, fig, out_dir / HEATMAP_FILE)
            import matplotlib.pyplot as plt

            plt.close(fig)
    return store


def analyse_for_training(model: torch.nn.Module, tokenizer: Any, cfg: Any) -> ScoreStore | None:
    """train.py's on-demand analysis: attribute.yaml's data/kva settings (with the model config's
    `attribution.data` defaults), overridable by `cfg.attribution`.

    Runs in one process (train.py calls it before its own Trainer launches any other process).
    """
    from omegaconf import OmegaConf

    from loki.data.chat import resolve_path
    from loki.data.mmlu import load_mmlu

    defaults = OmegaConf.load(ATTRIBUTE_YAML)
    settings = OmegaConf.merge(
        # `model` is there for attribute.yaml's interpolations (a model config may set attribution.data.*).
        OmegaConf.create(
            {
                # resolved in the run's own config first: the model's fields may point elsewhere in it
                "model": OmegaConf.to_container(cfg.model, resolve=True) if OmegaConf.is_config(cfg.model) else cfg.model,
                **{key: defaults[key] for key in ("data", "kva", "batch_size", "heatmap")},
            }
        ),
        cfg.get("attribution") or {},
    )
    settings = OmegaConf.to_container(settings, resolve=True)
    data = settings["data"]
    if data["path"]:
        data["path"] = str(resolve_path(data["path"]).resolve())
    check_kva_settings(settings["kva"])
    try:
        rows = load_mmlu(
            **{k: data[k] for k in ("source", "path", "split", "subjects", "per_subject", "max_samples", "seed")}
        )
    except LokiError as err:  # in train.py the same setting lives under `attribution`
        raise LokiError(str(err).replace("pass data.path=", "pass attribution.data.path=")) from None
    accelerator = cfg.get("trainer", {}).get("accelerator", "auto") if hasattr(cfg, "get") else "auto"
    return run_attribution(
        model,
        tokenizer,
        rows,
        out_dir=default_scores_dir(cfg.paths.cache_dir, cfg.model.name),
        model_name=cfg.model.name,
        kva=settings["kva"],
        data=data,
        batch_size=settings["batch_size"],
        trainer_kwargs={"accelerator": accelerator, "devices": 1},
        heatmap_q=settings["heatmap"]["q"],
    )
