"""The result tables of README.md and BENCHMARKS.md, written from result files so that they cannot drift.

    make demo && .venv/bin/python benchmarks/tables.py    # record runs/demo, then rewrite every table from the record
    .venv/bin/python benchmarks/tables.py --check         # exit 1 when a shipped table is not what its record renders

A table sits between two marker comments, `<!-- table:NAME -->` and `<!-- /table:NAME -->`, in README.md and
BENCHMARKS.md, and is rendered from its record, benchmarks/results/NAME.json (committed). Recording the demo reads the
run's own files (summary.json and eval/<model>.json of --run), the commit of the checkout the run was made in (with
"+ uncommitted changes" where that checkout differs from its commit), this machine, and the demo's inputs: the lab
checkpoints (by content, as the teacher cache keys them), the settings the demo gives its three runs, and the lab
examples it reads. tests/test_tables.py fails when a shipped table is not its record's, and when today's inputs are
not the recorded ones (then the record no longer says what `make demo` produces: run both commands again).
Distillab's own code is not part of the inputs: DISTILLAB_CHECK_DEMO=1 makes the test run the demo and compare.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import re
import subprocess
import sys
from pathlib import Path

from distillab.files import write_atomic
from distillab.signal_demo import comparison_verdict

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
DOCUMENTS = (ROOT / "README.md", ROOT / "BENCHMARKS.md")
LABELS = {  # summary.json's labels -> the table's names (another label is shown as it is)
    "teacher": "teacher",
    "base": "base student",
    "distilled": "distilled",
    "zero_distill": "zero-distillation control",
    "retain": "distilled + retain",
}


# ----------------------------------------------------------------------------------------------------
# Recording a demo run.


def record_demo(run: Path, previous: dict | None = None) -> dict:
    """The demo run in `run` (runs/demo) as a record: its scores and parameter counts, where and when it ran, and the
    demo inputs it ran on. Where and when are read now, when the run is new; a run already recorded (`previous`, the
    record it made: the same summary.json, by digest) keeps them, since the checkout may have moved on since it ran."""
    raw = (run / "summary.json").read_bytes()
    summary = json.loads(raw)
    evals = {label: json.loads((run / "eval" / f"{label}.json").read_text()) for label in summary["models"]}
    digest = hashlib.sha256(raw).hexdigest()[:16]
    recorded = previous if previous and previous.get("run_digest") == digest else None
    return {
        "command": "make demo",
        "run": "runs/demo/summary.json",
        "run_digest": digest,
        "commit": recorded["commit"] if recorded else checkout_commit(run),
        "machine": recorded["machine"] if recorded else machine(),
        "wall_seconds": summary["wall_seconds"],
        "task_skills": summary["task_skills"],
        "general_skills": evals["teacher"]["suites"]["general"],
        "models": summary["models"],
        "parameters": {label: e.get("parameters") for label, e in evals.items()},
        "inputs": demo_inputs(),
    }


def checkout_commit(path: Path) -> str:
    """The short commit of the git checkout holding `path`, "+ uncommitted changes" when its tracked files differ."""
    git = ["git", "-C", str(path)]
    commit = subprocess.run([*git, "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    if commit.returncode:
        return "unknown (not a git checkout)"
    changed = subprocess.run([*git, "status", "--porcelain", "--untracked-files=no"], capture_output=True, text=True)
    return commit.stdout.strip() + (" + uncommitted changes" if changed.stdout.strip() else "")


def machine() -> str:
    """This machine in a few words: CPU model, cores, system, torch build."""
    import torch

    cpu = platform.processor() or platform.machine()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        names = re.findall(r"^model name\s*:\s*(.+)$", cpuinfo.read_text(), flags=re.MULTILINE)
        cpu = names[0].strip() if names else cpu
    return f"{cpu}, {os.cpu_count()} cores, {platform.system()}, torch {torch.__version__}"


def demo_inputs() -> dict[str, str]:
    """What the demo's numbers follow from besides distillab's code, each as a digest: the lab checkpoints, the settings
    the demo gives its runs (what differs from the config defaults) and the lab examples it draws."""
    from distillab import models
    from distillab.demo import control_config, demo_config, retain_config
    from distillab.lab.world import SKILLS, get_skill
    from distillab.teachers.local_hf import model_digest

    cfg = demo_config(Path("runs"))
    settings = [
        c.model_dump(mode="json", exclude_defaults=True) for c in (cfg, control_config(cfg), retain_config(cfg))
    ]
    splits = [(s, "train", cfg.data.n_prompts) for s in cfg.data.skills]
    splits += [(s, split, n) for s in SKILLS for split, n in (("dev", 30), ("test", cfg.eval.n_per_skill))]
    examples = [[e.prompt, e.answer] for s, split, n in splits for e in get_skill(s).examples(split, n)]
    return {
        "lab:teacher": model_digest(models.resolve_model_path("lab:teacher")),
        "lab:base": model_digest(models.resolve_model_path("lab:base")),
        "settings": _digest(settings),
        "examples": _digest(examples),
    }


def _digest(value) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()[:16]


# ----------------------------------------------------------------------------------------------------
# Rendering.


def render_demo(record: dict) -> str:
    """The demo table, the line that reads it, and where its numbers came from."""
    from distillab.demo import change_words
    from distillab.scoring import gap_change

    models, params = record["models"], record["parameters"]

    def name(label: str) -> str:
        size = params.get(label) if label in ("teacher", "base") else None
        return LABELS.get(label, label) + (f" ({size / 1e6:.1f}M params)" if size else "")

    rows = [
        f"| model | task ({', '.join(record['task_skills'])}) | general ({len(record['general_skills'])} other skills) |",
        "|---|---|---|",
        *(f"| {name(m)} | {s['task']:.3f} | {s['general']:.3f} |" for m, s in models.items()),
    ]

    def moved(label: str, suite: str) -> str:
        return change_words(gap_change(*(models[m][suite] for m in (label, "base", "teacher"))), suite)

    reading = [
        f"{LABELS[m]}: {moved(m, 'task')}, {moved(m, 'general')}" for m in ("distilled", "retain") if m in models
    ]
    source = (
        f"From `{record['run']}` of `{record['command']}` at commit {record['commit']} on {record['machine']}, "
        f"{record['wall_seconds']:.0f} s inside the command; written by `benchmarks/tables.py` from "
        "`benchmarks/results/demo.json` (edit neither by hand)."
    )
    return "\n".join([*rows, "", "; ".join(reading) + ".", source])


SIGNAL_COLUMNS = {  # signal_summary.json's metrics -> the table's column names
    "mode": "mode right",
    "tv": "total variation ↓",
    "cross_entropy": "cross-entropy of the world's draws ↓",
    "sample_accuracy": "P(T=1 sample = a fresh draw)",
    "accuracy": "accuracy",
    "general": "general",
}


def render_signal_family(family_name: str, record_name: str = "signal"):
    """A renderer of one family's table of `distillab demo --signal`'s summary (benchmarks/results/signal.json is the
    summary the command writes, copied; unseen.json, benchmarks/unseen_tables.py's, has the same form), its
    comparisons and where its numbers came from."""

    def render(record: dict) -> str:
        family = record["families"][family_name]
        metrics = [m for m in SIGNAL_COLUMNS if m in next(iter(family["rows"].values()))]
        rows = [
            "| model | "
            + " | ".join(SIGNAL_COLUMNS[m] for m in metrics)
            + f" | teacher rows / tokens / $ ({len(record['seeds'])} seeds) |",
            "|---|" + "---|" * (len(metrics) + 1),
        ]
        for label, row in family["rows"].items():
            cells = [f"{row[m]['mean']:.3f} [{row[m]['ci'][0]:.3f}, {row[m]['ci'][1]:.3f}]" for m in metrics]
            data = row.get("teacher_data")
            tokens = data and data["prompt_tokens"] + data["completion_tokens"]
            taught = f"{data['rows']:,} / {tokens:,} / ${data['usd']:.2f}" if data else ""
            rows.append(f"| {label} | " + " | ".join(cells) + f" | {taught} |")
        comparisons = [
            f"{c['arm']} vs {c['against']}, {SIGNAL_COLUMNS[c['metric']]}: {c['diff']:+.3f} "
            f"[{c['ci'][0]:+.3f}, {c['ci'][1]:+.3f}], per seed {', '.join(f'{d:+.3f}' for d in c['per_seed'])}: "
            + ("**win**" if c["win"] else comparison_verdict(c))
            for c in family["comparisons"]
        ]
        command = record.get("command", "distillab demo --signal")
        workers = f", {record['workers']} worker processes" if "workers" in record else ""
        source = (
            f"From `{command}` (seeds {record['seeds']}, {record['wall_seconds']:.0f} s{workers}); written by "
            f"`benchmarks/tables.py` from `benchmarks/results/{record_name}.json` (edit neither by hand)."
        )
        return "\n".join([*rows, "", *(f"- {line}" for line in comparisons), "", source])

    return render


# table name -> (its renderer, its record: benchmarks/results/<record>.json)
RENDER = {
    "demo": (render_demo, "demo"),
    "signal-distribution": (render_signal_family("distribution"), "signal"),
    "signal-reasoning": (render_signal_family("reasoning"), "signal"),
    "unseen-losses": (render_signal_family("losses", "unseen"), "unseen"),
    "unseen-retain": (render_signal_family("retain", "unseen"), "unseen"),
}


def block(name: str) -> re.Pattern:
    return re.compile(rf"(<!-- table:{name} -->\n)(.*?)(\n<!-- /table:{name} -->)", flags=re.DOTALL)


def rewrite(text: str, name: str, body: str) -> str:
    """`text` with table `name`'s block holding `body` (between blank lines, so Markdown sees a table); text without
    the markers is returned as it is."""
    return block(name).sub(lambda m: m.group(1) + "\n" + body + "\n" + m.group(3), text)


def shipped(text: str, name: str) -> str | None:
    """The body of table `name`'s block in `text`, None without one."""
    found = block(name).search(text)
    return found.group(2).strip("\n") if found else None


def rendered(documents, results: Path) -> dict[str, str]:
    """Each table some document holds -> its body rendered from its record (a table no document holds is skipped, so
    a record it needs may be absent)."""
    texts = [doc.read_text() for doc in documents]
    out = {}
    for name, (render, record) in RENDER.items():
        if any(shipped(text, name) is not None for text in texts):
            out[name] = render(json.loads((results / f"{record}.json").read_text()))
    return out


def stale(documents=DOCUMENTS, results: Path = RESULTS) -> list[str]:
    """Every (document, table) whose block is not what the table's record renders, as 'README.md: table demo'."""
    out = []
    for name, body in rendered(documents, results).items():
        out += [f"{doc.name}: table {name}" for doc in documents if shipped(doc.read_text(), name) not in (None, body)]
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", type=Path, default=ROOT / "runs" / "demo", help="the demo run to record")
    ap.add_argument("--no-record", action="store_true", help="only rewrite the tables from the records")
    ap.add_argument("--check", action="store_true", help="change nothing; exit 1 if a table is not its record's")
    ap.add_argument("--results", type=Path, default=RESULTS, help=argparse.SUPPRESS)  # tests: elsewhere
    ap.add_argument("--documents", type=Path, nargs="+", default=list(DOCUMENTS), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.check:
        wrong = stale(args.documents, args.results)
        for line in wrong:
            print(f"{line} is not what its record renders: run `.venv/bin/python benchmarks/tables.py`")
        return 1 if wrong else 0
    if not args.no_record:
        if not (args.run / "summary.json").is_file():
            print(f"no {args.run / 'summary.json'}: run `make demo` first (or pass --run, or --no-record)")
            return 2
        args.results.mkdir(parents=True, exist_ok=True)
        previous = args.results / "demo.json"
        previous = json.loads(previous.read_text()) if previous.is_file() else None
        write_atomic(args.results / "demo.json", json.dumps(record_demo(args.run, previous), indent=1) + "\n")
    bodies = rendered(args.documents, args.results)
    for name, body in bodies.items():
        for doc in args.documents:
            write_atomic(doc, rewrite(doc.read_text(), name, body))
    print(f"tables written from {args.results}: {', '.join(bodies)} in {', '.join(d.name for d in args.documents)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
