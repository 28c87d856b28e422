"""`distillab export`: a run's dataset in formats other tools read, without distillab.

Formats (each dataset of the run, data/train.parquet and data/replay.parquet when present, becomes one file
of the same name in the output directory):

  plain        <name>.parquet: every column of the dataset (text, token ids, provenance, ...) with the
               teacher's top-k as plain list columns instead of topk_codec bytes:
                 top_ids       list<list<int32>>   per completion token, the top-k ids (ascending)
                 top_logprobs  list<list<float32>> their log-probs, exactly what read_dataset decodes
                 top_tail      list<float32>       log of the teacher's mass outside the top-k
               null where a row has no top-k. `datasets.load_dataset("parquet", data_files=...)`, pyarrow
               and pandas read it as is (TRL / DistillKit-style pipelines).
  openai-chat  <name>.jsonl: one OpenAI fine-tuning example a row,
               {"messages": [system?, user, assistant]}: the row's `messages` (the turns before the
               teacher's, as {role, content}) when it has them, else a system turn when the row has a
               non-empty `system` and the user turn `prompt`; the assistant turn is `completion`.

Files are written to a temp name and renamed: an export either exists whole or not at all. Rows are read in
batches, so memory follows the batch, not the dataset (decoded top-k is ~30x its stored size).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from distillab.dataset import TOPK_PREFIX
from distillab.errors import UserError

FORMATS = ("plain", "openai-chat")
DATASETS = ("train", "replay")  # data/<name>.parquet, the files a run writes (replay: retain only)
BATCH_ROWS = 1024
TOPK_SCHEMA = [pa.field("top_ids", pa.list_(pa.list_(pa.int32()))),
               pa.field("top_logprobs", pa.list_(pa.list_(pa.float32()))),
               pa.field("top_tail", pa.list_(pa.float32()))]


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
    run_dir = resolve_run_dir(Path(run_or_config))
    sources = [run_dir / "data" / f"{name}.parquet" for name in DATASETS]
    sources = [p for p in sources if p.is_file()]
    if not sources or sources[0].name != "train.parquet":
        raise UserError(f"no dataset at {run_dir / 'data' / 'train.parquet'}: run `distillab generate` first")
    out = Path(out) if out is not None else run_dir / "export" / fmt
    _check_writable(out)
    write = export_plain if fmt == "plain" else export_openai_chat
    suffix = ".parquet" if fmt == "plain" else ".jsonl"
    return [write(src, out / (src.stem + suffix)) for src in sources]


def export_plain(src: Path, dest: Path) -> Path:
    """One dataset -> Parquet with the top-k codec columns replaced by plain list columns (module docstring)."""
    from distillab.topk_codec import FIELDS, decode_topk

    reader = _open(src)
    codec = [TOPK_PREFIX + f for f in FIELDS]
    kept = [f for f in reader.schema_arrow if f.name not in codec]
    has_topk = all(name in reader.schema_arrow.names for name in codec)
    schema = pa.schema(kept + TOPK_SCHEMA)
    tmp = dest.with_name(f".{dest.name}.tmp")
    try:
        with pq.ParquetWriter(tmp, schema, compression="zstd") as writer:
            for batch in reader.iter_batches(batch_size=BATCH_ROWS):
                columns = {f.name: batch.column(f.name) for f in kept}
                top_ids, top_logprobs, top_tail = [], [], []
                stored = batch.select(codec).to_pylist() if has_topk else [{}] * batch.num_rows
                for row in stored:
                    # The same decoding as dataset.read_dataset (tests hold the two equal); done here a batch
                    # at a time because read_dataset decodes the whole file into Python lists.
                    if row.get(TOPK_PREFIX + "top") is None:
                        top_ids.append(None), top_logprobs.append(None), top_tail.append(None)
                        continue
                    ids, logprobs, tail = decode_topk({f: row[TOPK_PREFIX + f] for f in FIELDS})
                    top_ids.append(ids.tolist()), top_logprobs.append(logprobs.tolist()), top_tail.append(tail.tolist())
                for field, values in zip(TOPK_SCHEMA, (top_ids, top_logprobs, top_tail)):
                    columns[field.name] = pa.array(values, type=field.type)
                writer.write_table(pa.table(columns, schema=schema))
        os.replace(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)
    return dest


def export_openai_chat(src: Path, dest: Path) -> Path:
    """One dataset -> OpenAI fine-tuning JSONL, a conversation a row (module docstring)."""
    reader = _open(src)
    names = reader.schema_arrow.names
    if "completion" not in names or not {"prompt", "messages"} & set(names):
        raise UserError(f"{src}: needs a completion column and a prompt or messages column: not a distillab dataset")
    columns = [c for c in ("system", "messages", "prompt", "completion") if c in names]
    tmp = dest.with_name(f".{dest.name}.tmp")
    try:
        with tmp.open("w", encoding="utf-8") as f:
            for batch in reader.iter_batches(batch_size=BATCH_ROWS, columns=columns):
                for row in batch.to_pylist():
                    messages = chat_messages(row, f"{src} row")
                    f.write(json.dumps({"messages": messages}, ensure_ascii=False) + "\n")
        os.replace(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)
    return dest


def chat_messages(row: dict, where: str = "row") -> list[dict]:
    """The OpenAI messages of one row: its earlier turns (`messages`, or `system` + `prompt`), then the
    teacher's `completion` as the assistant turn."""
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
    return messages + [{"role": "assistant", "content": row["completion"] or ""}]


def _open(src: Path) -> pq.ParquetFile:
    try:
        return pq.ParquetFile(src)
    except (pa.ArrowInvalid, OSError) as err:
        raise UserError(f"{src}: not a readable Parquet file ({' '.join(str(err).split())})") from None


def _check_writable(out: Path) -> None:
    """Refuse an output directory that cannot be made or written (before any work), then make it."""
    from distillab.rundir import check_creatable

    check_creatable(out, "export directory", "choose another --out")
    out.mkdir(parents=True, exist_ok=True)
