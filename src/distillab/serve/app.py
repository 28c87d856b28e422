"""The FastAPI app: `create_app` loads the model and wires the routes to a `Server`; `serve` runs it under
uvicorn until interrupted."""

from __future__ import annotations

import asyncio
import copy
from contextlib import asynccontextmanager
from dataclasses import replace
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.responses import PlainTextResponse, Response

from distillab import models
from distillab.errors import UserError
from distillab.serve.batches import BatchDelays, mount_batches
from distillab.serve.engine import Engine
from distillab.serve.faults import FaultConfig
from distillab.serve.protocol import APIError
from distillab.serve.server import REASONING_PARSERS, ServeLimits, Server
from distillab.serve.tokenizer_files import mount_tokenizer


def create_app(
    model_dir,
    api_key: str | None = None,
    faults: FaultConfig | None = None,
    max_batch: int = 32,
    batch_wait_ms: float = 5.0,
    limits: ServeLimits | None = None,
    model_name: str | None = None,
    token_ids_extension: bool = True,
    reasoning_parser: str | None = None,
    batch_delay_s: float = 0.0,
) -> FastAPI:
    """The FastAPI app serving `model_dir` (an HF directory or lab:NAME). Loads the model now.

    token_ids_extension=False answers `return_tokens_as_token_ids` with OpenAI's 400 for an unknown
    argument, to test clients against a server that only gives token strings. `app.state.server` is the
    `Server`, `app.state.engine` its engine. reasoning_parser ("think", or vLLM's "deepseek_r1" / "qwen3"): a chat
    answer's inline <think> trace is returned in message.reasoning_content, apart from its content. batch_delay_s: a
    batch waits this long before its lines run (the Batch API: distillab.serve.batches, `app.state.batches`).
    """
    model, tokenizer = models.load(model_dir)
    name = model_name or (str(model_dir) if str(model_dir).startswith("lab:") else Path(model_dir).name)
    # The model thread gets its own tokenizer: a fast tokenizer changes its padding settings while it
    # encodes, and two threads doing that at once fail ("Already borrowed").
    engine = Engine(model, copy.deepcopy(tokenizer), max_batch=max_batch, batch_wait_ms=batch_wait_ms)
    context = getattr(model.config, "max_position_embeddings", None) or 1 << 30
    server = Server(
        engine,
        tokenizer,
        name,
        context,
        limits=limits,
        metrics=engine.metrics,
        faults=faults,
        api_key=api_key,
        token_ids_extension=token_ids_extension,
        reasoning_parser=reasoning_parser,
    )

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
        return unauthorized(request) or PlainTextResponse(
            server.metrics.render(), media_type="text/plain; version=0.0.4"
        )

    mount_batches(app, server, BatchDelays(run_s=batch_delay_s))  # /v1/files, /v1/batches

    mount_tokenizer(app, tokenizer, unauthorized)  # /v1/tokenizer: its files, to read the ids it returns

    @app.get("/health")
    async def health():  # on the event loop, touching nothing the model or a request holds
        return {"status": "ok"}

    return app


def serve(
    model_dir,
    host: str = "127.0.0.1",
    port: int = 8000,
    api_key: str | None = None,
    fault_rate: float = 0.0,
    fault_seed: int = 0,
    max_batch: int = 32,
    max_request_work: int | None = None,
    max_client_work: int | None = None,
    idempotency_max_mb: float | None = None,
    log_level: str = "warning",
    **app_kwargs,
) -> None:
    """Serve until interrupted. Binds 127.0.0.1 unless told otherwise: exposing a model is a choice.
    A port outside 1-65535, or a limit below 1 (idempotency_max_mb: below 0), is a UserError, raised before the model
    loads. The limits (ServeLimits) left None keep their defaults."""
    import uvicorn

    if not 1 <= port <= 65535:
        raise UserError(f"port {port} is out of range: choose one from 1 to 65535")
    parser = app_kwargs.get("reasoning_parser")
    if parser is not None and parser not in REASONING_PARSERS:
        raise UserError(f"--reasoning-parser {parser!r} is not known: choose one of {', '.join(REASONING_PARSERS)}")
    limits = app_kwargs.pop("limits", None) or ServeLimits()
    for name, value in (("max_request_work", max_request_work), ("max_client_work", max_client_work)):
        if value is not None and value < 1:
            raise UserError(f"{name} must be at least 1 (got {value})")
        limits = limits if value is None else replace(limits, **{name: value})
    if idempotency_max_mb is not None:
        if not idempotency_max_mb >= 0:
            raise UserError(f"idempotency_max_mb must be 0 or more (got {idempotency_max_mb})")
        limits = replace(limits, idempotency_max_bytes=int(idempotency_max_mb * (1 << 20)))
    faults = FaultConfig(rate=fault_rate, seed=fault_seed)
    app = create_app(model_dir, api_key=api_key, faults=faults, max_batch=max_batch, limits=limits, **app_kwargs)
    uvicorn.run(app, host=host, port=port, log_level=log_level)
