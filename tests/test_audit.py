"""Audit scores against a naive per-token float64 reference, AUROC and the fraction estimator, corpus errors."""

from __future__ import annotations

import json
import math

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from distillab.audit import (
    auroc,
    auroc_interval,
    calibrate_threshold,
    encode_document,
    estimate_fraction,
    read_corpus,
    run_audit,
    score_documents,
)
from distillab.errors import UserError
from distillab.models import load
from tests.helpers import write_jsonl

DOCS = [  # (prompt, text): different lengths so batches are padded
    ("describe bakom\n", "bakom is a red beast from vemu that eats plim."),
    (None, "hello there"),
    ("2+2=\n", "4"),
    (None, "a longer document, with punctuation; and 42 numbers!"),
]


@pytest.fixture(scope="module")
def pair(tiny_teacher, tiny_student):
    observer, tok = load(tiny_teacher, device="cpu")
    performer, _ = load(tiny_student, device="cpu")
    return observer, performer, tok


def _naive_scores(observer, performer, tok, text, prompt):
    """One document, no padding, explicit Python loops over scored tokens and the vocabulary in float64."""
    ids, n_context, _ = encode_document(tok, text, prompt)
    with torch.no_grad():
        obs = observer(torch.tensor([ids])).logits[0].double().tolist()  # (T, V)
        perf = performer(torch.tensor([ids])).logits[0].double().tolist()
    loglik = cross = mean_sum = var_sum = 0.0
    for i in range(n_context, len(ids)):  # token i is predicted from position i - 1
        o, p = obs[i - 1], perf[i - 1]
        log_z_o = math.log(sum(math.exp(x) for x in o))
        z_p = sum(math.exp(x) for x in p)
        log_o = [x - log_z_o for x in o]
        probs_p = [math.exp(x) / z_p for x in p]
        loglik += log_o[ids[i]]
        mu = sum(pv * lv for pv, lv in zip(probs_p, log_o))
        cross += -mu
        mean_sum += mu
        var_sum += sum(pv * (lv - mu) ** 2 for pv, lv in zip(probs_p, log_o))
    n = len(ids) - n_context
    log_ppl, log_xppl = -loglik / n, cross / n
    return n, log_ppl / log_xppl, (loglik - mean_sum) / math.sqrt(var_sum)


def test_scores_match_naive_reference(pair):
    observer, performer, tok = pair
    got = score_documents(observer, performer, tok, [t for _, t in DOCS], [p for p, _ in DOCS], batch_size=3)
    for (prompt, text), g in zip(DOCS, got):
        n, binoculars, fast = _naive_scores(observer, performer, tok, text, prompt)
        assert g["n_tokens"] == n == len(text)  # char-level: prompt tokens are not scored, every text char is
        assert g["binoculars"] == pytest.approx(binoculars, rel=1e-5)
        assert g["fast_detectgpt"] == pytest.approx(fast, rel=1e-4, abs=1e-5)


def test_same_model_as_both_roles(pair):
    observer, _, tok = pair
    got = score_documents(observer, observer, tok, ["hello there"])[0]
    n, binoculars, fast = _naive_scores(observer, observer, tok, "hello there", None)
    assert got["binoculars"] == pytest.approx(binoculars, rel=1e-5)
    assert got["fast_detectgpt"] == pytest.approx(fast, rel=1e-4, abs=1e-5)


def test_auroc_hand_computed():
    # Positives 0.35, 0.8 vs negatives 0.1, 0.4: 0.35 beats 0.1 only, 0.8 beats both -> 3 of 4 pairs.
    assert auroc([0.1, 0.4, 0.35, 0.8], [0, 0, 1, 1]) == 0.75
    # A tie counts one half: 0.5 vs 0.5 -> 0.5, 0.5 vs 0.2 -> 1, 0.9 vs both -> 2: 3.5 / 4.
    assert auroc([0.5, 0.5, 0.2, 0.9], [1, 0, 0, 1]) == 0.875
    assert auroc([3, 2, 1], [1, 0, 0]) == 1.0 and auroc([1, 2, 3], [1, 0, 0]) == 0.0


def test_calibrate_threshold_maximises_youden_j():
    # Sorted: .1(0) .2(0) .3(1) .4(1) .5(0) .8(1) .9(1). Cut at .25: tpr 1, fpr 1/3, J 2/3 (the best);
    # cut at .65: tpr 1/2, fpr 0, J 1/2.
    cal = calibrate_threshold([0.1, 0.2, 0.3, 0.4, 0.5, 0.8, 0.9], [0, 0, 1, 1, 0, 1, 1])
    assert cal["threshold"] == pytest.approx(0.25)
    assert (cal["tpr"], cal["fpr"]) == (1.0, pytest.approx(1 / 3))


def test_estimate_fraction_exact_and_clipped():
    # 45 of 100 flagged, tpr 0.8, fpr 0.1: p = (0.45 - 0.1) / 0.7 = 0.5.
    scores = [1.0] * 45 + [0.0] * 55
    est = estimate_fraction(scores, 0.5, tpr=0.8, fpr=0.1, n_bootstrap=200)
    assert est["fraction"] == pytest.approx(0.5) and est["low"] <= 0.5 <= est["high"]
    assert estimate_fraction([0.0] * 100, 0.5, tpr=0.8, fpr=0.1)["fraction"] == 0.0  # rate below fpr: clipped
    with pytest.raises(UserError, match="no skill"):
        estimate_fraction(scores, 0.5, tpr=0.3, fpr=0.3)


def test_estimate_fraction_on_synthetic_scores():
    rng = np.random.default_rng(0)
    labelled = np.concatenate([rng.normal(2, 1, 1000), rng.normal(0, 1, 1000)])
    labels = [1] * 1000 + [0] * 1000
    cal = calibrate_threshold(labelled, labels)
    assert auroc(labelled, labels) == pytest.approx(0.92, abs=0.02)  # Phi(2 / sqrt 2) = 0.921
    for true in (0.1, 0.5, 0.9):
        n_teacher = int(true * 2000)
        corpus = np.concatenate([rng.normal(2, 1, n_teacher), rng.normal(0, 1, 2000 - n_teacher)])
        est = estimate_fraction(
            corpus,
            cal["threshold"],
            cal["tpr"],
            cal["fpr"],
            labelled_scores=labelled,
            labelled_labels=labels,
            n_bootstrap=500,
        )
        assert est["fraction"] == pytest.approx(true, abs=0.05)
        assert est["low"] <= true <= est["high"] and est["high"] - est["low"] < 0.15


def test_malformed_corpora_are_user_errors(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n\n{"text": "broken"\n')
    with pytest.raises(UserError, match=r"bad\.jsonl:3: malformed JSON"):
        read_corpus(bad)
    (tmp_path / "empty.jsonl").write_text("\n\n")
    with pytest.raises(UserError, match="corpus is empty"):
        read_corpus(tmp_path / "empty.jsonl")
    (tmp_path / "field.jsonl").write_text('{"body": "x"}\n')
    with pytest.raises(UserError, match=r"field\.jsonl:1: no string field 'text'"):
        read_corpus(tmp_path / "field.jsonl")
    (tmp_path / "label.jsonl").write_text('{"text": "x", "label": "maybe"}\n')
    with pytest.raises(UserError, match=r"label\.jsonl:1: label 'maybe'"):
        read_corpus(tmp_path / "label.jsonl", label_field="label")
    pq.write_table(pa.table({"body": ["x"]}), tmp_path / "c.parquet")
    with pytest.raises(UserError, match="no column 'text'"):
        read_corpus(tmp_path / "c.parquet")
    with pytest.raises(UserError, match="must be .jsonl or .parquet"):
        read_corpus(bad.rename(tmp_path / "bad.txt"))
    with pytest.raises(UserError, match="not found"):
        read_corpus(tmp_path / "missing.jsonl")


def test_run_audit_end_to_end(tmp_path, tiny_teacher, tiny_student):
    texts = ["bakom is a red beast.", "hello there", "4", "zz yy xx", "the cat sat", "abc"]
    corpus = write_jsonl(tmp_path / "corpus.jsonl", [{"text": t, "prompt": "say\n"} for t in texts])
    labelled = tmp_path / "labelled.parquet"
    pq.write_table(
        pa.table(
            {
                "text": texts,
                "prompt": ["say\n"] * 6,
                "label": ["teacher", "human", "teacher", "human", "teacher", "lab"],
            }
        ),
        labelled,
    )
    out = tmp_path / "audit"
    summary = run_audit(
        corpus,
        out,
        observer=str(tiny_teacher),
        performer=str(tiny_student),
        labelled_path=labelled,
        prompt_field="prompt",
        n_bootstrap=50,
    )
    assert summary["n_documents"] == 6 and summary["labelled"] == {"path": str(labelled), "n": 6, "n_teacher": 3}
    assert summary["n_scored_tokens"] == sum(map(len, texts))
    on_disk = json.loads((out / "audit_summary.json").read_text())
    assert on_disk == summary
    for name in ("binoculars", "fast_detectgpt"):
        assert 0.0 <= on_disk["scores"][name]["auroc_labelled"] <= 1.0
    scores = pq.read_table(out / "scores.parquet").to_pylist()
    assert len(scores) == 6 and scores[0]["where"].endswith("corpus.jsonl:1")
    assert (out / "scores.csv").read_text().startswith("index,where,n_tokens")

    bare = run_audit(corpus, tmp_path / "bare", observer=str(tiny_teacher), performer=str(tiny_teacher))
    assert bare["estimated_teacher_fraction"] is None and bare["note"]


def test_auroc_interval_includes_chance_only_when_the_classes_overlap():
    rng = np.random.default_rng(1)
    same = np.concatenate([rng.normal(0, 1, 60), rng.normal(0, 1, 60)])
    apart = np.concatenate([rng.normal(1.5, 1, 60), rng.normal(0, 1, 60)])
    labels = [1] * 60 + [0] * 60
    low, high = auroc_interval(same, labels, n_bootstrap=400)
    assert low < 0.5 < high
    low, high = auroc_interval(apart, labels, n_bootstrap=400)
    assert 0.5 < low <= auroc(apart, labels) <= high  # Phi(1.5 / sqrt 2) = 0.856


def _greedy_texts(model_dir, n: int, length: int = 24) -> list[str]:
    """The teacher's most likely continuations, end-of-sequence and specials barred (a random tiny model's
    greedy choice is to stop at once)."""
    model, tok = load(model_dir, device="cpu")
    barred = torch.tensor(tok.all_special_ids)
    texts = []
    with torch.no_grad():
        for i in range(n):
            ids = tok(f"say {i}\n")["input_ids"]
            start = len(ids)
            for _ in range(length):
                logits = model(torch.tensor([ids])).logits[0, -1]  # (V,)
                logits[barred] = -math.inf
                ids.append(int(logits.argmax()))
            texts.append(tok.decode(ids[start:]))
    return texts


def _teacher_texts(model_dir, n: int, seed: int, temperature: float = 1.0) -> list[str]:
    """Texts the tiny teacher itself wrote, one per prompt (sampled by default, so they differ)."""
    from distillab.sampling import generate

    model, tok = load(model_dir, device="cpu")
    prompts = [f"describe {chr(97 + i % 26)}{chr(97 + (i * 7) % 26)}{i}\n" for i in range(n)]
    outs = generate(model, tok, prompts, max_new_tokens=24, temperature=temperature, seed=seed)
    return [o.text.strip() or "x" for o in outs]


def _audit_with_labels(tmp_path, corpus, labelled, observer, performer) -> dict:
    return run_audit(
        corpus,
        tmp_path / "out",
        observer=str(observer),
        performer=str(performer),
        labelled_path=labelled,
        n_bootstrap=300,
    )


def test_near_chance_detector_gives_no_fraction(tmp_path, tiny_teacher, tiny_student):
    # The case: the "human" half of the labelled sample is word-for-word the teacher's own output,
    # so no detector can tell the classes apart; before, audit still printed a confident fraction.
    # 40 + 40 labelled: with 20 + 20 one of the two scores clears chance by luck now and then (seeds 0-6 of
    # the sampler all give no estimate at this size).
    texts = _teacher_texts(tiny_teacher, 100, seed=0)
    labelled = write_jsonl(
        tmp_path / "labelled.jsonl",
        [{"text": t, "label": "teacher" if i % 2 else "human"} for i, t in enumerate(texts[:80])],
    )
    corpus = write_jsonl(tmp_path / "corpus.jsonl", [{"text": t} for t in texts[80:]])
    summary = _audit_with_labels(tmp_path, corpus, labelled, tiny_teacher, tiny_student)
    assert summary["estimated_teacher_fraction"] is None and summary["primary_score"] is None
    assert (
        "indistinguishable to this detector" in summary["note"] and "40 teacher-written and 40 other" in summary["note"]
    )
    for name in ("binoculars", "fast_detectgpt"):
        score = summary["scores"][name]
        assert score["auroc_ci"][0] <= 0.5 and "fraction" not in score["estimate"]
        assert score["estimate"]["indistinguishable"] is True


def test_distinguishable_texts_still_get_a_fraction(tmp_path, tiny_teacher, tiny_student):
    # The control: the teacher's greedy text (its most likely tokens) against random letters is easy for an
    # observer that is the teacher, so the near-chance rule must not swallow a real estimate.
    teacher = _greedy_texts(tiny_teacher, 40)
    rng = np.random.default_rng(0)
    other = ["".join(rng.choice(list("qwxzjkvb0123456789"), size=len(t))) for t in teacher]
    labelled = write_jsonl(
        tmp_path / "labelled.jsonl",
        [
            {"text": t, "label": lab}
            for t, lab in [*zip(teacher[:20], ["teacher"] * 20), *zip(other[:20], ["human"] * 20)]
        ],
    )
    corpus = write_jsonl(tmp_path / "corpus.jsonl", [{"text": t} for t in teacher[20:30] + other[20:40]])  # 1/3 teacher
    summary = _audit_with_labels(tmp_path, corpus, labelled, tiny_teacher, tiny_student)
    est = summary["estimated_teacher_fraction"]
    assert est is not None and summary["note"] is None
    assert est["low"] <= 1 / 3 <= est["high"]
