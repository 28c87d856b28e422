"""`Server`: what the endpoints do, apart from HTTP routing and the model. It checks a body against the limits
(`ServeLimits`), submits its prompts to an engine, shapes the answer as OpenAI's and counts it. It needs no
HTTP and no model: its unit tests give it a fake engine."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import json
import logging
import time
import uuid
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from fastapi import Request
from fastapi.responses import Response
from pydantic import ValidationError
from starlette.requests import ClientDisconnect

from distillab import chat, reasoning
from distillab.sampling import Generation
from distillab.serve.engine import on_start
from distillab.serve.faults import FaultConfig, fault_response
from distillab.serve.metrics import Metrics
from distillab.serve.protocol import (
    APIError,
    BaseRequest,
    ChatRequest,
    CompletionRequest,
    TokenStrings,
    apply_stop,
    chat_logprobs,
    choice_logprobs,
    json_bytes,
    stop_strings,
    usage,
)

log = logging.getLogger("distillab.serve")
# --reasoning-parser: the inline tags a model's trace is cut out by (vLLM's parser names for the <think> models too)
REASONING_PARSERS = {
    "think": ("<think>", "</think>"),
    "deepseek_r1": ("<think>", "</think>"),
    "qwen3": ("<think>", "</think>"),
}


@dataclass
class ServeLimits:
    """What one request, one client and the replay store may hold; past a request's or a client's limit the request
    gets a 4xx that says which limit and its value."""

    max_request_bytes: int = 1 << 20  # a bigger body is a 413
    max_json_depth: int = 64  # nesting of the body's JSON (an OpenAI request nests about 5 deep)
    max_tokens: int = 1024  # per request, and never past the model's context
    max_prompts: int = 256  # prompts in one completions request
    default_max_tokens: int = 16  # OpenAI's default for completions
    # Token slots one request may fill: tokens it may return (prompts x max_tokens, plus the prompts when
    # echoed) x (1 + top logprobs). The model's time and the response's size both grow with it.
    max_request_work: int = 1 << 18
    # Token slots (counted as above) one client (its address) may have queued or running at once; a request past it
    # is a 429 with Retry-After, so one client cannot fill the queue for all. 16 requests of the largest size.
    max_client_work: int = 1 << 22
    # Bytes of answers kept for Idempotency-Key replays; the least recently used are dropped past it.
    idempotency_max_bytes: int = 256 << 20


@dataclass
class CompletionPlan:
    """A validated completions request, tokenized: what goes to the engine and what the response needs."""

    req: CompletionRequest
    ids: list[list[int]]  # per prompt: its token ids (what echo scores and usage counts)
    texts: list[str]  # per prompt: its text (generate() takes text)
    max_tokens: int
    k: int  # top logprobs per token
    stops: list[str]
    work: int  # token slots (Server.check_work)


@dataclass
class ChatPlan:
    req: ChatRequest
    prompt: str  # the messages rendered by the chat template
    max_tokens: int
    k: int
    stops: list[str]
    work: int


class Server:
    """What the endpoints do, apart from HTTP routing and the model: check a body against the limits, submit
    its prompts to the engine, shape the answer as OpenAI's, count it in the metrics.

    `engine` is anything with `async submit(kind, prompt, k, group)` answering a Generation (kind "generate",
    prompt text) or a score dict (kind "score", prompt ids; see `engine.score_prompts`): the batching `Engine`
    in the app, a fake in unit tests. `context` is the model's positions. The CPU work of a request (parsing,
    tokenizing, building and encoding the response) runs in `cpu_worker`, one thread of its own that alone
    uses `tokenizer`: the event loop stays free for /health, and the model thread has its own tokenizer.
    """

    def __init__(
        self,
        engine,
        tokenizer,
        name: str,
        context: int,
        limits: ServeLimits | None = None,
        metrics: Metrics | None = None,
        faults: FaultConfig | None = None,
        api_key: str | None = None,
        token_ids_extension: bool = True,
        reasoning_parser: str | None = None,
    ):
        self.engine, self.tokenizer, self.name, self.context = engine, tokenizer, name, context
        # a chat answer's inline trace goes to message.reasoning_content (as vLLM's --reasoning-parser does)
        self.think_tags = REASONING_PARSERS[reasoning_parser] if reasoning_parser else None
        self.limits = limits or ServeLimits()
        self.metrics = metrics or Metrics()
        self.faults = faults or FaultConfig()
        self.api_key = api_key
        # False answers `return_tokens_as_token_ids` with OpenAI's 400 for an unknown argument.
        self.token_ids_extension = token_ids_extension
        self.idem = _IdempotencyStore(self.limits.idempotency_max_bytes)
        self.queued: dict[str, int] = {}  # client -> token slots it has queued or running (max_client_work)
        self.cpu_worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="distillab-http")
        self.token_strings: dict = {}  # shared TokenStrings cache

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
        """Auth, size limit, JSON, faults, idempotency; then `await answer(body, client)`, given up (its prompts
        taken off the queue) when the client disconnects first. Counts every outcome (a client gone: 499)."""
        try:
            if not self.authorized(request.headers.get("authorization")):  # the message never echoes what was sent
                raise APIError(
                    401, "invalid or missing API key (send Authorization: Bearer <key>)", "authentication_error"
                )
            raw = await _read_body(request, self.limits.max_request_bytes)
            body, digest = await self._on_cpu(self.parse_body, raw)
            kind = self.faults.pick(digest)
            if kind:
                self.metrics.faults.labels(kind=kind).inc()
                response = await fault_response(kind, self.faults, request)
            else:
                key = request.headers.get("idempotency-key")
                client = request.client.host if request.client else None

                async def encoded() -> bytes:
                    return await self._on_cpu(json_bytes, await answer(body, client))

                work = self.idem.run(f"{key}:{digest}", encoded, self.metrics) if key else encoded()
                response = Response(await _unless_disconnected(request, work), media_type="application/json")
        except APIError as err:
            response = err.response()
            if err.status == 429:
                response.headers["Retry-After"] = "1"
        except (ClientGone, ClientDisconnect):
            response = Response(status_code=499)  # nobody reads it: counted, as nginx counts a closed request
        except Exception:
            log.exception("request failed")
            response = APIError(500, "internal server error", "server_error").response()
        self.metrics.requests.labels(endpoint=endpoint, code=str(response.status_code)).inc()
        return response

    def models_list(self) -> dict:
        return {
            "object": "list",
            "data": [
                {
                    "id": self.name,
                    "object": "model",
                    "created": 0,
                    "owned_by": "distillab",
                    "max_model_len": self.context,
                }
            ],
        }

    # -- checks ----------------------------------------------------------------------------------------

    def validate(self, cls: type[BaseRequest], body: dict) -> BaseRequest:
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
            raise APIError(
                400,
                f"max_tokens {max_tokens} is over this server's limit of {self.limits.max_tokens}",
                param="max_tokens",
            )
        if prompt_len + max_tokens > self.context:
            raise APIError(
                400,
                f"prompt ({prompt_len} tokens) + max_tokens ({max_tokens}) is over the model's "
                f"context of {self.context} tokens",
                param="max_tokens",
            )

    def check_work(self, n_prompts: int, max_tokens: int, echoed_tokens: int, k: int) -> int:
        """The token slots a request may fill; over max_request_work (see ServeLimits) it is refused."""
        work = (n_prompts * max_tokens + echoed_tokens) * (1 + k)
        limit = self.limits.max_request_work
        if work > limit:
            echo = f" + {echoed_tokens} echoed prompt tokens" if echoed_tokens else ""
            raise APIError(
                400,
                f"request too large: ({n_prompts} prompts x {max_tokens} max_tokens{echo}) x "
                f"(1 + {k} top logprobs) = {work:,} token slots, over this server's limit of "
                f"{limit:,} per request; ask for fewer prompts, tokens or logprobs",
                param="max_tokens",
            )
        return work

    @contextlib.contextmanager
    def admitted(self, client: str | None, work: int):
        """A request's token slots counted against its client while it is queued or running; past max_client_work
        a 429 (with Retry-After). client None (the Batch API's own lines): not counted."""
        if client is None:
            yield
            return
        held, limit = self.queued.get(client, 0), self.limits.max_client_work
        if held and held + work > limit:  # a lone request always fits: max_request_work bounds it
            raise APIError(
                429,
                f"too much work queued from this client: {held:,} token slots waiting + {work:,} is over this "
                f"server's limit of {limit:,} per client; retry when earlier requests are answered",
                "rate_limit_error",
            )
        self.queued[client] = held + work
        try:
            yield
        finally:
            self.queued[client] -= work
            if not self.queued[client]:
                del self.queued[client]

    @staticmethod
    def group(req: BaseRequest, max_tokens: int) -> tuple:
        """The batching key: requests with equal keys run in one model call."""
        if req.temperature == 0:  # greedy: top_p and seed do not matter, so all greedy requests batch together
            return ("generate", max_tokens, 0.0, 1.0, 0)
        return ("generate", max_tokens, req.temperature, req.top_p, req.seed)

    # -- completions -----------------------------------------------------------------------------------

    def plan_completion(self, body: dict) -> CompletionPlan:
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
        work = self.check_work(len(ids), max_tokens, sum(map(len, ids)) if req.echo else 0, k)
        # Token-id prompts are decoded for generation (generate() takes text): exact for tokenizers that
        # round-trip, as the lab's does; echo scoring always uses the ids as given.
        texts = [p if isinstance(p, str) else tokenizer.decode(p, skip_special_tokens=True) for p in prompts]
        return CompletionPlan(
            req=req, ids=ids, texts=texts, max_tokens=max_tokens, k=k, stops=stop_strings(req), work=work
        )

    async def complete(self, body: dict, client: str | None = None) -> dict:
        plan = await self._on_cpu(self.plan_completion, body)
        submit, tasks = self.engine.submit, []
        with self.admitted(client, plan.work):
            if plan.max_tokens > 0:
                group = self.group(plan.req, plan.max_tokens)
                tasks.append(asyncio.gather(*[submit("generate", t, plan.k, group) for t in plan.texts]))
            if plan.req.echo:
                tasks.append(asyncio.gather(*[submit("score", p, plan.k, ("score",)) for p in plan.ids]))
            results = await asyncio.gather(*tasks)
        gens = results[0] if plan.max_tokens > 0 else None
        scores = results[-1] if plan.req.echo else None
        return await self._on_cpu(self.completion_response, plan, gens, scores)

    def completion_response(
        self, plan: CompletionPlan, gens: list[Generation] | None, scores: list[dict] | None
    ) -> dict:
        """The response object from the engine's answers (gens: None when max_tokens is 0; scores: when echoed)."""
        req, tokenizer = plan.req, self.tokenizer
        if gens is not None:
            gens = [apply_stop(g, plan.stops, tokenizer) for g in gens]
        tok = TokenStrings(tokenizer, req.return_tokens_as_token_ids, self.token_strings)
        choices, prompt_total, completion_total = [], 0, 0
        for i, p in enumerate(plan.ids):
            gen = gens[i] if gens else Generation(text="", token_ids=[], prompt_tokens=len(p), finish_reason="length")
            text = (plan.texts[i] if req.echo else "") + gen.text
            logprobs = None
            if req.logprobs is not None:
                logprobs = choice_logprobs(p, scores[i] if scores else None, gen, plan.k, tok, plan.texts[i])
            choices.append({"index": i, "text": text, "finish_reason": gen.finish_reason, "logprobs": logprobs})
            prompt_total += len(p)
            completion_total += len(gen.token_ids)
        self.metrics.answers.inc(len(plan.ids))
        self.metrics.prompt_tokens.inc(prompt_total)
        self.metrics.completion_tokens.inc(completion_total)
        return {
            "id": f"cmpl-{uuid.uuid4().hex}",
            "object": "text_completion",
            "created": int(time.time()),
            "model": self.name,
            "choices": choices,
            "usage": usage(prompt_total, completion_total),
        }

    # -- chat ------------------------------------------------------------------------------------------

    def plan_chat(self, body: dict) -> ChatPlan:
        req = self.validate(ChatRequest, body)
        k = (req.top_logprobs or 0) if req.logprobs else 0
        prompt = chat_prompt(self.tokenizer, [m.model_dump() for m in req.messages])
        prompt_len = len(self.tokenizer(prompt)["input_ids"])
        max_tokens = req.max_completion_tokens or req.max_tokens
        if not max_tokens:  # not given: the rest of the context, as far as this server's limits allow
            room = self.context - prompt_len
            if room < 1:
                raise APIError(
                    400,
                    f"prompt ({prompt_len} tokens) fills the model's context of {self.context} tokens",
                    param="messages",
                )
            max_tokens = max(1, min(room, self.limits.max_tokens, self.limits.max_request_work // (1 + k)))
        self.check_length(prompt_len, max_tokens)
        work = self.check_work(1, max_tokens, 0, k)
        return ChatPlan(req=req, prompt=prompt, max_tokens=max_tokens, k=k, stops=stop_strings(req), work=work)

    async def chat(self, body: dict, client: str | None = None) -> dict:
        plan = await self._on_cpu(self.plan_chat, body)
        with self.admitted(client, plan.work):
            gen = await self.engine.submit("generate", plan.prompt, plan.k, self.group(plan.req, plan.max_tokens))
        return await self._on_cpu(self.chat_response, plan, gen)

    def chat_response(self, plan: ChatPlan, gen: Generation) -> dict:
        req = plan.req
        gen = apply_stop(gen, plan.stops, self.tokenizer)
        tok = TokenStrings(self.tokenizer, req.return_tokens_as_token_ids, self.token_strings)
        self.metrics.answers.inc()
        self.metrics.prompt_tokens.inc(gen.prompt_tokens)
        self.metrics.completion_tokens.inc(len(gen.token_ids))
        message, details = self._message(gen)
        return {
            "id": f"chatcmpl-{uuid.uuid4().hex}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": self.name,
            "choices": [
                {
                    "index": 0,
                    "message": message,
                    "finish_reason": gen.finish_reason,
                    "logprobs": chat_logprobs(gen, plan.k, tok) if req.logprobs else None,
                }
            ],
            "usage": usage(gen.prompt_tokens, len(gen.token_ids)) | details,
        }

    def _message(self, gen: Generation) -> tuple[dict, dict]:
        """(the assistant message, extra usage): with a reasoning parser, an inline trace goes to reasoning_content
        (None when there is none) and its tokens, tags included, to usage.completion_tokens_details.reasoning_tokens;
        logprobs still cover every generated token, the trace's too (as vLLM's do)."""
        if self.think_tags is None:
            return {"role": "assistant", "content": gen.text}, {}
        split = reasoning.split_inline(gen.text, self.think_tags)
        if split.reasoning is None:
            return {"role": "assistant", "content": gen.text, "reasoning_content": None}, {}
        ids = gen.token_ids
        n = reasoning.count_tokens(
            len(ids), lambda t: len(self.tokenizer.decode(ids[:t], skip_special_tokens=True)), split.end
        )
        return (
            {"role": "assistant", "content": split.answer, "reasoning_content": split.reasoning},
            {"completion_tokens_details": {"reasoning_tokens": n}},
        )


def chat_prompt(tokenizer, messages: list[dict]) -> str:
    """chat.render_prompt: the model's chat template when its tokenizer has one; else the messages' contents
    joined by newlines (so a one-message chat to a lab model sees exactly the prompt a completions request would,
    and a student is asked as it was trained)."""
    for m in messages:
        m["content"] = chat.text_content(m.get("content")) or ""
    try:
        return chat.render_prompt(tokenizer, messages)
    except chat.TemplateRefused as err:  # roles out of order, a role the template does not know, ...
        raise APIError(400, f"messages: {err}", param="messages") from None


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


class ClientGone(Exception):
    """The client disconnected before its answer was ready: the work is given up."""


async def _unless_disconnected(request: Request, work):
    """`await work`, unless the client disconnects first: then the work is cancelled (its prompts still queued are
    dropped by the engine, never computed) and ClientGone raised. uvicorn's receive() answers http.disconnect once
    the connection is lost (the body is read by then)."""

    async def gone() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass

    task, watcher = asyncio.ensure_future(work), asyncio.ensure_future(gone())
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
    if task.done():
        return task.result()
    task.cancel()
    raise ClientGone


@dataclass
class _Running:
    task: asyncio.Task | None = None  # the answer being computed, shared by every request with its key
    waiters: int = 0  # the requests waiting for it; the last to leave before it is done cancels it...
    started: bool = False  # ...unless the engine has begun computing it: then it is finished and kept

    def start(self) -> None:
        self.started = True


class _IdempotencyStore:
    """Answers (their JSON bytes) by Idempotency-Key (+ body digest): done ones are replayed, running ones joined.
    Bounded in bytes (ServeLimits.idempotency_max_bytes): the least recently used are dropped past the bound, and an
    answer larger than the whole bound is not kept. An answer every requester of which has disconnected is cancelled
    while it is still queued (nothing is computed or kept of it); once a batch holding any of its prompts has begun
    it is finished and kept, because a client that sent a key retries with it (a killed `generate`, resumed) and must
    be replayed the answer already computed, not pay for it twice."""

    def __init__(self, max_bytes: int):
        self.max_bytes, self.size = max_bytes, 0
        self.done: OrderedDict[str, bytes] = OrderedDict()
        self.running: dict[str, _Running] = {}

    async def run(self, key: str, answer, metrics: Metrics) -> bytes:
        if key in self.done:
            self.done.move_to_end(key)
            metrics.replays.inc()
            return self.done[key]
        joined = key in self.running
        if not joined:
            running = self.running[key] = _Running()
            running.task = asyncio.ensure_future(self._compute(key, answer, running))
            running.task.add_done_callback(lambda t: t.cancelled() or t.exception())  # retrieved: may be unwaited
        running = self.running[key]
        running.waiters += 1
        try:
            payload = await asyncio.shield(running.task)
        finally:
            running.waiters -= 1
            if not running.waiters and not running.started and not running.task.done():
                running.task.cancel()
        if joined:  # counted when delivered: a joiner that leaves first was replayed nothing
            metrics.replays.inc()
        return payload

    async def _compute(self, key: str, answer, running: _Running) -> bytes:
        on_start.set(running.start)  # this task's context: the engine marks it started
        try:
            payload = await answer()
        finally:
            self.running.pop(key, None)
        self.keep(key, payload)
        return payload

    def keep(self, key: str, payload: bytes) -> None:
        if len(payload) > self.max_bytes:
            return
        self.done[key] = payload
        self.size += len(payload)
        while self.size > self.max_bytes:
            _, dropped = self.done.popitem(last=False)
            self.size -= len(dropped)
