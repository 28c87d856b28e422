"""The runs registry: upsert per run directory, and the leaderboard's order through the real CLI."""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys

import pytest

from distillab import registry
from distillab.config import RunConfig
from distillab.errors import UserError
from tests.helpers import run_config


def evals(task: float, general: float, base_general: float = 0.6) -> dict:
    return {
        "teacher": {
            "model": "t",
            "task": {"score": 0.95, "ci": [0.9, 1.0]},
            "general": {"score": 0.9, "ci": [0.85, 0.95]},
        },
        "base": {
            "model": "b",
            "task": {"score": 0.1, "ci": [0.05, 0.15]},
            "general": {"score": base_general, "ci": [0.5, 0.7]},
        },
        "distilled": {
            "model": "d",
            "task": {"score": task, "ci": [task - 0.05, task + 0.05]},
            "general": {"score": general, "ci": [general - 0.05, general + 0.05]},
        },
    }


def ledger(teacher_usd: float | None, train_usd: float, teacher_tokens: int) -> dict:
    total = None if teacher_usd is None else teacher_usd + train_usd
    return {
        "format": "distillab-ledger/1",
        "run": "r",
        "created_at": "2026-01-01T00:00:00Z",
        "teacher_generation": {
            "usd": teacher_usd,
            "price_status": "override" if teacher_usd is not None else "unpriced",
            "prompt_tokens": teacher_tokens,
            "completion_tokens": teacher_tokens // 2,
        },
        "training": {"usd": train_usd},
        "serving": {},
        "total_usd": total,
        "break_even": {"status": "pays_off", "queries": 41_234},
        "quality": {},
        "notes": [],
    }


def record(path, tmp_path, name: str, ev: dict, led: dict, **cfg) -> RunConfig:
    config = run_config(tmp_path, name, **cfg)
    registry.record_run(path, config, ev, led)
    return config


@pytest.fixture
def three_runs(tmp_path):
    """Three runs whose order differs by raw task score, by task-per-$ and by the rule (net task per $).

    careful: task 0.90, loses 0.10 general, $2 -> net 0.80 -> 0.40/$ (fewest teacher tokens)
    cheap:   task 0.60, loses nothing,     $1 -> net 0.60 -> 0.60/$
    greedy:  task 0.95, loses 0.50 general, $1 -> net 0.45 -> 0.45/$ (most teacher tokens)
    Raw task: greedy > careful > cheap; task per $: greedy > cheap > careful; the rule: cheap > greedy > careful.
    """
    path = tmp_path / "registry.sqlite"
    record(path, tmp_path, "careful", evals(0.90, 0.50), ledger(1.5, 0.5, 1_000))
    record(path, tmp_path, "cheap", evals(0.60, 0.70), ledger(0.5, 0.5, 50_000))
    record(path, tmp_path, "greedy", evals(0.95, 0.10), ledger(0.9, 0.1, 900_000))
    return path


def test_rank_follows_the_rule(three_runs):
    runs = registry.rank_runs(three_runs)
    assert [r["name"] for r in runs] == ["cheap", "greedy", "careful"]
    assert [r["rank_numbers"]["value"] for r in runs] == pytest.approx([0.60, 0.45, 0.40])
    assert [r["rank"] for r in runs] == [1, 2, 3]
    assert runs[0]["scores"]["teacher"]["task"] == 0.95  # every model's scores are kept


def test_free_runs_first_unpriced_last(three_runs, tmp_path):
    record(three_runs, tmp_path, "free", evals(0.30, 0.60), ledger(0.0, 0.0, 10))
    record(three_runs, tmp_path, "mystery", evals(0.99, 0.60), ledger(None, 0.1, 10))
    names = [r["name"] for r in registry.rank_runs(three_runs)]
    assert names == ["free", "cheap", "greedy", "careful", "mystery"]


def test_rerecording_a_run_updates_its_row(three_runs, tmp_path):
    before = {r["name"]: r for r in registry.read_runs(three_runs)}
    record(three_runs, tmp_path, "careful", evals(0.99, 0.60), ledger(0.1, 0.1, 1_000))
    after = {r["name"]: r for r in registry.read_runs(three_runs)}
    assert len(after) == 3
    assert after["careful"]["distilled_task"] == 0.99 and after["careful"]["total_usd"] == pytest.approx(0.2)
    assert after["careful"]["created_at"] == before["careful"]["created_at"]
    assert [r["name"] for r in registry.rank_runs(three_runs)][0] == "careful"  # 0.99 / $0.2


def test_config_hash_ignores_name_and_location(tmp_path):
    a = RunConfig(name="a", runs_dir="x")
    assert registry.config_hash(a) == registry.config_hash(RunConfig(name="b", runs_dir="y"))
    assert registry.config_hash(a) != registry.config_hash(RunConfig.model_validate({"train": {"lr": 1e-4}}))


def test_registry_is_sqlite_with_one_row_per_run(three_runs):
    with sqlite3.connect(three_runs) as conn:
        rows = conn.execute("SELECT name, config_hash, teacher_tokens FROM runs ORDER BY name").fetchall()
    assert [r[0] for r in rows] == ["careful", "cheap", "greedy"]
    assert rows[0][2] == 1_500


def _cli(*args: str) -> subprocess.CompletedProcess:
    env = os.environ | {"COLUMNS": "200", "OMP_NUM_THREADS": "1", "NO_COLOR": "1"}
    return subprocess.run(
        [sys.executable, "-c", "from distillab.cli import main; main()", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )


def test_leaderboard_cli_orders_runs(three_runs):
    result = _cli("leaderboard", "--registry", str(three_runs))
    assert result.returncode == 0, result.stderr
    out = result.stdout
    positions = [out.index(f" {name} ") for name in ("cheap", "greedy", "careful")]
    assert positions == sorted(positions), out
    assert "0.6/$" in out and "41k q" in out


def test_leaderboard_missing_registry_is_one_line_error(tmp_path):
    missing = tmp_path / "none.sqlite"
    result = _cli("leaderboard", "--registry", str(missing))
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0 and "no registry at" in result.stderr
    assert "Traceback" not in result.stderr
    with pytest.raises(UserError):
        registry.rank_runs(missing)
