"""Teacher pricing (genai-prices, override, local, unpriced), the max_usd stop and the progress numbers."""

from __future__ import annotations

import math

import pytest
from genai_prices import Usage, calc_price

from distillab.cache import RequestCache
from distillab.config import TeacherConfig
from distillab.errors import UserError
from distillab.generate import run_generate
from distillab.pricing import TeacherPricing, UnpricedTeacherWarning
from distillab.testing import server_thread
from tests.helpers import generate_config

quiet = dict(log=lambda *_: None)


def test_known_model_is_priced_through_genai_prices():
    cfg = TeacherConfig(model="gpt-4o-mini", base_url="https://api.openai.com/v1")
    pricing = TeacherPricing.from_config(cfg, teacher_is_local=False)
    assert pricing.status == "priced" and pricing.provider == "openai"
    expected = float(
        calc_price(Usage(input_tokens=2000, output_tokens=500), "gpt-4o-mini", provider_id="openai").total_price
    )
    assert math.isclose(pricing.usd_for({"prompt_tokens": 2000, "completion_tokens": 500}), expected, rel_tol=1e-9)
    assert "genai-prices" in pricing.describe() and "openai" in pricing.describe()


def test_override_wins_and_must_be_whole():
    cfg = TeacherConfig(
        model="gpt-4o-mini", base_url="https://api.openai.com/v1", usd_per_1m_input=2.0, usd_per_1m_output=8.0
    )
    pricing = TeacherPricing.from_config(cfg, teacher_is_local=False)
    assert pricing.status == "override"
    assert math.isclose(pricing.usd_for({"prompt_tokens": 1_000_000, "completion_tokens": 500_000}), 6.0)
    with pytest.raises(UserError, match="both"):
        TeacherPricing.from_config(TeacherConfig(usd_per_1m_input=1.0), teacher_is_local=False)


def test_local_teacher_costs_nothing():
    pricing = TeacherPricing.from_config(TeacherConfig(model="lab:teacher"), teacher_is_local=True)
    assert pricing.status == "local" and pricing.usd_for({"prompt_tokens": 10**9, "completion_tokens": 10**9}) == 0.0


@pytest.mark.parametrize(
    "model, base_url",
    [
        ("my-model", "http://127.0.0.1:8000/v1"),  # unknown provider
        ("no-such-model-xyz", "https://api.openai.com/v1"),
    ],
)  # unknown model
def test_unpriced_is_explicit_never_zero(model, base_url):
    with pytest.warns(UnpricedTeacherWarning, match="UNPRICED"):
        pricing = TeacherPricing.from_config(TeacherConfig(model=model, base_url=base_url), teacher_is_local=False)
    assert pricing.status == "unpriced" and pricing.usd_for({"prompt_tokens": 5, "completion_tokens": 5}) is None
    assert "usd_per_1m_input" in pricing.describe() and pricing.to_dict()["status"] == "unpriced"


# ----------------------------------------------------------------------------------------------------
# Against a real server: the budget stop and the progress callback's numbers.

PRICE = {"usd_per_1m_input": 1.0, "usd_per_1m_output": 1.0}  # $1 per 1M tokens either way


@pytest.fixture(scope="module")
def server(tiny_teacher):
    with server_thread(tiny_teacher, model_name="tiny") as s:
        yield s


def spent_usd(cfg) -> float:
    cache = RequestCache(cfg.run_dir / "teacher.sqlite")
    rows = cache.db.execute("SELECT SUM(prompt_tokens) + SUM(completion_tokens), COUNT(*) FROM responses").fetchone()
    cache.close()
    return (rows[0] or 0) / 1e6, rows[1]


def test_max_usd_stops_before_the_projection_passes_the_budget(tmp_path, server, tiny_teacher):
    teacher = {"model": "tiny", "base_url": server.base_url, "concurrency": 4, "max_new_tokens": 4, **PRICE}
    # Requests in flight when the stop comes are cancelled; the answered ones stay cached.
    # Each request costs about (13 prompt + 4 completion tokens) x $1/1M; 12 of them ~ $2e-4. Budget: half that.
    cfg = generate_config(tmp_path, {**teacher, "max_usd": 1e-4}, student=tiny_teacher, n_prompts=12)
    with pytest.raises(UserError, match="max_usd"):
        run_generate(cfg, **quiet)
    usd, answered = spent_usd(cfg)
    # stopped at the first answer, which showed where the spend was going; the few in flight beside it
    # (concurrency 4, batched together) landed, were paid for, and are cached
    assert 1 <= answered <= 4 and usd <= 1e-4
    # a rerun counts what was already spent and projects from it: it stops before sending anything
    with pytest.raises(UserError, match="max_usd"):
        run_generate(cfg, **quiet)
    assert spent_usd(cfg) == (usd, answered)
    # with room in the budget the same run completes
    cfg.teacher.max_usd = 1.0
    assert run_generate(cfg, **quiet).rows == 12


def test_progress_reports_done_total_and_spend(tmp_path, server, tiny_teacher):
    teacher = {"model": "tiny", "base_url": server.base_url, "concurrency": 4, "max_new_tokens": 4, **PRICE}
    cfg = generate_config(tmp_path, teacher, student=tiny_teacher, n_prompts=10)
    calls = []
    summary = run_generate(
        cfg, progress=lambda done, total, b: calls.append((done, total, b.spent, b.projected)), **quiet
    )
    assert [c[:2] for c in calls] == [(i, 10) for i in range(11)]  # 0 first, then one call per answer
    assert calls[0][2] == 0.0
    spends = [c[2] for c in calls]
    assert spends == sorted(spends)
    usd, _ = spent_usd(cfg)
    assert math.isclose(calls[-1][2], usd) and math.isclose(summary.usd, usd)
    assert math.isclose(calls[-1][3], usd)  # when all are answered, the projection is the spend
