"""The bottom layer: writing files whole, hashing them, locking them, checking a directory can be made.

Everything distillab writes goes through `write_atomic` or `atomic_path` (a temp file beside the target, then
one rename), so a reader never sees half a file and a kill leaves the old file or the new one, never a torn one.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path

from filelock import FileLock, Timeout

from distillab.errors import UserError


def write_atomic(path: Path, text: str | bytes) -> None:
    """Write to a temp file beside `path`, then rename: readers never see half a file."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(text.encode() if isinstance(text, str) else text)


def write_json(path: Path, obj, **dumps) -> None:
    write_atomic(path, json.dumps(obj, indent=1, **dumps))


@contextmanager
def atomic_path(path: Path, suffix: str = ""):
    """A temp path beside `path` to write (by any library); renamed onto `path` when the block ends without an
    error, removed when it raises. `suffix`: for writers that pick a format by file name (".npz")."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{suffix}")
    try:
        yield tmp
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)


@contextmanager
def atomic_dir(path: Path, tag: str = "tmp"):
    """A staging directory beside `path` to fill; when the block ends without an error it is swapped in for
    `path` (the old directory renamed aside, the new one renamed in, the old one removed), so a kill leaves the
    old directory or the new one whole. `tag` names the staging directory (two writers of one path differ)."""
    path = Path(path)
    staging, old = path.with_name(f"{path.name}.{tag}"), path.with_name(f"{path.name}.old.tmp")
    shutil.rmtree(staging, ignore_errors=True)
    try:
        yield staging
        shutil.rmtree(old, ignore_errors=True)
        if path.exists():
            path.rename(old)
        staging.rename(path)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
        shutil.rmtree(old, ignore_errors=True)


def read_json(path: Path, hint: str = "delete it and rerun"):
    """The JSON in `path`; a file that is not UTF-8 JSON is a one-line error naming it."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise UserError(f"{path} is corrupt (not JSON): {hint}") from None


def cannot_write(path: Path, err: BaseException, then: str) -> UserError:
    """The one-line error for a write to `path` that failed for want of room or rights (a full disk or quota, a
    file-size limit, a read-only or forbidden place), saying what a rerun does once there is room (`then`). The
    writers are atomic, so what was whole before the failure is still whole."""
    detail = getattr(err, "strerror", None) or str(err)
    return UserError(
        f"cannot write {path} ({detail}): make room on its disk (or fix its permissions), then rerun: {then}"
    )


@contextmanager
def writing(path: Path, then: str):
    """A block that writes `path`: an OSError in it is cannot_write's one line."""
    try:
        yield
    except OSError as err:
        raise cannot_write(path, err, then) from None


def set_aside_if_corrupt(path: Path) -> Path | None:
    """A JSON file distillab wrote and makes again (a summary, a record: each a JSON object) found not UTF-8 JSON, or
    not an object: renamed to <name>.corrupt beside it (an older one there replaced), so it reads as absent and is
    rebuilt, and the damaged one is kept for a look. Returns where it went, or None when the file is absent or sound."""
    path = Path(path)
    if not path.is_file():
        return None
    try:
        if isinstance(json.loads(path.read_text(encoding="utf-8")), dict):
            return None
    except (UnicodeDecodeError, json.JSONDecodeError):
        pass
    aside = path.with_name(path.name + ".corrupt")
    path.replace(aside)
    return aside


def lock(path: Path) -> FileLock:
    """An exclusive lock on `path` (created beside the data it guards): `with lock(p): ...`."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    return FileLock(str(path))


@contextmanager
def hold(path: Path, busy: Callable[[str], str], wait: bool = False):
    """Hold the lock at `path` while the block runs. Without `wait`, while another process holds it: a UserError
    `busy(pid)` naming that process (its pid is in <path>.pid, written once the lock is held; "unknown" in the
    instant before); with `wait`, wait for it. The operating system releases the lock of a killed process.
    A block that raises leaves neither the lock file nor a directory the lock made when they were new, so a refused
    command changes nothing on disk (a directory the block wrote to is kept)."""
    made = [d for d in (path.parent, *path.parent.parents) if not d.exists()]  # deepest first
    new = not path.exists()
    held = lock(path)
    pid_file = path.with_name(path.name + ".pid")
    try:
        try:
            held.acquire(blocking=wait)
        except Timeout:
            raise UserError(busy(_holder(path))) from None
        try:
            write_atomic(pid_file, str(os.getpid()))
            yield
        except BaseException:
            if new:
                path.unlink(missing_ok=True)  # while still held: no other process holds this file
            raise
        finally:
            pid_file.unlink(missing_ok=True)
            held.release()
    except BaseException:
        for directory in made:
            try:
                directory.rmdir()
            except OSError:  # not empty: the block wrote there
                break
        raise


def _holder(path: Path) -> str:
    try:
        return path.with_name(path.name + ".pid").read_text().strip() or "unknown"
    except OSError:
        return "unknown"


def file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def fingerprint(*parts) -> str:
    """Hash of JSON-able parts and files (Path parts are hashed by content)."""
    h = hashlib.sha256()
    for part in parts:
        if isinstance(part, Path):
            h.update(file_digest(part).encode())
        else:
            h.update(json.dumps(part, sort_keys=True, default=str).encode())
    return h.hexdigest()[:16]


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
