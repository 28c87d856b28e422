"""Every stage on tiny random models, in-process: outputs exist, reruns do no work, the student changed."""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import load_file

from distillab.dataset import read_dataset
from distillab.evaluate import run_evaluate
from distillab.generate import run_generate
from distillab.train import run_train
from tests.helpers import tiny_config


def test_generate_writes_dataset_and_rerun_sends_nothing(tmp_path, tiny_teacher, tiny_student):
    cfg = tiny_config(tmp_path, tiny_teacher, tiny_student)
    first = run_generate(cfg, log=lambda *_: None)
    assert first.requests_sent == 12 and first.rows == 12 and not first.skipped
    rows = read_dataset(cfg.run_dir / "data" / "train.parquet")
    assert len(rows) == 12
    row = rows[0]
    assert row["source"] == "teacher" and row["teacher_id"] == str(tiny_teacher) and len(row["request_hash"]) == 64
    assert len(row["top_ids"]) == len(row["top_logprobs"]) >= 1 and len(row["top_ids"][0]) == 5
    assert row["completion_ids"][: len(row["top_ids"])] and row["prompt_ids"][0] == 1  # starts with <bos>
    # k distinct ids per position; log-probabilities whose mass plus the stored tail mass is one
    for ids, lps, tail in zip(row["top_ids"], row["top_logprobs"], row["top_tail"]):
        assert len(set(ids)) == 5 and max(lps) <= 0
        assert sum(math.exp(x) for x in lps) + math.exp(tail) == pytest.approx(1.0, abs=0.05)
    second = run_generate(cfg, log=lambda *_: None)
    assert second.skipped and second.requests_sent == 0
    # a changed sampling parameter is a new request: the cache does not answer it
    cfg.teacher.max_new_tokens = 5
    third = run_generate(cfg, log=lambda *_: None)
    assert third.requests_sent == 12


def test_train_changes_parameters_and_rerun_is_a_no_op(tmp_path, tiny_teacher, tiny_student):
    cfg = tiny_config(tmp_path, tiny_teacher, tiny_student)
    run_generate(cfg, log=lambda *_: None)
    summary = run_train(cfg, log=lambda *_: None)
    assert summary["steps"] == 3
    before = load_file(str(tiny_student / "model.safetensors"))
    after = load_file(str(cfg.run_dir / "student" / "model.safetensors"))
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert len(changed) == len(before)  # every tensor moved
    assert (cfg.run_dir / "student" / "README.md").is_file()
    again = run_train(cfg, log=lambda *_: None)
    assert again.get("skipped")


@pytest.mark.parametrize("loss", ["reverse_kl", "jsd", "tvd"])
def test_train_other_losses_and_chunked(tmp_path, tiny_teacher, tiny_student, loss):
    cfg = tiny_config(tmp_path, tiny_teacher, tiny_student, loss=loss, chunk_size=7, max_steps=2)
    run_generate(cfg, log=lambda *_: None)
    assert run_train(cfg, log=lambda *_: None)["steps"] == 2


def test_on_policy_and_lora(tmp_path, tiny_teacher, tiny_student):
    cfg = tiny_config(tmp_path, tiny_teacher, tiny_student, on_policy_fraction=1.0, lora=True, max_steps=2)
    run_generate(cfg, log=lambda *_: None)
    run_train(cfg, log=lambda *_: None)
    before = load_file(str(tiny_student / "model.safetensors"))
    after = load_file(str(cfg.run_dir / "student" / "model.safetensors"))
    assert set(before) == set(after)  # LoRA merged back into a plain model
    assert any(not torch.equal(before[k], after[k]) for k in before)
    # ... and the adapter itself, beside it: base + adapter gives the merged student's logits
    from peft import PeftModel

    from distillab.models import load_model

    merged = load_model(cfg.run_dir / "student")
    adapted = PeftModel.from_pretrained(load_model(tiny_student), str(cfg.run_dir / "student" / "adapter"))
    ids = torch.tensor([[1, 7, 12, 30, 5, 9]])
    with torch.no_grad():
        assert torch.allclose(adapted(ids).logits, merged(ids).logits, atol=1e-4)


def test_evaluate_writes_every_model_and_reruns_are_cached(tmp_path, tiny_teacher, tiny_student):
    cfg = tiny_config(tmp_path, tiny_teacher, tiny_student)
    run_generate(cfg, log=lambda *_: None)
    run_train(cfg, log=lambda *_: None)
    seen = []
    results = run_evaluate(cfg, log=seen.append)
    assert set(results) == {"teacher", "base", "distilled"} and len(seen) == 3
    res = json.loads((cfg.run_dir / "eval" / "distilled.json").read_text())
    assert set(res["skills"]) == {"add", "upper"} and 0 <= res["task"]["score"] <= 1
    assert res["world_text_perplexity"] > 1
    seen.clear()
    run_evaluate(cfg, log=seen.append)
    assert seen == []  # nothing re-evaluated
    # a chat template added to the student changes how it is asked: it alone is scored again
    config = cfg.run_dir / "student" / "tokenizer_config.json"
    config.write_text(json.dumps(json.loads(config.read_text()) | {"chat_template": "{{ messages[0]['content'] }}"}))
    run_evaluate(cfg, log=seen.append)
    assert len(seen) == 1 and "distilled" in seen[0]


def test_user_task_suite_is_scored_as_the_task(tmp_path, tiny_teacher, tiny_student):
    suite = tmp_path / "suite.jsonl"
    suite.write_text(
        '{"prompt": "1+1=\\n", "answer": "2", "skill": "sums"}\n'
        '{"prompt": "pick\\n", "choices": ["a", "b"], "answer": 0, "skill": "choice"}\n'
    )
    cfg = tiny_config(tmp_path, tiny_teacher, tiny_student)
    cfg.eval.task_file = str(suite)
    run_generate(cfg, log=lambda *_: None)
    run_train(cfg, log=lambda *_: None)
    res = run_evaluate(cfg, log=lambda *_: None)["distilled"]
    assert {"sums", "choice", "add", "upper"} == set(res.skills)
    task_skills = ["add", "sums", "choice"]  # the lab task skill plus the file's two
    want = sum(res.skills[s].score for s in task_skills) / 3
    assert res.task.score == pytest.approx(want)


@pytest.mark.parametrize("declared", [None, "gpt-x"])
def test_brought_dataset_is_tagged_with_the_declared_source(tmp_path, tiny_teacher, tiny_student, declared):
    prompts = tmp_path / "brought.jsonl"
    prompts.write_text('{"prompt": "1+1=\\n", "answer": "2"}\n{"prompt": "2+2=\\n", "answer": "4"}\n')
    cfg = tiny_config(tmp_path, tiny_teacher, tiny_student)
    cfg.data.prompts_file, cfg.data.source, cfg.data.declared_teacher = str(prompts), "human", declared
    run_generate(cfg, log=lambda *_: None)
    rows = read_dataset(cfg.run_dir / "data" / "train.parquet")
    assert [r["completion"] for r in rows] == ["2", "4"]
    for r in rows:
        assert (r["source"], r["teacher_id"]) == (("teacher", "gpt-x") if declared else ("human", None))
        assert r["request_hash"] is None and r["created_at"]
