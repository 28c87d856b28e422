"""Helpers for tests that talk to a real `distillab serve` on 127.0.0.1: in a thread, or as a subprocess, and
the kill-and-resume driver for the generate stage. The server helpers live in distillab.serve (benchmarks
import them from there); they are re-exported here under the names tests use."""

from __future__ import annotations

import json
import os
import random
import signal
import sqlite3
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path

from distillab.config import from_dict
from distillab.generate import load_prompts
from distillab.serve import FaultConfig, ServerThread, create_app, free_port, metric_sum, server_process
from distillab.serve import read_metrics as metrics
from distillab.serve import subprocess_env as child_env

SRC = str(Path(__file__).resolve().parents[1] / "src")


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


def generate_child(cfg_path: str, out=None) -> None:
    """The generate stage of the config at cfg_path, printing "P done total" at each answer (so a parent can
    kill it mid-run) and "DONE sent failed" at the end."""
    import warnings

    from distillab.generate import run_generate

    out = out or sys.stdout
    warnings.simplefilter("ignore")
    cfg = from_dict(json.loads(Path(cfg_path).read_text()))
    summary = run_generate(cfg, progress=lambda done, total, budget: print("P", done, total, file=out, flush=True),
                           log=lambda *_: None)
    print("DONE", summary.requests_sent, summary.failed, file=out, flush=True)


def _launch_exec(cfg_path: Path):
    """A fresh interpreter (slow to start: it imports torch and transformers). Returns (pid, lines, wait)."""
    code = "import sys; from tests.serve_fixture import generate_child; generate_child(sys.argv[1])"
    env = child_env()
    env["PYTHONPATH"] = str(Path(SRC).parent) + os.pathsep + env["PYTHONPATH"]
    proc = subprocess.Popen([sys.executable, "-c", code, str(cfg_path)], env=env, stdout=subprocess.PIPE, text=True)
    return proc.pid, proc.stdout, proc.wait


def _launch_fork(cfg_path: Path):
    """A fork of this process, which has imported everything already: starts in milliseconds."""
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: never return into the caller (a test runner), whatever happens
        code = 1
        try:
            os.close(read_fd)
            with os.fdopen(write_fd, "w") as out:
                generate_child(str(cfg_path), out)
            code = 0
        finally:
            os._exit(code)
    os.close(write_fd)
    return pid, os.fdopen(read_fd), lambda: os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])


def cached_answers(run_dir: Path) -> int:
    path = run_dir / "teacher.sqlite"
    if not path.is_file():
        return 0
    with sqlite3.connect(path) as db:
        return db.execute("SELECT COUNT(*) FROM responses").fetchone()[0]


def kill_and_resume(cfg, kills: int, seed: int = 0, fork: bool = True, log=lambda *_: None) -> dict:
    """Run cfg's generate stage in a child process, SIGKILL it after a random number of answers, `kills`
    times (resuming each time), then let it finish. Returns what happened, for the caller to check.

    fork=True forks this process (fast); fork=False starts a fresh interpreter each time (as a user would).
    """
    rng = random.Random(seed)
    cfg_path = cfg.run_dir.parent / f"{cfg.name}.json"
    cfg_path.parent.mkdir(parents=True, exist_ok=True)
    cfg_path.write_text(json.dumps(cfg.model_dump()))
    # Kill points: `kills` random numbers of cached answers, spread over the whole run.
    n = len(load_prompts(cfg))
    points = sorted(rng.sample(range(1, n), kills)) if kills < n else list(range(1, n))[:kills]
    done_kills, launches, sent = [], 0, 0
    while True:
        launches += 1
        before = cached_answers(cfg.run_dir)
        pid, lines, wait = (_launch_fork if fork else _launch_exec)(cfg_path)
        target = None
        if len(done_kills) < kills:
            # this run's answers to the next kill point (at least one: every launch makes progress)
            target = max(1, points[len(done_kills)] - before)
        for line in lines:
            if target and line.startswith("P ") and int(line.split()[1]) >= target:
                os.kill(pid, signal.SIGKILL)
                break
            if line.startswith("DONE"):
                sent += int(line.split()[1])
        lines.close()
        rc = wait()
        if rc == -signal.SIGKILL:
            done_kills.append((before, cached_answers(cfg.run_dir)))
            log(f"kill {len(done_kills)}: {before} -> {done_kills[-1][1]} answers cached")
            continue
        if rc != 0:
            raise RuntimeError(f"generate child failed with exit code {rc}")
        return {"kills": done_kills, "launches": launches, "last_run_sent": sent}


__all__ = ["FaultConfig", "server_thread", "server_process", "metrics", "metric_sum", "generate_config", "child_env",
           "free_port", "kill_and_resume", "cached_answers"]
