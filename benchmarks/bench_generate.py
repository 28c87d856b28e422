"""generate's throughput against `distillab serve`, as a ratio to a bare asyncio + openai client on the same
server in the same run (goal: >= 0.95).

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_generate.py [--model lab:base] [--prompts 384]

Both sides send the same kind of request (completions, greedy, top-20 logprobs with token ids, the same
max_tokens and concurrency) for lab-style prompts (reverse/upper/sort of random words, each used once
in the whole run, so the server computes every answer) to one server process. The bare client does nothing
else; generate also builds requests, hashes them, commits every answer to SQLite, maps rows and writes
the Parquet file, so the ratio is what the pipeline's bookkeeping costs. Its time is the whole
run_generate call (tokenizer load and Parquet write included); its answering phase alone (first to last
progress call) and the client process's CPU time per request are printed beside it. Rounds alternate the
order (bare first, then generate first); the median of the per-round ratios is the figure. Idempotent replays are checked to be zero: every
answer timed was computed by the model.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import statistics
import string
import sys
import tempfile
import time
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT))

import openai  # noqa: E402

from distillab.config import from_dict  # noqa: E402
from distillab.generate import run_generate  # noqa: E402
from distillab.testing import read_metrics as metrics  # noqa: E402
from distillab.testing import server_process  # noqa: E402


def unique_prompts(n: int, seen: set, rng: random.Random) -> list[str]:
    """Lab-style prompts never used before in this run: a repeated one would be an idempotent replay."""
    out = []
    while len(out) < n:
        word = "".join(rng.choice(string.ascii_lowercase) for _ in range(rng.randint(3, 8)))
        prompt = f"{rng.choice(['reverse', 'upper', 'sort'])} {word}\n"
        if prompt not in seen:
            seen.add(prompt)
            out.append(prompt)
    return out


def config(workdir: Path, base_url: str, model: str, prompts: list[str], name: str, args):
    prompts_file = workdir / f"{name}.jsonl"
    prompts_file.write_text("".join(json.dumps({"prompt": q}) + "\n" for q in prompts))
    return from_dict(
        {
            "name": name,
            "runs_dir": str(workdir),
            "teacher": {
                "model": model,
                "base_url": base_url,
                "concurrency": args.concurrency,
                "max_new_tokens": args.max_tokens,
                "top_k_logprobs": 20,
                "max_retries": 0,
                "usd_per_1m_input": 0.0,
                "usd_per_1m_output": 0.0,
            },
            "data": {"prompts_file": str(prompts_file)},
            "train": {"student": args.model},
        }
    )


async def bare_client(base_url: str, model: str, prompts: list[str], args) -> float:
    """The reference: the least a client can do to get the same answers. Returns seconds."""
    sem = asyncio.Semaphore(args.concurrency)
    async with openai.AsyncOpenAI(base_url=base_url, api_key="none", max_retries=0, timeout=120) as client:

        async def one(prompt):
            async with sem:
                r = await client.completions.create(
                    model=model,
                    prompt=prompt,
                    max_tokens=args.max_tokens,
                    temperature=0.0,
                    top_p=1.0,
                    logprobs=20,
                    extra_body={"return_tokens_as_token_ids": True},
                )
                assert r.choices[0].logprobs.tokens

        began = time.perf_counter()
        await asyncio.gather(*[one(p) for p in prompts])
        return time.perf_counter() - began


def timed_generate(cfg) -> tuple[float, float, float]:
    """run_generate's wall seconds, its answering phase's (first to last progress call), and CPU seconds."""
    marks: list[float] = []
    cpu, began = time.process_time(), time.perf_counter()
    summary = run_generate(
        cfg, progress=lambda done, total, budget: marks.append(time.perf_counter()), log=lambda *_: None
    )
    wall, cpu = time.perf_counter() - began, time.process_time() - cpu
    assert summary.failed == 0 and summary.requests_sent == len(marks) - 1
    return wall, marks[-1] - marks[0], cpu


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="lab:base", help="model to serve (and whose tokenizer the student uses)")
    p.add_argument("--prompts", type=int, default=256, help="prompts per trial")
    p.add_argument("--rounds", type=int, default=16, help="pairs of trials (bare, generate), order alternating")
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--max-tokens", type=int, default=16)
    p.add_argument("--no-pin", action="store_true", help="let server and client share all CPUs")
    args = p.parse_args()
    # Pinned (default): server on CPU 0, both clients on CPU 1, as with a server on another machine, so
    # the clients' own CPU time cannot slow the server they are measured against.
    cpus = sorted(os.sched_getaffinity(0))
    server_cpus = None
    if not args.no_pin and len(cpus) >= 2:
        server_cpus = {cpus[0]}
        os.sched_setaffinity(0, set(cpus[1:]))
    warnings.simplefilter("ignore")
    served_name = args.model
    workdir = Path(tempfile.mkdtemp(prefix="bench_generate_"))
    rows = []  # per round: bare wall, bare cpu, generate wall, answering-phase wall, generate cpu
    with server_process(args.model, "--max-batch", "32", cpus=server_cpus) as base_url:
        seen: set[str] = set()
        rng = random.Random(0)
        # warm-up, both sides: the server's first batches initialise torch lazily, and the first
        # run_generate imports and loads genai-prices' price table, pyarrow's writer, ...
        asyncio.run(bare_client(base_url, served_name, unique_prompts(64, seen, rng), args))
        run_generate(
            config(workdir, base_url, served_name, unique_prompts(64, seen, rng), "warmup", args), log=lambda *_: None
        )
        for r in range(args.rounds):
            bare_prompts = unique_prompts(args.prompts, seen, rng)
            cfg = config(workdir, base_url, served_name, unique_prompts(args.prompts, seen, rng), f"round{r}", args)
            result = {}
            for side in ["bare", "generate"] if r % 2 == 0 else ["generate", "bare"]:
                if side == "bare":
                    cpu = time.process_time()
                    wall = asyncio.run(bare_client(base_url, served_name, bare_prompts, args))
                    result["bare"] = (wall, time.process_time() - cpu)
                else:
                    result["generate"] = timed_generate(cfg)
            rows.append((*result["bare"], *result["generate"]))
            b, g = rows[-1][0], rows[-1][2]
            print(
                f"round {r}: bare {args.prompts / b:6.1f} req/s  generate {args.prompts / g:6.1f} req/s  "
                f"ratio {b / g:.3f}",
                flush=True,
            )
        m = metrics(base_url)
    assert m["distillab_idempotent_replays_total"] == 0, "a replay would flatter generate"
    n = args.prompts
    med = lambda i: statistics.median(row[i] for row in rows)  # noqa: E731
    ratios = [row[0] / row[2] for row in rows]
    print(
        f"\nmodel {args.model}, {n} prompts x {args.rounds} rounds, concurrency {args.concurrency}, "
        f"max_tokens {args.max_tokens}, top-20 logprobs, server max_batch 32, "
        f"{f'server pinned to CPU {min(server_cpus)}, clients to the rest' if server_cpus else 'no pinning'}"
    )
    print(
        f"bare asyncio+openai client:   {n / med(0):6.1f} req/s (median), client CPU {med(1) / n * 1e3:.2f} ms/request"
    )
    print(
        f"run_generate, whole stage:    {n / med(2):6.1f} req/s (median), client CPU {med(4) / n * 1e3:.2f} ms/request"
    )
    print(f"run_generate, answering only: {n / med(3):6.1f} req/s (median)")
    print(
        f"ratio generate / bare: median of per-round ratios {statistics.median(ratios):.3f} "
        f"(min {min(ratios):.3f}, max {max(ratios):.3f}); ratio of medians {med(0) / med(2):.3f}  (goal >= 0.95)"
    )


if __name__ == "__main__":
    main()
