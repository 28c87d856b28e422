"""The one owner of the on-disk dataset format: data/<name>.parquet rows (or its shards), their reader, writer and
checks. Stages and the lab import it; no stage imports another for it. What training reads is a copy of it
(trainrows.py); rows become training batches in batching.py.

A row (one Parquet record; columns beyond these are kept as they are):
  prompt, completion           the text
  messages                     the conversation the teacher answered (OpenAI turns as JSON text; prompt is then
                               their plain text), null for a plain prompt (one user turn)
  prompt_ids, completion_ids   int32 lists: the student tokenizer's ids (completion ends with end-of-sequence);
                               prompt_ids render the conversation with the student's chat template (chat.encode)
  reasoning                    a reasoning teacher's trace (null: none); completion is then its answer alone, and
                               completion_ids are trace + answer in the student's thinking format (reasoning.encode)
  answer_ids                   int32 list, rows with a trace only: the answer alone as the student would be trained
                               on it without the trace ([train] traces = false)
  decontamination              [decontaminate] action = "flag" only: why the prompt would have been dropped
                               (contaminated by a suite, a duplicate of a line), null on a clean row
  topk_top, topk_...           the teacher's top-k per completion token through topk_codec (binary columns,
                               null when the row has none); read_dataset decodes them into top_ids,
                               top_logprobs and top_tail (log of the mass outside the top-k)
  source, teacher_id, ...      provenance columns (distillab.provenance.PROVENANCE_COLUMNS)
Written to a temp file and renamed: a reader never sees half a dataset.
"""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from distillab.errors import UserError
from distillab.files import atomic_path

REQUIRED_COLUMNS = ("prompt", "completion", "prompt_ids", "completion_ids")
TOPK_PREFIX = "topk_"  # the teacher's top-k is stored through topk_codec: ids lossless, ~40-56 bytes a token
SHARD_GLOB = "part-*.parquet"  # a sharded dataset: data/<name>/part-*.parquet, read in name order
# Columns whose type is known whatever a shard holds (an all-null column would otherwise be `null`, and shards
# with different types for one column would not read as one dataset).
STRING_COLUMNS = (
    "prompt",
    "completion",
    "answer",
    "source",
    "teacher_id",
    "teacher_params_hash",
    "request_hash",
    "created_at",
    "messages",  # messages: the conversation as JSON text (chat.py)
    "reasoning",
    "decontamination",
)  # decontamination: why [decontaminate] flagged it
ID_COLUMNS = ("prompt_ids", "completion_ids", "answer_ids")  # int32 lists
COPY_BATCH_ROWS = 1024  # Parquet rows read at a time while merging or copying (trainrows): their memory


def shard_dir(path: Path) -> Path:
    """data/<name>.parquet -> data/<name>/: where the shards of that dataset live."""
    return path.with_suffix("")


def dataset_files(path: Path) -> list[Path]:
    """The Parquet files that make up the dataset `path` names (data/<name>.parquet): the file itself when it
    exists, else every shard in data/<name>/ in name order (shards of several `generate --shard I/N` processes
    included: a merge is just reading them all), else []."""
    if path.is_file():
        return [path]
    shards = shard_dir(path)
    return sorted(shards.glob(SHARD_GLOB)) if shards.is_dir() else []


def write_dataset(path: Path, rows: list[dict]) -> None:
    """Rows -> Parquet (zstd), written to a temp file and renamed. top_ids/top_logprobs become codec columns;
    a row may instead carry "topk", the codec's arrays already encoded (as the request cache hands them over).
    A conversation ("messages", a list of turns) is stored as its JSON text."""
    from distillab.topk_codec import FIELDS, encode_topk

    stored = []
    for row in rows:
        row = dict(row)  # a copy: the caller's row keeps its fields
        if isinstance(row.get("messages"), list):
            row["messages"] = json.dumps(row["messages"], ensure_ascii=False)
        ids, logprobs = row.pop("top_ids", None), row.pop("top_logprobs", None)
        encoded = row.pop("topk", None) or (encode_topk(ids, logprobs) if ids else None)
        for field in FIELDS:
            value = encoded[field] if encoded else None
            row[TOPK_PREFIX + field] = value if value is None or isinstance(value, bytes) else value.tobytes()
        stored.append(row)
    schema_hint = {name: pa.list_(pa.int32()) for name in ID_COLUMNS}
    schema_hint |= {TOPK_PREFIX + field: pa.binary() for field in FIELDS}
    schema_hint |= {name: pa.string() for name in STRING_COLUMNS}
    columns = {name: [row[name] for row in stored] for name in stored[0]} if stored else {}
    table = pa.table({name: pa.array(values, type=schema_hint.get(name)) for name, values in columns.items()})
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp, compression="zstd")


def unified_schema(schemas: list[pa.Schema]) -> pa.Schema:
    """One schema for several dataset files (shards): a column all null in one shard (type null) takes its type
    from the others, and a column some shards lack is kept."""
    return pa.unify_schemas(schemas, promote_options="permissive").remove_metadata()


def conform(batch: pa.RecordBatch, schema: pa.Schema) -> pa.RecordBatch:
    """The batch with schema's columns in schema's order: each cast to its type, nulls where the batch has none."""
    names = batch.schema.names
    return pa.RecordBatch.from_arrays(
        [batch.column(f.name).cast(f.type) if f.name in names else pa.nulls(batch.num_rows, f.type) for f in schema],
        schema=schema,
    )


MERGED_PARTS = b"distillab.parts"  # a merged file's schema metadata: the names of the part files it holds, in order


def write_merged(path: Path, files: list[Path]) -> None:
    """Several dataset files (shards) -> one, a batch at a time (memory follows the batch), atomically, with
    column types unified (unified_schema). The file names it holds go into its metadata (merged_parts): a rerun that
    would write the same parts knows they are there."""
    schema = unified_schema([pq.read_schema(f) for f in files])
    schema = schema.with_metadata({MERGED_PARTS: json.dumps([f.name for f in files])})
    with atomic_path(path) as tmp, pq.ParquetWriter(tmp, schema, compression="zstd") as writer:
        for f in files:
            for batch in pq.ParquetFile(f).iter_batches(batch_size=COPY_BATCH_ROWS):
                writer.write_batch(conform(batch, schema))


def merged_parts(path: Path) -> list[str]:
    """The part file names a merged dataset file holds (write_merged), [] for any other file, or none, or one that
    cannot be read (it is then written again)."""
    try:
        names = json.loads((pq.read_schema(path).metadata or {}).get(MERGED_PARTS, b"[]"))
    except (pa.ArrowException, OSError, ValueError):
        return []
    return names if isinstance(names, list) else []


def read_dataset(path: Path) -> list[dict]:
    """The dataset's rows (the file, or all its shards: see dataset_files), with the teacher's top-k decoded into
    top_ids, top_logprobs and top_tail (log of the mass outside the top-k) per completion token, or None where
    the row has none. Every row in Python lists: for tests and small sets; training streams (trainrows.ArrowRows)."""
    files = dataset_files(path)
    if not files:
        raise UserError(f"no dataset at {path}: run `distillab generate` first")
    rows = []
    for file in files:
        table = pq.read_table(file)
        _check_columns(file, table.column_names, table.num_rows)
        rows += table.to_pylist()
    for r in rows:
        decode_row_topk(r)
        if r["top_ids"] is not None:
            r["top_ids"], r["top_logprobs"], r["top_tail"] = (r[k].tolist() for k in TOPK_KEYS)
    return rows


TOPK_KEYS = ("top_ids", "top_logprobs", "top_tail")


def _check_columns(file: Path, names: list[str], n_rows: int) -> None:
    missing = [c for c in REQUIRED_COLUMNS if c not in names]
    if missing and n_rows:
        raise UserError(
            f"{file} is not a distillab dataset: column {missing[0]!r} is missing (rerun `distillab generate`)"
        )


def decode_row_topk(row: dict) -> dict:
    """A stored row (codec columns as bytes) -> the same row with top_ids (T, k) int64, top_logprobs (T, k) float32
    and top_tail (T,) float32 tensors in place of the codec columns, or None for each where the row has no top-k."""
    from distillab.topk_codec import FIELDS, decode_topk

    fields = {field: row.pop(TOPK_PREFIX + field, None) for field in FIELDS}
    decoded = decode_topk(fields) if fields["top"] is not None else (None, None, None)
    row.update(zip(TOPK_KEYS, decoded))
    return row


def check_files(files: list[Path]) -> int:
    """The rows the dataset files hold, from their footers; a file that is not Parquet, or lacks a column training
    needs, is a UserError naming it."""
    total = 0
    for file in files:
        try:
            parquet = pq.ParquetFile(file)
        except (pa.ArrowException, OSError) as err:
            raise UserError(
                f"{file}: not a readable Parquet file ({err}); delete it and rerun `distillab generate`"
            ) from None
        _check_columns(file, parquet.schema_arrow.names, parquet.metadata.num_rows)
        total += parquet.metadata.num_rows
    return total
