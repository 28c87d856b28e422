"""The served model's tokenizer, as files a client can load: a teacher that returns token ids
(`return_tokens_as_token_ids`) returns them in its own vocabulary, and a client whose student has another tokenizer
reads them with this one (generate aligns them onto the student's tokens, distillab.crosstok).

    GET /v1/tokenizer          {"files": [names]}: the tokenizer's save_pretrained files
    GET /v1/tokenizer/{name}   one of them, as bytes

Both need the API key when the server has one. The files are written once, at start-up, from the tokenizer the
server itself encodes and decodes with, and held in memory: what a client loads is what made the ids.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.responses import Response

from distillab.serve.protocol import APIError


def tokenizer_files(tokenizer) -> dict[str, bytes]:
    """The tokenizer's save_pretrained files by name."""
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer.save_pretrained(tmp)
        return {path.name: path.read_bytes() for path in sorted(Path(tmp).iterdir()) if path.is_file()}


def mount_tokenizer(app: FastAPI, tokenizer, unauthorized: Callable[[Request], Response | None]) -> None:
    """GET /v1/tokenizer and /v1/tokenizer/{name} on `app` (the module docstring); unauthorized(request): the app's
    answer to a request without the API key, None for one with it."""
    files = tokenizer_files(tokenizer)

    @app.get("/v1/tokenizer")
    async def listing(request: Request):
        return unauthorized(request) or {"files": sorted(files)}

    @app.get("/v1/tokenizer/{name}")
    async def one_file(name: str, request: Request):
        if name not in files:
            return unauthorized(request) or APIError(404, f"no tokenizer file {name!r}", "not_found_error").response()
        return unauthorized(request) or Response(files[name], media_type="application/octet-stream")
