"""The API teacher is scored: a run whose teacher is the lab teacher behind a real `distillab serve` on 127.0.0.1
(no mocks) gets eval/teacher.json equal to scoring the same model locally, pays for it once (the request cache),
and the ledger and report show its row, gap closed, break-even and the evaluation's own spend."""

from __future__ import annotations

import io
import sqlite3

import pytest
from rich.console import Console

from distillab.cli import _print_scores
from distillab.config import from_dict
from distillab.evaluate import run_evaluate
from distillab.generate import run_generate
from distillab.pipeline import finish_run
from distillab.records import Ledger, as_evals, read_eval, read_ledger
from distillab.report import terminal_summary, verdict
from distillab.report.html import ledger_rows, scores_table
from distillab.scoring import evaluate_model, load_task_suite
from distillab.testing import read_metrics as metrics
from distillab.testing import server_thread
from distillab.train import run_train
from tests.helpers import fake_evals, fake_ledger, run_config

pytestmark = pytest.mark.filterwarnings("ignore::distillab.pricing.UnpricedTeacherWarning")
quiet = dict(log=lambda *_: None)


def api_run(tmp_path, url, name="api", mode="completions", **eval_):
    """A run with the served lab teacher as its API teacher (priced, so the break-even is known); generate and
    two training steps done (the student is not what is tested here)."""
    task_file = tmp_path / "task.jsonl"
    task_file.write_text(
        '{"prompt": "upper abc\\n", "answer": "ABC", "skill": "mine"}\n'
        '{"prompt": "add 12 30\\n", "answer": "42", "scorer": "numeric", "skill": "mine"}\n'
        '{"messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": '
        '"upper xyz"}], "answer": "XYZ", "skill": "chat"}\n'
    )
    cfg = run_config(
        tmp_path,
        name,
        teacher={
            "model": "lab:teacher",
            "base_url": url,
            "mode": mode,
            "max_new_tokens": 12,
            "top_k_logprobs": 0,
            "usd_per_1m_input": 1.0,
            "usd_per_1m_output": 4.0,
            "max_retries": 0,
        },
        data={"skills": ["reverse"], "n_prompts": 8},
        train={"max_steps": 2, "per_device_batch_size": 4},
        eval={"n_per_skill": 6, "general": ["upper", "add"], "bootstrap": 50, "task_file": str(task_file), **eval_},
    )
    run_generate(cfg, **quiet)
    run_train(cfg, **quiet)
    return cfg


def served_completions(url) -> float:
    """Completion requests serve has answered (its own count)."""
    return sum(
        metrics(url).get(f'distillab_requests_total{{endpoint="/v1/{path}",code="200"}}', 0)
        for path in ("completions", "chat/completions")
    )


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["completions", "chat"])
def test_api_teacher_is_scored_through_its_endpoint_once(tmp_path, mode):
    with server_thread("lab:teacher") as server:
        cfg = api_run(tmp_path, server.base_url, mode=mode)
        before = served_completions(server.url)
        results = run_evaluate(cfg, **quiet)
        asked = served_completions(server.url) - before
        _print_scores(results)  # what `distillab evaluate` prints: an API teacher has no perplexity
        teacher = read_eval(cfg.run_dir / "eval" / "teacher.json")
        assert teacher.not_scored is None and teacher.label == "teacher"

        # the same greedy answers as the same model scored locally, example for example; but in completions mode a
        # conversation goes as its plain text (no template on a completion), while locally the lab teacher's chat
        # template asks it the last user turn alone: the chat line is answered right only locally
        local = evaluate_model(
            "lab:teacher", ["reverse"], ["upper", "add"], 6, 50, 12, task_examples=load_task_suite(cfg.eval.task_file)
        )
        plain = {"chat"} if mode == "completions" else set()
        assert {s: v.scores for s, v in teacher.skills.items() if s not in plain} == {
            s: v.scores for s, v in local.skills.items() if s not in plain
        }
        if plain:
            assert teacher.skills["chat"].scores == [0.0] and local.skills["chat"].scores == [1.0]
        assert (teacher.task.score == local.task.score) == (not plain) and teacher.general.score == local.general.score
        assert teacher.skills["reverse"].score > 0.5  # the lab teacher can reverse: the comparison is not of zeros
        usage = teacher.endpoint_usage
        assert usage.requests == 6 * 3 + 3 == asked == usage.sent
        assert usage.completion_tokens > 0 and usage.prompt_tokens > 0

        # a rerun, even with eval/teacher.json gone, pays nothing: every answer is in teacher.sqlite
        (cfg.run_dir / "eval" / "teacher.json").unlink()
        again = run_evaluate(cfg, **quiet)["teacher"]
        assert served_completions(server.url) - before == asked
        assert again.skills == teacher.skills and again.endpoint_usage.sent == 0
        assert again.endpoint_usage.completion_tokens == usage.completion_tokens
        with sqlite3.connect(cfg.run_dir / "teacher.sqlite") as db:  # the generate stage's 8 answers, and these
            assert db.execute("SELECT COUNT(*) FROM responses").fetchone()[0] == 8 + usage.requests

        report = finish_run(cfg, **quiet)
    ledger = read_ledger(cfg.run_dir / "ledger.json")
    line = ledger.teacher_evaluation
    assert line.status == "scored" and line.requests == usage.requests
    assert line.completion_tokens == usage.completion_tokens
    assert line.usd == pytest.approx((usage.prompt_tokens * 1.0 + usage.completion_tokens * 4.0) / 1e6)
    gen = ledger.teacher_generation  # the data generation's line is its own: not mixed with the evaluation
    assert gen.rows == 8 and gen.usd == pytest.approx((gen.prompt_tokens + 4 * gen.completion_tokens) / 1e6)
    assert ledger.quality["task"].teacher == teacher.task.score
    assert ledger.quality_floor.required_task == pytest.approx(0.9 * teacher.task.score)  # as served, in both modes
    if mode == "chat":  # a tiny student trained 3 steps misses the quality floor: no break-even is claimed for it
        assert ledger.quality_floor.meets is False and ledger.break_even.status == "below_floor"
    page = report.read_text()
    assert "teacher evaluation $" in page and "not scored" not in page
    assert "of the task gap" in page  # the verdict's gap closed, from the teacher's row


@pytest.mark.slow
def test_score_teacher_false_and_max_usd_show_why(tmp_path):
    with server_thread("lab:teacher") as server:
        cfg = api_run(tmp_path, server.base_url, score_teacher=False)
        before = served_completions(server.url)
        teacher = run_evaluate(cfg, **quiet)["teacher"]
        assert served_completions(server.url) == before  # nothing asked
        report = finish_run(cfg, **quiet)
        page = report.read_text()

        # teacher.max_usd bounds generation + the evaluation: a projected pass stops before any request
        capped = from_dict(
            cfg.model_dump()
            | {
                "eval": cfg.eval.model_dump() | {"score_teacher": True},
                "teacher": cfg.teacher.model_dump() | {"max_usd": 1e-6},
            }
        )
        stopped = run_evaluate(capped, **quiet)["teacher"]
        assert served_completions(server.url) == before
    assert teacher.not_scored == "eval.score_teacher = false" and teacher.task.score is None
    assert read_ledger(cfg.run_dir / "ledger.json").teacher_evaluation.status == "not_scored"
    assert "not scored: eval.score_teacher = false" in page
    assert "no gap closed: the teacher was not scored (eval.score_teacher = false)" in page
    assert stopped.not_scored.startswith("teacher.max_usd: stopped: projected teacher spend")
    assert stopped.endpoint_usage.sent == 0 and stopped.task.score is None
    assert read_eval(cfg.run_dir / "eval" / "teacher.json").not_scored == stopped.not_scored


def test_a_missing_teacher_row_says_why_the_gap_is_missing():
    """Without the teacher's scores (a run from before API teachers were scored, or one not scored), the verdict,
    the scores table and the ledger say so instead of leaving the gap out silently (no server: records only)."""
    evals = fake_evals()
    del evals["teacher"]
    assert "(no gap closed: the teacher was not evaluated)" in verdict(evals, fake_ledger())
    assert "No gap closed: the teacher was not evaluated." in scores_table(as_evals(evals), list(evals))
    rows = dict(ledger_rows(Ledger.model_validate(fake_ledger())))
    assert rows["teacher evaluation $"] == "not evaluated"  # an old ledger: no teacher_evaluation section

    spent = fake_ledger() | {
        "teacher_evaluation": {
            "status": "not_scored",
            "reason": "teacher.max_usd: stopped",
            "endpoint": "http://h/v1",
            "requests": 20,
            "prompt_tokens": 100,
            "completion_tokens": 50,
            "price_status": "override",
            "usd": 0.0003,
        }
    }
    assert dict(ledger_rows(Ledger.model_validate(spent)))["teacher evaluation $"] == (
        "not scored: teacher.max_usd: stopped; spent 20 requests to http://h/v1, 100 in / 50 out = $0.0003 [override]"
    )
    evals = fake_evals()
    evals["teacher"] |= {
        "not_scored": "eval.score_teacher = false",
        "task": {"score": None},
        "general": {"score": None},
    }
    table = scores_table(as_evals(evals), list(evals))
    assert "not scored: eval.score_teacher = false" in table
    assert "No gap closed: the teacher was not scored (eval.score_teacher = false)." in table
    console = Console(file=io.StringIO(), width=160)
    console.print(terminal_summary(evals, spent))
    assert "not scored: eval.score_teacher" in console.file.getvalue()
