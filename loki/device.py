"""Where a model lives, how a batch of token lists becomes padded tensors, and which process is rank 0.

Plain torch and the standard library: every evaluator, the attribution stage and the data modules share
these, so padding and device handling are written once.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import torch


def model_device(model) -> torch.device:
    """The device of a model's first parameter (the CPU for a model without parameters)."""
    try:
        return next(model.parameters()).device
    except (StopIteration, AttributeError):
        return torch.device("cpu")


def pad_token_id(tokenizer) -> int:
    """The tokenizer's pad id, or its end-of-sequence id when it has none (attention masks hide it anyway)."""
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


def pad_batch(
    sequences: Sequence[Sequence[int]], pad_id: int, side: str = "right", fill: Sequence[Sequence[int]] | None = None, fill_pad: int = -100
) -> tuple[torch.Tensor, ...]:
    """Token lists -> (input_ids, attention_mask[, filled]) as long tensors [B, max length].

    `side="right"` keeps positions 0..n-1 (exact for causal scoring and training); `side="left"` puts every
    last token in the last column (generation, attribution). `fill`: a second list per row, the same
    lengths (labels), padded with `fill_pad`.
    """
    if side not in ("left", "right"):
        raise ValueError(f"side must be 'left' or 'right', got {side!r}")
    width = max(len(s) for s in sequences)
    input_ids = torch.full((len(sequences), width), int(pad_id), dtype=torch.long)
    attention_mask = torch.zeros((len(sequences), width), dtype=torch.long)
    filled = torch.full((len(sequences), width), int(fill_pad), dtype=torch.long) if fill is not None else None
    for row, seq in enumerate(sequences):
        n = len(seq)
        cols = slice(width - n, width) if side == "left" else slice(0, n)
        input_ids[row, cols] = torch.as_tensor(list(seq), dtype=torch.long)
        attention_mask[row, cols] = 1
        if filled is not None:
            filled[row, cols] = torch.as_tensor(list(fill[row]), dtype=torch.long)
    return (input_ids, attention_mask) if filled is None else (input_ids, attention_mask, filled)


def global_rank() -> int:
    """This process's global rank, before or after a Trainer exists.

    torchrun and SLURM set RANK / SLURM_PROCID. Lightning's own launcher sets only LOCAL_RANK and NODE_RANK
    in the processes it starts: the global rank is then NODE_RANK * (processes per node) + LOCAL_RANK,
    with the per-node count from LOCAL_WORLD_SIZE, or WORLD_SIZE over the node count where that is known.
    One process started by hand is rank 0.
    """
    if "RANK" in os.environ:
        return int(os.environ["RANK"])
    if "LOCAL_RANK" in os.environ:
        local = int(os.environ["LOCAL_RANK"])
        node = int(os.environ.get("NODE_RANK", os.environ.get("GROUP_RANK", 0)))
        if node == 0:
            return local  # node 0 holds ranks 0 .. per_node-1 whatever the per-node count is
        per_node = os.environ.get("LOCAL_WORLD_SIZE")
        if per_node is None and "WORLD_SIZE" in os.environ and "SLURM_NNODES" in os.environ:
            per_node = int(os.environ["WORLD_SIZE"]) // int(os.environ["SLURM_NNODES"])
        return node * int(per_node) + local if per_node else node * 10_000 + local  # any non-zero rank off node 0
    if "SLURM_PROCID" in os.environ:
        return int(os.environ["SLURM_PROCID"])
    return 0


def is_rank_zero() -> bool:
    """True in the one process that evaluates, exports and writes summaries."""
    return global_rank() == 0
