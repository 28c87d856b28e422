"""What the teacher's tokens cost, in dollars, and where that price came from.

Four states, so a cost is never silently $0:
  override  the config's usd_per_1m_input / usd_per_1m_output (both set): the user's own price wins;
  local     a local HF teacher: no API bill (its compute is costed elsewhere, with the training);
  priced    genai-prices knows the model at the provider the base_url points to (api.openai.com -> openai, ...);
  unpriced  nobody knows: usd_for() returns None, a warning is raised once, and describe() says so for the ledger.

A price is three rates (Rates, $ per 1M tokens): input, cached input (prompt tokens the endpoint's prompt cache served,
`usage.prompt_tokens_details.cached_tokens`) and output; and the same three for the Batch API (`teacher.batch`,
distillab.teachers.batch). priced: genai-prices' cache-read rate (a model without one: its input rate) and its batch
price (the price variant for processing = "batch"); a model it has no batch price for gets batch_discount x the rates.
override: usd_per_1m_cached_input (unset: the input rate), and batch_discount x the three for the batch. local: 0.
usd_for(usage) prices the cache's usage() totals with its billing() split (cache.BILLING_KEYS): the batch requests at
the batch rates, the rest at the synchronous ones, cached prompt tokens at the cached rate of each.
"""

from __future__ import annotations

import warnings
from dataclasses import asdict, dataclass
from datetime import UTC, datetime

from distillab.errors import UserError


class UnpricedTeacherWarning(UserWarning):
    """The teacher's price is unknown: its spend is reported as unpriced, not as $0."""


@dataclass(frozen=True)
class Rates:
    """$ per 1M tokens: prompt tokens (of which cached ones at their own rate) and completion tokens."""

    input: float
    cached_input: float
    output: float

    def usd(self, prompt_tokens: float, cached_tokens: float, completion_tokens: float) -> float:
        """Dollars for prompt_tokens (cached_tokens of them at the cached rate) and completion_tokens."""
        uncached = prompt_tokens - cached_tokens
        return (uncached * self.input + cached_tokens * self.cached_input + completion_tokens * self.output) / 1e6

    def times(self, factor: float) -> Rates:
        return Rates(self.input * factor, self.cached_input * factor, self.output * factor)


FREE = Rates(0.0, 0.0, 0.0)
TIER_COUNTS = (
    "requests",
    "prompt_tokens",
    "cached_tokens",
    "completion_tokens",
)  # billing()'s counts, Rates.usd's order


@dataclass
class TeacherPricing:
    status: str  # "priced" | "override" | "local" | "unpriced"
    model: str
    provider: str | None = None  # genai-prices provider id, when priced through it
    usd_per_1m_input: float | None = None  # override, local (0) or the genai-prices rate; None when unpriced
    usd_per_1m_output: float | None = None
    reason: str = ""  # why unpriced
    usd_per_1m_cached_input: float | None = None  # prompt tokens the endpoint's prompt cache served
    batch: Rates | None = None  # the Batch API's rates; None when unpriced
    batch_basis: str = ""  # where they come from: "genai-prices" (its batch price) | "discount" (batch_discount x)
    batch_discount: float = 0.5  # teacher.batch_discount, for describe()
    batching: bool = False  # teacher.batch: describe() names the batch rates

    @classmethod
    def from_config(cls, teacher_cfg, teacher_is_local: bool) -> TeacherPricing:
        inp, out = teacher_cfg.usd_per_1m_input, teacher_cfg.usd_per_1m_output
        if (inp is None) != (out is None):
            # Half a price would cost the other half at $0 without saying so.
            raise UserError("teacher price override needs both usd_per_1m_input and usd_per_1m_output")
        batch = {"batch_discount": teacher_cfg.batch_discount, "batching": teacher_cfg.batch}
        if inp is not None:
            cached = teacher_cfg.usd_per_1m_cached_input
            rates = Rates(float(inp), float(inp if cached is None else cached), float(out))
            return cls(
                status="override",
                model=teacher_cfg.model,
                usd_per_1m_input=rates.input,
                usd_per_1m_output=rates.output,
                usd_per_1m_cached_input=rates.cached_input,
                **_discounted(rates, teacher_cfg.batch_discount),
                **batch,
            )
        if teacher_is_local:
            return cls(
                status="local",
                model=teacher_cfg.model,
                usd_per_1m_input=0.0,
                usd_per_1m_output=0.0,
                usd_per_1m_cached_input=0.0,
                batch=FREE,
                batch_basis="local",
                **batch,
            )
        pricing = _from_genai_prices(teacher_cfg.model, (teacher_cfg.urls or [None])[0], teacher_cfg.batch_discount)
        pricing.batch_discount, pricing.batching = teacher_cfg.batch_discount, teacher_cfg.batch
        if pricing.status == "unpriced" and teacher_cfg.max_usd is None:  # with a max_usd BudgetGuard refuses it
            warnings.warn(pricing.describe(), UnpricedTeacherWarning, stacklevel=2)
        return pricing

    @property
    def rates(self) -> Rates | None:
        """The synchronous rates; None when unpriced."""
        if self.status == "unpriced":
            return None
        cached = self.usd_per_1m_input if self.usd_per_1m_cached_input is None else self.usd_per_1m_cached_input
        return Rates(self.usd_per_1m_input, cached, self.usd_per_1m_output)

    @property
    def batch_rates(self) -> Rates | None:
        """The Batch API's rates (batch_discount x the synchronous ones when nobody set them); None when unpriced."""
        if self.status == "unpriced":
            return None
        return self.batch if self.batch is not None else self.rates.times(self.batch_discount)

    def usd_for(self, usage: dict) -> float | None:
        """Dollars for {prompt_tokens, completion_tokens} and, where given, cache.billing()'s split of them: cached
        prompt tokens at the cached rate, the Batch API's requests at the batch rates. None when unpriced."""
        if self.status == "unpriced":
            return None
        tiers = self.billing(usage)
        return tiers["sync"]["usd"] + tiers["batch"]["usd"]

    def billing(self, usage: dict) -> dict:
        """usage split by how it is billed: {"sync": ..., "batch": ...}, each {requests, prompt_tokens, cached_tokens,
        completion_tokens, usd} (usd None when unpriced): generate's summary and the ledger say so which requests
        were priced at the batch rate."""
        batch = {k: usage.get(f"batch_{k}", 0) for k in TIER_COUNTS}
        tiers = {"sync": {k: usage.get(k, 0) - batch[k] for k in TIER_COUNTS}, "batch": batch}
        for name, rates in (("sync", self.rates), ("batch", self.batch_rates)):
            counts = tiers[name]
            usd = None if rates is None else rates.usd(*(counts[k] for k in TIER_COUNTS[1:]))
            counts["usd"] = usd
        return tiers

    def usd_at(self, prompt_tokens: float, completion_tokens: float, batch: bool = False) -> float | None:
        """Dollars for these tokens sent one by one, or through the Batch API (a projection's two prices)."""
        if self.status == "unpriced":
            return None
        return (self.batch_rates if batch else self.rates).usd(prompt_tokens, 0, completion_tokens)

    def describe(self) -> str:
        """One line for the ledger and the report."""
        if self.status == "override":
            line = (
                f"{self.model}: ${self.usd_per_1m_input:g}/1M input, ${self.usd_per_1m_output:g}/1M output "
                f"(price from the config)"
            )
        elif self.status == "local":
            return f"{self.model}: local teacher, no API cost"
        elif self.status == "priced":
            line = (
                f"{self.model} at {self.provider}: ${self.usd_per_1m_input:g}/1M input, "
                f"${self.usd_per_1m_output:g}/1M output (genai-prices)"
            )
        else:
            return (
                f"{self.model}: UNPRICED ({self.reason}); set teacher.usd_per_1m_input and "
                f"teacher.usd_per_1m_output to price it"
            )
        if self.usd_per_1m_cached_input != self.usd_per_1m_input:
            line += f"; cached input ${self.usd_per_1m_cached_input:g}/1M"
        if self.batching:
            source = (
                "genai-prices' batch price"
                if self.batch_basis == "genai-prices"
                else f"{self.batch_discount:g} x the price, teacher.batch_discount"
            )
            rates = self.batch_rates
            line += f"; Batch API: ${rates.input:g}/1M input, ${rates.output:g}/1M output ({source})"
        return line

    def to_dict(self) -> dict:
        return {
            "status": self.status,
            "model": self.model,
            "provider": self.provider,
            "usd_per_1m_input": self.usd_per_1m_input,
            "usd_per_1m_output": self.usd_per_1m_output,
            "usd_per_1m_cached_input": self.usd_per_1m_cached_input,
            "batch": None if self.status == "unpriced" else {**asdict(self.batch_rates), "basis": self.batch_basis},
            "description": self.describe(),
        }


def billed_usage(response: dict) -> dict:
    """One teacher response's counts as usd_for reads them (its tokens, and the billing split cache.billing sums)."""
    counts = {
        "prompt_tokens": response.get("prompt_tokens", 0),
        "completion_tokens": response.get("completion_tokens", 0),
        "cached_tokens": response.get("cached_tokens") or 0,
    }
    if response.get("batch"):
        counts |= {f"batch_{k}": v for k, v in counts.items()}
    return counts


def _discounted(rates: Rates, discount: float) -> dict:
    return {"batch": rates.times(discount), "batch_basis": "discount"}


def _from_genai_prices(model: str, base_url: str | None, discount: float) -> TeacherPricing:
    """Match model + provider in genai-prices' bundled snapshot (no network: we never call UpdatePrices)."""
    try:
        provider = _provider_for(base_url)
        rates, has_batch_price = _rates_per_million(model, provider)
    except LookupError as err:
        return TeacherPricing(status="unpriced", model=model, reason=f"genai-prices: {err}")
    batch = (
        {"batch": _rates_per_million(model, provider, {"processing": "batch"})[0], "batch_basis": "genai-prices"}
        if has_batch_price
        else _discounted(rates, discount)
    )
    return TeacherPricing(
        status="priced",
        model=model,
        provider=provider,
        usd_per_1m_input=rates.input,
        usd_per_1m_output=rates.output,
        usd_per_1m_cached_input=rates.cached_input,
        **batch,
    )


def _provider_for(base_url: str | None) -> str:
    """The genai-prices provider whose API URL pattern matches base_url; LookupError when none does.

    A base_url is required: without one we would be guessing which provider bills the model.
    """
    from genai_prices import data_snapshot

    if not base_url:
        raise LookupError("no base_url to tell the provider")
    return data_snapshot.get_snapshot().find_provider(None, None, base_url.rstrip("/")).id


def _rates_per_million(model: str, provider: str, context: dict | None = None) -> tuple[Rates, bool]:
    """(the rates: input and output read off a 1,000-token request, cached input off 1,000 cache-read tokens; whether
    genai-prices has a batch price for the model, in force now). context: genai-prices' price context (the batch one).

    usd_for() sees usage summed over many requests, and some models price long-context requests at a
    higher tier; pricing the sum as one request would put every run in that tier. A short request gives
    the ordinary rate, which usd_for() applies linearly.
    """
    from genai_prices import Usage, calc_price

    price = calc_price(Usage(input_tokens=1000, output_tokens=1000), model, provider_id=provider, price_context=context)
    cached = calc_price(
        Usage(input_tokens=1000, cache_read_tokens=1000), model, provider_id=provider, price_context=context
    )
    now = datetime.now(UTC)
    has_batch_price = any(
        variant.when.get("processing") == "batch" and (variant.constraint is None or variant.constraint.active(now))
        for variant in price.model.price_variants or ()
    )
    rates = Rates(float(price.input_price) * 1000, float(cached.input_price) * 1000, float(price.output_price) * 1000)
    return rates, has_batch_price


class BudgetExceeded(UserError):
    """BudgetGuard's stop: the projected teacher spend would pass teacher.max_usd."""


class BudgetGuard:
    """Stops teacher requests (generate's, the teacher's evaluation) before the projected spend passes max_usd.

    spent      dollars on these requests so far: earlier runs' cached answers (prior_usage) plus this run's;
    projected  the earlier runs' spend + this run's requests x the cost per request (this run's average once
               there is one, else the earlier runs'), so a rerun after a stop stops before sending anything.
    Both are None when the teacher is unpriced; a max_usd is then refused before any request (a limit that
    could never stop anything). Requests already in flight when it stops still land, are paid for and are cached.
    """

    def __init__(self, max_usd: float | None, pricing, total: int, prior_usage: dict | None = None):
        if max_usd is not None and pricing.status == "unpriced":
            raise UserError(
                f"teacher.max_usd needs a price: set teacher.usd_per_1m_input and teacher.usd_per_1m_output "
                f"(no known price for {pricing.model})"
            )
        self.max_usd, self.pricing, self.total = max_usd, pricing, total  # total: requests this run sends
        self.prior = pricing.usd_for(prior_usage or {})
        self.prior_requests = (prior_usage or {}).get("requests", 0)
        self.done = 0
        self.usage: dict[str, int] = {}  # this run's answers, billed_usage summed

    def add(self, response: dict) -> None:
        self.done += 1
        for name, count in billed_usage(response).items():
            self.usage[name] = self.usage.get(name, 0) + count

    @property
    def prompt_tokens(self) -> int:
        return self.usage.get("prompt_tokens", 0)

    @property
    def completion_tokens(self) -> int:
        return self.usage.get("completion_tokens", 0)

    @property
    def spent_this_run(self) -> float | None:
        return self.pricing.usd_for(self.usage)

    @property
    def spent(self) -> float | None:
        now = self.spent_this_run
        return None if now is None or self.prior is None else self.prior + now

    @property
    def projected(self) -> float | None:
        now = self.spent_this_run
        if now is None or self.prior is None:
            return None
        if self.done:
            per_request = now / self.done
        else:
            per_request = self.prior / self.prior_requests if self.prior_requests else 0.0
        return self.prior + per_request * self.total

    def check(self) -> None:
        projected = self.projected
        if self.max_usd is not None and projected is not None and projected > self.max_usd:
            raise BudgetExceeded(
                f"stopped: projected teacher spend ${projected:.4f} would pass max_usd ${self.max_usd:.4f} "
                f"(spent ${self.spent:.4f}; answered requests are cached, a rerun resumes)"
            )
