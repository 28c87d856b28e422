"""Real benchmarks through lm-evaluation-harness: `distillab evaluate CONFIG --lm-eval-tasks SPEC`.

Each model of the run (the distilled student, the base, and the teacher when it is local) is loaded by
distillab's own loader (local directories, safetensors only) and handed to lm-eval's HFLM, so lm-eval never
downloads weights. Each model is its own stage, "lm_eval:<label>" -> eval/lm_eval_<label>.json, stamped on the
task names, the document limit, the model's weights and the local task files.

SPEC: see distillab.lm_eval_tasks, which resolves it (offline) and builds the tasks.
"""

from __future__ import annotations

import functools
import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from distillab import models
from distillab.config import RunConfig
from distillab.errors import UserError
from distillab.files import fingerprint, read_json, write_atomic
from distillab.lm_eval_tasks import TaskSet, load_tasks, resolve_tasks
from distillab.rundir import RunDir
from distillab.scoring import run_models
from distillab.stage import StageContext, run_stages


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
    return [
        LmEvalModel(label=label, model=name, tasks=task_set, limit=limit, batch_size=batch_size)
        for label, name in local_models(cfg).items()
    ]


def local_models(cfg: RunConfig) -> dict[str, str]:
    """The run's models by label; a remote teacher is left out (lm-eval here scores local weights only)."""
    named = run_models(cfg)
    if cfg.teacher.base_url:
        named.pop("teacher")
    return named


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
# One model.


def lm_eval_model(
    model_name: str | Path, task_manager, names: list[str], limit: int | None = None, batch_size: int = 16
) -> dict:
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM

    tasks = load_tasks(task_manager, names)
    model, tok = models.load(model_name)
    lm = HFLM(pretrained=model, tokenizer=tok, batch_size=batch_size, device=str(next(model.parameters()).device))
    began = time.time()
    raw = simple_evaluate(
        model=lm, tasks=tasks, task_manager=task_manager, limit=limit, log_samples=False, bootstrap_iters=1000
    )
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
        out[task] = {
            k.removesuffix(",none"): v
            for k, v in metrics.items()
            if "," in k and isinstance(v, (int, float)) and not isinstance(v, bool)
        }
    return out
