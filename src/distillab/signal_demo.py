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
from distillab.errors import UserError
from distillab.files import write_atomic
from distillab.generate import generate_stages
from distillab.lab.world import HABIT_DISTRIBUTION, HABITS, SKILLS, get_skill, habit_entity
from distillab.pipeline import share_teacher_cache
from distillab.rundir import RunDir
from distillab.scoring import choice_loglikelihoods, score_model
from distillab.select import select_stages
from distillab.train import train_stage

SIGNAL_TEACHER = "lab:signal-teacher"
STUDENT = "lab:base"
SEEDS = (0, 1, 2)
N_BOOT = 2000

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
    retain: dict | None = None  # [retain]; None: no replay, no selection


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
    comparisons: list[tuple[str, str, str]] = field(default_factory=list)  # (arm, against, metric): the claims
    general_n: int = 20  # general-suite prompts per classic skill: enough to see forgetting, cheap for every arm


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
        comparisons=[
            ("off-policy KD", "SFT on sampled text", "tv"),
            ("off-policy KD", "SFT on greedy text", "tv"),
            ("on-policy KD", "off-policy KD", "tv"),
            ("SFT on greedy text", "SFT on sampled text", "mode"),
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
        comparisons=[
            ("traces, verified", "answers only (verified)", "accuracy"),
            ("traces, verified", "traces, unverified", "accuracy"),
            ("traces, verified + KD", "traces, verified", "accuracy"),
        ],
    ),
]


def chosen_families(names: list[str]) -> list[Family]:
    """FAMILIES by name, in their order (every one when `names` is empty); an unknown name is a UserError."""
    known = [f.name for f in FAMILIES]
    unknown = [n for n in names if n not in known]
    if unknown:
        raise UserError(f"--family {unknown[0]!r}: the signal demo's families are {', '.join(known)}")
    return [f for f in FAMILIES if not names or f.name in names]


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
            "retain": arm.retain or {},
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
    general = score_model(model, tok, list(SKILLS), family.general_n, 32)
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
# The demo: jobs over worker processes of one thread each. Two cores run two arms at once (a thread more in one
# training buys about 1.5x; a process more, about 2x), and the numbers do not depend on how many workers ran them:
# every job computes on one thread, in its own process, from its own seeds.


@dataclass(frozen=True)
class Job:
    """One unit of work. "ask": the generate stages of the first arm asking the teacher a (settings, seed); the
    other arms of those settings copy its cache (the same requests, answered once). "arm": generate (from that
    cache), train and score one arm on one seed. "fixed": score a shipped model (base, teacher), once."""

    kind: str
    family: Family
    arm: Arm | None = None
    seed: int | None = None
    model: str | None = None  # "fixed": the model scored; its row label is `label`
    label: str = ""

    @property
    def key(self) -> tuple:
        return (self.kind, self.family.name, self.arm.label if self.arm else self.label, self.seed)

    def cost(self) -> float:
        """Rough relative work, to start the longest first (the last job then ends near the others)."""
        if self.kind == "fixed":
            return 1.0
        tokens = self.arm.teacher.get("max_new_tokens", 32)
        if self.kind == "ask":
            return self.family.n_prompts * self.arm.teacher.get("samples_per_prompt", 1) * tokens / 50
        traced = tokens if self.arm.train.get("traces", True) else 32
        on_policy = 2 if self.arm.train.get("on_policy_fraction") else 1
        return self.family.max_steps * self.family.batch * traced * on_policy / 100


def asker(family: Family, arm: Arm) -> Arm:
    """The first arm of the family with the same teacher settings: the one whose run asks the teacher."""
    return next(a for a in family.arms if a.teacher == arm.teacher)


FIXED = {"base": STUDENT, "teacher": SIGNAL_TEACHER}  # no seed: scored once, repeated over the seeds


def demo_jobs(seeds=SEEDS, families=FAMILIES) -> list[Job]:
    jobs = []
    for family in families:
        jobs += [Job("fixed", family, model=name, label=label) for label, name in FIXED.items()]
        jobs += [Job("ask", family, arm, seed) for arm in family.arms if asker(family, arm) is arm for seed in seeds]
        jobs += [Job("arm", family, arm, seed) for arm in family.arms for seed in seeds]
    return jobs


def task_size(family: Family) -> int:
    return len(HABIT_DISTRIBUTION) if family.skill == "habit" else 200


def run_job(job: Job, root: Path) -> dict:
    """What a worker does with one job; a plain dict back (it crosses a process boundary)."""
    if job.kind == "fixed":
        return {"scores": model_scores(job.model, job.family, task_size(job.family))}
    cfg = arm_config(root, job.family, job.arm, job.seed)
    ctx = stage.StageContext(log=_worker_log(cfg.name))
    if job.kind == "ask":
        stage.run_stages(generate_stages(cfg), cfg, ctx)
        return {}
    share_teacher_cache(arm_config(root, job.family, asker(job.family, job.arm), job.seed), cfg)
    records = stage.run_stages([*generate_stages(cfg), train_stage, *select_stages(cfg)], cfg, ctx)
    generated = records["generate:train"]
    return {
        "scores": model_scores(str(RunDir(cfg.run_dir).student), job.family, task_size(job.family)),
        "data": {k: getattr(generated, k) for k in ("rows", "prompt_tokens", "completion_tokens", "usd")},
        "train_seconds": records["train"].train_seconds,
        "steps": records["train"].steps,
    }


def _worker_log(name: str):
    from rich.console import Console
    from rich.markup import escape

    console = Console(stderr=True, highlight=False)
    return lambda line, **kw: console.print(f"[dim]{escape(name)}[/dim] {line}", **kw)


def _one_thread() -> None:
    import torch

    torch.set_num_threads(1)


def run_jobs(jobs: list[Job], root: Path, workers: int, log=print) -> dict[tuple, dict]:
    """Every job on `workers` processes, an arm's job after its teacher's; the ready job of most work first.
    {job.key: its result}."""
    import multiprocessing
    from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
    from concurrent.futures.process import BrokenProcessPool

    def needs(job: Job) -> tuple | None:
        return Job("ask", job.family, asker(job.family, job.arm), job.seed).key if job.kind == "arm" else None

    done: dict[tuple, dict] = {}
    running: dict = {}  # future -> job
    began = time.time()
    context = multiprocessing.get_context("spawn")  # a forked torch can hang in its thread pool
    with ProcessPoolExecutor(workers, mp_context=context, initializer=_one_thread) as pool:
        while len(done) < len(jobs):
            started = {j.key for j in running.values()}
            waiting = [j for j in jobs if j.key not in done and j.key not in started]
            ready = [j for j in waiting if (need := needs(j)) is None or need in done]
            ready.sort(key=Job.cost, reverse=True)
            for job in ready[: workers - len(running)]:
                running[pool.submit(run_job, job, root)] = job
            finished, _ = wait(running, return_when=FIRST_COMPLETED)
            for future in finished:
                job = running.pop(future)
                try:
                    done[job.key] = future.result()  # a worker's error is raised here, and the pool shut down
                except BrokenProcessPool as err:
                    raise UserError(
                        f"signal demo: a worker process died during {job.family.name} {job.kind} "
                        f"{job.arm.label if job.arm else job.label} (killed, or out of memory: fewer --workers use "
                        "less); the finished arms are kept: rerun the same command to resume"
                    ) from err
                line = _job_line(job, done[job.key])
                log(f"signal demo: {line} ({len(done)}/{len(jobs)}, {time.time() - began:.0f}s)")
    return done


def _job_line(job: Job, result: dict) -> str:
    if job.kind == "fixed":
        return f"{job.family.name}: {job.label} scored"
    if job.kind == "ask":
        return f"{job.family.name}: teacher asked for seed {job.seed} ({job.arm.label})"
    return f"{job.family.name}: {job.arm.label}, seed {job.seed}: {result['steps']} steps in {result['train_seconds']:.0f}s"


def default_workers() -> int:
    import os

    return max(1, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)


def run_signal_demo(runs_dir: Path, log=print, seeds=SEEDS, families=FAMILIES, workers: int | None = None) -> dict:
    """Every family's arms over `seeds`, scored; runs/signal/signal_summary.json and the tables."""
    began = time.time()
    root = Path(runs_dir) / "signal"
    jobs = demo_jobs(seeds, families)
    workers = min(workers or default_workers(), len(jobs))
    log(f"signal demo: {len(jobs)} jobs on {workers} worker process(es) of one thread")
    results = run_jobs(jobs, root, workers, log)
    summary: dict = {"teacher": SIGNAL_TEACHER, "student": STUDENT, "seeds": list(seeds), "families": {}}
    for family in families:
        rows: dict[str, dict] = {}
        for label in FIXED:
            scores = results[Job("fixed", family, label=label).key]["scores"]
            rows[label] = {"scores": {k: [v] * len(seeds) for k, v in scores.items()}}
        for arm in family.arms:
            per_seed = [results[Job("arm", family, arm, seed).key] for seed in seeds]
            rows[arm.label] = {
                "scores": {key: [r["scores"][key] for r in per_seed] for key in per_seed[0]["scores"]},
                "teacher_data": {k: sum(r["data"][k] for r in per_seed) for k in per_seed[0]["data"]},
                "train_seconds": [r["train_seconds"] for r in per_seed],  # what each arm costs, for the time budget
            }
        summary["families"][family.name] = family_table(family, rows)
    summary["workers"] = workers
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


def comparison_verdict(c: dict) -> str:
    """A comparison in words: a win for the arm; the other way round (its interval excludes 0 against the arm and
    every seed agrees); or no win (the interval holds 0, or the seeds disagree)."""
    if c["win"]:
        return "win"
    lo, hi = c["ci"]
    if (lo > 0 or hi < 0) and all((d > 0) == (c["diff"] > 0) for d in c["per_seed"]):
        return "the other way, every seed"
    return "no win"


def family_table(family: Family, rows: dict[str, dict]) -> dict:
    table = {}
    for label, row in rows.items():
        table[label] = {
            metric: {"mean": float(np.mean(values)), "ci": seeds_and_prompts_ci(values)}
            for metric, values in row["scores"].items()
        } | {key: row[key] for key in ("teacher_data", "train_seconds") if key in row}
    comparisons = [
        {"arm": a, "against": b, "metric": m} | compare(rows[a]["scores"][m], rows[b]["scores"][m], METRICS[m])
        for a, b, m in family.comparisons
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
            verdict = comparison_verdict(c)
            console.print(
                f"  {c['arm']} vs {c['against']}, {c['metric']}: {c['diff']:+.3f} "
                f"[{c['ci'][0]:+.3f}, {c['ci'][1]:+.3f}], per seed "
                + " ".join(f"{d:+.3f}" for d in c["per_seed"])
                + f": {verdict}"
            )
    console.print(f"signal demo: {summary['wall_seconds']:.0f}s over seeds {summary['seeds']}")
