"""`distillab export`: plain Parquet read back by `datasets` equals what read_dataset decodes; the OpenAI chat
JSONL matches the rows; bad input is one line."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from distillab.cli import run_cli
from distillab.config import to_toml
from distillab.dataset import TOPK_PREFIX, read_dataset, write_dataset
from distillab.errors import UserError
from distillab.export import BATCH_ROWS, export_run
from distillab.provenance import provenance_row
from distillab.rundir import RunDir
from tests.helpers import run_config, write_config

VOCAB = 90  # lab:base's vocabulary, the student of the runs here: every top-k id has a string


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
            row["top_ids"] = [rng.sample(range(VOCAB), k) for _ in range(length)]
            row["top_logprobs"] = [
                sorted((-rng.expovariate(0.5) for _ in range(k)), reverse=True) for _ in range(length)
            ]
        rows.append(row)
    return rows


def _with_config(run: Path) -> Path:
    """The run.toml every command leaves in a run directory (the student the plain export's tokenizer comes from)."""
    cfg = run_config(run.parent, run.name, train={"student": "lab:base"})
    run.mkdir(parents=True, exist_ok=True)
    RunDir(run).config.write_text(to_toml(cfg))
    return run


@pytest.fixture
def run_dir(tmp_path):
    run = tmp_path / "runs" / "r"
    write_dataset(RunDir(run).dataset("train"), _rows(12))
    return _with_config(run)


def _by_rank(row: dict) -> dict:
    """read_dataset's row (each position's top-k by ascending id) as the export orders it: highest log-prob first,
    ties by the lower id (Python's sort is stable), without the export's top_tokens."""
    if row["top_ids"] is None:
        return row
    ranked = [sorted(zip(ids, lps), key=lambda pair: -pair[1]) for ids, lps in zip(row["top_ids"], row["top_logprobs"])]
    return row | {
        "top_ids": [[i for i, _ in pos] for pos in ranked],
        "top_logprobs": [[lp for _, lp in pos] for pos in ranked],
    }


def test_plain_parquet_through_datasets_equals_read_dataset(run_dir, tmp_path):
    import datasets

    path, tokenizer_dir = export_run(run_dir, "plain", tmp_path / "out")
    assert path == tmp_path / "out" / "train.parquet" and tokenizer_dir == tmp_path / "out" / "tokenizer"
    schema = pq.read_schema(path)
    assert schema.field("top_ids").type == pa.list_(pa.list_(pa.int32()))
    assert schema.field("top_logprobs").type == pa.list_(pa.list_(pa.float32()))
    assert schema.field("top_tokens").type == pa.list_(pa.list_(pa.string()))
    assert schema.field("top_tail").type == pa.list_(pa.float32())
    assert not any(name.startswith(TOPK_PREFIX) for name in schema.names)  # no codec bytes left

    loaded = datasets.load_dataset("parquet", data_files=str(path), split="train", cache_dir=str(tmp_path / "hf_cache"))
    expected = read_dataset(RunDir(run_dir).dataset("train"))
    assert len(loaded) == len(expected) == 12
    for got, want in zip(loaded, expected):
        assert got.keys() == want.keys() | {"top_tokens"}  # text, ids, provenance and skill columns all kept
        want = _by_rank(want)
        for column in want:
            # exact equality, floats included: float32 in, float32 out, nothing re-quantised
            assert got[column] == want[column], column
    assert sum(r["top_ids"] is None for r in expected) == 4  # rows without top-k stay null, not empty lists


def test_plain_top_k_is_the_teachers_to_the_codecs_precision(run_dir, tmp_path):
    """Against the rows as written (not read_dataset): the export is the teacher's top-k, not just self-consistent."""
    path, _ = export_run(run_dir, "plain", tmp_path / "out")
    exported = pq.read_table(path).to_pylist()
    for row, original in zip(exported, _rows(12)):
        if "top_ids" not in original:
            assert row["top_ids"] is row["top_logprobs"] is row["top_tokens"] is row["top_tail"] is None
            continue
        for ids, lps, ids0, lps0 in zip(
            row["top_ids"], row["top_logprobs"], original["top_ids"], original["top_logprobs"]
        ):
            assert sorted(ids) == sorted(ids0)  # the teacher's top-k, every id of it
            assert lps == sorted(lps, reverse=True)  # ranked: the most likely first
            want = dict(zip(ids0, lps0))
            assert max(abs(lp - want[i]) for i, lp in zip(ids, lps)) <= 1 / 32 + 1e-6  # topk_codec's bound
        assert all(t <= 0 for t in row["top_tail"]) and len(row["top_tail"]) == len(row["top_ids"])


def test_plain_top_k_reads_without_distillab(run_dir, tmp_path):
    """What a reader with only datasets and transformers needs: top_ids[t][0] is the argmax of the position's
    log-probs, top_tokens are those ids' strings, and the tokenizer beside the files loads offline and agrees."""
    import datasets
    from transformers import AutoTokenizer

    path, tokenizer_dir = export_run(run_dir, "plain", tmp_path / "out")
    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir), local_files_only=True)
    assert len(tok) == VOCAB
    loaded = datasets.load_dataset("parquet", data_files=str(path), split="train", cache_dir=str(tmp_path / "hf"))
    positions = 0
    for row in loaded:
        if row["top_ids"] is None:
            assert row["top_tokens"] is None
            continue
        for ids, lps, tokens in zip(row["top_ids"], row["top_logprobs"], row["top_tokens"]):
            assert lps[0] == max(lps) and ids[0] == ids[lps.index(max(lps))]  # the first is the teacher's top-1
            assert tokens == tok.convert_ids_to_tokens(ids) and tok.convert_tokens_to_ids(tokens) == ids
            assert None not in tokens
            positions += 1
    assert positions == sum(len(r["top_ids"]) for r in _rows(12) if "top_ids" in r) > 0


def test_plain_export_needs_the_runs_config_for_its_tokenizer(run_dir, tmp_path):
    """A run directory without run.toml (copied without it): a one-line error naming the file, nothing written;
    the config given instead works."""
    RunDir(run_dir).config.unlink()
    with pytest.raises(UserError, match=r"run\.toml: not found.*student's tokenizer"):
        export_run(run_dir, "plain", tmp_path / "out")
    assert not (tmp_path / "out").exists()
    config = write_config(tmp_path, body='[train]\nstudent = "lab:base"', name="r")
    path, tokenizer_dir = export_run(config, "plain")
    assert path.parent == tokenizer_dir.parent == RunDir(run_dir).export("plain")
    assert (tokenizer_dir / "tokenizer.json").is_file()


def test_plain_streams_in_batches_and_keeps_the_replay_set_apart(tmp_path):
    run = _with_config(tmp_path / "run")
    n = BATCH_ROWS + 5  # over one batch: rows from both batches must land, in order
    write_dataset(RunDir(run).dataset("train"), _rows(n, k=2))
    write_dataset(RunDir(run).dataset("replay"), _rows(3, with_topk=lambda i: False))  # replay without top-k
    train, replay, tokenizer = export_run(run, "plain")
    plain = RunDir(run).export("plain")
    assert (train, replay, tokenizer) == (plain / "train.parquet", plain / "replay.parquet", plain / "tokenizer")
    assert pq.read_table(train, columns=["prompt"])["prompt"].to_pylist() == [f"q{i}\n" for i in range(n)]
    table = pq.read_table(replay)
    assert table.num_rows == 3 and table["top_ids"].null_count == 3
    assert table.schema.field("top_ids").type == pa.list_(pa.list_(pa.int32()))  # typed even when all null
    assert sorted(p.name for p in train.parent.iterdir()) == ["replay.parquet", "tokenizer", "train.parquet"]  # no temp


def test_a_sharded_dataset_exports_as_one_file_a_shard_at_a_time(tmp_path, monkeypatch):
    """data/train/part-*.parquet as `generate --shard I/N` leaves it (no merged file): one export file, rows in
    shard order, column types unified across shards (one shard without any top-k, one without the skill column)."""
    from distillab import export

    monkeypatch.setattr(export, "BATCH_ROWS", 5)  # batches never cross a shard: 12 rows = 5 + 5 + 2
    run = _with_config(tmp_path / "runs" / "r")
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

    plain, _ = export_run(run, "plain", tmp_path / "plain")
    assert plain.name == "train.parquet"
    expected = read_dataset(RunDir(run).dataset("train"))  # the shard set
    got = pq.read_table(plain).to_pylist()
    assert len(got) == len(expected) == 30
    for g, w in zip(got, expected):
        g.pop("top_tokens")
        assert g == {name: _by_rank(w).get(name) for name in g}  # a shard's missing column is null in the export
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


@pytest.mark.parametrize("fmt", ["plain", "openai-chat"])
def test_a_parquet_file_that_is_not_a_distillab_dataset_is_one_line_and_writes_nothing(run_dir, capsys, fmt):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"text": ["a", "b"]}), RunDir(run_dir).dataset("train"))  # some other tool's Parquet
    before = sorted(p for p in run_dir.rglob("*"))
    assert run_cli(["export", str(run_dir), "--format", fmt]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "is not a distillab dataset" in err and "train.parquet" in err
    assert sorted(p for p in run_dir.rglob("*")) == before


def test_export_run_raises_user_errors(run_dir):
    with pytest.raises(UserError, match="unknown export format"):
        export_run(run_dir, "csv")
    RunDir(run_dir).dataset("train").write_bytes(b"not parquet")
    with pytest.raises(UserError, match="not a readable Parquet file"):
        export_run(run_dir, "plain")


def test_a_lab_runs_plain_export_ranks_the_teachers_greedy_token_first(tmp_path, capsys):
    """A real run (the lab teacher, greedy, 8 prompts) through the CLI: at every completion position the teacher's
    chosen token is top_ids[t][0] (or ties it at the codec's precision), and its string is top_tokens[t][0]."""
    from transformers import AutoTokenizer

    config = write_config(
        tmp_path,
        '[teacher]\nmodel = "lab:teacher"\ntop_k_logprobs = 5\nmax_new_tokens = 8\n'
        '[data]\nskills = ["add"]\nn_prompts = 8\n[train]\nstudent = "lab:base"\n',
        name="lab",
    )
    assert run_cli(["generate", str(config)]) == 0
    assert run_cli(["export", str(config)]) == 0
    plain = RunDir(tmp_path / "runs" / "lab").export("plain")
    assert capsys.readouterr().out.split()[-2:] == [str(plain / "train.parquet"), str(plain / "tokenizer")]
    tok = AutoTokenizer.from_pretrained(str(plain / "tokenizer"), local_files_only=True)
    rows = pq.read_table(plain / "train.parquet").to_pylist()
    positions = 0
    for row in rows:
        for chosen, ids, lps, tokens in zip(
            row["completion_ids"], row["top_ids"], row["top_logprobs"], row["top_tokens"]
        ):
            assert chosen in [i for i, lp in zip(ids, lps) if lp == lps[0]]  # greedy: the first rank, ties aside
            assert tokens[0] == tok.convert_ids_to_tokens(ids[0])
            positions += 1
    assert len(rows) == 8 and positions == sum(len(r["completion_ids"]) for r in rows) > 8  # every token checked
