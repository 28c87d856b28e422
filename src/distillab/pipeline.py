"""A run as lists of stages: what `distillab run` and each stage command execute, in order, through run_stage.

run       = generate + train + evaluate + report
generate  = [generate:dev] generate:train [sampled_prompts] [generate:replay]   (the [ ]: when [retain] asks)
train     = train
evaluate  = [select] evaluate:<model>... [lm_eval:<model>...]
report    = report (and its part, throughput)
"""

from __future__ import annotations

from pathlib import Path

from distillab.config import RunConfig
from distillab.evaluate import evaluate_stages
from distillab.generate import generate_stages
from distillab.lm_eval_bridge import lm_eval_stages
from distillab.report.finish import ReportStage
from distillab.rundir import RunDir
from distillab.select import select_stages
from distillab.stage import Stage, StageContext, run_stages
from distillab.train import train_stage


def evaluation_stages(
    cfg: RunConfig, lm_eval_tasks: str = "", extra_models: dict[str, str] | None = None
) -> list[Stage]:
    """Checkpoint selection on dev (when retain selects: test is scored once, on the choice), every model on the
    task and general suites, then lm-eval's tasks when the config or the command names any."""
    stages = [*select_stages(cfg), *evaluate_stages(cfg, extra_models)]
    if lm_eval_tasks or cfg.eval.lm_eval_tasks:
        stages += lm_eval_stages(cfg, lm_eval_tasks)
    return stages


def report_stages(cfg: RunConfig, summary: dict | None = None) -> list[Stage]:
    """The report; the student's throughput measurement is part of it (costs.build_ledger runs that stage, with
    its own stamp, once the evaluations are known to be there)."""
    return [ReportStage(summary)]


def run_all_stages(cfg: RunConfig) -> list[Stage]:
    """generate -> train -> evaluate -> report: every stage of a run."""
    return [*generate_stages(cfg), train_stage, *evaluation_stages(cfg), *report_stages(cfg)]


def finish_run(cfg: RunConfig, summary: dict | None = None, log=print) -> Path:
    """The report stages (throughput, report) through run_stage; the path of report.html."""
    return run_stages(report_stages(cfg, summary), cfg, StageContext(log=log))["report"].report


def records_by_label(records: dict, prefix: str) -> dict:
    """{"evaluate:base": record, ...} -> {"base": record, ...} for the stages whose name starts with prefix + ":"."""
    return {name.split(":", 1)[1]: record for name, record in records.items() if name.startswith(prefix + ":")}


def share_teacher_cache(cfg: RunConfig, other: RunConfig) -> None:
    """Give `other` a copy of `cfg`'s request cache (when it has none yet): a run that asks the teacher the same
    requests (the demo's retain run, an arm of the signal demo) then asks nothing twice."""
    import sqlite3

    src, dst = RunDir(cfg.run_dir).cache(), RunDir(other.run_dir).cache()
    if src.is_file() and not dst.is_file():
        dst.parent.mkdir(parents=True, exist_ok=True)
        with sqlite3.connect(src) as a, sqlite3.connect(dst) as b:
            a.backup(b)
