"""An OpenAI-compatible server for any local HF causal LM: to serve a student, and to be a real teacher
endpoint in tests and benchmarks.

    GET  /v1/models
    POST /v1/completions        prompt: str | [str] | [int] | [[int]]; logprobs (top-k, legacy format); echo
    POST /v1/chat/completions   messages; logprobs + top_logprobs (chat format)
    GET  /metrics               Prometheus text
    GET  /health

Concurrent requests are batched: handlers put jobs on a queue, and one batching loop collects them for a
few milliseconds (until none came for `batch_wait_ms`, at most 4 x that), groups the ones with compatible
sampling parameters and runs one `generation.generate`
call per group in a worker thread. While a batch runs, the next one fills up.

Logprobs cover every completion token including the end-of-sequence token when the model stopped (the
student learns to stop from it, as with the local teacher); usage.completion_tokens counts it too.
vLLM's `return_tokens_as_token_ids` makes every token string "token_id:<id>", so clients get exact ids.

An `Idempotency-Key` header makes a repeated request (a client that died and resumed, a retry after a
timeout) get the stored answer, or join the one being computed, instead of running the model again.

Fault injection (tests, benchmarks): at `FaultConfig.rate`, a request gets a 429 with Retry-After, a 500,
a hang past the client's timeout, or a truncated JSON body. Which request gets a fault is a seeded hash of
(request body, how many times that body was seen), so a schedule does not depend on arrival order and a
retried request draws again.
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
import threading
import time
import uuid
from collections import Counter, OrderedDict
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from distillab import models
from distillab.generation import Generation, generate

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
    seed: int | None = None
    return_tokens_as_token_ids: bool = False


class CompletionRequest(_Req):
    prompt: str | list[str] | list[int] | list[list[int]]
    logprobs: int | None = Field(None, ge=0, le=20)
    echo: bool = False


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: str
    content: str | list[dict] | None = None


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
        longest = max(len(seq) for seq in batch)
        ids = torch.zeros(len(batch), longest, dtype=torch.long)  # right-padded: positions stay 0..n-1
        mask = torch.zeros_like(ids)
        for row, seq in enumerate(batch):
            ids[row, : len(seq)] = torch.tensor(seq)
            mask[row, : len(seq)] = 1
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
    """Token strings as clients see them: the decoded text of each token, or "token_id:<id>" when asked."""

    def __init__(self, tokenizer, as_ids: bool):
        self.tokenizer, self.as_ids = tokenizer, as_ids

    def __call__(self, token_id: int) -> str:
        return f"token_id:{token_id}" if self.as_ids else self.tokenizer.decode([token_id])


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
        pos += len(tok.tokenizer.decode([i], skip_special_tokens=True))
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
# The app.


@dataclass
class ServeLimits:
    max_request_bytes: int = 1 << 20
    max_tokens: int = 1024  # per request, and never past the model's context
    max_prompts: int = 256  # prompts in one completions request
    default_max_tokens: int = 16  # OpenAI's default for completions


def create_app(model_dir, api_key: str | None = None, faults: FaultConfig | None = None, max_batch: int = 32,
               batch_wait_ms: float = 5.0, limits: ServeLimits | None = None, model_name: str | None = None,
               token_ids_extension: bool = True) -> FastAPI:
    """The FastAPI app serving `model_dir` (an HF directory or lab:NAME). Loads the model now.

    token_ids_extension=False answers `return_tokens_as_token_ids` with OpenAI's 400 for an unknown
    argument, to test clients against a server that only gives token strings.
    """
    model, tokenizer = models.load(model_dir)
    name = model_name or (str(model_dir) if str(model_dir).startswith("lab:") else Path(model_dir).name)
    # The model thread gets its own tokenizer: a fast tokenizer changes its padding settings while it
    # encodes, and two threads doing that at once fail ("Already borrowed").
    engine = Engine(model, copy.deepcopy(tokenizer), max_batch=max_batch, batch_wait_ms=batch_wait_ms)
    limits = limits or ServeLimits()
    faults = faults or FaultConfig()
    context = getattr(model.config, "max_position_embeddings", None) or 1 << 30
    idem = _IdempotencyStore()
    metrics = engine.metrics

    @asynccontextmanager
    async def lifespan(app):
        task = asyncio.create_task(engine.run())
        yield
        task.cancel()
        engine.worker.shutdown(wait=False)

    app = FastAPI(title="distillab serve", lifespan=lifespan)
    app.state.engine = engine

    def authorized(request: Request) -> bool:
        if api_key is None:
            return True
        given = request.headers.get("authorization", "")
        return hmac.compare_digest(given.encode(), f"Bearer {api_key}".encode())

    async def handle(request: Request, endpoint: str, answer) -> Response:
        """Auth, size limit, JSON, faults, idempotency; then `answer(body)`. Counts every outcome."""
        try:
            if not authorized(request):  # the message never echoes what was sent
                raise APIError(401, "invalid or missing API key (send Authorization: Bearer <key>)",
                               "authentication_error")
            raw = await _read_body(request, limits.max_request_bytes)
            try:
                body = json.loads(raw)
            except (json.JSONDecodeError, UnicodeDecodeError):
                raise APIError(400, "request body is not valid JSON") from None
            if not isinstance(body, dict):
                raise APIError(400, "request body must be a JSON object")
            digest = hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()
            kind = faults.pick(digest)
            if kind:
                metrics.faults[kind] += 1
                response = await _fault_response(kind, faults, request)
            else:
                key = request.headers.get("idempotency-key")
                payload = await (idem.run(f"{key}:{digest}", lambda: answer(body), metrics) if key else answer(body))
                response = JSONResponse(payload)
        except APIError as err:
            response = err.response()
        except Exception:
            log.exception("request failed")
            response = APIError(500, "internal server error", "server_error").response()
        metrics.requests[(endpoint, str(response.status_code))] += 1
        return response

    def validate(cls, body: dict):
        try:
            req = cls.model_validate(body)
        except ValidationError as err:
            first = err.errors()[0]
            param = ".".join(str(p) for p in first["loc"]) or None
            raise APIError(400, f"{param}: {first['msg']}", param=param) from None
        if req.model != name:
            raise APIError(404, f"model {req.model!r} not found; this server serves {name!r}", param="model")
        if req.n != 1:
            raise APIError(400, "only n = 1 is supported", param="n")
        if req.stream:
            raise APIError(400, "streaming is not supported", param="stream")
        if "return_tokens_as_token_ids" in body and not token_ids_extension:
            raise APIError(400, "Unrecognized request argument supplied: return_tokens_as_token_ids")
        return req

    def check_length(prompt_len: int, max_tokens: int) -> None:
        if max_tokens > limits.max_tokens:
            raise APIError(400, f"max_tokens {max_tokens} is over this server's limit of {limits.max_tokens}",
                           param="max_tokens")
        if prompt_len + max_tokens > context:
            raise APIError(400, f"prompt ({prompt_len} tokens) + max_tokens ({max_tokens}) is over the model's "
                                f"context of {context} tokens", param="max_tokens")

    def group(req, max_tokens: int) -> tuple:
        if req.temperature == 0:  # greedy: top_p and seed do not matter, so all greedy requests batch together
            return ("generate", max_tokens, 0.0, 1.0, 0)
        return ("generate", max_tokens, req.temperature, req.top_p, req.seed)

    async def complete(body: dict) -> dict:
        req = validate(CompletionRequest, body)
        prompts = req.prompt
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        if not prompts or len(prompts) > limits.max_prompts:
            raise APIError(400, f"prompt must hold 1 to {limits.max_prompts} prompts", param="prompt")
        max_tokens = limits.default_max_tokens if req.max_tokens is None else req.max_tokens
        k = req.logprobs or 0
        tok = _Tokens(tokenizer, req.return_tokens_as_token_ids)
        stops = [req.stop] if isinstance(req.stop, str) else (req.stop or [])
        ids = [p if isinstance(p, list) else tokenizer(p)["input_ids"] for p in prompts]
        for p in ids:
            if not p:
                raise APIError(400, "empty prompt", param="prompt")
            if any(not 0 <= t < len(tokenizer) for t in p):
                raise APIError(400, "prompt token id out of the vocabulary", param="prompt")
            check_length(len(p), max_tokens)
        # Token-id prompts are decoded for generation (generate() takes text): exact for tokenizers that
        # round-trip, as the lab's does; echo scoring always uses the ids as given.
        texts = [p if isinstance(p, str) else tokenizer.decode(p, skip_special_tokens=True) for p in prompts]
        gens = scores = None
        tasks = []
        if max_tokens > 0:
            tasks.append(asyncio.gather(*[engine.submit("generate", t, k, group(req, max_tokens)) for t in texts]))
        if req.echo:
            tasks.append(asyncio.gather(*[engine.submit("score", p, k, ("score",)) for p in ids]))
        results = await asyncio.gather(*tasks)
        if max_tokens > 0:
            gens = [_apply_stop(g, stops, tokenizer) for g in results[0]]
        if req.echo:
            scores = results[-1]
        choices, prompt_total, completion_total = [], 0, 0
        for i, p in enumerate(ids):
            gen = gens[i] if gens else Generation("", [], len(p), "length")
            text = (texts[i] if req.echo else "") + gen.text
            logprobs = None
            if req.logprobs is not None:
                logprobs = _choice_logprobs(p, scores[i] if scores else None, gen, k, tok, texts[i])
            choices.append({"index": i, "text": text, "finish_reason": gen.finish_reason, "logprobs": logprobs})
            prompt_total += len(p)
            completion_total += len(gen.token_ids)
        metrics.answers += len(ids)
        metrics.prompt_tokens += prompt_total
        metrics.completion_tokens += completion_total
        return {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion", "created": int(time.time()),
                "model": name, "choices": choices, "usage": _usage(prompt_total, completion_total)}

    async def chat(body: dict) -> dict:
        req = validate(ChatRequest, body)
        max_tokens = req.max_completion_tokens or req.max_tokens or min(limits.max_tokens, 256)
        k = (req.top_logprobs or 0) if req.logprobs else 0
        prompt = chat_prompt(tokenizer, [m.model_dump() for m in req.messages])
        prompt_len = len(tokenizer(prompt)["input_ids"])
        check_length(prompt_len, max_tokens)
        gen = _apply_stop(await engine.submit("generate", prompt, k, group(req, max_tokens)),
                          [req.stop] if isinstance(req.stop, str) else (req.stop or []), tokenizer)
        tok = _Tokens(tokenizer, req.return_tokens_as_token_ids)
        metrics.answers += 1
        metrics.prompt_tokens += gen.prompt_tokens
        metrics.completion_tokens += len(gen.token_ids)
        return {"id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion", "created": int(time.time()),
                "model": name, "choices": [{
                    "index": 0, "message": {"role": "assistant", "content": gen.text},
                    "finish_reason": gen.finish_reason, "logprobs": _chat_logprobs(gen, k, tok) if req.logprobs else None}],
                "usage": _usage(gen.prompt_tokens, len(gen.token_ids))}

    @app.post("/v1/completions")
    async def completions_route(request: Request):
        return await handle(request, "/v1/completions", complete)

    @app.post("/v1/chat/completions")
    async def chat_route(request: Request):
        return await handle(request, "/v1/chat/completions", chat)

    @app.get("/v1/models")
    async def models_route(request: Request):
        if not authorized(request):
            return APIError(401, "invalid or missing API key", "authentication_error").response()
        return {"object": "list", "data": [{"id": name, "object": "model", "created": 0, "owned_by": "distillab",
                                            "max_model_len": context}]}

    @app.get("/metrics")
    async def metrics_route(request: Request):
        if not authorized(request):
            return APIError(401, "invalid or missing API key", "authentication_error").response()
        return PlainTextResponse(metrics.render(), media_type="text/plain; version=0.0.4")

    @app.get("/health")
    async def health():
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
    """The model's chat template when its tokenizer has one; else the messages' contents joined by newlines
    (so a one-message chat to a lab model sees exactly the prompt a completions request would)."""
    for m in messages:
        if isinstance(m.get("content"), list):  # content parts: keep the text ones
            m["content"] = "".join(p.get("text", "") for p in m["content"] if p.get("type") == "text")
        m["content"] = m.get("content") or ""
    if getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        bos = tokenizer.bos_token
        # generate() tokenizes with special tokens; a template that writes BOS itself would get two.
        if bos and text.startswith(bos) and tokenizer("")["input_ids"][:1] == [tokenizer.bos_token_id]:
            text = text[len(bos):]
        return text
    return "\n".join(m["content"] for m in messages)


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
          fault_seed: int = 0, max_batch: int = 32, log_level: str = "warning", **app_kwargs) -> None:
    """Serve until interrupted. Binds 127.0.0.1 unless told otherwise: exposing a model is a choice."""
    import uvicorn

    faults = FaultConfig(rate=fault_rate, seed=fault_seed)
    app = create_app(model_dir, api_key=api_key, faults=faults, max_batch=max_batch, **app_kwargs)
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


def main(argv: list[str] | None = None) -> None:
    """`python -m distillab.serve MODEL_DIR ...`: the same as `distillab serve`, for subprocess tests."""
    import argparse

    p = argparse.ArgumentParser(prog="python -m distillab.serve", description=__doc__.split("\n")[0])
    p.add_argument("model_dir", help="HF model directory or lab:NAME")
    p.add_argument("--host", default="127.0.0.1", help="interface to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key-env", default=None, help="environment variable holding the API key clients must send")
    p.add_argument("--fault-rate", type=float, default=0.0, help="fraction of requests answered with an injected fault")
    p.add_argument("--fault-seed", type=int, default=0)
    p.add_argument("--max-batch", type=int, default=32)
    args = p.parse_args(argv)
    api_key = os.environ.get(args.api_key_env) if args.api_key_env else None
    serve(args.model_dir, host=args.host, port=args.port, api_key=api_key, fault_rate=args.fault_rate,
          fault_seed=args.fault_seed, max_batch=args.max_batch)


if __name__ == "__main__":
    main()
