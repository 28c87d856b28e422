"""benchmarks/tables.py: the README's and BENCHMARKS.md's demo table is what its record renders, the record was made
on today's demo inputs, and recording a run rewrites the marked blocks and nothing else.

DISTILLAB_CHECK_DEMO=1 also runs the demo itself (about 4 minutes on 2 cores) and compares its scores with the
record: the check that distillab's own code still produces the shipped numbers.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess

import pytest
from benchmarks import tables

RECORD = tables.RESULTS / "demo.json"
RERUN = "run `make demo`, then `.venv/bin/python benchmarks/tables.py`"


def test_the_shipped_demo_tables_are_what_the_record_renders():
    body = tables.render_demo(json.loads(RECORD.read_text()))
    for doc in tables.DOCUMENTS:
        assert tables.shipped(doc.read_text(), "demo") == body, f"{doc.name}'s demo table was edited by hand: {RERUN}"
    assert tables.stale() == []


def test_the_record_was_made_on_todays_demo_inputs():
    """The lab checkpoints, the demo's settings and the lab examples it reads are what the recorded run used; where one
    changed, the shipped numbers no longer say what `make demo` prints."""
    recorded, today = json.loads(RECORD.read_text())["inputs"], tables.demo_inputs()
    changed = [name for name in today if recorded.get(name) != today[name]]
    assert not changed, f"the demo's {', '.join(changed)} changed since the table was recorded: {RERUN}"


def _demo_run(path, scores: dict[str, tuple[float, float]]):
    """A run directory as `distillab demo` leaves it, as far as the record reads it: summary.json and eval files."""
    (path / "eval").mkdir(parents=True, exist_ok=True)
    models = {label: {"task": task, "general": general} for label, (task, general) in scores.items()}
    summary = {"models": models, "wall_seconds": 200.4, "task_skills": ["recall", "describe"]}
    (path / "summary.json").write_text(json.dumps(summary))
    for label in scores:
        general = ["add", "upper"] if label == "teacher" else []
        record = {"parameters": 2_000_000 if label == "teacher" else 800_000, "suites": {"general": general}}
        (path / "eval" / f"{label}.json").write_text(json.dumps(record))
    return path


def _checkout(path) -> str:
    """A git checkout at `path` with one commit; its short hash."""
    git = ["git", "-C", str(path), "-c", "user.name=t", "-c", "user.email=t@t"]
    subprocess.run(["git", "init", "-q", str(path)], check=True)
    (path / "tracked.txt").write_text("one\n")
    subprocess.run([*git, "add", "tracked.txt"], check=True)
    subprocess.run([*git, "commit", "-q", "-m", "one"], check=True)
    return subprocess.run([*git, "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()


def test_recording_a_run_rewrites_the_blocks_and_nothing_else(tmp_path):
    commit = _checkout(tmp_path)
    scores = {"teacher": (0.9, 0.95), "base": (0.0, 0.6), "distilled": (0.45, 0.1), "retain": (0.3, 0.5)}
    run = _demo_run(tmp_path / "runs" / "demo", scores)
    readme = tmp_path / "README.md"
    readme.write_text("intro 0.123\n\n<!-- table:demo -->\nold | rows\n<!-- /table:demo -->\n\nafter 0.456\n")
    args = ["--run", str(run), "--results", str(tmp_path / "results"), "--documents", str(readme)]
    assert tables.main(args) == 0
    text = readme.read_text()
    assert text.startswith("intro 0.123\n\n<!-- table:demo -->\n\n| model | task (recall, describe) | general (2 other")
    assert text.endswith("<!-- /table:demo -->\n\nafter 0.456\n") and "old | rows" not in text
    assert "| teacher (2.0M params) | 0.900 | 0.950 |" in text and "| distilled + retain | 0.300 | 0.500 |" in text
    assert "distilled: task gap closed 50%" in text  # (0.45 - 0) / (0.9 - 0)
    record = json.loads((tmp_path / "results" / "demo.json").read_text())
    assert record["commit"] == commit  # the checkout the run was made in, clean
    assert record["models"]["retain"] == {"task": 0.3, "general": 0.5} and record["inputs"] == tables.demo_inputs()
    assert tables.main([*args, "--no-record"]) == 0 and readme.read_text() == text  # rendering twice: the same bytes
    check = [*args[2:], "--check"]
    assert tables.main(check) == 0
    readme.write_text(text.replace("| 0.300 |", "| 0.301 |"))  # a number typed by hand
    assert tables.main(check) == 1
    (tmp_path / "tracked.txt").write_text("two\n")
    assert tables.main(args) == 0 and readme.read_text() == text  # the same run: where it ran is not restamped
    _demo_run(run, scores | {"retain": (0.31, 0.5)})  # a new run, made in the changed checkout
    assert tables.main(args) == 0 and f"at commit {commit} + uncommitted changes on" in readme.read_text()


@pytest.mark.slow
@pytest.mark.skipif(os.environ.get("DISTILLAB_CHECK_DEMO") != "1", reason="runs the whole demo: DISTILLAB_CHECK_DEMO=1")
def test_the_demo_prints_the_recorded_scores(tmp_path):
    from distillab.demo import run_demo

    summary = run_demo(tmp_path / "runs")
    recorded = json.loads(RECORD.read_text())["models"]
    assert summary["models"] == recorded, f"the demo's scores are not the recorded ones: {RERUN}"
    shutil.rmtree(tmp_path / "runs", ignore_errors=True)
