"""Bytes per token of cached top-k teacher data (k = 20, ids lossless) as stored in Parquet + zstd.

Compares distillab.topk_codec (sorted delta-coded ids in byte planes, log-probs as 8-bit steps below the position's top,
explicit tail mass) against the naive layout (int64 ids + float32 log-probs = 240 bytes/token raw), both written as
Parquet with zstd, one row per sequence, one binary column per array. Reported bytes are the whole file on disk
(Parquet metadata included) divided by the number of token positions.

Teacher distributions (ids compress according to how a real teacher spreads them, so several are measured):
  uniform       top-k of a tiny random-init LlamaForCausalLM: near-uniform logits, so the ids are spread uniformly over
                the vocab (the worst case for the ids, an easy one for the log-probs)
  zipf          a plausible LM: a Zipf prior over ids in frequency order (BPE vocabularies put frequent tokens at low
                ids) + a random Llama's context-dependent logits, scaled to an LM-like sharpness (stats printed)
  zipf-shuffled the same distributions with the vocab randomly permuted (a tokenizer whose id order ignores frequency)

  OMP_NUM_THREADS=1 python benchmarks/bench_topk_storage.py            # vocab 32000 and 151936, 16 x 1024 tokens
"""

from __future__ import annotations

import argparse
import io

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from distillab.topk_codec import LOGPROB_RANGE, MAX_LOGPROB_ERROR, decode_topk, encode_topk


def parse_args():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--vocabs", type=int, nargs="+", default=[32000, 151936])
    p.add_argument("--k", type=int, default=20)
    p.add_argument("--sequences", type=int, default=16)
    p.add_argument("--seq-len", type=int, default=1024)
    p.add_argument("--zstd-level", type=int, default=9)
    p.add_argument("--kinds", nargs="+", default=["uniform", "zipf", "zipf-shuffled"])
    return p.parse_args()


def random_llama_logits(vocab: int, n_sequences: int, seq_len: int, seed: int = 0):
    """Yields (seq_len, vocab) logits of a tiny random-init Llama on random token sequences, one sequence at a time."""
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=seq_len,
    )
    model = LlamaForCausalLM(config).eval()
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for _ in range(n_sequences):
            input_ids = torch.randint(0, vocab, (1, seq_len), generator=g)
            yield model(input_ids=input_ids).logits[0]  # (T, V)


def teacher_logprobs(kind: str, raw_logits: torch.Tensor, permutation: torch.Tensor, g: torch.Generator):
    """(T, V) random-Llama logits -> (T, V) teacher log-probs of the given kind."""
    if kind == "uniform":
        return torch.log_softmax(raw_logits, -1)
    vocab = raw_logits.shape[-1]
    context = (raw_logits - raw_logits.mean(-1, keepdim=True)) / raw_logits.std(-1, keepdim=True)  # (T, V), unit std
    zipf_prior = -1.1 * torch.log(torch.arange(vocab, dtype=torch.float32) + 10)  # (V,) frequent tokens at low ids
    # per-position sharpness: some positions are near-certain, some open (log-uniform over [1, 4])
    sharpness = torch.exp(torch.rand(raw_logits.shape[0], 1, generator=g) * np.log(4.0))
    logits = zipf_prior + 2.5 * sharpness * context  # (T, V)
    if kind == "zipf-shuffled":
        logits = logits[:, permutation]
    return torch.log_softmax(logits, -1)


def parquet_bytes(columns: dict[str, list[bytes]], level: int) -> int:
    buffer = io.BytesIO()
    table = pa.table({name: pa.array(blobs, type=pa.binary()) for name, blobs in columns.items()})
    pq.write_table(
        table, buffer, compression="zstd", compression_level=level, use_dictionary=False, write_statistics=False
    )  # min/max statistics of KB-sized blobs would cost ~1 byte/token each
    return buffer.getbuffer().nbytes


def measure(kind: str, vocab: int, args) -> dict:
    g = torch.Generator().manual_seed(7)
    permutation = torch.randperm(vocab, generator=g)
    codec_columns: dict[str, list[bytes]] = {}
    naive_columns: dict[str, list[bytes]] = {"ids_int64": [], "logprobs_float32": []}
    top1, mass, worst_error, worst_tail_error = [], [], 0.0, 0.0
    for raw in random_llama_logits(vocab, args.sequences, args.seq_len):
        logprobs_all = teacher_logprobs(kind, raw, permutation, g)  # (T, V)
        logprobs, ids = logprobs_all.topk(args.k, dim=-1)  # (T, k) each
        top1.append(logprobs[:, 0].exp())
        mass.append(logprobs.exp().sum(-1))
        fields = encode_topk(ids, logprobs)
        for name, array in fields.items():
            codec_columns.setdefault(name, []).append(array.tobytes())
        naive_columns["ids_int64"].append(ids.numpy().astype(np.int64).tobytes())
        naive_columns["logprobs_float32"].append(logprobs.numpy().astype(np.float32).tobytes())
        # fidelity of what comes back
        got_ids, got_logprobs, got_tail = decode_topk(fields)
        order = ids.argsort(-1)
        want_ids, want_logprobs = ids.gather(-1, order), logprobs.gather(-1, order)
        assert torch.equal(got_ids, want_ids), "ids must round-trip exactly"
        in_range = want_logprobs >= want_logprobs.max(-1, keepdim=True).values - LOGPROB_RANGE
        worst_error = max(worst_error, (got_logprobs - want_logprobs).abs()[in_range].max().item())
        want_tail = 1 - logprobs.double().exp().sum(-1)  # (T,)
        # tails under 1e-6 are fp32 round-off of the sum (and floored to 1e-6 by the losses): not measured
        measurable = want_tail > 1e-6
        tail_error = (got_tail.double().exp() / want_tail - 1).abs()[measurable]
        worst_tail_error = max(worst_tail_error, tail_error.max().item() if tail_error.numel() else 0.0)
    n_tokens = args.sequences * args.seq_len
    top1, mass = torch.cat(top1), torch.cat(mass)
    return {
        "codec": parquet_bytes(codec_columns, args.zstd_level) / n_tokens,
        "naive_parquet": parquet_bytes(naive_columns, args.zstd_level) / n_tokens,
        "naive_raw": args.k * (8 + 4),
        "top1": top1.mean().item(),
        "mass": mass.mean().item(),
        "worst_error": worst_error,
        "worst_tail_error": worst_tail_error,
    }


def main():
    args = parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    print(
        f"k={args.k}, {args.sequences} sequences x {args.seq_len} tokens per case, Parquet zstd level {args.zstd_level}; "
        f"codec log-prob bound {MAX_LOGPROB_ERROR} nat"
    )
    print(
        f"{'teacher':>14} {'vocab':>7} {'mean p(top1)':>12} {'mean top-k mass':>15} {'naive raw':>9} "
        f"{'naive parquet':>13} {'codec parquet':>13} {'codec/naive raw':>15} {'max lp err':>10} {'max tail rel err*':>17}"
    )
    worst = 0.0
    for vocab in args.vocabs:
        for kind in args.kinds:
            r = measure(kind, vocab, args)
            worst = max(worst, r["codec"])
            print(
                f"{kind:>14} {vocab:>7} {r['top1']:>12.3f} {r['mass']:>15.3f} {r['naive_raw']:>9.1f} "
                f"{r['naive_parquet']:>13.1f} {r['codec']:>13.1f} {r['codec'] / r['naive_raw']:>15.3f} "
                f"{r['worst_error']:>10.4f} {r['worst_tail_error']:>17.5f}"
            )
    print("* over positions whose tail mass is > 1e-6; max lp err over log-probs within LOGPROB_RANGE of their top")
    print(f"RESULT worst case codec bytes/token: {worst:.1f} (goal <= 60); bytes are per token position")


if __name__ == "__main__":
    main()
