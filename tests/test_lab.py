"""The lab world: deterministic generators, disjoint splits, scorers, the tokenizer round trip."""

from distillab.lab import world
from distillab.lab.tokenizer import build_tokenizer
from distillab.lab.world import SKILLS, exact, word_f1


def test_enough_skills_and_families():
    families = {s.family for s in SKILLS.values()}
    assert len(SKILLS) >= 10 and {"arithmetic", "string", "counting", "knowledge"} <= families
    facts = sum(len(attrs) for attrs in world.KNOWLEDGE.values())
    assert facts >= 300
    assert any(s.metric == "word_f1" for s in SKILLS.values())  # a free-text skill


def test_generators_are_deterministic():
    for skill in SKILLS.values():
        assert skill.examples("train", 30, seed=3) == skill.examples("train", 30, seed=3)
        assert skill.examples("train", 30, seed=3) != skill.examples("train", 30, seed=4) or skill.enumerate_items


def test_splits_are_disjoint():
    for skill in SKILLS.values():
        train = {e.prompt for e in skill.examples("train", 3000)}
        dev = {e.prompt for e in skill.examples("dev", 600)}
        test = {e.prompt for e in skill.examples("test", 600)}
        assert train and dev and test, skill.name
        assert not train & test and not train & dev and not dev & test, skill.name


def test_test_split_is_what_it_was_before_dev_existed():
    """Dev is carved from the old train split: the shipped checkpoints' test scores still stand."""
    for skill in SKILLS.values():
        if skill.enumerate_items is None:
            for e in skill.examples("test", 200):
                assert world._stable_unit(f"{skill.name}|{e.prompt[:-1]}") < world.TEST_FRACTION
    # knowledge skills: a (fact, template) pair is test exactly when its hash says so, unless it was the fact's
    # only chance to be taught (as before dev existed)
    for name in ("recall", "describe"):
        splits = world._knowledge_splits(name)
        for key, split in splits.items():
            if split == "test":
                assert world._stable_unit(f"{name}|{key}") < world.TEST_FRACTION


def test_answers_are_right():
    for e in SKILLS["add"].examples("test", 50):
        a, b = e.prompt.strip().rstrip("=").split("+")
        assert int(e.answer) == int(a) + int(b)
    for e in SKILLS["sort"].examples("train", 50):
        assert e.answer == "".join(sorted(e.prompt.split()[1]))
    for e in SKILLS["recall"].examples("test", 50):
        ent = next(w.strip("?") for w in e.prompt.split() if w.strip("?") in world.KNOWLEDGE)
        assert e.answer in world.KNOWLEDGE[ent].values()


def test_every_knowledge_fact_is_taught():
    taught = {(e.prompt, e.answer) for e in SKILLS["recall"].examples("train", 10_000)}
    for ent, attrs in world.KNOWLEDGE.items():
        for attr, value in attrs.items():
            assert any(ent in p and attr in p and a == value for p, a in taught), (ent, attr)


def test_scorers():
    assert exact(" 42", "42") == 1.0 and exact("41", "42") == 0.0
    assert word_f1("a red beast", "a red beast") == 1.0
    assert word_f1("", "a red beast") == 0.0
    # 2 of 3 predicted words right, 2 of 4 reference words found: P=2/3, R=1/2, F1=4/7
    assert abs(word_f1("a red cat", "a red big beast") - 4 / 7) < 1e-9


def test_tokenizer_round_trip(tmp_path):
    from transformers import AutoTokenizer

    build_tokenizer().save_pretrained(str(tmp_path))
    tok = AutoTokenizer.from_pretrained(str(tmp_path))
    for skill in SKILLS.values():
        for e in skill.examples("test", 5):
            text = e.prompt + e.answer
            ids = tok(text)["input_ids"]
            assert ids[0] == tok.bos_token_id and len(ids) == len(text) + 1  # one token per character
            assert tok.decode(ids, skip_special_tokens=True) == text
