"""The loss table and the retain table on the lab's teacher-unseen split, over seeds, with intervals.

    .venv/bin/python benchmarks/unseen_tables.py [--out runs/unseen] [--seeds 0 1 2] [--workers N] [--record]

The split: `habit` (lab.world.SIGNAL_SKILLS), whose student questions are phrasings `lab:signal-teacher` never saw
and whose answers are draws from each entity's own distribution, so that the teacher's top-k says more than its
text: where the classic tables (README "Every loss on one lab task", BENCHMARKS "Retain") distil on prompts the
teacher was pretrained on and every loss is SFT plus a constant. Every row: the signal demo's teacher data for the
distribution family (100 questions, 4 samples each at T=1, top-20 kept), the base student, 150 steps x 32, lr 2e-3,
each seed drawing its own samples and training order; rows differ only in the loss (losses) or in the retain
recipe (retain; forward KL throughout). Scored and compared as `distillab demo --signal` scores habit: against the
world's distribution, intervals a bootstrap over seeds and questions, a win only when every seed agrees.
--record writes the summary to benchmarks/results/unseen.json, which benchmarks/tables.py renders into the
documents.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from distillab import signal_demo as sd
from distillab.files import write_atomic

sys.path.insert(0, str(Path(__file__).resolve().parent))
from loss_table import ROWS as LOSS_ROWS  # noqa: E402  (a sibling script: the classic table's rows, the same losses)

RESULTS = Path(__file__).resolve().parent / "results"
FORWARD_KL = sd.KD  # the demo's loss: the retain rows change only the recipe
RETAIN_ROWS = [  # (label, [retain] section, [train] fields over forward KL)
    ("plain distillation", None, {}),
    ("replay self 25%", {"replay_fraction": 0.25}, {}),
    ("replay self 50%", {"replay_fraction": 0.50}, {}),
    ("replay self 75%", {"replay_fraction": 0.75}, {}),
    ("replay teacher 10%", {"replay_fraction": 0.10, "replay_source": "teacher"}, {}),
    ("LoRA r=16", None, {"lora": True, "lora_r": 16, "lora_alpha": 32}),
    ("lr 5e-4", None, {"lr": 5e-4}),
]


def families() -> list[sd.Family]:
    shape = {"skill": "habit", "n_prompts": 100, "max_steps": 150, "decontaminate": False}  # sd.FAMILIES[0]'s
    losses = sd.Family(
        name="losses",
        arms=[sd.Arm(label, sd.SAMPLED, train) for label, train in LOSS_ROWS],
        comparisons=[(label, LOSS_ROWS[0][0], "tv") for label, _ in LOSS_ROWS[1:]],
        **shape,
    )
    retain = sd.Family(
        name="retain",
        arms=[sd.Arm(label, sd.SAMPLED, FORWARD_KL | train, retain=r) for label, r, train in RETAIN_ROWS],
        comparisons=[(label, RETAIN_ROWS[0][0], m) for label, _, _ in RETAIN_ROWS[1:] for m in ("general", "tv")],
        **shape,
    )
    return [losses, retain]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("runs/unseen"))
    ap.add_argument("--seeds", type=int, nargs="+", default=list(sd.SEEDS))
    ap.add_argument("--workers", type=int, default=None, help="worker processes of one thread (default: one a core)")
    ap.add_argument("--record", action="store_true", help="write benchmarks/results/unseen.json")
    args = ap.parse_args()
    summary = sd.run_signal_demo(args.out, seeds=tuple(args.seeds), families=families(), workers=args.workers)
    summary["command"] = "benchmarks/unseen_tables.py"
    if args.record:
        record = json.dumps(summary, indent=1) + "\n"
        for path in (RESULTS / "unseen.json", args.out / "signal" / "unseen.json"):  # and beside the runs it describes
            write_atomic(path, record)


if __name__ == "__main__":
    main()
