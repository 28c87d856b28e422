"""Retain on the demo's task: every way to keep the model, side by side, against plain distillation.

    .venv/bin/python benchmarks/retain_table.py [--steps 400] [--out runs/retain_table] [--rows plain default ...]

Same teacher data (the demo's: recall + describe, forward KL on the teacher's top-20), same base student,
steps and batch in every row; only the retain recipe (and, for two rows, LoRA or the learning rate) differs.
Candidates (checkpoints, merge weights) are chosen on the dev split; every number in the table is the test
split, scored once on what was chosen. Prints a Markdown table (the one in README and BENCHMARKS.md):
test task, test general, task gap closed, general change vs base, extra teacher tokens, train seconds.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

from distillab.config import from_dict
from distillab.demo import RETAIN, demo_config
from distillab.generate import run_generate
from distillab.pipeline import share_teacher_cache
from distillab.scoring import evaluate_model, gap_closed, suites
from distillab.select import choose_student
from distillab.train import run_train

SELECT = {"select_checkpoints": True, "dev_n_per_skill": RETAIN["dev_n_per_skill"]}
ROWS = {  # name -> (label, retain section, train overrides)
    "plain": ("plain distillation", {}, {}),
    "self5": ("replay self 5%", {"replay_fraction": 0.05}, {}),
    "self10": ("replay self 10%", {"replay_fraction": 0.10}, {}),
    "self25": ("replay self 25%", {"replay_fraction": 0.25}, {}),
    "self50": ("replay self 50%", {"replay_fraction": 0.50}, {}),
    "self75": ("replay self 75%", {"replay_fraction": 0.75}, {}),
    "teacher10": ("replay teacher 10%", {"replay_fraction": 0.10, "replay_source": "teacher"}, {}),
    "merge": (
        "merge alone (α grid 0.25-1)",
        {"merge_alphas": [0.25, 0.5, 0.75, 1.0], "dev_n_per_skill": RETAIN["dev_n_per_skill"]},
        {},
    ),
    "select": ("checkpoint selection alone", SELECT, {}),
    "lora": ("LoRA r=16", {}, {"lora": True, "lora_r": 16, "lora_alpha": 32}),
    "lr5e-4": ("lr 5e-4", {}, {"lr": 5e-4}),
    "default": ("default recipe (demo)", dict(RETAIN), {}),
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=400)
    ap.add_argument("--n-eval", type=int, default=100)
    ap.add_argument("--rows", nargs="+", default=list(ROWS), choices=list(ROWS))
    ap.add_argument("--out", type=Path, default=Path("runs/retain_table"))
    args = ap.parse_args()
    reference_cfg = demo_config(args.out)

    def config(name: str, retain: dict, train: dict):
        data = reference_cfg.model_dump()
        data.update(name=name)
        data["train"].update(max_steps=args.steps, save_steps=200, **train)
        data["eval"].update(n_per_skill=args.n_eval, bootstrap=200)
        data["retain"] = retain
        return from_dict(data)

    run_generate(reference_cfg, log=lambda *_: None)  # the demo's teacher data, generated once
    task, general = suites(reference_cfg)

    def score(model):
        return evaluate_model(model, task, general, args.n_eval, 200, reference_cfg.teacher.max_new_tokens)

    reference = {"teacher": score(reference_cfg.teacher.model), "base": score(reference_cfg.train.student)}
    t, b = reference["teacher"], reference["base"]
    table = []
    for name in args.rows:
        label, retain, train = ROWS[name]
        cfg = config(name, retain, train)
        share_teacher_cache(reference_cfg, cfg)  # the same answers: no new teacher requests for the task
        began = time.time()
        run_generate(cfg, log=lambda *_: None)
        summary = run_train(cfg, log=lambda *_: None)
        selection = choose_student(cfg, log=lambda *_: None)
        replay = (
            json.loads((cfg.run_dir / "data" / "replay_summary.json").read_text())
            if (cfg.run_dir / "data" / "replay_summary.json").is_file()
            else {}
        )
        extra_teacher = (
            replay.get("prompt_tokens", 0) + replay.get("completion_tokens", 0)
            if cfg.retain.replay_source == "teacher" and cfg.retain.replay_fraction > 0
            else 0
        )
        d = score(str(cfg.run_dir / "student"))
        table.append(
            {
                "name": name,
                "label": label,
                "task": d.task.score,
                "general": d.general.score,
                "task_gap_closed": gap_closed(d.task.score, b.task.score, t.task.score),
                "general_change": d.general.score - b.general.score,
                "extra_teacher_tokens": extra_teacher,
                "train_seconds": summary["train_seconds"],
                "chosen": selection["chosen"]["label"] if selection else None,
                "selection_seconds": selection["selection_seconds"] if selection else 0.0,
                "wall_seconds": round(time.time() - began, 1),
            }
        )
        print(json.dumps(table[-1]), flush=True)
        shutil.rmtree(cfg.run_dir / "checkpoints", ignore_errors=True)  # keep the disk small
    print(
        f"\nDemo task = recall, describe; {args.steps} steps x 32; teacher task {t.task.score:.3f} / general "
        f"{t.general.score:.3f}; base task {b.task.score:.3f} / general {b.general.score:.3f}; "
        f"test split, {args.n_eval} prompts a skill\n"
    )
    print(
        "| recipe | test task | test general | task gap closed | general vs base | extra teacher tokens | "
        "train time | chosen on dev |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for r in table:
        print(
            f"| {r['label']} | {r['task']:.3f} | {r['general']:.3f} | {100 * r['task_gap_closed']:.0f}% | "
            f"{100 * r['general_change']:+.1f} pts | {r['extra_teacher_tokens']:,} | {r['train_seconds']:.0f}s | "
            f"{r['chosen'] or '-'} |"
        )


if __name__ == "__main__":
    main()
