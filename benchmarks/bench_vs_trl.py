"""Train steps/s: off-policy KD from cached top-k teacher log-probs (distillab.losses) vs TRL's GKDTrainer (lmbda=0).

Both train the same tiny random-init Llama student on the same synthetic batches (same batch size, sequence length,
number of steps, fp32, AdamW with the same learning rate, grad-norm clipping at 1.0) towards the same teacher, a Llama
with ~4x the student's parameters, with the same divergence (forward KL: TRL's beta=0 is KL(teacher || student)).

  distillab  the teacher's top-k (k=20) ids and log-probs are computed once, before training, and cached (that is the
             off-policy setting), trained through distillab.train.build_trainer: the same Trainer subclass and collator
             `distillab train` runs (forward + sparse forward_kl + backward + clip + AdamW step).
  TRL        GKDTrainer with lmbda=0 (no on-policy generation) and seq_kd=False; a step runs the teacher forward and
             the dense generalized JSD over the full vocab, inside the HF Trainer loop.

Steps/s is measured between the end of the first step and the end of the last (the first step is warm-up), and the
two are run in alternation (--rounds) on the same threads so machine noise hits both; the best round of each is used.
The one-off cost of caching the teacher's top-k is printed separately.

  OMP_NUM_THREADS=1 python benchmarks/bench_vs_trl.py
"""

from __future__ import annotations

import argparse
import logging
import os
import tempfile
import time
import warnings

import torch
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast, TrainerCallback


def parse_args():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--vocab", type=int, default=2048)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--k", type=int, default=20)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--teacher-hidden", type=int, default=256)
    p.add_argument("--teacher-layers", type=int, default=4)
    p.add_argument("--teacher-intermediate", type=int, default=1024)
    return p.parse_args()


def llama(vocab: int, hidden: int, layers: int, intermediate: int, seq_len: int, seed: int) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=seq_len,
        tie_word_embeddings=False,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    return LlamaForCausalLM(config)


def n_params(model) -> int:
    return sum(p.numel() for p in model.parameters())


def make_batches(args) -> list[dict]:
    """Synthetic token batches; the whole sequence is trained on (labels = input_ids, nothing masked)."""
    g = torch.Generator().manual_seed(0)
    batches = []
    for _ in range(args.steps):
        input_ids = torch.randint(3, args.vocab, (args.batch_size, args.seq_len), generator=g)
        batches.append(
            {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids), "labels": input_ids.clone()}
        )
    return batches


class StepClock(TrainerCallback):
    def __init__(self):
        self.ends = []

    def on_step_end(self, args, state, control, **kwargs):
        self.ends.append(time.perf_counter())


def steps_per_second(ends: list[float]) -> float:
    return (len(ends) - 1) / (ends[-1] - ends[0])


# ---------------------------------------------------------------------------------------------------------------------


def cache_teacher_topk(teacher, batches, k):
    """The off-policy cache: per batch, the teacher's top-k ids and log-probs for every next-token position."""
    cache = []
    with torch.no_grad():
        for batch in batches:
            logits = teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits  # (B, T, V)
            logprobs, ids = torch.log_softmax(logits[:, :-1], -1).topk(k, dim=-1)  # (B, T-1, k) each
            cache.append((ids, logprobs))
    return cache


def run_distillab(student, batches, cache, args) -> float:
    """distillab's own training path: the cached top-k as dataset rows, through train.build_trainer (the HF
    Trainer subclass `distillab train` runs), forward KL on every next-token position."""
    from distillab.config import from_dict
    from distillab.train import build_trainer

    rows = []
    for batch, (ids, logprobs) in zip(batches, cache):
        for b in range(batch["input_ids"].shape[0]):
            tokens = batch["input_ids"][b].tolist()
            # completion token j is predicted at index j (prompt = the first token): top-k row j
            rows.append(
                {
                    "prompt_ids": tokens[:1],
                    "completion_ids": tokens[1:],
                    "top_ids": ids[b].tolist(),
                    "top_logprobs": logprobs[b].tolist(),
                    "top_tail": None,
                }
            )
    cfg = from_dict(
        {
            "train": {
                "student": "in-process",
                "loss": "forward_kl",
                "kd_weight": 1.0,
                "sft_weight": 0.0,
                "max_steps": args.steps,
                "batch_size": args.batch_size,
                "lr": args.lr,
                "warmup_ratio": 0.0,
                "save_steps": 10**9,
            }
        }
    )
    clock = StepClock()
    with tempfile.TemporaryDirectory() as out:
        trainer = build_trainer(cfg, rows, student, tiny_tokenizer(args.vocab), out, callbacks=[clock])
        trainer.train()
    return steps_per_second(clock.ends)


def tiny_tokenizer(vocab: int) -> PreTrainedTokenizerFast:
    """A word-level tokenizer built in-process: GKDTrainer needs a processing_class (for pad_token_id), and loading one
    would go to the hub."""
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel

    words = {"<pad>": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i for i in range(3, vocab)}}
    return PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer(WordLevel(words, unk_token="<pad>")),
        pad_token="<pad>",
        bos_token="<s>",
        eos_token="</s>",
    )


def run_trl(student, teacher, batches, args) -> float:
    from datasets import Dataset
    from trl.experimental.gkd import GKDConfig, GKDTrainer

    rows = [{"input_ids": ids.tolist(), "labels": ids.tolist()} for batch in batches for ids in batch["input_ids"]]

    def collate(examples):  # the same rows as the batches above (the Trainer shuffles them; all are random tokens)
        input_ids = torch.tensor([e["input_ids"] for e in examples])
        return {
            "input_ids": input_ids,
            "attention_mask": torch.ones_like(input_ids),
            "labels": torch.tensor([e["labels"] for e in examples]),
            "prompts": input_ids[:, :1],  # only read for on-policy generation, which lmbda=0 never does
            "prompt_attention_mask": torch.ones_like(input_ids[:, :1]),
        }

    with tempfile.TemporaryDirectory() as out:
        config = GKDConfig(
            output_dir=out,
            per_device_train_batch_size=args.batch_size,
            max_steps=args.steps,
            lmbda=0.0,
            beta=0.0,
            seq_kd=False,
            temperature=1.0,
            learning_rate=args.lr,
            lr_scheduler_type="constant",
            max_grad_norm=1.0,
            logging_steps=10_000,
            save_strategy="no",
            report_to=[],
            use_cpu=True,
            dataloader_num_workers=0,
            disable_tqdm=True,
            max_length=args.seq_len,
            bf16=False,
            fp16=False,
            seed=0,
        )
        clock = StepClock()
        trainer = GKDTrainer(
            model=student,
            teacher_model=teacher,
            args=config,
            train_dataset=Dataset.from_list(rows),
            processing_class=tiny_tokenizer(args.vocab),
            data_collator=collate,
            callbacks=[clock],
            optimizers=(torch.optim.AdamW(student.parameters(), lr=args.lr), None),
        )
        trainer.train()
    assert len(clock.ends) == args.steps, f"TRL ran {len(clock.ends)} steps, expected {args.steps}"
    return steps_per_second(clock.ends)


def main():
    args = parse_args()
    warnings.filterwarnings("ignore")
    logging.getLogger("transformers").setLevel(logging.ERROR)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    teacher = llama(
        args.vocab, args.teacher_hidden, args.teacher_layers, args.teacher_intermediate, args.seq_len, seed=1
    ).eval()
    student_template = llama(args.vocab, hidden=128, layers=4, intermediate=352, seq_len=args.seq_len, seed=2)
    batches = make_batches(args)
    start = time.perf_counter()
    cache = cache_teacher_topk(teacher, batches, args.k)
    cache_seconds = time.perf_counter() - start
    print(
        f"student {n_params(student_template) / 1e6:.2f}M params (hidden 128, 4 layers), teacher "
        f"{n_params(teacher) / 1e6:.2f}M (hidden {args.teacher_hidden}, {args.teacher_layers} layers): "
        f"{n_params(teacher) / n_params(student_template):.1f}x; "
        f"vocab {args.vocab}, batch {args.batch_size} x {args.seq_len} tokens, {args.steps} steps, fp32, "
        f"torch threads {torch.get_num_threads()}"
    )
    print(f"one-off teacher top-{args.k} caching: {cache_seconds / args.steps:.3f} s per batch (not in the steps/s)")
    ours, trls = [], []
    for round_ in range(args.rounds):
        student = llama(args.vocab, hidden=128, layers=4, intermediate=352, seq_len=args.seq_len, seed=2)
        ours.append(run_distillab(student, batches, cache, args))
        student = llama(args.vocab, hidden=128, layers=4, intermediate=352, seq_len=args.seq_len, seed=2)
        trls.append(run_trl(student, teacher, batches, args))
        print(f"  round {round_ + 1}: distillab {ours[-1]:.3f} steps/s   TRL GKDTrainer {trls[-1]:.3f} steps/s")
    best_ours, best_trl = max(ours), max(trls)
    print(
        f"RATIO distillab / TRL steps/s: {best_ours / best_trl:.2f}x (best of {args.rounds}: {best_ours:.3f} vs {best_trl:.3f}; goal >= 3x)"
    )
    # what caching can buy at most: TRL's step is our step plus a teacher forward (plus its dense loss and loop),
    # so no trainer that still runs the student's forward and backward can be faster than this
    teacher_forward = cache_seconds / args.steps
    our_step = 1 / best_ours
    print(
        f"bound from removing the teacher forward alone: (our step {our_step:.3f} s + teacher forward "
        f"{teacher_forward:.3f} s) / our step = {(our_step + teacher_forward) / our_step:.2f}x"
    )


if __name__ == "__main__":
    main()
