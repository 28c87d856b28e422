"""Rows -> batches (batching.py): length-grouped batches (deterministic, less padding, the replay share kept) and
packing (short examples in one row; per-example losses equal the unpacked ones; refused where examples would see
each other; one step with packing or grouping equals the plain step)."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from distillab import train
from distillab.batching import DistillDataset, ListRows, collate, group_by_length
from distillab.config import ConfigError, from_dict
from distillab.errors import UserError
from tests.helpers import SYNTHETIC_VOCAB as VOCAB
from tests.helpers import save_tiny_llama, sgd_step, synthetic_rows, tiny_llama

# ----------------------------------------------------------------------------------------------------
# Length-grouped batches


def _padding(order, lengths, batch_size) -> int:
    batches = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    return sum(len(b) * max(lengths[b]) - lengths[b].sum() for b in batches)


def test_grouping_by_length_is_deterministic_and_cuts_padding():
    rng = np.random.default_rng(0)
    lengths = np.where(rng.random(5_000) < 0.2, rng.integers(200, 257, 5_000), rng.integers(8, 49, 5_000))
    groups = np.zeros(5_000, np.int8)
    order = rng.permutation(5_000)
    grouped = group_by_length(order, lengths, groups, 16, np.random.default_rng(1))
    assert sorted(grouped.tolist()) == list(range(5_000))  # every row once
    again = group_by_length(order, lengths, groups, 16, np.random.default_rng(1))
    assert grouped.tolist() == again.tolist()
    other = group_by_length(order, lengths, groups, 16, np.random.default_rng(2))
    assert grouped.tolist() != other.tolist()
    assert _padding(grouped, lengths, 16) < 0.1 * _padding(order, lengths, 16)


def test_grouping_keeps_each_batchs_replay_count():
    from distillab.retain import batch_layout

    layout = batch_layout(n_task=300, n_replay=50, batch_size=8, fraction=0.25, n_batches=100, seed=0)
    rng = np.random.default_rng(0)
    data = DistillDataset(
        ListRows([{"prompt_ids": [1], "completion_ids": [2] * int(n)} for n in rng.integers(1, 60, 300)]),
        10,
        replay=[{"prompt_ids": [1], "completion_ids": [3] * int(n)} for n in rng.integers(1, 60, 50)],
        layout=layout,
    )
    grouped = group_by_length(np.arange(len(data)), data.lengths(), data.group, 8, np.random.default_rng(0))
    assert sorted(grouped.tolist()) == list(range(len(data)))
    for b in range(100):
        assert data.group[grouped[b * 8 : (b + 1) * 8]].sum() == 2  # a quarter of 8, as in the layout
    assert _padding(grouped, data.lengths(), 8) < 0.5 * _padding(np.arange(len(data)), data.lengths(), 8)


# ----------------------------------------------------------------------------------------------------
# Packing


def test_packing_puts_short_examples_in_one_row():
    rows = [{"prompt_ids": [1, 2], "completion_ids": [5] * n} for n in (10, 3, 2, 1)]  # 12, 5, 4 and 3 tokens
    batch = collate(rows, 0, pack=True)
    assert batch["input_ids"].shape == (2, 12)  # 12 | 5 + 4 + 3
    assert batch["position_ids"][1].tolist() == [0, 1, 2, 3, 4, 0, 1, 2, 3, 0, 1, 2]
    assert (batch["labels"] != -100).sum() == 16
    assert collate(rows[1:], 0, pack=12)["position_ids"].tolist() == [[0, 1, 2, 3, 4, 0, 1, 2, 3, 0, 1, 2]]


def _rows_with_teacher() -> list[dict]:
    rows = synthetic_rows(2, seed=4, completion=(20, 21)) + synthetic_rows(5, seed=3, completion=(2, 7))
    path_rows = []
    for r in rows:  # decoded, as the collator gets them
        r = dict(r)
        enc = r.pop("topk", None)
        if enc:
            from distillab.topk_codec import decode_topk

            r["top_ids"], r["top_logprobs"], r["top_tail"] = decode_topk(enc)
        path_rows.append(r)
    assert any(r.get("top_ids") is None for r in path_rows) and any(r.get("top_ids") is not None for r in path_rows)
    return path_rows


def _per_example(head, batch, d, places) -> list[train.LossTerms]:
    """loss_step's terms of each example alone: its labels kept, every other example's masked out."""
    out = []
    lengths = [int(n) for n in places["lengths"]]
    for (row, at), n in zip(places["at"], lengths):
        one = dict(batch)
        keep = torch.zeros_like(batch["labels"], dtype=torch.bool)
        keep[row, at : at + n] = True
        one["labels"] = batch["labels"].masked_fill(~keep, -100)
        out.append(train.loss_step(head, one, d))
    return out


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("chunk_size", [0, 4])
def test_packed_losses_equal_unpacked_per_example(attn, chunk_size):
    from distillab.batching import pack_rows

    model = tiny_llama(VOCAB, attn_implementation=attn)
    rows = _rows_with_teacher()
    cfg = from_dict(
        {
            "train": {
                "student": "in-process",
                "loss": "forward_kl",
                "kd_weight": 1.0,
                "sft_weight": 0.5,
                "chunk_size": chunk_size,
                "packing": True,
            }
        }
    )
    d = train.DistillSettings(cfg, model)  # runs check_packing: this model keeps examples apart
    lengths = [len(r["prompt_ids"]) + len(r["completion_ids"]) for r in rows]
    plain, packed = collate(rows, 0), collate(rows, 0, pack=True)
    assert packed["input_ids"].shape[0] < len(rows)
    unpacked_places = {"at": [(b, 0) for b in range(len(rows))], "lengths": lengths}
    packed_places = {"at": pack_rows(lengths, max(lengths)), "lengths": lengths}
    per_plain = _per_example(d.head(model, model, plain, d), plain, d, unpacked_places)
    per_packed = _per_example(d.head(model, model, packed, d), packed, d, packed_places)
    for a, b in zip(per_plain, per_packed):
        assert int(a.n_tokens) == int(b.n_tokens) > 0
        torch.testing.assert_close(b.ce, a.ce, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(b.kd, a.kd, rtol=1e-5, atol=1e-5)
    assert sum(float(t.kd) for t in per_plain) > 0  # the teacher's top-k is in the loss


def test_packing_is_refused_where_examples_would_see_each_other(monkeypatch):
    model = tiny_llama(VOCAB)
    monkeypatch.setattr(train, "model_inputs", lambda batch: {"input_ids": batch["input_ids"]})  # a plain causal mask
    cfg = from_dict({"train": {"student": "in-process", "packing": True}})
    with pytest.raises(UserError, match="packed examples see each"):
        train.DistillSettings(cfg, model)


def test_packing_is_refused_with_on_policy():
    with pytest.raises(ConfigError, match="packing = true with on_policy_fraction"):
        from_dict({"train": {"packing": True, "on_policy_fraction": 0.5}})


@pytest.mark.parametrize("options", [{"packing": True}, {"group_by_length": True}])
def test_one_step_with_packing_or_grouping_equals_the_plain_step(tmp_path, options):
    """Packing moves a batch's examples into fewer rows; grouping reorders rows. With one batch holding every row,
    the SGD step is the plain one."""
    from distillab import models

    student = save_tiny_llama(tmp_path / "student", vocab_pad=VOCAB)
    rows = _rows_with_teacher()

    def step(**train_options):
        cfg = from_dict(
            {
                "train": {
                    "student": str(student),
                    "loss": "forward_kl",
                    "sft_weight": 0.5,
                    "max_steps": 1,
                    "batch_size": len(rows),
                    "warmup_ratio": 0.0,
                    "save_steps": 10**6,
                    **train_options,
                }
            }
        )
        model, tok = models.load(student)
        return sgd_step(cfg, copy.deepcopy(rows), model, tok, tmp_path / str(train_options))

    plain, other = step(), step(**options)
    start = dict(models.load_model(student).named_parameters())
    assert any((start[n] - plain[n]).abs().max() > 0 for n in plain)
    for name in plain:
        torch.testing.assert_close(other[name], plain[name], rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------------------------------
# One meaning of the batch size on any number of processes (TrainOrder, fillers)


def _global_batches(data, per_device: int, processes: int, epoch: int = 0, grouped: bool = False) -> list[list[int]]:
    """The micro-batch every process takes, step by step, joined in process order: each process's sampler as
    accelerate shards it (BatchSamplerShard, as the Trainer prepares its DataLoader)."""
    from accelerate.data_loader import BatchSamplerShard

    from distillab.batching import TrainOrder

    shards = []
    for rank in range(processes):
        order = TrainOrder(data, per_device, processes, seed=3, group_by_length=grouped)
        order.set_epoch(epoch)
        batches = torch.utils.data.BatchSampler(order, per_device, drop_last=False)
        shards.append(list(BatchSamplerShard(batches, processes, rank) if processes > 1 else batches))
    assert len({len(s) for s in shards}) == 1  # every process takes as many micro-batches
    return [sum((shard[step] for shard in shards), []) for step in range(len(shards[0]))]


@pytest.mark.parametrize("grouped", [False, True])
def test_processes_take_the_global_batches_one_process_takes_the_last_partial_one_too(grouped):
    rng = np.random.default_rng(0)
    data = DistillDataset(
        ListRows([{"prompt_ids": [1], "completion_ids": [2] * int(n)} for n in rng.integers(1, 30, 11)]), 10
    )
    for epoch in (0, 1):
        one = _global_batches(data, 4, 1, epoch, grouped)
        for processes in (2, 4):
            many = _global_batches(data, 4 // processes, processes, epoch, grouped)
            assert [[i for i in b if i < len(data)] for b in many] == one  # the same rows, split as one takes them
            assert all(i >= len(data) for i in many[-1][len(one[-1]) :])  # the rest of the last batch: fillers
        assert sorted(sum(one, [])) == list(range(11))  # every row once an epoch, none twice


def test_one_process_keeps_the_order_the_trainer_drew_before():
    """TrainOrder's permutation is the one transformers' Trainer draws through accelerate (SeedableRandomSampler,
    seeded with data_seed + epoch): a one-process run trains on the batches it always did."""
    from accelerate.data_loader import SeedableRandomSampler

    data = DistillDataset(ListRows([{"prompt_ids": [1], "completion_ids": [2]}] * 11), 10)
    for epoch in (0, 1):
        trainers = SeedableRandomSampler(data_source=data, data_seed=3)
        trainers.set_epoch(epoch)
        assert sum(_global_batches(data, 4, 1, epoch), []) == list(trainers)


@pytest.mark.parametrize("chunk_size", [0, 4])
def test_a_micro_batch_of_fillers_is_a_zero_loss_whose_gradient_reaches_every_weight(chunk_size):
    """A process the epoch's last batch does not reach gets fillers: its loss is 0 and its backward runs (DDP's
    all-reduce waits for every process's backward), with a zero gradient for every weight."""
    from distillab.batching import Collator

    model = tiny_llama(VOCAB)
    cfg = from_dict({"train": {"student": "in-process", "loss": "forward_kl", "chunk_size": chunk_size}})
    d = train.DistillSettings(cfg, model)
    data = DistillDataset(ListRows(_rows_with_teacher()), VOCAB)
    batch = Collator(data, pad_id=0)([len(data), len(data) + 1])
    assert batch["filler"].tolist() == [True, True] and not (batch["labels"] != -100).any()
    terms = train.loss_step(d.head(model, model, batch, d), batch, d)
    assert float(terms.total) == 0.0 and int(terms.n_tokens) == 0
    terms.total.backward()
    assert all(p.grad is not None and not p.grad.any() for p in model.parameters())


def test_batch_size_is_per_device_batch_size_under_its_old_name():
    old = from_dict({"train": {"batch_size": 6, "grad_accum": 2}})
    assert old.train.per_device_batch_size == 6 and old.train.old_batch_size_key
    assert train.batch_line(old.train) == (
        "train: global batch 12 rows a step = per_device_batch_size 6 x 1 process(es) x grad_accum 2 "
        "(train.batch_size is now named per_device_batch_size, the same per-process meaning: rename it)"
    )
    new = from_dict({"train": {"per_device_batch_size": 6}})
    assert not new.train.old_batch_size_key and "rename" not in train.batch_line(new.train)
    with pytest.raises(ConfigError, match="old name: give one of them"):
        from_dict({"train": {"batch_size": 6, "per_device_batch_size": 6}})
