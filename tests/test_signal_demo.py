"""The signal demo: its two lab skills (teacher-unseen splits, a distribution, a trace), its scores against naive
references, and its intervals over seeds and prompts."""

import os
import random
import signal
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from distillab import signal_demo
from distillab.errors import UserError
from distillab.lab import world
from distillab.lab.pretrain import PRESETS, training_pool
from distillab.lab.tokenizer import build_tokenizer
from distillab.reasoning import final_answer
from tests.helpers import tiny_llama


def test_carry_trace_is_column_addition():
    rng = random.Random(0)
    for _ in range(300):
        a, b = rng.randint(100, 999), rng.randint(100, 999)
        lines = world.carry_trace(a, b).split("\n")
        assert lines[-1].split()[-1] == str(a + b)  # the last line holds the whole answer
        carry = 0
        for column, line in enumerate(lines[:3]):  # each line: digit + digit (+1) = their sum, as a column is added
            expression, total, so_far = line.replace("=", " ").split()
            digits = [int(d) for d in expression.split("+")]
            assert digits[:2] == [int(str(a)[2 - column]), int(str(b)[2 - column])]
            assert digits[2:] == ([1] if carry else [])
            assert int(total) == sum(digits) and so_far == str(a + b)[-(column + 1) :]
            carry = int(total) // 10
        assert (len(lines) == 4) == (a + b >= 1000)


def test_carry_completion_is_read_back_as_its_answer():
    for example in world.get_skill("carry").examples("train", 20):
        assert final_answer(example.completion) == example.answer == str(sum(map(int, example.prompt.split()[1:])))


def test_carry_student_splits_are_disjoint_and_unseen_by_the_teacher():
    skill = world.get_skill("carry")
    regions = {split: {e.prompt for e in skill.examples(split, 2000)} for split in ("teacher", "train", "dev", "test")}
    for one in regions:
        for other in regions:
            if one < other:
                assert not regions[one] & regions[other], (one, other)


def test_habit_teacher_never_sees_the_students_questions_and_knows_every_entity():
    skill = world.get_skill("habit")
    student = {e.prompt for e in skill.examples("train", 100)}
    teacher = {e.prompt for e in skill.examples("teacher", 200)}
    assert len(student) == 100 and len(teacher) == 200 and not student & teacher
    assert {world.habit_entity(q) for q in student} == set(world.HABIT_DISTRIBUTION)  # one question each
    assert {world.habit_entity(q) for q in teacher} == set(world.HABIT_DISTRIBUTION)  # taught in two others
    assert {e.prompt for e in skill.examples("test", 100)} == student  # scored against the world's distribution


def test_habit_answers_are_draws_from_the_entitys_distribution():
    examples = world.get_skill("habit").examples("teacher", 20_000, seed=5)
    counts: dict[str, dict[str, int]] = {}
    for e in examples:
        counts.setdefault(world.habit_entity(e.prompt), {}).setdefault(e.answer, 0)
        counts[world.habit_entity(e.prompt)][e.answer] += 1
    worst = max(
        abs(n / sum(seen.values()) - world.HABIT_DISTRIBUTION[ent][habit])
        for ent, seen in counts.items()
        for habit, n in seen.items()
    )
    assert worst < 0.12  # ~200 draws an entity: within a few standard errors of the world's probabilities
    for habits in world.HABIT_DISTRIBUTION.values():
        assert abs(sum(habits.values()) - 1) < 1e-9 and sorted(habits.values())[-1] > sorted(habits.values())[-2]


def test_signal_skills_stay_out_of_the_classic_general_suite():
    assert not set(world.SIGNAL_SKILLS) & set(world.SKILLS)
    assert world.get_skill("habit") is world.SIGNAL_SKILLS["habit"]


def test_signal_teacher_pretrains_on_the_teacher_region_only():
    tok = build_tokenizer()
    pools = training_pool(tok, PRESETS["signal-teacher"], per_skill=300)
    decoded = {tok.decode(p, skip_special_tokens=True) for _, pool in pools for p, _ in pool}
    student = {e.prompt for name in world.SIGNAL_SKILLS for e in world.get_skill(name).examples("train", 300)}
    assert decoded and not decoded & student
    assert any(q.startswith("sum ") for q in decoded) and any(world.habit_entity(q) for q in decoded if "habit" in q)


def _naive_probability(model, tok, prompt: str, answer: str) -> float:
    """p(answer + end of sequence | prompt), one token at a time."""
    ids = tok(prompt)["input_ids"]
    target = tok(answer, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    logp = 0.0
    with torch.no_grad():
        for token in target:
            logits = model(input_ids=torch.tensor([ids])).logits[0, -1]
            logp += float(logits.log_softmax(-1)[token])
            ids = ids + [token]
    return float(np.exp(logp))


def test_habit_scores_match_a_naive_reference():
    tok = build_tokenizer()
    model = tiny_llama(len(tok), seed=3).eval()
    scores = signal_demo.habit_scores(model, tok)
    questions = [e.prompt for e in world.get_skill("habit").examples("test", 100)]
    for i in (0, 57):
        truth = world.HABIT_DISTRIBUTION[world.habit_entity(questions[i])]
        p = {h: _naive_probability(model, tok, questions[i], h) for h in world.HABITS}
        assert scores["sample_accuracy"][i] == pytest.approx(sum(p[h] * truth[h] for h in p), rel=1e-4)
        tv = 0.5 * (sum(abs(p[h] - truth[h]) for h in p) + 1 - sum(p.values()))
        assert scores["tv"][i] == pytest.approx(tv, rel=1e-4)
        assert scores["mode"][i] == float(max(p, key=p.get) == max(truth, key=truth.get))


def test_seeds_and_prompts_interval_against_a_loop():
    rng = np.random.default_rng(1)
    values = rng.normal(size=(3, 40)).tolist()
    lo, hi = signal_demo.seeds_and_prompts_ci(values, n_boot=400, seed=7)
    draws = np.random.default_rng(7)
    seed_draws, prompt_draws = draws.integers(0, 3, size=(400, 3)), draws.integers(0, 40, size=(400, 40))
    means = sorted(sum(values[s][p] for s in seed_draws[b] for p in prompt_draws[b]) / (3 * 40) for b in range(400))
    assert lo == pytest.approx(np.quantile(means, 0.025)) and hi == pytest.approx(np.quantile(means, 0.975))
    assert signal_demo.seeds_and_prompts_ci([[0.5] * 10] * 3, n_boot=50) == [0.5, 0.5]


def test_a_win_holds_in_every_seed():
    better = [[1.0] * 30, [1.0] * 30, [1.0] * 30]
    base = [[0.0] * 30, [0.0] * 30, [0.0] * 30]
    assert signal_demo.compare(better, base)["win"]
    assert not signal_demo.compare(base, better)["win"]
    assert signal_demo.compare(base, better, higher_is_better=False)["win"]  # lower is better: a distance
    one_seed_against = [[1.0] * 30, [1.0] * 30, [-0.5] * 30]  # the mean is up, one seed is down
    assert not signal_demo.compare(one_seed_against, base)["win"]
    verdict = signal_demo.comparison_verdict
    assert verdict(signal_demo.compare(better, base)) == "win"
    assert verdict(signal_demo.compare(base, better)) == "the other way, every seed"
    assert verdict(signal_demo.compare(one_seed_against, base)) == "no win"


def test_every_arm_of_a_family_trains_the_same_student_alike(tmp_path):
    """Arms differ only in their data and loss: a difference between two arms is then theirs, not a budget's."""
    for family in signal_demo.FAMILIES:
        configs = [signal_demo.arm_config(tmp_path, family, arm, seed=1) for arm in family.arms]
        budgets = {
            (c.train.student, c.train.max_steps, c.train.per_device_batch_size, c.train.lr, c.train.seed)
            for c in configs
        }
        prompts = {(c.data.skills[0], c.data.n_prompts, c.data.seed) for c in configs}
        assert len(budgets) == 1 and len(prompts) == 1, family.name
        assert budgets.pop()[1:3] == (family.max_steps, family.batch)
        assert len({c.name for c in configs}) == len(family.arms)  # one run directory an arm


def test_every_teacher_setting_is_asked_once_a_seed_before_its_arms_train():
    jobs = signal_demo.demo_jobs(seeds=(0, 1))
    asks = [j for j in jobs if j.kind == "ask"]
    for family in signal_demo.FAMILIES:
        settings = {repr(sorted(a.teacher.items())) for a in family.arms}
        assert len([j for j in asks if j.family is family]) == 2 * len(settings)  # once per setting and seed
        for arm in family.arms:  # every arm's asker asks what the arm needs
            assert signal_demo.asker(family, arm).teacher == arm.teacher
    assert len([j for j in jobs if j.kind == "arm"]) == 2 * sum(len(f.arms) for f in signal_demo.FAMILIES)
    # the longest go first: the reasoning family's traces before the distribution's greedy text
    by_cost = sorted(jobs, key=signal_demo.Job.cost, reverse=True)
    assert by_cost[0].family.name == "reasoning" and by_cost[-1].kind == "fixed"


def _tiny_habit_family(n_prompts: int, *arms) -> signal_demo.Family:
    """The distribution family in miniature: seconds of work a job, so the runner is what a test measures."""
    return signal_demo.Family(
        name="distribution",
        skill="habit",
        n_prompts=n_prompts,
        max_steps=2,
        batch=4,
        decontaminate=False,
        general_n=2,
        arms=list(arms),
    )


@pytest.mark.slow
def test_the_signal_demo_gives_the_same_numbers_on_any_number_of_workers(tmp_path):
    """Each job computes on one thread in its own process from its own seeds: two workers and one worker give the
    same table, to the last digit."""
    family = _tiny_habit_family(
        6,
        signal_demo.Arm("SFT on greedy text", signal_demo.GREEDY, signal_demo.SFT),
        signal_demo.Arm("off-policy KD", signal_demo.SAMPLED, signal_demo.KD),
    )

    def table(runs_dir, workers):
        summary = signal_demo.run_signal_demo(
            runs_dir, log=lambda *a: None, seeds=(0, 1), families=[family], workers=workers
        )
        rows = summary["families"]["distribution"]["rows"]
        return {label: {k: v for k, v in row.items() if k != "train_seconds"} for label, row in rows.items()}

    two = table(tmp_path / "a", 2)
    assert table(tmp_path / "b", 1) == two
    assert two["off-policy KD"]["teacher_data"]["rows"] == 2 * 6 * 4  # seeds x prompts x samples
    assert two["SFT on greedy text"]["teacher_data"]["rows"] == 2 * 6


def test_one_family_is_chosen_by_name_and_an_unknown_one_refused():
    assert [f.name for f in signal_demo.chosen_families([])] == ["distribution", "reasoning"]
    assert [f.name for f in signal_demo.chosen_families(["reasoning"])] == ["reasoning"]
    with pytest.raises(UserError, match="'carry': the signal demo's families are distribution, reasoning"):
        signal_demo.chosen_families(["reasoning", "carry"])


@pytest.mark.slow
def test_a_worker_killed_mid_job_is_one_clear_error(tmp_path):
    """A worker that dies (the OOM killer, a kill -9) is named as such, not a BrokenProcessPool traceback."""
    family = _tiny_habit_family(4, signal_demo.Arm("SFT on greedy text", signal_demo.GREEDY, signal_demo.SFT))

    def kill_the_worker():
        for _ in range(600):  # the spawned worker: a child of this process running multiprocessing's spawn_main
            for pid in os.listdir("/proc"):
                try:
                    cmdline = (Path("/proc") / pid / "cmdline").read_bytes()
                    stat = (Path("/proc") / pid / "stat").read_text()
                except OSError:
                    continue
                if b"spawn_main" in cmdline and int(stat.rsplit(")", 1)[1].split()[1]) == os.getpid():
                    time.sleep(1.0)  # inside its first job
                    os.kill(int(pid), signal.SIGKILL)
                    return
            time.sleep(0.05)

    killer = threading.Thread(target=kill_the_worker)
    killer.start()
    with pytest.raises(UserError, match="a worker process died during distribution .* rerun the same command"):
        signal_demo.run_signal_demo(tmp_path, log=lambda *a: None, seeds=(0,), families=[family], workers=1)
    killer.join()
