"""Data at scale, generate part: generate's peak RSS for N vs 10N prompts against a served model (goal: the
ratio <= 1.5: memory follows the chunk and the requests in flight, not the prompt count), and the request
cache's bytes per completion token against the dataset's.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_data_scale.py [--small 10000] [--large 100000]
        [--model lab:base] [--max-new-tokens 4] [--concurrency 32]

Prompts: a JSONL file of distinct lab-style prompts (reverse/upper of random words), read lazily by generate.
Each size runs in a fresh child process (its own interpreter: peak RSS is ru_maxrss of that child alone),
in its own run directory, against one `distillab serve` process. Prints peak RSS per size, the ratio, wall
time, and cache vs dataset bytes per completion token for each size. A smaller pair with the same 10x ratio
(e.g. --small 2000 --large 20000) keeps the run short on a 2-core machine; say which pair was measured.
"""

from __future__ import annotations

import argparse
import json
import random
import resource
import string
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

CHILD = """
import json, sys, warnings
warnings.simplefilter("ignore")
from distillab.config import from_dict
from distillab.generate import run_generate
s = run_generate(from_dict(json.loads(sys.argv[1])), log=lambda *a: None)
print(json.dumps({"rows": s.rows, "sent": s.requests_sent, "completion_tokens": s.completion_tokens}))
"""


def write_prompts(path: Path, n: int, seed: int = 0) -> None:
    rng = random.Random(seed)
    with open(path, "w") as f:
        for i in range(n):
            word = "".join(rng.choice(string.ascii_lowercase) for _ in range(rng.randint(3, 7)))
            f.write(json.dumps({"prompt": f"{rng.choice(['reverse', 'upper'])} {word} {i}"}) + "\n")


def run_size(root: Path, n: int, base_url: str, args) -> dict:
    prompts = root / f"prompts-{n}.jsonl"
    write_prompts(prompts, n)
    cfg = {"name": f"scale-{n}", "runs_dir": str(root / "runs"),
           "teacher": {"model": args.model, "base_url": base_url, "max_new_tokens": args.max_new_tokens,
                       "top_k_logprobs": 20, "concurrency": args.concurrency,
                       "usd_per_1m_input": 0.0, "usd_per_1m_output": 0.0},
           "data": {"prompts_file": str(prompts)}, "train": {"student": args.model}}
    began = time.time()
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    out = subprocess.run([sys.executable, "-c", CHILD, json.dumps(cfg)], capture_output=True, text=True,
                         env={"PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
                              "PATH": "/usr/bin:/bin"})
    if out.returncode:
        raise SystemExit(out.stderr[-2000:])
    peak_kib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss  # the largest child so far
    summary = json.loads(out.stdout.strip().splitlines()[-1])
    run_dir = root / "runs" / f"scale-{n}"
    data = run_dir / "data" / "train.parquet"
    tokens = max(summary["completion_tokens"], 1)
    return {"prompts": n, "peak_rss_mib": peak_kib / 1024, "grew": peak_kib > before, "seconds": time.time() - began,
            "cache_b_per_token": (run_dir / "teacher.sqlite").stat().st_size / tokens,
            "dataset_b_per_token": data.stat().st_size / tokens, **summary}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--small", type=int, default=10_000)
    parser.add_argument("--large", type=int, default=100_000)
    parser.add_argument("--model", default="lab:base", help="the served model (any local model directory or lab:NAME)")
    parser.add_argument("--max-new-tokens", type=int, default=4)
    parser.add_argument("--concurrency", type=int, default=32)
    args = parser.parse_args()

    from distillab.serve import server_process

    with tempfile.TemporaryDirectory() as tmp, server_process(args.model,
                                                              "--max-batch", "64") as base_url:
        # small first: ru_maxrss of children is a running maximum, so the large run's peak reads correctly after
        results = [run_size(Path(tmp), n, base_url, args) for n in (args.small, args.large)]
    for r in results:
        print(f"{r['prompts']:>8} prompts: peak RSS {r['peak_rss_mib']:.0f} MiB, {r['seconds']:.0f} s, {r['rows']} rows; "
              f"cache {r['cache_b_per_token']:.1f} B/token vs dataset {r['dataset_b_per_token']:.1f} B/token "
              f"({r['cache_b_per_token'] / r['dataset_b_per_token']:.2f}x)")
    small, large = results
    ratio = large["peak_rss_mib"] / small["peak_rss_mib"] if large["grew"] else 1.0
    print(f"peak RSS {args.large} / {args.small} prompts: {ratio:.2f}x (goal <= 1.5)")


if __name__ == "__main__":
    main()
