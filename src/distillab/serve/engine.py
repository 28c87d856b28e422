"""The batching engine: handlers submit jobs to a queue; one loop collects them for a few milliseconds (until
none came for `batch_wait_ms`, at most 4 x that), groups the ones with compatible sampling parameters and runs
one `sampling.generate` call per group in a worker thread. While a batch runs, the next one fills up. A job whose
requester gave up (its future cancelled: the client disconnected) is dropped when it is taken off the queue, and a
group is checked again just before it runs: abandoned prompts are not computed (but for those already running).
Work that must be kept once it costs something (an answer under an Idempotency-Key, replayed to the client's retry)
sets `on_start` around its submits: the engine calls it when a batch holding one of its jobs begins."""

from __future__ import annotations

import asyncio
import contextvars
import logging
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Literal

import torch

from distillab.batching import right_pad
from distillab.sampling import generate
from distillab.serve.metrics import Metrics

log = logging.getLogger("distillab.serve")

# Called (in the event loop) when a batch holding a job submitted under it starts: a context variable, so that it
# reaches the engine through the handlers (and the tasks asyncio.gather makes of them) without a parameter each.
on_start: contextvars.ContextVar[Callable[[], None] | None] = contextvars.ContextVar("on_start", default=None)


@dataclass
class _Job:
    kind: Literal["generate", "score"]
    prompt: str | list[int]  # generate: text; score: token ids
    k: int  # top-k logprobs wanted
    group: tuple  # jobs with equal groups run in one model call
    future: asyncio.Future
    started: Callable[[], None] | None = None  # on_start as it was when the job was submitted


class Engine:
    """Owns the model. Handlers submit jobs; one loop batches them and runs the model in one worker thread."""

    def __init__(self, model, tokenizer, max_batch: int = 32, batch_wait_ms: float = 5.0):
        self.model, self.tokenizer = model, tokenizer
        self.max_batch, self.batch_wait_s = max_batch, batch_wait_ms / 1000
        self.queue: asyncio.Queue[_Job] | None = None
        self.worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="distillab-model")  # one model user
        self.metrics = Metrics()
        self._sample_seed = 0

    async def submit(self, kind, prompt, k, group):
        future = asyncio.get_running_loop().create_future()
        job = _Job(kind=kind, prompt=prompt, k=k, group=group, future=future, started=on_start.get())
        await self.queue.put(job)
        return await job.future

    async def run(self) -> None:
        self.queue = asyncio.Queue()
        loop = asyncio.get_running_loop()
        while True:
            jobs = [await self.queue.get()]
            if jobs[0].future.done():  # abandoned while it waited
                continue
            # Collect until no request came for batch_wait (clients answered together send their next
            # requests a little apart: wait for the stragglers), but never longer than 4 x batch_wait.
            cap = loop.time() + 4 * self.batch_wait_s
            while len(jobs) < self.max_batch:
                wait = min(self.batch_wait_s, cap - loop.time())
                try:
                    job = await asyncio.wait_for(self.queue.get(), max(0.0, wait))
                except TimeoutError:
                    break
                if not job.future.done():
                    jobs.append(job)
            groups: dict[tuple, list[_Job]] = {}
            for job in jobs:
                groups.setdefault(job.group, []).append(job)
            for gathered in groups.values():
                group = [job for job in gathered if not job.future.done()]  # abandoned while an earlier group ran
                if not group:
                    continue
                self.metrics.batches.inc()
                self.metrics.batched_prompts.inc(len(group))
                for job in group:
                    if job.started is not None:
                        job.started()
                try:
                    results = await loop.run_in_executor(self.worker, self._run_group, group)
                except Exception as err:  # the model failed: every job in the batch gets the error
                    log.exception("batch failed")
                    results = [err] * len(group)
                for job, result in zip(group, results):
                    if job.future.done():
                        continue
                    if isinstance(result, Exception):
                        job.future.set_exception(result)
                    else:
                        job.future.set_result(result)

    def _run_group(self, jobs: list[_Job]) -> list:
        k = max(j.k for j in jobs)
        if jobs[0].kind == "score":
            return score_prompts(self.model, [j.prompt for j in jobs], k)
        max_tokens, temperature, top_p, seed = jobs[0].group[1:]
        if seed is None:  # no seed asked: vary it per batch, so samples differ between batches
            self._sample_seed += 1
            seed = self._sample_seed
        return generate(
            self.model,
            self.tokenizer,
            [j.prompt for j in jobs],
            max_new_tokens=max_tokens,
            temperature=temperature,
            top_p=top_p,
            top_k_logprobs=k,
            batch_size=len(jobs),
            seed=seed,
        )


@torch.no_grad()
def score_prompts(model, id_lists: list[list[int]], k: int, max_floats: int = 1 << 27) -> list[dict]:
    """Logprob of each prompt token given the ones before it (the first has none), and the top-k there."""
    device = next(model.parameters()).device
    out: list[dict] = []
    for batch in _size_chunks(id_lists, model.config.vocab_size, max_floats):
        ids, mask = right_pad(batch, 0)  # (B, T) right-padded: positions stay 0..n-1; padding is never scored
        ids, mask = ids.to(device), mask.to(device)
        logprobs = model(input_ids=ids, attention_mask=mask).logits[:, :-1].float().log_softmax(-1)  # (B, T-1, V)
        for row, seq in enumerate(batch):
            n = len(seq) - 1
            lp = logprobs[row, :n]  # (n, V): position t predicts token t+1
            chosen = lp.gather(-1, ids[row, 1 : n + 1].unsqueeze(-1)).squeeze(-1)  # (n,)
            top_lp, top_id = lp.topk(k, dim=-1)  # (n, k)
            out.append({"token_logprobs": chosen.tolist(), "top_ids": top_id.tolist(), "top_logprobs": top_lp.tolist()})
    return out


def _size_chunks(id_lists: list[list[int]], vocab: int, max_floats: int):
    """Consecutive sub-batches whose padded B x T x V logits stay under max_floats (at least one prompt each)."""
    chunk: list[list[int]] = []
    longest = 0
    for seq in id_lists:
        if chunk and (len(chunk) + 1) * max(longest, len(seq)) * vocab > max_floats:
            yield chunk
            chunk, longest = [], 0
        chunk.append(seq)
        longest = max(longest, len(seq))
    if chunk:
        yield chunk
