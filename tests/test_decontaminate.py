"""Decontamination and deduplication of the task prompts, before the teacher is paid (distillab.decontaminate).

The served-teacher test proves "before": a real `distillab serve` answers the run, and its own count of answers is
the number of clean prompts. The n-gram rule is checked against a naive reference on random text, and MinHash LSH
against exact Jaccard on planted near duplicates.
"""

from __future__ import annotations

import json
import random
import re
import time
from pathlib import Path

import pytest

from distillab.config import ConfigError, from_dict
from distillab.dataset import read_dataset
from distillab.decontaminate import (
    Duplicates,
    SuiteIndex,
    SuiteItem,
    decontaminate,
    ngrams,
    shingles,
    summary_line,
    words,
)
from distillab.demo import demo_config, retain_config
from distillab.errors import UserError
from distillab.generate import run_generate
from distillab.lab.world import get_skill
from distillab.prompts import load_prompts
from distillab.retain import split_dev_prompts
from distillab.rundir import WHOLE, RunDir
from distillab.testing import read_metrics, server_thread
from tests.helpers import fake_evals, fake_ledger, provenance_dataset, run_config, write_jsonl

quiet = {"log": lambda *a: None}

# The task suite the run is scored on (eval.task_file): word problems, one per line.
TASK_ITEMS = [
    "a farmer has 17 sheep and buys 5 more sheep at the market how many sheep does he have now",
    "a train leaves the station at noon travelling 60 miles an hour how far has it gone by three",
    "tom reads 12 pages of his book every evening for a week how many pages has he read in all",
]
CLEAN = [
    "name a fruit that is yellow and grows on trees in warm places",
    "write one line about the sea at night when the moon is full and bright and the tide is coming in slowly "
    "over the sand",
    "give me a word that rhymes with cat",
    "list three colors you might see in a rainbow",
    "say hello in a friendly way",
    "what sound does a small dog make when it is happy",
]


def task_file(tmp_path, items=TASK_ITEMS) -> Path:
    return write_jsonl(tmp_path / "tasks.jsonl", [{"prompt": p, "answer": "x"} for p in items])


def prompts_config(tmp_path, prompts: list[str], teacher: dict | None = None, answers: bool = False, **tables):
    """A run on a prompts file (with answers: data.source "human", no teacher), scored on TASK_ITEMS (eval.task_file)
    and 5 test items of each lab skill; `tables` replace the config's tables."""
    rows = [{"prompt": p, **({"answer": "ok"} if answers else {})} for p in prompts]
    data = {
        "prompts_file": str(write_jsonl(tmp_path / "prompts.jsonl", rows)),
        **({"source": "human"} if answers else {}),
    }
    return run_config(
        tmp_path,
        **{
            "teacher": {"max_new_tokens": 4, "top_k_logprobs": 3, **(teacher or {})},
            "data": data,
            "eval": {"n_per_skill": 5, "task_file": str(task_file(tmp_path))},
            **tables,
        },
    )


# ----------------------------------------------------------------------------------------------------
# The rule.


def test_words_are_lower_case_without_punctuation_but_keep_the_operators_a_question_needs():
    assert words("A Farmer, has 17 SHEEP!  (How many?)") == ["a", "farmer", "has", "17", "sheep", "how", "many"]
    assert words("**Problem** - solve x^2+3x-4=0") == ["problem", "solve", "x", "^", "2", "+", "3x", "-", "4", "=", "0"]
    # the lab has both: stripping the operator would make every add prompt a sub test item
    assert words("55+51=\n") != words("55-51=\n")
    assert words("ﬁnd ＡＢＣ") == ["find", "abc"]  # NFKC


def naive_contaminated(prompt: str, items: list[str], n: int) -> bool:
    """The rule written the slow, obvious way: lower case, punctuation to spaces, split; any shared n-gram, or the
    whole text for a prompt shorter than n words."""

    def toks(text):
        return re.sub(r"[^\w\s]", " ", text.lower()).split()

    t = toks(prompt)
    if len(t) < n:
        return any(t == toks(item) for item in items) and bool(t)
    grams = {tuple(t[i : i + n]) for i in range(len(t) - n + 1)}
    return any(tuple(u[i : i + n]) in grams for u in map(toks, items) for i in range(len(u) - n + 1))


@pytest.mark.parametrize("n", [2, 3, 8])
def test_ngram_rule_matches_a_naive_reference_on_random_text(n):
    rng = random.Random(n)
    vocab = [f"w{i}" for i in range({2: 40, 3: 10, 8: 3}[n])]  # small: shared n-grams happen by chance too

    def text(length):
        out = []
        for _ in range(length):
            w = rng.choice(vocab)
            out.append(
                (w.upper() if rng.random() < 0.2 else w) + (rng.choice(",.;:!?'\"()") if rng.random() < 0.2 else "")
            )
        return " ".join(out)

    items = [text(rng.randint(1, 14)) for _ in range(60)]
    prompts = [text(rng.randint(1, 16)) for _ in range(400)]
    # and prompts that copy a window of an item, or the whole of a short one, into other text
    for _ in range(100):
        item = rng.choice(items).split()
        k = rng.randint(1, len(item))
        start = rng.randint(0, len(item) - k)
        prompts.append(" ".join([text(rng.randint(0, 3)), *item[start : start + k], text(rng.randint(0, 3))]).strip())
    # each item its own suite: no suite has a template to leave out, so the reference needs no such rule
    index = SuiteIndex([SuiteItem(suite=f"s{i}", text=t) for i, t in enumerate(items)], n)
    got = [index.match(words(p)) is not None for p in prompts]
    want = [naive_contaminated(p, items, n) for p in prompts]
    assert got == want
    assert 20 < sum(want) < len(prompts) - 20  # both outcomes well represented


def test_an_ngram_most_items_of_a_suite_share_is_its_template_and_matches_nothing(tmp_path):
    suffix = "Please reason step by step, and put your final answer within \\boxed{}."
    items = [f"{p} {suffix}" for p in TASK_ITEMS] + [
        f"question {i}: {w} {suffix}" for i, w in enumerate(["alpha", "beta", "gamma", "delta", "omega"])
    ]
    cfg = prompts_config(tmp_path, ["x"])
    cfg.eval.task_file = str(task_file(tmp_path, items))
    prompts = [{"prompt": f"what is {a} plus {b}? {suffix}"} for a, b in [(1, 2), (3, 4), (5, 6)]]
    prompts.append({"prompt": f"{TASK_ITEMS[1]}. {suffix}"})  # a test question, with the same instruction
    kept, record = decontaminate(cfg, prompts)
    assert [p["prompt"] for p in kept] == [p["prompt"] for p in prompts[:3]]
    assert record.contaminated == {"task:tasks.jsonl": 1}
    assert record.template_ngrams["task:tasks.jsonl"] > 0
    assert record.examples[0]["match"].startswith(TASK_ITEMS[1])


# ----------------------------------------------------------------------------------------------------
# Before the teacher is paid.


@pytest.mark.slow
def test_planted_suite_items_and_their_variants_never_reach_a_served_teacher(tmp_path, tiny_teacher):
    upper = get_skill("upper").examples("test", 5)[0].prompt  # a general-suite item (eval.n_per_skill = 5)
    planted = [
        "A farmer has 17 sheep, and buys 5 more sheep at the market. How many sheep does he have now?",  # verbatim
        "Tell me: buys 5 more sheep at the market; how many sheep, then double it",  # shares an 8-gram
        upper.upper(),  # a short lab test item: the whole text, any case
    ]
    duplicates = [
        CLEAN[0].upper() + "!",  # an exact duplicate once normalised
        CLEAN[1].rsplit(" ", 1)[0] + " beach",
    ]  # a near duplicate: its last word changed
    prompts = [
        CLEAN[0],
        planted[0],
        CLEAN[1],
        CLEAN[2],
        planted[1],
        duplicates[0],
        CLEAN[3],
        planted[2],
        CLEAN[4],
        duplicates[1],
        CLEAN[5],
    ]
    with server_thread(tiny_teacher, model_name="teacher") as server:
        teacher = {
            "model": "teacher",
            "base_url": server.base_url,
            "concurrency": 2,
            "usd_per_1m_input": 1.0,
            "usd_per_1m_output": 2.0,
        }
        cfg = prompts_config(tmp_path, prompts, teacher, decontaminate={"deduplicate": "near"})
        cfg.train.student = str(tiny_teacher)
        record = run_generate(cfg, **quiet)
        answered = read_metrics(server.url)["distillab_answers_total"]
        again = run_generate(cfg, **quiet)  # up to date: nothing planned differs, nothing sent
        assert again.skipped and again.decontamination == record.decontamination
        run = RunDir(cfg.run_dir)
        rows = read_dataset(run.dataset("train"))
        summary = json.loads(run.generate_summary().read_text())["decontamination"]
        written = json.loads(run.decontamination.read_text())

        # the eval suite changes: one more clean prompt is now a test item, so the stage plans again
        cfg.eval.task_file = str(task_file(tmp_path, [*TASK_ITEMS, CLEAN[5]]))
        replanned = run_generate(cfg, **quiet)
        answered_after = read_metrics(server.url)["distillab_answers_total"]

    assert answered == record.requests_sent == len(CLEAN)  # the teacher's own count: the clean prompts, no more
    assert [r["prompt"] for r in rows] == CLEAN
    assert summary == written == record.decontamination
    assert summary["checked"] == len(prompts)
    assert summary["contaminated"] == {"task:tasks.jsonl": 2, "general:upper": 1}
    assert (summary["exact_duplicates"], summary["near_duplicates"], summary["dropped"]) == (1, 1, 5)
    assert summary["suites"]["task:tasks.jsonl"] == 3 and summary["suites"]["general:upper"] == 5
    lines = {e["kind"]: e for e in summary["examples"] if e["kind"] != "contaminated"}
    assert lines["exact_duplicate"]["duplicate_of"] == 1 and lines["near_duplicate"]["duplicate_of"] == 3
    shared = [e["shared"] for e in summary["examples"] if e["kind"] == "contaminated"]
    assert "buys 5 more sheep at the market how" in shared

    from distillab.cli import _finished_line

    line = _finished_line(cfg, "generate:train", record, WHOLE)
    assert "decontaminate: 11 prompts checked" in line and "3 contaminated" in line and "5 dropped" in line

    assert not replanned.skipped and replanned.requests_sent == 0 and answered_after == answered  # all cached
    assert replanned.rows == len(CLEAN) - 1 and replanned.decontamination["contaminated"]["task:tasks.jsonl"] == 3

    from distillab.report import build_report

    page = build_report(cfg, fake_evals(), fake_ledger()).read_text()
    assert "<h2>Decontamination</h2>" in page and "6 dropped" in page
    assert "buys 5 more sheep at the market" in page  # an example, with the item it matched


def test_flag_keeps_every_prompt_and_marks_the_rows(tmp_path):
    prompts = [CLEAN[0], TASK_ITEMS[2], CLEAN[1], CLEAN[0]]
    cfg = prompts_config(tmp_path, prompts, answers=True, decontaminate={"action": "flag", "deduplicate": "exact"})
    record = run_generate(cfg, **quiet)
    rows = read_dataset(RunDir(cfg.run_dir).dataset("train"))
    assert [r["prompt"] for r in rows] == prompts
    assert [r["decontamination"] for r in rows] == [
        None,
        "contaminated: task:tasks.jsonl",
        None,
        "exact duplicate of line 1",
    ]
    d = record.decontamination
    assert (d["flagged"], d["dropped"], d["contaminated"], d["exact_duplicates"]) == (2, 0, {"task:tasks.jsonl": 1}, 1)
    assert "2 flagged" in summary_line(d)

    # drop instead: the marked rows go, the data is written again
    cfg.decontaminate.action = "drop"
    run_generate(cfg, **quiet)
    assert [r["prompt"] for r in read_dataset(RunDir(cfg.run_dir).dataset("train"))] == [CLEAN[0], CLEAN[1]]


def test_a_prompt_file_that_is_all_test_items_is_refused_in_one_line_before_anything_is_written(tmp_path):
    cfg = prompts_config(tmp_path, TASK_ITEMS[:2], answers=True)
    with pytest.raises(UserError) as err:
        run_generate(cfg, **quiet)
    message = str(err.value)
    assert "dropped every training prompt (2)" in message and "task:tasks.jsonl 2" in message and "\n" not in message
    assert not RunDir(cfg.run_dir).dataset("train").exists()


def test_the_lineage_card_says_what_the_prompts_were_checked_against(tmp_path):
    from distillab.modelcard import update_lineage, write_model_card
    from distillab.provenance import build_lineage

    cfg = prompts_config(tmp_path, [CLEAN[0], "Tom reads 12 pages of his book every evening\nfor a week!"])
    record = decontaminate(cfg, load_prompts(cfg))[1].to_dict()
    model = tmp_path / "student"
    write_model_card(
        model, build_lineage(provenance_dataset(tmp_path / "d.parquet", [("teacher", "t", 3)]), "lab:base")
    )
    update_lineage(model, decontamination=record)
    card = (model / "README.md").read_text()
    assert "## Decontamination" in card and summary_line(record) in card
    assert "- line 2: `Tom reads 12 pages of his book every evening for a week!` matched task:tasks.jsonl" in card


def test_the_train_share_is_checked_against_the_dev_share_it_was_carved_from(tmp_path):
    rng = random.Random(0)
    vocab = [f"v{i}" for i in range(500)]
    texts = [" ".join(rng.choice(vocab) for _ in range(12)) for _ in range(60)]
    dev = split_dev_prompts([{"prompt": t} for t in texts], 0.1)[1][0]["prompt"]
    copy = next(
        c
        for c in (f"retell {i}: {' '.join(dev.split()[:9])}" for i in range(100))
        if split_dev_prompts([{"prompt": c}], 0.1)[0]
    )  # a copy that falls in the train share
    cfg = prompts_config(tmp_path, [*texts, copy], retain={"merge_alphas": [0.5]})
    train, held_out = split_dev_prompts(load_prompts(cfg), 0.1)
    kept, record = decontaminate(cfg, train, held_out)
    assert [p["prompt"] for p in train if p not in kept] == [copy]
    assert record.contaminated == {"dev:held-out prompts": 1} and record.suites["dev:held-out prompts"] == len(held_out)
    assert any(s.startswith("dev:") and s != "dev:held-out prompts" for s in record.suites)  # the lab's dev items

    cfg.retain.merge_alphas = []  # nothing selects on dev: no dev suite, nothing dropped
    kept, record = decontaminate(cfg, train + held_out)
    assert record.dropped == 0 and not any(s.startswith("dev:") for s in record.suites)


def test_the_lab_demo_loses_no_prompt_so_it_is_on_by_default(tmp_path):
    for cfg in (demo_config(tmp_path), retain_config(demo_config(tmp_path))):
        assert cfg.decontaminate.enabled
        prompts = load_prompts(cfg)
        kept, record = decontaminate(cfg, prompts)
        assert kept is prompts and len(prompts) == 3000  # the very list: the demo's prompts are unchanged
        assert record.checked == 3000 and record.dropped == 0 and sum(record.suites.values()) >= 1100
    for skills in (["add"], ["sub"]):  # arithmetic: "55+51=" is not the sub test item "55-51="
        cfg = from_dict({"data": {"skills": skills, "n_prompts": 500}})
        assert decontaminate(cfg, load_prompts(cfg))[1].dropped == 0


# ----------------------------------------------------------------------------------------------------
# Duplicates.


def test_exact_and_near_duplicates_collapse_into_the_first(tmp_path):
    base = CLEAN[1] + " and the gulls call out over the dark water while a small boat rocks gently near the old pier"
    hat = CLEAN[2].replace("cat", "hat")
    prompts = [base, base.upper(), base.replace("bright", "white"), CLEAN[2], hat, CLEAN[2] + " please", CLEAN[3]]
    cfg = prompts_config(tmp_path, prompts, decontaminate={"deduplicate": "near"})
    kept, record = decontaminate(cfg, load_prompts(cfg))
    # one word in 45 changed: Jaccard 0.87, collapsed; the last of 8 words changed: 0.71, a different question;
    # a word appended to 8: 0.86, collapsed
    assert [p["prompt"] for p in kept] == [base, CLEAN[2], hat, CLEAN[3]]
    assert (record.exact_duplicates, record.near_duplicates) == (1, 2)
    cfg.decontaminate.deduplicate = "exact"
    assert [p["prompt"] for p in decontaminate(cfg, load_prompts(cfg))[0]] == [p for p in prompts if p != prompts[1]]
    cfg.decontaminate.deduplicate = "off"
    assert decontaminate(cfg, load_prompts(cfg))[1].dropped == 0


def test_near_duplicates_are_the_pairs_exact_jaccard_finds(tmp_path):
    """Against the plain answer: every pair's Jaccard over word 3-shingles, all pairs compared."""
    rng = random.Random(1)
    vocab = [f"t{i}" for i in range(3000)]
    bases = [[rng.choice(vocab) for _ in range(40)] for _ in range(300)]
    texts = [list(b) for b in bases]
    for b in bases[:150]:  # a copy with 1 to 6 words changed: Jaccard from about 0.9 down to about 0.5
        copy = list(b)
        for i in rng.sample(range(40), rng.randint(1, 6)):
            copy[i] = rng.choice(vocab)
        texts.append(copy)
    sets = [shingles(t, 3) for t in texts]

    began = time.perf_counter()
    truth = {
        j for j in range(len(texts)) if any(len(sets[i] & sets[j]) / len(sets[i] | sets[j]) >= 0.8 for i in range(j))
    }
    all_pairs_s = time.perf_counter() - began
    cfg = from_dict({"decontaminate": {"deduplicate": "near"}})
    began = time.perf_counter()
    duplicates = Duplicates(cfg.decontaminate)
    found = {j for j, t in enumerate(texts) if duplicates.check(j, t) is not None}
    lsh_s = time.perf_counter() - began
    print(f"{len(texts)} prompts: all pairs {all_pairs_s:.2f}s, LSH + check {lsh_s:.2f}s; {len(truth)} near duplicates")
    assert 20 < len(truth) < 150  # some copies are near duplicates, some too far changed
    assert found == truth


# ----------------------------------------------------------------------------------------------------
# Local lm-eval tasks, and bad input.


@pytest.mark.slow
def test_local_lm_eval_task_documents_are_checked_and_builtin_tasks_named_unchecked(tmp_path):
    pytest.importorskip("lm_eval", reason="lm-eval is not installed: pip install lm-eval")
    folder = tmp_path / "tasks"
    folder.mkdir()
    docs = [
        {"question": TASK_ITEMS[0], "choices": ["22", "12"], "label": 0},
        {
            "question": "which planet is known as the red planet in our solar system",
            "choices": ["mars", "venus"],
            "label": 0,
        },
    ]
    write_jsonl(folder / "mc.jsonl", docs)
    (folder / "mc.yaml").write_text(
        "task: tiny_mc\ndataset_path: json\ndataset_kwargs:\n  data_files:\n"
        "    test: mc.jsonl\ntest_split: test\noutput_type: multiple_choice\n"
        'doc_to_text: "Question: {{question}}\\nAnswer:"\ndoc_to_choice: "{{choices}}"\n'
        'doc_to_target: "{{label}}"\nmetric_list:\n  - metric: acc\n'
    )
    prompts = [CLEAN[0], "Which planet is known as the Red Planet in our solar system?", CLEAN[2]]
    cfg = prompts_config(
        tmp_path, prompts, eval={"n_per_skill": 5, "lm_eval_tasks": [str(folder / "mc.yaml"), "arc_easy"]}
    )
    kept, record = decontaminate(cfg, load_prompts(cfg))
    assert [p["prompt"] for p in kept] == [CLEAN[0], CLEAN[2]]
    assert record.contaminated == {"lm_eval:tiny_mc": 1} and record.suites["lm_eval:tiny_mc"] == 2
    assert record.unchecked == ["lm_eval:arc_easy (lm-eval's own task: its documents are not on this machine)"]


def test_bad_decontaminate_settings_are_one_line_errors(tmp_path):
    with pytest.raises(ConfigError, match="decontaminate.suites"):
        from_dict({"decontaminate": {"suites": ["tasks"]}})
    with pytest.raises(ConfigError, match="decontaminate.action"):
        from_dict({"decontaminate": {"action": "remove"}})
    cfg = prompts_config(tmp_path, ["x"])
    cfg.eval.task_file = str(tmp_path / "missing.jsonl")
    with pytest.raises(UserError, match="missing.jsonl"):
        run_generate(cfg, **quiet)  # before any request, and before anything is written
    assert not (cfg.run_dir / "data").exists()


def test_ngrams_and_shingles():
    assert ngrams(["a", "b", "c"], 2) == ["a b", "b c"] and ngrams(["a"], 2) == []
    assert shingles(["a", "b"], 3) == {"a b"} and shingles(["a", "b", "c", "d"], 3) == {"a b c", "b c d"}
