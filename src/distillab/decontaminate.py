"""Decontamination and deduplication of the task prompts, before the teacher is paid.

Contamination. A training prompt that holds a question the run is scored on inflates every number the report
shows. Every task prompt is checked against each suite the run scores that [decontaminate] suites names:
  task      the lab task skills' test items (eval.n_per_skill of each: what evaluate scores) and eval.task_file
  general   the general lab skills' test items, and the world text whose perplexity the general suite measures
  dev       retain's dev split, when retain selects: the lab skills' dev items (retain.dev_n_per_skill; the
            general_dev_file in place of the general skills when given) and the held-out share of a user's prompts.
            That share is carved from the same prompts file: it is not checked against itself (it is what is
            scored), the training share is checked against it.
  lm_eval   the evaluation documents of eval.lm_eval_tasks' local YAML tasks, as lm-eval renders them
            (doc_to_text); lm-eval's built-in tasks are named as not checked (their documents are not local)
The rule is open-r1's and s1's: a prompt that shares a run of `ngram` consecutive words (8) with a suite item is
contaminated; a prompt of fewer words is contaminated when its whole text equals an item's. Text is normalised
first (words): NFKC, lower case, punctuation stripped, except an arithmetic operator between two words or numbers
("2+3" and "2-3" are different questions, and the lab has both). An n-gram that many items of one suite share (at
least TEMPLATE_MIN_ITEMS and TEMPLATE_SHARE of them) is that suite's template, an instruction every item carries
("put your final answer within \\boxed{}"), not its content: it matches nothing, and the record counts it.

Duplicates ([decontaminate] deduplicate). "exact": a prompt whose normalised text equals an earlier one's is
collapsed into it; "near": also one whose word shingles (`shingle` words each) are near_duplicate_threshold alike
(Jaccard) to an earlier kept one's: MinHash LSH (datasketch) proposes the candidates, the exact Jaccard of the
two shingle sets decides. The first in file order is kept. A contaminated prompt is counted as contaminated only.
With 3-word shingles at 0.8, one word changed in a 40-word prompt is a near duplicate (Jaccard 0.85), in a 24-word
one it is not (0.76): short prompts that differ by a word are often different questions.

action "drop" leaves the prompts out: they never reach the teacher. "flag" keeps them, each row with a
"decontamination" column saying why (null on a clean row). What was checked, the counts and a few examples are the
Decontamination record: data/decontamination.json, generate_summary.json, the CLI's line, the report and the
lineage card. Memory: the suites' n-grams, a digest per distinct prompt (exact), and for near duplicates the LSH
index and each kept prompt's shingle hashes (about 2 kB a prompt); the prompts are streamed, and the record keeps
the positions it drops or marks.
"""

from __future__ import annotations

import hashlib
import re
import unicodedata
from collections import Counter
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from distillab.config import DecontaminateConfig, RunConfig

OPERATORS = frozenset("+-*/=<>^×÷")  # kept as words between two words or numbers: they change the question
TEMPLATE_MIN_ITEMS = 3  # an n-gram in at least this many items of a suite, and ...
TEMPLATE_SHARE = 0.1  # ... in at least this share of them, is the suite's template
NUM_PERM = 128  # MinHash permutations
CANDIDATE_MARGIN = 0.3  # LSH proposes pairs this much below the threshold (at 0.5 it misses 1 in 20,000 0.8 pairs)
EXAMPLES = 5  # examples of each kind the record keeps
CLIP = 300  # characters of a prompt or an item an example shows

_TOKEN = re.compile(r"([^\W_]+)|\S")


def words(text: str) -> list[str]:
    """The normalised words of a text (module docstring): NFKC, lower case, punctuation dropped, an operator
    between two words or numbers kept as a word of its own."""
    text = unicodedata.normalize("NFKC", text).casefold().replace("\u2212", "-")
    tokens = [(m.group(0), m.group(1) is not None) for m in _TOKEN.finditer(text)]
    out = []
    for i, (token, is_word) in enumerate(tokens):
        if is_word or (token in OPERATORS and 0 < i < len(tokens) - 1 and tokens[i - 1][1] and tokens[i + 1][1]):
            out.append(token)
    return out


def ngrams(tokens: list[str], n: int) -> list[str]:
    return [" ".join(tokens[i : i + n]) for i in range(len(tokens) - n + 1)]


# ----------------------------------------------------------------------------------------------------
# What the run scores.


@dataclass(frozen=True)
class SuiteItem:
    suite: str  # "task:add", "general:world_text", "dev:held-out prompts", "lm_eval:gsm8k", ...
    text: str


def scored_items(cfg: RunConfig, held_out: list[dict]) -> tuple[list[SuiteItem], list[str]]:
    """(the items of every suite [decontaminate] suites names that this run scores, [suites not checked: why]).
    held_out: the dev share of a user's prompts (retain)."""
    from distillab import scoring
    from distillab.lab.world import world_text

    which, items, unchecked = set(cfg.decontaminate.suites), [], []
    task, general = scoring.suites(cfg)
    if "task" in which:
        items += _lab_items("task", task, "test", cfg.eval.n_per_skill)
        if cfg.eval.task_file:
            items += _file_items("task", cfg.eval.task_file)
    if "general" in which:
        items += _lab_items("general", general, "test", cfg.eval.n_per_skill)
        items += [SuiteItem(suite="general:world_text", text=t) for t in world_text()]
    if "dev" in which and cfg.retain.selects:
        dev_general = [] if cfg.retain.general_dev_file else general
        items += _lab_items("dev", task + dev_general, "dev", cfg.retain.dev_n_per_skill)
        if cfg.retain.general_dev_file:
            items += _file_items("dev", cfg.retain.general_dev_file)
        items += [SuiteItem(suite="dev:held-out prompts", text=p["prompt"]) for p in held_out]
    if "lm_eval" in which and cfg.eval.lm_eval_tasks:
        from distillab.lm_eval_tasks import local_task_documents

        documents, left_out = local_task_documents(cfg.eval.lm_eval_tasks)
        items += [SuiteItem(suite=f"lm_eval:{name}", text=t) for name, texts in documents.items() for t in texts]
        unchecked += [
            f"lm_eval:{name} (lm-eval's own task: its documents are not on this machine)" for name in left_out
        ]
    return items, unchecked


def _lab_items(group: str, skills: list[str], split: str, n: int) -> list[SuiteItem]:
    from distillab.lab.world import get_skill

    return [
        SuiteItem(suite=f"{group}:{s}", text=e.prompt)
        for s in dict.fromkeys(skills)
        for e in get_skill(s).examples(split, n)
    ]


def _file_items(group: str, path: str) -> list[SuiteItem]:
    from distillab.scoring import load_task_suite

    return [SuiteItem(suite=f"{group}:{Path(path).name}", text=ex["prompt"]) for ex in load_task_suite(path)]


class SuiteIndex:
    """The items' n-grams and whole texts, each naming the first item that has it; templates left out."""

    def __init__(self, items: list[SuiteItem], n: int):
        self.items, self.n = items, n
        self.exact: dict[str, int] = {}
        self.grams: dict[str, int] = {}
        self.sizes = Counter(item.suite for item in items)  # suite -> items
        self.templates: Counter = Counter()  # suite -> n-grams left out as its template
        by_suite: dict[str, list[int]] = {}
        for i, item in enumerate(items):
            by_suite.setdefault(item.suite, []).append(i)
        for suite, members in by_suite.items():
            grams_of = {i: set(ngrams(words(items[i].text), n)) for i in members}
            shared = Counter(g for grams in grams_of.values() for g in grams)
            floor = max(TEMPLATE_MIN_ITEMS, TEMPLATE_SHARE * len(members))
            template = {g for g, count in shared.items() if count >= floor}
            self.templates[suite] = len(template)
            for i in members:
                text = " ".join(words(items[i].text))
                if text:
                    self.exact.setdefault(text, i)
                for g in grams_of[i] - template:
                    self.grams.setdefault(g, i)

    def match(self, tokens: list[str]) -> tuple[SuiteItem, str] | None:
        """(the item a prompt's words match, the words they share), or None."""
        if len(tokens) < self.n:
            i = self.exact.get(" ".join(tokens)) if tokens else None
            return None if i is None else (self.items[i], " ".join(tokens))
        for g in ngrams(tokens, self.n):
            if g in self.grams:
                return self.items[self.grams[g]], g
        return None


# ----------------------------------------------------------------------------------------------------
# Duplicates.


class Duplicates:
    """Exact and near-duplicate prompts (module docstring): the first seen is kept. Near: MinHash LSH at a looser
    threshold (CANDIDATE_MARGIN below) proposes earlier prompts, and each is confirmed by the exact Jaccard of the
    two shingle sets (kept as 8-byte hashes), so the threshold is sharp, not LSH's soft S-curve."""

    def __init__(self, cfg: DecontaminateConfig):
        self.mode, self.shingle, self.threshold = cfg.deduplicate, cfg.shingle, cfg.near_duplicate_threshold
        self.seen: dict[bytes, int] = {}  # digest of the normalised text -> its first line
        self.sets: dict[int, np.ndarray] = {}  # line of a kept prompt -> its shingles' hashes, sorted
        self.lsh = None
        if self.mode == "near":
            from datasketch import MinHash, MinHashLSH

            self.lsh = MinHashLSH(threshold=max(0.1, self.threshold - CANDIDATE_MARGIN), num_perm=NUM_PERM)
            self._seed = MinHash(num_perm=NUM_PERM, seed=1)  # its permutations, shared (made once, not per prompt)

    def check(self, line: int, tokens: list[str]) -> tuple[str, int] | None:
        """("exact" or "near", the line it duplicates), or None (then it is remembered)."""
        if self.mode == "off" or not tokens:
            return None
        key = hashlib.blake2b(" ".join(tokens).encode(), digest_size=16).digest()
        if key in self.seen:
            return "exact", self.seen[key]
        self.seen[key] = line
        if self.lsh is None:
            return None
        encoded = [s.encode() for s in shingles(tokens, self.shingle)]
        own = np.unique(
            np.array(
                [int.from_bytes(hashlib.blake2b(s, digest_size=8).digest(), "little") for s in encoded], dtype=np.uint64
            )
        )
        sketch = self.minhash(encoded)
        for other in sorted(self.lsh.query(sketch)):
            if jaccard(own, self.sets[other]) >= self.threshold:
                return "near", other
        self.lsh.insert(line, sketch)
        self.sets[line] = own
        return None

    def minhash(self, encoded: list[bytes]):
        from datasketch import MinHash

        sketch = MinHash(num_perm=NUM_PERM, permutations=self._seed.permutations, scheme=self._seed.scheme)
        sketch.update_batch(encoded)
        return sketch


def jaccard(a: np.ndarray, b: np.ndarray) -> float:
    """|a ∩ b| / |a ∪ b| of two sorted arrays of distinct hashes."""
    shared = len(np.intersect1d(a, b, assume_unique=True))
    return shared / (len(a) + len(b) - shared)


def shingles(tokens: list[str], k: int) -> set[str]:
    """The word k-shingles of a text; a text shorter than k words is one shingle."""
    return set(ngrams(tokens, k)) if len(tokens) >= k else {" ".join(tokens)}


# ----------------------------------------------------------------------------------------------------
# The pass, and its record.


@dataclass
class Decontamination:
    """What the pass checked and found; to_dict() is what the run's files keep."""

    ngram: int
    action: str
    deduplicate: str
    near_duplicate_threshold: float
    suites: dict[str, int]  # suite -> items checked against
    unchecked: list[str]  # suites named but not checked, and why
    template_ngrams: dict[str, int]  # suite -> n-grams left out as its template
    checked: int = 0  # task prompts checked
    contaminated: dict[str, int] = field(default_factory=dict)  # suite -> prompts that matched one of its items
    exact_duplicates: int = 0
    near_duplicates: int = 0
    dropped: int = 0
    flagged: int = 0
    examples: list[dict] = field(default_factory=list)
    marks: dict[int, str] = field(default_factory=dict, repr=False)  # position in the prompts -> why

    def add(self, position: int, prompt: dict, line: int, why: str, kind: str, **detail) -> None:
        """A prompt dropped or flagged: `why` is its mark; the first EXAMPLES of each kind are kept as examples."""
        self.marks[position] = why
        if self.action == "drop":
            self.dropped += 1
        else:
            self.flagged += 1
        if sum(e["kind"] == kind for e in self.examples) < EXAMPLES:
            self.examples.append({"kind": kind, "line": line, "prompt": _clip(prompt["prompt"]), **detail})

    def to_dict(self) -> dict:
        return {k: v for k, v in asdict(self).items() if k != "marks"}

    def apply(self, prompts: Iterable[dict]) -> Iterable[dict]:
        """The prompts with the marked ones dropped (action "drop") or marked in a "decontamination" field ("flag");
        untouched when none is marked. A list stays a list; a stream stays lazy."""
        if not self.marks:
            return prompts
        marks, drop = self.marks, self.action == "drop"

        def stream():
            for position, p in enumerate(prompts):
                if not drop:
                    yield p | {"decontamination": marks.get(position)}
                elif position not in marks:
                    yield p

        if isinstance(prompts, list):
            return list(stream())
        from distillab.prompts import PromptStream

        return PromptStream(stream)


def decontaminate(
    cfg: RunConfig, prompts: Iterable[dict], held_out: Iterable[dict] = ()
) -> tuple[Iterable[dict], Decontamination | None]:
    """(the training prompts as [decontaminate] leaves them, the record), or (prompts, None) when it is off. One
    pass over the prompts; held_out: the dev share of a user's prompts, scored on dev when retain selects."""
    d = cfg.decontaminate
    if not d.enabled:
        return prompts, None
    items, unchecked = scored_items(cfg, list(held_out))
    index = SuiteIndex(items, d.ngram)
    record = Decontamination(
        ngram=d.ngram,
        action=d.action,
        deduplicate=d.deduplicate,
        near_duplicate_threshold=d.near_duplicate_threshold,
        suites=dict(index.sizes),
        unchecked=unchecked,
        template_ngrams={s: k for s, k in index.templates.items() if k},
    )
    duplicates = Duplicates(d)
    for position, p in enumerate(prompts):
        line = p.get("line") or position + 1
        tokens = words(p["prompt"])
        record.checked += 1
        hit = index.match(tokens)
        if hit is not None:
            item, shared = hit
            record.contaminated[item.suite] = record.contaminated.get(item.suite, 0) + 1
            record.add(
                position,
                p,
                line,
                f"contaminated: {item.suite}",
                "contaminated",
                suite=item.suite,
                match=_clip(item.text),
                shared=shared,
            )
            continue
        duplicate = duplicates.check(line, tokens)
        if duplicate is not None:
            kind, of = duplicate
            if kind == "exact":
                record.exact_duplicates += 1
            else:
                record.near_duplicates += 1
            record.add(position, p, line, f"{kind} duplicate of line {of}", f"{kind}_duplicate", duplicate_of=of)
    return record.apply(prompts), record


def _clip(text: str) -> str:
    return text if len(text) <= CLIP else text[: CLIP - 1] + "…"


# ----------------------------------------------------------------------------------------------------
# In words.


def summary_line(record: dict) -> str:
    """One line for the terminal, the report and the card: what was checked and what came of it."""
    items = sum(record["suites"].values())
    found = sum(record["contaminated"].values())
    which = ", ".join(f"{s} {n}" for s, n in sorted(record["contaminated"].items(), key=lambda kv: -kv[1]))
    parts = [f"{found} contaminated" + (f" ({which})" if which else "")]
    if record["deduplicate"] != "off":
        parts.append(
            f"{record['exact_duplicates']} exact"
            + (f" and {record['near_duplicates']} near" if record["deduplicate"] == "near" else "")
            + " duplicates"
        )
    outcome = (
        f"{record['dropped']} dropped"
        if record["action"] == "drop"
        else f"{record['flagged']} flagged (kept, marked in the decontamination column)"
    )
    line = (
        f"{record['checked']:,} prompts checked against {items:,} items of {len(record['suites'])} suites "
        f"({record['ngram']}-grams): {', '.join(parts)}; {outcome}"
    )
    if record["unchecked"]:
        line += f"; not checked: {', '.join(record['unchecked'])}"
    return line
