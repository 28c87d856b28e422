"""`distillab plan` (plan.py, plan_curve.py): the curve fit recovers known curves and its band covers the truth;
pilots are nested subsets of exactly their share; the budget drops the largest pilots first and refuses what cannot
fit; the break-even is said only of a projection that meets the floor; teachers are ranked by projected task per
dollar; plan.json is written whole; a tiny plan end to end (interrupted and resumed, one cache with the full run),
its CLI table and the report's Plan section."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

from distillab.config import TeacherConfig, from_dict
from distillab.errors import UserError
from distillab.plan import (
    budget_fractions,
    candidates,
    nested_subset,
    pilot_unit,
    run_plan,
    with_teacher_options,
)
from distillab.plan_curve import (
    EXPONENTS,
    PilotPoint,
    PilotScores,
    fit_curve,
    projected_scores,
    rank_teachers,
    read_plan,
    teacher_plan,
    transform,
)
from distillab.records import Throughput, read_eval
from distillab.rundir import RunDir
from tests.helpers import run_config, tiny_config, write_config

# ----------------------------------------------------------------------------------------------------
# The curve


@pytest.mark.parametrize(
    "y1, b, c",
    [(0.7, 0.05, 0.5), (0.9, 0.2, 1.5), (0.4, 0.03, 0.0), (0.2, -0.04, 0.3)],
    ids=["power", "steep", "log", "falling"],
)
def test_the_fit_recovers_a_known_curve(y1, b, c):
    x = np.array([0.02, 0.05, 0.1, 0.2])
    fit = fit_curve(x, y1 - b * transform(x, c))
    assert (fit.y1, fit.b, fit.c) == pytest.approx((y1, b, c), abs=1e-6)
    assert fit.rmse < 1e-9
    assert fit.at([1.0])[0] == pytest.approx(y1)


def test_a_curve_off_the_grid_is_fitted_closely_and_clipped_to_a_share():
    x = np.array([0.02, 0.05, 0.1])
    truth = 0.8 - 0.1 * transform(x, 0.437)  # between two grid exponents
    fit = fit_curve(x, truth)
    assert EXPONENTS.min() <= fit.c <= EXPONENTS.max() and abs(fit.c - 0.437) <= 0.05
    assert fit.rmse < 2e-3 and abs(fit.at([1.0])[0] - 0.8) < 0.02
    assert fit_curve(x, [0.5, 0.8, 0.99]).at([1.0])[0] == 1.0  # a steep rise is clipped at a perfect score


def test_pilots_still_speeding_up_get_the_straight_line_in_log_x():
    x = np.array([0.02, 0.05, 0.1])
    fit = fit_curve(x, [0.0, 0.04, 0.15])  # each step adds more than the last: no saturating curve fits
    slope, intercept = np.polyfit(np.log(x), [0.0, 0.04, 0.15], 1)
    assert fit.c == 0.0 and fit.at([1.0])[0] == pytest.approx(intercept)  # least squares in log x, at x = 1
    assert fit.b == pytest.approx(slope)


def _paired_items(rates: list[float], n: int, rng) -> list[list[float]]:
    """Items a model of each rate solves: one latent difficulty per item, shared by every model (as real pilots
    scored on the same dev items are correlated)."""
    u = rng.random(n)
    return [list((u < r).astype(float)) for r in rates]


def test_the_band_from_resampled_dev_items_covers_the_true_curve():
    shares, truth_at = [0.02, 0.05, 0.1], [0.05, 1.0]

    def curve(x):
        return 0.7 - 0.05 * transform(np.asarray(x), 0.5)

    rng, hits, trials = np.random.default_rng(0), np.zeros(2), 60
    for trial in range(trials):
        task = _paired_items(list(curve(shares)), 150, rng)
        general = _paired_items([0.5], 150, rng)[0]
        scores = PilotScores(
            shares, [{"t": t, "g": general} for t in task], {"t": [0.0] * 150, "g": general}, ["t"], ["g"]
        )
        bands = projected_scores(scores, truth_at, 200, seed=trial)["task_band"]
        hits += [lo <= want <= hi for (lo, hi), want in zip(bands, curve(truth_at))]
    assert hits[0] / trials >= 0.85  # inside the pilots' range
    assert hits[1] / trials >= 0.75  # projected 10x past the largest pilot


# ----------------------------------------------------------------------------------------------------
# The pilots' prompts


def _prompts(n: int, repeats: int = 1) -> list[dict]:
    return [{"prompt": f"question {i}\n"} for i in range(n) for _ in range(repeats)]


def test_pilots_are_nested_and_exactly_their_share_of_the_distinct_prompts():
    prompts = _prompts(2000, repeats=3)
    sets = {f: {p["prompt"] for p in nested_subset(prompts, f, seed=7)} for f in (0.02, 0.05, 0.1, 0.5)}
    assert [len(s) for s in sets.values()] == [40, 100, 200, 1000]  # round(share x 2000 distinct)
    assert sets[0.02] < sets[0.05] < sets[0.1] < sets[0.5]
    assert len(nested_subset(prompts, 0.05, seed=7)) == 300  # every repeat of a chosen prompt comes along
    # the smallest seeded hashes, not the first prompts; another seed, other prompts
    assert sets[0.02] == set(sorted({p["prompt"] for p in prompts}, key=lambda t: pilot_unit(t, 7))[:40])
    assert sets[0.05] != {p["prompt"] for p in nested_subset(prompts, 0.05, seed=8)}
    assert nested_subset(prompts, 0.05, seed=7) == nested_subset(prompts, 0.05, seed=7)  # in the prompts' order


# ----------------------------------------------------------------------------------------------------
# The budget


def _api_config(tmp_path, **plan):
    teacher = {"model": "m", "base_url": "http://127.0.0.1:9/v1", "usd_per_1m_input": 1.0, "usd_per_1m_output": 4.0}
    return run_config(tmp_path, teacher=teacher | {"max_new_tokens": 10}, plan=plan)


def _bound_by_hand(prompts: list[dict], tok) -> float:
    tokens = sum(len(tok(p["prompt"], add_special_tokens=False)["input_ids"]) for p in prompts)
    return (tokens * 1.0 + len(prompts) * 10 * 4.0) / 1e6


def test_the_budget_leaves_the_largest_pilots_out_first(tmp_path):
    from distillab.models import load_tokenizer

    tok, prompts = load_tokenizer("lab:base"), _prompts(1000)
    bound = {f: _bound_by_hand(nested_subset(prompts, f, 0), tok) for f in (0.02, 0.05, 0.1)}
    cfg = _api_config(tmp_path, fractions=[0.02, 0.05, 0.1], max_usd=(bound[0.05] + bound[0.1]) / 2)
    kept, words, guards = budget_fractions(cfg, candidates(cfg), prompts, tok)
    assert kept == [0.02, 0.05] and "left out: 10%" in words
    assert guards == {"m-t0": pytest.approx(cfg.plan.max_usd)}  # one teacher: the whole budget
    two = with_teacher_options(
        cfg.model_copy(update={"plan": cfg.plan.model_copy(update={"max_usd": 1.0})}), ["temperature=1.0"]
    )
    kept, _, guards = budget_fractions(two, candidates(two), prompts, tok)
    assert kept == [0.02, 0.05, 0.1] and sum(guards.values()) == pytest.approx(1.0)  # split by each one's bound


def test_a_budget_short_of_two_pilots_is_refused_in_one_line(tmp_path):
    from distillab.models import load_tokenizer

    cfg = _api_config(tmp_path, max_usd=1e-7)
    with pytest.raises(UserError, match=r"^plan.max_usd \$1e-07 does not cover the two smallest pilots") as err:
        budget_fractions(cfg, candidates(cfg), _prompts(1000), load_tokenizer("lab:base"))
    assert "\n" not in str(err.value)
    unpriced = run_config(tmp_path, teacher={"model": "m", "base_url": "http://127.0.0.1:9/v1"}, plan={"max_usd": 1.0})
    with pytest.raises(UserError, match="plan.max_usd needs a price for teacher m-t0"):
        budget_fractions(unpriced, candidates(unpriced), _prompts(1000), load_tokenizer("lab:base"))
    local = run_config(tmp_path, plan={"max_usd": 0.0})  # a local teacher costs nothing: every pilot fits
    assert budget_fractions(local, candidates(local), _prompts(1000), load_tokenizer("lab:base"))[0] == [
        0.02,
        0.05,
        0.1,
    ]


def test_teacher_options_are_settings_over_the_config_teacher(tmp_path):
    cfg = run_config(tmp_path, teacher={"model": "lab:teacher", "max_new_tokens": 7})
    cfg = with_teacher_options(cfg, ["temperature=2.0", "temperature=1, label=warm"])
    found = candidates(cfg)
    assert [c.label for c in found] == ["lab-teacher-t0", "lab-teacher-t2", "warm"]
    assert [c.teacher.max_new_tokens for c in found] == [7, 7, 7] and found[1].teacher.temperature == 2.0
    with pytest.raises(UserError, match="--teacher 'oops'"):
        with_teacher_options(cfg, ["oops"])
    with pytest.raises(UserError, match="both 'lab-teacher-t2'"):
        candidates(with_teacher_options(cfg, ["temperature=2"]))


# ----------------------------------------------------------------------------------------------------
# Projections, the floor and the ranking (no model: pilots made of numbers)


def _items(rate: float, n: int = 400) -> list[float]:
    return (np.arange(n) < round(rate * n)).astype(float).tolist()


def _teacher_plan(
    tmp_path, task_rates, min_task_score, label="t", completion_tokens=600, max_general_drop=None, general=(1, 1, 1)
):
    shares = [0.02, 0.05, 0.1]
    per_skill = [{"t": _items(t), "g": _items(g)} for t, g in zip(task_rates, general)]
    scores = PilotScores(shares, per_skill, {"t": _items(0.0), "g": _items(1.0)}, ["t"], ["g"])
    pilots = [
        PilotPoint(
            fraction=s, prompts=round(s * 1000), share=s, steps=4, dev_task=r, dev_general=1.0, general_change=0.0,
            rows=round(s * 1000), prompt_tokens=round(s * 1000) * 5, completion_tokens=round(s * completion_tokens * 1000 / 100),
            usd=0.0, train_seconds=2.0, train_tokens=1000,
        )
        for s, r in zip(shares, task_rates)
    ]  # fmt: skip
    cfg = run_config(
        tmp_path,
        train={"max_steps": 40},
        eval={"min_task_score": min_task_score, "max_general_drop": max_general_drop},
        plan={"sizes": [0.1, 0.5, 1.0], "bootstrap": 50},
    )
    tput = Throughput(tokens_per_s=2000.0, batch_size=32, device="cpu")
    return teacher_plan(
        cfg, label, TeacherConfig(), pilots, scores, 1000, None, tput, step_tokens=500.0, seconds_per_token=0.002
    )


def test_a_projection_below_the_floor_never_pays_off(tmp_path):
    plan = _teacher_plan(tmp_path, [0.2, 0.3, 0.35], min_task_score=0.9)
    whole = plan.projections[-1]
    assert whole.task < 0.9 and whole.floor.meets is False
    assert whole.break_even.status == "below_floor" and whole.break_even.queries is None
    assert "pays off" not in whole.verdict and whole.verdict.startswith(
        "it does not replace the teacher: projected task"
    )
    assert "no size up to 100% of the prompts is projected to meet the floor" in plan.meets
    assert plan.meets_share is None and plan.caution == ""  # a curve that bends: nothing to warn of
    rising = _teacher_plan(tmp_path, [0.0, 0.04, 0.15], min_task_score=0.9)  # each doubling adds more than the last
    assert rising.task_curve.c == 0 and rising.caution.startswith("the pilots still speed up")
    # the other side: the line in log x through the two largest pilots (0.05: 0.04, 0.1: 0.15) at the whole set
    steepest = 0.15 + (0.15 - 0.04) / math.log(0.1 / 0.05) * math.log(1.0 / 0.1)
    assert f"the two largest alone says {steepest:.3f} at 100% of the prompts" in rising.caution
    assert rising.projections[-1].task < steepest


def test_a_projection_above_the_floor_pays_off_after_its_queries(tmp_path):
    plan = _teacher_plan(tmp_path, [0.2, 0.3, 0.35], min_task_score=0.3)
    assert [p.floor.meets for p in plan.projections] == [True, True, True]
    whole = plan.projections[-1]
    assert whole.break_even.status == "pays_off" and whole.break_even.queries > 0
    assert whole.verdict.startswith("it pays off after ")
    assert plan.meets_share == 0.1 and plan.meets.startswith("10% of the prompts (100) is the smallest size")
    # the costs: tokens per prompt x prompts at the notional price (a local teacher), the batch price at half
    per_row_in, per_row_out = 5.0, 6.0
    assert whole.teacher_usd == pytest.approx((per_row_in * 1000 * 0.15 + per_row_out * 1000 * 0.60) / 1e6)
    assert whole.teacher_usd_batch == pytest.approx(whole.teacher_usd / 2)
    assert whole.steps == 40 and whole.train_hours == pytest.approx(40 * 500 * 0.002 / 3600)


def test_a_general_drop_past_the_floor_is_below_it_too(tmp_path):
    kept = _teacher_plan(tmp_path, [0.2, 0.3, 0.35], min_task_score=0.1, max_general_drop=0.05)
    assert kept.projections[-1].break_even.status == "pays_off"  # the general score did not move
    losing = _teacher_plan(
        tmp_path, [0.2, 0.3, 0.35], min_task_score=0.1, max_general_drop=0.05, general=(0.95, 0.9, 0.85)
    )
    whole = losing.projections[-1]
    assert whole.task >= 0.1 and whole.general_change < -0.05 and whole.floor.meets is False
    assert whole.floor.reason.startswith(f"projected general {whole.general:.3f} is ")
    assert whole.break_even.status == "below_floor" and "pays off" not in whole.verdict


def test_teachers_are_ranked_by_projected_task_per_dollar_not_by_their_strength(tmp_path):
    # "strong": a better score but answers four times as long (the cost); "plain": a bit lower, much cheaper
    strong = _teacher_plan(tmp_path, [0.2, 0.3, 0.36], min_task_score=0.9, label="strong", completion_tokens=2400)
    plain = _teacher_plan(tmp_path, [0.2, 0.3, 0.34], min_task_score=0.9, label="plain", completion_tokens=300)
    ranked, words = rank_teachers([strong, plain])
    assert [p.label for p in ranked] == ["plain", "strong"]
    assert words.startswith("ranked by projected task score per dollar")
    assert words.index("plain") < words.index("strong")
    assert "[ahead in 100% of the dev resamples: told apart]" in words  # an eighth of the cost for 0.02 less
    twin = _teacher_plan(tmp_path, [0.2, 0.3, 0.34], min_task_score=0.9, label="twin", completion_tokens=300)
    assert "NOT told apart" in rank_teachers([plain, twin])[1]  # the same pilots: nothing tells them apart
    meets = _teacher_plan(tmp_path, [0.2, 0.3, 0.36], min_task_score=0.3, label="meets", completion_tokens=2400)
    assert [p.label for p in rank_teachers([plain, meets])[0]] == ["meets", "plain"]  # the floor comes first


# ----------------------------------------------------------------------------------------------------
# A tiny plan, end to end


class Interrupted(Exception):
    pass


@pytest.fixture(scope="module")
def tiny_plan(tmp_path_factory, tiny_teacher, tiny_student):
    """A plan of three pilots on tiny models, interrupted after its first pilot and run again; the records each
    stage list returned, in order."""
    tmp = tmp_path_factory.mktemp("plan")
    cfg = tiny_config(
        tmp,
        tiny_teacher,
        tiny_student,
        data={"skills": ["add"], "n_prompts": 40},
        retain={"dev_n_per_skill": 4},
        max_steps=8,
        save_steps=8,
    )
    cfg = from_dict(cfg.model_dump() | {"plan": {"fractions": [0.2, 0.4, 0.6], "sizes": [0.6, 1.0], "bootstrap": 40}})
    calls = []

    def runner(c, stages, stop_at=None):
        from distillab.stage import StageContext, run_stages

        if stop_at and c.name == stop_at:
            raise Interrupted
        calls.append((c, run_stages(stages, c, StageContext(log=lambda *a, **k: None))))
        return calls[-1][1]

    with pytest.raises(Interrupted):
        run_plan(cfg, runner=lambda c, stages: runner(c, stages, stop_at="pilot_0.4"))
    first = len(calls)
    record = run_plan(cfg, runner=runner)
    return cfg, record, calls, first


@pytest.mark.slow
def test_a_tiny_plan_resumes_and_projects_every_size(tiny_plan):
    cfg, record, calls, first = tiny_plan
    run = RunDir(cfg.run_dir)
    assert first == 1  # the first pilot's stages ran before the interruption
    resumed = calls[first][1]  # the first pilot again: every stage read back, nothing redone
    assert all(getattr(r, "skipped", True) for r in resumed.values())
    assert read_plan(run.plan_record).model_dump() == record.model_dump()
    (teacher,) = record.teachers
    assert [p.fraction for p in teacher.pilots] == [0.2, 0.4, 0.6] and [
        p.share for p in record.teachers[0].projections
    ] == [0.6, 1.0]
    assert [p.prompts for p in teacher.pilots] == [8, 16, 24] and record.prompts == 40
    assert [p.steps for p in teacher.pilots] == [2, 3, 5]  # max_steps 8 x the share (rounded)
    assert all(p.task_band[0] <= p.task <= p.task_band[1] or math.isnan(p.task_band[0]) for p in teacher.projections)
    for pilot in teacher.pilots:
        scored = read_eval(run.pilot(teacher.label, pilot.fraction) / "dev_eval.json")
        assert scored.task.score == pytest.approx(pilot.dev_task) and len(scored.skills["add"].scores) == 4


@pytest.mark.slow
def test_pilots_are_nested_run_directories_sharing_the_run_cache(tiny_plan):
    import pyarrow.parquet as pq

    from distillab.cache import RequestCache
    from distillab.generate import generate_stages
    from distillab.stage import StageContext, run_stages

    cfg, record, _, _ = tiny_plan
    run, label = RunDir(cfg.run_dir), record.teachers[0].label
    prompts = [
        set(pq.read_table(RunDir(run.pilot(label, f)).dataset(), columns=["prompt"])["prompt"].to_pylist())
        for f in (0.2, 0.4, 0.6)
    ]
    assert prompts[0] < prompts[1] < prompts[2]
    link = RunDir(run.pilot(label, 0.6)).cache()
    assert link.is_symlink() and link.resolve() == run.cache().resolve()
    cache = RequestCache(run.cache())
    held = cache.db.execute("SELECT COUNT(*) FROM responses").fetchone()[0]
    cache.close()
    assert held == len(prompts[2])  # each pilot prompt asked once, for every pilot
    # the full run asks the teacher only for the prompts no pilot held
    summary = run_stages(generate_stages(cfg), cfg, StageContext(log=lambda *a, **k: None))["generate:train"]
    assert summary.requests_sent == 40 - len(prompts[2]) and summary.cached == len(prompts[2])
    # the rest of the full run: its report draws the plan, with the run's own student beside the projection
    from distillab.pipeline import run_all_stages

    report = run_stages(run_all_stages(cfg), cfg, StageContext(log=lambda *a, **k: None))["report"].report
    page = report.read_text()
    assert "id='plan'" in page and "id='plot-plan'" in page and "this run (test)" in page


@pytest.mark.slow
def test_plan_json_is_written_whole(tiny_plan, monkeypatch):
    cfg, record, _, _ = tiny_plan
    run = RunDir(cfg.run_dir)
    before = run.plan_record.read_bytes()

    def broken(*args):
        raise OSError("disk full")

    monkeypatch.setattr("distillab.files.os.replace", broken)
    with pytest.raises(OSError, match="disk full"):
        run_plan(cfg)
    assert run.plan_record.read_bytes() == before  # the plan the last run wrote, whole
    assert [p.name for p in run.root.iterdir() if "plan" in p.name and p.name != "plan.json" and p.name != "plan"] == []


@pytest.mark.slow
def test_the_cli_prints_the_plan_table(tiny_plan, capsys, monkeypatch):
    from distillab.cli import run_cli

    monkeypatch.setenv("COLUMNS", "250")  # one line a row: the table's cells read whole

    cfg, record, _, _ = tiny_plan
    path = Path(cfg.run_dir).parent.parent / "plan.toml"
    import tomli_w

    path.write_text(tomli_w.dumps(cfg.model_dump(exclude_none=True)))
    assert run_cli(["plan", str(path)]) == 0  # every pilot up to date: the fit alone
    out = capsys.readouterr().out
    for text in ("task [95%]", "general change [95%]", "teacher $ sync / batch", "40 (100%)", "24 (60%)", "plan.json"):
        assert text in out
    assert record.teachers[0].flattens.split(":")[0][:40] in " ".join(out.split())
    assert run_cli(["plan", str(path), "--teacher", "nonsense"]) == 2
    assert "--teacher 'nonsense'" in capsys.readouterr().err


@pytest.mark.slow
def test_the_report_draws_the_plan_section(tiny_plan):
    from distillab.report.html import render_page
    from tests.helpers import fake_evals, fake_ledger

    _, record, _, _ = tiny_plan
    page = render_page("demo", fake_evals(), fake_ledger(), None, None, plan=record)
    assert "id='plan'" in page and "id='plot-plan'" in page and page.count("<svg") >= 4
    assert record.teachers[0].meets.split(":")[0][:30] in page
    without = render_page("demo", fake_evals(), fake_ledger(), None, None)
    assert "id='plan'" not in without and "id='plot-plan'" not in without


@pytest.mark.slow
def test_a_plan_on_your_own_prompts_holds_a_dev_share_out_of_every_pilot(tmp_path, tiny_teacher, tiny_student):
    import pyarrow.parquet as pq

    from tests.helpers import write_jsonl

    prompts = write_jsonl(
        tmp_path / "prompts.jsonl", [{"prompt": f"{i}+{i}=", "answer": str(2 * i)} for i in range(30)]
    )
    cfg = tiny_config(
        tmp_path, tiny_teacher, tiny_student, data={"prompts_file": str(prompts)}, retain={"dev_n_per_skill": 4}
    )
    cfg = from_dict(cfg.model_dump() | {"plan": {"fractions": [0.3, 0.6], "sizes": [1.0], "bootstrap": 0}})
    record = run_plan(cfg, log=lambda *a, **k: None)
    run, label = RunDir(cfg.run_dir), record.teachers[0].label
    dev = [RunDir(run.pilot(label, f)).dataset("dev") for f in (0.3, 0.6)]
    held = pq.read_table(dev[0], columns=["prompt", "completion"]).to_pylist()
    assert held and held == pq.read_table(dev[1], columns=["prompt", "completion"]).to_pylist()
    assert all(r["completion"] == str(2 * int(r["prompt"].split("+")[0])) for r in held)  # the file's own answers
    trained = set(pq.read_table(RunDir(run.pilot(label, 0.6)).dataset(), columns=["prompt"])["prompt"].to_pylist())
    assert trained and not trained & {r["prompt"] for r in held}
    assert record.prompts == 30 - len(held)
    scored = read_eval(RunDir(run.pilot(label, 0.6)).dev_eval)
    assert scored.suites.task == ["dev:task"] and len(scored.skills["dev:task"].scores) == len(held)


@pytest.mark.parametrize(
    "plan, message",
    [
        ("fractions = [0.1]", "config plan: plan.fractions needs two pilots or more"),
        ("fractions = [0.0, 0.1]", "plan.fractions are shares of the train prompts, in (0, 1] (got 0.0)"),
        ("sizes = [1.5]", "plan.sizes are shares of the train prompts, in (0, 1] (got 1.5)"),
        ("fractions = [0.0001, 0.0002]", "plan: a 0% pilot holds none of the 1500 train prompts"),
    ],
)
def test_a_refused_plan_is_one_line_and_writes_nothing(tmp_path, capsys, plan, message):
    from distillab.cli import run_cli

    path = write_config(tmp_path, f'[data]\nskills = ["add"]\nn_prompts = 1500\n[plan]\n{plan}\n')
    assert run_cli(["plan", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert message in " ".join(err.split()) and len(err.splitlines()) == 1
    assert not (tmp_path / "runs").exists()


@pytest.mark.slow
def test_a_plan_on_an_api_teacher_asks_each_request_once_within_its_budget(tmp_path, tiny_teacher, tiny_student):
    from distillab.cache import RequestCache
    from distillab.testing import metric_sum, read_metrics, server_thread

    with server_thread(tiny_teacher, model_name="teacher") as server:
        priced = {"model": "teacher", "base_url": server.base_url, "usd_per_1m_input": 1.0, "usd_per_1m_output": 2.0}
        cfg = tiny_config(
            tmp_path, tiny_teacher, tiny_student, teacher=priced, data={"skills": ["add"], "n_prompts": 40}
        )
        cfg = from_dict(cfg.model_dump() | {"plan": {"fractions": [0.2, 0.4], "sizes": [1.0], "max_usd": 1.0}})
        record = run_plan(cfg, log=lambda *a, **k: None)
        asked = metric_sum(read_metrics(server.url), "distillab_answers_total")
        assert run_plan(cfg, log=lambda *a, **k: None).model_dump()["teachers"] == record.model_dump()["teachers"]
        assert metric_sum(read_metrics(server.url), "distillab_answers_total") == asked  # the rerun asked nothing
    cache = RequestCache(RunDir(cfg.run_dir).cache())
    held = cache.db.execute("SELECT COUNT(*) FROM responses").fetchone()[0]
    cache.close()
    assert asked == held  # the pilots' prompts and the teacher's test task prompts, each asked once
    (teacher,) = record.teachers
    largest = teacher.pilots[-1]
    assert largest.usd == pytest.approx((largest.prompt_tokens * 1.0 + largest.completion_tokens * 2.0) / 1e6)
    assert record.budget.startswith("max_usd $1: the pilots' teacher spend is at most $")
    whole = teacher.projections[-1]
    per_row = (largest.prompt_tokens * 1.0 + largest.completion_tokens * 2.0) / 1e6 / largest.rows
    assert whole.teacher_usd == pytest.approx(per_row * 40) and whole.teacher_usd_batch == pytest.approx(per_row * 20)
