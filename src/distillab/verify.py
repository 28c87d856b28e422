"""Verified rejection sampling: which of the teacher's samples a student may train on.

[verify] (config.VerifyConfig) checks every sample the teacher writes for the task dataset (data/train) against
the prompt's reference answer (the prompts file's answer column, a lab skill's ground truth), reading the final
answer after any reasoning trace (a separate reasoning field, or an inline think block: reasoning.split_response).
The verifiers, chosen per skill (`by_skill`, over `method`):

  lab              the lab skill's own scorer (lab.world): verified when it gives full marks
  exact            the final answer equals the reference, both stripped of surrounding whitespace
  normalized       equal after scoring.normalize_text (lower case; punctuation, articles and extra spaces gone)
  regex            `pattern` is searched in the final answer; its last match (group 1 when the pattern has a
                   group, else the whole match), stripped, must equal the stripped reference; no match: rejected
  math             math-verify: reference and final answer parsed (LaTeX, boxed or plain expressions) and compared
                   for mathematical equivalence (1/2 = \\frac{1}{2} = 0.5)
  module:function  a user's Python function (prompt, completion, reference) -> bool, imported by name; completion
                   is the final answer, reference None when the prompt has none

Keep policy: of a prompt's verified samples, in sample order, all of them (at most `max_per_prompt`) or the
first. A prompt none of whose samples verified is drawn again, samples_per_prompt more at a time, until one
verifies or it has had `max_draws` in all; then it is reported (counted, with a few examples). Each draw is its
own cached request, so nothing is paid twice; rejected samples go to data/rejected.parquet, never to training.
What it costs is counted per skill (VerifyStats -> records.Verification): yield (verified / drawn), prompts left
without a verified sample, tokens and $ per kept example (every sample paid for, over the examples kept).
"""

from __future__ import annotations

import hashlib
import importlib
import inspect
import json
import os
import re
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from pathlib import Path

from distillab import reasoning
from distillab.config import THINK_TAGS, VERIFIERS, VerifyConfig
from distillab.errors import UserError
from distillab.lab.world import ALL_SKILLS, get_skill
from distillab.records import Verification, VerificationCounts

UNVERIFIED_EXAMPLES = 5  # prompts left without a verified sample, shown by name in the summary and report

Check = Callable[[dict, str], bool]  # (prompt record, final answer) -> verified


def skill_of(record: dict) -> str:
    return record.get("skill") or "task"


class Verifiers:
    """The verifier of each prompt (by its skill), built once: a user's function is imported here, before any
    teacher request, so a bad `module:function` costs nothing. think_tags: the teacher's ([teacher] think_tags), what
    an inline trace is cut off by."""

    def __init__(self, cfg: VerifyConfig, think_tags=THINK_TAGS):
        self.cfg, self.think_tags = cfg, think_tags
        self.functions = {m: load_function(m) for m in sorted(cfg.methods - set(VERIFIERS))}
        self.checks: dict[str, Check] = {m: _make_check(m, cfg, self.functions.get(m)) for m in sorted(cfg.methods)}

    def fingerprint(self) -> str:
        """What decides the verdicts: the config, and the source of a user's function (an edited function judges
        again)."""
        sources = {}
        for method, function in self.functions.items():
            try:
                path = inspect.getsourcefile(function)
            except TypeError:  # a built-in function: no source to change
                path = None
            sources[method] = hashlib.sha256(Path(path).read_bytes()).hexdigest()[:16] if path else None
        return hashlib.sha256(json.dumps([self.cfg.model_dump(), sources], sort_keys=True).encode()).hexdigest()[:16]

    def method(self, record: dict) -> str:
        return self.cfg.by_skill.get(skill_of(record), self.cfg.method)

    def check_prompt(self, record: dict) -> None:
        """A prompt its verifier cannot judge is an error naming it, found while planning (before it is paid for)."""
        method = self.method(record)
        where = f"prompt line {record['line']}" if record.get("line") else f"prompt {record['prompt'][:60]!r}"
        if method in VERIFIERS and record.get("answer") is None:
            raise UserError(
                f"{where}: [verify] {method!r} compares the teacher's answer with the reference, and this "
                "prompt has none (data.answer_column, or a conversation's final assistant turn)"
            )
        if method == "lab" and skill_of(record) not in ALL_SKILLS:
            raise UserError(
                f'{where}: [verify] "lab" scores lab skills, and this prompt\'s skill is '
                f"{skill_of(record)!r}: set verify.method (or verify.by_skill) to exact, normalized, "
                "regex, math or a module:function"
            )

    def __call__(self, record: dict, completion: str) -> bool:
        """Whether a completion (its trace, if any, included) answers the prompt right."""
        return self.checks[self.method(record)](record, reasoning.final_answer(completion, self.think_tags))

    def response(self, record: dict, resp: dict) -> bool:
        """The same for a teacher response (the cache's): its answer apart from its trace, wherever the trace came."""
        return self.checks[self.method(record)](record, reasoning.split_response(resp, self.think_tags)[1])

    def describe(self, skills: list[str]) -> dict[str, str]:
        return {s: self.cfg.by_skill.get(s, self.cfg.method) for s in skills}


def _make_check(method: str, cfg: VerifyConfig, function: Callable | None) -> Check:
    if method == "lab":
        return _lab
    if method == "exact":
        return lambda record, answer: answer.strip() == record["answer"].strip()
    if method == "normalized":
        from distillab.scoring import normalize_text  # here: scoring imports torch

        return lambda record, answer: normalize_text(answer) == normalize_text(record["answer"])
    if method == "regex":
        return _regex(re.compile(cfg.pattern))
    if method == "math":
        return _math
    return _user_check(method, function)


def _lab(record: dict, answer: str) -> bool:
    return get_skill(record["skill"]).score(answer, record["answer"]) >= 1.0


def _regex(pattern: re.Pattern) -> Check:
    def check(record: dict, answer: str) -> bool:
        found = list(pattern.finditer(answer))
        if not found:
            return False
        last = found[-1]
        return (last.group(1) if pattern.groups else last.group(0)).strip() == record["answer"].strip()

    return check


def _math(record: dict, answer: str) -> bool:
    from math_verify import parse, verify

    # math-verify's timeouts are signal alarms, which only the main thread may set
    timeout = 5 if threading.current_thread() is threading.main_thread() else None
    gold, target = parse(record["answer"], parsing_timeout=timeout), parse(answer, parsing_timeout=timeout)
    return bool(gold) and bool(target) and verify(gold, target, timeout_seconds=timeout)


def load_function(spec: str) -> Callable:
    """`module:function` imported by name (the working directory is searched too, as `python -m` would); a module
    or function that is not there is a one-line UserError naming it."""
    module_name, _, name = spec.partition(":")
    where = f"[verify] {spec!r}"
    try:
        module = _import(module_name)
    except ModuleNotFoundError as err:
        raise UserError(
            f"{where}: no module named {err.name or module_name!r} (a .py file in the working directory "
            "or an installed module)"
        ) from None
    except Exception as err:  # the user's module itself fails to import: say how, in one line
        raise UserError(f"{where}: importing {module_name} failed: {type(err).__name__}: {err}") from None
    function = getattr(module, name, None)
    if not callable(function):
        raise UserError(f"{where}: module {module_name!r} has no function {name!r}")
    return function


def _import(module_name: str):
    try:
        return importlib.import_module(module_name)
    except ModuleNotFoundError as err:
        if err.name != module_name.split(".")[0] or os.getcwd() in sys.path:
            raise
    sys.path.insert(0, os.getcwd())
    try:
        return importlib.import_module(module_name)
    finally:
        sys.path.remove(os.getcwd())


def _user_check(spec: str, function: Callable) -> Check:
    def check(record: dict, answer: str) -> bool:
        try:
            verdict = function(record["prompt"], answer, record.get("answer"))
        except Exception as err:
            raise UserError(
                f"[verify] {spec} raised {type(err).__name__}: {err} (on prompt {record['prompt'][:60]!r}); "
                "the teacher's answers are cached: fix it and rerun"
            ) from None
        if verdict is None:
            raise UserError(
                f"[verify] {spec} returned None (on prompt {record['prompt'][:60]!r}): it must return True or False"
            )
        return bool(verdict)

    return check


# ----------------------------------------------------------------------------------------------------
# The keep policy and the re-draws.


def kept(verdicts: list[bool | None], cfg: VerifyConfig) -> list[int]:
    """Which of a prompt's samples (indices, in sample order) go to training."""
    verified = [i for i, v in enumerate(verdicts) if v]
    limit = 1 if cfg.keep == "first" else cfg.max_per_prompt
    return verified[:limit] if limit else verified


def more_draws(verdicts: list[bool | None], samples: int, max_draws: int) -> range:
    """The sample numbers to draw next for a prompt whose samples 0..n-1 have these verdicts (None: no answer): the
    next samples_per_prompt, up to max_draws, while none verified. A prompt with an unanswered sample waits for a
    rerun to ask it again, so what it draws never depends on a failure."""
    n = len(verdicts)
    if any(verdicts) or None in verdicts or n >= max_draws:
        return range(0)
    return range(n, min(n + samples, max_draws))


def keep_text(cfg: VerifyConfig) -> str:
    return "first" if cfg.keep == "first" else (f"at most {cfg.max_per_prompt}" if cfg.max_per_prompt else "all")


# ----------------------------------------------------------------------------------------------------
# What it cost: counts per skill.


@dataclass
class Tally:
    """The summed fields of records.VerificationCounts (each field's meaning is documented there)."""

    prompts: int = 0
    drawn: int = 0  # answered draws, re-draws included
    verified: int = 0
    kept: int = 0
    unverified_prompts: int = 0  # none of their draws verified
    prompt_tokens: int = 0  # over every draw: what was paid
    completion_tokens: int = 0

    def add(self, other: Tally) -> None:
        for f in fields(self):
            setattr(self, f.name, getattr(self, f.name) + getattr(other, f.name))


@dataclass
class VerifyStats:
    """Counts per skill as chunks settle; `record` prices them and derives the ratios."""

    skills: dict[str, Tally] = field(default_factory=dict)
    examples: list[str] = field(default_factory=list)  # prompts left without a verified sample, the first few

    def prompt(self, record: dict, verdicts: list[bool | None], n_kept: int) -> None:
        tally = self.skills.setdefault(skill_of(record), Tally())
        tally.prompts += 1
        tally.drawn += sum(v is not None for v in verdicts)
        tally.verified += sum(bool(v) for v in verdicts)
        tally.kept += n_kept
        if not any(verdicts):
            tally.unverified_prompts += 1
            if len(self.examples) < UNVERIFIED_EXAMPLES:
                self.examples.append(record["prompt"])

    def usage(self, skill: str, usage: dict) -> None:
        tally = self.skills.setdefault(skill, Tally())
        tally.prompt_tokens += usage["prompt_tokens"]
        tally.completion_tokens += usage["completion_tokens"]

    def record(
        self, verifiers: Verifiers, samples: int, usd_for: Callable[[dict], float | None], rejected_file: str | None
    ) -> Verification:
        """usd_for: pricing.TeacherPricing.usd_for; samples: teacher.samples_per_prompt."""
        cfg = verifiers.cfg
        total = Tally()
        for tally in self.skills.values():
            total.add(tally)
        skills = {s: counts(t, usd_for(vars(t))) for s, t in sorted(self.skills.items())}
        return Verification(
            verifiers=verifiers.describe(list(skills)),
            keep=keep_text(cfg),
            max_draws=max_draws(cfg, samples),
            total=counts(total, usd_for(vars(total))),
            skills=skills,
            unverified_examples=self.examples,
            rejected_file=rejected_file,
        )


def max_draws(cfg: VerifyConfig, samples: int | None) -> int:
    """Draws a prompt may have in all (max_draws, else samples_per_prompt: no re-draws)."""
    return cfg.max_draws or samples or 1


def counts(t: Tally, usd: float | None) -> VerificationCounts:
    tokens = t.prompt_tokens + t.completion_tokens
    return VerificationCounts(
        **vars(t),
        usd=usd,
        yield_=t.verified / t.drawn if t.drawn else None,
        tokens_per_kept=tokens / t.kept if t.kept else None,
        usd_per_kept=usd / t.kept if t.kept and usd is not None else None,
    )


def combine(blocks: list[dict]) -> dict:
    """The verification blocks of several shards' summaries as one (their counts summed, ratios derived again)."""
    records = [Verification.model_validate(b) for b in blocks]
    skills: dict[str, tuple[Tally, float | None]] = {}
    for rec in records:
        for skill, c in rec.skills.items():
            tally, usd = skills.get(skill, (Tally(), 0.0))
            tally.add(Tally(**{f.name: getattr(c, f.name) for f in fields(Tally)}))
            skills[skill] = (tally, None if usd is None or c.usd is None else usd + c.usd)
    total, total_usd = Tally(), 0.0
    for tally, usd in skills.values():
        total.add(tally)
        total_usd = None if usd is None or total_usd is None else total_usd + usd
    first = records[0]
    return Verification(
        verifiers={s: v for r in records for s, v in r.verifiers.items()},
        keep=first.keep,
        max_draws=first.max_draws,
        total=counts(total, total_usd),
        skills={s: counts(t, usd) for s, (t, usd) in sorted(skills.items())},
        unverified_examples=[e for r in records for e in r.unverified_examples][:UNVERIFIED_EXAMPLES],
        rejected_file=first.rejected_file,
    ).to_dict()


# ----------------------------------------------------------------------------------------------------
# In words.


def summary_line(block: dict | Verification) -> str:
    """One line for the terminal after generate: the yield, what is left unverified, and $ per kept example;
    then the same per skill when there are several."""
    v = Verification.model_validate(block)
    parts = [f"verify: {counts_text(v.total)}"]
    if len(v.skills) > 1:
        parts += [f"  {skill}: {counts_text(c)}" for skill, c in v.skills.items()]
    if v.total.unverified_prompts:
        parts.append(
            f"  without a verified sample after {v.max_draws} draws: "
            + "; ".join(repr(e) for e in v.unverified_examples)
            + (" ..." if v.total.unverified_prompts > len(v.unverified_examples) else "")
        )
    return "\n".join(parts)


def counts_text(c: VerificationCounts) -> str:
    """The counts in words: the CLI's line, the ledger's row in the report."""
    share = "-" if c.yield_ is None else f"{c.yield_:.0%}"
    per_kept = (
        "no example kept"
        if not c.kept
        else f"{c.tokens_per_kept:,.0f} tokens and "
        f"{'an unpriced $' if c.usd_per_kept is None else f'${c.usd_per_kept:.6f}'} per kept example"
    )
    return (
        f"yield {share} ({c.verified}/{c.drawn} verified), {c.kept} kept, {c.unverified_prompts} of {c.prompts} "
        f"prompts without a verified sample; {per_kept}"
    )
