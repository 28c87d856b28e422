"""`distillab lab bpe-student`: a base student with its own tokenizer, for cross-tokenizer distillation from the
character-level `lab:teacher` (README, "Cross-tokenizer teachers"; benchmarks/bench_cross_tokenizer.py).

Its tokenizer is a byte-level BPE (384 tokens by default) trained with `tokenizers` on the train split of the
general skills, which is what `lab:base` pretrains on (it never sees the knowledge base). The student is pretrained
like `lab:base` (preset "base": d=128, 4 layers, 2,000 steps of 64, recall and describe left out) with that
tokenizer, and carries the lab models' chat template, so chat data works with it as with them.
"""

from __future__ import annotations

import time
from pathlib import Path

from distillab.errors import UserError
from distillab.files import read_json
from distillab.lab.pretrain import pretrain
from distillab.lab.tokenizer import CHAT_TEMPLATE, build_bpe_tokenizer
from distillab.lab.world import SKILLS

PRESET = "base"  # the BPE student is lab:base with another tokenizer
TEXTS_PER_SKILL = 2000  # train-split examples a general skill gives the BPE trainer


def bpe_texts(per_skill: int = TEXTS_PER_SKILL) -> list[str]:
    """The text the tokenizer is trained on: prompt + answer of the general skills' train examples."""
    general = [s for s in SKILLS.values() if s.family != "knowledge"]
    return [e.prompt + e.answer for s in general for e in s.examples("train", per_skill)]


def pretrained_steps(out: Path) -> int:
    """How many steps the student in `out` was pretrained (0: none there)."""
    record = out / "pretrain.json"
    return read_json(record, "delete the directory and rerun")["history"][-1]["step"] if record.is_file() else 0


def bpe_tokenizer(vocab_size: int = 384, per_skill: int = TEXTS_PER_SKILL):
    """The student's tokenizer: a byte-level BPE trained on bpe_texts, with the lab models' chat template."""
    tok = build_bpe_tokenizer(bpe_texts(per_skill), vocab_size=vocab_size)
    tok.chat_template = CHAT_TEMPLATE
    return tok


def build_bpe_student(out: Path, steps: int = 2000, vocab_size: int = 384, log=print) -> Path:
    """The BPE student in `out`, pretrained `steps` steps; one already there as asked is kept (already_built), as
    pretraining takes minutes. The directory is replaced whole, so one holding anything else is refused."""
    if out.is_dir() and any(out.iterdir()) and not (out / "pretrain.json").is_file():
        raise UserError(f"{out} holds files that are not a pretrained lab model: choose a new or empty directory")
    tok = bpe_tokenizer(vocab_size)
    if already_built(out, tok, steps):
        log(f"{out}: the BPE student is already there, pretrained {pretrained_steps(out)} steps")
        return out
    began = time.time()
    pretrain(PRESET, out, steps=steps, tokenizer=tok, log=log)
    log(f"pretrained the BPE student in {time.time() - began:.0f} s ({steps} steps, {len(tok)} tokens): {out}")
    return out


def already_built(out: Path, tok, steps: int) -> bool:
    """Whether `out` holds a student pretrained at least `steps` steps with `tok`'s vocabulary (the BPE training is
    deterministic: the same texts and size give the same merges)."""
    from transformers import AutoTokenizer

    if pretrained_steps(out) < steps or not (out / "tokenizer.json").is_file():
        return False
    return AutoTokenizer.from_pretrained(str(out)).get_vocab() == tok.get_vocab()
