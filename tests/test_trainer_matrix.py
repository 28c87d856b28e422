"""The trainer on every model family it claims, tiny random models built in-process (hidden 16, one layer, the lab
tokenizer's vocab): for each family x teacher (sparse top-k, dense = the full distribution, on-policy = a local
teacher's logits) x student path (logits, chunked):

- chunked equals unchunked: the loss step's value and every parameter's gradient;
- 4 micro-batches of 1 take the step 1 batch of 4 takes (through the Trainer, one SGD step);
- (slow) 2 processes (torchrun, gloo, CPU) take the step one process takes, every cell in one launch.

On-policy cells sample through `fake_sample`: completions fixed by their prompt (lengths 1, 2, 4, 6, each ending in
end-of-sequence and padded with pad after it), so the cells compare normalisation and plumbing, not sampling luck.
"""

from __future__ import annotations

import copy
import functools
from pathlib import Path

import pytest
import torch
import transformers as tf

from distillab import train
from distillab.batching import collate
from distillab.config import from_dict
from distillab.lab.tokenizer import build_tokenizer
from tests.helpers import TINY_DIMS, sgd_step

REPO = Path(__file__).resolve().parents[1]
TOK = build_tokenizer()
VOCAB = len(TOK)
COMPLETION_LENGTHS = (1, 2, 4, 6)  # unequal on purpose: a per-micro-batch or per-process mean would differ
K = 5

# family -> (config class, model class, what makes its logit path differ; None: the plain lm_head)
FAMILIES = {
    "llama": (tf.LlamaConfig, tf.LlamaForCausalLM, {}),
    "qwen2": (tf.Qwen2Config, tf.Qwen2ForCausalLM, {}),
    "gemma2": (tf.Gemma2Config, tf.Gemma2ForCausalLM, {"head_dim": 8, "final_logit_softcapping": 2.0}),
    "gemma3_text": (tf.Gemma3TextConfig, tf.Gemma3ForCausalLM, {"head_dim": 8, "final_logit_softcapping": 2.0}),
    "gemma3_multimodal": (None, tf.Gemma3ForConditionalGeneration, {}),  # nested text config, Gemma3Model body
    "cohere": (tf.CohereConfig, tf.CohereForCausalLM, {"logit_scale": 4.0}),
    "granite": (tf.GraniteConfig, tf.GraniteForCausalLM, {"logits_scaling": 0.25}),
    "phi3": (tf.Phi3Config, tf.Phi3ForCausalLM, {}),
    "gpt2": (
        tf.GPT2Config,
        tf.GPT2LMHeadModel,  # its body is .transformer, not .model
        {"resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0},
    ),  # no dropout: runs must compare exactly
}
TEACHERS = ("sparse", "dense", "on_policy")  # dataset top-5, dataset top-V (the whole distribution), local teacher
PATHS = ("logits", "chunked")


def _config(family: str):
    config_cls, _, extra = FAMILIES[family]
    common = dict(
        vocab_size=VOCAB,
        **TINY_DIMS,
        max_position_embeddings=128,
        bos_token_id=TOK.bos_token_id,
        eos_token_id=TOK.eos_token_id,
        pad_token_id=TOK.pad_token_id,
    )
    if family == "gemma3_multimodal":
        text = tf.Gemma3TextConfig(**common, head_dim=8, final_logit_softcapping=2.0)
        vision = tf.SiglipVisionConfig(
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            image_size=16,
            patch_size=8,
        )
        return tf.Gemma3Config(
            text_config=text.to_dict(),
            vision_config=vision.to_dict(),
            mm_tokens_per_image=4,
            image_token_index=VOCAB + 1,
            boi_token_index=VOCAB + 2,
            eoi_token_index=VOCAB + 3,
        )
    return config_cls(**common, **extra)


@functools.cache
def _model(family: str, seed: int):
    torch.manual_seed(seed)
    return FAMILIES[family][1](_config(family)).float().eval()


def student(family: str):
    return copy.deepcopy(_model(family, 0)).train()


def teacher(family: str):
    return _model(family, 1)


def rows(family: str, k: int | None) -> list[dict]:
    return copy.deepcopy(_rows(family, k))


@functools.cache
def _rows(family: str, k: int | None) -> list[dict]:
    """4 rows: prompts of 3-6 tokens, completions of 1, 2, 4, 6 ending in eos, and the teacher's top-k (k None:
    none; k = VOCAB: the whole distribution, stored without a tail as a producer that kept none would)."""
    gen = torch.Generator().manual_seed(7)
    out = []
    for i, n in enumerate(COMPLETION_LENGTHS):
        prompt = [TOK.bos_token_id] + torch.randint(4, VOCAB, (2 + i,), generator=gen).tolist()
        completion = torch.randint(4, VOCAB, (n - 1,), generator=gen).tolist() + [TOK.eos_token_id]
        row = {
            "prompt_ids": prompt,
            "completion_ids": completion,
            "top_ids": None,
            "top_logprobs": None,
            "top_tail": None,
        }
        if k:
            with torch.no_grad():
                logits = teacher(family)(input_ids=torch.tensor([prompt + completion])).logits[0]  # (T, V)
            lp = logits[len(prompt) - 1 : len(prompt) - 1 + n].log_softmax(-1)  # (n, V) predicting the completion
            top = lp.topk(k, dim=-1)
            row.update(top_ids=top.indices.tolist(), top_logprobs=top.values.tolist())
            if k < VOCAB:
                rest = lp.scatter(-1, top.indices, float("-inf")).logsumexp(-1)  # (n,) log mass outside the top-k
                row["top_tail"] = rest.tolist()
        out.append(row)
    return out


def fake_sample(model, prompts, prompt_mask, d):
    """The student's 'samples', fixed by the prompt: its length picks 1, 2, 4 or 6 tokens, eos last, pad after."""
    out = torch.full((prompts.shape[0], d.max_new_tokens), d.pad_id, dtype=torch.long)
    for b in range(prompts.shape[0]):
        prompt = prompts[b][prompt_mask[b].bool()].tolist()
        n = COMPLETION_LENGTHS[(len(prompt) - 3) % 4]
        ids = [4 + (sum(prompt) * 7 + 13 * j) % (VOCAB - 4) for j in range(n - 1)] + [d.eos_id]
        out[b, :n] = torch.tensor(ids)
    return out.to(prompts.device)


def cell_config(teacher_kind: str, path: str, batch_size: int = 4, grad_accum: int = 1):
    return from_dict(
        {
            "teacher": {"max_new_tokens": 7},
            "train": {
                "student": "in-process",
                "loss": "forward_kl",
                "kd_weight": 1.0,
                "sft_weight": 0.5,
                "on_policy_fraction": 1.0 if teacher_kind == "on_policy" else 0.0,
                "chunk_size": 3 if path == "chunked" else 0,
                "max_steps": 1,
                "per_device_batch_size": batch_size,
                "grad_accum": grad_accum,
                "warmup_ratio": 0.0,
                "save_steps": 10**9,
            },
        }
    )


def cell_rows(family: str, teacher_kind: str) -> list[dict]:
    return rows(family, {"sparse": K, "dense": VOCAB, "on_policy": None}[teacher_kind])


def one_sgd_step(family: str, teacher_kind: str, path: str, batch_size: int, grad_accum: int, out: Path):
    """Parameters after one SGD step (lr 1, no clipping) through build_trainer."""
    return sgd_step(
        cell_config(teacher_kind, path, batch_size, grad_accum),
        cell_rows(family, teacher_kind),
        student(family),
        TOK,
        out,
        teacher(family) if teacher_kind == "on_policy" else None,
    )


@pytest.fixture(autouse=True)
def _fixed_samples(monkeypatch):
    monkeypatch.setattr(train, "_sample", fake_sample)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Hidden-16 models gain nothing from threads, and on a shared 2-core box two threads are 5x slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _loss_and_grads(family: str, teacher_kind: str, path: str):
    model = student(family)
    cfg = cell_config(teacher_kind, path)
    d = train.DistillSettings(
        cfg, model, teacher(family) if teacher_kind == "on_policy" else None, TOK.pad_token_id, TOK.eos_token_id
    )
    batch = collate(cell_rows(family, teacher_kind), TOK.pad_token_id)
    if teacher_kind == "on_policy":
        batch = train.on_policy_batch(model, batch, d)
    terms = train.loss_step(d.head(model, model, batch, d), batch, d)
    terms.total.backward()
    return terms, {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("teacher_kind", TEACHERS)
@pytest.mark.parametrize("family", FAMILIES)
def test_chunked_equals_unchunked(family, teacher_kind):
    plain, plain_grads = _loss_and_grads(family, teacher_kind, "logits")
    chunked, chunked_grads = _loss_and_grads(family, teacher_kind, "chunked")
    assert plain.kd > 0 and (plain.ce > 0 if teacher_kind != "on_policy" else plain.ce == 0)  # no SFT on samples
    torch.testing.assert_close(chunked.ce, plain.ce, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(chunked.kd, plain.kd, rtol=1e-5, atol=1e-6)
    assert set(chunked_grads) == set(plain_grads)
    for name, grad in plain_grads.items():
        torch.testing.assert_close(chunked_grads[name], grad, rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("teacher_kind", TEACHERS)
@pytest.mark.parametrize("family", FAMILIES)
def test_four_micro_batches_take_the_step_of_one_batch(tmp_path, family, teacher_kind, path):
    whole = one_sgd_step(family, teacher_kind, path, 4, 1, tmp_path / "whole")
    accumulated = one_sgd_step(family, teacher_kind, path, 1, 4, tmp_path / "accumulated")
    start = dict(_model(family, 0).named_parameters())
    assert any(not torch.equal(start[name], whole[name]) for name in whole)
    for name in whole:
        torch.testing.assert_close(accumulated[name], whole[name], rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.parametrize("family", ["llama", "gemma2"])
def test_lora_chunked_equals_unchunked(family, monkeypatch):
    """Under a peft wrapper the decoder and lm_head are found through get_base_model()."""
    from peft import LoraConfig, get_peft_model

    results = {}
    for path in PATHS:
        base = student(family)
        torch.manual_seed(3)  # the same adapters on both paths
        model = get_peft_model(base, LoraConfig(r=2, target_modules="all-linear", task_type="CAUSAL_LM"))
        for p in model.parameters():  # LoRA's B starts at 0: move it so that every adapter gets a gradient
            if p.requires_grad:
                torch.nn.init.normal_(p, std=0.02)
        cfg = cell_config("sparse", path)
        d = train.DistillSettings(cfg, model, None, TOK.pad_token_id, TOK.eos_token_id)
        batch = collate(cell_rows(family, "sparse"), TOK.pad_token_id)
        terms = train.loss_step(d.head(model, model, batch, d), batch, d)
        terms.total.backward()
        results[path] = terms.total.detach(), {k: p.grad for k, p in model.named_parameters() if p.requires_grad}
    (plain, plain_grads), (chunked, chunked_grads) = results["logits"], results["chunked"]
    torch.testing.assert_close(chunked, plain, rtol=1e-5, atol=1e-6)
    assert plain_grads and set(chunked_grads) == set(plain_grads)
    for name, grad in plain_grads.items():
        assert grad is not None and chunked_grads[name] is not None, name
        torch.testing.assert_close(chunked_grads[name], grad, rtol=1e-4, atol=1e-6, msg=name)
