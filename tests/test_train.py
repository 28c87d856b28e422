"""The trainer: token-normalised gradient accumulation, resume after an interruption, vocabulary handling."""

from __future__ import annotations


import pytest
import torch

from distillab import models
from distillab.errors import UserError
from distillab.dataset import read_dataset
from distillab.generate import run_generate
from distillab.train import build_trainer, run_train
from tests.conftest import save_tiny_llama
from tests.test_pipeline import tiny_config


def _one_sgd_step(cfg, rows, student_dir, out_dir):
    model, tok = models.load(student_dir)
    sgd = torch.optim.SGD(model.parameters(), lr=1.0)
    trainer = build_trainer(cfg, rows, model, tok, out_dir, optimizers=(sgd, torch.optim.lr_scheduler.LambdaLR(sgd, lambda _: 1.0)))
    trainer.args.max_grad_norm = 0.0  # no clipping: it would hide a wrong gradient scale
    trainer.train()
    return {k: v.detach().clone() for k, v in model.named_parameters()}


@pytest.mark.parametrize("loss", ["forward_kl", "jsd"])
def test_four_micro_batches_of_one_equal_one_batch_of_four(tmp_path, tiny_teacher, tiny_student, loss):
    cfg = tiny_config(tmp_path, tiny_teacher, tiny_student, loss=loss, max_steps=1)
    cfg.data.n_prompts = 4
    run_generate(cfg, log=lambda *_: None)
    rows = read_dataset(cfg.run_dir / "data" / "train.parquet")
    for row, n in zip(rows, [1, 2, 4, 6]):  # a random teacher never stops: make the lengths differ
        row["completion_ids"], row["top_ids"], row["top_logprobs"] = (
            row["completion_ids"][:n], row["top_ids"][:n], row["top_logprobs"][:n])
    assert len(rows) == 4 and len({len(r["completion_ids"]) for r in rows}) == 4
    cfg.train.batch_size, cfg.train.grad_accum = 4, 1
    whole = _one_sgd_step(cfg, rows, tiny_student, tmp_path / "a")
    cfg.train.batch_size, cfg.train.grad_accum = 1, 4
    accumulated = _one_sgd_step(cfg, rows, tiny_student, tmp_path / "b")
    start = dict(models.load_model(tiny_student).named_parameters())
    for name in whole:
        moved = (start[name] - whole[name]).abs().max()
        assert moved > 0
        torch.testing.assert_close(accumulated[name], whole[name], rtol=1e-5, atol=1e-6)


def test_resume_after_interruption_continues_the_loss_curve(tmp_path, tiny_teacher, tiny_student):
    straight = tiny_config(tmp_path / "a", tiny_teacher, tiny_student, max_steps=6, save_steps=3)
    run_generate(straight, log=lambda *_: None)
    reference = run_train(straight, log=lambda *_: None)

    cfg = tiny_config(tmp_path / "b", tiny_teacher, tiny_student, max_steps=6, save_steps=3)
    run_generate(cfg, log=lambda *_: None)
    interrupted = run_train(cfg, log=lambda *_: None, stop_after_steps=3)
    assert interrupted == {"interrupted_at": 3} and (cfg.run_dir / "checkpoints" / "checkpoint-3").is_dir()
    said = []
    resumed = run_train(cfg, log=said.append)
    assert any("resuming from checkpoint-3" in s for s in said)
    assert resumed["steps"] == 6

    def curve(summary):
        return [(h["step"], h["loss"]) for h in summary["loss_history"] if "loss" in h]

    # Steps 4..6 after the resume repeat the uninterrupted run's (same data order, optimizer and RNG state).
    tail = [x for x in curve(resumed) if x[0] > 3]
    assert [s for s, _ in tail] == [4, 5, 6]
    for (_, got), (_, want) in zip(tail, [x for x in curve(reference) if x[0] > 3]):
        assert got == pytest.approx(want, rel=1e-4)


def test_padded_student_vocab_just_works(tmp_path, tiny_teacher):
    padded = save_tiny_llama(tmp_path / "padded", hidden=16, layers=1, seed=3, vocab_pad=38)  # 90 -> 128 rows
    cfg = tiny_config(tmp_path, tiny_teacher, padded, max_steps=2)
    run_generate(cfg, log=lambda *_: None)
    assert run_train(cfg, log=lambda *_: None)["steps"] == 2


def test_different_tokenizers_name_both(tmp_path, tiny_teacher, tiny_student):
    other = save_tiny_llama(tmp_path / "other", hidden=16, layers=1)
    tok = models.load_tokenizer(other)
    tok.add_tokens(["<extra>"])
    tok.save_pretrained(str(other))
    cfg = tiny_config(tmp_path, tiny_teacher, other, max_steps=1)
    run_generate(cfg, log=lambda *_: None)
    with pytest.raises(UserError, match="different tokenizers") as err:
        run_train(cfg, log=lambda *_: None)
    assert str(tiny_teacher) in str(err.value) and str(other) in str(err.value)
