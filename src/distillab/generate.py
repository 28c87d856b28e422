"""Stage 1, generate: prompts -> teacher -> request cache -> the dataset, streamed.

Prompts come from lab skills (train split) or a prompts file (JSONL, Parquet or a `datasets` save_to_disk
directory, read lazily) whose records hold a plain prompt or an OpenAI conversation (`messages`; column names
from [data] *_column). A conversation's final assistant turn is its reference answer; the teacher answers the
user turn before it (distillab.chat renders it for each model, the student's rows included). Who writes the
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

from distillab import chat, models, provenance
from distillab.cache import RequestCache, request_key
from distillab.config import RunConfig
from distillab.files import write_atomic
from distillab.dataset import SHARD_GLOB, shard_dir, write_dataset
from distillab.errors import UserError, not_utf8
from distillab.pricing import BudgetGuard
from distillab.lab.world import get_skill
from distillab.rundir import check_stamps, is_fresh, mark_fresh
from distillab.teachers import failure_digest

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


@dataclass(frozen=True)
class Columns:
    """Where a prompts file keeps each field ([data] prompt_column / messages_column / answer_column)."""

    prompt: str = "prompt"
    messages: str = "messages"
    answer: str = "answer"

    @classmethod
    def of(cls, data) -> "Columns":
        return cls(data.prompt_column, data.messages_column, data.answer_column)


def load_prompts(cfg: RunConfig) -> list[dict]:
    """[{prompt, messages, answer, skill}] from the prompts file when given, else from the lab skills' train split
    (no messages: a plain prompt is one user turn)."""
    return list(prompt_stream(cfg))


def prompt_stream(cfg: RunConfig):
    """The prompts of load_prompts, read lazily from a prompts file (a list for lab skills: they are small)."""
    if cfg.data.prompts_file:
        path, columns = Path(cfg.data.prompts_file), Columns.of(cfg.data)
        if path.is_dir():
            return PromptStream(lambda: iter_hf_prompts(path, columns))
        if path.suffix == ".parquet":
            return PromptStream(lambda: iter_parquet_prompts(path, columns))
        return PromptStream(lambda: iter_jsonl_prompts(path, columns))
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
    # what the teacher is asked: the prompt through its own chat template, if it has one
    lengths = [len(ids) for ids in tok([chat.render_prompt(tok, chat.turns_of(p)) for p in prompts])["input_ids"]]
    too_long = [i for i, n in enumerate(lengths) if n > room]
    if not too_long:
        return prompts
    # a conversation is not cut: which turns to drop is the user's call
    if cfg.data.truncate == "left" and not any(prompts[i].get("messages") for i in too_long):
        out = list(prompts)
        for i in too_long:
            ids = tok(prompts[i]["prompt"], add_special_tokens=False)["input_ids"]
            keep = room - (lengths[i] - len(ids))  # room left after the special tokens and the template's text
            out[i] = prompts[i] | {"prompt": tok.decode(ids[-keep:])}
        return out
    where = cfg.data.prompts_file or "data.skills"
    lines = ", ".join(str(prompts[i].get("line", i + 1)) for i in too_long[:10]) + (" ..." if len(too_long) > 10 else "")
    fix = ("drop their earliest turns (conversations are not truncated)" if any(prompts[i].get("messages")
           for i in too_long) else "shorten them, or set [data] truncate = \"left\"")
    raise UserError(f"{where}: {len(too_long)} prompt(s) do not fit the teacher's context ({context} tokens, "
                    f"{cfg.teacher.max_new_tokens} kept for the answer): line(s) {lines}; {fix}")


def read_jsonl_prompts(path: Path, columns: Columns = Columns()) -> list[dict]:
    return list(iter_jsonl_prompts(path, columns))


def iter_jsonl_prompts(path: Path, columns: Columns = Columns()):
    """{prompt, messages, answer, skill, line} per non-empty line, read a line at a time; errors name the file
    and line."""
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
            yield _prompt_record(obj, where, lineno, columns)
    if not seen:
        raise UserError(f"{what} is empty: {path}")


def iter_parquet_prompts(path: Path, columns: Columns = Columns()):
    """The same records from a Parquet file with a prompt or messages column (optional answer, "skill"), a batch
    at a time."""
    import pyarrow.parquet as pq

    if not path.is_file():
        raise UserError(f"prompt file not found: {path}")
    reader = pq.ParquetFile(path)
    lineno = 0
    for batch in reader.iter_batches(batch_size=4096, columns=_columns_read(reader.schema_arrow.names, columns, path)):
        for obj in batch.to_pylist():
            lineno += 1
            yield _prompt_record(obj, f"{path}: row {lineno}", lineno, columns)
    if not lineno:
        raise UserError(f"prompt file is empty: {path}")


def iter_hf_prompts(path: Path, columns: Columns = Columns()):
    """The same records from a Hugging Face `datasets` directory (Dataset.save_to_disk; of a DatasetDict, its
    "train" split or its only one), memory-mapped and read a row at a time."""
    import datasets

    try:
        ds = datasets.load_from_disk(str(path))
    except FileNotFoundError:
        raise UserError(f"prompt file {path} is a directory without a saved Hugging Face dataset (save_to_disk): "
                        "give a JSONL or Parquet file, or such a directory") from None
    if isinstance(ds, datasets.DatasetDict):
        if "train" not in ds and len(ds) != 1:
            raise UserError(f"{path}: a dataset with splits {', '.join(ds)}: save the split to use on its own "
                            "(or name it train)")
        ds = ds["train"] if "train" in ds else next(iter(ds.values()))
    ds = ds.select_columns(_columns_read(ds.column_names, columns, path))
    for lineno, obj in enumerate(ds, 1):
        yield _prompt_record(obj, f"{path}: row {lineno}", lineno, columns)
    if not len(ds):
        raise UserError(f"prompt file is empty: {path}")


def _columns_read(names: list[str], columns: Columns, path: Path) -> list[str]:
    """The columns of a table-shaped prompts file to read; one without a prompt or messages column is refused."""
    if columns.prompt not in names and columns.messages not in names:
        raise UserError(f"{path}: needs a \"{columns.prompt}\" or a \"{columns.messages}\" column (has "
                        f"{', '.join(names[:8]) or 'none'}; [data] prompt_column / messages_column name others)")
    return [c for c in (columns.prompt, columns.messages, columns.answer, "skill") if c in names]


def _prompt_record(obj, where: str, line: int, columns: Columns = Columns()) -> dict:
    """{prompt, messages, answer, skill, line}. A conversation: messages = the turns the teacher answers, prompt
    = their plain text (chat.plain_text: what keys shards, splits and completions endpoints), and a final
    assistant turn is the answer. A plain prompt: messages None."""
    c = columns
    if not isinstance(obj, dict):
        raise UserError(f"{where}: each line needs a JSON object with \"{c.prompt}\" or \"{c.messages}\"")
    answer = obj.get(c.answer)
    if answer is not None and not isinstance(answer, str):
        raise UserError(f"{where}: \"{c.answer}\" must be a string")
    skill = obj.get("skill")
    if obj.get(c.messages) is not None:  # the conversation, over a prompt beside it (often its first user turn)
        turns, reference = chat.split_conversation(chat.check_messages(obj[c.messages], where, c.messages), where,
                                                  c.messages)
        if reference is not None and answer is not None:
            raise UserError(f"{where}: two answers: \"{c.answer}\" and the conversation's final assistant turn; "
                            "keep one")
        return {"prompt": chat.plain_text(turns), "messages": turns, "answer": reference if answer is None else answer,
                "skill": skill, "line": line}
    if not isinstance(obj.get(c.prompt), str) or not obj[c.prompt]:
        raise UserError(f"{where}: each line needs a non-empty string field \"{c.prompt}\" or a \"{c.messages}\" "
                        "list")
    return {"prompt": obj[c.prompt], "messages": None, "answer": answer, "skill": skill, "line": line}


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
        return [request_key(ask(teacher, p, s)) for p, s in chunk]

    summary_path = parts.summary_path(run_dir, name)
    cache = RequestCache(run_dir / parts.cache_name)
    try:
        # Pass 1, the plan: every chunk's keys and digest (the stage's stamp), what the cache holds.
        stamp, digests, n_cached, n_missing, prior = hashlib.sha256(salt.encode()), [], 0, 0, _zero_usage()
        for chunk in chunks():
            for p, _ in chunk:  # before any request: the student's template must take the conversation
                _check_student_renders(student_tok, p)
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
    if run.aligner.stats.rows:
        log(f"generate: the teacher's tokenizer is not the student's: {run.aligner.stats.line()}")
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
        "failures": run.failures[:20],
        **({"cross_tokenizer": run.aligner.stats.to_dict()} if run.aligner.stats.rows else {})}, indent=1))
    if not parts.whole:
        parts.combine_summaries(run_dir, name)
    return GenerateSummary(run.rows, run.sent, n_cached, run.n_failed, run.usage["prompt_tokens"],
                           run.usage["completion_tokens"], spent, endpoints=endpoints)


def _check_student_renders(student_tok, p: dict) -> None:
    """A conversation the student's chat template refuses (roles it does not know, out of order) is an error
    naming its line, found while planning: the teacher is not paid for rows that could never be trained on."""
    if p.get("messages") and chat.has_template(student_tok):
        try:
            chat.render_prompt(student_tok, p["messages"])
        except chat.TemplateRefused as err:
            where = f"prompt line {p['line']}" if p.get("line") else "a prompt"
            detail = str(err).replace("the model's", "the student's", 1)
            raise UserError(f"{where}: {detail}") from None


def _generate_given(cfg, chunks, name, stage, source, parts, student_tok) -> GenerateSummary:
    """Rows whose completions are the answers the prompts carry: the same shards, no teacher."""
    run_dir = cfg.run_dir
    salt = json.dumps([cfg.data.model_dump(), cfg.train.student, source])
    digests, stamp, n = [], hashlib.sha256(salt.encode()), 0
    for i, chunk in enumerate(chunks()):  # every answer checked before anything is written
        n += len(chunk)
        for j, (p, _) in enumerate(chunk):
            if p["answer"] is None:
                raise UserError(f"data.source = {source!r} needs an \"answer\" for every prompt "
                                f"(prompt {i * CHUNK_ROWS + j + 1} has none)")
        digests.append(_digest(salt, [json.dumps(p, sort_keys=True) for p, _ in chunk]))
        stamp.update(digests[-1].encode())
    stamp = stamp.hexdigest()[:16]
    out_path = run_dir / "data" / f"{name}.parquet"
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


def ask(teacher, record: dict, sample: int = 0) -> dict:
    """The teacher's canonical request for a prompt record: its conversation when it has one."""
    return teacher.request(record["prompt"], sample, messages=record.get("messages"))


def _row_text(record: dict) -> dict:
    """A prompt record's fields as a dataset row keeps them: its conversation (None: a plain prompt; the dataset
    stores it as JSON text), no line number."""
    return {**{k: v for k, v in record.items() if k != "line"}, "messages": record.get("messages") or None}


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
        from distillab.crosstok import Aligner  # a teacher with another tokenizer: its top-k aligned by text spans

        self.aligner = Aligner(tokenizer, None if teacher.cfg.base_url else teacher.cfg.model)
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
                    todo.append(ask(self.teacher, p, s))
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
                                      self.teacher_label, self.aligner)
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


def _ground_truth_rows(prompts: list[dict], source: str, tokenizer, declared_teacher: str | None = None) -> list[dict]:
    """Rows whose completions are the answers we were given; tagged with the source the user declared."""
    tag = (provenance.provenance_row("teacher", teacher_id=declared_teacher) if declared_teacher
           else provenance.provenance_row(source))
    rows = []
    for i, p in enumerate(prompts):
        if p["answer"] is None:
            raise UserError(f"data.source = {source!r} needs an \"answer\" for every prompt (prompt {i + 1} has none)")
        prompt_ids, completion_ids = chat.encode(tokenizer, chat.turns_of(p), p["answer"])
        p = _row_text(p)
        rows.append({**p, "completion": p["answer"], "prompt_ids": prompt_ids, "completion_ids": completion_ids,
                     "top_ids": None, "top_logprobs": None, **tag})
    return rows


def _teacher_rows(chunk, keys, cache, teacher, tokenizer, teacher_label: str | None = None,
                  aligner=None) -> tuple[list[dict], int]:
    """(rows of the chunk's answered requests in prompt order, rows whose top-k was dropped). The top-k goes from
    the cache to the row as the codec's bytes ("topk"): no decode, no second rounding. A teacher with another
    tokenizer: its top-k is aligned onto the student's tokens by text spans (aligner, a crosstok.Aligner; its
    stats count them); student tokens with no teacher distribution get a top-k with no mass (crosstok.encode)."""
    sampling = {k: v for k, v in teacher.request("").items() if k not in ("prompt", "messages", "endpoint", "model")}
    many = teacher.cfg.samples_per_prompt > 1
    rows, dropped_topk = [], 0
    for (p, sample), key in zip(chunk, keys):
        resp = cache.get(key, raw_topk=True)
        if resp is None:  # failed for good: recorded in the cache's failures, left out of the data
            continue
        topk, top_ids, top_lp = resp.get("topk"), resp.get("top_ids"), resp.get("top_logprobs")
        # the student's own rendering of the conversation (its chat template, or the plain text)
        turns = chat.turns_of(p)
        if resp.get("token_ids") is not None and _ids_match(resp, tokenizer):
            prompt_ids = chat.prompt_ids(tokenizer, turns)
            completion_ids = resp["token_ids"]  # the teacher's own tokens: its top-k stays aligned to them
        else:  # no ids, or the teacher's ids are not the student's: the student's tokenizer reads the text
            prompt_ids, completion_ids = chat.encode(tokenizer, turns, resp["text"])
            if resp.get("token_ids") is not None:  # teacher-vocabulary ids: aligned by text spans, else dropped
                topk = _aligned_topk(resp, completion_ids, aligner)
                top_ids = top_lp = None
                dropped_topk += topk is None
        if topk is None and top_ids is None and resp.get("top_tokens") is not None:
            from distillab.crosstok import fill_rows
            from distillab.teachers.openai_compat import map_top_tokens

            top_ids, top_lp, completion_ids = map_top_tokens(resp, tokenizer, aligner)
            if top_ids is not None:
                k = max((len(row) for row in resp["top_tokens"]), default=1)
                top_ids, top_lp = fill_rows(top_ids, top_lp, max(k, 1))
        p = _row_text(p)
        rows.append({**p, **({"sample": sample} if many else {}), "completion": resp["text"],
                     "prompt_ids": prompt_ids, "completion_ids": completion_ids,
                     "topk": topk, "top_ids": top_ids, "top_logprobs": top_lp,
                     **provenance.provenance_row("teacher", teacher_id=teacher_label or teacher.teacher_id,
                                                 endpoint=teacher.endpoint,
                                                 sampling=sampling, request_hash=key)})
    return rows, dropped_topk


def _ids_match(resp: dict, tokenizer) -> bool:
    """Teacher token ids are usable only when they are the student's: in range, decoding to the text, and not stopping
    on an invisible token other than the student's end-of-sequence (a tokenizer that differs only in its special
    tokens would otherwise teach the student to stop with another token; a stop sequence ends on visible text)."""
    ids = resp["token_ids"]
    if any(not 0 <= i < len(tokenizer) for i in ids):
        return False
    if (resp.get("finish_reason") == "stop" and ids and ids[-1] != tokenizer.eos_token_id
            and not tokenizer.decode(ids[-1:], skip_special_tokens=True)):
        return False
    return tokenizer.decode(ids, skip_special_tokens=True) == resp["text"]


def _aligned_topk(resp: dict, completion_ids: list[int], aligner) -> dict | None:
    """A local teacher's top-k (the cache's codec bytes, or lists) aligned onto the student's completion_ids: the
    codec's arrays, or None when it cannot be (no top-k, no teacher tokenizer)."""
    from distillab import crosstok
    from distillab.topk_codec import decode_topk

    if aligner is None:
        return None
    if resp.get("topk") is not None:
        ids, lps, tails = (x.tolist() for x in decode_topk(resp["topk"]))
    elif resp.get("top_ids"):
        ids, lps, tails = resp["top_ids"], resp["top_logprobs"], resp.get("top_tail")
    else:
        return None
    aligned = aligner.from_ids(resp, ids, lps, tails, completion_ids)
    return None if aligned is None else crosstok.encode(aligned, max(len(ids[0]) if ids else 1, 1))
