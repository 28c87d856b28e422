"""The run directory's bookkeeping: which stage finished with which inputs, so a rerun does no work.

Each stage fingerprints what it read (its config section, the digests of its input files). When the
stamp in `stages.json` matches, the stage is up to date and returns at once; otherwise it (re)runs, and
an interrupted stage resumes from its own partial state (the teacher cache, training checkpoints).
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from distillab.config import write_atomic
from distillab.errors import UserError


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


def check_run_dir(run_dir: Path) -> None:
    """Refuse, before anything is written, a run directory that could not be created or written."""
    check_creatable(run_dir, "run directory", "choose another runs_dir")


def check_creatable(directory: Path, what: str, hint: str) -> None:
    """Check, without creating anything, that `directory` exists as a directory or could be made.

    No NUL in the path, and its nearest existing ancestor is a writable directory that is not a kernel
    pseudo-filesystem (/proc, /sys refuse mkdir with odd errors).
    """
    if "\x00" in str(directory):
        raise UserError(f"{what} {str(directory)!r} contains a NUL character: {hint}")
    path = Path(os.path.abspath(directory))
    if path.exists() and not path.is_dir():
        raise UserError(f"{what} {path} exists and is not a directory: {hint}")
    ancestor = path
    while not ancestor.exists():
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise UserError(f"cannot create {what} {path}: {ancestor} is a file, not a directory; {hint}")
    if ancestor.parts[1:2] in (("proc",), ("sys",)):
        raise UserError(f"cannot create {what} {path}: /{ancestor.parts[1]} is not for files; {hint}")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise UserError(f"cannot create {what} {path}: {ancestor} is not writable; {hint}")


def _stamps(run_dir: Path) -> dict:
    path = run_dir / "stages.json"
    if not path.is_file():
        return {}
    try:
        stamps = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        stamps = None
    if not isinstance(stamps, dict):
        raise UserError(f"{path} is corrupt: delete it and rerun (the stages run again; cached teacher "
                        "answers are kept, so no request is paid twice)")
    return stamps


def check_stamps(run_dir: Path) -> None:
    """A corrupt stages.json is an error before a stage does any work, not after."""
    _stamps(run_dir)


def is_fresh(run_dir: Path, stage: str, stamp: str) -> bool:
    return _stamps(run_dir).get(stage) == stamp


def mark_fresh(run_dir: Path, stage: str, stamp: str) -> None:
    stamps = _stamps(run_dir)
    stamps[stage] = stamp
    write_atomic(run_dir / "stages.json", json.dumps(stamps, indent=1))
