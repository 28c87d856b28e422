"""The teacher request cache: SQLite in WAL mode, keyed by a hash of the canonical request.

A response is committed (one transaction per response) before generate counts it as done, so a crash
loses at most the requests in flight, and a rerun never pays for a cached request again. Requests that
failed after all retries go to `failures` with their error: counted and reported, retried on a rerun.

Storage of a response (`responses.response`): a blob (`encode_response`) holding the small fields as JSON,
the completion token ids as int32 and the teacher's top-k through `topk_codec` (the same bytes the dataset
stores), zstd-compressed with the cache's own dictionary. Compressed one at a time, small responses would
cost 2-4x what the dataset pays per token (Parquet compresses a column over thousands of rows: the constant
JSON keys, the near-constant id planes); a dictionary trained on the cache's first DICT_TRAIN_ROWS responses
and requests gives each one that shared context. The dictionary is stored in the cache (`dictionaries`), the
responses stored before it are re-encoded with it in the same transaction, and each blob names the dictionary
it needs. The canonical request (`responses.request`) is kept the same way. Caches made by this version key
rows by the 32 hash bytes (`PRAGMA user_version` = 2), not 64 hex characters (stored twice: table and index).

Older caches still read and grow: hex keys, JSON text (written before the codec, and responses whose top-k the
codec cannot hold, e.g. token strings) and blobs compressed without a dictionary ("DLR1").
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
  key BLOB PRIMARY KEY,           -- the request_key's 32 bytes (TEXT, its hex, in caches of user_version 0)
  request BLOB NOT NULL,          -- canonical request JSON, no secrets (RequestCache._pack_request)
  response BLOB NOT NULL,         -- encode_response (or, in older caches, a DLR1 blob or response JSON)
  prompt_tokens INTEGER NOT NULL,
  completion_tokens INTEGER NOT NULL,
  latency_s REAL NOT NULL,
  attempts INTEGER NOT NULL,
  created_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS failures (
  key TEXT PRIMARY KEY,           -- hex: few rows, kept readable
  request TEXT NOT NULL,
  error TEXT NOT NULL,
  attempts INTEGER NOT NULL,
  failed_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS dictionaries (
  id INTEGER PRIMARY KEY,         -- named by every blob compressed with it (0: none)
  data BLOB NOT NULL,             -- a zstd dictionary trained on this cache's first responses and requests
  created_at REAL NOT NULL
);
"""
LAYOUT = 2  # PRAGMA user_version of caches this version creates: binary keys
DICT_TRAIN_ROWS = 256  # responses stored before a dictionary is trained on them
DICT_BYTES = 16 * 1024  # measured: 4-64 KiB dictionaries give the same sizes within 3%
ZSTD_LEVEL = 9  # small blobs: a higher level costs little time, saves ~10%


def request_key(request: dict) -> str:
    """Hash of the canonical request: every field counts (endpoint, model, sampling, prompt); order does not."""
    canonical = json.dumps(request, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(canonical.encode()).hexdigest()


BLOB_MAGIC = b"DLR2"  # a blob: magic, the dictionary's id (u32, 0 = none), one zstd frame (its size inside)
OLD_BLOB_MAGIC = b"DLR1"  # before dictionaries: magic, raw length (u32), zstd frame


class Dictionary:
    """A zstd dictionary and its id in the cache (id 0, no data: plain zstd). Not thread-safe, like the
    connection that reads it."""

    def __init__(self, id: int = 0, data: bytes | None = None):
        import zstandard as zstd

        self.id = id
        shared = zstd.ZstdCompressionDict(data) if data else None
        self._compressor = zstd.ZstdCompressor(level=ZSTD_LEVEL, dict_data=shared, write_checksum=False,
                                               write_dict_id=False)  # our id is in the blob's header
        self._decompressor = zstd.ZstdDecompressor(dict_data=shared)

    def pack(self, raw: bytes) -> bytes:
        return BLOB_MAGIC + struct.pack("<I", self.id) + self._compressor.compress(raw)

    def unpack(self, blob: bytes) -> bytes:
        return self._decompressor.decompress(blob[8:])


NO_DICTIONARY = Dictionary()


def is_blob(value) -> bool:
    return isinstance(value, bytes) and value[:4] in (BLOB_MAGIC, OLD_BLOB_MAGIC)


def unpack(blob: bytes, dictionary=lambda id: NO_DICTIONARY) -> bytes:
    """A blob's raw bytes; dictionary(id) gives the Dictionary a DLR2 blob names."""
    if blob[:4] == OLD_BLOB_MAGIC:
        (size,) = struct.unpack_from("<I", blob, 4)
        return _old_zstd().decompress(blob[8:], max_output_size=size)
    (id,) = struct.unpack_from("<I", blob, 4)
    return dictionary(id).unpack(blob)


@functools.cache
def _old_zstd():
    import zstandard as zstd

    return zstd.ZstdDecompressor()


def response_raw(response: dict) -> bytes:
    """A teacher response -> u32-length-prefixed parts: the JSON of every field but token_ids/top_ids/top_logprobs,
    token_ids as int32, then the six topk_codec arrays (none when the response has no top-k). Raises ValueError
    when the top-k is not codec-shaped."""

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
    return b"".join(struct.pack("<I", len(p)) + p for p in parts)


def encode_response(response: dict, dictionary: Dictionary = NO_DICTIONARY) -> bytes:
    """A teacher response -> a blob of response_raw's bytes, compressed with `dictionary`."""
    return dictionary.pack(response_raw(response))


def decode_response(blob: bytes, raw_topk: bool = False, dictionary=lambda id: NO_DICTIONARY) -> dict:
    """encode_response's bytes (or a DLR1 blob) -> the response dict. top-k decoded to top_ids/top_logprobs lists
    (sorted by id per position, log-probs to 1/32 nat), or with raw_topk the codec's {field: bytes} under "topk"
    (None if none). dictionary(id): the Dictionary the blob names (RequestCache.dictionary)."""
    from distillab.topk_codec import FIELDS, decode_topk

    raw = unpack(blob, dictionary)
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


def _unpack_text(value, dictionary) -> str:
    """A stored request: JSON text, or (once the cache has a dictionary) a blob of it."""
    return unpack(value, dictionary).decode() if is_blob(value) else value


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
            # A new file only (an existing one keeps its own): rows of 0.5-4 KB (answers of 10-100 tokens) fill
            # 8 KiB pages better than 4 KiB ones; measured: 7% smaller at 35-token answers, 2% larger at 3.
            self.db.execute("PRAGMA page_size = 8192")
            self.db.execute("PRAGMA journal_mode=WAL")
            self.db.execute("PRAGMA synchronous=NORMAL")  # WAL + NORMAL: durable against a process kill
            self.layout = self._create()
            row = self.db.execute("SELECT id, data FROM dictionaries ORDER BY id DESC LIMIT 1").fetchone()
            self._until_training = 0 if row else DICT_TRAIN_ROWS - self.db.execute(
                "SELECT COUNT(*) FROM responses").fetchone()[0]
        except sqlite3.DatabaseError as err:
            raise _corrupt(path, err) from None
        self._dictionaries = {0: NO_DICTIONARY}
        self.writer = self._dictionaries.setdefault(row[0], Dictionary(*row)) if row else NO_DICTIONARY
        # keys: the hash's bytes, or its hex in caches from before LAYOUT 2
        self._key = bytes.fromhex if self.layout >= LAYOUT else str

    def _create(self) -> int:
        """The tables (a new file gets LAYOUT; an older cache keeps its own, plus the dictionaries table);
        returns the layout. One transaction: two processes opening one new file agree."""
        self.db.execute("BEGIN IMMEDIATE")
        try:
            fresh = self.db.execute("SELECT 1 FROM sqlite_master WHERE name = 'responses'").fetchone() is None
            for statement in filter(str.strip, SCHEMA.split(";")):
                self.db.execute(statement)
            if fresh:
                self.db.execute(f"PRAGMA user_version = {LAYOUT}")
            layout = self.db.execute("PRAGMA user_version").fetchone()[0]
            self.db.execute("COMMIT")
        except BaseException:
            self.db.execute("ROLLBACK")
            raise
        return layout

    def dictionary(self, id: int) -> Dictionary:
        """The stored dictionary `id` (read once)."""
        if id not in self._dictionaries:
            row = self.db.execute("SELECT data FROM dictionaries WHERE id = ?", (id,)).fetchone()
            if row is None:
                raise sqlite3.DatabaseError(f"a response needs zstd dictionary {id}, which is missing")
            self._dictionaries[id] = Dictionary(id, row[0])
        return self._dictionaries[id]

    def _train_dictionary(self) -> None:
        """Train the cache's dictionary on its latest DICT_TRAIN_ROWS responses and requests and re-encode them
        with it, in one transaction (a crash leaves them as they were). Another process may have trained one
        first: then that one is used."""
        import zstandard as zstd

        self.db.execute("BEGIN IMMEDIATE")
        try:
            row = self.db.execute("SELECT id, data FROM dictionaries ORDER BY id DESC LIMIT 1").fetchone()
            if row:
                self.writer = self._dictionaries.setdefault(row[0], Dictionary(*row))
                self.db.execute("COMMIT")
                return
            rows = self.db.execute("SELECT rowid, request, response FROM responses ORDER BY rowid DESC LIMIT ?",
                                   (DICT_TRAIN_ROWS,)).fetchall()
            raws = [(rowid, _unpack_text(request, self.dictionary).encode(),
                     unpack(response, self.dictionary) if is_blob(response) else None)
                    for rowid, request, response in rows]
            # a few MB of samples at most: long responses are cut (training time grows with the samples)
            cut = max(4096, (4 << 20) // (2 * len(raws) or 1))
            samples = [raw[:cut] for _, request, response in raws for raw in (request, response) if raw]
            try:
                data = zstd.train_dictionary(DICT_BYTES, samples, level=ZSTD_LEVEL).as_bytes()
            except zstd.ZstdError:  # too little to learn from (tiny responses): try again as many rows later
                self._until_training = DICT_TRAIN_ROWS
                self.db.execute("COMMIT")
                return
            id = self.db.execute("INSERT INTO dictionaries (data, created_at) VALUES (?, ?)",
                                 (data, time.time())).lastrowid
            self.writer = self._dictionaries[id] = Dictionary(id, data)
            for rowid, request, response in raws:
                self.db.execute("UPDATE responses SET request = ?, response = COALESCE(?, response) WHERE rowid = ?",
                                (self.writer.pack(request), response and self.writer.pack(response), rowid))
            self.db.execute("COMMIT")
        except BaseException:
            self.db.execute("ROLLBACK")
            raise
        # The shrunk rows left their pages part-empty (~15% of a small cache); VACUUM is cheap while it is small.
        self.db.execute("PRAGMA busy_timeout = 100")  # not the 30 s a commit waits: it is worth no stall
        try:
            self.db.execute("VACUUM")
        except sqlite3.OperationalError:  # another connection holds the database: left as it is
            pass
        finally:
            self.db.execute("PRAGMA busy_timeout = 30000")

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
        row = self.db.execute("SELECT response FROM responses WHERE key = ?", (self._key(key),)).fetchone()
        if not row:
            return None
        if is_blob(row[0]):
            return decode_response(row[0], raw_topk, self.dictionary)
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
            found |= {r[0] for r in self.db.execute(f"SELECT key FROM responses WHERE key IN ({marks})",
                                                    [self._key(k) for k in chunk])}
        return {k.hex() if isinstance(k, bytes) else k for k in found}

    @_guarded
    def request(self, key: str) -> dict | None:
        """The canonical request stored with a cached response, or None."""
        row = self.db.execute("SELECT request FROM responses WHERE key = ?", (self._key(key),)).fetchone()
        return json.loads(_unpack_text(row[0], self.dictionary)) if row else None

    @_guarded
    def put(self, key: str, request: dict, response: dict, latency_s: float = 0.0, attempts: int = 1) -> None:
        with self.db:  # one committed transaction per response
            self.db.execute(
                "INSERT OR IGNORE INTO responses VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (self._key(key), self._pack_request(request), self._stored(response),
                 int(response.get("prompt_tokens", 0)), int(response.get("completion_tokens", 0)),
                 float(latency_s), int(attempts), time.time()),
            )
            self.db.execute("DELETE FROM failures WHERE key = ?", (key,))
        if self.writer.id == 0:
            self._until_training -= 1
            if self._until_training <= 0:
                self._train_dictionary()

    def _pack_request(self, request: dict) -> bytes | str:
        text = json.dumps(request, sort_keys=True)
        return self.writer.pack(text.encode()) if self.writer.id else text  # JSON text until there is a dictionary

    def _stored(self, response: dict) -> bytes | str:
        try:
            return encode_response(response, self.writer)
        except (ValueError, TypeError):  # ragged or out-of-range top-k: kept as it came, in JSON
            return json.dumps(response)

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
                f"COALESCE(SUM(latency_s),0) FROM responses WHERE key IN ({marks})",
                [self._key(k) for k in chunk]).fetchone()
            totals["requests"] += n
            totals["prompt_tokens"] += p
            totals["completion_tokens"] += c
            totals["latency_s"] += lat
        return totals
