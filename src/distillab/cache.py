"""The teacher request cache: SQLite in WAL mode, keyed by a hash of the canonical request.

A response is committed (one transaction per response) before generate counts it as done, so a crash
loses at most the requests in flight, and a rerun never pays for a cached request again. Requests that
failed after all retries go to `failures` with their error: counted and reported, retried on a rerun.

Storage (LAYOUT): a response is committed alone as a `loose` row: its canonical request (JSON), its blob
(`encode_response`: the small fields as JSON, the completion token ids as int32, the teacher's top-k as the
`topk_codec` bytes the dataset stores; zstd) and its counts. Compressed one at a time, short responses cost 1.4-2.4x
what the dataset pays per token (Parquet compresses each column over thousands of rows; a lone response pays its own
frame, its key twice and a row's overhead), so once PACK_ROWS loose rows exist (and when the cache is closed) they are
repacked, in ONE transaction, into a `blocks` row: one zstd frame over their fields laid out column by column
(requests together, the texts together, each codec plane together, the token ids as byte planes; `pack_block`), and
each key goes to `packed` (key -> block, position, counts), a WITHOUT ROWID table, so the key is stored once. A kill
before or during the repack leaves the loose rows as they are (the transaction rolls back); the repack runs again
later. Freed pages go back (auto_vacuum = FULL). A read of a packed key decompresses its block; the last few decoded
blocks are kept, so reading a chunk's keys in order costs one decompression a block. `responses` is a view over loose
+ packed rows (key and counts).

A cache of an earlier layout (PRAGMA user_version below 3: one `responses` row a response) is converted on
open, in one transaction, into blocks (EarlierLayout, RequestCache._convert): a kill during the conversion leaves the
file as it is, and the next open converts it. A cache of layout 3 gets layout 4's reasoning_tokens columns (a reasoning
trace's share of completion_tokens, summed by usage() for the ledger; 0 for every response it already holds), in
place, in one transaction: its blocks are not touched. The trace's text itself is a response field like the others
(in the meta JSON part, absent when there is none), so a response without one reads back exactly as before. Layout 5
adds the billing columns (BILLING_COLUMNS: prompt tokens the endpoint's prompt cache served, and whether the Batch API
answered) to loose and packed, by ALTER TABLE in every cache, a new one too (SCHEMA is layout 4's), in the open's
transaction: 0 for every response an earlier cache holds. `billing(keys)` sums them for the ledger's prices.
`get(key, raw_topk=True)` hands the codec bytes over without decoding: generate writes them to the
dataset as they are, no decode/re-encode and no extra rounding.
"""

from __future__ import annotations

import collections
import contextlib
import functools
import hashlib
import json
import sqlite3
import struct
import threading
import time
from pathlib import Path

import numpy as np

from distillab.errors import UserError
from distillab.files import cannot_write

# Loose rows, blocks of packed ones, and `responses` as a view of both (key and counts, so a COUNT(*) or SUM(...) over
# it counts every cached response, packed or not).
SCHEMA = """
CREATE TABLE loose (
  key BLOB PRIMARY KEY,           -- the request_key's 32 bytes
  request TEXT NOT NULL,          -- canonical request JSON, no secrets
  response BLOB NOT NULL,         -- encode_response, or the response JSON (a top-k the codec cannot hold)
  prompt_tokens INTEGER NOT NULL,
  completion_tokens INTEGER NOT NULL,
  latency_s REAL NOT NULL,
  attempts INTEGER NOT NULL,
  created_at REAL NOT NULL,
  reasoning_tokens INTEGER NOT NULL DEFAULT 0  -- of completion_tokens, a reasoning trace's (layout 4)
);
CREATE TABLE blocks (
  id INTEGER PRIMARY KEY,
  data BLOB NOT NULL,             -- pack_block: one zstd frame over its rows, column by column
  rows INTEGER NOT NULL,
  first_at REAL NOT NULL,         -- the created_at of its first and last rows (not kept a row)
  last_at REAL NOT NULL
);
CREATE TABLE packed (
  key BLOB PRIMARY KEY,
  block INTEGER NOT NULL,
  pos INTEGER NOT NULL,           -- the row's index in its block
  prompt_tokens INTEGER NOT NULL,
  completion_tokens INTEGER NOT NULL,
  latency_ms INTEGER NOT NULL,    -- 1-3 bytes, not a REAL's 8
  attempts INTEGER NOT NULL,
  reasoning_tokens INTEGER NOT NULL DEFAULT 0
) WITHOUT ROWID;
CREATE TABLE failures (
  key TEXT PRIMARY KEY,           -- hex: few rows, kept readable
  request TEXT NOT NULL,
  error TEXT NOT NULL,
  attempts INTEGER NOT NULL,
  failed_at REAL NOT NULL
) WITHOUT ROWID;
CREATE VIEW responses AS
  SELECT key, prompt_tokens, completion_tokens, latency_s, attempts, reasoning_tokens FROM loose
  UNION ALL SELECT key, prompt_tokens, completion_tokens, latency_ms / 1000.0, attempts, reasoning_tokens FROM packed;
"""
LAYOUT = 5  # PRAGMA user_version of the layout above + BILLING_COLUMNS; a cache with a lower one is converted on open
# Layout 3 is layout 4 without the reasoning_tokens columns: it gets them in place (REASONING_UPGRADE), its blocks
# as they are.
REASONING_UPGRADE = SCHEMA[SCHEMA.index("CREATE VIEW") :]
# Layout 5's columns of loose and packed, added in place (billing(): what is not billed at the plain rates)
BILLING_COLUMNS = (
    "cached_tokens",  # of prompt_tokens, those the endpoint's prompt cache served (the cached-input rate)
    "batch",  # 1: answered through the Batch API (the batch rate)
)
# billing()'s sums: cached prompt tokens, and the Batch API's requests and their tokens
BILLING_KEYS = (
    "cached_tokens",
    "batch_requests",
    "batch_prompt_tokens",
    "batch_cached_tokens",
    "batch_completion_tokens",
)
LOOSE_COLUMNS = (
    "key, request, response, prompt_tokens, completion_tokens, latency_s, attempts, created_at, "
    "reasoning_tokens, cached_tokens, batch"
)  # named: a cache upgraded in place has them in this order too
PACK_ROWS = 512  # loose rows that trigger a repack into one block
BLOCKS_KEPT = 4  # decoded blocks kept for reads
ZSTD_LEVEL = 9  # small blobs: a higher level costs little time, saves ~10%


def request_key(request: dict) -> str:
    """Hash of the canonical request: every field counts (endpoint, model, sampling, prompt); order does not."""
    canonical = json.dumps(request, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(canonical.encode()).hexdigest()


BLOB_MAGIC = b"DLR2"  # a blob: magic, a dictionary id (u32, 0: none), one zstd frame (its size inside)
BLOB_HEADER = BLOB_MAGIC + struct.pack("<I", 0)


def is_blob(value) -> bool:
    return isinstance(value, bytes) and value[:4] == BLOB_MAGIC


def unpack(blob: bytes) -> bytes:
    """A blob's raw bytes."""
    return _zstd_decompressor().decompress(blob[len(BLOB_HEADER) :])


# One compressor and decompressor per thread: zstandard's objects are not thread-safe, and shard runs in threads of
# one process read each other's caches (a shared decompressor fails with "Destination buffer is too small").
_PER_THREAD = threading.local()


def _zstd_compressor():
    if not hasattr(_PER_THREAD, "compressor"):
        import zstandard as zstd

        _PER_THREAD.compressor = zstd.ZstdCompressor(level=ZSTD_LEVEL, write_checksum=False, write_dict_id=False)
    return _PER_THREAD.compressor


def _zstd_decompressor():
    if not hasattr(_PER_THREAD, "decompressor"):
        import zstandard as zstd

        _PER_THREAD.decompressor = zstd.ZstdDecompressor()
    return _PER_THREAD.decompressor


def response_raw(response: dict) -> bytes:
    """A teacher response -> u32-length-prefixed parts: the JSON of every field but token_ids/top_ids/top_logprobs,
    token_ids as int32, then the six topk_codec arrays (none when the response has no top-k). Raises ValueError
    when the top-k is not codec-shaped."""

    from distillab.topk_codec import FIELDS, encode_topk

    ids, lps = response.get("top_ids"), response.get("top_logprobs")
    if lps is not None and not ids:
        raise ValueError("log-probs of token strings (no ids): not codec-shaped")
    meta = {
        k: v
        for k, v in response.items()
        if k not in ("token_ids", "top_ids", "top_logprobs", "top_tail") and v is not None
    }
    meta["has_token_ids"] = response.get("token_ids") is not None
    meta["has_topk"] = bool(ids)
    parts = [
        json.dumps(meta, separators=(",", ":")).encode(),
        np.asarray(response.get("token_ids") or [], dtype="<i4").tobytes(),
    ]
    if ids:
        encoded = encode_topk(
            ids, lps, tail_logprob=response.get("top_tail")
        )  # the teacher's own tail when it gave one
        parts += [encoded[f].tobytes() for f in FIELDS]
    return b"".join(struct.pack("<I", len(p)) + p for p in parts)


def encode_response(response: dict) -> bytes:
    """A teacher response -> a blob of response_raw's bytes."""
    return BLOB_HEADER + _zstd_compressor().compress(response_raw(response))


def decode_response(blob: bytes, raw_topk: bool = False) -> dict:
    """encode_response's bytes -> the response dict. top-k decoded to top_ids/top_logprobs lists (sorted by id per
    position, log-probs to 1/32 nat), or with raw_topk the codec's {field: bytes} under "topk" (None if none)."""
    return _response(_split(unpack(blob)), raw_topk)


def _split(raw: bytes) -> list[bytes]:
    """response_raw's bytes -> its parts."""
    parts, at = [], 0
    while at < len(raw):
        (n,) = struct.unpack_from("<I", raw, at)
        parts.append(raw[at + 4 : at + 4 + n])
        at += 4 + n
    return parts


def _response(parts: list[bytes], raw_topk: bool) -> dict:
    """response_raw's parts (meta JSON, token ids, the codec's fields) -> the response dict (see decode_response)."""
    from distillab.topk_codec import FIELDS, decode_topk

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


# A block's columns: a row's request, its response JSON (a response the codec cannot hold; else empty), then
# response_raw's parts (meta JSON, token ids, the six codec fields; empty for a JSON response).
BLOCK_COLUMNS = ("request", "json", "meta", "token_ids", "id_b0", "id_b1", "id_b2", "top", "below_top", "tail")
BLOCK_PLANES = {"token_ids": 4, "top": 2, "tail": 2}  # multi-byte columns stored as byte planes, like the codec's ids
BLOCK_LEVEL = 19  # one frame over hundreds of responses: a high level is paid once per block, not per response


def _planes(data: bytes, size: int) -> bytes:
    return np.frombuffer(data, np.uint8).reshape(-1, size).T.tobytes()


def _unplanes(data: bytes, size: int) -> bytes:
    return np.frombuffer(data, np.uint8).reshape(size, -1).T.tobytes()


def pack_block(rows: list[tuple[str, list[bytes] | str]]) -> bytes:
    """Rows of (request JSON, response: response_raw's parts, or JSON text) -> a block's raw bytes: the row and column
    counts (u32), every part's length (u32, column by column, as byte planes), then each column's parts
    concatenated, so like compresses with like (all the requests, then all the texts, then each codec plane)."""
    columns: list[list[bytes]] = [[] for _ in BLOCK_COLUMNS]
    for request, response in rows:
        parts = [request.encode(), response.encode() if isinstance(response, str) else b""]
        parts += [] if isinstance(response, str) else response
        if len(parts) > len(BLOCK_COLUMNS):
            raise ValueError(f"a response of {len(parts) - 2} parts: a block holds {len(BLOCK_COLUMNS) - 2}")
        for column, part in zip(columns, parts + [b""] * (len(BLOCK_COLUMNS) - len(parts))):
            column.append(part)
    lengths = np.array([[len(p) for p in column] for column in columns], dtype="<u4")  # (columns, rows)
    out = [struct.pack("<II", len(rows), len(columns)), _planes(lengths.tobytes(), 4)]
    for name, column in zip(BLOCK_COLUMNS, columns):
        joined = b"".join(column)
        out.append(_planes(joined, BLOCK_PLANES[name]) if name in BLOCK_PLANES else joined)
    return b"".join(out)


class Block:
    """A block's raw bytes (pack_block), decoded once; .row(i) -> (request JSON, response parts or JSON text)."""

    def __init__(self, raw: bytes):
        rows, ncols = struct.unpack_from("<II", raw)
        at = 8 + 4 * rows * ncols
        lengths = np.frombuffer(_unplanes(raw[8:at], 4), dtype="<u4").reshape(ncols, rows)
        self.columns, self.starts = [], []
        for name, column_lengths in zip(BLOCK_COLUMNS, lengths):
            end = at + int(column_lengths.sum())
            column = raw[at:end]
            self.columns.append(_unplanes(column, BLOCK_PLANES[name]) if name in BLOCK_PLANES else column)
            self.starts.append([0, *np.cumsum(column_lengths).tolist()])
            at = end

    def row(self, i: int) -> tuple[str, list[bytes] | str]:
        parts = [column[starts[i] : starts[i + 1]] for column, starts in zip(self.columns, self.starts)]
        return parts[0].decode(), parts[1].decode() if parts[1] else parts[2:]


def _block_zstd():
    if not hasattr(_PER_THREAD, "block_compressor"):  # per thread, as _zstd_compressor
        import zstandard as zstd

        _PER_THREAD.block_compressor = zstd.ZstdCompressor(level=BLOCK_LEVEL, write_checksum=False)
    return _PER_THREAD.block_compressor


class EarlierLayout:
    """Reads the rows of a cache of an earlier layout (user_version 0 or 2) for RequestCache._convert: one
    `responses` row a response; its key the hash's hex text (0) or its 32 bytes (2); its request JSON text or a blob
    of it; its response JSON text or a blob of response_raw's bytes: DLR1 (magic, raw length (u32), zstd frame) or
    DLR2 compressed with the zstd dictionary whose id it names, stored in `dictionaries` (0: none)."""

    OLD_BLOB_MAGIC = b"DLR1"

    def __init__(self, db: sqlite3.Connection, tables: set[str]):
        import zstandard as zstd

        stored = db.execute("SELECT id, data FROM dictionaries").fetchall() if "dictionaries" in tables else []
        self.decompressors = {0: zstd.ZstdDecompressor()} | {
            id: zstd.ZstdDecompressor(dict_data=zstd.ZstdCompressionDict(data)) for id, data in stored
        }

    def row(self, key: str | bytes, request: str | bytes, response: str | bytes, *counts) -> tuple:
        """A stored row -> the row _write_block takes: binary key, request JSON, response_raw's parts or JSON text."""
        return (
            key if isinstance(key, bytes) else bytes.fromhex(key),
            self._raw(request).decode() if self._is_blob(request) else request,
            _split(self._raw(response)) if self._is_blob(response) else response,
            *counts,
        )

    def _is_blob(self, value) -> bool:
        return isinstance(value, bytes) and value[:4] in (BLOB_MAGIC, self.OLD_BLOB_MAGIC)

    def _raw(self, blob: bytes) -> bytes:
        if blob[:4] == self.OLD_BLOB_MAGIC:
            (size,) = struct.unpack_from("<I", blob, 4)
            return _zstd_decompressor().decompress(blob[8:], max_output_size=size)
        (id,) = struct.unpack_from("<I", blob, 4)
        if id not in self.decompressors:
            raise sqlite3.DatabaseError(f"a response needs zstd dictionary {id}, which is missing")
        return self.decompressors[id].decompress(blob[8:])


SQLITE_WRITE_FAILED = (10, 13)  # SQLITE_IOERR, SQLITE_FULL: a full disk or quota, a file-size limit


def _corrupt(path: Path, err: sqlite3.Error) -> UserError:
    """A cache that cannot be used: one that could not be written (a full disk) is kept, the answers committed before
    the failure with it; a damaged one is moved away."""
    if getattr(err, "sqlite_errorcode", 0) & 0xFF in SQLITE_WRITE_FAILED:
        return cannot_write(path, err, "the answers it holds are kept, only the others are asked")
    return UserError(
        f"{path}: unusable teacher cache ({err}): move it away and rerun (its cached answers are then asked again)"
    )


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
            # A new file only (an existing one keeps its own). Most bytes are blocks (overflow pages, full but for
            # a block's last one), so the page size matters little but for the empty tables' pages: 4 KiB. The
            # loose rows' pages are freed at each repack: auto_vacuum returns them to the file system.
            self.db.execute("PRAGMA page_size = 4096")
            self.db.execute("PRAGMA auto_vacuum = FULL")
            self.db.execute("PRAGMA journal_mode=WAL")
            self.db.execute("PRAGMA synchronous=NORMAL")  # WAL + NORMAL: durable against a process kill
            converted = self._open_layout()
            self._loose = self.db.execute("SELECT COUNT(*) FROM loose").fetchone()[0]
        except sqlite3.DatabaseError as err:
            raise _corrupt(path, err) from None
        self._blocks: collections.OrderedDict[int, Block] = collections.OrderedDict()  # the last decoded ones
        if converted:
            self._vacuum()

    def _open_layout(self) -> bool:
        """The tables of LAYOUT in a new file; a cache of an earlier layout converted (_convert). Returns whether it
        converted one. One transaction: two processes opening one file agree, and a kill leaves the file as it is."""
        self.db.execute("BEGIN IMMEDIATE")
        try:
            tables = {r[0] for r in self.db.execute("SELECT name FROM sqlite_master WHERE type IN ('table', 'view')")}
            fresh = "responses" not in tables
            version = self.db.execute("PRAGMA user_version").fetchone()[0]
            if not fresh and version == 3:
                self._add_reasoning_tokens()
            converting = not fresh and version < 3
            if converting:
                for table in {"responses", "failures"} & tables:
                    self.db.execute(f"ALTER TABLE {table} RENAME TO earlier_{table}")
            if fresh or converting:
                for statement in filter(str.strip, SCHEMA.split(";")):
                    self.db.execute(statement)
                self.db.execute(f"PRAGMA user_version = {LAYOUT}")
            if fresh or version < LAYOUT:
                self._add_billing_columns()
            if converting:
                self._convert(tables)
            self.db.execute("COMMIT")
        except BaseException:
            self.db.execute("ROLLBACK")
            raise
        return converting

    def _add_reasoning_tokens(self) -> None:
        """Layout 3 -> 4, inside _open_layout's transaction: the reasoning_tokens columns, and the view over them."""
        for table in ("loose", "packed"):
            self.db.execute(f"ALTER TABLE {table} ADD COLUMN reasoning_tokens INTEGER NOT NULL DEFAULT 0")
        self.db.execute("DROP VIEW responses")
        self.db.execute(REASONING_UPGRADE)
        self.db.execute(f"PRAGMA user_version = {LAYOUT}")

    def _add_billing_columns(self) -> None:
        """Layout 5's BILLING_COLUMNS, inside _open_layout's transaction (a column already there is kept)."""
        for table in ("loose", "packed"):
            have = {row[1] for row in self.db.execute(f"PRAGMA table_info({table})")}
            for column in BILLING_COLUMNS:
                if column not in have:
                    self.db.execute(f"ALTER TABLE {table} ADD COLUMN {column} INTEGER NOT NULL DEFAULT 0")
        self.db.execute(f"PRAGMA user_version = {LAYOUT}")

    def _convert(self, tables: set[str]) -> None:
        """An earlier layout's responses (renamed earlier_responses) -> blocks of 2 x PACK_ROWS rows in their order,
        its failures (earlier_failures) kept; its tables dropped. Inside _open_layout's transaction."""
        earlier = EarlierLayout(self.db, tables)
        stored = self.db.execute(
            "SELECT key, request, response, prompt_tokens, completion_tokens, latency_s, "
            "attempts, created_at FROM earlier_responses ORDER BY rowid"
        )
        while rows := stored.fetchmany(2 * PACK_ROWS):
            self._write_block([earlier.row(*row) for row in rows])
        if "failures" in tables:
            self.db.execute(
                "INSERT INTO failures SELECT key, request, error, attempts, failed_at FROM earlier_failures"
            )
        for table in ("earlier_responses", "earlier_failures", "dictionaries"):
            self.db.execute(f"DROP TABLE IF EXISTS {table}")

    def _vacuum(self) -> None:
        """Give the pages a conversion freed back to the file system (and turn auto_vacuum on in a file that lacks
        it). Skipped while another connection holds the database."""
        self.db.execute("PRAGMA busy_timeout = 100")  # not the 30 s a commit waits: it is worth no stall
        try:
            self.db.execute("VACUUM")
        except sqlite3.OperationalError:
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
                tables = {r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type IN ('table', 'view')")}
            finally:
                db.close()
        except sqlite3.DatabaseError as err:
            raise _corrupt(path, err) from None
        if tables and "responses" not in tables:
            raise UserError(
                f"{path} is a SQLite database of another program (tables: {', '.join(sorted(tables))}), "
                "not a teacher cache: move it away and rerun"
            )

    def close(self) -> None:
        """Packs the loose rows left, then closes. A cache another process holds is closed as it is."""
        try:
            while self._pack():
                pass
        except sqlite3.DatabaseError:  # busy, read-only or damaged: the loose rows stay loose (the error, if any,
            pass  # is the caller's to see on its own queries, not a second one from close)
        finally:
            self.db.close()

    def _stored(self, key: str) -> tuple[str, list[bytes] | bytes | str] | None:
        """(request JSON, response as stored: its blob or JSON text, or, packed, response_raw's parts)."""
        row = self.db.execute(
            "SELECT request, response, NULL, NULL FROM loose WHERE key = ?1 UNION ALL "
            "SELECT NULL, NULL, block, pos FROM packed WHERE key = ?1 LIMIT 1",
            (bytes.fromhex(key),),
        ).fetchone()  # one statement: one snapshot, whatever a repack does
        if row is None or row[2] is None:
            return row and row[:2]
        return self._block(row[2]).row(row[3])

    def _block(self, id: int) -> Block:
        if id in self._blocks:
            self._blocks.move_to_end(id)
        else:
            (data,) = self.db.execute("SELECT data FROM blocks WHERE id = ?", (id,)).fetchone()
            self._blocks[id] = Block(unpack(data))
            if len(self._blocks) > BLOCKS_KEPT:
                self._blocks.popitem(last=False)
        return self._blocks[id]

    @_guarded
    def get(self, key: str, raw_topk: bool = False) -> dict | None:
        """The cached response, or None. raw_topk: the top-k as the codec's bytes under "topk" (see decode_response);
        a JSON-stored response then carries "topk": None and its top_ids/top_logprobs as lists."""
        found = self._stored(key)
        if not found:
            return None
        stored = found[1]
        if isinstance(stored, list):
            return _response(stored, raw_topk)
        if is_blob(stored):
            return decode_response(stored, raw_topk)
        resp = json.loads(stored)  # a top-k the codec cannot hold, or a response a converted cache held as JSON
        if raw_topk:
            resp["topk"] = None
        return resp

    @_guarded
    def cached_keys(self, keys: list[str]) -> set[str]:
        found: set[str] = set()
        for start in range(0, len(keys), 500):  # SQLite caps the number of bound parameters
            chunk = keys[start : start + 500]
            marks = ",".join("?" * len(chunk))
            found |= {
                r[0]
                for r in self.db.execute(
                    f"SELECT key FROM responses WHERE key IN ({marks})", [bytes.fromhex(k) for k in chunk]
                )
            }
        return {k.hex() for k in found}

    @_guarded
    def request(self, key: str) -> dict | None:
        """The canonical request stored with a cached response, or None."""
        found = self._stored(key)
        return json.loads(found[0]) if found else None

    @_guarded
    def put(self, key: str, request: dict, response: dict, latency_s: float = 0.0, attempts: int = 1) -> None:
        row = (
            bytes.fromhex(key),
            json.dumps(request, sort_keys=True),
            self._encoded(response),
            int(response.get("prompt_tokens", 0)),
            int(response.get("completion_tokens", 0)),
            float(latency_s),
            int(attempts),
            time.time(),
            int(response.get("reasoning_tokens") or 0),
            int(response.get("cached_tokens") or 0),
            int(bool(response.get("batch"))),
        )
        with self.db:  # one committed transaction per response: a loose row, unless another process packed it
            self.db.execute(
                f"INSERT OR IGNORE INTO loose ({LOOSE_COLUMNS}) SELECT ?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11 "
                "WHERE NOT EXISTS (SELECT 1 FROM packed WHERE key = ?1)",
                row,
            )
            self.db.execute("DELETE FROM failures WHERE key = ?", (key,))
        self._loose += 1
        if self._loose >= PACK_ROWS:
            with contextlib.suppress(sqlite3.OperationalError):  # busy: the next put or close packs them
                self._pack()

    @staticmethod
    def _encoded(response: dict) -> bytes | str:
        try:
            return encode_response(response)
        except (ValueError, TypeError):  # ragged or out-of-range top-k: kept as it came, in JSON
            return json.dumps(response)

    def _pack(self) -> bool:
        """Repack the loose rows (up to 2 x PACK_ROWS, oldest first) into one block, in one transaction: the block,
        an index row a key, the loose rows deleted. A kill at any point before COMMIT leaves the loose rows as they
        are. Returns whether rows were packed."""
        self.db.execute("BEGIN IMMEDIATE")
        try:
            rows = self.db.execute(
                f"SELECT {LOOSE_COLUMNS} FROM loose WHERE key NOT IN (SELECT key FROM packed) ORDER BY rowid LIMIT ?",
                (2 * PACK_ROWS,),
            ).fetchall()
            if rows:
                self._write_block(
                    [
                        (key, request, _split(unpack(response)) if is_blob(response) else response, *counts)
                        for key, request, response, *counts in rows
                    ]
                )
            self.db.execute("DELETE FROM loose WHERE key IN (SELECT key FROM packed)")
            self.db.execute("COMMIT")
        except BaseException:
            self.db.execute("ROLLBACK")
            raise
        self._loose = self.db.execute("SELECT COUNT(*) FROM loose").fetchone()[0]
        return bool(rows)

    def _write_block(self, rows: list[tuple]) -> None:
        """One block of rows (key, request JSON, response: response_raw's parts or JSON text, prompt_tokens,
        completion_tokens, latency_s, attempts, created_at, and reasoning_tokens, cached_tokens, batch but from an
        earlier layout) and a `packed` row a key, in the caller's transaction."""
        raw = pack_block([(request, response) for _, request, response, *_ in rows])
        data = BLOB_HEADER + _block_zstd().compress(raw)
        id = self.db.execute(
            "INSERT INTO blocks (data, rows, first_at, last_at) VALUES (?, ?, ?, ?)",
            (data, len(rows), rows[0][7], rows[-1][7]),
        ).lastrowid
        self.db.executemany(
            "INSERT INTO packed (key, block, pos, prompt_tokens, completion_tokens, latency_ms, attempts, "
            "reasoning_tokens, cached_tokens, batch) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            [
                (key, id, pos, p, c, round(latency * 1000), attempts, *(*later, 0, 0, 0)[:3])
                for pos, (key, _, _, p, c, latency, attempts, _, *later) in enumerate(rows)
            ],
        )

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
        totals = {"requests": 0, "prompt_tokens": 0, "completion_tokens": 0, "latency_s": 0.0, "reasoning_tokens": 0}
        for start in range(0, len(keys), 500):
            chunk = keys[start : start + 500]
            marks = ",".join("?" * len(chunk))
            n, p, c, lat, r = self.db.execute(
                f"SELECT COUNT(*), COALESCE(SUM(prompt_tokens),0), COALESCE(SUM(completion_tokens),0), "
                f"COALESCE(SUM(latency_s),0), COALESCE(SUM(reasoning_tokens),0) FROM responses WHERE key IN ({marks})",
                [bytes.fromhex(k) for k in chunk],
            ).fetchone()
            totals["requests"] += n
            totals["prompt_tokens"] += p
            totals["completion_tokens"] += c
            totals["latency_s"] += lat
            totals["reasoning_tokens"] += r
        return totals

    @_guarded
    def billing(self, keys: list[str]) -> dict:
        """What is not billed at the plain rates, over the given keys: cached_tokens (of prompt_tokens, served by the
        endpoint's prompt cache) and, of them all, the requests the Batch API answered (batch_requests and their
        batch_prompt_tokens, batch_cached_tokens, batch_completion_tokens). pricing.TeacherPricing.usd_for reads them
        beside usage()'s totals."""
        totals = dict.fromkeys(BILLING_KEYS, 0)
        columns = "key, cached_tokens, batch, prompt_tokens, completion_tokens"
        for start in range(0, len(keys), 250):  # twice in the statement: SQLite caps the bound parameters
            chunk = [bytes.fromhex(k) for k in keys[start : start + 250]]
            marks = ",".join("?" * len(chunk))
            # loose and packed in one statement (one snapshot, whatever a repack does); not the responses view, which
            # is layout 4's
            row = self.db.execute(
                "SELECT COALESCE(SUM(cached_tokens),0), COALESCE(SUM(batch),0), COALESCE(SUM(batch * prompt_tokens),0), "
                "COALESCE(SUM(batch * cached_tokens),0), COALESCE(SUM(batch * completion_tokens),0) FROM "
                f"(SELECT {columns} FROM loose WHERE key IN ({marks}) UNION ALL "
                f"SELECT {columns} FROM packed WHERE key IN ({marks}))",
                chunk + chunk,
            ).fetchone()
            for name, value in zip(BILLING_KEYS, row):
                totals[name] += value
        return totals
