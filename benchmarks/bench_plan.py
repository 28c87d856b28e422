"""`distillab plan` against the full run it projects, on the lab (configs/lab.toml: the demo's task and run).

    .venv/bin/python benchmarks/bench_plan.py [--config configs/lab.toml] [--out runs/bench_plan]
        [--fractions 0.02 0.05 0.10] [--compare-temperature 2.0] [--seeds 1 2 3] [--keep]

1. The plan: pilots at --fractions of the train prompts (one teacher: the config's), timed from a fresh directory.
2. The full run (generate, train, evaluate, report: `distillab run`), the same config and seeds, timed from another
   fresh directory (no cache shared with the plan: both pay for what they ask). Both are timed in wall seconds and in
   this process's CPU seconds (every thread): on a machine shared with other work the wall clock measures the load as
   much as the work, the CPU seconds the work.
3. The projection error at each pilot size: the plan refitted on the pilots up to that size (two pilots at least;
   every pilot's stages are stamped, so only the fit runs again) against the full run's TEST task and general
   scores; and the plan's time and teacher tokens against the full run's.
4. With --seeds S...: the same plan again with each training seed S (train.seed: the order the pilots read their
   rows in; the same prompts, the same teacher answers), against the full run of seed 0: how far one training seed's
   noise moves the projection, which the band (the dev items resampled) does not hold.
5. With --compare-temperature T: the config's teacher against the same teacher at temperature T (pilots on the same
   prompts, in the same plan), and a full run with each, to check the plan's ranking against the full runs'.

--api-teacher instead: the plan alone, its teacher the config's behind `distillab serve` on 127.0.0.1 (a real
OpenAI-compatible endpoint, one process), priced by --usd-per-1m (input, output) and held to --max-usd: what a plan
on an API teacher prints, the budget's trim, and the requests serve answered (each pilot prompt once).

The lab's prompts repeat (a closed skill's items are drawn again to fill n_prompts), so a pilot's prompts are its
share of the distinct prompts, each with its repeats (the seeded hash is of the prompt's text).
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import statistics
import time
from pathlib import Path

from distillab.config import RunConfig, from_dict, load_config
from distillab.files import read_json
from distillab.pipeline import run_all_stages
from distillab.plan import run_plan, with_teacher_options
from distillab.plan_curve import PlanRecord
from distillab.records import read_eval
from distillab.rundir import RunDir
from distillab.stage import StageContext, run_stages


def renamed(cfg: RunConfig, name: str, out: Path, **plan) -> RunConfig:
    data = cfg.model_dump()
    data.update(name=name, runs_dir=str(out))
    data["plan"].update(plan)
    return from_dict(data)


def cpu_seconds() -> float:
    """This process's CPU seconds, every thread, user + system: the work done, whatever else the machine runs."""
    used = resource.getrusage(resource.RUSAGE_SELF)
    return used.ru_utime + used.ru_stime


def timed(work) -> tuple[float, float, object]:
    """(wall seconds, CPU seconds, result) of work()."""
    wall, cpu = time.time(), cpu_seconds()
    result = work()
    return time.time() - wall, cpu_seconds() - cpu, result


def full_run(cfg: RunConfig, fresh: bool) -> tuple[tuple[float, float], dict]:
    """(wall, CPU) seconds of `distillab run`, and its test scores and teacher tokens."""
    run = RunDir(cfg.run_dir)
    if fresh:
        shutil.rmtree(run.root, ignore_errors=True)
    wall, cpu, _ = timed(lambda: run_stages(run_all_stages(cfg), cfg, StageContext(log=lambda *a, **k: None)))
    made = read_json(run.generate_summary("train"))
    distilled, base = read_eval(run.eval("distilled")), read_eval(run.eval("base"))
    ledger = read_json(run.ledger)
    spent = (ledger["break_even"].get("teacher_usd") or 0.0) + (ledger["training"].get("usd") or 0.0)
    return (wall, cpu), {
        "task": distilled.task.score,
        "general": distilled.general.score,
        "base_general": base.general.score,
        "tokens": made["prompt_tokens"] + made["completion_tokens"],
        "usd": spent,
    }


def plan_tokens(record: PlanRecord) -> int:
    """Teacher tokens the plan asked for: each teacher's largest pilot (the smaller ones are inside it)."""
    return sum(t.pilots[-1].prompt_tokens + t.pilots[-1].completion_tokens for t in record.teachers)


def whole(record: PlanRecord, label: str | None = None):
    teacher = next(t for t in record.teachers if label in (None, t.label))
    return teacher, teacher.projections[-1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", type=Path, default=Path("configs/lab.toml"))
    ap.add_argument("--out", type=Path, default=Path("runs/bench_plan"))
    ap.add_argument("--fractions", type=float, nargs="+", default=[0.02, 0.05, 0.10])
    ap.add_argument("--compare-temperature", type=float, default=None)
    ap.add_argument("--seeds", type=int, nargs="*", default=[], help="rerun the plan with these training seeds")
    ap.add_argument("--keep", action="store_true", help="reuse the runs already in --out (times then mean nothing)")
    ap.add_argument("--api-teacher", action="store_true")
    ap.add_argument("--usd-per-1m", type=float, nargs=2, default=[0.15, 0.60], metavar=("INPUT", "OUTPUT"))
    ap.add_argument("--max-usd", type=float, default=0.01)
    args = ap.parse_args()
    base = load_config(args.config)
    if args.api_teacher:
        api_plan(base, args)
        return
    fractions = sorted(args.fractions)
    load = os.getloadavg()[0]

    plan_cfg = renamed(base, "plan", args.out, fractions=fractions, sizes=[*fractions, 0.25, 0.5, 1.0])
    if not args.keep:
        shutil.rmtree(plan_cfg.run_dir, ignore_errors=True)
    plan_wall, plan_cpu, record = timed(lambda: run_plan(plan_cfg, log=lambda *a, **k: None))
    (full_wall, full_cpu), full = full_run(renamed(base, "full", args.out), fresh=not args.keep)

    print(f"load average at the start: {load:.2f}; at the end: {os.getloadavg()[0]:.2f}")
    print(f"full run (test): task {full['task']:.3f}, general {full['general']:.3f} (base {full['base_general']:.3f})")
    print("| pilots | projected task [95%] | error | projected general | error | teacher tokens |")
    print("|---|---|---|---|---|---|")
    for k in range(2, len(fractions) + 1):
        refit = run_plan(renamed(plan_cfg, "plan", args.out, fractions=fractions[:k]), log=lambda *a, **kw: None)
        teacher, p = whole(refit)
        lo, hi = p.task_band
        print(
            f"| {', '.join(f'{f:.0%}' for f in fractions[:k])} | {p.task:.3f} [{lo:.3f}, {hi:.3f}] | "
            f"{(p.task - full['task']) * 100:+.1f} pts | {p.general:.3f} | {(p.general - full['general']) * 100:+.1f} pts "
            f"| {plan_tokens(refit):,} |"
        )
    record = run_plan(plan_cfg, log=lambda *a, **k: None)  # plan.json as the whole plan wrote it
    print(
        f"plan {plan_wall:.0f} s wall, {plan_cpu:.0f} s CPU vs full run {full_wall:.0f} s wall, {full_cpu:.0f} s CPU: "
        f"{plan_wall / full_wall:.0%} wall, {plan_cpu / full_cpu:.0%} CPU; teacher tokens {plan_tokens(record):,} vs "
        f"{full['tokens']:,} ({plan_tokens(record) / full['tokens']:.0%})"
    )
    for teacher in record.teachers:
        print(f"{teacher.label}: {teacher.flattens}; {teacher.meets}")
    if args.seeds:
        seed_spread(plan_cfg, args, full, whole(record)[1])

    if args.compare_temperature is not None:
        option = f"temperature={args.compare_temperature:g}"
        wall, cpu, compared = timed(
            lambda: run_plan(with_teacher_options(plan_cfg, [option]), log=lambda *a, **k: None)
        )
        print(f"teacher comparison: {wall:.0f} s wall, {cpu:.0f} s CPU more for the second teacher's pilots")
        print(compared.ranking)
        hot = from_dict(
            base.model_dump() | {"teacher": base.teacher.model_dump() | {"temperature": args.compare_temperature}}
        )
        actual = {"config": full}
        actual[option] = full_run(renamed(hot, "full_hot", args.out), fresh=not args.keep)[1]
        for label, scores in actual.items():
            per = scores["task"] / scores["usd"] if scores["usd"] else float("nan")
            print(
                f"full run, teacher {label}: task {scores['task']:.3f}, general {scores['general']:.3f}, {per:.4g} per $"
            )
        best = max(
            actual, key=lambda k: actual[k]["task"] / actual[k]["usd"] if actual[k]["usd"] else actual[k]["task"]
        )
        print(f"the full runs rank first: {best}; the plan ranks first: {compared.teachers[0].label}")


def seed_spread(plan_cfg: RunConfig, args, full: dict, seed0) -> None:
    """The plan again with each of --seeds as train.seed; each projection's error against the full run (seed 0)."""
    tasks, generals = [seed0.task], [seed0.general]
    for seed in args.seeds:
        data = plan_cfg.model_dump()
        data.update(name=f"plan_seed{seed}")
        data["train"]["seed"] = seed
        cfg = from_dict(data)
        if not args.keep:
            shutil.rmtree(cfg.run_dir, ignore_errors=True)
        teacher, p = whole(run_plan(cfg, log=lambda *a, **k: None))
        pilots = ", ".join(f"{q.dev_task:.3f}" for q in teacher.pilots)
        print(
            f"train seed {seed}: pilots (dev task) {pilots}; projected task {p.task:.3f} "
            f"({(p.task - full['task']) * 100:+.1f} pts), general {p.general:.3f} ({(p.general - full['general']) * 100:+.1f} pts)"
        )
        tasks.append(p.task)
        generals.append(p.general)
    sd = statistics.stdev(tasks) if len(tasks) > 1 else float("nan")
    print(
        f"projected task over {len(tasks)} training seeds: {min(tasks):.3f} to {max(tasks):.3f}, sd {sd * 100:.1f} pts; "
        f"general {min(generals):.3f} to {max(generals):.3f}"
    )


def api_plan(base: RunConfig, args) -> None:
    """The plan with the teacher behind `distillab serve`, priced and under a budget; its table, and serve's count."""
    from rich.console import Console

    from distillab.plan import print_plan
    from distillab.testing import metric_sum, read_metrics, server_process

    with server_process(base.teacher.model) as url:  # it serves the model under its own name (lab:teacher)
        teacher = base.teacher.model_dump() | {
            "base_url": url,
            "usd_per_1m_input": args.usd_per_1m[0],
            "usd_per_1m_output": args.usd_per_1m[1],
        }
        cfg = renamed(from_dict(base.model_dump() | {"teacher": teacher}), "api_plan", args.out, max_usd=args.max_usd)
        if not args.keep:
            shutil.rmtree(cfg.run_dir, ignore_errors=True)
        wall, cpu, record = timed(lambda: run_plan(cfg, log=lambda *a, **k: None))
        answered = metric_sum(read_metrics(url.removesuffix("/v1")), "distillab_answers_total")
    print_plan(record, RunDir(cfg.run_dir).plan_record, console=Console(width=200))
    from distillab.cache import RequestCache

    cache = RequestCache(RunDir(cfg.run_dir).cache())
    held = cache.db.execute("SELECT COUNT(*) FROM responses").fetchone()[0]
    cache.close()
    print(
        f"{wall:.0f} s wall, {cpu:.0f} s CPU; serve answered {answered:.0f} requests, the run's cache holds {held} "
        "(the pilots' prompts and the teacher's test task prompts, each asked once)"
    )


if __name__ == "__main__":
    main()
