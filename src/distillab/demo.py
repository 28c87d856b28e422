"""`distillab demo`: the whole claim on the embedded lab, in about five minutes on two cores.

The lab teacher answers the train prompts of the target skills; the base student is distilled on those
answers by forward KL on the teacher's top-20 logprobs (the best row of benchmarks/loss_table.py). A zero-distillation control — the same
base student, the same number of steps on the same prompts, but the world's ground-truth answers — is
trained beside it. Teacher, base, distilled and control are scored on the task suite (the target skills)
and the general suite (every other skill), and the result is written whatever it shows.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

from distillab.config import RunConfig, from_dict, write_atomic
from distillab.evaluate import gap_closed, run_evaluate
from distillab.generate import run_generate
from distillab.train import run_train

DEMO_SKILLS = ["recall", "describe"]  # knowledge the base student never saw: what distillation transfers


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
    evals = run_evaluate(cfg, extra_models={"zero_distill": str(control.run_dir / "student")}, log=log)
    summary = demo_summary(evals, time.time() - began)
    from distillab.pipeline import finish_run

    report = finish_run(cfg, summary=summary, log=log)
    summary["wall_seconds"] = round(time.time() - began, 1)
    write_atomic(cfg.run_dir / "summary.json", json.dumps(summary, indent=1))
    print_summary(summary, report)
    return summary


def demo_summary(evals: dict[str, dict], seconds: float) -> dict:
    models = {label: {"task": evals[label]["task"]["score"], "general": evals[label]["general"]["score"]}
              for label in ("teacher", "base", "distilled", "zero_distill")}
    t, b, d = models["teacher"], models["base"], models["distilled"]
    return {
        "models": models,
        "task_gap_closed": gap_closed(d["task"], b["task"], t["task"]),
        "general_gap_closed": gap_closed(d["general"], b["general"], t["general"]),
        "wall_seconds": round(seconds, 1),
        "task_skills": DEMO_SKILLS,
    }


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
