"""Shared fixtures: tiny random HF Llama models with the lab tokenizer, saved as ordinary model directories."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch.set_num_threads(min(2, torch.get_num_threads()))


def save_tiny_llama(path, hidden: int = 32, layers: int = 2, seed: int = 0, vocab_pad: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    from distillab.lab.tokenizer import build_tokenizer

    tok = build_tokenizer()
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=len(tok) + vocab_pad, hidden_size=hidden, intermediate_size=hidden * 2,
                         num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=4,
                         max_position_embeddings=256, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                         pad_token_id=tok.pad_token_id, tie_word_embeddings=True)
    LlamaForCausalLM(config).save_pretrained(str(path), safe_serialization=True)
    tok.save_pretrained(str(path))
    return path


@pytest.fixture(scope="session")
def tiny_teacher(tmp_path_factory):
    return save_tiny_llama(tmp_path_factory.mktemp("models") / "teacher", hidden=32, layers=2, seed=1)


@pytest.fixture(scope="session")
def tiny_student(tmp_path_factory):
    return save_tiny_llama(tmp_path_factory.mktemp("models") / "student", hidden=16, layers=1, seed=2)
