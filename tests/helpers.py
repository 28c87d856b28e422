"""Helpers the tests share (fixtures live in conftest.py): tiny models and a tiny run config."""

from __future__ import annotations

import torch

from distillab.config import from_dict


def save_tiny_llama(path, hidden: int = 32, layers: int = 2, seed: int = 0, vocab_pad: int = 0, tok=None):
    """A random Llama with the lab tokenizer (or `tok`) saved at path."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from distillab.lab.tokenizer import build_tokenizer

    tok = tok or build_tokenizer()
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=len(tok) + vocab_pad, hidden_size=hidden, intermediate_size=hidden * 2,
                         num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=4,
                         max_position_embeddings=256, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                         pad_token_id=tok.pad_token_id, tie_word_embeddings=True)
    LlamaForCausalLM(config).save_pretrained(str(path), safe_serialization=True)
    tok.save_pretrained(str(path))
    return path


def tiny_config(tmp_path, teacher, student, **train):
    return from_dict({
        "name": "tiny", "runs_dir": str(tmp_path / "runs"),
        "teacher": {"model": str(teacher), "max_new_tokens": 6, "top_k_logprobs": 5, "batch_size": 8},
        "data": {"skills": ["add"], "n_prompts": 12},
        "train": {"student": str(student), "max_steps": 3, "batch_size": 4, "sft_weight": 1.0, "save_steps": 2,
                  "lr": 1e-2, **train},
        "eval": {"n_per_skill": 4, "general": ["upper"], "bootstrap": 20},
    })
