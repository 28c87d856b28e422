"""Cross-tokenizer distillation on the lab: a base student with its own BPE tokenizer, distilled from `lab:teacher`
(character-level), with the teacher's top-k aligned onto the student's tokens by text spans (distillab.crosstok),
against SFT-only on the same teacher text at the same steps.

1. The BPE student of `distillab lab bpe-student` (distillab.lab.bpe): a byte-level BPE (384 tokens) trained with
   `tokenizers` on the train split of the nine general skills (what the base student pretrains on; it never sees
   the knowledge base), and a student pretrained like `lab:base` (same preset: d=128, 4 layers, 2,000 steps of 64,
   recall and describe left out) with it, into --work/base_bpe (kept when already there: pretrain.json says how
   long it took).
2. The demo's distillation: the teacher answers 1,500 train prompts each of recall and describe (top-20), the
   student trains 400 steps of 32 with forward KL on the aligned top-k (kd_weight 1, sft_weight 0: unaligned
   tokens train on their text), and, on the same teacher text, with cross-entropy only (SFT).
3. Both are scored on the test split of the task skills (and the general suite).
4. The other direction, alignment only: the BPE student as a teacher of a character-level student (its tokens are
   longer than the student's, so student tokens that begin inside one get no distribution), on 300 general
   prompts: the share of tokens aligned and of top-k mass kept.

    .venv/bin/python benchmarks/bench_cross_tokenizer.py [--work DIR] [--steps 400] [--pretrain-steps 2000]

Prints the teacher mass kept by the alignment, the share of student positions aligned, both task scores and
their ratio (KD / SFT).
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

from distillab.config import from_dict


def reverse_alignment(bpe_model: Path, n: int = 300) -> dict:
    """Align the BPE model's own top-20 (as a teacher) onto the character-level lab tokenizer: crosstok's stats."""
    from distillab import models
    from distillab.crosstok import Aligner
    from distillab.lab.tokenizer import build_tokenizer
    from distillab.lab.world import SKILLS
    from distillab.sampling import encode_example, generate

    model, teacher_tok = models.load(str(bpe_model))
    char = build_tokenizer()
    general = [s for s in SKILLS.values() if s.family != "knowledge"]
    examples = [e for s in general for e in s.examples("test", n // len(general))]
    outs = generate(model, teacher_tok, [e.prompt for e in examples], max_new_tokens=32, top_k_logprobs=20)
    aligner = Aligner(char, teacher_tok=teacher_tok)
    for e, o in zip(examples, outs):
        resp = {"text": o.text, "token_ids": o.token_ids, "finish_reason": o.finish_reason}
        aligner.from_ids(resp, o.top_ids, o.top_logprobs, o.top_tail, encode_example(char, e.prompt, o.text)[1])
    return aligner.stats.to_dict()


def configs(work: Path, student: Path, steps: int):
    base = {
        "runs_dir": str(work / "runs"),
        "teacher": {"model": "lab:teacher", "top_k_logprobs": 20, "max_new_tokens": 64},
        "data": {"skills": ["recall", "describe"], "n_prompts": 1500},
        "train": {
            "student": str(student),
            "loss": "forward_kl",
            "kd_weight": 1.0,
            "sft_weight": 0.0,
            "max_steps": steps,
            "per_device_batch_size": 32,
            "lr": 2e-3,
            "save_steps": steps,
        },
        "eval": {"n_per_skill": 100, "bootstrap": 200},
    }
    kd = from_dict({**base, "name": "crosstok_kd"})
    sft = from_dict(
        {**base, "name": "crosstok_sft", "train": {**base["train"], "loss": "ce", "kd_weight": 0.0, "sft_weight": 1.0}}
    )
    return kd, sft


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--work",
        type=Path,
        default=Path.home() / ".cache" / "distillab" / "bench_cross_tokenizer",
        help="where the BPE student and the runs go (the student is reused)",
    )
    parser.add_argument("--steps", type=int, default=400, help="training steps of each student (batch 32)")
    parser.add_argument("--pretrain-steps", type=int, default=2000, help="the BPE student's pretraining steps")
    parser.add_argument("--fresh", action="store_true", help="rerun generate/train (the pretrained student is kept)")
    parser.add_argument("--pretrain-only", action="store_true", help="stop after pretraining the BPE student")
    args = parser.parse_args()
    from distillab.evaluate import run_evaluate
    from distillab.generate import run_generate
    from distillab.lab.bpe import build_bpe_student
    from distillab.pipeline import share_teacher_cache
    from distillab.train import run_train

    student = build_bpe_student(args.work / "base_bpe", steps=args.pretrain_steps)
    pre = json.loads((student / "pretrain.json").read_text())
    print(
        f"BPE student: {pre['parameters'] / 1e6:.2f}M parameters, pretrained {pre['history'][-1]['step']} steps in "
        f"{pre['seconds']} s, quick-eval mean {pre['history'][-1]['mean']:.3f}"
    )
    if args.pretrain_only:
        return
    kd, sft = configs(args.work, student, args.steps)
    if args.fresh:
        for c in (kd, sft):
            shutil.rmtree(c.run_dir, ignore_errors=True)
    times = {}
    for c in (kd, sft):
        if c is sft:
            share_teacher_cache(kd, sft)
        began = time.time()
        run_generate(c)
        times[f"{c.name} generate"] = time.time() - began
        began = time.time()
        run_train(c)
        times[f"{c.name} train"] = time.time() - began
    summary = json.loads((kd.run_dir / "data" / "generate_summary.json").read_text())
    align = summary.get("cross_tokenizer") or {}
    evals = run_evaluate(kd, extra_models={"sft_only": str(sft.run_dir / "student")})
    task = {m: evals[m].task.score for m in ("teacher", "base", "distilled", "sft_only")}
    general = {m: evals[m].general.score for m in ("teacher", "base", "distilled", "sft_only")}
    print(json.dumps({"seconds": {k: round(v, 1) for k, v in times.items()}, "alignment": align}, indent=1))
    print(
        f"teacher mass kept (mean over aligned positions): {align.get('mass_kept', float('nan')):.3f}; "
        f"student positions aligned: {align.get('aligned_share', float('nan')):.3f}"
    )
    for m in task:
        print(f"{m:10s} task {task[m]:.3f}  general {general[m]:.3f}")
    ratio = task["distilled"] / task["sft_only"] if task["sft_only"] else float("inf")
    print(f"cross-tokenizer KD / SFT-only task score: {task['distilled']:.3f} / {task['sft_only']:.3f} = {ratio:.2f}x")
    back = reverse_alignment(student)
    print(
        f"other direction (BPE model as teacher, character-level student, {back['rows']} general prompts): "
        f"{back['aligned_share']:.3f} of student tokens aligned, {back['mass_kept']:.3f} of top-k mass kept"
    )


if __name__ == "__main__":
    main()
