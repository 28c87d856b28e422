"""Teachers: something that answers canonical requests. One small Protocol, no class hierarchy.

A request is a plain dict (model, sampling parameters, prompt or messages; the endpoint when there is exactly
one, and "sample" for the second and later samples of a prompt): its hash is the cache key. A response is a
plain dict:
  text, finish_reason, prompt_tokens, completion_tokens,
  token_ids       completion token ids (ending with end-of-sequence when it stopped), or None,
  top_ids         per completion token, the teacher's top-k token ids, or None,
  top_logprobs    per completion token, their logprobs, or None,
  top_tokens      per completion token, the top-k token *strings* when the server gives no ids, or None,
  served_by       the endpoint that answered (not part of the key: replicas share cache entries).
A reasoning teacher's response also holds (distillab.reasoning.capture; absent when it wrote no trace):
  reasoning           the trace (a separate reasoning_content / reasoning field, or inline between think_tags);
                      `text` is then the answer alone, while token_ids and the top-k cover every generated token
  reasoning_tokens    the trace's tokens, part of completion_tokens
  reasoning_counted   how they were counted: "usage" (the server's), "tokens" (the trace's own), "estimate"
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Protocol

# on_done(request, response or None, error or None, latency_s, attempts): called once per request,
# as soon as it is answered (or has failed for good), so the caller can commit it before the next one.
OnDone = Callable[[dict, "dict | None", "str | None", float, int], None]


class Teacher(Protocol):
    teacher_id: str  # recorded in provenance
    endpoint: str  # where answers come from: base_url(s), or local:<name>@<content hash of weights, config, tokenizer>
    # per endpoint, this process's counts: {url: {answered, errors, prompt_tokens, completion_tokens}}
    endpoint_stats: dict[str, dict]

    # messages: the conversation (OpenAI turns) when the prompt is one; prompt is then its plain text
    def request(self, prompt: str, sample: int = 0, messages: list[dict] | None = None) -> dict: ...

    # requests: any iterable, read lazily (as capacity frees up), so the caller can stream them
    def answer(self, requests: Iterable[dict], on_done: OnDone) -> None: ...


def make_teacher(cfg) -> Teacher:
    """The teacher a TeacherConfig describes: an OpenAI-compatible endpoint when base_url is set."""
    if cfg.base_url:
        from distillab.teachers.openai_compat import OpenAITeacher

        return OpenAITeacher(cfg)
    from distillab.teachers.local_hf import LocalHFTeacher

    return LocalHFTeacher(cfg)


def failure_digest(failures: list[dict], most: int = 3) -> str:
    """'3x connection refused; 1x HTTP 400: ...': the first distinct errors, counted."""
    from collections import Counter

    counts = Counter((f["error"] or "unknown error").splitlines()[0][:160] for f in failures)
    return "; ".join(f"{n}x {error}" for error, n in counts.most_common(most)) or "no answer"
