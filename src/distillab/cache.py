"""The teacher request cache: SQLite in WAL mode, keyed by a hash of the canonical request.

A response is committed (one transaction per response) before generate counts it as done, so a crash
loses at most the requests in flight, and a rerun never pays for a cached request again. Requests that
failed after all retries go to `failures` with their error: counted and reported, retried on a rerun.
"""

from __future__ import annotations

import functools
import hashlib
import json
import sqlite3
import time
from pathlib import Path

from distillab.errors import UserError

SCHEMA = """
CREATE TABLE IF NOT EXISTS responses (
  key TEXT PRIMARY KEY,
  request TEXT NOT NULL,          -- canonical request JSON (no secrets: keys never enter a request)
  response TEXT NOT NULL,         -- response JSON: text, token ids, top-k, finish_reason
  prompt_tokens INTEGER NOT NULL,
  completion_tokens INTEGER NOT NULL,
  latency_s REAL NOT NULL,
  attempts INTEGER NOT NULL,
  created_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS failures (
  key TEXT PRIMARY KEY,
  request TEXT NOT NULL,
  error TEXT NOT NULL,
  attempts INTEGER NOT NULL,
  failed_at REAL NOT NULL
);
"""


def request_key(request: dict) -> str:
    """Hash of the canonical request: every field counts (endpoint, model, sampling, prompt); order does not."""
    canonical = json.dumps(request, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(canonical.encode()).hexdigest()


def _corrupt(path: Path, err: sqlite3.Error) -> UserError:
    return UserError(f"{path}: unusable teacher cache ({err}): move it away and rerun "
                     "(its cached answers are then asked again)")


def _guarded(method):
    """A corrupt page can surface on any query, not only at open: each becomes a one-line error naming the file."""
    @functools.wraps(method)
    def wrapper(self, *args, **kwargs):
        try:
            return method(self, *args, **kwargs)
        except sqlite3.DatabaseError as err:
            raise _corrupt(self.path, err) from None
    return wrapper


class RequestCache:
    def __init__(self, path: Path):
        self.path = path
        if path.exists() and not path.is_file():
            raise UserError(f"{path} is not a file: move it away so the teacher cache can be created there")
        if path.is_file():
            # Checked before opening: SQLite would turn another program's database into a cache by adding tables.
            self._check_existing(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            self.db = sqlite3.connect(str(path), timeout=30, isolation_level=None)
            self.db.execute("PRAGMA journal_mode=WAL")
            self.db.execute("PRAGMA synchronous=NORMAL")  # WAL + NORMAL: durable against a process kill
            self.db.executescript(SCHEMA)
        except sqlite3.DatabaseError as err:
            raise _corrupt(path, err) from None

    @staticmethod
    def _check_existing(path: Path) -> None:
        if path.stat().st_size == 0:  # an empty file is an empty database: a cache is made in it
            return
        try:
            db = sqlite3.connect(path.resolve().as_uri() + "?mode=ro", uri=True)
            try:
                tables = {r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
            finally:
                db.close()
        except sqlite3.DatabaseError as err:
            raise _corrupt(path, err) from None
        if tables and "responses" not in tables:
            raise UserError(f"{path} is a SQLite database of another program (tables: {', '.join(sorted(tables))}), "
                            "not a teacher cache: move it away and rerun")

    def close(self) -> None:
        self.db.close()

    @_guarded
    def get(self, key: str) -> dict | None:
        row = self.db.execute("SELECT response FROM responses WHERE key = ?", (key,)).fetchone()
        return json.loads(row[0]) if row else None

    @_guarded
    def cached_keys(self, keys: list[str]) -> set[str]:
        found: set[str] = set()
        for start in range(0, len(keys), 500):  # SQLite caps the number of bound parameters
            chunk = keys[start : start + 500]
            marks = ",".join("?" * len(chunk))
            found |= {r[0] for r in self.db.execute(f"SELECT key FROM responses WHERE key IN ({marks})", chunk)}
        return found

    @_guarded
    def put(self, key: str, request: dict, response: dict, latency_s: float = 0.0, attempts: int = 1) -> None:
        with self.db:  # one committed transaction per response
            self.db.execute(
                "INSERT OR IGNORE INTO responses VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (key, json.dumps(request, sort_keys=True), json.dumps(response),
                 int(response.get("prompt_tokens", 0)), int(response.get("completion_tokens", 0)),
                 float(latency_s), int(attempts), time.time()),
            )
            self.db.execute("DELETE FROM failures WHERE key = ?", (key,))

    @_guarded
    def put_failure(self, key: str, request: dict, error: str, attempts: int) -> None:
        with self.db:
            self.db.execute(
                "INSERT OR REPLACE INTO failures VALUES (?, ?, ?, ?, ?)",
                (key, json.dumps(request, sort_keys=True), error[:500], int(attempts), time.time()),
            )

    @_guarded
    def failures(self, keys: list[str] | None = None) -> list[dict]:
        rows = self.db.execute("SELECT key, error, attempts FROM failures").fetchall()
        wanted = set(keys) if keys is not None else None
        return [{"key": k, "error": e, "attempts": a} for k, e, a in rows if wanted is None or k in wanted]

    @_guarded
    def usage(self, keys: list[str]) -> dict:
        """Token totals over the given keys (the requests of one dataset)."""
        totals = {"requests": 0, "prompt_tokens": 0, "completion_tokens": 0, "latency_s": 0.0}
        for start in range(0, len(keys), 500):
            chunk = keys[start : start + 500]
            marks = ",".join("?" * len(chunk))
            n, p, c, lat = self.db.execute(
                f"SELECT COUNT(*), COALESCE(SUM(prompt_tokens),0), COALESCE(SUM(completion_tokens),0), "
                f"COALESCE(SUM(latency_s),0) FROM responses WHERE key IN ({marks})", chunk).fetchone()
            totals["requests"] += n
            totals["prompt_tokens"] += p
            totals["completion_tokens"] += c
            totals["latency_s"] += lat
        return totals
