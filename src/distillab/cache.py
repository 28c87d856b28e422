"""The teacher request cache: SQLite in WAL mode, keyed by a hash of the canonical request.

A response is committed (one transaction per response) before generate counts it as done, so a crash
loses at most the requests in flight, and a rerun never pays for a cached request again. Requests that
failed after all retries go to `failures` with their error: counted and reported, retried on a rerun.

Storage of a response (`responses.response`): a zstd-compressed blob (`encode_response`) holding the small
fields as JSON, the completion token ids as int32 and the teacher's top-k through `topk_codec` (the same
bytes the dataset stores), so the cache costs about what the dataset does per token; JSON text (caches
written before the codec, and responses whose top-k the codec cannot hold, e.g. token strings) still reads.
`get(key, raw_topk=True)` hands the codec bytes over without decoding: generate writes them to the
dataset as they are, no decode/re-encode and no extra rounding.
"""

from __future__ import annotations

import functools
import hashlib
import json
import sqlite3
import struct
import time
from pathlib import Path

import numpy as np

from distillab.errors import UserError

SCHEMA = """
CREATE TABLE IF NOT EXISTS responses (
  key TEXT PRIMARY KEY,
  request TEXT NOT NULL,          -- canonical request JSON (no secrets: keys never enter a request)
  response TEXT NOT NULL,         -- a BLOB from encode_response (or, in older caches, response JSON)
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


BLOB_MAGIC = b"DLR1"  # version 1 of encode_response's layout


def encode_response(response: dict) -> bytes:
    """A teacher response -> BLOB_MAGIC + raw length (u32) + zstd(raw); raw = u32-length-prefixed parts:
    the JSON of every field but token_ids/top_ids/top_logprobs, token_ids as int32, then the six topk_codec
    arrays (empty when the response has no top-k). Raises ValueError when the top-k is not codec-shaped."""

    from distillab.topk_codec import FIELDS, encode_topk

    ids, lps = response.get("top_ids"), response.get("top_logprobs")
    if lps is not None and not ids:
        raise ValueError("log-probs of token strings (no ids): not codec-shaped")
    meta = {k: v for k, v in response.items()
            if k not in ("token_ids", "top_ids", "top_logprobs", "top_tail") and v is not None}
    meta["has_token_ids"] = response.get("token_ids") is not None
    meta["has_topk"] = bool(ids)
    parts = [json.dumps(meta, separators=(",", ":")).encode(),
             np.asarray(response.get("token_ids") or [], dtype="<i4").tobytes()]
    if ids:
        encoded = encode_topk(ids, lps, tail_logprob=response.get("top_tail"))  # the teacher's own tail when it gave one
        parts += [encoded[f].tobytes() for f in FIELDS]
    raw = b"".join(struct.pack("<I", len(p)) + p for p in parts)
    return BLOB_MAGIC + struct.pack("<I", len(raw)) + _zstd().compress(raw, asbytes=True)


@functools.cache
def _zstd():
    import pyarrow as pa

    return pa.Codec("zstd", compression_level=9)  # small blobs: a higher level costs little time, saves ~10%


def decode_response(blob: bytes, raw_topk: bool = False) -> dict:
    """encode_response's bytes -> the response dict. top-k decoded to top_ids/top_logprobs lists (sorted by id
    per position, log-probs to 1/32 nat), or with raw_topk the codec's {field: bytes} under "topk" (None if none)."""
    import pyarrow as pa

    from distillab.topk_codec import FIELDS, decode_topk

    (size,) = struct.unpack_from("<I", blob, 4)
    raw = pa.decompress(blob[8:], decompressed_size=size, codec="zstd", asbytes=True)
    parts, at = [], 0
    while at < len(raw):
        (n,) = struct.unpack_from("<I", raw, at)
        parts.append(raw[at + 4 : at + 4 + n])
        at += 4 + n
    resp = {"top_tokens": None, "tokens": None} | json.loads(parts[0])  # None fields are not stored
    has_ids, has_topk = resp.pop("has_token_ids"), resp.pop("has_topk")
    resp["token_ids"] = np.frombuffer(parts[1], dtype="<i4").tolist() if has_ids else None
    fields = dict(zip(FIELDS, parts[2:])) if has_topk else None
    if raw_topk:
        resp["topk"] = fields
        resp["top_ids"] = resp["top_logprobs"] = None
    elif fields:
        ids, lps, _ = decode_topk(fields)
        resp["top_ids"], resp["top_logprobs"] = ids.tolist(), lps.tolist()
    else:
        resp["top_ids"] = resp["top_logprobs"] = None
    return resp


def _stored(response: dict) -> bytes | str:
    try:
        return encode_response(response)
    except (ValueError, TypeError):  # ragged or out-of-range top-k: kept as it came, in JSON
        return json.dumps(response)


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
    def get(self, key: str, raw_topk: bool = False) -> dict | None:
        """The cached response, or None. raw_topk: the top-k as the codec's bytes under "topk" (see decode_response);
        a JSON-stored response then carries "topk": None and its top_ids/top_logprobs as lists."""
        row = self.db.execute("SELECT response FROM responses WHERE key = ?", (key,)).fetchone()
        if not row:
            return None
        if isinstance(row[0], bytes) and row[0][:4] == BLOB_MAGIC:
            return decode_response(row[0], raw_topk)
        resp = json.loads(row[0])  # a cache from before the codec, or a top-k the codec cannot hold
        if raw_topk:
            resp["topk"] = None
        return resp

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
                (key, json.dumps(request, sort_keys=True), _stored(response),
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
