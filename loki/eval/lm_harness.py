"""lm-evaluation-harness tasks on the in-memory model (`eval.lm_eval`; `eval=paper` runs the paper's six).

The model is wrapped as it is, on its own device, in lm-eval's `HFLM(pretrained=model, tokenizer=...)`
and scored by `lm_eval.simple_evaluate`. Every numeric metric comes back as
`retention/lm_eval/<task>/<metric>` (`<metric>` is lm-eval's `metric,filter` key with the filter appended
after an underscore unless it is "none"; standard errors are dropped), and the task's headline metric
(`eval.lm_eval.headline.<task>`, else the built-in choice below) also as `retention/lm_eval/<task>/score`.
`forgetting_report` reads `score` where a benchmark has one, so over `eval=paper` its `avg` is the paper's
Avg forgetting over TriviaQA, GSM8K, HellaSwag, WinoGrande, HumanEval and IFEval.

lm-eval is an optional extra: `pip install -e ".[paper-eval]"` (lm-eval with its `hf` and `ifeval` extras).
Before any model loads, `require_lm_eval` imports lm-eval and every module the chosen tasks' own code imports
(`task_modules` reads them from the task YAMLs' `!function` modules and those files' import statements), so a
missing one (IFEval: langdetect, immutabledict, nltk) stops the run with its `pip install`.

Its tasks download their datasets from the Hugging Face hub (HumanEval also downloads the `code_eval`
metric and executes generated code, which `confirm_run_unsafe_code: true` allows; IFEval downloads nltk's
`punkt_tab` on first import); offline, point `include_path` at local task YAMLs.
"""

from __future__ import annotations

import ast
import functools
import importlib
import importlib.util
import logging
import os
import re
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from loki.errors import LokiError
from loki.schema import LmEvalConfig, build, plain

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


def lm_eval_settings(lm_eval_cfg: LmEvalConfig | Mapping[str, Any] | None) -> LmEvalConfig:
    """`eval.lm_eval` typed and checked (a mapping gets the schema's defaults: loki.schema)."""
    if isinstance(lm_eval_cfg, LmEvalConfig):
        return lm_eval_cfg
    return build(LmEvalConfig, plain(lm_eval_cfg or {}), "eval.lm_eval")


def _tasks(settings: LmEvalConfig) -> list[str]:
    return [str(t) for t in settings.tasks or []]


def require_lm_eval(lm_eval_cfg: LmEvalConfig | Mapping[str, Any] | None) -> None:
    """LokiError (one sentence) when `eval.lm_eval.tasks` is set but lm-eval, or a Python module one of the
    chosen tasks imports (IFEval: langdetect, immutabledict, nltk), cannot be imported: call it with the other
    config checks, before any model is loaded, so a missing module does not surface after training."""
    settings = lm_eval_settings(lm_eval_cfg)
    tasks = _tasks(settings)
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
    include = _include_dirs(settings.include_path)
    for task in tasks:
        for module in task_modules(task, include):
            try:
                importlib.import_module(module)
            except ImportError:
                hint = INSTALL_HINT if module in PAPER_EVAL_MODULES else f"pip install {MODULE_DISTRIBUTIONS.get(module, module)}"
                raise LokiError(
                    f"eval.lm_eval.tasks includes '{task}', whose lm-eval code imports the Python module '{module}', "
                    f"which is not installed: run {hint} (or drop '{task}' from eval.lm_eval.tasks)."
                ) from None


# What the `paper-eval` extra installs for the paper's six tasks (lm-eval's `ifeval` extra and its core
# dependencies); any other module gets `pip install <distribution>`.
PAPER_EVAL_MODULES = frozenset({"langdetect", "immutabledict", "nltk", "evaluate", "datasets", "sacrebleu", "rouge_score", "sklearn"})
MODULE_DISTRIBUTIONS = {"sklearn": "scikit-learn", "yaml": "pyyaml", "rouge_score": "rouge-score", "PIL": "pillow", "cv2": "opencv-python"}


def _include_dirs(include_path: Any) -> list[Path]:
    if not include_path:
        return []
    paths = [include_path] if isinstance(include_path, (str, os.PathLike)) else list(include_path)
    return [Path(str(p)).expanduser() for p in paths]


def _lm_eval_tasks_dir() -> Path:
    spec = importlib.util.find_spec("lm_eval")
    if spec is None or spec.origin is None:
        raise LokiError(f"lm-evaluation-harness is not installed: run {INSTALL_HINT}.")
    return Path(spec.origin).parent / "tasks"


class _FunctionRef(str):
    """A YAML `!function module.name` value: the module lies next to the YAML, or is importable."""


def _yaml_loader() -> type:
    import yaml

    class Loader(yaml.SafeLoader):
        pass

    def construct_tagged(loader, tag_suffix, node):  # !function and any other custom tag lm-eval uses
        if isinstance(node, yaml.ScalarNode):
            value = loader.construct_scalar(node)
            return _FunctionRef(value) if tag_suffix == "function" else value
        if isinstance(node, yaml.SequenceNode):
            return loader.construct_sequence(node, deep=True)
        return loader.construct_mapping(node, deep=True)

    Loader.add_multi_constructor("!", construct_tagged)
    return Loader


def _read_yaml(path: Path, loader: type) -> dict:
    import yaml

    try:
        doc = yaml.load(path.read_text(encoding="utf-8", errors="replace"), Loader=loader)  # noqa: S506 (SafeLoader subclass)
    except (yaml.YAMLError, OSError):
        return {}
    return doc if isinstance(doc, dict) else {}


def _names(value: Any) -> list[str]:
    """A YAML value that is one name or a list of names, as a list (other entries dropped)."""
    if isinstance(value, str):
        return [value]
    if isinstance(value, list):
        return [v for v in value if isinstance(v, str)]
    return []


_DEFINES = re.compile(r"^(task|group|tag):[ \t]*(.*)$", re.M)
_LIST_ITEM = re.compile(r"^[ \t]+-[ \t]*['\"]?([\w.\-]+)['\"]?[ \t]*$")


def _name_index(root: str) -> dict[str, tuple[str, ...]]:
    """name -> YAML files under `root` whose top-level task, group or tag lines mention it (one pass over
    lm-eval's ~14k task YAMLs without parsing them; the few candidates are parsed afterwards)."""
    index: dict[str, list[str]] = {}
    for path in sorted(Path(root).rglob("*.yaml")):
        try:
            text = path.read_text(encoding="utf-8", errors="replace")
        except OSError:
            continue
        lines = text.splitlines()
        for match in _DEFINES.finditer(text):
            value = match.group(2).split("#")[0].strip()
            names = re.findall(r"[\w.\-]+", value) if value and not value.startswith("!") else []
            if not value:  # a block list on the following lines
                start = text.count("\n", 0, match.start()) + 1
                for line in lines[start:]:
                    item = _LIST_ITEM.match(line)
                    if item is None:
                        break
                    names.append(item.group(1))
            for name in names:
                index.setdefault(name, []).append(str(path))
    return {name: tuple(dict.fromkeys(paths)) for name, paths in index.items()}


_installed_index = functools.lru_cache(maxsize=2)(_name_index)  # lm-eval's own tasks do not change in a process


def _find_configs(name: str, dirs: Sequence[Path], loader: type) -> list[tuple[Path, dict]]:
    """Every task YAML under `dirs` (the first: lm-eval's installed tasks) that defines `name` as a task, a
    group or a tag."""
    found = []
    for number, root in enumerate(dirs):
        index = (_installed_index if number == 0 else _name_index)(str(Path(root).resolve()))  # include dirs: read afresh
        for candidate in index.get(name, ()):
            path = Path(candidate)
            doc = _read_yaml(path, loader)
            task = doc.get("task")
            if (isinstance(task, str) and task == name) or doc.get("group") == name or name in _names(doc.get("tag")):
                found.append((path, doc))
    return found


def _function_modules(value: Any) -> list[str]:
    if isinstance(value, _FunctionRef):
        module = value.rpartition(".")[0]
        return [module] if module else []
    if isinstance(value, dict):
        return [m for v in value.values() for m in _function_modules(v)]
    if isinstance(value, list):
        return [m for v in value for m in _function_modules(v)]
    return []


def _guarded(node: Any) -> bool:
    """A `try:` whose handlers catch ImportError: the module treats that import as optional."""
    names = set()
    for handler in node.handlers:
        caught = handler.type
        for item in (caught.elts if isinstance(caught, ast.Tuple) else [caught]):
            if isinstance(item, ast.Name):
                names.add(item.id)
        if caught is None:
            names.add("Exception")
    return bool(names & {"ImportError", "ModuleNotFoundError", "Exception", "BaseException"})


def _imports(tree: ast.AST) -> list[tuple[str, int, list[str]]]:
    """(module, relative level, imported names) of every import not guarded by an ImportError handler."""
    out: list[tuple[str, int, list[str]]] = []

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.Try) and _guarded(node):
            for child in node.orelse + node.finalbody:
                visit(child)
            return
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            return
        if isinstance(node, ast.Import):
            out.extend((alias.name, 0, []) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            out.append((node.module or "", node.level, [alias.name for alias in node.names]))
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    return out


def _module_file(base: Path, dotted: str) -> Path | None:
    stem = base.joinpath(*dotted.split(".")) if dotted else base
    for candidate in (stem.with_suffix(".py") if dotted else None, stem / "__init__.py"):
        if candidate is not None and candidate.is_file():
            return candidate
    return None


def _code_modules(path: Path, package_root: Path, seen: set[Path], needed: set[str]) -> None:
    """Add to `needed` the non-standard top-level modules `path` imports, following imports of files next to
    it and of lm-eval's own task modules (lm_eval.tasks.*), which import in turn."""
    path = path.resolve()
    if path in seen:
        return
    seen.add(path)
    try:
        tree = ast.parse(path.read_text(encoding="utf-8", errors="replace"))
    except (SyntaxError, OSError):
        return
    for module, level, names in _imports(tree):
        if level:  # relative: a file of the same package
            base = path.parent
            for _ in range(level - 1):
                base = base.parent
            targets = [_module_file(base, module)] + [_module_file(base, f"{module}.{n}" if module else n) for n in names]
        elif module.split(".")[0] == "lm_eval":
            if not module.startswith("lm_eval.tasks"):
                continue  # lm-eval's core: imported already by `import lm_eval`
            rel = module[len("lm_eval.tasks"):].lstrip(".")
            targets = [_module_file(package_root, rel)] + [_module_file(package_root, f"{rel}.{n}" if rel else n) for n in names]
        else:
            sibling = _module_file(path.parent, module)
            if sibling is not None:
                targets = [sibling]
            else:
                top = module.split(".")[0]
                if top and top not in sys.stdlib_module_names and top != "__future__":
                    needed.add(top)
                continue
        for target in targets:
            if target is not None:
                _code_modules(target, package_root, seen, needed)


def task_modules(task: str, include_path: Sequence[Path] | str | None = None) -> list[str]:
    """The third-party Python modules the code of lm-eval task (or group, or tag) `task` imports: read from
    its YAML (`!function` modules, `include`d YAMLs, a group's tasks) and those modules' import statements,
    in lm-eval's installed task dirs and `include_path`. [] for a task with no code, or a name not found
    (lm-eval reports an unknown task itself)."""
    package_root = _lm_eval_tasks_dir()
    dirs = _include_dirs(include_path) if isinstance(include_path, str) else list(include_path or [])
    dirs = [package_root, *dirs]
    loader = _yaml_loader()
    needed: set[str] = set()
    seen_code: set[Path] = set()
    seen_names: set[str] = set()
    seen_yaml: set[Path] = set()

    def walk_config(path: Path, doc: dict) -> None:
        for module in _function_modules(doc):
            local = _module_file(path.parent, module)
            if local is not None:
                _code_modules(local, package_root, seen_code, needed)
            elif module.split(".")[0] not in sys.stdlib_module_names:
                needed.add(module.split(".")[0])
        for include in _names(doc.get("include")):
            included = (path.parent / include).resolve()
            if included.is_file() and included not in seen_yaml:
                seen_yaml.add(included)
                walk_config(included, _read_yaml(included, loader))
        if "group" in doc or isinstance(doc.get("task"), list):
            for member in doc.get("task") or []:
                if isinstance(member, str):
                    walk_name(member)
                elif isinstance(member, dict):
                    walk_config(path, member)
                    for name in _names(member.get("task")):
                        if not _function_modules(member) and "include" not in member:
                            walk_name(name)

    def walk_name(name: str) -> None:
        if name in seen_names:
            return
        seen_names.add(name)
        for path, doc in _find_configs(name, dirs, loader):
            seen_yaml.add(path.resolve())
            walk_config(path, doc)

    walk_name(task)
    return sorted(needed)


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


def run_lm_harness(model, tokenizer, lm_eval_cfg: LmEvalConfig | Mapping[str, Any] | None) -> dict[str, float]:
    """The `eval.lm_eval.tasks` on the in-memory model; {} when no task is named."""
    settings = lm_eval_settings(lm_eval_cfg)
    tasks = _tasks(settings)
    if not tasks:
        return {}
    require_lm_eval(settings)
    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    unsafe = bool(settings.confirm_run_unsafe_code)
    if unsafe:
        os.environ.setdefault("HF_ALLOW_CODE_EVAL", "1")  # the `code_eval` metric (HumanEval) refuses without it
    lm_kwargs: dict[str, Any] = {"batch_size": int(settings.batch_size)}
    if settings.max_length:
        lm_kwargs["max_length"] = int(settings.max_length)
    lm = HFLM(pretrained=model, tokenizer=tokenizer, **lm_kwargs)
    include = settings.include_path
    if include and not isinstance(include, str):
        include = [str(p) for p in include]  # a list (or an OmegaConf ListConfig) of task dirs
    task_manager = TaskManager(include_path=include or None)
    limit = settings.limit
    output = lm_eval.simple_evaluate(
        model=lm,
        tasks=tasks,
        num_fewshot=settings.num_fewshot,
        limit=float(limit) if isinstance(limit, float) else limit,
        apply_chat_template=bool(settings.apply_chat_template),
        fewshot_as_multiturn=bool(settings.fewshot_as_multiturn),
        gen_kwargs=dict(settings.gen_kwargs) if settings.gen_kwargs else None,
        bootstrap_iters=int(settings.bootstrap_iters),
        log_samples=False,
        task_manager=task_manager,
        confirm_run_unsafe_code=unsafe,
        random_seed=int(settings.seed),
    )
    if output is None:  # not rank 0 of a distributed lm-eval run
        return {}
    headline = settings.headline
    return flatten_results(output["results"], dict(headline) if headline else None)
