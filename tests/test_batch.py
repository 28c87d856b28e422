"""The Batch API (teacher.batch) against a real `distillab serve` on 127.0.0.1: generate killed with SIGKILL during the
upload, the polling and the download, then rerun, ends with the rows of the synchronous path, every request submitted
once (serve's own counts) and the ledger at the batch price; a kill between the batch's create and its commit finds
the batch again; failed lines are retried in the next batch or reported; serve's endpoints as the SDK calls them."""

from __future__ import annotations

import os
import signal
import time

import openai
import pytest

from distillab import costs
from distillab.cache import RequestCache, request_key
from distillab.config import TeacherConfig
from distillab.dataset import read_dataset
from distillab.generate import run_generate
from distillab.serve import FaultConfig
from distillab.serve.batches import BatchDelays
from distillab.teachers.batch import BatchTeacher
from distillab.teachers.openai_compat import OpenAITeacher
from distillab.testing import server_thread
from tests.helpers import generate_config

quiet = {"log": lambda *_: None}
N_PROMPTS = 6
PRICE = {"usd_per_1m_input": 1.0, "usd_per_1m_output": 2.0}  # a price the batch discount (0.5) halves


@pytest.fixture(scope="module")
def served(tiny_teacher):
    with server_thread(tiny_teacher, model_name="teacher") as server:
        yield server, server.app.state.batches


def teacher_settings(server, **more) -> dict:
    return {
        "model": "teacher",
        "base_url": server.base_url,
        "max_new_tokens": 4,
        "top_k_logprobs": 3,
        "batch_poll_s": 0.02,
        "batch_poll_max_s": 0.1,
        **PRICE,
        **more,
    }


@pytest.fixture(scope="module")
def synchronous(served, tiny_teacher, tmp_path_factory):
    """The synchronous path's run: its dataset's rows and summary."""
    server, _ = served
    cfg = generate_config(
        tmp_path_factory.mktemp("sync"), teacher_settings(server), student=tiny_teacher, n_prompts=N_PROMPTS
    )
    summary = run_generate(cfg, **quiet)
    path = cfg.run_dir / "data" / "train.parquet"
    return {"rows": rows_of(path), "summary": summary}


def rows_of(path) -> list[dict]:
    """A dataset's rows, every field but the time each was made (provenance's created_at: two runs' differ)."""
    return [{k: v for k, v in row.items() if k != "created_at"} for row in read_dataset(path)]


def counts(service) -> dict:
    """serve's own counts of what was submitted and computed."""
    metrics = service.server.metrics
    return {
        name: metrics.value(f"distillab_{name}_total")
        for name in ("batches_submitted", "batch_requests_submitted", "batch_files", "batch_replays", "answers")
    }


def grown(before: dict, after: dict) -> dict:
    return {name: after[name] - before[name] for name in before}


def until(condition, what: str, timeout_s: float = 120.0) -> None:
    """Wait for a condition serve's state makes true (the timeout only reports a failure)."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)


def fork_generate(cfg) -> int:
    """generate for cfg in a fork of this process (it has imported everything: it starts in milliseconds)."""
    pid = os.fork()
    if pid == 0:  # the child: never return into pytest
        code = 1
        try:
            run_generate(cfg, **quiet)
            code = 0
        finally:
            os._exit(code)
    return pid


# Where the child is held (a BatchDelays step) and what says it is there: serve counts a delay as it begins, and a
# poll (GET /v1/batches/{id}) comes only once the client has committed the batch id.
HELD = {
    "upload": ("upload_s", lambda m: m.value("distillab_faults_injected_total", kind="batch_upload_delay")),
    "poll": ("run_s", lambda m: m.value("distillab_requests_total", endpoint="/v1/batches/{id}", code="200")),
    "download": ("download_s", lambda m: m.value("distillab_faults_injected_total", kind="batch_download_delay")),
}


@pytest.mark.parametrize("step", ["upload", "poll", "download"])
def test_a_kill_during_a_batch_step_reruns_to_the_synchronous_rows_submitted_once(
    tmp_path, served, synchronous, tiny_teacher, step
):
    server, service = served
    cfg = generate_config(tmp_path, teacher_settings(server, batch=True), student=tiny_teacher, n_prompts=N_PROMPTS)
    before = counts(service)
    delay, reached = HELD[step]
    metrics = service.server.metrics
    mark = reached(metrics)
    setattr(service.delays, delay, 600.0)
    pid = fork_generate(cfg)
    try:
        until(lambda: reached(metrics) > mark, f"the child inside the {step}")
    finally:
        os.kill(pid, signal.SIGKILL)
        status = os.waitpid(pid, 0)[1]
        service.delays = BatchDelays()  # the held step goes on (its client is gone)
    assert os.waitstatus_to_exitcode(status) == -signal.SIGKILL
    state = list((cfg.run_dir / "teacher.batches").glob("*.json"))
    assert len(state) == 1  # the batch's requests were committed before the upload began
    if step != "upload":
        assert '"batch_id": "batch_' in state[0].read_text()  # ... and its id before the first poll

    summary = run_generate(cfg, **quiet)
    path = cfg.run_dir / "data" / "train.parquet"
    assert rows_of(path) == synchronous["rows"]
    assert summary.failed == 0 and summary.rows == N_PROMPTS
    assert not list((cfg.run_dir / "teacher.batches").glob("*.json"))  # delivered: nothing left in flight
    until(lambda: not service.running, "serve's batches to finish")
    served_now = grown(before, counts(service))
    # one batch, each request in it once, each computed once by the model (the kill resubmitted nothing)
    assert served_now["batches_submitted"] == 1 and served_now["batch_replays"] == 0
    assert served_now["batch_requests_submitted"] == N_PROMPTS == served_now["answers"]
    assert served_now["batch_files"] == (1 if step != "upload" else pytest.approx(1.5, abs=0.5))  # an upload killed
    # midway may have arrived whole (then it is an unused file) or not at all

    # the ledger's teacher line: the same tokens as the synchronous run, every request at the batch rate (half)
    line = costs.teacher_generation(cfg, costs.teacher_pricing(cfg))
    sync = synchronous["summary"]
    assert (line.prompt_tokens, line.completion_tokens) == (sync.prompt_tokens, sync.completion_tokens)
    by_hand = 0.5 * (sync.prompt_tokens * 1.0 + sync.completion_tokens * 2.0) / 1e6
    assert line.usd == pytest.approx(by_hand, rel=1e-12) and sync.usd == pytest.approx(2 * by_hand, rel=1e-12)
    assert line.billing["batch"] | {"usd": 0} == {
        "requests": N_PROMPTS,
        "prompt_tokens": sync.prompt_tokens,
        "cached_tokens": 0,
        "completion_tokens": sync.completion_tokens,
        "usd": 0,
    }
    assert line.billing["sync"]["requests"] == 0 and "Batch API" in line.pricing["description"]


def test_a_kill_between_create_and_its_commit_finds_the_batch_again(tmp_path, served, synchronous, tiny_teacher):
    """The process dies right after batches.create answered, before the id is written: the rerun finds the batch by
    its metadata (batches.list) and polls it; nothing is created twice."""
    server, service = served
    cfg = generate_config(tmp_path, teacher_settings(server, batch=True), student=tiny_teacher, n_prompts=N_PROMPTS)
    before = counts(service)
    save = BatchTeacher._save

    def dies_after_create(self, job):
        if job.batch_id is not None:
            raise SystemExit("killed after the create")
        save(self, job)

    BatchTeacher._save = dies_after_create
    try:
        with pytest.raises(SystemExit):
            run_generate(cfg, **quiet)
    finally:
        BatchTeacher._save = save
    summary = run_generate(cfg, **quiet)
    assert summary.failed == 0 and rows_of(cfg.run_dir / "data" / "train.parquet") == synchronous["rows"]
    served_now = grown(before, counts(service))
    assert served_now["batches_submitted"] == 1 and served_now["batch_requests_submitted"] == N_PROMPTS
    assert served_now["batch_replays"] == 0  # found by batches.list, not by a second create


def test_an_idempotency_key_answers_the_batch_it_made(served):
    server, service = served
    client = openai.OpenAI(base_url=server.base_url, api_key="none")
    line = '{"custom_id": "a", "method": "POST", "url": "/v1/completions", "body": {"model": "teacher", "prompt": "x"}}'
    uploaded = client.files.create(file=("in.jsonl", (line + "\n").encode(), "application/jsonl"), purpose="batch")
    before = counts(service)
    ask = {"input_file_id": uploaded.id, "endpoint": "/v1/completions", "completion_window": "24h"}
    first = client.batches.create(**ask, extra_headers={"Idempotency-Key": "k-1"})
    again = client.batches.create(**ask, extra_headers={"Idempotency-Key": "k-1"})
    assert again.id == first.id
    assert (
        grown(before, counts(service))["batches_submitted"] == 1
        and service.server.metrics.value("distillab_batch_replays_total") == before["batch_replays"] + 1
    )
    bad = client.batches.create(
        **ask | {"input_file_id": client.files.create(file=("b.jsonl", b"[1]\n"), purpose="batch").id}
    )
    assert bad.status == "failed" and bad.errors.data[0].code == "invalid_json_line"
    with pytest.raises(openai.NotFoundError):
        client.batches.retrieve("batch_nope")
    client.close()


def test_failed_lines_are_retried_in_the_next_batch_or_reported(tmp_path, tiny_teacher):
    """Lines answered 500 (serve's injected faults, drawn per line) go into the next batch until answered; a line the
    server refuses (a 404: no such model) is reported at once, one attempt, never retried."""
    with server_thread(tiny_teacher, model_name="teacher", faults=FaultConfig(rate=0.5, seed=3, kinds=("500",))) as s:
        service = s.app.state.batches
        cfg = TeacherConfig(**teacher_settings(s, batch=True, max_retries=6))
        teacher = OpenAITeacher(cfg)
        requests = [teacher.request(f"{i} + {i} =") for i in range(8)]
        refused = teacher.request("7 + 7 =") | {"model": "no-such-model"}
        cache = RequestCache(tmp_path / "teacher.sqlite")
        outcomes = {}

        def on_done(req, resp, error, latency, attempts):
            outcomes[request_key(req)] = (resp, error, attempts)
            if resp is not None:
                cache.put(request_key(req), req, resp, latency, attempts)

        BatchTeacher(teacher, tmp_path / "batches", cache.cached_keys, **quiet).answer(requests + [refused], on_done)
        faults = service.server.metrics.value("distillab_faults_injected_total", kind="500")
        submitted = service.server.metrics.value("distillab_batch_requests_submitted_total")
    assert faults > 0  # the schedule did fault some lines
    assert submitted == len(requests) + 1 + faults  # each faulted line sent again, once per fault
    assert all(outcomes[request_key(r)][0]["batch"] for r in requests)  # every one answered in the end
    # every retry was a fault's (the 404 drew faults too, then was refused once and not sent again)
    assert sum(attempts - 1 for *_, attempts in outcomes.values()) == faults
    resp, error, _ = outcomes[request_key(refused)]
    assert resp is None and "HTTP 404 (not retried)" in error and "no-such-model" in error
    usage = cache.billing([request_key(r) for r in requests])
    assert usage["batch_requests"] == len(requests)
    cache.close()


def test_each_kind_of_line_is_read_as_the_synchronous_path_reads_its_answer(tmp_path):
    """A line's outcome: a 200 is validated like a synchronous answer (a positive logprob is malformed: retried); a
    400 naming return_tokens_as_token_ids is asked again without it; a line missing from an expired batch is retried,
    from a failed one reported with the batch's reason."""
    from openai.types import Batch

    teacher = OpenAITeacher(TeacherConfig(model="m", base_url="http://127.0.0.1:9/v1", batch=True, top_k_logprobs=2))
    client = BatchTeacher(teacher, tmp_path, lambda keys: set(), **quiet)
    req = teacher.request("1 + 1 =")
    finished = {"id": "batch_1", "object": "batch", "endpoint": "/v1/completions", "input_file_id": "file-1"}
    finished |= {"completion_window": "24h", "created_at": 0}
    completed, expired = Batch(**finished, status="completed"), Batch(**finished, status="expired")
    failed = Batch(**finished, status="failed", errors={"data": [{"code": "too_big", "message": "over the limit"}]})

    def line(status: int, body: dict) -> dict:
        return {"custom_id": request_key(req), "response": {"status_code": status, "body": body}, "error": None}

    tokens = {"tokens": ["token_id:5"], "top_logprobs": [{"token_id:5": -0.1, "token_id:6": -2.5}]}
    good = {"choices": [{"text": "2", "finish_reason": "stop", "logprobs": tokens}], "usage": {"prompt_tokens": 4}}
    resp, error, retry = client._outcome(req, line(200, good), completed)
    assert error is None and resp["token_ids"] == [5] and resp["top_ids"] == [[5, 6]] and resp["prompt_tokens"] == 4
    bad = {"choices": [{"text": "2", "logprobs": tokens | {"top_logprobs": [{"token_id:5": 3.0}]}}]}
    resp, error, retry = client._outcome(req, line(200, bad), completed)
    assert resp is None and retry and "MalformedResponse: a logprob of 3.0" in error
    refusal = {"error": {"message": "Unrecognized request argument supplied: return_tokens_as_token_ids"}}
    assert "return_tokens_as_token_ids" in teacher.body(req)[1]
    assert client._outcome(req, line(400, refusal), completed)[2] and not teacher._ask_token_ids
    assert "return_tokens_as_token_ids" not in teacher.body(req)[1]  # the next batch asks without it
    resp, error, retry = client._outcome(req, None, expired)
    assert retry and "no answer in the expired batch" in error
    resp, error, retry = client._outcome(req, None, failed)
    assert not retry and "the batch failed (too_big: over the limit)" in error
    resp, error, retry = client._outcome(req, line(429, {"error": {"message": "slow down"}}), completed)
    assert retry and error.startswith("batch line: HTTP 429: slow down")
