"""Conversations in, conversations out: chat prompt files, each model's own chat template, loss only on the
teacher's turn. Tokenizers are built here: the lab's characters plus ChatML's <|im_start|>/<|im_end|> as
special tokens and a ChatML Jinja template (<|im_end|> is also end-of-sequence, as in Qwen's instruct models)."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from distillab import chat
from distillab.batching import collate
from distillab.cache import RequestCache, request_key
from distillab.config import to_toml
from distillab.dataset import read_dataset
from distillab.errors import UserError
from distillab.generate import run_generate
from distillab.lab.tokenizer import build_tokenizer
from distillab.prompts import load_prompts
from distillab.sampling import encode_example
from distillab.testing import server_thread
from tests.helpers import save_tiny_llama, tiny_config, write_jsonl

CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
quiet = {"log": lambda *a: None}

SYSTEM = {"role": "system", "content": "be brief."}
CONVERSATIONS = [  # system prompts, multi-turn history, an earlier assistant turn, a reference answer
    [SYSTEM, {"role": "user", "content": "upper abc"}],
    [
        SYSTEM,
        {"role": "user", "content": "reverse abc"},
        {"role": "assistant", "content": "cba"},
        {"role": "user", "content": "reverse xyz"},
    ],
    [
        {"role": "user", "content": "add 2 3"},
        {"role": "assistant", "content": "5"},
        {"role": "user", "content": "sub 9 4"},
    ],
    [{"role": "user", "content": "hi"}],
]
ANSWERS = ["ABC", "zyx", "5", "hello"]


def chat_tokenizer():
    tok = build_tokenizer()
    tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    tok.eos_token = "<|im_end|>"
    tok.chat_template = CHATML
    return tok


@pytest.fixture(scope="module")
def chat_teacher(tmp_path_factory):
    return save_tiny_llama(
        tmp_path_factory.mktemp("chat") / "teacher", hidden=32, layers=2, seed=1, tok=chat_tokenizer()
    )


@pytest.fixture(scope="module")
def chat_student(tmp_path_factory):
    return save_tiny_llama(
        tmp_path_factory.mktemp("chat") / "student", hidden=16, layers=1, seed=2, tok=chat_tokenizer()
    )


def chatml(turns, answer=None) -> str:
    """ChatML written out by hand, independent of the template and of distillab.chat."""
    text = "".join(f"<|im_start|>{t['role']}\n{t['content']}<|im_end|>\n" for t in turns) + "<|im_start|>assistant\n"
    return text if answer is None else text + answer + "<|im_end|>"


def chat_file(tmp_path, with_answers=False):
    records = [
        {"messages": turns + ([{"role": "assistant", "content": a}] if with_answers else [])}
        for turns, a in zip(CONVERSATIONS, ANSWERS)
    ]
    return write_jsonl(tmp_path / "chat.jsonl", records)


def config(tmp_path, teacher, student, prompts, name="chat", **data):
    """A tiny run on the prompts file `prompts` (it replaces the lab skills)."""
    return tiny_config(
        tmp_path,
        teacher,
        student,
        name=name,
        data={"prompts_file": str(prompts), **data},
        eval={"n_per_skill": 2, "bootstrap": 10},
        max_steps=2,
        per_device_batch_size=2,
    )


# ----------------------------------------------------------------------------------------------------
# Rendering


def test_a_plain_prompt_without_a_template_keeps_todays_ids():
    """The lab demo's numbers must not move: a lab prompt renders and encodes exactly as before chat.py."""
    from distillab.lab.world import get_skill

    tok = build_tokenizer()  # the lab's tokenizer without the shipped models' template
    assert not chat.has_template(tok)
    for ex in get_skill("add").examples("train", 5) + get_skill("describe").examples("train", 5):
        assert chat.render_prompt(tok, chat.as_turns(ex.prompt)) == ex.prompt
        assert chat.encode(tok, chat.as_turns(ex.prompt), ex.answer) == encode_example(tok, ex.prompt, ex.answer)
    turns = CONVERSATIONS[1]  # no template: the plain concatenation, as serve always joined messages
    assert chat.render_prompt(tok, turns) == "be brief.\nreverse abc\ncba\nreverse xyz"


@pytest.mark.slow
def test_the_lab_models_template_asks_the_last_question_and_keeps_a_lab_prompts_ids():
    """The shipped lab models' chat template (lab.tokenizer.CHAT_TEMPLATE), on every shipped checkpoint: a lab prompt
    of every skill renders and encodes exactly as without a template; a conversation is its last user turn,
    newline-ended; and the teacher answers lab questions behind a system prompt and an earlier exchange (it scored
    0.000 on them with the turns joined by newlines)."""
    from distillab import models
    from distillab.lab.tokenizer import CHAT_TEMPLATE
    from distillab.lab.world import SKILLS, get_skill
    from distillab.scoring import local_complete

    shipped = sorted(p.parent for p in models.LAB_CHECKPOINTS.glob("*/config.json"))
    assert {p.name for p in shipped} >= {"teacher", "base"}
    for path in shipped:
        assert models.load_tokenizer(path).chat_template == CHAT_TEMPLATE, path.name
    tok, plain = models.load_tokenizer("lab:teacher"), build_tokenizer()
    for skill in SKILLS.values():
        for ex in skill.examples("train", 3) + skill.examples("test", 3):
            assert chat.render_prompt(tok, chat.as_turns(ex.prompt)) == ex.prompt
            assert chat.encode(tok, chat.as_turns(ex.prompt), ex.answer) == encode_example(plain, ex.prompt, ex.answer)
    assert chat.render_prompt(tok, CONVERSATIONS[1]) == "reverse xyz\n"
    prompt_ids, completion_ids = chat.encode(tok, CONVERSATIONS[1], "zyx")
    assert (prompt_ids, completion_ids) == encode_example(plain, "reverse xyz\n", "zyx")
    with pytest.raises(chat.TemplateRefused, match="user turn"):
        chat.render_prompt(tok, [SYSTEM])

    examples = [e for s in ("add", "reverse", "upper", "recall") for e in get_skill(s).examples("test", 6)]
    earlier = get_skill("sort").examples("test", len(examples), seed=1)
    conversations = [
        [SYSTEM, {"role": "user", "content": p.prompt.strip()}, {"role": "assistant", "content": p.answer}]
        + [{"role": "user", "content": e.prompt.strip()}]
        for e, p in zip(examples, earlier)
    ]
    model = models.load_model("lab:teacher")

    def score(prompts) -> float:
        answers = local_complete(model, tok, 12)(prompts)  # the longest answer: 7 letters
        return sum(get_skill(e.skill).score(a, e.answer) for e, a in zip(examples, answers)) / len(examples)

    assert score(conversations) >= 0.75  # the teacher scores 0.962 on lab prompts alone
    assert score([chat.plain_text(c) for c in conversations]) <= 0.25  # the turns joined: what it scored before


def test_the_template_renders_the_history_and_the_assistant_turn():
    tok = chat_tokenizer()
    for turns, answer in zip(CONVERSATIONS, ANSWERS):
        prompt_ids, completion_ids = chat.encode(tok, turns, answer)
        assert prompt_ids == tok(chatml(turns))["input_ids"]  # <bos> + the history + the generation prompt
        assert completion_ids == tok(answer + "<|im_end|>", add_special_tokens=False)["input_ids"]
        assert completion_ids[-1] == tok.eos_token_id  # the turn's end is where generation stops
        assert tok.decode(prompt_ids + completion_ids) == "<bos>" + chatml(turns, answer)
        assert chat.prompt_ids(tok, turns) == prompt_ids


def test_serve_asks_a_chat_the_way_the_student_is_trained():
    from distillab.serve import chat_prompt

    tok = chat_tokenizer()
    for turns in CONVERSATIONS:
        assert chat_prompt(tok, [dict(t) for t in turns]) == chat.render_prompt(tok, turns) == chatml(turns)
    parts = [{"role": "user", "content": [{"type": "text", "text": "up"}, {"type": "text", "text": "per a"}]}]
    assert chat_prompt(tok, parts) == chatml([{"role": "user", "content": "upper a"}])


def test_the_teacher_request_carries_the_conversation():
    from distillab.config import TeacherConfig
    from distillab.teachers.openai_compat import OpenAITeacher

    turns = CONVERSATIONS[1]
    chat_mode = OpenAITeacher(TeacherConfig(model="m", base_url="http://127.0.0.1:9/v1", mode="chat"))
    completions = OpenAITeacher(TeacherConfig(model="m", base_url="http://127.0.0.1:9/v1"))
    assert chat_mode.request(chat.plain_text(turns), messages=turns)["messages"] == turns  # as given
    assert completions.request(chat.plain_text(turns), messages=turns)["prompt"] == chat.plain_text(turns)
    # the conversation is part of the key: another system prompt is another request
    other = [{"role": "system", "content": "be long."}] + turns[1:]
    assert request_key(chat_mode.request("x", messages=turns)) != request_key(chat_mode.request("x", messages=other))


# ----------------------------------------------------------------------------------------------------
# Prompt files


def test_chat_files_in_every_shape_read_the_same(tmp_path):
    """JSONL, Parquet and a `datasets` save_to_disk directory, with mapped column names; a final assistant turn
    is the answer; tool turns and content parts are kept as text; a prompt beside messages yields to them."""
    import datasets

    records = [
        {"conv": turns + [{"role": "assistant", "content": a}], "question": "ignored", "skill": "s"}
        for turns, a in zip(CONVERSATIONS, ANSWERS)
    ]
    records.append({"question": "plain one", "ref": "yes"})
    records.append(
        {
            "conv": [
                {"role": "user", "content": [{"type": "text", "text": "call it"}]},
                {"role": "assistant", "content": None, "tool_calls": [{"id": "1"}]},
                {"role": "tool", "content": "42"},
                {"role": "user", "content": "so?"},
            ]
        }
    )
    write_jsonl(tmp_path / "p.jsonl", records)
    table = pa.Table.from_pylist(
        [
            {
                "conv": json.dumps(r.get("conv")) if "conv" in r else None,
                "question": r.get("question"),
                "ref": r.get("ref"),
            }
            for r in records
        ]
    )
    pq.write_table(table, tmp_path / "p.parquet")
    datasets.Dataset.from_list(
        [{"conv": r.get("conv"), "question": r.get("question"), "ref": r.get("ref")} for r in records[:-1]]
    ).save_to_disk(str(tmp_path / "hf"))
    columns = {"prompt_column": "question", "messages_column": "conv", "answer_column": "ref"}
    got = {}
    for name in ("p.jsonl", "p.parquet", "hf"):
        cfg = config(tmp_path, "lab:teacher", "lab:base", tmp_path / name, **columns)
        got[name] = [{k: r[k] for k in ("prompt", "messages", "answer")} for r in load_prompts(cfg)]
    first = got["p.jsonl"]
    assert first[1] == {
        "prompt": "be brief.\nreverse abc\ncba\nreverse xyz",
        "messages": CONVERSATIONS[1],
        "answer": "zyx",
    }
    assert first[4] == {"prompt": "plain one", "messages": None, "answer": "yes"}
    assert first[5]["messages"] == [
        {"role": "user", "content": "call it"},
        {"role": "assistant", "content": '[{"id": "1"}]'},
        {"role": "tool", "content": "42"},
        {"role": "user", "content": "so?"},
    ]
    assert got["p.parquet"] == first
    assert got["hf"] == first[:-1]


def test_rows_are_the_students_rendering_and_only_the_last_assistant_turn_carries_loss(tmp_path, chat_student):
    """source = "human": the rows' ids are the student template's rendering of the conversation, and the
    collator's labels cover exactly the final assistant turn + <|im_end|>: no system, user or earlier assistant
    token carries loss (this fails if any does)."""
    cfg = config(tmp_path, chat_student, chat_student, chat_file(tmp_path, with_answers=True), source="human")
    run_generate(cfg, **quiet)
    rows = read_dataset(cfg.run_dir / "data" / "train.parquet")
    tok = chat_tokenizer()
    start = tok.convert_tokens_to_ids("<|im_start|>")
    assert [json.loads(r["messages"]) for r in rows] == CONVERSATIONS
    assert [r["completion"] for r in rows] == ANSWERS
    batch = collate(rows, tok.pad_token_id)
    for b, (r, turns, answer) in enumerate(zip(rows, CONVERSATIONS, ANSWERS)):
        ids = r["prompt_ids"] + r["completion_ids"]
        assert ids == tok(chatml(turns, answer))["input_ids"]  # the stored ids: the template's rendering
        labelled = (batch["labels"][b] != -100).nonzero().flatten().tolist()
        final_turn = max(i for i, t in enumerate(ids) if t == start)  # <|im_start|> of the teacher's turn
        assert labelled and min(labelled) > final_turn + len(tok("assistant\n", add_special_tokens=False)["input_ids"])
        assert tok.decode([ids[i] for i in labelled]) == answer + "<|im_end|>"
        assert labelled == list(range(len(r["prompt_ids"]), len(ids)))


def test_export_writes_the_real_conversation(tmp_path, chat_student):
    from distillab.export import export_run

    cfg = config(tmp_path, chat_student, chat_student, chat_file(tmp_path, with_answers=True), source="human")
    run_generate(cfg, **quiet)
    [path] = export_run(cfg.run_dir, "openai-chat")
    lines = [json.loads(line)["messages"] for line in path.read_text().splitlines()]
    assert lines == [turns + [{"role": "assistant", "content": a}] for turns, a in zip(CONVERSATIONS, ANSWERS)]


def test_a_local_teacher_answers_through_its_template_like_the_served_one(tmp_path, chat_teacher):
    """The local backend renders the conversation with its own template: the same prompt ids, answers and
    top-k as the same model served in chat mode."""
    prompts = chat_file(tmp_path)
    local = config(tmp_path, chat_teacher, chat_teacher, prompts, name="local")
    run_generate(local, **quiet)
    with server_thread(chat_teacher, model_name="tiny") as server:
        served = config(tmp_path, chat_teacher, chat_teacher, prompts, name="served")
        served = served.model_copy(
            update={
                "teacher": served.teacher.model_copy(
                    update={"model": "tiny", "base_url": server.base_url, "mode": "chat"}
                )
            }
        )
        run_generate(served, **quiet)
    a = read_dataset(local.run_dir / "data" / "train.parquet")
    b = read_dataset(served.run_dir / "data" / "train.parquet")
    for x, y in zip(a, b):
        for column in ("messages", "prompt_ids", "completion", "completion_ids"):
            assert x[column] == y[column], column
        assert x["top_ids"] is not None and y["top_ids"] is not None


@pytest.mark.slow
def test_a_chat_file_goes_through_run_against_a_served_teacher(tmp_path, chat_teacher, chat_student):
    """`distillab run` with a chat JSONL (system prompts, multi-turn history) against `serve` (chat mode, a
    templated teacher), and a task suite of conversations: the teacher got the messages as given, the student's
    rows are its own template's rendering with the teacher's top-k on the completion, and every stage ran."""
    from distillab.cli import run_cli
    from distillab.records import read_eval
    from distillab.teachers.openai_compat import OpenAITeacher

    tasks = write_jsonl(
        tmp_path / "tasks.jsonl",
        [
            {"messages": t + [{"role": "assistant", "content": a}], "scorer": "exact"}
            for t, a in zip(CONVERSATIONS, ANSWERS)
        ],
    )
    with server_thread(chat_teacher, model_name="tiny") as server:
        cfg = config(tmp_path, chat_teacher, chat_student, chat_file(tmp_path))
        # the task suite is the training conversations on purpose (scored on what it was taught, so the scores
        # are not all zero): decontamination, which would drop every one of them, is off here
        cfg = cfg.model_copy(
            update={
                "teacher": cfg.teacher.model_copy(
                    update={"model": "tiny", "base_url": server.base_url, "mode": "chat"}
                ),
                "eval": cfg.eval.model_copy(update={"task_file": str(tasks)}),
                "decontaminate": cfg.decontaminate.model_copy(update={"enabled": False}),
            }
        )
        path = tmp_path / "chat.toml"
        path.write_text(to_toml(cfg))
        assert run_cli(["run", str(path)]) == 0
    tok = chat_tokenizer()
    rows = read_dataset(cfg.run_dir / "data" / "train.parquet")
    teacher = OpenAITeacher(cfg.teacher)
    cache = RequestCache(cfg.run_dir / "teacher.sqlite")
    try:
        for r, turns in zip(rows, CONVERSATIONS):
            key = request_key(teacher.request(r["prompt"], messages=turns))  # the messages as given, in the key
            assert r["request_hash"] == key
            assert r["prompt_ids"] == tok(chatml(turns))["input_ids"]
            assert cache.get(key)["prompt_tokens"] == len(r["prompt_ids"])  # the teacher saw the same context
            assert r["top_ids"] and len(r["top_ids"]) == len(r["completion_ids"])
            assert tok.decode(r["completion_ids"], skip_special_tokens=True) == r["completion"]
    finally:
        cache.close()
    student = read_eval(cfg.run_dir / "eval" / "distilled.json")
    assert student.skills["task"]["n"] == len(CONVERSATIONS)
    assert (cfg.run_dir / "report.html").is_file()


def test_a_conversation_the_students_template_refuses_stops_before_the_teacher_is_asked(tmp_path, chat_teacher):
    """A student whose template raises on a system turn: generate names the line while planning, and the
    teacher (a local model here) answers nothing: no request is in the cache."""
    tok = chat_tokenizer()
    tok.chat_template = (
        "{% if messages[0]['role'] == 'system' %}{{ raise_exception('no system turns') }}{% endif %}" + CHATML
    )
    student = save_tiny_llama(tmp_path / "picky", hidden=16, layers=1, seed=2, tok=tok)
    cfg = config(tmp_path, chat_teacher, student, chat_file(tmp_path))
    with pytest.raises(UserError, match=r"prompt line 1: the student's chat template refused .*no system turns"):
        run_generate(cfg, **quiet)
    from distillab.generate import ask
    from distillab.teachers import make_teacher

    teacher = make_teacher(cfg.teacher)
    keys = [request_key(ask(teacher, p, 0)) for p in load_prompts(cfg)]
    cache = cfg.run_dir / "teacher.sqlite"
    assert len(keys) == len(CONVERSATIONS)
    assert not cache.exists() or not RequestCache(cache).cached_keys(keys)
