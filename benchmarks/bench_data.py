"""Chat SFT data loading at scale: conversations per second and peak memory, old loader vs the cached one.

    python benchmarks/bench_data.py [--rows 100000] [--old-rows N] [--num-proc 1] [--max-length 1024]

Writes a parquet file in the LB reranker schema (ShareGPT `conversations`: the 1-7 relatedness system
prompt, a `<<<Query>>>\\n{query}\\n\\n<<<Context>>>\\n{text}` user turn, a one-digit answer; plus 15 unused
columns, as the hub file has) into a temporary directory, and a small byte-level BPE tokenizer trained on a
sample of it (`loki.tokenizer.build_chat_tokenizer`). Each measurement runs in a fresh subprocess with its
own Hugging Face datasets cache, and reads its peak resident memory (ru_maxrss):

- old: the loader as it was before the token cache (a copy of that code path is kept below): every
  column decoded row by row, one tokenizer call per segment, Python lists held in memory, on every rank;
- new, cold: `prepare_data()` (parquet read with column pruning, batched `Dataset.map`, Arrow cache) then
  `setup()`;
- new, warm: a second data module with the same settings: `setup()` only, reading the cache (what every
  other rank, later run and sweep job does);
- imports only: the interpreter with torch/datasets/transformers loaded, the memory floor under all three.

The old loader's examples are checked equal to the new one's (no row in this data is over max_length).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SYSTEM = (
    "Given a query and a piece of text, output a score of 1-7 based on how related the query is to the text. "
    "1 means least related and 7 is most related."
)
WORDS = (
    "honey bee nectar water boils degrees river bank loan interest climate carbon ocean current protein cell "
    "membrane engine torque battery lithium court appeal verdict orbit planet moon galaxy recipe flour oven "
    "yeast market price inflation rate vaccine immune virus soil crop harvest train station bridge steel "
    "language grammar verb poem novel author museum painting guitar chord rhythm league goal referee"
).split()


# --------------------------------------------------------------------------------- the data and tokenizer


def make_rows(n: int, seed: int = 0):
    rng = random.Random(seed)
    for i in range(n):
        query = " ".join(rng.choices(WORDS, k=rng.randint(3, 10)))
        text = " ".join(rng.choices(WORDS, k=rng.randint(30, 150))) + "."
        score = rng.randint(1, 7)
        yield {
            "conversations": [
                {"from": "system", "value": SYSTEM},
                {"from": "human", "value": f"<<<Query>>>\n{query}\n\n<<<Context>>>\n{text}"},
                {"from": "gpt", "value": str(score)},
            ],
            # 15 columns the loader never uses
            "query": query,
            "text": text,
            "query_id": f"q{i // 20}",
            "doc_id": f"d{i}",
            "dataset_name": rng.choice(["msmarco", "nq", "hotpotqa", "fiqa"]),
            "language": "en",
            "score": float(score),
            "raw_score": rng.random(),
            "teacher_logits": [rng.random() for _ in range(7)],
            "rank": rng.randint(0, 100),
            "is_positive": score >= 5,
            "split_name": "train",
            "text_len": len(text),
            "source_url": f"https://example.org/doc/{i}",
            "notes": "",
        }


def write_data(directory: Path, n: int) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    file = directory / "lb_reranker.parquet"
    writer, batch = None, []
    for row in make_rows(n):
        batch.append(row)
        if len(batch) == 10_000:
            table = pa.Table.from_pylist(batch)
            writer = writer or pq.ParquetWriter(file, table.schema)
            writer.write_table(table)
            batch = []
    if batch:
        table = pa.Table.from_pylist(batch)
        writer = writer or pq.ParquetWriter(file, table.schema)
        writer.write_table(table)
    writer.close()
    return file


def write_tokenizer(directory: Path) -> Path:
    from loki.tokenizer import build_chat_tokenizer

    sample = [r["conversations"][1]["value"] for r in make_rows(2000, seed=1)] + [SYSTEM]
    tokenizer = build_chat_tokenizer(sample, vocab_size=1000)
    tokenizer.save_pretrained(directory / "tokenizer")
    return directory / "tokenizer"


# ------------------------------------------------------------------------------ the old loader (a copy)


def old_load(tokenizer, file: Path, max_length: int):
    """The loader before the token cache, as it was: load_dataset with every column, then one Python loop
    over decoded rows (to_messages, template prefixes, one tokenizer call per segment)."""
    from datasets import load_dataset

    from loki.data.chat import DEFAULT_ROLE_MAP, IGNORE_INDEX

    def render(messages, generation_prompt):
        if not messages and not generation_prompt:
            return ""
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)

    def segments_of(messages):
        full = render(messages, False)
        eos = tokenizer.eos_token
        segments, cursor = [], 0
        for i, message in enumerate(messages):
            if message["role"] != "assistant":
                continue
            start_text = render(messages[:i], True)
            through_text = render(messages[: i + 1], False)
            turn = through_text[len(start_text) :]
            content_at = turn.find(message["content"]) if message["content"] else 0
            content_end = (content_at if content_at >= 0 else 0) + len(message["content"])
            eos_at = turn.find(eos, content_end) if eos else -1
            end = len(start_text) + (eos_at + len(eos) if eos_at >= 0 else len(turn))
            segments.append((full[cursor : len(start_text)], False))
            segments.append((full[len(start_text) : end], True))
            cursor = end
        segments.append((full[cursor:], False))
        return [(text, trained) for text, trained in segments if text]

    dataset = load_dataset("parquet", data_files={"train": str(file)}, split="train")
    examples, stats = [], {"rows": 0, "kept": 0, "skipped_no_assistant": 0, "skipped_truncated": 0}
    for row in dataset:
        stats["rows"] += 1
        messages = [{"role": DEFAULT_ROLE_MAP[t["from"]], "content": str(t["value"] or "")} for t in row["conversations"]]
        if not any(m["role"] == "assistant" for m in messages):
            stats["skipped_no_assistant"] += 1
            continue
        input_ids, labels = [], []
        for text, trained in segments_of(messages):
            ids = tokenizer(text, add_special_tokens=False)["input_ids"]
            input_ids.extend(ids)
            labels.extend(ids if trained else [IGNORE_INDEX] * len(ids))
        input_ids, labels = input_ids[:max_length], labels[:max_length]
        if all(label == IGNORE_INDEX for label in labels):
            stats["skipped_truncated"] += 1
            continue
        stats["kept"] += 1
        examples.append({"input_ids": input_ids, "labels": labels})
    return examples, stats


# ------------------------------------------------------------------------------------- measurements


def child(args) -> None:
    os.environ["HF_DATASETS_CACHE"] = str(Path(args.work) / f"hf-{args.child}")
    import datasets
    from transformers import AutoTokenizer

    from loki.data.chat import ChatSFTDataModule

    datasets.disable_progress_bars()
    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer)
    file = Path(args.data)
    result: dict = {}
    start = time.perf_counter()
    if args.child == "old":
        from datasets import load_dataset

        if args.rows_limit:  # a stated subset: the first N rows, written to their own file
            import pyarrow.parquet as pq

            subset = Path(args.work) / f"old_subset_{args.rows_limit}.parquet"
            if not subset.exists():
                pq.write_table(pq.read_table(file).slice(0, args.rows_limit), subset)
            file = subset
            start = time.perf_counter()
        examples, stats = old_load(tokenizer, file, args.max_length)
        result["rows"] = stats["rows"]
        result["sample"] = [examples[i]["input_ids"] for i in (0, len(examples) // 2, len(examples) - 1)]
        result["sample_index"] = [0, len(examples) // 2, len(examples) - 1]
    elif args.child in ("cold", "warm"):
        dm = ChatSFTDataModule(
            tokenizer, path=str(file), max_length=args.max_length, cache_dir=str(Path(args.work) / "cache"), num_proc=args.num_proc
        )
        if args.child == "cold":
            dm.prepare_data()
        dm.setup()
        result["rows"] = dm.stats["train"]["rows"]
        result["stats"] = dm.stats["train"]
        n = len(dm.train_examples)
        result["sample"] = [dm.train_examples[i]["input_ids"] for i in (0, n // 2, n - 1)]
        result["sample_index"] = [0, n // 2, n - 1]
        batch = next(iter(dm.train_dataloader()))
        result["first_batch"] = list(batch["input_ids"].shape)
    else:  # imports only
        import lightning  # noqa: F401
        import torch  # noqa: F401

        result["rows"] = 0
    result["seconds"] = time.perf_counter() - start
    result["peak_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB
    print(json.dumps(result))


def measure(kind: str, args, rows_limit: int = 0) -> dict:
    command = [
        sys.executable, __file__, "--child", kind, "--work", args.work, "--data", args.data, "--tokenizer", args.tokenizer,
        "--max-length", str(args.max_length), "--num-proc", str(args.num_proc), "--rows-limit", str(rows_limit),
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "HF_DATASETS_OFFLINE": "1"}
    out = subprocess.run(command, check=True, capture_output=True, text=True, cwd=REPO, env=env)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--child", choices=["old", "cold", "warm", "imports"])
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--old-rows", type=int, default=0, help="measure the old loader on the first N rows only (0: all)")
    parser.add_argument("--num-proc", type=int, default=1)
    parser.add_argument("--max-length", type=int, default=1024)
    parser.add_argument("--rows-limit", type=int, default=0)
    parser.add_argument("--work", default="")
    parser.add_argument("--data", default="")
    parser.add_argument("--tokenizer", default="")
    args = parser.parse_args()
    if args.child:
        return child(args)

    with tempfile.TemporaryDirectory(prefix="bench_data_") as work:
        args.work = work
        t = time.perf_counter()
        args.data = str(write_data(Path(work), args.rows))
        args.tokenizer = str(write_tokenizer(Path(work)))
        size = Path(args.data).stat().st_size / 2**20
        print(f"data: {args.rows} rows, {size:.1f} MiB parquet, 18 columns ({time.perf_counter() - t:.1f} s to write)")
        results = {
            "imports only": measure("imports", args),
            "old loader": measure("old", args, rows_limit=args.old_rows),
            f"new, cold (prepare_data + setup, num_proc={args.num_proc})": measure("cold", args),
            "new, warm (setup from the cache)": measure("warm", args),
        }
    old = results["old loader"]
    cold = results[next(k for k in results if k.startswith("new, cold"))]
    warm = results["new, warm (setup from the cache)"]
    for new in (cold, warm):  # same tokens for the same rows (no row here is over max_length)
        if old["rows"] == new["rows"]:
            assert new["sample"] == old["sample"], "old and new loaders disagree"
    print(f"new stats: {json.dumps(cold['stats'])}; first batch {cold['first_batch']}")
    old_rate = old["rows"] / old["seconds"]
    floor = results["imports only"]["peak_mib"]
    header = (
        f"| {'loader':<52} | {'rows':>7} | {'seconds':>8} | {'conv/s':>9} | {'x old':>7} | {'peak RSS MiB':>12} "
        f"| {'above imports':>13} | {'x old':>6} |"
    )
    print(header)
    print("|" + "|".join("-" * (len(c)) for c in header.split("|")[1:-1]) + "|")
    for name, r in results.items():
        if not r["rows"]:
            print(f"| {name:<52} | {'-':>7} | {'-':>8} | {'-':>9} | {'-':>7} | {r['peak_mib']:>12.0f} | {0:>13.0f} | {'-':>6} |")
            continue
        rate = r["rows"] / r["seconds"]
        above, old_above = r["peak_mib"] - floor, old["peak_mib"] - floor
        print(
            f"| {name:<52} | {r['rows']:>7} | {r['seconds']:>8.2f} | {rate:>9.0f} | {rate / old_rate:>7.1f} | "
            f"{r['peak_mib']:>12.0f} | {above:>13.0f} | {above / old_above:>6.2f} |"
        )

if __name__ == "__main__":
    main()
