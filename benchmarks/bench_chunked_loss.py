"""Peak memory and time of chunked_kd_loss vs the naive loss (all logits, then the loss, then backward).

Both variants compute the same thing: a KD loss from student hidden states (N, H) and an lm_head (V, H), forward and
backward (gradients w.r.t. the hidden states and the lm_head weight), against a sparse top-k teacher (the off-policy
cache) or a dense teacher given as hidden states + its own lm_head.

How memory is measured, honestly on CPU: each variant runs in a fresh subprocess. After the inputs are built, the
process's peak-RSS mark is reset to its current RSS (Linux: write "5" to /proc/self/clear_refs) and VmHWM is read after
the step: the difference is every byte the step touched at its peak, torch allocations, allocator slack and all
(tracemalloc can't see torch's allocations). Large torch CPU buffers are mmap'd and returned to the OS on free, so RSS
follows live tensors. Time is the wall clock of one forward+backward step, the fastest over --rounds alternating subprocess pairs x
--repeats steps each, under the same OMP_NUM_THREADS.

Full size (the issue's target, ~12 GiB peak for the naive variant, ~4 min per round on one core):
    OMP_NUM_THREADS=1 python benchmarks/bench_chunked_loss.py --vocab 128256 --tokens 8192 --hidden 1024 \
        --rounds 1 --repeats 1
Quick:
    OMP_NUM_THREADS=1 python benchmarks/bench_chunked_loss.py --vocab 32000 --tokens 2048
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--vocab", type=int, default=128256)
    p.add_argument("--tokens", type=int, default=8192)
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--loss", default="forward_kl")
    p.add_argument("--teacher", choices=["sparse", "dense"], default="sparse")
    p.add_argument("--k", type=int, default=20, help="top-k of the sparse teacher")
    p.add_argument("--chunk-size", type=int, default=None, help="default: distillab.losses.DEFAULT_CHUNK_SIZE")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--repeats", type=int, default=2, help="steps per subprocess")
    p.add_argument("--rounds", type=int, default=2, help="naive/chunked subprocess pairs, run alternately")
    p.add_argument(
        "--max-gib",
        type=float,
        default=18.0,
        help="address-space cap per variant: a variant that needs more fails with an error instead of waking the "
        "OOM killer on a shared machine",
    )
    p.add_argument("--variant", choices=["naive", "chunked"], help=argparse.SUPPRESS)  # set in the subprocesses
    return p.parse_args(argv)


def proc_kib(field: str) -> int:
    return int(re.search(rf"{field}:\s+(\d+) kB", open("/proc/self/status").read()).group(1))


def build_inputs(args):
    """Inputs made without any (N, V) temporary, so the setup leaves no high-water mark of its own."""
    import torch

    from distillab.losses import TeacherDist, TeacherHidden

    g = torch.Generator().manual_seed(0)
    n, h, v = args.tokens, args.hidden, args.vocab
    hidden = torch.randn(n, h, generator=g).requires_grad_(True)  # (N, H)
    weight = (torch.randn(v, h, generator=g) / h**0.5).requires_grad_(True)  # (V, H)
    if args.teacher == "dense":
        teacher_hidden = torch.randn(n, h, generator=g)  # (N, H)
        teacher_weight = torch.randn(v, h, generator=g) / h**0.5  # (V, H)
        return hidden, weight, TeacherHidden(teacher_hidden, teacher_weight)
    # k distinct ids per token: a random start plus k positive gaps whose total stays below V
    gaps = torch.randint(1, max(2, v // args.k), (n, args.k), generator=g)
    ids = (torch.randint(0, v, (n, 1), generator=g) + gaps.cumsum(-1)) % v  # (N, k)
    mass = torch.rand(n, 1, generator=g) * 0.5 + 0.49  # teacher top-k mass S in [0.49, 0.99)
    logprobs = torch.log_softmax(torch.randn(n, args.k, generator=g) * 2, -1) + mass.log()  # (N, k)
    return hidden, weight, TeacherDist(ids=ids, logprobs=logprobs)


def run_variant(args) -> dict:
    import resource

    limit = int(args.max_gib * 2**30)
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    import torch

    from distillab.losses import DEFAULT_CHUNK_SIZE, TeacherDist, TeacherHidden, chunked_kd_loss, kd_loss

    hidden, weight, target = build_inputs(args)
    chunk = args.chunk_size or DEFAULT_CHUNK_SIZE

    def naive():
        logits = hidden @ weight.T  # (N, V): the whole student logits
        if isinstance(target, TeacherHidden):
            teacher = TeacherDist(logits=target.hidden @ target.lm_head_weight.T)  # (N, V) the teacher's too
        else:
            teacher = target
        return kd_loss(args.loss, logits, teacher, None, args.temperature)

    def chunked():
        return chunked_kd_loss(args.loss, hidden, weight, target, None, chunk_size=chunk, temperature=args.temperature)

    step = naive if args.variant == "naive" else chunked
    rss_before = proc_kib("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # peak RSS := current RSS
    times, losses = [], []
    for _ in range(args.repeats):
        hidden.grad = weight.grad = None
        start = time.perf_counter()
        loss = step()
        loss.backward()
        times.append(time.perf_counter() - start)
        losses.append(loss.item())
        del loss
    peak = proc_kib("VmHWM")
    checksum = (hidden.grad.double().square().sum() + weight.grad.double().square().sum()).item()
    return {
        "variant": args.variant,
        "peak_above_inputs_mib": (peak - rss_before) / 1024,
        "seconds": min(times),
        "loss": losses[-1],
        "grad_sq_norm": checksum,
        "chunk_size": chunk if args.variant == "chunked" else None,
        "threads": torch.get_num_threads(),
    }


def main(argv=None):
    args = parse_args(argv)
    if args.variant:
        print(json.dumps(run_variant(args)))
        return
    passthrough = list(argv if argv is not None else sys.argv[1:])
    results = {}  # variant -> merged result: fastest time, highest peak over the rounds
    for _ in range(args.rounds):  # alternating, so load from other processes on the machine hits both alike
        for variant in ("naive", "chunked"):
            out = subprocess.run(
                [sys.executable, __file__, *passthrough, "--variant", variant],
                capture_output=True,
                text=True,
                env=os.environ.copy(),
            )
            if out.returncode != 0:
                sys.exit(f"{variant} failed (rc {out.returncode}):\n{out.stderr[-3000:]}")
            r = json.loads(out.stdout.strip().splitlines()[-1])
            if variant in results:
                r["seconds"] = min(r["seconds"], results[variant]["seconds"])
                r["peak_above_inputs_mib"] = max(r["peak_above_inputs_mib"], results[variant]["peak_above_inputs_mib"])
            results[variant] = r
    naive, chunked = results["naive"], results["chunked"]
    logits_mib = args.tokens * args.vocab * 4 / 2**20
    print(
        f"loss={args.loss} teacher={args.teacher} vocab={args.vocab} tokens={args.tokens} hidden={args.hidden} "
        f"fp32, threads={naive['threads']}, chunk_size={chunked['chunk_size']}, "
        f"{args.rounds} rounds x {args.repeats} steps (time: fastest step; memory: highest peak)"
    )
    weight_grad_mib = args.vocab * args.hidden * 4 / 2**20
    print(f"one (N, V) fp32 logits tensor: {logits_mib:.0f} MiB; lm_head weight grad: {weight_grad_mib:.0f} MiB")
    for r in (naive, chunked):
        print(
            f"  {r['variant']:>8}: peak above inputs {r['peak_above_inputs_mib']:9.1f} MiB   "
            f"time {r['seconds']:8.3f} s   loss {r['loss']:.6f}"
        )
    rel_loss = abs(chunked["loss"] - naive["loss"]) / abs(naive["loss"])
    rel_grad = abs(chunked["grad_sq_norm"] - naive["grad_sq_norm"]) / naive["grad_sq_norm"]
    print(f"  same result: loss differs by {rel_loss:.1e}, gradients' squared norm by {rel_grad:.1e} (relative)")
    mem_ratio = chunked["peak_above_inputs_mib"] / naive["peak_above_inputs_mib"]
    time_ratio = chunked["seconds"] / naive["seconds"]
    print(f"RATIO chunked/naive: memory {mem_ratio:.3f} (goal <= 0.12)   time {time_ratio:.3f} (goal <= 1.0)")


if __name__ == "__main__":
    main()
