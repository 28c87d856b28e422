"""run_dir/report.html: one self-contained page that works offline.

No CDN, no JavaScript, no external files: the CSS is inline and every plot is matplotlib's SVG text pasted into
the page. This module computes what the page says; jinja2 templates (templates/report.html.j2, its tables and
figures as macros in templates/sections.html.j2) lay it out, with autoescape on: every text from the run
(labels, notes, the lineage, the summary) is escaped there, and matplotlib's SVG is the one markup let in as it
is. Sections, top to bottom: the verdict sentence, scores with 95% intervals for every evaluated model,
task-vs-general scatter, cost-vs-quality Pareto, per-skill change vs base, the retain trade-off (when retain
chose the student), per-skill scores, the cost ledger, the verification (yield and $ per kept example, when [verify]
checked the teacher's samples), the decontamination (what the training prompts were checked against, what was
dropped or flagged: data/decontamination.json), the lineage, and the run summary.
"""

from __future__ import annotations

import io
import json
import math
from functools import cache
from pathlib import Path

from distillab.config import RunConfig
from distillab.costs import break_even_phrase, human_count
from distillab.decontaminate import summary_line
from distillab.files import write_atomic
from distillab.plan_curve import PlanRecord, read_plan
from distillab.provenance import LINEAGE_FILE
from distillab.records import EvalResult, Ledger, RetainCost, TeacherEvaluation, as_evals, read_lm_evals, suite_score
from distillab.rundir import RunDir
from distillab.scoring import GapChange, gap_change
from distillab.verify import counts_text

MODEL_ORDER = ("teacher", "base", "distilled", "zero_distill", "retain")  # the rest follow in the evals' own order
COLORS = {
    "teacher": "#3467d6",
    "base": "#8a8f98",
    "distilled": "#d9531e",
    "zero_distill": "#2a9d5b",
    "retain": "#9b59b6",
}
EXTRA_COLORS = ["#c49a00", "#17a2b8", "#e83e8c", "#6f42c1"]


def build_report(cfg: RunConfig, evals: dict[str, EvalResult], ledger: Ledger, summary: dict | None = None) -> Path:
    """Write run_dir/report.html (atomically) and return its path. evals and ledger: records or their JSON dicts."""
    evals, ledger = as_evals(evals), Ledger.model_validate(ledger)
    run = RunDir(cfg.run_dir)
    lineage_path = run.student / LINEAGE_FILE
    lineage = json.loads(lineage_path.read_text()) if lineage_path.is_file() else None
    selection = (summary or {}).get("retain_selection")
    if selection is None and run.retain_record.is_file():
        selection = json.loads(run.retain_record.read_text())
    generated = run.generate_summary()
    aligned = json.loads(generated.read_text()).get("cross_tokenizer") if generated.is_file() else None
    if aligned:  # a teacher with another tokenizer: how much of its top-k reached the student's tokens (crosstok)
        summary = {**(summary or {}), "cross_tokenizer": aligned}
    decontaminated = json.loads(run.decontamination.read_text()) if run.decontamination.is_file() else None
    page = render_page(
        cfg.name,
        evals,
        ledger,
        lineage,
        summary,
        task_skills(cfg, evals),
        selection,
        read_lm_evals(run.lm_eval_files()),
        decontaminated,
        plan=read_plan(run.plan_record) if run.plan_record.is_file() else None,
    )
    write_atomic(run.report, page)
    return run.report


def render_page(
    name: str,
    evals: dict[str, EvalResult],
    ledger: Ledger,
    lineage: dict | None,
    summary: dict | None,
    task: set[str] = frozenset(),
    selection: dict | None = None,
    lm_evals: dict | None = None,
    decontamination: dict | None = None,
    plan: PlanRecord | None = None,
) -> str:
    """The page. decontamination: [decontaminate]'s record (distillab.decontaminate), shown when given; plan:
    `distillab plan`'s plan.json (distillab.plan_curve), its section shown when given."""
    evals, ledger = as_evals(evals), Ledger.model_validate(ledger)
    labels = ordered_labels(evals)
    chosen_as = None
    if selection:
        chosen_as = "retain" if "retain" in evals else "distilled"
        summary = {k: v for k, v in (summary or {}).items() if k != "retain_selection"} or None
    pareto, pareto_caption = pareto_svg(evals, ledger, labels)
    scores = score_rows(evals, labels)
    # a teacher of another tokenizer (its top-k aligned across tokenizers): its perplexity is per token of that
    # tokenizer, not comparable with the students'
    foreign = ["teacher"] if (summary or {}).get("cross_tokenizer") and "teacher" in evals else []
    return (
        _templates()
        .get_template("report.html.j2")
        .render(
            name=name,
            ledger=ledger,
            verdict=verdict(evals, ledger),
            scores=scores,
            gap_missing=gap_missing_reason(evals),
            gap_notes=gap_notes(scores),
            perplexity_note=perplexity_note(evals, foreign),
            foreign_tokenizer=foreign,
            plots={
                "task_general": task_general_svg(evals, labels),
                "pareto": pareto,
                "skills": skill_delta_svg(evals, labels, task),
                "tradeoff": tradeoff_svg(evals, labels, selection, chosen_as) if selection else None,
                "plan": plan_svg(plan, evals) if plan else None,
            },
            plan=plan,
            pareto_caption=pareto_caption,
            selection=selection,
            chosen_as=chosen_as,
            evals=evals,
            labels=labels,
            skills=skill_names(evals),
            ledger_rows=ledger_rows(ledger),
            ledger_json=json.dumps(ledger.to_dict(), indent=1, default=str),
            lineage=lineage,
            summary=summary,
            lm_eval=lm_eval_rows(lm_evals or {}),
            decontamination=decontamination,
            decontamination_line=summary_line(decontamination) if decontamination else "",
        )
    )


def lm_eval_rows(lm_evals: dict) -> dict:
    """{"tasks": [(task, metric)], "rows": [(label, [value or None per task])]} for the lm-eval table."""
    tasks = sorted({(task, metric) for scores in lm_evals.values() for task, (metric, _) in scores.items()})
    rows = [
        (label, [scores[t][1] if t in scores and scores[t][0] == m else None for t, m in tasks])
        for label, scores in ((label, lm_evals[label]) for label in ordered_labels(lm_evals))
    ]
    return {"tasks": tasks, "rows": rows}


def scores_table(evals: dict[str, EvalResult], labels: list[str]) -> str:
    """The scores table alone, as the page shows it (its note on a missing gap included)."""
    sections = _templates().get_template("sections.html.j2").module
    rows = score_rows(evals, labels)
    return str(sections.scores_table(rows, gap_missing_reason(evals), gap_notes(rows), perplexity_note(evals, []), []))


@cache
def _templates():
    """The page's templates: HTML, so autoescape is on; the filters are the number formats below."""
    import jinja2

    env = jinja2.Environment(
        loader=jinja2.PackageLoader("distillab.report", "templates"),
        autoescape=True,
        trim_blocks=True,
        lstrip_blocks=True,
        undefined=jinja2.StrictUndefined,
    )
    env.filters.update(
        pct=pct, signed_pct=lambda x: format(x, "+.0%"), count=lambda n: f"{n:,}", g=lambda x: f"{x:g}", scalar=_scalar
    )
    env.filters["money"] = _money  # plan.json's dollars (unpriced: its own word)
    env.tests.update(list=lambda value: isinstance(value, list), few_scalars=_few_scalars)
    return env


# ----------------------------------------------------------------------------------------------------
# Numbers and words.


def ordered_labels(evals: dict) -> list[str]:
    return [m for m in MODEL_ORDER if m in evals] + [m for m in evals if m not in MODEL_ORDER]


def color_of(label: str, labels: list[str]) -> str:
    extras = [m for m in labels if m not in COLORS]
    return COLORS.get(label) or EXTRA_COLORS[extras.index(label) % len(EXTRA_COLORS)]


def pct(x: float | None) -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{100 * x:.1f}"


def verdict(evals: dict[str, EvalResult], ledger: Ledger) -> str:
    """One sentence: task gap closed, general points lost or gained, and when distilling pays off."""
    evals, ledger = as_evals(evals), Ledger.model_validate(ledger)
    clauses = []
    d_task, b_task, t_task = (suite_score(evals, m, "task") for m in ("distilled", "base", "teacher"))
    task = gap_change(d_task, b_task, t_task)
    if task.closed is not None:
        clauses.append(f"closed {100 * task.closed:.0f}% of the task gap")
    elif d_task is not None:
        moved = "" if task.points is None else f", {task.points:+.1f} points vs base"
        missing = gap_missing_reason(evals) or task.why
        clauses.append(
            f"scored {pct(d_task)}% on the task{moved}" + (f" (no gap closed: {missing})" if missing else "")
        )
    d_gen, b_gen = suite_score(evals, "distilled", "general"), suite_score(evals, "base", "general")
    if None not in (d_gen, b_gen):
        points = 100 * (d_gen - b_gen)
        if abs(points) < 0.5:
            clauses.append("kept its general skill")
        else:
            clauses.append(f"{'lost' if points < 0 else 'gained'} {abs(points):.0f} points of general skill")
    head = "Distilled student " + (" and ".join(clauses) if clauses else "has no scores")
    return head + f"; {break_even_phrase(ledger.break_even)}."


# ----------------------------------------------------------------------------------------------------
# What the tables show.


def score_rows(evals: dict[str, EvalResult], labels: list[str]) -> list[dict]:
    """Per model: its label, its EvalResult, and its task and general GapChange (None: teacher and base)."""
    rows = []
    for m in labels:
        gaps = [None, None]
        if m not in ("teacher", "base"):
            gaps = [
                gap_change(*(suite_score(evals, label, suite) for label in (m, "base", "teacher")))
                for suite in ("task", "general")
            ]
        rows.append({"label": m, "result": evals[m], "gaps": gaps})
    return rows


def gap_notes(rows: list[dict]) -> list[str]:
    """Why a gap-closed cell shows points instead of a share, once per reason and suite (score_rows' rows)."""
    notes: dict[str, list[str]] = {}
    for row in rows:
        for suite, gap in zip(("task", "general"), row["gaps"]):
            if isinstance(gap, GapChange) and gap.closed is None and gap.why and gap.points is not None:
                notes.setdefault(f"{suite}: {gap.why}", []).append(row["label"])
    return [f"{reason} ({', '.join(labels)}): the change vs base in points instead" for reason, labels in notes.items()]


def perplexity_note(evals: dict[str, EvalResult], foreign: list[str]) -> str:
    """What the perplexity column compares: each model's perplexity is per token of its own tokenizer, so only
    models that share one (the base and the students trained from it) compare; `foreign` models are left out of the
    column, their number given here with what it is per."""
    if not any(res.world_text_perplexity is not None for res in evals.values()):
        return ""
    note = (
        "World-text perplexity is per token of each model's own tokenizer: it compares models that share a "
        "tokenizer (the base and the students trained from it), not a character-level model with a BPE one."
    )
    left_out = [
        f"{label} {evals[label].world_text_perplexity:.2f} per token of its own tokenizer"
        for label in foreign
        if evals[label].world_text_perplexity is not None
    ]
    if left_out:
        note += f" Left out of the column, tokenized differently from the student: {'; '.join(left_out)}."
    return note


def gap_missing_reason(evals: dict[str, EvalResult]) -> str | None:
    """Why the student has no gap closed, in words, when the reason is a missing teacher or base score."""
    teacher = evals.get("teacher")
    if teacher is None:
        return "the teacher was not evaluated"
    if teacher.not_scored:
        return f"the teacher was not scored ({teacher.not_scored})"
    if "base" not in evals:
        return "the base was not evaluated"
    return None


def skill_names(evals: dict[str, EvalResult]) -> list[str]:
    names: dict[str, None] = {}
    for res in evals.values():
        names.update(dict.fromkeys(res.skills))
    return list(names)


def task_skills(cfg: RunConfig | None, evals: dict[str, EvalResult]) -> set[str]:
    """The task suite's skills: from an eval file's "suites" key when it has one, else from the config."""
    for res in evals.values():
        if res.suites is not None:
            return set(res.suites.task)
    if cfg is None:
        return set()
    from distillab.scoring import suites

    return set(suites(cfg)[0])


# ----------------------------------------------------------------------------------------------------
# The ledger in words: the page's table and the terminal summary's lines.


def _money(x: float | None, digits: int = 4) -> str:
    if x is None:
        return "unknown"
    return f"${x:,.{digits}f}" if abs(x) < 1000 else f"${x:,.0f}"


def ledger_rows(ledger: Ledger) -> list[tuple[str, str]]:
    """The ledger in plain words, one (item, value) row each."""
    teacher, training, serving = ledger.teacher_generation, ledger.training, ledger.serving
    break_even = ledger.break_even
    status = teacher.price_status
    teacher_usd = "UNPRICED (unknown, not $0)" if status == "unpriced" else _money(teacher.usd)
    rows = [
        ("teacher", f"{teacher.model} ({teacher.pricing.get('description', status)})"),
        (
            "teacher tokens",
            f"{teacher.prompt_tokens} in / {teacher.completion_tokens} out"
            + (f" ({teacher.reasoning_tokens} of them reasoning)" if teacher.reasoning_tokens else ""),
        ),
        ("teacher generation $", f"{teacher_usd} [{status}]"),
        *([("teacher samples verified", counts_text(teacher.verification.total))] if teacher.verification else []),
        (
            "training",
            f"{_sci(training.flops)} FLOPs (estimate), {training.steps} steps, {training.train_seconds} s "
            f"x ${_known_or(training.usd_per_hour, 0):g}/h = {_money(training.usd)}",
        ),
        *_retain_rows(ledger.retain),
        ("distillation total $", _money(ledger.total_usd)),
        ("teacher evaluation $", _teacher_evaluation_row(ledger.teacher_evaluation, teacher.model)),
        (
            "student serving",
            f"{_num(serving.student_tokens_per_s)} tokens/s here at "
            f"${_known_or(serving.usd_per_hour, 0):g}/h "
            f"= {_money(serving.student_usd_per_1m_tokens)} per 1M tokens",
        ),
        (
            "teacher API",
            f"{_money(serving.teacher_api_usd_per_1m_output)} per 1M output tokens "
            f"[{serving.teacher_price_basis}]: {serving.teacher_price_description}",
        ),
    ]
    per_query = (
        f"one-off {_money(break_even.one_off_usd)} (teacher data {_money(break_even.teacher_usd)} + "
        f"training {_money(break_even.training_usd)}); per query: teacher API "
        f"{_money_small(break_even.api_usd_per_query)}"
        f" vs student {_money_small(break_even.student_usd_per_query)} [{break_even.price_basis} price]"
    )
    return rows + [("break-even", break_even_phrase(break_even)), ("break-even inputs", per_query)]


def _known_or(value, placeholder):
    """A number format needs a number: the placeholder where the ledger does not know it."""
    return placeholder if value is None else value


def _retain_rows(kept: RetainCost) -> list[tuple[str, str]]:
    if not kept.enabled:
        return []
    replay = (
        f"replay by {kept.replay_source}: {kept.replay_rows} rows, teacher tokens "
        f"{kept.teacher_prompt_tokens} in / {kept.teacher_completion_tokens} out "
        f"({_money(kept.teacher_usd)}); "
        if kept.replay_source
        else ""
    )
    return [
        (
            "retain",
            f"{replay}base-model generation {kept.base_generation_seconds} s + scoring "
            f"{kept.candidates} candidates on dev {kept.selection_seconds} s = "
            f"{_money(kept.usd)}",
        )
    ]


def _teacher_evaluation_row(ev: TeacherEvaluation, model: str | None) -> str:
    """Scoring the teacher: its own spend, apart from generation's and outside the distillation total."""
    if ev.status == "local":
        return f"{model} scored locally: no API bill"
    if ev.status == "not_evaluated":
        return f"not evaluated ({ev.reason})" if ev.reason else "not evaluated"
    spent = (
        f"{ev.requests} requests to {ev.endpoint}, {ev.prompt_tokens} in / {ev.completion_tokens} out = "
        f"{'UNPRICED' if ev.usd is None else _money(ev.usd)} [{ev.price_status}]"
        if ev.requests
        else "$0"
    )
    return spent if ev.status == "scored" else f"not scored: {ev.reason}; spent {spent}"


def _money_small(x: float | None) -> str:
    """Three significant digits without an exponent: per-query dollars are tiny."""
    if x is None:
        return "unknown"
    if x == 0:
        return "$0"
    return f"${x:.{max(2, 2 - math.floor(math.log10(abs(x))))}f}"


def _sci(x) -> str:
    return "-" if x is None else f"{x:.3g}"


def _num(x) -> str:
    return "-" if x is None else f"{x:,.0f}"


# The lineage and the run summary: any JSON value, as nested tables (sections.generic).


def _few_scalars(value: list) -> bool:
    """A list the page writes inline, comma-separated; a longer or nested one folds into <details>."""
    return all(not isinstance(v, (dict, list)) for v in value) and len(value) <= 20


def _scalar(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return "null" if v is None else str(v)


# ----------------------------------------------------------------------------------------------------
# Plots: matplotlib Figure objects (no pyplot state), returned as inline SVG text.


def _new_figure(width: float = 6.2, height: float = 4.4):
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=100, layout="constrained")
    return fig, fig.add_subplot()


def svg_text(fig, salt: str) -> str:
    """The <svg> element alone. A fixed hash salt per plot keeps ids stable and distinct across plots."""
    import matplotlib

    buf = io.StringIO()
    with matplotlib.rc_context({"svg.hashsalt": f"distillab-{salt}", "svg.fonttype": "path"}):
        fig.savefig(buf, format="svg")
    text = buf.getvalue()
    return text[text.index("<svg") :]


def _ci_err(res: EvalResult, suite: str) -> list[list[float]] | None:
    scores = res.suite(suite)
    if scores.score is None or not scores.ci or any(c is None or math.isnan(c) for c in scores.ci):
        return None
    return [[100 * max(0.0, scores.score - scores.ci[0])], [100 * max(0.0, scores.ci[1] - scores.score)]]


def task_general_svg(evals: dict[str, EvalResult], labels: list[str]) -> str | None:
    points = [m for m in labels if None not in (suite_score(evals, m, "task"), suite_score(evals, m, "general"))]
    if not points:
        return None
    fig, ax = _new_figure()
    for m in points:
        x, y = 100 * suite_score(evals, m, "general"), 100 * suite_score(evals, m, "task")
        ax.errorbar(
            x,
            y,
            xerr=_ci_err(evals[m], "general"),
            yerr=_ci_err(evals[m], "task"),
            fmt="o",
            ms=8,
            color=color_of(m, labels),
            capsize=3,
            label=m,
        )
    _task_general_axes(ax, "What the task gained, what general skill kept")
    _outside_legend(ax, fontsize=8)
    spots = [(m, 100 * suite_score(evals, m, "general"), 100 * suite_score(evals, m, "task")) for m in points]
    place_labels(fig, ax, spots, fontsize=9)
    return svg_text(fig, "task-general")


def _task_general_axes(ax, title: str) -> None:
    """Every plot of the two suites has the task on y and general skill on x (the Pareto plot's y is the task too)."""
    ax.set_xlabel("general suite score (%)")
    ax.set_ylabel("task suite score (%)")
    ax.set_title(title)
    ax.grid(alpha=0.3)


def _outside_legend(ax, fontsize: float) -> None:
    """The legend right of the axes: inside, matplotlib's "best" spot moves with every draw and would sit where
    place_labels found room."""
    ax.legend(fontsize=fontsize, loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0.0)


LABEL_RINGS = (8, 16, 26, 38)  # points from a point to its label's nearest corner; past the first, a leader line
LABEL_DIRECTIONS = ((1, 1), (1, -1), (-1, 1), (-1, -1), (1, 0), (-1, 0), (0, 1), (0, -1))  # upper right first
MARKER_HALF = 5.5  # points: half the side of the square a marker keeps clear
LABEL_PAD = 1.5  # points kept clear around a label's text
LEADER = {"arrowstyle": "-", "color": "#999", "lw": 0.6, "shrinkA": 1, "shrinkB": 4}  # a far label's line to its point


def place_labels(fig, ax, labels: list[tuple], obstacles: list[tuple[float, float]] = (), **style) -> list[str]:
    """Write each label (text, x, y[, style]) beside its point where its text covers no other label, no marker and
    stays inside the axes: the first free spot going round the point, then further out with a leader line. A label
    with no free spot is left out (its point keeps its legend entry or table row); returns those texts.

    The layout is settled first and then fixed, so the positions measured here are the ones saved (every size is
    in points: the SVG's other dpi scales it all alike). obstacles: more points (data coordinates) to keep clear."""
    import itertools

    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.text import Text
    from matplotlib.transforms import Bbox

    canvas = FigureCanvasAgg(fig)
    fig.draw_without_rendering()
    fig.set_layout_engine("none")
    renderer = canvas.get_renderer()
    px = fig.dpi / 72
    frame = ax.get_window_extent(renderer)
    half = MARKER_HALF * px
    points = ax.transData.transform([(label[1], label[2]) for label in labels] + list(obstacles)) if labels else []
    taken = [Bbox.from_extents(x - half, y - half, x + half, y + half) for x, y in points]
    left_out = []
    for i, (text, x, y, *own) in enumerate(labels):
        for ring, (dx, dy) in itertools.product(LABEL_RINGS, LABEL_DIRECTIONS):
            leader = {"arrowprops": LEADER} if ring > LABEL_RINGS[0] else {}
            note = ax.annotate(
                text,
                (x, y),
                xytext=(dx * ring, dy * ring),
                textcoords="offset points",
                ha={1: "left", -1: "right", 0: "center"}[dx],
                va={1: "bottom", -1: "top", 0: "center"}[dy],
                gid=f"label-{i}",
                **leader,
                **(style | (own[0] if own else {})),
            )
            note.update_positions(renderer)
            box = Text.get_window_extent(note, renderer).padded(LABEL_PAD * px)  # the text alone, not its line
            inside = frame.x0 <= box.x0 and box.x1 <= frame.x1 and frame.y0 <= box.y0 and box.y1 <= frame.y1
            if inside and not any(box.overlaps(other) for other in taken):
                taken.append(box)
                break
            note.remove()
        else:
            left_out.append(text)
    return left_out


def model_costs(evals: dict[str, EvalResult], ledger: Ledger, labels: list[str]) -> tuple[dict[str, float], str]:
    """$ of serving one month of queries with each model, one-off costs included; and the caption."""
    break_even = ledger.break_even
    queries = break_even.queries_per_month
    api, student = break_even.api_usd_per_query, break_even.student_usd_per_query
    if None in (queries, api, student):
        return {}, f"cost-vs-quality needs the break-even prices ({_known_or(break_even.reason, 'missing')})"
    one_off, training = break_even.one_off_usd or 0.0, break_even.training_usd or 0.0
    costs = {}
    for label in labels:
        if label == "teacher":
            costs[label] = api * queries
        elif label == "base":
            costs[label] = student * queries  # same architecture as the student: same serving cost, nothing trained
        elif label == "distilled":
            costs[label] = one_off + student * queries
        else:
            costs[label] = training + student * queries  # a control trained with the same compute on its own data
    notional = " The teacher is priced at a NOTIONAL API price." if break_even.price_basis == "notional" else ""
    caption = (
        f"Task score vs $ for {human_count(queries)} queries (one month at the configured traffic): teacher = "
        f"API calls; base = serving only; distilled = teacher data + training + serving; other models = training"
        f" + serving. The line is the Pareto frontier (no model is both cheaper and better).{notional}"
    )
    return costs, caption


def pareto_frontier(points: list[tuple[float, float, str]]) -> list[tuple[float, float, str]]:
    """Points no other point beats on both cost (lower) and score (higher), cheapest first."""
    frontier, best = [], -math.inf
    for cost, score, name in sorted(points, key=lambda p: (p[0], -p[1])):
        if score > best:
            frontier.append((cost, score, name))
            best = score
    return frontier


def pareto_svg(evals: dict[str, EvalResult], ledger: Ledger, labels: list[str]) -> tuple[str | None, str]:
    costs, caption = model_costs(evals, ledger, labels)
    points = [
        (costs[m], 100 * suite_score(evals, m, "task"), m)
        for m in labels
        if m in costs and suite_score(evals, m, "task") is not None
    ]
    if not points:
        return None, caption
    fig, ax = _new_figure()
    for cost, score, m in points:
        ax.scatter([cost], [score], s=70, color=color_of(m, labels), zorder=3, label=m)
    frontier = pareto_frontier(points)
    ax.step(
        [p[0] for p in frontier],
        [p[1] for p in frontier],
        where="post",
        color="#333",
        lw=1.2,
        alpha=0.7,
        zorder=2,
        label="Pareto frontier",
    )
    positive = [p[0] for p in points if p[0] > 0]
    if len(positive) == len(points) and max(positive) / min(positive) > 100:
        ax.set_xscale("log")
    ax.set_xlabel("$ per month of queries")
    ax.set_ylabel("task suite score (%)")
    ax.set_title("Cost vs quality")
    ax.grid(alpha=0.3)
    _outside_legend(ax, fontsize=8)
    place_labels(fig, ax, [(m, cost, score) for cost, score, m in points], fontsize=9)
    return svg_text(fig, "pareto"), caption


def skill_delta_svg(evals: dict[str, EvalResult], labels: list[str], task: set[str] = frozenset()) -> str | None:
    names = skill_names(evals)
    movers = [m for m in labels if m not in ("teacher", "base")]
    if "base" not in evals or not names or not movers:
        return None

    from matplotlib.patches import Patch

    fig, ax = _new_figure(height=max(3.0, 0.42 * len(names) * max(1, len(movers)) ** 0.5 + 1.2))
    height = 0.8 / len(movers)
    hatches = ["", "///", "...", "xxx", "\\\\\\"]  # the distilled student solid, other models hatched
    legend = []
    for j, m in enumerate(movers):
        pairs = [(evals[m].skill_score(s), evals["base"].skill_score(s)) for s in names]
        deltas = [100 * (mine - base) if None not in (mine, base) else 0.0 for mine, base in pairs]
        ys = [i + (j - (len(movers) - 1) / 2) * height for i in range(len(names))]
        hatch = hatches[j % len(hatches)]
        ax.barh(
            ys,
            deltas,
            height=height * 0.92,
            color=["#d64541" if d < 0 else "#3a9d5d" for d in deltas],
            edgecolor="white" if hatch else "none",
            hatch=hatch,
            linewidth=0,
        )
        legend.append(Patch(facecolor="#9aa0a8", edgecolor="white", hatch=hatch, label=m))
    ax.axvline(0, color="#333", lw=0.8)
    ax.set_yticks(range(len(names)), [s + (" (task)" if s in task else "") for s in names], fontsize=9)
    ax.invert_yaxis()
    ax.set_xlabel("change vs base (points): red = lost, green = gained")
    ax.set_title("Per-skill change vs base")
    ax.grid(axis="x", alpha=0.3)
    ax.legend(handles=legend, fontsize=8, loc="best")
    return svg_text(fig, "skills")


# ----------------------------------------------------------------------------------------------------
# Retain: the whole trade-off the rule chose from (its sentence and candidates table are in sections.html.j2).


def tradeoff_svg(evals: dict[str, EvalResult], labels: list[str], selection: dict, chosen_as: str) -> str | None:
    """Task (y) vs general (x), as the task-vs-general plot: test-split models filled, dev-split candidates hollow,
    the chosen one starred. Each candidate is its own SVG group (id candidate-N) so a browser test can count them."""
    candidates = [c for c in selection.get("candidates") or [] if None not in (c.get("dev_task"), c.get("dev_general"))]
    if not candidates:
        return None
    fig, ax = _new_figure(width=6.8, height=4.8)
    for i, c in enumerate(candidates):
        ax.scatter(
            [100 * c["dev_general"]],
            [100 * c["dev_task"]],
            s=40,
            facecolors="none",
            edgecolors=COLORS["retain"],
            linewidths=1.2,
            zorder=3,
            gid=f"candidate-{i}",
            label="candidates (dev)" if i == 0 else None,
        )
    chosen = selection.get("chosen") or {}
    if chosen.get("dev_task") is not None:
        ax.scatter(
            [100 * chosen["dev_general"]],
            [100 * chosen["dev_task"]],
            s=220,
            marker="*",
            color="#f2b600",
            edgecolors="#333",
            zorder=4,
            gid="chosen",
            label=f"chosen (dev): {chosen.get('label')}",
        )
    base = selection.get("base_dev") or {}
    if base.get("task") is not None:
        ax.scatter(
            [100 * base["general"]],
            [100 * base["task"]],
            s=60,
            facecolors="none",
            edgecolors=COLORS["base"],
            linewidths=1.5,
            zorder=3,
            label="base (dev)",
        )
    spots = []  # the test-split models first: their labels get the nearest spots
    for m in labels:
        task, general = suite_score(evals, m, "task"), suite_score(evals, m, "general")
        if None in (task, general):
            continue
        ax.scatter([100 * general], [100 * task], s=70, color=color_of(m, labels), zorder=5, label=f"{m} (test)")
        spots.append((m, 100 * general, 100 * task, {"fontsize": 9}))
    small = {"fontsize": 6.5, "color": "#555"}
    spots += [(f"{c['step']}/α{c['alpha']:g}", 100 * c["dev_general"], 100 * c["dev_task"], small) for c in candidates]
    _task_general_axes(ax, f"The retain trade-off: what {chosen_as} was chosen from")
    _outside_legend(ax, fontsize=7)
    kept_clear = [(100 * p["general"], 100 * p["task"]) for p in (base,) if p.get("task") is not None]
    if chosen.get("dev_task") is not None:
        kept_clear.append((100 * chosen["dev_general"], 100 * chosen["dev_task"]))
    place_labels(fig, ax, spots, kept_clear)
    return svg_text(fig, "tradeoff")


def plan_svg(plan: PlanRecord, evals: dict[str, EvalResult]) -> str | None:
    """The plan's curves: each candidate teacher's pilots (dev split), its fitted curve and the projection's band, for
    the task score and the general change; the run's own student at its size (test split), when it was scored."""
    import numpy as np
    from matplotlib.figure import Figure

    teachers = [t for t in plan.teachers if t.task_curve is not None and t.general_curve is not None]
    if not teachers:
        return None
    fig = Figure(figsize=(9.6, 4.2), dpi=100, layout="constrained")
    task_ax, general_ax = fig.subplots(1, 2)
    palette = [COLORS["distilled"], COLORS["teacher"], *EXTRA_COLORS]
    base = plan.base_dev_general or 0.0
    smallest = min(p.share for t in teachers for p in t.pilots)
    for i, t in enumerate(teachers):
        style = {"color": palette[i % len(palette)]}
        shares = np.linspace(min(p.share for p in t.pilots), 1.0, 120)
        sizes = [100 * p.share for p in t.projections]
        changes = [p.general_change for p in t.pilots]
        panels = (
            (task_ax, t.task_curve, [p.dev_task for p in t.pilots], [p.task_band for p in t.projections], 0.0),
            (general_ax, t.general_curve, changes, [p.general_change_band for p in t.projections], base),
        )
        for ax, curve, points, bands, offset in panels:
            ax.plot(100 * shares, 100 * (curve.at(shares) - offset), lw=1.6, label=f"{t.label}: curve", **style)
            pilots = ([100 * p.share for p in t.pilots], [100 * (v or 0.0) for v in points])
            ax.scatter(*pilots, s=36, zorder=3, label=f"{t.label}: pilots (dev)", **style)
            lows, highs = (np.array(side, dtype=float) * 100 for side in zip(*bands))
            if not np.isnan([*lows, *highs]).any():
                ax.fill_between(sizes, lows, highs, alpha=0.15, label=f"{t.label}: 95% band", **style)
    star = {"marker": "*", "s": 140, "color": "#222", "zorder": 4, "label": "this run (test)"}
    task, general = (suite_score(evals, "distilled", suite) for suite in ("task", "general"))
    base_test = suite_score(evals, "base", "general")
    if task is not None:
        task_ax.scatter([100 * plan.target_share], [100 * task], **star)
    if None not in (general, base_test):
        general_ax.scatter([100 * plan.target_share], [100 * (general - base_test)], **star)
    for ax, title, ylabel in (
        (task_ax, "Task score by prompts", "task score (%)"),
        (general_ax, "General change by prompts", "general change vs base (points)"),
    ):
        ax.set_xscale("log")
        ticks = [t for t in (1, 2, 5, 10, 25, 50, 100) if t >= 50 * smallest]
        ax.set_xticks(ticks, [f"{t}%" for t in ticks])
        ax.set_xlabel("share of the train prompts (log scale)")
        ax.set_ylabel(ylabel)
        ax.set_title(title)
        ax.grid(alpha=0.3)
    general_ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0.0)
    return svg_text(fig, "plan")
