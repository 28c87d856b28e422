"""The API teacher on the eval suites: scored through the same endpoint(s), client, request cache and prices as
generate, so a run with `teacher.base_url` has a teacher row, a gap closed and a break-even like a local one.

- Requests are built by the teacher's own `request()` (OpenAITeacher: concurrency, retries, endpoint lists), with
  eval's settings: greedy (temperature 0, top_p 1), no logprobs, one sample, `teacher.max_new_tokens` (what the
  local models get). Prompts are asked as generate asks them: in chat mode a plain prompt as one user turn and a
  task line's conversation as given (the server applies its own chat template, as each local model is given its
  own); in completions mode the text (a conversation's plain text), as a model without a template sees it.
- Every answer is committed to the run's teacher.sqlite before it counts; a rerun asks only for what the cache lacks
  (nothing, once the teacher was scored). The cache file is first created by an answer: an endpoint that answers
  nothing leaves nothing on disk.
- Spend: the tokens the evaluation's requests were billed (the cache's usage over their keys) go in the EvalResult
  (`endpoint_usage`) and from there to the ledger's own line, never into the data generation's. teacher.max_usd
  bounds the run's whole teacher spend: generation + teacher replay + this evaluation (pricing.BudgetGuard).
- Not scored, with the reason in eval/teacher.json (`not_scored`) and so in the report: `eval.score_teacher =
  false`; a task suite with multiple-choice lines (they need log-likelihoods of given text, which an endpoint is
  not asked for here); a projected spend over max_usd (answers so far stay cached: raise it and rerun).
  A request that fails for good (an unreachable endpoint, a refused request) is a one-line UserError instead:
  the endpoint is broken, and nothing is written.
"""

from __future__ import annotations

import time

from distillab import chat
from distillab.cache import RequestCache, request_key
from distillab.config import RunConfig
from distillab.errors import UserError
from distillab.files import read_json
from distillab.pricing import BudgetExceeded, BudgetGuard
from distillab.records import EndpointUsage, EvalResult, SuiteScore
from distillab.rundir import RunDir
from distillab.scoring import Complete, eval_record, score_with
from distillab.teachers import failure_digest


class NotScored(Exception):
    """The teacher cannot be scored; str() is the reason the report shows."""


def not_scored_record(
    cfg: RunConfig, task: list[str], general: list[str], reason: str, usage: EndpointUsage | None = None
) -> EvalResult:
    """eval/teacher.json for a teacher that was not scored: no scores, the reason, what was spent trying."""
    return EvalResult(
        model=cfg.teacher.model,
        task=SuiteScore(score=None),
        general=SuiteScore(score=None),
        suites={"task": task, "general": general},
        label="teacher",
        not_scored=reason,
        endpoint_usage=usage,
    )


def endpoint_eval_settings(teacher_cfg):
    """The teacher's config as evaluation asks it: greedy, text only, one sample."""
    return teacher_cfg.model_copy(
        update={"temperature": 0.0, "top_p": 1.0, "top_k_logprobs": 0, "samples_per_prompt": 1}
    )


class EndpointCompletions:
    """A Complete (prompts or conversations -> greedy texts) over the teacher's endpoint, through the run's
    request cache.

    `fetch(prompts)` asks the endpoint for every prompt the cache lacks, at once (so the budget sees the whole
    bill before the first request); calling it with prompts returns their texts, fetching any still missing."""

    def __init__(self, cfg: RunConfig, log=print):
        from distillab.costs import teacher_pricing
        from distillab.teachers.openai_compat import OpenAITeacher

        self.cfg, self.log = cfg, log
        self.teacher = OpenAITeacher(endpoint_eval_settings(cfg.teacher))
        self.pricing = teacher_pricing(cfg)
        self.run = RunDir(cfg.run_dir)
        self.path = self.run.cache()
        self.keys: dict[str, None] = {}  # every request this evaluation needs, in order
        self.sent = 0
        self._cache: RequestCache | None = None

    def cache(self, create: bool = False) -> RequestCache | None:
        if self._cache is None and (create or self.path.is_file()):
            self._cache = RequestCache(self.path)
        return self._cache

    def close(self) -> None:
        if self._cache is not None:
            self._cache.close()

    def fetch(self, prompts: list) -> None:
        requests = {request_key(r): r for r in map(self.request, prompts)}
        self.keys.update(dict.fromkeys(requests))
        cache = self.cache()
        held = cache.cached_keys(list(requests)) if cache else set()
        todo = [r for k, r in requests.items() if k not in held]
        if not todo:
            return
        budget = BudgetGuard(
            self.cfg.teacher.max_usd, self.pricing, total=len(todo), prior_usage=self._prior_spend(held)
        )
        self.log(
            f"evaluate: teacher: {len(held)} of {len(requests)} answers cached, asking {self.teacher.endpoint} "
            f"for {len(todo)}"
        )
        failures: list[dict] = []

        def on_done(req, resp, error, latency, attempts):
            self.sent += 1
            if resp is None:
                failures.append({"error": error})
                return
            self.cache(create=True).put(request_key(req), req, resp, latency, attempts)
            budget.add(resp)
            budget.check()

        try:
            budget.check()
            self.teacher.answer(todo, on_done)
        except BudgetExceeded as err:
            raise NotScored(f"teacher.max_usd: {err}") from None
        if failures:
            raise UserError(
                f"evaluate teacher: {len(failures)} of {len(todo)} requests to {self.teacher.endpoint} "
                f"failed ({failure_digest(failures)}); answers so far are cached: fix the endpoint and "
                "rerun, or set [eval] score_teacher = false"
            )

    def __call__(self, prompts: list) -> list[str]:
        self.fetch(prompts)
        cache = self.cache()
        return [cache.get(request_key(self.request(p)))["text"] for p in prompts]

    def request(self, prompt: str | list[dict]) -> dict:
        """A plain prompt, or a conversation (a task line's "messages"), asked as generate asks it: chat mode sends
        the turns as given, completions mode their plain text."""
        if isinstance(prompt, str):
            return self.teacher.request(prompt)
        return self.teacher.request(chat.plain_text(prompt), messages=prompt)

    def usage(self) -> EndpointUsage:
        cache = self.cache()
        totals = cache.usage(list(self.keys)) if cache else {"prompt_tokens": 0, "completion_tokens": 0}
        return EndpointUsage(
            endpoint=self.teacher.endpoint,
            requests=len(self.keys),
            sent=self.sent,
            prompt_tokens=totals["prompt_tokens"],
            completion_tokens=totals["completion_tokens"],
        )

    def _prior_spend(self, held: set[str]) -> dict:
        """The run's teacher usage so far: the dataset's and teacher replay's (their summaries), and this
        evaluation's cached answers, as {requests, prompt_tokens, completion_tokens} for BudgetGuard."""
        total = {"requests": 0, "prompt_tokens": 0, "completion_tokens": 0}
        retain = self.cfg.retain
        summaries = [self.run.generate_summary("train")]
        if retain.replay_fraction > 0 and retain.replay_source == "teacher":  # other replay is not the teacher's bill
            summaries.append(self.run.generate_summary("replay"))
        parts = [read_json(p) for p in summaries if p.is_file()]
        parts = [{"requests": s.get("rows", 0), **s} for s in parts]
        if held:
            parts.append(self.cache().usage(sorted(held)))
        for part in parts:
            for k in total:
                total[k] += part.get(k, 0) or 0
        return total


def evaluate_endpoint_teacher(
    cfg: RunConfig, task: list[str], general: list[str], examples: list[dict] | None, log=print
) -> EvalResult:
    """The API teacher's EvalResult: scored through its endpoint, or a not-scored record with the reason."""
    if any(ex["scorer"] == "multiple_choice" for ex in examples or []):
        return not_scored_record(
            cfg,
            task,
            general,
            "the task suite has multiple-choice lines, which need log-likelihoods the endpoint is not asked for",
        )
    complete = EndpointCompletions(cfg, log=log)
    try:
        # A dry pass with a recording completer lists every prompt the suites ask, so one fetch sends them all.
        asked: list = []
        score_with(_recorder(asked), task + general, cfg.eval.n_per_skill, "test", examples)
        began = time.time()
        try:
            complete.fetch(asked)  # repeats are one request (fetch keys them)
        except NotScored as why:
            return not_scored_record(cfg, task, general, str(why), complete.usage())
        per_skill = score_with(complete, task + general, cfg.eval.n_per_skill, "test", examples)
        res = eval_record(
            cfg.teacher.model,
            per_skill,
            task,
            general,
            cfg.eval.bootstrap,
            time.time() - began,
            endpoint_usage=complete.usage(),
        )
    finally:
        complete.close()
    return res


def _recorder(asked: list) -> Complete:
    def record(prompts: list) -> list[str]:
        asked.extend(prompts)
        return [""] * len(prompts)

    return record
