"""Helpers the tests share (fixtures live in conftest.py): JSONL files, run configs, tiny models, dataset rows and
fake run records."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from distillab.config import RunConfig, from_dict

# ----------------------------------------------------------------------------------------------------
# Files

# The smallest transformer shape the multi-family tests (logit transforms, the trainer matrix) build every family at.
TINY_DIMS = dict(
    hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1
)


def write_jsonl(path: Path, records) -> Path:
    """One JSON object a line; a str record is written as the line itself (for malformed lines)."""
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return path


# ----------------------------------------------------------------------------------------------------
# Run configs


def run_config(tmp_path: Path, name: str = "run", **sections) -> RunConfig:
    """The run `name` under tmp_path/runs; `sections` are the config's tables (teacher={...}, ...)."""
    return from_dict({"name": name, "runs_dir": str(tmp_path / "runs"), **sections})


def tiny_config(
    tmp_path: Path,
    teacher_model,
    student_model,
    *,
    name: str = "tiny",
    teacher: dict | None = None,
    data: dict | None = None,
    eval: dict | None = None,
    retain: dict | None = None,
    **train,
) -> RunConfig:
    """A whole run on tiny local models, a few seconds a stage. `teacher`, `data`, `eval` and `retain` update those
    tables (teacher={"max_new_tokens": 3} keeps the other teacher settings); the other keywords are train settings."""
    tables = {
        "teacher": {"model": str(teacher_model), "max_new_tokens": 6, "top_k_logprobs": 5, "batch_size": 8},
        "data": {"skills": ["add"], "n_prompts": 12},
        "train": {
            "student": str(student_model),
            "max_steps": 3,
            "per_device_batch_size": 4,
            "sft_weight": 1.0,
            "save_steps": 2,
            "lr": 1e-2,
        },
        "eval": {"n_per_skill": 4, "general": ["upper"], "bootstrap": 20},
    }
    updates = {"teacher": teacher, "data": data, "train": train, "eval": eval, "retain": retain}
    for section, settings in updates.items():
        if settings:
            tables[section] = tables.get(section, {}) | settings
    return run_config(tmp_path, name, **tables)


def generate_config(
    tmp_path: Path, teacher: dict, student="lab:base", name: str = "run", skills=("reverse",), n_prompts: int = 16
) -> RunConfig:
    """A run whose generate stage asks `teacher` (a dict of teacher.* settings: a real `distillab serve` on
    127.0.0.1 through distillab.testing, or a local model)."""
    return run_config(
        tmp_path,
        name,
        teacher={"max_new_tokens": 8, "top_k_logprobs": 5, **teacher},
        data={"skills": list(skills), "n_prompts": n_prompts},
        train={"student": str(student)},
    )


def write_config(tmp_path: Path, body: str = "", top: str = "", name: str = "run") -> Path:
    """The run config file tmp_path/run.toml, as a user writes it: `top` holds top-level keys (runs_dir defaults
    to tmp_path/runs), `body` whole [sections]."""
    path = tmp_path / "run.toml"
    runs = "" if "runs_dir" in top else f'runs_dir = "{tmp_path / "runs"}"\n'
    path.write_text(f'name = "{name}"\n{runs}{top}\n{body}\n')
    return path


# ----------------------------------------------------------------------------------------------------
# Tiny models


def tiny_llama(vocab_size: int, hidden: int = 32, layers: int = 2, seed: int = 0, **config):
    """A random LlamaForCausalLM (4 heads, 256 positions); `config`: more LlamaConfig settings."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    return LlamaForCausalLM(
        LlamaConfig(
            vocab_size=vocab_size,
            hidden_size=hidden,
            intermediate_size=hidden * 2,
            num_hidden_layers=layers,
            num_attention_heads=4,
            num_key_value_heads=4,
            max_position_embeddings=256,
            **config,
        )
    )


def save_tiny_llama(path, hidden: int = 32, layers: int = 2, seed: int = 0, vocab_pad: int = 0, tok=None):
    """A random Llama with the lab tokenizer (or `tok`) saved at path, as an ordinary model directory."""
    from distillab.lab.tokenizer import build_tokenizer

    tok = tok or build_tokenizer()
    model = tiny_llama(
        len(tok) + vocab_pad,
        hidden,
        layers,
        seed,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        tie_word_embeddings=True,
    )
    model.save_pretrained(str(path), safe_serialization=True)
    tok.save_pretrained(str(path))
    return path


def sgd_step(cfg: RunConfig, rows, model, tok, out: Path, teacher=None) -> dict[str, torch.Tensor]:
    """The model's parameters after one step of plain SGD (lr 1, constant; no clipping: it would hide a wrong
    gradient scale) through train.build_trainer: what equivalence tests of a training step compare."""
    from distillab.train import build_trainer

    sgd = torch.optim.SGD(model.parameters(), lr=1.0)
    trainer = build_trainer(
        cfg, rows, model, tok, out, teacher, optimizers=(sgd, torch.optim.lr_scheduler.LambdaLR(sgd, lambda _: 1.0))
    )
    trainer.args.max_grad_norm = 0.0
    trainer.train()
    return {k: v.detach().clone() for k, v in model.named_parameters()}


# ----------------------------------------------------------------------------------------------------
# Dataset rows

SYNTHETIC_VOCAB, SYNTHETIC_K = 97, 5


def synthetic_rows(n: int, seed: int = 0, completion=(3, 12), with_topk=True, vocab=SYNTHETIC_VOCAB) -> list[dict]:
    """Rows as generate writes them (the top-k through the codec, k = SYNTHETIC_K); every seventh without top-k,
    as a replay of answers has."""
    from distillab.topk_codec import encode_topk

    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        length = int(rng.integers(*completion))
        row = {
            "prompt": f"p{i}",
            "completion": "c",
            "source": "teacher",
            "prompt_ids": rng.integers(4, vocab, int(rng.integers(1, 6))).tolist(),
            "completion_ids": rng.integers(4, vocab, length).tolist(),
        }
        if with_topk and i % 7:
            ids = np.stack([rng.choice(vocab, SYNTHETIC_K, replace=False) for _ in range(length)])  # (T, k)
            logits = rng.normal(0, 2, (length, SYNTHETIC_K + 1))
            logprobs = logits - np.logaddexp.reduce(logits, axis=1, keepdims=True)
            row["topk"] = encode_topk(ids, logprobs[:, :SYNTHETIC_K], tail_logprob=logprobs[:, SYNTHETIC_K])
        rows.append(row)
    return rows


def provenance_dataset(path: Path, rows) -> Path:
    """A dataset file with provenance columns. rows: (source, teacher_id, completion length); prompts are 5
    tokens each."""
    from distillab.provenance import PROVENANCE_COLUMNS, provenance_row

    prov = [provenance_row(s, teacher_id=t) if s == "teacher" else provenance_row(s) for s, t, _ in rows]
    table = pa.table(
        {
            "prompt": ["p"] * len(rows),
            "completion": ["c"] * len(rows),
            "prompt_ids": pa.array([[1] * 5 for _ in rows], type=pa.list_(pa.int32())),
            "completion_ids": pa.array([[7] * n for *_, n in rows], type=pa.list_(pa.int32())),
        }
    )
    for name in PROVENANCE_COLUMNS:
        table = table.append_column(name, pa.array([p[name] for p in prov], type=pa.string()))
    pq.write_table(table, path)
    return path


# ----------------------------------------------------------------------------------------------------
# Fake run records: what the report and the ledger read, without running anything

FAKE_SKILLS = {"add": True, "reverse": False, "upper": False, "recall": False}  # name -> in the task suite


def fake_eval(label: str, rates: dict[str, float], seed: int) -> dict:
    """An eval file's content: 50 scores a skill drawn at `rates`."""
    from distillab.scoring import bootstrap_ci

    rng = random.Random(seed)
    per_skill = {s: [float(rng.random() < p) for _ in range(50)] for s, p in rates.items()}
    task = {s: v for s, v in per_skill.items() if FAKE_SKILLS[s]}
    general = {s: v for s, v in per_skill.items() if not FAKE_SKILLS[s]}

    def suite(d):
        return {"score": sum(sum(v) / len(v) for v in d.values()) / len(d), "ci": bootstrap_ci(d, 200)}

    return {
        "model": label,
        "label": label,
        "parameters": 1_100_000,
        "skills": {
            s: {"score": sum(v) / len(v), "n": len(v), "ci": bootstrap_ci({s: v}, 200), "scores": v}
            for s, v in per_skill.items()
        },
        "task": suite(task),
        "general": suite(general),
        "world_text_perplexity": 3.2,
        "eval_seconds": 1.0,
    }


def fake_evals() -> dict[str, dict]:
    return {
        "teacher": fake_eval("teacher", {"add": 0.9, "reverse": 0.95, "upper": 0.9, "recall": 0.8}, 1),
        "base": fake_eval("base", {"add": 0.1, "reverse": 0.7, "upper": 0.8, "recall": 0.3}, 2),
        "distilled": fake_eval("distilled", {"add": 0.8, "reverse": 0.5, "upper": 0.75, "recall": 0.1}, 3),
        "zero_distill": fake_eval("zero_distill", {"add": 0.6, "reverse": 0.6, "upper": 0.7, "recall": 0.2}, 4),
    }


def fake_ledger() -> dict:
    return {
        "format": "distillab-ledger/1",
        "run": "demo",
        "created_at": "2026-01-01T00:00:00Z",
        "teacher_generation": {
            "model": "lab:teacher",
            "data_source": "teacher",
            "price_status": "local",
            "prompt_tokens": 9000,
            "completion_tokens": 3000,
            "rows": 1000,
            "usd": 0.0,
            "pricing": {"description": "lab:teacher: local teacher, no API cost"},
        },
        "training": {
            "flops": 1.3e14,
            "train_seconds": 300.0,
            "steps": 200,
            "usd_per_hour": 0.1,
            "usd": 300 / 3600 * 0.1,
        },
        "serving": {
            "student_tokens_per_s": 1500.0,
            "usd_per_hour": 0.1,
            "student_usd_per_1m_tokens": 0.0185,
            "teacher_api_usd_per_1m_output": 0.6,
            "teacher_api_usd_per_1m_input": 0.15,
            "teacher_price_basis": "notional",
            "teacher_price_description": "notional: priced like a small API",
        },
        "break_even": {
            "price_basis": "notional",
            "status": "pays_off",
            "queries": 41_234,
            "months": 0.04123,
            "queries_per_month": 1_000_000,
            "one_off_usd": 0.01,
            "training_usd": 0.0083,
            "api_usd_per_query": 3.15e-6,
            "student_usd_per_query": 5.6e-8,
        },
        "quality": {},
        "total_usd": 0.0083,
        "notes": ["break-even uses a NOTIONAL teacher API price: notional: priced like a small API"],
    }
