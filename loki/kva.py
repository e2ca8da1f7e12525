"""Knowledge Vector Attribution (KVA): integrated gradients on each layer's FFN down-projection output.

Plain torch on a Hugging Face causal LM; no Lightning. DESIGN.md "KVA" gives the definition:

    Attr[l, j] = (1/m) * sum_{k=1..m} d f(x | z_l <- (k/m) z_l) / d z_l[t, j]

where z_l is layer l's down_proj output, t the last real token, f the target probability (or logit),
and the derivative is taken with respect to the scaled tensor (the integrated-gradients convention).

Two exact shortcuts (DESIGN.md "Performance model") make this far cheaper than rerunning the model
m times per layer:

* Scaling layer l leaves every layer below l unchanged, so one clean pass records what each layer
  sees; the scaled runs restart at layer l, with all m steps batched together.
* With scope="target" only position t changes, and a causal model reads position t from the keys and
  values of earlier positions, which are the clean ones. So above layer l each scaled run is one new
  token per step that attends to the clean pass's keys/values. All layers' runs go up together as a
  "staircase": at layer i the m tokens started at every layer <= i share one call of layer i, and a
  single backward pass gives every layer's gradients. (Positions after t never matter: causality.)

For Qwen2/Qwen3/Llama/Mistral, whose layer output is `residual + down_proj(...)`, a scaled layer's
output is simply `r_l + alpha * z_l` with r_l the recorded residual, so layer l itself is not rerun.
Other families rerun layer l with a hook that scales its down_proj output.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import torch
from torch import nn

from loki.arch import decoder_layers, down_projs
from loki.errors import LokiError

SCOPES = ("target", "sequence")
OBJECTIVES = ("prob", "logit")

# Families whose decoder layer ends with `hidden = r + mlp(post_attention_layernorm(r))`, r being the
# input of post_attention_layernorm: the scaled output of layer l is r_l + alpha * z_l exactly.
_RESIDUAL_ADD_MODEL_TYPES = ("qwen2", "qwen3", "llama", "mistral")
# The target-scope path passes its own additive float mask to the attention function.
_MASKED_ATTENTION_IMPLEMENTATIONS = ("eager", "sdpa")


def attribute(
    model: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    *,
    targets: torch.Tensor | None = None,
    steps: int = 7,
    scope: str = "target",
    objective: str = "prob",
    times_activation: bool = False,
    steps_per_pass: int | None = None,
) -> torch.Tensor:
    """KVA scores as float32 [batch, layers, hidden_size].

    input_ids / attention_mask: [batch, seq]; rows may be left- or right-padded; t is each row's last
    real token. targets: one token id per row (the gold answer); None uses the model's own argmax
    prediction at t. objective: "prob" = softmax(logits[t])[y], "logit" = logits[t][y].
    scope: "target" scales z_l only at t, "sequence" at every position (the gradient is read at t).
    times_activation multiplies each score by the clean activation z_l[t, j].
    steps_per_pass bounds memory: at most this many of the `steps` scaled copies run at once.
    A batch gives the same rows as each prompt alone. Parameters get no .grad; the model's train/eval
    mode and requires_grad flags are restored afterwards.
    """
    attention_mask, targets = _check_inputs(input_ids, attention_mask, targets, steps, scope, objective)
    steps_per_pass = steps if steps_per_pass is None else steps_per_pass
    if not isinstance(steps_per_pass, int) or steps_per_pass < 1:
        raise LokiError(f"steps_per_pass must be a positive integer, got {steps_per_pass!r}.")

    t = target_positions(attention_mask)
    # Tokens after every row's target position cannot influence any target (causal model): drop them.
    keep = int(t.max()) + 1
    input_ids, attention_mask = input_ids[:, :keep], attention_mask[:, :keep]
    net = _Network.of(model)
    if scope == "target" and net.attn_implementation not in _MASKED_ATTENTION_IMPLEMENTATIONS:
        raise LokiError(
            f"scope='target' needs the model loaded with attn_implementation 'sdpa' or 'eager', "
            f"not '{net.attn_implementation}'."
        )

    with _analysis_mode(model):
        clean = _clean_pass(net, input_ids, attention_mask, t, record_kv=scope == "target")
        if targets is None:
            targets = clean.logits_at_t.argmax(dim=-1)
        alphas = torch.arange(1, steps + 1, dtype=torch.float32) / steps
        scores = torch.zeros(len(net.layers), *clean.z_at_t[0].shape, dtype=torch.float32, device=input_ids.device)
        for chunk in alphas.split(steps_per_pass):
            chunk = chunk.to(device=input_ids.device)
            if scope == "target":
                grad_sums, logits_at_one = _target_scope_pass(net, clean, t, targets, objective, chunk)
            else:
                grad_sums, logits_at_one = _sequence_scope_pass(net, clean, t, targets, objective, chunk)
            scores += grad_sums
            if logits_at_one is not None:
                _check_reproduces_clean_logits(logits_at_one, clean.logits_at_t, model)
        scores = (scores / steps).transpose(0, 1).contiguous()  # [B, L, D]
        if times_activation:
            scores *= torch.stack(clean.z_at_t, dim=1).float()
    return scores


def target_positions(attention_mask: torch.Tensor) -> torch.Tensor:
    """Index of the last real token of each row (left or right padding)."""
    seq_len = attention_mask.shape[1]
    index = torch.arange(seq_len, device=attention_mask.device).expand_as(attention_mask)
    return torch.where(attention_mask.bool(), index, -1).max(dim=1).values


# --------------------------------------------------------------------------------------------------
# The model, seen as: layers, final norm, output head.


@dataclass
class _Network:
    model: nn.Module
    layers: nn.ModuleList
    final_norm: nn.Module
    head: nn.Module
    residual_add: bool  # layer output == r_l + z_l (see _RESIDUAL_ADD_MODEL_TYPES)
    attn_implementation: str

    @classmethod
    def of(cls, model: nn.Module) -> _Network:
        layers = decoder_layers(model)
        owner = next((m for m in model.modules() if getattr(m, "layers", None) is layers), None)
        final_norm = getattr(owner, "norm", None)
        head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        if final_norm is None or head is None:
            raise LokiError(
                f"{type(model).__name__} has no final `norm` and output head; KVA needs a *ForCausalLM model."
            )
        config = model.config
        residual_add = config.model_type in _RESIDUAL_ADD_MODEL_TYPES and all(
            hasattr(layer, "post_attention_layernorm") for layer in layers
        )
        return cls(model, layers, final_norm, head, residual_add, getattr(config, "_attn_implementation", "eager"))

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = self.head(self.final_norm(hidden))
        cap = getattr(self.model.config, "final_logit_softcapping", None)
        if cap:
            logits = torch.tanh(logits / cap) * cap
        return logits

    def sliding_window(self, index: int) -> int | None:
        attn = self.layers[index].self_attn
        if hasattr(attn, "sliding_window"):
            return attn.sliding_window
        return getattr(self.model.config, "sliding_window", None)


def _layer_output(out):
    # transformers 5 layers return a tensor; older ones a tuple whose first item is the hidden state.
    return out[0] if isinstance(out, tuple) else out


@contextlib.contextmanager
def _scaled_down_proj(layer: nn.Module, scale_fn):
    """Replace the layer's down_proj output by scale_fn(output) during the block."""
    handle = layer.mlp.down_proj.register_forward_hook(lambda module, args, output: scale_fn(output))
    try:
        yield
    finally:
        handle.remove()


# --------------------------------------------------------------------------------------------------
# Clean pass: what every layer saw, once.


@dataclass
class _CleanPass:
    layer_inputs: list = field(default_factory=list)  # [B, S, D] input of layer i (target: [B, D] at t)
    layer_kwargs: list = field(default_factory=list)  # keyword arguments the model passed to layer i
    residuals: list = field(default_factory=list)  # r_i: input of post_attention_layernorm (target: at t)
    z: list = field(default_factory=list)  # down_proj output [B, S, D] (target: [B, D] at t)
    z_at_t: list = field(default_factory=list)  # [B, D] per layer
    keys: list = field(default_factory=list)  # target scope: [B, kv_heads, S, head_dim] per layer
    values: list = field(default_factory=list)
    position_embeddings_at_t: tuple | None = None  # target scope: (cos, sin) [B, head_dim] at t
    attention_mask: torch.Tensor | None = None  # [B, S] 0/1
    logits_at_t: torch.Tensor | None = None  # [B, V] float32


def _position_ids(attention_mask: torch.Tensor) -> torch.Tensor:
    # Real tokens are numbered 0, 1, ... whatever the padding side, so a row scores as it would alone.
    return (attention_mask.long().cumsum(dim=1) - 1).clamp(min=0)


@torch.no_grad()
def _clean_pass(net: _Network, input_ids, attention_mask, t, record_kv: bool) -> _CleanPass:
    rows = torch.arange(input_ids.shape[0], device=input_ids.device)
    clean = _CleanPass(attention_mask=attention_mask)
    at_t_only = record_kv  # the target scope never needs whole sequences

    def record_input(layer, args, kwargs):
        if not net.residual_add:  # only the generic path reruns layer l from its input
            hidden = args[0] if args else kwargs["hidden_states"]
            clean.layer_inputs.append(hidden[rows, t] if at_t_only else hidden)
        clean.layer_kwargs.append({k: v for k, v in kwargs.items() if k != "hidden_states"})

    def record_residual(norm, args):
        clean.residuals.append(args[0][rows, t] if at_t_only else args[0])

    def record_z(proj, args, output):
        if not at_t_only:
            clean.z.append(output)
        clean.z_at_t.append(output[rows, t])

    handles = []
    for layer in net.layers:
        handles.append(layer.register_forward_pre_hook(record_input, with_kwargs=True))
        handles.append(layer.mlp.down_proj.register_forward_hook(record_z))
        if net.residual_add:
            handles.append(layer.post_attention_layernorm.register_forward_pre_hook(record_residual))
    extra = {}
    if record_kv:
        from transformers.cache_utils import DynamicCache

        # No config: every layer keeps all positions (a sliding-window layer would drop old ones).
        extra = {"cache": DynamicCache(), "use_cache": True}
    try:
        out = net.model(
            input_ids=input_ids, attention_mask=attention_mask, position_ids=_position_ids(attention_mask), **extra
        )
    finally:
        for handle in handles:
            handle.remove()
    clean.logits_at_t = out.logits[rows, t].float()
    if record_kv:
        cache = out.cache if getattr(out, "cache", None) is not None else out.past_key_values
        clean.keys = [layer_cache.keys for layer_cache in cache.layers]
        clean.values = [layer_cache.values for layer_cache in cache.layers]
        cos, sin = clean.layer_kwargs[0]["position_embeddings"]
        clean.position_embeddings_at_t = (cos.expand(len(rows), -1, -1)[rows, t], sin.expand(len(rows), -1, -1)[rows, t])
        clean.layer_kwargs = []  # not needed; drop references to the cache
    return clean


# --------------------------------------------------------------------------------------------------
# scope="target": one new token per step, attending to the clean keys/values.


class _CleanPrefixCache:
    """Stands in for a KV cache: the clean pass's keys/values, then the new tokens' own."""

    def __init__(self, keys: list, values: list):
        self.keys, self.values = keys, values

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        return (
            torch.cat([self.keys[layer_idx], key_states], dim=-2),
            torch.cat([self.values[layer_idx], value_states], dim=-2),
        )


def _target_attention_mask(clean: _CleanPass, t, n_new: int, window: int | None, dtype) -> torch.Tensor:
    """Additive mask [B, 1, n_new, S + n_new]: each new token (at position t) sees the real clean tokens
    before t (inside the sliding window, if any) and itself, not the other new tokens."""
    seq_len = clean.attention_mask.shape[1]
    device = clean.attention_mask.device
    kv_index = torch.arange(seq_len, device=device)[None, :]
    sees_clean = clean.attention_mask.bool() & (kv_index < t[:, None])
    if window is not None:
        sees_clean &= kv_index > t[:, None] - window
    sees_self = torch.eye(n_new, dtype=torch.bool, device=device)
    allowed = torch.cat(
        [sees_clean[:, None, None, :].expand(-1, 1, n_new, -1), sees_self.expand(len(t), 1, -1, -1)], dim=-1
    )
    return torch.zeros(allowed.shape, dtype=dtype, device=device).masked_fill_(~allowed, torch.finfo(dtype).min)


def _target_scope_pass(net: _Network, clean: _CleanPass, t, targets, objective, alphas):
    """Sum over the given alphas of d f / d z_l[t] for every layer l: [L, B, D], plus logits at alpha=1."""
    batch, steps = len(t), len(alphas)
    dtype = clean.z_at_t[0].dtype
    cache = _CleanPrefixCache(clean.keys, clean.values)
    cos_t, sin_t = clean.position_embeddings_at_t
    position_t = _position_ids(clean.attention_mask).gather(1, t[:, None])
    scale = alphas.to(dtype)[None, :, None]  # [1, m, 1]
    masks: dict[int | None, torch.Tensor] = {}

    hidden = None  # [B, n, D]: the tokens started at layers < i, on their way up
    leaves = []
    for i, layer in enumerate(net.layers):
        leaf = (clean.z_at_t[i][:, None, :] * scale).requires_grad_(True)  # alpha * z_i[t], [B, m, D]
        leaves.append(leaf)
        if net.residual_add:
            # New tokens skip layer i: its output is r_i[t] + alpha * z_i[t] exactly.
            if hidden is not None:
                hidden = _run_target_layer(net, i, hidden, cache, masks, clean, t, cos_t, sin_t, position_t, dtype)
            started = clean.residuals[i][:, None, :] + leaf
            hidden = started if hidden is None else torch.cat([hidden, started], dim=1)
        else:
            started = clean.layer_inputs[i][:, None, :].expand(-1, steps, -1)
            hidden = started if hidden is None else torch.cat([hidden, started], dim=1)

            def scale_new_tokens(output, leaf=leaf):
                return torch.cat([output[:, :-steps], leaf], dim=1)

            with _scaled_down_proj(layer, scale_new_tokens):
                hidden = _run_target_layer(net, i, hidden, cache, masks, clean, t, cos_t, sin_t, position_t, dtype)

    # hidden: [B, L*m, D], layer-major: token l*m + k started at layer l with alpha_k.
    logits = net.logits(hidden).float()
    f = _objective(logits, targets[:, None].expand(-1, hidden.shape[1]), objective)
    grads = torch.autograd.grad(f.sum(), leaves)
    grad_sums = torch.stack([g.float().sum(dim=1) for g in grads])  # [L, B, D]
    logits_at_one = None
    if float(alphas[-1]) == 1.0:
        logits_at_one = logits.detach().view(batch, len(net.layers), steps, -1)[:, :, -1]
    return grad_sums, logits_at_one


def _run_target_layer(net, i, hidden, cache, masks, clean, t, cos_t, sin_t, position_t, dtype):
    n_new = hidden.shape[1]
    window = net.sliding_window(i)
    key = (window, n_new)
    if key not in masks:
        masks[key] = _target_attention_mask(clean, t, n_new, window, dtype)
    position_embeddings = (cos_t[:, None, :].expand(-1, n_new, -1), sin_t[:, None, :].expand(-1, n_new, -1))
    out = net.layers[i](
        hidden,
        attention_mask=masks[key],
        position_ids=position_t.expand(-1, n_new),
        position_embeddings=position_embeddings,
        cache=cache,
        use_cache=False,
    )
    return _layer_output(out)


# --------------------------------------------------------------------------------------------------
# scope="sequence": restart at layer l with all steps batched.


def _repeat_rows(value, batch: int, times: int):
    """Repeat every batch row `times` times (row b -> rows b*times .. b*times+times-1), recursively."""
    if isinstance(value, torch.Tensor) and value.ndim > 0 and value.shape[0] == batch:
        return value.repeat_interleave(times, dim=0)
    if isinstance(value, tuple):
        return tuple(_repeat_rows(v, batch, times) for v in value)
    return value


def _sequence_scope_pass(net: _Network, clean: _CleanPass, t, targets, objective, alphas):
    batch, steps = len(t), len(alphas)
    dtype = clean.z_at_t[0].dtype
    rows = torch.arange(batch * steps, device=t.device)
    t_rep, targets_rep = t.repeat_interleave(steps), targets.repeat_interleave(steps)
    scale = alphas.to(dtype).repeat(batch)[:, None, None]  # row b*m + k gets alpha_k
    grad_sums, logits_at_one = [], []
    repeated: dict[int, object] = {}  # layers share the mask and position tensors: repeat each once

    def repeat(value):
        if id(value) not in repeated:
            repeated[id(value)] = _repeat_rows(value, batch, steps)
        return repeated[id(value)]

    layer_kwargs = [{k: repeat(v) for k, v in kw.items()} | {"cache": None, "use_cache": False} for kw in clean.layer_kwargs]
    for l, layer in enumerate(net.layers):
        leaf = (clean.z[l].repeat_interleave(steps, dim=0) * scale).requires_grad_(True)  # [B*m, S, D]
        if net.residual_add:
            hidden = clean.residuals[l].repeat_interleave(steps, dim=0) + leaf
        else:
            hidden = clean.layer_inputs[l].repeat_interleave(steps, dim=0)
            with _scaled_down_proj(layer, lambda output: leaf):
                hidden = _layer_output(layer(hidden, **layer_kwargs[l]))
        for i in range(l + 1, len(net.layers)):
            hidden = _layer_output(net.layers[i](hidden, **layer_kwargs[i]))
        logits = net.logits(hidden[rows, t_rep]).float()  # [B*m, V]
        f = _objective(logits, targets_rep, objective)
        (grad,) = torch.autograd.grad(f.sum(), leaf)
        grad_sums.append(grad[rows, t_rep].float().view(batch, steps, -1).sum(dim=1))
        logits_at_one.append(logits.detach().view(batch, steps, -1)[:, -1])
    logits_at_one = torch.stack(logits_at_one, dim=1) if float(alphas[-1]) == 1.0 else None
    return torch.stack(grad_sums), logits_at_one


# --------------------------------------------------------------------------------------------------
# Shared pieces.


def _objective(logits: torch.Tensor, targets: torch.Tensor, objective: str) -> torch.Tensor:
    target_logit = logits.gather(-1, targets[..., None]).squeeze(-1)
    if objective == "logit":
        return target_logit
    return torch.exp(target_logit - logits.logsumexp(dim=-1))  # softmax(logits)[y]


def _check_reproduces_clean_logits(logits_at_one: torch.Tensor, clean_logits: torch.Tensor, model: nn.Module):
    """At alpha = 1 every scaled run is the clean model: a cheap guard against an unsupported layout."""
    loose = clean_logits.dtype != torch.float32 or next(model.parameters()).dtype != torch.float32
    tolerance = (1e-1 if loose else 1e-3) * (1.0 + float(clean_logits.abs().max()))
    error = float((logits_at_one - clean_logits[:, None, :]).abs().max())
    if error > tolerance:
        raise LokiError(
            f"the fast KVA path does not reproduce {type(model).__name__}'s own logits (max difference "
            f"{error:.3g}); this model family's layer layout is not supported."
        )


@contextlib.contextmanager
def _analysis_mode(model: nn.Module):
    """Eval mode, no parameter gradients; both restored afterwards."""
    was_training = model.training
    flags = [(p, p.requires_grad) for p in model.parameters()]
    try:
        model.eval()
        for p, _ in flags:
            p.requires_grad_(False)
        with torch.enable_grad():
            yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)
        model.train(was_training)


def _check_inputs(input_ids, attention_mask, targets, steps, scope, objective):
    if not isinstance(input_ids, torch.Tensor) or input_ids.ndim != 2 or 0 in input_ids.shape:
        shape = tuple(input_ids.shape) if isinstance(input_ids, torch.Tensor) else type(input_ids).__name__
        raise LokiError(f"input_ids must be a non-empty [batch, seq] tensor of token ids, got {shape}.")
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    if attention_mask.shape != input_ids.shape:
        raise LokiError(
            f"attention_mask shape {tuple(attention_mask.shape)} differs from input_ids shape {tuple(input_ids.shape)}."
        )
    attention_mask = attention_mask.to(input_ids.device).long()
    empty = (attention_mask.sum(dim=1) == 0).nonzero().flatten().tolist()
    if empty:
        raise LokiError(f"row {empty[0]} of the batch has no real token (its attention_mask is all zeros).")
    if scope not in SCOPES:
        raise LokiError(f"scope must be one of {', '.join(SCOPES)}, got {scope!r}.")
    if objective not in OBJECTIVES:
        raise LokiError(f"objective must be one of {', '.join(OBJECTIVES)}, got {objective!r}.")
    if not isinstance(steps, int) or isinstance(steps, bool) or steps < 1:
        raise LokiError(f"steps must be a positive integer, got {steps!r}.")
    if targets is not None:
        targets = torch.as_tensor(targets, device=input_ids.device).long().reshape(-1)
        if targets.shape[0] != input_ids.shape[0]:
            raise LokiError(f"targets holds {targets.shape[0]} token ids for a batch of {input_ids.shape[0]} prompts.")
    return attention_mask, targets
