"""The generate stage at scale: shards over many endpoints and machines, an endpoint lost mid-run, kill -9 at random
moments and resume (nothing lost, nothing asked twice), the cache's size, several samples a prompt, caches written
before the codec."""

from __future__ import annotations

import json
import signal
import sqlite3
import subprocess
import sys
import threading
import time

import pytest
from benchmarks.bench_kill_resume import kill_and_resume

from distillab import cache as cache_module
from distillab import generate
from distillab.cache import RequestCache, request_key
from distillab.config import to_toml
from distillab.dataset import dataset_files, read_dataset
from distillab.errors import UserError
from distillab.generate import run_generate
from distillab.prompts import load_prompts
from distillab.teachers import make_teacher
from distillab.testing import metric_sum, server_popen, server_process, server_thread
from distillab.testing import read_metrics as metrics
from distillab.testing import subprocess_env as child_env
from tests.helpers import generate_config

quiet = {"log": lambda *a: None}


@pytest.fixture(scope="module")
def two_servers(tiny_teacher):
    with server_thread(tiny_teacher, model_name="teacher") as a, server_thread(tiny_teacher, model_name="teacher") as b:
        yield a, b


@pytest.fixture
def small_chunks(monkeypatch):
    monkeypatch.setattr(generate, "CHUNK_ROWS", 7)  # several shards from a few dozen prompts


def _rows(cfg):
    return read_dataset(cfg.run_dir / "data" / "train.parquet")


def test_two_shard_processes_over_two_endpoints_make_the_rows_one_process_makes(
    tmp_path, tiny_teacher, two_servers, small_chunks
):
    urls = [s.base_url for s in two_servers]
    teacher = {"model": "teacher", "base_url": urls, "concurrency": 2, "max_new_tokens": 4, "top_k_logprobs": 3}
    one = generate_config(tmp_path / "one", teacher, student=tiny_teacher, n_prompts=40)
    whole = run_generate(one, **quiet)
    assert set(whole.endpoints) == set(urls) and all(e["answered"] > 0 for e in whole.endpoints.values())
    assert sum(e["answered"] for e in whole.endpoints.values()) == whole.requests_sent == 40

    # Two "machines": each its own shard, side by side, into one shared run directory, the endpoints listed
    # in another order (the keys must not care).
    shared = generate_config(
        tmp_path / "shared", teacher | {"base_url": urls[::-1]}, student=tiny_teacher, n_prompts=40
    )
    errors = []

    def shard(i):
        try:
            run_generate(shared, shard=(i, 2), **quiet)
        except Exception as err:  # pragma: no cover - reported below
            errors.append(err)

    threads = [threading.Thread(target=shard, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    files = dataset_files(shared.run_dir / "data" / "train.parquet")
    assert {f.name.split("-")[1] for f in files} == {"00000", "00001"}  # both shards wrote parts
    assert not (shared.run_dir / "data" / "train.parquet").exists()  # a merge is just reading all shards

    a, b = _rows(one), _rows(shared)
    keys_a, keys_b = [r["request_hash"] for r in a], [r["request_hash"] for r in b]
    assert len(set(keys_b)) == len(keys_b) == 40  # no duplicates, none missing
    assert sorted(keys_a) == sorted(keys_b)
    by_key = {r["request_hash"]: r for r in a}
    for r in b:  # the same rows (greedy: the same answers), whichever endpoint answered
        assert (r["prompt"], r["completion_ids"], r["top_ids"]) == (
            by_key[r["request_hash"]]["prompt"],
            by_key[r["request_hash"]]["completion_ids"],
            by_key[r["request_hash"]]["top_ids"],
        )
    combined = json.loads((shared.run_dir / "data" / "generate_summary.json").read_text())
    assert combined["rows"] == 40 and combined["of"] == 2 and sum(combined["shards"].values()) == 40
    assert sum(e["answered"] for e in combined["endpoints"].values()) == 40

    # A rerun of a shard sends nothing (its shards and cache hold everything); a different split is refused.
    again = run_generate(shared, shard=(0, 2), **quiet)
    assert again.requests_sent == 0 and again.rows == combined["shards"]["00000-of-00002"]
    with pytest.raises(UserError, match="2-way split"):
        run_generate(shared, shard=(0, 3), **quiet)


def test_killing_one_endpoint_mid_run_loses_nothing(tmp_path, tiny_teacher, small_chunks):
    with (
        server_thread(tiny_teacher, model_name="teacher") as doomed,
        server_thread(tiny_teacher, model_name="teacher") as survivor,
    ):
        teacher = {
            "model": "teacher",
            "base_url": [doomed.base_url, survivor.base_url],
            "concurrency": 2,
            "max_new_tokens": 4,
            "top_k_logprobs": 3,
            "max_retries": 2,
        }
        cfg = generate_config(tmp_path, teacher, student=tiny_teacher, n_prompts=48)

        def progress(done, total, budget):
            if done == 8:
                doomed.server.should_exit = True  # uvicorn stops listening: its next requests are refused

        summary = run_generate(cfg, progress=progress, **quiet)
    assert summary.failed == 0 and summary.rows == 48
    rows = _rows(cfg)
    assert len({r["request_hash"] for r in rows}) == 48
    lost, kept = summary.endpoints[doomed.base_url], summary.endpoints[survivor.base_url]
    assert lost["answered"] < 24 < kept["answered"]  # the survivor took the rest
    assert lost["answered"] + kept["answered"] == 48


@pytest.mark.slow
@pytest.mark.parametrize("chunk_rows", [2048, 7], ids=["one-shard", "many-shards"])
def test_kill_nine_and_resume_answers_every_prompt_exactly_once(tmp_path, tiny_teacher, chunk_rows, monkeypatch):
    monkeypatch.setattr(generate, "CHUNK_ROWS", chunk_rows)  # the forked children inherit it
    with server_process(tiny_teacher, "--max-batch", "8") as base_url:
        teacher = {"model": "teacher", "base_url": base_url, "concurrency": 4, "max_new_tokens": 4, "top_k_logprobs": 3}
        cfg = generate_config(tmp_path, teacher, student=tiny_teacher, n_prompts=60)
        outcome = kill_and_resume(cfg, kills=5, seed=1)
        served = metrics(base_url)

    assert len(outcome["kills"]) == 5
    assert any(after > before for before, after in outcome["kills"])  # killed mid-run, with progress made
    rows = read_dataset(cfg.run_dir / "data" / "train.parquet")
    teacher_ = make_teacher(cfg.teacher)
    keys = [request_key(teacher_.request(p["prompt"])) for p in load_prompts(cfg)]
    assert [r["request_hash"] for r in rows] == keys  # every prompt has its row, in order, once
    # the server's model answered each distinct request exactly once; re-sent ones were replayed. An answer whose
    # requester was killed after its batch began is kept for the retry: computed once, delivered (200) once, later.
    assert served["distillab_answers_total"] == len(set(keys))
    ok = metric_sum({k: v for k, v in served.items() if 'code="200"' in k}, "distillab_requests_total")
    assert len(set(keys)) <= ok <= served["distillab_answers_total"] + served["distillab_idempotent_replays_total"]


@pytest.mark.slow
def test_two_shard_processes_over_two_serve_processes_one_killed_mid_run(tmp_path, tiny_teacher):
    """The acceptance check as a user runs it: two `distillab serve` processes, two `distillab generate --shard I/2`
    processes listing both; one server is SIGKILLed mid-run. Both shards finish over the other server, and their
    rows are exactly the rows one process makes (same keys, no duplicates, none missing)."""
    with (
        server_popen(tiny_teacher, "--max-batch", "4") as (doomed_url, doomed),
        server_popen(tiny_teacher, "--max-batch", "4") as (survivor_url, _),
    ):
        teacher = {
            "model": "teacher",
            "base_url": [doomed_url, survivor_url],
            "concurrency": 2,
            "max_new_tokens": 6,
            "top_k_logprobs": 3,
            "max_retries": 2,
        }
        shared = generate_config(tmp_path / "shared", teacher, student=tiny_teacher, n_prompts=150)
        config = tmp_path / "shared.toml"
        config.write_text(to_toml(shared))
        procs = [
            subprocess.Popen(
                [sys.executable, "-m", "distillab", "generate", str(config), "--shard", f"{i}/2"],
                env=child_env(),
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
                text=True,
            )
            for i in range(2)
        ]

        def answered(url):  # prompts the server's model answered
            return metric_sum(metrics(url), "distillab_answers_total")

        try:
            deadline = time.time() + 120
            while answered(doomed_url) + answered(survivor_url) < 20:
                assert time.time() < deadline and all(p.poll() is None for p in procs), "the shards never got going"
                time.sleep(0.02)
            doomed.send_signal(signal.SIGKILL)
            survivor_at_kill = answered(survivor_url)
            errors = [p.communicate(timeout=300)[1] for p in procs]
        finally:
            for p in procs:
                if p.poll() is None:
                    p.kill()
        assert [p.returncode for p in procs] == [0, 0], errors
        # one process, afterwards, on the survivor alone (a list of one: keyed without the URL, like the shards)
        one = generate_config(
            tmp_path / "one", teacher | {"base_url": [survivor_url]}, student=tiny_teacher, n_prompts=150
        )
        assert run_generate(one, **quiet).rows == 150

    assert not (shared.run_dir / "data" / "train.parquet").exists()  # the shard set is the dataset
    a, b = _rows(one), _rows(shared)
    keys_b = [r["request_hash"] for r in b]
    assert len(keys_b) == len(set(keys_b)) == 150 and sorted(keys_b) == sorted(r["request_hash"] for r in a)
    by_key = {r["request_hash"]: r for r in a}
    assert all(r["completion_ids"] == by_key[r["request_hash"]]["completion_ids"] for r in b)
    summary = json.loads((shared.run_dir / "data" / "generate_summary.json").read_text())
    assert summary["rows"] == 150 and summary["failed"] == 0 and summary["of"] == 2
    lost, kept = summary["endpoints"][doomed_url], summary["endpoints"][survivor_url]
    assert lost["answered"] + kept["answered"] == 150
    assert survivor_at_kill < kept["answered"]  # killed mid-run: the survivor answered the rest after the kill
    assert lost["answered"] < 75


def test_cache_bytes_per_completion_token_against_the_dataset(tmp_path, tiny_teacher, two_servers, monkeypatch):
    """The cache holds the top-k through the codec, its responses packed into blocks of PACK_ROWS (and the rest when
    it is closed): the whole file, every page of it, is within 1.2x of the dataset file, and far below its old JSON.
    By answer length and at scale: benchmarks/bench_data_scale.py --part cache (BENCHMARKS.md G4)."""
    monkeypatch.setattr(cache_module, "PACK_ROWS", 64)  # two blocks of 64 while generating, the rest at close
    teacher = {
        "model": "teacher",
        "base_url": two_servers[0].base_url,
        "concurrency": 4,
        "max_new_tokens": 48,
        "top_k_logprobs": 20,
    }
    cfg = generate_config(tmp_path, teacher, student=tiny_teacher, n_prompts=200)
    run_generate(cfg, **quiet)
    data = cfg.run_dir / "data" / "train.parquet"
    rows = read_dataset(data)
    tokens = sum(len(r["completion_ids"]) for r in rows)
    assert len(rows) == 200 and tokens > 200 * 30, tokens
    path = cfg.run_dir / "teacher.sqlite"
    assert not path.with_name("teacher.sqlite-wal").exists()  # closed: the file is all of it
    size = path.stat().st_size
    cache = RequestCache(path)
    try:
        assert cache.db.execute("SELECT COUNT(*) FROM loose").fetchone()[0] == 0
        assert cache.db.execute("SELECT COUNT(*) FROM blocks").fetchone()[0] >= 3
        as_json = sum(len(json.dumps(cache.get(r["request_hash"]))) for r in rows)
        for r in rows:
            got = cache.get(r["request_hash"])
            assert got["token_ids"] == r["completion_ids"] and got["text"] == r["completion"]
        assert cache.request(rows[0]["request_hash"])["prompt"] == rows[0]["prompt"]
    finally:
        cache.close()
    assert size <= 1.2 * data.stat().st_size, (
        f"cache {size / tokens:.1f} B/token vs dataset file {data.stat().st_size / tokens:.1f}"
    )
    assert size * 8 < as_json  # the old JSON rows were over 8x larger


def test_samples_per_prompt_are_distinct_cached_requests(tmp_path, tiny_teacher, two_servers):
    teacher = {
        "model": "teacher",
        "base_url": two_servers[0].base_url,
        "max_new_tokens": 6,
        "top_k_logprobs": 2,
        "temperature": 1.0,
        "samples_per_prompt": 3,
    }
    cfg = generate_config(tmp_path, teacher, student=tiny_teacher, n_prompts=6)
    first = run_generate(cfg, **quiet)
    rows = _rows(cfg)
    assert first.requests_sent == 18 and len(rows) == 18
    assert len({r["request_hash"] for r in rows}) == 18
    assert sorted(r["sample"] for r in rows) == sorted([0, 1, 2] * 6)
    assert len({(r["prompt"], r["completion"]) for r in rows}) > 6  # sampled: not one answer three times
    (cfg.run_dir / "stages.json").unlink()  # not fresh: everything must come from the cache
    assert run_generate(cfg, **quiet).requests_sent == 0
    with pytest.raises(Exception, match="temperature"):
        generate_config(tmp_path, teacher | {"temperature": 0.0}, student=tiny_teacher)


@pytest.mark.parametrize("old", ["json", "DLR1"])
def test_a_cache_of_an_earlier_layout_is_converted_and_grows(tmp_path, tiny_teacher, two_servers, old):
    """Caches of an earlier layout: hex TEXT keys, responses as JSON or as zstd blobs without a dictionary (DLR1).
    Converted on open (cache.RequestCache), their answers are reused and new ones are added."""
    import struct

    import pyarrow as pa

    teacher = {"model": "teacher", "base_url": two_servers[0].base_url, "max_new_tokens": 4, "top_k_logprobs": 3}
    cfg = generate_config(tmp_path, teacher, student=tiny_teacher, n_prompts=5)
    run_generate(cfg, **quiet)
    expected = _rows(cfg)
    path = cfg.run_dir / "teacher.sqlite"
    cache = RequestCache(path)
    kept = [(r["request_hash"], cache.request(r["request_hash"]), cache.get(r["request_hash"])) for r in expected]
    cache.close()
    path.unlink()
    db = sqlite3.connect(path)  # the layout before binary keys, as it was created then
    db.executescript(OLD_SCHEMA)
    for key, request, resp in kept:
        stored = json.dumps(resp)
        if old == "DLR1":
            raw = cache_module.response_raw(resp)
            stored = b"DLR1" + struct.pack("<I", len(raw)) + pa.Codec("zstd").compress(raw, asbytes=True)
        db.execute("INSERT INTO responses VALUES (?, ?, ?, 1, 4, 0.1, 1, 0)", (key, json.dumps(request), stored))
    db.commit()
    db.close()
    (cfg.run_dir / "stages.json").unlink()
    (cfg.run_dir / "data" / "train.parquet").unlink()
    again = run_generate(cfg, **quiet)
    assert again.requests_sent == 0
    got = _rows(cfg)
    for a, b in zip(expected, got):  # the same codes (JSON: re-encoded from its decoded values)
        assert (a["request_hash"], a["completion_ids"], a["top_ids"], a["top_logprobs"]) == (
            b["request_hash"],
            b["completion_ids"],
            b["top_ids"],
            b["top_logprobs"],
        )

    more = generate_config(tmp_path, teacher, student=tiny_teacher, n_prompts=8)  # 3 new prompts, same cache
    assert run_generate(more, **quiet).requests_sent == 3
    db = sqlite3.connect(path)
    keys = [k for (k,) in db.execute("SELECT key FROM responses")]
    assert db.execute("PRAGMA user_version").fetchone()[0] == cache_module.LAYOUT and len(keys) == 8
    assert all(isinstance(k, bytes) and len(k) == 32 for k in keys)  # converted to binary keys
    db.close()


OLD_SCHEMA = """
CREATE TABLE responses (key TEXT PRIMARY KEY, request TEXT NOT NULL, response TEXT NOT NULL,
  prompt_tokens INTEGER NOT NULL, completion_tokens INTEGER NOT NULL, latency_s REAL NOT NULL,
  attempts INTEGER NOT NULL, created_at REAL NOT NULL);
CREATE TABLE failures (key TEXT PRIMARY KEY, request TEXT NOT NULL, error TEXT NOT NULL, attempts INTEGER NOT NULL,
  failed_at REAL NOT NULL);
"""
