"""Several CPU processes (torch.distributed, gloo) train like one: DDP plus the global token count give the same
step, and the same global batches (the last, partial one too) give the same epochs; a launcher that starts fewer
processes than asked is refused."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from distillab.generate import run_generate
from distillab.rundir import RunDir
from tests.helpers import tiny_config

ONE_SGD_STEP = textwrap.dedent("""
    import sys
    from pathlib import Path
    import torch
    from distillab import models
    from distillab.config import from_dict
    from distillab.dataset import read_dataset
    from distillab.train import build_trainer

    data, student, out, batch = sys.argv[1], sys.argv[2], Path(sys.argv[3]), int(sys.argv[4])
    cfg = from_dict({"train": {"student": student, "max_steps": 1, "per_device_batch_size": batch, "loss": "forward_kl",
                               "sft_weight": 1.0, "save_steps": 10**9, "warmup_ratio": 0.0}})
    rows = read_dataset(Path(data))[:4]
    for row, n in zip(rows, [1, 2, 4, 6]):  # unequal lengths: a per-process mean would differ
        row["completion_ids"], row["top_ids"], row["top_logprobs"], row["top_tail"] = (
            row["completion_ids"][:n], row["top_ids"][:n], row["top_logprobs"][:n], row["top_tail"][:n])
    model, tok = models.load(student, device="cpu")
    sgd = torch.optim.SGD(model.parameters(), lr=1.0)
    trainer = build_trainer(cfg, rows, model, tok, out, optimizers=(sgd, torch.optim.lr_scheduler.LambdaLR(sgd, lambda _: 1.0)))
    trainer.args.max_grad_norm = 0.0  # no clipping: it would hide a wrong gradient scale
    trainer.train()
    if trainer.accelerator.is_main_process:
        torch.save({k: v.detach() for k, v in model.named_parameters()}, out / "params.pt")
    if torch.distributed.is_initialized():  # gloo's threads end with the group, not at interpreter exit (an abort)
        torch.distributed.destroy_process_group()
""")


@pytest.mark.slow
def test_two_processes_take_the_step_one_process_takes(tmp_path, tiny_teacher, tiny_student):
    cfg = tiny_config(tmp_path, tiny_teacher, tiny_student)
    cfg.data.n_prompts = 4
    run_generate(cfg, log=lambda *_: None)
    script = tmp_path / "one_step.py"
    script.write_text(ONE_SGD_STEP)
    data = str(RunDir(cfg.run_dir).dataset("train"))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}

    def run(out, batch, *launcher):
        subprocess.run(
            [*launcher, str(script), data, str(tiny_student), str(tmp_path / out), str(batch)],
            check=True,
            env=env,
            capture_output=True,
            timeout=300,
        )
        return torch.load(tmp_path / out / "params.pt")

    one = run("one", 4, sys.executable)
    two = run(
        "two", 2, sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29517"
    )
    from safetensors.torch import load_file

    before = load_file(str(tiny_student / "model.safetensors"))
    assert any(not torch.equal(one[k], before[k]) for k in one if k in before)  # the step moved the weights
    for name in one:
        torch.testing.assert_close(two[name], one[name], rtol=1e-5, atol=1e-6)


MATRIX_CELLS = textwrap.dedent("""
    import os, sys
    from pathlib import Path
    import torch
    torch.set_num_threads(1)
    from tests import test_trainer_matrix as m
    from distillab import train

    train._sample = m.fake_sample  # completions fixed by the prompt: both runs see the same samples
    out, world = Path(sys.argv[1]), int(os.environ.get("WORLD_SIZE", "1"))
    for cell in sys.argv[2].split(","):
        family, teacher_kind, path = cell.split(":")
        params = m.one_sgd_step(family, teacher_kind, path, 4 // world, 1, out / cell.replace(":", "-"))
        if int(os.environ.get("RANK", "0")) == 0:
            torch.save(params, out / (cell.replace(":", "-") + ".pt"))
    if torch.distributed.is_initialized():  # gloo's threads end with the group, not at interpreter exit (an abort)
        torch.distributed.destroy_process_group()
""")


@pytest.mark.slow
def test_two_processes_take_the_step_one_process_takes_on_every_matrix_cell(tmp_path):
    """Every family x teacher (sparse, dense, on-policy) x path (logits, chunked) of tests/test_trainer_matrix.py:
    before the fixes, chunked KD and on-policy crashed under DDP, and on-policy steps were 2x too large."""
    from tests import test_trainer_matrix as m

    cells = [f"{f}:{t}:{p}" for f in m.FAMILIES for t in m.TEACHERS for p in m.PATHS]
    script = tmp_path / "cells.py"
    script.write_text(MATRIX_CELLS)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(m.REPO)}

    def run(out, *launcher):
        (tmp_path / out).mkdir()
        done = subprocess.run(
            [*launcher, str(script), str(tmp_path / out), ",".join(cells)],
            env=env,
            capture_output=True,
            text=True,
            timeout=600,
            cwd=m.REPO,
        )
        assert done.returncode == 0, done.stderr[-3000:]
        return tmp_path / out

    one = run("one", sys.executable)
    two = run("two", sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29519")
    for cell in cells:
        name = cell.replace(":", "-") + ".pt"
        single, double = torch.load(one / name), torch.load(two / name)
        start = dict(m.student(cell.split(":")[0]).named_parameters())
        assert any(not torch.equal(single[k], start[k]) for k in single), cell  # the step moved the weights
        for k in single:
            torch.testing.assert_close(double[k], single[k], rtol=1e-5, atol=1e-6, msg=f"{cell} {k}")


EPOCHS = textwrap.dedent("""
    import os, sys
    from pathlib import Path
    import torch
    torch.set_num_threads(1)
    from distillab import models
    from distillab.config import from_dict
    from distillab.topk_codec import decode_topk
    from distillab.train import build_trainer
    from tests.helpers import synthetic_rows

    out, per_device, student = Path(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
    CASES = {  # 11 rows: no global batch (4, 8) divides them, so each epoch ends with a partial batch
        "plain": {},
        "grouped-accum2": {"train": {"group_by_length": True, "grad_accum": 2}},
        "replay": {"retain": {"replay_fraction": 0.25}},
    }

    def decoded(rows):
        for r in rows:
            enc = r.pop("topk", None)
            if enc:
                r["top_ids"], r["top_logprobs"], r["top_tail"] = decode_topk(enc)
        return rows

    for name, sections in CASES.items():
        train = {"student": student, "epochs": 2, "per_device_batch_size": per_device, "loss": "forward_kl",
                 "sft_weight": 0.5, "save_steps": 10**9, "warmup_ratio": 0.0, "seed": 3, **sections.get("train", {})}
        cfg = from_dict({"train": train, "retain": sections.get("retain", {})})
        rows = decoded(synthetic_rows(11, seed=5, completion=(2, 9), vocab=64))
        replay = decoded(synthetic_rows(5, seed=9, completion=(2, 6), vocab=64)) if "retain" in sections else None
        model, tok = models.load(student, device="cpu")
        sgd = torch.optim.SGD(model.parameters(), lr=0.1)
        constant = torch.optim.lr_scheduler.LambdaLR(sgd, lambda _: 1.0)
        trainer = build_trainer(cfg, rows, model, tok, out / name, optimizers=(sgd, constant), replay=replay)
        trainer.args.max_grad_norm = 0.0  # no clipping: it would hide a wrong gradient scale
        trainer.train()
        if trainer.is_world_process_zero():
            losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
            params = {k: v.detach() for k, v in model.named_parameters()}
            torch.save({"params": params, "final_loss": losses[-1], "steps": trainer.state.global_step},
                       out / f"{name}.pt")
    if torch.distributed.is_initialized():  # gloo's threads end with the group, not at interpreter exit (an abort)
        torch.distributed.destroy_process_group()
""")


@pytest.mark.slow
def test_two_processes_train_epochs_like_one_process_at_the_same_global_batch(tmp_path, tiny_student):
    """Two epochs over 11 rows, per_device_batch_size 2 on two processes vs 4 on one: the same global batches, the
    epoch's last partial one split the same way (fillers on the process it does not reach) and the loss divided by
    the global token count, so the final loss and weights agree to 1e-6. Before, the partial batch was filled up
    with rows from the epoch's start on the second process (weights 0.09 apart here)."""
    from tests.test_trainer_matrix import REPO

    script = tmp_path / "epochs.py"
    script.write_text(EPOCHS)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}

    def run(out, per_device, *launcher):
        done = subprocess.run(
            [*launcher, str(script), str(tmp_path / out), str(per_device), str(tiny_student)],
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
            cwd=REPO,
        )
        assert done.returncode == 0, done.stderr[-3000:]
        return tmp_path / out

    one = run("one", 4, sys.executable)
    two = run(
        "two", 2, sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29521"
    )
    from safetensors.torch import load_file

    start = load_file(str(tiny_student / "model.safetensors"))
    for case in ("plain", "grouped-accum2", "replay"):
        single, double = torch.load(one / f"{case}.pt"), torch.load(two / f"{case}.pt")
        assert single["steps"] == double["steps"] > 1, case
        assert abs(double["final_loss"] - single["final_loss"]) <= 1e-6 * abs(single["final_loss"]), case
        for k, v in single["params"].items():
            torch.testing.assert_close(double["params"][k], v, rtol=1e-5, atol=1e-6, msg=f"{case} {k}")
        assert any(not torch.equal(single["params"][k], start[k]) for k in start if k in single["params"]), case


@pytest.mark.slow
def test_accelerate_asked_for_two_processes_that_starts_one_exits_2_in_one_line(tmp_path, tiny_student):
    """`accelerate launch --num_processes 2` without --multi_gpu on a machine without GPUs runs one process; train
    refuses it in one line (exit 2) instead of training alone at half the global batch."""
    from tests.helpers import write_config

    config = write_config(tmp_path, f'[train]\nstudent = "{tiny_student}"\nmax_steps = 1\n')
    accelerate = str(Path(sys.executable).parent / "accelerate")
    done = subprocess.run(
        [accelerate, "launch", "--num_processes", "2", "-m", "distillab", "train", str(config)],
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        capture_output=True,
        text=True,
        timeout=300,
    )
    ours = [line for line in done.stderr.splitlines() if line.startswith("error: accelerate launch")]
    assert ours and "--num_processes 2 started one process" in ours[0] and "--multi_gpu" in ours[0], done.stderr
    assert "non-zero exit status 2" in done.stderr  # accelerate's own report of our exit status (it exits 1)
    assert not (tmp_path / "runs" / "run" / "student").exists()
