"""Real benchmarks through lm-evaluation-harness: `distillab evaluate CONFIG --lm-eval-tasks SPEC`.

Each model of the run (the distilled student, the base, and the teacher when it is local) is loaded by
distillab's own loader (local directories, safetensors only) and handed to lm-eval's HFLM, so lm-eval never
downloads weights. Each model is its own stage, "lm_eval:<label>" -> eval/lm_eval_<label>.json, stamped on the
task names, the document limit, the model's weights and the local task files.

SPEC is a comma-separated list of:
  path/to/task.yaml   a local task file (its directory joins the include path, so `include:` siblings work);
  path/to/dir/        an include path: task names below are looked up there too;
  name                a task, group or tag: from the include paths, $DISTILLAB_LM_EVAL_INCLUDE (os.pathsep
                      separated directories) or lm-eval's own registry.
Everything runs offline: HF_HUB_OFFLINE / HF_DATASETS_OFFLINE are set, so a built-in task whose dataset is
not cached fails with a one-line error. Relative paths inside a local task YAML (e.g. `data_files` of a
`dataset_path: json` task) resolve against the YAML's own directory, not the working directory: tasks are
built with that directory as the working directory.
"""

from __future__ import annotations

import contextlib
import difflib
import functools
import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from distillab import models
from distillab.config import RunConfig
from distillab.errors import UserError
from distillab.files import fingerprint, read_json, write_atomic
from distillab.rundir import RunDir
from distillab.scoring import run_models
from distillab.stage import StageContext, run_stages

INCLUDE_ENV = "DISTILLAB_LM_EVAL_INCLUDE"


def run_lm_eval(cfg: RunConfig, tasks: str, log=print, limit: int | None = None, batch_size: int = 16) -> dict:
    """Evaluate the run's models on lm-eval tasks; returns {label: result} as written to eval/lm_eval_<label>.json.

    tasks: the SPEC above; empty means cfg.eval.lm_eval_tasks. limit: at most this many documents per task.
    """
    records = run_stages(lm_eval_stages(cfg, tasks, limit=limit, batch_size=batch_size), cfg, StageContext(log=log))
    return {record.label: record.result for record in records.values() if record.result is not None}


def lm_eval_stages(cfg: RunConfig, tasks: str, limit: int | None = None, batch_size: int = 16) -> list[LmEvalModel]:
    """One stage per local model of the run (local_models). The SPEC is resolved when the first stage needs it, once
    for all of them (lm-eval's own registry takes seconds to index)."""
    task_set = functools.cache(lambda: resolve_tasks(cfg, tasks))
    return [LmEvalModel(label=label, model=name, tasks=task_set, limit=limit, batch_size=batch_size)
            for label, name in local_models(cfg).items()]


def local_models(cfg: RunConfig) -> dict[str, str]:
    """The run's models by label; a remote teacher is left out (lm-eval here scores local weights only)."""
    named = run_models(cfg)
    if cfg.teacher.base_url:
        named.pop("teacher")
    return named


@dataclass
class TaskSet:
    """What a SPEC names: lm-eval's TaskManager, the registered task names, and the local files they read."""

    manager: Any
    names: list[str]
    files: list[Path]  # beside each local task YAML: part of every model's stamp


def resolve_tasks(cfg: RunConfig, tasks: str) -> TaskSet:
    """The SPEC's tasks (empty: cfg.eval.lm_eval_tasks), offline; a bad SPEC is a one-line UserError."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    specs = [s.strip() for s in (tasks or ",".join(cfg.eval.lm_eval_tasks)).split(",") if s.strip()]
    if not specs:
        raise UserError("no lm-eval tasks given: pass --lm-eval-tasks NAMES|YAML or set eval.lm_eval_tasks")
    task_manager = _task_manager(specs)
    names = resolve_task_names(task_manager, specs)
    return TaskSet(manager=task_manager, names=names, files=_task_files(task_manager, names))


@dataclass
class LmEvalResult:
    """An lm_eval stage's record: eval/lm_eval_<label>.json's contents; None when the model is not there (then
    the stage is not complete, so not stamped: the next run scores the model once it exists)."""

    label: str
    result: dict | None

    @property
    def complete(self) -> bool:
        return self.result is not None


@dataclass
class LmEvalModel:
    """lm_eval:<label>: one of the run's models on the SPEC's tasks."""

    label: str
    model: str
    tasks: Callable[[], TaskSet]
    limit: int | None = None  # at most this many documents per task
    batch_size: int = 16

    @property
    def name(self) -> str:
        return f"lm_eval:{self.label}"

    def fingerprint(self, cfg: RunConfig, run: RunDir) -> str:
        tasks, path = self.tasks(), _model_path(self.model)
        weights = sorted(path.glob("*.safetensors")) if path is not None else []
        return fingerprint("lm_eval", tasks.names, self.limit, *weights, *tasks.files)

    def outputs(self, cfg: RunConfig, run: RunDir) -> list:
        return [run.lm_eval(self.label)]

    def run(self, cfg: RunConfig, run: RunDir, ctx: StageContext) -> LmEvalResult:
        if _model_path(self.model) is None:
            ctx.log(f"lm-eval: skipping {self.label}: no model at {self.model}")
            return LmEvalResult(label=self.label, result=None)
        tasks = self.tasks()
        ctx.log(f"lm-eval: {self.label} ({self.model}) on {', '.join(tasks.names)}")
        result = lm_eval_model(self.model, tasks.manager, tasks.names, limit=self.limit, batch_size=self.batch_size)
        result["label"] = self.label
        write_atomic(run.lm_eval(self.label), json.dumps(result, indent=1, default=str))
        return LmEvalResult(label=self.label, result=result)

    def load(self, cfg: RunConfig, run: RunDir) -> LmEvalResult:
        return LmEvalResult(label=self.label, result=read_json(run.lm_eval(self.label)))


def _model_path(model_name: str) -> Path | None:
    try:
        return models.resolve_model_path(model_name)
    except UserError:
        return None


# ----------------------------------------------------------------------------------------------------
# Tasks: a TaskManager that knows the local YAMLs, and the names the SPEC stands for.


def _lm_eval():
    try:
        import lm_eval  # noqa: F401
        from lm_eval.tasks import TaskManager
    except ImportError:
        raise UserError("lm-eval is not installed: pip install lm-eval") from None
    return TaskManager


def _is_yaml(spec: str) -> bool:
    return spec.endswith((".yaml", ".yml"))


def include_paths(specs: list[str]) -> list[Path]:
    paths = [Path(p) for p in os.environ.get(INCLUDE_ENV, "").split(os.pathsep) if p]
    for spec in specs:
        path = Path(spec).expanduser()
        if _is_yaml(spec):
            if not path.is_file():
                raise UserError(f"lm-eval task file not found: {path}")
            paths.append(path.parent)
        elif path.is_dir():
            paths.append(path)
    for path in paths:
        if not path.is_dir():
            raise UserError(f"lm-eval include path is not a directory: {path}")
    return list(dict.fromkeys(p.resolve() for p in paths))


def _task_manager(specs: list[str]):
    """A TaskManager over the include paths; lm-eval's ~15k built-in tasks (7 s to index) only when needed."""
    TaskManager = _lm_eval()
    paths = [str(p) for p in include_paths(specs)]
    names = [s for s in specs if not _is_yaml(s) and not Path(s).expanduser().is_dir()]
    if paths:
        local = TaskManager(include_path=paths, include_defaults=False)
        if all(n in local.task_index for n in names):
            return local
    return TaskManager(include_path=paths or None)


def resolve_task_names(task_manager, specs: list[str]) -> list[str]:
    """Registered names for the SPEC items: a YAML file stands for the tasks it defines."""
    names: list[str] = []
    for spec in specs:
        if _is_yaml(spec):
            target = Path(spec).expanduser().resolve()
            found = [n for n, e in task_manager.task_index.items()
                     if e.yaml_path is not None and Path(e.yaml_path).resolve() == target]
            if not found:
                raise UserError(f"{spec}: lm-eval found no task in this file (it needs a `task:` or `group:` key)")
            names += found
        elif Path(spec).expanduser().is_dir():
            continue  # an include path only
        elif spec in task_manager.task_index:
            names.append(spec)
        else:
            hint = difflib.get_close_matches(spec, task_manager.all_tasks, n=1)
            raise UserError(f"unknown lm-eval task {spec!r}" + (f" (did you mean {hint[0]!r}?)" if hint else "") +
                            f"; give a task YAML path or add its directory to ${INCLUDE_ENV}")
    if not names:
        raise UserError("the lm-eval task list names no task (only include directories)")
    return list(dict.fromkeys(names))


def _yaml_dir(task_manager, name: str) -> Path | None:
    entry = task_manager.task_index.get(name)
    return Path(entry.yaml_path).parent if entry is not None and entry.yaml_path is not None else None


def _task_files(task_manager, names: list[str]) -> list[Path]:
    """Files beside each local task YAML (the YAML and its data): part of the freshness stamp."""
    import lm_eval

    builtin = Path(lm_eval.__file__).parent
    files: set[Path] = set()
    for name in names:
        folder = _yaml_dir(task_manager, name)
        if folder is not None and builtin not in folder.resolve().parents:
            files.update(p for p in folder.iterdir() if p.is_file())
    return sorted(files)


def load_tasks(task_manager, names: list[str]) -> list:
    """Build Task/Group objects, each with its YAML's directory as the working directory (see module doc)."""
    objects = []
    for name in names:
        folder = _yaml_dir(task_manager, name)
        try:
            with contextlib.chdir(folder) if folder is not None else contextlib.nullcontext():
                loaded = task_manager.load([name])
        except Exception as err:  # lm-eval and datasets raise many types; the user needs one line
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise UserError(f"lm-eval task {name!r} failed to load (offline): {first}") from None
        objects += _top_level(loaded)
    return objects


def _top_level(loaded: dict) -> list:
    """Groups that are nobody's child, else the tasks: handing lm-eval both would count tasks twice."""
    groups = loaded.get("groups") or {}
    if not groups:
        return list(loaded["tasks"].values())
    children = {c for kids in (loaded.get("group_map") or {}).values() for c in kids}
    return [g for name, g in groups.items() if name not in children]


# ----------------------------------------------------------------------------------------------------
# One model.


def lm_eval_model(model_name: str | Path, task_manager, names: list[str], limit: int | None = None,
                   batch_size: int = 16) -> dict:
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM

    tasks = load_tasks(task_manager, names)
    model, tok = models.load(model_name)
    lm = HFLM(pretrained=model, tokenizer=tok, batch_size=batch_size, device=str(next(model.parameters()).device))
    began = time.time()
    raw = simple_evaluate(model=lm, tasks=tasks, task_manager=task_manager, limit=limit, log_samples=False,
                          bootstrap_iters=1000)
    return {
        "model": str(model_name),
        "tasks": names,
        "scores": flat_scores(raw["results"]),
        "results": raw["results"],
        "groups": raw.get("groups"),
        "versions": raw.get("versions"),
        "n-shot": raw.get("n-shot"),
        "n-samples": raw.get("n-samples"),
        "higher_is_better": raw.get("higher_is_better"),
        "lm_eval_version": raw.get("lm_eval_version"),
        "limit": limit,
        "eval_seconds": round(time.time() - began, 2),
    }


def flat_scores(results: dict) -> dict[str, dict[str, float]]:
    """{task: {metric: value}} with lm-eval's ",none" filter suffix dropped (other filters keep theirs)."""
    out = {}
    for task, metrics in results.items():
        out[task] = {k.removesuffix(",none"): v for k, v in metrics.items()
                     if "," in k and isinstance(v, (int, float)) and not isinstance(v, bool)}
    return out
