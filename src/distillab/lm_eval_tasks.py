"""lm-evaluation-harness tasks, resolved offline: what a SPEC names and the documents a local task scores.

A library: the lm_eval stages (distillab.lm_eval_bridge) score models on the tasks, and decontamination
(distillab.decontaminate) checks the training prompts against the documents of the local ones.

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
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from distillab.config import RunConfig
from distillab.errors import UserError

INCLUDE_ENV = "DISTILLAB_LM_EVAL_INCLUDE"


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
            found = [
                n
                for n, e in task_manager.task_index.items()
                if e.yaml_path is not None and Path(e.yaml_path).resolve() == target
            ]
            if not found:
                raise UserError(f"{spec}: lm-eval found no task in this file (it needs a `task:` or `group:` key)")
            names += found
        elif Path(spec).expanduser().is_dir():
            continue  # an include path only
        elif spec in task_manager.task_index:
            names.append(spec)
        else:
            hint = difflib.get_close_matches(spec, task_manager.all_tasks, n=1)
            raise UserError(
                f"unknown lm-eval task {spec!r}"
                + (f" (did you mean {hint[0]!r}?)" if hint else "")
                + f"; give a task YAML path or add its directory to ${INCLUDE_ENV}"
            )
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
            raise load_error(name, err) from None
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
# The documents a task scores.


def local_task_documents(specs: list[str]) -> tuple[dict[str, list[str]], list[str]]:
    """({task: the prompts lm-eval asks, doc_to_text of each evaluation document}, [tasks left out]) for the
    tasks the SPEC items name. A task from a local YAML is read (its data files through its own YAML, so
    `process_docs` and templates apply as when it is scored); lm-eval's built-in tasks are left out: their
    documents live in the Hub's datasets, not on this machine."""
    import lm_eval

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    task_manager = _task_manager(specs)
    builtin = Path(lm_eval.__file__).parent
    documents: dict[str, list[str]] = {}
    left_out: list[str] = []
    for name in resolve_task_names(task_manager, specs):
        folder = _yaml_dir(task_manager, name)
        if folder is None or builtin in folder.resolve().parents:
            left_out.append(name)
            continue
        for task_name, task in _leaf_tasks(task_manager, name, folder).items():
            documents[task_name] = [text for doc in task.eval_docs for text in _texts(task.doc_to_text(doc))]
    return documents, left_out


def _leaf_tasks(task_manager, name: str, folder: Path) -> dict:
    """A task or group's tasks by name, built with the YAML's directory as the working directory."""
    try:
        with contextlib.chdir(folder):
            return dict(task_manager.load([name])["tasks"])
    except Exception as err:  # lm-eval and datasets raise many types; the user needs one line
        raise load_error(name, err) from None


def load_error(name: str, err: Exception) -> UserError:
    """One line for a task that failed to build; one whose dataset is on the Hub and not cached says what to do."""
    first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    hint = ""
    if "Hub" in first or "OfflineMode" in first:
        hint = (
            ": its dataset is not in this machine's `datasets` cache. Load the task once where the Hub is reachable "
            "and copy the cache (HF_HOME) here, or give a local task YAML (dataset_path: json, data_files beside it)"
        )
    return UserError(f"lm-eval task {name!r} failed to load (offline): {first}{hint}")


def _texts(value) -> list[str]:
    """doc_to_text's value as prompts: a string, or a list of them (multiple-input tasks); an index is none."""
    if isinstance(value, str):
        return [value]
    return [v for v in value if isinstance(v, str)] if isinstance(value, list) else []
