"""Reading user JSONL files (prompts, task suites, corpora) with errors that name the file and line."""

from __future__ import annotations

import json
from pathlib import Path

from distillab.errors import UserError, not_utf8


def read_jsonl(path: str | Path, what: str) -> list[tuple[str, object]]:
    """[(where, record)] for each non-empty line; where = "path:line" for the caller's own checks.

    A missing file, a malformed line or a file with no records is a one-line UserError naming `what`.
    """
    path = Path(path)
    if path.is_dir():
        raise UserError(f"{what} {path} is a directory: give a JSONL file")
    if not path.is_file():
        raise UserError(f"{what} not found: {path}")
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8-sig")  # a leading byte-order mark (Windows editors) is not part of line 1
    except UnicodeDecodeError as err:
        line = raw.count(b"\n", 0, err.start) + 1
        raise not_utf8(f"{path}:{line}", err) from None
    records = []
    for lineno, line in enumerate(text.split("\n"), 1):
        if not line.strip():
            continue
        try:
            records.append((f"{path}:{lineno}", json.loads(line)))
        except json.JSONDecodeError as err:
            raise UserError(f"{path}:{lineno}: malformed JSON ({err.msg})") from None
    if not records:
        raise UserError(f"{what} is empty: {path}")
    return records
