"""Errors a user can cause, and how the CLI words them.

`UserError` is raised wherever bad input is found, with a one-line message that names the file or value and
says what to do. `user_message` is the CLI boundary's fallback for the failure classes that are foreseeable
but raised by libraries (a file that is not UTF-8, a path that cannot be created, a corrupt SQLite or Parquet
file): it words them as one line. Anything else is a bug.

Exit codes: 0 success, 1 internal error (a bug: rerun with --debug for the traceback), 2 bad input or a bad
file (the message says which and what to do), 130 interrupted.
"""

from __future__ import annotations

import json
import sqlite3

EXIT_BUG = 1
EXIT_USER = 2
EXIT_INTERRUPTED = 130


class UserError(ValueError):
    """Something the user gave us is wrong; the message says what and where, in one line."""


def one_line(text: str) -> str:
    """Library messages span lines (transformers lists options, pyarrow adds hints): the terminal gets one."""
    return " ".join(str(text).split())


def not_utf8(path, err: UnicodeDecodeError) -> UserError:
    """The UserError for a text file that is not UTF-8, naming the file and the first bad byte."""
    return UserError(
        f"{path}: not UTF-8 text (byte {err.object[err.start]:#04x} at offset {err.start}): save it as UTF-8"
    )


def user_message(err: BaseException) -> str | None:
    """One line for a foreseeable failure that reached the CLI boundary unconverted; None for a bug.

    Prefer raising UserError at the source, where the path is known: this is the net under it.
    """
    if isinstance(err, UserError):
        return one_line(str(err))
    if isinstance(err, UnicodeDecodeError):
        return f"a file is not UTF-8 text ({err.reason} at byte offset {err.start}): save it as UTF-8"
    if isinstance(err, json.JSONDecodeError):
        return (
            f"a JSON file is corrupt ({err.msg}, line {err.lineno}): delete or restore it "
            "(distillab rewrites its own files on the next run)"
        )
    if isinstance(err, OSError):
        where = err.filename if err.filename is not None else ""
        if err.filename2 is not None:
            where = f"{where} -> {err.filename2}"
        what = err.strerror or str(err)
        return one_line(
            f"{where + ': ' if where else ''}{what}: check the path exists, is the right kind "
            "(file or directory) and is writable"
        )
    if isinstance(err, sqlite3.DatabaseError):
        return one_line(f"a SQLite file is corrupt or is not distillab's ({err}): move it away and rerun")
    if isinstance(err, ValueError) and "null byte" in str(err):  # os functions refuse a path with NUL in it
        return "a path contains a NUL character: remove it from the name"
    if isinstance(err, OverflowError) and "port" in str(err):  # socket.bind on a port past 65535
        return one_line(f"{err}: choose a port between 1 and 65535")
    module = type(err).__module__ or ""
    if module.startswith("pyarrow"):  # ArrowInvalid & co. name the file in their message
        return one_line(f"unreadable data file: {err}; delete it and rerun the stage that writes it")
    if module.startswith("safetensors") or type(err).__name__ == "SafetensorError":
        return one_line(f"unreadable safetensors weights: {err}")
    return None
