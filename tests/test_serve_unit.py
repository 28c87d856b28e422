"""serve.Server's request logic without a model: a fake engine answers with canned Generations, the lab
tokenizer is built in-process. (tests/test_serve.py runs the real server.)"""

from __future__ import annotations

import asyncio
import json
import math
import subprocess
import sys

import pytest

from distillab.lab.tokenizer import build_tokenizer
from distillab.sampling import Generation
from distillab.serve import APIError, Metrics, ServeLimits, Server
from distillab.serve.protocol import json_bytes
from distillab.testing import parse_metrics

CONTEXT = 64


class FakeEngine:
    """Records what it is asked; "generate" answers the canned completion, "score" a fixed logprob per token."""

    def __init__(self, tokenizer, completion: str = "cba", top_k: int = 3):
        self.tokenizer, self.completion, self.top_k = tokenizer, completion, top_k
        self.calls: list[tuple] = []

    async def submit(self, kind, prompt, k, group):
        self.calls.append((kind, prompt, k, group))
        if kind == "score":
            n = len(prompt) - 1
            return {
                "token_logprobs": [-1.0] * n,
                "top_ids": [list(range(4, 4 + k))] * n,
                "top_logprobs": [[-0.5 - j for j in range(k)]] * n,
            }
        ids = self.tokenizer(self.completion, add_special_tokens=False)["input_ids"] + [self.tokenizer.eos_token_id]
        return Generation(
            text=self.completion,
            token_ids=ids,
            prompt_tokens=len(self.tokenizer(prompt)["input_ids"]),
            finish_reason="stop",
            top_ids=[[t] + list(range(4, 4 + k - 1)) for t in ids],
            top_logprobs=[[-0.1 * (j + 1) for j in range(k)] for _ in ids],
            token_logprobs=[-0.1] * len(ids),
        )


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer()


def make_server(tokenizer, **limits) -> tuple[Server, FakeEngine]:
    engine = FakeEngine(tokenizer)
    return Server(engine, tokenizer, "tiny", CONTEXT, limits=ServeLimits(**limits), metrics=Metrics()), engine


def api_error(fn, *args) -> APIError:
    with pytest.raises(APIError) as err:
        fn(*args)
    return err.value


# ----------------------------------------------------------------------------------------------------
# Bodies and validation.


def test_parse_body_refuses_what_is_not_a_plain_json_object(tokenizer):
    server, _ = make_server(tokenizer)
    deep = b'{"model": "tiny", "prompt": "x", "stop": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    nested = lambda n: json.dumps({"model": "tiny", "x": json.loads("[" * n + "]" * n)}).encode()  # noqa: E731
    cases = {
        deep: "nested deeper than 64",  # past the JSON parser's own recursion limit: was a 500
        nested(64): "nested deeper than 64",  # the object is level 1, its innermost list level 65
        rb'{"model": "tiny", "prompt": "\ud800"}': "not valid Unicode",  # no tokenizer takes a lone surrogate
        b'{"max_tokens": ' + b"9" * 5000 + b"}": "not valid JSON",  # Python refuses ints of over 4,300 digits
        b"{not json": "not valid JSON",
        b"\xff\xfe": "not valid JSON",
        b"[1, 2]": "must be a JSON object",
    }
    for raw, needle in cases.items():
        err = api_error(server.parse_body, raw)
        assert err.status == 400 and needle in err.message, (raw[:40], err.message)
    body, digest = server.parse_body(nested(63))  # 64 levels: accepted
    assert body["model"] == "tiny"
    assert server.parse_body(b'{"b": 1, "a": [2]}')[1] == server.parse_body(b'{"a": [2], "b": 1}')[1]


def test_validate_names_the_bad_field(tokenizer):
    server, _ = make_server(tokenizer)
    from distillab.serve import ChatRequest, CompletionRequest

    ok = {"model": "tiny", "prompt": "x"}
    assert server.validate(CompletionRequest, ok).prompt == "x"
    for body, status, needle in [
        ({**ok, "model": "other"}, 404, "not found"),
        ({**ok, "n": 2}, 400, "n = 1"),
        ({**ok, "stream": True}, 400, "streaming"),
        ({**ok, "seed": 1 << 64}, 400, "seed"),  # torch.manual_seed overflows: was a 500 for the whole batch
        ({**ok, "logprobs": 21}, 400, "logprobs"),
    ]:
        err = api_error(server.validate, CompletionRequest, body)
        assert (err.status, needle in err.message) == (status, True), err.message
    parts = {"model": "tiny", "messages": [{"role": "user", "content": [{"type": "text", "text": 5}]}]}
    err = api_error(server.validate, ChatRequest, parts)  # text that is not a string: was a 500 in chat_prompt
    assert err.status == 400 and err.param.startswith("messages.0.content")
    no_ext = Server(None, tokenizer, "tiny", CONTEXT, token_ids_extension=False)
    assert api_error(no_ext.validate, CompletionRequest, {**ok, "return_tokens_as_token_ids": True}).status == 400


def test_check_length_against_the_limit_and_the_context(tokenizer):
    server, _ = make_server(tokenizer, max_tokens=32)
    server.check_length(CONTEXT - 32, 32)
    assert "limit of 32" in api_error(server.check_length, 1, 33).message
    assert f"context of {CONTEXT}" in api_error(server.check_length, CONTEXT - 31, 32).message


def test_work_limit_refuses_the_53_second_request_before_the_engine(tokenizer):
    # The request of the issue: 256 prompts x 240 tokens with top-20 logprobs, 3 KB of JSON.
    server, engine = make_server(tokenizer, max_tokens=1024)
    server.context = 1024
    body = {"model": "tiny", "prompt": ["add 1+2\n"] * 256, "max_tokens": 240, "logprobs": 20}
    err = api_error(server.plan_completion, body)
    assert err.status == 400
    assert "1,290,240" in err.message and "262,144" in err.message  # the cost and the limit
    with pytest.raises(APIError):
        asyncio.run(server.complete(body))
    assert engine.calls == []  # refused before any model work
    # at the limit exactly it passes; echo counts the prompt tokens it returns; the limit is configurable
    small, _ = make_server(tokenizer, max_request_work=2 * 10 * 3)
    small.plan_completion({"model": "tiny", "prompt": ["ab", "cd"], "max_tokens": 10, "logprobs": 2})
    err = api_error(
        small.plan_completion, {"model": "tiny", "prompt": ["ab", "cd"], "max_tokens": 10, "logprobs": 2, "echo": True}
    )
    assert "6 echoed prompt tokens" in err.message and "limit of 60" in err.message  # <bos>ab twice
    assert (
        api_error(
            small.plan_chat,
            {
                "model": "tiny",
                "messages": [{"role": "user", "content": "ab"}],
                "max_tokens": 21,
                "logprobs": True,
                "top_logprobs": 2,
            },
        ).status
        == 400
    )


def test_greedy_requests_share_a_group_whatever_their_sampling_knobs(tokenizer):
    from distillab.serve import CompletionRequest

    def group(**kw):
        return Server.group(CompletionRequest(model="tiny", prompt="x", **kw), 8)

    assert group(temperature=0, top_p=0.5, seed=3) == group(temperature=0) == ("generate", 8, 0.0, 1.0, 0)
    assert group(temperature=0.7, top_p=0.9, seed=3) == ("generate", 8, 0.7, 0.9, 3)
    assert group(temperature=0.7, seed=3) != group(temperature=0.7, seed=4)


# ----------------------------------------------------------------------------------------------------
# Responses from the engine's answers.


def test_completion_response_shape_logprobs_and_metrics(tokenizer):
    server, engine = make_server(tokenizer)
    body = {
        "model": "tiny",
        "prompt": ["reverse abc\n", "reverse xy\n"],
        "max_tokens": 5,
        "logprobs": 2,
        "temperature": 0,
    }
    r = asyncio.run(server.complete(body))
    assert [c[0] for c in engine.calls] == ["generate", "generate"] and engine.calls[0][3] == (
        "generate",
        5,
        0.0,
        1.0,
        0,
    )
    prompt_tokens = len("reverse abc\n") + len("reverse xy\n") + 2  # a token per character, plus <bos> each
    assert r["usage"] == {"prompt_tokens": prompt_tokens, "completion_tokens": 8, "total_tokens": prompt_tokens + 8}
    first = r["choices"][0]
    assert first["text"] == "cba" and first["finish_reason"] == "stop"
    lp = first["logprobs"]
    assert lp["tokens"] == ["c", "b", "a", "<eos>"] and lp["token_logprobs"] == [-0.1] * 4
    assert lp["top_logprobs"][0] == {"c": -0.1, tokenizer.decode([4]): -0.2}  # k = 2 of the engine's 3
    assert lp["text_offset"] == [12, 13, 14, 15]  # from the start of the prompt; <eos> adds no text
    assert server.metrics.value("distillab_answers_total") == 2
    assert server.metrics.value("distillab_completion_tokens_total") == 8


def test_completion_stop_echo_and_token_ids(tokenizer):
    server, engine = make_server(tokenizer)
    ids = tokenizer("ab")["input_ids"]
    r = asyncio.run(
        server.complete(
            {
                "model": "tiny",
                "prompt": ids,
                "max_tokens": 4,
                "echo": True,
                "logprobs": 1,
                "stop": "a",
                "return_tokens_as_token_ids": True,
            }
        )
    )
    choice = r["choices"][0]
    assert choice["text"] == "ab" + "cb" and choice["finish_reason"] == "stop"  # echoed prompt, cut before "a"
    lp = choice["logprobs"]
    assert lp["tokens"] == [f"token_id:{i}" for i in ids + tokenizer("cb", add_special_tokens=False)["input_ids"]]
    assert lp["token_logprobs"][:3] == [None, -1.0, -1.0] and lp["top_logprobs"][0] is None
    assert lp["text_offset"][:3] == [0, 0, 1]  # <bos> is no text
    assert sorted(c[0] for c in engine.calls) == ["generate", "score"]
    assert [c[1] for c in engine.calls if c[0] == "score"] == [ids]  # echo scores the ids as given
    # max_tokens 0 with echo: scoring only, nothing generated
    engine.calls.clear()
    r = asyncio.run(server.complete({"model": "tiny", "prompt": "ab", "max_tokens": 0, "echo": True, "logprobs": 0}))
    assert [c[0] for c in engine.calls] == ["score"] and r["usage"]["completion_tokens"] == 0


def test_chat_response_and_logprobs_format(tokenizer):
    server, engine = make_server(tokenizer)
    r = asyncio.run(
        server.chat(
            {
                "model": "tiny",
                "messages": [
                    {
                        "role": "user",
                        "content": [
                            {"type": "text", "text": "reverse abc\n"},
                            {"type": "image_url", "image_url": {"url": "x"}},
                        ],
                    }
                ],
                "max_tokens": 6,
                "logprobs": True,
                "top_logprobs": 2,
            }
        )
    )
    assert engine.calls[0][1] == "reverse abc\n"  # text parts only; no template: the bare content
    message = r["choices"][0]
    assert message["message"] == {"role": "assistant", "content": "cba"}
    content = message["logprobs"]["content"]
    assert [c["token"] for c in content] == ["c", "b", "a", "<eos>"]
    assert content[0]["bytes"] == [ord("c")] and len(content[0]["top_logprobs"]) == 2
    assert content[0]["top_logprobs"][0] == {"token": "c", "logprob": -0.1, "bytes": [ord("c")]}
    plain = asyncio.run(
        server.chat({"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 6})
    )
    assert plain["choices"][0]["logprobs"] is None


def test_chat_without_max_tokens_gets_the_rest_of_the_context(tokenizer):
    server, engine = make_server(tokenizer)
    prompt = "reverse abc\n"
    plan = server.plan_chat({"model": "tiny", "messages": [{"role": "user", "content": prompt}]})
    assert plan.max_tokens == CONTEXT - (len(prompt) + 1)  # was min(1024, 256) = 256: a 400 on a short context
    asyncio.run(server.chat({"model": "tiny", "messages": [{"role": "user", "content": prompt}]}))
    assert engine.calls[0][3][1] == CONTEXT - (len(prompt) + 1)
    # ... as far as this server's limits allow
    capped, _ = make_server(tokenizer, max_tokens=10)
    assert capped.plan_chat({"model": "tiny", "messages": [{"role": "user", "content": prompt}]}).max_tokens == 10
    budget, _ = make_server(tokenizer, max_request_work=63)
    plan = budget.plan_chat(
        {"model": "tiny", "messages": [{"role": "user", "content": prompt}], "logprobs": True, "top_logprobs": 20}
    )
    assert plan.max_tokens == 3  # 3 x (1 + 20) = 63
    full = {"model": "tiny", "messages": [{"role": "user", "content": "x" * (CONTEXT - 1)}]}
    err = api_error(server.plan_chat, full)
    assert err.status == 400 and "fills the model's context" in err.message


def test_a_chat_template_that_refuses_the_messages_is_a_400(tokenizer):
    import copy

    tok = copy.deepcopy(tokenizer)
    tok.chat_template = (
        "{% for m in messages %}{% if m['role'] == 'assistant' and loop.first %}"
        "{{ raise_exception('Conversation must start with the user') }}{% endif %}"
        "{{ m['content'] }}{% endfor %}"
    )
    server = Server(FakeEngine(tok), tok, "tiny", CONTEXT)
    err = api_error(server.plan_chat, {"model": "tiny", "messages": [{"role": "assistant", "content": "hi"}]})
    assert err.status == 400 and "start with the user" in err.message  # was a 500
    assert server.plan_chat({"model": "tiny", "messages": [{"role": "user", "content": "hi"}]}).prompt == "hi"


def test_authorization(tokenizer):
    server = Server(None, tokenizer, "tiny", CONTEXT, api_key="sk-1")
    assert server.authorized("Bearer sk-1")
    assert not server.authorized("Bearer sk-2") and not server.authorized(None) and not server.authorized("sk-1")
    assert Server(None, tokenizer, "tiny", CONTEXT).authorized(None)


def test_json_bytes_is_the_payload_encoded_a_choice_at_a_time():
    payload = {
        "id": "x",
        "object": "text_completion",
        "choices": [{"text": "é\n", "n": [1, None]}, {"text": ""}],
        "usage": {"total_tokens": 3},
    }
    raw = json_bytes(payload)
    assert json.loads(raw) == payload and "é".encode() in raw and b" " not in raw
    assert json.loads(json_bytes({"choices": []})) == {"choices": []}
    with pytest.raises(ValueError):  # as JSONResponse: NaN and infinities are not JSON
        json_bytes({"id": "x", "choices": [{"logprob": -math.inf}]})


def test_metrics_are_prometheus_text_with_the_served_names():
    metrics, other = Metrics(), Metrics()
    metrics.requests.labels(endpoint="/v1/completions", code="200").inc()
    metrics.answers.inc(2)
    metrics.faults.labels(kind="429").inc()
    text = metrics.render().decode()
    for name in [
        "requests",
        "prompt_tokens",
        "completion_tokens",
        "answers",
        "idempotent_replays",
        "batches",
        "batched_prompts",
        "faults_injected",
    ]:
        assert f"# TYPE distillab_{name}_total counter" in text
    values = parse_metrics(text)
    assert values['distillab_requests_total{endpoint="/v1/completions",code="200"}'] == 1  # labels in any order
    assert values.get('distillab_requests_total{code="200",endpoint="/v1/completions"}') == 1
    assert values['distillab_faults_injected_total{kind="429"}'] == 1
    assert values["distillab_answers_total"] == 2 and values["distillab_batches_total"] == 0
    assert parse_metrics(other.render().decode())["distillab_answers_total"] == 0  # each app counts apart


# ----------------------------------------------------------------------------------------------------
# The one CLI.


@pytest.mark.parametrize("port", ["70000", "-1"])
def test_serve_port_out_of_range_is_one_line(port, tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "distillab", "serve", "lab:base", f"--port={port}"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2
    assert "Traceback" not in result.stderr + result.stdout
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and f"port {port}" in lines[0] and "65535" in lines[0], result.stderr


def test_serve_module_has_no_second_cli():
    import distillab.serve

    assert not hasattr(distillab.serve, "main")  # `distillab serve` (typer) is the only command line


# ----------------------------------------------------------------------------------------------------
# Bounded: the idempotency store in bytes, a client's queued work, abandoned answers cancelled.


def test_idempotency_store_keeps_the_most_recent_answers_that_fit_its_bytes():
    from distillab.serve.server import _IdempotencyStore

    store, metrics, computed = _IdempotencyStore(max_bytes=100), Metrics(), []

    def answer(key: str, size: int):
        async def compute() -> bytes:
            computed.append(key)
            return key.encode() * size

        return store.run(key, compute, metrics)

    async def scenario():
        for key, size in [("a", 40), ("b", 30), ("c", 30), ("d", 20), ("e", 120)]:  # e: over the whole bound
            await answer(key, size)
        assert list(store.done) == ["b", "c", "d"] and store.size == 80 <= 100  # a dropped for d; e never kept
        await answer("b", 30)  # a replay: b becomes the most recent
        await answer("a", 40)  # recomputed; the least recently used (c) makes room
        assert list(store.done) == ["d", "b", "a"] and store.size == 90

    asyncio.run(scenario())
    assert computed == ["a", "b", "c", "d", "e", "a"]
    assert metrics.value("distillab_idempotent_replays_total") == 1


def test_an_answer_is_cancelled_only_when_every_requester_has_gone():
    from distillab.serve.server import _IdempotencyStore

    store, metrics = _IdempotencyStore(max_bytes=1 << 20), Metrics()
    started, cancelled = [], []

    async def slow() -> bytes:
        started.append(1)
        try:
            await asyncio.sleep(0.2)
        except asyncio.CancelledError:
            cancelled.append(1)
            raise
        return b"done"

    async def scenario():
        first = asyncio.ensure_future(store.run("k", slow, metrics))
        second = asyncio.ensure_future(store.run("k", slow, metrics))  # joins the first
        await asyncio.sleep(0.05)
        first.cancel()  # one requester leaves: the other still waits, so the work goes on
        assert await second == b"done" and not cancelled
        third = asyncio.ensure_future(store.run("other", slow, metrics))
        await asyncio.sleep(0.05)
        third.cancel()  # its only requester leaves: cancelled, and nothing is kept
        await asyncio.gather(third, return_exceptions=True)
        await asyncio.sleep(0)
        assert cancelled and "other" not in store.done and "other" not in store.running

    asyncio.run(scenario())
    assert len(started) == 2


def test_an_answer_whose_batch_has_begun_is_finished_and_kept_when_its_requester_leaves():
    """A killed `generate` retries with the same Idempotency-Key: an answer the engine has begun computing must be
    there to replay (cancelled, it was computed, lost and computed again: 61 answers for 60 prompts)."""
    from distillab.serve.engine import on_start
    from distillab.serve.server import _IdempotencyStore

    store, metrics = _IdempotencyStore(max_bytes=1 << 20), Metrics()
    computed = []

    async def begun() -> bytes:
        on_start.get()()  # what the engine does when a batch holding this answer's prompts starts
        await asyncio.sleep(0.1)
        computed.append(1)
        return b"answer"

    async def scenario():
        first = asyncio.ensure_future(store.run("k", begun, metrics))
        await asyncio.sleep(0.02)
        first.cancel()  # the only requester leaves after the batch began
        await asyncio.gather(first, return_exceptions=True)
        await asyncio.sleep(0.15)
        assert store.done == {"k": b"answer"} and not store.running
        assert await store.run("k", begun, metrics) == b"answer"  # the retry: replayed, not computed again

    asyncio.run(scenario())
    assert computed == [1] and metrics.value("distillab_idempotent_replays_total") == 1


def test_a_clients_queued_work_is_bounded_and_released(tokenizer):
    server, _ = make_server(tokenizer, max_client_work=100)
    with server.admitted("10.0.0.1", 60):
        with server.admitted("10.0.0.2", 60):  # another client has its own share
            pass
        err = api_error(lambda: server.admitted("10.0.0.1", 60).__enter__())
        assert err.status == 429 and "limit of 100 per client" in err.message
        with server.admitted(None, 10**9):  # the Batch API's lines are not a client's
            pass
    assert server.queued == {}
    with server.admitted("10.0.0.1", 500):  # a lone request always fits (max_request_work bounds it)
        assert server.queued == {"10.0.0.1": 500}
