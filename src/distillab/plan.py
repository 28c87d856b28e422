"""`distillab plan CONFIG`: should I distill, from which teacher, with how much? Answered before the bill.

For each candidate teacher ([teacher], then each [[plan.teachers]] table and `--teacher` option: settings over
[teacher]'s) and each share of [plan] fractions, a pilot:
- its prompts are the train prompts whose seeded hash falls under the share, so every smaller pilot's prompts are
  inside every larger one's and the teacher answers each prompt once for all of them;
- it generates through the run's own request cache (the pilot's teacher.sqlite is a link to the run's), so a later
  full run never pays for a pilot's answers again;
- it trains on the config's schedule scaled with its data ([plan] scale_steps: max_steps and save_steps x its share of
  the prompts, i.e. the full run's epochs), so a pilot costs its share of the full run's training;
- its student is scored on the dev split (task and general), every item's score kept.
A pilot is a run directory of its own (RunDir.pilot: plan/<teacher>/pilot_<share>/) and its steps are stages
through run_stage: a killed plan resumes where it stopped, a finished one reruns nothing, and a changed config
reruns what it changes.

Once for all pilots, as stages of the run itself: the base student on dev (what a general change is measured from),
the teacher's test task score when the quality floor is a share of it and the run has no eval/teacher.json yet (the
score the full run's verdict will use: the lab teacher was pretrained on dev, so its dev score would flatter it), and
a pilot student's serving speed (the break-even's). distillab.plan_curve fits the curves and projects each [plan]
size; plan.json holds it all, the CLI prints it and the report draws it.

[plan] max_usd bounds the pilots' teacher spend, every candidate together. Before anything is asked, each pilot's
spend is projected as an upper bound (its prompts' tokens by the student's tokenizer, every answer max_new_tokens
long, every draw [verify] may make): the largest shares are dropped until the largest pilot left fits (the smaller
ones are inside it, already paid), and a plan whose two smallest pilots do not fit is refused. Each candidate's
generate is then held to its part of max_usd by the BudgetGuard (teacher.max_usd). The teacher's own test score
is not in it: the full run pays for that too.

Many prompts of a user's file have no dev split of their own: the plan holds out retain.dev_fraction of them (by a
stable hash, retain.split_dev_prompts), never in a pilot, answered once for every candidate by one reference (the
prompts' own answers when each has one, else [teacher]) and scored by word F1 as retain scores its candidates.
"""

from __future__ import annotations

import hashlib
import math
import os
import re
import time
import tomllib
import warnings
from dataclasses import dataclass
from pathlib import Path

from distillab import models
from distillab.config import RunConfig, TeacherConfig, from_dict, to_toml
from distillab.costs import human_count, measure_throughput, serving_prompts
from distillab.endpoint_eval import EndpointCompletions
from distillab.errors import UserError
from distillab.evaluate import suite_inputs
from distillab.files import fingerprint, read_json, write_atomic
from distillab.generate import Answerer, DevDataset, TaskDataset, TaskPrompts, generate_stages
from distillab.plan_curve import PilotPoint, PilotScores, PlanRecord, plan_record, scaled_steps, teacher_plan
from distillab.pricing import TeacherPricing
from distillab.records import EvalResult, Throughput, read_eval, write_record
from distillab.retain import dev_suites, split_dev_prompts
from distillab.rundir import RunDir
from distillab.scoring import eval_record, score_model, score_with
from distillab.select import select_stages
from distillab.stage import Stage, StageContext, run_stages
from distillab.train import TrainSummary, train_stage

# ----------------------------------------------------------------------------------------------------
# Which prompts a pilot holds.


def pilot_unit(prompt: str, seed: int) -> float:
    """A number in [0, 1) fixed by the prompt and the seed: a pilot of share f holds the prompts under f."""
    return int.from_bytes(hashlib.sha256(f"plan|{seed}|{prompt}".encode()).digest()[:8], "big") / 2**64


def nested_subset(prompts: list[dict], fraction: float, seed: int) -> list[dict]:
    """The prompts of a pilot of share `fraction`: the round(fraction x D) of the D distinct prompts with the smallest
    seeded hash (each with its repeats), in the prompts' own order. A larger share takes more of the same order, so
    every smaller pilot's prompts are inside it, and a pilot's size is its share exactly, not a draw around it."""
    units = {p["prompt"]: pilot_unit(p["prompt"], seed) for p in prompts}
    held = round(fraction * len(units))
    if not held:
        return []
    cut = sorted(units.values())[held - 1]
    return [p for p in prompts if units[p["prompt"]] <= cut]


class PilotPrompts(TaskPrompts):
    """A pilot's task prompts: the run's split, read and decontaminated once by the plan, its train side cut to the
    pilot's subset (what generate's task and dev datasets answer)."""

    def __init__(self, train: list[dict], dev: list[dict], decontamination: dict | None):
        super().__init__()
        self.train, self.dev, self.record = train, dev, decontamination

    def split(self, cfg: RunConfig) -> tuple[list[dict], list[dict]]:
        return self.train, self.dev

    def decontamination(self, cfg: RunConfig) -> dict | None:
        return self.record


class ReferenceDev(DevDataset):
    """data/dev.parquet of a pilot on a user's prompts: the dev share answered by one reference for every candidate
    teacher, so every candidate is scored against the same answers."""

    def __init__(self, task: TaskPrompts, reference: Answerer):
        super().__init__(task)
        self.reference = reference

    def answerer(self, cfg: RunConfig) -> Answerer:
        return self.reference


# ----------------------------------------------------------------------------------------------------
# The candidate teachers.


@dataclass(frozen=True)
class Candidate:
    label: str  # its pilots' directory: plan/<label>/
    teacher: TeacherConfig


def teacher_label(teacher: TeacherConfig) -> str:
    """A candidate's default name: its model and temperature, as a directory name ("lab-teacher-t0")."""
    name = teacher.model.rstrip("/").rsplit("/", 1)[-1]  # a directory's or a hub id's last part
    return re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip("-.") + f"-t{teacher.temperature:g}"


def with_teacher_options(cfg: RunConfig, options: list[str]) -> RunConfig:
    """The config with each `--teacher key=value,...` option added to [[plan.teachers]]; refused in one line when an
    option is not key=value pairs or names a setting [teacher] lacks."""
    if not options:
        return cfg
    data = cfg.model_dump()
    for option in options:
        table = {}
        for pair in filter(None, (p.strip() for p in option.split(","))):
            key, sep, raw = pair.partition("=")
            if not sep or not key.strip():
                raise UserError(
                    f"--teacher {option!r}: give key=value settings of [teacher], comma-separated "
                    '(e.g. --teacher "temperature=2.0" or --teacher "model=gpt-4o-mini,label=mini")'
                )
            try:
                value = tomllib.loads(f"v = {raw.strip()}")["v"]  # numbers, booleans, quoted strings, lists
            except tomllib.TOMLDecodeError:
                value = raw.strip()  # a bare word: a model name, a URL
            table[key.strip()] = value
        data["plan"]["teachers"].append(table)
    return from_dict(data)


def candidates(cfg: RunConfig) -> list[Candidate]:
    """[teacher] first, then [[plan.teachers]]."""
    found = [Candidate(label=teacher_label(cfg.teacher), teacher=cfg.teacher)]
    for other in cfg.plan.teachers:  # config.RunConfig wrote each one out over [teacher]
        teacher = TeacherConfig.model_validate(other.model_dump(exclude={"label"}))
        found.append(Candidate(label=other.label or teacher_label(teacher), teacher=teacher))
    labels = [c.label for c in found]
    twice = sorted({label for label in labels if labels.count(label) > 1})
    if twice:
        raise UserError(
            f"plan: two candidate teachers are both {twice[0]!r} (the same model and temperature): give them "
            "different settings, or each a label"
        )
    return found


# ----------------------------------------------------------------------------------------------------
# The budget.


def pilot_usd_bound(cfg: RunConfig, teacher: TeacherConfig, prompts: list[dict], tok) -> float | None:
    """An upper bound on what a teacher charges for `prompts`: their tokens by the student's tokenizer, every answer
    max_new_tokens long, every draw [verify] may make; 0 for a local teacher, None when unpriced."""
    with warnings.catch_warnings():  # an unpriced teacher is refused by the caller, in one line
        warnings.simplefilter("ignore")
        pricing = TeacherPricing.from_config(teacher, teacher_is_local=not teacher.base_url)
    if pricing.status in ("local", "unpriced"):
        return 0.0 if pricing.status == "local" else None
    draws = (cfg.verify.max_draws if cfg.verify and cfg.verify.max_draws else None) or teacher.samples_per_prompt
    texts = [p["prompt"] for p in prompts]
    prompt_tokens = sum(len(ids) for ids in tok(texts, add_special_tokens=False)["input_ids"]) if texts else 0
    completion_tokens = len(prompts) * draws * teacher.max_new_tokens
    return pricing.usd_for({"prompt_tokens": prompt_tokens * draws, "completion_tokens": completion_tokens})


def budget_fractions(
    cfg: RunConfig, cands: list[Candidate], train: list[dict], tok
) -> tuple[list[float], str, dict[str, float]]:
    """(the shares to run, the budget in words, each candidate's teacher.max_usd): the largest shares left out until
    the largest pilot's bound, summed over candidates, fits [plan] max_usd."""
    shares = sorted(cfg.plan.fractions)
    limit = cfg.plan.max_usd
    if limit is None:
        return shares, "no [plan] max_usd: every pilot run", {}
    bounds = {}
    for c in cands:
        for share in shares:
            bound = pilot_usd_bound(cfg, c.teacher, nested_subset(train, share, cfg.plan.seed), tok)
            if bound is None:
                raise UserError(
                    f"plan.max_usd needs a price for teacher {c.label} ({c.teacher.model}): set its "
                    "usd_per_1m_input and usd_per_1m_output"
                )
            bounds[c.label, share] = bound

    def cost(share: float) -> float:
        return sum(bounds[c.label, share] for c in cands)

    kept = [share for share in shares if cost(share) <= limit]
    if len(kept) < 2:
        raise UserError(
            f"plan.max_usd ${limit:g} does not cover the two smallest pilots ({shares[0]:.0%} and {shares[1]:.0%} "
            f"of the prompts: up to ${cost(shares[1]):.4f} for {len(cands)} teacher(s)): raise max_usd, or give "
            "smaller [plan] fractions"
        )
    left_out = [f"{s:.0%}" for s in shares if s not in kept]
    words = f"max_usd ${limit:g}: the pilots' teacher spend is at most ${cost(kept[-1]):.4f}"
    words += f"; left out: {', '.join(left_out)} (over the budget)" if left_out else ""
    total = cost(kept[-1])
    guards = {c.label: limit * bounds[c.label, kept[-1]] / total for c in cands} if total > 0 else {}
    return kept, words, guards


# ----------------------------------------------------------------------------------------------------
# The stages a plan adds.


@dataclass
class DevEvaluation:
    """A model on the dev split's task and general suites (retain.dev_suites of `suites`, the pilot whose dev split it
    is), every item's score kept: an EvalResult at RunDir.<where>. A pilot's student ("plan:dev_eval", in the pilot)
    or the base ("plan:base_dev", in the run)."""

    name: str
    model: str
    suites: RunConfig  # the config whose dev split is scored
    where: str  # the RunDir property of its output

    def fingerprint(self, cfg: RunConfig, run: RunDir) -> str:
        task, general, examples = dev_suites(self.suites)
        path = models.resolve_model_path(self.model)
        weights = sorted(f for pattern in ("*.safetensors", "tokenizer*", "chat_template*") for f in path.glob(pattern))
        n, tokens = self.suites.retain.dev_n_per_skill, self.suites.teacher.max_new_tokens
        return fingerprint("dev_eval", task, general, examples, n, tokens, *weights)

    def outputs(self, cfg: RunConfig, run: RunDir) -> list[Path]:
        return [getattr(run, self.where)]

    def run(self, cfg: RunConfig, run: RunDir, ctx: StageContext) -> EvalResult:
        task, general, examples = dev_suites(self.suites)
        ctx.log(f"plan: {self.model} on the dev split")
        model, tok = models.load(self.model)
        began = time.time()
        n, tokens = self.suites.retain.dev_n_per_skill, self.suites.teacher.max_new_tokens
        per_skill = score_model(model, tok, task + general, n, tokens, split="dev", task_examples=examples or None)
        general = general + [s for s in per_skill if s.startswith("dev:general:")]
        res = eval_record(self.model, per_skill, task, general, 0, time.time() - began)
        write_record(getattr(run, self.where), res)
        return res

    def load(self, cfg: RunConfig, run: RunDir) -> EvalResult:
        return read_eval(getattr(run, self.where))


class TeacherTask:
    """plan:teacher_task: the teacher on the test task suite, what the quality floor's share is of (plan/
    teacher_task.json): the local model loaded, an API teacher through its endpoint and the run's cache."""

    name = "plan:teacher_task"

    def fingerprint(self, cfg: RunConfig, run: RunDir) -> str:
        task, _, examples = suite_inputs(cfg)
        asks = cfg.teacher.model_dump(include={"base_url", "model", "mode", "max_new_tokens"})
        return fingerprint("teacher_task", task, examples, cfg.eval.n_per_skill, asks)

    def outputs(self, cfg: RunConfig, run: RunDir) -> list[Path]:
        return [run.plan_teacher_task]

    def run(self, cfg: RunConfig, run: RunDir, ctx: StageContext) -> EvalResult:
        task, _, examples = suite_inputs(cfg)
        ctx.log(f"plan: the teacher ({cfg.teacher.model}) on the test task suite, for the quality floor")
        began, n = time.time(), cfg.eval.n_per_skill
        if cfg.teacher.base_url:
            complete = EndpointCompletions(cfg, log=ctx.log)
            try:
                per_skill = score_with(complete, task, n, "test", examples)
            finally:
                complete.close()
        else:
            model, tok = models.load(cfg.teacher.model)
            per_skill = score_model(model, tok, task, n, cfg.teacher.max_new_tokens, "test", examples)
        res = eval_record(cfg.teacher.model, per_skill, task, [], 0, time.time() - began)
        write_record(run.plan_teacher_task, res)
        return res

    def load(self, cfg: RunConfig, run: RunDir) -> EvalResult:
        return read_eval(run.plan_teacher_task)


@dataclass
class PilotThroughput:
    """plan:throughput: a pilot student's serving speed (the students of every size share one architecture), for
    the projected break-even: plan/throughput.json."""

    pilot: RunConfig
    name: str = "plan:throughput"

    def fingerprint(self, cfg: RunConfig, run: RunDir) -> str:
        student = RunDir(self.pilot.run_dir).student_model_files()
        return fingerprint("throughput", serving_prompts(self.pilot), cfg.teacher.max_new_tokens, *student)

    def outputs(self, cfg: RunConfig, run: RunDir) -> list[Path]:
        return [run.plan_throughput]

    def run(self, cfg: RunConfig, run: RunDir, ctx: StageContext) -> Throughput:
        pilot = RunDir(self.pilot.run_dir)
        measured = measure_throughput(pilot.student, serving_prompts(self.pilot), cfg.teacher.max_new_tokens)
        write_record(run.plan_throughput, measured)
        return measured

    def load(self, cfg: RunConfig, run: RunDir) -> Throughput:
        return Throughput.model_validate(read_json(run.plan_throughput, "delete it and rerun `distillab plan`"))


# ----------------------------------------------------------------------------------------------------
# Pilots.


def pilot_config(cfg: RunConfig, cand: Candidate, fraction: float, share: float, guard: float | None) -> RunConfig:
    """The run config of one pilot: the run's, in plan/<teacher>/pilot_<share>/, with the candidate's teacher (held
    to its part of [plan] max_usd) and the training schedule scaled with the data."""
    data = cfg.model_dump()
    where = RunDir(cfg.run_dir).pilot(cand.label, fraction)
    data.update(name=where.name, runs_dir=str(where.parent))
    data["teacher"] = cand.teacher.model_dump()
    if guard is not None:
        data["teacher"]["max_usd"] = min(guard, cand.teacher.max_usd if cand.teacher.max_usd is not None else math.inf)
    if cfg.plan.scale_steps and cfg.train.max_steps > 0:
        data["train"]["max_steps"] = scaled_steps(cfg, share, 0)
        data["train"]["save_steps"] = max(1, round(cfg.train.save_steps * share))
    return from_dict(data)


def link_cache(cfg: RunConfig, pilot: RunConfig) -> None:
    """The pilot's teacher.sqlite is a link to the run's: one cache for the pilots and the full run (SQLite follows
    the link and keeps its WAL beside the real file). A relative link: the run directory can move."""
    run_cache, pilot_cache = RunDir(cfg.run_dir).cache(), RunDir(pilot.run_dir).cache()
    pilot_cache.parent.mkdir(parents=True, exist_ok=True)
    if not pilot_cache.is_symlink() and not pilot_cache.exists():
        os.symlink(os.path.relpath(run_cache, pilot_cache.parent), pilot_cache)


def pilot_stages(pilot: RunConfig, task: PilotPrompts, reference: Answerer | None) -> list[Stage]:
    """generate (its share of the prompts), train, select (when retain selects) and the dev evaluation."""
    stages = [s for s in generate_stages(pilot) if not isinstance(s, DevDataset)]
    for stage in stages:
        if isinstance(stage, TaskDataset):
            stage.task = task
    dev = [ReferenceDev(task, reference)] if reference else []
    student = str(RunDir(pilot.run_dir).student)
    return [
        *dev,
        *stages,
        train_stage,
        *select_stages(pilot),
        DevEvaluation(name="plan:dev_eval", model=student, suites=pilot, where="dev_eval"),
    ]


def dev_reference(cfg: RunConfig, dev: list[dict]) -> Answerer | None:
    """Who answers a user's dev share (None for lab skills, whose dev split has its own answers)."""
    if not cfg.data.prompts_file:
        return None
    given = all(p.get("answer") is not None for p in dev)
    return Answerer(teacher=cfg.teacher, source="human" if given or cfg.data.source != "teacher" else "teacher")


@dataclass(frozen=True)
class Pilot:
    candidate: Candidate
    fraction: float  # the share asked for
    prompts: int  # the train prompts it holds
    cfg: RunConfig  # its run config (plan/<teacher>/pilot_<share>/)


def pilot_point(pilot: Pilot, total: int, base_general: float | None) -> PilotPoint:
    """What a finished pilot measured, read from its run directory."""
    import pyarrow.parquet as pq

    run = RunDir(pilot.cfg.run_dir)
    made = read_json(run.generate_summary("train")) if run.generate_summary("train").is_file() else {}
    trained = TrainSummary(**read_json(run.train_summary))
    scored = read_eval(run.dev_eval)
    general = scored.general.score
    return PilotPoint(
        fraction=pilot.fraction,
        prompts=pilot.prompts,
        share=pilot.prompts / total,
        steps=trained.steps,
        dev_task=scored.task.score,
        dev_general=general,
        general_change=None if None in (general, base_general) else general - base_general,
        rows=made.get("rows", pq.read_metadata(run.dataset("train")).num_rows),
        prompt_tokens=made.get("prompt_tokens", 0),
        completion_tokens=made.get("completion_tokens", 0),
        usd=made.get("usd", 0.0),
        train_seconds=trained.train_seconds,
        train_tokens=round(trained.steps * step_tokens(pilot.cfg)),
    )


def step_tokens(pilot: RunConfig) -> float:
    """Tokens one training step reads: batch x accumulation x the pilot dataset's mean prompt + completion tokens."""
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    table = pq.read_table(RunDir(pilot.run_dir).dataset("train"), columns=["prompt_ids", "completion_ids"])
    lengths = pc.add(pc.list_value_length(table["prompt_ids"]), pc.list_value_length(table["completion_ids"]))
    return pilot.train.batch_size * pilot.train.grad_accum * pc.mean(lengths).as_py()


def dev_items(res: EvalResult) -> dict[str, list[float]]:
    return {skill: list(score.scores) for skill, score in res.skills.items()}


# ----------------------------------------------------------------------------------------------------
# The plan.


def run_plan(cfg: RunConfig, runner=None, log=print) -> PlanRecord:
    """Every pilot of every candidate teacher, the stages the plan needs once, the projection: plan.json (written
    whole). runner(cfg, stages) -> {stage name: record} runs a list of stages (the CLI passes its own, with
    progress bars)."""
    began = time.time()
    runner = runner or (lambda c, stages: run_stages(stages, c, StageContext(log=log)))
    run = RunDir(cfg.run_dir)
    task = TaskPrompts()
    train, dev = (list(side) for side in task.split(cfg))
    if cfg.data.prompts_file and not dev:  # a user's prompts: a dev share held out of every pilot
        train, dev = split_dev_prompts(train, cfg.retain.dev_fraction)
    reference, decontaminated = dev_reference(cfg, dev), task.decontamination(cfg)
    cands = candidates(cfg)
    fractions, budget, guards = budget_fractions(cfg, cands, train, models.load_tokenizer(cfg.train.student))
    subsets = {fraction: nested_subset(train, fraction, cfg.plan.seed) for fraction in fractions}
    check_subsets(subsets, len(train))
    pilots: dict[str, list[Pilot]] = {}
    for cand in cands:
        for fraction, subset in subsets.items():
            pilot = pilot_config(cfg, cand, fraction, len(subset) / len(train), guards.get(cand.label))
            link_cache(cfg, pilot)
            log(
                f"plan: {cand.label} pilot at {fraction:.0%} of the prompts ({len(subset)} prompts, "
                f"{pilot.train.max_steps if pilot.train.max_steps > 0 else pilot.train.epochs} "
                f"{'steps' if pilot.train.max_steps > 0 else 'epochs'})"
            )
            runner(pilot, pilot_stages(pilot, PilotPrompts(subset, dev, decontaminated), reference))
            write_atomic(RunDir(pilot.run_dir).config, to_toml(pilot))  # a pilot's directory says how it was made
            pilots.setdefault(cand.label, []).append(Pilot(cand, fraction, len(subset), pilot))
    first = pilots[cands[0].label]
    teacher_task = scored_teacher_task(cfg)
    once: list[Stage] = [
        DevEvaluation(name="plan:base_dev", model=cfg.train.student, suites=first[0].cfg, where="plan_base_dev"),
        PilotThroughput(pilot=first[-1].cfg),
    ]
    if teacher_task is None and cfg.eval.min_task_score is None and cfg.eval.score_teacher:
        once.append(TeacherTask())
    done = runner(cfg, once)
    if TeacherTask.name in done:
        teacher_task = done[TeacherTask.name].task.score
    base = done["plan:base_dev"]
    points = {label: [pilot_point(p, len(train), base.general.score) for p in run] for label, run in pilots.items()}
    every = [p for run in points.values() for p in run]
    seconds_per_token = sum(p.train_seconds for p in every) / max(1, sum(p.train_tokens for p in every))
    plans = []
    for cand in cands:
        measured = pilots[cand.label]
        evals = [read_eval(RunDir(p.cfg.run_dir).dev_eval) for p in measured]
        scores = PilotScores(
            shares=[p.share for p in points[cand.label]],
            per_skill=[dev_items(e) for e in evals],
            base=dev_items(base),
            task=evals[0].suites.task,
            general=evals[0].suites.general,
        )
        plans.append(
            teacher_plan(
                cfg,
                cand.label,
                cand.teacher,
                points[cand.label],
                scores,
                len(train),
                teacher_task,
                done[PilotThroughput.name],
                step_tokens(measured[-1].cfg),
                seconds_per_token,
            )
        )
    base_scores = {"task": base.task.score, "general": base.general.score}
    record = plan_record(cfg, len(train), fractions, budget, base_scores, plans, time.time() - began)
    write_record(run.plan_record, record)
    return record


def check_subsets(subsets: dict[float, list[dict]], total: int) -> None:
    """Every pilot holds a prompt, and the pilots are of two sizes or more: else no curve can be fitted."""
    for fraction, subset in subsets.items():
        if not subset:
            raise UserError(
                f"plan: a {fraction:.0%} pilot holds none of the {total} train prompts: give larger [plan] fractions"
            )
    if len({len(s) for s in subsets.values()}) < 2:
        raise UserError(
            f"plan: every pilot holds the same {len(next(iter(subsets.values())))} of the {total} train prompts: "
            "give [plan] fractions further apart (or more prompts)"
        )


def scored_teacher_task(cfg: RunConfig) -> float | None:
    """The teacher's test task score from the run's own eval/teacher.json, when a full run already scored it."""
    path = RunDir(cfg.run_dir).eval("teacher")
    return read_eval(path).task.score if path.is_file() else None


# ----------------------------------------------------------------------------------------------------
# The terminal.


def print_plan(record: PlanRecord, path: Path | None = None, console=None) -> None:
    """A table of projections per candidate teacher, then where its curve flattens, which size meets the floor,
    and the teachers' ranking."""
    from rich.console import Console
    from rich.table import Table

    console = console or Console()
    console.print(
        f"plan {record.run}: {len(record.fractions)} pilots ({', '.join(f'{f:.0%}' for f in record.fractions)} of "
        f"{record.prompts:,} train prompts), scored on the dev split; base: task {record.base_dev_task:.3f}, "
        f"general {record.base_dev_general:.3f}; {record.budget}",
        markup=False,
        highlight=False,
    )
    for plan in record.teachers:
        table = Table(
            "prompts",
            "steps",
            "task [95%]",
            "general change [95%]",
            "teacher $ sync / batch",
            "train h / $",
            "verdict",
            title=f"{plan.label}: {plan.model} at temperature {plan.temperature:g} ({plan.price})",
        )
        for p in plan.projections:
            table.add_row(
                f"{p.prompts:,} ({p.share:.0%})",
                str(p.steps),
                f"{p.task:.3f} {_band(p.task_band)}",
                f"{p.general_change * 100:+.1f} pts {_band(p.general_change_band, 100, '+.1f')}",
                f"{_usd(p.teacher_usd)} / {_usd(p.teacher_usd_batch)}",
                f"{p.train_hours:.3g} h / {_usd(p.train_usd)}",
                _short_verdict(p),
            )
        console.print(table)
        measured = "; ".join(
            f"{p.prompts} prompts, {p.steps} steps: task {p.dev_task:.3f}, general {p.general_change * 100:+.1f} pts"
            for p in plan.pilots
        )
        for line in (f"pilots (dev): {measured}", plan.flattens, plan.meets, plan.caution):
            if line:
                console.print(line, markup=False, highlight=False)
    console.print(record.ranking, markup=False, highlight=False)
    if path is not None:
        console.print(f"plan: {path}", markup=False, highlight=False)


def _short_verdict(p) -> str:
    """The break-even in a table cell; plan.json keeps the sentence."""
    be = p.break_even
    if be.status == "pays_off":
        return f"pays off after {human_count(be.queries)} queries"
    if be.status == "immediately":
        return "pays off from the first query"
    if be.status == "below_floor":
        floor = p.floor
        if floor.task is not None and floor.required_task is not None and floor.task < floor.required_task:
            return f"does not replace the teacher: projected {floor.task:.2f} < {floor.required_task:.2f} required"
        return f"does not replace the teacher: general {p.general_change * 100:+.1f} pts"
    return "never pays off" if be.status == "never" else "unknown"


def _band(band: list, scale: float = 1.0, spec: str = ".3f") -> str:
    lo, hi = band
    if lo is None or hi is None or math.isnan(lo) or math.isnan(hi):
        return ""
    return f"[{lo * scale:{spec}}, {hi * scale:{spec}}]"


def _usd(x: float | None) -> str:
    if x is None:
        return "unpriced"
    return f"${x:.4f}" if x < 1 else f"${x:,.2f}"
