"""Packing, as LLaMA-Factory does for SFT with `packing=True, neat_packing=False`.

The cutoff is `max_length - 1` (LLaMA-Factory lowers `cutoff_len` by one when packing); each example is
truncated to it (`tokenise.py`), and the examples are grouped 1000 at a time (LLaMA-Factory's
`preprocessing_batch_size`) by its greedy knapsack: sort the lengths, fill one row at a time with the
longest remaining example that still fits (of equal lengths, the later example first), until none fits.
A packed row is the plain concatenation of its examples with one all-ones attention mask, so tokens attend
across example boundaries; labels stay on assistant tokens only; `position_ids` restart at 0 for each
example (LLaMA-Factory emits them too). Not mirrored: LLaMA-Factory pads every packed row to `cutoff_len`
with attended pad tokens; here the collator pads to the longest row of the batch with masked pads (to the
right of every real token, so the loss is the same). Validation rows are never packed.
"""

from __future__ import annotations

from bisect import bisect_right
from collections import defaultdict
from collections.abc import Mapping, Sequence

from torch.utils.data import Dataset

PACK_GROUP = 1000  # examples packed together at a time (LLaMA-Factory's preprocessing_batch_size)


def knapsack_packs(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """Indices of `lengths` grouped greedily into rows of at most `capacity` tokens (LLaMA-Factory's rule):
    lengths sorted ascending; each row takes the longest remaining length that fits, again and again, until
    none fits; of equal lengths the highest index goes first. Lengths over `capacity` are left out."""
    by_length: dict[int, list[int]] = defaultdict(list)
    for index, n in enumerate(lengths):
        if n <= capacity:
            by_length[int(n)].append(index)
    remaining = sorted(n for n, indices in by_length.items() for _ in indices)
    packs: list[list[int]] = []
    while remaining:
        pack: list[int] = []
        room = capacity
        while remaining:
            at = bisect_right(remaining, room) - 1
            if at < 0:
                break
            n = remaining.pop(at)
            room -= n
            pack.append(by_length[n].pop())
        if not pack:  # only zero-room leftovers cannot happen with capacity > 0; guard against a loop
            break
        packs.append(pack)
    return packs


def pack_groups(lengths: Sequence[int], capacity: int, group: int = PACK_GROUP) -> list[list[int]]:
    """`knapsack_packs` over each run of `group` consecutive examples, as indices into all of `lengths`
    (LLaMA-Factory packs one map batch at a time, so no row mixes examples of two runs)."""
    packs: list[list[int]] = []
    for start in range(0, len(lengths), group):
        packs += [[start + i for i in pack] for pack in knapsack_packs(list(lengths[start : start + group]), capacity)]
    return packs


def concat_examples(parts: Sequence[Mapping[str, Sequence[int]]]) -> dict[str, list[int]]:
    """One packed row: the examples' ids and labels end to end, `position_ids` restarting at each."""
    row: dict[str, list[int]] = {"input_ids": [], "labels": [], "position_ids": []}
    for part in parts:
        row["input_ids"] += list(part["input_ids"])
        row["labels"] += list(part["labels"])
        row["position_ids"] += list(range(len(part["input_ids"])))
    return row


class ChatExamples(Dataset):
    """Tokenised examples backed by the memory-mapped cache: `ds[i]` is {"input_ids", "labels"} as lists
    (plus "position_ids" for a packed row, which concatenates its examples when it is read)."""

    def __init__(self, table, packs: list[list[int]] | None = None):
        self.table = table  # a datasets.Dataset with input_ids and labels, already restricted to kept rows
        self.packs = packs

    def __len__(self) -> int:
        return len(self.packs) if self.packs is not None else len(self.table)

    def __getitem__(self, index: int) -> dict[str, list[int]]:
        if index < 0:
            index += len(self)
        if not 0 <= index < len(self):
            raise IndexError(index)
        if self.packs is None:
            return self.table[int(index)]
        rows = self.table[self.packs[index]]  # one read for the whole pack, in pack order
        return concat_examples([{"input_ids": a, "labels": b} for a, b in zip(rows["input_ids"], rows["labels"])])

    def __iter__(self):
        return (self[i] for i in range(len(self)))
