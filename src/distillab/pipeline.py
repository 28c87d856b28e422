"""The stages in order: generate -> train -> evaluate -> report (ledger, registry, report.html)."""

from __future__ import annotations

from distillab.config import RunConfig
from distillab.errors import UserError
from distillab.evaluate import run_evaluate
from distillab.records import EvalResult, read_eval


def load_evals(cfg: RunConfig) -> dict[str, EvalResult]:
    """Every eval/<label>.json of the run (lm-eval's own files aside); a bad file is a one-line UserError."""
    return {path.stem: read_eval(path) for path in sorted((cfg.run_dir / "eval").glob("*.json"))
            if not path.name.startswith("lm_eval_")}


def finish_run(cfg: RunConfig, summary: dict | None = None, log=print):
    """Ledger, registry row, lineage update and report.html from what the earlier stages wrote."""
    from distillab import costs, provenance, registry
    from distillab.report import build_report

    evals = load_evals(cfg)
    if not evals:
        raise UserError(f"no evaluations in {cfg.run_dir / 'eval'}: run `distillab evaluate` first")
    ledger = costs.build_ledger(cfg, evals)
    student_dir = cfg.run_dir / "student"
    if (student_dir / "config.json").is_file():
        provenance.update_lineage(student_dir, eval={k: {"task": v.task.score, "general": v.general.score}
                                                     for k, v in evals.items()},
                                   cost={"total_usd": ledger.total_usd, "break_even": ledger.break_even.to_dict()})
    registry.record_run(cfg.run_dir.parent / "registry.sqlite", cfg, evals, ledger)
    return build_report(cfg, evals, ledger, summary)


def run_all(cfg: RunConfig, generate_stage, train_stage, log=print):
    generate_stage(cfg)
    train_stage(cfg)
    run_evaluate(cfg, log=log)
    if cfg.eval.lm_eval_tasks:  # the config's real benchmarks run in `run` too, not only in `evaluate --lm-eval-tasks`
        from distillab.lm_eval_bridge import run_lm_eval

        run_lm_eval(cfg, "", log=log)
    path = finish_run(cfg, log=log)
    log(f"report: {path}")
    return path
