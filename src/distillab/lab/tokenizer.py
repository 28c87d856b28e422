"""The lab's character-level tokenizer, built with `tokenizers` and saved as ordinary HF tokenizer files.

One token per character keeps digits and letters visible to a small model (arithmetic and string skills
need that); `AutoTokenizer.from_pretrained(dir)` loads it like any other model's tokenizer.
"""

from __future__ import annotations

import string
from pathlib import Path

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

SPECIALS = ["<pad>", "<bos>", "<eos>", "<unk>"]
CHARS = string.ascii_lowercase + string.ascii_uppercase + string.digits + " \n.,?!:;'\"-+*/=<>()_#%&@"


# The shipped lab models' chat template (their tokenizer_config.json `chat_template`). They were pretrained on one
# question at a time (a prompt ending in a newline, then the answer and <eos>): a conversation shows them its last
# user turn, newline-ended, and what follows it; a system prompt and earlier turns are left out (shown, they drop
# the teacher's score from 0.92 to 0.11: README, "Bring your own chat data"). A lab prompt, which ends in a newline,
# renders exactly as it is. It writes only the turns' own text, "\n" and <eos>: nothing outside the lab vocabulary.
CHAT_TEMPLATE = (
    "{%- set ns = namespace(start=-1) -%}"
    "{%- for m in messages -%}{%- if m['role'] == 'user' -%}{%- set ns.start = loop.index0 -%}{%- endif -%}"
    "{%- endfor -%}"
    "{%- if ns.start < 0 -%}{{ raise_exception('the lab models answer a user turn; this conversation has none') }}"
    "{%- endif -%}"
    "{%- for m in messages[ns.start:] -%}"
    "{%- if m['role'] == 'user' -%}{{ m['content'] }}{%- if not m['content'].endswith('\\n') -%}{{ '\\n' }}{%- endif -%}"
    "{%- elif m['role'] == 'assistant' -%}{{ m['content'] }}{{ eos_token }}"
    "{%- endif -%}"
    "{%- endfor -%}"
)


def build_tokenizer() -> PreTrainedTokenizerFast:
    vocab = {tok: i for i, tok in enumerate(SPECIALS + list(CHARS))}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tok.decoder = decoders.Fuse()
    # Every encoded text starts with <bos>, as Llama's tokenizer does.
    tok.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", 1)])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<bos>",
        eos_token="<eos>",
        pad_token="<pad>",
        unk_token="<unk>",
        clean_up_tokenization_spaces=False,
        model_max_length=256,
    )


def save_tokenizer(directory: Path) -> PreTrainedTokenizerFast:
    tok = build_tokenizer()
    tok.save_pretrained(str(directory))
    return tok


def build_bpe_tokenizer(
    texts, vocab_size: int = 384, specials=("<pad>", "<s>", "</s>", "<unk>")
) -> PreTrainedTokenizerFast:
    """A byte-level BPE trained on `texts` (e.g. the lab's prompts and answers): a student whose tokens are not the
    teacher's, for cross-tokenizer distillation (benchmarks/bench_cross_tokenizer.py, tests/test_crosstok.py).
    specials: pad, bos, eos, unk, in that order (other names than the char tokenizer's, on purpose)."""
    from tokenizers import trainers

    pad, bos, eos, unk = specials
    tok = Tokenizer(models.BPE(unk_token=unk))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(specials),
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(texts, trainer=trainer)
    tok.post_processor = processors.TemplateProcessing(single=f"{bos} $A", special_tokens=[(bos, tok.token_to_id(bos))])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=bos,
        eos_token=eos,
        pad_token=pad,
        unk_token=unk,
        clean_up_tokenization_spaces=False,
        model_max_length=256,
    )
