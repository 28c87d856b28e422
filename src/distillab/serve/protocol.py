"""OpenAI's wire format as serve speaks it: the request schemas, the JSON error object, and the pieces of a
response (token strings, stop strings, legacy and chat logprobs, usage, the encoded body)."""

from __future__ import annotations

import json

from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field

from distillab.sampling import Generation

# ----------------------------------------------------------------------------------------------------
# Request schemas. Unknown fields are ignored (clients send many we do not use), known ones are checked.


class BaseRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")
    model: str
    max_tokens: int | None = Field(None, ge=0)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    n: int = 1
    stream: bool = False
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=-(1 << 63), lt=1 << 64)  # what torch.manual_seed takes
    return_tokens_as_token_ids: bool = False


class CompletionRequest(BaseRequest):
    prompt: str | list[str] | list[int] | list[list[int]]
    logprobs: int | None = Field(None, ge=0, le=20)
    echo: bool = False


class ContentPart(BaseModel):
    model_config = ConfigDict(extra="ignore")
    type: str | None = None
    text: str | None = None  # only "text" parts are read; image parts and the like are ignored


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: str
    content: str | list[ContentPart] | None = None


class ChatRequest(BaseRequest):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=0)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)


def stop_strings(req: BaseRequest) -> list[str]:
    return [req.stop] if isinstance(req.stop, str) else (req.stop or [])


class APIError(Exception):
    """An error answered as OpenAI's JSON error object."""

    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", param: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param = status, message, type_, param

    def response(self) -> JSONResponse:
        return JSONResponse(
            {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.status}},
            status_code=self.status,
        )


# ----------------------------------------------------------------------------------------------------
# Turning model output into OpenAI's response shapes.


class TokenStrings:
    """Token strings as clients see them: the decoded text of each token, or "token_id:<id>" when asked.

    `cache` (token id -> (its string, the length of its text without special tokens)) may be shared between
    requests: a token decoded alone reads the same every time, and a response with top-20 logprobs asks for
    hundreds of thousands of them."""

    def __init__(self, tokenizer, as_ids: bool, cache: dict | None = None):
        self.tokenizer, self.as_ids = tokenizer, as_ids
        self.cache = {} if cache is None else cache

    def _piece(self, token_id: int) -> tuple[str, int]:
        piece = self.cache.get(token_id)
        if piece is None:
            piece = self.cache[token_id] = (
                self.tokenizer.decode([token_id]),
                len(self.tokenizer.decode([token_id], skip_special_tokens=True)),
            )
        return piece

    def __call__(self, token_id: int) -> str:
        return f"token_id:{token_id}" if self.as_ids else self._piece(token_id)[0]

    def text_len(self, token_id: int) -> int:
        """Characters the token adds to the text (special tokens add none): for text_offset."""
        return self._piece(token_id)[1]


def apply_stop(gen: Generation, stops: list[str], tokenizer) -> Generation:
    """Cut the completion before the first stop string; keep only tokens wholly before it."""
    cuts = [i for i in (gen.text.find(s) for s in stops if s) if i >= 0]
    if not cuts:
        return gen
    cut = min(cuts)
    n = 0
    while n < len(gen.token_ids) and len(tokenizer.decode(gen.token_ids[: n + 1], skip_special_tokens=True)) <= cut:
        n += 1
    return Generation(
        text=gen.text[:cut],
        token_ids=gen.token_ids[:n],
        prompt_tokens=gen.prompt_tokens,
        finish_reason="stop",
        top_ids=gen.top_ids[:n],
        top_logprobs=gen.top_logprobs[:n],
        token_logprobs=gen.token_logprobs[:n],
    )


def choice_logprobs(prompt_ids, score, gen: Generation, k: int, tok: TokenStrings, prompt_text: str) -> dict:
    """Legacy logprobs for one choice: the prompt's tokens first when echoed (score given), then the completion's."""
    ids, lps, tids, tlps = [], [], [], []
    offset = 0
    if score is not None:
        ids += prompt_ids
        lps += [None] + score["token_logprobs"]
        tids += [None] + score["top_ids"]
        tlps += [None] + score["top_logprobs"]
    else:
        offset = len(prompt_text)  # text_offset counts from the start of the prompt, as OpenAI's does
    ids += gen.token_ids
    lps += gen.token_logprobs
    tids += gen.top_ids or [[] for _ in gen.token_ids]
    tlps += gen.top_logprobs or [[] for _ in gen.token_ids]
    return _legacy_logprobs(ids, lps, tids, tlps, k, tok, start_offset=offset)


def _legacy_logprobs(ids, token_lps, top_ids, top_lps, k, tok: TokenStrings, start_offset: int = 0) -> dict:
    """OpenAI's completions `logprobs`: tokens, token_logprobs, top_logprobs (dicts), text_offset."""
    offsets, pos = [], start_offset
    for i in ids:
        offsets.append(pos)
        pos += tok.text_len(i)
    tops = [
        None if ids_ is None else {tok(a): b for a, b in zip(ids_[:k], lps_[:k])}
        for ids_, lps_ in zip(top_ids, top_lps)
    ]
    return {"tokens": [tok(i) for i in ids], "token_logprobs": token_lps, "top_logprobs": tops, "text_offset": offsets}


def chat_logprobs(gen: Generation, k: int, tok: TokenStrings) -> dict:
    def entry(token_id, logprob):
        text = tok(token_id)
        return {"token": text, "logprob": logprob, "bytes": list(text.encode())}

    no_top = [[] for _ in gen.token_ids]  # logprobs without top_logprobs: generate() computed no top-k
    return {
        "content": [
            {**entry(i, lp), "top_logprobs": [entry(a, b) for a, b in zip(ids_[:k], lps_[:k])]}
            for i, lp, ids_, lps_ in zip(
                gen.token_ids, gen.token_logprobs, gen.top_ids or no_top, gen.top_logprobs or no_top
            )
        ]
    }


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def json_bytes(payload: dict) -> bytes:
    """The JSON JSONResponse would send (compact, UTF-8, NaN refused), with "choices" last and encoded one
    choice at a time: json.dumps holds the GIL until it returns, and one call over a 15 MB response would
    stall the event loop (and /health) for most of a second."""

    def dumps(obj) -> str:
        return json.dumps(obj, ensure_ascii=False, allow_nan=False, separators=(",", ":"))

    rest = {key: value for key, value in payload.items() if key != "choices"}
    if "choices" not in payload or not rest:
        return dumps(payload).encode("utf-8")
    choices = ",".join(dumps(choice) for choice in payload["choices"])
    return (dumps(rest)[:-1] + ',"choices":[' + choices + "]}").encode("utf-8")
