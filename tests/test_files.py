"""The bottom layer (files.py): a write that raises leaves the old file or directory and no temp beside it, one
that ends replaces it; a corrupt JSON file is one line naming it; fingerprints follow content; the lock excludes."""

from __future__ import annotations

import pytest
from filelock import FileLock, Timeout

from distillab.errors import UserError
from distillab.files import (
    atomic_dir,
    atomic_path,
    fingerprint,
    hold,
    lock,
    read_json,
    write_atomic,
    write_json,
)


class Boom(Exception):
    """What a writer raises halfway (a full disk, a kill turned into an exception)."""


def _names(directory) -> list[str]:
    return sorted(p.name for p in directory.iterdir())


def test_write_atomic_replaces_the_file_and_leaves_no_temp(tmp_path):
    path = tmp_path / "sub" / "f.txt"
    write_atomic(path, "old")  # the parent is made
    write_atomic(path, b"new bytes")
    assert path.read_bytes() == b"new bytes" and _names(path.parent) == ["f.txt"]


def test_atomic_path_keeps_the_old_file_when_the_block_raises(tmp_path):
    path = tmp_path / "f.txt"
    path.write_text("old")
    with pytest.raises(Boom), atomic_path(path) as tmp:
        tmp.write_text("half of the new")
        assert tmp.parent == path.parent and tmp != path  # beside it: the rename stays on one filesystem
        raise Boom
    assert path.read_text() == "old" and _names(tmp_path) == ["f.txt"]  # the temp is gone too


def test_atomic_path_replaces_the_file_when_the_block_ends(tmp_path):
    path = tmp_path / "f.npz"
    path.write_text("old")
    with atomic_path(path, suffix=".npz") as tmp:
        assert tmp.name.endswith(".npz")  # for writers that pick a format by file name
        tmp.write_text("new")
        assert path.read_text() == "old"  # nothing seen before the block ends
    assert path.read_text() == "new" and _names(tmp_path) == ["f.npz"]


def test_atomic_path_without_an_old_file_leaves_nothing_when_the_block_raises(tmp_path):
    with pytest.raises(Boom), atomic_path(tmp_path / "f.txt") as tmp:
        tmp.write_text("half")
        raise Boom
    assert _names(tmp_path) == []


def test_atomic_dir_keeps_the_old_directory_when_the_block_raises(tmp_path):
    path = tmp_path / "export"
    path.mkdir()
    (path / "old.txt").write_text("old")
    with pytest.raises(Boom), atomic_dir(path) as staging:
        staging.mkdir()
        (staging / "new.txt").write_text("half")
        raise Boom
    assert _names(path) == ["old.txt"] and _names(tmp_path) == ["export"]  # no staging or old copy left


def test_atomic_dir_swaps_in_the_new_directory_when_the_block_ends(tmp_path):
    path = tmp_path / "export"
    path.mkdir()
    (path / "old.txt").write_text("old")
    with atomic_dir(path, tag="writer-a") as staging:
        assert staging.name == "export.writer-a" and not staging.exists()
        staging.mkdir()
        (staging / "new.txt").write_text("new")
        assert _names(path) == ["old.txt"]  # the old one whole until the block ends
    assert _names(path) == ["new.txt"] and _names(tmp_path) == ["export"]
    with atomic_dir(tmp_path / "fresh") as staging:  # no old directory: the new one is renamed in
        staging.mkdir()
    assert _names(tmp_path) == ["export", "fresh"]


@pytest.mark.parametrize("content", [b'{"a": ', b'{"a": "\xff"}'], ids=["not JSON", "not UTF-8"])
def test_read_json_names_a_corrupt_file_in_one_line(tmp_path, content):
    path = tmp_path / "state.json"
    path.write_bytes(content)
    with pytest.raises(UserError) as err:
        read_json(path)
    assert str(err.value) == f"{path} is corrupt (not JSON): delete it and rerun"
    with pytest.raises(UserError, match=r"is corrupt \(not JSON\): rebuild it$"):
        read_json(path, "rebuild it")
    write_json(path, {"a": [1, 2]})
    assert read_json(path) == {"a": [1, 2]}


def test_fingerprint_follows_the_content_of_files_and_the_values_of_the_rest(tmp_path):
    a, b = tmp_path / "a.bin", tmp_path / "b.bin"
    a.write_bytes(b"weights")
    b.write_bytes(b"weights")
    assert fingerprint("stage", {"x": 1, "y": 2}, a) == fingerprint("stage", {"y": 2, "x": 1}, b)  # content, key order
    assert fingerprint("stage", a) != fingerprint("stage", str(a))  # a path given as text is a value, not a file
    b.write_bytes(b"weightz")
    assert fingerprint("stage", a) != fingerprint("stage", b)
    assert fingerprint("stage", 1) != fingerprint("stage", 2) and fingerprint("a", "b") != fingerprint("b", "a")


def test_the_lock_excludes_another_holder_until_released(tmp_path):
    path = tmp_path / "deep" / "data.lock"
    with lock(path):  # its directory is made
        with pytest.raises(Timeout):
            FileLock(str(path), timeout=0).acquire()  # another open of the file: flock refuses it
    other = FileLock(str(path), timeout=0)
    other.acquire()
    other.release()


def test_hold_refuses_a_second_holder_naming_the_first_and_releases(tmp_path):
    import os
    import subprocess
    import sys

    path = tmp_path / ".locks" / "stage.lock"
    pid_file = path.with_name("stage.lock.pid")
    with hold(path, lambda pid: f"held by {pid}"):
        assert pid_file.read_text() == str(os.getpid())
        with pytest.raises(UserError, match=f"^held by {os.getpid()}$"):  # another open of the file: excluded
            with hold(path, lambda pid: f"held by {pid}"):
                pass
        # another process too, told who holds it
        code = f"from distillab.files import hold\nwith hold(__import__('pathlib').Path({str(path)!r}), str): pass"
        other = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
        assert other.returncode != 0 and str(os.getpid()) in other.stderr
        pid_file.unlink()  # the instant before the holder wrote it
        with pytest.raises(UserError, match="^held by unknown$"):
            with hold(path, lambda pid: f"held by {pid}"):
                pass
    assert not pid_file.exists()
    with hold(path, str):  # released
        pass


def test_hold_leaves_nothing_new_when_the_block_raises(tmp_path):
    path = tmp_path / "run" / ".locks" / "stage.lock"
    with pytest.raises(UserError), hold(path, str):
        raise UserError("refused before writing anything")
    assert list(tmp_path.iterdir()) == []  # neither the lock file nor the directories it made
    with pytest.raises(UserError), hold(path, str):
        (tmp_path / "run" / "written").write_text("x")
        raise UserError("refused after writing")
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["written"]  # what the block wrote stays
