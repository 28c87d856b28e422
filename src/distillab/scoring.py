"""Scoring models: the task and general suites, their scorers, bootstrap intervals and gap closed.

The task suite is the skills the student was distilled on (or the user's JSONL of prompt/answer); the
general suite is every other lab skill plus perplexity on held-out world text. A suite's score is the mean
of its skills' scores (each skill counts once, however many examples it has). "Gap closed" on a suite is
(student - base) / (teacher - base): 1.0 means the student caught up with the teacher, 0 means no gain,
negative means it lost ground. What a report shows is gap_change: the share only where it means something (teacher
and base at least MIN_GAP apart, a student that moved toward the teacher), else the change vs base in points and
why there is no share.

A model that thinks before it answers (a student trained on reasoning traces, a reasoning teacher) is scored on its
answer: a text scorer reads what follows a `<think>...</think>` block (reasoning.final_answer); a text without one is
scored as it is.

A library: the evaluate stage scores the run's models with it, checkpoint selection scores candidates on the
dev split, and distillab.endpoint_eval scores a model known only by its endpoint.
"""

from __future__ import annotations

import math
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from distillab import chat, models
from distillab.batching import right_pad
from distillab.config import RunConfig
from distillab.errors import UserError
from distillab.jsonl import read_jsonl
from distillab.lab.world import SKILLS, exact, get_skill, word_f1, world_text
from distillab.reasoning import final_answer
from distillab.records import EvalResult
from distillab.rundir import RunDir
from distillab.sampling import generate


def suites(cfg: RunConfig) -> tuple[list[str], list[str]]:
    task = list(cfg.data.skills) if not cfg.data.prompts_file else []
    general = cfg.eval.general if cfg.eval.general is not None else [s for s in SKILLS if s not in task]
    for name in task + general:
        try:
            get_skill(name)
        except ValueError as err:
            raise UserError(str(err)) from None
    return task, general


def run_models(cfg: RunConfig) -> dict[str, str]:
    """The run's own models by label: the teacher, the base student and the distilled student."""
    return {"teacher": cfg.teacher.model, "base": cfg.train.student, "distilled": str(RunDir(cfg.run_dir).student)}


# prompts -> greedy completions: a loaded model's (local_complete) or an endpoint's (distillab.endpoint_eval).
# A prompt is a plain prompt (one user turn) or a conversation (a list of OpenAI turns: chat.as_turns).
Complete = Callable[[list], list[str]]


def local_complete(model, tok, max_new_tokens: int) -> Complete:
    """Each prompt rendered as the model was trained on it (chat.render_prompt: its own chat template, or the
    plain text when it has none), then generated greedily."""
    return lambda prompts: [
        o.text
        for o in generate(
            model, tok, [chat.render_prompt(tok, chat.as_turns(p)) for p in prompts], max_new_tokens=max_new_tokens
        )
    ]


def score_skill(model, tok, skill_name: str, n: int, max_new_tokens: int, split: str = "test") -> list[float]:
    return score_skill_with(local_complete(model, tok, max_new_tokens), skill_name, n, split)


def score_skill_with(complete: Complete, skill_name: str, n: int, split: str = "test") -> list[float]:
    skill = get_skill(skill_name)
    examples = skill.examples(split, n)
    return [
        skill.score(final_answer(text), e.answer) for text, e in zip(complete([e.prompt for e in examples]), examples)
    ]


def score_model(
    model,
    tok,
    skills: list[str],
    n: int,
    max_new_tokens: int,
    split: str = "test",
    task_examples: list[dict] | None = None,
) -> dict[str, list[float]]:
    """Per-example scores of a loaded model on lab skills (and a user suite's skills) from one split."""
    per_skill = {s: score_skill(model, tok, s, n, max_new_tokens, split) for s in dict.fromkeys(skills)}
    if task_examples:
        per_skill.update(score_task_suite(model, tok, task_examples, max_new_tokens))
    return per_skill


def score_with(
    complete: Complete, skills: list[str], n: int, split: str = "test", task_examples: list[dict] | None = None
) -> dict[str, list[float]]:
    """score_model for a model known only by its completions (an endpoint): text-scored examples only."""
    per_skill = {s: score_skill_with(complete, s, n, split) for s in dict.fromkeys(skills)}
    if task_examples:
        per_skill.update(score_task_suite(None, None, task_examples, 0, complete=complete))
    return per_skill


@torch.no_grad()
def perplexity(model, tok, texts: list[str], batch_size: int = 64) -> float:
    """exp(mean next-token negative log-likelihood) over all tokens of the texts (after <bos>)."""
    model.eval()
    tok.padding_side = "right"
    nll, count = 0.0, 0
    for start in range(0, len(texts), batch_size):
        enc = tok(texts[start : start + batch_size], return_tensors="pt", padding=True).to(
            next(model.parameters()).device
        )
        logits = model(**enc).logits[:, :-1].float()  # (B, T-1, V)
        targets = enc["input_ids"][:, 1:]  # (B, T-1)
        mask = enc["attention_mask"][:, 1:].bool()
        token_nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), targets, reduction="none")  # (B, T-1)
        nll += float(token_nll[mask].sum())
        count += int(mask.sum())
    return math.exp(nll / max(count, 1))


def bootstrap_ci(per_skill: dict[str, list[float]], n_boot: int, seed: int = 0, level: float = 0.95) -> list[float]:
    """Percentile bootstrap of the mean-of-skill-means: each skill's examples resampled with replacement."""
    if n_boot <= 0 or not per_skill:
        return [float("nan"), float("nan")]
    rng = np.random.default_rng(seed)
    stats = np.zeros(n_boot)  # (n_boot,) sum over skills of each resample's skill mean
    for scores in per_skill.values():
        values = np.asarray(scores, dtype=float)
        # Resample in slices of at most ~4M draws, so a big suite never allocates n_boot x n at once.
        step = max(1, 4_000_000 // len(values))
        for start in range(0, n_boot, step):
            rows = min(step, n_boot - start)
            idx = rng.integers(0, len(values), size=(rows, len(values)))  # (rows, n)
            stats[start : start + rows] += values[idx].mean(axis=1)
    stats = np.sort(stats / len(per_skill))
    lo = stats[int((1 - level) / 2 * n_boot)]
    hi = stats[min(n_boot - 1, int((1 + level) / 2 * n_boot))]
    return [float(lo), float(hi)]


def suite_result(per_skill: dict[str, list[float]], n_boot: int) -> dict:
    if not per_skill:
        return {"score": None, "ci": None}
    score = sum(sum(v) / len(v) for v in per_skill.values()) / len(per_skill)
    return {"score": score, "ci": bootstrap_ci(per_skill, n_boot)}


def evaluate_model(
    model_name: str | Path,
    task: list[str],
    general: list[str],
    n: int,
    n_boot: int,
    max_new_tokens: int,
    task_examples: list[dict] | None = None,
) -> EvalResult:
    """Scores of one model. task/general name lab skills; task_examples (a user task suite) add their own
    skills to the task suite."""
    model, tok = models.load(model_name)
    began = time.time()
    per_skill = score_model(model, tok, task + general, n, max_new_tokens, "test", task_examples)
    return eval_record(
        str(model_name),
        per_skill,
        task,
        general,
        n_boot,
        time.time() - began,
        parameters=sum(p.numel() for p in model.parameters()),
        world_text_perplexity=perplexity(model, tok, world_text()),
    )


def eval_record(
    model: str,
    per_skill: dict[str, list[float]],
    task: list[str],
    general: list[str],
    n_boot: int,
    seconds: float,
    **fields,
) -> EvalResult:
    """The EvalResult of per-example scores (a user suite's skills join the task suite); fields: the rest."""
    task = task + [s for s in per_skill if s not in task and s not in general]
    return EvalResult(
        model=model,
        skills={
            s: {"score": sum(v) / len(v), "n": len(v), "ci": bootstrap_ci({s: v}, n_boot), "scores": v}
            for s, v in per_skill.items()
        },
        task=suite_result({s: per_skill[s] for s in task}, n_boot),
        general=suite_result({s: per_skill[s] for s in general}, n_boot),
        suites={"task": task, "general": general},
        eval_seconds=round(seconds, 2),
        **fields,
    )


def gap_closed(student: float | None, base: float | None, teacher: float | None) -> float | None:
    if None in (student, base, teacher) or abs(teacher - base) < 1e-9:
        return None
    return (student - base) / (teacher - base)


MIN_GAP = 0.05  # teacher and base closer than 5 points: a share of that gap divides sampling noise by noise


@dataclass(frozen=True)
class GapChange:
    """How far a student moved from the base, toward the teacher or not, on one suite."""

    points: float | None  # 100 * (student - base); None where either score is missing
    closed: float | None  # the share of the teacher-base gap closed; None where a share means nothing
    why: str | None  # why `closed` is None while `points` is known, in words


def gap_change(student: float | None, base: float | None, teacher: float | None) -> GapChange:
    """gap_closed where the share means something: never across a gap under MIN_GAP (-2550% of a 0.2-point gap
    says nothing) nor for a student that moved away from the teacher; there the change in points stands alone."""
    if None in (student, base):
        return GapChange(points=None, closed=None, why=None)
    points = 100 * (student - base)
    if teacher is None:
        return GapChange(points=points, closed=None, why="the teacher has no score")
    if abs(teacher - base) < MIN_GAP:
        apart = f"teacher and base are {100 * abs(teacher - base):.1f} points apart, too close to divide by"
        return GapChange(points=points, closed=None, why=apart)
    closed = (student - base) / (teacher - base)
    if closed < 0:
        return GapChange(points=points, closed=None, why="it moved away from the teacher")
    return GapChange(points=points, closed=closed, why=None)


# ----------------------------------------------------------------------------------------------------
# Scorers for a user's task suite. Text scorers map (prediction, reference) to [0, 1]; multiple choice
# needs the model itself, since it compares the log-likelihood of each choice after the prompt.


_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCTUATION = re.compile(r"[^\w\s]")


def normalize_text(text: str) -> str:
    """SQuAD-style: lower case, punctuation and articles removed, whitespace collapsed."""
    text = _PUNCTUATION.sub(" ", text.lower())
    return " ".join(_ARTICLES.sub(" ", text).split())


def score_normalized_exact(prediction: str, answer: str) -> float:
    return float(normalize_text(prediction) == normalize_text(answer))


def score_regex(prediction: str, pattern: str) -> float:
    """The reference is a regular expression the whole trimmed prediction must match (use .* to search)."""
    return float(re.fullmatch(pattern, prediction.strip(), flags=re.DOTALL) is not None)


_NUMBER = re.compile(r"[-+]?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d*)?(?:[eE][-+]?\d+)?|[-+]?\.\d+(?:[eE][-+]?\d+)?")


def extract_number(text: str) -> float | None:
    """The last number in the text (worked answers end with the result); thousands commas allowed."""
    found = _NUMBER.findall(text)
    return float(found[-1].replace(",", "")) if found else None


def score_numeric(prediction: str, answer: str, rel_tol: float = 1e-6, abs_tol: float = 1e-9) -> float:
    """1 when the prediction's last number is within tolerance of the reference number."""
    got, want = extract_number(prediction), extract_number(answer)
    if got is None or want is None:
        return 0.0
    return float(math.isclose(got, want, rel_tol=rel_tol, abs_tol=abs_tol))


TEXT_SCORERS = {
    "exact": exact,
    "normalized_exact": score_normalized_exact,
    "regex": score_regex,
    "numeric": score_numeric,
    "word_f1": word_f1,
}


@torch.no_grad()
def choice_loglikelihoods(model, tok, prompt: str, choices: list[str]) -> list[float]:
    """Sum of log p(choice tokens | prompt) for each choice, in one right-padded batch.

    Prompt and choice are tokenized apart and joined (as lm-evaluation-harness does), so every choice is
    scored after the same context tokens.
    """
    model.eval()
    context = tok(prompt)["input_ids"]
    conts = [tok(c, add_special_tokens=False)["input_ids"] for c in choices]
    if any(not c for c in conts):
        raise UserError("a multiple-choice option tokenizes to nothing")
    ids, mask = right_pad(
        [context + c for c in conts], tok.pad_token_id if tok.pad_token_id is not None else 0
    )  # (C, T)
    device = next(model.parameters()).device
    logprobs = (
        model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits.float().log_softmax(-1)
    )  # (C, T, V)
    out = []
    for i, c in enumerate(conts):
        positions = torch.arange(
            len(context) - 1, len(context) - 1 + len(c), device=device
        )  # predict each choice token
        out.append(float(logprobs[i, positions, torch.tensor(c, device=device)].sum()))
    return out


def score_multiple_choice(model, tok, prompt: str, choices: list[str], answer_index: int) -> float:
    """1 when the reference choice has the highest log-likelihood (ties go to the first, as argmax does)."""
    lls = choice_loglikelihoods(model, tok, prompt, choices)
    return float(max(range(len(lls)), key=lls.__getitem__) == answer_index)


# ----------------------------------------------------------------------------------------------------
# A user task suite: JSONL, one example a line.
#   {"prompt": "...", "answer": "...", "scorer": "exact"}            generated, then scored as text
#     scorer: exact (default) | normalized_exact | regex (answer is the pattern) | numeric | word_f1;
#     numeric also reads optional "rel_tol" / "abs_tol".
#   {"prompt": "...", "choices": ["...", "..."], "answer": 1 or "the right choice"}   multiple choice
#   optional "skill": groups examples; each skill counts once in the suite score (default "task").
#   "messages" (OpenAI turns) in place of "prompt": a conversation, rendered by each model's own chat template;
#   a final assistant turn is the answer when "answer" is not given.


def _check_example(obj, where: str) -> dict:
    if isinstance(obj, dict) and obj.get("messages") is not None:
        turns, reference = chat.split_conversation(chat.check_messages(obj["messages"], where), where)
        obj = obj | {
            "prompt": chat.plain_text(turns),
            "messages": turns,
            "answer": obj["answer"] if "answer" in obj else reference,
        }
    if not isinstance(obj, dict) or not isinstance(obj.get("prompt"), str) or not obj["prompt"]:
        raise UserError(f'{where}: each line needs a non-empty string "prompt" (or a "messages" list)')
    ex = {"prompt": obj["prompt"], "skill": str(obj.get("skill") or "task")}
    if obj.get("messages"):
        ex["messages"] = obj["messages"]
    if "choices" in obj:
        choices, answer = obj["choices"], obj.get("answer")
        if not isinstance(choices, list) or len(choices) < 2 or not all(isinstance(c, str) and c for c in choices):
            raise UserError(f'{where}: "choices" must be a list of at least two non-empty strings')
        if isinstance(answer, str) and answer in choices:
            answer = choices.index(answer)
        if not isinstance(answer, int) or isinstance(answer, bool) or not 0 <= answer < len(choices):
            raise UserError(f'{where}: "answer" must be a choice\'s index or one of the choices')
        return ex | {"scorer": "multiple_choice", "choices": choices, "answer": answer}
    scorer = obj.get("scorer", "exact")
    if scorer not in TEXT_SCORERS:
        raise UserError(
            f'{where}: unknown scorer {scorer!r}; choose from {", ".join(TEXT_SCORERS)} (or give "choices")'
        )
    if not isinstance(obj.get("answer"), str):
        raise UserError(f'{where}: "answer" must be a string')
    if scorer == "regex":
        try:
            re.compile(obj["answer"])
        except re.error as err:
            raise UserError(f"{where}: bad regular expression: {err}") from None
    if scorer == "numeric" and extract_number(obj["answer"]) is None:
        raise UserError(f'{where}: numeric scorer needs a number in "answer"')
    tolerances = {k: float(obj[k]) for k in ("rel_tol", "abs_tol") if k in obj}
    return ex | {"scorer": scorer, "answer": obj["answer"], **tolerances}


def load_task_suite(path: str | Path) -> list[dict]:
    """Read and check a task-suite JSONL; a bad line is a one-line UserError naming file and line."""
    return [_check_example(obj, where) for where, obj in read_jsonl(path, "task suite file")]


def score_task_suite(
    model, tok, examples: list[dict], max_new_tokens: int, complete: Complete | None = None
) -> dict[str, list[float]]:
    """Per-skill example scores, in the shape evaluate_model's per_skill uses (so suite_result applies).
    complete: where the text answers come from instead of the model (multiple choice still needs the model)."""
    scores: list[float | None] = [None] * len(examples)
    generated = [i for i, ex in enumerate(examples) if ex["scorer"] != "multiple_choice"]
    if generated:
        texts = (complete or local_complete(model, tok, max_new_tokens))(
            [examples[i].get("messages") or examples[i]["prompt"] for i in generated]
        )
        for i, text in zip(generated, texts):
            ex = examples[i]
            tolerances = {k: ex[k] for k in ("rel_tol", "abs_tol") if k in ex}
            scores[i] = TEXT_SCORERS[ex["scorer"]](final_answer(text), ex["answer"], **tolerances)
    for i, ex in enumerate(examples):
        if ex["scorer"] == "multiple_choice":
            scores[i] = score_multiple_choice(
                model, tok, chat.render_prompt(tok, chat.turns_of(ex)), ex["choices"], ex["answer"]
            )
    per_skill: dict[str, list[float]] = {}
    for ex, score in zip(examples, scores):
        per_skill.setdefault(ex["skill"], []).append(score)
    return per_skill
