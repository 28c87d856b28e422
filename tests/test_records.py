"""Typed records: every field documented, old run files still load and write back the same JSON, a bad file is
one line naming it, and the one score lookup."""

from __future__ import annotations

import json
import math

import pytest
from pydantic import BaseModel

from distillab import records
from distillab.errors import UserError
from distillab.records import EvalResult, Ledger, read_eval, read_ledger, suite_score, write_record
from distillab.report import build_report
from distillab.report.finish import load_evals
from distillab.report.html import task_skills
from distillab.rundir import RunDir
from distillab.scoring import evaluate_model
from tests.helpers import run_config

# An eval file as the first evaluate wrote it (76d479c): no "suites", no "label".
OLD_EVAL = """{
 "model": "lab:base",
 "parameters": 819200,
 "skills": {"add": {"score": 0.5, "n": 2, "ci": [0.0, 1.0], "scores": [1.0, 0.0]},
            "upper": {"score": 1.0, "n": 2, "ci": [1.0, 1.0], "scores": [1.0, 1.0]}},
 "task": {"score": 0.5, "ci": [0.0, 1.0]},
 "general": {"score": 1.0, "ci": [1.0, 1.0]},
 "world_text_perplexity": 7.25,
 "eval_seconds": 0.4
}"""

# A ledger as the first costs.py wrote it (4068a72): no "retain", and break_even without "retain_usd".
OLD_LEDGER = """{
 "format": "distillab-ledger/1", "run": "old", "created_at": "2026-11-28T00:00:00Z",
 "teacher_generation": {"model": "lab:teacher", "data_source": "teacher",
  "pricing": {"status": "local", "model": "lab:teacher", "provider": null, "usd_per_1m_input": 0.0,
              "usd_per_1m_output": 0.0, "description": "lab:teacher: local teacher, no API cost"},
  "price_status": "local", "prompt_tokens": 9000, "completion_tokens": 3000, "rows": 1000, "usd": 0.0},
 "training": {"flops": 1.3e14, "train_seconds": 300.0, "steps": 200, "usd_per_hour": 0.1, "usd": 0.008},
 "serving": {"student_tokens_per_s": 1500.0, "throughput": {"tokens_per_s": 1500.0, "tokens": 3000, "seconds": 2.0,
  "batch_size": 32, "batches": 3, "device": "cpu", "reason": null}, "usd_per_hour": 0.1,
  "student_usd_per_1m_tokens": 0.0185, "teacher_api_usd_per_1m_output": 0.6, "teacher_api_usd_per_1m_input": 0.15,
  "teacher_price_basis": "notional", "teacher_price_description": "priced like a small API"},
 "break_even": {"price_basis": "notional", "tokens_per_query": {"prompt": 9.0, "completion": 3.0,
  "from": "teacher usage"}, "queries_per_month": 1000000.0, "status": "pays_off", "queries": 41234,
  "saving_per_query_usd": 3.1e-06, "one_off_usd": 0.01, "teacher_usd": 0.002, "training_usd": 0.008,
  "api_usd_per_query": 3.15e-06, "student_usd_per_query": 5.6e-08, "months": 0.041234},
 "quality": {"task": {"teacher": 0.9, "base": 0.5, "distilled": 0.8, "given_up_vs_teacher": 0.1,
  "change_vs_base": 0.3}},
 "total_usd": 0.008,
 "notes": ["break-even uses a NOTIONAL teacher API price: priced like a small API"]
}"""


def _records() -> list[type[BaseModel]]:
    found, todo = [], [EvalResult, Ledger]
    while todo:
        cls = todo.pop()
        if cls not in found:
            found.append(cls)
            todo += [a for f in cls.model_fields.values() for a in _model_types(f.annotation)]
    return found


def _model_types(annotation) -> list[type[BaseModel]]:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    return [t for arg in getattr(annotation, "__args__", ()) for t in _model_types(arg)]


def test_every_field_of_every_record_has_a_docstring():
    classes = _records()
    assert {c.__name__ for c in classes} >= {
        "EvalResult",
        "SuiteScore",
        "SkillScore",
        "Suites",
        "Ledger",
        "TeacherGeneration",
        "TrainingCost",
        "RetainCost",
        "ServingCost",
        "Throughput",
        "BreakEven",
        "TokensPerQuery",
        "SuiteQuality",
    }
    undocumented = [
        f"{c.__name__}.{name}"
        for c in classes
        for name, f in c.model_fields.items()
        if not (f.description or "").strip()
    ]
    assert undocumented == []


def test_old_eval_file_loads_and_writes_back_the_same_json(tmp_path):
    path = tmp_path / "base.json"
    path.write_text(OLD_EVAL)
    res = read_eval(path)
    assert res.suites is None and res.label is None and res.skills["add"].scores == [1.0, 0.0]
    assert res.task.score == 0.5 and res.task.ci == [0.0, 1.0]
    write_record(tmp_path / "again.json", res)
    assert json.loads((tmp_path / "again.json").read_text()) == json.loads(OLD_EVAL)  # no keys added


def test_old_ledger_loads_and_writes_back_the_same_json(tmp_path):
    path = tmp_path / "ledger.json"
    path.write_text(OLD_LEDGER)
    ledger = read_ledger(path)
    assert ledger.retain.enabled is False and ledger.retain.usd == 0.0  # before retain: none was used
    assert ledger.break_even.retain_usd is None and ledger.break_even.tokens_per_query.source == "teacher usage"
    assert ledger.to_dict() == json.loads(OLD_LEDGER)


def test_report_from_an_old_run(tmp_path):
    cfg = run_config(tmp_path, "old", data={"skills": ["add"]})
    (cfg.run_dir / "eval").mkdir(parents=True)
    for label in ("teacher", "base", "distilled"):
        (cfg.run_dir / "eval" / f"{label}.json").write_text(OLD_EVAL)
    (cfg.run_dir / "eval" / "lm_eval_base.json").write_text('{"results": {}}')  # lm-eval's own file: not read
    (cfg.run_dir / "ledger.json").write_text(OLD_LEDGER)
    evals = load_evals(RunDir(cfg.run_dir))
    assert list(evals) == ["base", "distilled", "teacher"]
    assert task_skills(cfg, evals) == {"add"}  # no "suites" in the files: the config says
    page = build_report(cfg, evals, read_ledger(cfg.run_dir / "ledger.json")).read_text()
    assert "kept its general skill; it pays off after 41k queries" in page and "<td>distilled</td>" in page


def test_a_record_writes_only_the_fields_it_was_given(tmp_path):
    # A run without retain writes the short retain section it always wrote; unknown break-even, only its keys.
    assert records.RetainCost(enabled=False, usd=0.0).to_dict() == {"enabled": False, "usd": 0.0}
    be = records.BreakEven(price_basis="unpriced", status="unknown", queries=None, reason="no teacher API price")
    assert be.to_dict() == {
        "price_basis": "unpriced",
        "status": "unknown",
        "queries": None,
        "reason": "no teacher API price",
    }
    # A bootstrap of 0 gives NaN intervals: written as NaN (as json.dumps always did) and read back as NaN.
    res = EvalResult(model="m", task={"score": 0.5, "ci": [math.nan, math.nan]}, general={"score": None})
    write_record(tmp_path / "m.json", res)
    assert '"ci": [\n   NaN,' in (tmp_path / "m.json").read_text()
    assert all(math.isnan(c) for c in read_eval(tmp_path / "m.json").task.ci)


@pytest.mark.parametrize(
    "content, says",
    [
        ('{"task": ', "is corrupt"),
        ("[1, 2]", "is not an eval result (top level: Input should be a valid dictionary"),
        (
            '{"model": "m", "task": {"score": "high"}, "general": {"score": 0.5}}',
            "(task.score: Input should be a valid",
        ),
        ('{"model": "m", "general": {"score": 0.5}}', "(task: Field required)"),
        ('{"model": "m", "task": {"score": 0.5}, "general": {"score": 0.5}, "tasks": 1}', "(tasks: Extra inputs"),
        (b"\xff\xfe{}", "not UTF-8"),
    ],
)
def test_bad_eval_file_is_one_line_naming_it(tmp_path, content, says):
    cfg = run_config(tmp_path, "r")
    path = cfg.run_dir / "eval" / "teacher.json"
    path.parent.mkdir(parents=True)
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    with pytest.raises(UserError) as err:
        load_evals(RunDir(cfg.run_dir))
    message = str(err.value)
    assert str(path) in message and says in message and "\n" not in message


@pytest.mark.parametrize(
    "change, says",
    [
        (lambda d: d.pop("format"), "(format: Field required)"),
        (lambda d: d.update(format="distillab-ledger/2"), "(format: Input should be 'distillab-ledger/1')"),
        (lambda d: d["break_even"].update(status="maybe"), "(break_even.status: Input should be"),
        (lambda d: d["teacher_generation"].update(usd="free"), "(teacher_generation.usd: Input should be"),
    ],
)
def test_wrong_shaped_ledger_is_one_line_naming_it(tmp_path, change, says):
    data = json.loads(OLD_LEDGER)
    change(data)
    path = tmp_path / "ledger.json"
    path.write_text(json.dumps(data))
    with pytest.raises(UserError) as err:
        read_ledger(path)
    message = str(err.value)
    assert message.startswith(f"{path} is not a distillab ledger") and says in message and "\n" not in message
    with pytest.raises(UserError, match="is missing"):
        read_ledger(tmp_path / "nowhere.json")


def test_the_one_score_lookup():
    evals = {"base": EvalResult(model="b", task={"score": 0.25}, general={"score": None})}
    assert suite_score(evals, "base", "task") == 0.25
    assert suite_score(evals, "base", "general") is None  # an empty suite
    assert suite_score(evals, "teacher", "task") is None  # a model not evaluated
    with pytest.raises(ValueError, match="no suite 'tasks'"):
        suite_score(evals, "base", "tasks")


def test_dict_style_reads_match_the_fields():
    res = EvalResult.model_validate(json.loads(OLD_EVAL))
    assert res["task"]["score"] == res.task.score and res["skills"]["add"]["n"] == 2
    with pytest.raises(KeyError):
        res["model_dump"]  # methods are not fields


def test_evaluate_writes_a_record_that_reads_back_equal(tmp_path, tiny_student):
    res = evaluate_model(tiny_student, ["add"], ["upper"], n=3, n_boot=20, max_new_tokens=4)
    assert isinstance(res, EvalResult) and res.suites.task == ["add"] and res.skills["add"].n == 3
    assert res.task.score == pytest.approx(sum(res.skills["add"].scores) / 3)
    res.label = "base"
    write_record(tmp_path / "base.json", res)
    on_disk = json.loads((tmp_path / "base.json").read_text())
    # The layout eval files have always had, in this order, with the label last.
    assert list(on_disk) == [
        "model",
        "parameters",
        "skills",
        "task",
        "general",
        "suites",
        "world_text_perplexity",
        "eval_seconds",
        "label",
    ]
    assert read_eval(tmp_path / "base.json") == res


def test_lm_eval_results_reach_the_summary_the_report_and_the_leaderboard(tmp_path):
    from rich.console import Console

    from distillab import registry
    from distillab.report import terminal_summary

    cfg = run_config(tmp_path, "lm", data={"skills": ["add"]})
    run = RunDir(cfg.run_dir)
    run.evals.mkdir(parents=True)
    for label in ("teacher", "base", "distilled"):
        run.eval(label).write_text(OLD_EVAL)
    # lm-eval's own file, as lm_eval_bridge writes it: flat scores per task, acc preferred over its stderr
    for label, acc in (("base", 0.25), ("distilled", 0.625)):
        run.lm_eval(label).write_text(
            json.dumps({"scores": {"arc_tiny": {"acc": acc, "acc_stderr": 0.1}, "wiki": {"word_perplexity": 31.5}}})
        )
    lm_evals = records.read_lm_evals(run.lm_eval_files())
    assert lm_evals["distilled"] == {"arc_tiny": ("acc", 0.625), "wiki": ("word_perplexity", 31.5)}
    evals, ledger = load_evals(run), Ledger.model_validate(json.loads(OLD_LEDGER))
    run.ledger.write_text(OLD_LEDGER)
    page = build_report(cfg, evals, ledger).read_text()
    assert "lm-evaluation-harness" in page and "<td>0.625</td>" in page and "<td>0.250</td>" in page
    console = Console(record=True, width=160)
    console.print(terminal_summary(evals, ledger, lm_evals))
    text = console.export_text()
    assert "arc_tiny (acc)" in text and "0.625" in text
    registry.record_run(run.registry, cfg, evals, ledger, lm_evals)
    console = Console(record=True, width=200)
    console.print(registry.leaderboard_table(registry.rank_runs(run.registry)))
    board = console.export_text()
    assert "lm-eval" in board and "0.625" in board  # the accuracy alone: a perplexity is not averaged in
