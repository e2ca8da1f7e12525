"""`ChatSFTDataModule`: the Lightning face of the chat loader, configured by one `ChatDataConfig`."""

from __future__ import annotations

import dataclasses
import logging
import math
import random
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import torch
from torch.utils.data import DataLoader
from torch.utils.data.distributed import DistributedSampler

from loki.data.chat import cache
from loki.data.chat.config import ChatDataConfig
from loki.data.chat.packing import ChatExamples, pack_groups
from loki.data.chat.templates import training_chat_template
from loki.data.chat.tokenise import IGNORE_INDEX, KEPT, TRUNCATED
from loki.device import pad_batch, pad_token_id
from loki.errors import LokiError

log = logging.getLogger(__name__)


def collate_right_padded(rows: Sequence[Mapping[str, Sequence[int]]], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Right padding for training: pad ids are masked in attention and ignored in the loss. Packed rows
    also carry `position_ids` (pads get 0, as LLaMA-Factory gives its pads)."""
    input_ids, attention_mask, labels = pad_batch(
        [r["input_ids"] for r in rows], pad_token_id, side="right", fill=[r["labels"] for r in rows], fill_pad=IGNORE_INDEX
    )
    batch = {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
    if rows and "position_ids" in rows[0]:
        _, _, batch["position_ids"] = pad_batch(
            [r["input_ids"] for r in rows], pad_token_id, side="right", fill=[r["position_ids"] for r in rows], fill_pad=0
        )
    return batch


class ResumableSampler(DistributedSampler):
    """The shuffled training order of one rank, a function of (seed, epoch) alone, that can start part-way.

    One process: epoch e is the order a `DataLoader(shuffle=True, generator=Generator().manual_seed(seed))`
    gives in its (e+1)-th pass (per pass the loader draws one worker seed, then the RandomSampler two
    permutations, the second for an empty remainder), so runs keep the order they had before resuming became exact. Several processes: the order
    of Lightning's `DistributedSampler(seed=seed)` for this rank. Being a `DistributedSampler`, Lightning
    keeps it instead of injecting its own. `resume_at(epoch, skip)` makes the next pass over that epoch
    leave out its first `skip` samples (those trained on before the checkpoint), once.
    """

    def __init__(self, dataset, seed: int, num_replicas: int = 1, rank: int = 0):
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed, drop_last=False)
        self._resume: tuple[int, int] | None = None  # (epoch, samples of it to leave out)

    def resume_at(self, epoch: int, skip: int) -> None:
        self.epoch = epoch  # Lightning sets it again at the epoch start; the first pass may come before
        self._resume = (epoch, skip)

    def order(self, epoch: int) -> list[int]:
        """This rank's indices for `epoch`, in order, in full."""
        if self.num_replicas > 1:
            current, self.epoch = self.epoch, epoch
            try:
                return list(super().__iter__())
            finally:
                self.epoch = current
        generator = torch.Generator().manual_seed(self.seed)
        n = len(self.dataset)
        for _ in range(epoch + 1):
            torch.empty((), dtype=torch.int64).random_(generator=generator)  # the loader's worker seed
            indices = torch.randperm(n, generator=generator).tolist()
            torch.randperm(n, generator=generator)  # RandomSampler's empty remainder, drawn as a pass ends
        return indices

    def __iter__(self):
        indices = self.order(self.epoch)
        if self._resume is not None and self._resume[0] == self.epoch:
            indices = indices[self._resume[1] :]
            self._resume = None
        return iter(indices)


class ChatSFTDataModule(pl.LightningDataModule):
    """Chat SFT batches (input_ids, attention_mask, labels) from ShareGPT-style conversations.

    Made from a `ChatDataConfig`, or from its settings as keywords (the YAML `task.data` block through
    `_target_`); keywords given with a config replace its fields. `prepare_data` tokenises into the shared
    cache (`cache.py`); `setup` loads it. Validation: a named split (`val_split`, hub only), a file
    (`val_path`) or a seeded `val_fraction` of the training rows. After `setup()`, `self.stats` holds
    per-split counts: rows, kept, skipped (and why: skipped_no_assistant, skipped_unknown_role,
    skipped_too_long), too_long (rows over the cutoff, whatever happened to them) and truncated (too-long
    rows kept after truncation); train also has packed_rows when packing.
    """

    def __init__(self, tokenizer, config: ChatDataConfig | None = None, **settings):
        super().__init__()
        if config is None:
            config = ChatDataConfig.from_settings(settings)
        elif settings:
            config = ChatDataConfig.from_settings({**dataclasses.asdict(config), **settings})
        self.tokenizer = tokenizer
        self.config = config
        self.cache_root = Path(config.cache_dir).expanduser() if config.cache_dir else cache.default_cache_root()
        self.train_examples: ChatExamples | None = None
        self.val_examples: ChatExamples | list = []
        self.stats: dict[str, dict[str, int]] = {}
        self._template: tuple[str | None] | None = None  # (template,) once decided
        self._fingerprint: str | None = None
        self._train_sampler: ResumableSampler | None = None  # the current training order (its epoch and rank)
        self._sampler_trainer = None  # the trainer that built it
        self._resume: dict | None = None  # a checkpoint's place in its epoch, until the training loader uses it

    @property
    def cutoff(self) -> int:
        return self.config.cutoff

    @property
    def chat_template(self) -> str | None:
        """The template training conversations are rendered with (None: the tokenizer's own, unchanged)."""
        if self._template is None:
            self._template = (training_chat_template(self.tokenizer),)
        return self._template[0]

    # -- the cache

    def _sources(self) -> list[tuple[str, str | None, str | None, str, str]]:
        """(name, source, path, split, override) for each separately tokenised input."""
        c = self.config
        out = [("train", c.source, c.path, c.split, "task.data.path")]
        if c.val_path or c.val_split:
            out.append(("val", None if c.val_path else c.source, c.val_path, c.val_split or c.split, "task.data.val_path"))
        return out

    def cache_path(self, source: str | None, path: str | None, split: str, with_limit: bool = True) -> Path:
        """The cache directory for one input under the current settings."""
        if self._fingerprint is None:
            self._fingerprint = cache.tokenizer_fingerprint(self.tokenizer, self.chat_template)
        max_samples = self.config.max_samples if with_limit else None
        return cache.cache_dir(self.cache_root, cache.cache_key(self.config, self._fingerprint, source, path, split, max_samples))

    def prepare_data(self) -> None:
        """Tokenise every input not yet in the cache (Lightning runs this on one process per node)."""
        for name, source, path, split, override in self._sources():
            target = self.cache_path(source, path, split, with_limit=name == "train")
            if (target / "manifest.json").is_file():
                log.info("%s data: cached tokens at %s", name, target)
                continue
            self._build(name, target, source, path, split, override)

    def _build(self, name, target, source, path, split, override) -> None:
        max_samples = self.config.max_samples if name == "train" else None
        cache.build(target, self.tokenizer, self.config, source, path, split, override, max_samples, self.chat_template)

    # -- Lightning hooks

    def setup(self, stage: str | None = None) -> None:
        if self.train_examples is not None:
            return
        loaded = {}
        for name, source, path, split, override in self._sources():
            target = self.cache_path(source, path, split, with_limit=name == "train")
            if not (target / "manifest.json").is_file():  # no prepare_data (a plain script or test): build it
                self._build(name, target, source, path, split, override)
            loaded[name] = cache.load(target)
        table, manifest = loaded["train"]
        status, lengths = cache.column(table, "status"), cache.column(table, "length")
        train_rows = np.arange(len(table))
        splits = {"train": (table, manifest, train_rows, status, lengths)}
        if "val" in loaded:
            val_table, val_manifest = loaded["val"]
            val_status, val_lengths = cache.column(val_table, "status"), cache.column(val_table, "length")
            splits["val"] = (val_table, val_manifest, np.arange(len(val_table)), val_status, val_lengths)
        elif self.config.val_fraction > 0 and len(table) > 1:
            order = list(range(len(table)))
            random.Random(self.config.seed).shuffle(order)
            n_val = max(1, int(round(self.config.val_fraction * len(table))))
            val_rows = np.array(sorted(order[:n_val]), dtype=np.int64)
            train_rows = np.array(sorted(order[n_val:]), dtype=np.int64)
            splits["train"] = (table, manifest, train_rows, status, lengths)
            splits["val"] = (table, manifest, val_rows, status, lengths)
        for name, (tab, man, rows, st, ln) in splits.items():
            examples = self._examples(name, tab, man, rows, st[rows], ln[rows])
            if name == "train":
                self.train_examples = examples
            else:
                self.val_examples = examples

    def _examples(self, name, table, manifest, rows, status, lengths) -> ChatExamples:
        stats = cache.stats_from(status, lengths, self.cutoff)
        self.stats[name] = stats
        origin = manifest["origin"]
        kept_mask = (status == KEPT) | (status == TRUNCATED)
        keep = rows[kept_mask]
        message = (
            f"{name} data '{origin}': {stats['kept']} of {stats['rows']} conversations kept; skipped "
            f"{stats['skipped_no_assistant']} without an assistant turn, {stats['skipped_unknown_role']} with a "
            f"speaker not in the role map"
            + (f" ({', '.join(manifest.get('unknown_speakers') or [])}; add it with task.data.role_map)" if stats["skipped_unknown_role"] else "")
            + f", {stats['skipped_too_long']} too long ({self.config.too_long}); {stats['too_long']} longer than "
            f"{self.cutoff} tokens, {stats['truncated']} of them truncated"
        )
        (log.warning if stats["skipped"] or stats["too_long"] else log.info)(message)
        if not len(keep):
            raise LokiError(f"{name} data '{origin}' has no conversation with an assistant turn to train on.")
        if len(keep) == len(table) and np.array_equal(keep, np.arange(len(table))):
            kept = table.select_columns(["input_ids", "labels"])
        else:
            kept = table.select(keep).select_columns(["input_ids", "labels"])
        packs = None
        if self.config.packing and name == "train":
            packs = pack_groups(np.minimum(lengths[kept_mask], self.cutoff).tolist(), self.cutoff)
            stats["packed_rows"] = len(packs)
        return ChatExamples(kept, packs)

    def _collate(self, rows):
        return collate_right_padded(rows, pad_token_id(self.tokenizer))

    def train_dataloader(self) -> DataLoader:
        # The loader's own generator only seeds workers (kept so the global RNG is not drawn from); the
        # order comes from the sampler, which a resumed run starts where the checkpoint left it.
        generator = torch.Generator().manual_seed(self.config.seed)
        replicas = getattr(self.trainer.strategy if self.trainer is not None else None, "distributed_sampler_kwargs", None) or {}
        sampler = ResumableSampler(
            self.train_examples, self.config.seed, num_replicas=replicas.get("num_replicas", 1), rank=replicas.get("rank", 0)
        )
        self._train_sampler, self._sampler_trainer = sampler, self.trainer
        if self._resume is not None:
            self._resume_sampler(sampler, self._resume)
            self._resume = None
        return DataLoader(
            self.train_examples,
            batch_size=self.config.batch_size,
            sampler=sampler,
            generator=generator,
            collate_fn=self._collate,
            num_workers=self.config.num_workers,
        )

    # -- exact mid-epoch resume: the checkpoint records how far into which epoch training got

    def state_dict(self) -> dict:
        """Lightning writes this into every checkpoint: the epoch and the training batches of it already
        stepped on (the trainer's own count), with the settings that make that count mean the same samples."""
        sampler = self._train_sampler
        if self.trainer is None or sampler is None:
            return {}
        loop = self.trainer.fit_loop
        epoch, batches = loop.epoch_progress.current.processed, loop.epoch_loop.batch_progress.current.processed
        if batches >= math.ceil(sampler.num_samples / self.config.batch_size):  # saved at an epoch's end
            epoch, batches = epoch + 1, 0
        order = {"epoch": int(epoch), "batches": int(batches), **self._order_settings(sampler)}
        return {"train_order": order}

    def load_state_dict(self, state: dict) -> None:
        """Called by Lightning on resume before the training loader is built (single device, DDP); the
        loader then leaves out the batches of the checkpoint's epoch that were already trained on."""
        order = state.get("train_order")
        if not order:
            return
        if self._train_sampler is not None and self._sampler_trainer is self.trainer:  # FSDP, DeepSpeed restore after the loader is built
            log.warning(
                "The training loader was built before the checkpoint was restored (strategy %s): epoch %d restarts "
                "from its first batch, so the resumed run is not the exact continuation of the interrupted one.",
                type(self.trainer.strategy).__name__ if self.trainer is not None else "?",
                order["epoch"],
            )
            return
        self._resume = order

    def _order_settings(self, sampler: ResumableSampler) -> dict:
        return {"batch_size": self.config.batch_size, "num_replicas": sampler.num_replicas, "samples": len(sampler.dataset), "seed": self.config.seed}

    def _resume_sampler(self, sampler: ResumableSampler, order: dict) -> None:
        now = self._order_settings(sampler)
        changed = [f"{key} {order.get(key)} -> {value}" for key, value in now.items() if order.get(key) != value]
        if changed:
            log.warning(
                "Resuming epoch %d with other data settings than the checkpoint's (%s): the epoch restarts from its "
                "first batch, so the resumed run is not the exact continuation of the interrupted one.",
                order["epoch"],
                ", ".join(changed),
            )
            sampler.resume_at(order["epoch"], 0)
            return
        sampler.resume_at(order["epoch"], order["batches"] * self.config.batch_size)
        if order["batches"]:
            log.info("Resuming epoch %d after its first %d training batches, in the interrupted run's order.", order["epoch"], order["batches"])
            # Lightning warns that a plain loader cannot resume mid-epoch; this one does (the sampler above).
            warnings.filterwarnings("ignore", message="You're resuming from a checkpoint that ended before the epoch ended")

    def val_dataloader(self) -> DataLoader | list:
        if not self.val_examples:
            return []
        return DataLoader(
            self.val_examples, batch_size=self.config.eval_batch, collate_fn=self._collate, num_workers=self.config.num_workers
        )
