"""Verified rejection sampling ([verify], distillab.verify): every verifier on small inputs, the keep and re-draw
rules, bad configs in one line, and whole generate runs with a real teacher (the lab teacher, served by `distillab
serve` or local) whose reference answers are planted wrong for some prompts: those prompts are re-drawn up to the
limit (the server's own request count), reported, and never reach data/train.parquet; the yield and $ per kept
example equal a count by hand from the request cache."""

from __future__ import annotations

import json
import shutil
import textwrap

import pytest

from distillab import costs, generate, modelcard, provenance
from distillab.cache import RequestCache, request_key
from distillab.cli import _finished_line, run_cli
from distillab.config import VerifyConfig, from_dict
from distillab.dataset import read_dataset
from distillab.errors import UserError
from distillab.lab.world import get_skill
from distillab.report.html import render_page
from distillab.rundir import WHOLE, RunDir
from distillab.serve.faults import FaultConfig
from distillab.teachers import make_teacher
from distillab.testing import read_metrics, server_thread
from distillab.verify import Verifiers, kept, more_draws, summary_line
from tests.helpers import fake_evals, fake_ledger

PRICE = {"usd_per_1m_input": 2.0, "usd_per_1m_output": 8.0}


def check(method: str, completion: str, reference: str | None, skill: str = "task", **cfg) -> bool:
    record = {"prompt": "q\n", "answer": reference, "skill": skill}
    return Verifiers(VerifyConfig(method=method, **cfg))(record, completion)


# ----------------------------------------------------------------------------------------------------
# The verifiers, one by one.


def test_lab_verifier_is_the_skills_own_scorer():
    assert check("lab", "49", "49", skill="add") and check("lab", " 49\n", "49", skill="add")
    assert not check("lab", "48", "49", skill="add")
    sentence = get_skill("describe").examples("train", 1)[0].answer
    assert check("lab", sentence, sentence, skill="describe")  # word F1 of 1: the same words
    assert not check("lab", sentence.split(" ", 1)[1], sentence, skill="describe")  # partial credit is not verified


def test_exact_and_normalized():
    assert check("exact", "  Paris\n", "Paris") and not check("exact", "paris", "Paris")
    assert check("normalized", "The  Paris!", "paris") and not check("normalized", "Lyon", "paris")


def test_regex_extracts_the_last_match_and_compares_it_with_the_reference():
    pattern = r"answer is\s*(-?\d+)"
    assert check("regex", "the answer is 3... no, the answer is 42.", "42", pattern=pattern)
    assert not check("regex", "the answer is 42, no, the answer is 41", "42", pattern=pattern)
    assert not check("regex", "42", "42", pattern=pattern)  # no match: rejected
    assert check("regex", "so: 42 units", "42", pattern=r"\d+")  # no group: the whole match


def test_math_equivalence_through_math_verify():
    assert check("math", r"so the answer is $\boxed{\dfrac{1}{2}}$", r"\frac{1}{2}")
    assert check("math", "$0.5$", r"$\frac12$")
    assert check("math", r"$2\sqrt{2}$", r"$\sqrt{8}$")
    assert not check("math", "$\\frac{1}{3}$", r"\frac{1}{2}")
    assert not check("math", "I don't know", "3")


def test_user_function_imported_by_name(tmp_path, monkeypatch):
    (tmp_path / "my_checks.py").write_text(
        textwrap.dedent("""
        def same_length(prompt, completion, reference):
            return prompt == "q\\n" and len(completion.strip()) == len(reference)
    """)
    )
    monkeypatch.chdir(tmp_path)  # found in the working directory, as `python -m` would
    assert check("my_checks:same_length", " abc ", "xyz") and not check("my_checks:same_length", "ab", "xyz")


def test_the_final_answer_is_read_after_the_trace():
    assert check("exact", "<think>48? no: 40 + 9</think>\n49", "49")
    assert check("exact", "40 + 9 = 49, so</think>49", "49")  # the template opened the block itself
    assert not check("exact", "<think>49 ... cut off at max_tokens", "49")
    record = {"prompt": "q\n", "answer": "49", "skill": "add"}
    verifiers = Verifiers(VerifyConfig(method="lab"))
    assert verifiers.response(record, {"text": "49", "reasoning": "40 + 9 = 48? no, 49"})  # the separate field


@pytest.mark.parametrize(
    ("spec", "needle"),
    [
        ("no_such_module_xyz:check", "no module named 'no_such_module_xyz'"),
        ("json:no_such_function", "module 'json' has no function 'no_such_function'"),
    ],
)
def test_a_bad_module_function_is_one_line(spec, needle):
    with pytest.raises(UserError) as err:
        Verifiers(VerifyConfig(method=spec))
    assert needle in str(err.value) and spec in str(err.value) and "\n" not in str(err.value)


def test_a_bad_module_function_stops_generate_in_one_line_before_any_request(tmp_path, capfd, monkeypatch):
    monkeypatch.chdir(tmp_path)
    config = tmp_path / "c.toml"
    config.write_text(
        f'name = "v"\nruns_dir = "{tmp_path / "runs"}"\n[teacher]\ntemperature = 0.5\n'
        '[data]\nn_prompts = 4\n[verify]\nmethod = "nowhere_mod:judge"\nmax_draws = 2\n'
    )
    capfd.readouterr()
    assert run_cli(["generate", str(config)]) == 2
    out, err = capfd.readouterr()
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and "nowhere_mod:judge" in lines[0] and "Traceback" not in out + err, err
    assert not RunDir(tmp_path / "runs" / "v").cache().exists()  # nothing was asked


@pytest.mark.parametrize(
    ("verify", "extra", "needle"),
    [
        ({"method": "regex"}, {}, "needs a pattern"),
        ({"method": "regex", "pattern": "("}, {}, "not a regular expression"),
        ({"method": "fuzzy"}, {}, "choose lab, exact"),
        ({"by_skill": {"add": "no colon"}}, {}, "by_skill.add"),
        ({"keep": "first", "max_per_prompt": 2}, {}, "keeps one sample"),
        (
            {"max_draws": 1},
            {"teacher": {"samples_per_prompt": 2, "temperature": 0.7}},
            "below teacher.samples_per_prompt",
        ),
        ({"max_draws": 3}, {}, "temperature > 0"),
        ({}, {"data": {"source": "lab"}}, "asks no teacher"),
        ({"methd": "exact"}, {}, "did you mean 'verify.method'"),
    ],
)
def test_bad_verify_configs_are_one_line(verify, extra, needle):
    with pytest.raises(UserError) as err:
        from_dict({"verify": verify, **extra})
    assert needle in str(err.value) and "\n" not in str(err.value)


def test_keep_policy_and_redraws():
    cfg = VerifyConfig()
    assert kept([False, True, None, True, True], cfg) == [1, 3, 4]
    assert kept([False, True, True], VerifyConfig(keep="first")) == [1]
    assert kept([True, True, True], VerifyConfig(max_per_prompt=2)) == [0, 1]
    assert list(more_draws([False, False], samples=2, max_draws=5)) == [2, 3]
    assert list(more_draws([False] * 4, samples=2, max_draws=5)) == [4]  # up to the limit, not past it
    assert list(more_draws([False] * 5, samples=2, max_draws=5)) == []
    assert list(more_draws([False, True], samples=2, max_draws=5)) == []  # one verified: done
    assert list(more_draws([False, None], samples=2, max_draws=5)) == []  # a failed draw waits for a rerun


# ----------------------------------------------------------------------------------------------------
# Whole runs: a real teacher, reference answers planted wrong for every fourth prompt.


def planted_prompts(path, n: int = 8) -> list[dict]:
    """Lab `add` train prompts whose reference is the right sum, except every fourth: the sum + 1, which no right
    answer matches."""
    records = []
    for i, e in enumerate(get_skill("add").examples("train", n)):
        planted = i % 4 == 0
        records.append(
            {
                "prompt": e.prompt,
                "answer": str(int(e.answer) + 1) if planted else e.answer,
                "skill": "add",
                "planted": planted,
            }
        )
    path.write_text("".join(json.dumps({k: r[k] for k in ("prompt", "answer", "skill")}) + "\n" for r in records))
    return records


def verified_config(tmp_path, teacher: dict, verify: dict, name: str = "v"):
    return from_dict(
        {
            "name": name,
            "runs_dir": str(tmp_path / "runs"),
            "teacher": {"max_new_tokens": 6, "top_k_logprobs": 3, "temperature": 0.05, **PRICE, **teacher},
            "data": {"prompts_file": str(tmp_path / "prompts.jsonl")},
            "train": {"student": "lab:base"},
            "verify": verify,
        }
    )


def count_by_hand(cfg, records: list[dict]) -> dict:
    """Replays the rule from the cache with the test's own judgement (answer == reference): each prompt's draws,
    samples_per_prompt at a time while none is right, up to max_draws; what they cost at the configured price."""
    teacher, cache = make_teacher(cfg.teacher), RequestCache(RunDir(cfg.run_dir).cache())
    n, limit = cfg.teacher.samples_per_prompt, cfg.verify.max_draws
    out = {"drawn": 0, "verified": 0, "kept": set(), "unverified": [], "keys": [], "never_asked": 0, "wrong": 0}
    try:
        for r in records:
            keys, right = [], []
            while len(keys) < limit and not any(right):
                for s in range(len(keys), min(len(keys) + n, limit)):
                    keys.append(request_key(teacher.request(r["prompt"], s)))
                    right.append(cache.get(keys[-1])["text"].strip() == r["answer"])
            out["drawn"] += len(keys)
            out["verified"] += sum(right)
            out["wrong"] += len(right) - sum(right)
            out["kept"] |= {(r["prompt"], s) for s, ok in enumerate(right) if ok}
            out["keys"] += keys
            if not any(right):
                out["unverified"].append(r["prompt"])
            # the next draw was never asked: re-drawing stops at the limit (or at the first right answer)
            out["never_asked"] += not cache.cached_keys([request_key(teacher.request(r["prompt"], len(keys)))])
        usage = cache.usage(out["keys"])
    finally:
        cache.close()
    out["tokens"] = usage["prompt_tokens"] + usage["completion_tokens"]
    out["usd"] = (
        usage["prompt_tokens"] * PRICE["usd_per_1m_input"] + usage["completion_tokens"] * PRICE["usd_per_1m_output"]
    ) / 1e6
    return out


@pytest.mark.slow
def test_served_teacher_planted_answers_never_reach_training(tmp_path):
    records = planted_prompts(tmp_path / "prompts.jsonl")
    faults = FaultConfig(rate=0.2, kinds=("500",), seed=3)  # the first run loses some draws for good
    with server_thread("lab:teacher", model_name="teacher", max_batch=16, faults=faults) as server:
        teacher = {
            "model": "teacher",
            "base_url": server.base_url,
            "concurrency": 8,
            "samples_per_prompt": 2,
            "max_retries": 0,
        }
        cfg = verified_config(tmp_path, teacher, {"method": "exact", "max_draws": 6})
        interrupted = generate.run_generate(cfg, log=lambda *a: None)
        assert interrupted.failed and not interrupted.complete
        faults.rate = 0.0  # the rerun asks what failed, and the re-draws those answers call for
        summary = generate.run_generate(cfg, log=lambda *a: None)
        served = read_metrics(server.url)["distillab_answers_total"]
        again = generate.run_generate(cfg, log=lambda *a: None)  # up to date: nothing asked
        run = RunDir(cfg.run_dir)
        before = read_dataset(run.dataset("train"))
        run.stamps_file.unlink()
        run.dataset("train").unlink()
        resumed = generate.run_generate(cfg, log=lambda *a: None)  # rebuilt from the cache: nothing asked either
        assert read_metrics(server.url)["distillab_answers_total"] == served

    hand = count_by_hand(cfg, records)
    planted = [r["prompt"] for r in records if r["planted"]]
    # every planted prompt was drawn up to the limit, then given up on; the server answered each draw once
    assert set(planted) <= set(hand["unverified"])
    # every draw answered once over the two runs
    assert served == hand["drawn"] == interrupted.requests_sent - interrupted.failed + summary.requests_sent
    assert hand["never_asked"] == len(records) and summary.complete and not summary.failed
    assert hand["drawn"] >= len(records) * 2 + len(planted) * 4

    rows = read_dataset(run.dataset("train"))
    stable = lambda rs: [{k: v for k, v in r.items() if k != "created_at"} for r in rs]  # noqa: E731
    assert stable(rows) == stable(before) and resumed.rows == len(rows) == len(hand["kept"]) and again.skipped
    assert all(r["completion"].strip() == r["answer"] for r in rows)  # only verified samples are trained on
    assert not {r["prompt"] for r in rows} & set(planted)
    assert {(r["prompt"], r["sample"]) for r in rows} == hand["kept"]
    rejected = read_dataset(run.rejected)
    assert len(rejected) == hand["wrong"] and all(r["completion"].strip() != r["answer"] for r in rejected)

    v = summary.verification
    assert v == resumed.verification == json.loads(run.generate_summary().read_text())["verification"]
    total = v["total"]
    assert (total["drawn"], total["verified"], total["kept"]) == (hand["drawn"], hand["verified"], len(hand["kept"]))
    assert total["yield"] == pytest.approx(hand["verified"] / hand["drawn"])
    assert total["unverified_prompts"] == len(hand["unverified"]) and set(planted) <= set(v["unverified_examples"])
    assert total["tokens_per_kept"] == pytest.approx(hand["tokens"] / len(hand["kept"]))
    assert total["usd"] == pytest.approx(hand["usd"]) and total["usd"] == pytest.approx(summary.usd)
    assert total["usd_per_kept"] == pytest.approx(hand["usd"] / len(hand["kept"]))
    assert v["skills"]["add"] == total

    # the CLI's line, the ledger, the report and the lineage card say the same
    line = _finished_line(cfg, "generate:train", summary, WHOLE)
    assert f"yield {hand['verified'] / hand['drawn']:.0%} ({hand['verified']}/{hand['drawn']} verified)" in line
    assert f"${hand['usd'] / len(hand['kept']):.6f} per kept example" in line
    assert f"{len(hand['unverified'])} of {len(records)} prompts without a verified sample" in line
    ledger_line = costs.teacher_generation(cfg, costs.teacher_pricing(cfg))
    assert ledger_line.verification.total.usd_per_kept == pytest.approx(hand["usd"] / len(hand["kept"]))
    ledger = fake_ledger() | {"teacher_generation": ledger_line.to_dict()}
    page = render_page("v", fake_evals(), ledger, None, None)
    assert "<table id='verification'>" in page and f"${hand['usd'] / len(hand['kept']):.6f}" in page
    assert f"<td class='num'>{hand['drawn']}</td>" in page and "teacher samples verified" in page
    lineage = provenance.build_lineage(run.dataset("train"), base_model="lab:base")
    card = modelcard.model_card(lineage | {"verification": v})
    assert "## Verification" in card and f"| add | {len(records)} | {hand['drawn']} | {hand['verified']} |" in card


@pytest.mark.slow
def test_local_teacher_more_draws_reuse_the_cache_and_shards_add_up(tmp_path, monkeypatch):
    """Raising max_draws asks only the new draws; two shards (small chunks, re-draws queued between them) give the
    whole run's rows and counts."""
    monkeypatch.setattr(generate, "CHUNK_ROWS", 3)  # three chunks
    records = planted_prompts(tmp_path / "prompts.jsonl")
    teacher = {"model": "lab:teacher", "batch_size": 8}
    fewer = verified_config(tmp_path, teacher, {"method": "lab", "max_draws": 2, "keep": "first"})
    first = generate.run_generate(fewer, log=lambda *a: None)
    cfg = verified_config(tmp_path, teacher, {"method": "lab", "max_draws": 3, "keep": "first"})
    whole = generate.run_generate(cfg, log=lambda *a: None)
    hand, hand_fewer = count_by_hand(cfg, records), count_by_hand(fewer, records)
    assert first.requests_sent == hand_fewer["drawn"] and whole.requests_sent == hand["drawn"] - hand_fewer["drawn"]
    assert whole.verification["total"]["drawn"] == hand["drawn"] and whole.rows == len(hand["kept"])
    assert whole.verification["verifiers"] == {"add": "lab"} and whole.verification["keep"] == "first"
    assert hand["never_asked"] == len(records)

    sharded = verified_config(tmp_path, teacher, {"method": "lab", "max_draws": 3, "keep": "first"}, name="sharded")
    RunDir(sharded.run_dir).root.mkdir(parents=True)
    for i in range(2):  # the same answers: each shard's own cache starts as a copy of the whole run's
        shutil.copy(RunDir(cfg.run_dir).cache(), RunDir(sharded.run_dir).cache((i, 2)))
    parts = [generate.run_generate(sharded, log=lambda *a: None, shard=(i, 2)) for i in range(2)]
    assert [p.requests_sent for p in parts] == [0, 0] and {p.rows for p in parts} != {0}
    combined = json.loads(RunDir(sharded.run_dir).generate_summary().read_text())["verification"]
    assert combined["total"] == whole.verification["total"]
    assert sum(p.verification["total"]["kept"] for p in parts) == whole.rows
    rows = read_dataset(RunDir(sharded.run_dir).dataset("train"))
    key = lambda r: (r["prompt"], r["sample"], r["completion"])  # noqa: E731
    assert sorted(map(key, rows)) == sorted(map(key, read_dataset(RunDir(cfg.run_dir).dataset("train"))))
    assert len(read_dataset(RunDir(sharded.run_dir).rejected)) == hand["wrong"]


def test_nothing_verified_is_one_line_and_the_rejected_file_is_kept(tmp_path):
    records = planted_prompts(tmp_path / "prompts.jsonl", n=3)
    (tmp_path / "prompts.jsonl").write_text(
        "".join(json.dumps({"prompt": r["prompt"], "answer": "wrong", "skill": "add"}) + "\n" for r in records)
    )
    cfg = verified_config(tmp_path, {"model": "lab:teacher", "temperature": 0.0}, {"method": "exact"})
    with pytest.raises(UserError) as err:
        generate.run_generate(cfg, log=lambda *a: None)
    assert "no sample passed [verify] (0 of 3 verified)" in str(err.value) and "\n" not in str(err.value)
    run = RunDir(cfg.run_dir)
    assert len(read_dataset(run.rejected)) == 3 and not run.dataset("train").exists()


def test_a_prompt_the_verifier_cannot_judge_is_refused_before_any_request(tmp_path):
    (tmp_path / "prompts.jsonl").write_text('{"prompt": "2+2=\\n", "answer": "4"}\n{"prompt": "3+3=\\n"}\n')
    lab = verified_config(tmp_path, {"model": "lab:teacher"}, {"method": "lab"})
    with pytest.raises(UserError, match="prompt line 1: .* skill is 'task'"):
        generate.run_generate(lab, log=lambda *a: None)
    exact = verified_config(tmp_path, {"model": "lab:teacher"}, {"method": "exact"})
    with pytest.raises(UserError, match="prompt line 2: .* this prompt has none"):
        generate.run_generate(exact, log=lambda *a: None)
    assert not RunDir(exact.run_dir).cache().exists()


def test_summary_line_lists_skills_and_unverified_prompts():
    from distillab.verify import Tally, VerifyStats

    stats = VerifyStats(
        skills={
            "add": Tally(
                prompts=2, drawn=4, verified=1, kept=1, unverified_prompts=1, prompt_tokens=30, completion_tokens=10
            ),
            "sub": Tally(prompts=1, drawn=1, verified=1, kept=1, prompt_tokens=10, completion_tokens=2),
        },
        examples=["1+1=\n"],
    )
    block = stats.record(Verifiers(VerifyConfig(max_draws=3)), 1, lambda u: u["completion_tokens"] / 1e6, None)
    line = summary_line(block)
    assert line.splitlines()[0] == (
        "verify: yield 40% (2/5 verified), 2 kept, 1 of 3 prompts without a verified "
        "sample; 26 tokens and $0.000006 per kept example"
    )
    assert "  add: yield 25% (1/4 verified)" in line and "'1+1=\\n'" in line
