"""What training reads (trainrows.ArrowRows): streamed rows equal the whole-file read (one file or shards), a changed
dataset is copied again (by content: one of the same size and mtime too), teacher ids past the vocabulary are refused
from the copy, and memory does not follow the row count."""

from __future__ import annotations

import gc
import os
import tracemalloc

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from distillab.batching import DistillDataset
from distillab.dataset import read_dataset, write_dataset
from distillab.errors import UserError
from distillab.trainrows import ArrowRows
from tests.helpers import synthetic_rows


def _same_rows(streamed: list[dict], whole: list[dict]) -> None:
    assert len(streamed) == len(whole)
    for s, w in zip(streamed, whole):
        assert list(s["prompt_ids"]) == w["prompt_ids"] and list(s["completion_ids"]) == w["completion_ids"]
        if w["top_ids"] is None:
            assert s["top_ids"] is None and s["top_logprobs"] is None and s["top_tail"] is None
            continue
        assert s["top_ids"].tolist() == w["top_ids"]
        assert s["top_logprobs"].tolist() == w["top_logprobs"] and s["top_tail"].tolist() == w["top_tail"]


@pytest.mark.parametrize("sharded", [False, True])
def test_streamed_rows_equal_the_whole_read(tmp_path, sharded):
    path = tmp_path / "data" / "train.parquet"
    rows = synthetic_rows(300)
    if sharded:  # data/train/part-*.parquet, as `generate --shard` writes; one shard holds no top-k column at all
        write_dataset(path.with_suffix("") / "part-0-of-3-a.parquet", rows[:100])
        middle = path.with_suffix("") / "part-1-of-3-a.parquet"
        write_dataset(middle, rows[100:150])
        table = pq.read_table(middle)
        pq.write_table(table.drop_columns([c for c in table.column_names if c.startswith("topk_")]), middle)
        for r in rows[100:150]:
            r.pop("topk", None)
        write_dataset(path.with_suffix("") / "part-2-of-3-a.parquet", rows[150:])
    else:
        write_dataset(path, rows)
    whole = read_dataset(path)
    streamed = ArrowRows(path)
    assert len(streamed) == len(whole) == 300
    order = np.random.default_rng(0).permutation(300).tolist()
    _same_rows(streamed.fetch(order), [whole[i] for i in order])
    assert streamed.completion_lengths.tolist() == [len(r["completion_ids"]) for r in whole]
    assert streamed.prompt_lengths.tolist() == [len(r["prompt_ids"]) for r in whole]
    assert streamed.max_teacher_id == max(max(map(max, r["top_ids"])) for r in whole if r["top_ids"])
    again = ArrowRows(path)  # the copy is made once
    assert again.stats == streamed.stats
    arrow = path.parent / ".arrow" / "train.arrow"
    made = arrow.stat().st_mtime_ns
    ArrowRows(path)
    assert arrow.stat().st_mtime_ns == made


def test_a_changed_dataset_is_copied_again(tmp_path):
    path = tmp_path / "data" / "train.parquet"
    write_dataset(path, synthetic_rows(20))
    assert len(ArrowRows(path)) == 20
    write_dataset(path, synthetic_rows(30, seed=1))
    streamed = ArrowRows(path)
    assert len(streamed) == 30
    _same_rows(streamed.fetch(range(30)), read_dataset(path))


def test_a_dataset_rewritten_with_the_same_size_and_mtime_is_copied_again(tmp_path):
    path = tmp_path / "data" / "train.parquet"
    write_dataset(path, synthetic_rows(20))
    table = pq.read_table(path)

    def rewrite(prompt_ids: pa.Array) -> None:  # uncompressed, plain: the same shapes give the same bytes count
        column = table.schema.get_field_index("prompt_ids")
        changed = table.set_column(column, "prompt_ids", prompt_ids.cast(table.schema.field(column).type))
        pq.write_table(changed, path, compression="none", use_dictionary=False, write_statistics=False)

    rewrite(table.column("prompt_ids").combine_chunks())
    size, mtime = path.stat().st_size, path.stat().st_mtime_ns
    before = ArrowRows(path).fetch(range(20))
    plus_one = [[i + 1 for i in ids] for ids in table.column("prompt_ids").to_pylist()]  # other ids, same lengths
    rewrite(pa.array(plus_one))
    os.utime(path, ns=(mtime, mtime))
    assert (path.stat().st_size, path.stat().st_mtime_ns) == (size, mtime)
    after = ArrowRows(path).fetch(range(20))
    assert [list(r["prompt_ids"]) for r in after] == plus_one
    assert [list(r["prompt_ids"]) for r in after] != [list(r["prompt_ids"]) for r in before]


@pytest.mark.parametrize(
    "suffix, damage",
    [(".json", b"{"), (".json", b"\xff\xfe"), (".json", b"[]"), (".npz", b"PK\x03"), (".arrow", b"ARROW1\x00\x00")],
)
def test_a_damaged_copy_or_side_file_is_made_again(tmp_path, suffix, damage):
    path = tmp_path / "data" / "train.parquet"
    write_dataset(path, synthetic_rows(20))
    ArrowRows(path)
    (path.parent / ".arrow" / "train").with_suffix(suffix).write_bytes(damage)  # the copy's files are distillab's own
    streamed = ArrowRows(path)
    assert len(streamed) == 20 and streamed.stats["rows"] == 20
    _same_rows(streamed.fetch(range(20)), read_dataset(path))


def test_teacher_ids_past_the_vocabulary_are_refused_from_the_copy(tmp_path):
    path = tmp_path / "data" / "train.parquet"
    write_dataset(path, synthetic_rows(40, vocab=5000))
    streamed = ArrowRows(path)
    with pytest.raises(UserError, match="past the student's vocabulary"):
        DistillDataset(streamed, vocab_size=streamed.max_teacher_id)
    DistillDataset(streamed, vocab_size=streamed.max_teacher_id + 1)


def test_memory_does_not_follow_the_row_count(tmp_path):
    """Opening a dataset and fetching a batch: Python objects, Python heap (numpy included) and Arrow's pool stay
    bounded whether the dataset has 2,000 or 20,000 rows; only the lengths (8 bytes a row) grow."""
    measured = {}
    for n in (2_000, 20_000):
        path = tmp_path / str(n) / "data" / "train.parquet"
        rows = synthetic_rows(2_000, seed=n, completion=(8, 24))
        for shard in range(n // 2_000):  # the same rows in each shard: writing is not what is tested
            write_dataset(path.with_suffix("") / f"part-{shard:03d}.parquet", rows)
        del rows
        ArrowRows(path)  # makes the copy (a record batch at a time; measured by the benchmark)
        gc.collect()
        objects = len(gc.get_objects())
        arrow_before = pa.total_allocated_bytes()
        tracemalloc.start()
        streamed = ArrowRows(path)
        batch = streamed.fetch([0, n // 2, n - 1, 5, 7, n - 8, 11, 13])
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        gc.collect()
        measured[n] = {
            "objects": len(gc.get_objects()) - objects,
            "peak": peak,
            "arrow": pa.total_allocated_bytes() - arrow_before,
        }
        assert len(batch) == 8 and len(streamed) == n
        del streamed, batch
    small, large = measured[2_000], measured[20_000]
    assert large["objects"] < 2_000 and large["objects"] < small["objects"] + 200, measured
    assert large["peak"] < small["peak"] + 8 * 18_000 + 2**20, measured  # lengths: 2 x int32 a row, + 1 MiB slack
    assert large["arrow"] < 8 * 2**20, measured  # the record batches of this batch's rows at most
