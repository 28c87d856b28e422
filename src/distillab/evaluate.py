"""Stage 3, evaluate: every model on the task suite and the general suite -> eval/<model>.json.

The task suite is the skills the student was distilled on (or the user's JSONL of prompt/answer); the
general suite is every other lab skill plus perplexity on held-out world text. A suite's score is the mean
of its skills' scores (each skill counts once, however many examples it has). "Gap closed" on a suite is
(student - base) / (teacher - base): 1.0 means the student caught up with the teacher, 0 means no gain,
negative means it lost ground.
"""

from __future__ import annotations

import json
import math
import random
import time
from pathlib import Path

import torch

from distillab import models
from distillab.config import RunConfig, write_atomic
from distillab.generation import generate
from distillab.lab.world import SKILLS, get_skill, world_text
from distillab.rundir import fingerprint, is_fresh, mark_fresh


def suites(cfg: RunConfig) -> tuple[list[str], list[str]]:
    task = list(cfg.data.skills) if not cfg.data.prompts_file else []
    general = cfg.eval.general if cfg.eval.general is not None else [s for s in SKILLS if s not in task]
    return task, general


def score_skill(model, tok, skill_name: str, n: int, max_new_tokens: int) -> list[float]:
    skill = get_skill(skill_name)
    examples = skill.examples("test", n)
    outs = generate(model, tok, [e.prompt for e in examples], max_new_tokens=max_new_tokens)
    return [skill.score(o.text, e.answer) for o, e in zip(outs, examples)]


@torch.no_grad()
def perplexity(model, tok, texts: list[str], batch_size: int = 64) -> float:
    """exp(mean next-token negative log-likelihood) over all tokens of the texts (after <bos>)."""
    model.eval()
    tok.padding_side = "right"
    nll, count = 0.0, 0
    for start in range(0, len(texts), batch_size):
        enc = tok(texts[start : start + batch_size], return_tensors="pt", padding=True).to(next(model.parameters()).device)
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
    rng = random.Random(seed)
    stats = []
    for _ in range(n_boot):
        means = []
        for scores in per_skill.values():
            resampled = [scores[rng.randrange(len(scores))] for _ in scores]
            means.append(sum(resampled) / len(resampled))
        stats.append(sum(means) / len(means))
    stats.sort()
    lo = stats[int((1 - level) / 2 * n_boot)]
    hi = stats[min(n_boot - 1, int((1 + level) / 2 * n_boot))]
    return [lo, hi]


def suite_result(per_skill: dict[str, list[float]], n_boot: int) -> dict:
    if not per_skill:
        return {"score": None, "ci": None}
    score = sum(sum(v) / len(v) for v in per_skill.values()) / len(per_skill)
    return {"score": score, "ci": bootstrap_ci(per_skill, n_boot)}


def evaluate_model(model_name: str | Path, task: list[str], general: list[str], n: int, n_boot: int,
                   max_new_tokens: int) -> dict:
    model, tok = models.load(model_name)
    began = time.time()
    per_skill = {s: score_skill(model, tok, s, n, max_new_tokens) for s in dict.fromkeys(task + general)}
    seconds = time.time() - began
    return {
        "model": str(model_name),
        "parameters": sum(p.numel() for p in model.parameters()),
        "skills": {s: {"score": sum(v) / len(v), "n": len(v), "ci": bootstrap_ci({s: v}, n_boot), "scores": v}
                   for s, v in per_skill.items()},
        "task": suite_result({s: per_skill[s] for s in task}, n_boot),
        "general": suite_result({s: per_skill[s] for s in general}, n_boot),
        "world_text_perplexity": perplexity(model, tok, world_text()),
        "eval_seconds": round(seconds, 2),
    }


def gap_closed(student: float | None, base: float | None, teacher: float | None) -> float | None:
    if None in (student, base, teacher) or abs(teacher - base) < 1e-9:
        return None
    return (student - base) / (teacher - base)


def run_evaluate(cfg: RunConfig, extra_models: dict[str, str] | None = None, log=print) -> dict[str, dict]:
    """Evaluate teacher, base and the run's student (plus extra named models) into eval/<name>.json."""
    run_dir = cfg.run_dir
    task, general = suites(cfg)
    named = {"teacher": cfg.teacher.model, "base": cfg.train.student, "distilled": str(run_dir / "student")}
    if cfg.teacher.base_url:  # a remote teacher is scored through its own API only by lm-eval; skip here
        named.pop("teacher")
    named.update(extra_models or {})
    results = {}
    for label, name in named.items():
        out = run_dir / "eval" / f"{label}.json"
        path = models.resolve_model_path(name)
        weights = sorted(path.glob("*.safetensors"))
        stamp = fingerprint("evaluate", task, general, cfg.eval.n_per_skill, cfg.eval.bootstrap, *weights)
        if is_fresh(run_dir, f"evaluate:{label}", stamp) and out.is_file():
            results[label] = json.loads(out.read_text())
            continue
        log(f"evaluate: {label} ({name})")
        res = evaluate_model(name, task, general, cfg.eval.n_per_skill, cfg.eval.bootstrap, cfg.teacher.max_new_tokens)
        res["label"] = label
        write_atomic(out, json.dumps(res, indent=1))
        mark_fresh(run_dir, f"evaluate:{label}", stamp)
        results[label] = res
    return results
