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

from distillab.config import TRACE_FORMAT

Split = Literal["train", "dev", "test", "teacher"]
TEST_FRACTION = 0.2
DEV_FRACTION = 0.15
WORLD_SEED = 20261128


@dataclass(frozen=True)
class Example:
    skill: str
    prompt: str  # ends with "\n"; the model continues with the answer
    answer: str
    trace: str | None = None  # the worked steps a reasoning skill writes before its answer

    @property
    def completion(self) -> str:
        """What a model that knows the skill writes: the trace in think tags (the pipeline's default trace format,
        which distillab.reasoning splits), then the answer; the answer alone for a skill without traces."""
        if self.trace is None:
            return self.answer
        return TRACE_FORMAT.format(reasoning=self.trace, answer=self.answer)


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
    # the splits a question belongs to (default: one, by its hash; see _split_of and _knowledge_splits)
    splits_of: Callable[[str], frozenset[str]] | None = None
    # closed skills whose answer is a draw: (question, rng) -> a fresh answer for every example
    resample: Callable[[str, random.Random], str] | None = None

    def examples(self, split: Split, n: int, seed: int = 0) -> list[Example]:
        """n examples from `split`, the same for the same (split, n, seed)."""
        rng = random.Random(f"{self.name}/{split}/{seed}")
        if self.enumerate_items is not None:
            items = [
                (q, a)
                for key, q, a in self.enumerate_items()
                if (split in self.splits_of(q) if self.splits_of else _split_of_item(self, key) == split)
            ]
            rng.shuffle(items)
            if n > len(items):  # closed skills repeat their items rather than invent new ones
                items = [items[i % len(items)] for i in range(n)]
            return [
                Example(skill=self.name, prompt=q + "\n", answer=self.resample(q, rng) if self.resample else a)
                for q, a in items[:n]
            ]
        out: list[Example] = []
        while len(out) < n:
            q, a, *trace = self.draw(rng)
            in_split = split in self.splits_of(q) if self.splits_of else _split_of(f"{self.name}|{q}") == split
            if in_split:
                out.append(Example(skill=self.name, prompt=q + "\n", answer=a, trace=trace[0] if trace else None))
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


# ----------------------------------------------------------------------------------------------------
# The signal skills: where a teacher's signal carries more than its greedy text (`distillab demo --signal`).
# Both distil on prompts the teacher never saw: each carves a "teacher" region that only pretraining draws
# from, and the student's train / dev / test come from the rest. They are not part of SKILLS, so the
# classic demo's general suite (every classic skill not in the task) stays what it is.

HABITS = ["swims", "sings", "digs", "naps"]
# Each entity's habits follow one of these shapes, in an order of its own: a mode worth ~half the mass and a
# tail a greedy answer never shows.
HABIT_SHAPES = [(0.5, 0.3, 0.15, 0.05), (0.45, 0.35, 0.2, 0.0), (0.6, 0.25, 0.1, 0.05), (0.4, 0.3, 0.2, 0.1)]
HABIT_TEMPLATES = ["habit of {ent}?", "{ent} habit?", "what does {ent} do?"]


def _make_habits() -> dict[str, dict[str, float]]:
    rng = random.Random(WORLD_SEED + 1)
    table = {}
    for ent in KNOWLEDGE:
        shape, order = rng.choice(HABIT_SHAPES), rng.sample(HABITS, len(HABITS))
        table[ent] = dict(zip(order, shape))
    return table


HABIT_DISTRIBUTION: dict[str, dict[str, float]] = _make_habits()


def _student_template(ent: str) -> int:
    """The one habit question template the teacher never sees for `ent` (it learns the entity in the other two)."""
    return int(_stable_unit(f"habit|{ent}") * len(HABIT_TEMPLATES))


def habit_entity(prompt: str) -> str:
    """The entity a habit question asks about."""
    return next(w for w in re.findall(r"[a-z]+", prompt) if w in HABIT_DISTRIBUTION)


def _habit_splits(question: str) -> frozenset[str]:
    ent = habit_entity(question)
    template = next(t for t, text in enumerate(HABIT_TEMPLATES) if text.format(ent=ent) == question)
    # The knowledge is the distribution itself: the student is taught and scored on the same questions, scored
    # against the world's distribution (habit_scores), never against the teacher's samples.
    return frozenset({"train", "dev", "test"}) if template == _student_template(ent) else frozenset({"teacher"})


def _habit_items() -> list[tuple[str, str, str]]:
    """Every (entity, template) question, with the entity's most likely habit as its reference answer."""
    return [
        (f"{ent}|{t}", template.format(ent=ent), max(habits, key=habits.get))
        for ent, habits in HABIT_DISTRIBUTION.items()
        for t, template in enumerate(HABIT_TEMPLATES)
    ]


def draw_habit(question: str, rng: random.Random) -> str:
    habits = HABIT_DISTRIBUTION[habit_entity(question)]
    return rng.choices(list(habits), weights=list(habits.values()))[0]


def _carry_splits(question: str) -> frozenset[str]:
    """Half the problems are the teacher's; the student's train / dev / test are carved from the other half."""
    u = _stable_unit(f"carry|{question}")
    return frozenset({"teacher" if u < 0.5 else "test" if u < 0.65 else "dev" if u < 0.75 else "train"})


def carry_trace(a: int, b: int) -> str:
    """Column addition, right to left: each line adds a column and its carry, then the answer so far."""
    lines, carry, so_far = [], 0, ""
    for x, y in zip(reversed(str(a)), reversed(str(b)), strict=True):
        total = int(x) + int(y) + carry
        so_far = str(total % 10) + so_far
        lines.append(f"{x}+{y}{'+1' if carry else ''}={total} {so_far}")
        carry = total // 10
    if carry:
        lines.append(f"carry 1 {'1' + so_far}")
    return "\n".join(lines)


def _draw_carry(rng):
    a, b = rng.randint(100, 999), rng.randint(100, 999)
    return f"sum {a} {b}", str(a + b), carry_trace(a, b)


SIGNAL_SKILLS: dict[str, Skill] = {
    s.name: s
    for s in [
        Skill(
            name="habit",
            family="distribution",
            description="what an invented entity does: each answer a draw from its own distribution over four habits",
            enumerate_items=_habit_items,
            splits_of=_habit_splits,
            resample=draw_habit,
        ),
        Skill(
            name="carry",
            family="reasoning",
            description="the sum of two 3-digit numbers, with a column-by-column trace before the answer",
            draw=_draw_carry,
            splits_of=_carry_splits,
        ),
    ]
}
ALL_SKILLS: dict[str, Skill] = {**SKILLS, **SIGNAL_SKILLS}


def get_skill(name: str) -> Skill:
    if name not in ALL_SKILLS:
        import difflib

        hint = difflib.get_close_matches(name, ALL_SKILLS, n=1)
        raise ValueError(
            f"unknown lab skill {name!r}"
            + (f" (did you mean {hint[0]!r}?)" if hint else "")
            + f"; skills: {', '.join(ALL_SKILLS)}"
        )
    return ALL_SKILLS[name]
