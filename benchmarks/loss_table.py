"""Every loss on one lab task: the same teacher data, student, steps and batch; task score, general score, time.

    .venv/bin/python benchmarks/loss_table.py [--skills recall add] [--steps 400] [--out runs/losses]

Prints a Markdown table (the one in the README). The teacher's dataset is generated once and shared
(every run reads the same teacher.sqlite), so the rows differ only in the loss.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

from distillab.config import from_dict
from distillab.generate import run_generate
from distillab.scoring import evaluate_model, gap_closed, suites
from distillab.train import run_train

ROWS = [  # (label, train overrides)
    ("SFT only (ce)", {"loss": "ce", "kd_weight": 0.0, "sft_weight": 1.0}),
    ("forward KL", {"loss": "forward_kl", "kd_weight": 1.0, "sft_weight": 0.0}),
    ("forward KL + SFT", {"loss": "forward_kl", "kd_weight": 1.0, "sft_weight": 1.0}),
    ("reverse KL", {"loss": "reverse_kl", "kd_weight": 1.0, "sft_weight": 0.0}),
    ("JSD (beta 0.5)", {"loss": "jsd", "kd_weight": 1.0, "sft_weight": 0.0, "beta": 0.5}),
    ("skew forward KL (alpha 0.1)", {"loss": "skew_forward_kl", "kd_weight": 1.0, "sft_weight": 0.0}),
    ("skew reverse KL (alpha 0.1)", {"loss": "skew_reverse_kl", "kd_weight": 1.0, "sft_weight": 0.0}),
    ("TVD", {"loss": "tvd", "kd_weight": 1.0, "sft_weight": 0.0}),
    (
        "forward KL, on-policy 0.5",
        {"loss": "forward_kl", "kd_weight": 1.0, "sft_weight": 0.0, "on_policy_fraction": 0.5},
    ),
]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--skills", nargs="+", default=["recall", "describe"])
    ap.add_argument("--steps", type=int, default=400)
    ap.add_argument("--n-prompts", type=int, default=1500)
    ap.add_argument("--n-eval", type=int, default=100)
    ap.add_argument("--out", type=Path, default=Path("runs/losses"))
    args = ap.parse_args()

    def config(name: str, train: dict):
        return from_dict(
            {
                "name": name,
                "runs_dir": str(args.out),
                "teacher": {"model": "lab:teacher", "top_k_logprobs": 20},
                "data": {"skills": args.skills, "n_prompts": args.n_prompts},
                "train": {
                    "student": "lab:base",
                    "max_steps": args.steps,
                    "per_device_batch_size": 32,
                    "lr": 2e-3,
                    **train,
                },
                "eval": {"n_per_skill": args.n_eval, "bootstrap": 200},
            }
        )

    table, reference = [], {}
    for i, (label, train) in enumerate(ROWS):
        cfg = config(f"loss{i}", train)
        shared = args.out / "loss0" / "teacher.sqlite"
        if i and shared.is_file() and not (cfg.run_dir / "teacher.sqlite").exists():
            cfg.run_dir.mkdir(parents=True, exist_ok=True)
            shutil.copy(shared, cfg.run_dir / "teacher.sqlite")  # the same answers: no new teacher requests
        run_generate(cfg, log=lambda *_: None)
        began = time.time()
        summary = run_train(cfg, log=lambda *_: None)
        seconds = summary["train_seconds"]
        task, general = suites(cfg)

        def score(model, task=task, general=general, cfg=cfg):
            return evaluate_model(model, task, general, args.n_eval, 200, cfg.teacher.max_new_tokens)

        if not reference:  # teacher and base are the same for every row: score them once
            reference = {"teacher": score(cfg.teacher.model), "base": score(cfg.train.student)}
        t, b, d = reference["teacher"], reference["base"], score(str(cfg.run_dir / "student"))
        table.append(
            {
                "loss": label,
                "task": d.task.score,
                "general": d.general.score,
                "task_gap_closed": gap_closed(d.task.score, b.task.score, t.task.score),
                "general_change": d.general.score - b.general.score,
                "train_seconds": seconds,
                "wall_seconds": round(time.time() - began, 1),
            }
        )
        print(json.dumps(table[-1]), flush=True)
    base, teacher = reference["base"], reference["teacher"]
    print(
        f"\nLab task = {', '.join(args.skills)}; {args.steps} steps x 32 examples; teacher task "
        f"{teacher.task.score:.3f} / general {teacher.general.score:.3f}; base task "
        f"{base.task.score:.3f} / general {base.general.score:.3f}\n"
    )
    print("| loss | task | general | task gap closed | general vs base | train time |")
    print("|---|---|---|---|---|---|")
    for r in table:
        print(
            f"| {r['loss']} | {r['task']:.3f} | {r['general']:.3f} | {100 * r['task_gap_closed']:.0f}% | "
            f"{100 * r['general_change']:+.1f} pts | {r['train_seconds']:.0f}s |"
        )


if __name__ == "__main__":
    main()
