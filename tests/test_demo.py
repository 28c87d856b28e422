"""The demo's summary (summary.json) and the lines it prints: a gap closed only where the share means something,
the change in points where it does not (the demo's own general suite: teacher and base 0.2 points apart)."""

from __future__ import annotations

import pytest

from distillab.demo import demo_summary, print_summary
from distillab.records import as_evals

# the shape of the demo's scores: a wide task gap, a general gap of 0.2 points
SCORES = {
    "teacher": (0.905, 0.452),
    "base": (0.020, 0.450),
    "distilled": (0.700, 0.399),
    "zero_distill": (0.050, 0.455),
    "retain": (0.380, 0.409),
}


def _evals(scores: dict[str, tuple[float, float]]):
    return as_evals(
        {
            label: {"model": label, "task": {"score": task, "ci": None}, "general": {"score": general, "ci": None}}
            for label, (task, general) in scores.items()
        }
    )


def test_summary_has_no_share_of_a_gap_too_small_to_divide_by():
    summary = demo_summary(_evals(SCORES), 12.0)
    assert summary["task_gap_closed"] == pytest.approx((0.700 - 0.020) / (0.905 - 0.020))
    # (0.399 - 0.450) / (0.452 - 0.450) = -25.5, the "-2550%" a share would print: None, and the change instead
    assert summary["general_gap_closed"] is None
    assert summary["general_change"] == pytest.approx(-0.051)
    assert summary["retain_task_gap_closed"] == pytest.approx((0.380 - 0.020) / (0.905 - 0.020))
    assert summary["retain_general_change"] == pytest.approx(-0.041)
    assert summary["models"]["distilled"] == {"task": 0.700, "general": 0.399}  # the scores as they are


def test_a_student_that_moved_away_from_the_teacher_has_no_share():
    scores = SCORES | {"distilled": (0.010, 0.399)}  # the task score below the base's: away from the teacher
    assert demo_summary(_evals(scores), 1.0)["task_gap_closed"] is None


def test_print_summary_says_points_and_why(capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "250")  # one printed line a line, not wrapped
    summary = demo_summary(_evals(SCORES), 12.0) | {"retain_recipe": {"replay_source": "base", "step": 400}}
    print_summary(summary, "runs/demo/report.html")
    out = capsys.readouterr().out
    assert "task gap closed 77%" in out  # (0.700 - 0.020) / (0.905 - 0.020) = 0.768
    assert "general -5.1 points vs base (teacher and base are 0.2 points apart, too close to divide by)" in out
    assert "distilled + retain: task gap closed 41%, general -4.1 points vs base (teacher and base" in out
    assert "-2550%" not in out and "general gap closed" not in out
