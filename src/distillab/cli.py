"""The `distillab` command: one subcommand per stage, plus run, demo, serve, lineage, audit, leaderboard, lab.

Errors: `run_cli` is the one boundary. Bad input (a UserError, a usage error, or a foreseeable library failure
that `errors.user_message` words: not UTF-8, a path that cannot be created, a corrupt SQLite/Parquet/JSON file)
is one line on stderr and exit 2; anything else is a bug: one "internal error" line and exit 1, with the
traceback only under `distillab --debug` (or DISTILLAB_DEBUG=1). Interrupted: exit 130.
"""

from __future__ import annotations

import os
import sys
import traceback
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path

import typer
from rich.console import Console
from rich.text import Text

from distillab.errors import EXIT_BUG, EXIT_INTERRUPTED, EXIT_USER, UserError, one_line, user_message

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="Distill a teacher into a student; measure what it gained, what it forgot and what it cost.",
)
lab_app = typer.Typer(no_args_is_help=True, help="The embedded lab world and its shipped checkpoints.")
app.add_typer(lab_app, name="lab")
console = Console(stderr=True)

ConfigArg = typer.Argument(..., help="run config (TOML); unknown keys are errors")
_debug = {"on": False}  # set by the global --debug option; read by the boundary in run_cli


@app.callback()
def _global_options(
    debug: bool = typer.Option(
        False, "--debug", envvar="DISTILLAB_DEBUG", help="show the traceback of an unexpected error"
    ),
):
    """Distill a teacher into a student; measure what it gained, what it forgot and what it cost."""
    _debug["on"] = debug


def _config(path: Path, overrides: dict[str, dict] | None = None):
    """The run config, with command-line overrides ({section: {key: value}}) validated like the file's own."""
    from distillab.config import from_dict, load_config
    from distillab.rundir import RunDir

    cfg = load_config(path)
    if overrides:
        data = cfg.model_dump()
        for section, values in overrides.items():
            data[section] |= values
        cfg = from_dict(data)
    RunDir(cfg.run_dir).check_creatable()  # a run directory that cannot be created fails here, before any work
    return cfg


class _RecordConfig:
    """Writes run.toml when a command succeeds, and when one fails after starting a new run directory: a run
    directory says how it was made, and input rejected in an existing run leaves nothing new on disk."""

    def __init__(self, cfg):
        from distillab.rundir import RunDir

        self.cfg, self.run = cfg, RunDir(cfg.run_dir)

    def __enter__(self):
        self.existed = self.run.root.is_dir()
        return self

    def __exit__(self, exc_type, *exc):
        from distillab.config import to_toml
        from distillab.files import write_atomic

        if self.run.root.is_dir() and (exc_type is None or not self.existed):
            write_atomic(self.run.config, to_toml(self.cfg))
        return False


@contextmanager
def _progress_bar(cfg, stage):
    """The progress callback a stage reports to, drawn as a rich bar: the teacher's answers for a dataset stage
    (progress(done, total, budget)), the steps for train (progress(step, total, loss)); None for the others."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    kind = stage.name.split(":")[0]
    if kind not in ("generate", "train"):
        yield None
        return
    label, field = ("teacher", "money") if kind == "generate" else (f"train {cfg.name}", "loss")
    progress = Progress(
        TextColumn(label),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn(f"{{task.fields[{field}]}}"),
        TimeRemainingColumn(),
        console=console,
        transient=True,
    )
    task = progress.add_task(kind, total=None, **{field: "" if kind == "generate" else "-"})

    def teacher_answers(done: int, total: int, budget) -> None:
        spent, projected = budget.spent, budget.projected
        money = "unpriced" if spent is None else f"${spent:.4f} spent, ${projected or 0:.4f} projected"
        tokens = f"{budget.prompt_tokens + budget.completion_tokens} tok"
        progress.update(task, completed=done, total=total, money=f"{tokens}  {money}")

    def train_steps(step: int, total: int, loss: float) -> None:
        progress.update(task, completed=step, total=total, loss=f"{loss:.4f}")

    with progress:
        yield teacher_answers if kind == "generate" else train_steps


def run_shown(cfg, stages, shard=None) -> dict:
    """The stages through run_stage in order, with progress bars and one line per finished dataset and student;
    {stage name: record}. Also what `distillab demo` runs each of its lists with."""
    from distillab.rundir import WHOLE
    from distillab.stage import StageContext, run_stage

    ctx = StageContext(log=console.print, shard=shard or WHOLE)
    records = {}
    with _RecordConfig(cfg):
        for stage in stages:
            with _progress_bar(cfg, stage) as progress:
                records[stage.name] = run_stage(stage, cfg, replace(ctx, progress=progress))
            line = _finished_line(cfg, stage.name, records[stage.name], ctx.shard)
            if line:
                console.print(line, markup=False)  # it quotes prompts: their brackets are text, not rich markup
    return records


def _finished_line(cfg, name: str, record, shard) -> str | None:
    from distillab.generate import GenerateSummary
    from distillab.rundir import WHOLE
    from distillab.train import TrainSummary

    if isinstance(record, GenerateSummary) and name == "generate:train":
        from distillab.verify import summary_line

        checked = f"\n{summary_line(record.verification)}" if record.verification else ""  # [verify]'s yield and cost
        if record.decontamination:  # [decontaminate]: what the prompts were checked against, what was dropped
            from distillab.decontaminate import summary_line as decontaminated

            checked += f"\ndecontaminate: {decontaminated(record.decontamination)}"
        if shard != WHOLE:
            return (
                f"generate shard {shard[0]}/{shard[1]}: {record.rows} rows ({record.requests_sent} sent, "
                f"{record.cached} cached, {record.failed} failed); per endpoint: {record.endpoints}{checked}"
            )
        money = "unpriced" if record.usd is None else f"${record.usd:.4f}"
        state = (
            "up to date"
            if record.skipped
            else f"{record.requests_sent} sent, {record.cached} cached, {record.failed} failed"
        )
        traces = f" ({record.reasoning_tokens} reasoning)" if record.reasoning_tokens else ""
        return (
            f"generate: {record.rows} rows ({state}); teacher tokens {record.prompt_tokens} in / "
            f"{record.completion_tokens} out{traces}, {money}{checked}"
        )
    if isinstance(record, TrainSummary) and record.complete:
        cut = (
            f"; max_length {record.max_length}: {record.truncated_rows} rows truncated, {record.dropped_rows} "
            f"dropped, {record.tokens_cut} completion tokens cut"
            if record.truncated_rows or record.dropped_rows
            else ""
        )
        return (
            f"train {cfg.name}: {'up to date' if record.skipped else 'done'}: {record.steps} steps, "
            f"{record.train_seconds}s, final loss {record.final_loss:.4f}{cut}"
        )
    return None


@app.command()
def generate(
    config: Path = ConfigArg,
    max_usd: float | None = typer.Option(None, help="stop before projected teacher spend passes this"),
    shard: str | None = typer.Option(
        None,
        help="I/N: answer only shard I of N of the prompts (by hash), "
        "writing data/train/part-I-of-N-* into the shared run directory",
    ),
):
    """Teacher answers the task prompts -> data/train.parquet, or its shards with --shard (cached, resumable)."""
    from distillab.generate import generate_stages
    from distillab.shards import parse_shard

    spec = parse_shard(shard)  # a bad --shard is one line, before anything
    cfg = _config(config, {"teacher": {"max_usd": max_usd}} if max_usd is not None else None)
    run_shown(cfg, generate_stages(cfg), shard=spec)


@app.command()
def train(config: Path = ConfigArg):
    """The student learns from the teacher's data -> student/ (resumes from checkpoints/)."""
    from distillab.train import train_stage

    cfg = _config(config)
    run_shown(cfg, [train_stage])


@app.command()
def evaluate(
    config: Path = ConfigArg,
    lm_eval_tasks: str | None = typer.Option(None, "--lm-eval-tasks", help="lm-eval task names or a YAML file"),
):
    """Teacher, base and student on the task and general suites -> eval/<model>.json."""
    from distillab.pipeline import evaluation_stages, records_by_label

    cfg = _config(config)
    records = run_shown(cfg, evaluation_stages(cfg, lm_eval_tasks or ""))
    _print_scores(records_by_label(records, "evaluate"))


@app.command()
def report(config: Path = ConfigArg):
    """Ledger, leaderboard entry and report.html for a run."""
    from distillab.pipeline import report_stages

    cfg = _config(config)
    records = run_shown(cfg, report_stages(cfg))
    _print_terminal_summary(cfg)
    console.print(f"report: {records['report'].report}")


@app.command()
def run(config: Path = ConfigArg):
    """generate -> train -> evaluate -> report."""
    from distillab.pipeline import run_all_stages

    cfg = _config(config)
    records = run_shown(cfg, run_all_stages(cfg))
    console.print(f"report: {records['report'].report}")
    _print_terminal_summary(cfg)


@app.command()
def plan(
    config: Path = ConfigArg,
    teacher: list[str] = typer.Option(
        [],
        "--teacher",
        help="another candidate teacher: [teacher] settings as key=value pairs over the config's "
        '(e.g. "temperature=2.0", "model=gpt-4o-mini,base_url=https://api.openai.com/v1,label=mini"); repeatable',
    ),
):
    """Pilots on nested shares of the prompts, scored on dev; the full run projected per size: score, $, break-even."""
    from distillab.plan import print_plan, run_plan, with_teacher_options

    cfg = with_teacher_options(_config(config), teacher)
    record = run_plan(cfg, runner=run_shown, log=console.print)
    from distillab.rundir import RunDir

    print_plan(record, RunDir(cfg.run_dir).plan_record, console=Console())


@app.command()
def demo(
    runs_dir: Path = typer.Option(Path("runs"), help="where runs/demo goes"),
    fresh: bool = typer.Option(False, help="delete runs/demo (runs/signal with --signal) first"),
    signal: bool = typer.Option(
        False, "--signal", help="where the teacher's signal pays: distributions and verified traces, over 3 seeds"
    ),
    workers: int | None = typer.Option(
        None, min=1, help="--signal: worker processes of one thread each (default: one per core); numbers do not change"
    ),
    family: list[str] = typer.Option(
        [],
        "--family",
        help="--signal: only this family (distribution: 2 min on 2 cores; reasoning: about 10); repeatable",
    ),
):
    """The lab demo: distill the base student on a task, with a zero-distillation control; ~4 minutes on 2 cores.
    --signal: the signal demo (distillab.signal_demo), about 12 minutes on 2 cores."""
    from distillab.files import check_creatable

    check_creatable(runs_dir, "runs directory", "choose another --runs-dir")
    if signal:
        import shutil

        from distillab.signal_demo import chosen_families, run_signal_demo

        families = chosen_families(family)
        if fresh:
            shutil.rmtree(runs_dir / "signal", ignore_errors=True)
        run_signal_demo(runs_dir, log=console.print, families=families, workers=workers)
        return
    from distillab.demo import run_demo

    run_demo(runs_dir, fresh=fresh, runner=run_shown, log=console.print)


@app.command()
def serve(
    model_dir: str = typer.Argument(..., help="HF model directory or lab:NAME"),
    host: str = typer.Option("127.0.0.1", help="bind address (loopback unless you mean it)"),
    port: int = typer.Option(8000, help="TCP port, 1-65535"),
    api_key: str | None = typer.Option(None, envvar="DISTILLAB_SERVE_API_KEY", help="require this bearer key"),
    max_batch: int = typer.Option(32, help="most prompts in one model call (1: no batching)"),
    max_request_work: int | None = typer.Option(
        None,
        help="most token slots one request may fill: (prompts x max_tokens + echoed prompt tokens) "
        "x (1 + top logprobs); default 262144",
    ),
    max_client_work: int | None = typer.Option(
        None,
        help="most token slots (counted as for --max-request-work) one client address may have queued or running; "
        "past it a 429 with Retry-After; default 4194304",
    ),
    idempotency_max_mb: float | None = typer.Option(
        None,
        help="memory for answers kept to replay a repeated Idempotency-Key, least recently used dropped past it; "
        "default 256",
    ),
    fault_rate: float = typer.Option(0.0, help="inject faults (429/500/hang/truncated) at this rate: for tests"),
    fault_seed: int = typer.Option(0, help="seed of the fault schedule"),
    batch_delay: float = typer.Option(
        0.0, help="seconds a Batch API batch waits before it runs (a provider's queue): for tests and demos"
    ),
    reasoning_parser: str | None = typer.Option(
        None,
        help="think (or vLLM's deepseek_r1 / qwen3): a chat answer's inline <think> trace is returned in "
        "message.reasoning_content, apart from its content; unset: inline",
    ),
):
    """Serve a local model behind an OpenAI-compatible API."""
    from distillab.models import resolve_model_path
    from distillab.serve import serve as serve_model

    resolve_model_path(model_dir)  # a missing directory is a one-line error before uvicorn starts
    # serve_model checks the port and limits before it loads the model: a bad one is a one-line UserError
    serve_model(
        model_dir,
        host=host,
        port=port,
        api_key=api_key,
        max_batch=max_batch,
        max_request_work=max_request_work,
        max_client_work=max_client_work,
        idempotency_max_mb=idempotency_max_mb,
        fault_rate=fault_rate,
        fault_seed=fault_seed,
        reasoning_parser=reasoning_parser,
        batch_delay_s=batch_delay,
    )


@app.command()
def lineage(model_dir: Path = typer.Argument(..., help="a student directory distillab wrote")):
    """Print a model's distillation lineage: base, teachers, token fractions per generation."""
    from distillab.modelcard import format_lineage
    from distillab.provenance import load_lineage

    if not model_dir.is_dir():
        raise UserError(f"model directory not found: {model_dir}")
    found = load_lineage(model_dir)
    if found is None:
        raise UserError(f"no lineage recorded in {model_dir} (lineage.json is missing)")
    print(format_lineage(found))


@app.command()
def export(
    run: Path = typer.Argument(..., help="a run directory, or the run config (TOML) that names it"),
    fmt: str = typer.Option("plain", "--format", help="plain (Parquet, top-k as list columns) or openai-chat (JSONL)"),
    out: Path | None = typer.Option(None, help="output directory (default RUN/export/FORMAT)"),
):
    """Write a run's dataset for other tools: plain Parquet (TRL, DistillKit) or OpenAI fine-tuning JSONL."""
    from distillab.export import export_run

    for path in export_run(run, fmt, out):
        print(path)  # one written file a line, on stdout: easy to pipe


@app.command()
def inspect(
    run: Path = typer.Argument(..., help="a run directory, or the run config (TOML) that names it"),
    row: int = typer.Option(0, min=0, help="the row's index in the dataset (0: the first)"),
    dataset: str = typer.Option("train", help="train (the teacher's answers) or replay (retain's)"),
    top: int = typer.Option(3, min=1, help="the teacher's most likely tokens shown at each label"),
):
    """One training row as the trainer sees it: its tokens, which carry labels and loss, the teacher's top-k."""
    from distillab.inspect import render, row_view

    Console(width=max(console.width, 100)).print(render(row_view(run, row, dataset, top)))


@app.command()
def audit(
    corpus: Path = typer.Argument(..., help="JSONL or Parquet with a text column"),
    labelled: Path | None = typer.Option(None, help="labelled sample (text, label 1=teacher) to calibrate on"),
    observer: str = typer.Option("lab:teacher", help="scores the text (must know the domain)"),
    performer: str = typer.Option("lab:base", help="gives the expected distribution"),
    text_field: str = typer.Option("text"),
    prompt_field: str | None = typer.Option(None),
    out: Path = typer.Option(Path("audit"), help="output directory"),
):
    """Estimate how much of a corpus a teacher model wrote (Binoculars and Fast-DetectGPT scores)."""
    from distillab.audit import run_audit

    summary = run_audit(
        corpus,
        out,
        observer=observer,
        performer=performer,
        labelled_path=labelled,
        text_field=text_field,
        prompt_field=prompt_field,
    )
    from rich.pretty import pprint

    pprint(summary, console=Console())
    if summary.get("note"):  # no fraction: say why where it cannot be missed
        console.print(Text(f"audit: {summary['note']}"), soft_wrap=True)


@app.command()
def leaderboard(registry: Path = typer.Option(Path("runs/registry.sqlite"), help="the runs registry")):
    """All recorded runs, ranked by value: task score net of general-skill loss, per distillation dollar."""
    from distillab.registry import print_leaderboard

    print_leaderboard(registry)


@lab_app.command("pretrain")
def lab_pretrain(
    which: str = typer.Argument("all", help="teacher, base or all"),
    out: Path = typer.Option(None, help="directory for the checkpoints (default: the package's own)"),
    steps: int | None = typer.Option(None, min=1, help="override the first phase's step count"),
    from_phase: int = typer.Option(0, min=0, help="continue from the checkpoint in --out after this many phases"),
):
    """Reproduce the shipped lab checkpoints (the teacher takes about an hour on 2 cores)."""
    from distillab.files import check_creatable
    from distillab.lab.pretrain import PRESETS, pretrain
    from distillab.models import LAB_CHECKPOINTS

    names = list(PRESETS) if which == "all" else [which]
    unknown = [name for name in names if name not in PRESETS]
    if unknown:
        raise UserError(f"unknown lab checkpoint {unknown[0]!r}; choose from {', '.join(PRESETS)} or all")
    if out is not None:  # before an hour of pretraining, not after it
        check_creatable(out, "checkpoint directory", "choose another --out")
    for name in names:
        pretrain(name, (out or LAB_CHECKPOINTS) / name, steps=steps, log=console.print, from_phase=from_phase)


@lab_app.command("bpe-student")
def lab_bpe_student(
    out: Path = typer.Argument(..., help="directory for the student (kept when it is already pretrained as asked)"),
    steps: int = typer.Option(2000, min=1, help="pretraining steps of 64 examples (lab:base had 2,000)"),
    vocab_size: int = typer.Option(384, min=260, help="BPE vocabulary size (the 256 bytes and 4 specials at least)"),
):
    """A base student with its own byte-level BPE tokenizer, for cross-tokenizer KD from lab:teacher."""
    from distillab.files import check_creatable
    from distillab.lab.bpe import build_bpe_student

    check_creatable(out, "student directory", "choose another directory")
    build_bpe_student(out, steps=steps, vocab_size=vocab_size, log=console.print)


@lab_app.command("skills")
def lab_skills():
    """List the lab's skills."""
    from rich.table import Table

    from distillab.lab.world import ALL_SKILLS, SIGNAL_SKILLS

    table = Table("skill", "family", "metric", "what")
    for s in ALL_SKILLS.values():
        signal = " (signal demo; lab:signal-teacher)" if s.name in SIGNAL_SKILLS else ""
        table.add_row(s.name, s.family, s.metric, s.description + signal)
    Console().print(table)


def _print_terminal_summary(cfg) -> None:
    from distillab.records import read_ledger, read_lm_evals
    from distillab.report import terminal_summary
    from distillab.report.finish import load_evals
    from distillab.rundir import RunDir

    run = RunDir(cfg.run_dir)
    Console().print(terminal_summary(load_evals(run), read_ledger(run.ledger), read_lm_evals(run.lm_eval_files())))


def _print_scores(results: dict) -> None:
    from rich.table import Table

    table = Table("model", "task", "general", "world-text ppl")
    for label, res in results.items():
        t, g, ppl = res.task.score, res.general.score, res.world_text_perplexity
        if res.not_scored:
            table.add_row(label, f"not scored: {res.not_scored}", "-", "-")
            continue
        table.add_row(
            label,
            "-" if t is None else f"{t:.3f}",
            "-" if g is None else f"{g:.3f}",
            "-" if ppl is None else f"{ppl:.2f}",
        )  # an API teacher has no perplexity
    Console().print(table)


def _error(message: str) -> None:
    """One line on stderr. Markup off: a message may hold brackets ([74.8, 100]) that rich would eat."""
    console.print(Text.assemble(("error:", "red"), " ", one_line(message)), soft_wrap=True, highlight=False)


def run_cli(args: list[str] | None = None) -> int:
    """Run the command line and return its exit code: the one error boundary (see the module docstring).

    Tests call it in-process with args; main() calls it with sys.argv.
    """
    _quiet_libraries()
    _debug["on"] = os.environ.get("DISTILLAB_DEBUG", "") not in ("", "0")
    try:
        code = app(args=args, prog_name="distillab", standalone_mode=False)
    except typer.TyperException as err:  # typer's own click: usage errors (bad option value, unknown command)
        if type(err).__name__ == "NoArgsIsHelpError":  # bare `distillab` or `distillab lab`: the help
            err.show()
            return err.exit_code
        ctx = getattr(err, "ctx", None)
        _error(err.format_message() + (f" (see `{ctx.command_path} --help`)" if ctx is not None else ""))
        return EXIT_USER
    except typer.Abort:
        console.print("interrupted: rerun the same command to resume")
        return EXIT_INTERRUPTED
    except KeyboardInterrupt:
        console.print("interrupted: rerun the same command to resume")
        return EXIT_INTERRUPTED
    except Exception as err:  # noqa: BLE001 - this is the boundary
        message = user_message(err)
        if _debug["on"] and not isinstance(err, UserError):
            traceback.print_exc()
        if message is not None:
            _error(message)
            return EXIT_USER
        if not _debug["on"]:
            _error(
                f"internal error (this is a bug): {type(err).__name__}: {err}; "
                "rerun with `distillab --debug ...` for the traceback"
            )
        return EXIT_BUG
    if code == EXIT_INTERRUPTED:  # typer turns a KeyboardInterrupt inside a command into exit code 130
        console.print("interrupted: rerun the same command to resume")
    return code if isinstance(code, int) else 0


def _quiet_libraries() -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # distillab never downloads weights
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # per-shard load/save bars; our own bars say what is happening
    hf_logging.set_verbosity_error()


def main() -> None:
    code = run_cli()
    _end_process_group()
    sys.exit(code)


def _end_process_group() -> None:
    """Under torchrun every process of `distillab train` ends its process group before exiting: left to interpreter
    shutdown, gloo's threads can abort the process after the work is done ("terminate called without an active
    exception"), and torchrun then reports a failed job."""
    dist = sys.modules.get("torch.distributed")
    if dist is not None and dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
