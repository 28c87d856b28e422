"""The run's result files as typed records, declared once: eval/<model>.json is an EvalResult, ledger.json a Ledger.

evaluate writes EvalResult and costs writes Ledger through `write_record`; `read_eval` / `read_ledger` read them
back (a corrupt or wrong-shaped file is a one-line UserError naming it); costs, the registry and the report look
scores up with `suite_score` alone.

On disk a record is the JSON object of its fields, in declaration order.
A field with a default is one a file may lack: one that is read but not required (an eval without `suites` or
`label`, a ledger without `retain`) or one of the other variant of a section (break-even known or unknown).
`to_dict` writes only the fields that were given, so a file reads back to the same JSON and a section never grows
keys it did not have.
None in a field means "not known": a cost that could not be priced is None, never a silent 0.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from distillab.errors import UserError, not_utf8
from distillab.files import read_json, write_atomic

LEDGER_FORMAT = "distillab-ledger/1"
Suite = Literal["task", "general"]
SUITES: tuple[Suite, ...] = ("task", "general")
TEACHER_NOT_ASKED = "eval.score_teacher = false"  # EvalResult.not_scored of a teacher the config leaves unscored


class Record(BaseModel):
    """A JSON object of a run file. Unknown keys are errors: a misspelt field never passes silently."""

    model_config = ConfigDict(
        extra="forbid", use_attribute_docstrings=True, validate_by_name=True, serialize_by_alias=True
    )

    def __getitem__(self, key: str):
        """Dict-style reads (`res["task"]["score"]`) for callers written against the JSON dicts."""
        if key not in type(self).model_fields:
            raise KeyError(key)
        return getattr(self, key)

    def to_dict(self) -> dict:
        """The JSON object as written to disk: the fields that were given, in declaration order."""
        return self.model_dump(exclude_unset=True)


# ----------------------------------------------------------------------------------------------------
# eval/<model>.json


class SuiteScore(Record):
    score: float | None
    """Mean of the suite's skill scores, each skill counted once; None when the suite has no skills."""
    ci: list[float | None] | None = None
    """[low, high] percentile-bootstrap 95% interval of the score; NaNs when eval.bootstrap = 0."""


class SkillScore(Record):
    score: float
    """Mean of the skill's example scores, in [0, 1]."""
    n: int
    """Number of test examples scored."""
    ci: list[float | None] | None = None
    """[low, high] bootstrap 95% interval of this skill's score."""
    scores: list[float] = []
    """Every example's score, in the order the skill's generator gave the examples."""


class Suites(Record):
    task: list[str]
    """Skills of the task suite (the lab skills distilled on, then a user task file's skills)."""
    general: list[str]
    """Skills of the general suite: what the student should not forget."""


class EndpointUsage(Record):
    """What scoring a model through an OpenAI-compatible endpoint asked and was billed (distillab.endpoint_eval)."""

    endpoint: str
    """The endpoint(s) asked: the base_url, or a list's URLs joined by commas."""
    requests: int
    """Distinct requests the evaluation needs (one per prompt)."""
    sent: int = 0
    """Requests sent by the evaluate that wrote this file; 0 when every answer came from the request cache."""
    prompt_tokens: int = 0
    """Prompt tokens billed for the requests (the request cache's counts: each request billed once)."""
    completion_tokens: int = 0
    """Completion tokens billed for the requests."""


class EvalResult(Record):
    """One model's scores on the task and general suites (distillab.evaluate writes it)."""

    model: str
    """The model as evaluate was given it: a path, a hub id or lab:<name>."""
    parameters: int | None = None
    """Parameter count of the loaded model."""
    skills: dict[str, SkillScore] = {}
    """Per-skill scores, keyed by skill name."""
    task: SuiteScore
    """The task suite: what the student was distilled for."""
    general: SuiteScore
    """The general suite: every other skill."""
    suites: Suites | None = None
    """Which skills make up each suite; None in a file that does not say."""
    world_text_perplexity: float | None = None
    """exp(mean next-token NLL) on held-out world text: general language modelling, not a suite."""
    eval_seconds: float | None = None
    """Wall seconds spent scoring the skills (loading and perplexity not included)."""
    label: str | None = None
    """The run's name for the model: teacher, base, distilled, or an extra model's label."""
    not_scored: str | None = None
    """Why the model has no scores (e.g. the API teacher with eval.score_teacher = false); None when scored."""
    endpoint_usage: EndpointUsage | None = None
    """For a model scored through its API (the endpoint teacher): requests and billed tokens; else None."""

    @property
    def complete(self) -> bool:
        """Whether the model's scoring is settled: scored, or not scored because the config says so. A teacher not
        scored for another reason (a budget stop, a suite its endpoint cannot score) is tried again by the next
        evaluate, so stage.run_stage leaves it unstamped."""
        return self.not_scored in (None, TEACHER_NOT_ASKED)

    def suite(self, name: Suite) -> SuiteScore:
        if name not in SUITES:
            raise ValueError(f"no suite {name!r}: suites are {', '.join(SUITES)}")
        return getattr(self, name)

    def skill_score(self, name: str) -> float | None:
        skill = self.skills.get(name)
        return None if skill is None else skill.score


def suite_score(evals: Mapping[str, EvalResult], label: str, suite: Suite) -> float | None:
    """The one score lookup: model `label`'s score on a suite; None when that model was not evaluated or the
    suite had no skills."""
    res = evals.get(label)
    return None if res is None else res.suite(suite).score


def as_evals(evals: Mapping[str, EvalResult | dict]) -> dict[str, EvalResult]:
    """Records as they are, JSON dicts validated: what functions taking `evals` accept."""
    return {label: EvalResult.model_validate(res) for label, res in evals.items()}


# ----------------------------------------------------------------------------------------------------
# ledger.json (distillab.costs explains each number; these are the shapes).


class VerificationCounts(Record):
    """Verified rejection sampling's counts over a set of prompts (a skill's, or all of them)."""

    prompts: int
    """Prompts the teacher was asked."""
    drawn: int
    """Samples the teacher answered for them, re-draws included (failed requests are not samples)."""
    verified: int
    """Samples the verifier passed."""
    kept: int
    """Verified samples in the training data (the keep policy's: all, the first, or at most max_per_prompt)."""
    unverified_prompts: int
    """Prompts with no verified sample after max_draws: not in the training data."""
    prompt_tokens: int
    """Teacher prompt tokens over every sample drawn, rejected ones included."""
    completion_tokens: int
    """Teacher completion tokens over every sample drawn (reasoning tokens included)."""
    usd: float | None
    """Their bill; None when the teacher is unpriced."""
    yield_: float | None = Field(alias="yield")
    """verified / drawn; None when nothing was drawn."""
    tokens_per_kept: float | None
    """(prompt + completion tokens) / kept: every sample paid for, per example trained on; None when none is kept."""
    usd_per_kept: float | None
    """usd / kept; None when unpriced or none is kept."""


class Verification(Record):
    """What [verify] checked and kept (distillab.verify builds it; generate_summary.json and the ledger carry it)."""

    verifiers: dict[str, str]
    """Which verifier judged each skill's samples (lab, exact, normalized, regex, math, or module:function)."""
    keep: str
    """The keep policy: all, first, or "at most M"."""
    max_draws: int
    """Draws a prompt may have in all before it is given up on."""
    total: VerificationCounts
    """Over every prompt."""
    skills: dict[str, VerificationCounts]
    """Per skill (a lab skill, or a prompts file's "skill"; "task" when it has none)."""
    unverified_examples: list[str] = []
    """A few prompts left without a verified sample."""
    rejected_file: str | None = None
    """Where the rejected samples are kept for inspection (data/rejected.parquet)."""


class TeacherGeneration(Record):
    model: str | None = None
    """The teacher model as configured."""
    data_source: str | None = None
    """Where the training answers came from: teacher | lab (ground truth) | human."""
    pricing: dict[str, Any] = {}
    """distillab.pricing.TeacherPricing.to_dict(): status, model, provider, $ per 1M tokens, description."""
    price_status: Literal["priced", "override", "local", "unpriced", "not_used", "missing"]
    """priced (genai-prices) | override (config) | local (no API bill) | unpriced (spend unknown) |
    not_used (ground-truth data) | missing (a teacher run without its generate summary)."""
    prompt_tokens: int | None = None
    """Teacher prompt tokens billed for the dataset."""
    completion_tokens: int | None = None
    """Teacher completion tokens billed for the dataset."""
    reasoning_tokens: int | None = None
    """Of completion_tokens, the teacher's reasoning traces (priced as the output tokens they are; distillab.reasoning
    says how they are counted); 0 without traces, None for a run from before they were counted."""
    cached_tokens: int | None = None
    """Of prompt_tokens, those the endpoint's prompt cache served (usage.prompt_tokens_details.cached_tokens), priced
    at the cached-input rate; absent for a run from before they were counted."""
    billing: dict[str, Any] | None = None
    """pricing.TeacherPricing.billing: the requests sent one by one ("sync") and through the Batch API ("batch",
    priced at the batch rate), each {requests, prompt_tokens, cached_tokens, completion_tokens, usd}."""
    rows: int | None = None
    """Dataset rows the teacher answered."""
    usd: float | None = None
    """The teacher's bill for the dataset; None when unpriced."""
    verification: Verification | None = None
    """[verify]'s yield, re-draws and cost per kept example; absent when the samples were not verified."""


class TeacherEvaluation(Record):
    """Scoring the teacher on the eval suites: measurement, not distillation, so never in total_usd or the
    break-even."""

    status: Literal["scored", "local", "not_scored", "not_evaluated"] = "not_evaluated"
    """scored (an API teacher, through its endpoint) | local (a local teacher: no API bill) | not_scored
    (`reason` says why) | not_evaluated (no eval/teacher.json)."""
    reason: str | None = None
    """Why the teacher was not scored."""
    endpoint: str | None = None
    """The endpoint asked."""
    requests: int | None = None
    """Distinct requests of the evaluation."""
    prompt_tokens: int | None = None
    """Prompt tokens billed for the evaluation."""
    completion_tokens: int | None = None
    """Completion tokens billed for the evaluation."""
    price_status: str | None = None
    """The teacher's price status (TeacherGeneration.price_status's words)."""
    usd: float | None = 0.0
    """The evaluation's bill; None when the teacher is unpriced."""


class TrainingCost(Record):
    flops: float | None = None
    """Training FLOPs, estimated as 6 x parameters x tokens seen (distillab.train.train_flops)."""
    train_seconds: float | None = None
    """Measured wall seconds of training, across resumes."""
    steps: int | None = None
    """Optimizer steps taken."""
    usd_per_hour: float | None = None
    """costs.train_usd_per_hour: the training device's price."""
    usd: float | None = None
    """train_seconds x usd_per_hour; None when the seconds are unknown."""


class RetainCost(Record):
    enabled: bool = False
    """Whether the run used retain; when False, only `usd` (0) follows."""
    replay_source: str | None = None
    """base | teacher | dataset; None without replay."""
    replay_rows: int | None = None
    """Rows in the replay set."""
    teacher_prompt_tokens: int | None = None
    """Teacher prompt tokens spent on teacher replay."""
    teacher_completion_tokens: int | None = None
    """Teacher completion tokens spent on teacher replay."""
    teacher_usd: float | None = None
    """The teacher's bill for replay; None when unpriced."""
    base_generation_seconds: float | None = None
    """Device seconds of the base model's own generation (self replay, sampled prompts)."""
    selection_seconds: float | None = None
    """Device seconds spent scoring candidates on the dev split."""
    candidates: int | None = None
    """Candidates the selection rule chose from."""
    compute_usd: float | None = None
    """(base_generation_seconds + selection_seconds) at costs.train_usd_per_hour."""
    usd: float | None = 0.0
    """teacher_usd + compute_usd: retain's whole extra spend; None when unpriced."""


class Throughput(Record):
    tokens_per_s: float | None
    """Completion tokens per second of batched greedy generation; None when not measured."""
    tokens: int | None = None
    """Tokens written in the timed batches (up to end-of-sequence)."""
    seconds: float | None = None
    """Wall seconds of the timed batches."""
    batch_size: int | None = None
    """Prompts per batch."""
    batches: int | None = None
    """Timed batches."""
    device: str | None = None
    """Where it was measured (cpu, cuda:0, ...)."""
    reason: str | None = None
    """Why there is no throughput, when there is none."""


class ServingCost(Record):
    student_tokens_per_s: float | None = None
    """The student's measured throughput here."""
    throughput: Throughput | None = None
    """The measurement itself."""
    usd_per_hour: float | None = None
    """costs.serve_usd_per_hour: the serving device's price."""
    student_usd_per_1m_tokens: float | None = None
    """usd_per_hour at the measured throughput, per 1M tokens."""
    teacher_api_usd_per_1m_output: float | None = None
    """The teacher API's price per 1M output tokens on the break-even's basis."""
    teacher_api_usd_per_1m_input: float | None = None
    """The teacher API's price per 1M input tokens on the break-even's basis."""
    teacher_price_basis: Literal["priced", "override", "notional", "unpriced"] | None = None
    """Where that price came from; notional = a local teacher priced like a small hosted API."""
    teacher_price_description: str | None = None
    """The price's basis in words."""


class TokensPerQuery(Record):
    prompt: float | None
    """Mean prompt tokens per query."""
    completion: float | None
    """Mean completion tokens per query."""
    source: Literal["teacher usage", "dataset", "unknown"] = Field(alias="from")
    """Teacher-billed means when the teacher was called, else the dataset's token counts."""


class BreakEven(Record):
    """After how many served queries distilling beats paying the teacher API (distillab.costs has the rule).

    Two variants: status unknown carries `reason`; the others carry the inputs and the answer."""

    price_basis: Literal["priced", "override", "notional", "unpriced"] | None = None
    """The teacher-API price the break-even uses."""
    tokens_per_query: TokensPerQuery | None = None
    """Mean tokens of one query."""
    queries_per_month: float | None = None
    """costs.queries_per_month: the traffic `months` is counted in."""
    status: Literal["pays_off", "immediately", "never", "below_floor", "unknown"]
    """pays_off after `queries` | immediately (no one-off cost) | never (the student costs more per query) |
    below_floor (the student misses the quality floor: it does not replace the teacher, `reason` says how) |
    unknown (`reason` says what is missing)."""
    queries: int | None = None
    """The smallest N with one_off_usd + N x student < N x API; 0 when immediately, None when never/unknown."""
    reason: str | None = None
    """What is missing, when the status is unknown."""
    saving_per_query_usd: float | None = None
    """API $ minus student $ per query."""
    one_off_usd: float | None = None
    """teacher_usd + training_usd + retain_usd."""
    teacher_usd: float | None = None
    """The dataset's teacher tokens (and teacher replay's) priced on price_basis."""
    training_usd: float | None = None
    """Training's $ (TrainingCost.usd)."""
    retain_usd: float | None = None
    """Retain's device $ (RetainCost.compute_usd); None in a ledger without it."""
    api_usd_per_query: float | None = None
    """One query through the teacher API."""
    student_usd_per_query: float | None = None
    """One query served by the student at the measured throughput."""
    months: float | None = None
    """queries / queries_per_month; None without traffic."""


class SuiteQuality(Record):
    teacher: float | None = None
    """The teacher's score on the suite."""
    base: float | None = None
    """The base student's score."""
    distilled: float | None = None
    """The distilled student's score."""
    given_up_vs_teacher: float | None = None
    """teacher - distilled."""
    change_vs_base: float | None = None
    """distilled - base: negative is forgetting."""


class QualityFloor(Record):
    """Whether the distilled student is good enough to replace the teacher ([eval] min_task_score or
    min_task_share of the teacher's task score; max_general_drop below the base): break-even is said only of a
    student that meets it."""

    required_task: float | None = None
    """The task score the student needs; None when it cannot be known (no teacher score and no min_task_score)."""
    task: float | None = None
    """The distilled student's task score."""
    max_general_drop: float | None = None
    """How far the general score may fall below the base's (absolute points); None: not checked."""
    general_change: float | None = None
    """The distilled student's general score minus the base's."""
    meets: bool | None = None
    """True / False; None when the floor or a score is unknown."""
    reason: str = ""
    """The verdict in words: what was required and what the student scored."""


class Ledger(Record):
    """What the run cost and when it pays off (distillab.costs writes it)."""

    format: Literal["distillab-ledger/1"]
    """The file's format and version (LEDGER_FORMAT): a file that does not say it is a ledger is not read."""
    run: str
    """The run's name."""
    created_at: str
    """When the ledger was written, UTC ISO 8601."""
    teacher_generation: TeacherGeneration
    """The teacher's tokens and $ for the dataset."""
    training: TrainingCost
    """FLOPs, seconds and $ of training."""
    serving: ServingCost
    """The student's serving throughput and $ per 1M tokens, beside the teacher API's price."""
    retain: RetainCost = RetainCost()
    """What keeping the model cost; a ledger without it reads as not used."""
    break_even: BreakEven
    """When distilling pays off."""
    teacher_evaluation: TeacherEvaluation = TeacherEvaluation()
    """What scoring the teacher on the eval suites cost; a ledger without it reads as not_evaluated."""
    quality: dict[Suite, SuiteQuality]
    """Per suite: what distilling gave up against the teacher and changed against the base."""
    quality_floor: QualityFloor = QualityFloor()
    """The user's floor and whether the student meets it; a ledger without it reads as unknown."""
    total_usd: float | None
    """The distillation's actual one-off spend: teacher generation + training + retain; None when any part is
    unknown. The teacher's evaluation is its own line (teacher_evaluation.usd), not in it."""
    notes: list[str]
    """Caveats in words (unpriced teacher, notional price, where throughput was measured)."""


# ----------------------------------------------------------------------------------------------------
# Files.


def write_record(path: Path, record: Record) -> None:
    """The record's JSON, atomically (readers never see half a file). Python's json keeps NaN as NaN."""
    write_atomic(Path(path), json.dumps(record.to_dict(), indent=1))


# The metric an lm-eval task is shown by, first found: what its own leaderboards report.
LM_EVAL_PRIMARY = ("acc_norm", "acc", "exact_match", "f1", "mcc", "bleu", "word_perplexity")


def read_lm_evals(paths: list[Path]) -> dict[str, dict[str, tuple[str, float]]]:
    """{label: {task: (metric, value)}} from eval/lm_eval_<label>.json files (their flat "scores"): each task by
    its primary metric (LM_EVAL_PRIMARY, else its first metric that is not a standard error)."""
    out = {}
    for path in paths:
        scores = read_json(path, "delete it and rerun `distillab evaluate --lm-eval-tasks ...`").get("scores") or {}
        label = path.stem.removeprefix("lm_eval_")
        out[label] = {}
        for task, metrics in scores.items():
            named = [m for m in LM_EVAL_PRIMARY if m in metrics] or [m for m in metrics if "stderr" not in m]
            if named:
                out[label][task] = (named[0], float(metrics[named[0]]))
    return out


def read_eval(path: Path) -> EvalResult:
    return _read(Path(path), EvalResult, "an eval result", "delete it and rerun `distillab evaluate`")


def read_ledger(path: Path) -> Ledger:
    return _read(Path(path), Ledger, "a distillab ledger", "delete it and rerun `distillab report CONFIG`")


def _read(path: Path, cls: type[Record], what: str, fix: str):
    """The record in `path`; anything else is a one-line UserError naming the file and what to do."""
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise UserError(f"{path} is missing: {fix.replace('delete it and ', '')}") from None
    except UnicodeDecodeError as err:
        raise not_utf8(path, err) from None
    except json.JSONDecodeError as err:
        raise UserError(f"{path} is corrupt ({err}): {fix}") from None
    try:
        return cls.model_validate(data)
    except ValidationError as err:
        first = err.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "top level"
        more = f" and {err.error_count() - 1} more" if err.error_count() > 1 else ""
        raise UserError(f"{path} is not {what} ({where}: {first['msg']}{more}): {fix}") from None
