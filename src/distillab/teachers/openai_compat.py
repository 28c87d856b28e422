"""A teacher behind an OpenAI-compatible endpoint (OpenAI, vLLM, `distillab serve`, ...), on the official
`openai` SDK (AsyncOpenAI).

- Concurrency: `teacher.concurrency` workers per endpoint share one lazily read stream of requests; their
  results go through a queue to on_done, called from one place, in order of completion.
- Many endpoints (`base_url` a list, replicas of one model): each request goes to the endpoint with the fewest
  outstanding requests. An endpoint that fails a request with a retryable error is backed off (Retry-After,
  else exponential in its consecutive failures), then probed with one request at a time; the request moves
  at once to another endpoint that is up, without using one of its retries (only waits count as retries).
  Keys: with a list, a request is keyed on model + sampling + prompt only, not the URL, so whichever replica
  answers, the cache holds one entry; with one URL (a string) the URL is in the key.
  `endpoint_stats` counts answered requests, errors and tokens per endpoint for generate's summary.
- Retries are ours, not the SDK's (max_retries=0 there), so the attempt counts in the cache are true:
  408 / 409 / 425 / 429 / 5xx, timeouts, dropped connections and unparsable bodies are retried up to
  `teacher.max_retries` times with exponential backoff and jitter; a Retry-After (or retry-after-ms) header
  is honoured instead, up to MAX_RETRY_AFTER_S (a longer ask is logged once per endpoint and waited only that
  long). Every other 4xx is the server refusing the request itself (a prompt over its
  context, a bad parameter, a wrong key): the same request would be refused again, so it fails at once, sent
  once. A request that fails for good is reported to on_done with its error, never dropped; for an HTTP error
  that error text carries the status and the server's own message (`describe_error`).
- Deadlines: `teacher.timeout_s` bounds one attempt, the whole response included (httpx's own timeouts are per
  read, so a body dripped a byte at a time would pass them); `teacher.request_deadline_s` (default timeout_s x
  (max_retries + 1)) bounds a request with its retries and waits: a retry that would end past it is not made.
- The endpoint is untrusted input: a 200 whose logprobs are not finite numbers <= 0, whose top-k is not a
  distribution (duplicate ids, mass over 1, a row per token) or whose usage is not a whole count >= 0 (a
  numeric string is read as its number) is a MalformedResponse: retried like a 5xx and, failed for good,
  reported with the endpoint, never passed on to be cached or paid for. The prompt tokens the endpoint's prompt
  cache served (usage.prompt_tokens_details.cached_tokens: at most prompt_tokens) are the response's
  `cached_tokens`, billed at the cached rate (distillab.pricing).
- Logprobs: with `top_k_logprobs` > 0 we ask for them, and for vLLM's `return_tokens_as_token_ids`, which
  makes every token string "token_id:<id>": exact ids. A server that refuses that field (a 400 naming it)
  is asked again without it, and then token *strings* come back as `top_tokens`, mapped onto the student's
  tokenizer later by `map_top_tokens`. Ids in the teacher's own vocabulary are read with its tokenizer, which
  `fetch_tokenizer` gets from an endpoint that offers it (GET /tokenizer: `distillab serve` does).
- Requests go through the SDK's documented raw path (`client.post(path, cast_to=bytes)`) and the JSON is
  read here: same client, auth, timeouts and exceptions, without the typed request/response objects.
- Each request carries `Idempotency-Key: <request hash>`: a server that honours it (distillab serve does)
  answers a request re-sent after a crash or timeout without computing it again.
- The API key is read from the environment variable `teacher.api_key_env` names, only when a request is
  about to be sent; it is never put in a request dict, a response, an error message or a log line.
"""

from __future__ import annotations

import asyncio
import email.utils
import itertools
import json
import logging
import math
import os
import random
import time

import httpx
import openai

from distillab import reasoning
from distillab.cache import request_key
from distillab.errors import UserError

TOKEN_ID_PREFIX = "token_id:"
# and every 5xx. 425 Too Early asks for the same request later (RFC 8470), like 429 and 408.
RETRY_STATUSES = {408, 409, 425, 429}
MAX_RETRY_AFTER_S = 60.0  # a server asking for longer is waited this long (and the request deadline still holds)
LOGPROB_ROUNDOFF = 1e-6  # a logprob this far above 0 is round-off of log 1; further is no probability
TOPK_MASS_ROUNDOFF = 1e-2  # top-k probabilities summing past 1 + this are no distribution
MAX_USAGE_TOKENS = 10**9  # more tokens than this in one request's usage is no real count

log = logging.getLogger("distillab.teacher")


class MalformedResponse(ValueError):
    """The server answered 200 with something that is not a usable completion (retried like a 5xx)."""


class OpenAITeacher:
    def __init__(self, cfg, backoff_base_s: float = 0.5, backoff_max_s: float = 30.0):
        if not cfg.base_url:
            raise UserError("teacher.base_url is not set: the OpenAI-compatible teacher needs an endpoint")
        self.cfg = cfg
        self.teacher_id = cfg.model
        self.urls = [u.rstrip("/") for u in cfg.urls]
        self.keyed_on_url = isinstance(cfg.base_url, str)  # a list: replicas, keyed without the URL
        self.endpoint = self.urls[0] if self.keyed_on_url else ",".join(sorted(self.urls))
        self.endpoint_stats = {
            u: {"answered": 0, "errors": 0, "prompt_tokens": 0, "completion_tokens": 0} for u in self.urls
        }
        self.backoff_base_s, self.backoff_max_s = backoff_base_s, backoff_max_s
        self.deadline_s = cfg.request_deadline_s or cfg.timeout_s * (cfg.max_retries + 1)
        self._told_retry_after: set[str] = set()  # endpoints whose over-long Retry-After was logged
        self._ask_token_ids = True  # until the server refuses return_tokens_as_token_ids

    # -- the Teacher protocol ------------------------------------------------------------------------

    def request(self, prompt: str, sample: int = 0, messages: list[dict] | None = None) -> dict:
        """The canonical request: everything that decides the answer, nothing secret. The URL only when the
        teacher is one endpoint (module docstring); "sample" from the second sample of a prompt on.
        messages (a conversation): chat mode sends them as given; completions mode sends `prompt`, the
        conversation's plain text (chat.plain_text: the server applies no template to a completion)."""
        c = self.cfg
        req = {
            "model": c.model,
            "mode": c.mode,
            "max_tokens": c.max_new_tokens,
            "temperature": c.temperature,
            "top_p": c.top_p,
            "logprobs": c.top_k_logprobs,
        }
        if self.keyed_on_url:
            req["endpoint"] = self.endpoint
        if sample:  # sample 0 has the key of samples_per_prompt = 1: those cached answers are reused
            req["sample"] = sample
        if c.mode == "chat":
            req["messages"] = messages or [{"role": "user", "content": prompt}]
        else:
            req["prompt"] = prompt
        return req

    def answer(self, requests, on_done) -> None:
        asyncio.run(self.answer_async(requests, on_done))

    async def answer_async(self, requests, on_done) -> None:
        """Send the requests (any iterable, read only as workers free up), `concurrency` per endpoint at a time;
        on_done once per request as it finishes.

        An exception raised by on_done (the budget guard) or by the request stream stops everything: workers
        are cancelled and the exception propagates. What was already passed to on_done stays committed.
        """
        key = self._api_key()
        endpoints = [
            _Endpoint(
                url,
                openai.AsyncOpenAI(base_url=url, api_key=key or "none", max_retries=0, timeout=self.cfg.timeout_s),
                self.endpoint_stats[url],
            )
            for url in self.urls
        ]
        pending = iter(requests)  # shared by the workers: each request is taken exactly once
        finished: asyncio.Queue = asyncio.Queue()
        n_workers = self.cfg.concurrency * len(endpoints)

        async def worker():
            try:
                for req in pending:
                    finished.put_nowait((req, *await self._ask(endpoints, req, key)))
            except Exception as err:  # the stream failed: report() raises it
                finished.put_nowait(err)
            finally:
                finished.put_nowait(None)

        async def report():
            # on_done (the caller's commit) runs here, after the workers have sent their next requests:
            # a batching server then sees them together, instead of one commit apart.
            live = n_workers
            while live:
                item = await finished.get()
                if item is None:
                    live -= 1
                elif isinstance(item, Exception):
                    raise item
                else:
                    on_done(*item)

        workers = [asyncio.create_task(worker()) for _ in range(n_workers)]
        try:
            await report()
        finally:
            for w in workers:
                w.cancel()
            await asyncio.gather(*workers, return_exceptions=True)
            for e in endpoints:
                await e.client.close()

    # -- one request, with retries, over the endpoints -----------------------------------------------

    async def _ask(self, endpoints: list[_Endpoint], req: dict, key: str | None):
        """(response or None, error or None, latency_s, attempts)."""
        began = time.monotonic()
        deadline = began + self.deadline_s
        attempt = retries = 0
        while True:
            ep = await self._pick(endpoints)
            attempt += 1
            asked_ids = self._ask_token_ids  # other requests may turn it off while this one is out
            ep.outstanding += 1
            try:
                raw = await self._call(ep, req, min(self.cfg.timeout_s, deadline - time.monotonic()))
                resp = parse_response(raw, req, self.cfg.think_tags)
            except openai.BadRequestError as err:
                if asked_ids and "return_tokens_as_token_ids" in str(err):
                    self._ask_token_ids = False  # a server without vLLM's extension: ask again, not counted
                    attempt -= 1
                    continue
                ep.stats["errors"] += 1
                return None, self._describe(err, key, ep, endpoints), time.monotonic() - began, attempt
            except Exception as err:
                ep.stats["errors"] += 1
                if not _retryable(err):
                    return None, self._describe(err, key, ep, endpoints), time.monotonic() - began, attempt
                if time.monotonic() >= deadline:
                    return None, self._past_deadline(err, key, ep, endpoints), time.monotonic() - began, attempt
                if len(endpoints) > 1:
                    ep.failures += 1
                    ep.down_until = time.monotonic() + self._wait_s(err, ep.failures, ep.url)
                    if any(e.is_up() for e in endpoints):
                        continue  # moved to an endpoint that is up: not a retry of this request
                retries += 1
                if retries > self.cfg.max_retries:
                    return None, self._describe(err, key, ep, endpoints), time.monotonic() - began, attempt
                # the retry could not end in time (one endpoint: after its wait; several: once the first is up
                # again, _pick waiting until then): fail now, not then
                wait = self._wait_s(err, retries, ep.url) if len(endpoints) == 1 else None
                up_at = time.monotonic() + wait if wait is not None else min(e.down_until for e in endpoints)
                if up_at >= deadline:
                    return None, self._past_deadline(err, key, ep, endpoints), time.monotonic() - began, attempt
                if wait is not None:
                    await asyncio.sleep(wait)
            else:
                ep.failures = 0
                ep.stats["answered"] += 1
                ep.stats["prompt_tokens"] += resp["prompt_tokens"]
                ep.stats["completion_tokens"] += resp["completion_tokens"]
                resp["served_by"] = ep.url
                return resp, None, time.monotonic() - began, attempt
            finally:
                ep.outstanding -= 1

    @staticmethod
    async def _pick(endpoints: list[_Endpoint]) -> _Endpoint:
        """The endpoint that is up with the fewest outstanding requests (the first on a tie); waits while none is."""
        while True:
            up = [e for e in endpoints if e.is_up()]
            if up:
                return min(up, key=lambda e: e.outstanding)
            wake = (
                min(e.down_until for e in endpoints if e.down_until > time.monotonic())
                if any(e.down_until > time.monotonic() for e in endpoints)
                else time.monotonic() + 0.01
            )
            await asyncio.sleep(max(0.0, wake - time.monotonic()) + 0.001)

    @staticmethod
    def _describe(err: Exception, key: str | None, ep: _Endpoint, endpoints: list) -> str:
        text = describe_error(err, key)
        # a response refused here names its endpoint even when there is one: the problem is that server's
        return text if len(endpoints) == 1 and not isinstance(err, MalformedResponse) else f"{text} [at {ep.url}]"

    def _past_deadline(self, err: Exception, key: str | None, ep: _Endpoint, endpoints: list) -> str:
        return (
            f"{self._describe(err, key, ep, endpoints)} (not retried: past the request's deadline of "
            f"{self.deadline_s:g}s, teacher.request_deadline_s)"
        )

    async def _call(self, ep: _Endpoint, req: dict, timeout_s: float) -> dict:
        """One HTTP request through the SDK's documented raw path (`client.post(path, cast_to=...)`): the
        client's auth, base_url and error types, without building typed request and response objects, which
        cost more CPU than everything else a request does here. timeout_s bounds the whole of it (module
        docstring): past it, the request is an APITimeoutError like the client's own timeouts."""
        path, body = self.body(req)
        sent = ep.client.post(
            path, cast_to=bytes, body=body, options={"headers": {"Idempotency-Key": request_key(req)}}
        )
        try:
            raw = await asyncio.wait_for(sent, timeout=max(timeout_s, 0.0))
        except TimeoutError:
            raise openai.APITimeoutError(request=httpx.Request("POST", ep.url + path)) from None
        return json.loads(raw)  # a truncated body raises JSONDecodeError here: retried

    def body(self, req: dict) -> tuple[str, dict]:
        """(the path under base_url, the JSON body) of a canonical request: what _call posts, and what a Batch API
        line holds (distillab.teachers.batch)."""
        k = req["logprobs"]
        body = {"model": req["model"], "temperature": req["temperature"], "top_p": req["top_p"]}
        if req["mode"] == "chat":
            path = "/chat/completions"
            body.update(messages=req["messages"], max_completion_tokens=req["max_tokens"])
            if k:
                body.update(logprobs=True, top_logprobs=k)
        else:
            path = "/completions"
            body.update(prompt=req["prompt"], max_tokens=req["max_tokens"])
            if k:
                body["logprobs"] = k
        if k and self._ask_token_ids:
            body["return_tokens_as_token_ids"] = True
        return path, body

    def _wait_s(self, err: Exception, attempt: int, url: str) -> float:
        """Retry-After when the server sent one, up to MAX_RETRY_AFTER_S (plus up to 10% jitter), else
        exponential backoff with jitter."""
        retry_after = _retry_after_s(err)
        if retry_after is not None:
            if retry_after > MAX_RETRY_AFTER_S and url not in self._told_retry_after:
                self._told_retry_after.add(url)
                log.warning(
                    "%s asks to retry after %.0fs: waiting %.0fs at most (and %gs a request in all)",
                    url,
                    retry_after,
                    MAX_RETRY_AFTER_S,
                    self.deadline_s,
                )
            return min(retry_after, MAX_RETRY_AFTER_S) * (1 + 0.1 * random.random())
        ceiling = min(self.backoff_max_s, self.backoff_base_s * 2 ** (attempt - 1))
        return ceiling / 2 + random.uniform(0, ceiling / 2)  # "equal jitter": spread out, never ~0

    def _api_key(self) -> str | None:
        name = self.cfg.api_key_env
        if not name:
            return None
        key = os.environ.get(name)
        if not key:
            raise UserError(f"environment variable {name} (teacher.api_key_env) is not set")
        return key


class _Endpoint:
    """One endpoint of the list: its client, requests outstanding, consecutive failures and back-off."""

    def __init__(self, url: str, client, stats: dict):
        self.url, self.client, self.stats = url, client, stats
        self.outstanding = self.failures = 0
        self.down_until = 0.0

    def is_up(self) -> bool:
        # after a back-off, one probe at a time until a request succeeds there again
        return time.monotonic() >= self.down_until and (self.failures == 0 or self.outstanding == 0)


def _retryable(err: Exception) -> bool:
    """Whether sending the same request again may succeed (module docstring)."""
    if isinstance(err, openai.APIStatusError):
        return retryable_status(err.status_code)
    # Timeouts and dropped connections (APIConnectionError), and bodies that do not parse or hold no
    # completion (JSONDecodeError, MalformedResponse: both ValueErrors).
    return isinstance(err, (openai.APIConnectionError, openai.APIResponseValidationError, ValueError))


def retryable_status(status: int) -> bool:
    """Whether an HTTP status asks for the same request again (module docstring): 408/409/425/429 and every 5xx."""
    return status in RETRY_STATUSES or status >= 500


def _retry_after_s(err: Exception) -> float | None:
    response = getattr(err, "response", None)
    if response is None:
        return None
    headers = response.headers
    for name, scale in (("retry-after-ms", 1000.0), ("retry-after", 1.0)):
        value = headers.get(name)
        if value is None:
            continue
        try:
            seconds = float(value) / scale
        except ValueError:
            when = email.utils.parsedate_to_datetime(value) if name == "retry-after" else None
            seconds = when.timestamp() - time.time() if when else math.nan
        if math.isfinite(seconds) and seconds >= 0:
            return seconds  # as asked: _wait_s caps it
    return None


def describe_error(err: Exception, key: str | None = None) -> str:
    """One line for the failures table and generate's summary, with the key scrubbed should a server echo it.

    An HTTP error reads "BadRequestError: HTTP 400 (not retried): <the server's message>": the message from
    the body's error.message (OpenAI), message (vLLM), detail (FastAPI), or the body's text, since the SDK's
    own str() keeps only error.message and drops the rest. Other errors: "<type>: <str(err)>".
    """
    if isinstance(err, openai.APIStatusError):
        status = f"HTTP {err.status_code}" + ("" if _retryable(err) else " (not retried)")
        text = f"{type(err).__name__}: {status}: {server_message(err.body) or err.message}"
    else:
        text = f"{type(err).__name__}: {err}"
    text = " ".join(text.split())[:400]
    return text.replace(key, "***") if key else text


def server_message(body) -> str | None:
    """What the server said in its error body (an HTTP error's, a Batch API line's), whatever the dialect."""
    if isinstance(body, dict):
        inner = body.get("error", body)
        if isinstance(inner, str):
            return inner
        for field in ("message", "detail"):
            value = inner.get(field) if isinstance(inner, dict) else None
            if value:
                return value if isinstance(value, str) else json.dumps(value)
        return json.dumps(body)
    return body if isinstance(body, str) and body else None


# ----------------------------------------------------------------------------------------------------
# Responses: JSON bodies -> the teacher response dict (see distillab.teachers).


def parse_response(raw: dict, req: dict, think_tags=()) -> dict:
    """A completions or chat completions JSON body -> the teacher response dict, its reasoning trace (a chat
    message's separate field, or inline between think_tags) cut off its answer by reasoning.capture.
    MalformedResponse for a body that is no completion or not a sane one (module docstring)."""
    try:
        return _parse(raw, req, think_tags)
    except MalformedResponse:
        raise
    except (AttributeError, IndexError, KeyError, TypeError, ValueError) as err:  # a field of the wrong shape
        raise MalformedResponse(f"response has an unexpected shape ({type(err).__name__}: {err})") from None


def _parse(raw: dict, req: dict, think_tags) -> dict:
    choices = raw.get("choices") if isinstance(raw, dict) else None
    if not choices:
        raise MalformedResponse("response has no choices")
    choice = choices[0]
    k = req["logprobs"]
    tokens = tops = offsets = trace = None
    if req["mode"] == "chat":
        message = choice.get("message") or {}
        text, trace = message.get("content") or "", reasoning.field_reasoning(message)
        entries = (choice.get("logprobs") or {}).get("content") if k else None
        if entries:
            tokens = [e["token"] for e in entries]
            tops = [[(t["token"], _logprob(t["logprob"])) for t in e.get("top_logprobs") or []] for e in entries]
    else:
        text = choice.get("text") or ""
        lp = choice.get("logprobs") if k else None
        if lp and lp.get("tokens"):
            tokens, offsets = lp["tokens"], lp.get("text_offset")
            rows = lp.get("top_logprobs") or [{} for _ in tokens]
            tops = [[(s, _logprob(v)) for s, v in (t or {}).items()] for t in rows]
    if tokens:
        _check_topk(tokens, tops)
    usage = _usage(raw.get("usage"))
    resp = {
        "text": text,
        "finish_reason": choice.get("finish_reason") or "stop",
        "prompt_tokens": usage.get("prompt_tokens", 0),
        "completion_tokens": usage.get("completion_tokens", len(tokens or [])),
        **({"cached_tokens": usage["cached_tokens"]} if usage.get("cached_tokens") else {}),
        "token_ids": None,
        "top_ids": None,
        "top_logprobs": None,
        "top_tokens": None,
        "tokens": None,
    }
    if tokens:
        tops = [sorted(t, key=lambda x: -x[1])[:k] for t in tops]
        if all(s.startswith(TOKEN_ID_PREFIX) for s in tokens):
            resp["token_ids"] = [int(s[len(TOKEN_ID_PREFIX) :]) for s in tokens]
            ids = [[int(s[len(TOKEN_ID_PREFIX) :]) for s, _ in t] for t in tops]
            if min(resp["token_ids"] + [i for row in ids for i in row], default=0) < 0:
                raise MalformedResponse("a negative token id")
            if any(len(set(row)) < len(row) for row in ids):
                raise MalformedResponse("a top-k row names one token id twice")
            resp["top_ids"], resp["top_logprobs"] = pad_topk(ids, [[lp for _, lp in t] for t in tops], k)
        else:
            resp["tokens"] = tokens
            resp["top_tokens"] = [[s for s, _ in t] for t in tops]
            resp["top_logprobs"] = [[lp for _, lp in t] for t in tops]
    if trace:
        resp["reasoning"] = trace
    return reasoning.capture(
        resp,
        think_tags,
        usage_count=reasoning.usage_reasoning_tokens(usage),
        prefix_len=_prefix_len(text, resp["tokens"], offsets, len(tokens or [])),
        n_tokens=len(tokens or []),
    )


def _logprob(value) -> float:
    """A logprob as the server gave it -> a float; MalformedResponse unless it is a finite number <= 0."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise MalformedResponse(f"a logprob is not a number ({value!r:.40})")
    if not math.isfinite(value) or value > LOGPROB_ROUNDOFF:
        raise MalformedResponse(f"a logprob of {value} (logprobs are finite and at most 0)")
    return float(value)


def _check_topk(tokens: list, tops: list[list[tuple]]) -> None:
    """One top-k row per completion token, whose probabilities sum to at most 1. (Token *strings* may repeat
    in a row, two byte tokens read as one string: map_top_tokens merges them; ids are checked distinct.)"""
    if len(tops) != len(tokens):
        raise MalformedResponse(f"{len(tokens)} completion tokens but {len(tops)} top-k rows")
    for t, row in enumerate(tops):
        mass = math.fsum(math.exp(lp) for _, lp in row)
        if mass > 1 + TOPK_MASS_ROUNDOFF:
            raise MalformedResponse(f"token {t}: the top-k probabilities sum to {mass:.3g}, over 1")


def _usage(usage) -> dict:
    """The body's usage with its counts as ints (a numeric string read as its number; missing ones left out), and
    `cached_tokens` from prompt_tokens_details; MalformedResponse for a count that is not a whole number in
    [0, MAX_USAGE_TOKENS], or cached tokens over the prompt's: a bill it cannot be."""
    if usage is None:
        return {}
    if not isinstance(usage, dict):
        raise MalformedResponse(f"usage is not an object ({usage!r:.40})")
    out = dict(usage)
    for field in ("prompt_tokens", "completion_tokens"):
        if usage.get(field) is not None:
            out[field] = _token_count(usage[field], f"usage.{field}")
    cached = usage.get("prompt_tokens_details")
    if isinstance(cached, dict) and cached.get("cached_tokens") is not None:
        # prompt tokens the endpoint's prompt cache served (billed at the cached rate): part of prompt_tokens
        out["cached_tokens"] = _token_count(cached["cached_tokens"], "usage.prompt_tokens_details.cached_tokens")
        if out["cached_tokens"] > out.get("prompt_tokens", 0):
            raise MalformedResponse(
                f"usage.prompt_tokens_details.cached_tokens {out['cached_tokens']} is over prompt_tokens "
                f"{out.get('prompt_tokens', 0)}"
            )
    details = usage.get("completion_tokens_details")
    if isinstance(details, dict) and details.get("reasoning_tokens") is not None:
        count = _token_count(details["reasoning_tokens"], "usage.completion_tokens_details.reasoning_tokens")
        out["completion_tokens_details"] = details | {"reasoning_tokens": count}
    else:
        out.pop("completion_tokens_details", None)
    return out


def _token_count(value, name: str) -> int:
    number = value
    if isinstance(value, str):
        try:
            number = float(value.strip())
        except ValueError:
            raise MalformedResponse(f"{name} is not a number ({value!r:.40})") from None
    if isinstance(number, bool) or not isinstance(number, (int, float)):
        raise MalformedResponse(f"{name} is not a number ({value!r:.40})")
    if not (math.isfinite(number) and number == int(number) and 0 <= number <= MAX_USAGE_TOKENS):
        raise MalformedResponse(f"{name} of {value!r:.40} is no token count (a whole number from 0 up)")
    return int(number)


def _prefix_len(text: str, strings: list[str] | None, offsets: list[int] | None, n: int):
    """prefix_len(t) for reasoning.capture: the characters of the first t of the n completion tokens, from a
    completions response's text_offset, else from token strings that spell the text; None when neither is known."""
    if offsets and len(offsets) == n:
        return lambda t: len(text) if t >= n else offsets[t] - offsets[0]
    if strings and "".join(strings)[: len(text)] == text:
        ends = list(itertools.accumulate(map(len, strings), initial=0))
        return lambda t: ends[t]
    return None


def pad_topk(ids: list[list[int]], logprobs: list[list[float]], k: int) -> tuple[list[list[int]], list[list[float]]]:
    """Every position gets exactly k distinct ids (the training collator and the top-k codec need a
    rectangle): missing entries are filled with the smallest ids not already there, at logprob -inf
    (no mass; the losses' tail bucket stays exactly what the teacher left)."""
    out_ids, out_lps = [], []
    for row_ids, row_lps in zip(ids, logprobs):
        row_ids, row_lps = list(row_ids[:k]), list(row_lps[:k])
        taken, filler = set(row_ids), 0
        while len(row_ids) < k:
            while filler in taken:
                filler += 1
            row_ids.append(filler)
            row_lps.append(float("-inf"))
            taken.add(filler)
        out_ids.append(row_ids)
        out_lps.append(row_lps)
    return out_ids, out_lps


def map_top_tokens(resp: dict, tokenizer, aligner=None) -> tuple[list | None, list | None, list[int]]:
    """Token strings (a server that gives no ids) -> (top_ids, top_logprobs, completion_ids) in the student's vocab.

    The mapping:
    - a string maps to a student id when the student's tokenizer encodes it as exactly one token (special
      tokens included, e.g. "<eos>"); otherwise it does not map;
    - the sampled tokens must all map and decode back to the response text: then completion_ids are those
      ids, position for position with the teacher's top-k. If not, the positions cannot be aligned, so
      completion_ids are the student's tokenization of the text and there is no top-k (None, None);
    - at each position, alternatives that do not map are dropped (their mass joins the loss's tail bucket),
      alternatives that map to the same id are merged (probabilities added), and the row is padded to k
      distinct ids at -inf (see pad_topk);
    - when the teacher stopped (finish_reason "stop") and the last token is not end-of-sequence, an
      end-of-sequence token is appended. The teacher's distribution there is unknown, so it is recorded as
      certain (logprob 0 for end-of-sequence): the student learns to stop where the teacher did.
    When the sampled tokens do not map one to one (another tokenizer) and an aligner (crosstok.Aligner) is given,
    the top-k is aligned onto the student's tokenization of the text by spans instead (distillab.crosstok): rows
    of at most k ids, None at the student positions that get no teacher distribution.
    """
    eos = tokenizer.eos_token_id
    text_ids = tokenizer(resp["text"], add_special_tokens=False)["input_ids"] + [eos]
    tokens = resp.get("tokens")
    if not tokens or resp.get("top_tokens") is None:
        return None, None, text_ids
    lookup: dict[str, int | None] = {}

    def to_id(s: str) -> int | None:
        if s not in lookup:
            ids = tokenizer(s, add_special_tokens=False)["input_ids"] if s else []
            lookup[s] = ids[0] if len(ids) == 1 else None
        return lookup[s]

    sampled = [to_id(s) for s in tokens]
    if None in sampled or tokenizer.decode(sampled, skip_special_tokens=True) != resp["text"]:
        aligned = aligner.from_strings(resp, text_ids) if aligner is not None else None
        if aligned is None:
            return None, None, text_ids
        return (
            [ids if keep else None for ids, keep in zip(aligned.ids, aligned.mask)],
            [lps if keep else None for lps, keep in zip(aligned.logprobs, aligned.mask)],
            text_ids,
        )
    k = max((len(t) for t in resp["top_tokens"]), default=0)
    top_ids, top_lps = [], []
    for strings, lps in zip(resp["top_tokens"], resp["top_logprobs"]):
        merged: dict[int, float] = {}
        for s, lp in zip(strings, lps):
            i = to_id(s)
            if i is not None:
                merged[i] = lp if i not in merged else float(_logaddexp(merged[i], lp))
        ranked = sorted(merged.items(), key=lambda x: -x[1])
        top_ids.append([i for i, _ in ranked])
        top_lps.append([lp for _, lp in ranked])
    if resp.get("finish_reason") == "stop" and sampled[-1] != eos:
        sampled.append(eos)
        top_ids.append([eos])
        top_lps.append([0.0])
    top_ids, top_lps = pad_topk(top_ids, top_lps, max(k, 1))
    return top_ids, top_lps, sampled


def _logaddexp(a: float, b: float) -> float:
    hi, lo = max(a, b), min(a, b)
    return hi if lo == float("-inf") else hi + math.log1p(math.exp(lo - hi))


# ----------------------------------------------------------------------------------------------------
# The endpoint's tokenizer: to read the token ids it returns (distillab serve offers it at /tokenizer).


def fetch_tokenizer(teacher: OpenAITeacher, into) -> str | None:
    """The served model's tokenizer files (GET {base_url}/tokenizer lists them, GET {base_url}/tokenizer/{name} gives
    each; `distillab serve` offers them) written into the directory `into`, whole or not at all: the URL they came
    from, or None when no endpoint offers them (an HTTP error, a listing that is no list of plain file names) or the
    key's environment variable is unset. The endpoint is untrusted: a name with a path in it is refused."""
    from pathlib import Path

    from distillab.files import atomic_dir

    try:
        key = teacher._api_key()
    except UserError:
        return None
    for url in teacher.urls:
        client = openai.OpenAI(base_url=url, api_key=key or "none", max_retries=0, timeout=teacher.cfg.timeout_s)
        try:
            names = json.loads(client.get("/tokenizer", cast_to=bytes))["files"]
            if not names or not all(isinstance(n, str) and n == Path(n).name and n[:1] not in ("", ".") for n in names):
                continue
            files = {name: client.get(f"/tokenizer/{name}", cast_to=bytes) for name in names}
        except (openai.OpenAIError, ValueError, KeyError, TypeError):  # no such route, or not the listing it should be
            continue
        finally:
            client.close()
        with atomic_dir(Path(into), tag=f"tmp{os.getpid()}") as tmp:  # shard processes may fetch side by side
            tmp.mkdir(parents=True)
            for name, data in files.items():
                (tmp / name).write_bytes(data)
        return url
    return None
