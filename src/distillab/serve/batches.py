"""The OpenAI Batch API on `distillab serve`: files and batches, each JSONL line of a batch answered in the background
by the same Server.complete / Server.chat as /v1/completions and /v1/chat/completions (the engine batches them with
every other request).

    POST /v1/files                  multipart: file (JSONL) and purpose = "batch" -> a file object
    GET  /v1/files/{id}             the file object
    GET  /v1/files/{id}/content     its bytes: an input file, or a batch's output or error file
    POST /v1/batches                {input_file_id, endpoint, completion_window: "24h", metadata} -> a batch
    GET  /v1/batches                the batches, newest first (limit, after: the SDK's pages)
    GET  /v1/batches/{id}           a batch: status, request_counts, output_file_id, error_file_id
    POST /v1/batches/{id}/cancel    a batch whose lines have not run is cancelled; one running ends "cancelled"

A batch: validating -> in_progress -> finalizing -> completed; "failed" at once when its input is no batch input (not
JSONL objects, a line whose url is not the batch's endpoint, a custom_id twice), with its errors. A line the handler
refuses (its APIError), or that draws one of serve's injected faults (--fault-rate: a line draws like a request; any
kind is a 429 or a 500 here), goes to the error file with its status and error body, as OpenAI's lines do; the
answered ones to the output file.

State is in memory: files and batches live as long as the serve process, so a client killed at any point finds them
again. A create with an Idempotency-Key already seen answers the batch it made (nothing is submitted twice).
Counted in /metrics (the app's prometheus_client registry): distillab_batches_submitted_total,
distillab_batch_requests_submitted_total (the lines of the batches created: what "no request submitted twice" is
checked against), distillab_batch_files_total (uploads) and distillab_batch_replays_total.

Delays (BatchDelays): a batch waits `run_s` before its lines run, as a provider's queue does (`distillab serve
--batch-delay S`); `upload_s` holds an upload before its body is read, `download_s` a file's content before it is
sent. Tests kill a client inside them: each is counted in distillab_faults_injected_total{kind="batch_<step>_delay"}
when it begins, and read again while it runs, so a test can end it early.
"""

from __future__ import annotations

import asyncio
import email.parser
import email.policy
import hashlib
import json
import logging
import time
import uuid
from dataclasses import dataclass

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import Counter
from starlette.requests import ClientDisconnect

from distillab.serve.protocol import APIError
from distillab.serve.server import Server, _read_body

log = logging.getLogger("distillab.serve")

ENDPOINTS = ("/v1/completions", "/v1/chat/completions")
MAX_FILE_BYTES = 200 << 20  # an input file, as OpenAI's Batch API takes
LINES_IN_FLIGHT = 256  # a batch's lines handed to the engine at once (it batches them)
WINDOW_S = 24 * 3600  # completion_window "24h": a batch's expires_at
HOLD_TICK_S = 0.02  # how often a delay that runs reads its length again


@dataclass
class BatchDelays:
    """Seconds each batch step waits (module docstring); 0: none."""

    upload_s: float = 0.0  # an upload, before its body is read
    run_s: float = 0.0  # a batch, before its lines run
    download_s: float = 0.0  # a file's content, before it is sent


class BatchService:
    """The files and batches of one serve process, in memory, over its Server (module docstring)."""

    def __init__(self, server: Server, delays: BatchDelays | None = None):
        self.server, self.delays = server, delays or BatchDelays()
        self.files: dict[str, dict] = {}  # id -> {"object": the file object, "data": its bytes}
        self.batches: dict[str, dict] = {}  # id -> the batch object, in creation order
        self.idempotent: dict[str, str] = {}  # Idempotency-Key -> the batch it created
        self.running: set[asyncio.Task] = set()
        registry = server.metrics.registry
        self.submitted = Counter("distillab_batches_submitted_total", "Batches created.", registry=registry)
        self.submitted_requests = Counter(
            "distillab_batch_requests_submitted_total", "Requests (lines) of the batches created.", registry=registry
        )
        self.uploaded = Counter("distillab_batch_files_total", "Files uploaded for the Batch API.", registry=registry)
        self.replays = Counter(
            "distillab_batch_replays_total", "Batch creates answered for a repeated Idempotency-Key.", registry=registry
        )

    def mount(self, app: FastAPI) -> None:
        """The routes, on the app."""

        @app.post("/v1/files")
        async def upload_route(request: Request):
            return await self._respond(request, "/v1/files", lambda: self.upload(request))

        @app.get("/v1/files/{file_id}")
        async def file_route(request: Request, file_id: str):
            return await self._respond(request, "/v1/files/{id}", lambda: self._file(file_id)["object"])

        @app.get("/v1/files/{file_id}/content")
        async def content_route(request: Request, file_id: str):
            return await self._respond(request, "/v1/files/{id}/content", lambda: self.content(file_id))

        @app.post("/v1/batches")
        async def create_route(request: Request):
            return await self._respond(request, "/v1/batches", lambda: self.create(request))

        @app.get("/v1/batches")
        async def list_route(request: Request, limit: int = 20, after: str | None = None):
            return await self._respond(request, "/v1/batches (list)", lambda: self.listed(limit, after))

        @app.get("/v1/batches/{batch_id}")
        async def batch_route(request: Request, batch_id: str):
            return await self._respond(request, "/v1/batches/{id}", lambda: self._batch(batch_id))

        @app.post("/v1/batches/{batch_id}/cancel")
        async def cancel_route(request: Request, batch_id: str):
            return await self._respond(request, "/v1/batches/{id}/cancel", lambda: self.cancel(batch_id))

    async def _respond(self, request: Request, endpoint: str, answer) -> Response:
        """Auth, then `answer()` (a dict, a Response, or an awaitable of either); every outcome counted."""
        try:
            if not self.server.authorized(request.headers.get("authorization")):
                raise APIError(
                    401, "invalid or missing API key (send Authorization: Bearer <key>)", "authentication_error"
                )
            payload = answer()
            if asyncio.iscoroutine(payload):
                payload = await payload
            response = payload if isinstance(payload, Response) else JSONResponse(payload)
        except APIError as err:
            response = err.response()
        except ClientDisconnect:  # the client went away mid-upload: nobody reads an answer
            response = APIError(400, "the client disconnected before its body arrived").response()
        except Exception:
            log.exception("batch request failed")
            response = APIError(500, "internal server error", "server_error").response()
        self.server.metrics.requests.labels(endpoint=endpoint, code=str(response.status_code)).inc()
        return response

    async def _hold(self, step: str) -> None:
        """BatchDelays' wait for this step, its length read again every HOLD_TICK_S."""
        if getattr(self.delays, f"{step}_s") <= 0:
            return
        self.server.metrics.faults.labels(kind=f"batch_{step}_delay").inc()
        began = time.monotonic()
        while time.monotonic() - began < getattr(self.delays, f"{step}_s"):
            await asyncio.sleep(HOLD_TICK_S)

    # -- files -------------------------------------------------------------------------------------------

    async def upload(self, request: Request) -> dict:
        await self._hold("upload")
        raw = await _read_body(request, MAX_FILE_BYTES)
        fields = _multipart(raw, request.headers.get("content-type", ""))
        purpose = fields.get("purpose", (None, b""))[1].decode("utf-8", "replace").strip()
        if purpose != "batch":
            raise APIError(400, f'purpose {purpose!r}: this server keeps files for the Batch API only ("batch")')
        if "file" not in fields:
            raise APIError(400, "no file: send the JSONL as the multipart field `file`", param="file")
        filename, data = fields["file"]
        obj = self._store(data, filename or "upload.jsonl", "batch")
        self.uploaded.inc()
        return obj

    def _store(self, data: bytes, filename: str, purpose: str) -> dict:
        obj = {
            "id": f"file-{uuid.uuid4().hex[:24]}",
            "object": "file",
            "bytes": len(data),
            "created_at": int(time.time()),
            "filename": filename,
            "purpose": purpose,
            "status": "processed",
        }
        self.files[obj["id"]] = {"object": obj, "data": data}
        return obj

    def _file(self, file_id: str) -> dict:
        if file_id not in self.files:
            raise APIError(404, f"No such File object: {file_id}", param="file_id")
        return self.files[file_id]

    async def content(self, file_id: str) -> Response:
        stored = self._file(file_id)
        await self._hold("download")
        return Response(stored["data"], media_type="application/octet-stream")

    # -- batches -----------------------------------------------------------------------------------------

    async def create(self, request: Request) -> dict:
        body, _ = self.server.parse_body(await _read_body(request, self.server.limits.max_request_bytes))
        key = request.headers.get("idempotency-key")
        if key and key in self.idempotent:
            self.replays.inc()
            return self.batches[self.idempotent[key]]
        endpoint, window = body.get("endpoint"), body.get("completion_window")
        if endpoint not in ENDPOINTS:
            raise APIError(
                400, f"endpoint {endpoint!r}: this server batches {' and '.join(ENDPOINTS)}", param="endpoint"
            )
        if window != "24h":
            raise APIError(400, f"completion_window {window!r}: only '24h' is supported", param="completion_window")
        metadata = body.get("metadata") or {}
        if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
            raise APIError(400, "metadata must be an object of strings", param="metadata")
        source = self._file(str(body.get("input_file_id")))
        now = int(time.time())
        batch = {
            "id": f"batch_{uuid.uuid4().hex[:24]}",
            "object": "batch",
            "endpoint": endpoint,
            "errors": None,
            "input_file_id": source["object"]["id"],
            "completion_window": window,
            "status": "validating",
            "output_file_id": None,
            "error_file_id": None,
            "created_at": now,
            "in_progress_at": None,
            "expires_at": now + WINDOW_S,
            "finalizing_at": None,
            "completed_at": None,
            "failed_at": None,
            "cancelling_at": None,
            "cancelled_at": None,
            "request_counts": {"total": 0, "completed": 0, "failed": 0},
            "metadata": metadata,
        }
        self.batches[batch["id"]] = batch
        if key:
            self.idempotent[key] = batch["id"]
        self.submitted.inc()
        lines, errors = _input_lines(source["data"], endpoint)
        if errors:
            batch |= {"status": "failed", "failed_at": now, "errors": {"object": "list", "data": errors[:100]}}
            return batch
        self.submitted_requests.inc(len(lines))
        batch["request_counts"]["total"] = len(lines)
        task = asyncio.create_task(self._run(batch, lines))
        self.running.add(task)
        task.add_done_callback(self.running.discard)
        return batch

    def listed(self, limit: int, after: str | None) -> dict:
        newest = list(reversed(self.batches.values()))
        if after is not None:
            ids = [b["id"] for b in newest]
            newest = newest[ids.index(after) + 1 :] if after in ids else []
        page = newest[: max(1, min(limit, 100))]
        return {
            "object": "list",
            "data": page,
            "first_id": page[0]["id"] if page else None,
            "last_id": page[-1]["id"] if page else None,
            "has_more": len(newest) > len(page),
        }

    def _batch(self, batch_id: str) -> dict:
        if batch_id not in self.batches:
            raise APIError(404, f"No such Batch object: {batch_id}", param="batch_id")
        return self.batches[batch_id]

    def cancel(self, batch_id: str) -> dict:
        batch = self._batch(batch_id)
        if batch["status"] in ("validating", "in_progress"):
            batch |= {"status": "cancelling", "cancelling_at": int(time.time())}
        return batch

    async def _run(self, batch: dict, lines: list[dict]) -> None:
        """Answer a batch's lines (after BatchDelays.run_s), then write its output and error files."""
        batch |= {"status": "in_progress", "in_progress_at": int(time.time())}
        await self._hold("run")
        if batch["status"] == "cancelling":  # cancelled before a line ran
            batch |= {"status": "cancelled", "cancelled_at": int(time.time())}
            return
        gate = asyncio.Semaphore(LINES_IN_FLIGHT)
        results = await asyncio.gather(*(self._answer(batch["endpoint"], line, gate) for line in lines))
        cancelled = batch["status"] == "cancelling"  # asked while its lines ran: it ends "cancelled", answers kept
        batch |= {"status": "cancelling" if cancelled else "finalizing", "finalizing_at": int(time.time())}
        answered = [r for r in results if r["response"]["status_code"] == 200]
        refused = [r for r in results if r["response"]["status_code"] != 200]
        for field, part, kind in (("output_file_id", answered, "output"), ("error_file_id", refused, "errors")):
            if part:
                data = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in part).encode()
                batch[field] = self._store(data, f"{batch['id']}_{kind}.jsonl", "batch_output")["id"]
        batch["request_counts"] |= {"completed": len(answered), "failed": len(refused)}
        now = int(time.time())
        batch |= (
            {"status": "cancelled", "cancelled_at": now} if cancelled else {"status": "completed", "completed_at": now}
        )

    async def _answer(self, endpoint: str, line: dict, gate: asyncio.Semaphore) -> dict:
        """One line through the Server's handler -> its output line (a refusal's status and error body included)."""
        body = line["body"]
        async with gate:
            try:
                kind = self.server.faults.pick(hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest())
                if kind:
                    self.server.metrics.faults.labels(kind=kind).inc()
                    limited = kind == "429"
                    raise APIError(429 if limited else 500, f"{kind} (injected fault)", "server_error")
                handler = self.server.complete if endpoint == "/v1/completions" else self.server.chat
                status, payload = 200, await handler(body)
            except APIError as err:
                error = {"message": err.message, "type": err.type, "param": err.param, "code": err.status}
                status, payload = err.status, {"error": error}
            except Exception:
                log.exception("batch line failed")
                status, payload = 500, {"error": {"message": "internal server error", "type": "server_error"}}
        return {
            "id": f"batch_req_{uuid.uuid4().hex[:24]}",
            "custom_id": line["custom_id"],
            "response": {"status_code": status, "request_id": f"req_{uuid.uuid4().hex[:24]}", "body": payload},
            "error": None,
        }


def mount_batches(app: FastAPI, server: Server, delays: BatchDelays | None = None) -> BatchService:
    """The Batch API's routes on `app`, over `server`; the service is `app.state.batches`."""
    service = BatchService(server, delays)
    service.mount(app)
    app.state.batches = service
    return service


def _multipart(raw: bytes, content_type: str) -> dict[str, tuple[str | None, bytes]]:
    """A multipart/form-data body -> {field name: (file name or None, bytes)}, by the standard library's MIME parser."""
    if not content_type.startswith("multipart/form-data"):
        raise APIError(400, "POST /v1/files takes multipart/form-data (fields `file` and `purpose`)")
    head = f"Content-Type: {content_type}\r\n\r\n".encode("latin-1")
    message = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(head + raw)
    if not message.is_multipart():
        raise APIError(400, "the multipart body has no parts")
    fields = {}
    for part in message.iter_parts():
        name = part.get_param("name", header="content-disposition")
        if name:
            fields[name] = (part.get_filename(), part.get_payload(decode=True) or b"")
    return fields


def _input_lines(data: bytes, endpoint: str) -> tuple[list[dict], list[dict]]:
    """A batch's input file -> (its lines, the errors that make it no batch input: OpenAI's error objects)."""
    lines, errors, seen = [], [], set()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        return [], [{"code": "invalid_json_line", "message": "the input file is not UTF-8", "line": None}]
    for number, raw in enumerate(text.splitlines(), start=1):
        if not raw.strip():
            continue
        try:
            line = json.loads(raw)
        except ValueError:
            line = None
        if not isinstance(line, dict) or not isinstance(line.get("body"), dict):
            errors.append({"code": "invalid_json_line", "message": "not a JSON object with a body", "line": number})
        elif line.get("url") != endpoint or line.get("method", "POST") != "POST":
            message = f"url {line.get('url')!r} is not the batch's endpoint {endpoint}"
            errors.append({"code": "mismatched_url", "message": message, "line": number})
        elif not isinstance(line.get("custom_id"), str) or line["custom_id"] in seen:
            message = "custom_id missing or repeated (each line needs its own)"
            errors.append({"code": "duplicate_custom_id", "message": message, "line": number})
        else:
            seen.add(line["custom_id"])
            lines.append(line)
    if not lines and not errors:
        errors.append({"code": "empty_file", "message": "the input file holds no request", "line": None})
    return lines, errors
