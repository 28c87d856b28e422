"""`distillab export`: plain Parquet read back by `datasets` equals what read_dataset decodes; the OpenAI chat
JSONL matches the rows; bad input is one line."""

from __future__ import annotations

import json
import random

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from distillab.cli import run_cli
from distillab.dataset import TOPK_PREFIX, read_dataset, write_dataset
from distillab.errors import UserError
from distillab.export import BATCH_ROWS, export_run
from distillab.provenance import provenance_row
from distillab.rundir import RunDir
from tests.helpers import write_config


def _rows(n: int, k: int = 4, seed: int = 0, with_topk=lambda i: i % 3 != 2, system=None) -> list[dict]:
    """n rows as generate writes them: text, token ids, top-k for most (not every third), provenance."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        length = rng.randint(1, 6)
        row = {
            "prompt": f"q{i}\n",
            "completion": f"a{i}é",
            "prompt_ids": [rng.randrange(50) for _ in range(3)],
            "completion_ids": [rng.randrange(50) for _ in range(length)],
            "skill": "reverse",
            **provenance_row("teacher", teacher_id="lab:teacher", request_hash=f"h{i}"),
        }
        if system is not None:
            row["system"] = system(i)
        if with_topk(i):
            row["top_ids"] = [rng.sample(range(300), k) for _ in range(length)]
            row["top_logprobs"] = [
                sorted((-rng.expovariate(0.5) for _ in range(k)), reverse=True) for _ in range(length)
            ]
        rows.append(row)
    return rows


@pytest.fixture
def run_dir(tmp_path):
    run = tmp_path / "runs" / "r"
    write_dataset(RunDir(run).dataset("train"), _rows(12))
    return run


def test_plain_parquet_through_datasets_equals_read_dataset(run_dir, tmp_path):
    import datasets

    (path,) = export_run(run_dir, "plain", tmp_path / "out")
    assert path == tmp_path / "out" / "train.parquet"
    schema = pq.read_schema(path)
    assert schema.field("top_ids").type == pa.list_(pa.list_(pa.int32()))
    assert schema.field("top_logprobs").type == pa.list_(pa.list_(pa.float32()))
    assert schema.field("top_tail").type == pa.list_(pa.float32())
    assert not any(name.startswith(TOPK_PREFIX) for name in schema.names)  # no codec bytes left

    loaded = datasets.load_dataset("parquet", data_files=str(path), split="train", cache_dir=str(tmp_path / "hf_cache"))
    expected = read_dataset(RunDir(run_dir).dataset("train"))
    assert len(loaded) == len(expected) == 12
    for got, want in zip(loaded, expected):
        assert got.keys() == want.keys()  # text, ids, provenance and skill columns all kept
        for column in want:
            # exact equality, floats included: float32 in, float32 out, nothing re-quantised
            assert got[column] == want[column], column
    assert sum(r["top_ids"] is None for r in expected) == 4  # rows without top-k stay null, not empty lists


def test_plain_top_k_is_the_teachers_to_the_codecs_precision(run_dir, tmp_path):
    """Against the rows as written (not read_dataset): the export is the teacher's top-k, not just self-consistent."""
    (path,) = export_run(run_dir, "plain", tmp_path / "out")
    exported = pq.read_table(path).to_pylist()
    for row, original in zip(exported, _rows(12)):
        if "top_ids" not in original:
            assert row["top_ids"] is row["top_logprobs"] is row["top_tail"] is None
            continue
        for ids, lps, ids0, lps0 in zip(
            row["top_ids"], row["top_logprobs"], original["top_ids"], original["top_logprobs"]
        ):
            assert ids == sorted(ids0)  # the codec stores each position's ids ascending
            want = dict(zip(ids0, lps0))
            assert max(abs(lp - want[i]) for i, lp in zip(ids, lps)) <= 1 / 32 + 1e-6  # topk_codec's bound
        assert all(t <= 0 for t in row["top_tail"]) and len(row["top_tail"]) == len(row["top_ids"])


def test_plain_streams_in_batches_and_keeps_the_replay_set_apart(tmp_path):
    run = tmp_path / "run"
    n = BATCH_ROWS + 5  # over one batch: rows from both batches must land, in order
    write_dataset(RunDir(run).dataset("train"), _rows(n, k=2))
    write_dataset(RunDir(run).dataset("replay"), _rows(3, with_topk=lambda i: False))  # replay without top-k
    train, replay = export_run(run, "plain")
    plain = RunDir(run).export("plain")
    assert (train, replay) == (plain / "train.parquet", plain / "replay.parquet")
    assert pq.read_table(train, columns=["prompt"])["prompt"].to_pylist() == [f"q{i}\n" for i in range(n)]
    table = pq.read_table(replay)
    assert table.num_rows == 3 and table["top_ids"].null_count == 3
    assert table.schema.field("top_ids").type == pa.list_(pa.list_(pa.int32()))  # typed even when all null
    assert sorted(p.name for p in train.parent.iterdir()) == ["replay.parquet", "train.parquet"]  # no temp left


def test_a_sharded_dataset_exports_as_one_file_a_shard_at_a_time(tmp_path, monkeypatch):
    """data/train/part-*.parquet as `generate --shard I/N` leaves it (no merged file): one export file, rows in
    shard order, column types unified across shards (one shard without any top-k, one without the skill column)."""
    from distillab import export

    monkeypatch.setattr(export, "BATCH_ROWS", 5)  # batches never cross a shard: 12 rows = 5 + 5 + 2
    run = tmp_path / "runs" / "r"
    rows = _rows(30)
    shards = RunDir(run).data / "train"  # the shards of data/train.parquet
    write_dataset(shards / "part-00000-of-00002-000000-aaaa.parquet", rows[:12])
    write_dataset(
        shards / "part-00000-of-00002-000001-bbbb.parquet",
        [{k: v for k, v in r.items() if not k.startswith("top_")} for r in rows[12:20]],
    )
    write_dataset(
        shards / "part-00001-of-00002-000000-cccc.parquet",
        [{k: v for k, v in r.items() if k != "skill"} for r in rows[20:]],
    )
    assert not RunDir(run).dataset("train").exists()

    (plain,) = export_run(run, "plain", tmp_path / "plain")
    assert plain.name == "train.parquet"
    expected = read_dataset(RunDir(run).dataset("train"))  # the shard set
    got = pq.read_table(plain).to_pylist()
    assert len(got) == len(expected) == 30
    for g, w in zip(got, expected):
        assert g == {name: w.get(name) for name in g}  # a shard's missing column is null in the export
    assert [g["skill"] for g in got] == ["reverse"] * 20 + [None] * 10
    assert sum(g["top_ids"] is not None for g in got[12:20]) == 0 and got[0]["top_ids"] is not None

    (jsonl,) = export_run(run, "openai-chat", tmp_path / "chat")
    lines = [json.loads(line) for line in jsonl.read_text().splitlines()]
    assert [m["messages"][-1]["content"] for m in lines] == [r["completion"] for r in rows]


def test_openai_chat_jsonl_matches_the_rows(tmp_path):
    run = tmp_path / "run"
    rows = _rows(5, system=lambda i: "You are terse." if i % 2 == 0 else None)
    write_dataset(RunDir(run).dataset("train"), rows)
    (path,) = export_run(run, "openai-chat")
    lines = path.read_text(encoding="utf-8").splitlines()
    assert path.name == "train.jsonl" and len(lines) == 5
    for line, row in zip(lines, rows):
        messages = json.loads(line)["messages"]
        expected = ([{"role": "system", "content": row["system"]}] if row["system"] else []) + [
            {"role": "user", "content": row["prompt"]},
            {"role": "assistant", "content": row["completion"]},
        ]
        assert messages == expected
    assert "é" in lines[0]  # UTF-8 as is, not \u escapes: what the fine-tuning upload expects either way


def test_openai_chat_uses_a_rows_earlier_turns(tmp_path):
    run = tmp_path / "run"
    turns = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "hello"},
        {"role": "user", "content": "2+2="},
    ]
    write_dataset(
        RunDir(run).dataset("train"), [{"prompt": "2+2=", "completion": "4", "messages": turns, "completion_ids": [1]}]
    )
    (path,) = export_run(run, "openai-chat")
    assert json.loads(path.read_text())["messages"] == turns + [{"role": "assistant", "content": "4"}]


def test_export_from_the_config_and_through_the_cli(run_dir, tmp_path, capsys):
    config = write_config(tmp_path, name="r")  # the run of the run_dir fixture
    assert run_cli(["export", str(config), "--format", "openai-chat"]) == 0
    assert capsys.readouterr().out.strip() == str(RunDir(run_dir).export("openai-chat") / "train.jsonl")
    assert len((RunDir(run_dir).export("openai-chat") / "train.jsonl").read_text().splitlines()) == 12


@pytest.mark.parametrize("case", ["no dataset", "unknown format", "out is a file", "no such run"])
def test_bad_input_is_one_line_and_writes_nothing(run_dir, tmp_path, capsys, case):
    args = {
        "no dataset": [str(tmp_path / "runs")],  # a directory, but not a run
        "unknown format": [str(run_dir), "--format", "jsonl"],
        "out is a file": [str(run_dir), "--out", str(tmp_path / "blocker" / "sub")],
        "no such run": [str(tmp_path / "missing")],
    }[case]
    (tmp_path / "blocker").write_text("a file where a directory would go")
    before = sorted(p for p in tmp_path.rglob("*"))
    assert run_cli(["export", *args]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    assert {
        "no dataset": "run `distillab generate` first",
        "unknown format": "plain, openai-chat",
        "out is a file": "is a file",
        "no such run": "no such run directory",
    }[case] in err
    assert sorted(p for p in tmp_path.rglob("*")) == before


def test_export_run_raises_user_errors(run_dir):
    with pytest.raises(UserError, match="unknown export format"):
        export_run(run_dir, "csv")
    RunDir(run_dir).dataset("train").write_bytes(b"not parquet")
    with pytest.raises(UserError, match="not a readable Parquet file"):
        export_run(run_dir, "plain")
