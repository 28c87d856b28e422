"""`distillab export`: a run's dataset in formats other tools read, without distillab.

Formats (each dataset of the run, data/train.parquet and data/replay.parquet when present, becomes one file
of the same name in the output directory; a dataset still in shards, data/<name>/part-*.parquet as
`generate --shard I/N` leaves it, becomes one file too):

  plain        <name>.parquet: every column of the dataset (text, token ids, provenance, ...) with the
               teacher's top-k as plain list columns instead of topk_codec bytes:
                 top_ids       list<list<int32>>   per completion token, the top-k ids by rank: [t][0] is the
                                                   teacher's most likely token (ties: the lower id first)
                 top_logprobs  list<list<float32>> their log-probs in the same order (read_dataset's values,
                                                   which it orders by id)
                 top_tokens    list<list<string>>  the ids as the student tokenizer's vocabulary strings
                                                   (convert_ids_to_tokens; null for an id outside it)
                 top_tail      list<float32>       log of the teacher's mass outside the top-k
               null where a row has no top-k. The ids are the student's vocabulary (the tokenizer the dataset
               was made for, the run config's train.student), so that tokenizer is saved beside the files, in
               tokenizer/: `AutoTokenizer.from_pretrained(<out>/tokenizer)` reads it without distillab.
               `datasets.load_dataset("parquet", data_files=...)`, pyarrow and pandas read the files as they are
               (TRL / DistillKit-style pipelines). A reasoning teacher's trace is the `reasoning` column (null:
               none), `completion` its answer alone.
  openai-chat  <name>.jsonl: one OpenAI fine-tuning example a row,
               {"messages": [system?, user, assistant]}: the row's `messages` (the turns before the
               teacher's, as {role, content}) when it has them, else a system turn when the row has a
               non-empty `system` and the user turn `prompt`; the assistant turn is `completion`, with the
               teacher's trace as its `reasoning_content` when the row has one: the field reasoning APIs answer
               with (vLLM, DeepSeek) and thinking chat templates read (Qwen3's, TRL's), so the trace stays apart
               from the answer instead of being pasted into it in one model's tag format.

Files are written to a temp name and renamed: an export either exists whole or not at all. Rows are read in
batches, a shard at a time, so memory follows the batch, not the dataset (decoded top-k is ~30x its stored size).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from distillab.dataset import TOPK_PREFIX, conform, dataset_files, decode_row_topk, unified_schema
from distillab.errors import UserError
from distillab.files import atomic_dir, atomic_path, check_creatable
from distillab.rundir import RunDir

FORMATS = ("plain", "openai-chat")
DATASETS = ("train", "replay")  # data/<name>.parquet or its shards, the datasets a run writes (replay: retain only)
BATCH_ROWS = 1024
TOPK_SCHEMA = [
    pa.field("top_ids", pa.list_(pa.list_(pa.int32()))),
    pa.field("top_logprobs", pa.list_(pa.list_(pa.float32()))),
    pa.field("top_tokens", pa.list_(pa.list_(pa.string()))),
    pa.field("top_tail", pa.list_(pa.float32())),
]
TOKENIZER_DIR = "tokenizer"  # <out>/tokenizer/: the student's tokenizer files, beside a plain export


def resolve_run_dir(path: Path) -> Path:
    """A run directory as given, or the run directory of a run config (TOML)."""
    if path.is_dir():
        return path
    if path.is_file():
        from distillab.config import load_config

        return load_config(path).run_dir
    raise UserError(f"{path}: no such run directory or config file")


def export_run(run_or_config: Path, fmt: str, out: Path | None = None) -> list[Path]:
    """Export every dataset of a run (or a config's run) in `fmt`; returns the files written.

    out: the output directory, by default <run>/export/<fmt>/. Files already there with the same names are
    replaced; nothing else in it is touched.
    """
    if fmt not in FORMATS:
        raise UserError(f"unknown export format {fmt!r}; choose one of: {', '.join(FORMATS)}")
    run = RunDir(resolve_run_dir(Path(run_or_config)))
    sources = {name: dataset_files(run.dataset(name)) for name in DATASETS}
    if not sources["train"]:
        raise UserError(f"no dataset at {run.dataset('train')}: run `distillab generate` first")
    for files in sources.values():  # a file that is not a distillab dataset is one line naming it, before writing
        _check_exportable(files)
    out = Path(out) if out is not None else run.export(fmt)
    if fmt == "openai-chat":
        _check_writable(out)
        return [export_openai_chat(files, out / (name + ".jsonl")) for name, files in sources.items() if files]
    tok = _student_tokenizer(Path(run_or_config), run)  # before anything is written: a missing one is a UserError
    _check_writable(out)
    written = [export_plain(files, out / (name + ".parquet"), tok) for name, files in sources.items() if files]
    with atomic_dir(out / TOKENIZER_DIR) as staging:
        tok.save_pretrained(str(staging))
    return [*written, out / TOKENIZER_DIR]


def _check_exportable(files: list[Path]) -> None:
    """Every file is a readable Parquet file with the columns both formats write from (prompt, completion)."""
    for file in files:
        try:
            names = pq.ParquetFile(file).schema_arrow.names
        except (pa.ArrowException, OSError) as err:
            raise UserError(f"{file}: not a readable Parquet file ({err}); rerun `distillab generate`") from None
        missing = [c for c in ("prompt", "completion") if c not in names]
        if missing:
            raise UserError(
                f"{file} is not a distillab dataset: column {missing[0]!r} is missing (it has "
                f"{', '.join(names[:8]) or 'none'}); export reads what `distillab generate` wrote"
            )


def _student_tokenizer(run_or_config: Path, run: RunDir):
    """The tokenizer whose vocabulary the dataset's ids are: the student's, named by the config given, else by
    the run's own run.toml."""
    from distillab import models
    from distillab.config import load_config

    config = run_or_config if run_or_config.is_file() else run.config
    if not config.is_file():
        raise UserError(
            f"{config}: not found, and the plain export needs the student's tokenizer (its top-k ids are that "
            "vocabulary): pass the run config instead of the run directory"
        )
    return models.load_tokenizer(load_config(config).train.student)


def export_plain(files: list[Path], dest: Path, tok) -> Path:
    """One dataset (its file, or its shards) -> Parquet with the top-k codec columns replaced by plain list columns,
    ranked, with `tok`'s strings for the ids (module docstring)."""
    from distillab.topk_codec import FIELDS

    schema_in = unified_schema([_open(f).schema_arrow for f in files])
    codec = [TOPK_PREFIX + f for f in FIELDS]
    kept = [f for f in schema_in if f.name not in codec]
    has_topk = all(name in schema_in.names for name in codec)
    schema = pa.schema(kept + TOPK_SCHEMA)
    vocab = _vocabulary(tok)
    with atomic_path(dest) as tmp, pq.ParquetWriter(tmp, schema, compression="zstd") as writer:
        for batch in _batches(files, schema_in):
            columns = {f.name: batch.column(f.name) for f in kept}
            # read_dataset's decoding (tests hold the two equal), a batch at a time
            stored = batch.select(codec).to_pylist() if has_topk else [{}] * batch.num_rows
            ranked = [_ranked(decode_row_topk(row), vocab) for row in stored]
            for field in TOPK_SCHEMA:
                columns[field.name] = pa.array(
                    [None if row[field.name] is None else row[field.name].tolist() for row in ranked], type=field.type
                )
            writer.write_table(pa.table(columns, schema=schema))
    return dest


def _vocabulary(tok) -> np.ndarray:
    """id -> the tokenizer's string for it (None for an id it has no string for), as an object array."""
    return np.array(tok.convert_ids_to_tokens(list(range(len(tok)))) + [None], dtype=object)


def _ranked(row: dict, vocab: np.ndarray) -> dict:
    """A decoded row's top-k (ids ascending, as the codec keeps them) ordered by rank, highest log-prob first
    (a stable sort: ties keep the lower id first), with the ids' strings as top_tokens."""
    if row["top_ids"] is None:
        return row | {"top_tokens": None}
    ids, logprobs = row["top_ids"].numpy(), row["top_logprobs"].numpy()  # (T, k) each
    order = np.argsort(-logprobs, axis=1, kind="stable")
    ids, logprobs = np.take_along_axis(ids, order, axis=1), np.take_along_axis(logprobs, order, axis=1)
    unknown = len(vocab) - 1  # the None at the end: ids outside the vocabulary
    tokens = vocab[np.where((ids >= 0) & (ids < unknown), ids, unknown)]
    return row | {"top_ids": ids, "top_logprobs": logprobs, "top_tokens": tokens}


def export_openai_chat(files: list[Path], dest: Path) -> Path:
    """One dataset (its file, or its shards) -> OpenAI fine-tuning JSONL, a conversation a row (module docstring)."""
    schema_in = unified_schema([_open(f).schema_arrow for f in files])
    if "completion" not in schema_in.names or not {"prompt", "messages"} & set(schema_in.names):
        raise UserError(
            f"{files[0]}: needs a completion column and a prompt or messages column: not a distillab dataset"
        )
    columns = pa.schema([f for f in schema_in if f.name in ("system", "messages", "prompt", "completion", "reasoning")])
    with atomic_path(dest) as tmp, tmp.open("w", encoding="utf-8") as f:
        for file, batch in _batches(files, columns, with_file=True):
            for row in batch.to_pylist():
                messages = chat_messages(row, f"{file} row")
                f.write(json.dumps({"messages": messages}, ensure_ascii=False) + "\n")
    return dest


def _batches(files: list[Path], schema: pa.Schema, with_file: bool = False):
    """Record batches of BATCH_ROWS rows over every file in order, a file open at a time, conformed to schema
    (the files' unified schema, or the columns of it wanted)."""
    for file in files:
        reader = _open(file)
        wanted = [name for name in schema.names if name in reader.schema_arrow.names]
        for batch in reader.iter_batches(batch_size=BATCH_ROWS, columns=wanted):
            batch = conform(batch, schema)
            yield (file, batch) if with_file else batch


def chat_messages(row: dict, where: str = "row") -> list[dict]:
    """The OpenAI messages of one row: its earlier turns (`messages`, or `system` + `prompt`), then the
    teacher's `completion` as the assistant turn (its trace, if any, as the turn's `reasoning_content`)."""
    turns = row.get("messages")
    if isinstance(turns, str):  # a conversation stored as JSON text
        turns = json.loads(turns)
    if turns:
        messages = [{"role": str(t["role"]), "content": t["content"]} for t in turns]
    else:
        if row.get("prompt") is None:
            raise UserError(f"{where}: neither messages nor prompt")
        messages = [{"role": "system", "content": row["system"]}] if row.get("system") else []
        messages.append({"role": "user", "content": row["prompt"]})
    answer = {"role": "assistant", "content": row["completion"] or ""}
    if row.get("reasoning"):
        answer["reasoning_content"] = row["reasoning"]
    return messages + [answer]


def _open(src: Path) -> pq.ParquetFile:
    try:
        return pq.ParquetFile(src)
    except (pa.ArrowInvalid, OSError) as err:
        raise UserError(f"{src}: not a readable Parquet file ({' '.join(str(err).split())})") from None


def _check_writable(out: Path) -> None:
    """Refuse an output directory that cannot be made or written (before any work), then make it."""
    check_creatable(out, "export directory", "choose another --out")
    out.mkdir(parents=True, exist_ok=True)
