"""distillab.lab.bpe and `distillab lab bpe-student`: the BPE student of the README's cross-tokenizer example.

Pretraining it takes minutes (benchmarks/bench_cross_tokenizer.py runs the whole thing); here: its tokenizer, and what
the command keeps or refuses.
"""

from __future__ import annotations

import json

import pytest

from distillab import chat
from distillab.cli import run_cli
from distillab.lab.bpe import already_built, bpe_tokenizer
from distillab.lab.tokenizer import build_tokenizer
from distillab.lab.world import SKILLS
from distillab.sampling import encode_example


def test_the_bpe_tokenizer_is_not_the_labs_and_asks_as_the_lab_models_do():
    tok, lab = bpe_tokenizer(vocab_size=320, per_skill=200), build_tokenizer()
    assert len(tok) == 320 and (tok.bos_token, tok.eos_token) == ("<s>", "</s>")  # other specials than the lab's
    bpe_tokens = char_tokens = 0
    for skill in SKILLS.values():
        for ex in skill.examples("test", 5):
            prompt_ids, completion_ids = chat.encode(tok, chat.as_turns(ex.prompt), ex.answer)
            # the lab models' template keeps a lab prompt as it is: the ids of the plain encoding
            assert (prompt_ids, completion_ids) == encode_example(tok, ex.prompt, ex.answer)
            assert tok.decode(prompt_ids + completion_ids, skip_special_tokens=True) == ex.prompt + ex.answer
            bpe_tokens += len(prompt_ids) + len(completion_ids)
            char_tokens += sum(map(len, encode_example(lab, ex.prompt, ex.answer)))
    assert bpe_tokens < 0.8 * char_tokens  # merges: not the teacher's one token a character
    turns = [{"role": "system", "content": "be brief."}, {"role": "user", "content": "upper abc"}]
    assert chat.render_prompt(tok, turns) == "upper abc\n"


@pytest.mark.slow
def test_the_command_keeps_a_student_already_built_and_refuses_a_directory_of_other_files(tmp_path, capsys):
    out, tok = tmp_path / "base_bpe", bpe_tokenizer()
    tok.save_pretrained(str(out))
    (out / "pretrain.json").write_text(json.dumps({"history": [{"step": 7, "mean": 0.4}]}))
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    assert run_cli(["lab", "bpe-student", str(out), "--steps", "7"]) == 0
    assert "already there, pretrained 7 steps" in " ".join(capsys.readouterr().err.split())  # the console's log
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == before  # nothing pretrained, nothing written
    assert not already_built(out, tok, steps=8)  # asked for more steps: pretrained again
    assert not already_built(out, bpe_tokenizer(vocab_size=320, per_skill=200), steps=7)  # another tokenizer

    other = tmp_path / "models"
    other.mkdir()
    (other / "mine.txt").write_text("kept")
    assert run_cli(["lab", "bpe-student", str(other)]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and "not a pretrained lab model" in err[0] and str(other) in err[0]
    assert [p.name for p in other.iterdir()] == ["mine.txt"] and (other / "mine.txt").read_text() == "kept"
