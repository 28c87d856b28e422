"""The run config of tests whose teacher is a real `distillab serve` on 127.0.0.1 (distillab.testing runs the
server). The kill-and-resume driver of the generate stage lives in benchmarks/bench_kill_resume.py."""

from __future__ import annotations

from distillab.config import from_dict


def generate_config(tmp_path, teacher: dict, student="lab:base", name="run", skills=("reverse",), n_prompts=16):
    """A run config whose generate stage asks `teacher` (a dict of teacher.* settings)."""
    return from_dict({
        "name": name, "runs_dir": str(tmp_path / "runs"),
        "teacher": {"max_new_tokens": 8, "top_k_logprobs": 5, **teacher},
        "data": {"skills": list(skills), "n_prompts": n_prompts},
        "train": {"student": str(student)},
    })
