"""Size of a LoKI adapter (export.format=adapter) against the full export (export.format=full) at q = 10 %.

    python benchmarks/bench_adapter.py [--q 0.1]

The toy is measured: its shipped weights are exported both ways into a temporary dir (fp32 as shipped,
and cast to bf16) and the files' sizes read. The real models are computed from their shapes: the full
export is every parameter of the model built on the meta device from its config (so tied embeddings count
once and Qwen2's q/k/v biases are included), the adapter is k = floor(q * D) rows of F values plus one
int64 position per row, per layer (safetensors' few-hundred-byte header aside). Nothing is downloaded.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]

# Shapes as the hub configs give them (heads and KV heads set the attention sizes; vocab the embeddings).
MODELS = {
    "SmolLM2-135M": dict(model_type="llama", num_hidden_layers=30, hidden_size=576, intermediate_size=1536, vocab_size=49152,
                         num_attention_heads=9, num_key_value_heads=3, tie_word_embeddings=True),
    "Qwen2.5-0.5B": dict(model_type="qwen2", num_hidden_layers=24, hidden_size=896, intermediate_size=4864, vocab_size=151936,
                         num_attention_heads=14, num_key_value_heads=2, tie_word_embeddings=True),
    "Llama-3.1-8B": dict(model_type="llama", num_hidden_layers=32, hidden_size=4096, intermediate_size=14336, vocab_size=128256,
                         num_attention_heads=32, num_key_value_heads=8, tie_word_embeddings=False),
}
DTYPES = {"bf16": (torch.bfloat16, 2), "fp32": (torch.float32, 4)}


def full_parameters(shape: dict) -> int:
    from transformers import AutoConfig, AutoModelForCausalLM

    fields = dict(shape)
    config = AutoConfig.for_model(fields.pop("model_type"), **fields)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return sum(p.numel() for p in model.parameters())  # shared (tied) tensors are yielded once


def measured_toy(q: float) -> dict[str, tuple[int, int, int, int]]:
    """{dtype: (adapter bytes, full bytes, trained rows' values, all parameters)} of the toy, from files."""
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    from loki.arch import dims

    hf_logging.disable_progress_bar()
    from loki.implant import export_model, save_adapter

    out = {}
    for label, (dtype, _) in DTYPES.items():
        model = AutoModelForCausalLM.from_pretrained(ROOT / "loki" / "toy" / "reference", dtype=dtype)
        shape = dims(model)
        k = int(q * shape.hidden_size)
        positions = [list(range(k))] * shape.num_layers  # the size depends on k only, not on which rows
        with tempfile.TemporaryDirectory() as tmp:
            full = export_model(model, None, Path(tmp) / "model")
            adapter = save_adapter(model, positions, Path(tmp) / "adapter", base_name="toy")
            full_bytes = sum(f.stat().st_size for f in full.glob("*.safetensors"))
            out[label] = (adapter.stat().st_size, full_bytes, shape.num_layers * k * shape.intermediate_size,
                          sum(p.numel() for p in model.parameters()))
    return out


def human(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1000
    return f"{n:.1f} GB"


def main() -> None:
    from loki.implant.adapter import adapter_bytes

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--q", type=float, default=0.1, help="fraction of rows per layer (layer-balanced)")
    q = parser.parse_args().q
    rows = []
    for label, (adapter, full, trained, total) in measured_toy(q).items():
        rows.append(("toy (measured)", label, trained, total, adapter, full))
    for name, shape in MODELS.items():
        total = full_parameters(shape)
        k = int(q * shape["hidden_size"])
        trained = shape["num_hidden_layers"] * k * shape["intermediate_size"]
        for label, (_, width) in DTYPES.items():
            rows.append((f"{name} (shapes)", label, trained, total, adapter_bytes(shape["num_hidden_layers"], shape["hidden_size"],
                                                                              shape["intermediate_size"], q, width), total * width))
    print(f"LoKI adapter vs full export at q = {q:g} (layer-balanced, k = floor(q*D) rows per layer)")
    header = ("model", "dtype", "trained values", "all parameters", "adapter", "full export", "adapter/full")
    print("| " + " | ".join(header) + " |")
    print("|" + "|".join("---" for _ in header) + "|")
    for name, label, trained, total, adapter, full in rows:
        print(f"| {name} | {label} | {trained:,} | {total:,} | {human(adapter)} | {human(full)} | {100 * adapter / full:.2f} % |")


if __name__ == "__main__":
    main()
