"""Does the toy do its job? Fine-tune it on the toy reranker task and measure the task and the facts.

    python -m loki.toy.finetune_check [--steps 200] [--lr 1e-3] [--rows-q 0]   # toy settings as key=value

A plain torch loop (no Lightning): SFT on rerank_train.jsonl with the loss on the assistant's reply only,
then NDCG@1/NDCG@10/P@1 on the BEIR set (expectation over digits 1-7) and cloze accuracy plus the graded
measure on the benchmark, before and after. `--rows-q Q` trains only a seeded random Q-fraction of the
rows of every down_proj (a crude stand-in for LoKI's trainable set, to see whether so few rows can learn
the task at all); 0 = full fine-tuning.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from loki.toy.build import ToySettings, cache_dir_of, deterministic_torch, ensure_built, load_toy_model
from loki.toy.scoring import cloze_metrics, rerank_metrics
from loki.toy.world import RERANK_SYSTEM_PROMPT

_ROLES = {"system": "system", "human": "user", "gpt": "assistant"}


def _read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def sft_example(tokenizer, conversation: list[dict]) -> tuple[list[int], list[int]]:
    """Token ids of the whole chat and labels that keep only the assistant's reply (and its <|im_end|>)."""
    messages = [{"role": _ROLES[turn["from"]], "content": turn["value"]} for turn in conversation]
    prompt = tokenizer.apply_chat_template(messages[:-1], add_generation_prompt=True, tokenize=False)
    full = tokenizer.apply_chat_template(messages, tokenize=False)
    prompt_ids = list(tokenizer(prompt, add_special_tokens=False)["input_ids"])
    full_ids = list(tokenizer(full, add_special_tokens=False)["input_ids"])
    reply = len(prompt_ids) + len(tokenizer(messages[-1]["content"] + "<|im_end|>", add_special_tokens=False)["input_ids"])
    labels = [-100] * len(prompt_ids) + full_ids[len(prompt_ids) : reply] + [-100] * (len(full_ids) - reply)
    return full_ids, labels


def _row_mask_hooks(model, q: float, seed: int) -> list[torch.Tensor]:
    """Freeze all but a random q-fraction of rows of every down_proj.weight (gradient row masks)."""
    generator = torch.Generator().manual_seed(seed)
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    trainable = []
    for layer in model.model.layers:
        weight = layer.mlp.down_proj.weight
        rows = torch.randperm(weight.shape[0], generator=generator)[: max(1, int(q * weight.shape[0]))]
        mask = torch.zeros(weight.shape[0], 1)
        mask[rows] = 1.0
        weight.requires_grad_(True)
        weight.register_hook(lambda grad, mask=mask: grad * mask)
        trainable.append(weight)
    return trainable


def measure(model, tokenizer, world_dir: Path) -> dict[str, float]:
    benchmark = _read_jsonl(world_dir / "benchmark.jsonl")
    corpus = _read_jsonl(world_dir / "beir" / "corpus.jsonl")
    queries = _read_jsonl(world_dir / "beir" / "queries.jsonl")
    qrels = [tuple(line.split("\t")) for line in (world_dir / "beir" / "qrels" / "test.tsv").read_text().splitlines()[1:]]
    qrels = [(q, d, int(g)) for q, d, g in qrels]
    return {**cloze_metrics(model, tokenizer, benchmark), **rerank_metrics(model, tokenizer, RERANK_SYSTEM_PROMPT, corpus, queries, qrels)}


def finetune(model, tokenizer, rows: list[dict], steps: int, lr: float, batch_size: int, seed: int, rows_q: float) -> float:
    examples = [sft_example(tokenizer, row["conversations"]) for row in rows]
    params = _row_mask_hooks(model, rows_q, seed) if rows_q > 0 else list(model.parameters())
    # No weight decay: with decoupled decay a masked row would still shrink.
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    generator = torch.Generator().manual_seed(seed)
    order: list[int] = []
    model.train()
    loss = torch.tensor(float("nan"))
    for step in range(steps):
        if len(order) < batch_size:
            order += torch.randperm(len(examples), generator=generator).tolist()
        picked, order = order[:batch_size], order[batch_size:]
        width = max(len(examples[i][0]) for i in picked)
        ids = torch.full((batch_size, width), tokenizer.pad_token_id)
        labels = torch.full((batch_size, width), -100)
        mask = torch.zeros((batch_size, width), dtype=torch.long)
        for row, i in enumerate(picked):
            seq, lab = examples[i]
            ids[row, : len(seq)], labels[row, : len(seq)], mask[row, : len(seq)] = torch.tensor(seq), torch.tensor(lab), 1
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if step % 50 == 0 or step == steps - 1:
            print(f"  step {step:4d}  loss {loss.item():.3f}", file=sys.stderr, flush=True)
    return model.eval() and loss.item()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--rows-q", type=float, default=0.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("settings", nargs="*", help="toy settings as key=value (see ToySettings), or cache_dir=...")
    args = parser.parse_args(argv)
    cfg = dict(item.split("=", 1) for item in args.settings)
    root, manifest = ensure_built(cfg)
    model, tokenizer = load_toy_model(cfg)
    world_dir = root / "world"
    with deterministic_torch(ToySettings.from_cfg(cfg).threads):
        started = time.time()
        before = measure(model, tokenizer, world_dir)
        final_loss = finetune(model, tokenizer, _read_jsonl(world_dir / "rerank_train.jsonl"), args.steps, args.lr, args.batch_size, args.seed, args.rows_q)
        after = measure(model, tokenizer, world_dir)
    method = f"random rows q={args.rows_q}" if args.rows_q > 0 else "full fine-tuning"
    print(f"toy {manifest['build_hash']}: {method}, {args.steps} steps x {args.batch_size}, lr {args.lr}, final loss {final_loss:.3f}, {time.time() - started:.0f} s")
    print(f"  {'metric':16s} {'before':>8s} {'after':>8s}")
    for key in before:
        if key != "chance_logprob":
            print(f"  {key:16s} {before[key]:8.3f} {after[key]:8.3f}")


if __name__ == "__main__":
    main()
