"""The run directory (rundir.py): every path of a run, named once and all different; the stamps of stages.json
(merged, and a corrupt file one line naming it); a run directory that could not be created, refused first."""

from __future__ import annotations

import inspect
from pathlib import Path

import pytest

from distillab.errors import UserError
from distillab.rundir import WHOLE, RunDir


def _named_paths(run: RunDir) -> dict[str, Path]:
    """Every path the RunDir names through a property."""
    return {
        name: getattr(run, name)
        for name, member in inspect.getmembers(RunDir)
        if isinstance(member, property) and isinstance(getattr(run, name), Path)
    }


def test_every_named_path_is_its_own_and_inside_the_run_but_the_registry(tmp_path):
    run = RunDir(tmp_path / "runs" / "r")
    paths = _named_paths(run) | {
        "cache": run.cache(),
        "shard cache": run.cache((1, 3)),
        "train": run.dataset(),
        "replay": run.dataset("replay"),
        "generate summary": run.generate_summary(),
        "replay summary": run.generate_summary("replay"),
        "eval": run.eval("base"),
        "lm_eval": run.lm_eval("base"),
        "export": run.export("plain"),
    }
    assert len(paths) > 20 and len(set(paths.values())) == len(paths)  # no two names for one path
    outside = {name for name, path in paths.items() if not path.is_relative_to(run.root)}
    assert outside == {"registry"} and run.registry == tmp_path / "runs" / "registry.sqlite"  # shared by the runs


def test_the_paths_a_run_has_always_had(tmp_path):
    run = RunDir(tmp_path)
    assert run.cache(WHOLE) == tmp_path / "teacher.sqlite"
    assert run.cache((1, 3)) == tmp_path / "teacher.shard-1-of-3.sqlite"
    assert run.dataset() == tmp_path / "data" / "train.parquet"
    assert run.generate_summary() == tmp_path / "data" / "generate_summary.json"
    assert run.generate_summary("replay") == tmp_path / "data" / "replay_summary.json"
    assert run.eval("base") == tmp_path / "eval" / "base.json"
    assert run.lm_eval("base") == tmp_path / "eval" / "lm_eval_base.json"
    assert (run.config, run.stamps_file) == (tmp_path / "run.toml", tmp_path / "stages.json")


def test_eval_files_leave_lm_evals_own_files_out(tmp_path):
    run = RunDir(tmp_path)
    for label in ("teacher", "base", "distilled"):
        run.eval(label).parent.mkdir(exist_ok=True)
        run.eval(label).write_text("{}")
    run.lm_eval("base").write_text("{}")
    assert run.eval_files() == [run.eval("base"), run.eval("distilled"), run.eval("teacher")]


def test_the_student_model_files_are_all_but_the_records_beside_it(tmp_path):
    run = RunDir(tmp_path)
    assert run.student_model_files() == []  # no student yet
    run.student.mkdir()
    for name in (
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "train_summary.json",
        "retain.json",
        "lineage.json",
        "README.md",
    ):
        (run.student / name).write_text("x")
    (run.student / "adapter").mkdir()  # a directory is not a file a load reads as such
    assert [p.name for p in run.student_model_files()] == ["config.json", "model.safetensors", "tokenizer.json"]
    assert run.student_weights == run.student / "model.safetensors"
    (run.student / "model.safetensors.index.json").write_text("{}")  # weights split into shards
    assert run.student_weights == run.student / "model.safetensors.index.json"


def test_stamps_merge_and_a_corrupt_file_is_one_line(tmp_path):
    run = RunDir(tmp_path / "r")
    assert run.stamps() == {}  # none yet: nothing is up to date
    run.stamp("generate", "aaa")
    run.stamp("train", "bbb")
    run.stamp("generate", "ccc")
    assert run.stamps() == {"generate": "ccc", "train": "bbb"}
    for content in ("{oops", "[]"):
        run.stamps_file.write_text(content)
        with pytest.raises(UserError) as err:
            run.stamps()
        assert str(run.stamps_file) in str(err.value) and "\n" not in str(err.value)
        with pytest.raises(UserError):
            run.stamp("train", "ddd")  # never written over: a stamp is not lost silently
        assert run.stamps_file.read_text() == content


def test_a_run_directory_under_a_file_is_refused_before_anything_is_written(tmp_path):
    (tmp_path / "afile").write_text("x")
    run = RunDir(tmp_path / "afile" / "runs" / "r")
    with pytest.raises(UserError, match="is a file"):
        run.check_creatable()
    RunDir(tmp_path / "runs" / "r").check_creatable()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile"]  # a check creates nothing
