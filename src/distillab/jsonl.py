"""Reading user JSONL files (prompts, task suites, corpora) with errors that name the file and line."""

from __future__ import annotations

import json
from pathlib import Path

from distillab.errors import UserError


def read_jsonl(path: str | Path, what: str) -> list[tuple[str, object]]:
    """[(where, record)] for each non-empty line; where = "path:line" for the caller's own checks.

    A missing file, a malformed line or a file with no records is a one-line UserError naming `what`.
    """
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{what} not found: {path}")
    records = []
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                records.append((f"{path}:{lineno}", json.loads(line)))
            except json.JSONDecodeError as err:
                raise UserError(f"{path}:{lineno}: malformed JSON ({err.msg})") from None
    if not records:
        raise UserError(f"{what} is empty: {path}")
    return records
