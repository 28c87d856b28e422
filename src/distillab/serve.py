"""An OpenAI-compatible server for any local HF causal LM: to serve a student, and to be a real teacher
endpoint in tests and benchmarks. `distillab serve MODEL` runs it; `create_app` builds the app.

    GET  /v1/models
    POST /v1/completions        prompt: str | [str] | [int] | [[int]]; logprobs (top-k, legacy format); echo
    POST /v1/chat/completions   messages; logprobs + top_logprobs (chat format)
    GET  /metrics               Prometheus text
    GET  /health                {"status": "ok"}, without auth; touches neither the model, its queue nor a request

Concurrent requests are batched: handlers put jobs on a queue, and one batching loop collects them for a
few milliseconds (until none came for `batch_wait_ms`, at most 4 x that), groups the ones with compatible
sampling parameters and runs one `sampling.generate`
call per group in a worker thread. While a batch runs, the next one fills up. The handlers' own CPU work
(parsing bodies, tokenizing, building and encoding responses) runs in a second thread, so the event loop
only moves bytes: /health and new requests are answered while the model and a large response are busy.

Limits (`ServeLimits`), each answered with OpenAI's JSON error naming the limit:
- a body over `max_request_bytes` (1 MiB) is a 413; a body that is not a JSON object, is nested deeper than
  `max_json_depth` (64), or holds text that is not valid Unicode is a 400;
- `max_tokens` at most `limits.max_tokens` (1024), and prompt + max_tokens within the model's context;
  at most `max_prompts` (256) prompts in one completions request;
- work: a request may fill at most `max_request_work` (262,144) token slots, counted as the tokens it may
  return (prompts x max_tokens, plus the prompts when echoed) x (1 + top logprobs asked). Compute and
  response size both follow it: 256 prompts x 240 tokens with top-20 logprobs is 1,290,240 and is refused;
- completions without max_tokens get 16 (OpenAI's default); a chat request without one gets the rest of
  the context (the model's positions - the prompt), at most `limits.max_tokens` and what the work limit
  leaves for its top logprobs.

Logprobs cover every completion token including the end-of-sequence token when the model stopped (the
student learns to stop from it, as with the local teacher); usage.completion_tokens counts it too.
vLLM's `return_tokens_as_token_ids` makes every token string "token_id:<id>", so clients get exact ids.

An `Idempotency-Key` header makes a repeated request (a client that died and resumed, a retry after a
timeout) get the stored answer, or join the one being computed, instead of running the model again.

Fault injection (tests, benchmarks): at `FaultConfig.rate`, a request gets a 429 with Retry-After, a 500,
a hang past the client's timeout, or a truncated JSON body. Which request gets a fault is a seeded hash of
(request body, how many times that body was seen), so a schedule does not depend on arrival order and a
retried request draws again.

The request logic lives in `Server` (validation, limits, batching groups, response shapes), which needs no
HTTP and no model: its unit tests give it a fake engine. `ServerThread` and `server_process` run a real
server on 127.0.0.1 for tests and benchmarks.
"""

from __future__ import annotations

import asyncio
import copy
import hashlib
import hmac
import json
import logging
import math
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter, OrderedDict
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Literal

import torch
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from distillab import models
from distillab.dataset import right_pad
from distillab.errors import UserError
from distillab.sampling import Generation, generate

log = logging.getLogger("distillab.serve")


# ----------------------------------------------------------------------------------------------------
# Request schemas. Unknown fields are ignored (clients send many we do not use), known ones are checked.


class _Req(BaseModel):
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


class CompletionRequest(_Req):
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


class ChatRequest(_Req):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=0)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)


class APIError(Exception):
    """An error answered as OpenAI's JSON error object."""

    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", param: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param = status, message, type_, param

    def response(self) -> JSONResponse:
        return JSONResponse({"error": {"message": self.message, "type": self.type, "param": self.param,
                                       "code": self.status}}, status_code=self.status)


# ----------------------------------------------------------------------------------------------------
# Fault injection.


@dataclass
class FaultConfig:
    rate: float = 0.0  # fraction of requests that get a fault
    seed: int = 0
    kinds: tuple[str, ...] = ("429", "500", "hang", "truncate")
    retry_after_s: float = 0.2  # sent with a 429
    hang_s: float = 30.0  # a hang sleeps this long (set it past the client's timeout), then answers 504
    _seen: Counter = field(default_factory=Counter, repr=False)

    def pick(self, body_digest: str) -> str | None:
        """The fault for this arrival of this body, or None. Deterministic given the seed."""
        if self.rate <= 0:
            return None
        self._seen[body_digest] += 1
        h = hashlib.sha256(f"{self.seed}:{body_digest}:{self._seen[body_digest]}".encode()).digest()
        u = int.from_bytes(h[:8], "big") / 2**64
        if u >= self.rate:
            return None
        return self.kinds[min(int(u / self.rate * len(self.kinds)), len(self.kinds) - 1)]


async def _fault_response(kind: str, faults: FaultConfig, request: Request) -> Response:
    if kind == "429":
        headers = {"Retry-After": str(max(1, math.ceil(faults.retry_after_s))),  # standard: whole seconds
                   "retry-after-ms": str(int(faults.retry_after_s * 1000))}  # what OpenAI's clients read first
        response = APIError(429, "rate limited (injected fault)", "rate_limit_error").response()
        response.headers.update(headers)
        return response
    if kind == "500":
        return APIError(500, "internal error (injected fault)", "server_error").response()
    if kind == "hang":
        # Hang until hang_s passes or the client gives up (then nobody is listening, and a server shutting
        # down is not held up by it).
        deadline = time.monotonic() + faults.hang_s
        while time.monotonic() < deadline and not await request.is_disconnected():
            await asyncio.sleep(0.05)
        return APIError(504, "timed out (injected fault)", "server_error").response()
    # truncate: a 200 whose JSON body stops half-way, as a dropped connection would leave it
    return Response('{"id": "cmpl-truncated", "object": "text_completion", "choices": [{"text": "',
                    status_code=200, media_type="application/json")


# ----------------------------------------------------------------------------------------------------
# Metrics: a handful of counters, rendered as Prometheus text.


class Metrics:
    def __init__(self):
        self.requests: Counter = Counter()  # (endpoint, code) -> n
        self.faults: Counter = Counter()  # kind -> n
        self.prompt_tokens = self.completion_tokens = 0
        self.answers = 0  # prompts the model actually computed (replays not included)
        self.replays = 0  # answers served from the idempotency store
        self.batches = self.batched_prompts = 0

    def render(self) -> str:
        out = ["# HELP distillab_requests_total HTTP requests by endpoint and status code.",
               "# TYPE distillab_requests_total counter"]
        out += [f'distillab_requests_total{{endpoint="{e}",code="{c}"}} {n}' for (e, c), n in sorted(self.requests.items())]
        for name, value, help_ in [
            ("distillab_prompt_tokens_total", self.prompt_tokens, "Prompt tokens processed."),
            ("distillab_completion_tokens_total", self.completion_tokens, "Completion tokens generated."),
            ("distillab_answers_total", self.answers, "Prompts answered by the model (idempotent replays excluded)."),
            ("distillab_idempotent_replays_total", self.replays, "Answers replayed for a repeated Idempotency-Key."),
            ("distillab_batches_total", self.batches, "Model calls made by the batching loop."),
            ("distillab_batched_prompts_total", self.batched_prompts, "Prompts over all batches."),
        ]:
            out += [f"# HELP {name} {help_}", f"# TYPE {name} counter", f"{name} {value}"]
        out += ["# HELP distillab_faults_injected_total Injected faults by kind.",
                "# TYPE distillab_faults_injected_total counter"]
        out += [f'distillab_faults_injected_total{{kind="{k}"}} {n}' for k, n in sorted(self.faults.items())]
        return "\n".join(out) + "\n"


def parse_metrics(text: str) -> dict[str, float]:
    """Prometheus text -> {'name{labels}': value}; for tests and benchmarks."""
    values = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            values[name] = float(value)
    return values


# ----------------------------------------------------------------------------------------------------
# The batching engine.


@dataclass
class _Job:
    kind: Literal["generate", "score"]
    prompt: str | list[int]  # generate: text; score: token ids
    k: int  # top-k logprobs wanted
    group: tuple  # jobs with equal groups run in one model call
    future: asyncio.Future


class Engine:
    """Owns the model. Handlers submit jobs; one loop batches them and runs the model in one worker thread."""

    def __init__(self, model, tokenizer, max_batch: int = 32, batch_wait_ms: float = 5.0):
        self.model, self.tokenizer = model, tokenizer
        self.max_batch, self.batch_wait_s = max_batch, batch_wait_ms / 1000
        self.queue: asyncio.Queue[_Job] | None = None
        self.worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="distillab-model")  # one model user
        self.metrics = Metrics()
        self._sample_seed = 0

    async def submit(self, kind, prompt, k, group):
        job = _Job(kind, prompt, k, group, asyncio.get_running_loop().create_future())
        await self.queue.put(job)
        return await job.future

    async def run(self) -> None:
        self.queue = asyncio.Queue()
        loop = asyncio.get_running_loop()
        while True:
            jobs = [await self.queue.get()]
            # Collect until no request came for batch_wait (clients answered together send their next
            # requests a little apart: wait for the stragglers), but never longer than 4 x batch_wait.
            cap = loop.time() + 4 * self.batch_wait_s
            while len(jobs) < self.max_batch:
                wait = min(self.batch_wait_s, cap - loop.time())
                try:
                    jobs.append(await asyncio.wait_for(self.queue.get(), max(0.0, wait)))
                except asyncio.TimeoutError:
                    break
            groups: dict[tuple, list[_Job]] = {}
            for job in jobs:
                groups.setdefault(job.group, []).append(job)
            for group in groups.values():
                self.metrics.batches += 1
                self.metrics.batched_prompts += len(group)
                try:
                    results = await loop.run_in_executor(self.worker, self._run_group, group)
                except Exception as err:  # the model failed: every job in the batch gets the error
                    log.exception("batch failed")
                    results = [err] * len(group)
                for job, result in zip(group, results):
                    if job.future.done():
                        continue
                    if isinstance(result, Exception):
                        job.future.set_exception(result)
                    else:
                        job.future.set_result(result)

    def _run_group(self, jobs: list[_Job]) -> list:
        k = max(j.k for j in jobs)
        if jobs[0].kind == "score":
            return score_prompts(self.model, [j.prompt for j in jobs], k)
        max_tokens, temperature, top_p, seed = jobs[0].group[1:]
        if seed is None:  # no seed asked: vary it per batch, so samples differ between batches
            self._sample_seed += 1
            seed = self._sample_seed
        return generate(self.model, self.tokenizer, [j.prompt for j in jobs], max_new_tokens=max_tokens,
                        temperature=temperature, top_p=top_p, top_k_logprobs=k, batch_size=len(jobs), seed=seed)


@torch.no_grad()
def score_prompts(model, id_lists: list[list[int]], k: int, max_floats: int = 1 << 27) -> list[dict]:
    """Logprob of each prompt token given the ones before it (the first has none), and the top-k there."""
    device = next(model.parameters()).device
    out: list[dict] = []
    for batch in _size_chunks(id_lists, model.config.vocab_size, max_floats):
        ids, mask = right_pad(batch, 0)  # (B, T) right-padded: positions stay 0..n-1; padding is never scored
        ids, mask = ids.to(device), mask.to(device)
        logprobs = model(input_ids=ids, attention_mask=mask).logits[:, :-1].float().log_softmax(-1)  # (B, T-1, V)
        for row, seq in enumerate(batch):
            n = len(seq) - 1
            lp = logprobs[row, :n]  # (n, V): position t predicts token t+1
            chosen = lp.gather(-1, ids[row, 1 : n + 1].unsqueeze(-1)).squeeze(-1)  # (n,)
            top_lp, top_id = lp.topk(k, dim=-1)  # (n, k)
            out.append({"token_logprobs": chosen.tolist(), "top_ids": top_id.tolist(), "top_logprobs": top_lp.tolist()})
    return out


def _size_chunks(id_lists: list[list[int]], vocab: int, max_floats: int):
    """Consecutive sub-batches whose padded B x T x V logits stay under max_floats (at least one prompt each)."""
    chunk: list[list[int]] = []
    longest = 0
    for seq in id_lists:
        if chunk and (len(chunk) + 1) * max(longest, len(seq)) * vocab > max_floats:
            yield chunk
            chunk, longest = [], 0
        chunk.append(seq)
        longest = max(longest, len(seq))
    if chunk:
        yield chunk


# ----------------------------------------------------------------------------------------------------
# Turning model output into OpenAI's response shapes.


class _Tokens:
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
            piece = self.cache[token_id] = (self.tokenizer.decode([token_id]),
                                            len(self.tokenizer.decode([token_id], skip_special_tokens=True)))
        return piece

    def __call__(self, token_id: int) -> str:
        return f"token_id:{token_id}" if self.as_ids else self._piece(token_id)[0]

    def text_len(self, token_id: int) -> int:
        """Characters the token adds to the text (special tokens add none): for text_offset."""
        return self._piece(token_id)[1]


def _apply_stop(gen: Generation, stops: list[str], tokenizer) -> Generation:
    """Cut the completion before the first stop string; keep only tokens wholly before it."""
    cuts = [i for i in (gen.text.find(s) for s in stops if s) if i >= 0]
    if not cuts:
        return gen
    cut = min(cuts)
    n = 0
    while n < len(gen.token_ids) and len(tokenizer.decode(gen.token_ids[: n + 1], skip_special_tokens=True)) <= cut:
        n += 1
    return Generation(text=gen.text[:cut], token_ids=gen.token_ids[:n], prompt_tokens=gen.prompt_tokens,
                       finish_reason="stop", top_ids=gen.top_ids[:n], top_logprobs=gen.top_logprobs[:n],
                       token_logprobs=gen.token_logprobs[:n])


def _legacy_logprobs(ids, token_lps, top_ids, top_lps, k, tok: _Tokens, start_offset: int = 0) -> dict:
    """OpenAI's completions `logprobs`: tokens, token_logprobs, top_logprobs (dicts), text_offset."""
    offsets, pos = [], start_offset
    for i in ids:
        offsets.append(pos)
        pos += tok.text_len(i)
    tops = [None if ids_ is None else {tok(a): b for a, b in zip(ids_[:k], lps_[:k])}
            for ids_, lps_ in zip(top_ids, top_lps)]
    return {"tokens": [tok(i) for i in ids], "token_logprobs": token_lps, "top_logprobs": tops, "text_offset": offsets}


def _chat_logprobs(gen: Generation, k: int, tok: _Tokens) -> dict:
    def entry(token_id, logprob):
        s = tok(token_id)
        return {"token": s, "logprob": logprob, "bytes": list(s.encode())}

    no_top = [[] for _ in gen.token_ids]  # logprobs without top_logprobs: generate() computed no top-k
    return {"content": [{**entry(i, lp), "top_logprobs": [entry(a, b) for a, b in zip(ids_[:k], lps_[:k])]}
                        for i, lp, ids_, lps_ in zip(gen.token_ids, gen.token_logprobs, gen.top_ids or no_top,
                                                     gen.top_logprobs or no_top)]}


def _usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


# ----------------------------------------------------------------------------------------------------
# The app: `Server` holds the request logic, `create_app` wires routes to it.


@dataclass
class ServeLimits:
    """What one request may ask for; past any of them it gets a 4xx that says which limit and its value."""

    max_request_bytes: int = 1 << 20  # a bigger body is a 413
    max_json_depth: int = 64  # nesting of the body's JSON (an OpenAI request nests about 5 deep)
    max_tokens: int = 1024  # per request, and never past the model's context
    max_prompts: int = 256  # prompts in one completions request
    default_max_tokens: int = 16  # OpenAI's default for completions
    # Token slots one request may fill: tokens it may return (prompts x max_tokens, plus the prompts when
    # echoed) x (1 + top logprobs). The model's time and the response's size both grow with it.
    max_request_work: int = 1 << 18


@dataclass
class _CompletionPlan:
    """A validated completions request, tokenized: what goes to the engine and what the response needs."""

    req: CompletionRequest
    ids: list[list[int]]  # per prompt: its token ids (what echo scores and usage counts)
    texts: list[str]  # per prompt: its text (generate() takes text)
    max_tokens: int
    k: int  # top logprobs per token
    stops: list[str]


@dataclass
class _ChatPlan:
    req: ChatRequest
    prompt: str  # the messages rendered by the chat template
    max_tokens: int
    k: int
    stops: list[str]


def _stops(req: _Req) -> list[str]:
    return [req.stop] if isinstance(req.stop, str) else (req.stop or [])


class Server:
    """What the endpoints do, apart from HTTP routing and the model: check a body against the limits, submit
    its prompts to the engine, shape the answer as OpenAI's, count it in the metrics.

    `engine` is anything with `async submit(kind, prompt, k, group)` answering a Generation (kind "generate",
    prompt text) or a score dict (kind "score", prompt ids; see `score_prompts`): the batching `Engine` in
    the app, a fake in unit tests. `context` is the model's positions. The CPU work of a request (parsing,
    tokenizing, building and encoding the response) runs in `cpu_worker`, one thread of its own that alone
    uses `tokenizer`: the event loop stays free for /health, and the model thread has its own tokenizer.
    """

    def __init__(self, engine, tokenizer, name: str, context: int, limits: ServeLimits | None = None,
                 metrics: Metrics | None = None, faults: FaultConfig | None = None, api_key: str | None = None,
                 token_ids_extension: bool = True):
        self.engine, self.tokenizer, self.name, self.context = engine, tokenizer, name, context
        self.limits = limits or ServeLimits()
        self.metrics = metrics or Metrics()
        self.faults = faults or FaultConfig()
        self.api_key = api_key
        # False answers `return_tokens_as_token_ids` with OpenAI's 400 for an unknown argument.
        self.token_ids_extension = token_ids_extension
        self.idem = _IdempotencyStore()
        self.cpu_worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="distillab-http")
        self.token_strings: dict = {}  # shared _Tokens cache

    async def _on_cpu(self, fn, *args):
        return await asyncio.get_running_loop().run_in_executor(self.cpu_worker, fn, *args)

    # -- the HTTP envelope ---------------------------------------------------------------------------

    def authorized(self, authorization: str | None) -> bool:
        """Whether an Authorization header value carries the key (always, when the server has none)."""
        if self.api_key is None:
            return True
        return hmac.compare_digest((authorization or "").encode(), f"Bearer {self.api_key}".encode())

    def parse_body(self, raw: bytes) -> tuple[dict, str]:
        """(the JSON object, its digest) or a 400 that says what is wrong with it. The digest (of the canonical
        JSON) keys faults and idempotency."""
        try:
            body = json.loads(raw)
        except RecursionError:  # the parser's own limit, far past max_json_depth
            raise APIError(400, f"request body is nested deeper than {self.limits.max_json_depth} levels") from None
        except (ValueError, UnicodeDecodeError):  # ValueError: bad JSON, or an integer of over 4,300 digits
            raise APIError(400, "request body is not valid JSON") from None
        if not isinstance(body, dict):
            raise APIError(400, "request body must be a JSON object")
        _check_json(body, self.limits.max_json_depth)
        return body, hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()

    async def handle(self, request: Request, endpoint: str, answer) -> Response:
        """Auth, size limit, JSON, faults, idempotency; then `await answer(body)`. Counts every outcome."""
        try:
            if not self.authorized(request.headers.get("authorization")):  # the message never echoes what was sent
                raise APIError(401, "invalid or missing API key (send Authorization: Bearer <key>)",
                               "authentication_error")
            raw = await _read_body(request, self.limits.max_request_bytes)
            body, digest = await self._on_cpu(self.parse_body, raw)
            kind = self.faults.pick(digest)
            if kind:
                self.metrics.faults[kind] += 1
                response = await _fault_response(kind, self.faults, request)
            else:
                key = request.headers.get("idempotency-key")
                payload = await (self.idem.run(f"{key}:{digest}", lambda: answer(body), self.metrics) if key
                                 else answer(body))
                response = Response(await self._on_cpu(_json_bytes, payload), media_type="application/json")
        except APIError as err:
            response = err.response()
        except Exception:
            log.exception("request failed")
            response = APIError(500, "internal server error", "server_error").response()
        self.metrics.requests[(endpoint, str(response.status_code))] += 1
        return response

    def models_list(self) -> dict:
        return {"object": "list", "data": [{"id": self.name, "object": "model", "created": 0, "owned_by": "distillab",
                                            "max_model_len": self.context}]}

    # -- checks ----------------------------------------------------------------------------------------

    def validate(self, cls: type[_Req], body: dict) -> _Req:
        try:
            req = cls.model_validate(body)
        except ValidationError as err:
            first = err.errors()[0]
            param = ".".join(str(p) for p in first["loc"]) or None
            raise APIError(400, f"{param}: {first['msg']}", param=param) from None
        if req.model != self.name:
            raise APIError(404, f"model {req.model!r} not found; this server serves {self.name!r}", param="model")
        if req.n != 1:
            raise APIError(400, "only n = 1 is supported", param="n")
        if req.stream:
            raise APIError(400, "streaming is not supported", param="stream")
        if "return_tokens_as_token_ids" in body and not self.token_ids_extension:
            raise APIError(400, "Unrecognized request argument supplied: return_tokens_as_token_ids")
        return req

    def check_length(self, prompt_len: int, max_tokens: int) -> None:
        if max_tokens > self.limits.max_tokens:
            raise APIError(400, f"max_tokens {max_tokens} is over this server's limit of {self.limits.max_tokens}",
                           param="max_tokens")
        if prompt_len + max_tokens > self.context:
            raise APIError(400, f"prompt ({prompt_len} tokens) + max_tokens ({max_tokens}) is over the model's "
                                f"context of {self.context} tokens", param="max_tokens")

    def check_work(self, n_prompts: int, max_tokens: int, echoed_tokens: int, k: int) -> None:
        """Refuse a request that may fill more than max_request_work token slots (see ServeLimits)."""
        work = (n_prompts * max_tokens + echoed_tokens) * (1 + k)
        limit = self.limits.max_request_work
        if work > limit:
            echo = f" + {echoed_tokens} echoed prompt tokens" if echoed_tokens else ""
            raise APIError(400, f"request too large: ({n_prompts} prompts x {max_tokens} max_tokens{echo}) x "
                                f"(1 + {k} top logprobs) = {work:,} token slots, over this server's limit of "
                                f"{limit:,} per request; ask for fewer prompts, tokens or logprobs",
                           param="max_tokens")

    @staticmethod
    def group(req: _Req, max_tokens: int) -> tuple:
        """The batching key: requests with equal keys run in one model call."""
        if req.temperature == 0:  # greedy: top_p and seed do not matter, so all greedy requests batch together
            return ("generate", max_tokens, 0.0, 1.0, 0)
        return ("generate", max_tokens, req.temperature, req.top_p, req.seed)

    # -- completions -----------------------------------------------------------------------------------

    def plan_completion(self, body: dict) -> _CompletionPlan:
        req = self.validate(CompletionRequest, body)
        prompts = req.prompt
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        if not prompts or len(prompts) > self.limits.max_prompts:
            raise APIError(400, f"prompt must hold 1 to {self.limits.max_prompts} prompts", param="prompt")
        max_tokens = self.limits.default_max_tokens if req.max_tokens is None else req.max_tokens
        k = req.logprobs or 0
        tokenizer = self.tokenizer
        ids = [p if isinstance(p, list) else tokenizer(p)["input_ids"] for p in prompts]
        for p in ids:
            if not p:
                raise APIError(400, "empty prompt", param="prompt")
            if any(not 0 <= t < len(tokenizer) for t in p):
                raise APIError(400, "prompt token id out of the vocabulary", param="prompt")
            self.check_length(len(p), max_tokens)
        self.check_work(len(ids), max_tokens, sum(map(len, ids)) if req.echo else 0, k)
        # Token-id prompts are decoded for generation (generate() takes text): exact for tokenizers that
        # round-trip, as the lab's does; echo scoring always uses the ids as given.
        texts = [p if isinstance(p, str) else tokenizer.decode(p, skip_special_tokens=True) for p in prompts]
        return _CompletionPlan(req, ids, texts, max_tokens, k, _stops(req))

    async def complete(self, body: dict) -> dict:
        plan = await self._on_cpu(self.plan_completion, body)
        submit, tasks = self.engine.submit, []
        if plan.max_tokens > 0:
            group = self.group(plan.req, plan.max_tokens)
            tasks.append(asyncio.gather(*[submit("generate", t, plan.k, group) for t in plan.texts]))
        if plan.req.echo:
            tasks.append(asyncio.gather(*[submit("score", p, plan.k, ("score",)) for p in plan.ids]))
        results = await asyncio.gather(*tasks)
        gens = results[0] if plan.max_tokens > 0 else None
        scores = results[-1] if plan.req.echo else None
        return await self._on_cpu(self.completion_response, plan, gens, scores)

    def completion_response(self, plan: _CompletionPlan, gens: list[Generation] | None,
                            scores: list[dict] | None) -> dict:
        """The response object from the engine's answers (gens: None when max_tokens is 0; scores: when echoed)."""
        req, tokenizer = plan.req, self.tokenizer
        if gens is not None:
            gens = [_apply_stop(g, plan.stops, tokenizer) for g in gens]
        tok = _Tokens(tokenizer, req.return_tokens_as_token_ids, self.token_strings)
        choices, prompt_total, completion_total = [], 0, 0
        for i, p in enumerate(plan.ids):
            gen = gens[i] if gens else Generation("", [], len(p), "length")
            text = (plan.texts[i] if req.echo else "") + gen.text
            logprobs = None
            if req.logprobs is not None:
                logprobs = _choice_logprobs(p, scores[i] if scores else None, gen, plan.k, tok, plan.texts[i])
            choices.append({"index": i, "text": text, "finish_reason": gen.finish_reason, "logprobs": logprobs})
            prompt_total += len(p)
            completion_total += len(gen.token_ids)
        self.metrics.answers += len(plan.ids)
        self.metrics.prompt_tokens += prompt_total
        self.metrics.completion_tokens += completion_total
        return {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion", "created": int(time.time()),
                "model": self.name, "choices": choices, "usage": _usage(prompt_total, completion_total)}

    # -- chat ------------------------------------------------------------------------------------------

    def plan_chat(self, body: dict) -> _ChatPlan:
        req = self.validate(ChatRequest, body)
        k = (req.top_logprobs or 0) if req.logprobs else 0
        prompt = chat_prompt(self.tokenizer, [m.model_dump() for m in req.messages])
        prompt_len = len(self.tokenizer(prompt)["input_ids"])
        max_tokens = req.max_completion_tokens or req.max_tokens
        if not max_tokens:  # not given: the rest of the context, as far as this server's limits allow
            room = self.context - prompt_len
            if room < 1:
                raise APIError(400, f"prompt ({prompt_len} tokens) fills the model's context of {self.context} "
                                    "tokens", param="messages")
            max_tokens = max(1, min(room, self.limits.max_tokens, self.limits.max_request_work // (1 + k)))
        self.check_length(prompt_len, max_tokens)
        self.check_work(1, max_tokens, 0, k)
        return _ChatPlan(req, prompt, max_tokens, k, _stops(req))

    async def chat(self, body: dict) -> dict:
        plan = await self._on_cpu(self.plan_chat, body)
        gen = await self.engine.submit("generate", plan.prompt, plan.k, self.group(plan.req, plan.max_tokens))
        return await self._on_cpu(self.chat_response, plan, gen)

    def chat_response(self, plan: _ChatPlan, gen: Generation) -> dict:
        req = plan.req
        gen = _apply_stop(gen, plan.stops, self.tokenizer)
        tok = _Tokens(self.tokenizer, req.return_tokens_as_token_ids, self.token_strings)
        self.metrics.answers += 1
        self.metrics.prompt_tokens += gen.prompt_tokens
        self.metrics.completion_tokens += len(gen.token_ids)
        return {"id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion", "created": int(time.time()),
                "model": self.name, "choices": [{
                    "index": 0, "message": {"role": "assistant", "content": gen.text},
                    "finish_reason": gen.finish_reason,
                    "logprobs": _chat_logprobs(gen, plan.k, tok) if req.logprobs else None}],
                "usage": _usage(gen.prompt_tokens, len(gen.token_ids))}


def _check_json(body, max_depth: int) -> None:
    """400 for JSON nested deeper than max_depth, or holding a lone surrogate (JSON's \\ud800 escapes decode
    to strings no tokenizer takes)."""
    def check_text(text: str) -> None:
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:
            raise APIError(400, "request body holds a string that is not valid Unicode (a lone surrogate)") from None

    stack = [(body, 1)]
    while stack:
        value, depth = stack.pop()
        if depth > max_depth:
            raise APIError(400, f"request body is nested deeper than {max_depth} levels")
        if isinstance(value, dict):
            for key in value:
                check_text(key)
            value = value.values()
        for item in value:
            if isinstance(item, str):
                check_text(item)
            elif isinstance(item, (dict, list)):
                stack.append((item, depth + 1))


def _json_bytes(payload: dict) -> bytes:
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


def create_app(model_dir, api_key: str | None = None, faults: FaultConfig | None = None, max_batch: int = 32,
               batch_wait_ms: float = 5.0, limits: ServeLimits | None = None, model_name: str | None = None,
               token_ids_extension: bool = True) -> FastAPI:
    """The FastAPI app serving `model_dir` (an HF directory or lab:NAME). Loads the model now.

    token_ids_extension=False answers `return_tokens_as_token_ids` with OpenAI's 400 for an unknown
    argument, to test clients against a server that only gives token strings. `app.state.server` is the
    `Server`, `app.state.engine` its engine.
    """
    model, tokenizer = models.load(model_dir)
    name = model_name or (str(model_dir) if str(model_dir).startswith("lab:") else Path(model_dir).name)
    # The model thread gets its own tokenizer: a fast tokenizer changes its padding settings while it
    # encodes, and two threads doing that at once fail ("Already borrowed").
    engine = Engine(model, copy.deepcopy(tokenizer), max_batch=max_batch, batch_wait_ms=batch_wait_ms)
    context = getattr(model.config, "max_position_embeddings", None) or 1 << 30
    server = Server(engine, tokenizer, name, context, limits=limits, metrics=engine.metrics, faults=faults,
                    api_key=api_key, token_ids_extension=token_ids_extension)

    @asynccontextmanager
    async def lifespan(app):
        task = asyncio.create_task(engine.run())
        yield
        task.cancel()
        engine.worker.shutdown(wait=False)
        server.cpu_worker.shutdown(wait=False)

    app = FastAPI(title="distillab serve", lifespan=lifespan)
    app.state.engine, app.state.server = engine, server

    def unauthorized(request: Request) -> Response | None:
        if server.authorized(request.headers.get("authorization")):
            return None
        return APIError(401, "invalid or missing API key", "authentication_error").response()

    @app.post("/v1/completions")
    async def completions_route(request: Request):
        return await server.handle(request, "/v1/completions", server.complete)

    @app.post("/v1/chat/completions")
    async def chat_route(request: Request):
        return await server.handle(request, "/v1/chat/completions", server.chat)

    @app.get("/v1/models")
    async def models_route(request: Request):
        return unauthorized(request) or server.models_list()

    @app.get("/metrics")
    async def metrics_route(request: Request):
        return unauthorized(request) or PlainTextResponse(server.metrics.render(),
                                                          media_type="text/plain; version=0.0.4")

    @app.get("/health")
    async def health():  # on the event loop, touching nothing the model or a request holds
        return {"status": "ok"}

    return app


def _choice_logprobs(prompt_ids, score, gen: Generation, k: int, tok: _Tokens, prompt_text: str) -> dict:
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


def chat_prompt(tokenizer, messages: list[dict]) -> str:
    """chat.render_prompt: the model's chat template when its tokenizer has one; else the messages' contents
    joined by newlines (so a one-message chat to a lab model sees exactly the prompt a completions request would,
    and a student is asked as it was trained)."""
    from distillab import chat

    for m in messages:
        m["content"] = chat.text_content(m.get("content")) or ""
    try:
        return chat.render_prompt(tokenizer, messages)
    except chat.TemplateRefused as err:  # roles out of order, a role the template does not know, ...
        raise APIError(400, f"messages: {err}", param="messages") from None


async def _read_body(request: Request, limit: int) -> bytes:
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit:
        raise APIError(413, f"request body of {declared} bytes is over the limit of {limit}")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise APIError(413, f"request body is over the limit of {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


class _IdempotencyStore:
    """Answers by Idempotency-Key (+ body digest): done ones are replayed, running ones are joined. Bounded LRU."""

    def __init__(self, size: int = 100_000):
        self.size = size
        self.done: OrderedDict[str, dict] = OrderedDict()
        self.running: dict[str, asyncio.Future] = {}

    async def run(self, key: str, answer, metrics: Metrics) -> dict:
        if key in self.done:
            self.done.move_to_end(key)
            metrics.replays += 1
            return self.done[key]
        if key in self.running:
            metrics.replays += 1
            return await asyncio.shield(self.running[key])
        future = asyncio.get_running_loop().create_future()
        self.running[key] = future
        try:
            payload = await answer()
        except Exception as err:
            future.set_exception(err)
            future.exception()  # mark it retrieved: nobody may be waiting
            raise
        except BaseException:  # cancelled: whoever joined must not wait forever
            future.cancel()
            raise
        finally:
            self.running.pop(key, None)
        future.set_result(payload)
        self.done[key] = payload
        if len(self.done) > self.size:
            self.done.popitem(last=False)
        return payload


# ----------------------------------------------------------------------------------------------------
# Running it.


def serve(model_dir, host: str = "127.0.0.1", port: int = 8000, api_key: str | None = None, fault_rate: float = 0.0,
          fault_seed: int = 0, max_batch: int = 32, max_request_work: int | None = None, log_level: str = "warning",
          **app_kwargs) -> None:
    """Serve until interrupted. Binds 127.0.0.1 unless told otherwise: exposing a model is a choice.
    A port outside 1-65535 or a max_request_work below 1 is a UserError, raised before the model loads."""
    import uvicorn

    if not 1 <= port <= 65535:
        raise UserError(f"port {port} is out of range: choose one from 1 to 65535")
    limits = app_kwargs.pop("limits", None) or ServeLimits()
    if max_request_work is not None:
        if max_request_work < 1:
            raise UserError(f"max_request_work must be at least 1 (got {max_request_work})")
        limits = replace(limits, max_request_work=max_request_work)
    faults = FaultConfig(rate=fault_rate, seed=fault_seed)
    app = create_app(model_dir, api_key=api_key, faults=faults, max_batch=max_batch, limits=limits, **app_kwargs)
    uvicorn.run(app, host=host, port=port, log_level=log_level)


class ServerThread:
    """Runs an app under uvicorn in a background thread on 127.0.0.1 (port 0: a free one). For tests/benchmarks.

        with ServerThread(create_app(...)) as server:
            server.base_url  # http://127.0.0.1:PORT/v1
    """

    def __init__(self, app: FastAPI, host: str = "127.0.0.1", port: int = 0):
        import uvicorn

        # A short graceful shutdown: an injected hang must not hold the test that started it.
        self.server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="warning", lifespan="on",
                                                    timeout_graceful_shutdown=1))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> "ServerThread":
        self.thread.start()
        deadline = time.time() + 60
        while not self.server.started:
            if not self.thread.is_alive() or time.time() > deadline:
                raise RuntimeError("server did not start")
            time.sleep(0.02)
        host, port = self.server.servers[0].sockets[0].getsockname()[:2]
        self.url = f"http://{host}:{port}"
        self.base_url = self.url + "/v1"
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def subprocess_env(**extra) -> dict:
    """The environment for a child python: one torch thread (tests and benchmarks share two cores), offline,
    no tokenizer threads, and this distillab importable."""
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", **extra)
    src = str(Path(__file__).resolve().parents[1])
    env["PYTHONPATH"] = src + os.pathsep + env.get("PYTHONPATH", "")
    return env


@contextmanager
def server_process(model_dir, *args: str, timeout_s: float = 90.0, cpus: set[int] | None = None):
    """`python -m distillab serve MODEL_DIR --port P ARGS...` in a subprocess (env: `subprocess_env()`), until
    its /health answers; yields its base URL (http://127.0.0.1:P/v1) and terminates it on exit.
    cpus: pin the server to these CPUs (benchmarks keep it off the client's)."""
    with server_popen(model_dir, *args, timeout_s=timeout_s, cpus=cpus) as (url, _):
        yield url


@contextmanager
def server_popen(model_dir, *args: str, timeout_s: float = 90.0, cpus: set[int] | None = None):
    """server_process, yielding (base URL, the server's Popen): for a caller that kills it mid-run."""
    port = free_port()
    pin = (lambda: os.sched_setaffinity(0, cpus)) if cpus else None
    # stderr to a file, not a pipe nobody reads while it runs: a chatty server would block on a full pipe
    with tempfile.TemporaryFile() as stderr:
        proc = subprocess.Popen([sys.executable, "-m", "distillab", "serve", str(model_dir), "--port", str(port), *args],
                                env=subprocess_env(), stdout=subprocess.DEVNULL, stderr=stderr, preexec_fn=pin)
        url = f"http://127.0.0.1:{port}"
        try:
            _wait_healthy(url, proc, stderr, timeout_s)
            yield url + "/v1", proc
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def _wait_healthy(url: str, proc: subprocess.Popen, stderr, timeout_s: float) -> None:
    import httpx

    deadline = time.time() + timeout_s
    while True:
        if proc.poll() is not None:
            stderr.seek(0)
            raise RuntimeError(f"server exited: {stderr.read().decode(errors='replace')[-2000:]}")
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                return
        except httpx.TransportError:
            pass
        if time.time() > deadline:
            raise RuntimeError("server did not come up")
        time.sleep(0.1)


def read_metrics(url: str, api_key: str | None = None) -> dict[str, float]:
    """A server's /metrics, parsed by parse_metrics; `url` may be the base URL (…/v1)."""
    import httpx

    root = url.removesuffix("/v1")
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    return parse_metrics(httpx.get(root + "/metrics", headers=headers, timeout=10).text)


def metric_sum(values: dict[str, float], name: str) -> float:
    """Sum of a counter over all its label sets."""
    return sum(v for k, v in values.items() if k == name or k.startswith(name + "{"))
