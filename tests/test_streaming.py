"""Training data at scale: the streamed reader (trainrows.ArrowRows) against the whole-file read, memory that does not
follow the row count, length-grouped batches, and packing (per-example losses equal to unpacked ones)."""

from __future__ import annotations

import copy
import gc
import tracemalloc

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from distillab import train
from distillab.batching import DistillDataset, ListRows, collate, group_by_length
from distillab.config import ConfigError, from_dict
from distillab.dataset import read_dataset, write_dataset
from distillab.errors import UserError
from distillab.topk_codec import encode_topk
from distillab.trainrows import ArrowRows

VOCAB, K = 97, 5


def synthetic_rows(n: int, seed: int = 0, completion=(3, 12), with_topk=True, vocab=VOCAB) -> list[dict]:
    """Rows as generate writes them (the top-k through the codec); some without top-k, as a replay of answers has."""
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        length = int(rng.integers(*completion))
        row = {"prompt": f"p{i}", "completion": "c", "source": "teacher",
               "prompt_ids": rng.integers(4, vocab, int(rng.integers(1, 6))).tolist(),
               "completion_ids": rng.integers(4, vocab, length).tolist()}
        if with_topk and i % 7:
            ids = np.stack([rng.choice(vocab, K, replace=False) for _ in range(length)])  # (T, k)
            logits = rng.normal(0, 2, (length, K + 1))
            logprobs = logits - np.logaddexp.reduce(logits, axis=1, keepdims=True)
            row["topk"] = encode_topk(ids, logprobs[:, :K], tail_logprob=logprobs[:, K])
        rows.append(row)
    return rows


def _same_rows(streamed: list[dict], whole: list[dict]) -> None:
    assert len(streamed) == len(whole)
    for s, w in zip(streamed, whole):
        assert list(s["prompt_ids"]) == w["prompt_ids"] and list(s["completion_ids"]) == w["completion_ids"]
        if w["top_ids"] is None:
            assert s["top_ids"] is None and s["top_logprobs"] is None and s["top_tail"] is None
            continue
        assert s["top_ids"].tolist() == w["top_ids"]
        assert s["top_logprobs"].tolist() == w["top_logprobs"] and s["top_tail"].tolist() == w["top_tail"]


@pytest.mark.parametrize("sharded", [False, True])
def test_streamed_rows_equal_the_whole_read(tmp_path, sharded):
    path = tmp_path / "data" / "train.parquet"
    rows = synthetic_rows(300)
    if sharded:  # data/train/part-*.parquet, as `generate --shard` writes; one shard holds no top-k column at all
        write_dataset(path.with_suffix("") / "part-0-of-3-a.parquet", rows[:100])
        middle = path.with_suffix("") / "part-1-of-3-a.parquet"
        write_dataset(middle, rows[100:150])
        table = pq.read_table(middle)
        pq.write_table(table.drop_columns([c for c in table.column_names if c.startswith("topk_")]), middle)
        for r in rows[100:150]:
            r.pop("topk", None)
        write_dataset(path.with_suffix("") / "part-2-of-3-a.parquet", rows[150:])
    else:
        write_dataset(path, rows)
    whole = read_dataset(path)
    streamed = ArrowRows(path)
    assert len(streamed) == len(whole) == 300
    order = np.random.default_rng(0).permutation(300).tolist()
    _same_rows(streamed.fetch(order), [whole[i] for i in order])
    assert streamed.completion_lengths.tolist() == [len(r["completion_ids"]) for r in whole]
    assert streamed.prompt_lengths.tolist() == [len(r["prompt_ids"]) for r in whole]
    assert streamed.max_teacher_id == max(max(map(max, r["top_ids"])) for r in whole if r["top_ids"])
    again = ArrowRows(path)  # the copy is made once
    assert again.stats == streamed.stats
    arrow = path.parent / ".arrow" / "train.arrow"
    made = arrow.stat().st_mtime_ns
    ArrowRows(path)
    assert arrow.stat().st_mtime_ns == made


def test_a_changed_dataset_is_copied_again(tmp_path):
    path = tmp_path / "data" / "train.parquet"
    write_dataset(path, synthetic_rows(20))
    assert len(ArrowRows(path)) == 20
    write_dataset(path, synthetic_rows(30, seed=1))
    streamed = ArrowRows(path)
    assert len(streamed) == 30
    _same_rows(streamed.fetch(range(30)), read_dataset(path))


def test_teacher_ids_past_the_vocabulary_are_refused_from_the_copy(tmp_path):
    path = tmp_path / "data" / "train.parquet"
    write_dataset(path, synthetic_rows(40, vocab=5000))
    streamed = ArrowRows(path)
    with pytest.raises(UserError, match="past the student's vocabulary"):
        DistillDataset(streamed, vocab_size=streamed.max_teacher_id)
    DistillDataset(streamed, vocab_size=streamed.max_teacher_id + 1)


def test_memory_does_not_follow_the_row_count(tmp_path):
    """Opening a dataset and fetching a batch: Python objects, Python heap (numpy included) and Arrow's pool stay
    bounded whether the dataset has 2,000 or 20,000 rows; only the lengths (8 bytes a row) grow."""
    measured = {}
    for n in (2_000, 20_000):
        path = tmp_path / str(n) / "data" / "train.parquet"
        rows = synthetic_rows(2_000, seed=n, completion=(8, 24))
        for shard in range(n // 2_000):  # the same rows in each shard: writing is not what is tested
            write_dataset(path.with_suffix("") / f"part-{shard:03d}.parquet", rows)
        del rows
        ArrowRows(path)  # makes the copy (a record batch at a time; measured by the benchmark)
        gc.collect()
        objects = len(gc.get_objects())
        arrow_before = pa.total_allocated_bytes()
        tracemalloc.start()
        streamed = ArrowRows(path)
        batch = streamed.fetch([0, n // 2, n - 1, 5, 7, n - 8, 11, 13])
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        gc.collect()
        measured[n] = {"objects": len(gc.get_objects()) - objects, "peak": peak,
                       "arrow": pa.total_allocated_bytes() - arrow_before}
        assert len(batch) == 8 and len(streamed) == n
        del streamed, batch
    small, large = measured[2_000], measured[20_000]
    assert large["objects"] < 2_000 and large["objects"] < small["objects"] + 200, measured
    assert large["peak"] < small["peak"] + 8 * 18_000 + 2**20, measured  # lengths: 2 x int32 a row, + 1 MiB slack
    assert large["arrow"] < 8 * 2**20, measured  # the record batches of this batch's rows at most


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
    data = DistillDataset(ListRows([{"prompt_ids": [1], "completion_ids": [2] * int(n)}
                                    for n in rng.integers(1, 60, 300)]), 10,
                          replay=[{"prompt_ids": [1], "completion_ids": [3] * int(n)} for n in rng.integers(1, 60, 50)],
                          layout=layout)
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


def _tiny_llama(attn: str = "sdpa"):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                         attn_implementation=attn)
    return LlamaForCausalLM(config).float()


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

    model = _tiny_llama(attn)
    rows = _rows_with_teacher()
    cfg = from_dict({"train": {"student": "in-process", "loss": "forward_kl", "kd_weight": 1.0, "sft_weight": 0.5,
                               "chunk_size": chunk_size, "packing": True}})
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
    model = _tiny_llama()
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
    from tests.helpers import save_tiny_llama

    from distillab import models

    student = save_tiny_llama(tmp_path / "student", vocab_pad=VOCAB)
    rows = _rows_with_teacher()

    def step(**train_options):
        cfg = from_dict({"train": {"student": str(student), "loss": "forward_kl", "sft_weight": 0.5, "max_steps": 1,
                                   "batch_size": len(rows), "warmup_ratio": 0.0, "save_steps": 10**6, **train_options}})
        model, tok = models.load(student)
        sgd = torch.optim.SGD(model.parameters(), lr=1.0)
        trainer = train.build_trainer(cfg, copy.deepcopy(rows), model, tok, tmp_path / str(train_options),
                                      optimizers=(sgd, torch.optim.lr_scheduler.LambdaLR(sgd, lambda _: 1.0)))
        trainer.args.max_grad_norm = 0.0
        trainer.train()
        return dict(model.named_parameters())

    plain, other = step(), step(**options)
    start = dict(models.load_model(student).named_parameters())
    assert any((start[n] - plain[n]).abs().max() > 0 for n in plain)
    for name in plain:
        torch.testing.assert_close(other[name], plain[name], rtol=1e-5, atol=1e-6)
