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
import sys
import tempfile
import time
import warnings
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT))

import pyarrow.parquet as pq  # noqa: E402

from distillab.cache import request_key  # noqa: E402
from distillab.config import from_dict  # noqa: E402
from distillab.generate import load_prompts  # noqa: E402
from distillab.teachers import make_teacher  # noqa: E402
from distillab.serve import metric_sum, server_process  # noqa: E402
from distillab.serve import read_metrics as metrics  # noqa: E402
from tests.serve_fixture import kill_and_resume  # noqa: E402


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
        cfg = from_dict({
            "name": "killed", "runs_dir": str(workdir / "runs"),
            "teacher": {"model": args.model, "base_url": base_url, "concurrency": args.concurrency,
                        "max_new_tokens": 12, "top_k_logprobs": 5},
            "data": {"skills": ["reverse", "upper", "sort"], "n_prompts": args.prompts // 3},
            "train": {"student": args.model},
        })
        outcome = kill_and_resume(cfg, kills=args.kills, seed=args.seed, fork=not args.exec,
                                  log=lambda m: print(m, flush=True))
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
    print(f"\n{len(outcome['kills'])} kills (SIGKILL) + 1 finishing run, {outcome['launches']} launches "
          f"({'exec' if args.exec else 'fork'}), {time.perf_counter() - began:.0f} s")
    print(f"prompts {len(keys)} ({len(set(keys))} distinct requests), rows {len(rows)}")
    print(f"lost rows:              {lost}")
    print(f"duplicated rows:        {duplicated}")
    print(f"repeated model answers: {int(answered - len(set(keys)))}  (server computed {int(answered)})")
    print(f"re-sent after kills:    {int(sent_ok - answered)}  (replayed by Idempotency-Key: "
          f"{int(served['distillab_idempotent_replays_total'])})")
    ok = lost == 0 and duplicated == 0 and answered == len(set(keys)) and len(outcome["kills"]) == args.kills
    print("PASS" if ok else "FAIL")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
