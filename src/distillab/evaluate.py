"""Stage 3, evaluate: every model of the run on the task suite and the general suite -> eval/<label>.json.

One stage per model: "evaluate:teacher", "evaluate:base", "evaluate:distilled", then each extra model by its
label. Each is stamped on the suites it scores and on the model's weights, tokenizer and chat template, so a new
student re-scores the student alone. The scoring is distillab.scoring's; a teacher that is not a local model
(an API teacher, or any teacher with eval.score_teacher = false) goes through distillab.endpoint_eval.
"""

from __future__ import annotations

from dataclasses import dataclass

from distillab import models
from distillab.config import RunConfig
from distillab.endpoint_eval import evaluate_endpoint_teacher, not_scored_record
from distillab.errors import UserError
from distillab.files import fingerprint
from distillab.records import TEACHER_NOT_ASKED, EvalResult, read_eval, write_record
from distillab.rundir import RunDir
from distillab.scoring import evaluate_model, load_task_suite, run_models, suites
from distillab.stage import StageContext, run_stage


def evaluate_stages(
    cfg: RunConfig, extra_models: dict[str, str] | None = None
) -> list[EvaluateModel | EvaluateTeacher]:
    """The stages in order: teacher, base, distilled, then the extra models (label -> model name or path)."""
    named = run_models(cfg) | (extra_models or {})
    elsewhere = cfg.teacher.base_url or not cfg.eval.score_teacher
    local = {label: name for label, name in named.items() if not (label == "teacher" and elsewhere)}
    return [
        EvaluateTeacher(local) if label not in local else EvaluateModel(label=label, model=name, local=local)
        for label, name in named.items()
    ]


def run_evaluate(cfg: RunConfig, extra_models: dict[str, str] | None = None, log=print) -> dict[str, EvalResult]:
    """Evaluate teacher, base and the run's student (plus extra named models) into eval/<label>.json. A run whose
    retain recipe selects a checkpoint runs the select stage first (pipeline.evaluation_stages does)."""
    ctx = StageContext(log=log)
    return {stage.label: run_stage(stage, cfg, ctx) for stage in evaluate_stages(cfg, extra_models)}


def suite_inputs(cfg: RunConfig) -> tuple[list[str], list[str], list[dict] | None]:
    """(task skills, general skills, the user's task-suite examples or None): what every model is scored on."""
    task, general = suites(cfg)
    return task, general, load_task_suite(cfg.eval.task_file) if cfg.eval.task_file else None


def check_models(local: dict[str, str]) -> None:
    """Every local model must exist before any is scored: nothing half done."""
    for label, name in local.items():
        try:
            models.resolve_model_path(name)
        except UserError as err:
            hint = ": run `distillab train` first" if label == "distilled" else ""
            raise UserError(f"{label}: {err}{hint}") from None


@dataclass
class EvaluateModel:
    """evaluate:<label>: a local model, loaded and scored here."""

    label: str
    model: str  # a path, or lab:<name>
    local: dict[str, str]  # every local model of this evaluate, label -> model (check_models)

    @property
    def name(self) -> str:
        return f"evaluate:{self.label}"

    def fingerprint(self, cfg: RunConfig, run: RunDir) -> str:
        task, general, examples = suite_inputs(cfg)
        check_models(self.local)
        path = models.resolve_model_path(self.model)
        # the weights and what renders and reads the prompts (tokenizer, chat template): a new template re-scores
        weights = sorted(f for pattern in ("*.safetensors", "tokenizer*", "chat_template*") for f in path.glob(pattern))
        return fingerprint(
            "evaluate",
            task,
            general,
            cfg.eval.n_per_skill,
            cfg.eval.bootstrap,
            examples,
            cfg.teacher.max_new_tokens,
            *weights,
        )

    def outputs(self, cfg: RunConfig, run: RunDir) -> list:
        return [run.eval(self.label)]

    def run(self, cfg: RunConfig, run: RunDir, ctx: StageContext) -> EvalResult:
        task, general, examples = suite_inputs(cfg)
        ctx.log(f"evaluate: {self.label} ({self.model})")
        res = evaluate_model(
            self.model,
            task,
            general,
            cfg.eval.n_per_skill,
            cfg.eval.bootstrap,
            cfg.teacher.max_new_tokens,
            task_examples=examples,
        )
        res.label = self.label
        write_record(run.eval(self.label), res)
        return res

    def load(self, cfg: RunConfig, run: RunDir) -> EvalResult:
        return read_eval(run.eval(self.label))


@dataclass
class EvaluateTeacher:
    """evaluate:teacher for a teacher that is not scored here: through its endpoint (distillab.endpoint_eval),
    or a not-scored record when eval.score_teacher is false. A teacher stopped by teacher.max_usd is written
    but not complete (EvalResult.complete), so the next evaluate tries again."""

    local: dict[str, str]  # the local models of this evaluate, checked before the endpoint is asked

    name = "evaluate:teacher"
    label = "teacher"

    def fingerprint(self, cfg: RunConfig, run: RunDir) -> str:
        task, general, examples = suite_inputs(cfg)
        check_models(self.local)
        asks = cfg.teacher.model_dump(include={"base_url", "model", "mode", "max_new_tokens"})
        return fingerprint(
            "evaluate", task, general, cfg.eval.n_per_skill, cfg.eval.bootstrap, examples, asks, cfg.eval.score_teacher
        )

    def outputs(self, cfg: RunConfig, run: RunDir) -> list:
        return [run.eval(self.label)]

    def run(self, cfg: RunConfig, run: RunDir, ctx: StageContext) -> EvalResult:
        task, general, examples = suite_inputs(cfg)
        if not cfg.eval.score_teacher:
            res = not_scored_record(cfg, task, general, TEACHER_NOT_ASKED)
        else:
            ctx.log(f"evaluate: teacher ({cfg.teacher.model} at {', '.join(cfg.teacher.urls)})")
            res = evaluate_endpoint_teacher(cfg, task, general, examples, log=ctx.log)
            res.label = self.label
        write_record(run.eval(self.label), res)
        return res

    def load(self, cfg: RunConfig, run: RunDir) -> EvalResult:
        return read_eval(run.eval(self.label))
