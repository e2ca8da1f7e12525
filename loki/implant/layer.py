"""The implant layer: a `down_proj` whose selected output rows learn, as a `[k, F]` block or as LoRA on it.

Row `j` of layer `l` is row `j` of `down_proj.weight` (shape [D, F]); see docs/method.md ("Implanting").
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn


def row_mask(rows: Sequence[int], hidden_size: int, device: torch.device | str | None = None) -> torch.Tensor:
    """Boolean [hidden_size] mask, True at the selected rows."""
    mask = torch.zeros(hidden_size, dtype=torch.bool, device=device)
    if len(rows):
        mask[torch.as_tensor(list(rows), dtype=torch.long, device=device)] = True
    return mask


def master_dtype(weight_dtype: torch.dtype) -> torch.dtype:
    """The dtype LoKI trains in for weights of `weight_dtype`: float32 for bf16/fp16, else the weight's own."""
    return torch.promote_types(weight_dtype, torch.float32)


class LokiDownProj(nn.Module):
    """A `down_proj` whose selected output rows are trainable: as a `[k, F]` block, or as LoRA on that block.

    `weight` and `bias` are the original (frozen) parameters, shared, not copied. The base linear map is
    computed in full and the selected output coordinates are then replaced (rows) or corrected (LoRA),
    so the backward pass computes a weight gradient of size `[k, F]` (or the LoRA factors) only.
    The trainable tensors are float32 masters for bf16/fp16 weights (`master_dtype`).
    """

    def __init__(
        self,
        linear: nn.Linear,
        row_index: torch.Tensor,
        lora_rank: int = 0,
        lora_alpha: float | None = None,
        lora_dropout: float = 0.0,
    ):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight = linear.weight
        self.bias = linear.bias
        self.weight.requires_grad_(False)
        if self.bias is not None:
            self.bias.requires_grad_(False)
        # Not persistent: the positions come from the callback's configuration, not from checkpoints.
        self.register_buffer("row_index", row_index.to(device=self.weight.device, dtype=torch.long), persistent=False)
        self.lora_rank = int(lora_rank)
        k, fan_in = len(row_index), self.in_features
        # The trainable tensors are fp32 masters even when the model is bf16/fp16: an update of lr 1e-5 is
        # below half a bf16 ulp of a typical weight, so a bf16 parameter would round most of it away.
        # They are cast to the weight's dtype in forward and rounded to it once, at merge.
        master = master_dtype(self.weight.dtype)
        if self.lora_rank == 0:
            self.rows = nn.Parameter(self.weight.detach().index_select(0, self.row_index).to(master, copy=True))
        else:
            self.lora_scaling = float(lora_alpha if lora_alpha is not None else lora_rank) / self.lora_rank
            # A zero-initialised, so training starts exactly at the base model (the usual LoRA choice).
            self.lora_A = nn.Parameter(torch.zeros(k, self.lora_rank, dtype=master, device=self.weight.device))
            self.lora_B = nn.Parameter(torch.empty(self.lora_rank, fan_in, dtype=master, device=self.weight.device))
            nn.init.kaiming_uniform_(self.lora_B, a=math.sqrt(5))  # same init as an nn.Linear(F, r)
            self.lora_dropout = nn.Dropout(lora_dropout) if lora_dropout > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.linear(x, self.weight, self.bias)
        dtype = self.weight.dtype  # a no-op cast for fp32 models; the gradient still reaches the fp32 master
        if self.lora_rank == 0:
            bias = None if self.bias is None else self.bias.index_select(0, self.row_index)
            selected = F.linear(x, self.rows.to(dtype), bias)
            return out.index_copy(-1, self.row_index, selected.to(out.dtype))
        delta = F.linear(F.linear(self.lora_dropout(x), self.lora_B.to(dtype)), self.lora_A.to(dtype)) * self.lora_scaling
        return out.index_add(-1, self.row_index, delta.to(out.dtype))

    @torch.no_grad()
    def trained_rows(self) -> torch.Tensor:
        """The current values of the selected rows of the effective weight, `[k, F]`, in the weight's dtype
        (the fp32 masters rounded once, here)."""
        if self.lora_rank == 0:
            return self.rows.detach().to(self.weight.dtype)
        base = self.weight.index_select(0, self.row_index)
        # Merge in float32 so a bf16 model does not round the product before the sum.
        master = self.lora_A.dtype
        delta = self.lora_scaling * (self.lora_A @ self.lora_B)
        return (base.to(master) + delta).to(self.weight.dtype)

    @torch.no_grad()
    def merged_linear(self) -> nn.Linear:
        """A plain nn.Linear with the trained rows written into the (shared) base weight."""
        self.weight.index_copy_(0, self.row_index, self.trained_rows())
        linear = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None, device="meta")
        linear.weight = self.weight
        linear.bias = self.bias
        return linear

    def extra_repr(self) -> str:
        mode = "rows" if self.lora_rank == 0 else f"lora r={self.lora_rank}"
        return f"in={self.in_features}, out={self.out_features}, k={len(self.row_index)}, {mode}"
