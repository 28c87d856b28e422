"""A local Hugging Face teacher: batched generation with KV cache, top-k logprobs with token ids."""

from __future__ import annotations

import hashlib
import time
from pathlib import Path

from distillab import models
from distillab.generation import generate


# The files that decide what a model answers. Not the model card, lineage or training notes: distillab
# rewrites those in a student directory, and they must not change the teacher's identity.
IDENTITY_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
                  "special_tokens_map.json", "added_tokens.json", "vocab.json", "vocab.txt", "merges.txt",
                  "tokenizer.model", "spiece.model", "chat_template.jinja", "chat_template.json")
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
        self._model = self._tokenizer = None

    def request(self, prompt: str) -> dict:
        c = self.cfg
        return {"endpoint": self.endpoint, "model": self.name, "prompt": prompt, "max_tokens": c.max_new_tokens,
                "temperature": c.temperature, "top_p": c.top_p, "logprobs": c.top_k_logprobs}

    def answer(self, requests: list[dict], on_done) -> None:
        if self._model is None:  # load lazily: a fully cached run never touches the weights
            self._model, self._tokenizer = models.load(self.path)
        for start in range(0, len(requests), self.cfg.batch_size):
            batch = requests[start : start + self.cfg.batch_size]
            began = time.time()
            r0 = batch[0]
            outs = generate(self._model, self._tokenizer, [r["prompt"] for r in batch],
                            max_new_tokens=r0["max_tokens"], temperature=r0["temperature"], top_p=r0["top_p"],
                            top_k_logprobs=r0["logprobs"], batch_size=len(batch), seed=start)
            latency = (time.time() - began) / len(batch)
            for req, out in zip(batch, outs):
                on_done(req, {
                    "text": out.text, "finish_reason": out.finish_reason,
                    "prompt_tokens": out.prompt_tokens, "completion_tokens": len(out.token_ids),
                    "token_ids": out.token_ids, "top_ids": out.top_ids or None,
                    "top_logprobs": out.top_logprobs or None, "top_tokens": None,
                }, None, latency, 1)
