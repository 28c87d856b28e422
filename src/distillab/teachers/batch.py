"""The OpenAI Batch API for a teacher (`[teacher] batch = true`): the requests the cache lacks go as JSONL through
/v1/files and /v1/batches, with the openai SDK's own calls (files.create, batches.create / retrieve / list,
files.content), answered within the provider's 24 h window at its batch price (about half the synchronous one).

The synchronous path's answers. A line's body is the one OpenAITeacher posts (OpenAITeacher.body), its custom_id the
request key; an answer line's body is read by openai_compat.parse_response, the same validation (a 200 whose logprobs
or usage are no sane answer is a MalformedResponse), and the caller's on_done commits it to the same request cache.
So the dataset rows are the synchronous path's, byte for byte. An answer is marked "batch": True: the cache's billing
columns and the ledger price it at the batch rate (distillab.pricing).

Chunks. At most teacher.batch_max_requests requests a batch, read from the request stream once the batches before
are answered (generate's stream: a chunk is written as a part as soon as its answers are in).

Kill -9 at any point. A batch's state is a JSON file in the run's batch folder (RunDir.batches), written whole
(files.write_json: a temp file, then one rename) at each step, before the step's wait:
  1. its requests (canonical, as the cache keys them), before the upload;
  2. the input file's id, once files.create answers (a kill during the upload: the rerun uploads again; a file that
     did arrive is left unused, no batch is made of it);
  3. the batch id, once batches.create answers, before the first poll. The create carries the batch's key as its
     metadata and its Idempotency-Key: a kill after the create and before this write is found again by the rerun
     (batches.list), and a server that honours the key answers a second create with the same batch;
  4. removed once every answer of the batch is delivered (committed to the cache by on_done).
A rerun's request that an earlier run's batch holds is not sent again: that batch is polled and downloaded, and all its
answers the cache lacks are delivered (those of requests later in the stream too). A batch none of whose requests a
later run asks for is left as it is; one the server no longer knows (404: it expired, or a test server restarted) is
dropped, and its requests go into a new batch.

Polling: batches.retrieve every batch_poll_s seconds, 1.5 times longer after each poll, at most batch_poll_max_s apart.
Past batch_wait_s (default 25 h: the 24 h window and some) generate stops with a one-line error; the batches stay
committed and a rerun collects them. Each call is the SDK's, bounded by teacher.timeout_s and retried by the SDK
(teacher.max_retries times: 429, 5xx, dropped connections). teacher.request_deadline_s does not apply: a batch's
answers come when the provider has done it.

Failed lines. A line answered 408/409/425/429/5xx, a 200 that is no sane answer, a line with an error and no response,
or a line missing from an expired batch is retryable: it goes into this run's next batch, up to teacher.max_retries
times (a 400 naming return_tokens_as_token_ids is asked again without it, not counted). Any other 4xx is the server
refusing the request: reported to on_done at once, as the synchronous path does. A request that fails for good is
reported as failed (the cache's failures): its chunk is written partial, and a rerun of generate asks it again. A batch
that failed as a whole (its input refused) or was cancelled reports each of its requests as failed.
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import json
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import openai

from distillab.cache import request_key
from distillab.errors import UserError
from distillab.files import read_json, write_json
from distillab.teachers import OnDone
from distillab.teachers.openai_compat import (
    MalformedResponse,
    OpenAITeacher,
    describe_error,
    parse_response,
    retryable_status,
    server_message,
)

FINISHED = {"completed", "failed", "expired", "cancelled"}  # a batch in one of these answers no more
POLL_GROWTH = 1.5  # each wait between polls of a batch is this much longer than the one before
METADATA_KEY = "distillab_batch"  # the batch's key in its metadata: how a rerun finds a batch it made
LIST_SLACK_S = 3600.0  # batches.list is read back to this long before a batch's state was written (clock skew)
TOKEN_IDS_FIELD = "return_tokens_as_token_ids"


@dataclass
class Job:
    """One batch, as its file keeps it (module docstring: the steps)."""

    key: str  # a digest of its request keys and created_at: its file's name, its metadata and Idempotency-Key
    requests: list[dict]  # canonical requests, in the order of the input file's lines
    created_at: float  # when its state was first written (time.time())
    input_file_id: str | None = None
    batch_id: str | None = None


class BatchTeacher:
    """An OpenAITeacher whose requests go through the Batch API (module docstring). The Teacher protocol: request()
    and the ids are the teacher's; answer() sends through batches. folder: RunDir.batches(shard); cached(keys): the
    keys the request cache holds (what a killed run delivered is not delivered again); log: a line per batch step."""

    def __init__(self, teacher: OpenAITeacher, folder: Path, cached: Callable[[list[str]], set[str]], log=print):
        self.teacher, self.cfg, self.folder, self.cached, self.log = teacher, teacher.cfg, folder, cached, log
        self.teacher_id, self.endpoint = teacher.teacher_id, teacher.endpoint
        self.endpoint_stats = teacher.endpoint_stats  # the teacher's own counts: generate's summary reads them
        self.url = teacher.urls[0]
        self.path = "/v1/chat/completions" if self.cfg.mode == "chat" else "/v1/completions"
        # one answer() call's state
        self._holder: dict[str, str] = {}  # request key -> the job that holds it
        self._retry: list[dict] = []  # retryable failures, for the next batch
        self._attempts: collections.Counter = collections.Counter()  # submissions of each request key
        self._key: str | None = None  # the API key (scrubbed from error messages)

    def request(self, prompt: str, sample: int = 0, messages: list[dict] | None = None) -> dict:
        return self.teacher.request(prompt, sample, messages)

    def answer(self, requests: Iterable[dict], on_done: OnDone) -> None:
        """Send the requests in batches, on_done once per request as its batch is downloaded (module docstring)."""
        key = self._key = self.teacher._api_key()
        self._client = openai.OpenAI(
            base_url=self.url, api_key=key or "none", max_retries=self.cfg.max_retries, timeout=self.cfg.timeout_s
        )
        try:
            self._answer(iter(requests), on_done)
        finally:
            self._client.close()

    def _answer(self, stream, on_done: OnDone) -> None:
        earlier = {}  # batches an earlier run committed (one whose answers are all delivered is done with)
        for job in self._load():
            keys = [request_key(r) for r in job.requests]
            if len(self.cached(keys)) == len(set(keys)):
                self._forget(job)
            else:
                earlier[job.key] = job
        self._holder = {request_key(r): job.key for job in earlier.values() for r in job.requests}
        self._retry, self._attempts = [], collections.Counter()
        ended = False
        while True:
            fresh, adopted, seen = [], {}, set()
            while self._retry and len(fresh) < self.cfg.batch_max_requests:
                fresh.append(self._retry.pop(0))
            while not ended and len(fresh) < self.cfg.batch_max_requests:
                req = next(stream, None)
                if req is None:
                    ended = True
                    break
                key = request_key(req)
                holder = self._holder.get(key)
                if holder in earlier:  # an earlier run's batch asked it: that batch is polled, nothing is sent
                    adopted[holder] = earlier.pop(holder)
                elif holder is None and key not in seen:  # (a holder not in `earlier`: delivered in this call)
                    seen.add(key)
                    fresh.append(req)
            jobs = [self._launch(job, resumed=True) for job in adopted.values()]
            if fresh:
                jobs.append(self._launch(self._new_job(fresh), resumed=False))
            if jobs:
                self._wait(jobs, on_done)
            elif ended and not self._retry:
                return

    # -- submitting: the steps, each committed before the next wait ---------------------------------

    def _new_job(self, requests: list[dict]) -> Job:
        keys, now = [request_key(r) for r in requests], time.time()
        # its time too: the same requests asked again later (after a failed batch) are another batch, another key
        digest = hashlib.sha256("\n".join([*keys, repr(now)]).encode()).hexdigest()[:16]
        job = Job(key=digest, requests=requests, created_at=now)
        self._save(job)  # 1. its requests, before the upload
        for k in keys:
            self._holder[k] = job.key
        return job

    def _launch(self, job: Job, resumed: bool) -> Job:
        """Upload the job's input file and create its batch, whichever of the two its state lacks."""
        if job.input_file_id is None:
            self.log(f"batch {job.key}: uploading {len(job.requests)} requests to {self.url}")
            lines = self._jsonl(job)
            uploaded = self._call(
                "upload the input file",
                lambda: self._client.files.create(
                    file=(f"distillab-{job.key}.jsonl", lines, "application/jsonl"), purpose="batch"
                ),
            )
            job.input_file_id = uploaded.id
            self._save(job)  # 2. the input file's id
        if job.batch_id is None:
            batch = (self._find(job) if resumed else None) or self._call(
                "create the batch",
                lambda: self._client.batches.create(
                    input_file_id=job.input_file_id,
                    endpoint=self.path,
                    completion_window="24h",
                    metadata={METADATA_KEY: job.key},
                    extra_headers={"Idempotency-Key": f"distillab-batch-{job.key}"},
                ),
            )
            job.batch_id = batch.id
            self._save(job)  # 3. the batch id, before the first poll
            self.log(f"batch {job.key}: submitted as {batch.id} ({len(job.requests)} requests); polling")
        elif resumed:
            self.log(
                f"batch {job.key}: polling {job.batch_id}, submitted by an earlier run ({len(job.requests)} requests)"
            )
        return job

    def _jsonl(self, job: Job) -> bytes:
        lines = []
        for req in job.requests:
            path, body = self.teacher.body(req)
            line = {"custom_id": request_key(req), "method": "POST", "url": "/v1" + path, "body": body}
            lines.append(json.dumps(line, ensure_ascii=False, separators=(",", ":")))
        return ("\n".join(lines) + "\n").encode()

    def _find(self, job: Job):
        """The batch an earlier run created for this job before it could write the id (its metadata names the job),
        or None. batches.list is newest first: read back to a little before the job's state was written."""
        for batch in self._call("list the batches", lambda: self._client.batches.list(limit=100)):
            if (batch.metadata or {}).get(METADATA_KEY) == job.key:
                self.log(f"batch {job.key}: found {batch.id}, created before the last run stopped")
                return batch
            if batch.created_at < job.created_at - LIST_SLACK_S:
                return None
        return None

    # -- waiting and delivering -------------------------------------------------------------------------

    def _wait(self, jobs: list[Job], on_done: OnDone) -> None:
        """Poll the jobs' batches with a growing wait until each is finished, delivering each as it finishes."""
        for job in jobs:
            self._attempts.update(request_key(r) for r in job.requests)
        deadline = time.monotonic() + self.cfg.batch_wait_s
        interval, waiting = self.cfg.batch_poll_s, list(jobs)
        while waiting:
            for job in list(waiting):
                batch = self._poll(job)
                if batch is None or batch.status in FINISHED:
                    waiting.remove(job)
                if batch is not None and batch.status in FINISHED:
                    self._deliver(job, batch, on_done)
            if not waiting:
                return
            if time.monotonic() + interval > deadline:
                ids = ", ".join(job.batch_id for job in waiting)
                raise UserError(
                    f"batches {ids} at {self.url} not finished after {self.cfg.batch_wait_s:g}s "
                    f"(teacher.batch_wait_s): they stay submitted ({self.folder}); rerun to collect them, "
                    "nothing is sent twice"
                )
            time.sleep(interval)
            interval = min(interval * POLL_GROWTH, self.cfg.batch_poll_max_s)

    def _poll(self, job: Job):
        """The job's batch; None when the server no longer knows it (its requests then go into a new batch)."""
        try:
            return self._client.batches.retrieve(job.batch_id)
        except openai.NotFoundError:
            self.log(f"batch {job.batch_id} is not known at {self.url} any more: its requests go into a new batch")
            held = self.cached([request_key(r) for r in job.requests])
            self._retry += [r for r in job.requests if request_key(r) not in held]
            self._forget(job)
            return None
        except openai.APIError as err:
            raise self._failed(f"poll batch {job.batch_id}", err) from None

    def _deliver(self, job: Job, batch, on_done: OnDone) -> None:
        """Every answer of a finished batch the cache lacks, to on_done (retryable failures to the next batch); then
        the job's file is removed. An exception from on_done (the budget's stop) is raised once all are delivered:
        what the batch answered is paid for, so all of it is committed."""
        lines = {}
        for file_id in (batch.output_file_id, batch.error_file_id):
            if file_id:
                self.log(f"batch {job.key}: downloading {file_id}")
                text = self._call("download the results", lambda f=file_id: self._client.files.content(f)).text
                for line in map(_json_line, text.splitlines()):
                    if line and isinstance(line.get("custom_id"), str):
                        lines[line["custom_id"]] = line
        keys = [request_key(r) for r in job.requests]
        delivered = self.cached(keys)
        latency = max(0.0, time.time() - job.created_at)
        stats, stopped = self.endpoint_stats[self.url], None
        for req, key in zip(job.requests, keys):
            if key in delivered:  # committed before a kill
                continue
            resp, error, retryable = self._outcome(req, lines.get(key), batch)
            if resp is None and retryable and self._attempts[key] <= self.cfg.max_retries:
                self._retry.append(req)
                continue
            if resp is None:
                stats["errors"] += 1
            else:
                resp |= {"served_by": self.url, "batch": True}
                stats["answered"] += 1
                stats["prompt_tokens"] += resp["prompt_tokens"]
                stats["completion_tokens"] += resp["completion_tokens"]
            try:
                on_done(req, resp, error, latency, self._attempts[key])
            except Exception as err:  # noqa: BLE001 - raised below, once the batch is committed
                stopped = stopped or err
        self._forget(job)
        if stopped is not None:
            raise stopped

    def _outcome(self, req: dict, line: dict | None, batch) -> tuple[dict | None, str | None, bool]:
        """(the response or None, the error or None, whether it is retryable) of one request's line."""
        where = f"[batch {batch.id}]"
        if line is None:
            if batch.status == "failed":
                errors = getattr(batch.errors, "data", None) or []
                why = "; ".join(f"{e.code}: {e.message}" for e in errors[:3]) or "no reason given"
                return None, f"the batch failed ({why}) {where}", False
            if batch.status == "cancelled":
                return None, f"the batch was cancelled before answering it {where}", False
            return None, f"no answer in the {batch.status} batch {where}", True
        response = line.get("response") if isinstance(line.get("response"), dict) else {}
        status = response.get("status_code")
        if status == 200:
            try:
                return parse_response(response.get("body"), req, self.cfg.think_tags), None, False
            except MalformedResponse as err:
                return None, f"MalformedResponse: {err} {where}", True
        if not isinstance(status, int):
            error = line.get("error") if isinstance(line.get("error"), dict) else {}
            return None, f"batch line error: {error.get('code')}: {error.get('message')} {where}", True
        message = server_message(response.get("body")) or "no message"
        if status == 400 and TOKEN_IDS_FIELD in message and self.teacher._ask_token_ids:
            self.teacher._ask_token_ids = False  # a server without vLLM's extension: asked again, not counted
            self._attempts[request_key(req)] -= 1
            return None, message, True
        retryable = retryable_status(status)
        text = f"batch line: HTTP {status}{'' if retryable else ' (not retried)'}: {message}"
        return None, " ".join(text.split())[:400] + f" {where}", retryable

    # -- the state files and the SDK's calls ------------------------------------------------------------

    def _save(self, job: Job) -> None:
        write_json(self.folder / f"{job.key}.json", dataclasses.asdict(job))

    def _forget(self, job: Job) -> None:
        (self.folder / f"{job.key}.json").unlink(missing_ok=True)

    def _load(self) -> list[Job]:
        jobs = []
        for path in sorted(self.folder.glob("*.json")) if self.folder.is_dir() else []:
            fix = "delete it and rerun (its requests are sent again in a new batch)"
            state = read_json(path, fix)
            try:
                jobs.append(Job(**state))
            except TypeError:
                raise UserError(f"{path} is not a batch's state: {fix}") from None
        return jobs

    def _call(self, step: str, call):
        try:
            return call()
        except openai.APIError as err:
            raise self._failed(step, err) from None

    def _failed(self, step: str, err: openai.APIError) -> UserError:
        hint = (
            " (does it offer the Batch API? set [teacher] batch = false to send requests one by one)"
            if isinstance(err, openai.NotFoundError)
            else ""
        )
        return UserError(
            f"batch API at {self.url}: could not {step}: {describe_error(err, self._key)}{hint}; "
            f"what was submitted is kept in {self.folder}: rerun to go on"
        )


def _json_line(raw: str) -> dict | None:
    """One JSONL line of a batch's output, or None for one that is not a JSON object (its request counts missing)."""
    try:
        line = json.loads(raw)
    except ValueError:
        return None
    return line if isinstance(line, dict) else None
