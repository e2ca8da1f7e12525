"""Step time and peak memory of LoKI implanting against full fine-tuning and LoRA, side by side, on CPU.

    python benchmarks/bench_implant.py [--threads 2] [--steps 5] [--warmup 2] [--batch 2] [--seq 256]

Each method runs in a fresh subprocess so that its peak resident memory (getrusage ru_maxrss) is its own;
the parent prints one markdown table. The model is a random Qwen2 (8 layers, hidden 512, intermediate
2048, vocab 1000); positions are random with k = floor(0.1 * 512) rows per layer (which rows does not
change the cost). Timings on a shared machine are noisy: compare within one run, not across runs.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
METHODS = ["full", "peft_lora", "loki_hook", "loki_rows", "loki_lora"]
LABELS = {
    "full": "full fine-tuning",
    "peft_lora": "peft LoRA r=16, all linear",
    "loki_hook": "LoKI q=0.1 impl=hook",
    "loki_rows": "LoKI q=0.1 impl=rows",
    "loki_lora": "LoKI q=0.1 + LoRA r=16",
}


def build_model(seed: int = 0):
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(
        "qwen2", vocab_size=1000, hidden_size=512, intermediate_size=2048, num_hidden_layers=8,
        num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=1024,
    )
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config, dtype=torch.float32)


def measure(method: str, args) -> dict:
    """Runs in the child process: set up `method`, train, report its numbers."""
    import torch

    sys.path.insert(0, REPO)
    from loki.implant import attach_optimizer, install

    torch.set_num_threads(args.threads)
    model = build_model()
    total = sum(p.numel() for p in model.parameters())
    rss_model_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    effective = None
    if method == "full":
        handle = None
    elif method == "peft_lora":
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear"))
        handle = None
    else:
        g = torch.Generator().manual_seed(0)
        k = int(0.1 * 512)
        positions = [torch.randperm(512, generator=g)[:k].tolist() for _ in range(8)]
        impl = "hook" if method == "loki_hook" else "rows"
        handle = install(model, positions, impl, lora_rank=16 if method == "loki_lora" else 0, lora_alpha=32)
        effective = handle.summary()["trainable_effective"]
    trainable = [p for p in model.parameters() if p.requires_grad]
    allocated = sum(p.numel() for p in trainable)
    optimizer = torch.optim.AdamW(trainable, lr=1e-4, weight_decay=0.1)
    if handle is not None:
        attach_optimizer(handle, optimizer)
    model.train()
    ids = torch.randint(0, 1000, (args.batch, args.seq), generator=torch.Generator().manual_seed(1))
    times = []
    for step in range(args.warmup + args.steps):
        start = time.perf_counter()
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if step >= args.warmup:
            times.append(time.perf_counter() - start)
    state_bytes = sum(t.numel() * t.element_size() for s in optimizer.state.values() for t in s.values() if torch.is_tensor(t) and t.dim() > 0)
    peak_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {
        "method": method,
        "step_s": statistics.median(times),
        "step_s_min": min(times),
        "peak_rss_mb": peak_kb / 1024,
        "train_rss_mb": (peak_kb - rss_model_kb) / 1024,  # peak above what building the model took
        "total_params": total,
        "trainable_allocated": allocated,
        "trainable_effective": effective if effective is not None else allocated,
        "optimizer_state_mb": state_bytes / 2**20,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(measure(args.child, args)))
        return

    results = []
    for method in args.methods.split(","):
        command = [sys.executable, os.path.abspath(__file__), "--child", method] + [
            f"--{name}={getattr(args, name)}" for name in ("threads", "steps", "warmup", "batch", "seq")
        ]
        out = subprocess.run(command, capture_output=True, text=True, check=True, env={**os.environ, "PYTHONPATH": REPO})
        results.append(json.loads(out.stdout.strip().splitlines()[-1]))
        print(f"measured {method}", file=sys.stderr)

    ref = next((r for r in results if r["method"] == "full"), results[0])
    print(
        f"CPU, {args.threads} threads, batch {args.batch} x seq {args.seq}, median of {args.steps} steps after "
        f"{args.warmup} warm-up; Qwen2 8 layers, hidden 512, intermediate 2048, vocab 1000 "
        f"({ref['total_params'] / 1e6:.1f} M params); ratios are to full fine-tuning.\n"
    )
    print("| method | step (s) | x full | peak RSS (MB) | x full | RSS above model (MB) | x full | trainable allocated | trainable effective | optimizer state (MB) |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in results:
        print(
            f"| {LABELS[r['method']]} | {r['step_s']:.3f} | {r['step_s'] / ref['step_s']:.2f} | {r['peak_rss_mb']:.0f} | "
            f"{r['peak_rss_mb'] / ref['peak_rss_mb']:.2f} | {r['train_rss_mb']:.0f} | {r['train_rss_mb'] / ref['train_rss_mb']:.2f} | "
            f"{r['trainable_allocated']:,} | {r['trainable_effective']:,} | {r['optimizer_state_mb']:.1f} |"
        )


if __name__ == "__main__":
    main()
