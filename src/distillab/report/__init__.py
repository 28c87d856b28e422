"""The run's report: report.html (html.py) and the summary the CLI prints at the end of a run.

build_report(cfg, evals, ledger, summary) -> Path   run_dir/report.html, self-contained and offline
terminal_summary(evals, ledger) -> rich renderable   verdict, scores with intervals, the money lines
"""

from __future__ import annotations

from distillab.records import EvalResult, Ledger, SuiteScore, as_evals
from distillab.report.html import build_report, ordered_labels, pct, verdict

__all__ = ["build_report", "terminal_summary", "verdict"]


def terminal_summary(evals: dict[str, EvalResult], ledger: Ledger, lm_evals: dict | None = None):
    """What a finished run prints: the verdict sentence, a scores table (and lm-eval's, when it ran) and the cost
    lines (records or their JSON dicts)."""
    from rich.console import Group
    from rich.table import Table
    from rich.text import Text

    from distillab.report.html import ledger_rows, lm_eval_rows

    evals, ledger = as_evals(evals), Ledger.model_validate(ledger)
    table = Table(
        "model",
        "task % [95% CI]",
        "general % [95% CI]",
        "world-text ppl (per token of its tokenizer)",
        title="scores",
        title_justify="left",
    )
    for label in ordered_labels(evals):
        res = evals[label]
        ppl = res.world_text_perplexity
        task = f"not scored: {res.not_scored}" if res.not_scored else _with_ci(res.task)
        table.add_row(label, task, _with_ci(res.general), "-" if ppl is None else f"{ppl:.2f}")
    tables = [table]
    lm_eval = lm_eval_rows(lm_evals or {})
    if lm_eval["rows"]:
        tables.append(
            Table(
                "model",
                *(f"{task} ({metric})" for task, metric in lm_eval["tasks"]),
                title="lm-evaluation-harness",
                title_justify="left",
            )
        )
        for label, values in lm_eval["rows"]:
            tables[-1].add_row(label, *("-" if v is None else f"{v:.3f}" for v in values))
    costs = Table.grid(padding=(0, 2))
    wanted = (
        "teacher generation $",
        "teacher samples verified",
        "training",
        "retain",
        "distillation total $",
        "teacher evaluation $",
        "student serving",
        "teacher API",
        "break-even",
    )
    for item, value in ledger_rows(ledger):
        if item in wanted:
            costs.add_row(Text(item, style="bold"), Text(value))
    notes = [Text(f"note: {n}", style="yellow") for n in ledger.notes if "NOTIONAL" in n or "UNPRICED" in n]
    return Group(Text(verdict(evals, ledger), style="bold"), *tables, costs, *notes)


def _with_ci(res: SuiteScore) -> str:
    if res.score is None:
        return "-"
    ci = res.ci or [None, None]
    return f"{pct(res.score)} [{pct(ci[0])}, {pct(ci[1])}]"
