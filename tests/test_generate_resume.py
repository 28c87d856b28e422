"""kill -9 the generate stage at random moments and resume: nothing lost, nothing asked twice."""

from __future__ import annotations

import pytest
from benchmarks.bench_kill_resume import kill_and_resume

from distillab.cache import request_key
from distillab.dataset import read_dataset
from distillab.teachers import make_teacher
from distillab.testing import metric_sum, server_process
from distillab.testing import read_metrics as metrics
from tests.serve_fixture import generate_config


@pytest.mark.slow
@pytest.mark.parametrize("chunk_rows", [2048, 7], ids=["one-shard", "many-shards"])
def test_kill_nine_and_resume_answers_every_prompt_exactly_once(tmp_path, tiny_teacher, chunk_rows, monkeypatch):
    from distillab import generate

    monkeypatch.setattr(generate, "CHUNK_ROWS", chunk_rows)  # the forked children inherit it
    with server_process(tiny_teacher, "--max-batch", "8") as base_url:
        teacher = {"model": "teacher", "base_url": base_url, "concurrency": 4, "max_new_tokens": 4, "top_k_logprobs": 3}
        cfg = generate_config(tmp_path, teacher, student=tiny_teacher, n_prompts=60)
        outcome = kill_and_resume(cfg, kills=5, seed=1)
        served = metrics(base_url)

    assert len(outcome["kills"]) == 5
    assert any(after > before for before, after in outcome["kills"])  # killed mid-run, with progress made
    rows = read_dataset(cfg.run_dir / "data" / "train.parquet")
    teacher_ = make_teacher(cfg.teacher)
    from distillab.prompts import load_prompts

    keys = [request_key(teacher_.request(p["prompt"])) for p in load_prompts(cfg)]
    assert [r["request_hash"] for r in rows] == keys  # every prompt has its row, in order, once
    # the server's model answered each distinct request exactly once; re-sent ones were replayed
    assert served["distillab_answers_total"] == len(set(keys))
    ok = metric_sum({k: v for k, v in served.items() if 'code="200"' in k}, "distillab_requests_total")
    assert ok == served["distillab_answers_total"] + served["distillab_idempotent_replays_total"]
