"""Shared fixtures: tiny random HF Llama models with the lab tokenizer, saved as ordinary model directories."""

from __future__ import annotations

import os

import pytest
import torch

from tests.helpers import save_tiny_llama

os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.fixture(scope="session")
def tiny_teacher(tmp_path_factory):
    return save_tiny_llama(tmp_path_factory.mktemp("models") / "teacher", hidden=32, layers=2, seed=1)


@pytest.fixture(scope="session")
def tiny_student(tmp_path_factory):
    return save_tiny_llama(tmp_path_factory.mktemp("models") / "student", hidden=16, layers=1, seed=2)
