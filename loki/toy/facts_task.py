"""The toy world's invented facts as a chat Q/A task: knowledge implanting, literally (task=toy_facts).

A pretrained model cannot know these facts: the lands, their capitals and their attribute values are
drawn from a seed by `loki.toy.world.generate_world`. The task teaches a subset of them as chat Q/A and
measures, with the retention evaluator's cloze mode, whether the model now picks the right value among
four for questions worded differently from training:

- `train.jsonl`: ShareGPT conversations (`human` question, `gpt` answer = the value), written with the
  `TRAIN` paraphrases of each relation's question (two per fact).
- `val.jsonl` / `test.jsonl`: MMLU-schema rows (question, subject = relation, choices = 4 values of the
  relation, answer) with the held-out `VAL` and `TEST` paraphrases: the learning-rate grid picks on
  `val`, the reported task metric reads `test`. Same facts, new wording: the metric asks for the fact,
  not for the training string.

Everything is a pure function of (seed, lands): the files are byte-identical for the same settings and
are written once under `<cache_dir>/toy_facts/v<FORMAT>-seed<seed>-lands<lands>/` by the task's datamodule.
"""

from __future__ import annotations

import json
import os
import random
from pathlib import Path
from loki.toy.world import RELATIONS, generate_world

FORMAT = 2  # bump when the files' content changes, so old caches are not reused

# relation -> question paraphrases: TRAIN (indices 0-1), VAL (2), TEST (3)
PARAPHRASES: dict[str, list[str]] = {
    "capital": [
        "What is the capital of {e}?",
        "Which city is the capital of {e}?",
        "Name the capital city of the land of {e}.",
        "From which city is {e} governed?",
    ],
    "flag_colour": [
        "What colour is the flag of {e}?",
        "Which colour is {e}'s flag?",
        "Tell me the colour of the flag that {e} flies.",
        "If you saw the national flag of {e}, what colour would it be?",
    ],
    "castle_material": [
        "What is the castle of {e} made of?",
        "Which material was the castle of {e} built from?",
        "Name the material of {e}'s castle.",
        "The old castle in {e}: what material is it?",
    ],
    "national_animal": [
        "What is the national animal of {e}?",
        "Which animal is the national animal of {e}?",
        "Name the animal that {e} chose as its symbol.",
        "Which creature represents {e} as its national animal?",
    ],
    "main_export": [
        "What is the main export of {e}?",
        "Which good does {e} export the most?",
        "Name the chief product that {e} sells abroad.",
        "What do traders mostly buy from {e}?",
    ],
    "climate": [
        "What is the climate of {e} like?",
        "How would you describe the climate of {e}?",
        "Name the kind of weather {e} usually has.",
        "What is the weather like in {e} most of the time?",
    ],
}
TRAIN, VAL, TEST = (0, 1), 2, 3
FILES = ("train", "val", "test")


def facts(seed: int = 0, lands: int = 10) -> list[dict]:
    """The first `lands` lands' facts ({entity, relation, value}), six relations each."""
    world = generate_world(seed=seed)
    names = []
    for fact in world.facts:
        if fact["entity"] not in names:
            names.append(fact["entity"])
    keep = set(names[: int(lands)])
    return [f for f in world.facts if f["entity"] in keep]


def _values(all_facts: list[dict], relation: str) -> list[str]:
    spec = RELATIONS[relation]["values"]
    if spec is not None:
        return list(spec)
    return sorted({f["value"] for f in all_facts if f["relation"] == relation})  # capitals: the invented names


def build(seed: int = 0, lands: int = 10) -> dict[str, list[dict]]:
    """{"train": conversations, "val": MMLU rows, "test": MMLU rows} (see the module docstring)."""
    rows = facts(seed, lands)
    every = generate_world(seed=seed).facts  # distractor capitals come from every land, so any `lands` >= 1 works
    rng = random.Random(f"toy-facts-{seed}")
    out: dict[str, list[dict]] = {name: [] for name in FILES}
    for fact in rows:
        templates = PARAPHRASES[fact["relation"]]
        for index in TRAIN:
            question = templates[index].format(e=fact["entity"])
            out["train"].append({"conversations": [{"from": "human", "value": question}, {"from": "gpt", "value": fact["value"]}]})
        others = sorted(v for v in _values(every, fact["relation"]) if v != fact["value"])
        for split, index in (("val", VAL), ("test", TEST)):
            choices = rng.sample(others, 3) + [fact["value"]]
            rng.shuffle(choices)
            out[split].append({
                "question": templates[index].format(e=fact["entity"]),
                "subject": fact["relation"],
                "choices": choices,
                "answer": choices.index(fact["value"]),
            })
    return out


def folder_of(cache_dir: str | Path | None, seed: int = 0, lands: int = 10) -> Path:
    """<cache_dir>/toy_facts/v<FORMAT>-seed<seed>-lands<lands>/ (conf/task/toy_facts.yaml spells the same path)."""
    cache = Path(cache_dir).expanduser() if cache_dir else Path.home() / ".cache" / "loki"
    return cache / "toy_facts" / f"v{FORMAT}-seed{int(seed)}-lands{int(lands)}"


def ensure(cache_dir: str | Path | None, seed: int = 0, lands: int = 10) -> Path:
    """Write the three files once (each atomically) and return their folder."""
    folder = folder_of(cache_dir, seed, lands)
    if all((folder / f"{name}.jsonl").exists() for name in FILES):
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    for name, rows in build(seed, lands).items():
        tmp = folder / f".{name}.jsonl.{os.getpid()}.tmp"
        tmp.write_text("".join(json.dumps(row, sort_keys=True) + "\n" for row in rows))
        tmp.replace(folder / f"{name}.jsonl")
    return folder


def FactsDataModule(tokenizer, facts_seed: int = 0, facts_lands: int = 10, **kwargs):
    """The chat SFT loader over train.jsonl, written first if missing (so the retention benchmarks that
    read val/test.jsonl find them: train.py builds the datamodule before it measures retention)."""
    from loki.data.chat import ChatSFTDataModule

    folder = ensure(kwargs.get("cache_dir"), facts_seed, facts_lands)
    kwargs["path"] = str(folder / "train.jsonl")
    return ChatSFTDataModule(tokenizer=tokenizer, **kwargs)
