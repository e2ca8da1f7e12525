"""Knowledge Vector Attribution (KVA): integrated gradients on each layer's FFN down-projection output.

Plain torch on a Hugging Face causal LM; no Lightning. docs/method.md "KVA" gives the definitions. Notation:
z_l = layer l's down_proj output [seq, D]; t = the last real token; y = the target token (the clean
model's argmax at t, or the given gold token); f = softmax(logits[t])[y] (objective="prob") or
logits[t][y] (objective="logit"); "f(x | z_l <- v)" = the model run with z_l replaced by v, every other
layer running normally; derivatives are taken with respect to the replaced tensor (the integrated-
gradients convention). Only one layer is replaced at a time. Three recipes (`RECIPES`):

* recipe="paper" (the paper's equation; the default):

      Attr[l, j] = (1/m) * sum_{k=1..m} d f(x | z_l <- (k/m) z_l) / d z_l[t, j]

  right Riemann sum, baseline 0, gradient only. scope="target" (default) scales z_l[t] only, scope=
  "sequence" scales z_l at every position; times_activation=True multiplies by z_l[t, j].

* recipe="published" (the authors' first public code): only z_l[t] is scaled, left Riemann sum, times
  the activation:

      Attr[l, j] = z_l[t, j] * (1/m) * sum_{k=0..m-1} d f(x | z_l[t] <- (k/m) z_l[t]) / d z_l[t, j]

* recipe="captum" (the authors' current code: Captum LayerIntegratedGradients on down_proj, n_steps=m,
  method="riemann_trapezoid", input baseline = the prompt with every token replaced by id 0). With
  b_l = layer l's down_proj output on that all-zero prompt (same length, mask and positions), the whole
  sequence is interpolated, z_l(a) = b_l + a (z_l - b_l), at a_i = i/(m-1), i = 0..m-1, with
  Captum's trapezoid weights w_i = 1/m, halved at both ends (they sum to (m-1)/m; m >= 2):

      Attr[l, j] = (z_l[t, j] - b_l[t, j]) * sum_{i=0..m-1} w_i * d f(x | z_l <- z_l(a_i)) / d z_l[t, j]

The recipe fixes the integration rule, the baseline and the activation factor; `scope` and
`times_activation` remain choices only where they mean something (paper: either scope, either factor;
published: target scope, factor on; captum: sequence scope, factor on). `resolve_recipe` says which.
`objective` and gold `targets` apply to every recipe (docs/method.md's recipes use "prob" and the argmax).

Two exact shortcuts (docs/method.md "KVA", fast paths) make this far cheaper than rerunning the model
m times per layer; every recipe uses one of them, none needs the naive loop:

* Replacing z_l leaves every layer below l unchanged, so one clean pass records what each layer
  sees; the replaced runs restart at layer l, with all m steps batched together. This is the
  scope="sequence" path (paper/sequence and captum; captum adds one more no-grad pass on the all-zero
  prompt to record b_l).
* With scope="target" only position t changes, and a causal model reads position t from the keys and
  values of earlier positions, which are the clean ones. So above layer l each scaled run is one new
  token per step that attends to the clean pass's keys/values. All layers' runs go up together as a
  "staircase": at layer i the m tokens started at every layer <= i share one call of layer i, and a
  single backward pass gives every layer's gradients. (Positions after t never matter: causality.)
  This is the paper/target and published path. Captum cannot use it: its baseline changes every
  position of z_l, so the layers above l must rerun the whole sequence.

A guard checks each pass against the model's own logits at the step with alpha = 1 (the unmodified
model). paper and captum always have that step; published (alphas 0 .. (m-1)/m) never does, so it runs
unguarded on the same target-scope code that paper's guard covers.

For Qwen2/Qwen3/Llama/Mistral, whose layer output is `residual + down_proj(...)`, a replaced layer's
output is simply `r_l + v` with r_l the recorded residual (v = alpha z_l, or b_l + alpha (z_l - b_l)),
so layer l itself is not rerun. Other families rerun layer l with a hook that replaces its down_proj
output.

Every row of a batch, left- or right-padded, gets its batch-of-1 result: t is each row's own last real
token, positions are numbered from each row's first real token, and padding is masked out (the
authors' batched code read logits[:, -1], which is a pad for every right-padded row).
"""

from __future__ import annotations

import contextlib
import inspect
from dataclasses import dataclass, field

import torch
from torch import nn

from loki import arch
from loki.arch import decoder_layers
from loki.errors import LokiError

SCOPES = ("target", "sequence")
OBJECTIVES = ("prob", "logit")
RECIPES = ("paper", "published", "captum")
# What each recipe leaves to the caller; the first value is the one None stands for.
_RECIPE_SCOPES = {"paper": ("target", "sequence"), "published": ("target",), "captum": ("sequence",)}
_RECIPE_TIMES_ACTIVATION = {"paper": (False, True), "published": (True,), "captum": (True,)}

# The target-scope path passes its own additive float mask to the attention function.
_MASKED_ATTENTION_IMPLEMENTATIONS = ("eager", "sdpa")


def attribute(
    model: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    *,
    targets: torch.Tensor | None = None,
    steps: int = 7,
    scope: str | None = None,
    objective: str = "prob",
    times_activation: bool | None = None,
    steps_per_pass: int | None = None,
    recipe: str = "paper",
) -> torch.Tensor:
    """KVA scores as float32 [batch, layers, hidden_size].

    input_ids / attention_mask: [batch, seq]; rows may be left- or right-padded; t is each row's last
    real token. targets: one token id per row (the gold answer); None uses the model's own argmax
    prediction at t. objective: "prob" = softmax(logits[t])[y], "logit" = logits[t][y].
    recipe: "paper", "published" or "captum" (module docstring). scope and times_activation default
    (None) to the recipe's own: paper scope="target" and no factor, published "target" with the factor,
    captum "sequence" with the factor; other values are refused where the recipe fixes them.
    scope: "target" scales z_l only at t, "sequence" at every position (the gradient is read at t).
    times_activation multiplies each score by the clean activation z_l[t, j] (captum: z_l - b_l at t).
    steps_per_pass bounds memory: at most this many of the `steps` scaled copies run at once.
    A batch gives the same rows as each prompt alone. Parameters get no .grad; the model's train/eval
    mode and requires_grad flags are restored afterwards.
    """
    scope, times_activation = resolve_recipe(recipe, scope, times_activation, steps)
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
    alphas, coefficients = _integration_rule(recipe, steps)

    with _analysis_mode(model):
        clean = _clean_pass(net, input_ids, attention_mask, t, record_kv=scope == "target")
        if targets is None:
            targets = clean.logits_at_t.argmax(dim=-1)
        # captum: b_l, layer l's down_proj output on the all-token-0 prompt (same mask and positions).
        baseline = _baseline_pass(net, input_ids, attention_mask) if recipe == "captum" else None
        scores = torch.zeros(len(net.layers), *clean.z_at_t[0].shape, dtype=torch.float32, device=input_ids.device)
        for chunk, weights in zip(alphas.split(steps_per_pass), coefficients.split(steps_per_pass)):
            chunk, weights = chunk.to(device=input_ids.device), weights.to(device=input_ids.device)
            if scope == "target":
                grad_sums, logits_at_one = _target_scope_pass(net, clean, t, targets, objective, chunk, weights)
            else:
                grad_sums, logits_at_one = _sequence_scope_pass(
                    net, clean, t, targets, objective, chunk, weights, baseline
                )
            scores += grad_sums
            if logits_at_one is not None:
                _check_reproduces_clean_logits(logits_at_one, clean.logits_at_t, model)
        # Every rule's weights are coefficients / steps (module docstring): divide once, at the end.
        scores = (scores / steps).transpose(0, 1).contiguous()  # [B, L, D]
        if recipe == "captum":
            rows = torch.arange(len(t), device=t.device)
            b_at_t = torch.stack([b[rows, t] for b in baseline], dim=1).float()
            scores *= torch.stack(clean.z_at_t, dim=1).float() - b_at_t
        elif times_activation:
            scores *= torch.stack(clean.z_at_t, dim=1).float()
    return scores


def resolve_recipe(
    recipe: str, scope: str | None = None, times_activation: bool | None = None, steps: int = 7
) -> tuple[str, bool]:
    """Check a recipe's settings before any model work; returns (scope, times_activation) with the
    recipe's defaults filled in for None. Refuses a setting the recipe fixes otherwise."""
    if recipe not in RECIPES:
        raise LokiError(f"recipe must be one of {', '.join(RECIPES)}, got {recipe!r}.")
    if scope is not None and scope not in SCOPES:
        raise LokiError(f"scope must be one of {', '.join(SCOPES)}, got {scope!r}.")
    times_activation = None if times_activation is None else bool(times_activation)
    allowed_scopes = _RECIPE_SCOPES[recipe]
    if scope is not None and scope not in allowed_scopes:
        raise LokiError(
            f"scope={scope!r} does not fit recipe={recipe!r}, which allows scope "
            f"{' or '.join(map(repr, allowed_scopes))} only."
        )
    allowed_factors = _RECIPE_TIMES_ACTIVATION[recipe]
    if times_activation is not None and times_activation not in allowed_factors:
        raise LokiError(
            f"times_activation={times_activation!r} does not fit recipe={recipe!r}, which allows "
            f"times_activation {' or '.join(map(repr, allowed_factors))} only."
        )
    # Captum's trapezoid rule needs both ends of [0, 1] (it asserts n_steps > 1).
    if recipe == "captum" and isinstance(steps, int) and not isinstance(steps, bool) and steps == 1:
        raise LokiError("steps=1 does not fit recipe='captum', whose trapezoid rule needs steps >= 2.")
    scope = allowed_scopes[0] if scope is None else scope
    times_activation = allowed_factors[0] if times_activation is None else times_activation
    return scope, times_activation


def _integration_rule(recipe: str, steps: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(alphas, coefficients), float32 [steps]: the weight of step k is coefficients[k] / steps."""
    ones = torch.ones(steps, dtype=torch.float32)
    if recipe == "paper":  # right Riemann: k/m, k = 1..m
        return torch.arange(1, steps + 1, dtype=torch.float32) / steps, ones
    if recipe == "published":  # left Riemann: k/m, k = 0..m-1
        return torch.arange(0, steps, dtype=torch.float32) / steps, ones
    # captum: Captum's riemann_trapezoid, linspace(0, 1, m) with weights 1/m halved at both ends.
    # torch.linspace in float32 is what Captum itself uses, so the alphas match it bit for bit.
    coefficients = ones.clone()
    coefficients[0] = coefficients[-1] = 0.5
    return torch.linspace(0, 1, steps, dtype=torch.float32), coefficients


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
    residual_add: bool  # layer output == r_l + z_l (arch.Family.residual_add)
    attn_implementation: str

    @classmethod
    def of(cls, model: nn.Module) -> _Network:
        layers = decoder_layers(model)
        final_norm = arch.final_norm(model)
        head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        if final_norm is None or head is None:
            raise LokiError(
                f"{type(model).__name__} has no final `norm` and output head; KVA needs a *ForCausalLM model."
            )
        attn = getattr(model.config, "_attn_implementation", "eager")
        return cls(model, layers, final_norm, head, arch.residual_add(model), attn)

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
    # Only logits[t] are read: ask the model's own head for the distinct target positions, not the
    # full vocabulary at every position (the model's head, so the alpha = 1 guard checks against it).
    positions = torch.unique(t)  # sorted; one position when every row ends at the same place
    if _accepts_logits_to_keep(net.model):
        extra["logits_to_keep"] = positions
    try:
        out = net.model(
            input_ids=input_ids, attention_mask=attention_mask, position_ids=_position_ids(attention_mask), **extra
        )
    finally:
        for handle in handles:
            handle.remove()
    if "logits_to_keep" in extra:
        clean.logits_at_t = out.logits[rows, torch.searchsorted(positions, t)].float()
    else:
        clean.logits_at_t = out.logits[rows, t].float()
    if record_kv:
        cache = out.cache if getattr(out, "cache", None) is not None else out.past_key_values
        clean.keys = [layer_cache.keys for layer_cache in cache.layers]
        clean.values = [layer_cache.values for layer_cache in cache.layers]
        cos, sin = clean.layer_kwargs[0]["position_embeddings"]
        clean.position_embeddings_at_t = (cos.expand(len(rows), -1, -1)[rows, t], sin.expand(len(rows), -1, -1)[rows, t])
        clean.layer_kwargs = []  # not needed; drop references to the cache
    return clean


def _accepts_logits_to_keep(model: nn.Module) -> bool:
    try:
        return "logits_to_keep" in inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return False


@torch.no_grad()
def _baseline_pass(net: _Network, input_ids, attention_mask) -> list:
    """recipe="captum": every layer's down_proj output [B, S, D] on the prompt made of token id 0 only,
    with the row's own attention mask and positions (Captum's input baseline, torch.zeros_like(ids))."""
    baseline = []
    handles = [
        layer.mlp.down_proj.register_forward_hook(lambda proj, args, output: baseline.append(output))
        for layer in net.layers
    ]
    # The baseline's logits are never read: keep the head to one position where the model allows it.
    extra = {"logits_to_keep": 1} if _accepts_logits_to_keep(net.model) else {}
    try:
        net.model(
            input_ids=torch.zeros_like(input_ids),
            attention_mask=attention_mask,
            position_ids=_position_ids(attention_mask),
            use_cache=False,
            **extra,
        )
    finally:
        for handle in handles:
            handle.remove()
    return baseline


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


def _target_scope_pass(net: _Network, clean: _CleanPass, t, targets, objective, alphas, coefficients):
    """Sum over the given alphas of coefficient * d f / d z_l[t] for every layer l: [L, B, D], plus the
    logits at alpha = 1 when the last alpha is 1."""
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
    weights = coefficients.float()[None, :, None]  # [1, m, 1]; multiplying by 1.0 is exact (paper)
    grad_sums = torch.stack([(g.float() * weights).sum(dim=1) for g in grads])  # [L, B, D]
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


def _sequence_scope_pass(net: _Network, clean: _CleanPass, t, targets, objective, alphas, coefficients, baseline):
    """Sum over the given alphas of coefficient * d f / d z_l[t] for every layer l: [L, B, D], where
    z_l is replaced at every position by alpha z_l (baseline None) or b_l + alpha (z_l - b_l)."""
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
    weights = coefficients.float()[None, :, None]  # [1, m, 1]
    for l, layer in enumerate(net.layers):
        if baseline is None:
            leaf = clean.z[l].repeat_interleave(steps, dim=0) * scale  # alpha z_l, [B*m, S, D]
        else:
            b = baseline[l].repeat_interleave(steps, dim=0)
            leaf = b + scale * (clean.z[l].repeat_interleave(steps, dim=0) - b)  # b_l + alpha (z_l - b_l)
        leaf.requires_grad_(True)
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
        grad_sums.append((grad[rows, t_rep].float().view(batch, steps, -1) * weights).sum(dim=1))
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
