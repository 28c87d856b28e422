"""The OpenAI-compatible teacher against a real `distillab serve` on 127.0.0.1 (no mocks), and a bare http.server
on 127.0.0.1 for the status codes and error bodies serve never sends."""

from __future__ import annotations

import email.utils
import json
import math
import sqlite3
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import openai
import pyarrow.parquet as pq
import pytest

from distillab.cache import RequestCache
from distillab.config import TeacherConfig, to_toml
from distillab.dataset import read_dataset
from distillab.errors import UserError
from distillab.files import write_atomic
from distillab.generate import run_generate
from distillab.lab.tokenizer import build_tokenizer
from distillab.serve import FaultConfig, ServeLimits
from distillab.teachers.openai_compat import OpenAITeacher, _retry_after_s, map_top_tokens
from distillab.testing import metric_sum, server_thread
from distillab.testing import read_metrics as metrics
from tests.helpers import generate_config

quiet = dict(log=lambda *_: None)
# A teacher on 127.0.0.1 is unpriced, and says so; that warning is expected here.
pytestmark = pytest.mark.filterwarnings("ignore::distillab.pricing.UnpricedTeacherWarning")


def test_request_is_canonical_and_holds_no_key(monkeypatch):
    monkeypatch.setenv("TEACHER_KEY", "sk-secret-123")
    cfg = TeacherConfig(model="m", base_url="http://127.0.0.1:9/v1/", api_key_env="TEACHER_KEY", mode="chat")
    req = OpenAITeacher(cfg).request("hi\n")
    assert req == {
        "endpoint": "http://127.0.0.1:9/v1",
        "model": "m",
        "mode": "chat",
        "max_tokens": 64,
        "temperature": 0.0,
        "top_p": 1.0,
        "logprobs": 20,
        "messages": [{"role": "user", "content": "hi\n"}],
    }
    assert "sk-secret" not in repr(req)
    assert OpenAITeacher(cfg.model_copy(update={"mode": "completions"})).request("hi\n")["prompt"] == "hi\n"


def test_missing_key_variable_is_a_one_line_user_error(monkeypatch):
    monkeypatch.delenv("NO_SUCH_KEY_VAR", raising=False)
    teacher = OpenAITeacher(TeacherConfig(model="m", base_url="http://127.0.0.1:9/v1", api_key_env="NO_SUCH_KEY_VAR"))
    with pytest.raises(UserError, match="NO_SUCH_KEY_VAR") as err:
        teacher.answer([teacher.request("x")], lambda *a: None)
    assert "\n" not in str(err.value)


def test_retry_after_headers_are_read():
    def error(headers):
        response = httpx.Response(429, headers=headers, request=httpx.Request("POST", "http://127.0.0.1/v1"))
        return openai.RateLimitError("rate limited", response=response, body=None)

    assert _retry_after_s(error({"retry-after-ms": "250"})) == 0.25
    assert _retry_after_s(error({"retry-after": "3"})) == 3.0
    assert 59 < _retry_after_s(error({"retry-after": email.utils.formatdate(time.time() + 60, usegmt=True)})) <= 60
    assert _retry_after_s(error({"retry-after": "Wed, 21 Oct 2015 07:28:00 GMT"})) is None  # in the past
    assert _retry_after_s(error({})) is None


# ----------------------------------------------------------------------------------------------------
# Errors a retry cannot fix: sent once, failed with the server's message.


def _ask_once_each(teacher: OpenAITeacher, prompts: list[str]) -> dict[str, tuple]:
    """prompt -> (response, error, attempts) through the teacher's whole answer path."""
    done = {}
    teacher.answer(
        [teacher.request(p) for p in prompts],
        lambda req, resp, error, latency, attempts: done.update({req["prompt"]: (resp, error, attempts)}),
    )
    return done


def test_requests_serve_refuses_are_sent_once_with_the_servers_message(tiny_teacher):
    """serve answers 400 for prompt + max_tokens over the model's context (256 positions) and for a request over
    its work limit; with max_retries = 3 each is sent exactly once (serve's own count), and the failure's error
    text is serve's message."""
    limits = ServeLimits(max_request_work=200)  # 40 tokens x (1 + 5 logprobs) = 240 slots: over; 8 x 6 = 48: fine
    with server_thread(tiny_teacher, model_name="tiny", limits=limits) as server:

        def teacher(max_new_tokens):
            return OpenAITeacher(
                TeacherConfig(
                    model="tiny",
                    base_url=server.base_url,
                    max_new_tokens=max_new_tokens,
                    top_k_logprobs=5,
                    max_retries=3,
                ),
                backoff_base_s=0.001,
            )

        over_context = _ask_once_each(teacher(300), ["abc\n", "abcd\n"])
        over_work = _ask_once_each(teacher(40), ["abc\n"])
        fine = _ask_once_each(teacher(8), ["abc\n"])
        sent = metrics(server.url)
    assert sent.get('distillab_requests_total{endpoint="/v1/completions",code="400"}') == 3  # not 3 x (1 + 3)
    assert sent.get('distillab_requests_total{endpoint="/v1/completions",code="200"}') == 1
    for resp, error, attempts in over_context.values():
        assert resp is None and attempts == 1
        assert error.startswith("BadRequestError: HTTP 400 (not retried): prompt (")
        assert "+ max_tokens (300) is over the model's context of 256 tokens" in error
    ((resp, error, attempts),) = over_work.values()
    assert resp is None and attempts == 1 and "request too large" in error and "limit of 200" in error
    ((resp, error, attempts),) = fine.values()
    assert resp is not None and error is None and attempts == 1


class _Refusing(BaseHTTPRequestHandler):
    """Answers every POST with the class's (status, content type, body) and counts the requests."""

    reply: tuple[int, str, bytes] = (400, "application/json", b"{}")
    hits = 0

    def do_POST(self):  # noqa: N802 - http.server's name
        type(self).hits += 1
        self.rfile.read(int(self.headers.get("Content-Length", 0)))
        status, content_type, body = self.reply
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Retry-After", "0")  # retried ones: at once
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):  # quiet
        pass


OPENAI_BODY = json.dumps({"error": {"message": "the server's words", "type": "invalid_request_error"}}).encode()


@pytest.mark.parametrize(
    "status, content_type, body, sends, says",
    [
        (400, "application/json", OPENAI_BODY, 1, "HTTP 400 (not retried): the server's words"),
        (401, "application/json", OPENAI_BODY, 1, "HTTP 401 (not retried): the server's words"),
        (
            404,
            "application/json",
            json.dumps({"object": "error", "message": "no model x"}).encode(),
            1,  # vLLM
            "HTTP 404 (not retried): no model x",
        ),
        (
            413,
            "text/html",
            b"<html><body>413 Request Entity Too Large</body></html>",
            1,
            "413 Request Entity Too Large",
        ),
        (
            422,
            "application/json",
            json.dumps({"detail": [{"msg": "field required"}]}).encode(),
            1,  # FastAPI
            'HTTP 422 (not retried): [{"msg": "field required"}]',
        ),
        (408, "application/json", OPENAI_BODY, 3, "HTTP 408: the server's words"),
        (409, "application/json", OPENAI_BODY, 3, "HTTP 409: the server's words"),
        (429, "application/json", OPENAI_BODY, 3, "RateLimitError: HTTP 429: the server's words"),
        (503, "text/plain", b"overloaded", 3, "HTTP 503: overloaded"),
    ],
    ids=["400", "401", "404-vllm", "413-html", "422-fastapi", "408", "409", "429", "503-text"],
)
def test_only_statuses_a_retry_can_fix_are_retried(status, content_type, body, sends, says):
    handler = type("Handler", (_Refusing,), {"reply": (status, content_type, body), "hits": 0})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.01}, daemon=True)
    thread.start()
    try:
        cfg = TeacherConfig(model="m", base_url=f"http://127.0.0.1:{server.server_port}/v1", max_retries=2)
        ((resp, error, attempts),) = _ask_once_each(OpenAITeacher(cfg, backoff_base_s=0.001), ["x"]).values()
    finally:
        server.shutdown()
        server.server_close()
    assert handler.hits == attempts == sends  # 1, or 1 + max_retries
    assert resp is None and says in error and "\n" not in error


# ----------------------------------------------------------------------------------------------------
# map_top_tokens: token strings from a server that gives no ids, onto the student's tokenizer.


def test_map_top_tokens_maps_merges_drops_and_appends_stop():
    tok = build_tokenizer()
    a, b, c = (tok.convert_tokens_to_ids(x) for x in "abc")
    resp = {
        "text": "ab",
        "finish_reason": "stop",
        "tokens": ["a", "b"],
        "top_tokens": [["a", "xy", "b"], ["b", "b", "c"]],  # "xy" is two student tokens: dropped
        "top_logprobs": [[-0.1, -2.0, -3.0], [-0.5, -0.5, -4.0]],
    }  # "b" twice: merged
    top_ids, top_lps, completion_ids = map_top_tokens(resp, tok)
    assert completion_ids == [a, b, tok.eos_token_id]  # stopped: end-of-sequence appended
    assert [len(row) for row in top_ids] == [3, 3, 3] and all(len(set(row)) == 3 for row in top_ids)
    assert top_ids[0][:2] == [a, b] and top_lps[0][:2] == [-0.1, -3.0] and top_lps[0][2] == -math.inf
    assert top_ids[1][:2] == [b, c] and math.isclose(top_lps[1][0], math.log(2 * math.exp(-0.5)))
    assert top_ids[2][0] == tok.eos_token_id and top_lps[2][0] == 0.0


def test_map_top_tokens_without_alignment_keeps_only_the_text():
    tok = build_tokenizer()
    resp = {"text": "ab", "finish_reason": "length", "tokens": ["ab"], "top_tokens": [["ab"]], "top_logprobs": [[0.0]]}
    top_ids, top_lps, completion_ids = map_top_tokens(resp, tok)
    assert top_ids is None and top_lps is None
    assert completion_ids == tok("ab", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]


# ----------------------------------------------------------------------------------------------------
# Whole generate runs against serve.


def test_served_teacher_writes_the_same_dataset_as_the_local_one(tmp_path):
    local = run_generate(generate_config(tmp_path, {"model": "lab:base"}, name="local"), **quiet)
    with server_thread("lab:base", max_batch=8) as server:
        served_cfg = generate_config(
            tmp_path, {"model": "lab:base", "base_url": server.base_url, "concurrency": 4}, name="served"
        )
        served = run_generate(served_cfg, **quiet)
    assert local.rows == served.rows == 16 and served.failed == 0
    assert (local.prompt_tokens, local.completion_tokens) == (served.prompt_tokens, served.completion_tokens)
    assert pq.read_schema(tmp_path / "runs/local/data/train.parquet") == pq.read_schema(
        tmp_path / "runs/served/data/train.parquet"
    )
    a = read_dataset(tmp_path / "runs/local/data/train.parquet")
    b = read_dataset(tmp_path / "runs/served/data/train.parquet")
    for x, y in zip(a, b):
        for column in ("prompt", "completion", "prompt_ids", "completion_ids", "source"):
            assert x[column] == y[column], column
        for ids_x, lps_x, ids_y, lps_y in zip(x["top_ids"], x["top_logprobs"], y["top_ids"], y["top_logprobs"]):
            top_x, top_y = dict(zip(ids_x, lps_x)), dict(zip(ids_y, lps_y))
            assert max(top_x, key=top_x.get) == max(top_y, key=top_y.get)  # the same top token
            # the same k ids, up to near-ties at the k-th place, with logprobs equal up to storage rounding
            shared = set(top_x) & set(top_y)
            assert len(shared) >= len(ids_x) - 1
            assert max(abs(top_x[i] - top_y[i]) for i in shared) <= 1 / 16 + 1e-3
        assert x["request_hash"] != y["request_hash"]  # a different endpoint is a different request


def test_a_server_without_token_ids_gives_strings_that_map_to_the_same_dataset(tmp_path, tiny_teacher):
    """A server that refuses return_tokens_as_token_ids (as OpenAI's does) is asked again without it; its
    token strings, mapped through the student's tokenizer, give the rows the ids gave."""
    datasets = {}
    for ids in (True, False):
        with server_thread(tiny_teacher, model_name="tiny", token_ids_extension=ids) as server:
            cfg = generate_config(
                tmp_path,
                {"model": "tiny", "base_url": server.base_url},
                student=tiny_teacher,
                name=f"ids_{ids}",
                n_prompts=8,
            )
            assert run_generate(cfg, **quiet).failed == 0
            requests_400 = metrics(server.url).get('distillab_requests_total{endpoint="/v1/completions",code="400"}', 0)
            # refused only for the requests already out (concurrency 8) when the first refusal came
            assert requests_400 == 0 if ids else 0 < requests_400 <= 8
        datasets[ids] = read_dataset(cfg.run_dir / "data/train.parquet")
    for a, b in zip(datasets[True], datasets[False]):
        for column in ("completion", "completion_ids", "top_ids"):
            assert a[column] == b[column], column
        for lps_a, lps_b in zip(a["top_logprobs"], b["top_logprobs"]):  # batched differently: float noise
            assert max(abs(x - y) for x, y in zip(lps_a, lps_b)) <= 1 / 16 + 1e-4  # up to storage rounding


@pytest.mark.slow
def test_faults_fail_exactly_without_retries_and_never_with_them(tmp_path, tiny_teacher):
    faults = FaultConfig(rate=0.2, seed=0, hang_s=5.0, retry_after_s=0.05)
    with server_thread(tiny_teacher, model_name="tiny", faults=faults, max_batch=16) as server:
        teacher = {
            "model": "tiny",
            "base_url": server.base_url,
            "concurrency": 8,
            "timeout_s": 2.5,
            "max_new_tokens": 4,
        }
        cfg = generate_config(
            tmp_path, {**teacher, "max_retries": 0}, student=tiny_teacher, name="no_retries", n_prompts=40
        )
        summary = run_generate(cfg, **quiet)
        injected = metric_sum(metrics(server.url), "distillab_faults_injected_total")
        assert 0 < summary.failed == injected < 40  # every fault is exactly one failed request
        assert summary.rows == 40 - summary.failed
        cache = RequestCache(cfg.run_dir / "teacher.sqlite")
        assert len(cache.failures()) == summary.failed
        kinds = {f["error"].split(":")[0] for f in cache.failures()}
        # seed 0 gives every kind of fault here: 429, 500, a hang past the timeout, a truncated body
        assert kinds == {"RateLimitError", "InternalServerError", "APITimeoutError", "JSONDecodeError"}
        cache.close()

        cfg = generate_config(
            tmp_path, {**teacher, "max_retries": 8}, student=tiny_teacher, name="retries", n_prompts=40
        )
        summary = run_generate(cfg, **quiet)
        injected_here = metric_sum(metrics(server.url), "distillab_faults_injected_total") - injected
        assert summary.failed == 0 and summary.rows == 40 and injected_here > 0
        # every injected fault cost exactly one extra attempt, and the cache's attempt counts say so
        attempts = sqlite3.connect(cfg.run_dir / "teacher.sqlite").execute("SELECT SUM(attempts) FROM responses")
        assert attempts.fetchone()[0] == 40 + injected_here


def test_the_api_key_never_reaches_the_run_directory(tmp_path, tiny_teacher, monkeypatch):
    good, bad = "sk-FAKE-good-7f3a9c", "sk-FAKE-bad-1b2d4e"
    with server_thread(tiny_teacher, model_name="tiny", api_key=good) as server:
        cfg = generate_config(
            tmp_path,
            {"model": "tiny", "base_url": server.base_url, "api_key_env": "DL_TEST_KEY", "max_retries": 1},
            student=tiny_teacher,
            n_prompts=6,
        )
        write_atomic(cfg.run_dir / "run.toml", to_toml(cfg))
        monkeypatch.setenv("DL_TEST_KEY", bad)  # rejected with a 401: recorded failures, with their messages
        with pytest.raises(
            UserError,
            match=r"every teacher request failed \(6x AuthenticationError: HTTP 401 "
            r"\(not retried\): invalid or missing API key",
        ):
            run_generate(cfg, **quiet)
        cache = RequestCache(cfg.run_dir / "teacher.sqlite")
        assert [f["attempts"] for f in cache.failures()] == [1] * 6  # max_retries = 1, but a 401 is sent once
        cache.close()
        monkeypatch.setenv("DL_TEST_KEY", good)
        summary = run_generate(cfg, **quiet)
        assert summary.failed == 0 and summary.rows == 6
    assert "DL_TEST_KEY" in (cfg.run_dir / "run.toml").read_text()  # the variable's name, not its value
    files = [p for p in cfg.run_dir.rglob("*") if p.is_file()]
    assert any(p.name.startswith("teacher.sqlite") for p in files)
    for path in files:
        data = path.read_bytes()
        for key in (good, bad):
            assert key.encode() not in data and key.encode("utf-16-le") not in data, path
