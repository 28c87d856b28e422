"""Data at scale. Generate part: generate's peak RSS for N vs 10N prompts against a served model (goal: the
ratio <= 1.5: memory follows the chunk and the requests in flight, not the prompt count), and the request
cache's bytes per completion token against the dataset's.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_data_scale.py [--small 10000] [--large 100000]
        [--model lab:base] [--max-new-tokens 4] [--concurrency 32]

Prompts: a JSONL file of distinct lab-style prompts (reverse/upper of random words), read lazily by generate.
Each size runs in a fresh child process (its own interpreter: peak RSS is ru_maxrss of that child alone),
in its own run directory, against one `distillab serve` process. Prints peak RSS per size, the ratio, wall
time, and cache vs dataset bytes per completion token for each size. A smaller pair with the same 10x ratio
(e.g. --small 2000 --large 20000) keeps the run short on a 2-core machine; say which pair was measured.

Cache part (`--part cache`): the request cache against the dataset, bytes per completion token, by answer length:
`--cache-prompts` prompts (default 1,000) to `--cache-model` (default lab:teacher) three times, each in a fresh run
directory and child process: the generate part's reverse/upper prompts at 4 tokens, and `describe NAME` prompts (free
text, a sentence) cut at 16 tokens and at 64 (~35: the whole sentence). Goal: the cache <= 1.2x the dataset.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_data_scale.py --part cache [--cache-prompts 1000]

Train part (`--part train`): training start at scale and the padding options.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_data_scale.py --part train [--sizes 1000,10000,100000]
        [--skewed-rows 512] [--skewed-chunk-size 0] [--tmp DIR]

1. For each size, a synthetic dataset (32-token prompts, 256-token completions, the teacher's top-20 over a 32k vocab,
   encoded by the project's own codec and written by dataset.write_dataset as shards of 2,000 rows, as generate
   writes them) and, in a fresh child process, distillab.train.run_train on a tiny 32k-vocab Llama until its first
   optimizer step: the child's own peak RSS (ru_maxrss) and seconds to that step (and its peak RSS at step 20), first
   with the Arrow copy to make (a first run) and again with it made (a rerun or resume). Batches of 8, chunked KD
   (chunk 512), so the batch's B x T x V logits do not hide the data. Goal: 100k rows <= 1.5x the 1k RSS, first
   step <= 30 s.
2. Tokens/s of one epoch over a length-skewed set (80% of completions 8-48 tokens, 20% 200-256; batches of 16,
   dense logits unless --skewed-chunk-size) with train.group_by_length and train.packing off and on, each in a fresh child:
   real (non-pad) tokens / train seconds.
"""

from __future__ import annotations

import argparse
import json
import random
import resource
import shutil
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


def write_prompts(path: Path, n: int, seed: int = 0, verbs=("reverse", "upper")) -> None:
    """n distinct prompts "VERB WORD I"; other verbs than the default: the lab's own format, "VERB WORD\\n" (the
    lab models answer it in full), the words made distinct instead."""
    rng = random.Random(seed)
    lab_format, seen = verbs != ("reverse", "upper"), set()
    with open(path, "w") as f:
        for i in range(n):
            word = "".join(rng.choice(string.ascii_lowercase) for _ in range(rng.randint(3, 7)))
            while lab_format and word in seen:
                word = "".join(rng.choice(string.ascii_lowercase) for _ in range(7))
            seen.add(word)
            prompt = f"{rng.choice(verbs)} {word}\n" if lab_format else f"{rng.choice(verbs)} {word} {i}"
            f.write(json.dumps({"prompt": prompt}) + "\n")


def run_size(root: Path, n: int, base_url: str, args) -> dict:
    prompts = root / f"prompts-{n}.jsonl"
    write_prompts(prompts, n, verbs=getattr(args, "verbs", ("reverse", "upper")))
    cfg = {
        "name": f"scale-{n}",
        "runs_dir": str(root / "runs"),
        "teacher": {
            "model": args.model,
            "base_url": base_url,
            "max_new_tokens": args.max_new_tokens,
            "top_k_logprobs": 20,
            "concurrency": args.concurrency,
            "usd_per_1m_input": 0.0,
            "usd_per_1m_output": 0.0,
        },
        "data": {"prompts_file": str(prompts)},
        "train": {"student": args.model},
    }
    began = time.time()
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    out = subprocess.run(
        [sys.executable, "-c", CHILD, json.dumps(cfg)],
        capture_output=True,
        text=True,
        env={"PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"},
    )
    if out.returncode:
        raise SystemExit(out.stderr[-2000:])
    peak_kib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss  # the largest child so far
    summary = json.loads(out.stdout.strip().splitlines()[-1])
    run_dir = root / "runs" / f"scale-{n}"
    data = run_dir / "data" / "train.parquet"
    tokens = max(summary["completion_tokens"], 1)
    return {
        "prompts": n,
        "peak_rss_mib": peak_kib / 1024,
        "grew": peak_kib > before,
        "seconds": time.time() - began,
        "cache_b_per_token": (run_dir / "teacher.sqlite").stat().st_size / tokens,
        "dataset_b_per_token": data.stat().st_size / tokens,
        **summary,
    }


# ----------------------------------------------------------------------------------------------------
# Train part (--part train)

VOCAB, TOP_K, PROMPT_TOKENS, COMPLETION_TOKENS, SHARD_ROWS = 32_000, 20, 32, 256, 2_000

TRAIN_CHILD = """
import json, os, resource, sys, time, warnings
warnings.simplefilter("ignore")
began = time.monotonic()
from distillab.config import from_dict
from distillab.train import run_train

seen = {}

def first_step(step, max_steps, loss):  # run_train's progress hook, after each logged step
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    if step == 1:
        seen.update(peak_rss_mib=rss, seconds_to_first_step=time.monotonic() - began)
    if step == 20:  # 160 rows later: does memory follow the batches read?
        print(json.dumps({**seen, "peak_rss_mib_step_20": rss}), flush=True)
        os._exit(0)

summary = run_train(from_dict(json.loads(sys.argv[1])), log=lambda *a: None,
                    progress=None if len(sys.argv) > 2 else first_step)
print(json.dumps({"train_seconds": summary["train_seconds"], "steps": summary["steps"],
                  "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def tiny_student(path: Path, vocab: int = VOCAB) -> Path:
    """A 2-layer Llama (hidden 64) with a word-level tokenizer of `vocab` tokens: the vocab is what sizes the top-k."""
    import torch
    from tokenizers import Tokenizer, pre_tokenizers, processors
    from tokenizers.models import WordLevel
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    specials = ["<pad>", "<s>", "</s>", "<unk>"]  # ids 0-3; not "t0".."t3", which would match inside "t22"
    words = Tokenizer(WordLevel({**dict(zip(specials, range(4))), **{f"t{i}": i for i in range(4, vocab)}}, "<unk>"))
    words.pre_tokenizer = pre_tokenizers.WhitespaceSplit()  # "t5 t9" -> t5, t9: a row's prompt text is its ids
    words.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    tok = PreTrainedTokenizerFast(
        tokenizer_object=words, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=512,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        tie_word_embeddings=True,
    )
    LlamaForCausalLM(config).save_pretrained(str(path), safe_serialization=True)
    tok.save_pretrained(str(path))
    return path


def synthetic_rows(n: int, rng, completion_lengths=None) -> list[dict]:
    """Rows as generate writes them: token ids and the teacher's top-k through the codec (topk_codec.encode_topk,
    with the tail mass), random but distribution-shaped (a softmax over k + 1 logits: the top-k and the rest)."""
    import numpy as np

    from distillab.topk_codec import encode_topk

    rows = []
    for i in range(n):
        length = COMPLETION_TOKENS if completion_lengths is None else int(completion_lengths[i])
        ids = np.cumsum(rng.integers(1, VOCAB // (TOP_K + 1), size=(length, TOP_K)), axis=1)  # (T, k) distinct
        logits = rng.normal(0, 2, size=(length, TOP_K + 1))
        logprobs = logits - np.logaddexp.reduce(logits, axis=1, keepdims=True)  # (T, k + 1)
        completion = rng.integers(4, VOCAB, size=length).tolist()
        prompt = rng.integers(4, VOCAB, size=PROMPT_TOKENS - 1).tolist()
        # the prompt's text tokenizes to its ids (train checks the data was tokenized for its student)
        rows.append(
            {
                "prompt": " ".join(f"t{t}" for t in prompt),
                "completion": "c",
                "source": "teacher",
                "teacher_id": "synthetic",
                "prompt_ids": [1] + prompt,
                "completion_ids": completion[:-1] + [2],
                "topk": encode_topk(ids, logprobs[:, :TOP_K], tail_logprob=logprobs[:, TOP_K]),
            }
        )
    return rows


def write_synthetic(run_dir: Path, n: int, seed: int = 0, completion_lengths=None) -> None:
    """data/train/part-*.parquet: n rows in shards of SHARD_ROWS, through dataset.write_dataset."""
    import numpy as np

    from distillab.dataset import write_dataset

    rng = np.random.default_rng(seed)
    for start in range(0, n, SHARD_ROWS):
        count = min(SHARD_ROWS, n - start)
        lengths = None if completion_lengths is None else completion_lengths[start : start + count]
        write_dataset(
            run_dir / "data" / "train" / f"part-{start // SHARD_ROWS:05d}.parquet", synthetic_rows(count, rng, lengths)
        )


def train_child(cfg: dict, whole_run: bool = False) -> dict:
    out = subprocess.run(
        [sys.executable, "-c", TRAIN_CHILD, json.dumps(cfg)] + (["whole"] if whole_run else []),
        capture_output=True,
        text=True,
        env={"PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"},
    )
    if out.returncode:
        raise SystemExit(out.stderr[-3000:])
    return json.loads(out.stdout.strip().splitlines()[-1])


def train_config(root: Path, name: str, student: Path, **train) -> dict:
    return {
        "name": name,
        "runs_dir": str(root / "runs"),
        "teacher": {"model": str(student)},
        "train": {
            "student": str(student),
            "per_device_batch_size": 8,
            "max_steps": 100,
            "save_steps": 10**6,
            "chunk_size": 512,
            "warmup_ratio": 0.0,
            **train,
        },
    }


def train_start(root: Path, student: Path, sizes: list[int]) -> list[dict]:
    results = []
    for n in sizes:
        cfg = train_config(root, f"start-{n}", student)
        began = time.time()
        write_synthetic(root / "runs" / f"start-{n}", n)
        written = time.time() - began
        data = root / "runs" / f"start-{n}" / "data"
        parquet_mib = sum(f.stat().st_size for f in (data / "train").glob("*.parquet")) / 2**20
        first = train_child(cfg)  # makes the Arrow copy
        again = train_child(cfg)  # the copy is there: a rerun or a resume
        arrow_mib = (data / ".arrow" / "train.arrow").stat().st_size / 2**20
        results.append(
            {
                "rows": n,
                "parquet_mib": parquet_mib,
                "arrow_mib": arrow_mib,
                "write_seconds": written,
                "first": first,
                "again": again,
            }
        )
        print(
            f"{n:>7} rows ({parquet_mib:.0f} MiB Parquet, {arrow_mib:.0f} MiB Arrow copy): first run peak RSS "
            f"{first['peak_rss_mib']:.0f} MiB ({first['peak_rss_mib_step_20']:.0f} at step 20), first step at "
            f"{first['seconds_to_first_step']:.1f} s; again {again['peak_rss_mib']:.0f} MiB, "
            f"{again['seconds_to_first_step']:.1f} s",
            flush=True,
        )
        shutil.rmtree(root / "runs" / f"start-{n}")
    small, large = results[0], results[-1]
    print(
        f"peak RSS {large['rows']} / {small['rows']} rows: {large['first']['peak_rss_mib'] / small['first']['peak_rss_mib']:.2f}x "
        f"(goal <= 1.5); first step at {large['rows']} rows: {large['first']['seconds_to_first_step']:.1f} s (goal <= 30)"
    )
    return results


def padding_options(root: Path, student: Path, n: int, chunk_size: int = 0) -> list[dict]:
    import numpy as np

    rng = np.random.default_rng(1)
    long = rng.random(n) < 0.2
    lengths = np.where(long, rng.integers(200, 257, n), rng.integers(8, 49, n))
    write_synthetic(root / "runs" / "skewed", n, completion_lengths=lengths)
    real_tokens = int((lengths + PROMPT_TOKENS).sum())
    results = []
    for group, pack in ((False, False), (True, False), (False, True), (True, True)):
        cfg = train_config(
            root,
            "skewed",
            student,
            max_steps=-1,
            epochs=1.0,
            per_device_batch_size=16,
            chunk_size=chunk_size,
            group_by_length=group,
            packing=pack,
        )
        shutil.rmtree(root / "runs" / "skewed" / "checkpoints", ignore_errors=True)
        shutil.rmtree(root / "runs" / "skewed" / "student", ignore_errors=True)
        out = train_child(cfg, whole_run=True)
        rate = real_tokens / out["train_seconds"]
        results.append({"group_by_length": group, "packing": pack, "tokens_per_s": rate, **out})
        print(
            f"group_by_length={group!s:5} packing={pack!s:5}: {out['steps']} steps, {out['train_seconds']:.1f} s, "
            f"{rate:,.0f} real tokens/s, peak RSS {out['peak_rss_mib']:.0f} MiB",
            flush=True,
        )
    return results


def main_cache(args) -> None:
    """Cache part: the request cache's bytes per completion token against the dataset's, by answer length."""
    from distillab.testing import server_process

    cases = [(("reverse", "upper"), 4), (("describe", "tell me about"), 16), (("describe", "tell me about"), 64)]
    with server_process(args.cache_model, "--max-batch", "64") as base_url:
        for verbs, max_new in cases:
            with tempfile.TemporaryDirectory() as tmp:
                case = argparse.Namespace(
                    **{**vars(args), "model": args.cache_model, "max_new_tokens": max_new, "verbs": verbs}
                )
                r = run_size(Path(tmp), args.cache_prompts, base_url, case)
            print(
                f"{' / '.join(verbs)}, max {max_new} tokens: {r['rows']} rows, "
                f"{r['completion_tokens'] / r['rows']:.1f} tokens an answer: cache {r['cache_b_per_token']:.1f} "
                f"B/token vs dataset {r['dataset_b_per_token']:.1f} B/token "
                f"({r['cache_b_per_token'] / r['dataset_b_per_token']:.2f}x, goal <= 1.2)",
                flush=True,
            )


def main_train(args) -> None:
    with tempfile.TemporaryDirectory(dir=args.tmp) as tmp:
        root = Path(tmp)
        student = tiny_student(root / "student")
        if args.sizes:
            train_start(root, student, [int(x) for x in args.sizes.split(",")])
        if args.skewed_rows:
            padding_options(root, student, args.skewed_rows, args.skewed_chunk_size)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--part", choices=("generate", "train", "cache"), default="generate")
    parser.add_argument("--sizes", default="1000,10000,100000", help="train part: dataset rows, comma-separated")
    parser.add_argument(
        "--skewed-rows", type=int, default=512, help="train part: rows of the length-skewed set (0: skip)"
    )
    parser.add_argument(
        "--skewed-chunk-size",
        type=int,
        default=0,
        help="train part: train.chunk_size of the skewed set (0, the default: logits at every position, "
        "padding included; > 0: logits only where a completion token is predicted)",
    )
    parser.add_argument("--tmp", default=None, help="train part: where the datasets go (100k rows: ~4 GiB)")
    parser.add_argument("--small", type=int, default=10_000)
    parser.add_argument("--large", type=int, default=100_000)
    parser.add_argument("--model", default="lab:base", help="the served model (any local model directory or lab:NAME)")
    parser.add_argument("--max-new-tokens", type=int, default=4)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--cache-model", default="lab:teacher", help="cache part: the served model")
    parser.add_argument("--cache-prompts", type=int, default=1000, help="cache part: prompts per answer length")
    args = parser.parse_args()
    if args.part == "train":
        return main_train(args)
    if args.part == "cache":
        return main_cache(args)

    from distillab.testing import server_process

    with tempfile.TemporaryDirectory() as tmp, server_process(args.model, "--max-batch", "64") as base_url:
        # small first: ru_maxrss of children is a running maximum, so the large run's peak reads correctly after
        results = [run_size(Path(tmp), n, base_url, args) for n in (args.small, args.large)]
    for r in results:
        print(
            f"{r['prompts']:>8} prompts: peak RSS {r['peak_rss_mib']:.0f} MiB, {r['seconds']:.0f} s, {r['rows']} rows; "
            f"cache {r['cache_b_per_token']:.1f} B/token vs dataset {r['dataset_b_per_token']:.1f} B/token "
            f"({r['cache_b_per_token'] / r['dataset_b_per_token']:.2f}x)"
        )
    small, large = results
    ratio = large["peak_rss_mib"] / small["peak_rss_mib"] if large["grew"] else 1.0
    print(f"peak RSS {args.large} / {args.small} prompts: {ratio:.2f}x (goal <= 1.5)")


if __name__ == "__main__":
    main()
