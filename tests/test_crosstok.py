"""Cross-tokenizer distillation: span alignment against a naive reference and hand-worked cases, the tokenizer read
back through itself, the API string path, and generate + train over pairs of different tokenizers without a
traceback."""

from __future__ import annotations

import json
import math
import random

import pytest
import torch

from distillab import crosstok
from distillab.batching import collate
from distillab.crosstok import END, TeacherTokens, align
from distillab.dataset import read_dataset
from distillab.lab.tokenizer import build_bpe_tokenizer, build_tokenizer
from distillab.lab.world import SKILLS
from tests.helpers import save_tiny_llama, tiny_config

QUIET = {"log": lambda *_: None}


def bpe():
    texts = [e.prompt + e.answer for s in SKILLS.values() for e in s.examples("train", 200)]
    return build_bpe_tokenizer(texts, vocab_size=160)


def char_other_specials():
    """The lab's characters under other special tokens, at other ids (eos is id 0, "</s>")."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    from distillab.lab.tokenizer import CHARS

    specials = ["</s>", "[PAD]", "<s>", "[UNK]", "<|tool|>"]
    tok = Tokenizer(models.WordLevel(vocab={t: i for i, t in enumerate(specials + list(CHARS))}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tok.decoder = decoders.Fuse()
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 2)])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="[PAD]",
        unk_token="[UNK]",
        additional_special_tokens=["<|tool|>"],
        clean_up_tokenization_spaces=False,
    )


# ----------------------------------------------------------------------------------------------------
# align against a naive reference: probabilities (not log-space), linear scans, no precomputed maps.


def naive_align(teacher: TeacherTokens, starts, ends, ids, is_end, first_id, eos_id, stopped=False):
    """Per student token: ({student id: probability}, tail probability) or None (no distribution)."""
    pieces = teacher.pieces
    out = []
    for j, sid in enumerate(ids):
        if is_end[j]:
            where = [i for i, p in enumerate(pieces) if p == END]
            if not where:
                out.append(({eos_id: 1.0}, 0.0) if stopped else None)
                continue
            chain, target = [where[0]], eos_id
        else:
            first = [
                i
                for i, p in enumerate(pieces)
                if p not in (None, END, "") and teacher.starts[i] is not None and teacher.starts[i] == starts[j]
            ]
            if not first or starts[j] is None or ends[j] is None:
                out.append(None)
                continue
            chain, target = [first[0]], sid
            covered = teacher.starts[first[0]] + len(pieces[first[0]])
            while covered < ends[j]:
                later = [
                    i
                    for i in range(chain[-1] + 1, len(pieces))
                    if pieces[i] not in (None, END, "") and teacher.starts[i] is not None
                ]
                if not later or teacher.starts[later[0]] != covered:
                    break
                chain.append(later[0])
                covered += len(pieces[later[0]])
            if covered < ends[j] or any(teacher.picked[i] < 0 for i in chain) and len(chain) > 1:
                out.append(None)
                continue
        i = chain[0]
        probs = [math.exp(lp) for lp in teacher.logprobs[i]]
        tail = math.exp(teacher.tails[i]) if teacher.tails is not None else 1 - sum(probs)
        dist: dict[int, float] = {}
        for c, (text, p) in enumerate(zip(teacher.candidates[i], probs)):
            if c == teacher.picked[i]:
                path = p
                for later in chain[1:]:
                    path *= math.exp(teacher.logprobs[later][teacher.picked[later]])
                dist[target] = dist.get(target, 0.0) + path
                tail += p - path
                continue
            to = eos_id if text == END else (first_id(text) if text else None)
            if to is None:
                tail += p
            else:
                dist[to] = dist.get(to, 0.0) + p
        dist = {x: p for x, p in dist.items() if p > 0}
        out.append((dist, tail) if dist else None)
    return out


def _same(aligned, reference):
    assert len(aligned.mask) == len(reference)
    for j, ref in enumerate(reference):
        assert aligned.mask[j] == (ref is not None), j
        if ref is None:
            continue
        got = {x: math.exp(lp) for x, lp in zip(aligned.ids[j], aligned.logprobs[j])}
        assert set(got) == set(ref[0]), j
        for x in got:
            assert got[x] == pytest.approx(ref[0][x], rel=1e-9, abs=1e-12)
        assert math.exp(aligned.tails[j]) == pytest.approx(ref[1], rel=1e-6, abs=1e-9)
        assert sum(got.values()) + math.exp(aligned.tails[j]) == pytest.approx(1.0, abs=1e-9)


def _random_case(rng: random.Random):
    """A random text cut two ways, a random top-k per teacher token, student ids by span text."""
    text = "".join(rng.choice("abc ") for _ in range(rng.randint(1, 12)))

    def cut():
        bounds = sorted(
            {0, len(text), *rng.sample(range(1, max(2, len(text))), k=min(len(text) - 1, rng.randint(0, 5)))}
        )
        return [(a, b) for a, b in zip(bounds, bounds[1:]) if b > a]

    teacher_spans, student_spans = cut(), cut()
    vocab = sorted({text[a:b] for a, b in student_spans} | set("abc ") | {"ab", "ca", "b c"})

    def first_id(s):
        return next((i for i, v in sorted(enumerate(vocab), key=lambda x: -len(x[1])) if s.startswith(v)), None)

    k = 4
    starts, pieces, cands, lps, picked = [], [], [], [], []
    for a, b in teacher_spans + [(len(text), len(text))]:
        piece = text[a:b] if b > a else END
        others = rng.sample(["a", "b", "c", " ", "ab", "zz", END, "ca"], k=k - 1)
        row = [piece] + [o for o in others if o != piece][: k - 1]
        weights = [rng.random() + 0.05 for _ in row]
        scale = rng.uniform(0.5, 0.99) / sum(weights)
        row_lps = [math.log(w * scale) for w in weights]
        if rng.random() < 0.15:  # the sampled token outside the top-k
            row, row_lps = row[1:], row_lps[1:]
        order = list(range(len(row)))
        rng.shuffle(order)
        row, row_lps = [row[o] for o in order], [row_lps[o] for o in order]
        starts.append(a)
        pieces.append(piece)
        cands.append(row)
        lps.append(row_lps)
        picked.append(row.index(piece) if piece in row else -1)
    teacher = TeacherTokens(starts, pieces, cands, lps, picked, tails=None)
    s_ids = [vocab.index(text[a:b]) for a, b in student_spans] + [len(vocab)]
    s_starts = [a for a, _ in student_spans] + [len(text)]
    s_ends = [b for _, b in student_spans] + [len(text)]
    is_end = [False] * len(student_spans) + [True]
    return teacher, s_starts, s_ends, s_ids, is_end, first_id, len(vocab)


def test_align_matches_the_naive_reference_on_random_cases():
    rng = random.Random(0)
    for _ in range(300):
        teacher, starts, ends, ids, is_end, first_id, eos = _random_case(rng)
        _same(
            align(teacher, starts, ends, ids, is_end, first_id, eos),
            naive_align(teacher, starts, ends, ids, is_end, first_id, eos),
        )


def test_a_student_token_spanning_teacher_tokens_gets_the_sampled_path():
    # teacher "he" + "llo", student "hello": P(hello) = P(he) * P(llo | he); the rest of P(he) joins the tail
    vocab = {"hello": 0, "h": 1, "x": 2, "<eos>": 3}
    first_id = lambda s: vocab.get(s) if s in vocab else vocab.get(s[0])  # noqa: E731
    lp_he, lp_hx, lp_llo = math.log(0.6), math.log(0.3), math.log(0.5)
    teacher = TeacherTokens(
        starts=[0, 2],
        pieces=["he", "llo"],
        candidates=[["he", "x"], ["llo", "p"]],
        logprobs=[[lp_he, lp_hx], [lp_llo, math.log(0.4)]],
        picked=[0, 0],
    )
    a = align(teacher, [0], [5], [0], [False], first_id, eos_id=3)
    got = dict(zip(a.ids[0], (math.exp(x) for x in a.logprobs[0])))
    assert got == pytest.approx({0: 0.3, 2: 0.3})  # 0.6 * 0.5 on "hello", "x" on itself
    assert math.exp(a.tails[0]) == pytest.approx(0.1 + 0.3)  # the teacher's tail + P(he) - P(hello)
    assert a.kept == [pytest.approx(0.6 / 0.9)]


def test_a_student_token_inside_a_teacher_token_merges_candidates_by_first_token():
    # teacher "hello" | "help" | "x"; char student at "h": "hello" and "help" both begin with "h"
    vocab = {c: i for i, c in enumerate("helopx")} | {"<eos>": 9}
    first_id = lambda s: vocab.get(s[0])  # noqa: E731
    teacher = TeacherTokens(
        starts=[0, 5],
        pieces=["hello", END],
        candidates=[["hello", "help", "x"], [END, "x"]],
        logprobs=[[math.log(0.5), math.log(0.2), math.log(0.2)], [math.log(0.9), math.log(0.1)]],
        picked=[0, 0],
        tails=[math.log(0.1), math.log(1e-9)],
    )
    ids = [vocab[c] for c in "hello"] + [9]
    a = align(teacher, [0, 1, 2, 3, 4, 5], [1, 2, 3, 4, 5, 5], ids, [False] * 5 + [True], first_id, eos_id=9)
    assert a.mask == [True, False, False, False, False, True]  # "e", "l", "l", "o" begin inside "hello"
    assert dict(zip(a.ids[0], (math.exp(x) for x in a.logprobs[0]))) == pytest.approx(
        {vocab["h"]: 0.7, vocab["x"]: 0.2}
    )
    assert dict(zip(a.ids[5], (math.exp(x) for x in a.logprobs[5]))) == pytest.approx({9: 0.9, vocab["x"]: 0.1})
    stats = crosstok.AlignStats()
    stats.add(a)
    assert stats.to_dict()["aligned_share"] == pytest.approx(2 / 6)


def test_a_tokenizer_aligned_with_itself_gives_back_its_top_k():
    """Through the text path (decode, offsets, first tokens) a teacher and student with one tokenizer: every
    position aligns and the distribution is the teacher's own, ids and log-probs."""
    tok = build_tokenizer()
    text = "bagok is red"
    ids = tok(text, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    rng = random.Random(1)
    top_ids, top_lps = [], []
    for t in ids:
        row = [t] + rng.sample([i for i in range(4, len(tok)) if i != t], 4)
        row_lps = sorted((math.log(rng.uniform(0.01, 0.2)) for _ in row), reverse=True)
        top_ids.append(row)
        top_lps.append(row_lps)
    resp = {"text": text, "token_ids": ids, "finish_reason": "stop"}
    aligner = crosstok.Aligner(tok, teacher_tok=tok)
    a = aligner.from_ids(resp, top_ids, top_lps, None, ids)
    assert all(a.mask)
    for j in range(len(ids)):
        assert dict(zip(a.ids[j], a.logprobs[j])) == pytest.approx(dict(zip(top_ids[j], top_lps[j])))
    assert aligner.stats.to_dict() == {
        "rows": 1,
        "positions": len(ids),
        "aligned_share": 1.0,
        "mass_kept": pytest.approx(1.0),
    }


def test_api_strings_fall_back_to_spans_when_tokens_do_not_map_one_to_one():
    from distillab.teachers.openai_compat import map_top_tokens

    tok = build_tokenizer()  # char-level: "ab" is two student tokens
    resp = {
        "text": "abc",
        "finish_reason": "stop",
        "tokens": ["ab", "c"],
        "top_tokens": [["ab", "xy", "b"], ["c", "d", "<eos>"]],
        "top_logprobs": [[-0.1, -2.0, -3.0], [-0.2, -2.5, -4.0]],
    }
    aligner = crosstok.Aligner(tok)
    top_ids, top_lps, completion_ids = map_top_tokens(resp, tok, aligner)
    a, b, c, x = (tok.convert_tokens_to_ids(ch) for ch in "abcx")
    assert completion_ids == [a, b, c, tok.eos_token_id]
    assert top_ids[1] is None  # "b" begins inside the teacher's "ab"
    assert dict(zip(top_ids[0], top_lps[0])) == pytest.approx({a: -0.1, x: -2.0, b: -3.0})
    assert top_ids[3] == [tok.eos_token_id] and top_lps[3] == [0.0]  # stopped, no end token given: certain
    assert map_top_tokens(resp, tok) == (None, None, completion_ids)  # no aligner: the old answer
    ids, lps = crosstok.fill_rows(top_ids, top_lps, 3)
    batch = collate([{"prompt_ids": [1], "completion_ids": completion_ids, "top_ids": ids, "top_logprobs": lps}], 0)
    assert batch["kd_mask"][0, :4].tolist() == [True, False, True, True]  # the filler row is no distribution


def test_the_codec_keeps_unaligned_positions_out_of_the_kd_mask():
    from distillab.topk_codec import decode_topk

    a = crosstok.Aligned(
        ids=[[5, 7], [], [2]],
        logprobs=[[-0.5, -1.5], [], [0.0]],
        tails=[math.log(0.1), 0.0, -50.0],
        mask=[True, False, True],
    )
    ids, lps, tail = decode_topk(crosstok.encode(a, 3))
    assert ids.shape == (3, 3)
    batch = collate(
        [
            {
                "prompt_ids": [1],
                "completion_ids": [5, 9, 2],
                "top_ids": ids.tolist(),
                "top_logprobs": lps.tolist(),
                "top_tail": tail.tolist(),
            }
        ],
        0,
    )
    assert batch["kd_mask"][0, :3].tolist() == [True, False, True]


# ----------------------------------------------------------------------------------------------------
# generate + train, teacher and student with different tokenizers: no traceback, KD where it aligns.

PAIRS = [("char", "bpe"), ("bpe", "char"), ("char", "specials"), ("specials", "bpe")]
TOKENIZERS = {"char": build_tokenizer, "bpe": bpe, "specials": char_other_specials}


def _model(tmp_path, name: str, seed: int, hidden: int):
    path = tmp_path / f"{name}-{seed}"
    if not path.is_dir():
        save_tiny_llama(path, hidden=hidden, layers=1, seed=seed, tok=TOKENIZERS[name]())
    return path


def _run_pair(tmp_path, teacher_name: str, student_name: str, **train):
    from safetensors.torch import load_file

    from distillab.generate import run_generate
    from distillab.train import run_train

    teacher = _model(tmp_path, teacher_name, 1, 32)
    student = _model(tmp_path, student_name, 2, 16)
    cfg = tiny_config(
        tmp_path / f"{teacher_name}-{student_name}",
        teacher,
        student,
        **{"loss": "forward_kl", "kd_weight": 1.0, "sft_weight": 0.0, "max_steps": 2, **train},
    )
    said = []
    run_generate(cfg, log=said.append)
    summary = json.loads((cfg.run_dir / "data" / "generate_summary.json").read_text())
    rows = read_dataset(cfg.run_dir / "data" / "train.parquet")
    before = load_file(str(student / "model.safetensors"))
    result = run_train(cfg, log=said.append)
    after = load_file(str(cfg.run_dir / "student" / "model.safetensors"))
    assert result["steps"] == 2
    assert any(not torch.equal(before[k], after[k]) for k in before)  # it trained
    return summary, rows, said


@pytest.mark.slow
def test_char_teacher_bpe_student_trains_kd_on_aligned_tokens(tmp_path):
    summary, rows, said = _run_pair(tmp_path, "char", "bpe")
    stats = summary["cross_tokenizer"]
    assert stats["rows"] == len(rows) and 0 < stats["aligned_share"] <= 1 and 0 < stats["mass_kept"] <= 1
    assert any("aligned across tokenizers" in s for s in said)
    assert all(r["top_ids"] is not None and len(r["top_ids"]) == len(r["completion_ids"]) for r in rows)


@pytest.mark.slow
@pytest.mark.parametrize("teacher_name,student_name", PAIRS[1:])
def test_every_tokenizer_pair_generates_and_trains(tmp_path, teacher_name, student_name):
    summary, rows, _ = _run_pair(tmp_path, teacher_name, student_name)
    assert summary["cross_tokenizer"]["rows"] == len(rows)


@pytest.mark.slow
def test_on_policy_with_another_tokenizer_is_a_notice_not_a_traceback(tmp_path):
    _, _, said = _run_pair(tmp_path, "char", "specials", on_policy_fraction=0.5)
    assert any("on-policy steps" in s and "impossible" in s for s in said)


def test_same_ids_but_another_end_token_is_not_taken_as_the_students():
    """Ids that decode to the text under the student's tokenizer, but stopping with a token that is not the
    student's end-of-sequence, are not the student's ids (_ids_match): the row is aligned by text instead."""
    from distillab.generate import _ids_match

    teacher, student = build_tokenizer(), build_tokenizer()
    student.eos_token = "<unk>"  # same vocab and ids, another end token
    resp = {
        "text": "abc",
        "token_ids": teacher("abc", add_special_tokens=False)["input_ids"] + [teacher.eos_token_id],
        "finish_reason": "stop",
    }
    assert _ids_match(resp, teacher) and not _ids_match(resp, student)


def test_the_report_shows_how_much_teacher_mass_the_alignment_kept(tmp_path):
    from distillab.report import build_report
    from tests.helpers import fake_evals, fake_ledger, run_config

    cfg = run_config(tmp_path, "x")
    (cfg.run_dir / "data").mkdir(parents=True)
    stats = {"rows": 3, "positions": 40, "aligned_share": 0.75, "mass_kept": 0.9}
    (cfg.run_dir / "data" / "generate_summary.json").write_text(json.dumps({"rows": 3, "cross_tokenizer": stats}))
    page = build_report(cfg, fake_evals(), fake_ledger()).read_text()
    assert "cross_tokenizer" in page and "aligned_share" in page and "0.75" in page


@pytest.mark.slow
def test_kd_without_any_teacher_top_k_trains_sft_with_a_one_line_notice(tmp_path):
    """sft_weight = 0 and a dataset with no top-k at all (the teacher gave none): every token trains on its text
    at kd_weight, with one notice line; no traceback (the issue's 'element 0 of tensors does not require grad')."""
    from distillab.generate import run_generate
    from distillab.train import run_train

    teacher, student = _model(tmp_path, "char", 1, 32), _model(tmp_path, "bpe", 2, 16)
    cfg = tiny_config(
        tmp_path,
        teacher,
        student,
        teacher={"top_k_logprobs": 0},
        loss="forward_kl",
        kd_weight=1.0,
        sft_weight=0.0,
        max_steps=2,
    )
    said = []
    run_generate(cfg, **QUIET)
    assert run_train(cfg, log=said.append)["steps"] == 2
    assert [s for s in said if "logit KD impossible" in s] and all("\n" not in s for s in said)


# ----------------------------------------------------------------------------------------------------
# A served teacher with another tokenizer: the ids it returns read with its own tokenizer (serve offers its files),
# aligned as a local teacher's are; refused before any request where nothing would align.


def _peaked_char_teacher(tmp_path):
    """A tiny char-level teacher with sharp distributions (its final norm x 12): its greedy answers and top-k do not
    hang on float noise, so a served and a local run pick the same tokens."""
    from safetensors.torch import load_file, save_file

    path = save_tiny_llama(tmp_path / "teacher", hidden=32, layers=1, seed=1)
    weights = load_file(str(path / "model.safetensors"))
    weights["model.norm.weight"] = weights["model.norm.weight"] * 12
    save_file(weights, str(path / "model.safetensors"), metadata={"format": "pt"})
    return path


def _aligned_rows_agree(local: list[dict], served: list[dict]) -> None:
    """The same texts and student tokens; at every position the same top token and the same ids up to a near-tie at
    the k-th place, logprobs equal up to storage rounding (the server batches otherwise: float noise)."""
    assert len(local) == len(served) > 0
    for x, y in zip(local, served):
        assert (x["completion"], x["completion_ids"]) == (y["completion"], y["completion_ids"])
        assert x["top_ids"] is not None and y["top_ids"] is not None  # KD rows both (before: the served ones SFT)
        for ids_x, lps_x, ids_y, lps_y in zip(x["top_ids"], x["top_logprobs"], y["top_ids"], y["top_logprobs"]):
            top_x = {i: lp for i, lp in zip(ids_x, lps_x) if lp > -1e3}  # the aligned entries (fillers at -inf)
            top_y = {i: lp for i, lp in zip(ids_y, lps_y) if lp > -1e3}
            assert bool(top_x) == bool(top_y)  # aligned at the same positions
            if top_x:
                assert max(top_x, key=top_x.get) == max(top_y, key=top_y.get)
                shared = set(top_x) & set(top_y)
                assert len(shared) >= len(top_x) - 1
                assert max(abs(top_x[i] - top_y[i]) for i in shared) <= 1 / 16 + 1e-3


@pytest.mark.slow
def test_a_served_teacher_of_another_tokenizer_is_aligned_as_the_local_teacher_is(tmp_path):
    """Before, a served teacher's ids in its own vocabulary were dropped (SFT rows, cross_tokenizer null); now its
    tokenizer comes from serve (GET /v1/tokenizer) and its top-k is aligned onto the BPE student's tokens as the
    local teacher's is."""
    from distillab.generate import run_generate
    from distillab.testing import server_process

    teacher, student = _peaked_char_teacher(tmp_path), _model(tmp_path, "bpe", 2, 16)
    local = tiny_config(tmp_path / "local", teacher, student)
    run_generate(local, **QUIET)
    with server_process(teacher) as url:
        served = tiny_config(tmp_path / "served", teacher, student, teacher={"model": teacher.name, "base_url": url})
        said = []
        run_generate(served, log=said.append)
    summaries = [json.loads((c.run_dir / "data" / "generate_summary.json").read_text()) for c in (local, served)]
    rows = [read_dataset(c.run_dir / "data" / "train.parquet") for c in (local, served)]
    _aligned_rows_agree(*rows)
    stats_local, stats_served = (s["cross_tokenizer"] for s in summaries)
    assert stats_served["rows"] == stats_local["rows"] == len(rows[1])
    assert stats_served["positions"] == stats_local["positions"]
    assert stats_served["aligned_share"] == stats_local["aligned_share"] > 0
    assert stats_served["mass_kept"] == pytest.approx(stats_local["mass_kept"], abs=0.02)
    assert (served.run_dir / "teacher_tokenizer" / teacher.name / "tokenizer.json").is_file()
    assert [s for s in said if "is not the student's: its top-k is aligned by text spans" in s]


@pytest.mark.slow
def test_a_teacher_tokenizer_that_cannot_be_aligned_is_refused_before_any_request(tmp_path):
    """teacher.tokenizer names one whose decoding does not give its text back (no decoder: tokens joined by spaces):
    no span past its first token could be read, so generate refuses in one line and serve answers no request."""
    from distillab.errors import UserError
    from distillab.generate import run_generate
    from distillab.testing import metric_sum, read_metrics, server_thread

    teacher, student = _model(tmp_path, "char", 1, 32), _model(tmp_path, "bpe", 2, 16)
    spaced = build_tokenizer()
    spaced.backend_tokenizer.decoder = None  # decode("ab") == "a b"
    spaced.save_pretrained(tmp_path / "spaced")
    with server_thread(teacher, model_name="teacher") as server:
        cfg = tiny_config(
            tmp_path,
            teacher,
            student,
            teacher={"model": "teacher", "base_url": server.base_url, "tokenizer": str(tmp_path / "spaced")},
        )
        with pytest.raises(UserError, match="does not decode its own tokens back") as refused:
            run_generate(cfg, **QUIET)
        asked = metric_sum(read_metrics(server.url), "distillab_requests_total")
    assert "\n" not in str(refused.value) and str(tmp_path / "spaced") in str(refused.value)
    assert asked == 0 and not (cfg.run_dir / "data" / "train.parquet").exists()


def test_serve_offers_its_tokenizer_behind_its_key_and_fetch_tokenizer_reads_it(tmp_path, monkeypatch):
    """GET /v1/tokenizer lists the files (401 without the key), each one is served as it was saved (404 for a name it
    does not have), and the client's fetch_tokenizer writes them into a directory that loads the served tokenizer."""
    import httpx

    from distillab.config import TeacherConfig
    from distillab.teachers.openai_compat import OpenAITeacher, fetch_tokenizer
    from distillab.testing import server_thread

    teacher = _model(tmp_path, "bpe", 1, 32)
    monkeypatch.setenv("SERVE_KEY", "sk-test")
    with server_thread(teacher, model_name="teacher", api_key="sk-test") as server:
        key = {"Authorization": "Bearer sk-test"}
        assert httpx.get(server.base_url + "/tokenizer").status_code == 401
        names = httpx.get(server.base_url + "/tokenizer", headers=key).json()["files"]
        assert "tokenizer.json" in names
        assert httpx.get(server.base_url + "/tokenizer/nope.json", headers=key).status_code == 404
        cfg = TeacherConfig(model="teacher", base_url=server.base_url, api_key_env="SERVE_KEY")
        assert fetch_tokenizer(OpenAITeacher(cfg), tmp_path / "fetched") == server.base_url
    assert sorted(p.name for p in (tmp_path / "fetched").iterdir()) == sorted(names)
    fetched = crosstok.load_tokenizer_dir(str(tmp_path / "fetched"), "teacher.tokenizer")
    assert fetched.get_vocab() == TOKENIZERS["bpe"]().get_vocab()


# ----------------------------------------------------------------------------------------------------
# Token counts of a served run: the totals are the sum of the endpoints', and serve's own.


def test_generate_summary_token_totals_are_the_sum_of_its_endpoints_and_of_what_serve_counted(tmp_path, monkeypatch):
    """Two endpoints, a prompt repeated across chunks (asked once), then a rerun that reads every answer from the
    cache: prompt and completion tokens are counted once a request, by the endpoint that answered (before: the
    repeat counted twice in the totals and once at its endpoint, and a rerun's endpoints counted nothing)."""
    from distillab import generate
    from distillab.generate import run_generate
    from distillab.testing import metric_sum, read_metrics, server_thread
    from tests.helpers import write_jsonl

    monkeypatch.setattr(generate, "CHUNK_ROWS", 4)
    teacher = _model(tmp_path, "char", 1, 32)
    texts = ["add 12 and 30", "reverse abc", "add 7 and 5", "count the a in banana", "upper hello"]
    prompts = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": t} for t in texts + texts[:3]])  # 2 chunks
    with server_thread(teacher, model_name="teacher") as a, server_thread(teacher, model_name="teacher") as b:
        cfg = tiny_config(
            tmp_path,
            teacher,
            teacher,
            teacher={"model": "teacher", "base_url": [a.base_url, b.base_url], "concurrency": 2},
            data={"prompts_file": str(prompts)},
        )
        summaries = []
        for _ in range(2):
            run_generate(cfg, **QUIET)
            summaries.append(json.loads((cfg.run_dir / "data" / "generate_summary.json").read_text()))
            (cfg.run_dir / "data" / "train.parquet").unlink()  # the rerun reads every answer from the cache
        served = [read_metrics(s.url) for s in (a, b)]
    counted = {
        kind: sum(metric_sum(m, f"distillab_{kind}_total") for m in served)
        for kind in ("prompt_tokens", "completion_tokens")
    }
    for summary in summaries:
        assert summary["rows"] == 8
        assert sum(e["answered"] for e in summary["endpoints"].values()) == len(texts)  # asked once a prompt
        for kind, total in counted.items():
            assert summary[kind] == sum(e[kind] for e in summary["endpoints"].values()) == total > 0
