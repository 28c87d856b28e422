"""The run directory's bookkeeping: which stage finished with which inputs, so a rerun does no work.

Each stage fingerprints what it read (its config section, the digests of its input files). When the
stamp in `stages.json` matches, the stage is up to date and returns at once; otherwise it (re)runs, and
an interrupted stage resumes from its own partial state (the teacher cache, training checkpoints).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from distillab.config import write_atomic


def fingerprint(*parts) -> str:
    """Hash of JSON-able parts and files (Path parts are hashed by content)."""
    h = hashlib.sha256()
    for part in parts:
        if isinstance(part, Path):
            h.update(file_digest(part).encode())
        else:
            h.update(json.dumps(part, sort_keys=True, default=str).encode())
    return h.hexdigest()[:16]


def file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _stamps(run_dir: Path) -> dict:
    path = run_dir / "stages.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def is_fresh(run_dir: Path, stage: str, stamp: str) -> bool:
    return _stamps(run_dir).get(stage) == stamp


def mark_fresh(run_dir: Path, stage: str, stamp: str) -> None:
    stamps = _stamps(run_dir)
    stamps[stage] = stamp
    write_atomic(run_dir / "stages.json", json.dumps(stamps, indent=1))
