"""kill -9 the generate stage at 20 random moments, resume each time: count lost and repeated requests.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_kill_resume.py [--kills 20] [--prompts 300] [--exec]

A `distillab serve` subprocess serves the model; the generate stage runs in a child process (a fork of
this one by default; --exec starts a fresh interpreter each time, as a user's rerun would, at ~5 s of
imports a launch) that is SIGKILLed after a random number of answers, `--kills` times, then finishes.

Counted at the end:
- lost rows:        prompts without their row in data/train.parquet (must be 0);
- duplicated rows:  rows beyond one per prompt (must be 0);
- repeated model answers: the server's distillab_answers_total minus the distinct requests (must be 0):
  requests in flight at a kill are re-sent on resume, and the Idempotency-Key makes the server replay
  the stored answer instead of computing (and, with a paid API, billing) it again;
- re-sent requests: what the client sent again after kills (replayed by the server, not recomputed).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
import warnings
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

import pyarrow.parquet as pq  # noqa: E402

from distillab.cache import request_key  # noqa: E402
from distillab.config import from_dict  # noqa: E402
from distillab.prompts import load_prompts  # noqa: E402
from distillab.teachers import make_teacher  # noqa: E402
from distillab.testing import metric_sum, server_process, subprocess_env  # noqa: E402
from distillab.testing import read_metrics as metrics  # noqa: E402

# ----------------------------------------------------------------------------------------------------
# The driver (tests/test_generate.py runs it too, with fewer kills).


def generate_child(cfg_path: str, out=None) -> None:
    """The generate stage of the config at cfg_path, printing "P done total" at each answer (so a parent can
    kill it mid-run) and "DONE sent failed" at the end."""
    import warnings

    from distillab.generate import run_generate

    out = out or sys.stdout
    warnings.simplefilter("ignore")
    cfg = from_dict(json.loads(Path(cfg_path).read_text()))
    summary = run_generate(
        cfg, progress=lambda done, total, budget: print("P", done, total, file=out, flush=True), log=lambda *_: None
    )
    print("DONE", summary.requests_sent, summary.failed, file=out, flush=True)


def _launch_exec(cfg_path: Path):
    """A fresh interpreter (slow to start: it imports torch and transformers). Returns (pid, lines, wait)."""
    code = "import sys; from benchmarks.bench_kill_resume import generate_child; generate_child(sys.argv[1])"
    env = subprocess_env()
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env["PYTHONPATH"]
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


# ----------------------------------------------------------------------------------------------------


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="lab:base")
    p.add_argument("--kills", type=int, default=20)
    p.add_argument("--prompts", type=int, default=300, help="prompts (100 per skill of reverse, upper, sort)")
    p.add_argument("--concurrency", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--exec", action="store_true", help="a fresh interpreter per launch instead of a fork")
    args = p.parse_args()
    warnings.simplefilter("ignore")
    workdir = Path(tempfile.mkdtemp(prefix="bench_kill_"))
    began = time.perf_counter()
    with server_process(args.model, "--max-batch", "16") as base_url:
        cfg = from_dict(
            {
                "name": "killed",
                "runs_dir": str(workdir / "runs"),
                "teacher": {
                    "model": args.model,
                    "base_url": base_url,
                    "concurrency": args.concurrency,
                    "max_new_tokens": 12,
                    "top_k_logprobs": 5,
                },
                "data": {"skills": ["reverse", "upper", "sort"], "n_prompts": args.prompts // 3},
                "train": {"student": args.model},
            }
        )
        outcome = kill_and_resume(
            cfg, kills=args.kills, seed=args.seed, fork=not args.exec, log=lambda m: print(m, flush=True)
        )
        served = metrics(base_url)
    teacher = make_teacher(cfg.teacher)
    keys = [request_key(teacher.request(x["prompt"])) for x in load_prompts(cfg)]
    rows = pq.read_table(cfg.run_dir / "data" / "train.parquet").to_pylist()
    got = Counter(r["request_hash"] for r in rows)
    want = Counter(keys)
    lost = sum((want - got).values())
    duplicated = sum((got - want).values())
    answered = served["distillab_answers_total"]
    sent_ok = metric_sum({k: v for k, v in served.items() if 'code="200"' in k}, "distillab_requests_total")
    print(
        f"\n{len(outcome['kills'])} kills (SIGKILL) + 1 finishing run, {outcome['launches']} launches "
        f"({'exec' if args.exec else 'fork'}), {time.perf_counter() - began:.0f} s"
    )
    print(f"prompts {len(keys)} ({len(set(keys))} distinct requests), rows {len(rows)}")
    print(f"lost rows:              {lost}")
    print(f"duplicated rows:        {duplicated}")
    print(f"repeated model answers: {int(answered - len(set(keys)))}  (server computed {int(answered)})")
    print(
        f"re-sent after kills:    {int(sent_ok - answered)}  (replayed by Idempotency-Key: "
        f"{int(served['distillab_idempotent_replays_total'])})"
    )
    ok = lost == 0 and duplicated == 0 and answered == len(set(keys)) and len(outcome["kills"]) == args.kills
    print("PASS" if ok else "FAIL")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
