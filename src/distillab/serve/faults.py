"""Fault injection for tests and benchmarks: at `FaultConfig.rate`, a request gets a 429 with Retry-After, a
500, a hang past the client's timeout, or a truncated JSON body. Which request gets a fault is a seeded hash
of (request body, how many times that body was seen), so a schedule does not depend on arrival order and a
retried request draws again."""

from __future__ import annotations

import asyncio
import hashlib
import math
import time
from collections import Counter
from dataclasses import dataclass, field

from fastapi import Request
from fastapi.responses import Response

from distillab.serve.protocol import APIError


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


async def fault_response(kind: str, faults: FaultConfig, request: Request) -> Response:
    """The response of an injected fault of this kind."""
    if kind == "429":
        headers = {
            "Retry-After": str(max(1, math.ceil(faults.retry_after_s))),  # standard: whole seconds
            "retry-after-ms": str(int(faults.retry_after_s * 1000)),
        }  # what OpenAI's clients read first
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
    return Response(
        '{"id": "cmpl-truncated", "object": "text_completion", "choices": [{"text": "',
        status_code=200,
        media_type="application/json",
    )
