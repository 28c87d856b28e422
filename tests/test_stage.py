"""The stage contract (stage.py): run_stage skips a stage whose stamp matches and whose outputs exist, reruns it when
an input's content, its config or an output changes, stamps only a complete record, leaves stages.json alone for a
shard of a sharded stage, and sets aside a corrupt stages.json or JSON output (distillab's own records) and makes it
again by running the stage."""

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
def test_a_corrupt_stamps_file_is_set_aside_said_and_the_stages_run_again(cfg, content):
    first, second = CopyStage(name="first"), CopyStage(name="second")
    run_stages([first, second], cfg)
    run = RunDir(cfg.run_dir)
    stamps = run.stamps()
    run.stamps_file.write_bytes(content if isinstance(content, bytes) else content.encode())
    said = []
    records = run_stages([first, second], cfg, StageContext(log=said.append))
    assert [r.skipped for r in records.values()] == [False, False]  # no stamp to trust: each runs again
    assert first.shards_run == second.shards_run == [WHOLE, WHOLE]
    assert run.stamps() == stamps  # made again, the same
    aside = run.stamps_file.with_name("stages.json.corrupt")
    assert aside.read_bytes() == (content if isinstance(content, bytes) else content.encode())  # kept for a look
    assert len(said) == 1 and str(run.stamps_file) in said[0] and "set aside" in said[0]


@dataclass
class RecordStage(CopyStage):
    """CopyStage whose output is a JSON record: {"text": ...}."""

    def outputs(self, cfg, run: RunDir) -> list:
        return [run.root / "record.json"]

    def run(self, cfg, run: RunDir, ctx: StageContext) -> Copied:
        record = super().run(cfg, run, ctx)
        (run.root / "record.json").write_text(json.dumps({"text": record.text}))
        return record

    def load(self, cfg, run: RunDir) -> Copied:
        return Copied(text=json.loads((run.root / "record.json").read_text())["text"])


def test_a_corrupt_json_output_is_set_aside_and_made_again(cfg):
    stage = RecordStage()
    run_stage(stage, cfg)
    record = cfg.run_dir / "record.json"
    record.write_text('{"text": ')  # torn
    said = []
    again = run_stage(stage, cfg, StageContext(log=said.append))
    assert again == Copied(text="hello") and len(stage.shards_run) == 2  # ran again, not loaded from the damage
    assert json.loads(record.read_text()) == {"text": "hello"}
    assert (cfg.run_dir / "record.json.corrupt").read_text() == '{"text": '
    assert len(said) == 1 and "record.json was corrupt" in said[0]
    assert run_stage(stage, cfg).skipped  # and then up to date


def test_run_stages_runs_each_in_order_and_keeps_the_other_stamps(cfg):
    first, second = CopyStage(name="first"), CopyStage(name="second")
    records = run_stages([first, second], cfg)
    assert list(records) == ["first", "second"] and not any(r.skipped for r in records.values())
    stamps = json.loads(RunDir(cfg.run_dir).stamps_file.read_text())
    assert set(stamps) == {"first", "second"}
    assert all(r.skipped for r in run_stages([first, second], cfg).values())


# ----------------------------------------------------------------------------------------------------
# One process per run and stage (issue 23)


def test_a_stage_already_running_on_the_run_is_refused_naming_its_process(cfg):
    import os

    inner = []

    @dataclass
    class Reentrant(CopyStage):  # while it runs, another run_stage of it on the same run: a second process's
        def run(self, cfg, run, ctx):
            with pytest.raises(UserError) as refused:
                run_stage(CopyStage(), cfg)
            inner.append(str(refused.value))
            run_stage(CopyStage(name="other"), cfg)  # another stage of the run is not held
            run_stage(CopyStage(sharded=True), cfg, StageContext(shard=(1, 2)))  # nor a shard of it
            return super().run(cfg, run, ctx)

    run_stage(Reentrant(), cfg)
    run = RunDir(cfg.run_dir)
    assert inner == [
        f"another distillab process (pid {os.getpid()}) is running copy in {run.root}: wait for it or stop it"
    ]
    assert run.stage_lock("copy") == run.root / ".locks" / "copy.lock"
    assert not run.stage_lock("copy").with_name("copy.lock.pid").exists()  # released: nobody holds it
    assert run_stage(CopyStage(), cfg).skipped  # and the next process gets it
    assert run.stage_lock("generate:train", (1, 2), rank=3).name == "generate-train.shard-1-of-2.rank-3.lock"


def test_a_second_generate_on_the_run_exits_2_and_pays_nothing(tmp_path, tiny_teacher):
    """Two `distillab generate` processes on one run: the second is refused in one line while the first waits on
    its teacher (held at a gate), and the teacher answers each prompt once."""
    import asyncio
    import subprocess
    import sys
    import threading
    import time

    from distillab.config import to_toml
    from distillab.dataset import read_dataset
    from distillab.serve import create_app
    from distillab.testing import ServerThread, read_metrics, subprocess_env
    from tests.helpers import generate_config

    app, gate = create_app(tiny_teacher, model_name="teacher"), threading.Event()

    @app.middleware("http")
    async def held_at_the_gate(request, call_next):  # the first process waits here, holding its stage
        while request.url.path.startswith("/v1") and not gate.is_set():
            await asyncio.sleep(0.02)
        return await call_next(request)

    with ServerThread(app) as server:
        teacher = {"model": "teacher", "base_url": server.base_url, "max_new_tokens": 4, "top_k_logprobs": 3}
        cfg = generate_config(tmp_path, teacher, student=tiny_teacher, n_prompts=12)
        config = tmp_path / "run.toml"
        config.write_text(to_toml(cfg))
        command = [sys.executable, "-m", "distillab", "generate", str(config)]
        first = subprocess.Popen(command, env=subprocess_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        try:
            holder = RunDir(cfg.run_dir).stage_lock("generate:train").with_name("generate-train.lock.pid")
            deadline = time.time() + 120
            while not (holder.is_file() and holder.read_text() == str(first.pid)):
                assert first.poll() is None and time.time() < deadline, "the first generate never took its stage"
                time.sleep(0.05)
            opens = threading.Timer(60, gate.set)  # were the second not refused, it would wait at the gate too
            opens.start()
            second = subprocess.run(command, env=subprocess_env(), capture_output=True, text=True, timeout=180)
            opens.cancel()
            gate.set()
            first_err = first.communicate(timeout=120)[1]
        finally:
            gate.set()
            if first.poll() is None:
                first.kill()
        served = read_metrics(server.url)
    assert first.returncode == 0, first_err[-2000:]
    assert second.returncode == 2
    assert (
        f"another distillab process (pid {first.pid}) is running generate:train in {cfg.run_dir}: "
        "wait for it or stop it"
    ) in second.stderr
    assert served["distillab_answers_total"] == 12  # each prompt answered once, all by the first process
    assert len(read_dataset(RunDir(cfg.run_dir).dataset("train"))) == 12


def test_a_shard_process_waits_its_turn_for_a_stage_not_divided_among_shards(cfg):
    import threading

    entered, release, records = threading.Event(), threading.Event(), []

    @dataclass
    class Slow(CopyStage):
        def run(self, cfg, run, ctx):
            entered.set()
            release.wait(timeout=30)
            return super().run(cfg, run, ctx)

    first = Slow()
    holder = threading.Thread(target=lambda: records.append(run_stage(first, cfg)))
    holder.start()
    assert entered.wait(timeout=30)
    shard = CopyStage()  # `generate --shard 1/2` reaching the same unsharded stage: it waits, then finds it done
    waiter = threading.Thread(target=lambda: records.append(run_stage(shard, cfg, StageContext(shard=(1, 2)))))
    waiter.start()
    waiter.join(timeout=0.5)
    assert waiter.is_alive() and not shard.shards_run  # waiting, not refused and not running
    release.set()
    holder.join(timeout=30)
    waiter.join(timeout=30)
    assert [r.skipped for r in records] == [False, True] and first.shards_run == [WHOLE] and not shard.shards_run
