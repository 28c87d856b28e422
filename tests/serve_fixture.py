"""Helpers for tests that talk to a real `distillab serve` on 127.0.0.1: in a thread, or as a subprocess. The
server helpers live in distillab.serve (benchmarks import them from there); they are re-exported here under the
names tests use. The kill-and-resume driver of the generate stage lives in benchmarks/bench_kill_resume.py."""

from __future__ import annotations

from contextlib import contextmanager

from distillab.config import from_dict
from distillab.serve import FaultConfig, ServerThread, create_app, free_port, metric_sum, server_process
from distillab.serve import read_metrics as metrics
from distillab.serve import subprocess_env as child_env

@contextmanager
def server_thread(model_dir, **app_kwargs):
    """create_app(model_dir, ...) under uvicorn in a thread; yields the ServerThread (.url, .base_url, .app)."""
    app = create_app(model_dir, **app_kwargs)
    with ServerThread(app) as server:
        server.app = app
        yield server


def generate_config(tmp_path, teacher: dict, student="lab:base", name="run", skills=("reverse",), n_prompts=16):
    """A run config whose generate stage asks `teacher` (a dict of teacher.* settings)."""
    return from_dict({
        "name": name, "runs_dir": str(tmp_path / "runs"),
        "teacher": {"max_new_tokens": 8, "top_k_logprobs": 5, **teacher},
        "data": {"skills": list(skills), "n_prompts": n_prompts},
        "train": {"student": str(student)},
    })


__all__ = ["FaultConfig", "server_thread", "server_process", "metrics", "metric_sum", "generate_config", "child_env",
           "free_port"]
