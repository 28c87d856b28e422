"""The runs registry: every run in one SQLite table, and the leaderboard ranked by value.

One row per run directory (its absolute path is the key): recording the same run again updates its row and
keeps its first-recorded time. `config_hash` hashes the config without `name` and `runs_dir`, so repeats
of one experiment share a hash.

Ranking rule (`rank_runs`). A run's *net task score* is the distilled student's task score minus the
general-suite points it lost against the base model (gains are not credited; an unknown base counts as no
loss; floored at 0), and its *value* is net task score per dollar of distillation (teacher generation $ +
training $); runs rank by value, highest first. A $0 run has unbounded value and ranks above every paid run,
a run whose cost is unknown (unpriced teacher) ranks below every priced run, and inside each group and on
equal values the higher net score, then the smaller general loss, then the name decides. Tokens consumed
never enter the rank.
"""

from __future__ import annotations

import hashlib
import json
import math
import sqlite3
from datetime import UTC, datetime
from pathlib import Path

from distillab.errors import UserError
from distillab.records import EvalResult, Ledger, as_evals, suite_score
from distillab.rundir import RunDir

SCHEMA = """
CREATE TABLE IF NOT EXISTS runs (
    run_dir TEXT PRIMARY KEY,        -- absolute path: one row per run directory
    name TEXT NOT NULL,
    config_hash TEXT NOT NULL,       -- config without name/runs_dir
    config_json TEXT NOT NULL,
    created_at TEXT NOT NULL,        -- first recorded
    updated_at TEXT NOT NULL,        -- last recorded
    scores_json TEXT NOT NULL,       -- {label: {task, general, task_ci, general_ci, lm_eval?}} for every evaluated model
    distilled_task REAL, distilled_general REAL, base_task REAL, base_general REAL,
    teacher_task REAL, teacher_general REAL,
    teacher_usd REAL, train_usd REAL, total_usd REAL,  -- total = teacher generation + training; NULL: unknown
    price_status TEXT,
    teacher_tokens INTEGER,
    break_even_status TEXT, break_even_queries INTEGER,
    lineage_json TEXT                -- a summary: base model, teachers, effective token fractions
)
"""


RANKED_COLUMNS = (
    "name",
    "scores_json",
    "lineage_json",
    "distilled_task",
    "distilled_general",
    "base_general",
    "total_usd",
    "break_even_status",
    "break_even_queries",
)  # what the ranking and the table read


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


def _unusable(path: Path, why) -> UserError:
    return UserError(
        f"{path}: not a usable runs registry ({why}): move it away; `distillab report CONFIG` records a run again"
    )


def _existing_tables(path: Path) -> set[str]:
    """Tables of an existing registry file, read-only: another program's database is never written to."""
    if path.exists() and not path.is_file():
        raise _unusable(path, "not a file")
    if not path.is_file() or path.stat().st_size == 0:
        return set()
    try:
        conn = sqlite3.connect(path.resolve().as_uri() + "?mode=ro", uri=True, timeout=30)
        try:
            return {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        finally:
            conn.close()
    except sqlite3.DatabaseError as err:
        raise _unusable(path, err) from None


def _connect(path: Path) -> sqlite3.Connection:
    tables = _existing_tables(path)
    if tables and "runs" not in tables:
        raise _unusable(path, f"a database of another program, tables: {', '.join(sorted(tables))}")
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        conn = sqlite3.connect(path, timeout=30)  # concurrent runs finishing together wait, not fail
        conn.row_factory = sqlite3.Row
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute(SCHEMA)
    except sqlite3.DatabaseError as err:
        raise _unusable(path, err) from None
    return conn


def config_hash(cfg) -> str:
    data = {k: v for k, v in cfg.model_dump().items() if k not in ("name", "runs_dir")}
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _scores(evals: dict[str, EvalResult], lm_evals: dict | None = None) -> dict:
    """Per model: task and general scores with intervals, and its lm-eval tasks ({task: [metric, value]}) if any."""
    scores = {
        label: {
            "task": res.task.score,
            "general": res.general.score,
            "task_ci": res.task.ci,
            "general_ci": res.general.ci,
        }
        for label, res in evals.items()
    }
    for label, tasks in (lm_evals or {}).items():
        scores.setdefault(label, {})["lm_eval"] = {task: list(pair) for task, pair in tasks.items()}
    return scores


def lineage_summary(run_dir: Path) -> dict | None:
    """The few lineage facts worth a leaderboard column, read generically from student/lineage.json."""
    from distillab.provenance import LINEAGE_FILE  # here: provenance loads pyarrow, which `leaderboard` never needs

    path = RunDir(run_dir).student / LINEAGE_FILE
    if not path.is_file():
        return None
    lineage = json.loads(path.read_text())
    return {
        "base_model": lineage.get("base_model"),
        "root_model": lineage.get("root_model"),
        "teachers": lineage.get("teachers"),
        "generations": len(lineage.get("generations") or []),
        "effective_fractions": lineage.get("effective_fractions"),
    }


def record_run(
    registry_path: Path, cfg, evals: dict[str, EvalResult], ledger: Ledger, lm_evals: dict | None = None
) -> None:
    """Insert the run, or update its row when this run directory was recorded before (records or their JSON
    dicts)."""
    run_dir = Path(cfg.run_dir).resolve()
    evals, ledger = as_evals(evals), Ledger.model_validate(ledger)
    teacher, be = ledger.teacher_generation, ledger.break_even
    tokens = None if teacher.prompt_tokens is None else teacher.prompt_tokens + (teacher.completion_tokens or 0)
    now = _now()
    row = {
        "run_dir": str(run_dir),
        "name": cfg.name,
        "config_hash": config_hash(cfg),
        "config_json": json.dumps(cfg.model_dump(), sort_keys=True, default=str),
        "created_at": now,
        "updated_at": now,
        "scores_json": json.dumps(_scores(evals, lm_evals)),
        **{
            f"{label}_{suite}": suite_score(evals, label, suite)
            for label in ("distilled", "base", "teacher")
            for suite in ("task", "general")
        },
        "teacher_usd": teacher.usd,
        "train_usd": ledger.training.usd,
        "total_usd": ledger.total_usd,
        "price_status": teacher.price_status,
        "teacher_tokens": tokens,
        "break_even_status": be.status,
        "break_even_queries": be.queries,
        "lineage_json": json.dumps(lineage_summary(run_dir)),
    }
    columns = list(row)
    updates = ", ".join(f"{c} = excluded.{c}" for c in columns if c not in ("run_dir", "created_at"))
    conn = _connect(Path(registry_path))
    try:
        with conn:
            conn.execute(
                f"INSERT INTO runs ({', '.join(columns)}) VALUES ({', '.join('?' * len(columns))}) "
                f"ON CONFLICT(run_dir) DO UPDATE SET {updates}",
                [row[c] for c in columns],
            )
    finally:
        conn.close()


# ----------------------------------------------------------------------------------------------------
# Ranking (the rule is in the module docstring).


def value_of(run: dict) -> dict:
    """The numbers the rank is made of: general loss, net task score, value (per $), and the cost group."""
    task, gen, base_gen = run.get("distilled_task"), run.get("distilled_general"), run.get("base_general")
    general_loss = max(0.0, base_gen - gen) if None not in (gen, base_gen) else 0.0
    net = max(0.0, (task or 0.0) - general_loss)
    usd = run.get("total_usd")
    if usd is None:
        group, value = 2, None  # unknown cost: below every priced run
    elif usd <= 0:
        group, value = 0, math.inf  # free: above every paid run
    else:
        group, value = 1, net / usd
    return {"general_loss": general_loss, "net_score": net, "value": value, "cost_group": group}


def _rank_key(run: dict) -> tuple:
    numbers = run["rank_numbers"]
    value = numbers["value"] if numbers["value"] is not None and numbers["cost_group"] == 1 else 0.0
    return numbers["cost_group"], -value, -numbers["net_score"], numbers["general_loss"], run["name"]


def read_runs(registry_path: Path) -> list[dict]:
    registry_path = Path(registry_path)
    if not registry_path.is_file():
        raise UserError(f"no registry at {registry_path}: finish a run first (`distillab run CONFIG`)")
    if "runs" not in _existing_tables(registry_path):  # reading never creates the table in someone's file
        raise _unusable(registry_path, "no runs table")
    try:
        conn = sqlite3.connect(registry_path.resolve().as_uri() + "?mode=ro", uri=True, timeout=30)
        conn.row_factory = sqlite3.Row
        try:
            columns = {r[1] for r in conn.execute("PRAGMA table_info(runs)")}
            missing = [c for c in RANKED_COLUMNS if c not in columns]
            if missing:  # a `runs` table of another program
                raise KeyError(f"the runs table has no column {missing[0]!r}")
            rows = [dict(r) for r in conn.execute("SELECT * FROM runs")]
        finally:
            conn.close()
        for r in rows:
            r["scores"] = json.loads(r.pop("scores_json"))
            r["lineage"] = json.loads(r.pop("lineage_json") or "null")
    except (sqlite3.DatabaseError, json.JSONDecodeError, TypeError, KeyError) as err:
        raise _unusable(registry_path, f"{type(err).__name__}: {err}") from None
    return rows


def rank_runs(registry_path: Path) -> list[dict]:
    """Every recorded run, best value first, each with rank (1-based) and rank_numbers (see value_of)."""
    runs = read_runs(registry_path)
    for run in runs:
        run["rank_numbers"] = value_of(run)
    runs.sort(key=_rank_key)
    for i, run in enumerate(runs, 1):
        run["rank"] = i
    return runs


def _fmt(x: float | None, spec: str = ".3f") -> str:
    return "-" if x is None else format(x, spec)


def _fmt_value(numbers: dict) -> str:
    if numbers["cost_group"] == 0:
        return "free"
    if numbers["cost_group"] == 2:
        return "unpriced"
    return f"{numbers['value']:.3g}/$"


def _lm_eval_mean(run: dict) -> float | None:
    """The distilled model's mean lm-eval score over its tasks scored in [0, 1] (accuracy, exact match, F1); a
    perplexity or BLEU is not averaged with them."""
    tasks = (run["scores"].get("distilled") or {}).get("lm_eval") or {}
    values = [value for metric, value in tasks.values() if metric in ("acc_norm", "acc", "exact_match", "f1")]
    return sum(values) / len(values) if values else None


def leaderboard_table(runs: list[dict]):
    from rich.table import Table

    table = Table(
        title="distillab leaderboard: net task score per $ (general loss subtracted)",
        title_justify="left",
        caption="net = task - general points lost (lost) vs base; value = net / (teacher $ + training $);"
        " free runs first, unpriced last",
        caption_justify="left",
    )
    longest = max((len(r["name"]) for r in runs), default=3)
    lm_eval = {r["name"]: _lm_eval_mean(r) for r in runs}
    columns = ("#", "run", "task", "gen", "lost", "net", "cost $", "value", "pays off")
    if any(v is not None for v in lm_eval.values()):  # the distilled model's mean lm-eval score, when any run has one
        columns = (*columns[:4], "lm-eval", *columns[4:])
    for col in columns:
        table.add_column(
            col,
            justify="left" if col in ("run", "pays off") else "right",
            no_wrap=col != "run",
            min_width=min(longest, 16) if col == "run" else None,
        )
    for run in runs:
        numbers = run["rank_numbers"]
        pays_off = {"below_floor": "no: below floor", None: "-"}.get(run["break_even_status"], run["break_even_status"])
        if pays_off == "pays_off" and run["break_even_queries"] is not None:
            from distillab.costs import human_count

            pays_off = f"{human_count(run['break_even_queries'])} q"
        cells = [
            str(run["rank"]),
            run["name"],
            _fmt(run["distilled_task"]),
            _fmt(run["distilled_general"]),
            _fmt(numbers["general_loss"]),
            _fmt(numbers["net_score"]),
            "unpriced" if run["total_usd"] is None else f"{run['total_usd']:.3g}",
            _fmt_value(numbers),
            pays_off,
        ]
        if "lm-eval" in columns:
            cells.insert(4, _fmt(lm_eval[run["name"]]))
        table.add_row(*cells)
    return table


def print_leaderboard(registry_path: Path) -> None:
    from rich.console import Console

    runs = rank_runs(registry_path)
    console = Console()
    if not runs:
        console.print(f"no runs recorded in {registry_path}")
        return
    console.print(leaderboard_table(runs))
