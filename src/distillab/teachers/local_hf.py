"""A local Hugging Face teacher: batched generation with KV cache, top-k logprobs with token ids."""

from __future__ import annotations

import hashlib
import time

from distillab import models
from distillab.generation import generate


def weights_digest(path) -> str:
    """Identifies the weights without reading gigabytes: config plus each safetensors file's size and head."""
    h = hashlib.sha256((path / "config.json").read_bytes())
    for f in sorted(path.glob("*.safetensors")):
        h.update(f.name.encode() + str(f.stat().st_size).encode())
        with open(f, "rb") as fh:
            h.update(fh.read(1 << 20))
    return h.hexdigest()[:16]


class LocalHFTeacher:
    def __init__(self, cfg):
        self.cfg = cfg
        self.path = models.resolve_model_path(cfg.model)
        self.teacher_id = cfg.model
        self.endpoint = f"local:{self.path.resolve()}@{weights_digest(self.path)}"
        self._model = self._tokenizer = None

    def request(self, prompt: str) -> dict:
        c = self.cfg
        return {"endpoint": self.endpoint, "model": c.model, "prompt": prompt, "max_tokens": c.max_new_tokens,
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
