"""Bad input: one line on stderr, a non-zero exit, no traceback, nothing half written."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.helpers import write_config


def distillab(*args, cwd):
    return subprocess.run(
        [sys.executable, "-m", "distillab", *args], cwd=cwd, capture_output=True, text=True, timeout=120
    )


def assert_one_line_error(result, *needles):
    assert result.returncode != 0
    assert "Traceback" not in result.stderr + result.stdout
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]


def test_malformed_jsonl_names_the_line(tmp_path):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"prompt": "1+1=\\n"}\n{"prompt": oops}\n')
    result = distillab("generate", str(write_config(tmp_path, f'[data]\nprompts_file = "{prompts}"')), cwd=tmp_path)
    assert_one_line_error(result, "p.jsonl:2", "malformed JSON")
    assert not (tmp_path / "runs" / "run" / "data").exists()


def test_empty_prompt_file(tmp_path):
    prompts = tmp_path / "empty.jsonl"
    prompts.write_text("\n")
    result = distillab("generate", str(write_config(tmp_path, f'[data]\nprompts_file = "{prompts}"')), cwd=tmp_path)
    assert_one_line_error(result, "empty")


def test_unknown_config_key_suggests(tmp_path):
    config = write_config(tmp_path, "[train]\nlerning_rate = 3\nlr = 1e-3")
    result = distillab("train", str(config), cwd=tmp_path)
    assert_one_line_error(result, "train.lerning_rate")
    config.write_text(config.read_text().replace("lerning_rate = 3", "los = 'jsd'"))
    result = distillab("train", str(config), cwd=tmp_path)
    assert_one_line_error(result, "train.los", "did you mean 'train.loss'")


def test_missing_model_directory(tmp_path):
    result = distillab(
        "generate", str(write_config(tmp_path, f'[train]\nstudent = "{tmp_path / "nowhere"}"')), cwd=tmp_path
    )
    assert_one_line_error(result, "model directory not found", "nowhere")


@pytest.mark.parametrize("args", [["serve", "/no/such/model"], ["lineage", "/no/such/dir"], ["run", "/no/such.toml"]])
def test_other_missing_paths(tmp_path, args):
    assert_one_line_error(distillab(*args, cwd=tmp_path))


def test_lab_pretrain_checks_then_runs_every_checkpoint(tmp_path, monkeypatch):
    # In-process: the checks run before any pretraining, and every named checkpoint is still pretrained.
    import distillab.lab.pretrain
    from distillab.cli import run_cli

    calls = []
    monkeypatch.setattr(distillab.lab.pretrain, "pretrain", lambda name, out, **kw: calls.append((name, out)))
    assert run_cli(["lab", "pretrain", "all", "--out", str(tmp_path / "ckpt")]) == 0
    assert calls == [(name, tmp_path / "ckpt" / name) for name in distillab.lab.pretrain.PRESETS]
    assert len(calls) == 3  # teacher, base, and signal-teacher (which continues the teacher beside it)


def test_an_unknown_signal_demo_family_is_one_line_and_runs_nothing(tmp_path):
    result = distillab("demo", "--signal", "--family", "carry", "--runs-dir", str(tmp_path / "runs"), cwd=tmp_path)
    assert_one_line_error(result, "--family 'carry'", "distribution, reasoning")
    assert not (tmp_path / "runs" / "signal").exists()
