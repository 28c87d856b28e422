"""Bootstrap intervals cover at their nominal rate; the task-suite scorers; the user JSONL task suite."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from distillab import models
from distillab.errors import UserError
from distillab.scoring import (
    TEXT_SCORERS,
    bootstrap_ci,
    choice_loglikelihoods,
    extract_number,
    gap_change,
    load_task_suite,
    normalize_text,
    score_multiple_choice,
    score_normalized_exact,
    score_numeric,
    score_regex,
    score_task_suite,
)
from tests.helpers import write_jsonl

# ----------------------------------------------------------------------------------------------------
# Bootstrap coverage: simulate many suites whose true rate is known.


def coverage(rates: list[float], n: int, suites: int = 400, n_boot: int = 400, level: float = 0.95):
    """Fraction of simulated suites whose interval holds the true mean-of-rates, and the mean width."""
    rng = np.random.default_rng(1234)
    truth = sum(rates) / len(rates)
    hits, widths = 0, []
    for i in range(suites):
        per_skill = {f"s{j}": (rng.random(n) < p).astype(float).tolist() for j, p in enumerate(rates)}
        lo, hi = bootstrap_ci(per_skill, n_boot, seed=i, level=level)
        hits += lo <= truth <= hi
        widths.append(hi - lo)
    return hits / suites, float(np.mean(widths))


def test_bootstrap_covers_true_rate_at_nominal_level():
    p, n = 0.3, 100
    covered, width = coverage([p], n)
    assert 0.90 <= covered <= 1.0, covered
    # Not trivially wide: close to the normal interval's width 2 * 1.96 * sqrt(p(1-p)/n).
    assert width == pytest.approx(2 * 1.96 * math.sqrt(p * (1 - p) / n), rel=0.15)


def test_bootstrap_covers_mean_of_skill_means():
    # Two skills with different rates: the suite's truth is the mean of the two rates (skills count once).
    covered, _ = coverage([0.8, 0.5], n=60, suites=300)
    assert 0.90 <= covered <= 1.0, covered


def test_coverage_check_can_fail():
    # The same check on a 50% interval must fall far below 90%: the coverage test discriminates.
    covered, _ = coverage([0.3], 100, suites=200, level=0.5)
    assert covered < 0.7


def test_bootstrap_edge_cases():
    assert all(math.isnan(x) for x in bootstrap_ci({"a": [1.0, 0.0]}, 0))
    assert all(math.isnan(x) for x in bootstrap_ci({}, 100))
    assert bootstrap_ci({"a": [1.0] * 5}, 100) == [1.0, 1.0]
    assert bootstrap_ci({"a": [0.0, 1.0] * 20}, 200, seed=3) == bootstrap_ci({"a": [0.0, 1.0] * 20}, 200, seed=3)


def test_gap_change_gives_a_share_only_where_it_means_something():
    # a real gap, closed halfway: the share and the points
    half = gap_change(0.5, 0.2, 0.8)
    assert half.closed == pytest.approx(0.5) and half.points == pytest.approx(30.0) and half.why is None
    # the demo's general suite: teacher 0.452 and base 0.450 (0.2 points apart), the student 5.1 points lower:
    # gap_closed would say -2550%; gap_change gives the points and says why there is no share
    flat = gap_change(0.399, 0.450, 0.452)
    assert flat.closed is None and flat.points == pytest.approx(-5.1)
    assert flat.why == "teacher and base are 0.2 points apart, too close to divide by"
    assert gap_change(0.5, 0.5, 0.549).closed is None and gap_change(0.5, 0.5, 0.551).closed == 0.0  # MIN_GAP 0.05
    away = gap_change(0.1, 0.2, 0.8)  # a wide gap, but the student went the other way
    assert away.closed is None and away.points == pytest.approx(-10.0) and away.why == "it moved away from the teacher"
    assert gap_change(0.5, 0.2, None).why == "the teacher has no score"
    assert gap_change(None, 0.2, 0.8).points is None and gap_change(0.5, None, 0.8).why is None


# ----------------------------------------------------------------------------------------------------
# Text scorers.


def test_exact_and_normalized_exact():
    assert TEXT_SCORERS["exact"](" 42\n", "42") == 1.0 and TEXT_SCORERS["exact"]("42.", "42") == 0.0
    assert normalize_text("The  Quick, brown fox!") == "quick brown fox"
    assert score_normalized_exact("the Eiffel Tower.", "Eiffel tower") == 1.0
    assert score_normalized_exact("Eiffel", "Eiffel tower") == 0.0


def test_regex_scorer_matches_whole_prediction():
    assert score_regex(" 19 ", r"\d+") == 1.0
    assert score_regex("19 apples", r"\d+") == 0.0  # fullmatch: use .* to search
    assert score_regex("it is 19 apples", r".*\b19\b.*") == 1.0


def test_numeric_scorer_tolerance():
    assert extract_number("so the answer is 1,234.5 dollars") == 1234.5
    assert extract_number("from 3 to -7") == -7.0 and extract_number("none") is None
    assert score_numeric("x = 3.14159", "3.14", rel_tol=1e-3) == 1.0
    assert score_numeric("x = 3.2", "3.14", rel_tol=1e-3) == 0.0
    assert score_numeric("10", "10.0") == 1.0 and score_numeric("ten", "10") == 0.0
    assert score_numeric("0.0004", "0", abs_tol=1e-3) == 1.0


# ----------------------------------------------------------------------------------------------------
# Multiple choice by log-likelihood, against a naive one-sequence-at-a-time reference.


@pytest.fixture(scope="module")
def lab_model():
    torch.manual_seed(0)
    return models.load("lab:base")


def naive_loglikelihood(model, tok, prompt: str, choice: str) -> float:
    context = tok(prompt)["input_ids"]
    cont = tok(choice, add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        logprobs = model(input_ids=torch.tensor([context + cont])).logits[0].log_softmax(-1)  # (T, V)
    return sum(float(logprobs[len(context) - 1 + j, t]) for j, t in enumerate(cont))


def test_choice_loglikelihoods_match_naive(lab_model):
    model, tok = lab_model
    prompt, choices = "upper abc\n", ["ABC", "abcd", "X", "reverse cba"]  # different lengths: padding matters
    got = choice_loglikelihoods(model, tok, prompt, choices)
    want = [naive_loglikelihood(model, tok, prompt, c) for c in choices]
    assert got == pytest.approx(want, abs=1e-4)
    best = int(np.argmax(want))
    assert score_multiple_choice(model, tok, prompt, choices, best) == 1.0
    assert score_multiple_choice(model, tok, prompt, choices, (best + 1) % len(choices)) == 0.0


# ----------------------------------------------------------------------------------------------------
# The user JSONL task suite.


def test_task_suite_scores_per_skill(tmp_path, lab_model):
    model, tok = lab_model
    from distillab.sampling import generate

    said = generate(model, tok, ["upper abc\n"], max_new_tokens=16)[0].text  # what the model writes
    path = write_jsonl(
        tmp_path / "suite.jsonl",
        [
            {"prompt": "upper abc\n", "answer": said, "skill": "gen"},
            {"prompt": "upper abc\n", "answer": said + "zzz", "skill": "gen"},
            {"prompt": "upper abc\n", "answer": ".*", "scorer": "regex", "skill": "gen"},
            {"prompt": "upper abc\n", "answer": f" {said.upper()}. ", "scorer": "normalized_exact", "skill": "gen"},
            {"prompt": "upper abc\n", "choices": ["ABC", "qqqq"], "answer": "ABC", "skill": "mc"},
            "",
        ],
    )
    examples = load_task_suite(path)
    assert [e["scorer"] for e in examples] == ["exact", "exact", "regex", "normalized_exact", "multiple_choice"]
    assert examples[-1]["answer"] == 0
    per_skill = score_task_suite(model, tok, examples, max_new_tokens=16)
    assert per_skill["gen"][:3] == [1.0, 0.0, 1.0]
    assert per_skill["gen"][3] == float(normalize_text(said) == normalize_text(said.upper()))
    lls = choice_loglikelihoods(model, tok, "upper abc\n", ["ABC", "qqqq"])
    assert per_skill["mc"] == [float(lls[0] >= lls[1])]


@pytest.mark.parametrize(
    "row, message",
    [
        ('{"prompt": "x"', "malformed JSON"),
        ({"answer": "1"}, 'non-empty string "prompt"'),
        ({"prompt": "x", "answer": "1", "scorer": "fuzzy"}, "unknown scorer 'fuzzy'"),
        ({"prompt": "x", "answer": "(", "scorer": "regex"}, "bad regular expression"),
        ({"prompt": "x", "answer": "n/a", "scorer": "numeric"}, "needs a number"),
        ({"prompt": "x", "choices": ["a"], "answer": 0}, "at least two"),
        ({"prompt": "x", "choices": ["a", "b"], "answer": 2}, "choice's index"),
        ({"prompt": "x", "choices": ["a", "b"], "answer": "c"}, "choice's index"),
    ],
)
def test_task_suite_errors_name_file_and_line(tmp_path, row, message):
    path = write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "ok", "answer": "1"}, row])
    with pytest.raises(UserError, match=message) as err:
        load_task_suite(path)
    assert f"{path}:2:" in str(err.value)
