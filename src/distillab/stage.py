"""The stage contract: what every step of a run declares, and the one place that checks, skips and marks.

A stage is a small object with
- `name`: its key in stages.json ("generate:train", "train", "evaluate:base", ...);
- `fingerprint(cfg, run)`: a hash of the config it reads and the contents of its inputs (files.fingerprint);
- `outputs(cfg, run)`: the files it writes; all must exist for the stage to count as done;
- `run(cfg, run, ctx)`: the work, returning a typed record;
- `load(cfg, run)`: the same record read back from its outputs, for a stage that is up to date;
- optionally `sharded = True`: it answers only its shard of the prompts under `generate --shard I/N`.

`run_stage` is the only code that reads or writes a stamp: when the stamp matches and every output exists it
returns `load()` with `skipped=True`; otherwise it runs the stage and stamps it, unless the record says it is not
complete (`complete = False`: a budget stop, an interrupted training) so that a rerun continues it. A damaged JSON
record that distillab wrote and can make again (stages.json, a stage's JSON outputs: summaries, eval results, the
ledger) is set aside as <name>.corrupt, said, and made again by running the stage; nothing is paid twice for it (the
teacher's answers are in the cache, a training's checkpoints are kept). Inputs it cannot make again (the cache,
checkpoints, the user's files) are refused by their readers with the path. A shard of a
multi-machine run (`ctx.shard != WHOLE`, for a `sharded` stage) neither reads nor writes stamps: stages.json is
shared by every shard; a stage that is not sharded runs whole in every process.
One process at a time runs a stage on a run: run_stage holds its lock (RunDir.stage_lock: per shard, per torchrun
rank) from the stamp check to the stamp, and a second process is refused in one line naming the holder's pid, so two
processes never pay a teacher twice for the same prompts nor write the same files (the shards of one job wait their
turn for a stage not divided among them instead).
`run_stages` runs a list of them in order: `distillab run`, `demo` and every command are such lists.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from distillab.config import RunConfig
from distillab.files import hold, set_aside_if_corrupt
from distillab.rundir import WHOLE, RunDir


@dataclass
class StageContext:
    """What a stage gets besides the config and the run directory, passed explicitly (no globals)."""

    log: Callable[..., None] = print
    progress: Callable[..., None] | None = None  # the stage's own progress callback, if it reports progress
    shard: tuple[int, int] = WHOLE  # `generate --shard I/N`: this process answers shard I of N
    options: dict[str, Any] = field(default_factory=dict)  # a command's own switches (lm-eval tasks, step limits)


class Stage(Protocol):
    name: str

    def fingerprint(self, cfg: RunConfig, run: RunDir) -> str: ...

    def outputs(self, cfg: RunConfig, run: RunDir) -> list: ...

    def run(self, cfg: RunConfig, run: RunDir, ctx: StageContext) -> Any: ...

    def load(self, cfg: RunConfig, run: RunDir) -> Any: ...


def run_stage(stage: Stage, cfg: RunConfig, ctx: StageContext | None = None) -> Any:
    """Run one stage unless it is up to date; stamp it when it finished (see the module docstring)."""
    ctx = ctx or StageContext()
    # A shard process waits its turn for a stage not divided among shards (the first shard to get it runs and
    # stamps it, the others then find it done); any other second process is refused.
    shared = ctx.shard != WHOLE and not getattr(stage, "sharded", False)
    if not getattr(stage, "sharded", False):  # a stage not divided among shards runs as in a whole run
        ctx = dataclasses.replace(ctx, shard=WHOLE)
    run = RunDir(cfg.run_dir)
    rank = os.environ.get("RANK", "0")  # torchrun / accelerate launch: every process runs the stage
    rank = int(rank) if rank.isdigit() else 0

    def busy(pid: str) -> str:
        return f"another distillab process (pid {pid}) is running {stage.name} in {run.root}: wait for it or stop it"

    with hold(run.stage_lock(stage.name, ctx.shard, rank), busy, wait=shared):
        return _run_held(stage, cfg, run, ctx)


def _run_held(stage: Stage, cfg: RunConfig, run: RunDir, ctx: StageContext) -> Any:
    whole = ctx.shard == WHOLE
    if whole:
        if aside := set_aside_if_corrupt(run.stamps_file):
            ctx.log(
                f"{run.stamps_file} was corrupt: set aside as {aside.name}; the stages run again (teacher answers "
                "are cached and checkpoints kept: nothing is paid twice)"
            )
        outputs = stage.outputs(cfg, run)  # asked once: a stage may read its records to name them
        for path in outputs:
            if path.suffix == ".json" and (aside := set_aside_if_corrupt(path)):
                ctx.log(f"{path} was corrupt: set aside as {aside.name}; {stage.name} makes it again")
        stamps = run.stamps()
        fingerprint = stage.fingerprint(cfg, run)  # what the stage reads, before it runs
        if stamps.get(stage.name) == fingerprint and all(p.exists() for p in outputs):
            return _skipped(stage.load(cfg, run))
    record = stage.run(cfg, run, ctx)
    if whole and getattr(record, "complete", True):
        run.stamp(stage.name, fingerprint)
    return record


def run_stages(stages: list[Stage], cfg: RunConfig, ctx: StageContext | None = None) -> dict[str, Any]:
    """The stages in order, each through run_stage; {stage name: record}."""
    return {stage.name: run_stage(stage, cfg, ctx) for stage in stages}


def _skipped(record: Any) -> Any:
    if dataclasses.is_dataclass(record) and any(f.name == "skipped" for f in dataclasses.fields(record)):
        return dataclasses.replace(record, skipped=True)
    return record
