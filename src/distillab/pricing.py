"""What the teacher's tokens cost, in dollars, and where that price came from.

Four states, so a cost is never silently $0:
  override  the config's usd_per_1m_input / usd_per_1m_output (both set): the user's own price wins;
  local     a local HF teacher: no API bill (its compute is costed elsewhere, with the training);
  priced    genai-prices knows the model at the provider the base_url points to (api.openai.com -> openai, ...);
  unpriced  nobody knows: usd_for() returns None, a warning is raised once, and describe() says so for the ledger.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

from distillab.errors import UserError


class UnpricedTeacherWarning(UserWarning):
    """The teacher's price is unknown: its spend is reported as unpriced, not as $0."""


@dataclass
class TeacherPricing:
    status: str  # "priced" | "override" | "local" | "unpriced"
    model: str
    provider: str | None = None  # genai-prices provider id, when priced through it
    usd_per_1m_input: float | None = None  # override, local (0) or the genai-prices rate; None when unpriced
    usd_per_1m_output: float | None = None
    reason: str = ""  # why unpriced

    @classmethod
    def from_config(cls, teacher_cfg, teacher_is_local: bool) -> TeacherPricing:
        inp, out = teacher_cfg.usd_per_1m_input, teacher_cfg.usd_per_1m_output
        if (inp is None) != (out is None):
            # Half a price would cost the other half at $0 without saying so.
            raise UserError("teacher price override needs both usd_per_1m_input and usd_per_1m_output")
        if inp is not None:
            return cls(
                status="override", model=teacher_cfg.model, usd_per_1m_input=float(inp), usd_per_1m_output=float(out)
            )
        if teacher_is_local:
            return cls(status="local", model=teacher_cfg.model, usd_per_1m_input=0.0, usd_per_1m_output=0.0)
        pricing = _from_genai_prices(teacher_cfg.model, (teacher_cfg.urls or [None])[0])  # one model: one price
        if pricing.status == "unpriced" and teacher_cfg.max_usd is None:  # with a max_usd BudgetGuard refuses it
            warnings.warn(pricing.describe(), UnpricedTeacherWarning, stacklevel=2)
        return pricing

    def usd_for(self, usage: dict) -> float | None:
        """Dollars for {prompt_tokens, completion_tokens}; None when the teacher is unpriced."""
        if self.status == "unpriced":
            return None
        return (
            usage.get("prompt_tokens", 0) * self.usd_per_1m_input
            + usage.get("completion_tokens", 0) * self.usd_per_1m_output
        ) / 1e6

    def describe(self) -> str:
        """One line for the ledger and the report."""
        if self.status == "override":
            return (
                f"{self.model}: ${self.usd_per_1m_input:g}/1M input, ${self.usd_per_1m_output:g}/1M output "
                f"(price from the config)"
            )
        if self.status == "local":
            return f"{self.model}: local teacher, no API cost"
        if self.status == "priced":
            return (
                f"{self.model} at {self.provider}: ${self.usd_per_1m_input:g}/1M input, "
                f"${self.usd_per_1m_output:g}/1M output (genai-prices)"
            )
        return (
            f"{self.model}: UNPRICED ({self.reason}); set teacher.usd_per_1m_input and "
            f"teacher.usd_per_1m_output to price it"
        )

    def to_dict(self) -> dict:
        return {
            "status": self.status,
            "model": self.model,
            "provider": self.provider,
            "usd_per_1m_input": self.usd_per_1m_input,
            "usd_per_1m_output": self.usd_per_1m_output,
            "description": self.describe(),
        }


def _from_genai_prices(model: str, base_url: str | None) -> TeacherPricing:
    """Match model + provider in genai-prices' bundled snapshot (no network: we never call UpdatePrices)."""
    try:
        provider = _provider_for(base_url)
        inp, out = _rates_per_million(model, provider)
    except LookupError as err:
        return TeacherPricing(status="unpriced", model=model, reason=f"genai-prices: {err}")
    return TeacherPricing(status="priced", model=model, provider=provider, usd_per_1m_input=inp, usd_per_1m_output=out)


def _provider_for(base_url: str | None) -> str:
    """The genai-prices provider whose API URL pattern matches base_url; LookupError when none does.

    A base_url is required: without one we would be guessing which provider bills the model.
    """
    from genai_prices import data_snapshot

    if not base_url:
        raise LookupError("no base_url to tell the provider")
    return data_snapshot.get_snapshot().find_provider(None, None, base_url.rstrip("/")).id


def _rates_per_million(model: str, provider: str) -> tuple[float, float]:
    """$/1M input and output tokens, read off a 1,000-token request.

    usd_for() sees usage summed over many requests, and some models price long-context requests at a
    higher tier; pricing the sum as one request would put every run in that tier. A short request gives
    the ordinary rate, which usd_for() applies linearly.
    """
    from genai_prices import Usage, calc_price

    price = calc_price(Usage(input_tokens=1000, output_tokens=1000), model, provider_id=provider)
    return float(price.input_price) * 1000, float(price.output_price) * 1000


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
        self.done = self.prompt_tokens = self.completion_tokens = 0

    def add(self, response: dict) -> None:
        self.done += 1
        self.prompt_tokens += response.get("prompt_tokens", 0)
        self.completion_tokens += response.get("completion_tokens", 0)

    @property
    def spent_this_run(self) -> float | None:
        return self.pricing.usd_for({"prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens})

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
