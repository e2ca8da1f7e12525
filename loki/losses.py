"""Training losses beyond the model's own, in plain torch (no Lightning or Hydra).

* `labelled_lm_loss`: the causal-LM loss with the LM head applied only where a label is read. The model's
  own loss projects every position onto the vocabulary and then ignores the unlabelled ones; on a chat
  prompt with a short answer that head (49,152 x 576 on SmolLM2) and its float32 softmax are a large share
  of a step's work, all of it discarded. Same loss, same gradient, up to float rounding.
* `AnchorTargets` / `anchor_kl`: a knowledge-preserving term, the KL from the base model's next-token
  distribution on a fixed set of prompts (the attribution prompts, which retention never reads). The base
  distribution is computed once, before training, and kept as its top-k tokens plus the rest of its mass,
  so the KL is that of the two distributions coarsened to k + 1 outcomes: exact when the base puts all its
  mass on the k tokens, otherwise a lower bound of the full KL (coarsening never increases a KL).
  `top_k=None` keeps the whole vocabulary (exact, and memory-hungry: positions x vocabulary floats).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from loki.errors import LokiError

IGNORE_INDEX = -100  # the label value HF losses skip


@contextlib.contextmanager
def _head_inputs_at(head: nn.Module, keep: torch.Tensor) -> Iterator[None]:
    """While active, `head` sees only the hidden states at the True entries of `keep` [B, T] (as [n, H])."""

    def gather(module, args):
        hidden = args[0]
        return (hidden[keep],) + tuple(args[1:])

    handle = head.register_forward_pre_hook(gather)
    try:
        yield
    finally:
        handle.remove()


def labelled_lm_loss(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """The mean next-token cross-entropy over labelled positions, as HF's causal-LM loss computes it
    (position t predicts labels[t + 1]; -100 is ignored), with the output head run on those positions only.

    model: an HF causal LM (or a peft model around one) whose `get_output_embeddings()` is the module that
    maps hidden states to logits."""
    labels = batch["labels"]
    head = model.get_output_embeddings()
    if head is None:
        raise LokiError(f"{type(model).__name__} has no output embeddings, so the loss cannot be restricted to labelled positions; use loss.logits=all.")
    targets = labels[:, 1:]
    keep = torch.zeros_like(labels, dtype=torch.bool)
    keep[:, :-1] = targets != IGNORE_INDEX
    if not keep.any():
        raise LokiError("a training batch has no labelled token (every label is -100), so it has no loss.")
    with _head_inputs_at(head, keep):
        out = model(input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask"), position_ids=batch.get("position_ids"))
    logits = out.logits  # [n, V]: the head ran on the kept positions only
    return nn.functional.cross_entropy(logits.float(), targets[keep[:, :-1]])


# ------------------------------------------------------------------------------------- the KL anchor


@dataclass
class AnchorTargets:
    """The base model's next-token distributions on anchor prompts, for `anchor_kl`.

    input_ids / attention_mask: [P, T] right-padded prompts. log_probs [n, K]: for each real position (the
    True entries of attention_mask, in row-major order), the base's log-probabilities of its K most likely
    tokens, whose ids are `token_ids` [n, K]; with top_k=None, K is the vocabulary and token_ids is None."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    log_probs: torch.Tensor
    token_ids: torch.Tensor | None

    def __len__(self) -> int:
        return len(self.input_ids)

    def batch(self, rows: torch.Tensor) -> AnchorTargets:
        """The targets of the prompts `rows` (indices into the P prompts)."""
        per_prompt = self.attention_mask.sum(dim=1)
        starts = torch.cat([per_prompt.new_zeros(1), per_prompt.cumsum(0)[:-1]])
        take = torch.cat([torch.arange(int(starts[r]), int(starts[r] + per_prompt[r])) for r in rows.tolist()])
        return AnchorTargets(
            self.input_ids[rows], self.attention_mask[rows], self.log_probs[take], None if self.token_ids is None else self.token_ids[take]
        )


def pad_prompts(prompts: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Token-id lists -> right-padded input_ids and attention_mask [P, T]."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise LokiError("the KL anchor needs at least one non-empty prompt.")
    width = max(len(p) for p in prompts)
    input_ids = torch.full((len(prompts), width), int(pad_id), dtype=torch.long)
    attention_mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for i, prompt in enumerate(prompts):
        input_ids[i, : len(prompt)] = torch.as_tensor(list(prompt), dtype=torch.long)
        attention_mask[i, : len(prompt)] = 1
    return input_ids, attention_mask


@torch.no_grad()
def anchor_targets(model: nn.Module, prompts: Sequence[Sequence[int]], pad_id: int, top_k: int | None = 64, batch_size: int = 4) -> AnchorTargets:
    """Run the (base) model once over `prompts` and keep its next-token distributions (see AnchorTargets)."""
    if top_k is not None and int(top_k) < 1:
        raise LokiError(f"loss.anchor_top_k must be a positive integer or null (the whole vocabulary), got {top_k!r}.")
    input_ids, attention_mask = pad_prompts(prompts, pad_id)
    was_training = model.training
    model.eval()  # the base's distribution, without dropout
    device = next(model.parameters()).device
    log_probs, token_ids = [], []
    try:
        for start in range(0, len(input_ids), batch_size):
            ids, mask = input_ids[start : start + batch_size].to(device), attention_mask[start : start + batch_size].to(device)
            logits = model(input_ids=ids, attention_mask=mask).logits[mask.bool()].float()
            lp = torch.log_softmax(logits, dim=-1)
            if top_k is None:
                log_probs.append(lp.cpu())
            else:
                values, index = lp.topk(min(int(top_k), lp.shape[-1]), dim=-1)
                log_probs.append(values.cpu())
                token_ids.append(index.cpu())
    finally:
        model.train(was_training)
    return AnchorTargets(input_ids, attention_mask, torch.cat(log_probs), torch.cat(token_ids) if token_ids else None)


def coarse_kl(base_log_probs: torch.Tensor, token_ids: torch.Tensor | None, logits: torch.Tensor) -> torch.Tensor:
    """Mean over positions of KL(base || model), both coarsened to the base's K tokens plus "the rest".

    base_log_probs [n, K], token_ids [n, K] (None: K is the whole vocabulary, the plain KL), logits [n, V]."""
    logits = logits if logits.dtype == torch.float64 else logits.float()  # at least float32 for the softmax
    model_lp = torch.log_softmax(logits, dim=-1)
    base_lp = base_log_probs.to(device=model_lp.device, dtype=model_lp.dtype)
    if token_ids is None:
        return (base_lp.exp() * (base_lp - model_lp)).sum(dim=-1).mean()
    index = token_ids.to(model_lp.device)
    kept = (base_lp.exp() * (base_lp - model_lp.gather(-1, index))).sum(dim=-1)
    # the rest: log of the mass outside the K tokens, for the base (from its K probabilities) and the model
    # (logsumexp over the other logits, stable where the rest is tiny)
    base_rest = torch.log1p(-base_lp.exp().sum(dim=-1).clamp(max=1.0))
    model_rest = torch.logsumexp(logits.scatter(-1, index, float("-inf")), dim=-1) - torch.logsumexp(logits, dim=-1)
    rest_mass = base_rest.exp()
    rest = torch.where(rest_mass > 0, rest_mass * (base_rest - model_rest), torch.zeros_like(rest_mass))
    return (kept + rest).mean()


def anchor_kl(model: nn.Module, targets: AnchorTargets) -> torch.Tensor:
    """KL(base || model) on the anchor prompts of `targets`, averaged over their real positions."""
    device = next(model.parameters()).device
    mask = targets.attention_mask.to(device)
    logits = model(input_ids=targets.input_ids.to(device), attention_mask=mask).logits[mask.bool()]
    return coarse_kl(targets.log_probs, targets.token_ids, logits)
