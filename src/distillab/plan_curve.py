"""The plan's arithmetic: a learning curve fitted to the pilots, its band from the dev items, and what a run of each
size is projected to score and cost. Numbers in, records out; distillab.plan runs the pilots and writes plan.json
(a PlanRecord), which the report reads back.

The curve. x is the share of the train prompts a run learns from (the whole set: x = 1), y a dev score. The fitted
family is the saturating power law of data-scaling studies, written so that its value at the whole set is a
parameter:

    y(x) = y1 - b * (x^-c - 1) / c,   c >= 0       (c = 0: y1 + b * ln x, its limit)

c > 0 rises (b > 0) or falls (b < 0) ever slower towards y1 + b/c; c = 0 is straight in log x ("each doubling of
the data adds the same points"). Why this family for three to five points: for a fixed c the curve is a straight
line in a known transform of x, fitted exactly by least squares, so a fit is a search over c on a grid (EXPONENTS)
with nothing to diverge, the same for every bootstrap resample; a free asymptote (a 4-parameter curve) has more
parameters than a plan has pilots. Pilots that still speed up (the student has only begun to learn: each doubling
adds more than the last) get the straight line in log x, never a curve that keeps speeding up: every learning
curve bends over, and extrapolating the bend the wrong way projects a perfect score from three small ones. A score
is a share: a projection is clipped to [0, 1].

The band. The pilots are scored on the same dev items, so the bootstrap resamples items, not pilots: every resample
draws each skill's items with replacement (the same draw for every pilot and the base), takes each pilot's suite
score, refits and projects; the band is its 2.5th-97.5th percentile. It holds the dev split's sampling noise; the
noise of one training seed to another is not in it (each pilot is one training run).

Costs. A size's teacher $ is the pilots' measured tokens per prompt x its prompts, at the teacher's price (a local
teacher at costs.NOTIONAL_API_PRICE, as the break-even prices it) and at the Batch API's price (pricing.batch_rates:
genai-prices' batch price, else teacher.batch_discount x the price; a notional price at the discount); its
training hours are its steps x the tokens a step trains x the pilots' measured seconds per token; the break-even is
costs.break_even_section's, held to the quality floor (costs.floor_verdict) at the projected scores.
"""

from __future__ import annotations

import math
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
from pydantic import PrivateAttr, ValidationError

from distillab import costs
from distillab.config import RunConfig
from distillab.errors import UserError
from distillab.files import read_json
from distillab.records import (
    BreakEven,
    QualityFloor,
    Record,
    TeacherGeneration,
    Throughput,
    TokensPerQuery,
    TrainingCost,
)

PLAN_FORMAT = "distillab-plan/1"
EXPONENTS = np.round(np.linspace(0.0, 3.0, 61), 3)  # the c grid: every 0.05 from 0 (straight in log x) to 3
LEVEL = 0.95  # the band's coverage
FLAT_POINTS = 1.0  # the curve is flat where +10% of the prompts adds less than this many points
GRID = np.linspace(0.01, 1.0, 100)  # shares where the flattening and the crossing of the floor are looked for


# ----------------------------------------------------------------------------------------------------
# The curve.


def transform(x: np.ndarray, c: float) -> np.ndarray:
    """(x^-c - 1) / c, and -ln x at c = 0: the curve is y1 - b * transform(x, c)."""
    x = np.asarray(x, dtype=float)
    return -np.log(x) if abs(c) < 1e-9 else (x ** (-c) - 1.0) / c


def fit_many(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Least-squares fits of y1 - b * transform(x, c) to each row of y (R resamples x P points): (y1, b, c, rmse),
    each of shape (R,). For each c of EXPONENTS the line in transform(x, c) is exact least squares; the c with the
    smallest error wins (the smallest among equals: the plainest curve)."""
    x, y = np.asarray(x, dtype=float), np.atleast_2d(np.asarray(y, dtype=float))  # (P,), (R, P)
    z = np.stack([transform(x, c) for c in EXPONENTS])  # (K, P)
    zc = z - z.mean(axis=1, keepdims=True)  # (K, P)
    yc = y - y.mean(axis=1, keepdims=True)  # (R, P)
    var = (zc**2).sum(axis=1)  # (K,)
    slope = (yc @ zc.T) / np.where(var > 0, var, np.inf)  # (R, K): dy/dz
    y1 = y.mean(axis=1, keepdims=True) - slope * z.mean(axis=1)  # (R, K): z = 0 at x = 1
    resid = y[:, None, :] - (y1[:, :, None] + slope[:, :, None] * z[None])  # (R, K, P)
    sse = (resid**2).sum(axis=2)  # (R, K)
    best = np.argmin(sse, axis=1)  # (R,): the first of equals, i.e. the smallest c
    rows = np.arange(len(y))
    rmse = np.sqrt(sse[rows, best] / y.shape[1])
    return y1[rows, best], -slope[rows, best], EXPONENTS[best], rmse


def predict(x, y1: float, b: float, c: float) -> np.ndarray:
    """The curve at shares x, clipped to [0, 1]."""
    return np.clip(y1 - b * transform(x, c), 0.0, 1.0)


class CurveFit(Record):
    """One fitted curve: score(x) = y1 - b * (x^-c - 1) / c, x the share of the train prompts (plan_curve)."""

    y1: float
    """The curve at the whole prompt set (x = 1), before clipping to [0, 1]."""
    b: float
    """Its scale: b > 0 rises with the data, b < 0 falls."""
    c: float
    """Its exponent: > 0 a saturating power law, 0 straight in log x."""
    rmse: float
    """Root mean squared distance of the pilots' scores from the curve."""

    def at(self, x) -> np.ndarray:
        return predict(x, self.y1, self.b, self.c)


def fit_curve(x, y) -> CurveFit:
    y1, b, c, rmse = fit_many(np.asarray(x, dtype=float), np.asarray(y, dtype=float)[None])
    return CurveFit(y1=float(y1[0]), b=float(b[0]), c=float(c[0]), rmse=float(rmse[0]))


# ----------------------------------------------------------------------------------------------------
# The dev items, resampled.


def suite_means(per_skill: list[dict[str, list[float]]], skills: list[str], draws: dict | None = None) -> np.ndarray:
    """Each model's suite score (mean of its skills' means) over `skills`: (M,) for M models scored on the same items,
    or (R, M) under `draws` ({skill: (R, n) item indices})."""
    if not skills:
        return np.full((len(per_skill),) if draws is None else (_rows(draws), len(per_skill)), np.nan)
    total = 0.0
    for skill in skills:
        scores = np.array([m[skill] for m in per_skill], dtype=float)  # (M, n): the same items for every model
        total = total + (scores.mean(axis=1) if draws is None else scores[:, draws[skill]].mean(axis=2).T)
    return total / len(skills)


def _rows(draws: dict) -> int:
    return len(next(iter(draws.values())))


def item_draws(per_skill: dict[str, list[float]], resamples: int, seed: int) -> dict[str, np.ndarray]:
    """{skill: (resamples, n) indices drawn with replacement}: one bootstrap of the dev items, shared by every model."""
    rng = np.random.default_rng(seed)
    return {skill: rng.integers(0, len(scores), size=(resamples, len(scores))) for skill, scores in per_skill.items()}


def band(values: np.ndarray) -> list[float]:
    """[low, high]: the central LEVEL of the resampled values (NaN when there are none)."""
    if values.size == 0:
        return [math.nan, math.nan]
    lo, hi = np.quantile(values, [(1 - LEVEL) / 2, (1 + LEVEL) / 2], axis=0)
    return [float(lo), float(hi)]


# ----------------------------------------------------------------------------------------------------
# The records of plan.json.


class PilotPoint(Record):
    """One pilot: trained on a nested share of the train prompts, scored on the dev split."""

    fraction: float
    """The share asked for ([plan] fractions)."""
    prompts: int
    """Train prompts it holds (its seeded-hash subset; nested in every larger pilot's)."""
    share: float
    """prompts / the whole train set: the curve's x."""
    steps: int
    """Training steps it took."""
    dev_task: float | None
    """The pilot's student on the dev split's task suite."""
    dev_general: float | None
    """... and on its general suite."""
    general_change: float | None
    """dev_general minus the base's dev general score."""
    rows: int
    """Dataset rows the teacher answered."""
    prompt_tokens: int
    """Teacher prompt tokens of those rows (cached answers included: what a run of this size pays)."""
    completion_tokens: int
    """Teacher completion tokens of those rows."""
    usd: float | None
    """Their bill at the teacher's own price (0 for a local teacher; None unpriced)."""
    train_seconds: float
    """Measured training seconds."""
    train_tokens: int
    """Tokens the training steps read (steps x batch x the dataset's mean prompt + completion tokens)."""


class Projection(Record):
    """A full run of one size, projected from the pilots' curve."""

    share: float
    """Share of the train prompts."""
    prompts: int
    """Train prompts."""
    steps: int
    """Training steps (the config's schedule scaled with the data, as the pilots')."""
    task: float | None
    """Projected task score (dev suite, which stands for test)."""
    task_band: list[float | None]
    """Its 95% band from the bootstrap of the dev items."""
    general_change: float | None
    """Projected general score minus the base's."""
    general_change_band: list[float | None]
    """Its 95% band."""
    general: float | None
    """The base's general score + general_change."""
    teacher_usd: float | None
    """Teacher tokens at the synchronous price (price_basis; None unpriced)."""
    teacher_usd_batch: float | None
    """... at the Batch API's price (TeacherPricing.batch_rates; a notional price x teacher.batch_discount)."""
    train_hours: float | None
    """Training hours at the pilots' measured tokens per second."""
    train_usd: float | None
    """train_hours x costs.train_usd_per_hour."""
    floor: QualityFloor
    """The quality floor at the projected scores (costs.floor_verdict, projected=True)."""
    break_even: BreakEven
    """The break-even of a student of this size, held to the floor: below it, no "pays off"."""
    verdict: str
    """The break-even in words (costs.break_even_phrase)."""


class TeacherPlan(Record):
    """One candidate teacher: its pilots, curves and projections."""

    label: str
    """Its name in the plan (plan/<label>/ holds its pilots)."""
    model: str
    """teacher.model."""
    temperature: float
    """teacher.temperature."""
    price: str
    """The price its $ are at, in words."""
    price_basis: str
    """priced | override | notional (a local teacher) | unpriced."""
    pilots: list[PilotPoint]
    """Its pilots, smallest first."""
    task_curve: CurveFit | None
    """The dev task score's curve; None with fewer than two pilot sizes."""
    general_curve: CurveFit | None
    """The dev general score's curve."""
    projections: list[Projection]
    """A projected run per [plan] size."""
    flattens: str
    """Where the task curve flattens and what a point costs there, in words."""
    meets: str
    """Which size meets the quality floor, or that none will, in words."""
    meets_share: float | None
    """The smallest projected size that meets the floor; None when none does."""
    task_per_usd: float | None
    """Projected task score per dollar (teacher + training) at the target size: the teachers' ranking."""
    caution: str = ""
    """Why to trust the task projection less, in words ("" when nothing says so)."""
    # the projected task at the target, per dev resample (not in plan.json: the ranking reads it when it is made)
    _target_tasks: tuple[float, ...] | None = PrivateAttr(None)


class PlanRecord(Record):
    """plan.json: `distillab plan`'s pilots and projections (distillab.plan)."""

    format: str
    """PLAN_FORMAT."""
    run: str
    """The run's name."""
    created_at: str
    """UTC ISO 8601."""
    prompts: int
    """Train prompts of the whole run (after decontamination)."""
    fractions: list[float]
    """The pilot shares run (after the budget's trim)."""
    budget: str
    """What [plan] max_usd allowed, in words."""
    base_dev_task: float | None
    """The base student on the dev task suite."""
    base_dev_general: float | None
    """... and on the dev general suite."""
    target_share: float
    """The size the teachers are ranked at (the largest of [plan] sizes)."""
    teachers: list[TeacherPlan]
    """Every candidate, in the ranking's order."""
    ranking: str
    """The teachers' ranking in words."""
    seconds: float
    """Wall seconds of the plan (pilots resumed from an earlier plan count their own seconds only)."""


def read_plan(path: Path) -> PlanRecord:
    """plan.json; a corrupt or foreign file is one line naming it."""
    fix = "delete it and rerun `distillab plan CONFIG`"
    data = read_json(path, fix)
    try:
        return PlanRecord.model_validate(data)
    except ValidationError:
        raise UserError(f"{path} is not a distillab plan: {fix}") from None


# ----------------------------------------------------------------------------------------------------
# A teacher's plan from its pilots.


class PilotScores:
    """What the bootstrap needs of a set of pilots: their shares and every dev item's score, per skill."""

    def __init__(self, shares: list[float], per_skill: list[dict], base: dict, task: list[str], general: list[str]):
        self.shares, self.per_skill, self.base = np.asarray(shares, dtype=float), per_skill, base
        self.task, self.general = task, general

    def observed(self) -> tuple[np.ndarray, np.ndarray, float]:
        """(task (P,), general (P,), base general)."""
        return (
            suite_means(self.per_skill, self.task),
            suite_means(self.per_skill, self.general),
            float(suite_means([self.base], self.general)[0]),
        )

    def resampled(self, resamples: int, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(task (R, P), general (R, P), base general (R,)) over `resamples` bootstraps of the dev items."""
        draws = item_draws(self.base, resamples, seed)
        return (
            suite_means(self.per_skill, self.task, draws),
            suite_means(self.per_skill, self.general, draws),
            suite_means([self.base], self.general, draws)[:, 0],
        )


def projected_scores(scores: PilotScores, shares: list[float], resamples: int, seed: int = 0) -> dict:
    """The curves through the pilots and, at each share: task, its band, general change, its band."""
    task, general, base_general = scores.observed()
    task_fit, general_fit = fit_curve(scores.shares, task), fit_curve(scores.shares, general)
    at = np.asarray(shares, dtype=float)
    out = {
        "task_curve": task_fit,
        "general_curve": general_fit,
        "task": task_fit.at(at),
        "general_change": general_fit.at(at) - base_general,
        "task_band": [[math.nan, math.nan]] * len(at),
        "general_change_band": [[math.nan, math.nan]] * len(at),
        "base_general": base_general,
        "speeding_up": speeding_up(scores.shares, task[None]),
        "steepest": steepest_line(scores.shares, task, at),
    }
    if resamples:
        r_task, r_general, r_base = scores.resampled(resamples, seed)
        out["speeding_up"] = speeding_up(scores.shares, r_task)
        fits = [fit_many(scores.shares, r) for r in (r_task, r_general)]
        r_proj = [np.clip(y1[:, None] - b[:, None] * _transform_rows(at, c), 0, 1) for y1, b, c, _ in fits]
        r_change = r_proj[1] - r_base[:, None]
        out["task_band"] = [band(r_proj[0][:, j]) for j in range(len(at))]
        out["task_resampled"] = r_proj[0]  # (R, shares)
        out["general_change_band"] = [band(r_change[:, j]) for j in range(len(at))]
    return out


def speeding_up(shares: np.ndarray, task: np.ndarray) -> float:
    """The share of the rows of task (resamples x pilots) in which the two largest pilots rise faster per ln x than
    the two smallest: pilots still speeding up, whose curve has not begun to bend (0 with fewer than 3 pilots)."""
    if len(shares) < 3:
        return 0.0
    lx = np.log(np.asarray(shares, dtype=float))
    first = (task[:, 1] - task[:, 0]) / (lx[1] - lx[0])
    last = (task[:, -1] - task[:, -2]) / (lx[-1] - lx[-2])
    return float(np.mean(last > first))


def steepest_line(shares: np.ndarray, task: np.ndarray, at: np.ndarray) -> np.ndarray:
    """The straight line in log x through the two largest pilots alone, at shares `at` (clipped to [0, 1]): for pilots
    that still speed up, the other side of the fit's line (which also weighs the smaller, slower pilots); the curve
    bends over somewhere, so where the truth falls between the two is not in the pilots."""
    lx = np.log(np.asarray(shares, dtype=float))
    slope = (task[-1] - task[-2]) / (lx[-1] - lx[-2])
    return np.clip(task[-1] + slope * (np.log(at) - lx[-1]), 0.0, 1.0)


def _transform_rows(x: np.ndarray, c: np.ndarray) -> np.ndarray:
    """transform(x, c) for a c per row: (R, len(x))."""
    return np.stack([transform(x, ci) for ci in c])


def flattening(curve: CurveFit, usd_per_share: float | None, what: str = "task") -> str:
    """Where the curve gains less than FLAT_POINTS per +10% of the prompts, and what a point costs there."""
    gain = (curve.at(np.minimum(GRID + 0.1, 1.1)) - curve.at(GRID)) * 100  # points per +10% of the prompts
    flat = np.nonzero(gain < FLAT_POINTS)[0]

    def cost(points: float) -> str:
        if usd_per_share is None:
            return "its cost unknown (unpriced teacher)"
        if points <= 0:
            return "more prompts buy no point"
        return f"+1 point costs {_usd(usd_per_share * 0.1 / points)}"

    if flat.size == 0:
        return (
            f"the {what} curve is still rising at the whole prompt set: the last 10% of the prompts add "
            f"{gain[-1]:.1f} points ({cost(gain[-1])})"
        )
    at = float(GRID[flat[0]])
    if flat[0] == 0:
        return (
            f"the {what} curve is flat from the start: +10% of the prompts adds {gain[0]:.1f} points ({cost(gain[0])})"
        )
    return f"the {what} curve flattens past {at:.0%} of the prompts: there {cost(gain[flat[0]])}"


def _usd(x: float) -> str:
    return f"${x:.4f}" if x < 1 else f"${x:,.2f}"


def teacher_plan(
    cfg: RunConfig,
    label: str,
    teacher,
    pilots: list[PilotPoint],
    scores: PilotScores,
    total_prompts: int,
    teacher_task: float | None,
    throughput: Throughput,
    step_tokens: float,
    seconds_per_token: float,
) -> TeacherPlan:
    """A candidate teacher's plan: the curves through its pilots and a Projection at each [plan] size. step_tokens:
    what one training step of its data reads; seconds_per_token: the training speed, measured over every candidate's
    pilots (one student on one machine: a teacher's pilots run while the machine was busier must not look dearer)."""
    pricing = costs.teacher_pricing(cfg.model_copy(update={"teacher": teacher}))
    basis = costs.api_price_basis(pricing)
    shares = sorted(cfg.plan.sizes)
    proj = projected_scores(scores, shares, cfg.plan.bootstrap, cfg.plan.seed)
    rows = sum(p.rows for p in pilots[-1:]) or 1
    per_row = {"prompt": pilots[-1].prompt_tokens / rows, "completion": pilots[-1].completion_tokens / rows}
    serving = costs.serving_cost(cfg, pricing, throughput)
    tokens = TokensPerQuery(prompt=per_row["prompt"], completion=per_row["completion"], source="teacher usage")
    projections = []
    for j, share in enumerate(shares):
        n = max(1, round(share * total_prompts))
        steps = scaled_steps(cfg, share, n)
        teacher_usd = _priced(basis, per_row["prompt"] * n, per_row["completion"] * n)
        hours = steps * step_tokens * seconds_per_token / 3600
        train_usd = hours * cfg.costs.train_usd_per_hour
        task, change = float(proj["task"][j]), float(proj["general_change"][j])
        floor = costs.floor_verdict(
            cfg.eval, task, teacher_task, change, base_general=proj["base_general"], projected=True
        )
        generation = TeacherGeneration(
            model=teacher.model,
            data_source=cfg.data.source,
            pricing=pricing.to_dict(),
            price_status=pricing.status,
            prompt_tokens=round(per_row["prompt"] * n),
            completion_tokens=round(per_row["completion"] * n),
            rows=n,
            usd=teacher_usd if basis["basis"] != "notional" else 0.0,
        )
        training = TrainingCost(
            train_seconds=hours * 3600, steps=steps, usd_per_hour=cfg.costs.train_usd_per_hour, usd=train_usd
        )
        be = costs.break_even_section(cfg, generation, training, serving, basis, tokens)
        be = costs.held_to_floor(be, floor)
        projections.append(
            Projection(
                share=share,
                prompts=n,
                steps=steps,
                task=task,
                task_band=proj["task_band"][j],
                general_change=change,
                general_change_band=proj["general_change_band"][j],
                general=proj["base_general"] + change,
                teacher_usd=teacher_usd,
                teacher_usd_batch=_batch_usd(pricing, basis, teacher, per_row, n, teacher_usd),
                train_hours=hours,
                train_usd=train_usd,
                floor=floor,
                break_even=be,
                verdict=costs.break_even_phrase(be),
            )
        )
    whole = projections[-1]
    usd_per_share = None if whole.teacher_usd is None else (whole.teacher_usd + (whole.train_usd or 0.0)) / whole.share
    meeting = [p for p in projections if p.floor.meets]
    spent = None if whole.teacher_usd is None else whole.teacher_usd + (whole.train_usd or 0.0)
    plan = TeacherPlan(
        label=label,
        model=teacher.model,
        temperature=teacher.temperature,
        price=basis["description"],
        price_basis=basis["basis"],
        pilots=pilots,
        task_curve=proj["task_curve"],
        general_curve=proj["general_curve"],
        projections=projections,
        flattens=flattening(proj["task_curve"], usd_per_share),
        meets=meets_sentence(projections, proj["task_curve"]),
        meets_share=meeting[0].share if meeting else None,
        task_per_usd=None if not spent or whole.task is None else whole.task / spent,
        caution=caution(proj["speeding_up"], float(proj["steepest"][-1]), shares[-1]),
    )
    if "task_resampled" in proj:
        plan._target_tasks = tuple(proj["task_resampled"][:, -1].tolist())
    return plan


SURE = 0.95  # a caution is said when this share of the dev resamples (or the pilots as measured, without any) agree


def caution(speeding_up: float, steepest: float, target: float) -> str:
    """Pilots still speeding up: the fit is the straight line in log n, the least a saturating curve can be, the line
    through the two largest pilots alone is the most a curve that has not yet bent can be, and where the real curve
    bends is not in the data. One training run a pilot: a seed's noise is in neither."""
    if speeding_up < SURE:
        return ""
    return (
        "the pilots still speed up (the larger ones gain more per doubling of the prompts than the smaller, in "
        f"{speeding_up:.0%} of the dev resamples): the projection is the straight line in log n through them, the "
        f"line through the two largest alone says {steepest:.3f} at {target:.0%} of the prompts, and where the curve "
        "bends over between the two is not in the data (nor a training seed's noise, one run a pilot); larger pilots "
        "would tell"
    )


def scaled_steps(cfg: RunConfig, share: float, prompts: int) -> int:
    """Training steps of a run on `share` of the prompts: the config's max_steps scaled with the data (the same
    epochs as the full run), or its epochs over `prompts` rows."""
    t = cfg.train
    if t.max_steps > 0:
        return max(1, round(t.max_steps * share)) if cfg.plan.scale_steps else t.max_steps
    return max(1, math.ceil(t.epochs * prompts * cfg.teacher.samples_per_prompt / (t.batch_size * t.grad_accum)))


def _batch_usd(pricing, basis: dict, teacher, per_row: dict, n: int, sync_usd: float | None) -> float | None:
    """The same tokens through the Batch API: at its rates, or a notional price at teacher.batch_discount."""
    if sync_usd is None:
        return None
    if basis["basis"] == "notional":
        return sync_usd * teacher.batch_discount
    return pricing.batch_rates.usd(per_row["prompt"] * n, 0, per_row["completion"] * n)


def _priced(basis: dict, prompt_tokens: float, completion_tokens: float) -> float | None:
    if basis["usd_per_1m_input"] is None:
        return None
    return costs.api_usd_per_query(
        prompt_tokens, completion_tokens, basis["usd_per_1m_input"], basis["usd_per_1m_output"]
    )


def meets_sentence(projections: list[Projection], curve: CurveFit) -> str:
    """Which projected size meets the quality floor first, or that none does and by how much the whole set misses."""
    meeting = [p for p in projections if p.floor.meets]
    if meeting:
        p = meeting[0]
        low = p.task_band[0]
        sure = "" if low is None or math.isnan(low) else f" (its band's low end {low:.3f})"
        return (
            f"{p.share:.0%} of the prompts ({p.prompts:,}) is the smallest size projected to meet the floor: "
            f"{p.floor.reason}{sure}"
        )
    whole = projections[-1]
    if whole.floor.meets is None:
        return f"whether any size meets the floor is unknown: {whole.floor.reason}"
    return (
        f"no size up to {whole.share:.0%} of the prompts is projected to meet the floor: at {whole.prompts:,} prompts "
        f"{whole.floor.reason}"
    )


def rank_teachers(plans: list[TeacherPlan]) -> tuple[list[TeacherPlan], str]:
    """The candidates best first: those projected to meet the floor at the target size before those that do not,
    then by projected task score per dollar there; the measured pilots decide, never the teacher's own strength."""
    ranked = sorted(
        plans,
        key=lambda p: (
            not bool(p.projections[-1].floor.meets),
            -(p.task_per_usd if p.task_per_usd is not None else -math.inf),
            -(p.projections[-1].task or 0.0),
        ),
    )
    if len(ranked) == 1:
        return ranked, f"one teacher: {ranked[0].label}"
    words = []
    for p, after in zip(ranked, [*ranked[1:], None]):
        whole = p.projections[-1]
        per = "per $ unknown" if p.task_per_usd is None else f"{p.task_per_usd:.3g} task points per $"
        words.append(f"{p.label} (projected task {whole.task:.3f}, {per})" + (_apart(p, after) if after else ""))
    return ranked, "ranked by projected task score per dollar at the target size: " + " > ".join(words)


def _apart(first: TeacherPlan, second: TeacherPlan) -> str:
    """How often the dev resamples put `first` ahead of `second` (the same items resampled for both: a paired
    comparison); under SURE of them the two are not told apart. One training run a pilot: a seed's noise is not in it."""
    if first._target_tasks is None or second._target_tasks is None or None in (first.task_per_usd, second.task_per_usd):
        return ""
    a, b = np.array(first._target_tasks), np.array(second._target_tasks)
    cost_a, cost_b = (p.projections[-1].task / p.task_per_usd if p.task_per_usd else math.inf for p in (first, second))
    ahead = float(np.mean(a / cost_a > b / cost_b)) if math.isfinite(cost_a) and math.isfinite(cost_b) else math.nan
    if math.isnan(ahead):
        return ""
    told = "told apart" if ahead >= SURE else "NOT told apart: within the pilots' noise"
    return f" [ahead in {ahead:.0%} of the dev resamples: {told}]"


def plan_record(
    cfg: RunConfig,
    total_prompts: int,
    fractions: list[float],
    budget: str,
    base: dict,
    plans: list[TeacherPlan],
    seconds: float,
) -> PlanRecord:
    ranked, ranking = rank_teachers(plans)
    return PlanRecord(
        format=PLAN_FORMAT,
        run=cfg.name,
        created_at=datetime.now(UTC).isoformat(timespec="seconds").replace("+00:00", "Z"),
        prompts=total_prompts,
        fractions=fractions,
        budget=budget,
        base_dev_task=base["task"],
        base_dev_general=base["general"],
        target_share=max(cfg.plan.sizes),
        teachers=ranked,
        ranking=ranking,
        seconds=round(seconds, 1),
    )
