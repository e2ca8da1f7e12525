"""The day a GPU is lent: one script that asserts what only a GPU can show and measures what matters there.

    python benchmarks/gpu_check.py             # one CUDA GPU, at most ~8 minutes
    python benchmarks/gpu_check.py --dry-run   # the same code on the CPU with a tiny model (seconds)

Checks (a failed one prints FAIL and the script exits with status 1):
- frozen rows: under Lightning `bf16-mixed` on CUDA, after a few AdamW steps with weight decay, every
  unselected row and every other parameter is bit-identical to the base, for impl=hook, impl=rows and
  LoKI+LoRA; the selected rows moved (docs/method.md, Invariants 1);
- evaluation on the device: train.py's `eval_device` picks cuda:LOCAL_RANK, `to_eval_device` moves a model
  that Lightning's teardown left on the CPU back there, and the retention evaluators run their output
  head there (on a tensor no larger than the positions read);
- fp32 master rows: `LokiDownProj.rows` is float32 when the model's weights are bfloat16.
Measurements:
- KVA seconds per sample on a Qwen2.5-0.5B-shaped random model (24 layers, D=896, F=4864, vocab 151,936)
  for each recipe in `loki.kva.RECIPES` (and Captum's per-layer LayerIntegratedGradients, the authors'
  way, when captum is installed), beside the paper's 9.69 s/sample for Llama-3.1-8B on an RTX 4090;
- training step time and peak memory for LoKI rows, LoKI hook, peft LoRA r16 and full fine-tuning on
  that model (bf16 autocast, AdamW).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

PAPER_KVA_SECONDS = 9.69  # per sample, Llama-3.1-8B on one RTX 4090 (the paper's appendix)
QWEN05B = dict(layers=24, hidden=896, intermediate=4864, vocab=151936, heads=14, kv_heads=2)
TINY = dict(layers=2, hidden=32, intermediate=64, vocab=259, heads=4, kv_heads=2)

rows: list[tuple[str, str, str]] = []  # (check, value, PASS / FAIL / info)


def record(check: str, value: str, ok: bool | None = None) -> None:
    status = "info" if ok is None else ("PASS" if ok else "FAIL")
    rows.append((check, value, status))
    print(f"[{status}] {check}: {value}", flush=True)


def build_model(shape: dict, device, dtype=torch.float32, seed: int = 0, layers: int | None = None):
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(
        "qwen2",
        vocab_size=shape["vocab"],
        hidden_size=shape["hidden"],
        intermediate_size=shape["intermediate"],
        num_hidden_layers=layers or shape["layers"],
        num_attention_heads=shape["heads"],
        num_key_value_heads=shape["kv_heads"],
        max_position_embeddings=2048,
        tie_word_embeddings=True,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    return model.to(device)


def positions_for(model, q: float = 0.1, seed: int = 0) -> list[list[int]]:
    from loki.arch import dims

    d = dims(model)
    k = max(1, int(q * d.hidden_size))
    g = torch.Generator().manual_seed(seed)
    return [sorted(torch.randperm(d.hidden_size, generator=g)[:k].tolist()) for _ in range(d.num_layers)]


def sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ------------------------------------------------------------------------------------------ checks


def check_frozen_rows(shape: dict, device, seq: int, steps: int) -> None:
    """Lightning fit under bf16-mixed; frozen parameters and unselected rows bit-identical afterwards."""
    import lightning.pytorch as pl
    from torch.utils.data import DataLoader, TensorDataset

    from loki.lightning import LokiCallback

    class Module(pl.LightningModule):
        def __init__(self, model):
            super().__init__()
            self.model = model

        def training_step(self, batch, batch_idx):
            (ids,) = batch
            return self.model(input_ids=ids, labels=ids).loss

        def configure_optimizers(self):
            return torch.optim.AdamW([p for p in self.model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.1)

    g = torch.Generator().manual_seed(1)
    data = TensorDataset(torch.randint(3, shape["vocab"], (2 * steps, seq), generator=g))
    layers = min(shape["layers"], 4)  # the invariant does not depend on depth
    for mode in ("hook", "rows", "lora"):
        model = build_model(shape, torch.device("cpu"), layers=layers)
        base = {k: v.detach().clone() for k, v in model.state_dict().items()}
        positions = positions_for(model)
        rank = min(4, len(positions[0]))  # LoRA on the selected rows: rank <= k
        options = dict(impl="rows", lora_rank=rank, lora_alpha=2.0 * rank) if mode == "lora" else dict(impl=mode)
        trainer = pl.Trainer(
            accelerator="gpu" if device.type == "cuda" else "cpu", devices=1, precision="bf16-mixed", max_steps=steps,
            logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
            callbacks=[LokiCallback(positions, **options)],
        )
        trainer.fit(Module(model), DataLoader(data, batch_size=2))
        after = model.state_dict()
        frozen_ok, moved = True, 0
        for name, before in base.items():
            now = after[name].detach().cpu()
            if name.endswith("mlp.down_proj.weight"):
                layer = int(name.split(".layers.")[1].split(".")[0])
                keep = torch.ones(before.shape[0], dtype=torch.bool)
                keep[positions[layer]] = False
                frozen_ok &= torch.equal(before[keep], now[keep])
                moved += int((before[~keep] != now[~keep]).any(dim=1).sum())
            else:
                frozen_ok &= torch.equal(before, now)
        record(f"frozen rows bit-identical, bf16-mixed, {mode}", f"{steps} steps, {moved} selected rows moved", frozen_ok and moved > 0)


def check_eval_on_device(shape: dict, device) -> None:
    from omegaconf import OmegaConf

    from loki.eval.retention import next_token_logits, score_lm_loss
    from loki.recipe import Setup, eval_device, to_eval_device

    cfg = OmegaConf.create({"trainer": {"accelerator": "auto" if device.type == "cuda" else "cpu"}})
    chosen = eval_device(cfg)
    record("eval_device", str(chosen), chosen.type == device.type)
    model = build_model(shape, torch.device("cpu"), layers=2).eval()  # where Lightning's teardown leaves it
    setup = Setup(run_dir=Path("."), model=model, tokenizer=None, method="", datamodule=None, callbacks=[], logger=None, device=chosen)
    to_eval_device(setup)
    seen = []
    handle = model.lm_head.register_forward_hook(lambda m, i, o: seen.append((i[0].device.type, tuple(i[0].shape))))
    g = torch.Generator().manual_seed(2)
    seqs = [torch.randint(3, shape["vocab"], (n,), generator=g).tolist() for n in (17, 9, 33, 5)]
    next_token_logits(model, seqs, pad_id=0, batch_size=4)

    class Tok:
        pad_token_id, eos_token_id = 0, 0

    score_lm_loss(model, Tok(), seqs, batch_size=4)
    handle.remove()
    on_device = all(kind == device.type for kind, _ in seen)
    last_only = seen[0][1][0] == len(seqs)  # the letter/reranker/KL-last path: one head row per prompt
    record("evaluation on the device", f"head ran on {sorted({k for k, _ in seen})}, rows per pass {[s[0] for _, s in seen]}", on_device and last_only)


def check_fp32_master_rows(shape: dict, device) -> None:
    from loki.implant import install
    from loki.implant.layer import LokiDownProj

    model = build_model(shape, device, dtype=torch.bfloat16, layers=2)
    install(model, positions_for(model), impl="rows")
    dtypes = {m.rows.dtype for m in model.modules() if isinstance(m, LokiDownProj)}
    ok = dtypes == {torch.float32}
    record("fp32 master rows on a bf16 model", f"rows dtype {sorted(map(str, dtypes))}" + ("" if ok else " (expected torch.float32: not implemented yet?)"), ok)


# ------------------------------------------------------------------------------------ measurements


def measure_kva(shape: dict, device, seq: int, samples: int) -> None:
    from loki.kva import RECIPES, attribute

    model = build_model(shape, device).eval()
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, shape["vocab"], (1, seq), generator=g).to(device) for _ in range(samples)]

    def per_sample(fn) -> float:
        fn(prompts[0][:, :16])  # warm-up
        sync(device)
        start = time.perf_counter()
        for ids in prompts:
            fn(ids)
        sync(device)
        return (time.perf_counter() - start) / len(prompts)

    for recipe in RECIPES:
        seconds = per_sample(lambda ids, r=recipe: attribute(model, ids, recipe=r))
        record(f"KVA {recipe}, {seq} tokens", f"{seconds:.3f} s/sample (paper: {PAPER_KVA_SECONDS} s, Llama-8B, RTX 4090)")
    try:
        import captum  # noqa: F401
    except ImportError:
        record("KVA Captum per-layer LIG", "captum not installed: skipped")
        return
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from bench_kva import captum_per_layer

    seconds = per_sample(lambda ids: captum_per_layer(model, ids))
    record(f"KVA Captum per-layer LIG, {seq} tokens", f"{seconds:.3f} s/sample")


def measure_training(shape: dict, device, seq: int, batch: int, steps: int) -> None:
    from loki.implant import attach_optimizer, install

    g = torch.Generator().manual_seed(4)
    ids = torch.randint(3, shape["vocab"], (batch, seq), generator=g).to(device)
    for method in ("loki rows", "loki hook", "peft lora r16", "full"):
        model = build_model(shape, device).train()
        if method.startswith("loki"):
            handle = install(model, positions_for(model), impl=method.split()[1])
        elif method.startswith("peft"):
            from peft import LoraConfig, get_peft_model

            model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"], task_type="CAUSAL_LM"))
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5, weight_decay=0.1)
        if method.startswith("loki"):
            attach_optimizer(handle, optimizer)
        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)

        def step(model=model, optimizer=optimizer):
            optimizer.zero_grad(set_to_none=True)
            with torch.autocast(device.type, dtype=torch.bfloat16):
                loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            optimizer.step()

        step()
        sync(device)
        start = time.perf_counter()
        for _ in range(steps):
            step()
        sync(device)
        seconds = (time.perf_counter() - start) / steps
        peak = f"{torch.cuda.max_memory_allocated(device) / 2**30:.2f} GiB" if device.type == "cuda" else "n/a on CPU"
        record(f"train step, {method}, batch {batch}x{seq}", f"{seconds * 1000:.0f} ms/step, peak {peak}")
        del model, optimizer, step
        if device.type == "cuda":
            torch.cuda.empty_cache()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dry-run", action="store_true", help="CPU, tiny model: checks the script itself in seconds")
    args = parser.parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if args.dry_run:
        device, shape = torch.device("cpu"), TINY
        sizes = dict(frozen_seq=12, frozen_steps=2, kva_seq=12, kva_samples=1, train_seq=12, train_batch=2, train_steps=1)
        torch.set_num_threads(1)
    else:
        if not torch.cuda.is_available():
            print("FAIL: no CUDA device (use --dry-run on a CPU)")
            return 1
        device, shape = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))), QWEN05B
        sizes = dict(frozen_seq=128, frozen_steps=4, kva_seq=256, kva_samples=3, train_seq=512, train_batch=4, train_steps=5)
    started = time.perf_counter()
    sections = [
        ("frozen rows", lambda: check_frozen_rows(shape, device, sizes["frozen_seq"], sizes["frozen_steps"])),
        ("evaluation on the device", lambda: check_eval_on_device(shape, device)),
        ("fp32 master rows", lambda: check_fp32_master_rows(shape, device)),
        ("KVA", lambda: measure_kva(shape, device, sizes["kva_seq"], sizes["kva_samples"])),
        ("training", lambda: measure_training(shape, device, sizes["train_seq"], sizes["train_batch"], sizes["train_steps"])),
    ]
    for name, section in sections:
        try:
            section()
        except Exception as err:  # one broken section must not hide the others' results
            record(name, f"raised {type(err).__name__}: {str(err).splitlines()[0][:200] if str(err) else ''}", False)
    width = max(len(c) for c, _, _ in rows)
    print(f"\n{'device: ' + (torch.cuda.get_device_name(device) if device.type == 'cuda' else 'CPU (dry run)')}; "
          f"{time.perf_counter() - started:.0f} s in all")
    print(f"{'check':<{width}}  status  value")
    for check, value, status in rows:
        print(f"{check:<{width}}  {status:<6}  {value}")
    failed = [c for c, _, s in rows if s == "FAIL"]
    print(f"\n{len(failed)} failed" + (": " + "; ".join(failed) if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
