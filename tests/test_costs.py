"""The cost ledger: break-even arithmetic by hand, price states (never a silent $0), and ledger.json."""

from __future__ import annotations

import json
import math

import pytest

from distillab import costs
from distillab.config import RunConfig
from distillab.records import Throughput, read_ledger
from distillab.rundir import RunDir
from tests.helpers import run_config


def test_break_even_hand_computed():
    # Teacher API: 1000 prompt + 500 completion tokens at $3 / $15 per 1M -> $0.003 + $0.0075 = $0.0105 a query.
    api = costs.api_usd_per_query(1000, 500, 3.0, 15.0)
    assert api == pytest.approx(0.0105)
    # Student: 500 tokens at 250 tokens/s = 2 s of a $1.80/h device -> $0.001 a query; $2.00 per 1M tokens.
    student = costs.student_usd_per_query(500, 250, 1.80)
    assert student == pytest.approx(0.001)
    assert costs.usd_per_1m_tokens(250, 1.80) == pytest.approx(2.0)
    # One-off $10: distilling is cheaper once 10 + N*0.001 < N*0.0105, i.e. N > 1052.6 -> N = 1053.
    be = costs.break_even(10.0, api, student)
    assert be == {"status": "pays_off", "queries": 1053, "saving_per_query_usd": pytest.approx(0.0095)}
    n = be["queries"]
    assert 10.0 + n * student < n * api and not 10.0 + (n - 1) * student < (n - 1) * api


def test_break_even_never_and_immediately():
    assert costs.break_even(10.0, 0.001, 0.002)["status"] == "never"
    assert costs.break_even(10.0, 0.001, 0.001) == {"status": "never", "queries": None, "saving_per_query_usd": 0.0}
    assert costs.break_even(0.0, 0.002, 0.001)["status"] == "immediately"
    assert costs.break_even(0.0, 0.002, 0.001)["queries"] == 0


def test_human_count_and_phrases():
    assert [costs.human_count(n) for n in (950, 41_234, 1_234_567, 12_000_000)] == ["950", "41k", "1.2M", "12M"]
    be = {
        "status": "pays_off",
        "queries": 41_234,
        "months": 41_234 / 1e6,
        "queries_per_month": 1e6,
        "price_basis": "priced",
    }
    assert costs.break_even_phrase(be) == "it pays off after 41k queries (about 1 day at 1.0M queries a month)"
    assert "notional" in costs.break_even_phrase(be | {"price_basis": "notional"})
    assert "unknown (no teacher API price)" in costs.break_even_phrase(
        {"status": "unknown", "reason": "no teacher API price"}
    )


# ----------------------------------------------------------------------------------------------------
# build_ledger over a fake run directory (throughput faked: measured for real in its own test below).

EVALS = {
    "teacher": {"model": "t", "task": {"score": 0.9}, "general": {"score": 0.8}},
    "base": {"model": "b", "task": {"score": 0.2}, "general": {"score": 0.6}},
    "distilled": {"model": "d", "task": {"score": 0.7}, "general": {"score": 0.5}},
}


# A floor every student meets: these tests are about the arithmetic; the floor has its own tests below.
NO_FLOOR = {"min_task_score": 0.0, "max_general_drop": None}


def _run(tmp_path, generate_summary: dict | None, **cfg) -> RunConfig:
    config = run_config(tmp_path, "r", **({"eval": NO_FLOOR} | cfg))
    run = RunDir(config.run_dir)
    run.data.mkdir(parents=True)
    run.student.mkdir()
    if generate_summary is not None:
        run.generate_summary("train").write_text(json.dumps(generate_summary))
    run.train_summary.write_text(json.dumps({"train_seconds": 360.0, "flops": 1e15, "steps": 100}))
    return config


@pytest.fixture
def fake_throughput(monkeypatch):
    monkeypatch.setattr(
        costs,
        "measure_throughput",
        lambda *a, **k: Throughput(
            tokens_per_s=250.0, tokens=500, seconds=2.0, batch_size=32, batches=1, device="cpu", reason=None
        ),
    )
    monkeypatch.setattr(costs, "serving_prompts", lambda cfg: ["1+1=\n"])


def _priced_run(tmp_path, floor: dict, queries_per_month: float = 1e6) -> RunConfig:
    """A run whose teacher is priced by the config ($3 / $15 per 1M) on 100 rows of 1,000 + 500 tokens; `floor`: its
    [eval] quality floor ({}: the defaults)."""
    summary = {"rows": 100, "prompt_tokens": 100_000, "completion_tokens": 50_000, "usd": 1.05, "priced": True}
    teacher = {"model": "big", "base_url": "http://127.0.0.1:9/v1", "usd_per_1m_input": 3.0, "usd_per_1m_output": 15.0}
    costs_cfg = {"train_usd_per_hour": 1.0, "serve_usd_per_hour": 1.8, "queries_per_month": queries_per_month}
    return _run(tmp_path, summary, teacher=teacher, costs=costs_cfg, eval=floor)


def test_ledger_with_priced_override_teacher(tmp_path, fake_throughput):
    cfg = _priced_run(tmp_path, NO_FLOOR, queries_per_month=1000)
    ledger = costs.build_ledger(cfg, EVALS)
    assert json.loads(RunDir(cfg.run_dir).ledger.read_text()) == ledger.to_dict()
    assert read_ledger(RunDir(cfg.run_dir).ledger) == ledger
    assert ledger["teacher_generation"]["price_status"] == "override"
    assert ledger["training"]["usd"] == pytest.approx(0.1)  # 360 s at $1/h
    assert ledger["total_usd"] == pytest.approx(1.15)
    assert ledger["serving"]["student_usd_per_1m_tokens"] == pytest.approx(2.0)
    assert ledger["serving"]["teacher_api_usd_per_1m_output"] == 15.0
    be = ledger["break_even"]
    # Per query (means of the teacher's usage): 1000 in + 500 out -> API $0.0105, student $0.001 (above).
    assert be["price_basis"] == "override"
    assert be["api_usd_per_query"] == pytest.approx(0.0105) and be["student_usd_per_query"] == pytest.approx(0.001)
    assert be["queries"] == math.floor(1.15 / 0.0095) + 1 == 122
    assert be["months"] == pytest.approx(0.122)
    assert ledger["quality"]["task"]["given_up_vs_teacher"] == pytest.approx(0.2)
    assert ledger["quality"]["general"]["change_vs_base"] == pytest.approx(-0.1)


def test_unpriced_teacher_is_explicit_never_zero(tmp_path, fake_throughput):
    summary = {"rows": 10, "prompt_tokens": 1000, "completion_tokens": 500, "usd": None, "priced": False}
    cfg = _run(tmp_path, summary, teacher={"model": "no-such-model-xyz", "base_url": "http://127.0.0.1:9/v1"})
    ledger = costs.build_ledger(cfg, EVALS)
    assert ledger["teacher_generation"]["price_status"] == "unpriced"
    assert ledger["teacher_generation"]["usd"] is None and ledger["total_usd"] is None
    assert ledger["break_even"]["status"] == "unknown" and "teacher API price" in ledger["break_even"]["reason"]
    assert any("UNPRICED" in n for n in ledger["notes"])


def test_local_teacher_uses_notional_price(tmp_path, fake_throughput):
    summary = {"rows": 100, "prompt_tokens": 100_000, "completion_tokens": 50_000, "usd": 0.0, "priced": True}
    cfg = _run(tmp_path, summary, costs={"train_usd_per_hour": 1.0, "serve_usd_per_hour": 1.8})
    ledger = costs.build_ledger(cfg, EVALS)
    assert ledger["teacher_generation"]["price_status"] == "local" and ledger["teacher_generation"]["usd"] == 0.0
    be = ledger["break_even"]
    assert be["price_basis"] == "notional" and any("NOTIONAL" in n for n in ledger["notes"])
    p = costs.NOTIONAL_API_PRICE
    # The one-off teacher data is priced like the per-query calls: notionally, not at $0.
    assert be["teacher_usd"] == pytest.approx((100_000 * p["usd_per_1m_input"] + 50_000 * p["usd_per_1m_output"]) / 1e6)
    api = costs.api_usd_per_query(1000, 500, p["usd_per_1m_input"], p["usd_per_1m_output"])
    assert be["api_usd_per_query"] == pytest.approx(api)
    assert be["status"] == "never"  # $0.00045 a query through the API < $0.001 on this slow student
    assert ledger["total_usd"] == pytest.approx(0.1)  # actual spend: training only


def test_ground_truth_run_has_no_teacher_spend(tmp_path, fake_throughput):
    cfg = _run(tmp_path, None, data={"source": "lab"})
    ledger = costs.build_ledger(cfg, EVALS)
    assert ledger["teacher_generation"]["price_status"] == "not_used" and ledger["teacher_generation"]["usd"] == 0.0
    assert ledger["break_even"]["status"] == "unknown"  # no dataset: tokens per query unknown
    assert "tokens per query" in ledger["break_even"]["reason"]


def test_throughput_is_measured_once_per_student(tmp_path, monkeypatch):
    measured = []
    monkeypatch.setattr(
        costs,
        "measure_throughput",
        lambda *a, **k: (
            measured.append(a)
            or Throughput(
                tokens_per_s=250.0 + len(measured),
                tokens=500,
                seconds=2.0,
                batch_size=32,
                batches=1,
                device="cpu",
                reason=None,
            )
        ),
    )
    monkeypatch.setattr(costs, "serving_prompts", lambda cfg: ["1+1=\n"])
    cfg = _run(tmp_path, None, data={"source": "lab"})
    run = RunDir(cfg.run_dir)
    (run.student / "model.safetensors").write_bytes(b"weights")
    first = costs.build_ledger(cfg, EVALS)
    assert len(measured) == 1 and run.throughput.is_file()
    # the report's own records beside the model change, the model does not: read back, not measured again
    (run.student / "lineage.json").write_text("{}")
    (run.student / "README.md").write_text("card")
    again = costs.build_ledger(cfg, EVALS)
    assert len(measured) == 1 and again.serving == first.serving
    assert again.serving.to_dict() == first.serving.to_dict()
    (run.student / "model.safetensors").write_bytes(b"retrained")  # a new student is measured again
    assert costs.build_ledger(cfg, EVALS).serving.student_tokens_per_s == 252.0 and len(measured) == 2


def test_measure_throughput_on_lab_model():
    prompts = ["12+7=\n", "reverse abc\n", "upper xyz\n", "3+4=\n"]
    t = costs.measure_throughput("lab:base", prompts, max_new_tokens=8, seconds=0.2)
    assert t["tokens_per_s"] > 0 and t["tokens"] > 0 and t["batch_size"] == 4
    assert costs.measure_throughput("/no/such/dir", prompts, 8)["tokens_per_s"] is None


# ----------------------------------------------------------------------------------------------------
# The quality floor: "pays off" is said only of a student good enough to replace the teacher.


def test_a_student_below_the_task_floor_never_pays_off(tmp_path, fake_throughput):
    # teacher task 0.9: the default floor is 90% of it, 0.81; the student scored 0.7
    ledger = costs.build_ledger(_priced_run(tmp_path, {}), EVALS)
    floor, be = ledger.quality_floor, ledger.break_even
    assert floor.meets is False and floor.required_task == pytest.approx(0.81)
    assert be.status == "below_floor" and be.queries is None
    assert be.one_off_usd == pytest.approx(1.15)  # what was already spent stays on the record
    phrase = costs.break_even_phrase(be)
    assert "does not replace the teacher: task 0.700 < 0.810 required" in phrase and "pays off" not in phrase


def test_a_student_that_forgot_too_much_never_pays_off(tmp_path, fake_throughput):
    # task floor met (0.7 >= 0.6) but general fell 10 points below the base (0.5 vs 0.6), 5 allowed
    ledger = costs.build_ledger(_priced_run(tmp_path, {"min_task_score": 0.6, "max_general_drop": 0.05}), EVALS)
    assert ledger.quality_floor.meets is False and ledger.break_even.status == "below_floor"
    assert "10.0 points below the base's 0.600" in costs.break_even_phrase(ledger.break_even)


def test_a_student_that_meets_the_floor_gets_its_break_even(tmp_path, fake_throughput):
    ledger = costs.build_ledger(_priced_run(tmp_path, {"min_task_share": 0.75, "max_general_drop": 0.15}), EVALS)
    assert ledger.quality_floor.meets is True and ledger.quality_floor.required_task == pytest.approx(0.675)
    assert ledger.break_even.status == "pays_off" and ledger.break_even.queries == 122
    assert costs.break_even_phrase(ledger.break_even).startswith("it pays off after 122 queries")


def test_quality_unknown_without_a_teacher_score_or_a_floor(tmp_path, fake_throughput):
    evals = {label: e for label, e in EVALS.items() if label != "teacher"}
    ledger = costs.build_ledger(_priced_run(tmp_path, {}), evals)
    assert ledger.quality_floor.meets is None and ledger.break_even.status == "unknown"
    assert "min_task_score" in ledger.break_even.reason
    ledger = costs.build_ledger(
        _priced_run(tmp_path / "floor", {"min_task_score": 0.5, "max_general_drop": 0.2}), evals
    )
    assert ledger.break_even.status == "pays_off"
