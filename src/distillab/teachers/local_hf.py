"""A local Hugging Face teacher: batched generation with KV cache, top-k logprobs with token ids; an inline reasoning
trace (teacher.think_tags) cut off its answer and its tokens counted (distillab.reasoning)."""

from __future__ import annotations

import hashlib
import itertools
import time
from pathlib import Path

from distillab import chat, models, reasoning
from distillab.sampling import generate

# The files that decide what a model answers. Not the model card, lineage or training notes: distillab
# rewrites those in a student directory, and they must not change the teacher's identity.
IDENTITY_FILES = (
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "vocab.txt",
    "merges.txt",
    "tokenizer.model",
    "spiece.model",
    "chat_template.jinja",
    "chat_template.json",
)
_digests: dict[tuple, str] = {}  # per process: hashing multi-GB weights once per run is enough


def model_digest(path: Path) -> str:
    """Content hash of a model directory: weights, config and tokenizer, by file name and bytes.

    Where the directory lives does not enter it, so a moved checkout, a reinstall or a second machine with the
    same files keeps every cached teacher answer. Every byte of the weights is read (sha256, about 1 GB/s):
    a sampled hash could let two different fine-tunes share cache entries.
    """
    files = sorted({*(path / name for name in IDENTITY_FILES if (path / name).is_file()), *path.glob("*.safetensors")})
    stat_key = (str(path.resolve()), *((f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in files))
    if stat_key not in _digests:
        h = hashlib.sha256()
        for f in files:
            h.update(f.name.encode() + b"\0" + str(f.stat().st_size).encode() + b"\0")
            with open(f, "rb") as fh:
                for block in iter(lambda: fh.read(1 << 20), b""):
                    h.update(block)
        _digests[stat_key] = h.hexdigest()[:16]
    return _digests[stat_key]


def model_name(name: str, path: Path) -> str:
    """The name the cache key carries: `lab:NAME` as given, else the directory's own name (not its location)."""
    return name if name.startswith("lab:") else path.resolve().name


class LocalHFTeacher:
    def __init__(self, cfg):
        self.cfg = cfg
        # Config, tokenizer and weight headers checked now: a broken directory fails before generate writes.
        self.path = models.check_model_dir(cfg.model)
        self.teacher_id = cfg.model
        self.name = model_name(cfg.model, self.path)
        self.endpoint = f"local:{self.name}@{model_digest(self.path)}"
        self.endpoint_stats = {self.endpoint: {"answered": 0, "errors": 0, "prompt_tokens": 0, "completion_tokens": 0}}
        self._model = self._tokenizer = None
        # asked through its chat template: the key says so (a cached answer to the plain prompt is not reused)
        self.templated = chat.has_template(models.load_tokenizer(self.path))

    def request(self, prompt: str, sample: int = 0, messages: list[dict] | None = None) -> dict:
        """The canonical request; the teacher is asked with chat.render_prompt of its conversation (messages, else
        the prompt as one user turn) through its own chat template, or the plain text when it has none."""
        c = self.cfg
        req = {
            "endpoint": self.endpoint,
            "model": self.name,
            "max_tokens": c.max_new_tokens,
            "temperature": c.temperature,
            "top_p": c.top_p,
            "logprobs": c.top_k_logprobs,
        }
        if messages:
            req["messages"] = messages
        else:
            req["prompt"] = prompt
        if self.templated:
            req["chat_template"] = True
        if sample:  # sample 0 has the key of samples_per_prompt = 1: those cached answers are reused
            req["sample"] = sample
        return req

    def answer(self, requests, on_done) -> None:
        pending = iter(requests)  # read lazily, a batch at a time
        batches = iter(lambda: list(itertools.islice(pending, self.cfg.batch_size)), [])
        stats = self.endpoint_stats[self.endpoint]
        start = 0
        for batch in batches:
            if self._model is None:  # load lazily: a fully cached run never touches the weights
                self._model, self._tokenizer = models.load(self.path)
            began = time.time()
            r0 = batch[0]
            outs = generate(
                self._model,
                self._tokenizer,
                [chat.render_prompt(self._tokenizer, chat.turns_of(r)) for r in batch],
                max_new_tokens=r0["max_tokens"],
                temperature=r0["temperature"],
                top_p=r0["top_p"],
                top_k_logprobs=r0["logprobs"],
                batch_size=len(batch),
                seed=start,
            )
            latency = (time.time() - began) / len(batch)
            start += len(batch)
            for req, out in zip(batch, outs):
                stats["answered"] += 1
                stats["prompt_tokens"] += out.prompt_tokens
                stats["completion_tokens"] += len(out.token_ids)
                on_done(
                    req,
                    reasoning.capture(
                        {
                            "text": out.text,
                            "finish_reason": out.finish_reason,
                            "prompt_tokens": out.prompt_tokens,
                            "completion_tokens": len(out.token_ids),
                            "token_ids": out.token_ids,
                            "top_ids": out.top_ids or None,
                            "top_logprobs": out.top_logprobs or None,
                            "top_tail": out.top_tail or None,
                            "top_tokens": None,
                            "served_by": self.endpoint,
                        },
                        self.cfg.think_tags,
                        prefix_len=self._prefix_len(out.token_ids),
                        n_tokens=len(out.token_ids),
                    ),
                    None,
                    latency,
                    1,
                )

    def _prefix_len(self, ids: list[int]):
        """An inline trace's tokens are counted exactly: the text of the first t ids, decoded as the answer was."""
        return lambda t: len(self._tokenizer.decode(ids[:t], skip_special_tokens=True))
