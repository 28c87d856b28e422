"""Two CPU processes (torch.distributed, gloo) train like one: DDP plus the global token count give the same step."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

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
    cfg = from_dict({"train": {"student": student, "max_steps": 1, "batch_size": batch, "loss": "forward_kl",
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
