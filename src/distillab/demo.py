"""`distillab demo`: the whole claim on the embedded lab, in about five minutes on two cores.

The lab teacher answers the train prompts of the target skills; the base student is distilled on those
answers by forward KL on the teacher's top-20 logprobs (the best row of benchmarks/loss_table.py). A zero-distillation control — the same
base student, the same number of steps on the same prompts, but the world's ground-truth answers — is
trained beside it. A fourth student, **distilled + retain**, is distilled on the same teacher data with the
default retain recipe (RETAIN): self-replay of the base's own answers on general prompts in every batch,
checkpoints and merges with the base chosen on the dev split; it uses no ground-truth general answers.
Teacher, base, distilled, control and retain are scored on the task suite (the target skills) and the
general suite (every other skill), test split, and the result is written whatever it shows.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

from distillab import stage
from distillab.config import RunConfig, from_dict
from distillab.evaluate import evaluate_stages
from distillab.files import write_atomic
from distillab.generate import generate_stages
from distillab.pipeline import records_by_label, report_stages, share_teacher_cache
from distillab.rundir import RunDir
from distillab.scoring import GapChange, gap_change
from distillab.select import select_stages
from distillab.train import train_stage

DEMO_SKILLS = ["recall", "describe"]  # knowledge the base student never saw: what distillation transfers
# The default retain recipe (benchmarks/retain_table.py compares the alternatives).
RETAIN = {
    "replay_fraction": 0.75,
    "replay_source": "base",
    "merge_alphas": [0.5, 0.75, 1.0],
    "select_checkpoints": True,
    "max_general_drop": 0.02,
    "dev_n_per_skill": 30,
}


def demo_config(runs_dir: Path) -> RunConfig:
    return from_dict(
        {
            "name": "demo",
            "runs_dir": str(runs_dir),
            "teacher": {"model": "lab:teacher", "top_k_logprobs": 20, "max_new_tokens": 64},
            "data": {"skills": DEMO_SKILLS, "n_prompts": 1500},
            "train": {
                "student": "lab:base",
                "loss": "forward_kl",
                "kd_weight": 1.0,
                "sft_weight": 0.0,
                "max_steps": 400,
                "per_device_batch_size": 32,
                "lr": 2e-3,
                "save_steps": 200,
            },
            "eval": {"n_per_skill": 100, "bootstrap": 1000},
        }
    )


def control_config(cfg: RunConfig) -> RunConfig:
    """Same student, prompts, steps and batch; ground-truth answers and plain cross-entropy."""
    data = cfg.model_dump()
    data.update(name="zero_distill", runs_dir=str(cfg.run_dir))
    data["data"]["source"] = "lab"
    data["train"].update(loss="ce", kd_weight=0.0, sft_weight=1.0)
    return from_dict(data)


def retain_config(cfg: RunConfig) -> RunConfig:
    """The demo's student with the default retain recipe: same teacher data, same steps and batch."""
    data = cfg.model_dump()
    data.update(name="retain", runs_dir=str(cfg.run_dir))
    data["train"].update(save_steps=200)  # checkpoints to choose from
    data["retain"] = dict(RETAIN)
    return from_dict(data)


def run_demo(runs_dir: Path, fresh: bool = False, runner=None, log=print) -> dict:
    """The demo's four students and their scores. runner(cfg, stages) -> {stage name: record} runs each list of
    stages (the CLI passes its own, with progress bars)."""
    began = time.time()
    cfg = demo_config(runs_dir)
    if fresh:
        shutil.rmtree(cfg.run_dir, ignore_errors=True)
    runner = runner or (lambda c, stages: stage.run_stages(stages, c, stage.StageContext(log=log)))
    control, kept = control_config(cfg), retain_config(cfg)
    for student in (cfg, control):
        runner(student, [*generate_stages(student), train_stage])
    share_teacher_cache(cfg, kept)
    selection = runner(kept, [*generate_stages(kept), train_stage, *select_stages(kept)])["select"]
    evaluated = runner(
        cfg,
        evaluate_stages(
            cfg,
            extra_models={
                "zero_distill": str(RunDir(control.run_dir).student),
                "retain": str(RunDir(kept.run_dir).student),
            },
        ),
    )
    evals = records_by_label(evaluated, "evaluate")
    summary = demo_summary(evals, time.time() - began, selection)
    report = runner(cfg, report_stages(cfg, summary))["report"].report
    # The retain run gets its own ledger (replay generation and dev scoring included), registry row and
    # report from the same test scores: teacher and base as scored above, its chosen student as "distilled".
    demo_run, retain_run = RunDir(cfg.run_dir), RunDir(kept.run_dir)
    for label, source in (("teacher", "teacher"), ("base", "base"), ("distilled", "retain")):
        write_atomic(retain_run.eval(label), demo_run.eval(source).read_bytes())
    runner(kept, report_stages(kept))
    summary["wall_seconds"] = round(time.time() - began, 1)
    write_atomic(demo_run.summary, json.dumps(summary, indent=1))
    print_summary(summary, report)
    return summary


def demo_summary(evals: dict[str, dict], seconds: float, selection: dict | None = None) -> dict:
    labels = [m for m in ("teacher", "base", "distilled", "zero_distill", "retain") if m in evals]
    models = {label: {"task": evals[label].task.score, "general": evals[label].general.score} for label in labels}
    teacher, base, distilled = models["teacher"], models["base"], models["distilled"]
    # a gap closed is None where the share means nothing (scoring.gap_change: teacher and base under 5 points
    # apart, or a student that moved away from the teacher); the *_change keys are the score minus the base's
    summary = {
        "models": models,
        "task_gap_closed": gap_change(distilled["task"], base["task"], teacher["task"]).closed,
        "general_gap_closed": gap_change(distilled["general"], base["general"], teacher["general"]).closed,
        "general_change": distilled["general"] - base["general"],
        "wall_seconds": round(seconds, 1),
        "task_skills": DEMO_SKILLS,
    }
    if "retain" in models:
        retained = models["retain"]
        summary |= {
            "retain_task_gap_closed": gap_change(retained["task"], base["task"], teacher["task"]).closed,
            "retain_general_change": retained["general"] - base["general"],
        }
    if selection:
        summary["retain_recipe"] = selection["recipe"] | {"rule": selection["rule"]}
        summary["retain_selection"] = selection  # every candidate's dev scores: the report's trade-off plot
    return summary


def print_summary(summary: dict, report_path) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table("model", "task", "general")
    for label, s in summary["models"].items():
        table.add_row(label, f"{s['task']:.3f}", f"{s['general']:.3f}")
    console = Console()
    console.print(f"lab demo: task = {', '.join(summary['task_skills'])}; general = every other lab skill")
    console.print(table)

    def pct(x):
        return "n/a" if x is None else f"{100 * x:.0f}%"

    models = summary["models"]

    def moved(label: str, suite: str) -> str:
        return change_words(gap_change(*(models[m][suite] for m in (label, "base", "teacher"))), suite)

    console.print(
        f"{moved('distilled', 'task')}, {moved('distilled', 'general')}"
        f"  |  {summary['wall_seconds']:.0f}s  |  {report_path}"
    )
    if "retain" in models:
        recipe = summary.get("retain_recipe") or {}
        console.print(
            f"distilled + retain: {moved('retain', 'task')}, {moved('retain', 'general')}  |  replay "
            f"{recipe.get('replay_source')} {pct(recipe.get('replay_fraction'))}, chose step "
            f"{recipe.get('step')} at α={recipe.get('alpha')} on the dev split"
        )


def change_words(gap: GapChange, suite: str) -> str:
    """`task gap closed 85%`, or the points where a share means nothing: `general -5.1 points vs base (teacher and
    base are 0.2 points apart, too close to divide by)`."""
    if gap.closed is not None:
        return f"{suite} gap closed {100 * gap.closed:.0f}%"
    if gap.points is None:
        return f"{suite} n/a"
    return f"{suite} {gap.points:+.1f} points vs base" + (f" ({gap.why})" if gap.why else "")
