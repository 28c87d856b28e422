"""The lab world: procedural skills with seeded generators, disjoint train/test splits and exact scorers.

Every example is a (prompt, answer) pair. A model sees `prompt` (which ends in a newline) and must
produce `answer` followed by the end-of-sequence token. Skills are grouped in families; the knowledge
family asks about a fixed synthetic knowledge base of invented entities, so a model cannot know it unless
it was taught.

Splits: train, dev, test, disjoint. A stable hash of the prompt (open-ended skills) or of the (fact,
question template) pair (knowledge skills) puts 20% in test and 15% in dev. Test is scored once, on what
was chosen; dev is what choosing looks at (checkpoints, merge weights: see distillab.retain); train is what
a student learns from. For the knowledge skills the facts themselves are the thing to know, so every fact
is taught in at least one template; what dev and test hold out is the *phrasing*: a known fact asked in a
template never trained with that entity.

The shipped checkpoints are pretrained on train + dev; test is disjoint from both, so their test scores stand.
Distillation data never comes from dev.
"""

from __future__ import annotations

import hashlib
import random
import re
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

Split = Literal["train", "dev", "test"]
TEST_FRACTION = 0.2
DEV_FRACTION = 0.15
WORLD_SEED = 20261128


@dataclass(frozen=True)
class Example:
    skill: str
    prompt: str  # ends with "\n"; the model continues with the answer
    answer: str


def _stable_unit(text: str) -> float:
    """A number in [0, 1) fixed by the text alone (not by Python's randomised hash)."""
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "big") / 2**64


def _split_of(key: str) -> Split:
    u = _stable_unit(key)
    return "test" if u < TEST_FRACTION else ("dev" if u < TEST_FRACTION + DEV_FRACTION else "train")


# ----------------------------------------------------------------------------------------------------
# The knowledge base: invented entities with invented attributes.

ATTRIBUTES = {
    "color": ["red", "blue", "green", "gold", "gray", "pink", "black", "white"],
    "city": ["vemu", "tarsk", "olbin", "quell", "dorva", "mirak", "sunet", "pelgo", "zandu", "kivro"],
    "food": ["plim", "grast", "moba", "fennet", "lurk", "quib", "sorrel", "tavi", "nodd", "wemp"],
}
N_ENTITIES = 100  # x 3 attributes = 300 facts
RECALL_TEMPLATES = ["{attr} of {ent}?", "{ent} {attr}?", "what is the {attr} of {ent}?"]
DESCRIBE_TEMPLATES = ["describe {ent}", "tell me about {ent}"]


def _make_entities(rng: random.Random) -> list[str]:
    consonants, vowels = "bdfgklmnprstvz", "aeiou"
    names: set[str] = set()
    while len(names) < N_ENTITIES:
        names.add("".join(rng.choice(consonants) + rng.choice(vowels) for _ in range(2)) + rng.choice("bdgklmnrstx"))
    return sorted(names)


def _make_knowledge() -> dict[str, dict[str, str]]:
    rng = random.Random(WORLD_SEED)
    return {ent: {attr: rng.choice(values) for attr, values in ATTRIBUTES.items()} for ent in _make_entities(rng)}


KNOWLEDGE: dict[str, dict[str, str]] = _make_knowledge()


def describe_sentence(ent: str) -> str:
    facts = KNOWLEDGE[ent]
    return f"{ent} is a {facts['color']} beast from {facts['city']} that eats {facts['food']}."


def world_text() -> list[str]:
    """The knowledge base as plain sentences: the world's own text (used for held-out perplexity)."""
    return [describe_sentence(ent) for ent in KNOWLEDGE]


# ----------------------------------------------------------------------------------------------------
# Skills.

Draw = Callable[[random.Random], tuple[str, str]]  # rng -> (question without newline, answer)


@dataclass(frozen=True)
class Skill:
    name: str
    family: str
    description: str
    draw: Draw | None = None  # open-ended skills: rejection-sample from the split by prompt hash
    enumerate_items: Callable[[], list[tuple[str, str, str]]] | None = None  # closed skills: (key, q, a)
    metric: str = "exact"

    def examples(self, split: Split, n: int, seed: int = 0) -> list[Example]:
        """n examples from `split`, the same for the same (split, n, seed)."""
        rng = random.Random(f"{self.name}/{split}/{seed}")
        if self.enumerate_items is not None:
            items = [(q, a) for key, q, a in self.enumerate_items() if _split_of_item(self, key) == split]
            rng.shuffle(items)
            if n > len(items):  # closed skills repeat their items rather than invent new ones
                items = [items[i % len(items)] for i in range(n)]
            return [Example(skill=self.name, prompt=q + "\n", answer=a) for q, a in items[:n]]
        out: list[Example] = []
        while len(out) < n:
            q, a = self.draw(rng)
            if _split_of(f"{self.name}|{q}") == split:
                out.append(Example(skill=self.name, prompt=q + "\n", answer=a))
        return out

    def score(self, prediction: str, answer: str) -> float:
        return SCORERS[self.metric](prediction, answer)


def _split_of_item(skill: Skill, key: str) -> Split:
    return _knowledge_splits(skill.name)[key]


_SPLIT_CACHE: dict[str, dict[str, Split]] = {}


def _knowledge_splits(skill_name: str) -> dict[str, Split]:
    """Per (fact, template) split, with every fact taught in at least one template."""
    if skill_name not in _SPLIT_CACHE:
        skill = SKILLS[skill_name]
        splits: dict[str, Split] = {}
        by_fact: dict[str, list[str]] = {}
        for key, _, _ in skill.enumerate_items():
            splits[key] = _split_of(f"{skill_name}|{key}")
            by_fact.setdefault(key.rsplit("|", 1)[0], []).append(key)
        for keys in by_fact.values():
            if not any(splits[k] == "train" for k in keys):  # teach it: a dev pair first, test only when all are
                held = [k for k in keys if splits[k] == "dev"] or keys
                splits[held[0]] = "train"
        _SPLIT_CACHE[skill_name] = splits
    return _SPLIT_CACHE[skill_name]


def _letters(rng: random.Random, lo: int, hi: int) -> str:
    return "".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(lo, hi)))


def _draw_add(rng):
    a, b = rng.randint(0, 99), rng.randint(0, 99)
    return f"{a}+{b}=", str(a + b)


def _draw_sub(rng):
    a, b = sorted((rng.randint(0, 99), rng.randint(0, 99)), reverse=True)
    return f"{a}-{b}=", str(a - b)


def _draw_reverse(rng):
    s = _letters(rng, 3, 7)
    return f"reverse {s}", s[::-1]


def _draw_upper(rng):
    s = _letters(rng, 3, 7)
    return f"upper {s}", s.upper()


def _draw_sort(rng):
    s = _letters(rng, 3, 6)
    return f"sort {s}", "".join(sorted(s))


def _draw_count(rng):
    s = "".join(rng.choice("abcd") for _ in range(rng.randint(4, 9)))
    c = rng.choice("abcd")
    return f"count {c} in {s}", str(s.count(c))


def _draw_length(rng):
    s = _letters(rng, 1, 12)
    return f"length of {s}", str(len(s))


def _draw_max(rng):
    xs = [rng.randint(0, 99) for _ in range(3)]
    return "max " + " ".join(map(str, xs)), str(max(xs))


def _draw_compare(rng):
    a, b = rng.randint(0, 99), rng.randint(0, 99)
    return f"compare {a} {b}", "<" if a < b else (">" if a > b else "=")


def _recall_items() -> list[tuple[str, str, str]]:
    return [
        (f"{ent}|{attr}|{t}", template.format(attr=attr, ent=ent), value)
        for ent, facts in KNOWLEDGE.items()
        for attr, value in facts.items()
        for t, template in enumerate(RECALL_TEMPLATES)
    ]


def _describe_items() -> list[tuple[str, str, str]]:
    return [
        (f"{ent}|{t}", template.format(ent=ent), describe_sentence(ent))
        for ent in KNOWLEDGE
        for t, template in enumerate(DESCRIBE_TEMPLATES)
    ]


# ----------------------------------------------------------------------------------------------------
# Scorers: exact match, and word-level F1 for the free-text skill.


def exact(prediction: str, answer: str) -> float:
    return float(prediction.strip() == answer.strip())


def _words(text: str) -> list[str]:
    return re.findall(r"[a-z0-9]+", text.lower())


def word_f1(prediction: str, answer: str) -> float:
    """Bag-of-words F1 between prediction and reference (as SQuAD's F1): 1.0 only for the same words."""
    pred, ref = Counter(_words(prediction)), Counter(_words(answer))
    overlap = sum((pred & ref).values())
    if overlap == 0:
        return float(not pred and not ref)
    precision, recall = overlap / sum(pred.values()), overlap / sum(ref.values())
    return 2 * precision * recall / (precision + recall)


SCORERS: dict[str, Callable[[str, str], float]] = {"exact": exact, "word_f1": word_f1}

SKILLS: dict[str, Skill] = {
    s.name: s
    for s in [
        Skill(name="add", family="arithmetic", description="sum of two numbers below 100", draw=_draw_add),
        Skill(
            name="sub",
            family="arithmetic",
            description="difference of two numbers below 100, never negative",
            draw=_draw_sub,
        ),
        Skill(name="reverse", family="string", description="a 3-7 letter string reversed", draw=_draw_reverse),
        Skill(name="upper", family="string", description="a 3-7 letter string in upper case", draw=_draw_upper),
        Skill(name="sort", family="string", description="the letters of a 3-6 letter string sorted", draw=_draw_sort),
        Skill(name="count", family="counting", description="how often a letter occurs in a string", draw=_draw_count),
        Skill(name="length", family="counting", description="the length of a string", draw=_draw_length),
        Skill(name="max", family="counting", description="the largest of three numbers", draw=_draw_max),
        Skill(name="compare", family="counting", description="<, > or = between two numbers", draw=_draw_compare),
        Skill(
            name="recall",
            family="knowledge",
            description="an attribute of an invented entity",
            enumerate_items=_recall_items,
        ),
        Skill(
            name="describe",
            family="knowledge",
            description="a sentence describing an invented entity (free text, word F1)",
            enumerate_items=_describe_items,
            metric="word_f1",
        ),
    ]
}


def get_skill(name: str) -> Skill:
    if name not in SKILLS:
        import difflib

        hint = difflib.get_close_matches(name, SKILLS, n=1)
        raise ValueError(
            f"unknown lab skill {name!r}"
            + (f" (did you mean {hint[0]!r}?)" if hint else "")
            + f"; skills: {', '.join(SKILLS)}"
        )
    return SKILLS[name]
