"""Stage 1, generate: prompts -> teacher -> request cache -> the datasets, streamed.

Prompts come from lab skills (train split) or a prompts file (distillab.prompts). A conversation's final
assistant turn is its reference answer; the teacher answers the user turn before it (distillab.chat renders it
for each model, the student's rows included). Who writes the completions is the config's `data.source`: the
teacher (through the cache), the lab's ground truth, or the answers a user brought ("human").

The stages (generate_stages), each through stage.run_stage, which checks, skips and stamps:
  generate:dev      a user's prompts hold out a dev share when retain selects: answered like the task
  generate:train    data/train.parquet: the task prompts answered
  sampled_prompts   general prompts the base model writes itself, when replay has no others
  generate:replay   data/replay.parquet: the general prompts answered by retain.replay_source
A dataset stage's fingerprint is its plan (pass 1): every chunk's request keys, read from the prompts once and
kept on the stage for its run.

Streaming. The prompts are cut into chunks of CHUNK_ROWS rows (a row: one prompt's sample). Requests are read
from the chunks only as the teacher has room for them (its concurrency bounds what is in flight), and every
answer is committed to the cache as it comes. When every request of a chunk is answered, its rows are written
as one Parquet part (distillab.shards), atomically, named by a digest of the chunk's request keys and the
student tokenizer. A chunk with a failed request is written as `-partial` (its answered rows count; a rerun asks
its failures again and replaces it). Memory follows the chunk and the requests in flight, not the dataset.
Killing this stage at any moment and rerunning it skips every chunk whose part exists and asks the teacher only
for what the cache does not hold.

The dataset is the part set: dataset.read_dataset(data/<name>.parquet) reads the file, else every part in
data/<name>/. A single process (shard 0/1) merges its parts into data/<name>.parquet at the end; the merged file names
the parts it holds, so a rerun that would write the same ones writes nothing (a lost summary or stamp is made again
without touching the rows training fingerprints).

Many machines: `--shard I/N` takes the prompts whose hash is I mod N (shards.in_shard), with every sample of a
prompt; each process writes only its own part-I-of-N files, its own request cache (RunDir.cache(shard): SQLite's
WAL must not be shared over a network filesystem) and its own summary; data/generate_summary.json sums every
shard's summary so far. A merge is just reading all parts. Shard runs stamp no dataset in stages.json (a shared
file) and leave no merged file; the sampled general prompts, the same for every shard, run as in a whole run
(stamped), so a shard process that finds them done reads them back. Every process reads the other splits' caches
(shards.RunCaches), one split runs a stage at a time, and a shard run that finds a whole run's merged file up to date
has nothing to do (one made from other prompts is refused, never removed): see distillab.shards.

Before the first request: every prompt is checked while planning (PromptChecks: empty user turns, the student's
template against each form), and what later stages would refuse is checked before the first stage asks anything
(_check_before_asking: the dev share's and train share's prompts, retain's general prompts file and its forms).

samples_per_prompt (temperature > 0): each sample is its own request (keyed with "sample": s from the second
on) and its own row, with a `sample` column.

[verify] (distillab.verify, the task dataset only): a chunk holds whole prompts (all their samples). When its answers
are in, each sample is judged (Verifying); a prompt none of whose samples verified gets its next samples as extra
requests of the same chunk, queued between chunks (or sent after the stream when it has ended), until one verifies
or max_draws is reached. Then the chunk is written: its kept samples as its rows, its rejected ones as its part of
data/rejected/ (merged into data/rejected.parquet). A re-draw is keyed like any sample, so a rerun reads it from the
cache; a chunk written by an earlier run is counted again from the cache (its verdicts and re-draws), nothing sent.
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import itertools
import json
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

from distillab import chat, models, provenance, reasoning, retain, verify
from distillab.cache import BILLING_KEYS, RequestCache, request_key
from distillab.config import THINK_TAGS, TRACE_FORMAT, RunConfig, TeacherConfig, VerifyConfig
from distillab.decontaminate import decontaminate
from distillab.errors import UserError
from distillab.files import fingerprint, read_json, set_aside_if_corrupt, write_json
from distillab.files import lock as files_lock
from distillab.general_prompts import SampledPrompts, general_prompts
from distillab.pricing import BudgetGuard
from distillab.prompts import prompt_stream
from distillab.rundir import WHOLE, RunDir
from distillab.shards import RunCaches, ShardFiles, in_shard, refuse_other_splits
from distillab.stage import Stage, StageContext, run_stages
from distillab.teachers import failure_digest

CHUNK_ROWS = 2048  # rows a part holds: the unit of writing and of resuming


@dataclass
class GenerateSummary:
    rows: int = 0
    requests_sent: int = 0
    cached: int = 0
    failed: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    reasoning_tokens: int = 0  # of completion_tokens: a reasoning teacher's traces (distillab.reasoning)
    usd: float | None = 0.0  # None: the teacher is unpriced
    skipped: bool = False
    # url -> {answered, prompt/completion tokens} of the dataset's requests it answered (now or in an earlier run),
    # and this run's errors: the tokens add up to prompt_tokens / completion_tokens (PendingChunks.count)
    endpoints: dict = field(default_factory=dict)
    # False: a request failed for good, or no row was this shard's: not stamped, so a rerun asks again
    complete: bool = True
    verification: dict | None = None  # [verify]: records.Verification's JSON (yield, re-draws, $ per kept example)
    decontamination: dict | None = None  # [decontaminate]: decontaminate.Decontamination's JSON (the task prompts)


def generate_stages(cfg: RunConfig) -> list[Stage]:
    """The stages that write a run's datasets, in order: the dev share of a user's prompts (when retain selects),
    the task dataset, and the retain replay set (after the general prompts the base model writes, when it has to)."""
    task = TaskPrompts()
    stages: list[Stage] = []
    if cfg.retain.selects and cfg.data.prompts_file:
        stages.append(DevDataset(task))
    stages.append(TaskDataset(task))
    if cfg.retain.replay_fraction > 0:
        if retain.general_prompt_source(cfg) == "sampled":
            stages.append(SampledPrompts())
        stages.append(ReplayDataset())
    return stages


def run_generate(cfg: RunConfig, progress=None, log=print, shard: tuple[int, int] = WHOLE) -> GenerateSummary:
    """The generate stages through run_stage; the task dataset's record. shard: (I, N) for `generate --shard I/N`
    (module docstring)."""
    records = run_stages(generate_stages(cfg), cfg, StageContext(log=log, progress=progress, shard=shard))
    return records[TaskDataset.name]


# ----------------------------------------------------------------------------------------------------
# The stages.


@dataclass(frozen=True)
class Answerer:
    """Who writes a dataset's completions: the teacher `teacher` describes (source "teacher", through the run's
    request cache) or the answers the prompts carry; `label` overrides the provenance teacher id."""

    teacher: TeacherConfig
    source: str
    label: str | None = None
    verify: VerifyConfig | None = None  # [verify]: only the samples that pass are kept (distillab.verify)

    @property
    def by_teacher(self) -> bool:
        return self.source == "teacher"


@dataclass
class DatasetPlan:
    """Pass 1, from the prompts alone: each chunk's digest (its part's name) and the stamp they make; for a
    teacher, what the cache holds. Nothing is asked and nothing written."""

    files: ShardFiles
    answerer: Answerer
    chunks: Callable  # () -> this shard's rows, [(prompt record, sample)] lists of CHUNK_ROWS
    student_tok: object
    digests: list[str] = field(default_factory=list)
    fingerprint: str = ""
    rows: int = 0  # given answers: this shard's rows
    teacher: object = None  # the teacher's client (source "teacher")
    salt: str = ""  # what besides the request keys decides a part's rows
    cached: int = 0  # distinct requests a chunk asks that the cache holds, summed over chunks
    missing: int = 0  # ... and that it lacks
    prior: dict = field(default_factory=lambda: _zero_usage())  # what the cached answers cost
    verifiers: verify.Verifiers | None = None  # [verify] (built while planning: a bad module:function costs nothing)
    checks: PromptChecks | None = None  # every prompt checked while planning (empty turns, the student's template)
    decontamination: dict | None = None  # [decontaminate]'s record of the prompts (the task dataset's)

    def keys(self, chunk) -> list[str]:
        return [request_key(ask(self.teacher, p, s)) for p, s in chunk]


class AnsweredDataset:
    """data/<dataset>.parquet (or its parts): prompts answered by an Answerer. A subclass says which prompts and
    who answers; the plan (pass 1) is the fingerprint, kept from fingerprint() for the run() or load() after it."""

    name: str  # the stage's name in stages.json
    dataset: str  # data/<dataset>.parquet
    sharded = True

    def __init__(self):
        self._planned: tuple | None = None  # (cfg, shard, plan) of the last fingerprint(), not yet used

    def prompts(self, cfg: RunConfig, run: RunDir) -> Iterable[dict]:
        raise NotImplementedError

    def answerer(self, cfg: RunConfig) -> Answerer:
        raise NotImplementedError

    def prompts_file(self, cfg: RunConfig) -> str:
        """Where the prompts come from, as errors name it: their file, or the lab's skills."""
        return cfg.data.prompts_file or "data.skills"

    def fingerprint(self, cfg: RunConfig, run: RunDir) -> str:
        # run_stage holds this whole run's lock: no other split may run beside it (its caches are read while planning)
        refuse_other_splits(run, self.name, WHOLE)
        return self.planned_fingerprint(cfg, run)

    def planned_fingerprint(self, cfg: RunConfig, run: RunDir) -> str:
        """The whole prompt set's plan (pass 1) as a stamp; the plan kept for the run() or load() after it."""
        plan = self._plan(cfg, run, WHOLE)
        self._planned = (cfg, WHOLE, plan)
        return plan.fingerprint

    def outputs(self, cfg: RunConfig, run: RunDir) -> list[Path]:
        summary = [run.generate_summary(self.dataset)] if self.answerer(cfg).by_teacher else []
        # a corrupt summary is set aside by the stage contract (stage.run_stage); the stage then runs again and
        # writes it anew from the cache and the dataset as they are (nothing asked: shards.ShardFiles.merged_current)
        return [run.dataset(self.dataset), *summary]

    def run(self, cfg: RunConfig, run: RunDir, ctx: StageContext) -> GenerateSummary:
        refuse_other_splits(run, self.name, ctx.shard)
        if ctx.shard != WHOLE and run.dataset(self.dataset).is_file():
            return self._made_by_whole_run(cfg, run, ctx)
        plan = self._take_plan(cfg, run, ctx.shard)
        if plan.answerer.by_teacher:
            return _answer_by_teacher(cfg, run, plan, ctx)
        return _write_given_answers(cfg, plan)

    def load(self, cfg: RunConfig, run: RunDir) -> GenerateSummary:
        """An up-to-date dataset's record: what the finished run counted (not a fresh $0), and what the cache
        holds now."""
        plan = self._take_plan(cfg, run, WHOLE)
        if not plan.answerer.by_teacher:
            return GenerateSummary(rows=plan.rows, decontamination=plan.decontamination)
        last = read_json(run.generate_summary(self.dataset))
        return GenerateSummary(
            rows=last["rows"],
            cached=plan.cached,
            prompt_tokens=last["prompt_tokens"],
            completion_tokens=last["completion_tokens"],
            reasoning_tokens=last.get("reasoning_tokens", 0),
            usd=last["usd"],
            verification=last.get("verification"),
            decontamination=plan.decontamination,
        )

    def _made_by_whole_run(self, cfg: RunConfig, run: RunDir, ctx: StageContext) -> GenerateSummary:
        """A shard run finding data/<dataset>.parquet, a whole run's rows: when that run finished under these prompts
        and settings (its stamp), they hold this shard's rows too, and nothing is asked or written; otherwise
        refused. Never removed: they are another run's rows."""
        path = run.dataset(self.dataset)
        if run.stamps().get(self.name) != self.planned_fingerprint(cfg, run):
            raise UserError(
                f"{path} holds the rows of a whole run made from other prompts or settings, or not finished: rerun "
                "without --shard to bring it up to date, or move it away to split the run (cached answers are "
                "read, not asked again)"
            )
        ctx.log(
            f"generate {self.dataset}: {path} (a whole run's, up to date) holds shard {ctx.shard[0]}/{ctx.shard[1]}'s "
            "rows: nothing to ask"
        )
        return dataclasses.replace(self.load(cfg, run), skipped=True)

    def _take_plan(self, cfg: RunConfig, run: RunDir, shard: tuple[int, int]) -> DatasetPlan:
        planned, self._planned = self._planned, None
        if planned is not None and planned[0] is cfg and planned[1] == shard:
            return planned[2]
        return self._plan(cfg, run, shard)

    def _plan(self, cfg: RunConfig, run: RunDir, shard: tuple[int, int]) -> DatasetPlan:
        prompts, answerer = self.prompts(cfg, run), self.answerer(cfg)
        files = ShardFiles(run, self.dataset, shard)
        files.check_layout()
        samples = answerer.teacher.samples_per_prompt if answerer.by_teacher else 1
        verifying = answerer.by_teacher and answerer.verify is not None
        # verified: a prompt's samples share one chunk, which settles them (and their re-draws) together
        size = max(samples, CHUNK_ROWS - CHUNK_ROWS % samples) if verifying else CHUNK_ROWS

        def chunks():
            rows = ((p, s) for p in prompts if in_shard(p["prompt"], shard) for s in range(samples))
            return iter(lambda: list(itertools.islice(rows, size)), [])

        student_tok = models.load_tokenizer(cfg.train.student)
        plan = DatasetPlan(
            files=files,
            answerer=answerer,
            chunks=chunks,
            student_tok=student_tok,
            verifiers=verify.Verifiers(answerer.verify, answerer.teacher.think_tags) if verifying else None,
            checks=PromptChecks(student_tok, cfg.train.student, self.prompts_file(cfg)),
        )
        if answerer.by_teacher:
            _plan_teacher(cfg, run, plan, shard, samples)
        else:
            _plan_given_answers(cfg, plan)
        return plan


class TaskPrompts:
    """The run's task prompts, read and checked once for the stages that answer them: (train, dev). A user's
    prompts hold out a dev share when retain selects (split by a stable hash: retain.split_dev_prompts). The train
    share is decontaminated here, before any request is planned (distillab.decontaminate): against the suites the
    run scores, the dev share included; its record says what was checked, dropped or flagged."""

    def __init__(self):
        self._split: tuple | None = None  # (cfg, train, dev, decontamination record or None)

    def split(self, cfg: RunConfig) -> tuple[Iterable[dict], list[dict]]:
        if self._split is None or self._split[0] is not cfg:
            train, dev = _task_prompts(cfg)
            _check_before_asking(cfg, train, dev)
            kept, record = decontaminate(cfg, train, held_out=dev)
            if record is not None and record.checked and record.dropped == record.checked:
                found = ", ".join(f"{suite} {n}" for suite, n in record.contaminated.items() if n)
                raise UserError(
                    f"[decontaminate] dropped every training prompt ({record.checked}): they match the "
                    f"suites this run scores ({found or 'duplicates'}); give prompts that are not "
                    'test items, or set [decontaminate] action = "flag" (or enabled = false) to keep them'
                )
            self._split = (cfg, kept, dev, record)
        return self._split[1], self._split[2]

    def decontamination(self, cfg: RunConfig) -> dict | None:
        """[decontaminate]'s record of the train share (None: off)."""
        self.split(cfg)
        return None if self._split[3] is None else self._split[3].to_dict()


class TaskDataset(AnsweredDataset):
    """data/train.parquet: the task prompts answered by data.source. [decontaminate]'s record of them is part of
    the fingerprint (a changed eval suite plans again) and is written beside the dataset (data/decontamination.json)
    and into its generate_summary.json."""

    name, dataset = "generate:train", "train"

    def __init__(self, task: TaskPrompts):
        super().__init__()
        self.task = task

    def prompts(self, cfg: RunConfig, run: RunDir) -> Iterable[dict]:
        return self.task.split(cfg)[0]

    def decontamination(self, cfg: RunConfig) -> dict | None:
        return self.task.decontamination(cfg)

    def planned_fingerprint(self, cfg: RunConfig, run: RunDir) -> str:
        planned, record = super().planned_fingerprint(cfg, run), self.decontamination(cfg)
        return planned if record is None else fingerprint(planned, record)

    def outputs(self, cfg: RunConfig, run: RunDir) -> list[Path]:
        record = [run.decontamination] if self.decontamination(cfg) is not None else []
        return [*super().outputs(cfg, run), *record]

    def run(self, cfg: RunConfig, run: RunDir, ctx: StageContext) -> GenerateSummary:
        summary = super().run(cfg, run, ctx)
        if summary.decontamination is not None:
            write_json(run.decontamination, summary.decontamination)
        return summary

    def _plan(self, cfg: RunConfig, run: RunDir, shard: tuple[int, int]) -> DatasetPlan:
        plan = super()._plan(cfg, run, shard)
        plan.decontamination = self.decontamination(cfg)
        return plan

    def answerer(self, cfg: RunConfig) -> Answerer:
        return Answerer(teacher=cfg.teacher, source=cfg.data.source, verify=cfg.verify)


class DevDataset(TaskDataset):
    """data/dev.parquet: the dev share of a user's prompts, answered like the task (retain scores candidates on it)."""

    name, dataset = "generate:dev", "dev"

    def prompts(self, cfg: RunConfig, run: RunDir) -> Iterable[dict]:
        return self.task.split(cfg)[1]

    def decontamination(self, cfg: RunConfig) -> dict | None:
        return None  # the dev share is what selection scores: the train share is checked against it

    def answerer(self, cfg: RunConfig) -> Answerer:
        return Answerer(teacher=cfg.teacher, source=cfg.data.source)  # dev is scored against, never verified


class ReplayDataset(AnsweredDataset):
    """data/replay.parquet: the general prompts answered by retain.replay_source: the frozen base student (its own
    top-k: self-distillation), the teacher, or the answers a general prompts file carries."""

    name, dataset = "generate:replay", "replay"

    def prompts(self, cfg: RunConfig, run: RunDir) -> list[dict]:
        retain.check_retain(cfg)  # a general prompts file's lines read and checked (their answers, for "dataset")
        return general_prompts(cfg, run)

    def prompts_file(self, cfg: RunConfig) -> str:
        return cfg.retain.general_prompts_file or f"retain's general prompts ({retain.general_prompt_source(cfg)})"

    def answerer(self, cfg: RunConfig) -> Answerer:
        if cfg.retain.replay_source == "dataset":
            return Answerer(teacher=cfg.teacher, source="human")
        if cfg.retain.replay_source == "teacher":
            return Answerer(teacher=cfg.teacher, source="teacher")
        base = cfg.teacher.model_copy(
            update={  # the frozen base student answers: local, greedy, free
                "model": cfg.train.student,
                "base_url": None,
                "api_key_env": None,
                "mode": "completions",
                "max_usd": None,
                "usd_per_1m_input": None,
                "usd_per_1m_output": None,
                "temperature": 0.0,
            }
        )
        return Answerer(teacher=base, source="teacher", label=f"{cfg.train.student} (self)")


# ----------------------------------------------------------------------------------------------------
# The prompts.


def _task_prompts(cfg: RunConfig) -> tuple[Iterable[dict], list[dict]]:
    if cfg.retain.enabled:
        retain.check_retain(cfg)
    prompts = prompt_stream(cfg)
    if next(iter(prompts), None) is None:
        raise UserError("no prompts: data.skills is empty and data.prompts_file is not set")
    if cfg.data.source == "teacher" and not cfg.teacher.base_url:
        prompts = fit_teacher_context(cfg, list(prompts))
    if cfg.retain.selects and cfg.data.prompts_file:  # a user's prompts: hold out a dev share, answered alike
        return retain.split_dev_prompts(list(prompts), cfg.retain.dev_fraction)
    return prompts, []


def fit_teacher_context(cfg: RunConfig, prompts: list[dict]) -> list[dict]:
    """A local teacher's context must hold prompt + max_new_tokens. Longer prompts are refused, naming their
    lines, before any request; with data.truncate = "left" they keep their last tokens instead."""
    from transformers import AutoConfig

    path = models.check_model_dir(cfg.teacher.model)  # a broken directory is a one-line error, before anything
    text_config = AutoConfig.from_pretrained(str(path), local_files_only=True).get_text_config()
    context = getattr(text_config, "max_position_embeddings", None)
    if not context:
        return prompts
    tok = models.load_tokenizer(cfg.teacher.model)
    room = context - cfg.teacher.max_new_tokens
    if room < 1:
        raise UserError(
            f"teacher.max_new_tokens {cfg.teacher.max_new_tokens} fills the teacher's whole context ({context} tokens)"
        )
    # what the teacher is asked: the prompt through its own chat template, if it has one
    lengths = [len(ids) for ids in tok([chat.render_prompt(tok, chat.turns_of(p)) for p in prompts])["input_ids"]]
    too_long = [i for i, n in enumerate(lengths) if n > room]
    if not too_long:
        return prompts
    # a conversation is not cut: which turns to drop is the user's call
    if cfg.data.truncate == "left" and not any(prompts[i].get("messages") for i in too_long):
        out = list(prompts)
        for i in too_long:
            ids = tok(prompts[i]["prompt"], add_special_tokens=False)["input_ids"]
            keep = room - (lengths[i] - len(ids))  # room left after the special tokens and the template's text
            out[i] = prompts[i] | {"prompt": tok.decode(ids[-keep:])}
        return out
    where = cfg.data.prompts_file or "data.skills"
    lines = ", ".join(str(prompts[i].get("line", i + 1)) for i in too_long[:10]) + (
        " ..." if len(too_long) > 10 else ""
    )
    fix = (
        "drop their earliest turns (conversations are not truncated)"
        if any(prompts[i].get("messages") for i in too_long)
        else 'shorten them, or set [data] truncate = "left"'
    )
    raise UserError(
        f"{where}: {len(too_long)} prompt(s) do not fit the teacher's context ({context} tokens, "
        f"{cfg.teacher.max_new_tokens} kept for the answer): line(s) {lines}; {fix}"
    )


# ----------------------------------------------------------------------------------------------------
# Pass 1, the plan.


def _plan_teacher(cfg: RunConfig, run: RunDir, plan: DatasetPlan, shard: tuple[int, int], samples: int) -> None:
    """Every chunk's request keys -> its digest and the stamp; what the cache holds of them. A conversation the
    student cannot render is refused here, before any request."""
    from distillab.teachers import make_teacher

    plan.teacher = make_teacher(plan.answerer.teacher)
    plan.salt = f"{cfg.train.student}|{plan.answerer.label}|{samples}" + _trace_salt(cfg, plan.answerer)
    if plan.answerer.teacher.base_url and plan.answerer.teacher.tokenizer:  # it reads the ids: it makes the rows
        plan.salt += f"|teacher_tokenizer:{plan.answerer.teacher.tokenizer}"
    if plan.verifiers:  # what is kept depends on the verifiers (a user's function's source included)
        plan.salt += f"|verify:{plan.verifiers.fingerprint()}"
    stamp = hashlib.sha256(plan.salt.encode())
    caches = RunCaches(run, shard, create=False)  # planning creates nothing: an absent cache holds nothing
    cache = caches if caches.all else None
    try:
        for chunk in plan.chunks():
            for p, _ in chunk:
                plan.checks.check(p)
                if plan.verifiers:
                    plan.verifiers.check_prompt(p)
            keys = plan.keys(chunk)
            plan.digests.append(_digest(plan.salt, keys + _marks(chunk)))
            stamp.update(plan.digests[-1].encode())
            unique = list(dict.fromkeys(keys))
            held = cache.cached_keys(unique) if cache else set()
            plan.cached += len(held)
            plan.missing += len(unique) - len(held)
            if cache:
                _add_usage(plan.prior, _billed(cache, unique))
    finally:
        caches.close()
    plan.fingerprint = stamp.hexdigest()[:16]


def _served_teacher_tokenizer(run: RunDir, plan: DatasetPlan, log):
    """The preflight of a served teacher asked for top-k, before any request: the tokenizer that reads the token ids
    it returns (teacher.tokenizer's directory; else the endpoint's own, fetched once into the run directory), and
    whether its top-k can be aligned onto the student's tokens (crosstok.probe on the first prompts): a refusal in one
    line when it cannot (a tokenizer that does not give its text back, or no span shared); a line saying what to
    expect otherwise. None: a teacher asked for
    no top-k, a local one (crosstok.Aligner loads its own), or a tokenizer unknown (said in one line: ids that are not
    the student's would then be left out)."""
    from distillab import crosstok
    from distillab.teachers.openai_compat import fetch_tokenizer

    teacher_cfg = plan.answerer.teacher
    if not teacher_cfg.base_url or not teacher_cfg.top_k_logprobs:
        return None
    fetched = run.teacher_tokenizer(teacher_cfg.model)
    where = teacher_cfg.tokenizer
    if where in (None, "served"):
        with files_lock(fetched.parent / f"{fetched.name}.lock"):  # shard runs in one run fetch it once, not at once
            came_from = str(fetched) if fetched.is_dir() else fetch_tokenizer(plan.teacher, fetched)
        if came_from is None and where == "served":
            raise UserError(
                'teacher.tokenizer = "served": no endpoint of teacher.base_url offers its tokenizer (GET '
                "<base_url>/tokenizer); give the served model's tokenizer directory instead"
            )
        if came_from is None:
            log(
                "generate: the served teacher's tokenizer is unknown (teacher.tokenizer is unset and the endpoint "
                "offers none at /tokenizer): token ids it returns that are not the student's cannot be aligned, and "
                "their rows would train on text only; set teacher.tokenizer to its tokenizer directory"
            )
            return None
        where = str(fetched)
    tok = crosstok.load_tokenizer_dir(where, "teacher.tokenizer")
    if tok.get_vocab() == plan.student_tok.get_vocab():  # the student's: its ids are used as they are
        return tok
    texts = [p["prompt"] for p, _ in next(iter(plan.chunks()), [])[:32]]
    given_back, share = crosstok.probe(tok, plan.student_tok, texts)
    if given_back < 0.5 or share == 0:
        why = (
            f"does not decode its own tokens back to the text ({given_back:.0%} of the first prompts)"
            if given_back < 0.5
            else "shares no token span with the student's on the first prompts"
        )
        raise UserError(
            f"the teacher's tokenizer ({where}) {why}, so its top-k cannot be aligned onto the student's tokens "
            "(distillab.crosstok): set teacher.top_k_logprobs = 0 to train on its text, or give teacher.tokenizer "
            "the served model's own tokenizer"
        )
    log(
        f"generate: the teacher's tokenizer ({where}) is not the student's: its top-k is aligned by text spans "
        f"({share:.0%} of the student's tokens of the first prompts start and end on the teacher's token bounds)"
    )
    return tok


def _trace_salt(cfg: RunConfig, answerer: Answerer) -> str:
    """How reasoning traces are cut (think_tags) and rendered (trace_format) decides the rows: in a part's digest when
    set otherwise than by default (the defaults add nothing: a run's parts keep their names)."""
    tags, trace_format = answerer.teacher.think_tags, cfg.train.trace_format
    if tuple(tags) == THINK_TAGS and trace_format == TRACE_FORMAT:
        return ""
    return f"|traces:{json.dumps([tags, trace_format])}"


def _plan_given_answers(cfg: RunConfig, plan: DatasetPlan) -> None:
    """Every chunk's digest and the stamp from the records themselves; every answer checked before anything is
    written."""
    source = plan.answerer.source
    salt = json.dumps([cfg.data.model_dump(), cfg.train.student, source]) + _trace_salt(cfg, plan.answerer)
    stamp = hashlib.sha256(salt.encode())
    for i, chunk in enumerate(plan.chunks()):
        plan.rows += len(chunk)
        for j, (p, _) in enumerate(chunk):
            plan.checks.check(p)
            if p["answer"] is None:
                raise UserError(
                    f'data.source = {source!r} needs an "answer" for every prompt '
                    f"(prompt {i * CHUNK_ROWS + j + 1} has none)"
                )
        plan.digests.append(_digest(salt, [json.dumps(p, sort_keys=True) for p, _ in chunk]))
        stamp.update(plan.digests[-1].encode())
    plan.fingerprint = stamp.hexdigest()[:16]


class PromptChecks:
    """What refuses a prompt while planning, before the teacher is paid for rows that could never be trained on: a
    user turn with no text (never sent, never a row), and a prompt the student's chat template refuses (roles it does
    not know, out of order, a system turn it demands). Each conversation is rendered as training renders it (with the
    generation prompt, then with an assistant turn after it); plain prompts (one user turn) once, the template
    treating them all alike. Errors name the prompts file and line (`source`: the file, or what the prompts are)."""

    def __init__(self, student_tok, student: str, source: str):
        self.tok, self.student, self.source = student_tok, student, source
        self.plain_checked = False

    def where(self, p: dict) -> str:
        if p.get("line") is None:  # the lab's prompts
            return self.source
        table = Path(self.source).suffix == ".parquet" or Path(self.source).is_dir()
        return f"{self.source}: {'row' if table else 'prompt line'} {p['line']}"

    def check(self, p: dict) -> None:
        turns = chat.turns_of(p)
        for i, turn in enumerate(turns, 1):
            if turn["role"] == "user" and not turn["content"].strip():
                raise UserError(
                    f"{self.where(p)}: turn {i} (user) is empty: write its text or drop the line (nothing was asked)"
                )
        plain = not p.get("messages")
        if not chat.has_template(self.tok) or (plain and self.plain_checked):
            return
        self.plain_checked |= plain
        try:
            chat.assistant_turn(self.tok, turns, {"role": "assistant", "content": "ok"})
        except chat.TemplateRefused as err:
            detail = str(err).split(": ", 1)[-1]
            if plain:
                raise UserError(
                    f"{self.where(p)}: the student's chat template ({self.student}) refuses a plain prompt (one user "
                    f"turn): {detail}; give prompts as conversations it takes, or a student whose template takes "
                    "them (nothing was asked)"
                ) from None
            raise UserError(f"{self.where(p)}: the student's chat template refused these messages: {detail}") from None


def _check_before_asking(cfg: RunConfig, train: Iterable[dict], dev: list[dict]) -> None:
    """What the stages after the first would refuse, checked before the first asks anything: with a dev share
    (answered first) every task prompt; with replay (answered last) its general prompts. Each dataset's plan checks
    its own prompts again (PromptChecks): a stage run alone is covered too."""
    if not dev and cfg.retain.replay_fraction <= 0:
        return
    student_tok = models.load_tokenizer(cfg.train.student)
    if dev:
        checks = PromptChecks(student_tok, cfg.train.student, cfg.data.prompts_file)  # a dev share: a user's file
        for p in itertools.chain(train, dev):
            checks.check(p)
    if cfg.retain.replay_fraction > 0:
        replay = ReplayDataset()
        checks = PromptChecks(student_tok, cfg.train.student, replay.prompts_file(cfg))
        # the lab's general prompts and the ones the base writes itself are plain prompts
        general = retain.general_prompts_file(cfg) if cfg.retain.general_prompts_file else [{"prompt": "hello"}]
        for p in general:
            checks.check(p)


# ----------------------------------------------------------------------------------------------------
# Pass 2, the work.


def _answer_by_teacher(cfg: RunConfig, run: RunDir, plan: DatasetPlan, ctx: StageContext) -> GenerateSummary:
    """Chunks with a complete part are skipped; the others' uncached requests stream to the teacher, and each
    chunk is written as a part when its last answer comes."""
    from distillab.pricing import TeacherPricing

    files, teacher, teacher_cfg, progress = plan.files, plan.teacher, plan.answerer.teacher, ctx.progress
    name, shard = files.name, ctx.shard
    if not plan.digests:  # every prompt hashed to other shards: nothing written, nothing for a stamp to vouch for
        ctx.log(f"generate {name}: no prompt falls in shard {shard[0]}/{shard[1]}")
        return GenerateSummary(complete=False)
    teacher_tok = _served_teacher_tokenizer(run, plan, ctx.log)  # before any request: refused here, not paid for
    cache = RunCaches(run, shard)  # its own, and every other cache of the run read too: nothing is asked twice
    try:
        files.remove_stale(plan.digests)
        pricing = TeacherPricing.from_config(
            teacher_cfg.model_copy(update={"base_url": (teacher_cfg.urls or [None])[0]}),
            teacher_is_local=not teacher_cfg.base_url,
        )
        # The budget counts what earlier (interrupted) runs already spent on these prompts: a resumed run
        # must not get a fresh max_usd.
        budget = BudgetGuard(teacher_cfg.max_usd, pricing, total=plan.missing, prior_usage=plan.prior)
        verifying = (
            Verifying(plan.verifiers, teacher_cfg.samples_per_prompt, ShardFiles(run, "rejected", shard))
            if plan.verifiers
            else None
        )
        if name == "train" and files.whole and not files.merged_current:
            run.rejected.unlink(missing_ok=True)  # an earlier run's rejections: this run writes its own, or none
        if verifying:
            verifying.rejected.remove_stale(plan.digests)
        pending = PendingChunks(
            cache, teacher, plan.student_tok, files, plan.answerer.label, verifying, cfg.train.trace_format, teacher_tok
        )
        began = time.time()
        if plan.missing:
            # counted a chunk at a time: a prompt repeated in two chunks counts twice here and is asked once
            ctx.log(
                f"generate {name}: {plan.cached} of {plan.cached + plan.missing} cached, asking "
                f"{teacher.teacher_id} for at most {plan.missing}"
            )
            budget.check()
        if progress:
            progress(0, plan.missing, budget)

        def on_done(req, resp, error, latency, attempts):
            key = request_key(req)
            if resp is None:
                cache.put_failure(key, req, error or "unknown error", attempts)
            else:
                cache.put(key, req, resp, latency, attempts)
                budget.add(resp)
            pending.answered(key, resp is not None)
            if progress:
                progress(pending.sent, plan.missing, budget)
            budget.total = plan.missing + pending.redrawn  # [verify]'s re-draws are requests this run sends too
            budget.check()

        asker = teacher  # [teacher] batch: through the Batch API, into the same cache (distillab.teachers.batch)
        if teacher_cfg.batch and teacher_cfg.base_url:
            from distillab.teachers.batch import BatchTeacher

            asker = BatchTeacher(teacher, run.batches(shard), cache.cached_keys, log=ctx.log)

        def send(stream) -> None:
            if teacher_cfg.base_url:  # an endpoint: one stream, read as its workers free up (no stall between chunks)
                first = next(stream, None)  # a fully cached run sends nothing and needs no API key
                if first is not None:
                    asker.answer(itertools.chain([first], stream), on_done)
            else:  # the local backend works a batch at a time anyway: a list per chunk's worth of requests
                for window in iter(lambda: list(itertools.islice(stream, CHUNK_ROWS)), []):
                    teacher.answer(window, on_done)

        send(pending.requests(plan.chunks(), plan.keys, plan.digests))
        while pending.queue:  # [verify]'s re-draws asked for after the stream had ended
            send(pending.redraws())
        pending.close_all()
    finally:
        cache.close()
    if pending.aligner.stats.rows:
        ctx.log(f"generate: the teacher's tokenizer is not the student's: {pending.aligner.stats.line()}")
    if pending.dropped_topk:
        ctx.log(
            f"generate: the teacher's token ids are not the student's tokenizer's in {pending.dropped_topk} rows: "
            "their text was re-tokenized and their top-k logprobs left out (those rows train with SFT only)"
        )
    if pending.traces["topk_dropped"]:
        ctx.log(
            f"generate: {pending.traces['topk_dropped']} of {pending.traces['rows']} rows with a reasoning trace: "
            "the teacher's tokens do not spell the student's rendering of trace + answer (another thinking format "
            "or tokenizer: see [train] trace_format), so their top-k logprobs were left out (SFT on those rows)"
        )
    if verifying and files.whole:
        verifying.rejected.merge()
    if not pending.rows and verifying and not pending.n_failed:  # every sample answered, none verified
        raise UserError(
            f"generate {name}: no sample passed [verify] (0 of {verifying.drawn} verified); the rejected ones "
            f"are in {run.rejected if files.whole else verifying.rejected.dir}: check the verifier and the "
            "reference answers, then rerun (answers are cached)"
        )
    if not pending.rows:  # nothing to train on: fail loudly, write no empty dataset, stamp nothing
        raise UserError(
            f"generate {name}: every teacher request failed ({failure_digest(pending.failures)}); "
            "fix the teacher and rerun: answered requests are cached"
        )
    if files.whole:
        files.merge()
    spent = pricing.usd_for(pending.usage)
    checked = verifying.record(pricing, run, files.whole) if verifying else None
    if set_aside_if_corrupt(files.summary):  # this process's own summary (a shard's): made again below
        ctx.log(f"generate: {files.summary} was corrupt: set aside, written again now")
    previous = read_json(files.summary).get("answer_seconds", 0.0) if files.summary.is_file() else 0.0
    endpoints = pending.endpoints()
    write_json(
        files.summary,
        {
            "rows": pending.rows,
            "failed": pending.n_failed,
            "teacher": teacher_cfg.model,
            "prompt_tokens": pending.usage["prompt_tokens"],
            "completion_tokens": pending.usage["completion_tokens"],
            "reasoning_tokens": pending.usage["reasoning_tokens"],  # of completion_tokens: the teacher's traces
            "cached_tokens": pending.usage["cached_tokens"],  # of prompt_tokens: the endpoint's prompt cache served
            "billing": pricing.billing(pending.usage),  # sent one by one / through the Batch API: requests, tokens, $
            **({"traces": dict(pending.traces)} if pending.traces else {}),  # this run's rows with a trace
            "usd": spent,
            "priced": spent is not None,
            "pricing": pricing.to_dict(),
            "answer_seconds": round(previous + time.time() - began, 2),  # wall time asking, over every resume
            "endpoints": endpoints,  # the requests above by endpoint that answered them; this run's errors
            "failures": pending.failures[:20],
            **({"cross_tokenizer": pending.aligner.stats.to_dict()} if pending.aligner.stats.rows else {}),
            **({"verification": checked} if checked else {}),
            **({"decontamination": plan.decontamination} if plan.decontamination else {}),
        },
    )
    if not files.whole:
        files.combine_summaries(ctx.log)
    return GenerateSummary(
        rows=pending.rows,
        requests_sent=pending.sent,
        cached=plan.cached,
        failed=pending.n_failed,
        prompt_tokens=pending.usage["prompt_tokens"],
        completion_tokens=pending.usage["completion_tokens"],
        reasoning_tokens=pending.usage["reasoning_tokens"],
        usd=spent,
        endpoints=endpoints,
        complete=not pending.n_failed,
        verification=checked,
        decontamination=plan.decontamination,
    )


@dataclass
class Verifying:
    """[verify] in pass 2 (distillab.verify): each chunk's prompts and their draws (request keys, by sample number),
    drawn again while none verified, then split into the kept samples (the chunk's rows) and the rejected ones
    (its part of data/rejected/). Verdicts are read from the cache, so a chunk written by an earlier run is counted
    again (replay) without a request."""

    verifiers: verify.Verifiers
    samples: int  # teacher.samples_per_prompt: a prompt's first draws, and how many a re-draw adds
    rejected: ShardFiles
    stats: verify.VerifyStats = field(default_factory=verify.VerifyStats)

    @property
    def drawn(self) -> int:
        return sum(t.drawn for t in self.stats.skills.values())

    def start(self, chunk: list[tuple[dict, int]], keys: list[str]) -> dict:
        """A chunk's draws by prompt (a prompt's samples_per_prompt rows are consecutive and share the chunk)."""
        n = self.samples
        return {
            "prompts": [p for p, _ in chunk[::n]],
            "draws": [keys[j : j + n] for j in range(0, len(keys), n)],
            "verdicts": [[] for _ in range(0, len(keys), n)],
        }

    def verdicts(self, state: dict, j: int, cache) -> list[bool | None]:
        """Prompt j's verdicts, a draw each (None: no answer), each judged once."""
        record, known = state["prompts"][j], state["verdicts"][j]
        for key in state["draws"][j][len(known) :]:
            resp = cache.get(key, raw_topk=True)
            known.append(None if resp is None else self.verifiers.response(record, resp))
        return known

    def grow(self, state: dict, cache, teacher) -> list[tuple[dict, int, str]]:
        """The chunk's next re-draws, (prompt, sample, key), added to its draws: for each prompt none of whose
        answered draws verified, the next samples_per_prompt up to max_draws (verify.more_draws)."""
        limit = verify.max_draws(self.verifiers.cfg, self.samples)
        added = []
        for j, record in enumerate(state["prompts"]):
            for s in verify.more_draws(self.verdicts(state, j, cache), self.samples, limit):
                key = request_key(ask(teacher, record, s))
                state["draws"][j].append(key)
                state["chunk"].append((record, s))
                state["keys"].append(key)
                added.append((record, s, key))
        return added

    def split(self, state: dict, cache) -> tuple[list, list]:
        """(kept, rejected) ((prompt, sample), key) pairs in prompt and sample order; counted per skill."""
        kept, rejected, by_skill = [], [], {}
        for j, record in enumerate(state["prompts"]):
            verdicts = self.verdicts(state, j, cache)
            keep = set(verify.kept(verdicts, self.verifiers.cfg))
            for s, (key, verdict) in enumerate(zip(state["draws"][j], verdicts)):
                if s in keep:
                    kept.append(((record, s), key))
                elif verdict is False:  # verified samples past the keep policy are neither kept nor rejected
                    rejected.append(((record, s), key))
            self.stats.prompt(record, verdicts, len(keep))
            by_skill.setdefault(verify.skill_of(record), []).extend(state["draws"][j])
        for skill, keys in by_skill.items():
            self.stats.usage(skill, cache.usage(list(dict.fromkeys(keys))))
        return kept, rejected

    def replay(self, chunk: list[tuple[dict, int]], keys: list[str], cache, teacher) -> tuple[int, list[str]]:
        """A written chunk's (rows kept, every draw's key), its draws and verdicts read back from the cache (nothing
        is sent)."""
        state = {"chunk": list(chunk), "keys": list(keys), **self.start(chunk, keys)}
        while self.grow(state, cache, teacher):
            pass  # its re-draws were answered before it was written: the cache holds them
        return len(self.split(state, cache)[0]), state["keys"]

    def record(self, pricing, run: RunDir, whole: bool) -> dict:
        """generate_summary.json's "verification" block (records.Verification)."""
        rejected = run.rejected if whole else self.rejected.dir
        return self.stats.record(self.verifiers, self.samples, pricing.usd_for, str(rejected)).to_dict()


class PendingChunks:
    """Pass 2's bookkeeping: the chunks waiting for answers (each written as a part when its last one comes), and
    the counts of what was written."""

    def __init__(
        self,
        cache,
        teacher,
        tokenizer,
        files: ShardFiles,
        teacher_label: str | None,
        verifying: Verifying | None = None,
        trace_format: str = TRACE_FORMAT,
        teacher_tok=None,  # a served teacher's tokenizer (_served_teacher_tokenizer); a local one's is loaded
    ):
        self.cache, self.teacher, self.tokenizer, self.files = cache, teacher, tokenizer, files
        self.trace_format, self.traces = trace_format, collections.Counter()  # reasoning traces: how rendered, counts
        self.teacher_label, self.verifying = teacher_label, verifying
        self.queue: collections.deque = collections.deque()  # [verify]'s re-draws, waiting to be sent
        self.redrawn = 0  # re-draws queued
        from distillab.crosstok import Aligner  # a teacher with another tokenizer: its top-k aligned by text spans

        self.aligner = Aligner(tokenizer, None if teacher.cfg.base_url else teacher.cfg.model, teacher_tok)
        self.open: dict[int, dict] = {}  # chunk -> {chunk, keys, digest, waiting, failed}
        self.waiters: dict[str, list[int]] = {}  # key in flight -> chunks waiting for it
        self.rows = self.sent = self.n_failed = self.dropped_topk = 0
        self.usage, self.failures = _zero_usage(), []
        self.counted: set[int] = set()  # the requests in usage (a key's first 64 bits): each counted once
        self.by_endpoint: dict[str, dict] = {}  # usage's requests by the endpoint that answered them

    def requests(self, chunks, keyed, digests):
        """The requests to send, chunk by chunk, read only as the teacher takes them ([verify]'s re-draws between
        chunks)."""
        for i, chunk in enumerate(chunks):
            yield from self.redraws()
            keys = keyed(chunk)
            unique = list(dict.fromkeys(keys))
            if self.files.done(i, digests[i]) and self.verifying:  # its rows: the verified samples, counted again
                kept, drawn = self.verifying.replay(chunk, keys, self.cache, self.teacher)
                self.rows += kept
                self.count(drawn)
                continue
            if self.files.done(i, digests[i]):
                self.rows += len(chunk)
                self.count(unique)
                continue
            cached = self.cache.cached_keys(unique)
            waiting = {k for k in unique if k not in cached}
            self.open[i] = {
                "chunk": chunk,
                "keys": keys,
                "digest": digests[i],
                "waiting": waiting,
                "failed": False,
                **(self.verifying.start(chunk, keys) if self.verifying else {}),
            }
            todo = self._wait(i, chunk, keys, waiting)
            if not waiting:
                self.flush(i)
            yield from todo
        yield from self.redraws()

    def redraws(self):
        """[verify]'s re-draws queued so far (more may come as answers settle their chunks)."""
        while self.queue:
            yield self.queue.popleft()

    def _wait(self, i: int, pairs: list[tuple[dict, int]], keys: list[str], waiting: set[str]) -> list[dict]:
        """Chunk i waits for the `waiting` keys among its (prompt, sample) pairs: the requests to send for them (a key
        another chunk already waits for is sent once)."""
        todo = []
        for (p, s), k in zip(pairs, keys):
            if k in waiting and k not in self.waiters:
                todo.append(ask(self.teacher, p, s))
            if k in waiting:
                self.waiters.setdefault(k, [])
                if i not in self.waiters[k]:
                    self.waiters[k].append(i)
        return todo

    def answered(self, key: str, ok: bool) -> None:
        self.sent += 1
        for i in self.waiters.pop(key, []):
            state = self.open[i]
            state["waiting"].discard(key)
            state["failed"] |= not ok
            if not state["waiting"]:
                self.flush(i)

    def flush(self, i: int, final: bool = False) -> None:
        if self.verifying and not final and self._redraw(i):
            return  # the chunk waits for its re-draws
        state = self.open.pop(i)
        failures = self.cache.failures(state["keys"])
        if self.verifying:  # the kept samples are the rows; the rejected ones go to data/rejected/
            kept, rejected = self.verifying.split(state, self.cache)
            rows, dropped = self._rows(kept)
            self.verifying.rejected.write(
                i, state["digest"], self._rows(rejected, counted=False)[0], complete=not failures
            )
        else:
            rows, dropped = self._rows(list(zip(state["chunk"], state["keys"])))
        self.files.write(i, state["digest"], rows, complete=not failures)
        self.rows += len(rows)
        self.dropped_topk += dropped
        self.n_failed += len(failures)
        self.failures += failures[: max(0, 20 - len(self.failures))]
        self.count(state["keys"])

    def count(self, keys: list[str]) -> None:
        """Add to usage the cached requests among keys not counted yet (a prompt in two chunks is one request, asked
        once), and each to the endpoint that answered it (the response's served_by, in this run or an earlier one):
        the summary's token totals are then the sum of its endpoints' (31,799 once stood beside 31,476)."""
        new = [k for k in dict.fromkeys(keys) if int(k[:16], 16) not in self.counted]
        self.counted.update(int(k[:16], 16) for k in new)
        _add_usage(self.usage, _billed(self.cache, new))
        for key in new:
            resp = self.cache.get(key, raw_topk=True)
            if resp is None:  # failed for good: no usage
                continue
            into = self.by_endpoint.setdefault(resp.get("served_by") or self.teacher.endpoint, _zero_endpoint())
            into["answered"] += 1
            into["prompt_tokens"] += int(resp.get("prompt_tokens") or 0)
            into["completion_tokens"] += int(resp.get("completion_tokens") or 0)

    def endpoints(self) -> dict[str, dict]:
        """generate_summary.json's "endpoints": by_endpoint, with this run's errors at each endpoint."""
        out = {url: dict(stats) for url, stats in self.by_endpoint.items()}
        for url, stats in self.teacher.endpoint_stats.items():
            out.setdefault(url, _zero_endpoint())["errors"] = stats["errors"]
        return out

    def close_all(self) -> None:
        for i in sorted(self.open):  # none, unless the teacher dropped a request: written as they are
            self.open[i]["waiting"].clear()
            self.flush(i, final=True)

    def _rows(self, pairs: list[tuple[tuple[dict, int], str]], counted: bool = True) -> tuple[list[dict], int]:
        """_teacher_rows of ((prompt, sample), key) pairs; verified rows say which sample they are. counted=False:
        rows that are not trained on (rejected ones) stay out of the trace counts."""
        traces = self.traces if counted else collections.Counter()
        rows, dropped = _teacher_rows(
            [pair for pair, _ in pairs],
            [key for _, key in pairs],
            self.cache,
            self.teacher,
            self.tokenizer,
            self.teacher_label,
            self.aligner,
            self.trace_format,
            traces,
        )
        if self.verifying:  # every pair was answered (it has a verdict): rows and pairs align
            for row, ((_, sample), _) in zip(rows, pairs):
                row["sample"] = sample
        return rows, dropped

    def _redraw(self, i: int) -> bool:
        """[verify]: adds chunk i's next re-draws; True while it waits for some (those the cache lacks are queued)."""
        state = self.open[i]
        while added := self.verifying.grow(state, self.cache, self.teacher):
            missing = {key for *_, key in added} - self.cache.cached_keys(list({key for *_, key in added}))
            if missing:
                state["waiting"] |= missing
                todo = self._wait(i, [(record, s) for record, s, _ in added], [key for *_, key in added], missing)
                self.queue.extend(todo)
                self.redrawn += len(todo)
                return True
        return False


def _write_given_answers(cfg: RunConfig, plan: DatasetPlan) -> GenerateSummary:
    """Rows whose completions are the answers the prompts carry: the same parts, no teacher."""
    files, digests = plan.files, plan.digests
    files.remove_stale(digests)
    for i, chunk in enumerate(plan.chunks()):
        if not files.done(i, digests[i]):
            files.write(
                i,
                digests[i],
                _ground_truth_rows(
                    [p for p, _ in chunk],
                    plan.answerer.source,
                    plan.student_tok,
                    cfg.data.declared_teacher,
                    plan.answerer.teacher.think_tags,
                    cfg.train.trace_format,
                ),
                complete=True,
            )
    if files.whole:
        files.merge()
    return GenerateSummary(rows=plan.rows, decontamination=plan.decontamination)


# ----------------------------------------------------------------------------------------------------
# Rows.


def _ground_truth_rows(
    prompts: list[dict],
    source: str,
    tokenizer,
    declared_teacher: str | None = None,
    think_tags=THINK_TAGS,
    trace_format: str = TRACE_FORMAT,
) -> list[dict]:
    """Rows whose completions are the answers we were given; tagged with the source the user declared. An answer that
    holds a reasoning trace (a brought set of DeepSeek-R1-style traces) is split and rendered as a teacher's is (see
    _teacher_rows); the reasoning columns are there only when some answer has one."""
    tag = (
        provenance.provenance_row("teacher", teacher_id=declared_teacher)
        if declared_teacher
        else provenance.provenance_row(source)
    )
    rows = []
    for i, prompt in enumerate(prompts):
        if prompt["answer"] is None:
            raise UserError(f'data.source = {source!r} needs an "answer" for every prompt (prompt {i + 1} has none)')
        turns = chat.turns_of(prompt)
        trace, answer = reasoning.split_response({"text": prompt["answer"]}, think_tags)
        prompt_ids, completion_ids = reasoning.encode(tokenizer, turns, trace, answer, trace_format)
        fields = _row_text(prompt)
        rows.append(
            {
                **fields,
                "completion": answer,
                "prompt_ids": prompt_ids,
                "completion_ids": completion_ids,
                "top_ids": None,
                "top_logprobs": None,
                **tag,
                "reasoning": trace,
                "answer_ids": None if trace is None else chat.encode(tokenizer, turns, answer)[1],
            }
        )
    if all(row["reasoning"] is None for row in rows):  # the rows as they always were
        rows = [{k: v for k, v in row.items() if k not in ("reasoning", "answer_ids")} for row in rows]
    return rows


def _teacher_rows(
    chunk,
    keys,
    cache,
    teacher,
    tokenizer,
    teacher_label: str | None = None,
    aligner=None,
    trace_format: str = TRACE_FORMAT,
    traces: collections.Counter | None = None,
) -> tuple[list[dict], int]:
    """(rows of the chunk's answered requests in prompt order, rows whose top-k was dropped). The top-k goes from
    the cache to the row as the codec's bytes ("topk"): no decode, no second rounding. A teacher with another
    tokenizer: its top-k is aligned onto the student's tokens by text spans (aligner, a crosstok.Aligner; its
    stats count them); student tokens with no teacher distribution get a top-k with no mass (crosstok.encode).

    A reasoning teacher's row (distillab.reasoning): `completion` is its answer, `reasoning` its trace, and
    completion_ids are trace + answer in the student's thinking format (trace_format where its template has none),
    `answer_ids` the answer alone. The teacher's tokens (which cover its trace) are used as they are when they spell
    exactly that rendering in the student's vocabulary; otherwise they go the cross-tokenizer way above, aligned as
    far as their text matches the rendering. `traces` counts rows with a trace ("rows") and those whose top-k was
    left out because it could not be placed on the rendering ("topk_dropped")."""
    sampling = {k: v for k, v in teacher.request("").items() if k not in ("prompt", "messages", "endpoint", "model")}
    many = teacher.cfg.samples_per_prompt > 1
    rows, dropped_topk = [], 0
    for (prompt, sample), key in zip(chunk, keys):
        resp = cache.get(key, raw_topk=True)
        if resp is None:  # failed for good: recorded in the cache's failures, left out of the data
            continue
        topk, top_ids, top_lp = resp.get("topk"), resp.get("top_ids"), resp.get("top_logprobs")
        # the student's own rendering of the conversation (its chat template, or the plain text)
        turns = chat.turns_of(prompt)
        trace, answer = reasoning.split_response(resp, teacher.cfg.think_tags)
        rendered = answer_ids = None
        if trace is not None:  # the text the teacher's tokens must spell: the student's rendering of trace + answer
            prompt_ids, rendered = reasoning.encode(tokenizer, turns, trace, answer, trace_format)
            answer_ids = chat.encode(tokenizer, turns, answer)[1]
            resp = resp | {"text": tokenizer.decode(rendered, skip_special_tokens=True)}
        if resp.get("token_ids") is not None and _ids_match(resp, tokenizer):
            prompt_ids = chat.prompt_ids(tokenizer, turns) if trace is None else prompt_ids
            completion_ids = resp["token_ids"]  # the teacher's own tokens: its top-k stays aligned to them
        else:  # no ids, or the teacher's ids are not the student's: the student's tokenizer reads the text
            prompt_ids, completion_ids = (
                chat.encode(tokenizer, turns, answer) if trace is None else (prompt_ids, rendered)
            )
            if resp.get("token_ids") is not None:  # teacher-vocabulary ids: aligned by text spans, else dropped
                aligns = trace is None or _spells_rendering(resp, aligner)
                topk = _aligned_topk(resp, completion_ids, aligner) if aligns else None
                top_ids = top_lp = None
                dropped_topk += topk is None and trace is None
        if topk is None and top_ids is None and resp.get("top_tokens") is not None:
            from distillab.crosstok import fill_rows
            from distillab.teachers.openai_compat import map_top_tokens

            top_ids, top_lp, mapped_ids = map_top_tokens(resp, tokenizer, aligner)
            completion_ids = mapped_ids if trace is None or top_ids is not None else completion_ids
            if top_ids is not None:
                k = max((len(row) for row in resp["top_tokens"]), default=1)
                top_ids, top_lp = fill_rows(top_ids, top_lp, max(k, 1))
        if trace is not None and traces is not None:
            traces["rows"] += 1
            had_topk = resp.get("topk") is not None or resp.get("top_ids") is not None or resp.get("top_tokens")
            traces["topk_dropped"] += bool(had_topk) and topk is None and top_ids is None
        rows.append(
            {
                **_row_text(prompt),
                **({"sample": sample} if many else {}),
                "completion": answer,
                "reasoning": trace,
                "prompt_ids": prompt_ids,
                "completion_ids": completion_ids,
                "answer_ids": answer_ids,
                "topk": topk,
                "top_ids": top_ids,
                "top_logprobs": top_lp,
                **provenance.provenance_row(
                    "teacher",
                    teacher_id=teacher_label or teacher.teacher_id,
                    endpoint=teacher.endpoint,
                    sampling=sampling,
                    request_hash=key,
                ),
            }
        )
    return rows, dropped_topk


def _ids_match(resp: dict, tokenizer) -> bool:
    """Teacher token ids are usable only when they are the student's: in range, decoding to the text, and not stopping
    on an invisible token other than the student's end-of-sequence (a tokenizer that differs only in its special
    tokens would otherwise teach the student to stop with another token; a stop sequence ends on visible text)."""
    ids = resp["token_ids"]
    if any(not 0 <= i < len(tokenizer) for i in ids):
        return False
    if (
        resp.get("finish_reason") == "stop"
        and ids
        and ids[-1] != tokenizer.eos_token_id
        and not tokenizer.decode(ids[-1:], skip_special_tokens=True)
    ):
        return False
    return tokenizer.decode(ids, skip_special_tokens=True) == resp["text"]


def _spells_rendering(resp: dict, aligner) -> bool:
    """Whether a reasoning row's teacher ids, read with the teacher's own tokenizer, spell the student's rendering
    (resp's text): only then are they aligned by text spans; another thinking format is no tokenizer to align."""
    tok = aligner.teacher_tok() if aligner is not None else None
    return tok is not None and tok.decode(resp["token_ids"], skip_special_tokens=True) == resp["text"]


def _aligned_topk(resp: dict, completion_ids: list[int], aligner) -> dict | None:
    """A local teacher's top-k (the cache's codec bytes, or lists) aligned onto the student's completion_ids: the
    codec's arrays, or None when it cannot be (no top-k, no teacher tokenizer)."""
    from distillab import crosstok
    from distillab.topk_codec import decode_topk

    if aligner is None:
        return None
    if resp.get("topk") is not None:
        ids, lps, tails = (x.tolist() for x in decode_topk(resp["topk"]))
    elif resp.get("top_ids"):
        ids, lps, tails = resp["top_ids"], resp["top_logprobs"], resp.get("top_tail")
    else:
        return None
    aligned = aligner.from_ids(resp, ids, lps, tails, completion_ids)
    return None if aligned is None else crosstok.encode(aligned, max(len(ids[0]) if ids else 1, 1))


def ask(teacher, record: dict, sample: int = 0) -> dict:
    """The teacher's canonical request for a prompt record: its conversation when it has one."""
    return teacher.request(record["prompt"], sample, messages=record.get("messages"))


def _row_text(record: dict) -> dict:
    """A prompt record's fields as a dataset row keeps them: its conversation (None: a plain prompt; the dataset
    stores it as JSON text), no line number."""
    return {**{k: v for k, v in record.items() if k != "line"}, "messages": record.get("messages") or None}


def _marks(chunk) -> list[str]:
    """[decontaminate] action = "flag": the marks a chunk's prompts carry into its rows, so part of its digest."""
    return [f"{i}:{p['decontamination']}" for i, (p, _) in enumerate(chunk) if p.get("decontamination")]


def _digest(salt: str, keys: list[str]) -> str:
    h = hashlib.sha256(salt.encode())
    for k in keys:
        h.update(k.encode() + b"\n")
    return h.hexdigest()[:12]


def _zero_usage() -> dict:
    counts = {"requests": 0, "prompt_tokens": 0, "completion_tokens": 0, "latency_s": 0.0, "reasoning_tokens": 0}
    return counts | dict.fromkeys(BILLING_KEYS, 0)


def _zero_endpoint() -> dict:
    return {"answered": 0, "errors": 0, "prompt_tokens": 0, "completion_tokens": 0}


def _billed(cache: RequestCache, keys: list[str]) -> dict:
    """The cache's usage of these keys with its billing split (cached prompt tokens, the Batch API's share)."""
    return cache.usage(keys) | cache.billing(keys)


def _add_usage(total: dict, more: dict) -> None:
    for k in total:
        total[k] += more.get(k, 0)
