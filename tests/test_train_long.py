"""Long sequences: train.max_length (rows cut or left out, counted by hand), gradient checkpointing (the same loss and
gradients, and the layers really recomputed), precision (bf16 autocast on CPU runs, fp16 refused in one line) and
attn_implementation (eager = sdpa; flash_attention_2 refused in one line here)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from distillab import models
from distillab.batching import ListRows, limit_length
from distillab.cli import _finished_line
from distillab.config import to_toml
from distillab.dataset import read_dataset
from distillab.errors import UserError
from distillab.generate import run_generate
from distillab.rundir import WHOLE, RunDir
from distillab.train import TrainSummary, build_trainer, run_train
from tests.helpers import tiny_config

QUIET = {"log": lambda *_: None}


def _rows(n_rows: int, vocab: int, k: int = 5, seed: int = 0) -> list[dict]:
    """Rows with random prompts, completions and a teacher top-k at every completion token, of different lengths."""
    gen = torch.Generator().manual_seed(seed)
    rows = []
    for i in range(n_rows):
        prompt, completion = 3 + i % 3, 4 + 2 * i
        top = torch.rand(completion, vocab, generator=gen).topk(k).indices  # (C, k) distinct ids a position
        rows.append(
            {
                "prompt_ids": torch.randint(4, vocab, (prompt,), generator=gen).tolist(),
                "completion_ids": torch.randint(4, vocab, (completion,), generator=gen).tolist(),
                "top_ids": top,
                "top_logprobs": torch.randn(completion, k, generator=gen).log_softmax(-1) - 0.1,
                "top_tail": None,
            }
        )
    return rows


# ----------------------------------------------------------------------------------------------------
# max_length


def test_length_limit_cuts_completions_and_their_top_k_and_counts_them():
    rows = _rows(4, vocab=50)  # prompt + completion: 3+4, 4+6, 5+8, 3+10
    cut = limit_length(rows, 9, "truncate")
    # by hand: 7 fits; 10 -> completion 5 (1 cut); 13 -> 4 (4 cut); 13 -> 6 (4 cut)
    assert (len(cut), cut.truncated_rows, cut.dropped_rows, cut.tokens_cut) == (4, 3, 0, 9)
    assert cut.completion_lengths.tolist() == [4, 5, 4, 6]
    for original, row in zip(rows, cut.fetch([0, 1, 2, 3])):
        n = len(row["completion_ids"])
        assert len(row["prompt_ids"]) + n <= 9 and row["prompt_ids"] == original["prompt_ids"]
        assert row["completion_ids"] == original["completion_ids"][:n]
        assert torch.equal(row["top_ids"], original["top_ids"][:n]) and len(row["top_logprobs"]) == n

    dropped = limit_length(rows, 9, "drop")
    assert (len(dropped), dropped.truncated_rows, dropped.dropped_rows, dropped.tokens_cut) == (1, 0, 3, 24)
    assert dropped.fetch([0])[0] is rows[0]

    no_room = limit_length(rows, 4, "truncate")  # prompts of 4 and 5 tokens leave no room for a completion token
    assert (len(no_room), no_room.truncated_rows, no_room.dropped_rows, no_room.tokens_cut) == (2, 2, 2, 3 + 6 + 8 + 9)
    assert limit_length(rows, None, "truncate") is rows and isinstance(limit_length(rows, 99, "drop").source, ListRows)


@pytest.mark.parametrize("overflow", ["truncate", "drop"])
def test_max_length_is_counted_in_the_summary_against_a_count_by_hand(tmp_path, tiny_teacher, tiny_student, overflow):
    cfg = tiny_config(tmp_path, tiny_teacher, tiny_student, max_steps=2)
    run_generate(cfg, **QUIET)
    rows = read_dataset(RunDir(cfg.run_dir).dataset("train"))
    # truncate: the longest prompts leave no room, the others are cut; drop: the shortest rows fit, the others go
    max_length = (
        max(len(r["prompt_ids"]) for r in rows)
        if overflow == "truncate"
        else min(len(r["prompt_ids"]) + len(r["completion_ids"]) for r in rows)
    )
    truncated = dropped = cut_tokens = kept_tokens = 0
    for r in rows:
        p, c = len(r["prompt_ids"]), len(r["completion_ids"])
        if p + c <= max_length:
            kept_tokens += c
        elif overflow == "drop" or p >= max_length:
            dropped, cut_tokens = dropped + 1, cut_tokens + c
        else:
            truncated, cut_tokens, kept_tokens = (
                truncated + 1,
                cut_tokens + p + c - max_length,
                kept_tokens + max_length - p,
            )
    assert dropped > 0 and (truncated > 0 if overflow == "truncate" else dropped < len(rows))

    cfg.train.max_length, cfg.train.overflow = max_length, overflow
    summary = run_train(cfg, **QUIET)
    assert (summary["max_length"], summary["truncated_rows"], summary["dropped_rows"], summary["tokens_cut"]) == (
        max_length,
        truncated,
        dropped,
        cut_tokens,
    )
    assert (summary["examples"], summary["completion_tokens"]) == (len(rows) - dropped, kept_tokens)
    on_disk = json.loads(RunDir(cfg.run_dir).train_summary.read_text())
    assert on_disk["dropped_rows"] == dropped and on_disk["tokens_cut"] == cut_tokens
    line = _finished_line(cfg, "train", TrainSummary(**on_disk), WHOLE)
    assert f"{truncated} rows truncated, {dropped} dropped, {cut_tokens} completion tokens cut" in line

    model, tok = models.load(tiny_student)  # every batch the trainer makes fits
    trainer = build_trainer(cfg, rows, model, tok, tmp_path / "out")
    batch = trainer.data_collator(list(range(len(trainer.train_dataset))))
    assert batch["input_ids"].shape[1] <= max_length


def test_without_max_length_the_summary_file_has_no_length_fields(tmp_path, tiny_teacher, tiny_student):
    cfg = tiny_config(tmp_path, tiny_teacher, tiny_student, max_steps=1)
    run_generate(cfg, **QUIET)
    summary = run_train(cfg, **QUIET)
    assert not {"max_length", "truncated_rows", "dropped_rows", "tokens_cut"} & set(summary)
    line = _finished_line(
        cfg, "train", TrainSummary(**json.loads(RunDir(cfg.run_dir).train_summary.read_text())), WHOLE
    )
    assert "max_length" not in line


def test_a_max_length_that_leaves_no_row_is_one_line(tmp_path, tiny_teacher, tiny_student):
    cfg = tiny_config(tmp_path, tiny_teacher, tiny_student, max_length=2, overflow="drop")
    model, tok = models.load(tiny_student)
    with pytest.raises(UserError, match=r"max_length = 2 leaves no training row") as err:
        build_trainer(cfg, _rows(3, len(tok)), model, tok, tmp_path / "out")
    assert "\n" not in str(err.value)


# ----------------------------------------------------------------------------------------------------
# gradient checkpointing


def _one_step(cfg, rows, student, out_dir, hidden_dtype=None):
    """One SGD step of lr 1 (new weights = old - gradient) -> (weights, logged loss, forward calls of layer 0's first
    projection: inside the checkpointed forward, so the backward's recompute calls it again). hidden_dtype: the
    decoder's output cast to it, as a family whose residual stream is 16-bit under autocast gives it."""
    model, tok = models.load(student)
    if hidden_dtype is not None:
        model.model.register_forward_hook(
            lambda module, args, out: setattr(out, "last_hidden_state", out.last_hidden_state.to(hidden_dtype))
        )
    calls = []
    model.model.layers[0].self_attn.q_proj.register_forward_hook(lambda *_: calls.append(1))
    sgd = torch.optim.SGD(model.parameters(), lr=1.0)
    trainer = build_trainer(
        cfg, rows, model, tok, out_dir, optimizers=(sgd, torch.optim.lr_scheduler.LambdaLR(sgd, lambda _: 1.0))
    )
    trainer.args.max_grad_norm = 0.0  # no clipping: it would hide a different gradient
    trainer.train()
    loss = next(h["loss"] for h in trainer.state.log_history if "loss" in h)
    return {k: v.detach().clone() for k, v in model.named_parameters()}, loss, len(calls)


@pytest.mark.parametrize("chunk_size", [0, 5])
def test_gradient_checkpointing_gives_the_same_loss_and_gradients(tmp_path, tiny_teacher, chunk_size):
    rows = _rows(4, len(models.load_tokenizer(tiny_teacher)))
    cfg = tiny_config(
        tmp_path,
        tiny_teacher,
        tiny_teacher,
        max_steps=1,
        per_device_batch_size=4,
        kd_weight=1.0,
        sft_weight=0.5,
        chunk_size=chunk_size,
    )  # the 2-layer model as the student
    plain, plain_loss, plain_calls = _one_step(cfg, rows, tiny_teacher, tmp_path / "plain")
    cfg.train.gradient_checkpointing = True
    ckpt, ckpt_loss, ckpt_calls = _one_step(cfg, rows, tiny_teacher, tmp_path / "ckpt")
    assert (plain_calls, ckpt_calls) == (1, 2)  # the layer ran again in the backward: checkpointing is on
    assert ckpt_loss == pytest.approx(plain_loss, rel=1e-6)
    start = dict(models.load_model(tiny_teacher).named_parameters())
    for name in plain:
        assert (plain[name] - start[name]).abs().max() > 0  # every weight got a gradient
        torch.testing.assert_close(ckpt[name], plain[name], rtol=1e-6, atol=1e-7)


def test_gradient_checkpointing_with_lora_trains_the_same(tmp_path, tiny_teacher, tiny_student):
    histories = []
    for checkpointing in (False, True):
        cfg = tiny_config(
            tmp_path / str(checkpointing),
            tiny_teacher,
            tiny_teacher,
            lora=True,
            lora_r=4,
            gradient_checkpointing=checkpointing,
        )
        run_generate(cfg, **QUIET)
        run_train(cfg, **QUIET)
        summary = json.loads(RunDir(cfg.run_dir).train_summary.read_text())
        histories.append([h["loss"] for h in summary["loss_history"] if "loss" in h])
    assert len(histories[0]) == 3
    assert histories[1] == pytest.approx(histories[0], rel=1e-5)
    assert histories[0][-1] != histories[0][0]  # the adapter trained


# ----------------------------------------------------------------------------------------------------
# precision and attention


def test_bf16_on_cpu_runs_under_autocast(tmp_path, tiny_teacher, tiny_student, monkeypatch):
    seen = []
    real_load = models.load

    def load_watching(name, **kwargs):  # the dtype a linear layer computes in, seen from the student's forward
        model, tok = real_load(name, **kwargs)
        model.lm_head.register_forward_hook(lambda module, args, out: seen.append(out.dtype))
        return model, tok

    monkeypatch.setattr(models, "load", load_watching)
    losses = {}
    for precision in ("fp32", "bf16"):
        cfg = tiny_config(tmp_path / precision, tiny_teacher, tiny_student, precision=precision)
        run_generate(cfg, **QUIET)
        summary = run_train(cfg, **QUIET)
        losses[precision] = [h["loss"] for h in summary["loss_history"] if "loss" in h]
    assert torch.bfloat16 in seen and torch.float32 in seen
    assert all(torch.isfinite(torch.tensor(losses["bf16"])))
    assert losses["bf16"] == pytest.approx(losses["fp32"], rel=0.05)  # bf16 keeps ~3 significant digits


@pytest.mark.parametrize("hidden_dtype", [None, torch.bfloat16])
def test_bf16_with_chunked_kd_on_cpu_runs_close_to_fp32(tmp_path, tiny_teacher, hidden_dtype):
    rows = _rows(4, len(models.load_tokenizer(tiny_teacher)))
    cfg = tiny_config(tmp_path, tiny_teacher, tiny_teacher, max_steps=1, per_device_batch_size=4, chunk_size=5)
    fp32, fp32_loss, _ = _one_step(cfg, rows, tiny_teacher, tmp_path / "fp32")
    cfg.train.precision = "bf16"
    bf16, bf16_loss, _ = _one_step(cfg, rows, tiny_teacher, tmp_path / "bf16", hidden_dtype)
    assert bf16_loss == pytest.approx(fp32_loss, rel=0.02)
    for name in fp32:
        assert bf16[name].dtype == torch.float32  # the weights stay fp32: autocast, not a cast of the model
        torch.testing.assert_close(bf16[name], fp32[name], rtol=0.05, atol=0.05)


def _refused(tmp_path, teacher, student, **train) -> str:
    """The one-line UserError of run_train, with nothing of the student written."""
    cfg = tiny_config(tmp_path, teacher, student, **train)
    run_generate(cfg, **QUIET)
    with pytest.raises(UserError) as err:
        run_train(cfg, **QUIET)
    run = RunDir(cfg.run_dir)
    assert not run.student.exists() and not run.checkpoints.exists() and "train" not in run.stamps()
    assert "\n" not in str(err.value)
    return str(err.value)


@pytest.mark.skipif(torch.cuda.is_available(), reason="fp16 runs on a GPU")
def test_fp16_on_cpu_is_refused_in_one_line(tmp_path, tiny_teacher, tiny_student):
    message = _refused(tmp_path, tiny_teacher, tiny_student, precision="fp16")
    assert message.startswith('train.precision = "fp16" needs a CUDA GPU')


@pytest.mark.skipif(torch.cuda.is_available(), reason="flash_attention_2 may run on a GPU")
def test_flash_attention_2_is_refused_in_one_line_here(tmp_path, tiny_teacher, tiny_student):
    message = _refused(tmp_path, tiny_teacher, tiny_student, attn_implementation="flash_attention_2", precision="bf16")
    assert message.startswith('train.attn_implementation = "flash_attention_2": ')


def test_fp16_on_cpu_is_refused_by_the_cli_with_exit_2(tmp_path, tiny_teacher, tiny_student):
    if torch.cuda.is_available():
        pytest.skip("fp16 runs on a GPU")
    cfg = tiny_config(tmp_path, tiny_teacher, tiny_student, precision="fp16")
    path = tmp_path / "run.toml"
    path.write_text(to_toml(cfg))
    done = subprocess.run(
        [sys.executable, "-m", "distillab", "train", str(path)], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 2 and done.stderr.strip().count("\n") == 0, done.stderr
    assert "needs a CUDA GPU" in done.stderr and not RunDir(cfg.run_dir).student.exists()


def test_attn_implementation_eager_and_sdpa_give_the_same_training(tmp_path, tiny_teacher, tiny_student):
    for name in ("eager", "sdpa"):
        assert models.load_model(tiny_student, attn_implementation=name).config._attn_implementation == name
    histories = {}
    for name in ("eager", "sdpa"):
        cfg = tiny_config(tmp_path / name, tiny_teacher, tiny_teacher, attn_implementation=name)  # padded batches
        run_generate(cfg, **QUIET)
        summary = run_train(cfg, **QUIET)
        histories[name] = [h["loss"] for h in summary["loss_history"] if "loss" in h]
    assert len(histories["eager"]) == 3
    assert histories["sdpa"] == pytest.approx(histories["eager"], rel=1e-5)
