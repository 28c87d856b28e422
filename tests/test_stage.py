"""The stage contract (stage.py): run_stage skips a stage whose stamp matches and whose outputs exist, reruns it when
an input's content, its config or an output changes, stamps only a complete record, leaves stages.json alone for a
shard of a sharded stage, and refuses a corrupt stages.json before the stage runs."""

from __future__ import annotations

import json
from dataclasses import dataclass, field

import pytest

from distillab.errors import UserError
from distillab.files import fingerprint
from distillab.rundir import WHOLE, RunDir
from distillab.stage import StageContext, run_stage, run_stages
from tests.helpers import run_config


@dataclass
class Copied:
    """CopyStage's record."""

    text: str
    shard: tuple[int, int] = WHOLE
    complete: bool = True
    skipped: bool = False


@dataclass
class CopyStage:
    """Copies input.txt (beside the run directory) to the run's output.txt, upper-cased when the config's seed is
    odd; counts its runs. `complete`: what its record says."""

    name: str = "copy"
    sharded: bool = False
    complete: bool = True
    shards_run: list = field(default_factory=list)  # ctx.shard of each run

    def fingerprint(self, cfg, run: RunDir) -> str:
        return fingerprint(self.name, cfg.data.seed, run.root.parent / "input.txt")

    def outputs(self, cfg, run: RunDir) -> list:
        return [run.root / "output.txt"]

    def run(self, cfg, run: RunDir, ctx: StageContext) -> Copied:
        self.shards_run.append(ctx.shard)
        text = (run.root.parent / "input.txt").read_text()
        text = text.upper() if cfg.data.seed % 2 else text
        run.root.mkdir(parents=True, exist_ok=True)
        (run.root / "output.txt").write_text(text)
        return Copied(text=text, shard=ctx.shard, complete=self.complete)

    def load(self, cfg, run: RunDir) -> Copied:
        return Copied(text=(run.root / "output.txt").read_text())


@pytest.fixture
def cfg(tmp_path):
    config = run_config(tmp_path)
    config.run_dir.parent.mkdir(parents=True)
    (config.run_dir.parent / "input.txt").write_text("hello")
    return config


def test_a_finished_stage_is_stamped_and_then_skipped(cfg):
    stage = CopyStage()
    first = run_stage(stage, cfg)
    assert first == Copied(text="hello") and stage.shards_run == [WHOLE]
    run = RunDir(cfg.run_dir)
    assert run.stamps() == {"copy": stage.fingerprint(cfg, run)}
    again = run_stage(stage, cfg)
    assert again == Copied(text="hello", skipped=True)  # load()'s record, marked skipped
    assert stage.shards_run == [WHOLE]  # not run again


def test_a_changed_input_reruns_the_stage_and_the_same_content_does_not(cfg):
    stage = CopyStage()
    run_stage(stage, cfg)
    source = cfg.run_dir.parent / "input.txt"
    source.write_text("hello")  # rewritten, same content: the stamp is of the content, not the file's time
    assert run_stage(stage, cfg).skipped and len(stage.shards_run) == 1
    source.write_text("world")
    record = run_stage(stage, cfg)
    assert record == Copied(text="world") and len(stage.shards_run) == 2
    assert run_stage(stage, cfg).skipped and len(stage.shards_run) == 2  # stamped anew


def test_a_changed_config_reruns_the_stage(cfg):
    stage = CopyStage()
    run_stage(stage, cfg)
    cfg.data.seed = 1
    assert run_stage(stage, cfg) == Copied(text="HELLO") and len(stage.shards_run) == 2


def test_a_deleted_output_reruns_the_stage(cfg):
    stage = CopyStage()
    run_stage(stage, cfg)
    (cfg.run_dir / "output.txt").unlink()
    record = run_stage(stage, cfg)
    assert not record.skipped and len(stage.shards_run) == 2 and (cfg.run_dir / "output.txt").is_file()


def test_an_incomplete_record_is_not_stamped(cfg):
    stage = CopyStage(complete=False)  # a budget stop, an interrupted training
    record = run_stage(stage, cfg)
    assert not record.complete and "copy" not in RunDir(cfg.run_dir).stamps()
    assert not run_stage(stage, cfg).skipped and len(stage.shards_run) == 2  # a rerun continues it
    stage.complete = True
    run_stage(stage, cfg)
    assert run_stage(stage, cfg).skipped and len(stage.shards_run) == 3


def test_a_shard_of_a_sharded_stage_neither_reads_nor_writes_the_stamps(cfg):
    stage = CopyStage(sharded=True)
    shard = StageContext(shard=(1, 2))
    assert run_stage(stage, cfg, shard).shard == (1, 2)
    assert not RunDir(cfg.run_dir).stamps_file.exists()  # nothing written
    stamps = RunDir(cfg.run_dir).stamps_file
    stamps.write_text("{not json")  # nothing read: even a corrupt file is left alone
    assert run_stage(stage, cfg, shard).shard == (1, 2)
    assert stamps.read_text() == "{not json" and stage.shards_run == [(1, 2), (1, 2)]


def test_a_stage_that_is_not_sharded_runs_whole_under_a_shard(cfg):
    stage = CopyStage()
    record = run_stage(stage, cfg, StageContext(shard=(1, 2)))
    assert record.shard == WHOLE and stage.shards_run == [WHOLE]
    assert "copy" in RunDir(cfg.run_dir).stamps()  # and is stamped as in a whole run


@pytest.mark.parametrize("content", ["{not json", "[1, 2]", b"\xff\xfe"])
def test_a_corrupt_stamps_file_is_one_line_naming_it_before_the_stage_runs(cfg, content):
    stamps = RunDir(cfg.run_dir).stamps_file
    stamps.parent.mkdir(parents=True)
    stamps.write_bytes(content if isinstance(content, bytes) else content.encode())
    stage = CopyStage()
    with pytest.raises(UserError) as err:
        run_stage(stage, cfg)
    message = str(err.value)
    assert str(stamps) in message and "corrupt" in message and "\n" not in message
    assert stage.shards_run == [] and not (cfg.run_dir / "output.txt").exists()


def test_run_stages_runs_each_in_order_and_keeps_the_other_stamps(cfg):
    first, second = CopyStage(name="first"), CopyStage(name="second")
    records = run_stages([first, second], cfg)
    assert list(records) == ["first", "second"] and not any(r.skipped for r in records.values())
    stamps = json.loads(RunDir(cfg.run_dir).stamps_file.read_text())
    assert set(stamps) == {"first", "second"}
    assert all(r.skipped for r in run_stages([first, second], cfg).values())
