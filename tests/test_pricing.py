"""Teacher pricing (genai-prices, override, local, unpriced), the max_usd stop and the progress numbers."""

from __future__ import annotations

import math

import pytest
from genai_prices import Usage, calc_price

from distillab.cache import RequestCache, request_key
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


# ----------------------------------------------------------------------------------------------------
# Cached prompt tokens and the Batch API's rates, against genai-prices' own numbers and a hand computation.


def test_cached_prompt_tokens_are_priced_at_genai_prices_cache_read_rate():
    cfg = TeacherConfig(model="gpt-4o-mini", base_url="https://api.openai.com/v1")
    pricing = TeacherPricing.from_config(cfg, teacher_is_local=False)
    usage = {"prompt_tokens": 2000, "cached_tokens": 800, "completion_tokens": 500}
    reference = calc_price(
        Usage(input_tokens=2000, cache_read_tokens=800, output_tokens=500), "gpt-4o-mini", provider_id="openai"
    )
    # by hand from the snapshot's rates: 1,200 uncached x $0.15 + 800 cached x $0.075 + 500 out x $0.60, per 1M
    assert (pricing.usd_per_1m_input, pricing.usd_per_1m_cached_input, pricing.usd_per_1m_output) == (0.15, 0.075, 0.6)
    assert math.isclose(pricing.usd_for(usage), (1200 * 0.15 + 800 * 0.075 + 500 * 0.6) / 1e6, rel_tol=1e-12)
    assert math.isclose(pricing.usd_for(usage), float(reference.total_price), rel_tol=1e-9)
    assert pricing.usd_for(usage) < pricing.usd_for(usage | {"cached_tokens": 0})


def test_batch_requests_are_priced_at_genai_prices_batch_price():
    cfg = TeacherConfig(model="gpt-4.1-mini", base_url="https://api.openai.com/v1", batch=True)
    pricing = TeacherPricing.from_config(cfg, teacher_is_local=False)
    batch = {"processing": "batch"}
    reference = calc_price(
        Usage(input_tokens=3000, cache_read_tokens=1000, output_tokens=700),
        "gpt-4.1-mini",
        provider_id="openai",
        price_context=batch,
    )
    assert pricing.batch_basis == "genai-prices" and "genai-prices' batch price" in pricing.describe()
    # 10 requests one by one, 4 of them through the Batch API (their tokens the batch_* share)
    usage = {"requests": 10, "prompt_tokens": 5000, "cached_tokens": 1000, "completion_tokens": 1000}
    usage |= {"batch_requests": 4, "batch_prompt_tokens": 3000, "batch_cached_tokens": 1000}
    usage |= {"batch_completion_tokens": 700}
    sync = (2000 * 0.4 + 300 * 1.6) / 1e6  # the rest: no cached tokens, at the standard rates
    assert math.isclose(pricing.billing(usage)["batch"]["usd"], float(reference.total_price), rel_tol=1e-9)
    assert math.isclose(pricing.usd_for(usage), sync + float(reference.total_price), rel_tol=1e-9)
    split = pricing.billing(usage)
    assert split["batch"]["requests"] == 4 and split["sync"] | {"usd": 0} == {
        "requests": 6,
        "prompt_tokens": 2000,
        "cached_tokens": 0,
        "completion_tokens": 300,
        "usd": 0,
    }
    assert math.isclose(pricing.usd_at(1e6, 1e6, batch=True), 0.2 + 0.8)  # genai-prices: $0.2 / $0.8 per 1M


def test_an_override_price_takes_the_discount_and_its_own_cached_rate():
    cfg = TeacherConfig(
        model="m",
        base_url="http://127.0.0.1:8000/v1",
        usd_per_1m_input=2.0,
        usd_per_1m_output=8.0,
        usd_per_1m_cached_input=0.5,
        batch=True,
        batch_discount=0.4,
    )
    pricing = TeacherPricing.from_config(cfg, teacher_is_local=False)
    usage = {"prompt_tokens": 1_000_000, "cached_tokens": 400_000, "completion_tokens": 100_000}
    assert math.isclose(pricing.usd_for(usage), 0.6 * 2.0 + 0.4 * 0.5 + 0.1 * 8.0)  # $2.20
    every_one_batched = usage | {f"batch_{k}": v for k, v in usage.items()}
    assert math.isclose(pricing.usd_for(every_one_batched), 0.4 * 2.2)
    assert "0.4 x the price, teacher.batch_discount" in pricing.describe()
    # no cached rate given: cached tokens cost the input rate
    plain = TeacherPricing.from_config(cfg.model_copy(update={"usd_per_1m_cached_input": None}), False)
    assert math.isclose(plain.usd_for(usage), 1.0 * 2.0 + 0.1 * 8.0)


def test_a_response_s_cached_tokens_reach_the_cache_the_budget_and_the_price(tmp_path):
    """usage.prompt_tokens_details.cached_tokens -> the response's cached_tokens -> the cache's billing columns ->
    usd_for; a count over the prompt's is a malformed response, never billed."""
    from distillab.pricing import BudgetGuard
    from distillab.teachers.openai_compat import MalformedResponse, parse_response

    req = {"mode": "completions", "logprobs": 0}
    body = {
        "choices": [{"text": "42", "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 900, "completion_tokens": 100, "prompt_tokens_details": {"cached_tokens": "600"}},
    }
    resp = parse_response(body, req)
    assert resp["cached_tokens"] == 600 and resp["prompt_tokens"] == 900
    over = body | {"usage": body["usage"] | {"prompt_tokens_details": {"cached_tokens": 901}}}
    with pytest.raises(MalformedResponse, match="cached_tokens 901 is over prompt_tokens 900"):
        parse_response(over, req)
    assert "cached_tokens" not in parse_response(body | {"usage": {"prompt_tokens": 9}}, req)

    cache = RequestCache(tmp_path / "teacher.sqlite")
    keys = [request_key({"n": i}) for i in range(3)]
    cache.put(keys[0], {"n": 0}, resp)
    cache.put(keys[1], {"n": 1}, resp | {"batch": True})
    cache.put(keys[2], {"n": 2}, {k: v for k, v in resp.items() if k != "cached_tokens"})
    cache.close()  # packed into a block: the billing columns go with the rows
    cache = RequestCache(tmp_path / "teacher.sqlite")
    usage = cache.usage(keys) | cache.billing(keys)
    cache.close()
    assert {k: usage[k] for k in ("prompt_tokens", "cached_tokens", "batch_requests", "batch_cached_tokens")} == {
        "prompt_tokens": 2700,
        "cached_tokens": 1200,
        "batch_requests": 1,
        "batch_cached_tokens": 600,
    }
    cfg = TeacherConfig(model="m", usd_per_1m_input=1.0, usd_per_1m_output=4.0, usd_per_1m_cached_input=0.25)
    pricing = TeacherPricing.from_config(cfg, teacher_is_local=False)
    one = (300 * 1.0 + 600 * 0.25 + 100 * 4.0) / 1e6  # one response at the synchronous rates
    plain = (900 * 1.0 + 100 * 4.0) / 1e6
    assert math.isclose(pricing.usd_for(usage), one + 0.5 * one + plain, rel_tol=1e-12)
    guard = BudgetGuard(None, pricing, total=3)
    for r in (resp, resp | {"batch": True}, {k: v for k, v in resp.items() if k != "cached_tokens"}):
        guard.add(r)
    assert math.isclose(guard.spent, pricing.usd_for(usage), rel_tol=1e-12)
