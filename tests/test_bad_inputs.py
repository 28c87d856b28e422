"""A corpus of bad inputs, across every command: each ends in exit code 2, exactly one line on stderr, no
traceback, and nothing new on disk (the whole tmp directory is snapshotted before and after).

Run in-process through `cli.run_cli`, the same boundary `distillab` runs (a subprocess costs ~2 s of imports
a case).
"""

from __future__ import annotations

import hashlib
import json
import shutil
import sqlite3
from pathlib import Path

import pytest

from distillab.cli import run_cli
from distillab.dataset import read_dataset
from tests.helpers import save_tiny_llama, write_config, write_jsonl


def snapshot(root: Path) -> dict:
    """Every path under root with its content hash (files) or kind: what "nothing new on disk" compares."""
    out = {}
    for path in sorted(root.rglob("*")):
        rel = str(path.relative_to(root))
        if path.is_symlink() or not path.is_file():
            out[rel] = "dir" if path.is_dir() else "other"
        else:
            out[rel] = hashlib.sha256(path.read_bytes()).hexdigest()
    return out


@pytest.fixture
def bad(tmp_path, capfd, monkeypatch):
    """bad(*args, needles...) runs the command and checks the contract; needles must be in the one line."""
    monkeypatch.chdir(tmp_path)  # relative defaults (audit/, runs/registry.sqlite) land in tmp_path

    def check(*args, expect: tuple[str, ...] = ()):
        capfd.readouterr()
        before = snapshot(tmp_path)
        code = run_cli([str(a) for a in args])
        out, err = capfd.readouterr()
        lines = [line for line in err.splitlines() if line.strip()]
        assert "Traceback" not in out + err, err
        assert code == 2, f"exit {code}: {err}"
        assert len(lines) == 1, err
        for needle in expect:
            assert needle in lines[0], lines[0]
        assert snapshot(tmp_path) == before, "the command changed the disk"
        return lines[0]

    return check


# ----------------------------------------------------------------------------------------------------
# Model directories that are not what they claim (made from the tiny test model).


def broken_model(tmp_path: Path, tiny: Path, how: str) -> Path:
    model = shutil.copytree(tiny, tmp_path / f"model-{how}")
    if how == "garbage-config":
        (model / "config.json").write_text("garbage{")
    elif how == "config-not-object":
        (model / "config.json").write_text("[1, 2]")
    elif how == "config-not-utf8":
        (model / "config.json").write_bytes(b'{"model_type": "llama\xff"}')
    elif how == "no-model-type":
        (model / "config.json").write_text('{"hidden_size": 8}')
    elif how == "no-tokenizer":
        for f in model.glob("tokenizer*"):
            f.unlink()
    elif how == "no-safetensors":
        for f in model.glob("*.safetensors"):
            f.rename(f.with_suffix(".bin"))
    elif how == "garbage-safetensors":
        for f in model.glob("*.safetensors"):
            f.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not a header at all")
    elif how == "other-tokenizer":  # one token renamed: a different vocabulary, same size
        tok = model / "tokenizer.json"
        tok.write_text(tok.read_text().replace('"<pad>"', '"<PAD>"', 1))
    return model


MODEL_BREAKAGES = {
    "garbage-config": "config.json",
    "config-not-object": "config.json",
    "config-not-utf8": "config.json",
    "no-model-type": "config",
    "no-tokenizer": "tokenizer",
    "no-safetensors": "safetensors",
    "garbage-safetensors": "safetensors",
}


# ----------------------------------------------------------------------------------------------------
# 1. Config files: every config-taking command fails the same way, before any run directory exists.

CONFIG_COMMANDS = ["generate", "train", "evaluate", "report", "run"]


def _config_case(tmp_path: Path, case: str) -> tuple[Path, tuple[str, ...]]:
    if case == "missing":
        return tmp_path / "nope.toml", ("config file not found",)
    if case == "directory":
        (tmp_path / "dir.toml").mkdir()
        return tmp_path / "dir.toml", ("dir.toml",)
    if case == "not-utf8":
        path = tmp_path / "c.toml"
        path.write_bytes(b'name = "caf\xe9"\n')
        return path, ("c.toml", "not UTF-8")
    if case == "invalid-toml":
        path = tmp_path / "c.toml"
        path.write_text("name = \n[train\n")
        return path, ("invalid TOML",)
    if case == "unknown-key":
        return write_config(tmp_path, "[train]\nlerning_rate = 1"), ("train.lerning_rate",)
    if case == "wrong-type":
        return write_config(tmp_path, '[data]\nn_prompts = "many"'), ("data.n_prompts",)
    if case == "out-of-range":
        return write_config(tmp_path, "[teacher]\ntop_p = 2.0"), ("teacher.top_p",)
    if case == "name-with-slash":
        return write_config(tmp_path, name="a/b"), ("plain directory name",)
    if case == "name-with-nul":
        return write_config(tmp_path, name="a\\u0000b"), ("NUL",)
    if case == "runs-under-proc":
        return write_config(tmp_path, top='runs_dir = "/proc/distillab-runs"'), ("/proc",)
    if case == "runs-under-a-file":
        (tmp_path / "afile").write_text("x")
        return write_config(tmp_path, top=f'runs_dir = "{tmp_path / "afile" / "runs"}"'), ("afile", "is a file")
    if case == "run-dir-is-a-file":
        (tmp_path / "runs").mkdir()
        (tmp_path / "runs" / "run").write_text("x")
        return write_config(tmp_path), ("not a directory",)
    if case == "one-column-twice":
        return write_config(tmp_path, '[data]\nanswer_column = "prompt"'), ("config data", "different columns")
    raise AssertionError(case)


CONFIG_CASES = [
    "missing",
    "directory",
    "not-utf8",
    "invalid-toml",
    "unknown-key",
    "wrong-type",
    "out-of-range",
    "name-with-slash",
    "name-with-nul",
    "runs-under-proc",
    "runs-under-a-file",
    "run-dir-is-a-file",
    "one-column-twice",
]


@pytest.mark.parametrize("command", CONFIG_COMMANDS)
@pytest.mark.parametrize("case", CONFIG_CASES)
def test_bad_config(bad, tmp_path, command, case):
    path, expect = _config_case(tmp_path, case)
    bad(command, path, expect=expect)


# ----------------------------------------------------------------------------------------------------
# 2. generate: prompts, skills, models, and run directories left by an earlier run.


def _prompts_case(tmp_path: Path, case: str) -> tuple[Path, tuple[str, ...]]:
    p = tmp_path / "p.jsonl"
    if case == "missing":
        return tmp_path / "none.jsonl", ("not found",)
    if case == "directory":
        p.mkdir()
        return p, ("is a directory",)
    if case == "empty":
        p.write_text("\n\n")
        return p, ("empty",)
    if case == "malformed":
        write_jsonl(p, [{"prompt": "1+1="}, '{"prompt": oops}'])
        return p, ("p.jsonl:2", "malformed JSON")
    if case == "not-utf8":
        p.write_bytes(b'{"prompt": "1+1="}\n{"prompt": "caf\xe9"}\n')
        return p, ("p.jsonl:2", "not UTF-8")
    if case == "utf16":  # what a Windows editor may save: not UTF-8 from the first byte
        p.write_bytes('{"prompt": "1+1="}\n'.encode("utf-16"))
        return p, ("p.jsonl:1", "not UTF-8")
    if case == "no-prompt":
        write_jsonl(p, [{"question": "1+1="}])
        return p, ("p.jsonl:1", "prompt")
    if case == "prompt-not-string":
        write_jsonl(p, [{"prompt": 12}])
        return p, ("p.jsonl:1", "prompt")
    if case == "answer-not-string":
        write_jsonl(p, [{"prompt": "1+1=", "answer": 2}])
        return p, ("p.jsonl:1", "answer")
    if case == "not-an-object":
        write_jsonl(p, ['["1+1="]'])
        return p, ("p.jsonl:1",)
    user = {"role": "user", "content": "1+1="}
    if case == "messages-not-a-list":
        write_jsonl(p, [{"prompt": "1+1="}, {"messages": user}])
        return p, ("p.jsonl:2", "messages", "list")
    if case == "messages-not-json":
        write_jsonl(p, [{"messages": "1+1="}])
        return p, ("p.jsonl:1", "not JSON")
    if case == "messages-unknown-role":
        write_jsonl(p, [{"messages": [{"role": "robot", "content": "beep"}, user]}])
        return p, ("p.jsonl:1", "turn 1", "robot")
    if case == "messages-content-not-text":
        write_jsonl(p, [{"messages": [{"role": "user", "content": 12}]}])
        return p, ("p.jsonl:1", "content")
    if case == "messages-end-with-system":
        write_jsonl(p, [{"messages": [user, {"role": "system", "content": "be brief"}]}])
        return p, ("p.jsonl:1", "user turn", "system")
    if case == "messages-only-an-answer":
        write_jsonl(p, [{"messages": [{"role": "assistant", "content": "2"}]}])
        return p, ("p.jsonl:1", "user turn")
    if case == "two-answers":
        write_jsonl(p, [{"messages": [user, {"role": "assistant", "content": "2"}], "answer": "2"}])
        return p, ("p.jsonl:1", "two answers")
    if case == "parquet-without-prompt-column":
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.table({"question": ["1+1="]}), tmp_path / "p.parquet")
        return tmp_path / "p.parquet", ("p.parquet", '"prompt"', '"messages"')
    if case == "datasets-dir-without-prompt-column":
        import datasets

        datasets.Dataset.from_dict({"question": ["1+1="]}).save_to_disk(str(tmp_path / "hf"))
        return tmp_path / "hf", ("hf", '"prompt"', '"messages"')
    raise AssertionError(case)


@pytest.mark.parametrize("command", ["generate", "run"])
@pytest.mark.parametrize(
    "case",
    [
        "missing",
        "directory",
        "empty",
        "malformed",
        "not-utf8",
        "utf16",
        "no-prompt",
        "prompt-not-string",
        "answer-not-string",
        "not-an-object",
        "messages-not-a-list",
        "messages-not-json",
        "messages-unknown-role",
        "messages-content-not-text",
        "messages-end-with-system",
        "messages-only-an-answer",
        "two-answers",
        "parquet-without-prompt-column",
        "datasets-dir-without-prompt-column",
    ],
)
def test_bad_prompts_file(bad, tmp_path, command, case):
    path, expect = _prompts_case(tmp_path, case)
    bad(command, write_config(tmp_path, f'[data]\nprompts_file = "{path}"'), expect=expect)


def test_unknown_skill(bad, tmp_path):
    bad("generate", write_config(tmp_path, '[data]\nskills = ["add", "juggle"]'), expect=("juggle",))


def test_human_source_without_answers(bad, tmp_path):
    prompts = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "1+1="}])
    bad("generate", write_config(tmp_path, f'[data]\nprompts_file = "{prompts}"\nsource = "human"'), expect=("answer",))


@pytest.mark.parametrize("how", sorted(MODEL_BREAKAGES))
def test_broken_teacher_directory(bad, tmp_path, tiny_teacher, how):
    model = broken_model(tmp_path, tiny_teacher, how)
    config = write_config(
        tmp_path, f'[teacher]\nmodel = "{model}"\n[data]\nn_prompts = 2\n[train]\nstudent = "{tiny_teacher}"'
    )
    bad("generate", config, expect=(str(model), MODEL_BREAKAGES[how]))


@pytest.mark.parametrize("how", ["garbage-config", "no-tokenizer", "config-not-utf8"])
def test_broken_student_directory(bad, tmp_path, tiny_teacher, how):
    model = broken_model(tmp_path, tiny_teacher, how)
    bad(
        "generate", write_config(tmp_path, f'[data]\nn_prompts = 2\n[train]\nstudent = "{model}"'), expect=(str(model),)
    )


@pytest.mark.parametrize("model", ["lab:nonexistent", "/no/such/model"])
def test_missing_teacher(bad, tmp_path, model):
    bad("generate", write_config(tmp_path, f'[teacher]\nmodel = "{model}"'), expect=(model.split(":")[-1],))


def _existing_run(tmp_path: Path, config: Path) -> Path:
    """A run directory as an earlier run left it, run.toml included (a rerun rewrites it unchanged)."""
    from distillab.config import load_config, to_toml

    cfg = load_config(config)
    cfg.run_dir.mkdir(parents=True)
    (cfg.run_dir / "run.toml").write_text(to_toml(cfg))
    return cfg.run_dir


def _tiny_generate_config(tmp_path, tiny_teacher) -> Path:
    return write_config(
        tmp_path,
        f'[teacher]\nmodel = "{tiny_teacher}"\nmax_new_tokens = 2\n'
        f'[data]\nn_prompts = 2\n[train]\nstudent = "{tiny_teacher}"',
    )


@pytest.mark.parametrize("damage", ["garbage", "other-program", "directory"])
def test_damaged_run_directory_for_generate(bad, tmp_path, tiny_teacher, damage):
    config = _tiny_generate_config(tmp_path, tiny_teacher)
    run_dir = _existing_run(tmp_path, config)
    cache = run_dir / "teacher.sqlite"
    if damage == "garbage":
        cache.write_bytes(b"x" * 4096)
        expect = ("teacher.sqlite",)
    elif damage == "other-program":
        db = sqlite3.connect(cache)
        db.execute("CREATE TABLE invoices (id INTEGER)")
        db.commit()
        db.close()
        expect = ("teacher.sqlite", "another program")
    else:
        cache.mkdir()
        expect = ("teacher.sqlite",)
    bad("generate", config, expect=expect)


@pytest.mark.parametrize("damage", [b'{"generate": "\xff"}', b'{"generate": ', b"[]"])
def test_a_damaged_stages_json_is_set_aside_and_made_again(tmp_path, tiny_teacher, capfd, damage):
    """stages.json is distillab's own record of what is done: a damaged one is set aside (kept for a look), said,
    and the stages run again, nothing paid twice (the answers are in the cache)."""
    config = _tiny_generate_config(tmp_path, tiny_teacher)
    assert run_cli(["generate", str(config)]) == 0
    run_dir = tmp_path / "runs" / "run"
    stamps, rows = (run_dir / "stages.json").read_text(), read_dataset(run_dir / "data" / "train.parquet")
    (run_dir / "stages.json").write_bytes(damage)
    capfd.readouterr()
    assert run_cli(["generate", str(config)]) == 0
    out, err = capfd.readouterr()
    said = "".join((out + err).split())  # the console wraps long lines
    assert "stages.jsonwascorrupt:setasideasstages.json.corrupt" in said and "Traceback" not in out + err
    assert (run_dir / "stages.json").read_text() == stamps and (run_dir / "stages.json.corrupt").read_bytes() == damage
    assert read_dataset(run_dir / "data" / "train.parquet") == rows
    assert "(0sent,2cached,0failed)" in said  # nothing asked again


def test_empty_skill_list(bad, tmp_path):
    bad("generate", write_config(tmp_path, "[data]\nskills = []"), expect=("skills",))


def test_teacher_url_not_http(bad, tmp_path):
    config = write_config(
        tmp_path,
        '[teacher]\nbase_url = "ftp://127.0.0.1:9/v1"\nmodel = "x"\nmax_retries = 0\n'
        "timeout_s = 2\n[data]\nn_prompts = 2",
    )
    bad("generate", config, expect=("base_url",))


def test_every_request_fails(tmp_path, capfd):
    # Work was attempted, so the cache may keep the failures (a rerun retries them): the disk may change,
    # but the command must fail, end with one error line, and leave no dataset and no fresh stamp.
    config = write_config(
        tmp_path,
        '[teacher]\nbase_url = "http://127.0.0.1:9/v1"\nmodel = "x"\nmax_retries = 0\n'
        "timeout_s = 2\nusd_per_1m_input = 1\nusd_per_1m_output = 1\n[data]\nn_prompts = 2",
    )
    code = run_cli(["generate", str(config)])
    err = capfd.readouterr().err
    assert "Traceback" not in err, err
    assert code == 2, err
    assert err.strip().splitlines()[-1].startswith("error:") and "failed" in err.strip().splitlines()[-1]
    run_dir = tmp_path / "runs" / "run"
    assert not (run_dir / "data" / "train.parquet").exists()
    assert "generate" not in (
        json.loads((run_dir / "stages.json").read_text()) if (run_dir / "stages.json").exists() else {}
    )


def test_prompt_longer_than_teacher_context(bad, tmp_path, tiny_teacher):
    prompts = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "describe " + "x" * 400}])  # tiny model: 256 positions
    config = write_config(
        tmp_path,
        f'[teacher]\nmodel = "{tiny_teacher}"\nmax_new_tokens = 2\n'
        f'[data]\nprompts_file = "{prompts}"\n[train]\nstudent = "{tiny_teacher}"',
    )
    bad("generate", config, expect=("p.jsonl", "context"))


# ----------------------------------------------------------------------------------------------------
# 3. train: the dataset and the student.


@pytest.fixture
def lab_run(tmp_path, tiny_teacher):
    """A run directory with a real 4-row dataset (ground-truth answers: no teacher needed), made in setup."""
    from distillab.config import load_config
    from distillab.generate import run_generate

    def make(extra: str = "") -> tuple[Path, Path]:
        config = write_config(
            tmp_path,
            f'[data]\nsource = "lab"\nn_prompts = 2\nskills = ["add", "upper"]\n'
            f'[train]\nstudent = "{tiny_teacher}"\nmax_steps = 1\n{extra}',
        )
        cfg = load_config(config)
        run_generate(cfg, log=lambda *a: None)
        return config, cfg.run_dir

    return make


def test_train_without_dataset(bad, tmp_path):
    bad("train", write_config(tmp_path), expect=("no dataset", "generate"))


def test_train_corrupt_parquet(bad, lab_run):
    config, run_dir = lab_run()
    (run_dir / "data" / "train.parquet").write_bytes(b"PAR1 not really")
    bad("train", config, expect=("train.parquet",))


def test_train_zero_rows(bad, lab_run):
    import pyarrow as pa
    import pyarrow.parquet as pq

    config, run_dir = lab_run()
    pq.write_table(pa.table({"prompt": pa.array([], pa.string())}), run_dir / "data" / "train.parquet")
    bad("train", config, expect=("no rows",))


def test_train_parquet_missing_column(bad, lab_run):
    import pyarrow.parquet as pq

    config, run_dir = lab_run()
    path = run_dir / "data" / "train.parquet"
    pq.write_table(pq.read_table(path).drop(["completion_ids"]), path)
    bad("train", config, expect=("train.parquet", "completion_ids"))


@pytest.mark.parametrize("how", ["garbage-config", "no-tokenizer", "no-safetensors"])
def test_train_broken_student(bad, tmp_path, lab_run, how, tiny_teacher):
    config, run_dir = lab_run()
    model = broken_model(tmp_path, tiny_teacher, how)
    config.write_text(config.read_text().replace(f'student = "{tiny_teacher}"', f'student = "{model}"'))
    bad("train", config, expect=(str(model),))


def test_train_on_policy_with_an_api_teacher(bad, lab_run):
    config, _ = lab_run('on_policy_fraction = 0.5\n[teacher]\nbase_url = "http://127.0.0.1:9/v1"\nmodel = "x"')
    bad("train", config, expect=("on-policy",))


def test_train_a_dataset_tokenized_for_another_student(bad, tmp_path, tiny_teacher):
    # The dataset's ids are the student's generate tokenized for (a teacher with another tokenizer is aligned
    # then, distillab.crosstok); a student swapped in afterwards would read them as other tokens: refused.
    from distillab.config import load_config
    from distillab.generate import run_generate
    from distillab.lab.tokenizer import build_bpe_tokenizer

    config = _tiny_generate_config(tmp_path, tiny_teacher)
    run_generate(load_config(config), log=lambda *a: None)  # tokenized for the lab tokenizer
    bpe = build_bpe_tokenizer(["add 12 30 = 42", "upper abc = ABC", "reverse xyz = zyx"] * 20, vocab_size=300)
    student = save_tiny_llama(tmp_path / "bpe-student", hidden=16, layers=1, tok=bpe)
    config.write_text(config.read_text().replace(f'student = "{tiny_teacher}"', f'student = "{student}"'))
    bad("train", config, expect=("another student", "rerun `distillab generate`"))


# ----------------------------------------------------------------------------------------------------
# 4. evaluate and report.


def _task_file(tmp_path: Path, case: str) -> tuple[Path, tuple[str, ...]]:
    t = tmp_path / "tasks.jsonl"
    if case == "missing":
        return tmp_path / "none.jsonl", ("not found",)
    if case == "not-utf8":
        t.write_bytes(b'{"prompt": "\xff", "answer": "a"}\n')
        return t, ("tasks.jsonl:1", "not UTF-8")
    if case == "malformed":
        write_jsonl(t, ['{"prompt": '])
        return t, ("tasks.jsonl:1",)
    if case == "unknown-scorer":
        write_jsonl(t, [{"prompt": "a", "answer": "b", "scorer": "vibes"}])
        return t, ("vibes",)
    if case == "bad-regex":
        write_jsonl(t, [{"prompt": "a", "answer": "(", "scorer": "regex"}])
        return t, ("regular expression",)
    if case == "numeric-without-number":
        write_jsonl(t, [{"prompt": "a", "answer": "many", "scorer": "numeric"}])
        return t, ("numeric",)
    if case == "one-choice":
        write_jsonl(t, [{"prompt": "a", "choices": ["x"], "answer": 0}])
        return t, ("choices",)
    if case == "messages-end-with-assistant-alone":
        write_jsonl(t, [{"messages": [{"role": "system", "content": "s"}, {"role": "assistant", "content": "a"}]}])
        return t, ("tasks.jsonl:1", "user turn")
    raise AssertionError(case)


@pytest.mark.parametrize(
    "case",
    [
        "missing",
        "not-utf8",
        "malformed",
        "unknown-scorer",
        "bad-regex",
        "numeric-without-number",
        "one-choice",
        "messages-end-with-assistant-alone",
    ],
)
def test_bad_task_file(bad, tmp_path, case):
    path, expect = _task_file(tmp_path, case)
    bad("evaluate", write_config(tmp_path, f'[eval]\ntask_file = "{path}"'), expect=expect)


def test_unknown_general_skill(bad, tmp_path):
    bad("evaluate", write_config(tmp_path, '[eval]\ngeneral = ["juggle"]\nn_per_skill = 1'), expect=("juggle",))


@pytest.mark.slow
@pytest.mark.parametrize("url", ["http://127.0.0.1:9/v1", ["http://127.0.0.1:9/v1", "http://127.0.0.1:7/v1"]])
def test_evaluate_api_teacher_unreachable(tmp_path, capfd, tiny_teacher, url):
    """The API teacher cannot be reached when it is to be scored: after evaluate's progress lines, one error line
    naming it and the switch, exit 2, and nothing written (not eval/teacher.json, not even the request cache:
    it is made by the first answer)."""
    from distillab.config import load_config
    from distillab.generate import run_generate
    from distillab.train import run_train

    config = write_config(
        tmp_path,
        f'[teacher]\nbase_url = {json.dumps(url)}\nmodel = "x"\nmax_retries = 0\n'
        'timeout_s = 2\n[data]\nsource = "lab"\nn_prompts = 2\n'
        f'[train]\nstudent = "{tiny_teacher}"\nmax_steps = 1\nbatch_size = 2\n'
        'loss = "ce"\nkd_weight = 0\nsft_weight = 1\n'
        '[eval]\nn_per_skill = 1\ngeneral = ["upper"]\nbootstrap = 0',
    )
    cfg = load_config(config)
    run_generate(cfg, log=lambda *a: None)  # ground-truth answers: the teacher is not asked before evaluate
    run_train(cfg, log=lambda *a: None)
    before = snapshot(tmp_path)
    capfd.readouterr()
    code = run_cli(["evaluate", str(config)])
    err = capfd.readouterr().err
    assert "Traceback" not in err and code == 2, err
    last = err.strip().splitlines()[-1]
    assert last.startswith("error: evaluate teacher") and "127.0.0.1:9" in last and "score_teacher = false" in last
    assert snapshot(tmp_path) == before, "evaluate changed the disk"


def test_evaluate_before_training(bad, tmp_path):
    bad("evaluate", write_config(tmp_path, "[eval]\nn_per_skill = 1\nbootstrap = 0"), expect=("student",))


def test_report_without_evaluations(bad, tmp_path):
    bad("report", write_config(tmp_path), expect=("no evaluations",))


def test_report_corrupt_eval_file(bad, tmp_path):
    config = write_config(tmp_path)
    run_dir = _existing_run(tmp_path, config)
    (run_dir / "eval").mkdir()
    (run_dir / "eval" / "teacher.json").write_text('{"task": ')
    bad("report", config, expect=("teacher.json",))


# ----------------------------------------------------------------------------------------------------
# 5. serve (argument validation only: a good call would start a server), lineage, leaderboard.


@pytest.mark.parametrize("port", ["abc", "70000", "-1", "1.5"])
def test_serve_bad_port(bad, port):
    bad("serve", "lab:teacher", "--port", port, expect=("port",))


@pytest.mark.parametrize("how", ["garbage-config", "no-tokenizer", "garbage-safetensors"])
def test_serve_broken_model(bad, tmp_path, tiny_teacher, how):
    model = broken_model(tmp_path, tiny_teacher, how)
    bad("serve", model, "--port", "8765", expect=(str(model),))


def test_lineage_not_a_directory(bad, tmp_path):
    (tmp_path / "f").write_text("x")
    bad("lineage", tmp_path / "f", expect=("not found",))


def test_lineage_missing(bad, tmp_path):
    (tmp_path / "student").mkdir()
    bad("lineage", tmp_path / "student", expect=("lineage.json",))


@pytest.mark.parametrize("content", [b"{not json", b'{"format": "\xff"}', b"[]"])
def test_lineage_corrupt(bad, tmp_path, content):
    (tmp_path / "student").mkdir()
    (tmp_path / "student" / "lineage.json").write_bytes(content)
    bad("lineage", tmp_path / "student", expect=("lineage.json",) if content != b'{"format": "\xff"}' else ())


def _registry(tmp_path: Path, case: str) -> Path:
    reg = tmp_path / "registry.sqlite"
    if case == "garbage":
        reg.write_bytes(b"not sqlite" * 500)
    elif case == "empty-file":
        reg.write_bytes(b"")
    elif case == "directory":
        reg.mkdir()
    elif case in ("other-program", "runs-of-another-shape"):
        db = sqlite3.connect(reg)
        db.execute("CREATE TABLE runs (id INTEGER)" if case == "runs-of-another-shape" else "CREATE TABLE t (x)")
        db.commit()
        db.close()
    return reg


@pytest.mark.parametrize(
    "case", ["missing", "garbage", "empty-file", "directory", "other-program", "runs-of-another-shape"]
)
def test_leaderboard_bad_registry(bad, tmp_path, case):
    bad("leaderboard", "--registry", _registry(tmp_path, case), expect=("registry",))


# ----------------------------------------------------------------------------------------------------
# 6. audit.


def _corpus(tmp_path: Path, case: str) -> tuple[Path, tuple[str, ...]]:
    c = tmp_path / "corpus.jsonl"
    if case == "missing":
        return tmp_path / "none.jsonl", ("not found",)
    if case == "empty":
        c.write_text("\n")
        return c, ("empty",)
    if case == "malformed":
        write_jsonl(c, [{"text": "a"}, "{"])
        return c, ("corpus.jsonl:2",)
    if case == "not-utf8":
        c.write_bytes(b'{"text": "a"}\n{"text": "\xe9t\xe9"}\n')
        return c, ("corpus.jsonl:2", "not UTF-8")
    if case == "no-text-field":
        write_jsonl(c, [{"body": "a"}])
        return c, ("'text'",)
    if case == "empty-text":
        write_jsonl(c, [{"text": ""}])
        return c, ("empty",)
    if case == "wrong-extension":
        t = tmp_path / "corpus.txt"
        t.write_text("hello\n")
        return t, (".jsonl or .parquet",)
    if case == "corrupt-parquet":
        p = tmp_path / "corpus.parquet"
        p.write_bytes(b"PAR1garbage")
        return p, ("corpus.parquet",)
    raise AssertionError(case)


@pytest.mark.parametrize(
    "case",
    ["missing", "empty", "malformed", "not-utf8", "no-text-field", "empty-text", "wrong-extension", "corrupt-parquet"],
)
def test_audit_bad_corpus(bad, tmp_path, case):
    path, expect = _corpus(tmp_path, case)
    bad("audit", path, expect=expect)


@pytest.mark.parametrize("case", ["missing", "bad-label", "one-class", "no-label", "not-utf8"])
def test_audit_bad_labelled_sample(bad, tmp_path, case):
    corpus = write_jsonl(tmp_path / "corpus.jsonl", [{"text": "a"}])
    sample = tmp_path / "sample.jsonl"
    if case == "bad-label":
        write_jsonl(sample, [{"text": "a", "label": "maybe"}])
    elif case == "one-class":
        write_jsonl(sample, [{"text": "a", "label": "teacher"}, {"text": "b", "label": 1}])
    elif case == "no-label":
        write_jsonl(sample, [{"text": "a"}])
    elif case == "not-utf8":
        sample.write_bytes(b'{"text": "\xff", "label": 1}\n')
    expect = ("sample.jsonl",) if case != "one-class" else ("both",)
    bad("audit", corpus, "--labelled", sample, "--observer", "lab:base", "--performer", "lab:base", expect=expect)


def test_audit_prompt_field_not_a_string(bad, tmp_path):
    corpus = write_jsonl(tmp_path / "corpus.jsonl", [{"text": "a", "q": 3}])
    bad("audit", corpus, "--prompt-field", "q", expect=("'q'",))


@pytest.mark.parametrize("out", ["file", "nul", "proc"])
def test_audit_unusable_output_directory(bad, tmp_path, out):
    corpus = write_jsonl(tmp_path / "corpus.jsonl", [{"text": "a"}])
    (tmp_path / "afile").write_text("x")
    target = {"file": tmp_path / "afile" / "out", "nul": "out\x00dir", "proc": "/proc/audit-out"}[out]
    bad("audit", corpus, "--out", target, expect=("--out",) if out == "nul" else ("audit output directory",))


@pytest.mark.parametrize("role", ["--observer", "--performer"])
def test_audit_broken_models(bad, tmp_path, tiny_teacher, role):
    corpus = write_jsonl(tmp_path / "corpus.jsonl", [{"text": "a"}])
    model = broken_model(tmp_path, tiny_teacher, "garbage-config")
    bad("audit", corpus, role, model, expect=(str(model),))


def test_audit_models_with_different_tokenizers(bad, tmp_path, tiny_teacher):
    corpus = write_jsonl(tmp_path / "corpus.jsonl", [{"text": "a"}])
    other = broken_model(tmp_path, tiny_teacher, "other-tokenizer")
    bad("audit", corpus, "--observer", tiny_teacher, "--performer", other, expect=("share a tokenizer",))


# ----------------------------------------------------------------------------------------------------
# 7. lab, demo and plain usage errors.


@pytest.mark.parametrize(
    "args,expect",
    [
        (["lab", "pretrain", "student"], ("student",)),
        (["lab", "pretrain", "base", "--steps", "0"], ("--steps",)),
        (["lab", "pretrain", "base", "--from-phase", "-1"], ("--from-phase",)),
        (["lab", "skills", "extra"], ("extra",)),
        (["lab", "teach"], ("teach",)),
        (["nosuchcommand"], ("nosuchcommand",)),
        (["generate", "--no-such-option", "c.toml"], ("--no-such-option",)),
        (["generate"], ("config",)),
        (["audit"], ("corpus",)),
        (["leaderboard", "--registry"], ("--registry",)),
        (["generate", "c.toml", "--max-usd", "lots"], ("--max-usd",)),
    ],
)
def test_usage_errors(bad, args, expect):
    bad(*args, expect=expect)


def test_lab_pretrain_output_under_a_file(bad, tmp_path):
    (tmp_path / "afile").write_text("x")
    bad("lab", "pretrain", "base", "--out", tmp_path / "afile" / "ckpt", expect=("afile",))


def test_demo_runs_dir_under_a_file(bad, tmp_path):
    (tmp_path / "afile").write_text("x")
    bad("demo", "--runs-dir", tmp_path / "afile" / "runs", expect=("afile",))


# ----------------------------------------------------------------------------------------------------
# The boundary itself: a bug is exit 1 and one line, with the traceback only under --debug.


def test_unexpected_error_is_one_line_without_debug(tmp_path, capfd, monkeypatch):
    import distillab.registry

    def boom(path):
        raise ZeroDivisionError("the bug")

    monkeypatch.setattr(distillab.registry, "print_leaderboard", boom)
    assert run_cli(["leaderboard"]) == 1
    err = capfd.readouterr().err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert "internal error (this is a bug): ZeroDivisionError: the bug" in err and "--debug" in err
    assert run_cli(["--debug", "leaderboard"]) == 1
    err = capfd.readouterr().err
    assert "Traceback" in err and "ZeroDivisionError: the bug" in err
