"""The report stage: the ledger, the registry row, the student's lineage update and report.html, from what the
earlier stages wrote (eval/*.json, the generate and train summaries, throughput.json, retain.json)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from distillab import costs, modelcard, registry
from distillab.config import RunConfig
from distillab.errors import UserError
from distillab.files import fingerprint, read_json
from distillab.records import EvalResult, Ledger, read_eval, read_ledger, read_lm_evals
from distillab.report.html import build_report
from distillab.rundir import RunDir
from distillab.stage import StageContext


@dataclass
class ReportRecord:
    report: Path
    ledger: Ledger
    skipped: bool = False


def load_evals(run: RunDir) -> dict[str, EvalResult]:
    """Every eval/<label>.json of the run (lm-eval's own files aside); a bad file is a one-line UserError."""
    return {path.stem: read_eval(path) for path in run.eval_files()}


@dataclass
class ReportStage:
    """`summary`: the demo's own summary (the retain selection it plots), when the demo writes the report."""

    summary: dict | None = None
    name: str = "report"

    def fingerprint(self, cfg: RunConfig, run: RunDir) -> str:
        # the student's model files stand for its throughput, which this stage measures (once) when it runs
        inputs = [
            *run.eval_files(),
            *run.lm_eval_files(),
            run.generate_summary("train"),
            run.generate_summary("replay"),
            run.sampled_prompts,
            run.train_summary,
            run.retain_record,
            run.decontamination,
            run.plan_record,  # `distillab plan`'s projection: the report's Plan section
            *run.student_model_files(),
        ]
        return fingerprint(
            "report",
            cfg.model_dump(),
            self.summary,
            *[p.name for p in inputs if p.is_file()],
            *[p for p in inputs if p.is_file()],
        )

    def outputs(self, cfg: RunConfig, run: RunDir) -> list:
        return [run.ledger, run.report]

    def run(self, cfg: RunConfig, run: RunDir, ctx: StageContext) -> ReportRecord:
        evals = load_evals(run)
        if not evals:
            raise UserError(f"no evaluations in {run.evals}: run `distillab evaluate` first")
        ledger = costs.build_ledger(cfg, evals)
        checked = ledger.teacher_generation.verification  # [verify]'s yield and $ per kept example
        if run.student_config.is_file():
            modelcard.update_lineage(
                run.student,
                eval={k: {"task": v.task.score, "general": v.general.score} for k, v in evals.items()},
                cost={"total_usd": ledger.total_usd, "break_even": ledger.break_even.to_dict()},
                verification=checked.to_dict() if checked else None,
                decontamination=read_json(run.decontamination) if run.decontamination.is_file() else None,
            )
        registry.record_run(run.registry, cfg, evals, ledger, read_lm_evals(run.lm_eval_files()))
        return ReportRecord(report=build_report(cfg, evals, ledger, self.summary), ledger=ledger)

    def load(self, cfg: RunConfig, run: RunDir) -> ReportRecord:
        return ReportRecord(report=run.report, ledger=read_ledger(run.ledger))
