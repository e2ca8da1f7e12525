"""Seconds per sample: per-layer Captum LayerIntegratedGradients (the published approach) vs loki.kva.

    python benchmarks/bench_kva.py [--lengths 128 256 512] [--samples 1] [--threads 2]

Random Qwen2 model: 16 layers, hidden 256, intermediate 1024, 4 heads / 2 KV heads, vocab 32,000.
The baseline follows the published code: one sample at a time, one Captum call per layer on that
layer's down_proj, n_steps=7 (riemann_right, i.e. alphas k/7 as in DESIGN.md), all steps in one
internal batch, the whole sequence interpolated, logits computed at the target position only, and the
baseline input all-zero token ids (as published; a cost-equivalent stand-in for a zero layer output).
loki.kva runs one sample at a time too (batching would favour it further). Needs `pip install captum`.
"""

from __future__ import annotations

import argparse
import time

import torch
from transformers import AutoConfig, AutoModelForCausalLM

from loki.kva import attribute


def build_model(vocab: int):
    config = AutoConfig.for_model(
        "qwen2",
        vocab_size=vocab,
        hidden_size=256,
        intermediate_size=1024,
        num_hidden_layers=16,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
    )
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()


def captum_per_layer(model, input_ids, steps=7):
    from captum.attr import LayerIntegratedGradients

    # As published: all parameters frozen except the down_proj weights.
    for p in model.parameters():
        p.requires_grad_(False)
    for layer in model.model.layers:
        layer.mlp.down_proj.weight.requires_grad_(True)
    attention_mask = torch.ones_like(input_ids)
    with torch.no_grad():
        label = int(model(input_ids, attention_mask=attention_mask).logits[0, -1].argmax())

    def forward_func(ids, mask):
        hidden = model.model(ids, mask).last_hidden_state[:, -1, :]
        return torch.softmax(model.lm_head(hidden), dim=-1)[:, label]

    out = []
    for layer in model.model.layers:
        lig = LayerIntegratedGradients(forward_func, layer.mlp.down_proj)
        attributions = lig.attribute(
            inputs=input_ids,
            baselines=torch.zeros_like(input_ids),
            additional_forward_args=(attention_mask,),
            n_steps=steps,
            method="riemann_right",
            attribute_to_layer_input=False,
        )
        out.append(attributions[0, -1].detach())
    for p in model.parameters():
        p.requires_grad_(False)
    return torch.stack(out)


def seconds_per_sample(fn, prompts) -> float:
    fn(prompts[0][:, :16])  # warm-up on a short prompt
    start = time.perf_counter()
    for ids in prompts:
        fn(ids)
    return (time.perf_counter() - start) / len(prompts)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--lengths", type=int, nargs="+", default=[128, 256, 512])
    parser.add_argument("--samples", type=int, default=1, help="prompts per cell")
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--threads", type=int, default=1, help="1 avoids thread thrash on a shared machine")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model = build_model(args.vocab)
    g = torch.Generator().manual_seed(0)
    rows = []
    for length in args.lengths:
        prompts = [torch.randint(3, args.vocab, (1, length), generator=g) for _ in range(args.samples)]
        captum = seconds_per_sample(lambda ids: captum_per_layer(model, ids), prompts)
        sequence = seconds_per_sample(lambda ids: attribute(model, ids, scope="sequence"), prompts)
        target = seconds_per_sample(lambda ids: attribute(model, ids, scope="target"), prompts)
        rows.append((length, captum, sequence, target))
        print(f"done length {length}", flush=True)
    print(f"\nRandom Qwen2, 16 layers, hidden 256, intermediate 1024, vocab {args.vocab}; steps 7; "
          f"{args.samples} sample(s) per cell; torch threads {args.threads}; CPU.\n")
    print("| seq len | Captum per-layer LIG (s/sample) | scope=sequence (s/sample) | scope=target (s/sample) "
          "| sequence speed-up | target speed-up |")
    print("|---:|---:|---:|---:|---:|---:|")
    for length, captum, sequence, target in rows:
        print(f"| {length} | {captum:.2f} | {sequence:.2f} | {target:.3f} | {captum / sequence:.1f}x | {captum / target:.0f}x |")


if __name__ == "__main__":
    main()
