"""Shards of a multi-machine generate: every prompt in exactly one shard, bad --shard specs one line."""

from __future__ import annotations

import pytest

from distillab.cache import request_key
from distillab.errors import UserError
from distillab.shards import in_shard, parse_shard


def test_shard_assignment_is_a_partition_and_bad_specs_are_one_line():
    prompts = [f"prompt {i}" for i in range(300)]
    owners = [[i for i in range(3) if in_shard(p, (i, 3))] for p in prompts]
    assert all(len(o) == 1 for o in owners)
    assert 60 < sum(o == [0] for o in owners) < 140
    assert parse_shard("2/3") == (2, 3) and parse_shard(None) == (0, 1)
    for bad in ("3/3", "x", "1/0", "-1/2"):
        with pytest.raises(UserError, match="--shard"):
            parse_shard(bad)
    assert request_key({"a": 1}) == request_key({"a": 1})


# ----------------------------------------------------------------------------------------------------
# Runs of one dataset side by side or one after another: nothing asked twice (serve's own request count), no
# row removed.


@pytest.fixture(scope="module")
def served(tiny_teacher):
    from distillab.testing import server_thread

    with server_thread(tiny_teacher, model_name="teacher") as server:
        yield server.base_url


def _requests(base_url: str) -> float:
    """Every request the server was sent (replays of an idempotency key included: an API bills those too)."""
    from distillab.testing import metric_sum, read_metrics

    return metric_sum(read_metrics(base_url), "distillab_requests_total")


def _config(tmp_path, base_url, tiny_teacher, n_prompts: int):
    from tests.helpers import generate_config

    teacher = {"model": "teacher", "base_url": base_url, "max_new_tokens": 4, "top_k_logprobs": 3}
    return generate_config(tmp_path, teacher, student=tiny_teacher, n_prompts=n_prompts)


def _keyed(path) -> dict:
    from distillab.dataset import read_dataset

    return {row["request_hash"]: row["completion_ids"] for row in read_dataset(path)}


def test_shards_after_a_whole_run_ask_nothing_and_keep_its_rows(tmp_path, tiny_teacher, served):
    from distillab.files import file_digest
    from distillab.generate import run_generate

    quiet = {"log": lambda *a: None}
    cfg = _config(tmp_path, served, tiny_teacher, n_prompts=8)
    merged = cfg.run_dir / "data" / "train.parquet"
    start = _requests(served)
    assert run_generate(cfg, **quiet).rows == 8
    assert _requests(served) - start == 8
    whole, digest = _keyed(merged), file_digest(merged)

    for i in range(2):  # the whole run's file holds every shard's rows: nothing asked, nothing written
        record = run_generate(cfg, shard=(i, 2), **quiet)
        assert record.requests_sent == 0 and record.rows == 8
    assert _requests(served) - start == 8
    assert file_digest(merged) == digest and not (cfg.run_dir / "data" / "train").exists()

    more = _config(tmp_path, served, tiny_teacher, n_prompts=10)  # two prompts added
    with pytest.raises(UserError, match="train.parquet holds the rows of a whole run"):
        run_generate(more, shard=(0, 2), **quiet)
    assert _requests(served) - start == 8 and file_digest(merged) == digest

    # Moved away as told: the two shards ask only for the two new prompts (the whole run's cache is read).
    merged.rename(tmp_path / "whole.parquet")
    sent = sum(run_generate(more, shard=(i, 2), **quiet).requests_sent for i in range(2))
    assert sent == 2 and _requests(served) - start == 10
    sharded = _keyed(merged)  # read from data/train/: every shard's parts
    assert len(sharded) == 10 and {k: sharded[k] for k in whole} == whole

    # Another split is refused while these parts are there; moved away, a whole run reads the shards' caches.
    with pytest.raises(UserError, match="2-way split"):
        run_generate(more, **quiet)
    (cfg.run_dir / "data" / "train").rename(tmp_path / "parts")
    assert run_generate(more, **quiet).requests_sent == 0
    assert _requests(served) - start == 10 and _keyed(merged) == sharded


@pytest.mark.parametrize("running", [(0, 1), (1, 2)], ids=["whole-running", "shard-running"])
def test_one_split_at_a_time(tmp_path, tiny_teacher, served, running):
    """A whole run beside a shard run (or two splits) would both pay for the same prompts: the second is refused in
    one line naming the first's pid, before it asks anything."""
    import os

    from distillab.files import hold
    from distillab.generate import run_generate
    from distillab.rundir import RunDir

    cfg = _config(tmp_path, served, tiny_teacher, n_prompts=4)
    start = _requests(served)
    other = (0, 2) if running == (0, 1) else (0, 1)
    with hold(RunDir(cfg.run_dir).stage_lock("generate:train", running), lambda pid: "busy"):
        with pytest.raises(UserError, match=f"running in .* \\(pid {os.getpid()}\\)"):
            run_generate(cfg, shard=other, log=lambda *a: None)
    assert _requests(served) == start
    assert not (cfg.run_dir / "data" / "train.parquet").exists() and not (cfg.run_dir / "data" / "train").exists()


def test_corrupt_summaries_are_rebuilt_without_asking_or_rewriting_the_rows(tmp_path, tiny_teacher, served):
    """generate_summary.json and decontamination.json are distillab's own records: a corrupt one is set aside and
    written again from the cache, nothing asked, and data/train.parquet (what training fingerprints) kept as it is.
    A shard's corrupt summary is set aside too, and left out of the sum until that shard reruns."""
    import json

    from distillab.files import file_digest
    from distillab.generate import run_generate

    said = []
    cfg = _config(tmp_path, served, tiny_teacher, n_prompts=6)
    run_generate(cfg, log=said.append)
    data = cfg.run_dir / "data"
    summary, digest = json.loads((data / "generate_summary.json").read_text()), file_digest(data / "train.parquet")
    start = _requests(served)
    for name in ("generate_summary.json", "decontamination.json"):
        (data / name).write_text('{"rows": ')
    record = run_generate(cfg, log=said.append)
    assert record.rows == 6 and record.requests_sent == 0 and _requests(served) == start
    assert file_digest(data / "train.parquet") == digest  # not rewritten: training would start over
    rebuilt = json.loads((data / "generate_summary.json").read_text())
    assert {k: rebuilt[k] for k in ("rows", "prompt_tokens", "completion_tokens")} == {
        k: summary[k] for k in ("rows", "prompt_tokens", "completion_tokens")
    }
    assert json.loads((data / "decontamination.json").read_text())["checked"] == 6
    assert (data / "generate_summary.json.corrupt").read_text() == '{"rows": '  # kept for a look
    assert sum("was corrupt: set aside" in line for line in said) == 2

    shards = _config(tmp_path / "shards", served, tiny_teacher, n_prompts=6)
    rows = [run_generate(shards, shard=(i, 2), log=said.append).rows for i in range(2)]
    other = shards.run_dir / "data" / "train" / "summary-00001-of-00002.json"
    other.write_bytes(b"\xff\xfe")
    said.clear()
    run_generate(shards, shard=(0, 2), log=said.append)
    combined = json.loads((shards.run_dir / "data" / "generate_summary.json").read_text())
    assert combined["rows"] == rows[0] and combined["shards"] == {"00000-of-00002": rows[0]}
    assert any(str(other) in line and "left out" in line for line in said)
    run_generate(shards, shard=(1, 2), log=said.append)  # that shard's rerun writes it again
    assert json.loads((shards.run_dir / "data" / "generate_summary.json").read_text())["rows"] == 6
