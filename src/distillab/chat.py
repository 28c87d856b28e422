"""Conversations: the one place chat messages are checked and rendered, for every stage.

A prompt is a conversation: a list of OpenAI-style turns {role, content} (a plain `prompt` is one user turn).
Each model renders it with **its own** chat template:

- render_prompt(tok, turns): the text a model is asked with: the template's rendering of the turns with the
  generation prompt (`<|im_start|>assistant\\n`), or, for a tokenizer without a template, the turns' contents
  joined by newlines (a one-turn conversation is exactly its prompt: the lab's ids never change). The teacher
  (local or served), evaluate and serve all ask with it; the student is trained on it.
- encode(tok, turns, completion): (prompt_ids, completion_ids) for training. prompt_ids are the ids of
  render_prompt (the tokenizer adds its BOS, as generation does); completion_ids are the assistant turn as the
  template writes it after that prompt (the completion, then the template's end-of-turn tokens) up to and
  including the first end-of-sequence token, or with one appended when the turn holds none (generation stops
  only there). Without a template: the completion's ids + end-of-sequence, as sampling.encode_example always
  did. The collator puts labels and KD only on completion_ids: no system, user or earlier-turn token ever
  carries loss.
- assistant_turn / encode_turn: the same for any assistant message (distillab.reasoning renders one with a
  reasoning trace through them: its `reasoning_content`, or its trace written into the content).
"""

from __future__ import annotations

import json

from distillab.errors import UserError

ROLES = ("system", "developer", "user", "assistant", "tool")


class TemplateRefused(UserError):
    """A model's chat template raised on these messages (roles out of order, a role it does not know, ...)."""


def check_messages(value, where: str, field: str = "messages") -> list[dict]:
    """An OpenAI `messages` value (a list, or that list as JSON text) -> [{role, content}] with string contents.

    Content parts keep their text parts; a tool turn is kept as text; an assistant turn's tool_calls are kept as
    their JSON text after its content. Anything else is a one-line UserError naming `where`.
    """
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as err:
            raise UserError(f'{where}: "{field}" is text but not JSON ({err.msg})') from None
    if not isinstance(value, list) or not value:
        raise UserError(f'{where}: "{field}" must be a non-empty list of {{role, content}} turns')
    turns = []
    for i, m in enumerate(value, 1):
        if not isinstance(m, dict) or m.get("role") not in ROLES:
            got = repr(m.get("role")) if isinstance(m, dict) else "not an object"
            raise UserError(f'{where}: turn {i} of "{field}": role must be one of {", ".join(ROLES)} (got {got})')
        content = text_content(m.get("content"))
        if content is not None and not isinstance(content, str):
            raise UserError(f'{where}: turn {i} of "{field}": content must be text')
        if m.get("tool_calls"):
            content = ((content or "") + "\n" + json.dumps(m["tool_calls"], ensure_ascii=False)).lstrip("\n")
        turns.append({"role": m["role"], "content": content or ""})
    return turns


def text_content(content):
    """Content parts -> their text parts joined (images and the like are dropped); anything else as it is."""
    if isinstance(content, list):
        return "".join(p.get("text") or "" for p in content if isinstance(p, dict) and p.get("type") == "text")
    return content


def split_conversation(turns: list[dict], where: str, field: str = "messages") -> tuple[list[dict], str | None]:
    """(the turns the teacher answers, the reference answer or None). A final assistant turn is the reference
    (a human-written answer); the turn before it, and otherwise the last turn, must be the user's."""
    answer = None
    if turns[-1]["role"] == "assistant":
        answer, turns = turns[-1]["content"], turns[:-1]
    if not turns or turns[-1]["role"] != "user":
        last = turns[-1]["role"] if turns else "nothing"
        raise UserError(
            f'{where}: "{field}" must end with a user turn (or a user turn then the assistant\'s '
            f"reference answer), not {last}"
        )
    return turns, answer


def as_turns(prompt: str | list[dict]) -> list[dict]:
    """A conversation as it is, a plain prompt as one user turn."""
    return [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt


def turns_of(record: dict) -> list[dict]:
    """The conversation of a prompt record, task example or dataset row: its `messages` (a list, or JSON text
    as rows store it), else its `prompt` as one user turn."""
    messages = record.get("messages")
    if messages:
        return json.loads(messages) if isinstance(messages, str) else messages
    return as_turns(record["prompt"])


def plain_text(turns: list[dict]) -> str:
    """The turns' contents joined by newlines: what a model without a chat template (and a completions
    endpoint) is given."""
    return "\n".join(t["content"] for t in turns)


def has_template(tokenizer) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def _apply(tokenizer, turns: list[dict], generation_prompt: bool) -> str:
    from jinja2 import TemplateError

    try:
        return tokenizer.apply_chat_template(turns, tokenize=False, add_generation_prompt=generation_prompt)
    except TemplateError as err:
        raise TemplateRefused(f"the model's chat template refused these messages: {err}") from None


def _without_bos(tokenizer, text: str) -> str:
    """Tokenizing adds BOS when the tokenizer does (as generation does); a template that writes it too would
    give two."""
    bos = tokenizer.bos_token
    if bos and text.startswith(bos) and tokenizer("")["input_ids"][:1] == [tokenizer.bos_token_id]:
        return text[len(bos) :]
    return text


def render_prompt(tokenizer, turns: list[dict]) -> str:
    """The text a model is asked with (module docstring)."""
    if not has_template(tokenizer):
        return plain_text(turns)
    return _without_bos(tokenizer, _apply(tokenizer, turns, True))


def prompt_ids(tokenizer, turns: list[dict]) -> list[int]:
    return tokenizer(render_prompt(tokenizer, turns))["input_ids"]


def encode(tokenizer, turns: list[dict], completion: str) -> tuple[list[int], list[int]]:
    """(prompt_ids, completion_ids) of the conversation answered by `completion` (module docstring)."""
    if not has_template(tokenizer):  # the lab's models: the plain encoding every stage uses
        from distillab.sampling import encode_example

        return encode_example(tokenizer, plain_text(turns), completion)
    # A template that rewrites earlier turns when one is added falls back to the bare completion.
    asked, turn = assistant_turn(tokenizer, turns, {"role": "assistant", "content": completion})
    return encode_turn(tokenizer, asked, completion if turn is None else turn)


def assistant_turn(tokenizer, turns: list[dict], message: dict) -> tuple[str, str | None]:
    """(the prompt text with the generation prompt, the assistant `message` as the template writes it after that
    prompt), or (prompt, None) when the template rewrites the earlier turns once the message is added (the prompt is
    then no prefix of the whole). For a tokenizer with a chat template."""
    asked = _apply(tokenizer, turns, True)
    whole = _apply(tokenizer, turns + [message], False)
    return asked, whole[len(asked) :] if whole.startswith(asked) else None


def encode_turn(tokenizer, asked: str, turn: str) -> tuple[list[int], list[int]]:
    """(prompt_ids of the prompt text `asked`, completion_ids of the assistant turn's text `turn`) for a tokenizer with
    a chat template: the turn's ids up to and including the first end-of-sequence, or with one appended."""
    eos = tokenizer.eos_token_id
    ids = tokenizer(turn, add_special_tokens=False)["input_ids"]
    ids = ids[: ids.index(eos) + 1] if eos in ids else ids + [eos]  # nothing after end-of-sequence is generated
    return tokenizer(_without_bos(tokenizer, asked))["input_ids"], ids
