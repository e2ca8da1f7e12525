"""Re-evaluate an exported run: `python -m loki.evaluate run_dir=<run dir> [+key=value ...]` (a Hydra app).

Loads `<run_dir>/model` (a plain Hugging Face checkpoint) and the run's saved config (`<run_dir>/config.yaml`,
resolved, which train.py writes wherever paths.output_dir points; else Hydra's `<run_dir>/.hydra/config.yaml`
of older runs), applies `+key=value` overrides to that saved config (leaves only, e.g.
`+eval.benchmarks.mmlu.max_samples=100` or `+task.eval.path=/data/scifact`; config groups cannot be
swapped here), reruns the task and the
retention evaluation, recomputes the forgetting score against the `retention.before` stored in
`<run_dir>/metrics.json`, rewrites that file and prints the table. `device=cpu|cuda` picks the device.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf

from loki.errors import LokiError
from loki import schema

schema.register()  # the typed group schemas (paths/_schema ...), in Hydra's ConfigStore before the config is composed


def run_config_file(run_dir: Path) -> Path:
    """The config a run dir was trained with: its own resolved config.yaml, else Hydra's .hydra/config.yaml."""
    for candidate in (run_dir / "config.yaml", run_dir / ".hydra" / "config.yaml"):
        if candidate.is_file():
            return candidate
    raise LokiError(
        f"run dir '{run_dir}' has no config.yaml (train.py's resolved config) and has no .hydra/config.yaml (older runs); "
        "pass run_dir=<a train.py run dir>."
    )


def evaluate_run(run_dir: str | Path, overrides: list[str] | dict | None = None, device: str | None = None) -> dict:
    """Re-evaluate `run_dir`; `overrides`: a dotlist (["a.b=1"]) or a nested dict merged onto its saved config."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from loki.eval import format_report, forgetting_report, run_retention, run_task_eval

    run_dir = Path(run_dir)
    config_file, model_dir = run_config_file(run_dir), run_dir / "model"
    if not model_dir.is_dir():
        raise LokiError(f"run dir '{run_dir}' has no exported model/ (was it trained with export=false?).")
    cfg = OmegaConf.load(config_file)
    if overrides:
        patch = OmegaConf.create(overrides) if isinstance(overrides, dict) else OmegaConf.from_dotlist(list(overrides))
        cfg = OmegaConf.merge(cfg, patch)
    # A .hydra/config.yaml still holds ${hydra:...} interpolations; only the task and eval sections are needed.
    task_eval = cfg.task.get("eval") if "task" in cfg else None
    retention_cfg = cfg.get("eval")

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    model.to(device).eval()

    metrics_file = run_dir / "metrics.json"
    metrics = json.loads(metrics_file.read_text()) if metrics_file.is_file() else {}
    if task_eval is not None:
        metrics["task_metrics"] = run_task_eval(model, tokenizer, task_eval)
    if retention_cfg is not None and retention_cfg.get("benchmarks"):
        # The base model's distributions (for the KL measures) sit beside train.py's retention cache, keyed
        # by the run's model and eval settings; without them the KL measures are skipped with a warning.
        from loki.eval import reference_ready
        from loki.recipe import _retention_cache_path

        try:
            reference = _retention_cache_path(cfg).with_suffix("")
        except Exception:  # a saved config without paths/model (older runs): no reference to compare with
            reference = None
        stage = "after" if reference is not None and reference_ready(retention_cfg, reference) else None
        after = run_retention(model, tokenizer, retention_cfg, reference_dir=reference, stage=stage)
        before = (metrics.get("retention") or {}).get("before")
        metrics["retention"] = {"before": before, "after": after}
        if before:
            metrics["forgetting"] = forgetting_report(before, after)
    metrics_file.write_text(json.dumps(metrics, indent=2, default=str))
    print(format_report(metrics))
    print(f"metrics: {metrics_file}")
    return metrics


# Keys of conf/evaluate.yaml itself; every other top-level key overrides the run's saved config.
_OWN_KEYS = ("run_dir", "device", "task_name", "paths", "hydra")


@hydra.main(version_base="1.3", config_path="../conf", config_name="evaluate")
def main(cfg: DictConfig) -> None:
    own = set(_OWN_KEYS)
    extra = {key: value for key, value in OmegaConf.to_container(cfg, resolve=False).items() if key not in own}
    try:
        evaluate_run(cfg.run_dir, extra, cfg.device)
    except LokiError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
