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
