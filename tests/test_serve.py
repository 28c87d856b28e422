"""`distillab serve` against real clients on 127.0.0.1: the official openai SDK, raw HTTP, lm-evaluation-harness."""

from __future__ import annotations

import asyncio
import json
import math
import threading
import time

import httpx
import openai
import pytest
import torch

from distillab import models
from distillab.serve import FaultConfig, ServeLimits
from distillab.testing import metric_sum, read_metrics, server_process, server_thread
from tests.helpers import write_jsonl

KEY = "sk-serve-test-0000"


@pytest.fixture(scope="module")
def server(tiny_teacher):
    with server_thread(tiny_teacher, api_key=KEY, model_name="tiny") as s:
        yield s


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.base_url, api_key=KEY, max_retries=0)


@pytest.fixture(scope="module")
def model_and_tokenizer(tiny_teacher):
    return models.load(tiny_teacher, device="cpu")


def direct_logprobs(model, ids: list[int]) -> torch.Tensor:
    """log p(ids[t] | ids[:t]) for t >= 1, straight from the model: the reference for echo scoring."""
    with torch.no_grad():
        lp = model(input_ids=torch.tensor([ids])).logits[0, :-1].float().log_softmax(-1)
    return lp.gather(-1, torch.tensor(ids[1:]).unsqueeze(-1)).squeeze(-1)


def test_completions_with_logprobs_through_the_sdk(client):
    r = client.completions.create(model="tiny", prompt="reverse abc\n", max_tokens=6, temperature=0, logprobs=5)
    choice = r.choices[0]
    lp = choice.logprobs
    assert r.usage.completion_tokens == len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) >= 1
    assert r.usage.prompt_tokens == len("reverse abc\n") + 1  # one token per character, plus <bos>
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    for chosen, top in zip(lp.token_logprobs, lp.top_logprobs):
        assert len(top) == 5 and chosen <= 0
        assert chosen == max(top.values())  # greedy: the chosen token is the top one
    assert lp.text_offset[0] == len("reverse abc\n")
    assert choice.finish_reason in ("stop", "length")


def test_chat_with_top_logprobs_through_the_sdk(client):
    r = client.chat.completions.create(
        model="tiny",
        messages=[{"role": "user", "content": "reverse abc\n"}],
        max_tokens=6,
        temperature=0,
        logprobs=True,
        top_logprobs=20,
    )
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens
    assert all(len(c.top_logprobs) == 20 and c.logprob == c.top_logprobs[0].logprob for c in content)
    bare = client.chat.completions.create(
        model="tiny",
        messages=[{"role": "user", "content": "reverse abc\n"}],
        max_tokens=6,
        temperature=0,
        logprobs=True,
    )
    assert [c.logprob for c in bare.choices[0].logprobs.content] == [c.logprob for c in content]
    assert all(c.top_logprobs == [] for c in bare.choices[0].logprobs.content)
    # the lab tokenizer has no chat template: a one-message chat is the bare prompt, as in completions
    same = client.completions.create(model="tiny", prompt="reverse abc\n", max_tokens=6, temperature=0)
    assert r.choices[0].message.content == same.choices[0].text


def test_echo_scores_the_prompt_like_the_model_does(client, model_and_tokenizer):
    model, tok = model_and_tokenizer
    ids = tok("add 12+30\n")["input_ids"]
    r = client.completions.create(model="tiny", prompt=ids, max_tokens=0, echo=True, logprobs=1)
    lp = r.choices[0].logprobs
    assert lp.token_logprobs[0] is None and len(lp.token_logprobs) == len(ids) == r.usage.prompt_tokens
    assert r.usage.completion_tokens == 0 and r.choices[0].text == "add 12+30\n"
    assert torch.allclose(torch.tensor(lp.token_logprobs[1:]), direct_logprobs(model, ids), atol=1e-4)


def test_token_ids_on_request(client, model_and_tokenizer):
    _, tok = model_and_tokenizer
    r = client.completions.create(
        model="tiny",
        prompt="reverse abc\n",
        max_tokens=4,
        temperature=0,
        logprobs=3,
        extra_body={"return_tokens_as_token_ids": True},
    )
    ids = [int(t.removeprefix("token_id:")) for t in r.choices[0].logprobs.tokens]
    assert tok.decode(ids, skip_special_tokens=True) == r.choices[0].text
    assert all(k.startswith("token_id:") for top in r.choices[0].logprobs.top_logprobs for k in top)


def test_errors_are_openai_shaped_4xx(server):
    url, auth = server.base_url + "/completions", {"Authorization": f"Bearer {KEY}"}
    ok = {"model": "tiny", "prompt": "x", "max_tokens": 2}
    cases = [
        ({}, ok, 401),  # no key
        ({"Authorization": "Bearer wrong"}, ok, 401),
        (auth, {**ok, "max_tokens": 10**6}, 400),
        (auth, {**ok, "max_tokens": 255}, 400),  # prompt + max_tokens past the model's 256 positions
        (auth, {**ok, "model": "nope"}, 404),
        (auth, {**ok, "logprobs": 21}, 400),
        (auth, {**ok, "stream": True}, 400),
        (auth, {"model": "tiny"}, 400),  # no prompt
        (auth, {**ok, "prompt": "x" * (1 << 20)}, 413),
    ]
    for headers, body, status in cases:
        r = httpx.post(url, headers=headers, json=body)
        assert r.status_code == status, (body, r.text[:200])
        assert r.json()["error"]["message"] and KEY not in r.text
    r = httpx.post(url, headers=auth, content=b"{not json")
    assert r.status_code == 400 and "JSON" in r.json()["error"]["message"]
    assert httpx.get(server.base_url + "/models").status_code == 401
    assert httpx.get(server.base_url + "/models", headers=auth).json()["data"][0]["id"] == "tiny"


def test_metrics_count_requests_and_tokens(server, client):
    before = read_metrics(server.url, KEY)
    r = client.completions.create(model="tiny", prompt=["reverse ab\n", "reverse cd\n"], max_tokens=3, temperature=0)
    after = read_metrics(server.url, KEY)
    ok = 'distillab_requests_total{endpoint="/v1/completions",code="200"}'
    assert after[ok] - before.get(ok, 0) == 1
    assert after["distillab_prompt_tokens_total"] - before["distillab_prompt_tokens_total"] == r.usage.prompt_tokens
    assert (
        after["distillab_completion_tokens_total"] - before["distillab_completion_tokens_total"]
        == r.usage.completion_tokens
    )
    assert after["distillab_answers_total"] - before["distillab_answers_total"] == 2


def test_concurrent_requests_are_batched_and_answer_as_alone(server, client):
    prompts = [f"reverse {w}\n" for w in ["ab", "cde", "fghij", "klm", "no", "pqrs", "tuv", "wxyz"]]
    alone = [
        client.completions.create(model="tiny", prompt=p, max_tokens=5, temperature=0, logprobs=2) for p in prompts
    ]
    before = read_metrics(server.url, KEY)

    async def together():
        async with openai.AsyncOpenAI(base_url=server.base_url, api_key=KEY, max_retries=0) as c:
            return await asyncio.gather(
                *[
                    c.completions.create(model="tiny", prompt=p, max_tokens=5, temperature=0, logprobs=2)
                    for p in prompts
                ]
            )

    batched = asyncio.run(together())
    after = read_metrics(server.url, KEY)
    batches = after["distillab_batches_total"] - before["distillab_batches_total"]
    assert batches < len(prompts)  # some requests shared a model call
    for a, b in zip(alone, batched):
        assert a.choices[0].text == b.choices[0].text
        assert a.choices[0].logprobs.tokens == b.choices[0].logprobs.tokens
        assert torch.allclose(
            torch.tensor(a.choices[0].logprobs.token_logprobs),
            torch.tensor(b.choices[0].logprobs.token_logprobs),
            atol=1e-4,
        )


def test_idempotency_key_replays_instead_of_recomputing(server):
    body = {"model": "tiny", "prompt": "reverse idem\n", "max_tokens": 3, "temperature": 0}
    headers = {"Authorization": f"Bearer {KEY}", "Idempotency-Key": "abc123"}
    before = read_metrics(server.url, KEY)
    first = httpx.post(server.base_url + "/completions", headers=headers, json=body).json()
    again = httpx.post(server.base_url + "/completions", headers=headers, json=body).json()
    after = read_metrics(server.url, KEY)
    assert first == again
    assert after["distillab_answers_total"] - before["distillab_answers_total"] == 1
    assert after["distillab_idempotent_replays_total"] - before["distillab_idempotent_replays_total"] == 1


def test_fault_schedule_is_seeded_and_near_the_rate():
    digests = [f"{i:064x}" for i in range(2000)]
    a, b = FaultConfig(rate=0.2, seed=7), FaultConfig(rate=0.2, seed=7)
    picks = [a.pick(d) for d in digests]
    assert picks == [b.pick(d) for d in reversed(digests)][::-1]  # arrival order does not matter
    assert 0.17 < sum(p is not None for p in picks) / len(picks) < 0.23
    assert set(picks) - {None} == {"429", "500", "hang", "truncate"}
    # the same body again draws again: a retried request is not doomed to fail forever
    assert [a.pick(d) for d in digests] != picks


def test_injected_faults_on_the_wire(tiny_teacher):
    with server_thread(
        tiny_teacher, model_name="tiny", faults=FaultConfig(rate=1.0, kinds=("429",), retry_after_s=0.3)
    ) as s:
        r = httpx.post(s.base_url + "/completions", json={"model": "tiny", "prompt": "x", "max_tokens": 1})
        assert r.status_code == 429 and r.headers["retry-after-ms"] == "300" and r.headers["retry-after"] == "1"
    with server_thread(tiny_teacher, model_name="tiny", faults=FaultConfig(rate=1.0, kinds=("truncate",))) as s:
        r = httpx.post(s.base_url + "/completions", json={"model": "tiny", "prompt": "x", "max_tokens": 1})
        assert r.status_code == 200
        with pytest.raises(json.JSONDecodeError):
            r.json()
        assert metric_sum(read_metrics(s.url), "distillab_faults_injected_total") == 1


def test_work_limit_refuses_the_53_second_request_at_once(server):
    # 256 prompts x 240 tokens with top-20 logprobs: 3 KB of JSON that cost 53 s of CPU and a 28.6 MB answer
    body = {"model": "tiny", "prompt": ["reverse abcdef\n"] * 256, "max_tokens": 240, "logprobs": 20}
    before = read_metrics(server.url, KEY)
    start = time.monotonic()
    r = httpx.post(server.base_url + "/completions", headers={"Authorization": f"Bearer {KEY}"}, json=body, timeout=60)
    assert r.status_code == 400, r.text[:300]
    assert "262,144" in r.json()["error"]["message"] and "1,290,240" in r.json()["error"]["message"]
    assert time.monotonic() - start < 5
    assert (
        read_metrics(server.url, KEY)["distillab_batches_total"] == before["distillab_batches_total"]
    )  # no model call


def test_malformed_bodies_are_400_not_500(server):
    url, auth = server.base_url, {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
    bodies = [
        ("/completions", b'{"model": "tiny", "prompt": "x", "stop": ' + b"[" * 50_000 + b"]" * 50_000 + b"}"),
        ("/completions", b'{"model": "tiny", "prompt": "x", "stop": ' + b"[" * 500 + b"]" * 500 + b"}"),
        ("/completions", rb'{"model": "tiny", "prompt": "\ud800", "max_tokens": 1}'),
        ("/completions", b'{"model": "tiny", "prompt": "x", "max_tokens": ' + b"1" * 5000 + b"}"),
        ("/completions", b'{"model": "tiny", "prompt": "x", "max_tokens": 1, "seed": 100000000000000000000}'),
        (
            "/chat/completions",
            b'{"model": "tiny", "messages": [{"role": "user", "content": [{"type": "text", "text": 5}]}]}',
        ),
        (
            "/chat/completions",
            b'{"model": "tiny", "messages": [{"role": "user", "content": [{"type": "text"}]}], "max_tokens": 1}',
        ),
    ]
    before = read_metrics(server.url, KEY)
    statuses = [httpx.post(url + path, headers=auth, content=raw, timeout=30).status_code for path, raw in bodies]
    assert statuses == [400] * 6 + [200]  # a text part without text is empty text
    after = read_metrics(server.url, KEY)
    errors = [k for k in after if 'code="500"' in k and after[k] != before.get(k, 0)]
    assert errors == []


def test_chat_without_max_tokens_gets_the_rest_of_the_context(client):
    # the tiny model has 256 positions: the old default of 256 new tokens made every such chat a 400
    r = client.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "reverse abc\n"}], temperature=0
    )
    prompt_tokens = len("reverse abc\n") + 1
    assert r.usage.prompt_tokens == prompt_tokens
    assert r.usage.completion_tokens <= 256 - prompt_tokens
    assert r.choices[0].finish_reason == "stop" or r.usage.completion_tokens == 256 - prompt_tokens


def test_health_answers_while_a_big_response_is_built(tiny_teacher):
    """/health never waits for the model or for a response being built and encoded (that used to run on the
    event loop: a 10 MB answer held /health for seconds)."""
    body = {"model": "tiny", "prompt": ["reverse abc " * 20] * 96, "max_tokens": 0, "echo": True, "logprobs": 20}
    with server_thread(tiny_teacher, model_name="tiny", limits=ServeLimits(max_request_work=10**9)) as s:
        httpx.get(s.url + "/health")
        done = {}

        def big():
            start = time.monotonic()
            done["status"] = httpx.post(s.base_url + "/completions", json=body, timeout=120).status_code
            done["seconds"] = time.monotonic() - start

        thread = threading.Thread(target=big)
        thread.start()
        waits = []
        with httpx.Client() as health:
            while thread.is_alive():
                start = time.monotonic()
                assert health.get(s.url + "/health", timeout=60).json() == {"status": "ok"}
                waits.append(time.monotonic() - start)
                time.sleep(0.01)
        thread.join()
    assert done["status"] == 200 and len(waits) >= 5
    # relative to the request's own time, so a loaded machine slows both sides alike (the old server: 0.7)
    assert max(waits) < 0.35 * done["seconds"], (max(waits), done["seconds"])


def test_server_process_runs_the_typer_cli(tiny_teacher):
    # the subprocess helper tests and benchmarks use starts `python -m distillab serve` with its flags
    with server_process(tiny_teacher, "--max-batch", "4", "--max-request-work", "50") as base_url:
        url = base_url + "/completions"
        assert httpx.post(url, json={"model": "teacher", "prompt": "x", "max_tokens": 50}).status_code == 200
        r = httpx.post(url, json={"model": "teacher", "prompt": "x", "max_tokens": 11, "logprobs": 4})  # 55 slots
        assert r.status_code == 400 and "limit of 50" in r.json()["error"]["message"]


@pytest.mark.slow
def test_lm_eval_local_completions_loglikelihood(tmp_path, server, model_and_tokenizer, tiny_teacher, monkeypatch):
    """lm-evaluation-harness's `local-completions` runs a multiple-choice task from a local JSONL, offline."""
    lm_eval = pytest.importorskip("lm_eval")
    from lm_eval.tasks import TaskManager

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("OPENAI_API_KEY", KEY)  # local-completions sends it as the bearer token
    docs = [
        {"question": "reverse ab\n", "choices": ["ba", "ab"], "answer": 0},
        {"question": "reverse xyz\n", "choices": ["zyx", "xzy", "yxz"], "answer": 0},
        {"question": "upper hi\n", "choices": ["HI", "hi"], "answer": 0},
    ]
    data = write_jsonl(tmp_path / "docs.jsonl", docs)
    (tmp_path / "tiny_mc.yaml").write_text(
        "task: distillab_tiny_mc\ndataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {data}\n"
        "test_split: test\noutput_type: multiple_choice\n"
        'doc_to_text: "{{question}}"\ndoc_to_choice: "{{choices}}"\ndoc_to_target: "{{answer}}"\n'
        'target_delimiter: ""\nmetric_list:\n  - metric: acc\n'
    )
    out = lm_eval.simple_evaluate(
        model="local-completions",
        model_args={
            "model": "tiny",
            "base_url": server.base_url + "/completions",
            "tokenizer_backend": "huggingface",
            "tokenizer": str(tiny_teacher),
            "add_bos_token": True,
            "max_retries": 1,
            "num_concurrent": 2,
        },
        tasks=["distillab_tiny_mc"],
        task_manager=TaskManager(include_path=str(tmp_path)),
        log_samples=True,
    )
    assert 0.0 <= out["results"]["distillab_tiny_mc"]["acc,none"] <= 1.0
    # every loglikelihood lm-eval got equals the model's own
    model, tok = model_and_tokenizer
    samples = out["samples"]["distillab_tiny_mc"]
    assert len(samples) == len(docs)
    for sample in samples:
        for (context, continuation), resp in zip(sample["arguments"], sample["resps"]):
            ll = resp[0][0]
            # lm-eval moves the context's trailing whitespace (our "\n") into the continuation
            stripped = context.rstrip()
            context, continuation = stripped, context[len(stripped) :] + continuation
            whole = tok(context + continuation)["input_ids"]
            n_ctx = len(tok(context)["input_ids"])
            expected = direct_logprobs(model, whole)[n_ctx - 1 :].sum().item()
            assert math.isclose(ll, expected, abs_tol=1e-3), (context, continuation, ll, expected)


# ----------------------------------------------------------------------------------------------------
# Bounded under abuse: abandoned work, the idempotency store, one client's queue.


def _send_and_hang_up(base_url: str, body: dict) -> None:
    """A whole request written on a raw socket, then the connection closed: a client that gave up."""
    import socket

    host, port = base_url.split("//")[1].split("/")[0].split(":")
    data = json.dumps(body).encode()
    with socket.create_connection((host, int(port))) as sock:
        sock.sendall(
            b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Content-Length: %d\r\n\r\n%s" % (len(data), data)
        )
        time.sleep(0.005)


@pytest.mark.slow
def test_abandoned_requests_are_not_computed_and_the_replay_store_stays_in_its_bytes(tiny_teacher):
    """A real `distillab serve` process. 64 requests of 48 tokens whose clients hang up: at most the batch already
    running is computed, and a 4-token request that comes next waits for that batch, not the other 15 (the server
    before computed all 64 and the small one waited 3.5 s). Then 20 distinct Idempotency-Keys into a 24 KiB store:
    it keeps the most recent answers that fit, and replays exactly those."""
    budget_mb = 24 / 1024
    with server_process(tiny_teacher, "--max-batch", "4", "--idempotency-max-mb", str(budget_mb)) as base_url:
        url = base_url + "/completions"

        def big(i):
            return {"model": "teacher", "prompt": f"reverse abc {i}\n", "max_tokens": 48, "temperature": 0}

        start = time.monotonic()
        assert httpx.post(url, json=big(-1), timeout=60).status_code == 200
        one_batch = time.monotonic() - start  # one request's 48 steps: what a batch of 4 costs, about
        before = read_metrics(base_url)
        for i in range(64):
            _send_and_hang_up(base_url, big(i))
        time.sleep(0.5)  # the server sees them all go
        start = time.monotonic()
        small = httpx.post(url, json={"model": "teacher", "prompt": "hi", "max_tokens": 4}, timeout=120)
        waited = time.monotonic() - start
        after = read_metrics(base_url)
        computed = after["distillab_batched_prompts_total"] - before["distillab_batched_prompts_total"] - 1
        gone = after['distillab_requests_total{code="499",endpoint="/v1/completions"}']
        assert small.status_code == 200 and gone == 64
        assert computed <= 8, computed  # the batch running when they hung up (and one more at most), of 64
        assert waited < 4 * one_batch + 1.0, (waited, one_batch)  # all 64 would be 16 batches

        sizes, headers = [], {"Idempotency-Key": ""}
        for i in range(20):
            body = {"model": "teacher", "prompt": f"upper k{i}\n", "max_tokens": 8, "logprobs": 5, "temperature": 0}
            headers["Idempotency-Key"] = f"key-{i}"
            sizes.append((body, len(httpx.post(url, json=body, headers=headers, timeout=60).content)))
        kept = 0
        for i in reversed(range(20)):  # newest first: a replay moves its answer to the end, evicting nothing
            replays = read_metrics(base_url)["distillab_idempotent_replays_total"]
            headers["Idempotency-Key"] = f"key-{i}"
            assert httpx.post(url, json=sizes[i][0], headers=headers, timeout=60).status_code == 200
            if read_metrics(base_url)["distillab_idempotent_replays_total"] == replays:
                break  # recomputed: it had been dropped
            kept += sizes[i][1]
        budget = budget_mb * (1 << 20)
        assert 0 < kept <= budget < kept + sizes[i][1]  # the most recent answers that fit, no more, no fewer


def test_a_keyed_request_whose_batch_began_is_replayed_to_the_retry_not_computed_twice(tiny_teacher):
    """A client killed while its keyed request runs (a kill -9 of `generate`) and its retry after the resume with the
    same Idempotency-Key: the prompt is computed once (the engine's own count) and the retry replayed."""
    import socket

    body = {"model": "tiny", "prompt": "reverse abcdef\n", "max_tokens": 48, "temperature": 0}
    data = json.dumps(body).encode()
    with server_thread(tiny_teacher, model_name="tiny", max_batch=1) as s:
        host, port = s.base_url.split("//")[1].split("/")[0].split(":")
        before = read_metrics(s.base_url)
        with socket.create_connection((host, int(port))) as sock:
            sock.sendall(
                b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                b"Idempotency-Key: once\r\nContent-Length: %d\r\n\r\n%s" % (len(data), data)
            )
            deadline = time.monotonic() + 30
            while read_metrics(s.base_url)["distillab_batched_prompts_total"] == before.get(
                "distillab_batched_prompts_total", 0
            ):  # hang up only once its batch has begun
                assert time.monotonic() < deadline
                time.sleep(0.002)
        time.sleep(0.3)  # the server sees it go
        retry = httpx.post(s.base_url + "/completions", json=body, headers={"Idempotency-Key": "once"}, timeout=60)
        after = read_metrics(s.base_url)
    assert retry.status_code == 200 and retry.json()["choices"][0]["text"]
    computed = after["distillab_batched_prompts_total"] - before.get("distillab_batched_prompts_total", 0)
    assert computed == 1 and after["distillab_idempotent_replays_total"] == 1
    assert after['distillab_requests_total{code="499",endpoint="/v1/completions"}'] == 1


def test_one_client_cannot_queue_more_than_its_share(tiny_teacher):
    """Past max_client_work token slots queued from one address, a 429 with Retry-After; once answered, room again."""
    body = {"model": "tiny", "prompt": "reverse abc\n", "max_tokens": 48, "temperature": 0}  # 48 token slots
    with server_thread(tiny_teacher, model_name="tiny", limits=ServeLimits(max_client_work=100), max_batch=1) as s:
        results = []

        def ask():
            r = httpx.post(s.base_url + "/completions", json=body, timeout=60)
            results.append((r.status_code, r.headers.get("retry-after")))

        threads = [threading.Thread(target=ask) for _ in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert s.app.state.server.queued == {}  # every slot given back
        after = httpx.post(s.base_url + "/completions", json=body, timeout=60)
    codes = sorted(code for code, _ in results)
    assert codes.count(200) >= 2 and 429 in codes, codes  # two fit at once (96 <= 100), a third does not
    assert all(retry == "1" for code, retry in results if code == 429)
    assert after.status_code == 200
