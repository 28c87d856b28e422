"""Peak memory of one training step on long rows (1k / 4k / 8k tokens), with and without gradient checkpointing.

The step is distillab's own: build_trainer (DistillTrainer on transformers.Trainer) over one row of prompt + a long
completion with a sparse top-20 teacher at every completion token, chunked KD on (train.chunk_size), one optimizer
step (AdamW: its state is made in the step, the same in both variants). The student is a random Llama whose
activations dominate at these lengths (default d=256, 6 layers, vocab 16k, sdpa attention).

How memory is measured: each (length, checkpointing) pair runs in a fresh subprocess. On CPU, after the model and
trainer are built, the process's peak-RSS mark is reset to its current RSS (Linux: "5" to /proc/self/clear_refs)
and VmHWM is read after the step: every byte the step touched at its peak, allocator slack included (as in
bench_chunked_loss.py). The subprocesses run with MALLOC_MMAP_THRESHOLD_=65536, so glibc maps every tensor of 64 KiB
or more on its own and returns it when freed: RSS then follows the live tensors, as the GPU's allocated bytes do,
instead of glibc's heap keeping freed 8-32 MiB activations (--glibc-default leaves glibc's own threshold). On a GPU: torch.cuda.max_memory_allocated() after the step minus memory_allocated() before
it (peak stats reset before the step). Time is the step's wall clock; it shows what the recompute costs.

    .venv/bin/python benchmarks/bench_long_traces.py                      # 1k, 4k, 8k on this machine
    .venv/bin/python benchmarks/bench_long_traces.py --lengths 1024 --layers 4  # quick
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--lengths", type=int, nargs="+", default=[1024, 4096, 8192], help="tokens a row")
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=6)
    p.add_argument("--vocab", type=int, default=16384)
    p.add_argument("--k", type=int, default=20, help="the teacher's top-k")
    p.add_argument("--chunk-size", type=int, default=1024, help="train.chunk_size (chunked KD)")
    p.add_argument("--prompt", type=int, default=64, help="prompt tokens of the row (the rest is its completion)")
    p.add_argument("--attn", default="sdpa", help="train.attn_implementation")
    p.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "fp16"])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--glibc-default", action="store_true", help="leave glibc's mmap threshold as it is")
    p.add_argument(
        "--max-gib",
        type=float,
        default=16.0,
        help="address-space cap per CPU run: too much memory fails with an error, not the OOM killer",
    )
    p.add_argument("--one", help=argparse.SUPPRESS)  # "LENGTH:0|1", set in the subprocesses
    return p.parse_args(argv)


def proc_kib(field: str) -> int:
    return int(re.search(rf"{field}:\s+(\d+) kB", Path("/proc/self/status").read_text()).group(1))


def build(args, length: int, checkpointing: bool, out_dir: Path):
    """The student and the Trainer over one row of `length` tokens, as train builds them."""
    import types

    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from distillab.config import from_dict
    from distillab.train import build_trainer

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=args.vocab,
        hidden_size=args.hidden,
        intermediate_size=4 * args.hidden,
        num_hidden_layers=args.layers,
        num_attention_heads=max(1, args.hidden // 64),
        max_position_embeddings=max(args.lengths),
        tie_word_embeddings=True,
        attn_implementation=args.attn,
    )
    model = LlamaForCausalLM(config).to("cuda" if torch.cuda.is_available() else "cpu")
    g = torch.Generator().manual_seed(1)
    n = length - args.prompt
    row = {
        "prompt_ids": torch.randint(2, args.vocab, (args.prompt,), generator=g).tolist(),
        "completion_ids": torch.randint(2, args.vocab, (n,), generator=g).tolist(),
        "top_ids": torch.rand(n, args.vocab, generator=g).topk(args.k).indices,  # (n, k) distinct ids
        "top_logprobs": torch.randn(n, args.k, generator=g).log_softmax(-1) - 0.05,
        "top_tail": None,
    }
    cfg = from_dict(
        {
            "train": {
                "max_steps": 1,
                "per_device_batch_size": 1,
                "chunk_size": args.chunk_size,
                "lr": 1e-4,
                "gradient_checkpointing": checkpointing,
                "attn_implementation": args.attn,
                "precision": args.precision,
            }
        }
    )
    tok = types.SimpleNamespace(pad_token_id=0, eos_token_id=1)
    return model, build_trainer(cfg, [row], model, tok, out_dir)


def run_one(args) -> dict:
    """One (length, checkpointing) step in this process: peak memory above the built trainer, seconds, loss."""
    import resource

    import torch

    torch.set_num_threads(args.threads)
    length, checkpointing = int(args.one.split(":")[0]), args.one.endswith(":1")
    cuda = torch.cuda.is_available()
    if not cuda:
        limit = int(args.max_gib * 2**30)
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    with tempfile.TemporaryDirectory() as out_dir:
        model, trainer = build(args, length, checkpointing, Path(out_dir))
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            before = torch.cuda.memory_allocated()
        else:
            before = proc_kib("VmRSS") * 1024
            Path("/proc/self/clear_refs").write_text("5")  # peak RSS := current RSS
        start = time.perf_counter()
        result = trainer.train()
        if cuda:
            torch.cuda.synchronize()
        seconds = time.perf_counter() - start
        peak = torch.cuda.max_memory_allocated() if cuda else proc_kib("VmHWM") * 1024
    return {
        "length": length,
        "checkpointing": checkpointing,
        "peak_mib": (peak - before) / 2**20,
        "seconds": seconds,
        "loss": result.training_loss,
        "device": torch.cuda.get_device_name() if cuda else f"cpu x{args.threads}",
    }


def main(argv=None):
    args = parse_args(argv)
    if args.one:
        print(json.dumps(run_one(args)))
        return
    base = list(argv if argv is not None else sys.argv[1:])
    print(
        f"Llama d={args.hidden} layers={args.layers} vocab={args.vocab}, one row (prompt {args.prompt} + completion),"
        f" sparse top-{args.k} teacher, chunked KD (chunk {args.chunk_size}), attention {args.attn}, "
        f"{args.precision}, one AdamW step; peak memory above the built trainer"
        + ("" if args.glibc_default else ", MALLOC_MMAP_THRESHOLD_=65536")
    )
    env = os.environ | ({} if args.glibc_default else {"MALLOC_MMAP_THRESHOLD_": "65536"})
    print(f"{'tokens':>7} {'plain MiB':>10} {'ckpt MiB':>10} {'ratio':>6} {'plain s':>8} {'ckpt s':>8}  same loss")
    for length in args.lengths:
        runs = {}
        for checkpointing in (False, True):
            done = subprocess.run(
                [sys.executable, __file__, *base, "--one", f"{length}:{int(checkpointing)}"],
                capture_output=True,
                text=True,
                env=env,
            )
            if done.returncode:
                sys.exit(f"{length} tokens, checkpointing={checkpointing} failed:\n{done.stderr[-2000:]}")
            runs[checkpointing] = json.loads(done.stdout.strip().splitlines()[-1])
        plain, ckpt = runs[False], runs[True]
        same = abs(plain["loss"] - ckpt["loss"]) <= 1e-5 * abs(plain["loss"])
        print(
            f"{length:>7} {plain['peak_mib']:>10.1f} {ckpt['peak_mib']:>10.1f} "
            f"{ckpt['peak_mib'] / plain['peak_mib']:>6.3f} {plain['seconds']:>8.1f} {ckpt['seconds']:>8.1f}  "
            f"{'yes' if same else 'NO'} ({plain['loss']:.6f} / {ckpt['loss']:.6f}) [{plain['device']}]"
        )
        print(
            f"RATIO checkpointing/plain at {length} tokens: memory {ckpt['peak_mib'] / plain['peak_mib']:.3f}, "
            f"time {ckpt['seconds'] / plain['seconds']:.2f}",
            flush=True,
        )


if __name__ == "__main__":
    main()
