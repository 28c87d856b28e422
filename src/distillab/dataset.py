"""The one owner of the on-disk dataset format: data/<name>.parquet rows, their reader and writer, and the
collation of rows into training batches. Stages and the lab import it; no stage imports another for it.

A row (one Parquet record; columns beyond these are kept as they are):
  prompt, completion           the text
  messages                     the conversation the teacher answered (OpenAI turns as JSON text; prompt is then
                               their plain text), null for a plain prompt (one user turn)
  prompt_ids, completion_ids   int32 lists: the student tokenizer's ids (completion ends with end-of-sequence);
                               prompt_ids render the conversation with the student's chat template (chat.encode)
  topk_top, topk_...           the teacher's top-k per completion token through topk_codec (binary columns,
                               null when the row has none); read_dataset decodes them into top_ids,
                               top_logprobs and top_tail (log of the mass outside the top-k)
  source, teacher_id, ...      provenance columns (distillab.provenance.PROVENANCE_COLUMNS)
Written to a temp file and renamed: a reader never sees half a dataset.
"""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import torch

from distillab.errors import UserError

REQUIRED_COLUMNS = ("prompt", "completion", "prompt_ids", "completion_ids")
TOPK_PREFIX = "topk_"  # the teacher's top-k is stored through topk_codec: ids lossless, ~40-56 bytes a token
SHARD_GLOB = "part-*.parquet"  # a sharded dataset: data/<name>/part-*.parquet, read in name order
# Columns whose type is known whatever a shard holds (an all-null column would otherwise be `null`, and shards
# with different types for one column would not read as one dataset).
STRING_COLUMNS = ("prompt", "completion", "answer", "source", "teacher_id", "teacher_params_hash",
                  "request_hash", "created_at", "messages")  # messages: the conversation as JSON text (chat.py)


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
    import json

    from distillab.topk_codec import FIELDS, encode_topk

    stored = []
    for r in rows:
        r = dict(r)
        if isinstance(r.get("messages"), list):
            r["messages"] = json.dumps(r["messages"], ensure_ascii=False)
        ids, logprobs = r.pop("top_ids", None), r.pop("top_logprobs", None)
        encoded = r.pop("topk", None) or (encode_topk(ids, logprobs) if ids else None)
        for field in FIELDS:
            value = encoded[field] if encoded else None
            r[TOPK_PREFIX + field] = value if value is None or isinstance(value, bytes) else value.tobytes()
        stored.append(r)
    schema_hint = {"prompt_ids": pa.list_(pa.int32()), "completion_ids": pa.list_(pa.int32())}
    schema_hint |= {TOPK_PREFIX + field: pa.binary() for field in FIELDS}
    schema_hint |= {name: pa.string() for name in STRING_COLUMNS}
    columns = {name: [r[name] for r in stored] for name in stored[0]} if stored else {}
    table = pa.table({name: pa.array(values, type=schema_hint.get(name)) for name, values in columns.items()})
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    pq.write_table(table, tmp, compression="zstd")
    tmp.replace(path)


def write_merged(path: Path, files: list[Path]) -> None:
    """Several dataset files (shards) -> one, a file at a time (memory follows the largest shard), atomically.
    Column types are unified (a column all null in one shard takes its type from the others)."""
    schema = pa.unify_schemas([pq.read_schema(f) for f in files], promote_options="permissive")
    schema = schema.remove_metadata()
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        with pq.ParquetWriter(tmp, schema, compression="zstd") as writer:
            for f in files:
                table = pq.read_table(f)
                columns = [table.column(fld.name).cast(fld.type) if fld.name in table.column_names
                           else pa.nulls(table.num_rows, fld.type) for fld in schema]
                writer.write_table(pa.Table.from_arrays(columns, schema=schema))
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)


def read_dataset(path: Path) -> list[dict]:
    """The dataset's rows (the file, or all its shards: see dataset_files), with the teacher's top-k decoded into
    top_ids, top_logprobs and top_tail (log of the mass outside the top-k) per completion token, or None where
    the row has none."""
    from distillab.topk_codec import FIELDS, decode_topk

    files = dataset_files(path)
    if not files:
        raise UserError(f"no dataset at {path}: run `distillab generate` first")
    rows = []
    for file in files:
        table = pq.read_table(file)
        missing = [c for c in REQUIRED_COLUMNS if c not in table.column_names]
        if missing and table.num_rows:
            raise UserError(f"{file} is not a distillab dataset: column {missing[0]!r} is missing "
                            "(rerun `distillab generate`)")
        rows += table.to_pylist()
    for r in rows:
        fields = {field: r.pop(TOPK_PREFIX + field, None) for field in FIELDS}
        if fields["top"] is None:
            r["top_ids"] = r["top_logprobs"] = r["top_tail"] = None
            continue
        ids, logprobs, tail = decode_topk(fields)
        r["top_ids"], r["top_logprobs"], r["top_tail"] = ids.tolist(), logprobs.tolist(), tail.tolist()
    return rows


def right_pad(id_lists: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids, attention mask), both (B, T): each sequence from position 0, pad_id after it. Right padding keeps
    every sequence's positions 0..n-1, as in training, so scores match unpadded ones."""
    width = max(len(ids) for ids in id_lists)
    ids = torch.full((len(id_lists), width), pad_id, dtype=torch.long)  # (B, T)
    mask = torch.zeros((len(id_lists), width), dtype=torch.long)  # (B, T)
    for row, seq in enumerate(id_lists):
        ids[row, : len(seq)] = torch.tensor(seq, dtype=torch.long)
        mask[row, : len(seq)] = 1
    return ids, mask


# ----------------------------------------------------------------------------------------------------
# Rows -> padded tensors with the teacher's top-k aligned to predictions.




class DistillDataset(torch.utils.data.Dataset):
    """The task rows; with retain replay, the task and replay rows in a fixed batch-by-batch order
    (retain.batch_layout), read sequentially so every batch holds the configured replay share."""

    def __init__(self, rows: list[dict], vocab_size: int, replay: list[dict] | None = None,
                 layout: list[tuple[str, int]] | None = None):
        self.rows, self.replay, self.layout = rows, replay or [], layout
        for i, row in enumerate(rows + self.replay):
            if row.get("top_ids") and max(max(ids) for ids in row["top_ids"]) >= vocab_size:
                raise UserError(f"teacher token ids reach past the student's vocabulary ({vocab_size}) in row {i}: "
                                "teacher and student tokenizers differ")

    def __len__(self) -> int:
        return len(self.layout) if self.layout is not None else len(self.rows)

    def layout_rows(self) -> list[dict]:
        """Task and replay rows, each once: what one pass over the training data holds."""
        return self.rows + self.replay

    def __getitem__(self, i: int) -> dict:
        if self.layout is None:
            return self.rows[i]
        source, j = self.layout[i]
        return self.rows[j] if source == "task" else self.replay[j]


def collate(rows: list[dict], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded batch. Position t predicts token t+1, so the completion's j-th token (at index
    len(prompt)+j) is predicted at index len(prompt)+j-1: labels and teacher top-k sit at those indices."""
    width = max(len(r["prompt_ids"]) + len(r["completion_ids"]) for r in rows)
    k = max((len(r["top_ids"][0]) for r in rows if r.get("top_ids")), default=0)
    batch = len(rows)
    input_ids = torch.full((batch, width), pad_id, dtype=torch.long)  # (B, T)
    attention_mask = torch.zeros((batch, width), dtype=torch.long)  # (B, T)
    labels = torch.full((batch, width), -100, dtype=torch.long)  # (B, T) HF convention: label[t] = input[t]
    top_ids = torch.zeros((batch, width, max(k, 1)), dtype=torch.long)  # (B, T, k) at the predicting index
    top_logprobs = torch.full((batch, width, max(k, 1)), -1e4)  # (B, T, k)
    top_tail = torch.full((batch, width), float("nan"))  # (B, T) log of the teacher's mass outside its top-k; NaN: none stored
    kd_mask = torch.zeros((batch, width), dtype=torch.bool)  # (B, T) where a teacher distribution exists
    prompt_len = torch.zeros(batch, dtype=torch.long)
    for b, r in enumerate(rows):
        p, c = list(r["prompt_ids"]), list(r["completion_ids"])
        ids = p + c
        input_ids[b, : len(ids)] = torch.tensor(ids)
        attention_mask[b, : len(ids)] = 1
        labels[b, len(p) : len(ids)] = torch.tensor(c)
        prompt_len[b] = len(p)
        if k and r.get("top_ids"):
            n = min(len(r["top_ids"]), len(c))
            top_ids[b, len(p) - 1 : len(p) - 1 + n] = torch.tensor(r["top_ids"][:n])
            top_logprobs[b, len(p) - 1 : len(p) - 1 + n] = torch.tensor(r["top_logprobs"][:n])
            if r.get("top_tail") is not None:
                top_tail[b, len(p) - 1 : len(p) - 1 + n] = torch.tensor(r["top_tail"][:n])
            # a position whose ids hold no mass (top-1 below -200; a real one is >= -log V) has no teacher
            # distribution: a token crosstok could not align. It trains on its text instead.
            kd_mask[b, len(p) - 1 : len(p) - 1 + n] = top_logprobs[b, len(p) - 1 : len(p) - 1 + n].amax(-1) > -200.0
    out = {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels, "prompt_len": prompt_len}
    if k:
        out.update(top_ids=top_ids, top_logprobs=top_logprobs, top_tail=top_tail, kd_mask=kd_mask)
    return out
