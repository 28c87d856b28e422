"""A local teacher's cache keys follow its content, not where it is installed.

A moved checkout, a reinstall or a second machine with the same weights must answer every cached request
from teacher.sqlite; different weights at the same path must not.
"""

from __future__ import annotations

import shutil

import pytest

from distillab.generate import run_generate
from distillab.teachers import local_hf
from tests.helpers import save_tiny_llama, tiny_config


def _config(root, teacher):
    # the student is the teacher: the same tokenizer, and one more path that moves
    return tiny_config(
        root, teacher, teacher, name="keys", teacher={"max_new_tokens": 3, "top_k_logprobs": 2}, data={"n_prompts": 5}
    )


@pytest.fixture
def counted(monkeypatch):
    """Counts the requests the local teacher is actually asked (not what generate says it sent)."""
    asked = []
    answer = local_hf.LocalHFTeacher.answer

    def counting(self, requests, on_done):
        asked.extend(requests)
        return answer(self, requests, on_done)

    monkeypatch.setattr(local_hf.LocalHFTeacher, "answer", counting)
    return asked


def test_moved_model_and_run_reuse_every_cached_answer(tmp_path, tiny_teacher, counted):
    first = tmp_path / "checkout-a"
    shutil.copytree(tiny_teacher, first / "models" / "teacher")
    s1 = run_generate(_config(first, first / "models" / "teacher"), log=lambda *a: None)
    assert s1.rows == 5 and s1.requests_sent == 5 and len(counted) == 5

    moved = tmp_path / "elsewhere" / "checkout-b"  # another depth too: nothing positional in the key
    shutil.copytree(first, moved)
    shutil.rmtree(first)  # the old location is gone, as after a move
    s2 = run_generate(_config(moved, moved / "models" / "teacher"), log=lambda *a: None)
    assert len(counted) == 5, "a moved teacher was asked again"
    assert s2.requests_sent == 0 and s2.cached == 5 and s2.rows == 5


def test_different_weights_at_the_same_path_are_asked_again(tmp_path, counted):
    root = tmp_path / "lab"
    teacher = save_tiny_llama(root / "models" / "teacher", hidden=16, layers=1, seed=3)
    run_generate(_config(root, teacher), log=lambda *a: None)
    assert len(counted) == 5
    shutil.rmtree(teacher)
    save_tiny_llama(teacher, hidden=16, layers=1, seed=4)  # same shapes, same path, other weights
    run_generate(_config(root, teacher), log=lambda *a: None)
    assert len(counted) == 10


def test_digest_reads_every_byte_of_the_weights_and_ignores_notes(tmp_path, tiny_teacher):
    model = shutil.copytree(tiny_teacher, tmp_path / "m")
    before = local_hf.model_digest(model)
    (model / "README.md").write_text("a model card distillab rewrites: not part of the model\n")
    assert local_hf.model_digest(model) == before
    weights = next(model.glob("*.safetensors"))
    data = bytearray(weights.read_bytes())
    data[len(data) * 3 // 4] ^= 1  # one bit, deep inside the tensors (past any header-only hash)
    weights.write_bytes(bytes(data))
    edited = local_hf.model_digest(model)
    assert edited != before
    tokenizer = (model / "tokenizer.json").read_text()
    (model / "tokenizer.json").write_text(tokenizer.replace('"<pad>"', '"<PAD>"', 1))
    assert (model / "tokenizer.json").read_text() != tokenizer
    assert local_hf.model_digest(model) != edited  # the tokenizer decides the answers too


def test_request_names_the_model_not_its_path(tmp_path, tiny_teacher):
    teacher = local_hf.LocalHFTeacher(_config(tmp_path, tiny_teacher).teacher)
    request = teacher.request("1+1=")
    assert str(tmp_path) not in str(request) and str(tiny_teacher.parent) not in str(request)
    assert request["model"] == "teacher" and request["endpoint"].startswith("local:teacher@")
