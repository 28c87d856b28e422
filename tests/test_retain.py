"""Retain: replay share per batch, merges at the ends of the α grid, the selection rule and what it reads,
self replay that asks the teacher nothing, and the one-line errors of a bad [retain] section."""

from __future__ import annotations

import copy

import pytest
import torch

from distillab import retain, scoring
from distillab.config import ConfigError, from_dict
from distillab.dataset import read_dataset
from distillab.general_prompts import SampledPrompts
from distillab.generate import run_generate
from distillab.models import load
from distillab.retain import Candidate, batch_layout, interpolate, load_weights, replay_per_batch, select
from distillab.select import choose_student
from distillab.stage import run_stage
from distillab.train import build_trainer, run_train
from distillab.trainrows import ArrowRows
from tests.helpers import run_config, tiny_config


def retain_config(tmp_path, teacher, student, name="kept", **retain_section):
    """A tiny run with a [retain] section: 10 general prompts, a dev split of 3 per skill."""
    return tiny_config(
        tmp_path,
        teacher,
        student,
        name=name,
        teacher={"batch_size": 16},
        eval={"general": ["upper", "reverse"]},
        retain={"n_general_prompts": 10, "dev_n_per_skill": 3, **retain_section},
        max_steps=4,
        sft_weight=0.0,
    )


# ----------------------------------------------------------------------------------------------------
# Replay in every batch.


@pytest.mark.parametrize(
    "batch_size,fraction,expected", [(32, 0.25, 8), (32, 0.1, 3), (4, 0.05, 1), (4, 0.9, 3), (8, 0.0, 0)]
)
def test_replay_per_batch(batch_size, fraction, expected):
    assert replay_per_batch(batch_size, fraction) == expected


def test_layout_puts_the_share_in_every_batch_and_covers_the_task_evenly():
    layout = batch_layout(n_task=50, n_replay=7, batch_size=10, fraction=0.3, n_batches=20, seed=0)
    assert len(layout) == 200
    for b in range(20):
        batch = layout[b * 10 : (b + 1) * 10]
        assert sum(source == "replay" for source, _ in batch) == 3
    task_seen = [i for source, i in layout if source == "task"]  # 140 = 2 full passes + 40
    counts = [task_seen.count(i) for i in range(50)]
    assert min(counts) >= 2 and max(counts) <= 3


@pytest.mark.parametrize("group_by_length", [False, True])
def test_trainer_batches_hold_the_configured_replay_share(tmp_path, tiny_teacher, tiny_student, group_by_length):
    cfg = retain_config(tmp_path, tiny_teacher, tiny_student, replay_fraction=0.5)
    cfg.train.group_by_length = group_by_length  # rows move between batches, each batch's replay count stays
    run_generate(cfg, log=lambda *_: None)
    replay = read_dataset(cfg.run_dir / "data" / "replay.parquet")
    assert replay and all(r["teacher_id"] == f"{tiny_student} (self)" for r in replay)
    assert all(r["top_ids"] for r in replay)  # self-distillation: the base's own top-k logprobs
    model, tok = load(tiny_student)
    # as run_train reads them: streamed from the Arrow copy, a batch at a time
    task_rows, replay_rows = (ArrowRows(cfg.run_dir / "data" / f"{name}.parquet") for name in ("train", "replay"))
    trainer = build_trainer(cfg, task_rows, model, tok, tmp_path / "ckpt", replay=replay_rows)
    trainer.data_collator = lambda items: {"rows": trainer.train_dataset.fetch(items)}  # the rows of each batch
    replay_prompts = {tuple(r["prompt_ids"]) for r in replay}
    batches = list(trainer.get_train_dataloader())
    assert len(batches) == cfg.train.max_steps
    for batch in batches:
        assert sum(tuple(r["prompt_ids"]) in replay_prompts for r in batch["rows"]) == 2  # half of 4


def test_self_replay_asks_the_served_teacher_nothing(tmp_path, tiny_teacher, tiny_student):
    from distillab.testing import metric_sum, server_thread
    from distillab.testing import read_metrics as metrics

    with server_thread(tiny_teacher, model_name="tiny", max_batch=16) as server:
        cfg = retain_config(tmp_path, tiny_teacher, tiny_student, replay_fraction=0.25)
        cfg.teacher.model, cfg.teacher.base_url = "tiny", server.base_url
        summary = run_generate(cfg, log=lambda *_: None)
        asked = metric_sum(metrics(server.url), "distillab_requests_total")
    replay = read_dataset(cfg.run_dir / "data" / "replay.parquet")
    assert summary.requests_sent == 12 and asked == 12  # the task prompts, and not one replay prompt
    assert len(replay) == 10 and all(r["teacher_id"].endswith("(self)") for r in replay)


def test_with_no_outside_prompts_the_base_writes_its_own(tmp_path, tiny_teacher, tiny_student):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("".join(f'{{"prompt": "{a}+{a}=\\n"}}\n' for a in range(12)))
    cfg = retain_config(tmp_path, tiny_teacher, tiny_student, replay_fraction=0.25)
    cfg.data.prompts_file = str(prompts)
    assert retain.lab_general_skills(cfg) == []
    run_generate(cfg, log=lambda *_: None)
    replay = read_dataset(cfg.run_dir / "data" / "replay.parquet")
    assert 0 < len(replay) <= 10 and all(r["prompt"].strip() for r in replay)
    again = run_stage(SampledPrompts(), cfg)  # stamped: a rerun reads the same set back
    assert again.skipped and {r["prompt"] for r in replay} <= {p["prompt"] for p in again.prompts}


def test_user_prompts_hold_out_a_dev_share_and_general_checks_come_from_a_file(tmp_path, tiny_teacher, tiny_student):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("".join(f'{{"prompt": "{a}+{a + 1}=\\n"}}\n' for a in range(40)))
    checks = tmp_path / "general.jsonl"
    checks.write_text(
        '{"prompt": "upper ab\\n", "answer": "AB", "skill": "upper"}\n'
        '{"prompt": "1+1=\\n", "choices": ["2", "3"], "answer": 0, "skill": "mc"}\n'
    )
    cfg = retain_config(
        tmp_path, tiny_teacher, tiny_student, merge_alphas=[0.5], dev_fraction=0.25, general_dev_file=str(checks)
    )
    cfg.data.prompts_file = str(prompts)
    run_generate(cfg, log=lambda *_: None)
    train = {r["prompt"] for r in read_dataset(cfg.run_dir / "data" / "train.parquet")}
    dev = {r["prompt"] for r in read_dataset(cfg.run_dir / "data" / "dev.parquet")}
    assert dev and train and not dev & train and len(dev | train) == 40
    task, general, examples = retain.dev_suites(cfg)
    assert task == [] and general == []
    assert {e["skill"] for e in examples} == {"dev:task", "dev:general:upper", "dev:general:mc"}
    model, tok = load(tiny_student)
    dev_task, dev_general = retain.dev_scores(model, tok, cfg)
    assert 0.0 <= dev_task <= 1.0 and 0.0 <= dev_general <= 1.0


# ----------------------------------------------------------------------------------------------------
# Merge.


def test_merge_at_zero_is_the_base_and_at_one_the_distilled(tiny_student, tiny_teacher):
    base, _ = load(tiny_student)
    tuned = copy.deepcopy(base)
    with torch.no_grad():
        for p in tuned.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    ids = torch.tensor([[1, 5, 9, 12, 7]])
    base_state = {k: v.clone() for k, v in base.state_dict().items()}
    tuned_state = {k: v.clone() for k, v in tuned.state_dict().items() if k != "lm_head.weight"}  # tied: saved once
    probe = copy.deepcopy(base)
    want = {0.0: base(ids).logits, 1.0: tuned(ids).logits}
    for alpha, expected in want.items():
        load_weights(probe, interpolate(base_state, tuned_state, alpha))
        assert torch.allclose(probe(ids).logits, expected, atol=1e-6), alpha
    load_weights(probe, interpolate(base_state, tuned_state, 0.5))
    half = probe.model.embed_tokens.weight
    assert torch.allclose(half, (base.model.embed_tokens.weight + tuned.model.embed_tokens.weight) / 2, atol=1e-6)
    assert probe.lm_head.weight.data_ptr() == half.data_ptr()  # still tied


# ----------------------------------------------------------------------------------------------------
# The rule.


def _c(step, alpha, task, general):
    return Candidate(f"checkpoint-{step}", step, alpha, task, general)


def test_rule_takes_the_best_task_that_keeps_general():
    cands = [_c(2, 1.0, 0.9, 0.30), _c(2, 0.5, 0.6, 0.50), _c(4, 0.5, 0.7, 0.49), _c(4, 1.0, 0.95, 0.10)]
    chosen, why = select(cands, base_dev_general=0.50, max_general_drop=0.02)
    assert (chosen.step, chosen.alpha) == (4, 0.5) and "highest dev task" in why


def test_rule_falls_back_to_task_minus_general_drop():
    cands = [_c(2, 1.0, 0.9, 0.10), _c(2, 0.5, 0.6, 0.40)]  # drops 0.4 and 0.1 from base 0.5
    chosen, why = select(cands, base_dev_general=0.50, max_general_drop=0.02)
    assert (chosen.step, chosen.alpha) == (2, 0.5) and "no candidate kept" in why  # 0.6-0.1 > 0.9-0.4


def test_selection_reads_the_dev_split_only_and_writes_the_choice(tmp_path, tiny_teacher, tiny_student, monkeypatch):
    cfg = retain_config(tmp_path, tiny_teacher, tiny_student, merge_alphas=[0.0, 0.5], select_checkpoints=True)
    run_generate(cfg, log=lambda *_: None)
    run_train(cfg, log=lambda *_: None)
    splits, given = [], []
    real_score, real_select = scoring.score_skill, retain.select

    def spy_score(model, tok, skill, n, max_new_tokens, split="test"):
        splits.append(split)
        return real_score(model, tok, skill, n, max_new_tokens, split)

    def spy_select(candidates, *args):
        given.append(list(candidates))
        return real_select(candidates, *args)

    monkeypatch.setattr(scoring, "score_skill", spy_score)
    monkeypatch.setattr(retain, "select", spy_select)
    record = choose_student(cfg, log=lambda *_: None)
    assert splits and set(splits) == {"dev"}  # no test example was scored while choosing
    assert len(given[0]) == 2 * 3  # checkpoints 2 and 4 x α in {0, 0.5, 1}
    assert {(c.step, c.alpha) for c in given[0]} == {(s, a) for s in (2, 4) for a in (0.0, 0.5, 1.0)}
    chosen = record["chosen"]
    # the student on disk is the chosen candidate: α = 0 is exactly the base
    student, _ = load(cfg.run_dir / "student")
    base, _ = load(tiny_student)
    if chosen["alpha"] == 0.0:
        assert all(torch.equal(a, b) for a, b in zip(student.state_dict().values(), base.state_dict().values()))
    assert (cfg.run_dir / "student" / "retain.json").is_file() and (cfg.run_dir / "student" / "README.md").is_file()
    # a rerun with nothing changed scores nothing
    splits.clear()
    choose_student(cfg, log=lambda *_: None)
    assert splits == []


# ----------------------------------------------------------------------------------------------------
# Bad input.


@pytest.mark.parametrize(
    "section,needle",
    [
        ({"merge_alphas": [0.5, 1.5]}, "merge_alphas must lie in [0, 1]"),
        ({"merge_alphas": [-0.1]}, "merge_alphas must lie in [0, 1]"),
        ({"max_general_drop": -0.01}, "retain.max_general_drop"),
        ({"replay_fraction": 1.0}, "retain.replay_fraction"),
        ({"replay_sourc": "base"}, "did you mean 'retain.replay_source'"),
    ],
)
def test_bad_retain_section_is_one_line(section, needle):
    with pytest.raises(ConfigError) as err:
        from_dict({"retain": section})
    assert needle in str(err.value) and "\n" not in str(err.value)


def test_replay_with_no_general_prompts_and_sampling_off_is_refused_before_writing(
    tmp_path, tiny_teacher, tiny_student
):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"prompt": "hello\\n"}\n')
    cfg = run_config(
        tmp_path,
        "x",
        teacher={"model": str(tiny_teacher)},
        data={"prompts_file": str(prompts)},
        train={"student": str(tiny_student)},
        retain={"replay_fraction": 0.1, "sample_general_prompts": False},
    )
    from distillab.errors import UserError

    with pytest.raises(UserError, match="needs general prompts"):
        run_generate(cfg, log=lambda *_: None)
    assert not (tmp_path / "runs").exists()
