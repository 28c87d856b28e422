"""Reasoning traces in, traces out: a teacher's thinking is captured wherever it comes (a chat response's separate
`reasoning_content`, or inline <think>...</think> from a completions endpoint or a local model), kept as the dataset's
`reasoning` column, counted apart in the ledger, and trained on through the student's own thinking format, with loss
on trace and answer and none on the prompt.

The teacher is a real model, built here so that it thinks: a Llama whose layers add nothing (attention and MLP
outputs zeroed), so the next token depends on the last one alone, with an lm_head that maps each token of a chain to
the next: whatever the prompt, it answers <think>hm</think>ok<|im_end|>. Its tokenizer is the lab's characters plus
ChatML's specials and <think>/</think> as tokens of their own; the student's template is ChatML with a think block
that renders an assistant message's reasoning_content (as Qwen3's does)."""

from __future__ import annotations

import json
import sqlite3

import pytest
import torch

from distillab import cache as cache_module
from distillab import chat, reasoning
from distillab.batching import answers_only, collate
from distillab.cache import RequestCache, request_key
from distillab.dataset import read_dataset
from distillab.generate import run_generate
from distillab.lab.tokenizer import build_tokenizer
from distillab.testing import metric_sum, read_metrics, server_thread
from distillab.trainrows import ArrowRows
from tests.helpers import save_tiny_llama, tiny_config, write_jsonl

THINKING_CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
    "{% if m['role'] == 'assistant' and m.get('reasoning_content') %}<think>{{ m['reasoning_content'] }}</think>"
    "{% endif %}{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
PLAIN_CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
CHAIN = ["<think>", "h", "m", "</think>", "o", "k", "<|im_end|>"]  # what the thinking teacher writes, token by token
TRACE, ANSWER = "hm", "ok"
TRACE_TOKENS = 4  # <think> h m </think>: the tags are the trace's tokens too
PROMPTS = [
    {"prompt": "what is 2+2?", "answer": "4"},
    {"prompt": "name a colour?", "answer": "red"},
    {"prompt": "say hi?", "answer": "hi"},
]
quiet = {"log": lambda *a: None}


def thinking_tokenizer(template: str | None = THINKING_CHATML):
    tok = build_tokenizer()
    tok.add_tokens(["<think>", "</think>"])  # not special: they are text the model writes
    tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    tok.eos_token = "<|im_end|>"
    tok.chat_template = template
    return tok


def save_thinker(path, tok):
    """The teacher of the module docstring: greedy decoding writes CHAIN after any prompt."""
    from transformers import LlamaConfig, LlamaForCausalLM

    vocab, hidden = len(tok), 128
    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=256,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(config)
    chain = tok.convert_tokens_to_ids(CHAIN)
    nxt = {a: b for a, b in zip(chain, chain[1:])}
    with torch.no_grad():
        model.model.embed_tokens.weight.zero_()
        model.model.embed_tokens.weight[:, :vocab] = torch.eye(vocab)  # token i: the i-th unit vector
        for layer in model.model.layers:  # the residual stream stays the last token's embedding
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        model.lm_head.weight.zero_()
        for i in range(vocab):  # after i: its successor in the chain, else <think> (a trace starts)
            model.lm_head.weight[nxt.get(i, chain[0]), i] = 0.5
    model.save_pretrained(str(path), safe_serialization=True)
    tok.save_pretrained(str(path))
    return path


@pytest.fixture(scope="module")
def thinker(tmp_path_factory):
    return save_thinker(tmp_path_factory.mktemp("thinker") / "teacher", thinking_tokenizer())


@pytest.fixture(scope="module")
def thinking_student(tmp_path_factory):
    return save_tiny_llama(
        tmp_path_factory.mktemp("thinker") / "student", hidden=16, layers=1, seed=2, tok=thinking_tokenizer()
    )


def config(tmp_path, teacher, student, name, **teacher_cfg):
    cfg = tiny_config(
        tmp_path,
        teacher,
        student,
        name=name,
        max_steps=1,
        per_device_batch_size=2,
        data={"prompts_file": str(write_jsonl(tmp_path / "prompts.jsonl", PROMPTS))},
        eval={"n_per_skill": 2, "bootstrap": 10},
    )
    return cfg.model_copy(
        update={"teacher": cfg.teacher.model_copy(update={"max_new_tokens": 10, "top_k_logprobs": 3, **teacher_cfg})}
    )


def rows_of(cfg):
    return read_dataset(cfg.run_dir / "data" / "train.parquet")


# ----------------------------------------------------------------------------------------------------
# The acceptance check: a served reasoning teacher, a thinking student.


def test_a_served_reasoning_teacher_trains_a_thinking_student_on_trace_and_answer(tmp_path, thinker, thinking_student):
    """`distillab serve --reasoning-parser think` in chat mode answers with the trace in reasoning_content (as vLLM's
    reasoning parsers do); the rows keep it (reasoning column, completion = the answer); completion_ids are the
    student template's rendering of trace + answer, which the teacher's own tokens spell, so its top-k is kept over
    the trace; the training labels are exactly trace + answer + <|im_end|> and nothing of the prompt; the ledger
    counts the reasoning tokens apart (the server's usage count), and traces = false trains on the answer alone."""
    from distillab.costs import teacher_generation
    from distillab.pricing import TeacherPricing
    from distillab.report.html import ledger_rows
    from distillab.train import build_trainer

    with server_thread(thinker, model_name="thinker", reasoning_parser="think") as server:
        cfg = config(
            tmp_path,
            thinker,
            thinking_student,
            "served",
            model="thinker",
            base_url=server.base_url,
            mode="chat",
            usd_per_1m_input=1.0,
            usd_per_1m_output=2.0,
        )
        record = run_generate(cfg, **quiet)
        answered = metric_sum(read_metrics(server.url), "distillab_answers_total")
    tok = thinking_tokenizer()
    rows = rows_of(cfg)
    assert answered == len(PROMPTS) == len(rows)

    whole = tok.convert_tokens_to_ids(CHAIN)
    for r, p in zip(rows, PROMPTS):
        assert (r["reasoning"], r["completion"]) == (TRACE, ANSWER)
        assert r["completion_ids"] == whole  # the student's rendering, which the teacher's tokens spell exactly
        assert (
            r["prompt_ids"] == tok(f"<|im_start|>user\n{p['prompt']}<|im_end|>\n<|im_start|>assistant\n")["input_ids"]
        )
        assert r["answer_ids"] == tok.convert_tokens_to_ids(["o", "k", "<|im_end|>"])
        assert len(r["top_ids"]) == len(whole)  # the teacher's top-k over every trace token too
        assert [ids[lps.index(max(lps))] for ids, lps in zip(r["top_ids"], r["top_logprobs"])] == whole

    # The labels of a real training batch: trace + answer, and nothing of the prompt (fails if either is wrong).
    from distillab.models import load

    model, student_tok = load(str(thinking_student))
    trainer = build_trainer(
        cfg, ArrowRows(cfg.run_dir / "data" / "train.parquet"), model, student_tok, tmp_path / "ckpt"
    )
    batch = next(iter(trainer.get_train_dataloader()))
    by_prompt = {len(r["prompt_ids"]): r for r in rows}
    for b in range(batch["labels"].shape[0]):
        n = int(batch["attention_mask"][b].sum())
        labelled = (batch["labels"][b] != -100).nonzero().flatten().tolist()
        prompt_len = n - len(whole)
        assert prompt_len in by_prompt
        assert labelled == list(range(prompt_len, n))  # every trace and answer position, no prompt position
        assert tok.decode(batch["labels"][b][labelled]) == f"<think>{TRACE}</think>{ANSWER}<|im_end|>"
        assert batch["kd_mask"][b][prompt_len - 1 : n - 1].all()  # KD on the trace's tokens like any other

    # The ledger: reasoning tokens counted apart (by the server: usage.completion_tokens_details), part of the output.
    summary = json.loads((cfg.run_dir / "data" / "generate_summary.json").read_text())
    assert summary["completion_tokens"] == len(PROMPTS) * len(CHAIN)
    assert summary["reasoning_tokens"] == record.reasoning_tokens == len(PROMPTS) * TRACE_TOKENS
    line = teacher_generation(cfg, TeacherPricing.from_config(cfg.teacher, False))
    assert line.reasoning_tokens == len(PROMPTS) * TRACE_TOKENS
    # priced as the output tokens they are: $ = prompt x $1/1M + (answer + trace) x $2/1M
    assert line.usd == pytest.approx((summary["prompt_tokens"] * 1.0 + len(PROMPTS) * len(CHAIN) * 2.0) / 1e6)
    cache = RequestCache(cfg.run_dir / "teacher.sqlite")
    try:
        stored = cache.get(rows[0]["request_hash"])
        assert stored["reasoning_counted"] == "usage" and stored["reasoning_tokens"] == TRACE_TOKENS
    finally:
        cache.close()

    # traces = false: the same rows train on the answer alone, its top-k kept on the answer's tokens.
    plain = answers_only(ArrowRows(cfg.run_dir / "data" / "train.parquet"), traces=False)
    first = plain.fetch([0])[0]
    assert first["completion_ids"] == rows[0]["answer_ids"] and len(first["top_ids"]) == 3
    labels = collate([first], tok.pad_token_id)["labels"][0]
    assert tok.decode(labels[labels != -100]) == f"{ANSWER}<|im_end|>"
    assert plain.completion_lengths.tolist() == [3] * len(PROMPTS)

    # The lineage card says how many examples carry a trace, its tokens, and what was trained on.
    from distillab.modelcard import model_card
    from distillab.provenance import build_lineage

    lineage = build_lineage(
        cfg.run_dir / "data" / "train.parquet",
        base_model="base",
        train_summary={"traces": False},
        parent_lineage={"generations": []},
    )
    assert (
        lineage["generations"][-1]["dataset"]["reasoning_rows"],
        lineage["generations"][-1]["dataset"]["trace_tokens"],
    ) == (len(PROMPTS), len(PROMPTS) * TRACE_TOKENS)
    assert (
        f"reasoning traces: {len(PROMPTS)} examples carry the teacher's thinking trace "
        f"({len(PROMPTS) * TRACE_TOKENS} of their completion tokens"
    ) in model_card(lineage)
    assert "trained on the answers alone" in model_card(lineage)

    # ... and the terminal and report lines show them.
    from distillab.cli import _finished_line
    from distillab.records import Ledger
    from distillab.rundir import WHOLE
    from tests.helpers import fake_ledger

    assert f"({len(PROMPTS) * TRACE_TOKENS} reasoning)" in _finished_line(cfg, "generate:train", record, WHOLE)
    ledger = fake_ledger()
    ledger["teacher_generation"] |= {"reasoning_tokens": line.reasoning_tokens}
    assert "(12 of them reasoning)" in dict(ledger_rows(Ledger.model_validate(ledger)))["teacher tokens"]


# ----------------------------------------------------------------------------------------------------
# Inline traces: a completions endpoint and a local teacher split them the same way.


def test_inline_think_from_a_completions_endpoint_and_a_local_teacher_split_alike(tmp_path, thinker, thinking_student):
    """Without a reasoning parser the trace comes inline in the text: a completions endpoint (distillab serve) and
    the local HF backend cut it off the same way (teacher.think_tags), give the same rows, and count its tokens from
    the tokens themselves (the endpoint's text_offset, the local ids)."""
    with server_thread(thinker, model_name="thinker") as server:
        served = config(
            tmp_path,
            thinker,
            thinking_student,
            "completions",
            model="thinker",
            base_url=server.base_url,
            mode="completions",
            usd_per_1m_input=0.0,
            usd_per_1m_output=0.0,
        )
        run_generate(served, **quiet)
    local = config(tmp_path, thinker, thinking_student, "local")
    run_generate(local, **quiet)
    a, b = rows_of(served), rows_of(local)
    assert len(a) == len(b) == len(PROMPTS)
    for x, y in zip(a, b):
        assert (x["reasoning"], x["completion"]) == (y["reasoning"], y["completion"]) == (TRACE, ANSWER)
        assert x["completion_ids"] == y["completion_ids"] == thinking_tokenizer().convert_tokens_to_ids(CHAIN)
        assert x["top_ids"] is not None and y["top_ids"] is not None
    for cfg in (served, local):
        summary = json.loads((cfg.run_dir / "data" / "generate_summary.json").read_text())
        assert summary["reasoning_tokens"] == len(PROMPTS) * TRACE_TOKENS, cfg.name
        cache = RequestCache(cfg.run_dir / "teacher.sqlite")
        try:
            assert cache.get(rows_of(cfg)[0]["request_hash"])["reasoning_counted"] == "tokens"
        finally:
            cache.close()


def test_a_student_without_a_thinking_template_gets_the_plain_trace_format(tmp_path, thinker):
    """A student whose ChatML has no think block: trace + answer go in the assistant turn's content in
    [train] trace_format; the teacher's tokens do not spell that rendering, so its top-k is left out (counted)."""
    student = save_tiny_llama(
        tmp_path / "plain_student", hidden=16, layers=1, seed=2, tok=thinking_tokenizer(PLAIN_CHATML)
    )
    cfg = config(tmp_path, thinker, student, "plain")
    cfg = cfg.model_copy(update={"train": cfg.train.model_copy(update={"trace_format": "({reasoning}) {answer}"})})
    logged = []
    summary = run_generate(cfg, log=logged.append)
    tok = thinking_tokenizer(PLAIN_CHATML)
    for r in rows_of(cfg):
        assert tok.decode(r["completion_ids"]) == f"({TRACE}) {ANSWER}<|im_end|>"
        assert r["top_ids"] is None and r["reasoning"] == TRACE
    assert summary.rows == len(PROMPTS)
    assert any("rows with a reasoning trace" in line for line in logged)


def test_brought_answers_with_traces_are_split_like_a_teachers(tmp_path, thinking_student):
    """source = "human" with DeepSeek-R1-style answers (a brought set of traces): the same split and rendering as a
    teacher's rows; answers without a trace keep the rows as they always were (no reasoning columns)."""
    traced = [{"prompt": "q?", "answer": "<think>hm</think>ok"}, {"prompt": "r?", "answer": "hm</think>ok"}]
    cfg = config(tmp_path, thinking_student, thinking_student, "human")
    cfg = cfg.model_copy(
        update={
            "data": cfg.data.model_copy(
                update={"source": "human", "prompts_file": str(write_jsonl(tmp_path / "traced.jsonl", traced))}
            )
        }
    )
    run_generate(cfg, **quiet)
    tok = thinking_tokenizer()
    for r in rows_of(cfg):
        assert (r["reasoning"], r["completion"]) == (TRACE, ANSWER)
        assert tok.decode(r["completion_ids"]) == f"<think>{TRACE}</think>{ANSWER}<|im_end|>"
    plain = config(tmp_path, thinking_student, thinking_student, "human_plain")
    plain = plain.model_copy(update={"data": plain.data.model_copy(update={"source": "human"})})
    run_generate(plain, **quiet)
    assert "reasoning" not in rows_of(plain)[0]


# ----------------------------------------------------------------------------------------------------
# The pieces.


@pytest.mark.parametrize(
    "text, expected",
    [
        ("<think>\nlet me see\n</think>\n\n42", ("let me see", "42", 27)),
        ("let me see</think>42", ("let me see", "42", 18)),  # DeepSeek-R1 style: the prompt opened the trace
        ("  <think>still thinking", ("still thinking", "", 23)),  # cut off while thinking
        ("42", (None, "42", 0)),
        ("<think></think>42", ("", "42", 15)),
    ],
)
def test_split_inline(text, expected):
    split = reasoning.split_inline(text)
    assert (split.reasoning, split.answer, split.end) == expected
    assert reasoning.final_answer(text) == expected[1]


def test_other_tags_and_none():
    assert reasoning.split_inline("<r>a</r>b", ("<r>", "</r>")).reasoning == "a"
    assert reasoning.split_inline("<think>a</think>b", ()).answer == "<think>a</think>b"


def test_scoring_reads_the_answer_after_the_trace():
    from distillab.scoring import score_task_suite

    examples = [{"prompt": "q", "answer": "42", "scorer": "exact", "skill": "s"}] * 2
    outputs = iter([["<think>it is 41?</think>\n42", "42"]])
    assert score_task_suite(None, None, examples, 0, complete=lambda prompts: next(outputs)) == {"s": [1.0, 1.0]}


def test_parse_response_reads_either_reasoning_field_and_the_usage_count():
    from distillab.teachers.openai_compat import parse_response

    req = {"mode": "chat", "logprobs": 0}
    for name in ("reasoning_content", "reasoning"):
        raw = {
            "choices": [{"message": {"content": "42", name: " think hard "}, "finish_reason": "stop"}],
            "usage": {
                "prompt_tokens": 5,
                "completion_tokens": 30,
                "completion_tokens_details": {"reasoning_tokens": 25},
            },
        }
        resp = parse_response(raw, req, ("<think>", "</think>"))
        assert (resp["text"], resp["reasoning"], resp["reasoning_tokens"], resp["reasoning_counted"]) == (
            "42",
            "think hard",
            25,
            "usage",
        )
    raw["usage"] = {"prompt_tokens": 5, "completion_tokens": 30}
    resp = parse_response({**raw, "choices": [{"message": {"content": "ab", "reasoning_content": "abcdefgh"}}]}, req)
    assert (resp["reasoning_tokens"], resp["reasoning_counted"]) == (24, "estimate")  # 30 x 8 / 10 characters
    plain = parse_response(
        {"choices": [{"message": {"content": "42"}}], "usage": {"completion_tokens": 1}}, req, ("<think>", "</think>")
    )
    assert "reasoning" not in plain and "reasoning_tokens" not in plain  # no trace: the response as before
    hidden = parse_response(
        {
            "choices": [{"message": {"content": "42"}}],
            "usage": {"completion_tokens": 90, "completion_tokens_details": {"reasoning_tokens": 80}},
        },
        req,
    )
    assert (hidden["text"], hidden["reasoning_tokens"]) == ("42", 80) and "reasoning" not in hidden  # o-series: billed


def test_encode_through_each_kind_of_template():
    """reasoning_content where the template renders it; the plain format in the content where it does not; the plain
    format after the prompt, without its opening tag, where the template drops the trace and opens it in the
    generation prompt (DeepSeek-R1's); the plain format as the completion without a template."""
    turns = [{"role": "user", "content": "q?"}]
    fmt = "<think>\n{reasoning}\n</think>\n{answer}"

    def completion(template):
        tok = thinking_tokenizer(template)
        prompt_ids, ids = reasoning.encode(tok, turns, "hm", "ok", fmt)
        assert prompt_ids == chat.prompt_ids(tok, turns)
        return tok.decode(ids)

    assert completion(THINKING_CHATML) == "<think>hm</think>ok<|im_end|>"
    assert completion(PLAIN_CHATML) == "<think>\nhm\n</think>\nok<|im_end|>"
    r1 = (
        "{% for m in messages %}{% if m['role'] == 'user' %}<|im_start|>{{ m['content'] }}{% else %}"
        "<|im_start|>{{ m['content'].split('</think>')[-1] }}<|im_end|>{% endif %}{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|><think>\n{% endif %}"
    )
    assert completion(r1) == "hm\n</think>\nok<|im_end|>"
    assert completion(None) == "<think>\nhm\n</think>\nok<|im_end|>"
    tok = thinking_tokenizer()
    assert reasoning.encode(tok, turns, None, "ok") == chat.encode(tok, turns, "ok")


def test_the_cache_keeps_the_trace_and_reads_a_response_without_one_as_before(tmp_path):
    """A trace is stored with its response (loose and packed); a response without one reads back exactly as before;
    usage() sums the reasoning tokens."""
    path = tmp_path / "teacher.sqlite"
    cache = RequestCache(path)
    plain = {
        "text": "42",
        "finish_reason": "stop",
        "prompt_tokens": 3,
        "completion_tokens": 2,
        "token_ids": [5, 2],
        "top_ids": None,
        "top_logprobs": None,
        "top_tokens": None,
    }
    traced = plain | {
        "text": "ok",
        "reasoning": "hm",
        "reasoning_tokens": 4,
        "reasoning_counted": "tokens",
        "completion_tokens": 7,
        "token_ids": [1, 2, 3, 4, 5, 6, 7],
    }
    keys = [request_key({"n": i}) for i in range(2)]
    for key, resp in zip(keys, (plain, traced)):
        cache.put(key, {"n": key}, resp)
    loose = [cache.get(k) for k in keys]
    while cache._pack():
        pass
    assert [cache.get(k) for k in keys] == loose
    assert loose[0] == plain | {"top_tokens": None, "tokens": None}
    assert loose[1]["reasoning"] == "hm" and loose[1]["reasoning_tokens"] == 4
    assert cache.usage(keys)["reasoning_tokens"] == 4
    cache.close()


def test_a_layout_3_cache_gets_the_reasoning_column_in_place(tmp_path):
    """A cache written before reasoning tokens were counted (layout 3) opens with every response as it was, its
    reasoning tokens 0, and counts new ones."""
    path = tmp_path / "teacher.sqlite"
    old_schema = cache_module.SCHEMA.replace(
        ",\n  reasoning_tokens INTEGER NOT NULL DEFAULT 0  -- of completion_tokens, a reasoning trace's (layout 4)", ""
    )
    old_schema = old_schema.replace(",\n  reasoning_tokens INTEGER NOT NULL DEFAULT 0", "")
    old_schema = old_schema.replace(", reasoning_tokens FROM", " FROM")
    assert "reasoning" not in old_schema
    db = sqlite3.connect(path)
    db.executescript(old_schema)
    db.execute("PRAGMA user_version = 3")
    resp = {"text": "42", "finish_reason": "stop", "prompt_tokens": 3, "completion_tokens": 2, "token_ids": [5, 2]}
    key = request_key({"n": 0})
    db.execute(
        "INSERT INTO loose VALUES (?, '{}', ?, 3, 2, 0.1, 1, 0)",
        (bytes.fromhex(key), cache_module.encode_response(resp)),
    )
    db.commit()
    db.close()
    cache = RequestCache(path)
    assert cache.get(key)["text"] == "42" and cache.usage([key])["reasoning_tokens"] == 0
    other = request_key({"n": 1})
    cache.put(other, {"n": 1}, resp | {"reasoning": "r", "reasoning_tokens": 9})
    cache.close()
    cache = RequestCache(path)
    assert cache.usage([key, other]) | {"latency_s": 0} == {
        "requests": 2,
        "prompt_tokens": 6,
        "completion_tokens": 4,
        "latency_s": 0,
        "reasoning_tokens": 9,
    }
    cache.close()
    assert sqlite3.connect(path).execute("PRAGMA user_version").fetchone()[0] == cache_module.LAYOUT


def test_export_carries_the_trace_in_both_formats(tmp_path):
    import pyarrow.parquet as pq

    from distillab.dataset import write_dataset
    from distillab.export import export_run

    run = tmp_path / "run"
    write_dataset(
        run / "data" / "train.parquet",
        [
            {
                "prompt": "q?",
                "completion": "ok",
                "reasoning": "hm",
                "prompt_ids": [1],
                "completion_ids": [2, 3],
                "answer_ids": [3],
            },
            {
                "prompt": "r?",
                "completion": "no",
                "reasoning": None,
                "prompt_ids": [1],
                "completion_ids": [4],
                "answer_ids": None,
            },
        ],
    )
    [chat_file] = export_run(run, "openai-chat")
    lines = [json.loads(line)["messages"][-1] for line in chat_file.read_text().splitlines()]
    assert lines == [
        {"role": "assistant", "content": "ok", "reasoning_content": "hm"},
        {"role": "assistant", "content": "no"},
    ]
    (run / "run.toml").write_text(f'name = "run"\nruns_dir = "{tmp_path}"\n')  # lab:base: the tokenizer plain saves
    [plain, _tokenizer] = export_run(run, "plain")
    assert pq.read_table(plain).column("reasoning").to_pylist() == ["hm", None]


def test_serve_refuses_an_unknown_reasoning_parser():
    from distillab.errors import UserError
    from distillab.serve import serve

    with pytest.raises(UserError, match="--reasoning-parser 'bogus' is not known"):
        serve("lab:teacher", reasoning_parser="bogus")


def test_config_checks_the_trace_format_and_tags():
    from distillab.config import ConfigError, from_dict

    with pytest.raises(ConfigError, match="trace_format must hold"):
        from_dict({"train": {"trace_format": "{answer}{reasoning}"}})
    with pytest.raises(ConfigError, match="think_tags must be"):
        from_dict({"teacher": {"think_tags": ["<think>"]}})
    assert from_dict({"teacher": {"think_tags": []}}).teacher.think_tags == []
