"""lm-evaluation-harness tasks on the in-memory model (`eval.lm_eval`; `eval=paper` runs the paper's six).

The model is wrapped as it is, on its own device, in lm-eval's `HFLM(pretrained=model, tokenizer=...)`
and scored by `lm_eval.simple_evaluate`. Every numeric metric comes back as
`retention/lm_eval/<task>/<metric>` (`<metric>` is lm-eval's `metric,filter` key with the filter appended
after an underscore unless it is "none"; standard errors are dropped), and the task's headline metric
(`eval.lm_eval.headline.<task>`, else the built-in choice below) also as `retention/lm_eval/<task>/score`.
`forgetting_report` reads `score` where a benchmark has one, so over `eval=paper` its `avg` is the paper's
Avg forgetting over TriviaQA, GSM8K, HellaSwag, WinoGrande, HumanEval and IFEval.

lm-eval is an optional extra: `pip install -e ".[paper-eval]"`. Its tasks download their datasets from
the Hugging Face hub (HumanEval also downloads the `code_eval` metric and executes generated code, which
`confirm_run_unsafe_code: true` allows); offline, point `include_path` at local task YAMLs.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from typing import Any

from loki.errors import LokiError

log = logging.getLogger(__name__)

INSTALL_HINT = 'pip install -e ".[paper-eval]"'
PAPER_TASKS = ("triviaqa", "gsm8k", "hellaswag", "winogrande", "humaneval", "ifeval")
# The headline metric of each paper task (lm-eval's "metric,filter" key), used when the config names none.
HEADLINE = {
    "triviaqa": "exact_match,remove_whitespace",
    "gsm8k": "exact_match,strict-match",
    "hellaswag": "acc_norm,none",
    "winogrande": "acc,none",
    "humaneval": "pass@1,create_test",
    "ifeval": "prompt_level_strict_acc,none",
}


def _tasks(lm_eval_cfg: Mapping[str, Any] | None) -> list[str]:
    return [str(t) for t in ((lm_eval_cfg or {}).get("tasks") or [])]


def require_lm_eval(lm_eval_cfg: Mapping[str, Any] | None) -> None:
    """LokiError (one sentence) when `eval.lm_eval.tasks` is set but lm-eval cannot be imported: call it
    with the other config checks, before any model is loaded."""
    tasks = _tasks(lm_eval_cfg)
    if not tasks:
        return
    try:
        import lm_eval  # noqa: F401
        from lm_eval.models.huggingface import HFLM  # noqa: F401
    except ImportError:
        raise LokiError(
            f"eval.lm_eval.tasks={tasks} needs lm-evaluation-harness, which is not installed: run {INSTALL_HINT} "
            "(or set eval.lm_eval.tasks=[])."
        ) from None


def flatten_results(results: Mapping[str, Mapping[str, Any]], headline: Mapping[str, str] | None = None) -> dict[str, float]:
    """lm-eval's `results` ({task: {"acc,none": x, "acc_stderr,none": s, "alias": ...}}) -> retention keys."""
    headline = {**HEADLINE, **dict(headline or {})}
    out: dict[str, float] = {}
    for task, measures in results.items():
        for key, value in measures.items():
            measure, _, filter_name = str(key).partition(",")
            if isinstance(value, (int, float)) and not isinstance(value, bool) and "stderr" not in measure:
                suffix = measure if filter_name in ("", "none") else f"{measure}_{filter_name}"
                suffix = "n" if suffix == "sample_len" else suffix  # examples scored: a count, not compared
                out[f"retention/lm_eval/{task}/{suffix}"] = float(value)
        chosen = headline.get(task)
        if chosen is not None:
            value = measures.get(chosen)
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                out[f"retention/lm_eval/{task}/score"] = float(value)
            else:
                log.warning("eval.lm_eval.headline.%s=%r is not among the task's metrics %s.", task, chosen, sorted(measures))
    return out


def run_lm_harness(model, tokenizer, lm_eval_cfg: Mapping[str, Any] | None) -> dict[str, float]:
    """The `eval.lm_eval.tasks` on the in-memory model; {} when no task is named."""
    tasks = _tasks(lm_eval_cfg)
    if not tasks:
        return {}
    require_lm_eval(lm_eval_cfg)
    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    get = lm_eval_cfg.get  # type: ignore[union-attr]
    unsafe = bool(get("confirm_run_unsafe_code", False))
    if unsafe:
        os.environ.setdefault("HF_ALLOW_CODE_EVAL", "1")  # the `code_eval` metric (HumanEval) refuses without it
    lm_kwargs: dict[str, Any] = {"batch_size": int(get("batch_size", 8))}
    if get("max_length"):
        lm_kwargs["max_length"] = int(get("max_length"))
    lm = HFLM(pretrained=model, tokenizer=tokenizer, **lm_kwargs)
    include = get("include_path")
    if include and not isinstance(include, str):
        include = [str(p) for p in include]  # a list (or an OmegaConf ListConfig) of task dirs
    task_manager = TaskManager(include_path=include or None)
    gen_kwargs = get("gen_kwargs")
    limit = get("limit")
    output = lm_eval.simple_evaluate(
        model=lm,
        tasks=tasks,
        num_fewshot=get("num_fewshot"),
        limit=float(limit) if isinstance(limit, float) else limit,
        apply_chat_template=bool(get("apply_chat_template", False)),
        fewshot_as_multiturn=bool(get("fewshot_as_multiturn", False)),
        gen_kwargs=dict(gen_kwargs) if gen_kwargs else None,
        bootstrap_iters=int(get("bootstrap_iters", 0) or 0),
        log_samples=False,
        task_manager=task_manager,
        confirm_run_unsafe_code=unsafe,
        random_seed=int(get("seed", 0) or 0),
    )
    if output is None:  # not rank 0 of a distributed lm-eval run
        return {}
    headline = get("headline")
    return flatten_results(output["results"], dict(headline) if headline else None)
