"""Stage 1, generate: prompts -> teacher -> request cache -> the dataset, streamed.

Prompts come from lab skills (train split) or a prompts file (JSONL or Parquet, read lazily). Who writes the
completions is the config's `data.source`: the teacher (through the cache), the lab's ground truth, or the
answers a user brought ("human").

Streaming. The prompts are cut into chunks of CHUNK_ROWS rows (a row: one prompt's sample). Requests are read
from the chunks only as the teacher has room for them (its concurrency bounds what is in flight), and every
answer is committed to the cache as it comes. When every request of a chunk is answered, its rows are written
as one Parquet shard, atomically (temp + rename): data/<name>/part-<I>-of-<N>-<chunk>-<digest>.parquet, the
digest covering the chunk's request keys and the student tokenizer. A chunk with a failed request is written
with `-partial` in its name (its answered rows count; a rerun asks its failures again and replaces it). Memory
follows the chunk and the requests in flight, not the dataset. Killing this stage at any moment and rerunning
it skips every chunk whose shard exists and asks the teacher only for what the cache does not hold.

The dataset is the shard set: dataset.read_dataset(data/<name>.parquet) reads the file, else every shard in
data/<name>/. A single process (shard 0/1) merges its shards into data/<name>.parquet at the end (streamed, a
shard at a time) and removes them, so single-file readers keep working.

Many machines: `--shard I/N` takes the prompts whose hash (sha256 of "shard|" + prompt) is I mod N, with every
sample of a prompt; each process writes only its own part-I-of-N files into the shared run directory, its own
request cache (teacher.shard-I-of-N.sqlite: SQLite's WAL must not be shared over a network filesystem) and
its own data/<name>/summary-I-of-N.json; data/generate_summary.json sums every shard's summary so far. A merge
is just reading all shards. Shard runs never write stages.json (a shared file) and leave no merged file.

samples_per_prompt (temperature > 0): each sample is its own request (keyed with "sample": s from the second
on) and its own row, with a `sample` column.
"""

from __future__ import annotations

import contextvars
import hashlib
import itertools
import json
import time
from dataclasses import dataclass, field
from pathlib import Path

from distillab import models, provenance
from distillab.cache import RequestCache, request_key
from distillab.config import RunConfig, write_atomic
from distillab.dataset import SHARD_GLOB, shard_dir, write_dataset
from distillab.errors import UserError, not_utf8
from distillab.sampling import encode_example
from distillab.lab.world import get_skill
from distillab.rundir import check_stamps, is_fresh, mark_fresh

CHUNK_ROWS = 2048  # rows a shard holds: the unit of writing and of resuming
WHOLE = (0, 1)  # shard I of N: the whole prompt set
# set by run_generate, so datasets other modules ask for (retain's replay) follow its shard; per thread/task
_current_shard: contextvars.ContextVar = contextvars.ContextVar("distillab_generate_shard", default=WHOLE)


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
    endpoints: dict = field(default_factory=dict)  # url -> this run's {answered, errors, prompt/completion tokens}


def parse_shard(text: str | None) -> tuple[int, int]:
    """"I/N" (0 <= I < N) -> (I, N); None -> (0, 1)."""
    if text is None:
        return WHOLE
    try:
        i, n = (int(x) for x in text.split("/"))
    except ValueError:
        raise UserError(f"--shard {text!r}: give I/N, e.g. 0/4 (shard I of N, counted from 0)") from None
    if n < 1 or not 0 <= i < n:
        raise UserError(f"--shard {text!r}: need 0 <= I < N (shard I of N, counted from 0)")
    return i, n


def in_shard(prompt: str, shard: tuple[int, int]) -> bool:
    """Whether the prompt belongs to shard I of N: a stable hash, the same on every machine."""
    i, n = shard
    return n == 1 or int.from_bytes(hashlib.sha256(("shard|" + prompt).encode()).digest()[:8], "big") % n == i


class PromptStream:
    """A prompt source that can be read more than once, lazily: iter() starts it again."""

    def __init__(self, make):
        self._make = make

    def __iter__(self):
        return self._make()


def load_prompts(cfg: RunConfig) -> list[dict]:
    """[{prompt, answer, skill}] from the prompts file when given, else from the lab skills' train split."""
    return list(prompt_stream(cfg))


def prompt_stream(cfg: RunConfig):
    """The prompts of load_prompts, read lazily from a prompts file (a list for lab skills: they are small)."""
    if cfg.data.prompts_file:
        path = Path(cfg.data.prompts_file)
        if path.suffix == ".parquet":
            return PromptStream(lambda: iter_parquet_prompts(path))
        return PromptStream(lambda: iter_jsonl_prompts(path))
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
    return list(iter_jsonl_prompts(path))


def iter_jsonl_prompts(path: Path):
    """{prompt, answer, skill, line} per non-empty line, read a line at a time; errors name the file and line."""
    what = "prompt file"
    if path.is_dir():
        raise UserError(f"{what} {path} is a directory: give a JSONL file")
    if not path.is_file():
        raise UserError(f"{what} not found: {path}")
    seen = False
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8-sig" if lineno == 1 else "utf-8")
            except UnicodeDecodeError as err:
                raise not_utf8(f"{path}:{lineno}", err) from None
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as err:
                raise UserError(f"{where}: malformed JSON ({err.msg})") from None
            seen = True
            yield _prompt_record(obj, where, lineno)
    if not seen:
        raise UserError(f"{what} is empty: {path}")


def iter_parquet_prompts(path: Path):
    """The same records from a Parquet file with a "prompt" column (optional "answer", "skill"), a batch at a time."""
    import pyarrow.parquet as pq

    if not path.is_file():
        raise UserError(f"prompt file not found: {path}")
    reader = pq.ParquetFile(path)
    names = reader.schema_arrow.names
    if "prompt" not in names:
        raise UserError(f"{path}: a Parquet prompt file needs a \"prompt\" column")
    columns = [c for c in ("prompt", "answer", "skill") if c in names]
    lineno = 0
    for batch in reader.iter_batches(batch_size=4096, columns=columns):
        for obj in batch.to_pylist():
            lineno += 1
            yield _prompt_record(obj, f"{path}: row {lineno}", lineno)
    if not lineno:
        raise UserError(f"prompt file is empty: {path}")


def _prompt_record(obj, where: str, line: int) -> dict:
    if not isinstance(obj, dict) or not isinstance(obj.get("prompt"), str) or not obj["prompt"]:
        raise UserError(f"{where}: each line needs a non-empty string field \"prompt\"")
    answer = obj.get("answer")
    if answer is not None and not isinstance(answer, str):
        raise UserError(f"{where}: \"answer\" must be a string")
    return {"prompt": obj["prompt"], "answer": answer, "skill": obj.get("skill"), "line": line}


def run_generate(cfg: RunConfig, progress=None, log=print, shard: tuple[int, int] = WHOLE) -> GenerateSummary:
    """The task dataset (data/train.parquet, or data/train/ shards), and the retain replay set when configured.
    shard: (I, N) for `generate --shard I/N` (module docstring)."""
    if cfg.retain.enabled:
        from distillab.retain import check_retain

        check_retain(cfg)
    prompts = prompt_stream(cfg)
    if next(iter(prompts), None) is None:
        raise UserError("no prompts: data.skills is empty and data.prompts_file is not set")
    if cfg.data.source == "teacher" and not cfg.teacher.base_url:
        prompts = fit_teacher_context(cfg, list(prompts))
    token = _current_shard.set(shard)
    try:
        if cfg.retain.selects and cfg.data.prompts_file:  # a user's prompts: hold out a dev share, answered alike
            from distillab.retain import split_dev_prompts

            prompts, dev = split_dev_prompts(list(prompts), cfg.retain.dev_fraction)
            generate_dataset(cfg, dev, "dev", cfg.teacher, cfg.data.source, progress=progress, log=log, shard=shard)
        summary = generate_dataset(cfg, prompts, "train", cfg.teacher, cfg.data.source, progress=progress, log=log,
                                   shard=shard)
        if cfg.retain.replay_fraction > 0:
            from distillab.retain import generate_replay

            generate_replay(cfg, progress=progress, log=log)
    finally:
        _current_shard.reset(token)
    return summary


def generate_dataset(cfg: RunConfig, prompts, name: str, teacher_cfg, source: str, progress=None, log=print,
                     teacher_label: str | None = None, shard: tuple[int, int] | None = None) -> GenerateSummary:
    """prompts (a list, or any iterable that can be read again) -> data/<name>.parquet (or its shards), written by
    `source`: the teacher `teacher_cfg` describes (through the run's request cache) or the answers the prompts
    carry. teacher_label overrides the provenance teacher id. shard: (I, N), default run_generate's."""
    shard = shard or _current_shard.get()
    run_dir = cfg.run_dir
    stage = "generate" if name == "train" else f"generate:{name}"
    out_path = run_dir / "data" / f"{name}.parquet"
    parts = _Parts(out_path, shard)
    parts.check_layout()
    check_stamps(run_dir)  # a corrupt stages.json is an error before anything is written
    student_tok = models.load_tokenizer(cfg.train.student)
    samples = teacher_cfg.samples_per_prompt if source == "teacher" else 1

    def chunks():
        """[(prompt, sample)] lists of CHUNK_ROWS rows, this shard's only."""
        rows = ((p, s) for p in prompts if in_shard(p["prompt"], shard) for s in range(samples))
        return iter(lambda: list(itertools.islice(rows, CHUNK_ROWS)), [])

    if source != "teacher":
        return _generate_given(cfg, chunks, name, stage, source, parts, student_tok)

    from distillab.pricing import TeacherPricing
    from distillab.teachers import make_teacher

    teacher = make_teacher(teacher_cfg)
    salt = f"{cfg.train.student}|{teacher_label}|{samples}"  # what else decides a shard's rows

    def keyed(chunk):
        return [request_key(teacher.request(p["prompt"], s)) for p, s in chunk]

    summary_path = parts.summary_path(run_dir, name)
    cache = RequestCache(run_dir / parts.cache_name)
    try:
        # Pass 1, the plan: every chunk's keys and digest (the stage's stamp), what the cache holds.
        stamp, digests, n_cached, n_missing, prior = hashlib.sha256(salt.encode()), [], 0, 0, _zero_usage()
        for chunk in chunks():
            keys = keyed(chunk)
            digests.append(_digest(salt, keys))
            stamp.update(digests[-1].encode())
            unique = list(dict.fromkeys(keys))
            cached = cache.cached_keys(unique)
            n_cached += len(cached)
            n_missing += len(unique) - len(cached)
            _add_usage(prior, cache.usage(unique))
        stamp = stamp.hexdigest()[:16]
        if not digests:  # every prompt hashed to other shards
            log(f"generate {name}: no prompt falls in shard {shard[0]}/{shard[1]}")
            return GenerateSummary(0, 0, 0, 0, 0, 0, 0.0)
        if parts.whole and is_fresh(run_dir, stage, stamp) and out_path.is_file() and summary_path.is_file():
            last = json.loads(summary_path.read_text())  # what the finished run counted, not a fresh $0
            return GenerateSummary(last["rows"], 0, n_cached, 0, last["prompt_tokens"], last["completion_tokens"],
                                   last["usd"], skipped=True)
        parts.remove_stale(digests)

        pricing = TeacherPricing.from_config(teacher_cfg.model_copy(update={"base_url": (teacher_cfg.urls or [None])[0]}),
                                             teacher_is_local=not teacher_cfg.base_url)
        # The budget counts what earlier (interrupted) runs already spent on these prompts: a resumed run
        # must not get a fresh max_usd.
        budget = BudgetGuard(teacher_cfg.max_usd, pricing, total=n_missing, prior_usage=prior)
        run = _Run(cache, teacher, student_tok, parts, log, teacher_label)
        began = time.time()
        if n_missing:
            # counted a chunk at a time: a prompt repeated in two chunks counts twice here and is asked once
            log(f"generate {name}: {n_cached} of {n_cached + n_missing} cached, asking {teacher.teacher_id} "
                f"for at most {n_missing}")
            budget.check()
        if progress:
            progress(0, n_missing, budget)

        def on_done(req, resp, error, latency, attempts):
            key = request_key(req)
            if resp is None:
                cache.put_failure(key, req, error or "unknown error", attempts)
            else:
                cache.put(key, req, resp, latency, attempts)
                budget.add(resp)
            run.answered(key, resp is not None)
            if progress:
                progress(run.sent, n_missing, budget)
            budget.check()

        # Pass 2, the work: chunks with a shard are skipped; the others' uncached requests stream to the teacher.
        stream = run.requests(chunks(), keyed, digests)
        if teacher_cfg.base_url:  # an endpoint: one stream, read as its workers free up (no stall between chunks)
            first = next(stream, None)  # a fully cached run sends nothing and needs no API key
            if first is not None:
                teacher.answer(itertools.chain([first], stream), on_done)
        else:  # the local backend works a batch at a time anyway: a list per chunk's worth of requests
            for window in iter(lambda: list(itertools.islice(stream, CHUNK_ROWS)), []):
                teacher.answer(window, on_done)
        run.close_all()
    finally:
        cache.close()
    if run.dropped_topk:
        log(f"generate: the teacher's token ids are not the student's tokenizer's in {run.dropped_topk} rows: their "
            "text was re-tokenized and their top-k logprobs left out (those rows train with SFT only)")
    if not run.rows:  # nothing to train on: fail loudly, write no empty dataset, mark nothing fresh
        raise UserError(f"generate {name}: every teacher request failed ({failure_digest(run.failures)}); "
                        "fix the teacher and rerun: answered requests are cached")
    if parts.whole:
        parts.merge()
        if not run.n_failed:
            mark_fresh(run_dir, stage, stamp)
    spent = pricing.usd_for(run.usage)
    previous = json.loads(summary_path.read_text()).get("answer_seconds", 0.0) if summary_path.is_file() else 0.0
    endpoints = {url: dict(stats) for url, stats in teacher.endpoint_stats.items()}
    write_atomic(summary_path, json.dumps({
        "rows": run.rows, "failed": run.n_failed, "teacher": teacher_cfg.model,
        "prompt_tokens": run.usage["prompt_tokens"], "completion_tokens": run.usage["completion_tokens"],
        "usd": spent, "priced": spent is not None, "pricing": pricing.to_dict(),
        "answer_seconds": round(previous + time.time() - began, 2),  # wall time asking, over every resume
        "endpoints": endpoints,  # this run's requests per endpoint: answered, errors, tokens
        "failures": run.failures[:20]}, indent=1))
    if not parts.whole:
        parts.combine_summaries(run_dir, name)
    return GenerateSummary(run.rows, run.sent, n_cached, run.n_failed, run.usage["prompt_tokens"],
                           run.usage["completion_tokens"], spent, endpoints=endpoints)


def _generate_given(cfg, chunks, name, stage, source, parts, student_tok) -> GenerateSummary:
    """Rows whose completions are the answers the prompts carry: the same shards, no teacher."""
    run_dir = cfg.run_dir
    salt = json.dumps([cfg.data.model_dump(), cfg.train.student, source])
    digests, stamp = [], hashlib.sha256(salt.encode())
    for i, chunk in enumerate(chunks()):  # every answer checked before anything is written
        for j, (p, _) in enumerate(chunk):
            if p["answer"] is None:
                raise UserError(f"data.source = {source!r} needs an \"answer\" for every prompt "
                                f"(prompt {i * CHUNK_ROWS + j + 1} has none)")
        digests.append(_digest(salt, [json.dumps(p, sort_keys=True) for p, _ in chunk]))
        stamp.update(digests[-1].encode())
    stamp = stamp.hexdigest()[:16]
    out_path = run_dir / "data" / f"{name}.parquet"
    n = sum(len(c) for c in chunks())
    if parts.whole and is_fresh(run_dir, stage, stamp) and out_path.is_file():
        return GenerateSummary(n, 0, 0, 0, 0, 0, 0.0, skipped=True)
    parts.remove_stale(digests)
    for i, chunk in enumerate(chunks()):
        if not parts.done(i, digests[i]):
            parts.write(i, digests[i], _ground_truth_rows([p for p, _ in chunk], source, student_tok,
                                                          cfg.data.declared_teacher), complete=True)
    if parts.whole:
        parts.merge()
        mark_fresh(run_dir, stage, stamp)
    return GenerateSummary(n, 0, 0, 0, 0, 0, 0.0)


def _digest(salt: str, keys: list[str]) -> str:
    h = hashlib.sha256(salt.encode())
    for k in keys:
        h.update(k.encode() + b"\n")
    return h.hexdigest()[:12]


def _zero_usage() -> dict:
    return {"requests": 0, "prompt_tokens": 0, "completion_tokens": 0, "latency_s": 0.0}


def _add_usage(total: dict, more: dict) -> None:
    for k in total:
        total[k] += more.get(k, 0)


class _Parts:
    """The shard files of one dataset that one process (shard I of N) writes, in data/<name>/."""

    def __init__(self, out_path: Path, shard: tuple[int, int]):
        self.out_path, self.dir = out_path, shard_dir(out_path)
        self.whole = shard == WHOLE
        self.tag = f"{shard[0]:05d}-of-{shard[1]:05d}"
        self.n = shard[1]
        self.cache_name = "teacher.sqlite" if self.whole else f"teacher.shard-{shard[0]}-of-{shard[1]}.sqlite"

    def name(self, chunk: int, digest: str, complete: bool) -> Path:
        return self.dir / f"part-{self.tag}-{chunk:06d}-{digest}{'' if complete else '-partial'}.parquet"

    def summary_path(self, run_dir: Path, name: str) -> Path:
        stem = "generate" if name == "train" else name
        return run_dir / "data" / f"{stem}_summary.json" if self.whole else self.dir / f"summary-{self.tag}.json"

    def check_layout(self) -> None:
        """Shards of a different split (another N) in the same directory would mix two datasets: refused."""
        if not self.dir.is_dir():
            return
        other = sorted({p.name.split("-")[3] for p in self.dir.glob(SHARD_GLOB)} - {f"{self.n:05d}"})
        if other:
            raise UserError(f"{self.dir} holds shards of a {int(other[0])}-way split (--shard I/{int(other[0])}): "
                            f"rerun with that N, or move {self.dir} away (cached answers are kept)")

    def remove_stale(self, digests: list[str]) -> None:
        """Drop this process's shards that the current prompts and config no longer make, and (shard runs) a
        merged file of an earlier whole run: it would shadow the shards."""
        if not self.whole:
            self.out_path.unlink(missing_ok=True)
        keep = {self.name(i, d, c).name for i, d in enumerate(digests) for c in (True, False)}
        for path in self.dir.glob(f"part-{self.tag}-*.parquet") if self.dir.is_dir() else []:
            if path.name not in keep:
                path.unlink()

    def done(self, chunk: int, digest: str) -> bool:
        return self.name(chunk, digest, True).is_file()

    def write(self, chunk: int, digest: str, rows: list[dict], complete: bool) -> None:
        if rows:  # a chunk whose every request failed is left unwritten: a rerun asks again
            write_dataset(self.name(chunk, digest, complete), rows)
        self.name(chunk, digest, not complete).unlink(missing_ok=True)

    def merge(self) -> None:
        """A whole run's shards -> data/<name>.parquet (a shard at a time), then the shards go."""
        from distillab.dataset import write_merged

        files = sorted(self.dir.glob(f"part-{self.tag}-*.parquet")) if self.dir.is_dir() else []
        if not files:
            return
        write_merged(self.out_path, files)
        for f in files:
            f.unlink()
        try:
            self.dir.rmdir()
        except OSError:
            pass  # something else lives there: left alone

    def combine_summaries(self, run_dir: Path, name: str) -> None:
        """data/<stem>_summary.json = the sum of every shard's summary so far (under a lock: shards finish together)."""
        import fcntl

        stem = "generate" if name == "train" else name
        with open(self.dir / ".summary.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            shards = {p.name[len("summary-"):-len(".json")]: json.loads(p.read_text())
                      for p in sorted(self.dir.glob(f"summary-*-of-{self.n:05d}.json"))}
            total = {"rows": 0, "failed": 0, "prompt_tokens": 0, "completion_tokens": 0, "usd": 0.0,
                     "answer_seconds": 0.0, "endpoints": {}, "failures": []}
            for s in shards.values():
                for k in ("rows", "failed", "prompt_tokens", "completion_tokens"):
                    total[k] += s[k]
                total["usd"] = None if total["usd"] is None or s["usd"] is None else total["usd"] + s["usd"]
                total["answer_seconds"] = max(total["answer_seconds"], s["answer_seconds"])  # shards run side by side
                for url, stats in s.get("endpoints", {}).items():
                    into = total["endpoints"].setdefault(url, dict.fromkeys(stats, 0))
                    for k, v in stats.items():
                        into[k] = into.get(k, 0) + v
                total["failures"] = (total["failures"] + s["failures"])[:20]
            last = next(iter(shards.values()))
            total.update(teacher=last["teacher"], priced=total["usd"] is not None, pricing=last["pricing"],
                         shards={tag: s["rows"] for tag, s in shards.items()}, of=self.n)
            write_atomic(run_dir / "data" / f"{stem}_summary.json", json.dumps(total, indent=1))


class _Run:
    """Pass 2's bookkeeping: the chunks waiting for answers, and what was written."""

    def __init__(self, cache, teacher, tokenizer, parts: _Parts, log, teacher_label):
        self.cache, self.teacher, self.tokenizer, self.parts = cache, teacher, tokenizer, parts
        self.log, self.teacher_label = log, teacher_label
        self.open: dict[int, dict] = {}  # chunk -> {chunk, keys, digest, waiting, failed}
        self.waiters: dict[str, list[int]] = {}  # key in flight -> chunks waiting for it
        self.rows = self.sent = self.n_failed = self.dropped_topk = 0
        self.usage, self.failures = _zero_usage(), []

    def requests(self, chunks, keyed, digests):
        """The requests to send, chunk by chunk, read only as the teacher takes them."""
        for i, chunk in enumerate(chunks):
            keys = keyed(chunk)
            unique = list(dict.fromkeys(keys))
            if self.parts.done(i, digests[i]):
                self.rows += len(chunk)
                _add_usage(self.usage, self.cache.usage(unique))
                continue
            cached = self.cache.cached_keys(unique)
            waiting = {k for k in unique if k not in cached}
            self.open[i] = {"chunk": chunk, "keys": keys, "digest": digests[i], "waiting": waiting, "failed": False}
            todo = []
            for (p, s), k in zip(chunk, keys):
                if k in waiting and k not in self.waiters:
                    todo.append(self.teacher.request(p["prompt"], s))
                if k in waiting:
                    self.waiters.setdefault(k, [])
                    if i not in self.waiters[k]:
                        self.waiters[k].append(i)
            if not waiting:
                self.flush(i)
            yield from todo

    def answered(self, key: str, ok: bool) -> None:
        self.sent += 1
        for i in self.waiters.pop(key, []):
            state = self.open[i]
            state["waiting"].discard(key)
            state["failed"] |= not ok
            if not state["waiting"]:
                self.flush(i)

    def flush(self, i: int) -> None:
        state = self.open.pop(i)
        rows, dropped = _teacher_rows(state["chunk"], state["keys"], self.cache, self.teacher, self.tokenizer,
                                      self.teacher_label)
        failures = self.cache.failures(state["keys"])
        self.parts.write(i, state["digest"], rows, complete=not failures)
        self.rows += len(rows)
        self.dropped_topk += dropped
        self.n_failed += len(failures)
        self.failures += failures[: max(0, 20 - len(self.failures))]
        _add_usage(self.usage, self.cache.usage(list(dict.fromkeys(state["keys"]))))

    def close_all(self) -> None:
        for i in sorted(self.open):  # none, unless the teacher dropped a request: written as they are
            self.open[i]["waiting"].clear()
            self.flush(i)


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


def _teacher_rows(chunk, keys, cache, teacher, tokenizer, teacher_label: str | None = None) -> tuple[list[dict], int]:
    """(rows of the chunk's answered requests in prompt order, rows whose top-k was dropped). The top-k goes from
    the cache to the row as the codec's bytes ("topk"): no decode, no second rounding."""
    sampling = {k: v for k, v in teacher.request("").items() if k not in ("prompt", "messages", "endpoint", "model")}
    many = teacher.cfg.samples_per_prompt > 1
    rows, dropped_topk = [], 0
    for (p, sample), key in zip(chunk, keys):
        resp = cache.get(key, raw_topk=True)
        if resp is None:  # failed for good: recorded in the cache's failures, left out of the data
            continue
        topk, top_ids, top_lp = resp.get("topk"), resp.get("top_ids"), resp.get("top_logprobs")
        if resp.get("token_ids") is not None and _ids_match(resp, tokenizer):
            prompt_ids = tokenizer(p["prompt"])["input_ids"]
            completion_ids = resp["token_ids"]
        else:  # no ids, or the teacher's ids are not the student's: the student's tokenizer reads the text
            prompt_ids, completion_ids = encode_example(tokenizer, p["prompt"], resp["text"])
            if resp.get("token_ids") is not None:
                topk = top_ids = top_lp = None  # teacher-vocabulary ids, meaningless to this student
                dropped_topk += 1
        if topk is None and top_ids is None and resp.get("top_tokens") is not None:
            from distillab.teachers.openai_compat import map_top_tokens

            top_ids, top_lp, completion_ids = map_top_tokens(resp, tokenizer)
        p = {k: v for k, v in p.items() if k != "line"}
        rows.append({**p, **({"sample": sample} if many else {}), "completion": resp["text"],
                     "prompt_ids": prompt_ids, "completion_ids": completion_ids,
                     "topk": topk, "top_ids": top_ids, "top_logprobs": top_lp,
                     **provenance.provenance_row("teacher", teacher_id=teacher_label or teacher.teacher_id,
                                                 endpoint=teacher.endpoint,
                                                 sampling=sampling, request_hash=key)})
    return rows, dropped_topk


def _ids_match(resp: dict, tokenizer) -> bool:
    """Teacher token ids are usable only when they are the student's: in range and decoding to the text."""
    ids = resp["token_ids"]
    if any(not 0 <= i < len(tokenizer) for i in ids):
        return False
    return tokenizer.decode(ids, skip_special_tokens=True) == resp["text"]
