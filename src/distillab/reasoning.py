"""Reasoning traces: a teacher's thinking kept apart from its answer, counted, and rendered for the student.

Capture. A reasoning teacher's trace comes in one of two places:
- a separate response field: `reasoning_content` (vLLM's reasoning parsers, DeepSeek's API) or `reasoning` (newer
  vLLM, OpenRouter); the teacher client reads either into the response's `reasoning`, `text` being the content;
- inline, `<think>...</think>` before the answer (a completions endpoint, a local model, a chat server without a
  reasoning parser; `[teacher] think_tags` names other tags). split_inline cuts it off the same way wherever it
  comes from. A text with the closing tag and no opening one is a trace too: DeepSeek-R1-style templates end the
  generation prompt with the opening tag, so the model writes only the closing one. A text that opens a trace
  and never closes it (cut at max_tokens) is all trace and an empty answer.
capture() gives a teacher response `text` = the answer, `reasoning` = the trace (stripped of surrounding
whitespace: the student's format supplies its own), `reasoning_tokens` and `reasoning_counted`, which says how the
count was made: "usage" (the server's usage.completion_tokens_details.reasoning_tokens), "tokens" (the trace's own
tokens counted, its tags included: a local teacher's ids, a completions endpoint's token offsets or strings), or
"estimate" (completion_tokens x the trace's share of the characters: a server that gives neither). A response
without a trace is returned untouched, so it is cached and read back exactly as before (but for an API that reasons
in hidden tokens, OpenAI's o-series: their count is kept, with no trace to train on). Reasoning tokens are part
of completion_tokens (as OpenAI's and vLLM's usage report them): they are priced as output tokens already.
The split is made as an answer arrives and cached with it (think_tags are not part of the request key: changing them
asks nothing again); a cached answer that holds no split trace is split again by the current tags when rows are
built (split_response), so tags set after the fact still take effect.

Rendering for the student (encode). The student learns trace + answer through its own chat template's thinking
format where it has one: a template that renders an assistant message's `reasoning_content` (Qwen3's, for one)
gets the trace there; otherwise the assistant turn's content is the plain format `[train] trace_format`
(default "<think>\\n{reasoning}\\n</think>\\n{answer}"), rendered by the template like any content. A template that
drops the trace (DeepSeek-R1's strips everything before `</think>` from assistant turns) or rewrites the prompt
gets the plain format written right after the generation prompt, without its opening tag when the prompt already
ends with it. A model without a template gets the plain format as its completion. The trace is part of
completion_ids, so it carries loss and KD like the answer; the prompt never does (chat.encode).

Reading answers (final_answer): what a model answered is the text after its trace. Scoring, verification and
anything else that judges an answer reads it; a text without a think block is read as it is.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from distillab import chat
from distillab.config import THINK_TAGS as DEFAULT_TAGS
from distillab.config import TRACE_FORMAT as DEFAULT_TRACE_FORMAT

REASONING_FIELDS = ("reasoning_content", "reasoning")  # where chat APIs put the trace, in the order looked for


@dataclass(frozen=True)
class Split:
    reasoning: str | None  # the trace, stripped; None: the text holds none
    answer: str  # what follows it (the whole text when there is no trace)
    end: int  # characters of the text the trace takes, its tags included (0: none)


def split_inline(text: str, tags=DEFAULT_TAGS) -> Split:
    """A text with an inline trace -> (trace, answer) (module docstring); empty tags split nothing."""
    if not tags:
        return Split(None, text, 0)
    opening, closing = tags
    head = text.lstrip()
    close = text.find(closing)
    if close >= 0:
        trace = text[:close].lstrip()
        trace = trace[len(opening) :] if trace.startswith(opening) else trace
        end = close + len(closing)
        return Split(trace.strip(), text[end:].lstrip(), end)
    if head.startswith(opening):  # opened and never closed: cut off while thinking
        return Split(head[len(opening) :].strip(), "", len(text))
    return Split(None, text, 0)


def split_response(resp: dict, tags=DEFAULT_TAGS) -> tuple[str | None, str]:
    """(trace or None, answer) of a teacher response: its separate reasoning when it has one, else its text split
    by `tags` (a response cached before its tags were set is split now)."""
    if resp.get("reasoning"):
        return resp["reasoning"], resp["text"]
    split = split_inline(resp["text"], tags)
    return split.reasoning, split.answer


def final_answer(text: str, tags=DEFAULT_TAGS) -> str:
    """The answer a model's output gives: the text after its think block, or the text itself when it has none."""
    return split_inline(text, tags).answer


def field_reasoning(message: dict) -> str | None:
    """A chat response message's separate trace (REASONING_FIELDS), or None when it has none."""
    for name in REASONING_FIELDS:
        value = message.get(name)
        if isinstance(value, str) and value.strip():
            return value.strip()
    return None


# ----------------------------------------------------------------------------------------------------
# Capture and counting.


def capture(
    resp: dict,
    tags=DEFAULT_TAGS,
    usage_count: int | None = None,
    prefix_len: Callable[[int], int] | None = None,
    n_tokens: int = 0,
) -> dict:
    """A teacher response whose `text` is the output as it came (and `reasoning`, a separate field's trace, when the
    server gave one) -> the response with text = answer, reasoning, reasoning_tokens and reasoning_counted (module
    docstring); untouched when there is no trace.

    usage_count: the server's own count of reasoning tokens. prefix_len(t): the characters of the output's first t
    tokens (of n_tokens), when the tokens' text is known: an inline trace's tokens are then counted exactly."""
    if resp.get("reasoning"):
        raw_chars = len(resp["reasoning"]) + len(resp["text"])
        trace_chars, split = len(resp["reasoning"]), None
    else:
        split = split_inline(resp["text"], tags)
        if split.reasoning is None:  # no trace; an API that thinks in hidden tokens still bills (and counts) them
            resp = {k: v for k, v in resp.items() if k != "reasoning"}
            return resp | {"reasoning_tokens": usage_count, "reasoning_counted": "usage"} if usage_count else resp
        raw_chars, trace_chars = len(resp["text"]), split.end
        resp = resp | {"text": split.answer, "reasoning": split.reasoning}
    if usage_count:  # a server's 0 beside a trace it returned is no count (some report the field unfilled)
        counted, how = usage_count, "usage"
    elif split is not None and prefix_len is not None and n_tokens:
        counted, how = count_tokens(n_tokens, prefix_len, split.end), "tokens"
    else:
        counted, how = round(resp.get("completion_tokens", 0) * trace_chars / max(raw_chars, 1)), "estimate"
    return resp | {
        "reasoning_tokens": min(int(counted), int(resp.get("completion_tokens", counted))),
        "reasoning_counted": how,
    }


def count_tokens(n: int, prefix_len: Callable[[int], int], end: int) -> int:
    """How many of a completion's n tokens its first `end` characters take: the smallest t with
    prefix_len(t) >= end (a binary search: prefix lengths never shrink, and decoding every prefix of a 16k-token
    trace would cost its square)."""
    lo, hi = 0, n
    while lo < hi:
        mid = (lo + hi) // 2
        if prefix_len(mid) >= end:
            hi = mid
        else:
            lo = mid + 1
    return lo


def usage_reasoning_tokens(usage: dict) -> int | None:
    """usage.completion_tokens_details.reasoning_tokens (OpenAI's field), when the server gives it."""
    details = usage.get("completion_tokens_details") if isinstance(usage, dict) else None
    value = details.get("reasoning_tokens") if isinstance(details, dict) else None
    return value if isinstance(value, int) and not isinstance(value, bool) else None


# ----------------------------------------------------------------------------------------------------
# Rendering for the student.


def plain_trace(reasoning: str, answer: str, trace_format: str = DEFAULT_TRACE_FORMAT) -> str:
    return trace_format.format(reasoning=reasoning, answer=answer)


def takes_reasoning_content(tokenizer) -> bool:
    """Whether the model's chat template renders an assistant message's `reasoning_content`."""
    return chat.has_template(tokenizer) and _renders_reasoning_content(tokenizer.chat_template, tokenizer)


_PROBE = "distillab-reasoning-probe"
_probed: dict[str, bool] = {}  # chat template -> whether it renders reasoning_content: asked once a template


def _renders_reasoning_content(template: str, tokenizer) -> bool:
    if template not in _probed:
        probe = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a", "reasoning_content": _PROBE}]
        try:
            _probed[template] = _PROBE in tokenizer.apply_chat_template(probe, tokenize=False)
        except Exception:  # a template that refuses the probe renders no reasoning_content either
            _probed[template] = False
    return _probed[template]


def encode(
    tokenizer, turns: list[dict], reasoning: str | None, answer: str, trace_format: str = DEFAULT_TRACE_FORMAT
) -> tuple[list[int], list[int]]:
    """(prompt_ids, completion_ids) of the conversation answered by trace + answer in the student's thinking format
    (module docstring); chat.encode of the answer when there is no trace."""
    if reasoning is None:
        return chat.encode(tokenizer, turns, answer)
    plain = plain_trace(reasoning, answer, trace_format)
    if not chat.has_template(tokenizer):
        return chat.encode(tokenizer, turns, plain)
    message = (
        {"role": "assistant", "content": answer, "reasoning_content": reasoning}
        if takes_reasoning_content(tokenizer)
        else {"role": "assistant", "content": plain}
    )
    asked, turn = chat.assistant_turn(tokenizer, turns, message)
    if turn is None or reasoning not in turn:  # the template rewrote the prompt, or dropped the trace
        opening = trace_format.split("{reasoning}")[0]
        opened = opening.strip() and asked.rstrip().endswith(opening.strip())
        turn = plain[len(opening) :] if opened else plain
    return chat.encode_turn(tokenizer, asked, turn)
