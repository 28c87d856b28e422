"""The cost ledger of a run: what distilling cost, what serving the student costs, and when it pays off.

run_dir/ledger.json is a distillab.records.Ledger (each field's docstring there); its parts:

  teacher_generation  the teacher's tokens and dollars for the dataset. The price status comes from
                      distillab.pricing: priced (genai-prices) | override (config) | local (no API bill) |
                      unpriced (nobody knows: usd is null, never a silent $0) | not_used (ground-truth data).
                      With [verify], its `verification` block: yield, prompts left without a verified sample,
                      tokens and $ per kept example, per skill (every sample paid for, rejected ones included).
                      cached_tokens (the endpoint's prompt cache, at the cached rate) and `billing`: the requests
                      sent one by one and those through the Batch API (teacher.batch), at the batch rate.
  training            the FLOP estimate and the measured wall seconds x costs.train_usd_per_hour.
  serving             the student's measured tokens/s here (batched greedy generation on the task's prompts)
                      and costs.serve_usd_per_hour -> $ per 1M tokens, beside the teacher API's $ per 1M
                      output tokens.
  retain              what keeping the model cost (distillab.retain): the replay set's teacher tokens and $
                      (teacher replay), the base model's own generation seconds (self replay, sampled
                      prompts) and the seconds spent scoring candidates on dev, at costs.train_usd_per_hour.
  break_even          after how many served queries distilling (one-off teacher $ + training $ + retain $ +
                      serving $ per query) is cheaper than calling the teacher API per query.

Break-even arithmetic. With one-off cost C, API cost a per query and student cost s per query, distilling
is cheaper after N queries when C + N*s < N*a, i.e. N > C / (a - s). The ledger gives the smallest such N,
floor(C / (a - s)) + 1; "immediately" when C is 0 and a > s; "never" when a <= s.

A local teacher has no API price, yet "would distilling beat an API?" is still the question, so the
break-even prices the teacher's tokens at NOTIONAL_API_PRICE and says so (price_basis = "notional").
Tokens per query are the dataset's means: the teacher's billed tokens per request when it was called
(what an API charges), else the dataset's token counts.
"""

from __future__ import annotations

import json
import math
import time
import warnings
from datetime import UTC, datetime
from pathlib import Path

from distillab.config import EvalConfig, RunConfig
from distillab.files import fingerprint, read_json
from distillab.records import (
    LEDGER_FORMAT,
    BreakEven,
    EvalResult,
    Ledger,
    QualityFloor,
    RetainCost,
    ServingCost,
    SuiteQuality,
    TeacherEvaluation,
    TeacherGeneration,
    Throughput,
    TokensPerQuery,
    TrainingCost,
    as_evals,
    suite_score,
    write_record,
)
from distillab.rundir import RunDir
from distillab.stage import StageContext, run_stage

# A local teacher is priced as if it were a small hosted API model, so the break-even is still shown.
# These are gpt-4o-mini's 2024 list prices: a cheap, common tier, i.e. a conservative stand-in
# (a frontier teacher costs 10-100x more, which makes distilling pay off sooner).
NOTIONAL_API_PRICE = {
    "usd_per_1m_input": 0.15,
    "usd_per_1m_output": 0.60,
    "like": "a small hosted API model (gpt-4o-mini's 2024 list price)",
}

THROUGHPUT_PROMPTS = 32  # one batch of the task's prompts
THROUGHPUT_SECONDS = 2.0  # timed generation, after one warm-up batch


def build_ledger(cfg: RunConfig, evals: dict[str, EvalResult]) -> Ledger:
    """Assemble the run's ledger from its summaries and the student's throughput (measured by throughput_stage
    unless throughput.json is up to date); write ledger.json."""
    run = RunDir(cfg.run_dir)
    pricing = teacher_pricing(cfg)
    tokens = tokens_per_query(cfg.run_dir)
    teacher = teacher_generation(cfg, pricing)
    training = training_cost(cfg)
    kept = retain_cost(cfg, pricing)
    throughput = run_stage(throughput_stage, cfg)
    serving = serving_cost(cfg, pricing, throughput)
    basis = api_price_basis(pricing)
    floor = quality_floor(cfg, evals)
    be = held_to_floor(break_even_section(cfg, teacher, training, serving, basis, tokens, kept), floor)
    ledger = Ledger(
        format=LEDGER_FORMAT,
        run=cfg.name,
        created_at=datetime.now(UTC).isoformat(timespec="seconds").replace("+00:00", "Z"),
        teacher_generation=teacher,
        training=training,
        serving=serving,
        retain=kept,
        break_even=be,
        teacher_evaluation=teacher_evaluation(cfg, evals, pricing),
        quality=quality_given_up(evals),
        quality_floor=floor,
        total_usd=_sum_or_none(teacher.usd, training.usd, kept.usd),  # actual one-off spend of this run
        notes=_notes(teacher, basis, throughput),
    )
    write_record(run.ledger, ledger)
    return ledger


# ----------------------------------------------------------------------------------------------------
# Break-even arithmetic: pure functions, tested by hand.


def api_usd_per_query(
    prompt_tokens: float, completion_tokens: float, usd_per_1m_input: float, usd_per_1m_output: float
) -> float:
    return (prompt_tokens * usd_per_1m_input + completion_tokens * usd_per_1m_output) / 1e6


def student_usd_per_query(completion_tokens: float, tokens_per_s: float, usd_per_hour: float) -> float:
    """Device time to write the answer, at the measured throughput (its prompts' prefill included)."""
    return completion_tokens / tokens_per_s * usd_per_hour / 3600


def usd_per_1m_tokens(tokens_per_s: float, usd_per_hour: float) -> float:
    return usd_per_hour / (tokens_per_s * 3600) * 1e6


def break_even(one_off_usd: float, api_per_query: float, student_per_query: float) -> dict:
    """{status: pays_off | immediately | never, queries}: the smallest N with one_off + N*s < N*a."""
    saving = api_per_query - student_per_query
    if saving <= 0:
        return {"status": "never", "queries": None, "saving_per_query_usd": saving}
    if one_off_usd <= 0:
        return {"status": "immediately", "queries": 0, "saving_per_query_usd": saving}
    return {"status": "pays_off", "queries": math.floor(one_off_usd / saving) + 1, "saving_per_query_usd": saving}


def human_count(n: float) -> str:
    """41234 -> '41k', 1_234_567 -> '1.2M': numbers for sentences."""
    for size, suffix in ((1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "k")):
        if abs(n) >= size:
            value = n / size
            return f"{value:.1f}{suffix}" if value < 10 else f"{value:.0f}{suffix}"
    return f"{n:.0f}"


def _duration(months: float) -> str:
    if months >= 24:
        return f"about {months / 12:.0f} years"
    if months >= 1:
        return f"about {months:.1f} months"
    days = round(months * 30.44)
    return f"about {days} day{'s' if days != 1 else ''}" if days >= 1 else "within a day"


def break_even_phrase(be: BreakEven | dict) -> str:
    """The clause the report's verdict and the terminal summary use."""
    be = BreakEven.model_validate(be)
    notional = ["at a notional teacher API price"] if be.price_basis == "notional" else []
    status = be.status
    if status == "pays_off":
        when = (
            [f"{_duration(be.months)} at {human_count(be.queries_per_month)} queries a month"]
            if be.months is not None
            else []
        )
        return f"it pays off after {human_count(be.queries)} queries" + _aside(when + notional)
    if status == "immediately":
        return "it pays off from the first query" + _aside(notional)
    if status == "never":
        return "it never pays off: serving the student costs more per query than the teacher API" + _aside(notional)
    if status == "below_floor":
        spent = [f"{_money_words(be.one_off_usd)} already spent"] if be.one_off_usd is not None else []
        return f"it does not replace the teacher: {be.reason}" + _aside(spent + notional)
    return f"its break-even is unknown ({be.reason or 'missing costs'})"


def _money_words(usd: float) -> str:
    return f"${usd:.4f}" if usd < 1 else f"${usd:,.2f}"


def _aside(parts: list[str]) -> str:
    return f" ({'; '.join(parts)})" if parts else ""


# ----------------------------------------------------------------------------------------------------
# The parts of the ledger.


def teacher_pricing(cfg: RunConfig):
    from distillab.pricing import TeacherPricing

    with warnings.catch_warnings():
        # The ledger records "unpriced" explicitly; generate already warned once.
        warnings.simplefilter("ignore")
        return TeacherPricing.from_config(cfg.teacher, teacher_is_local=not cfg.teacher.base_url)


def api_price_basis(pricing) -> dict:
    """The teacher-API price the break-even uses, and where it came from."""
    if pricing.status in ("priced", "override"):
        return {
            "basis": pricing.status,
            "usd_per_1m_input": pricing.usd_per_1m_input,
            "usd_per_1m_output": pricing.usd_per_1m_output,
            "description": pricing.describe(),
        }
    if pricing.status == "local":
        return {
            "basis": "notional",
            "usd_per_1m_input": NOTIONAL_API_PRICE["usd_per_1m_input"],
            "usd_per_1m_output": NOTIONAL_API_PRICE["usd_per_1m_output"],
            "description": f"{pricing.model} is local; priced like {NOTIONAL_API_PRICE['like']}",
        }
    return {"basis": "unpriced", "usd_per_1m_input": None, "usd_per_1m_output": None, "description": pricing.describe()}


def _read_json(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.is_file() else None


def teacher_generation(cfg: RunConfig, pricing) -> TeacherGeneration:
    summary = _read_json(RunDir(cfg.run_dir).generate_summary("train"))
    base = {"model": cfg.teacher.model, "data_source": cfg.data.source, "pricing": pricing.to_dict()}
    if summary is None:
        # Ground-truth data calls no teacher; a teacher run without a summary has unknown spend.
        if cfg.data.source != "teacher":
            return TeacherGeneration(
                **base, price_status="not_used", prompt_tokens=0, completion_tokens=0, rows=None, usd=0.0
            )
        return TeacherGeneration(
            **base, price_status="missing", prompt_tokens=None, completion_tokens=None, rows=None, usd=None
        )
    usd = summary.get("usd")
    status = pricing.status if usd is not None else "unpriced"
    checked = {"verification": summary["verification"]} if summary.get("verification") else {}  # [verify]'s yield, $
    # cached prompt tokens and the Batch API's share, as generate priced them (absent from an earlier run's summary)
    billed = {k: summary[k] for k in ("cached_tokens", "billing") if summary.get(k) is not None}
    return TeacherGeneration(
        **base,
        price_status=status,
        prompt_tokens=summary.get("prompt_tokens"),
        completion_tokens=summary.get("completion_tokens"),
        reasoning_tokens=summary.get("reasoning_tokens"),
        rows=summary.get("rows"),
        usd=usd,
        **checked,
        **billed,
    )


def teacher_evaluation(cfg: RunConfig, evals: dict[str, EvalResult], pricing) -> TeacherEvaluation:
    """Scoring the teacher: an API teacher's requests and billed tokens (eval/teacher.json's endpoint_usage) at
    the teacher's price; a local teacher has no bill; a teacher not scored says why."""
    res = as_evals(evals).get("teacher")
    if res is None:
        return TeacherEvaluation(status="not_evaluated", reason="no eval/teacher.json: run `distillab evaluate`")
    usage = res.endpoint_usage
    if usage is None:  # nothing asked of an API: a local teacher, or not scored before any request
        status = "not_scored" if res.not_scored else "local"
        return TeacherEvaluation(
            status=status, reason=res.not_scored, price_status="local" if status == "local" else None, usd=0.0
        )
    tokens = {"prompt_tokens": usage.prompt_tokens, "completion_tokens": usage.completion_tokens}
    return TeacherEvaluation(
        status="not_scored" if res.not_scored else "scored",
        reason=res.not_scored,
        endpoint=usage.endpoint,
        requests=usage.requests,
        **tokens,
        price_status=pricing.status,
        usd=pricing.usd_for(tokens),
    )


def training_cost(cfg: RunConfig) -> TrainingCost:
    summary = _read_json(RunDir(cfg.run_dir).train_summary) or {}
    seconds = summary.get("train_seconds")
    rate = cfg.costs.train_usd_per_hour
    return TrainingCost(
        flops=summary.get("flops"),
        train_seconds=seconds,
        steps=summary.get("steps"),
        usd_per_hour=rate,
        usd=None if seconds is None else seconds / 3600 * rate,
    )


def retain_cost(cfg: RunConfig, pricing) -> RetainCost:
    """Retain's extra spend: teacher tokens for teacher replay, and device seconds for the base model's own
    generation (self replay, sampled prompts) and for scoring candidates on dev."""
    r, run = cfg.retain, RunDir(cfg.run_dir)
    if not r.enabled:
        return RetainCost(enabled=False, usd=0.0)
    replay = _read_json(run.generate_summary("replay")) or {}
    sampled = _read_json(run.sampled_prompts) or {}
    selection = _read_json(run.retain_record) or {}
    by_teacher = r.replay_fraction > 0 and r.replay_source == "teacher"
    selection_seconds = selection.get("selection_seconds", 0.0)
    generation_seconds = (0.0 if by_teacher else replay.get("answer_seconds", 0.0)) + sampled.get("seconds", 0.0)
    teacher_usd = replay.get("usd", 0.0) if by_teacher else 0.0
    compute_usd = (generation_seconds + selection_seconds) / 3600 * cfg.costs.train_usd_per_hour
    return RetainCost(
        enabled=True,
        replay_source=r.replay_source if r.replay_fraction > 0 else None,
        replay_rows=replay.get("rows", 0),
        teacher_prompt_tokens=replay.get("prompt_tokens", 0) if by_teacher else 0,
        teacher_completion_tokens=replay.get("completion_tokens", 0) if by_teacher else 0,
        teacher_usd=teacher_usd,
        base_generation_seconds=round(generation_seconds, 2),
        selection_seconds=selection_seconds,
        candidates=len(selection.get("candidates") or []),
        compute_usd=compute_usd,
        usd=None if teacher_usd is None else teacher_usd + compute_usd,
    )


def tokens_per_query(run_dir: Path) -> TokensPerQuery:
    """Mean prompt and completion tokens per query: teacher-billed when it was called, else the dataset's."""
    run = RunDir(Path(run_dir))
    summary = _read_json(run.generate_summary("train"))
    if summary and summary.get("rows"):
        # [verify]: the tokens paid for every sample drawn, rejected ones included: per request, not per row kept
        requests = (summary.get("verification") or {}).get("total", {}).get("drawn") or summary["rows"]
        return TokensPerQuery(
            prompt=summary["prompt_tokens"] / requests,
            completion=summary["completion_tokens"] / requests,
            source="teacher usage",
        )
    data = run.dataset("train")
    if data.is_file():
        import pyarrow.compute as pc
        import pyarrow.parquet as pq

        table = pq.read_table(data, columns=["prompt_ids", "completion_ids"])
        if table.num_rows:
            return TokensPerQuery(
                prompt=pc.mean(pc.list_value_length(table["prompt_ids"])).as_py(),
                completion=pc.mean(pc.list_value_length(table["completion_ids"])).as_py(),
                source="dataset",
            )
    return TokensPerQuery(prompt=None, completion=None, source="unknown")


def serving_prompts(cfg: RunConfig) -> list[str]:
    """The task's own prompts (what will be served), else lab test prompts of the task skills."""
    from distillab.dataset import dataset_files

    files = dataset_files(RunDir(cfg.run_dir).dataset("train"))
    if files:
        import pyarrow.parquet as pq

        prompts = pq.read_table(files[0], columns=["prompt"]).column("prompt").to_pylist()[:THROUGHPUT_PROMPTS]
        if prompts:
            return prompts
    from distillab.lab.world import get_skill

    skills = cfg.data.skills or ["add"]
    per_skill = max(1, THROUGHPUT_PROMPTS // len(skills))
    return [e.prompt for s in skills for e in get_skill(s).examples("test", per_skill)][:THROUGHPUT_PROMPTS]


def measure_throughput(
    model_dir: Path | str, prompts: list[str], max_new_tokens: int, seconds: float = THROUGHPUT_SECONDS
) -> Throughput:
    """Completion tokens per second of batched greedy generation (one warm-up batch, then timed batches).

    Only tokens up to the end-of-sequence count: padding steps of finished rows serve nobody.
    """
    from distillab import models
    from distillab.errors import UserError
    from distillab.sampling import generate

    try:
        model, tok = models.load(model_dir)
    except UserError as err:
        return Throughput(tokens_per_s=None, reason=str(err))
    generate(model, tok, prompts, max_new_tokens=max_new_tokens)  # warm-up: allocations, kernels
    tokens, began, batches = 0, time.perf_counter(), 0
    while batches < 1 or (time.perf_counter() - began < seconds and batches < 20):
        tokens += sum(len(g.token_ids) for g in generate(model, tok, prompts, max_new_tokens=max_new_tokens))
        batches += 1
    elapsed = time.perf_counter() - began
    device = str(next(model.parameters()).device)
    return Throughput(
        tokens_per_s=tokens / elapsed if tokens else None,
        tokens=tokens,
        seconds=round(elapsed, 3),
        batch_size=len(prompts),
        batches=batches,
        device=device,
        reason=None if tokens else "the student wrote no tokens",
    )


class ThroughputStage:
    """The student's serving speed, measured once per student for stage.run_stage: throughput.json, stamped
    "throughput" with what the measurement reads (the student's model files, the serving prompts, max_new_tokens).
    A rerun of `report` reads it back; a retrained or reselected student is measured again."""

    name = "throughput"

    def fingerprint(self, cfg: RunConfig, run: RunDir) -> str:
        return fingerprint(
            "throughput",
            serving_prompts(cfg),
            cfg.teacher.max_new_tokens,
            THROUGHPUT_SECONDS,
            *run.student_model_files(),
        )

    def outputs(self, cfg: RunConfig, run: RunDir) -> list[Path]:
        return [run.throughput]

    def run(self, cfg: RunConfig, run: RunDir, ctx: StageContext) -> Throughput:
        throughput = measure_throughput(run.student, serving_prompts(cfg), cfg.teacher.max_new_tokens)
        write_record(run.throughput, throughput)
        return throughput

    def load(self, cfg: RunConfig, run: RunDir) -> Throughput:
        return Throughput.model_validate(read_json(run.throughput, "delete it and rerun `distillab report`"))


throughput_stage = ThroughputStage()


def serving_cost(cfg: RunConfig, pricing, throughput: Throughput) -> ServingCost:
    rate = cfg.costs.serve_usd_per_hour
    tps = throughput.tokens_per_s
    basis = api_price_basis(pricing)
    return ServingCost(
        student_tokens_per_s=tps,
        throughput=throughput,
        usd_per_hour=rate,
        student_usd_per_1m_tokens=usd_per_1m_tokens(tps, rate) if tps else None,
        teacher_api_usd_per_1m_output=basis["usd_per_1m_output"],
        teacher_api_usd_per_1m_input=basis["usd_per_1m_input"],
        teacher_price_basis=basis["basis"],
        teacher_price_description=basis["description"],
    )


def break_even_section(
    cfg: RunConfig,
    teacher: TeacherGeneration,
    training: TrainingCost,
    serving: ServingCost,
    basis: dict,
    tokens: TokensPerQuery,
    kept: RetainCost | None = None,
) -> BreakEven:
    """Break-even on one price basis: the one-off teacher $ is priced like the per-query API calls."""
    out = {"price_basis": basis["basis"], "tokens_per_query": tokens, "queries_per_month": cfg.costs.queries_per_month}
    missing = [
        name
        for name, value in (
            ("teacher API price", basis["usd_per_1m_output"]),
            ("student throughput", serving.student_tokens_per_s),
            ("training time", training.usd),
            ("tokens per query", tokens.completion),
            ("teacher tokens", teacher.completion_tokens),
        )
        if value is None
    ]
    if missing:
        return BreakEven(**out, status="unknown", queries=None, reason="no " + ", no ".join(missing))
    # Notional basis: the dataset's teacher tokens cost what the notional API would have charged.
    kept = kept or RetainCost()
    replay_in, replay_out = kept.teacher_prompt_tokens or 0, kept.teacher_completion_tokens or 0
    teacher_usd = (
        teacher.usd + (kept.teacher_usd or 0.0)
        if basis["basis"] != "notional"
        else api_usd_per_query(
            teacher.prompt_tokens + replay_in,
            teacher.completion_tokens + replay_out,
            basis["usd_per_1m_input"],
            basis["usd_per_1m_output"],
        )
    )
    retain_usd = kept.compute_usd or 0.0
    one_off = teacher_usd + training.usd + retain_usd
    api = api_usd_per_query(tokens.prompt, tokens.completion, basis["usd_per_1m_input"], basis["usd_per_1m_output"])
    student = student_usd_per_query(tokens.completion, serving.student_tokens_per_s, serving.usd_per_hour)
    result = break_even(one_off, api, student)
    months = (
        result["queries"] / cfg.costs.queries_per_month
        if result["queries"] is not None and cfg.costs.queries_per_month > 0
        else None
    )
    return BreakEven(
        **out,
        **result,
        one_off_usd=one_off,
        teacher_usd=teacher_usd,
        training_usd=training.usd,
        retain_usd=retain_usd,
        api_usd_per_query=api,
        student_usd_per_query=student,
        months=months,
    )


def quality_floor(cfg: RunConfig, evals: dict[str, EvalResult]) -> QualityFloor:
    """Whether the distilled student is good enough to replace the teacher: its task score at least
    [eval] min_task_score (else min_task_share of the teacher's task score), its general score at most
    max_general_drop below the base's."""
    evals = as_evals(evals)
    return floor_verdict(
        cfg.eval,
        task=suite_score(evals, "distilled", "task"),
        teacher_task=suite_score(evals, "teacher", "task"),
        general_change=_change(suite_score(evals, "distilled", "general"), suite_score(evals, "base", "general")),
        base_general=suite_score(evals, "base", "general"),
    )


def floor_verdict(
    e: EvalConfig,
    task: float | None,
    teacher_task: float | None,
    general_change: float | None,
    base_general: float | None = None,
    projected: bool = False,
) -> QualityFloor:
    """quality_floor from the scores themselves: a run's (quality_floor) or a plan's projection of one
    (projected=True: the reasons say "projected")."""
    if e.min_task_score is not None:
        required, basis = e.min_task_score, "[eval] min_task_score"
    elif teacher_task is not None:
        required = e.min_task_share * teacher_task
        basis = f"{e.min_task_share:.0%} of the teacher's {teacher_task:.3f}"
    else:
        required, basis = None, None
    out = {
        "required_task": required,
        "task": task,
        "max_general_drop": e.max_general_drop,
        "general_change": general_change,
    }
    said = "projected " if projected else ""
    if required is None or task is None:
        missing = (
            "no teacher task score to take a share of (set [eval] min_task_score)"
            if required is None
            else ("no task score")
        )
        return QualityFloor(**out, meets=None, reason=f"quality unknown: {missing}")
    if task < required:
        return QualityFloor(**out, meets=False, reason=f"{said}task {task:.3f} < {required:.3f} required ({basis})")
    change = general_change
    if e.max_general_drop is not None and change is not None and -change > e.max_general_drop:
        below = f"the base's {base_general:.3f}" if base_general is not None else "the base's"
        general = f"{said}general {base_general + change:.3f}" if base_general is not None else f"{said}general"
        return QualityFloor(
            **out,
            meets=False,
            reason=f"{general} is {-change * 100:.1f} points below {below} (at most {e.max_general_drop * 100:.1f} allowed)",
        )
    return QualityFloor(**out, meets=True, reason=f"{said}task {task:.3f} >= {required:.3f} required ({basis})")


def _change(score: float | None, base: float | None) -> float | None:
    return None if None in (score, base) else score - base


def held_to_floor(be: BreakEven, floor: QualityFloor) -> BreakEven:
    """The break-even of a student that replaces the teacher; for one below the floor (or of unknown quality)
    the status says so, with the costs already spent kept for the record."""
    if floor.meets:
        return be
    status = "below_floor" if floor.meets is False else "unknown"
    return be.model_copy(update={"status": status, "queries": None, "months": None, "reason": floor.reason})


def quality_given_up(evals: dict[str, EvalResult]) -> dict[str, SuiteQuality]:
    """Per suite: teacher, base and distilled scores; what distilling gave up vs the teacher and vs base."""
    evals = as_evals(evals)
    out = {}
    for suite in ("task", "general"):
        teacher, base, distilled = (suite_score(evals, label, suite) for label in ("teacher", "base", "distilled"))
        out[suite] = SuiteQuality(
            teacher=teacher,
            base=base,
            distilled=distilled,
            given_up_vs_teacher=None if None in (teacher, distilled) else teacher - distilled,
            change_vs_base=None if None in (base, distilled) else distilled - base,
        )
    return out


def _sum_or_none(*values: float | None) -> float | None:
    return None if any(v is None for v in values) else float(sum(values))


def _notes(teacher: TeacherGeneration, basis: dict, throughput: Throughput) -> list[str]:
    notes = []
    if teacher.price_status == "unpriced":
        notes.append("teacher is UNPRICED: its spend is unknown (not $0); set teacher.usd_per_1m_input/output")
    if teacher.price_status == "local":
        notes.append("local teacher: no API bill; its generation compute is not costed")
    if basis["basis"] == "notional":
        notes.append(f"break-even uses a NOTIONAL teacher API price: {basis['description']}")
    if throughput.tokens_per_s is None:
        notes.append(f"student throughput not measured: {throughput.reason}")
    else:
        notes.append(f"student throughput measured on {throughput.device} here, batch of {throughput.batch_size}")
    return notes
