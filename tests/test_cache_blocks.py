"""The request cache packs committed responses into blocks: every response reads back exactly as it was committed,
before and after packing and after reopening; a kill -9 at any point of a repack loses nothing; older layouts read."""

from __future__ import annotations

import os
import random
import signal
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from distillab import cache as cache_module
from distillab.cache import RequestCache, request_key

ROOT = Path(__file__).resolve().parents[1]


def make_response(i: int) -> tuple[dict, dict]:
    """(request, response) number i, deterministic: codec-shaped top-k of 1-40 tokens over a 32k vocab, some with
    the teacher's tail, some without top-k or token ids, and every 7th one with token strings only (stored as JSON)."""
    rng = random.Random(i)
    n = rng.randint(1, 40)
    request = {"endpoint": "http://x/v1", "model": "teacher", "temperature": 0.0, "prompt": f"describe thing {i}"}
    response = {"text": " ".join(rng.choice(["alpha", "beta", "gamma", "δέλτα"]) for _ in range(n)),
                "finish_reason": rng.choice(["stop", "length"]), "prompt_tokens": rng.randint(3, 30),
                "completion_tokens": n, "token_ids": [rng.randrange(32000) for _ in range(n)]}
    if i % 7 == 3:  # an endpoint that gives token strings, not ids: not codec-shaped
        response["top_tokens"] = [["a", "b"]] * n
        response["top_logprobs"] = [[-0.1, -2.5]] * n
        response["token_ids"] = None
    elif i % 5 != 4:
        response["top_ids"] = [rng.sample(range(32000), 20) for _ in range(n)]
        response["top_logprobs"] = [sorted((-rng.random() * 8 for _ in range(20)), reverse=True) for _ in range(n)]
        if i % 3 == 0:
            response["top_tail"] = [-rng.random() * 3 - 3 for _ in range(n)]
    return request, response


def read_all(cache: RequestCache, n: int, start: int = 0) -> list:
    keys = [request_key(make_response(i)[0]) for i in range(start, n)]
    return [(cache.get(k), cache.get(k, raw_topk=True), cache.request(k)) for k in keys]


def put_all(cache: RequestCache, n: int, start: int = 0) -> None:
    for i in range(start, n):
        request, response = make_response(i)
        cache.put(request_key(request), request, response, latency_s=0.25 + i / 1000, attempts=1 + i % 2)


def count(path: Path, table: str) -> int:
    db = sqlite3.connect(path)
    try:
        return db.execute(f"SELECT COUNT(*) FROM {table}").fetchone()[0]
    finally:
        db.close()


def test_every_response_reads_back_the_same_before_and_after_packing(tmp_path, monkeypatch):
    monkeypatch.setattr(cache_module, "PACK_ROWS", 32)
    monkeypatch.setattr(cache_module, "BLOCKS_KEPT", 2)  # reads in any order go back to evicted blocks too
    path = tmp_path / "teacher.sqlite"
    cache = RequestCache(path)
    before = []
    for i in range(100):  # each read right after its commit, while it is still a loose row
        put_all(cache, i + 1, start=i)
        before += read_all(cache, i + 1, start=i)
    assert before[3][0]["top_tokens"] == [["a", "b"]] * len(before[3][0]["top_tokens"])  # the JSON-stored kind
    assert before[0][0]["top_ids"] and before[4][0]["top_ids"] is None and before[3][1]["topk"] is None
    assert cache.db.execute("SELECT COUNT(*) FROM loose").fetchone()[0] == 100 - 96  # three blocks of 32
    assert read_all(cache, 100) == before
    shuffled = list(range(100))
    random.Random(0).shuffle(shuffled)
    keys = [request_key(make_response(i)[0]) for i in range(100)]
    assert [cache.get(keys[i]) for i in shuffled] == [before[i][0] for i in shuffled]
    usage = cache.usage(keys)
    assert usage["requests"] == 100 and cache.cached_keys(keys) == set(keys)
    assert usage["completion_tokens"] == sum(make_response(i)[1]["completion_tokens"] for i in range(100))
    assert usage["latency_s"] == pytest.approx(sum(0.25 + i / 1000 for i in range(100)), abs=0.05)
    cache.put(keys[0], *make_response(0))  # asked again (another process): still one row
    cache.close()  # packs the loose rest
    assert count(path, "loose") == 0 and count(path, "packed") == count(path, "responses") == 100
    assert count(path, "blocks") == 4
    db = sqlite3.connect(path)
    assert db.execute("SELECT SUM(attempts) FROM responses").fetchone()[0] == 150  # what other code sums still adds up
    db.close()
    cache = RequestCache(path)
    assert read_all(cache, 100) == before
    cache.close()


KILLED_CHILD = """
import sys, time
from pathlib import Path
from distillab import cache as cache_module
from tests.test_cache_blocks import put_all
cache_module.PACK_ROWS = 40
cache = cache_module.RequestCache(Path(sys.argv[1]))
armed = []
def stop_at(statement):  # SQLite's own trace of each statement as it starts: stop inside the repack
    armed.append(statement.startswith("BEGIN IMMEDIATE") or bool(armed and armed[-1]))
    if armed[-1] and statement.startswith(sys.argv[2]):
        print("inside", flush=True)
        time.sleep(120)
cache.db.set_trace_callback(stop_at)
put_all(cache, 40)
print("not stopped", flush=True)
"""


@pytest.mark.parametrize("at", ["INSERT INTO blocks", "INSERT INTO packed", "DELETE FROM loose", "COMMIT"])
def test_a_kill_at_any_point_of_a_repack_loses_nothing(tmp_path, at):
    """A child commits 40 responses; the 40th starts a repack; SIGKILL there, before its COMMIT is written (the
    sleep is in SQLite's trace hook, at the start of that statement). Reopened: all 40 read back exactly."""
    path = tmp_path / "teacher.sqlite"
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{ROOT / 'src'}"}
    child = subprocess.Popen([sys.executable, "-c", KILLED_CHILD, str(path), at], cwd=ROOT, env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = child.stdout.readline()
        assert line == "inside\n", (line, child.stderr.read())
        assert (path.parent / "teacher.sqlite-wal").exists()  # the write-ahead log (the kill leaves it to recover)
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=30)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
    assert count(path, "loose") == 40 and count(path, "packed") == 0 and count(path, "blocks") == 0
    cache = RequestCache(path)
    got = read_all(cache, 40)
    assert [g[2] for g in got] == [make_response(i)[0] for i in range(40)]
    assert [(g[0]["text"], g[0]["token_ids"]) for g in got] == \
           [(r["text"], r["token_ids"]) for _, r in map(make_response, range(40))]
    cache.close()  # the repack done this time
    assert count(path, "loose") == 0 and count(path, "packed") == 40
    cache = RequestCache(path)
    assert read_all(cache, 40) == got
    cache.close()


def test_a_cache_of_layout_2_still_reads_and_grows_unpacked(tmp_path, monkeypatch):
    """LAYOUT 2 (one row a response, binary keys, a trained dictionary): read and extended as it is."""
    monkeypatch.setattr(cache_module, "DICT_TRAIN_ROWS", 16)
    path = tmp_path / "teacher.sqlite"
    db = sqlite3.connect(path)
    db.executescript(cache_module.SCHEMA + "PRAGMA user_version = 2;")
    db.close()
    cache = RequestCache(path)
    put_all(cache, 30)
    assert cache.layout == 2 and cache.writer.id == 1
    got = read_all(cache, 30)
    cache.close()
    cache = RequestCache(path)
    assert read_all(cache, 30) == got
    put_all(cache, 40, start=30)
    assert read_all(cache, 40)[:30] == got
    cache.close()
    assert count(path, "responses") == 40
    db = sqlite3.connect(path)
    names = {r[0] for r in db.execute("SELECT name FROM sqlite_master")}
    key_types = {type(k) for k, in db.execute("SELECT key FROM responses")}
    db.close()
    assert "loose" not in names and "packed" not in names
    assert key_types == {bytes}  # its binary keys, as layout 2 writes them
