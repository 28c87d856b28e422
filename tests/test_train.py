"""The trainer: token-normalised gradient accumulation, resume after an interruption (or a kill mid-save),
vocabulary handling, on-policy samples, the loss rules of the config."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap

import pytest
import torch

from distillab import models, train
from distillab.batching import collate
from distillab.config import ConfigError, from_dict, to_toml
from distillab.dataset import read_dataset
from distillab.errors import UserError
from distillab.generate import run_generate
from distillab.rundir import RunDir
from distillab.stage import StageContext, run_stage
from distillab.train import run_train
from tests.helpers import save_tiny_llama, sgd_step, tiny_config


def _one_sgd_step(cfg, rows, student_dir, out_dir, accepts_loss_kwargs=None):
    model, tok = models.load(student_dir)
    if accepts_loss_kwargs is not None:  # Gemma 3/3n/4 declare False: the Trainer then scales the loss itself
        model.accepts_loss_kwargs = accepts_loss_kwargs
    return sgd_step(cfg, rows, model, tok, out_dir)


@pytest.mark.parametrize("loss, accepts_loss_kwargs", [("forward_kl", None), ("jsd", None), ("forward_kl", False)])
def test_four_micro_batches_of_one_equal_one_batch_of_four(
    tmp_path, tiny_teacher, tiny_student, loss, accepts_loss_kwargs
):
    cfg = tiny_config(tmp_path, tiny_teacher, tiny_student, loss=loss, max_steps=1)
    cfg.data.n_prompts = 4
    run_generate(cfg, log=lambda *_: None)
    rows = read_dataset(RunDir(cfg.run_dir).dataset("train"))
    for row, n in zip(rows, [1, 2, 4, 6]):  # a random teacher never stops: make the lengths differ
        row["completion_ids"], row["top_ids"], row["top_logprobs"] = (
            row["completion_ids"][:n],
            row["top_ids"][:n],
            row["top_logprobs"][:n],
        )
    assert len(rows) == 4 and len({len(r["completion_ids"]) for r in rows}) == 4
    cfg.train.batch_size, cfg.train.grad_accum = 4, 1
    whole = _one_sgd_step(cfg, rows, tiny_student, tmp_path / "a", accepts_loss_kwargs)
    cfg.train.batch_size, cfg.train.grad_accum = 1, 4
    accumulated = _one_sgd_step(cfg, rows, tiny_student, tmp_path / "b", accepts_loss_kwargs)  # was 4x at False
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
    ckpt = RunDir(cfg.run_dir).checkpoints
    assert interrupted == {"interrupted_at": 3} and (ckpt / "checkpoint-3" / "trainer_state.json").is_file()
    assert "train" not in RunDir(cfg.run_dir).stamps()  # not stamped: the rerun continues it
    # The first part's training seconds live in the checkpoint; make them big enough that losing them shows
    seconds = ckpt / "checkpoint-3" / train.SECONDS_FILE
    assert json.loads(seconds.read_text())["train_seconds"] > 0
    seconds.write_text(json.dumps({"train_seconds": 1000.0}))
    # A checkpoint left half-written by an older version (or by hand): no trainer_state.json
    shutil.copytree(ckpt / "checkpoint-3", ckpt / "checkpoint-5")
    (ckpt / "checkpoint-5" / "trainer_state.json").unlink()
    said = []
    resumed = run_train(cfg, log=said.append)
    assert any("removing incomplete checkpoint-5" in s for s in said)
    assert any("resuming from checkpoint-3" in s for s in said)
    assert resumed["steps"] == 6
    assert 1000 < resumed["train_seconds"] < 1000 + reference["train_seconds"] * 5 + 60  # both parts counted

    def curve(summary):
        return [(h["step"], h["loss"]) for h in summary["loss_history"] if "loss" in h]

    # Steps 4..6 after the resume repeat the uninterrupted run's (same data order, optimizer and RNG state).
    tail = [x for x in curve(resumed) if x[0] > 3]
    assert [s for s, _ in tail] == [4, 5, 6]
    for (_, got), (_, want) in zip(tail, [x for x in curve(reference) if x[0] > 3]):
        assert got == pytest.approx(want, rel=1e-4)


def test_the_train_stage_stamps_only_a_whole_run_of_process_zero(tmp_path, tiny_teacher, tiny_student, monkeypatch):
    cfg = tiny_config(tmp_path, tiny_teacher, tiny_student, max_steps=2)
    run_generate(cfg, log=lambda *_: None)
    run, quiet = RunDir(cfg.run_dir), StageContext(log=lambda *_: None)
    with monkeypatch.context() as patched:  # another process of a torchrun job: it trains, writes and stamps nothing
        patched.setattr(train.DistillTrainer, "is_world_process_zero", lambda self: False)
        other = run_stage(train.train_stage, cfg, quiet)
    assert not other.complete and not run.student.exists() and "train" not in run.stamps()
    record = run_stage(train.train_stage, cfg, quiet)
    assert isinstance(record, train.TrainSummary) and record.complete and not record.skipped
    assert json.loads(run.train_summary.read_text()) == record.to_dict() and "replay" not in record.to_dict()
    assert "train" in run.stamps()
    again = run_stage(train.train_stage, cfg, quiet)
    assert again.skipped and again.to_dict() == record.to_dict()


DIE_DURING_SAVE = textwrap.dedent("""
    import os, sys
    import transformers
    from distillab.config import load_config
    from distillab.train import run_train

    where, step = sys.argv[2], int(sys.argv[3])
    if where == "rng":  # model and optimizer written, RNG states and trainer state not yet
        original = transformers.Trainer._save_rng_state
        def die(self, output_dir):
            if self.state.global_step == step:
                os._exit(9)
            return original(self, output_dir)
        transformers.Trainer._save_rng_state = die
    else:  # half of trainer_state.json written
        original = transformers.TrainerState.save_to_json
        def die(self, path):
            if self.global_step == step:
                with open(path, "w") as f:
                    f.write('{"global_step": ')
                os._exit(9)
            return original(self, path)
        transformers.TrainerState.save_to_json = die
    run_train(load_config(sys.argv[1]), log=lambda *_: None)
""")


@pytest.mark.parametrize("where", ["rng", "trainer_state"])
def test_a_kill_while_saving_a_checkpoint_resumes_from_the_last_complete_one(
    tmp_path, tiny_teacher, tiny_student, where
):
    straight = tiny_config(tmp_path / "a", tiny_teacher, tiny_student, max_steps=6, save_steps=2)
    run_generate(straight, log=lambda *_: None)
    reference = run_train(straight, log=lambda *_: None)

    cfg = tiny_config(tmp_path / "b", tiny_teacher, tiny_student, max_steps=6, save_steps=2)
    run_generate(cfg, log=lambda *_: None)
    (tmp_path / "run.toml").write_text(to_toml(cfg))
    (tmp_path / "die.py").write_text(DIE_DURING_SAVE)
    killed = subprocess.run(
        [sys.executable, str(tmp_path / "die.py"), str(tmp_path / "run.toml"), where, "4"],
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert killed.returncode == 9, killed.stderr[-2000:]
    ckpt = RunDir(cfg.run_dir).checkpoints
    assert (ckpt / "checkpoint-2" / "trainer_state.json").is_file() and not (ckpt / "checkpoint-4").exists()
    said = []
    resumed = run_train(cfg, log=said.append)
    assert any("resuming from checkpoint-2" in s for s in said)
    assert resumed["steps"] == 6 and not (ckpt / train.SAVING).exists()
    assert resumed["final_loss"] == pytest.approx(reference["final_loss"], rel=1e-4)


def test_padded_student_vocab_just_works(tmp_path, tiny_teacher):
    padded = save_tiny_llama(tmp_path / "padded", hidden=16, layers=1, seed=3, vocab_pad=38)  # 90 -> 128 rows
    cfg = tiny_config(tmp_path, tiny_teacher, padded, max_steps=2)
    run_generate(cfg, log=lambda *_: None)
    assert run_train(cfg, log=lambda *_: None)["steps"] == 2


def test_a_student_tokenizer_with_one_more_token_trains_kd_on_the_teachers_ids(tmp_path, tiny_teacher):
    """The teacher's ids mean the same tokens to this student (generate keeps them: _ids_match), so off-policy KD
    needs no shared vocab; other tokenizers are aligned by text (tests/test_crosstok.py)."""
    other = save_tiny_llama(tmp_path / "other", hidden=16, layers=1)
    tok = models.load_tokenizer(other)
    tok.add_tokens(["<extra>"])
    tok.save_pretrained(str(other))
    cfg = tiny_config(tmp_path, tiny_teacher, other, max_steps=1, loss="forward_kl", kd_weight=1.0)
    run_generate(cfg, log=lambda *_: None)
    assert all(r["top_ids"] is not None for r in read_dataset(RunDir(cfg.run_dir).dataset("train")))
    assert run_train(cfg, log=lambda *_: None)["steps"] == 1


# ----------------------------------------------------------------------------------------------------
# On-policy samples, the loss rules of the config, what FSDP refuses.


def _settings(tiny_teacher, tiny_student, pad_id, eos_id, **train_cfg):
    cfg = from_dict(
        {
            "teacher": {"model": str(tiny_teacher), "max_new_tokens": 5},
            "train": {"student": str(tiny_student), "on_policy_fraction": 1.0, **train_cfg},
        }
    )
    student = models.load_model(tiny_student)
    return student, train.DistillSettings(cfg, student, models.load_model(tiny_teacher), pad_id, eos_id)


def test_on_policy_samples_keep_their_eos_when_pad_is_eos(tiny_teacher, tiny_student, monkeypatch):
    tok = models.load_tokenizer(tiny_student)
    eos = tok.eos_token_id
    student, d = _settings(tiny_teacher, tiny_student, pad_id=eos, eos_id=eos)  # the tokenizer fallback's choice
    prompts = [
        {"prompt_ids": [1, 20, 21], "completion_ids": [30, eos]},
        {"prompt_ids": [1, 22], "completion_ids": [eos]},
    ]
    sampled = torch.tensor([[40, 41, eos, eos, eos], [42, 43, 44, 45, 46]])  # (B, new): finished, cut at max length
    monkeypatch.setattr(train, "_sample", lambda *a: sampled)
    batch = train.on_policy_batch(student, collate(prompts, eos), d)
    completions = [batch["labels"][b][batch["labels"][b] != -100].tolist() for b in range(2)]
    assert completions == [[40, 41, eos], [42, 43, 44, 45, 46]]
    assert batch["student_written"] and batch["teacher"].logits.shape[:2] == batch["input_ids"].shape


def test_no_cross_entropy_on_the_students_own_samples(tiny_teacher, tiny_student, monkeypatch):
    tok = models.load_tokenizer(tiny_student)
    monkeypatch.setattr(train, "_sample", lambda *a: torch.tensor([[40, 41, tok.eos_token_id]]))
    prompts = [{"prompt_ids": [1, 20, 21], "completion_ids": [30, tok.eos_token_id]}]
    totals = []
    for sft_weight in (0.0, 1.0):
        student, d = _settings(tiny_teacher, tiny_student, tok.pad_token_id, tok.eos_token_id, sft_weight=sft_weight)
        batch = train.on_policy_batch(student, collate(prompts, tok.pad_token_id), d)
        terms = train.loss_step(d.head(student, student, batch, d), batch, d)
        assert terms.ce == 0 and terms.kd > 0
        totals.append(terms.total)
    assert totals[0] == totals[1]


@pytest.mark.parametrize(
    "train_cfg, message",
    [
        ({"loss": "ce"}, 'loss = "ce" is SFT only'),
        ({"kd_weight": 0.0, "sft_weight": 0.0}, "nothing to train"),
        ({"loss": "ce", "kd_weight": 0.0, "sft_weight": 1.0, "on_policy_fraction": 0.5}, "need a KD loss"),
    ],
)
def test_loss_weights_that_mean_nothing_are_one_line_errors(train_cfg, message):
    with pytest.raises(ConfigError, match=message) as err:
        from_dict({"train": train_cfg})
    assert "\n" not in str(err.value)


def test_sft_only_is_loss_ce_with_no_kd_weight():
    assert from_dict({"train": {"loss": "ce", "kd_weight": 0.0, "sft_weight": 1.0}}).train.loss == "ce"


@pytest.mark.parametrize(
    "train_cfg, named", [({"chunk_size": 64}, "chunked KD"), ({"on_policy_fraction": 0.5}, "on-policy")]
)
def test_fsdp_refuses_what_it_would_break(train_cfg, named):
    t = from_dict({"train": train_cfg}).train
    train.check_parallelism(t, fsdp=False)
    with pytest.raises(UserError, match=f"FSDP with {named}"):
        train.check_parallelism(t, fsdp=True)


def test_fsdp_is_refused_until_it_is_tested():
    t = from_dict({}).train
    train.check_parallelism(t, fsdp=False)
    with pytest.raises(UserError, match="FSDP is not supported yet"):
        train.check_parallelism(t, fsdp=True)


def test_chunked_kd_refuses_an_unread_architecture_at_setup(tiny_student):
    from transformers import GPT2Config, GPT2LMHeadModel

    class MysteryForCausalLM(GPT2LMHeadModel):  # not in distillab.logits: its logit path is unknown
        pass

    model = MysteryForCausalLM(GPT2Config(n_embd=16, n_layer=1, n_head=2, vocab_size=90))
    cfg = from_dict({"train": {"student": str(tiny_student), "chunk_size": 64}})
    with pytest.raises(UserError, match="MysteryForCausalLM"):
        train.DistillSettings(cfg, model)


# ----------------------------------------------------------------------------------------------------
# Checkpoints are resumed only under the config and data they were made from (issue 23)

STARTING_OVER = "train: the config or data changed since checkpoints/ was written: starting over"


def _student_weights(cfg) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(RunDir(cfg.run_dir).student_weights))


@pytest.mark.parametrize("stop_after_steps", [3, None], ids=["interrupted", "finished"])
def test_a_changed_loss_trains_again_from_scratch(tmp_path, tiny_teacher, tiny_student, stop_after_steps):
    old = tiny_config(tmp_path / "b", tiny_teacher, tiny_student, max_steps=6, save_steps=3)
    run_generate(old, log=lambda *_: None)
    run_train(old, log=lambda *_: None, stop_after_steps=stop_after_steps)
    old_weights = _student_weights(old) if stop_after_steps is None else None
    run = RunDir(old.run_dir)

    def made_from() -> str:
        return json.loads(run.checkpoints_fingerprint.read_text())["fingerprint"]

    assert made_from() == train.train_stage.fingerprint(old, run)

    new = tiny_config(tmp_path / "b", tiny_teacher, tiny_student, max_steps=6, save_steps=3, loss="jsd")
    said = []
    changed = run_train(new, log=said.append)
    assert [s for s in said if s.startswith(STARTING_OVER)] and not any("resuming" in s for s in said)
    assert changed["loss"] == "jsd" and changed["steps"] == 6
    assert (run.checkpoints_previous / "checkpoint-3" / "trainer_state.json").is_file()  # set aside, not resumed
    assert made_from() == train.train_stage.fingerprint(new, run)

    fresh = tiny_config(tmp_path / "c", tiny_teacher, tiny_student, max_steps=6, save_steps=3, loss="jsd")
    run_generate(fresh, log=lambda *_: None)
    reference = run_train(fresh, log=lambda *_: None)
    got, want = _student_weights(new), _student_weights(fresh)
    assert got.keys() == want.keys()
    for name in want:  # the same weights as a run that only ever knew the new loss
        torch.testing.assert_close(got[name], want[name], rtol=1e-5, atol=1e-6)
    assert changed["final_loss"] == pytest.approx(reference["final_loss"], rel=1e-4)
    if old_weights is not None:
        assert any(not torch.equal(old_weights[name], got[name]) for name in got)


def test_more_data_trains_again_from_scratch(tmp_path, tiny_teacher, tiny_student):
    old = tiny_config(tmp_path, tiny_teacher, tiny_student, data={"n_prompts": 8})
    run_generate(old, log=lambda *_: None)
    assert run_train(old, log=lambda *_: None)["examples"] == 8
    old_weights = _student_weights(old)

    more = tiny_config(tmp_path, tiny_teacher, tiny_student, data={"n_prompts": 12})
    run_generate(more, log=lambda *_: None)
    said = []
    summary = run_train(more, log=said.append)
    assert [s for s in said if s.startswith(STARTING_OVER)] and summary["examples"] == 12 and summary["steps"] == 3
    assert any(not torch.equal(old_weights[name], w) for name, w in _student_weights(more).items())


@pytest.mark.parametrize("change", ["lora_to_full", "other_student"])
def test_a_changed_student_or_lora_trains_again_from_scratch(tmp_path, tiny_teacher, tiny_student, change):
    old_train = {"lora": True, "lora_r": 2} if change == "lora_to_full" else {}
    old = tiny_config(tmp_path, tiny_teacher, tiny_student, max_steps=4, **old_train)
    run_generate(old, log=lambda *_: None)
    run_train(old, log=lambda *_: None, stop_after_steps=2)
    assert (RunDir(old.run_dir).checkpoints / "checkpoint-2").is_dir()

    student = tiny_student
    if change == "other_student":  # the same tokenizer (the dataset stays valid), another model
        student = save_tiny_llama(tmp_path / "other", hidden=24, layers=1, seed=5)
    new = tiny_config(tmp_path, tiny_teacher, student, max_steps=4)
    said = []
    summary = run_train(new, log=said.append)  # was an internal error loading the old checkpoint into this model
    assert [s for s in said if s.startswith(STARTING_OVER)]
    assert summary["steps"] == 4 and summary["lora"] is False and summary["student"] == str(student)
    hidden = models.load_model(RunDir(new.run_dir).student).config.hidden_size
    assert hidden == (24 if change == "other_student" else 16)


def test_checkpoints_without_a_fingerprint_are_not_resumed(tmp_path):
    run, said = RunDir(tmp_path / "run"), []
    (run.checkpoints / "checkpoint-2").mkdir(parents=True)  # an older distillab's: what made them is unknown
    train.keep_checkpoints_made_from(run, "abc", said.append)
    assert said and said[0].startswith(STARTING_OVER) and (run.checkpoints_previous / "checkpoint-2").is_dir()
    assert not (run.checkpoints / "checkpoint-2").exists()
    said.clear()
    (run.checkpoints / "checkpoint-3").mkdir()  # made under "abc": kept
    train.keep_checkpoints_made_from(run, "abc", said.append)
    assert not said and (run.checkpoints / "checkpoint-3").is_dir()
    run.checkpoints_fingerprint.write_text("{not json")  # damaged: unknown too
    train.keep_checkpoints_made_from(run, "abc", said.append)
    assert said and (run.checkpoints_previous / "checkpoint-3").is_dir()  # the older set aside is replaced
    assert not (run.checkpoints_previous / "checkpoint-2").exists()


def test_a_damaged_checkpoint_is_refused_naming_the_file(tmp_path, tiny_teacher, tiny_student):
    cfg = tiny_config(tmp_path, tiny_teacher, tiny_student, max_steps=4)
    run_generate(cfg, log=lambda *_: None)
    run_train(cfg, log=lambda *_: None, stop_after_steps=2)
    checkpoint = RunDir(cfg.run_dir).checkpoints / "checkpoint-2"
    names = ["trainer_state.json", train.SECONDS_FILE, "model.safetensors", "optimizer.pt", "rng_state.pth"]
    for name in names:
        file = checkpoint / name
        whole = file.read_bytes()
        file.write_bytes(whole[: len(whole) // 2])  # cut short, as a full disk or a copy stopped midway leaves it
        with pytest.raises(UserError) as refused:
            run_train(cfg, log=lambda *_: None)
        assert str(file) in str(refused.value) and f"delete {checkpoint}" in str(refused.value), name
        file.write_bytes(whole)
    assert run_train(cfg, log=lambda *_: None)["steps"] == 4  # whole again: resumed


TRAIN_UNDER_TORCHRUN = textwrap.dedent("""
    import sys
    from distillab.config import load_config
    from distillab.train import run_train

    run_train(load_config(sys.argv[1]), log=lambda line: print(line, flush=True))
""")


@pytest.mark.slow
def test_two_processes_of_one_torchrun_job_train_under_their_own_locks_and_start_over_together(
    tmp_path, tiny_teacher, tiny_student
):
    """Every rank runs the train stage: each holds its own lock (rank 0 the one a lone process takes), rank 0
    alone sets stale checkpoints aside before any rank looks for one."""
    script = tmp_path / "train.py"
    script.write_text(TRAIN_UNDER_TORCHRUN)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29519"]
    outputs = []
    for loss in ("forward_kl", "jsd"):
        cfg = tiny_config(tmp_path, tiny_teacher, tiny_student, max_steps=2, loss=loss)
        (tmp_path / "run.toml").write_text(to_toml(cfg))
        if loss == "forward_kl":
            run_generate(cfg, log=lambda *_: None)
        job = subprocess.run(
            [*torchrun, str(script), str(tmp_path / "run.toml")], env=env, capture_output=True, text=True, timeout=600
        )
        assert job.returncode == 0, job.stderr[-3000:]
        outputs.append(job.stdout)
        summary = json.loads(RunDir(cfg.run_dir).train_summary.read_text())
        assert summary["loss"] == loss and summary["steps"] == 2
    assert STARTING_OVER not in outputs[0] and outputs[1].count(STARTING_OVER) == 1  # said once, by rank 0


def test_a_second_train_on_the_run_is_refused_in_one_line(tmp_path, tiny_teacher, tiny_student):
    from distillab.files import hold

    cfg = tiny_config(tmp_path, tiny_teacher, tiny_student, max_steps=2)
    run_generate(cfg, log=lambda *_: None)
    run = RunDir(cfg.run_dir)
    with hold(run.stage_lock("train"), str):  # the first train, still running
        with pytest.raises(UserError) as refused:
            run_train(cfg, log=lambda *_: None)
    assert str(refused.value) == (
        f"another distillab process (pid {os.getpid()}) is running train in {run.root}: wait for it or stop it"
    )
    assert not run.checkpoints.exists() and not run.student.exists()  # the second touched nothing
    assert run_train(cfg, log=lambda *_: None)["steps"] == 2
