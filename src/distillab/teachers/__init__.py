"""Teachers: something that answers canonical requests. One small Protocol, no class hierarchy.

A request is a plain dict (endpoint, model, sampling parameters, prompt or messages): its hash is the cache
key. A response is a plain dict:
  text, finish_reason, prompt_tokens, completion_tokens,
  token_ids       completion token ids (ending with end-of-sequence when it stopped), or None,
  top_ids         per completion token, the teacher's top-k token ids, or None,
  top_logprobs    per completion token, their logprobs, or None,
  top_tokens      per completion token, the top-k token *strings* when the server gives no ids, or None.
"""

from __future__ import annotations

from typing import Callable, Protocol

# on_done(request, response or None, error or None, latency_s, attempts): called once per request,
# as soon as it is answered (or has failed for good), so the caller can commit it before the next one.
OnDone = Callable[[dict, "dict | None", "str | None", float, int], None]


class Teacher(Protocol):
    teacher_id: str  # recorded in provenance
    endpoint: str  # where answers come from: a base_url, or local:<name>@<content hash of weights, config and tokenizer>

    def request(self, prompt: str) -> dict: ...

    def answer(self, requests: list[dict], on_done: OnDone) -> None: ...


def make_teacher(cfg) -> Teacher:
    """The teacher a TeacherConfig describes: an OpenAI-compatible endpoint when base_url is set."""
    if cfg.base_url:
        from distillab.teachers.openai_compat import OpenAITeacher

        return OpenAITeacher(cfg)
    from distillab.teachers.local_hf import LocalHFTeacher

    return LocalHFTeacher(cfg)
