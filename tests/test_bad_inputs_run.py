"""A second corpus of bad inputs, on what a run meets after its config: prompts and retain files that can only be
refused by reading them, a student template that breaks a prompt form, damaged files of a finished run directory,
a disk that fills up. The contract of tests/test_bad_inputs.py (exit 2, one line naming the file, no traceback)
plus what matters most here: the teacher (a real `serve` on 127.0.0.1, its own count) was sent nothing.
"""

from __future__ import annotations

import json

import pytest
import torch

from distillab.cli import run_cli
from distillab.lab.tokenizer import build_tokenizer
from distillab.testing import metric_sum, read_metrics, server_thread
from tests.helpers import save_tiny_llama, write_config, write_jsonl

CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
# A template that needs a system turn first: it breaks every plain prompt (one user turn).
SYSTEM_FIRST = (
    "{% if messages[0]['role'] != 'system' %}{{ raise_exception('a system turn must come first') }}{% endif %}"
)


@pytest.fixture(scope="module")
def teacher(tiny_teacher):
    with server_thread(tiny_teacher, model_name="teacher") as server:
        yield server


@pytest.fixture(scope="module")
def picky_student(tmp_path_factory):
    """A student whose chat template refuses any conversation that does not open with a system turn."""
    tok = build_tokenizer()
    tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    tok.eos_token = "<|im_end|>"
    tok.chat_template = SYSTEM_FIRST + CHATML
    return save_tiny_llama(tmp_path_factory.mktemp("picky") / "student", hidden=16, layers=1, seed=2, tok=tok)


def requests_sent(server) -> float:
    return metric_sum(read_metrics(server.url), "distillab_requests_total")


@pytest.fixture
def refused(tmp_path, capfd, monkeypatch, teacher):
    """refused(config, needles...): `generate` ends in exit 2 with one line holding the needles, and the teacher
    was sent no request."""
    monkeypatch.chdir(tmp_path)

    def check(config, *needles: str, command: str = "generate") -> str:
        capfd.readouterr()
        before = requests_sent(teacher)
        code = run_cli([command, str(config)])
        out, err = capfd.readouterr()
        lines = [line for line in err.splitlines() if line.strip() and "Warning" not in line and "pricing" not in line]
        assert "Traceback" not in out + err, err
        assert code == 2, f"exit {code}: {err}"
        assert len(lines) == 1, err
        for needle in needles:
            assert needle in lines[0], lines[0]
        assert requests_sent(teacher) == before, "the teacher was asked before the refusal"
        return lines[0]

    return check


def served_config(
    tmp_path, teacher, student, body: str = "", data: str = 'skills = ["reverse"]\nn_prompts = 4', concurrency: int = 8
):
    return write_config(
        tmp_path,
        f'[teacher]\nmodel = "teacher"\nbase_url = "{teacher.base_url}"\nmax_new_tokens = 2\ntop_k_logprobs = 2\n'
        f"usd_per_1m_input = 1\nusd_per_1m_output = 1\nconcurrency = {concurrency}\n"
        f'[data]\n{data}\n[train]\nstudent = "{student}"\n{body}',
    )


# ----------------------------------------------------------------------------------------------------
# Refused before the first paid request: retain's files, templates against every prompt form, empty turns.


def _general_file(tmp_path, case: str) -> str:
    path = tmp_path / "general.jsonl"
    if case == "missing":
        return str(tmp_path / "nope.jsonl")
    if case == "malformed":
        write_jsonl(path, [{"prompt": "upper abc"}, "{not json"])
    elif case == "no-answer":
        write_jsonl(path, [{"prompt": "upper abc", "answer": "ABC"}, {"prompt": "upper xyz"}])
    elif case == "empty-turn":
        write_jsonl(path, [{"prompt": "upper abc"}, {"messages": [{"role": "user", "content": " "}]}])
    return str(path)


@pytest.mark.parametrize(
    "case, source, needles",
    [
        ("missing", "teacher", ("nope.jsonl", "not found")),
        ("malformed", "teacher", ("general.jsonl:2", "malformed JSON")),
        ("no-answer", "dataset", ("general.jsonl", "line 2", '"answer"')),
        ("empty-turn", "teacher", ("general.jsonl: prompt line 2", "empty")),
    ],
)
def test_retain_general_prompts_are_checked_before_the_task_prompts_are_asked(
    refused, tmp_path, teacher, tiny_teacher, case, source, needles
):
    general = _general_file(tmp_path, case)
    config = served_config(
        tmp_path,
        teacher,
        tiny_teacher,
        f'[retain]\nreplay_fraction = 0.25\nreplay_source = "{source}"\ngeneral_prompts_file = "{general}"',
    )
    refused(config, *needles)


def test_a_template_that_breaks_plain_prompts_is_refused_before_any_request(refused, tmp_path, teacher, picky_student):
    config = served_config(tmp_path, teacher, picky_student)  # the lab's plain prompts
    refused(config, str(picky_student), "plain prompt", "a system turn must come first")


def test_a_template_that_breaks_the_replay_prompts_is_refused_before_the_task_is_asked(
    refused, tmp_path, teacher, picky_student
):
    """The task's conversations open with a system turn (the template takes them); retain's general prompts are
    plain ones, which it refuses: found before the task prompts are sent, not after they were paid for."""
    chats = write_jsonl(
        tmp_path / "chats.jsonl",
        [
            {"messages": [{"role": "system", "content": "be brief."}, {"role": "user", "content": f"upper {w}"}]}
            for w in ("abc", "xyz", "def")
        ],
    )
    general = write_jsonl(tmp_path / "general.jsonl", [{"prompt": "reverse abc"}, {"prompt": "reverse xyz"}])
    config = served_config(
        tmp_path,
        teacher,
        picky_student,
        f'[retain]\nreplay_fraction = 0.25\nreplay_source = "teacher"\ngeneral_prompts_file = "{general}"',
        data=f'prompts_file = "{chats}"',
    )
    refused(config, "general.jsonl: prompt line 1", "plain prompt", "a system turn must come first")


@pytest.mark.parametrize(
    "turns, where",
    [
        ([{"role": "user", "content": ""}], "turn 1"),
        ([{"role": "system", "content": "be brief."}, {"role": "user", "content": "  \n"}], "turn 2"),
        (
            [
                {"role": "user", "content": ""},
                {"role": "assistant", "content": "?"},
                {"role": "user", "content": "upper abc"},
            ],
            "turn 1",
        ),
    ],
    ids=["only-turn", "after-system", "earlier-turn"],
)
@pytest.mark.parametrize("source", ["teacher", "human"])
def test_an_empty_user_turn_is_refused_naming_file_and_line(
    refused, tmp_path, teacher, tiny_teacher, turns, where, source
):
    records = [{"prompt": "upper abc", "answer": "ABC"}, {"messages": turns + [{"role": "assistant", "content": "x"}]}]
    prompts = write_jsonl(tmp_path / "chats.jsonl", records)
    config = served_config(tmp_path, teacher, tiny_teacher, data=f'prompts_file = "{prompts}"\nsource = "{source}"')
    refused(config, "chats.jsonl: prompt line 2", where, "empty")
    assert not (tmp_path / "runs" / "run" / "data" / "train.parquet").exists()  # never kept as a row


def test_a_plain_prompt_of_spaces_is_an_empty_turn(refused, tmp_path, teacher, tiny_teacher):
    prompts = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "upper abc"}, {"prompt": "upper xyz"}, {"prompt": " \t"}])
    config = served_config(tmp_path, teacher, tiny_teacher, data=f'prompts_file = "{prompts}"')
    refused(config, "p.jsonl: prompt line 3", "empty")


def test_the_dev_share_is_not_asked_before_a_bad_train_prompt_is_found(refused, tmp_path, teacher, tiny_teacher):
    """retain selects: the dev share of the prompts is answered first; an empty turn among the train share must stop
    the run before the dev share is sent."""
    records = [{"prompt": f"upper {w}"} for w in ("abc", "xyz", "def", "ghi", "jkl", "mno")]
    records.append({"messages": [{"role": "user", "content": ""}]})
    prompts = write_jsonl(tmp_path / "p.jsonl", records)
    config = served_config(
        tmp_path,
        teacher,
        tiny_teacher,
        "[retain]\nmerge_alphas = [0.5]\ndev_fraction = 0.5",
        data=f'prompts_file = "{prompts}"',
    )
    refused(config, "p.jsonl: prompt line 7", "empty")


def test_refusals_leave_a_later_good_run_asking_once(tmp_path, teacher, tiny_teacher, capfd, monkeypatch):
    """After the refusal is fixed, the run asks each prompt once (the refusal left nothing half done)."""
    monkeypatch.chdir(tmp_path)
    prompts = write_jsonl(
        tmp_path / "p.jsonl", [{"prompt": "upper abc"}, {"messages": [{"role": "user", "content": ""}]}]
    )
    config = served_config(tmp_path, teacher, tiny_teacher, data=f'prompts_file = "{prompts}"')
    before = requests_sent(teacher)
    assert run_cli(["generate", str(config)]) == 2
    write_jsonl(prompts, [{"prompt": "upper abc"}, {"messages": [{"role": "user", "content": "upper xyz"}]}])
    assert run_cli(["generate", str(config)]) == 0
    assert requests_sent(teacher) - before == 2
    summary = json.loads((tmp_path / "runs" / "run" / "data" / "generate_summary.json").read_text())
    assert summary["rows"] == 2


# ----------------------------------------------------------------------------------------------------
# Every file of a finished run directory damaged in turn: the rerun ends in exit 0 (rebuilt, or not needed) or exit 2
# with one line naming the file (or its model directory), never a traceback or an internal error.


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, tiny_teacher, tiny_student):
    """A whole tiny run (generate with a local teacher, 2 training steps with 2 checkpoints, evaluate, report),
    at work/, with a pristine copy beside it: each case puts the copy back at the same path (fingerprints hold
    paths)."""
    import shutil

    base = tmp_path_factory.mktemp("finished")
    work = base / "work"
    work.mkdir()
    config = write_config(
        work,
        f'[teacher]\nmodel = "{tiny_teacher}"\nmax_new_tokens = 3\ntop_k_logprobs = 3\n'
        f'[data]\nn_prompts = 4\nskills = ["reverse"]\n'
        f'[train]\nstudent = "{tiny_student}"\nmax_steps = 2\nsave_steps = 1\nper_device_batch_size = 2\n'
        '[eval]\nn_per_skill = 2\ngeneral = ["upper"]\nbootstrap = 10\n',
    )
    assert run_cli(["run", str(config)]) == 0
    shutil.copytree(work, base / "pristine")
    return work, base / "pristine", config


def _damage_each_file(finished_run, capfd, command: str, files: list, prepare=lambda run: None):
    """Each file garbled, then cut in half, then the command rerun: (the cases that broke the contract, each file's
    exit codes)."""
    import shutil

    work, pristine, config = finished_run
    broken, codes = [], {}
    for rel in files:
        for how in ("garbage", "truncate"):
            shutil.rmtree(work)
            shutil.copytree(pristine, work)
            run = work / "runs" / "run"
            prepare(run)
            path = work / rel
            data = path.read_bytes()
            path.write_bytes(b"\x00garbage{" * 8 if how == "garbage" else data[: len(data) // 2])
            capfd.readouterr()
            code = run_cli([command, str(config)])
            out, err = capfd.readouterr()
            errors = [line for line in err.splitlines() if line.startswith("error:")]
            case = f"{how} {rel}: exit {code}"
            codes.setdefault(rel, set()).add(code)
            if "Traceback" in out + err or "internal error" in out + err:
                broken.append(f"{case}: {err[-300:]}")
            elif code == 2 and (len(errors) != 1 or not (path.name in errors[0] or str(path.parent) in errors[0])):
                broken.append(f"{case}: {errors}")
            elif code not in (0, 2):
                broken.append(case)
    return broken, codes


@pytest.mark.slow
def test_every_damaged_file_of_a_finished_run_is_rebuilt_or_named(finished_run, capfd, monkeypatch):
    work, pristine, _ = finished_run
    monkeypatch.chdir(work)
    run = pristine / "runs" / "run"
    files = sorted(  # the checkpoints: read when training resumes (the next test)
        str(p.relative_to(pristine))
        for p in [*run.rglob("*"), pristine / "runs" / "registry.sqlite"]
        if p.is_file() and not {".locks", "checkpoints"} & set(p.parts)
    )
    assert any(".arrow" in f for f in files) and any("student" in f for f in files)
    broken, codes = _damage_each_file(finished_run, capfd, "run", files)
    assert broken == []
    rebuilt = {f for f, exits in codes.items() if exits == {0}}  # the copy, the records distillab makes again
    records = ["stages.json", "ledger.json", "throughput.json", "eval/teacher.json", "eval/distilled.json"]
    records += ["data/generate_summary.json", "student/train_summary.json", "data/.arrow/train.arrow"]
    assert {f"runs/run/{name}" for name in records} <= rebuilt  # set aside and made again by their stages
    assert "runs/run/data/train.parquet" not in rebuilt and "runs/run/teacher.sqlite" not in rebuilt


@pytest.mark.slow
def test_every_damaged_checkpoint_file_is_named_when_training_resumes(finished_run, capfd, monkeypatch):
    """An interrupted training (no student yet, no stamp) resumes from checkpoints/: a damaged file there is named,
    with the way out (resume from the checkpoint before it, or start over)."""
    import shutil

    work, pristine, _ = finished_run
    monkeypatch.chdir(work)

    def interrupted(run):
        shutil.rmtree(run / "student")
        stamps = json.loads((run / "stages.json").read_text())
        (run / "stages.json").write_text(json.dumps({k: v for k, v in stamps.items() if k == "generate:train"}))

    checkpoints = pristine / "runs" / "run" / "checkpoints"
    files = [checkpoints / "fingerprint.json", *(checkpoints / "checkpoint-2").iterdir()]  # the one resumed from
    assert len(files) > 5
    files = sorted(str(p.relative_to(pristine)) for p in files)
    broken, codes = _damage_each_file(finished_run, capfd, "train", files, interrupted)
    assert broken == []
    # refused naming the file; but for the fingerprint: then what they were made from is unknown, and training starts
    # over with the checkpoints set aside
    assert {f for f, exits in codes.items() if exits != {2}} == {"runs/run/checkpoints/fingerprint.json"}


# ----------------------------------------------------------------------------------------------------
# A disk that fills up mid-write, simulated without root: the child process gets a file-size limit (RLIMIT_FSIZE,
# SIGXFSZ ignored, so a write past it fails with EFBIG as a full disk fails with ENOSPC). It ends in one line naming
# what it could not write; the rerun with room ends with what an uninterrupted run makes.


def _child(args: list[str], limit: int | None = None, code: str | None = None):
    """`distillab ARGS` in a child python (or `code` with ARGS as its argv), with a file-size limit when given."""
    import resource
    import signal
    import subprocess
    import sys

    from distillab.testing import subprocess_env

    def limited():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        if limit is not None:
            resource.setrlimit(resource.RLIMIT_FSIZE, (limit, resource.RLIM_INFINITY))

    command = [sys.executable, "-c", code, *args] if code else [sys.executable, "-m", "distillab", *args]
    return subprocess.run(command, env=subprocess_env(), preexec_fn=limited, capture_output=True, text=True)


def _one_error(proc) -> str:
    assert "Traceback" not in proc.stderr and "internal error" not in proc.stderr, proc.stderr[-2000:]
    assert proc.returncode == 2, proc.stderr[-2000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, proc.stderr[-2000:]
    return errors[0]


@pytest.mark.slow
def test_a_full_disk_while_training_then_a_rerun_gives_the_uninterrupted_weights(tmp_path, tiny_teacher, tiny_student):
    """The disk fills up while the Arrow copy is written, then (room for the copy, not for a checkpoint's largest
    file) while the first checkpoint is saved; with room again, the student is the uninterrupted run's, bit for bit."""
    import shutil

    from safetensors.torch import load_file

    config = write_config(
        tmp_path,
        f'[teacher]\nmodel = "{tiny_teacher}"\nmax_new_tokens = 4\ntop_k_logprobs = 3\n'
        f'[data]\nn_prompts = 24\nskills = ["reverse"]\n'
        f'[train]\nstudent = "{tiny_student}"\nmax_steps = 3\nsave_steps = 1\nper_device_batch_size = 4\n',
    )
    assert run_cli(["generate", str(config)]) == 0
    assert run_cli(["train", str(config)]) == 0
    run = tmp_path / "runs" / "run"
    uninterrupted = load_file(run / "student" / "model.safetensors")
    copy = (run / "data" / ".arrow" / "train.arrow").stat().st_size
    checkpoint = next((run / "checkpoints").glob("checkpoint-*/optimizer.pt")).stat().st_size  # each save's largest
    assert copy < checkpoint
    stamps = json.loads((run / "stages.json").read_text())
    (run / "stages.json").write_text(json.dumps({"generate:train": stamps["generate:train"]}))
    for made in (run / "student", run / "checkpoints", run / "data" / ".arrow"):
        shutil.rmtree(made)

    line = _one_error(_child(["train", str(config)], limit=copy - 1))
    assert "train.arrow" in line and "make room" in line, line
    line = _one_error(_child(["train", str(config)], limit=checkpoint - 1))
    assert "checkpoint-1" in line and "make room" in line, line
    assert not (run / "checkpoints" / ".saving").exists()  # a half-written checkpoint gives its room back

    assert _child(["train", str(config)]).returncode == 0  # room again
    resumed = load_file(run / "student" / "model.safetensors")
    assert resumed.keys() == uninterrupted.keys()
    assert all(torch.equal(resumed[name], uninterrupted[name]) for name in resumed)


FULL_AT_FIRST_REPACK = """
import os, resource, sys
import distillab.cache as cache
from distillab.cli import run_cli

cache.PACK_ROWS = 4  # a repack every 4 answers
pack = cache.RequestCache._pack


def full_from_here(self):  # the disk fills up as the first repack begins: no file may grow any more
    size = max(os.path.getsize(p) for p in (self.path, f"{self.path}-wal") if os.path.exists(p))
    resource.setrlimit(resource.RLIMIT_FSIZE, (size, resource.RLIM_INFINITY))
    return pack(self)


cache.RequestCache._pack = full_from_here
sys.exit(run_cli(sys.argv[1:]))
"""


@pytest.mark.slow
def test_a_full_disk_during_a_cache_repack_then_a_rerun_gives_the_uninterrupted_rows(tmp_path, teacher, tiny_teacher):
    from distillab.config import load_config
    from distillab.dataset import read_dataset

    def config(name):
        data = 'skills = ["reverse"]\nn_prompts = 24'
        return served_config(tmp_path / name, teacher, tiny_teacher, data=data, concurrency=2)

    (tmp_path / "whole").mkdir(), (tmp_path / "full").mkdir()
    assert run_cli(["generate", str(config("whole"))]) == 0
    expected = {
        r["request_hash"]: (r["completion_ids"], r["top_ids"])
        for r in read_dataset(load_config(config("whole")).run_dir / "data" / "train.parquet")
    }

    def answered() -> float:  # prompts the model computed (a retry's replay, or a request cut off as the child
        return read_metrics(teacher.url)["distillab_answers_total"]  # exits, is not computed again: serve)

    before = answered()
    line = _one_error(_child(["generate", str(config("full"))], code=FULL_AT_FIRST_REPACK))
    assert "teacher.sqlite" in line and "make room" in line and "move it away" not in line, line
    assert _child(["generate", str(config("full"))]).returncode == 0  # room again
    rows = read_dataset(load_config(config("full")).run_dir / "data" / "train.parquet")
    assert {r["request_hash"]: (r["completion_ids"], r["top_ids"]) for r in rows} == expected
    # every answer committed before the disk filled is read back, not bought again: at most those in flight then
    assert answered() - before <= 24 + 2


# ----------------------------------------------------------------------------------------------------
# A prompts file that cannot be read: named, and never met with advice to delete it (it is the user's own).


def _unreadable_prompts(tmp_path, case: str):
    import datasets

    if case == "parquet-garbage":
        path = tmp_path / "prompts.parquet"
        path.write_bytes(b"PAR1 this is not a parquet file")
        return path, ("prompts.parquet", "not a readable Parquet file")
    saved = tmp_path / "saved"
    datasets.Dataset.from_list([{"prompt": "upper abc"}, {"prompt": "upper xyz"}]).save_to_disk(str(saved))
    if case == "arrow-garbage":
        for data in saved.glob("*.arrow"):
            data.write_bytes(b"garbage")
        return saved, ("saved", "data-00000-of-00001.arrow", "save_to_disk")
    (saved / case).write_text('{"_data_files": [')
    return saved, (f"saved/{case}", "corrupt", "save_to_disk")


@pytest.mark.parametrize("case", ["parquet-garbage", "state.json", "dataset_info.json", "arrow-garbage"])
def test_an_unreadable_prompts_file_is_named_and_not_to_be_deleted(refused, tmp_path, teacher, tiny_teacher, case):
    path, needles = _unreadable_prompts(tmp_path, case)
    line = refused(served_config(tmp_path, teacher, tiny_teacher, data=f'prompts_file = "{path}"'), *needles)
    assert "delete" not in line
