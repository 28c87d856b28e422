"""The on-disk dataset format (dataset.py): rows written and read back (text, ids, the teacher's top-k through the codec,
conversations, extra columns), column types fixed whatever a file holds, a sharded dataset read as one in name order,
shards merged into one file, and a file that is not a dataset one line naming it."""

from __future__ import annotations

import json
import re

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from distillab.dataset import (
    STRING_COLUMNS,
    TOPK_PREFIX,
    check_files,
    dataset_files,
    read_dataset,
    shard_dir,
    write_dataset,
    write_merged,
)
from distillab.errors import UserError
from distillab.topk_codec import FIELDS, MAX_LOGPROB_ERROR, decode_topk
from tests.helpers import synthetic_rows

TURNS = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2=é"}]


def _rows() -> list[dict]:
    """Three rows as a caller hands them over (every row with the same keys): top-k as lists, a conversation as turns,
    an extra column."""
    return [
        {
            "prompt": "1+1=",
            "completion": "2",
            "prompt_ids": [1, 5, 6],
            "completion_ids": [7, 2],
            "skill": "add",
            "messages": None,
            "top_ids": [[7, 30, 9], [2, 11, 4]],
            "top_logprobs": [[-0.1, -2.5, -3.0], [-0.01, -5.0, -6.5]],
        },
        {
            "prompt": "Be brief.\n2+2=é",
            "completion": "4",
            "prompt_ids": [1, 8],
            "completion_ids": [9, 2],
            "skill": "add",
            "messages": TURNS,
            "top_ids": None,
            "top_logprobs": None,
        },
        {
            "prompt": "x",
            "completion": "",
            "prompt_ids": [1],
            "completion_ids": [2],
            "skill": None,
            "messages": None,
            "top_ids": None,
            "top_logprobs": None,
        },
    ]


def test_rows_read_back_as_they_were_written(tmp_path):
    path = tmp_path / "data" / "train.parquet"
    rows = _rows()
    write_dataset(path, rows)
    assert sorted(p.name for p in path.parent.iterdir()) == ["train.parquet"]  # no temp left beside it
    got = read_dataset(path)
    assert len(got) == 3
    for row, want in zip(got, rows):
        for column in ("prompt", "completion", "prompt_ids", "completion_ids", "skill"):
            assert row[column] == want[column], column  # text and ids exact; the extra column kept
    assert json.loads(got[1]["messages"]) == TURNS and got[0]["messages"] is None  # a conversation as its JSON text
    first = got[0]
    for ids, logprobs, ids0, logprobs0 in zip(
        first["top_ids"], first["top_logprobs"], rows[0]["top_ids"], rows[0]["top_logprobs"]
    ):
        assert ids == sorted(ids0)  # each position's ids, ascending
        want = dict(zip(ids0, logprobs0))
        assert max(abs(lp - want[i]) for i, lp in zip(ids, logprobs)) <= MAX_LOGPROB_ERROR + 1e-6
    assert len(first["top_tail"]) == 2 and all(t <= 0 for t in first["top_tail"])  # the mass outside the top-k
    for row in got[1:]:  # no top-k: None, not empty lists
        assert row["top_ids"] is row["top_logprobs"] is row["top_tail"] is None
    assert not any(name.startswith(TOPK_PREFIX) for name in first)  # the codec's columns are decoded away


def test_top_k_already_encoded_is_stored_as_given(tmp_path):
    """A row may carry the codec's arrays ("topk"), as the request cache hands them over: read back, they decode to
    exactly what the arrays decode to (nothing re-quantised on the way)."""
    rows = synthetic_rows(8)
    write_dataset(tmp_path / "d.parquet", rows)
    got = read_dataset(tmp_path / "d.parquet")
    for row, written in zip(got, rows):
        if "topk" not in written:
            assert row["top_ids"] is None
            continue
        ids, logprobs, tail = decode_topk(written["topk"])
        assert row["top_ids"] == ids.tolist() and row["top_logprobs"] == logprobs.tolist()
        assert row["top_tail"] == tail.tolist()
    assert any("topk" not in r for r in rows) and any("topk" in r for r in rows)


def test_column_types_do_not_depend_on_the_rows(tmp_path):
    """Ids are int32 lists, the codec's columns binary and the known text columns strings, even when every row holds
    null there: shards with and without a value must read as one dataset."""
    path = tmp_path / "d.parquet"
    write_dataset(
        path,
        [
            {
                "prompt": "p",
                "completion": "c",
                "prompt_ids": [1],
                "completion_ids": [2],
                "answer": None,
                "source": None,
                "teacher_id": None,
                "messages": None,
            }
        ],
    )
    schema = pq.read_schema(path)
    assert schema.field("prompt_ids").type == pa.list_(pa.int32()) == schema.field("completion_ids").type
    assert all(schema.field(TOPK_PREFIX + f).type == pa.binary() for f in FIELDS)
    assert all(schema.field(name).type == pa.string() for name in ("answer", "source", "teacher_id", "messages"))
    assert {"answer", "source", "teacher_id", "messages"} <= set(STRING_COLUMNS)


def test_a_sharded_dataset_is_its_shards_in_name_order(tmp_path):
    path = tmp_path / "data" / "train.parquet"
    assert dataset_files(path) == [] and shard_dir(path) == tmp_path / "data" / "train"
    rows = synthetic_rows(30)
    names = [f"part-{i // 5:05d}-of-00002-{i % 5:06d}.parquet" for i in range(10)]  # 2 processes, 5 chunks each
    for i in (3, 7, 0, 9, 5, 1, 8, 2, 6, 4):  # written out of order (a directory lists them in its own order)
        write_dataset(shard_dir(path) / names[i], rows[3 * i : 3 * i + 3])
    (shard_dir(path) / "notes.txt").write_text("not a shard")
    assert [f.name for f in dataset_files(path)] == names
    assert [r["prompt"] for r in read_dataset(path)] == [r["prompt"] for r in rows]
    write_dataset(path, rows[:3])  # a whole file is the dataset: its shards are not read
    assert dataset_files(path) == [path] and len(read_dataset(path)) == 3


def test_shards_merge_into_one_file_with_unified_columns(tmp_path):
    """The first shard without the skill column, the last without any top-k column: the merged file holds every row,
    in shard order, each column typed from the shards that have it and null where a shard had none."""
    rows = [r | {"skill": "s"} for r in synthetic_rows(25, seed=3)]
    shards = [tmp_path / "parts" / f"part-{i}.parquet" for i in range(3)]
    write_dataset(shards[0], [{k: v for k, v in r.items() if k != "skill"} for r in rows[:10]])
    write_dataset(shards[1], rows[10:15])
    write_dataset(shards[2], [{k: v for k, v in r.items() if k != "topk"} for r in rows[15:]])
    table = pq.read_table(shards[2])
    pq.write_table(table.drop_columns([c for c in table.column_names if c.startswith(TOPK_PREFIX)]), shards[2])
    merged = tmp_path / "data" / "train.parquet"
    write_merged(merged, shards)
    assert sorted(p.name for p in merged.parent.iterdir()) == ["train.parquet"]
    got = read_dataset(merged)
    assert len(got) == 25 and got[10:15] == read_dataset(shards[1])
    assert [r["prompt"] for r in got] == [r["prompt"] for r in rows]
    assert [r["skill"] for r in got] == [None] * 10 + ["s"] * 15
    assert any(r["top_ids"] for r in got[:10]) and all(r["top_ids"] is None for r in got[15:])
    assert check_files([merged]) == 25


def test_a_file_that_is_not_a_dataset_is_one_line_naming_it(tmp_path):
    missing = tmp_path / "data" / "train.parquet"
    with pytest.raises(UserError, match=r"no dataset at .*train\.parquet: run `distillab generate` first"):
        read_dataset(missing)
    garbage = tmp_path / "garbage.parquet"
    garbage.write_bytes(b"PAR1 not really")
    with pytest.raises(UserError) as err:
        check_files([garbage])
    assert str(err.value).startswith(f"{garbage}: not a readable Parquet file") and "\n" not in str(err.value)
    no_ids = tmp_path / "no_ids.parquet"
    pq.write_table(pa.table({"prompt": ["p"], "completion": ["c"], "prompt_ids": [[1]]}), no_ids)
    says = f"{no_ids} is not a distillab dataset: column 'completion_ids' is missing"
    with pytest.raises(UserError, match=re.escape(says)):
        check_files([no_ids])
    with pytest.raises(UserError, match=re.escape(says)):
        read_dataset(no_ids)
    empty = tmp_path / "empty.parquet"  # no rows: no column is missed
    pq.write_table(pa.table({"prompt": pa.array([], pa.string())}), empty)
    write_dataset(tmp_path / "d.parquet", _rows())
    assert check_files([tmp_path / "d.parquet", empty]) == 3  # the rows, from the footers
