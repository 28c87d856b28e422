"""Stage 1, generate: prompts -> teacher -> request cache -> data/train.parquet.

Prompts come from lab skills (train split) or a JSONL file. Who writes the completions is the config's
`data.source`: the teacher (through the cache), the lab's ground truth, or the answers a user brought
("human"). Every request is committed to the cache as it is answered, so killing this stage at any moment
and rerunning it sends only the requests that were not answered yet.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

from distillab import models, provenance
from distillab.cache import RequestCache, request_key
from distillab.config import RunConfig, write_atomic
from distillab.dataset import write_dataset
from distillab.errors import UserError
from distillab.generation import encode_example
from distillab.jsonl import read_jsonl
from distillab.lab.world import get_skill
from distillab.rundir import fingerprint, is_fresh, mark_fresh


@dataclass
class GenerateSummary:
    rows: int
    requests_sent: int
    cached: int
    failed: int
    prompt_tokens: int
    completion_tokens: int
    usd: float | None  # None: the teacher is unpriced
    skipped: bool = False


def load_prompts(cfg: RunConfig) -> list[dict]:
    """[{prompt, answer, skill}] from the prompts file when given, else from the lab skills' train split."""
    if cfg.data.prompts_file:
        return read_jsonl_prompts(Path(cfg.data.prompts_file))
    rows = []
    for name in cfg.data.skills:
        try:
            skill = get_skill(name)
        except ValueError as err:
            raise UserError(str(err)) from None
        rows += [{"prompt": e.prompt, "answer": e.answer, "skill": name}
                 for e in skill.examples("train", cfg.data.n_prompts, seed=cfg.data.seed)]
    return rows


def fit_teacher_context(cfg: RunConfig, prompts: list[dict]) -> list[dict]:
    """A local teacher's context must hold prompt + max_new_tokens. Longer prompts are refused, naming their
    lines, before any request; with data.truncate = "left" they keep their last tokens instead."""
    from transformers import AutoConfig

    path = models.check_model_dir(cfg.teacher.model)  # a broken directory is a one-line error, before anything
    text_config = AutoConfig.from_pretrained(str(path), local_files_only=True).get_text_config()
    context = getattr(text_config, "max_position_embeddings", None)
    if not context:
        return prompts
    tok = models.load_tokenizer(cfg.teacher.model)
    room = context - cfg.teacher.max_new_tokens
    if room < 1:
        raise UserError(f"teacher.max_new_tokens {cfg.teacher.max_new_tokens} fills the teacher's whole context "
                        f"({context} tokens)")
    lengths = [len(ids) for ids in tok([p["prompt"] for p in prompts])["input_ids"]]
    too_long = [i for i, n in enumerate(lengths) if n > room]
    if not too_long:
        return prompts
    if cfg.data.truncate == "left":
        out = list(prompts)
        for i in too_long:
            ids = tok(prompts[i]["prompt"], add_special_tokens=False)["input_ids"]
            keep = room - (lengths[i] - len(ids))  # room left after the special tokens the tokenizer adds
            out[i] = prompts[i] | {"prompt": tok.decode(ids[-keep:])}
        return out
    where = cfg.data.prompts_file or "data.skills"
    lines = ", ".join(str(prompts[i].get("line", i + 1)) for i in too_long[:10]) + (" ..." if len(too_long) > 10 else "")
    raise UserError(f"{where}: {len(too_long)} prompt(s) do not fit the teacher's context ({context} tokens, "
                    f"{cfg.teacher.max_new_tokens} kept for the answer): line(s) {lines}; shorten them, or set "
                    "[data] truncate = \"left\"")


def read_jsonl_prompts(path: Path) -> list[dict]:
    rows = []
    for where, obj in read_jsonl(path, "prompt file"):
        if not isinstance(obj, dict) or not isinstance(obj.get("prompt"), str) or not obj["prompt"]:
            raise UserError(f"{where}: each line needs a non-empty string field \"prompt\"")
        answer = obj.get("answer")
        if answer is not None and not isinstance(answer, str):
            raise UserError(f"{where}: \"answer\" must be a string")
        rows.append({"prompt": obj["prompt"], "answer": answer, "skill": obj.get("skill"),
                     "line": int(where.rsplit(":", 1)[1])})
    return rows


def run_generate(cfg: RunConfig, progress=None, log=print) -> GenerateSummary:
    """The task dataset (data/train.parquet), and the retain replay set (data/replay.parquet) when configured."""
    if cfg.retain.enabled:
        from distillab.retain import check_retain

        check_retain(cfg)
    prompts = load_prompts(cfg)
    if not prompts:
        raise UserError("no prompts: data.skills is empty and data.prompts_file is not set")
    if cfg.data.source == "teacher" and not cfg.teacher.base_url:
        prompts = fit_teacher_context(cfg, prompts)
    if cfg.retain.selects and cfg.data.prompts_file:  # a user's prompts: hold out a dev share, answered alike
        from distillab.retain import split_dev_prompts

        prompts, dev = split_dev_prompts(prompts, cfg.retain.dev_fraction)
        generate_dataset(cfg, dev, "dev", cfg.teacher, cfg.data.source, progress=progress, log=log)
    summary = generate_dataset(cfg, prompts, "train", cfg.teacher, cfg.data.source, progress=progress, log=log)
    if cfg.retain.replay_fraction > 0:
        from distillab.retain import generate_replay

        generate_replay(cfg, progress=progress, log=log)
    return summary


def generate_dataset(cfg: RunConfig, prompts: list[dict], name: str, teacher_cfg, source: str,
                     progress=None, log=print, teacher_label: str | None = None) -> GenerateSummary:
    """prompts -> data/<name>.parquet, written by `source`: the teacher `teacher_cfg` describes (through the
    run's request cache) or the answers the prompts carry. teacher_label overrides the provenance teacher id."""
    run_dir = cfg.run_dir
    stage = "generate" if name == "train" else f"generate:{name}"
    out_path = run_dir / "data" / f"{name}.parquet"
    student_tok = models.load_tokenizer(cfg.train.student)

    if source != "teacher":
        stamp = fingerprint(stage, cfg.data.model_dump(), prompts, cfg.train.student)
        if is_fresh(run_dir, stage, stamp) and out_path.is_file():
            return GenerateSummary(len(prompts), 0, 0, 0, 0, 0, 0.0, skipped=True)
        rows = _ground_truth_rows(prompts, source, student_tok, cfg.data.declared_teacher)
        write_dataset(out_path, rows)
        mark_fresh(run_dir, stage, stamp)
        return GenerateSummary(len(rows), 0, 0, 0, 0, 0, 0.0)

    from distillab.pricing import TeacherPricing
    from distillab.teachers import make_teacher

    teacher = make_teacher(teacher_cfg)
    requests = [teacher.request(p["prompt"]) for p in prompts]
    keys = [request_key(r) for r in requests]
    stamp = fingerprint(stage, keys, cfg.train.student)
    summary_path = run_dir / "data" / f"{'generate' if name == 'train' else name}_summary.json"
    if is_fresh(run_dir, stage, stamp) and out_path.is_file() and summary_path.is_file():
        last = json.loads(summary_path.read_text())  # what the finished run counted, not a fresh $0
        return GenerateSummary(last["rows"], 0, len(set(keys)), 0, last["prompt_tokens"], last["completion_tokens"],
                               last["usd"], skipped=True)

    cache = RequestCache(run_dir / "teacher.sqlite")
    pricing = TeacherPricing.from_config(teacher_cfg, teacher_is_local=not teacher_cfg.base_url)
    done = cache.cached_keys(keys)
    missing = [r for r, k in zip(requests, keys) if k not in done]
    missing = list({request_key(r): r for r in missing}.values())  # the same prompt twice is one request
    sent = failed = 0
    began = time.time()
    if missing:
        log(f"generate {name}: {len(done)} of {len(set(keys))} cached, asking {teacher.teacher_id} for {len(missing)}")
        # The budget counts what earlier (interrupted) runs already spent on these prompts: a resumed run
        # must not get a fresh max_usd.
        budget = BudgetGuard(teacher_cfg.max_usd, pricing, total=len(missing), prior_usage=cache.usage(keys))
        budget.check()
        if progress:
            progress(0, len(missing), budget)

        def on_done(req, resp, error, latency, attempts):
            nonlocal sent, failed
            sent += 1
            key = request_key(req)
            if resp is None:
                failed += 1
                cache.put_failure(key, req, error or "unknown error", attempts)
            else:
                cache.put(key, req, resp, latency, attempts)
                budget.add(resp)
            if progress:
                progress(sent, len(missing), budget)
            budget.check()

        teacher.answer(missing, on_done)
    usage = cache.usage(keys)
    failures = cache.failures(keys)
    rows = _teacher_rows(prompts, keys, cache, teacher, student_tok, log, teacher_label)
    cache.close()
    if not rows:  # nothing to train on: fail loudly, write no empty dataset, mark nothing fresh
        raise UserError(f"generate {name}: every teacher request failed ({failure_digest(failures)}); "
                        "fix the teacher and rerun: answered requests are cached")
    write_dataset(out_path, rows)
    if not failures:
        mark_fresh(run_dir, stage, stamp)
    spent = pricing.usd_for(usage)
    previous = json.loads(summary_path.read_text()).get("answer_seconds", 0.0) if summary_path.is_file() else 0.0
    write_atomic(summary_path, json.dumps({
        "rows": len(rows), "failed": len(failures), "teacher": teacher_cfg.model,
        "prompt_tokens": usage["prompt_tokens"], "completion_tokens": usage["completion_tokens"],
        "usd": spent, "priced": spent is not None, "pricing": pricing.to_dict(),
        "answer_seconds": round(previous + time.time() - began, 2),  # wall time asking, over every resume
        "failures": failures[:20]}, indent=1))
    return GenerateSummary(len(rows), sent, len(done), len(failures), usage["prompt_tokens"],
                           usage["completion_tokens"], spent)


def failure_digest(failures: list[dict], most: int = 3) -> str:
    """'3x connection refused; 1x HTTP 400: ...': the first distinct errors, counted."""
    from collections import Counter

    counts = Counter((f["error"] or "unknown error").splitlines()[0][:160] for f in failures)
    return "; ".join(f"{n}x {error}" for error, n in counts.most_common(most)) or "no answer"


class BudgetGuard:
    """Stops generation before the projected spend passes max_usd.

    spent      dollars on this dataset so far: earlier runs' cached answers (prior_usage) plus this run's;
    projected  the earlier runs' spend + this run's requests x the cost per request (this run's average once
               there is one, else the earlier runs'), so a rerun after a stop stops before sending anything.
    Both are None when the teacher is unpriced (then max_usd cannot be enforced; pricing warned about it).
    Requests already in flight when it stops still land, are paid for and are cached.
    """

    def __init__(self, max_usd: float | None, pricing, total: int, prior_usage: dict | None = None):
        self.max_usd, self.pricing, self.total = max_usd, pricing, total  # total: requests this run sends
        self.prior = pricing.usd_for(prior_usage or {})
        self.prior_requests = (prior_usage or {}).get("requests", 0)
        self.done = self.prompt_tokens = self.completion_tokens = 0

    def add(self, response: dict) -> None:
        self.done += 1
        self.prompt_tokens += response.get("prompt_tokens", 0)
        self.completion_tokens += response.get("completion_tokens", 0)

    @property
    def spent_this_run(self) -> float | None:
        return self.pricing.usd_for({"prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens})

    @property
    def spent(self) -> float | None:
        now = self.spent_this_run
        return None if now is None or self.prior is None else self.prior + now

    @property
    def projected(self) -> float | None:
        now = self.spent_this_run
        if now is None or self.prior is None:
            return None
        if self.done:
            per_request = now / self.done
        else:
            per_request = self.prior / self.prior_requests if self.prior_requests else 0.0
        return self.prior + per_request * self.total

    def check(self) -> None:
        projected = self.projected
        if self.max_usd is not None and projected is not None and projected > self.max_usd:
            raise UserError(f"stopped: projected teacher spend ${projected:.4f} would pass max_usd ${self.max_usd:.4f} "
                            f"(spent ${self.spent:.4f}; answered requests are cached, a rerun resumes)")


def _ground_truth_rows(prompts: list[dict], source: str, tokenizer, declared_teacher: str | None = None) -> list[dict]:
    """Rows whose completions are the answers we were given; tagged with the source the user declared."""
    tag = (provenance.provenance_row("teacher", teacher_id=declared_teacher) if declared_teacher
           else provenance.provenance_row(source))
    rows = []
    for i, p in enumerate(prompts):
        if p["answer"] is None:
            raise UserError(f"data.source = {source!r} needs an \"answer\" for every prompt (prompt {i + 1} has none)")
        prompt_ids, completion_ids = encode_example(tokenizer, p["prompt"], p["answer"])
        p = {k: v for k, v in p.items() if k != "line"}
        rows.append({**p, "completion": p["answer"], "prompt_ids": prompt_ids, "completion_ids": completion_ids,
                     "top_ids": None, "top_logprobs": None, **tag})
    return rows


def _teacher_rows(prompts, keys, cache, teacher, tokenizer, log=print, teacher_label: str | None = None) -> list[dict]:
    sampling = {k: v for k, v in teacher.request("").items() if k not in ("prompt", "messages", "endpoint", "model")}
    rows, dropped_topk = [], 0
    for p, key in zip(prompts, keys):
        resp = cache.get(key)
        if resp is None:  # failed for good: recorded in the cache's failures, left out of the data
            continue
        top_ids, top_lp = resp.get("top_ids"), resp.get("top_logprobs")
        if resp.get("token_ids") is not None and _ids_match(resp, tokenizer):
            prompt_ids = tokenizer(p["prompt"])["input_ids"]
            completion_ids = resp["token_ids"]
        else:  # no ids, or the teacher's ids are not the student's: the student's tokenizer reads the text
            prompt_ids, completion_ids = encode_example(tokenizer, p["prompt"], resp["text"])
            if resp.get("token_ids") is not None:
                top_ids = top_lp = None  # teacher-vocabulary ids, meaningless to this student
                dropped_topk += 1
        if top_ids is None and resp.get("top_tokens") is not None:
            from distillab.teachers.openai_compat import map_top_tokens

            top_ids, top_lp, completion_ids = map_top_tokens(resp, tokenizer)
        p = {k: v for k, v in p.items() if k != "line"}
        rows.append({**p, "completion": resp["text"], "prompt_ids": prompt_ids, "completion_ids": completion_ids,
                     "top_ids": top_ids, "top_logprobs": top_lp,
                     **provenance.provenance_row("teacher", teacher_id=teacher_label or teacher.teacher_id,
                                                 endpoint=teacher.endpoint,
                                                 sampling=sampling, request_hash=key)})
    if dropped_topk:
        log(f"generate: the teacher's token ids are not the student's tokenizer's in {dropped_topk} rows: their text was "
            "re-tokenized and their top-k logprobs left out (those rows train with SFT only)")
    return rows


def _ids_match(resp: dict, tokenizer) -> bool:
    """Teacher token ids are usable only when they are the student's: in range and decoding to the text."""
    ids = resp["token_ids"]
    if any(not 0 <= i < len(tokenizer) for i in ids):
        return False
    return tokenizer.decode(ids, skip_special_tokens=True) == resp["text"]
