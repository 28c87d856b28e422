"""`distillab serve`: batched vs one-at-a-time throughput on the lab teacher.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_serve_batching.py [--model lab:teacher] [--requests 256]

The same server code runs twice, in a subprocess each time: with --max-batch 1 (every request is its own
model call: one at a time) and with --max-batch 32 (the batching loop groups concurrent requests). A
client with `--concurrency` requests in flight sends the same prompts, greedy, `--max-tokens` tokens with
top-20 logprobs, to each; the ratio of requests per second is batching's gain. Rounds alternate the order.

The lab teacher is re-saved by a background training job while it trains; the benchmark copies the
checkpoint to a temporary directory first, and says which training step it was (throughput does not
depend on how well the weights are trained, only on the architecture and the lengths generated, which
max_tokens bounds). Without lab:teacher it falls back to lab:base and says so.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import shutil
import statistics
import string
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT))

import openai  # noqa: E402

from distillab.models import LAB_CHECKPOINTS  # noqa: E402
from distillab.testing import read_metrics, server_process  # noqa: E402


def snapshot(model: str, workdir: Path) -> tuple[Path | str, str]:
    """A stable copy of a lab checkpoint (a trainer may rewrite it meanwhile) and a line saying what it is."""
    if not model.startswith("lab:"):
        return model, model
    name = model[len("lab:") :]
    src = LAB_CHECKPOINTS / name
    if not (src / "config.json").is_file():
        return snapshot("lab:base", workdir)[0], f"lab:base (no {model} checkpoint yet)"
    dst = workdir / name
    shutil.copytree(src, dst)
    info = json.loads((dst / "pretrain.json").read_text()) if (dst / "pretrain.json").is_file() else {}
    steps = info.get("history", [{}])[-1].get("step") if info.get("history") else None
    planned = info.get("spec", {}).get("steps")
    params = info.get("parameters")
    state = f"snapshot at step {steps} of {planned}" if steps and planned and steps < planned else "final"
    return dst, f"{model} ({params:,} parameters, {state})" if params else f"{model} ({state})"


def prompts_for(n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    words = ["".join(rng.choice(string.ascii_lowercase) for _ in range(rng.randint(3, 8))) for _ in range(n)]
    return [f"{rng.choice(['reverse', 'upper', 'sort'])} {w}\n" for w in words]


async def load(base_url: str, model: str, prompts: list[str], concurrency: int, max_tokens: int) -> tuple[float, int]:
    """Seconds to answer all prompts with `concurrency` in flight, and the completion tokens generated."""
    sem = asyncio.Semaphore(concurrency)
    tokens = 0
    async with openai.AsyncOpenAI(base_url=base_url, api_key="none", max_retries=0, timeout=600) as client:

        async def one(prompt):
            nonlocal tokens
            async with sem:
                r = await client.completions.create(
                    model=model, prompt=prompt, max_tokens=max_tokens, temperature=0.0, logprobs=20
                )
                tokens += r.usage.completion_tokens

        began = time.perf_counter()
        await asyncio.gather(*[one(p) for p in prompts])
        return time.perf_counter() - began, tokens


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="lab:teacher")
    p.add_argument("--requests", type=int, default=256)
    p.add_argument("--concurrency", type=int, default=32)
    p.add_argument("--max-tokens", type=int, default=16)
    p.add_argument("--max-batch", type=int, default=32)
    p.add_argument("--rounds", type=int, default=3)
    args = p.parse_args()
    workdir = Path(tempfile.mkdtemp(prefix="bench_serve_"))
    model_dir, described = snapshot(args.model, workdir)
    served = Path(model_dir).name if not str(model_dir).startswith("lab:") else str(model_dir)
    results: dict[int, list[float]] = {1: [], args.max_batch: []}
    tokens_seen = {}
    for r in range(args.rounds):
        prompts = prompts_for(args.requests, seed=r)
        for max_batch in [1, args.max_batch] if r % 2 == 0 else [args.max_batch, 1]:
            with server_process(model_dir, "--max-batch", str(max_batch)) as base_url:
                asyncio.run(load(base_url, served, prompts_for(32, seed=1000 + r), args.concurrency, args.max_tokens))
                before = read_metrics(base_url)
                seconds, tokens = asyncio.run(load(base_url, served, prompts, args.concurrency, args.max_tokens))
                after = read_metrics(base_url)
            batches = after["distillab_batches_total"] - before["distillab_batches_total"]
            results[max_batch].append(len(prompts) / seconds)
            tokens_seen[max_batch] = tokens
            print(
                f"round {r} max_batch {max_batch:>2}: {len(prompts) / seconds:7.1f} req/s  "
                f"{tokens / seconds:8.1f} completion tok/s  mean batch {len(prompts) / batches:5.1f}",
                flush=True,
            )
    one, many = statistics.median(results[1]), statistics.median(results[args.max_batch])
    print(
        f"\nmodel {described}; {args.requests} requests, concurrency {args.concurrency}, "
        f"max_tokens {args.max_tokens}, top-20 logprobs, greedy"
    )
    print(f"one at a time (max_batch 1): {one:.1f} req/s (median of {args.rounds})")
    print(f"batched (max_batch {args.max_batch}):     {many:.1f} req/s (median of {args.rounds})")
    print(f"ratio batched / one-at-a-time: {many / one:.2f}x")


if __name__ == "__main__":
    main()
