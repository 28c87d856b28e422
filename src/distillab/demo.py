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

from distillab.config import RunConfig, from_dict
from distillab.files import write_atomic
from distillab.evaluate import gap_closed, run_evaluate
from distillab.generate import run_generate
from distillab.retain import choose_student
from distillab.train import run_train

DEMO_SKILLS = ["recall", "describe"]  # knowledge the base student never saw: what distillation transfers
# The default retain recipe (benchmarks/retain_table.py compares the alternatives).
RETAIN = {"replay_fraction": 0.75, "replay_source": "base", "merge_alphas": [0.5, 0.75, 1.0],
          "select_checkpoints": True, "max_general_drop": 0.02, "dev_n_per_skill": 30}


def demo_config(runs_dir: Path) -> RunConfig:
    return from_dict({
        "name": "demo", "runs_dir": str(runs_dir),
        "teacher": {"model": "lab:teacher", "top_k_logprobs": 20, "max_new_tokens": 64},
        "data": {"skills": DEMO_SKILLS, "n_prompts": 1500},
        "train": {"student": "lab:base", "loss": "forward_kl", "kd_weight": 1.0, "sft_weight": 0.0,
                  "max_steps": 400, "batch_size": 32, "lr": 2e-3, "save_steps": 200},
        "eval": {"n_per_skill": 100, "bootstrap": 1000},
    })


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


def share_teacher_cache(cfg: RunConfig, other: RunConfig) -> None:
    """The retain run asks the teacher the same requests: give it the demo's cache so nothing is asked twice."""
    import sqlite3

    src, dst = cfg.run_dir / "teacher.sqlite", other.run_dir / "teacher.sqlite"
    if src.is_file() and not dst.is_file():
        dst.parent.mkdir(parents=True, exist_ok=True)
        with sqlite3.connect(src) as a, sqlite3.connect(dst) as b:
            a.backup(b)


def run_demo(runs_dir: Path, fresh: bool = False, generate_stage=None, train_stage=None, log=print) -> dict:
    began = time.time()
    cfg = demo_config(runs_dir)
    if fresh:
        shutil.rmtree(cfg.run_dir, ignore_errors=True)
    generate_stage = generate_stage or (lambda c: run_generate(c, log=log))
    train_stage = train_stage or (lambda c: run_train(c, log=log))
    generate_stage(cfg)
    train_stage(cfg)
    control = control_config(cfg)
    generate_stage(control)
    train_stage(control)
    kept = retain_config(cfg)
    share_teacher_cache(cfg, kept)
    generate_stage(kept)
    train_stage(kept)
    selection = choose_student(kept, log=log)
    evals = run_evaluate(cfg, extra_models={"zero_distill": str(control.run_dir / "student"),
                                            "retain": str(kept.run_dir / "student")}, log=log)
    summary = demo_summary(evals, time.time() - began, selection)
    from distillab.pipeline import finish_run

    report = finish_run(cfg, summary=summary, log=log)
    # The retain run gets its own ledger (replay generation and dev scoring included), registry row and
    # report from the same test scores: teacher and base as scored above, its chosen student as "distilled".
    for label, source in (("teacher", "teacher"), ("base", "base"), ("distilled", "retain")):
        write_atomic(kept.run_dir / "eval" / f"{label}.json", (cfg.run_dir / "eval" / f"{source}.json").read_bytes())
    finish_run(kept, log=log)
    summary["wall_seconds"] = round(time.time() - began, 1)
    write_atomic(cfg.run_dir / "summary.json", json.dumps(summary, indent=1))
    print_summary(summary, report)
    return summary


def demo_summary(evals: dict[str, dict], seconds: float, selection: dict | None = None) -> dict:
    labels = [m for m in ("teacher", "base", "distilled", "zero_distill", "retain") if m in evals]
    models = {label: {"task": evals[label].task.score, "general": evals[label].general.score} for label in labels}
    t, b, d = models["teacher"], models["base"], models["distilled"]
    summary = {
        "models": models,
        "task_gap_closed": gap_closed(d["task"], b["task"], t["task"]),
        "general_gap_closed": gap_closed(d["general"], b["general"], t["general"]),
        "wall_seconds": round(seconds, 1),
        "task_skills": DEMO_SKILLS,
    }
    if "retain" in models:
        r = models["retain"]
        summary |= {"retain_task_gap_closed": gap_closed(r["task"], b["task"], t["task"]),
                    "retain_general_change": r["general"] - b["general"]}
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

    console.print(f"gap closed: task {pct(summary['task_gap_closed'])}, general {pct(summary['general_gap_closed'])}"
                  f"  |  {summary['wall_seconds']:.0f}s  |  {report_path}")
    if "retain_task_gap_closed" in summary:
        recipe = summary.get("retain_recipe") or {}
        console.print(f"distilled + retain: task gap closed {pct(summary['retain_task_gap_closed'])}, general "
                      f"{100 * summary['retain_general_change']:+.1f} points vs base  |  replay "
                      f"{recipe.get('replay_source')} {pct(recipe.get('replay_fraction'))}, chose step "
                      f"{recipe.get('step')} at α={recipe.get('alpha')} on the dev split")
