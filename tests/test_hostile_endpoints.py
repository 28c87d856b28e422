"""The OpenAI-compatible teacher against endpoints that lie: a bare http.server on 127.0.0.1 (a real thread answering
real HTTP, no mock of our code) sending NaN or positive logprobs, usage as strings or below 0, Retry-After 3600, or a
body dripped a byte at a time. Each ends as a counted, failed request in bounded time, nothing of it cached."""

from __future__ import annotations

import json
import logging
import sqlite3
import threading
import time
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import openai
import pytest

from distillab.config import TeacherConfig
from distillab.errors import UserError
from distillab.generate import run_generate
from distillab.pricing import BudgetGuard, TeacherPricing
from distillab.teachers.openai_compat import MAX_RETRY_AFTER_S, OpenAITeacher
from tests.helpers import generate_config

quiet = dict(log=lambda *_: None)
pytestmark = pytest.mark.filterwarnings("ignore::distillab.pricing.UnpricedTeacherWarning")


def completion(top_logprobs=None, usage=None) -> dict:
    """A completions body answering "ab" in two tokens, with the given top-k rows and usage."""
    return {
        "choices": [
            {
                "text": "ab",
                "finish_reason": "stop",
                "logprobs": {
                    "tokens": ["a", "b"],
                    "text_offset": [0, 1],
                    "top_logprobs": top_logprobs or [{"a": -0.1, "c": -2.5}, {"b": -0.2}],
                },
            }
        ],
        "usage": {"prompt_tokens": 5, "completion_tokens": 2} if usage is None else usage,
    }


class _Hostile(BaseHTTPRequestHandler):
    """Answers every POST with the class's reply (status, headers, body), dripping the body drip_s apart per byte
    when drip_s is set; counts the requests."""

    status, body, drip_s = 200, b"{}", 0.0
    headers_out: dict[str, str] = {}  # (`headers` are the request's)
    hits = 0

    def do_POST(self):  # noqa: N802 - http.server's name
        type(self).hits += 1
        self.rfile.read(int(self.headers.get("Content-Length", 0)))
        self.send_response(self.status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(self.body)))
        for name, value in self.headers_out.items():
            self.send_header(name, value)
        self.end_headers()
        try:
            if not self.drip_s:
                self.wfile.write(self.body)
                return
            for i in range(len(self.body)):
                self.wfile.write(self.body[i : i + 1])
                self.wfile.flush()
                time.sleep(self.drip_s)
        except OSError:  # the client gave up: so do we
            pass

    def log_message(self, *args):  # quiet
        pass


@contextmanager
def hostile(body=None, status: int = 200, headers=None, drip_s: float = 0.0):
    """A server on 127.0.0.1 answering every request with body (a dict, sent as JSON with NaN allowed); yields
    (its base_url, its handler class, whose .hits counts requests)."""
    raw = json.dumps(body if body is not None else completion()).encode()
    handler = type(
        "Handler", (_Hostile,), {"status": status, "headers_out": headers or {}, "body": raw, "drip_s": drip_s}
    )
    handler.hits = 0
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.01}, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_port}/v1", handler
    finally:
        server.shutdown()
        server.server_close()


def ask(url: str | list[str], **teacher) -> tuple:
    """(response, error, attempts, seconds) for one request through the teacher's whole answer path."""
    cfg = TeacherConfig(model="m", base_url=url, top_k_logprobs=5, **({"max_retries": 2} | teacher))
    client = OpenAITeacher(cfg, backoff_base_s=0.001, backoff_max_s=0.002)
    done = []
    began = time.monotonic()
    client.answer(
        [client.request("x")], lambda req, resp, error, latency, attempts: done.append((resp, error, attempts))
    )
    ((resp, error, attempts),) = done
    return resp, error, attempts, time.monotonic() - began


# ----------------------------------------------------------------------------------------------------
# Responses refused: retried, then failed with one line naming the endpoint and the problem.

NAN = float("nan")


@pytest.mark.parametrize(
    "body, says",
    [
        (completion([{"a": NAN}, {"b": -0.2}]), "a logprob of nan"),
        (completion([{"a": 0.5}, {"b": -0.2}]), "a logprob of 0.5"),
        (completion([{"a": float("inf")}, {"b": -0.2}]), "a logprob of inf"),
        (completion([{"a": -0.1}, {"b": "-0.2"}]), "a logprob is not a number ('-0.2')"),
        (completion([{"a": -0.1, "c": -0.2, "d": -0.3}, {"b": -0.2}]), "top-k probabilities sum to 2.46, over 1"),
        (completion([{"a": -0.1}]), "2 completion tokens but 1 top-k rows"),
        (
            completion(usage={"prompt_tokens": -6000000000, "completion_tokens": 2}),
            "usage.prompt_tokens of -6000000000",
        ),
        (
            completion(usage={"prompt_tokens": 5, "completion_tokens": "lots"}),
            "usage.completion_tokens is not a number",
        ),
        (completion(usage={"prompt_tokens": 5, "completion_tokens": 1e30}), "usage.completion_tokens of 1e+30"),
        (completion(usage={"prompt_tokens": 2.5, "completion_tokens": 2}), "usage.prompt_tokens of 2.5"),
        (completion(usage="free"), "usage is not an object"),
        ({"choices": [{"text": "ab", "logprobs": {"tokens": "ab", "top_logprobs": 7}}]}, "unexpected shape"),
    ],
    ids=[
        "nan",
        "positive",
        "inf",
        "string-logprob",
        "mass",
        "rows",
        "neg-usage",
        "word-usage",
        "huge",
        "frac",
        "usage",
        "shape",
    ],
)
def test_a_bad_response_is_a_retried_failure_naming_the_endpoint(body, says):
    with hostile(body) as (url, server):
        resp, error, attempts, _ = ask(url, max_retries=2)
    assert resp is None and server.hits == attempts == 3  # retried like a 5xx: another try may be sane
    assert error.startswith("MalformedResponse: ") and says in error, error
    assert f"[at {url}]" in error and "\n" not in error


def test_usage_as_numeric_strings_is_read_as_numbers():
    usage = {"prompt_tokens": "7", "completion_tokens": " 2 ", "completion_tokens_details": {"reasoning_tokens": "0"}}
    with hostile(completion(usage=usage)) as (url, server):
        resp, error, attempts, _ = ask(url)
    assert error is None and attempts == server.hits == 1
    assert (resp["prompt_tokens"], resp["completion_tokens"]) == (7, 2)
    assert resp["tokens"] == ["a", "b"] and resp["top_logprobs"] == [[-0.1, -2.5], [-0.2]]


def test_nan_logprobs_are_never_cached_and_a_rerun_asks_again(tmp_path):
    with hostile(completion([{"a": NAN}, {"b": -0.2}])) as (url, server):
        cfg = generate_config(tmp_path, {"model": "m", "base_url": url, "max_retries": 1}, n_prompts=3)
        with pytest.raises(UserError, match="every teacher request failed") as err:
            run_generate(cfg, **quiet)
        assert "a logprob of nan" in str(err.value) and url in str(err.value) and "\n" not in str(err.value)
        first = server.hits
        assert first == 3 * 2  # 3 prompts, each sent 1 + max_retries times
        db = sqlite3.connect(cfg.run_dir / "teacher.sqlite")
        assert db.execute("SELECT COUNT(*) FROM responses").fetchone()[0] == 0
        assert db.execute("SELECT COUNT(*) FROM failures").fetchone()[0] == 3
        db.close()
        with pytest.raises(UserError, match="every teacher request failed"):
            run_generate(cfg, **quiet)
        assert server.hits == 2 * first  # asked again, not answered from a poisoned cache


# ----------------------------------------------------------------------------------------------------
# Money: usage strings count, negative usage pays nothing, max_usd needs a price.

PRICE = {"usd_per_1m_input": 1.0, "usd_per_1m_output": 1.0}


def test_string_usage_counts_against_max_usd(tmp_path):
    """Each answer reports "500000" + "500000" tokens: $1 at $1/1M. 10 prompts project $10 > max_usd $2.5, so the
    first answer stops the run, one request paid."""
    usage = {"prompt_tokens": "500000", "completion_tokens": "500000"}
    with hostile(completion(usage=usage)) as (url, server):
        teacher = {"model": "m", "base_url": url, "concurrency": 1, "max_usd": 2.5, **PRICE}
        cfg = generate_config(tmp_path, teacher, n_prompts=10)
        with pytest.raises(UserError, match=r"projected teacher spend \$10.0000 would pass max_usd \$2.5000"):
            run_generate(cfg, **quiet)
    assert server.hits == 1


def test_negative_usage_is_a_failure_never_a_negative_spend(tmp_path):
    usage = {"prompt_tokens": -200_000_000, "completion_tokens": 2}
    with hostile(completion(usage=usage)) as (url, server):
        teacher = {"model": "m", "base_url": url, "max_retries": 0, "max_usd": 0.01, **PRICE}
        cfg = generate_config(tmp_path, teacher, n_prompts=30)
        with pytest.raises(UserError, match="every teacher request failed") as err:
            run_generate(cfg, **quiet)
    assert "usage.prompt_tokens of -200000000 is no token count" in str(err.value)
    assert server.hits == 30  # each sent once (max_retries 0), none answered, nothing spent
    db = sqlite3.connect(cfg.run_dir / "teacher.sqlite")
    assert db.execute("SELECT COUNT(*) FROM responses").fetchone()[0] == 0
    db.close()


def test_max_usd_without_a_price_is_refused_before_any_request(tmp_path):
    with hostile() as (url, server):
        cfg = generate_config(tmp_path, {"model": "m", "base_url": url, "max_usd": 5.0}, n_prompts=3)
        with pytest.raises(UserError) as err:
            run_generate(cfg, **quiet)
    assert str(err.value).startswith(
        "teacher.max_usd needs a price: set teacher.usd_per_1m_input and teacher.usd_per_1m_output"
    )
    assert server.hits == 0 and "\n" not in str(err.value)


def test_max_usd_of_a_local_or_priced_teacher_is_kept():
    local = TeacherPricing(status="local", model="lab:teacher", usd_per_1m_input=0.0, usd_per_1m_output=0.0)
    assert BudgetGuard(1.0, local, total=3).projected == 0.0
    priced = TeacherPricing(status="override", model="m", usd_per_1m_input=1.0, usd_per_1m_output=1.0)
    guard = BudgetGuard(1.0, priced, total=3, prior_usage={"requests": 1, "prompt_tokens": 10**6})
    assert guard.projected == 4.0  # $1 already spent + 3 requests at the earlier $1 a request
    unpriced = TeacherPricing(status="unpriced", model="m", reason="genai-prices: no provider")
    assert BudgetGuard(None, unpriced, total=3).projected is None  # no max_usd: unpriced is fine


# ----------------------------------------------------------------------------------------------------
# Time: Retry-After capped under a request deadline, a dripping body cut at timeout_s.


def _rate_limited(retry_after: str):
    response = httpx.Response(429, headers={"retry-after": retry_after}, request=httpx.Request("POST", "http://h/v1"))
    return openai.RateLimitError("rate limited", response=response, body=None)


def test_retry_after_is_capped_and_an_over_long_ask_is_logged_once(caplog):
    teacher = OpenAITeacher(TeacherConfig(model="m", base_url="http://127.0.0.1:9/v1"))
    with caplog.at_level(logging.WARNING, logger="distillab.teacher"):
        waits = [teacher._wait_s(_rate_limited("3600"), 1, "http://127.0.0.1:9/v1") for _ in range(6)]
        assert 30 <= teacher._wait_s(_rate_limited("30"), 1, "http://127.0.0.1:9/v1") <= 33  # under the cap: as asked
    assert all(MAX_RETRY_AFTER_S <= w <= 1.1 * MAX_RETRY_AFTER_S for w in waits)
    lines = [r.getMessage() for r in caplog.records]
    assert lines == ["http://127.0.0.1:9/v1 asks to retry after 3600s: waiting 60s at most (and 420s a request in all)"]


@pytest.mark.parametrize("deadline", [None, 2.0], ids=["timeout-x-retries", "request_deadline_s"])
def test_retry_after_3600_fails_the_request_within_its_deadline(deadline, caplog):
    """Retry-After 3600 (capped at 60 s) can never be waited inside a 2 s deadline (or timeout_s 0.25 x 7 = 1.75 s):
    the request fails at once, sent once, instead of an hour of silence."""
    with hostile({"error": {"message": "slow down"}}, status=429, headers={"Retry-After": "3600"}) as (url, server):
        with caplog.at_level(logging.WARNING, logger="distillab.teacher"):
            resp, error, attempts, seconds = ask(url, max_retries=6, timeout_s=0.25, request_deadline_s=deadline)
    assert resp is None and server.hits == attempts == 1 and seconds < 1.5
    assert error.startswith("RateLimitError: HTTP 429: slow down (not retried: past the request's deadline of ")
    assert sum("asks to retry after 3600s" in r.getMessage() for r in caplog.records) == 1


def test_retry_after_3600_from_every_replica_fails_within_the_deadline(caplog):
    """Two replicas, each asking for an hour: the request moves from the first to the second (not a retry), then
    both are backed off 60 s, past the 1.75 s deadline: it fails at once instead of waiting for one to come back."""
    slow_down = ({"error": {"message": "slow down"}}, 429, {"Retry-After": "3600"})
    with hostile(*slow_down) as (first, one), hostile(*slow_down) as (second, other):
        with caplog.at_level(logging.WARNING, logger="distillab.teacher"):
            resp, error, attempts, seconds = ask([first, second], max_retries=6, timeout_s=0.25)
    assert resp is None and one.hits == other.hits == 1 and attempts == 2 and seconds < 1.5
    assert "past the request's deadline of 1.75s" in error and "[at http://127.0.0.1:" in error
    assert sum("asks to retry after 3600s" in r.getMessage() for r in caplog.records) == 2  # once per endpoint


def test_a_dripping_body_is_cut_at_timeout_s_and_retried():
    """Each byte arrives 0.1 s after the last (no read ever waits past httpx's timeouts), a ~300-byte body: ~30 s.
    timeout_s = 1 bounds each whole attempt: two attempts (max_retries 1) take ~2 s, then a timeout failure."""
    with hostile(drip_s=0.1) as (url, server):
        resp, error, attempts, seconds = ask(url, max_retries=1, timeout_s=1.0)
    assert resp is None and server.hits == attempts == 2
    assert error.startswith("APITimeoutError: ") and 1.9 < seconds < 4.0
