"""Suppression damage per layer: how far the model's answer distribution moves when the rows LoKI would
train in one layer are zeroed, that layer alone (issue 20, variant 1's second measure; the paper's Figure 3
suppresses every layer at once).

    damage[l] = mean over prompts of KL( p_base(. | prompt) || p_l(. | prompt) )   at the prompt's last token

where `p_l` is the model with the given rows of layer l's `down_proj.weight` set to zero. The last token is
where a lettered MMLU prompt's answer is read, the position KVA attributes. `loki.quota=damage` spreads the
row budget in inverse proportion to it (`loki.select.adaptive_quota`): a layer whose least important rows
still matter when removed gets fewer rows.

Plain torch: the weights are changed in place and put back exactly (a copy of the zeroed rows is restored).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from loki.errors import LokiError


@torch.no_grad()
def last_token_log_probs(model: nn.Module, prompts: Sequence[Sequence[int]], pad_id: int, batch_size: int = 8) -> torch.Tensor:
    """log p(next token | prompt) at each prompt's last token, float64 [N, V] (small KLs are differences of
    nearly equal log-probabilities). Prompts are right-padded, so
    the positions before the pads see exactly what they would see alone."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise LokiError("the suppression damage needs at least one prompt, and no empty one.")
    device = next(model.parameters()).device
    out = []
    for start in range(0, len(prompts), batch_size):
        part = prompts[start : start + batch_size]
        width = max(len(p) for p in part)
        ids = torch.full((len(part), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(part), width), dtype=torch.long)
        for i, p in enumerate(part):
            ids[i, : len(p)] = torch.as_tensor(p, dtype=torch.long)
            mask[i, : len(p)] = 1
        logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits
        last = torch.as_tensor([len(p) - 1 for p in part], device=device)
        out.append(torch.log_softmax(logits[torch.arange(len(part), device=device), last].double(), dim=-1).cpu())
    return torch.cat(out)


@torch.no_grad()
def layer_damage(model: nn.Module, prompts: Sequence[Sequence[int]], positions: Sequence[Sequence[int]], pad_id: int, batch_size: int = 8) -> torch.Tensor:
    """`damage[l]` (float64 [L]) for the rows `positions[l]` of each layer; 0 for a layer with none."""
    from loki import arch

    projs = list(arch.down_projs(model))
    if len(positions) != len(projs):
        raise LokiError(f"the positions have {len(positions)} layers but the model has {len(projs)}.")
    was_training = model.training
    model.eval()
    try:
        base = last_token_log_probs(model, prompts, pad_id, batch_size)
        damage = torch.zeros(len(projs), dtype=torch.float64)
        for layer, (proj, rows) in enumerate(zip(projs, positions)):
            if not rows:
                continue
            index = torch.as_tensor(list(rows), dtype=torch.long, device=proj.weight.device)
            saved = proj.weight.index_select(0, index).clone()
            proj.weight.index_fill_(0, index, 0.0)
            try:
                suppressed = last_token_log_probs(model, prompts, pad_id, batch_size)
            finally:
                proj.weight.index_copy_(0, index, saved)  # bit-exact: the saved rows go back
            kl = (base.exp() * (base - suppressed)).sum(dim=-1)  # KL(base || suppressed) per prompt
            damage[layer] = kl.mean()
    finally:
        model.train(was_training)
    return damage
