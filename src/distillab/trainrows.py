"""What training reads: a dataset copied once, a record batch at a time, into an Arrow IPC file next to it
(data/.arrow/<name>.arrow), and ArrowRows, which reads rows from that copy a batch at a time.

The copy holds zstd-compressed record batches of RECORD_BATCH_ROWS rows, so it takes about the Parquet files' bytes. A
training batch reads (pread) and decompresses only the record batches that hold its rows: memory follows the batch,
not the dataset. Parquet itself cannot be read a row at a time (its pages hold a column chunk of thousands of rows),
hence the copy; `datasets` (from_parquet) would make an uncompressed copy, twice the Parquet bytes, with its own
fingerprint cache. Not memory-mapped: a compressed file cannot be used in place, and a mapped file counts in the
process's RSS page by page as batches touch it (here 2 MiB per fault: the kernel maps whole page-cache folios), until
an epoch has made all of it resident.

Beside the copy: <name>.json, its stats ({"files", "rows", "max_teacher_id"}; "files" names the Parquet files by name
and content digest, so a changed dataset is copied again, even one rewritten with the same size and mtime; the digest
costs under a millisecond per MB, the copy ~1,000 times more), and <name>.npz, the rows' prompt, completion and
answer lengths (answer: a reasoning row's answer_ids, -1 where a row has none) and the record batches' first rows.
Each is written to a temp file and renamed, the stats last, under a lock (<name>.lock), so the processes of one run
make the copy once.
"""

from __future__ import annotations

import functools
import json
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from distillab.dataset import (
    COPY_BATCH_ROWS,
    ID_COLUMNS,
    TOPK_PREFIX,
    check_files,
    conform,
    dataset_files,
    decode_row_topk,
)
from distillab.errors import UserError
from distillab.files import atomic_path, file_digest, lock, write_atomic, writing
from distillab.topk_codec import FIELDS

ARROW_DIR = ".arrow"
ARROW_FORMAT = 3  # bump when the copy's layout changes: copies of another format are then made again
RECORD_BATCH_ROWS = 8  # a row costs reading and decompressing this many (~0.2 MB at 256 tokens, top-20)
READ_CACHE_BYTES = 32 * 2**20  # recently read record batches kept (a small dataset ends up read once)
# what opening a damaged copy or side file raises (truncated, overwritten, missing): numpy, zipfile, Arrow's errors
DAMAGED = (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile)


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
        self._open(files, arrow)
        self.max_teacher_id, self.has_topk = self.stats["max_teacher_id"], self.stats["max_teacher_id"] >= 0

    def _open(self, files: list[Path], arrow: Path, remake: bool = False) -> None:
        self.stats = arrow_copy(files, arrow, remake)
        try:
            self._read(arrow)
        except DAMAGED:  # the copy or a side file damaged since it was made: distillab's own, so made again
            if remake:
                raise
            self._open(files, arrow, remake=True)

    def _read(self, arrow: Path) -> None:
        """The side file's arrays and the copy's footer."""
        with np.load(arrow.with_suffix(".npz")) as side:  # (N,) int32 each, and (record batches + 1,) row starts
            self.prompt_lengths, self.completion_lengths = side["prompt"], side["completion"]
            self.answer_lengths = side["answer"]
            self.starts = side["starts"]
        self.reader = pa.ipc.open_file(pa.OSFile(str(arrow)))  # reads nothing but the footer
        # zstd about halves these columns: a decompressed record batch is ~2x its share of the file
        per_batch = 2 * arrow.stat().st_size / max(1, len(self.starts) - 1)
        self.record_batch = functools.lru_cache(maxsize=max(16, int(READ_CACHE_BYTES / max(per_batch, 1.0))))(
            self.reader.get_batch
        )

    def __len__(self) -> int:
        return int(self.starts[-1])

    def fetch(self, indices) -> list[dict]:
        """Rows by index, top-k decoded (decode_row_topk): the only place rows become Python objects."""
        where = np.searchsorted(self.starts, indices, side="right") - 1  # each row's record batch
        return [
            decode_row_topk(self.record_batch(b).slice(i - int(self.starts[b]), 1).to_pylist()[0])
            for b, i in zip(where.tolist(), indices)
        ]


def arrow_copy(files: list[Path], arrow: Path, remake: bool = False) -> dict:
    """The Arrow copy of `files` at `arrow` (made unless one of the same files is there, or `remake`) and its stats
    (see the module docstring)."""
    key = [ARROW_FORMAT] + [[f.name, file_digest(f)] for f in files]
    with lock(arrow.with_suffix(".lock")):
        return (None if remake else _current_stats(arrow, key)) or _make_copy(files, arrow, key)


def _current_stats(arrow: Path, key: list) -> dict | None:
    """The stats of the copy at `arrow` when it is whole and made from the files `key` names, else None."""
    stats_path = arrow.with_suffix(".json")
    if not (stats_path.is_file() and arrow.is_file() and arrow.with_suffix(".npz").is_file()):
        return None
    try:
        stats = json.loads(stats_path.read_text(encoding="utf-8"))
    except (OSError, ValueError):  # unreadable, not UTF-8, not JSON: made again
        return None
    return stats if isinstance(stats, dict) and stats.get("files") == key else None


def _make_copy(files: list[Path], arrow: Path, key: list) -> dict:
    """Write the copy and its side file, then its stats (last: they say the other two are whole)."""
    with writing(arrow, "the copy is made again from the dataset"):
        with atomic_path(arrow) as arrow_tmp, atomic_path(arrow.with_suffix(".npz"), suffix=".npz") as side_tmp:
            index = _write_record_batches(files, arrow_tmp)
            np.savez(side_tmp, **index.arrays())
        stats = {"files": key, "rows": int(sum(index.batch_rows)), "max_teacher_id": index.max_teacher_id}
        write_atomic(arrow.with_suffix(".json"), json.dumps(stats))
    return stats


def _train_schema() -> pa.Schema:
    """What training reads: the token ids (a reasoning row's answer alone too) and the codec columns."""
    return pa.schema(
        [(name, pa.list_(pa.int32())) for name in ID_COLUMNS] + [(TOPK_PREFIX + f, pa.binary()) for f in FIELDS]
    )


@dataclass
class CopyIndex:
    """What the side file and the stats record of the copy, gathered as its record batches are written."""

    prompt: list[np.ndarray] = field(default_factory=list)  # prompt lengths, a Parquet batch at a time
    completion: list[np.ndarray] = field(default_factory=list)
    answer: list[np.ndarray] = field(default_factory=list)  # -1: no answer_ids (a row without a trace)
    batch_rows: list[int] = field(default_factory=list)  # rows of each record batch
    max_teacher_id: int = -1  # -1: no top-k

    def add(self, batch: pa.RecordBatch) -> None:
        """Record a Parquet batch written as record batches of RECORD_BATCH_ROWS rows (the last one shorter)."""
        whole, rest = divmod(batch.num_rows, RECORD_BATCH_ROWS)
        self.batch_rows += [RECORD_BATCH_ROWS] * whole + ([rest] if rest else [])
        self.prompt.append(pc.list_value_length(batch.column("prompt_ids")).to_numpy(zero_copy_only=False))
        self.completion.append(pc.list_value_length(batch.column("completion_ids")).to_numpy(zero_copy_only=False))
        answers = pc.list_value_length(batch.column("answer_ids"))
        self.answer.append(pc.fill_null(answers, -1).to_numpy(zero_copy_only=False))
        self.max_teacher_id = max(self.max_teacher_id, _max_teacher_id(batch))

    def arrays(self) -> dict[str, np.ndarray]:
        """The side file's arrays: each record batch's first row (and the row count last), the rows' lengths."""
        lengths = {
            name: np.concatenate([np.zeros(0, np.int32)] + parts).astype(np.int32)
            for name, parts in (("prompt", self.prompt), ("completion", self.completion), ("answer", self.answer))
        }
        return {"starts": np.cumsum([0] + self.batch_rows), **lengths}


def _write_record_batches(files: list[Path], sink_path: Path) -> CopyIndex:
    """The files' training columns -> an Arrow IPC file of zstd record batches at `sink_path`; returns its index."""
    schema, index = _train_schema(), CopyIndex()
    options = pa.ipc.IpcWriteOptions(compression="zstd")
    with pa.OSFile(str(sink_path), "wb") as sink, pa.ipc.new_file(sink, schema, options=options) as writer:
        for batch in _training_batches(files, schema):
            writer.write_table(pa.Table.from_batches([batch]), max_chunksize=RECORD_BATCH_ROWS)
            index.add(batch)
    return index


def _training_batches(files: list[Path], schema: pa.Schema):
    """The files' rows, COPY_BATCH_ROWS at a time, as `schema`'s columns (nulls for a column a file lacks)."""
    for file in files:
        parquet = pq.ParquetFile(file)  # its columns were checked (check_files) before the copy
        present = [f.name for f in schema if f.name in parquet.schema_arrow.names]
        for batch in parquet.iter_batches(batch_size=COPY_BATCH_ROWS, columns=present):
            yield conform(batch, schema)


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
