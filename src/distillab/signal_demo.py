"""`distillab demo --signal`: where a teacher's signal teaches more than its greedy text, measured over seeds.

The classic demo distils knowledge the teacher states one way; there forward KL on its top-k equals SFT on its
text (the teacher is one-hot). Real teachers answer prompts they never saw, with distributions that carry more
than their argmax, and write reasoning a student needs to see. `lab:signal-teacher` (the shipped teacher, taught
the lab's signal skills on their teacher region only: lab.world.SIGNAL_SKILLS) shows both:

- distribution (`habit`): every entity has its own distribution over four habits, every answer is a draw, and
  the student's questions are phrasings the teacher never saw. The student is scored against the world's
  distribution: the mode, the total variation distance, the cross-entropy of the world's draws, and the
  expected accuracy of sampling at temperature 1 (the chance a sample equals a fresh draw). Greedy text teaches
  the mode only; a few samples teach a noisy histogram; the teacher's top-k carries the distribution itself.
- reasoning (`carry`): column addition of 3-digit numbers, a trace before the answer. The teacher samples at
  temperature 1 and errs; `[verify] method = "lab"` keeps the samples whose final answer is right. Arms: the
  verified answers without their traces, every trace, the verified traces, the verified traces with KD.

Every arm trains the shipped base student with the same steps, batch and learning rate on the same prompts,
once per seed (SEEDS: the seed draws the prompts' order, the teacher's samples and the training order).
Intervals are a bootstrap over seeds *and* test prompts (seeds resampled, then prompts, the same draws for every
arm, so differences are paired); a difference is called a win only when its interval excludes 0 and it has the
same sign in every seed.
"""

from __future__ import annotations

import json
import re
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from distillab import models, stage
from distillab.config import RunConfig, from_dict
from distillab.files import write_atomic
from distillab.generate import generate_stages
from distillab.lab.world import HABIT_DISTRIBUTION, HABITS, SKILLS, get_skill, habit_entity
from distillab.pipeline import share_teacher_cache
from distillab.rundir import RunDir
from distillab.scoring import choice_loglikelihoods, score_model
from distillab.train import train_stage

SIGNAL_TEACHER = "lab:signal-teacher"
STUDENT = "lab:base"
SEEDS = (0, 1, 2)
N_BOOT = 2000
GENERAL_N = 20  # general-suite prompts per classic skill: enough to see forgetting, cheap enough for every arm

SFT = {"loss": "ce", "kd_weight": 0.0, "sft_weight": 1.0}
KD = {"loss": "forward_kl", "kd_weight": 1.0, "sft_weight": 0.0}
GREEDY = {"temperature": 0.0, "samples_per_prompt": 1}
SAMPLED = {"temperature": 1.0, "samples_per_prompt": 4}  # as real pipelines draw a distribution: a few at T=1
TRACES = {"temperature": 1.0, "samples_per_prompt": 1, "max_new_tokens": 96}  # at T=1 the teacher errs
VERIFIED = {"method": "lab", "keep": "all"}


@dataclass(frozen=True)
class Arm:
    label: str
    teacher: dict  # [teacher] fields over the family's
    train: dict  # [train] fields over the family's
    verify: dict | None = None  # [verify]; None: every sample kept


@dataclass(frozen=True)
class Family:
    name: str
    skill: str
    n_prompts: int
    max_steps: int
    arms: list[Arm] = field(default_factory=list)
    batch: int = 32  # rows a step
    # habit is taught and scored on the same questions (its test is the world's distribution), so checking its
    # prompts against its own test suite would drop them all
    decontaminate: bool = True


FAMILIES = [
    Family(
        name="distribution",
        skill="habit",
        n_prompts=100,
        max_steps=150,
        decontaminate=False,
        arms=[
            Arm("SFT on greedy text", GREEDY, SFT),
            Arm("SFT on sampled text", SAMPLED, SFT),
            Arm("off-policy KD", SAMPLED, KD),
            Arm("on-policy KD", SAMPLED, KD | {"on_policy_fraction": 0.5}),
        ],
    ),
    Family(
        name="reasoning",
        skill="carry",
        # the student learns the procedure late and needs fresh problems to do it: at 300 steps of 32 on 600
        # problems (26 epochs of the verified ones) it memorised them (0.09); 600 steps of 16 on 3,000 learn it
        n_prompts=3000,
        max_steps=600,
        batch=16,
        arms=[
            Arm("answers only (verified)", TRACES, SFT | {"traces": False}, VERIFIED),
            Arm("traces, unverified", TRACES, SFT),
            Arm("traces, verified", TRACES, SFT, VERIFIED),
            Arm("traces, verified + KD", TRACES, KD, VERIFIED),
        ],
    ),
]


def slug(label: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", label.lower()).strip("-")


def arm_config(runs_dir: Path, family: Family, arm: Arm, seed: int) -> RunConfig:
    return from_dict(
        {
            "name": f"{family.name}-{slug(arm.label)}-s{seed}",
            "runs_dir": str(runs_dir),
            "teacher": {"model": SIGNAL_TEACHER, "top_k_logprobs": 20, "max_new_tokens": 32, **arm.teacher},
            "data": {"skills": [family.skill], "n_prompts": family.n_prompts, "seed": seed},
            "train": {
                "student": STUDENT,
                "max_steps": family.max_steps,
                "per_device_batch_size": family.batch,
                "lr": 2e-3,
                "save_steps": family.max_steps,
                "seed": seed,
                **arm.train,
            },
            "verify": arm.verify,
            "decontaminate": {"enabled": family.decontaminate},
        }
    )


# ----------------------------------------------------------------------------------------------------
# Scores, per test prompt (so seeds and prompts can be resampled together).


def habit_scores(model, tok) -> dict[str, list[float]]:
    """Per habit question: the model's probability of each habit (answer + end of sequence) against the world's."""
    questions = [e.prompt for e in get_skill("habit").examples("test", len(HABIT_DISTRIBUTION))]
    scores: dict[str, list[float]] = {"mode": [], "tv": [], "cross_entropy": [], "sample_accuracy": []}
    for question in questions:
        truth = HABIT_DISTRIBUTION[habit_entity(question)]
        logps = choice_loglikelihoods(model, tok, question, [h + tok.eos_token for h in HABITS])
        p_model = dict(zip(HABITS, np.exp(logps)))
        elsewhere = max(0.0, 1.0 - sum(p_model.values()))  # mass on answers that are no habit at all
        scores["mode"].append(float(max(p_model, key=p_model.get) == max(truth, key=truth.get)))
        scores["tv"].append(0.5 * (sum(abs(p_model[h] - truth[h]) for h in HABITS) + elsewhere))
        scores["cross_entropy"].append(-sum(truth[h] * max(logp, -20.0) for h, logp in zip(HABITS, logps)))
        scores["sample_accuracy"].append(sum(p_model[h] * truth[h] for h in HABITS))
    return scores


def model_scores(model_name: str, family: Family, n_task: int) -> dict[str, list[float]]:
    model, tok = models.load(model_name)
    general = score_model(model, tok, list(SKILLS), GENERAL_N, 32)
    out = {"general": [float(np.mean(v)) for v in zip(*general.values())]}  # per row of the suite: skills averaged
    if family.skill == "habit":
        return out | habit_scores(model, tok)
    return out | {"accuracy": score_model(model, tok, [family.skill], n_task, 96)[family.skill]}


# ----------------------------------------------------------------------------------------------------
# Intervals over seeds and prompts.


def seeds_and_prompts_ci(per_seed: list[list[float]], n_boot: int = N_BOOT, seed: int = 0) -> list[float]:
    """95% percentile interval of the mean over seeds x prompts: seeds resampled, then prompts (the same prompt
    draws for every seed: they share a test set). per_seed: (seeds, prompts). A difference of two arms is passed
    as the per-prompt differences of each seed."""
    values = np.asarray(per_seed, dtype=float)  # (S, P)
    rng = np.random.default_rng(seed)
    s, p = values.shape
    seed_draws = rng.integers(0, s, size=(n_boot, s))  # (B, S)
    prompt_draws = rng.integers(0, p, size=(n_boot, p))  # (B, P)
    means = np.array([values[seed_draws[b]][:, prompt_draws[b]].mean() for b in range(n_boot)])  # (B,)
    return [float(np.quantile(means, 0.025)), float(np.quantile(means, 0.975))]


def compare(a: list[list[float]], b: list[list[float]], higher_is_better: bool = True) -> dict:
    """a - b, paired by seed and prompt: mean, interval, per-seed differences, and whether it is a win for a."""
    diffs = (np.asarray(a, dtype=float) - np.asarray(b, dtype=float)).tolist()  # (S, P)
    lo, hi = seeds_and_prompts_ci(diffs)
    per_seed = [float(np.mean(d)) for d in diffs]
    if higher_is_better:
        wins = lo > 0 and all(d > 0 for d in per_seed)
    else:
        wins = hi < 0 and all(d < 0 for d in per_seed)
    return {"diff": float(np.mean(diffs)), "ci": [lo, hi], "per_seed": per_seed, "win": bool(wins)}


# ----------------------------------------------------------------------------------------------------
# The demo.


def run_signal_demo(runs_dir: Path, runner=None, log=print, seeds=SEEDS) -> dict:
    """Every family's arms over `seeds`, scored; runs/signal/signal_summary.json and the tables."""
    began = time.time()
    root = Path(runs_dir) / "signal"
    runner = runner or (lambda c, stages: stage.run_stages(stages, c, stage.StageContext(log=log)))
    summary: dict = {"teacher": SIGNAL_TEACHER, "student": STUDENT, "seeds": list(seeds), "families": {}}
    for family in FAMILIES:
        n_task = len(HABIT_DISTRIBUTION) if family.skill == "habit" else 200
        rows: dict[str, dict] = {}
        fixed = {"base": STUDENT, "teacher": SIGNAL_TEACHER}  # no seed: scored once, repeated over the seeds
        for label, name in fixed.items():
            scores = model_scores(name, family, n_task)
            rows[label] = {"scores": {k: [v] * len(seeds) for k, v in scores.items()}}
        first_asked: dict[tuple, RunConfig] = {}  # (teacher settings, seed) -> the arm that asked the teacher
        for arm in family.arms:
            per_seed: dict[str, list[list[float]]] = {}
            data = {"rows": 0, "prompt_tokens": 0, "completion_tokens": 0, "usd": 0.0}
            train_seconds = []  # per seed: what each arm costs, for the demo's time budget
            for seed in seeds:
                cfg = arm_config(root, family, arm, seed)
                asked = first_asked.setdefault((json.dumps(arm.teacher, sort_keys=True), seed), cfg)
                share_teacher_cache(asked, cfg)  # the same requests: answered once, for every arm that asks them
                records = runner(cfg, [*generate_stages(cfg), train_stage])
                train_seconds.append(records["train"].train_seconds)
                generated = records["generate:train"]
                data["rows"] += generated.rows
                data["prompt_tokens"] += generated.prompt_tokens
                data["completion_tokens"] += generated.completion_tokens
                data["usd"] += generated.usd
                for key, values in model_scores(str(RunDir(cfg.run_dir).student), family, n_task).items():
                    per_seed.setdefault(key, []).append(values)
            rows[arm.label] = {"scores": per_seed, "teacher_data": data, "train_seconds": train_seconds}
        summary["families"][family.name] = family_table(family, rows)
        log(f"signal demo: {family.name} done ({time.time() - began:.0f}s)")
    summary["wall_seconds"] = round(time.time() - began, 1)
    write_atomic(root / "signal_summary.json", json.dumps(summary, indent=1))
    print_signal(summary)
    return summary


METRICS = {  # metric -> higher is better
    "mode": True,
    "tv": False,
    "cross_entropy": False,
    "sample_accuracy": True,
    "accuracy": True,
    "general": True,
}
COMPARISONS = {  # family -> (arm, against, metric): the claims the table checks
    "distribution": [
        ("off-policy KD", "SFT on sampled text", "tv"),
        ("off-policy KD", "SFT on greedy text", "tv"),
        ("on-policy KD", "off-policy KD", "tv"),
        ("SFT on greedy text", "SFT on sampled text", "mode"),
    ],
    "reasoning": [
        ("traces, verified", "answers only (verified)", "accuracy"),
        ("traces, verified", "traces, unverified", "accuracy"),
        ("traces, verified + KD", "traces, verified", "accuracy"),
    ],
}


def family_table(family: Family, rows: dict[str, dict]) -> dict:
    table = {}
    for label, row in rows.items():
        table[label] = {
            metric: {"mean": float(np.mean(values)), "ci": seeds_and_prompts_ci(values)}
            for metric, values in row["scores"].items()
        } | {key: row[key] for key in ("teacher_data", "train_seconds") if key in row}
    comparisons = [
        {"arm": a, "against": b, "metric": m} | compare(rows[a]["scores"][m], rows[b]["scores"][m], METRICS[m])
        for a, b, m in COMPARISONS[family.name]
        if a in rows and b in rows
    ]
    return {"skill": family.skill, "rows": table, "comparisons": comparisons}


def print_signal(summary: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    for name, family in summary["families"].items():
        metrics = [m for m in METRICS if m in next(iter(family["rows"].values()))]
        table = Table("model", *metrics, "teacher rows / tokens", title=f"{name} ({family['skill']}), test split")
        for label, row in family["rows"].items():
            cells = [f"{row[m]['mean']:.3f} [{row[m]['ci'][0]:.3f}, {row[m]['ci'][1]:.3f}]" for m in metrics]
            data = row.get("teacher_data")
            tokens = f"{data['rows']} / {data['prompt_tokens'] + data['completion_tokens']:,}" if data else ""
            table.add_row(label, *cells, tokens)
        console.print(table)
        for c in family["comparisons"]:
            verdict = "win" if c["win"] else "no win"
            console.print(
                f"  {c['arm']} vs {c['against']}, {c['metric']}: {c['diff']:+.3f} "
                f"[{c['ci'][0]:+.3f}, {c['ci'][1]:+.3f}], per seed "
                + " ".join(f"{d:+.3f}" for d in c["per_seed"])
                + f": {verdict}"
            )
    console.print(f"signal demo: {summary['wall_seconds']:.0f}s over seeds {summary['seeds']}")
