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

import functools
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
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


def unified_schema(schemas: list[pa.Schema]) -> pa.Schema:
    """One schema for several dataset files (shards): a column all null in one shard (type null) takes its type
    from the others, and a column some shards lack is kept."""
    return pa.unify_schemas(schemas, promote_options="permissive").remove_metadata()


def conform(batch: pa.RecordBatch, schema: pa.Schema) -> pa.RecordBatch:
    """The batch with schema's columns in schema's order: each cast to its type, nulls where the batch has none."""
    names = batch.schema.names
    return pa.RecordBatch.from_arrays([batch.column(f.name).cast(f.type) if f.name in names
                                       else pa.nulls(batch.num_rows, f.type) for f in schema], schema=schema)


def write_merged(path: Path, files: list[Path]) -> None:
    """Several dataset files (shards) -> one, a batch at a time (memory follows the batch), atomically, with
    column types unified (unified_schema)."""
    schema = unified_schema([pq.read_schema(f) for f in files])
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        with pq.ParquetWriter(tmp, schema, compression="zstd") as writer:
            for f in files:
                for batch in pq.ParquetFile(f).iter_batches(batch_size=COPY_BATCH_ROWS):
                    writer.write_batch(conform(batch, schema))
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)


def read_dataset(path: Path) -> list[dict]:
    """The dataset's rows (the file, or all its shards: see dataset_files), with the teacher's top-k decoded into
    top_ids, top_logprobs and top_tail (log of the mass outside the top-k) per completion token, or None where
    the row has none. Every row in Python lists: for tests and small sets; training streams (ArrowRows)."""
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
        raise UserError(f"{file} is not a distillab dataset: column {missing[0]!r} is missing "
                        "(rerun `distillab generate`)")


def decode_row_topk(row: dict) -> dict:
    """A stored row (codec columns as bytes) -> the same row with top_ids (T, k) int64, top_logprobs (T, k) float32
    and top_tail (T,) float32 tensors in place of the codec columns, or None for each where the row has no top-k."""
    from distillab.topk_codec import FIELDS, decode_topk

    fields = {field: row.pop(TOPK_PREFIX + field, None) for field in FIELDS}
    decoded = decode_topk(fields) if fields["top"] is not None else (None, None, None)
    row.update(zip(TOPK_KEYS, decoded))
    return row


# ----------------------------------------------------------------------------------------------------
# Streaming: what training reads. A dataset is copied once, a record batch at a time, into an Arrow IPC file next to
# it (data/.arrow/<name>.arrow): zstd-compressed record batches of RECORD_BATCH_ROWS rows, so the copy takes about
# the Parquet files' bytes. A training batch reads (pread) and decompresses only the record batches that hold its
# rows: memory follows the batch, not the dataset. Parquet itself cannot be read a row at a time (its pages hold a
# column chunk of thousands of rows), hence the copy; `datasets` (from_parquet) would make an uncompressed copy,
# twice the Parquet bytes, with its own fingerprint cache. Not memory-mapped: a compressed file cannot be used in
# place, and a mapped file counts in the process's RSS page by page as batches touch it (here 2 MiB per fault:
# the kernel maps whole page-cache folios), until an epoch has made all of it resident.

ARROW_DIR = ".arrow"
ARROW_FORMAT = 2  # bump when the copy's layout changes: older copies are then made again
RECORD_BATCH_ROWS = 8  # a row costs reading and decompressing this many (~0.2 MB at 256 tokens, top-20)
COPY_BATCH_ROWS = 1024  # Parquet rows read at a time while copying: the copy's memory
READ_CACHE_BYTES = 32 * 2**20  # recently read record batches kept (a small dataset ends up read once)


def _train_schema() -> pa.Schema:
    """What training reads: the token ids and the codec columns."""
    from distillab.topk_codec import FIELDS

    return pa.schema([("prompt_ids", pa.list_(pa.int32())), ("completion_ids", pa.list_(pa.int32()))]
                     + [(TOPK_PREFIX + f, pa.binary()) for f in FIELDS])


class ArrowRows:
    """One dataset (data/<name>.parquet, or its shards) as training reads it: rows fetched and decoded a batch at a
    time (fetch); lengths, row count and the teacher's largest token id from the copy's side files."""

    def __init__(self, path: Path):
        files = dataset_files(path)
        if not files:
            raise UserError(f"no dataset at {path}: run `distillab generate` first")
        if not check_files(files):  # before the copy: a bad dataset leaves nothing behind
            raise UserError(f"dataset {path} has no rows")
        arrow = path.parent / ARROW_DIR / (path.stem + ".arrow")
        self.stats = arrow_copy(files, arrow)
        with np.load(arrow.with_suffix(".npz")) as side:  # (N,) int32 each, and (record batches + 1,) row starts
            self.prompt_lengths, self.completion_lengths = side["prompt"], side["completion"]
            self.starts = side["starts"]
        self.reader = pa.ipc.open_file(pa.OSFile(str(arrow)))  # reads nothing but the footer
        # zstd about halves these columns: a decompressed record batch is ~2x its share of the file
        per_batch = 2 * arrow.stat().st_size / max(1, len(self.starts) - 1)
        self.record_batch = functools.lru_cache(maxsize=max(16, int(READ_CACHE_BYTES / max(per_batch, 1.0))))(
            self.reader.get_batch)
        self.max_teacher_id, self.has_topk = self.stats["max_teacher_id"], self.stats["max_teacher_id"] >= 0

    def __len__(self) -> int:
        return int(self.starts[-1])

    def fetch(self, indices) -> list[dict]:
        """Rows by index, top-k decoded (decode_row_topk): the only place rows become Python objects."""
        where = np.searchsorted(self.starts, indices, side="right") - 1  # each row's record batch
        return [decode_row_topk(self.record_batch(b).slice(i - int(self.starts[b]), 1).to_pylist()[0])
                for b, i in zip(where.tolist(), indices)]


class ListRows:
    """Rows already in memory (tests, benchmarks, small callers of build_trainer): the ArrowRows interface."""

    def __init__(self, rows: list[dict]):
        self.rows = rows
        self.prompt_lengths = np.array([len(r["prompt_ids"]) for r in rows], dtype=np.int64)
        self.completion_lengths = np.array([len(r["completion_ids"]) for r in rows], dtype=np.int64)
        with_topk = [r["top_ids"] for r in rows if r.get("top_ids") is not None and len(r["top_ids"])]
        self.max_teacher_id = max((int(torch.as_tensor(ids).max()) for ids in with_topk), default=-1)
        self.has_topk = bool(with_topk)

    def __len__(self) -> int:
        return len(self.rows)

    def fetch(self, indices) -> list[dict]:
        return [self.rows[i] for i in indices]


def check_files(files: list[Path]) -> int:
    """The rows the dataset files hold, from their footers; a file that is not Parquet, or lacks a column training
    needs, is a UserError naming it."""
    total = 0
    for file in files:
        try:
            parquet = pq.ParquetFile(file)
        except (pa.ArrowException, OSError) as err:
            raise UserError(f"{file}: not a readable Parquet file ({err}); delete it and rerun `distillab generate`") from None
        _check_columns(file, parquet.schema_arrow.names, parquet.metadata.num_rows)
        total += parquet.metadata.num_rows
    return total


def arrow_copy(files: list[Path], arrow: Path) -> dict:
    """The Arrow copy of `files` at `arrow` (made unless one of the same files, by name, size and mtime, is there) and
    its stats: {"files", "rows", "max_teacher_id"} (-1: no top-k), in <name>.json; the rows' prompt and completion
    lengths and the record batches' first rows in <name>.npz. Each written to a temp file and renamed, the stats last;
    under a lock, so the processes of one run make it once."""
    import fcntl

    from distillab.files import write_atomic

    key = [ARROW_FORMAT] + [[f.name, f.stat().st_size, f.stat().st_mtime_ns] for f in files]
    stats_path, side_path = arrow.with_suffix(".json"), arrow.with_suffix(".npz")
    arrow.parent.mkdir(parents=True, exist_ok=True)
    with open(arrow.with_suffix(".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if stats_path.is_file() and arrow.is_file() and side_path.is_file():
            stats = json.loads(stats_path.read_text())
            if stats.get("files") == key:
                return stats
        schema, max_id = _train_schema(), -1
        prompt, completion, batch_rows = [], [], []
        tmp, side_tmp = arrow.with_name(f".{arrow.name}.tmp"), side_path.with_name(f".{side_path.stem}.tmp.npz")
        try:
            options = pa.ipc.IpcWriteOptions(compression="zstd")
            with pa.OSFile(str(tmp), "wb") as sink, pa.ipc.new_file(sink, schema, options=options) as writer:
                for file in files:
                    parquet = pq.ParquetFile(file)  # its columns were checked (check_files) before the copy
                    present = [f.name for f in schema if f.name in parquet.schema_arrow.names]
                    for batch in parquet.iter_batches(batch_size=COPY_BATCH_ROWS, columns=present):
                        batch = conform(batch, schema)
                        writer.write_table(pa.Table.from_batches([batch]), max_chunksize=RECORD_BATCH_ROWS)
                        n = batch.num_rows
                        batch_rows += [RECORD_BATCH_ROWS] * (n // RECORD_BATCH_ROWS) + ([n % RECORD_BATCH_ROWS] if n % RECORD_BATCH_ROWS else [])
                        prompt.append(pc.list_value_length(batch.column("prompt_ids")).to_numpy(zero_copy_only=False))
                        completion.append(pc.list_value_length(batch.column("completion_ids")).to_numpy(zero_copy_only=False))
                        max_id = max(max_id, _max_teacher_id(batch))
            lengths = {name: np.concatenate([np.zeros(0, np.int32)] + parts).astype(np.int32)
                       for name, parts in (("prompt", prompt), ("completion", completion))}
            np.savez(side_tmp, starts=np.cumsum([0] + batch_rows), **lengths)
            tmp.replace(arrow)
            side_tmp.replace(side_path)
        finally:
            tmp.unlink(missing_ok=True)
            side_tmp.unlink(missing_ok=True)
        stats = {"files": key, "rows": int(sum(batch_rows)), "max_teacher_id": max_id}
        write_atomic(stats_path, json.dumps(stats))
        return stats


def _binary_values(array: pa.BinaryArray) -> tuple[np.ndarray, np.ndarray]:
    """(every value's bytes end to end, per-row byte counts) of a binary array, without a copy per row."""
    offsets = np.frombuffer(array.buffers()[1], np.int32)[array.offset : array.offset + len(array) + 1]
    data = array.buffers()[2]
    values = np.frombuffer(data, np.uint8)[offsets[0] : offsets[-1]] if data is not None else np.zeros(0, np.uint8)
    return values, np.diff(offsets)


def _max_teacher_id(batch: pa.RecordBatch) -> int:
    """The largest teacher token id in a batch's codec columns (-1: none), from the id planes alone: ids are stored
    sorted as gaps, so a position's largest id is the sum of its deltas (gaps are stored minus 1) and k - 1."""
    top, n_top = _binary_values(batch.column(TOPK_PREFIX + "top"))
    if not top.size:
        return -1
    below, n_below = _binary_values(batch.column(TOPK_PREFIX + "below_top"))
    positions = n_top // 2  # (B,) uint16 per position
    has = positions > 0
    ks = n_below[has] // positions[has]
    planes = [_binary_values(batch.column(TOPK_PREFIX + p))[0] for p in ("id_b0", "id_b1", "id_b2")]

    def largest(n: int, k: int, start: int = 0) -> int:  # over n positions of k ids from `start` in the planes
        # sum(deltas) = sum(b0) + 256 sum(b1) + 65536 sum(b2): three byte-plane sums, no per-id widening
        sums = [plane[start : start + n * k].reshape(n, k).sum(axis=1, dtype=np.int64) for plane in planes]
        return int((sums[0] + (sums[1] << 8) + (sums[2] << 16)).max()) + k - 1

    if (ks == ks[0]).all():  # one k in the batch (always, from one teacher): one reshape
        return largest(len(planes[0]) // int(ks[0]), int(ks[0]))
    best, start = -1, 0
    for n, k in zip(positions[has].tolist(), ks.tolist()):  # rows with different k: row by row
        best, start = max(best, largest(n, k, start)), start + n * k
    return best


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
# The training set: task rows, with retain replay in a fixed batch-by-batch order; its order; its batches.

RowSource = ArrowRows | ListRows


class DistillDataset(torch.utils.data.Dataset):
    """The task rows; with retain replay, the task and replay rows in a fixed batch-by-batch order
    (retain.batch_layout), read sequentially so every batch holds the configured replay share. An item is its own
    index: the collator (Collator) fetches and decodes a whole batch at once."""

    def __init__(self, task: RowSource | list[dict], vocab_size: int, replay: RowSource | list[dict] | None = None,
                 layout: list[tuple[str, int]] | None = None):
        self.task = task if not isinstance(task, list) else ListRows(task)
        self.replay = replay if not isinstance(replay, list) else ListRows(replay)
        self.sources = [self.task] + ([self.replay] if self.replay is not None else [])
        for name, source in zip(("task", "replay"), self.sources):
            if source.max_teacher_id >= vocab_size:
                raise UserError(f"teacher token ids reach past the student's vocabulary ({vocab_size}) in the {name} "
                                f"rows (up to {source.max_teacher_id}): teacher and student tokenizers differ")
        if layout is None:  # item i is task row i
            self.group, self.index = np.zeros(len(self.task), np.int8), np.arange(len(self.task))
        else:  # (n,) each: 0 task / 1 replay, and the row in that source
            self.group = np.array([source == "replay" for source, _ in layout], dtype=np.int8)
            self.index = np.array([j for _, j in layout], dtype=np.int64)
        self.layout = layout

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, i: int) -> int:
        return i

    def lengths(self) -> np.ndarray:
        """(n,) prompt + completion tokens of each item."""
        out = np.zeros(len(self.index), np.int64)
        for g, source in enumerate(self.sources):
            where = self.group == g
            out[where] = (source.prompt_lengths + source.completion_lengths)[self.index[where]]
        return out

    def pass_tokens(self) -> tuple[int, int]:
        """(rows, prompt + completion tokens) of one pass over the training data: task and replay rows, each once."""
        return (sum(len(s) for s in self.sources),
                int(sum((s.prompt_lengths + s.completion_lengths).sum() for s in self.sources)))

    def fetch(self, items) -> list[dict]:
        """The items' rows, decoded, in order: one fetch per source."""
        items = np.asarray(items, dtype=np.int64)
        rows: list = [None] * len(items)
        for g, source in enumerate(self.sources):
            where = np.flatnonzero(self.group[items] == g)
            if where.size:
                for at, row in zip(where.tolist(), source.fetch(self.index[items[where]].tolist())):
                    rows[at] = row
        return rows


class Collator:
    """DataLoader collate_fn: a batch of items -> their rows, fetched and decoded together -> collate."""

    def __init__(self, data: DistillDataset, pad_id: int, pack: bool = False):
        self.data, self.pad_id, self.pack = data, pad_id, pack

    def __call__(self, items: list[int]) -> dict[str, torch.Tensor]:
        return collate(self.data.fetch(items), self.pad_id, pack=self.pack)


def group_by_length(order: np.ndarray, lengths: np.ndarray, groups: np.ndarray, batch_size: int,
                    rng: np.random.Generator, span: int = 64) -> np.ndarray:
    """`order` (items, batch after batch) with rows moved between the batches of each window of `span` batches so
    that a batch holds rows of similar length: in a window, each group's items (task, replay) are sorted by length,
    longest first, and dealt back into that group's places in order, so every batch keeps its count of each group
    (the replay share) and the window its rows; then the window's full batches are shuffled (by rng), so long and
    short batches alternate at random. Padding then follows the spread of lengths inside a window's sorted slices."""
    out = np.array(order, dtype=np.int64)
    window = span * batch_size
    for start in range(0, len(out), window):
        w = out[start : start + window]  # a view: edits land in out
        for g in np.unique(groups[w]):
            places = np.flatnonzero(groups[w] == g)
            members = w[places]
            w[places] = members[np.argsort(-lengths[members], kind="stable")]
        full = len(w) // batch_size
        batches = w[: full * batch_size].reshape(full, batch_size)
        batches[:] = batches[rng.permutation(full)]
    return out


class LengthGroupedSampler(torch.utils.data.Sampler):
    """train.group_by_length: the epoch's order (a permutation from the seed and epoch, or the retain layout as it
    is) through group_by_length. Deterministic: the same seed gives the same batches, on every process and resume."""

    def __init__(self, data: DistillDataset, batch_size: int, seed: int):
        self.data, self.batch_size, self.seed, self.epoch = data, batch_size, seed, 0
        self.lengths = data.lengths()

    def set_epoch(self, epoch: int) -> None:  # the Trainer (through accelerate) calls it before each epoch
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.data)

    def __iter__(self):
        rng = np.random.default_rng([self.seed, self.epoch])
        order = np.arange(len(self.data)) if self.data.layout is not None else rng.permutation(len(self.data))
        yield from group_by_length(order, self.lengths, self.data.group, self.batch_size, rng).tolist()


def collate(rows: list[dict], pad_id: int, pack: bool | int = False) -> dict[str, torch.Tensor]:
    """Right-padded batch. Position t predicts token t+1, so the completion's j-th token (at index
    len(prompt)+j) is predicted at index len(prompt)+j-1: labels and teacher top-k sit at those indices.

    pack: the same examples in fewer rows, as wide as the longest (or `pack` tokens, when an int and wider; first fit,
    longest first): position_ids restart at 0 for each example (and for the padding after the last), which is how
    the model keeps examples apart (see train.model_inputs); an example's last token predicts nothing, since the
    next one's first token is a prompt token (label -100). No prompt_len: on-policy steps, which read it, refuse
    packing."""
    lengths = [len(r["prompt_ids"]) + len(r["completion_ids"]) for r in rows]
    width = max(max(lengths), 0 if pack is True else int(pack))
    places = pack_rows(lengths, width) if pack else [(b, 0) for b in range(len(rows))]
    n_rows = max(row for row, _ in places) + 1
    k = max((len(r["top_ids"][0]) for r in rows if r.get("top_ids") is not None and len(r["top_ids"])), default=0)
    input_ids = torch.full((n_rows, width), pad_id, dtype=torch.long)  # (B, T)
    attention_mask = torch.zeros((n_rows, width), dtype=torch.long)  # (B, T)
    labels = torch.full((n_rows, width), -100, dtype=torch.long)  # (B, T) HF convention: label[t] = input[t]
    top_ids = torch.zeros((n_rows, width, max(k, 1)), dtype=torch.long)  # (B, T, k) at the predicting index
    top_logprobs = torch.full((n_rows, width, max(k, 1)), -1e4)  # (B, T, k)
    top_tail = torch.full((n_rows, width), float("nan"))  # (B, T) log of the teacher's mass outside its top-k; NaN: none stored
    kd_mask = torch.zeros((n_rows, width), dtype=torch.bool)  # (B, T) where a teacher distribution exists
    position_ids = torch.zeros((n_rows, width), dtype=torch.long)  # (B, T) packed only
    prompt_len = torch.zeros(n_rows, dtype=torch.long)
    for (b, at), r in zip(places, rows):
        p, c = list(r["prompt_ids"]), list(r["completion_ids"])
        if pack and not p:
            raise UserError("train.packing needs a prompt of at least one token in every row")
        n_ids, start = len(p) + len(c), at + len(p) - 1  # start: where the completion's first token is predicted
        input_ids[b, at : at + n_ids] = torch.tensor(p + c)
        attention_mask[b, at : at + n_ids] = 1
        labels[b, at + len(p) : at + n_ids] = torch.tensor(c)
        position_ids[b, at : at + n_ids] = torch.arange(n_ids)
        prompt_len[b] = len(p)
        if k and r.get("top_ids") is not None and len(r["top_ids"]):
            n = min(len(r["top_ids"]), len(c))
            top_ids[b, start : start + n] = torch.as_tensor(r["top_ids"][:n])
            top_logprobs[b, start : start + n] = torch.as_tensor(r["top_logprobs"][:n])
            if r.get("top_tail") is not None:
                top_tail[b, start : start + n] = torch.as_tensor(r["top_tail"][:n])
            # a position whose ids hold no mass (top-1 below -200; a real one is >= -log V) has no teacher
            # distribution: a token crosstok could not align. It trains on its text instead.
            kd_mask[b, start : start + n] = top_logprobs[b, start : start + n].amax(-1) > -200.0
    out = {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
    if pack:  # the padding after a row's last example is a segment of its own, positions from 0
        for b in range(n_rows):
            used = int(attention_mask[b].sum())
            position_ids[b, used:] = torch.arange(width - used)
        out["position_ids"] = position_ids
    else:
        out["prompt_len"] = prompt_len
    if k:
        out.update(top_ids=top_ids, top_logprobs=top_logprobs, top_tail=top_tail, kd_mask=kd_mask)
    return out


def pack_rows(lengths: list[int], width: int) -> list[tuple[int, int]]:
    """(row, offset) of each example packed into rows of `width` tokens: first fit, longest first (deterministic)."""
    free: list[int] = []  # free tokens left in each row
    places: list[tuple[int, int]] = [(0, 0)] * len(lengths)
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        row = next((r for r, room in enumerate(free) if room >= lengths[i]), len(free))
        if row == len(free):
            free.append(width)
        places[i] = (row, width - free[row])
        free[row] -= lengths[i]
    return places
