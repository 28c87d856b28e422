"""Cross-tokenizer distillation: the teacher's top-k, written in its own tokens, moved onto the student's tokens
by text spans.

Both sides are read as text first. The teacher's completion is a list of pieces (the text each of its tokens adds)
with character offsets, and at each of its positions k candidates (the text each top-k token would have added) with
their log-probs; the student's tokenization of the same completion is a list of character spans. Then, for each
student token:

- its start is not where a teacher token starts (it begins inside one): no teacher distribution (kd mask false; the
  token trains on its text, like any token without one);
- it ends within the teacher token that starts there: each candidate text goes to the student's first token of its
  own tokenization (the sampled candidate to the student's token itself: in context it begins that way), and
  candidates that land on the same student token add their probabilities;
- it spans several teacher tokens ("he" + "llo" vs "hello"): the student's token gets the probability of the
  teacher's sampled path through them, P(he) * P(llo | he) (a lower bound of the text continuing that way); the
  sampled candidate's remaining mass, P(he) - P(hello), goes to the tail; the other candidates map as above;
- the student's end-of-sequence token aligns with the teacher's: its candidates map the same way, the teacher's
  end-of-sequence to the student's. A teacher that gave no end token but stopped (an API) makes it certain.
Candidates that do not map (another special token, a text the student cannot begin) and the teacher's own tail go
to the tail bucket, which the codec and the sparse losses keep (topk_codec, losses.py): the probabilities stay a
distribution, now over the student's vocabulary plus one bucket.

Reading the teacher's tokens as text: a local teacher's ids are decoded with its tokenizer, prefix by prefix (the
offset of token i is the length of the decoded first i tokens, so byte-level and SentencePiece tokenizers give
clean spans; a prefix that ends inside a multi-byte character is no boundary), and each candidate as the text it
adds after the previous sampled token. An API teacher's token strings are the pieces as they come.

This is the span-alignment half of TRL's GOLD (which also merges the teacher's sampled path over spans), without
its ULD term: positions that do not align get no teacher distribution rather than a sorted-probability match.
What survives is measured (AlignStats): the share of the teacher's top-k mass that lands on student tokens, over
the aligned positions, and the share of student positions aligned.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

END = "\x00<end-of-sequence>"  # a candidate that is the teacher's end-of-sequence (never a real piece of text)
NEG_INF = float("-inf")


@dataclass
class TeacherTokens:
    """The teacher's completion in its own tokens, as text. Tt positions, k candidates each."""

    starts: list[int | None]  # (Tt,) character offset where the token starts in the completion; None: not a boundary
    pieces: list[str | None]  # (Tt,) the text the sampled token adds (END for end-of-sequence; None: unknown)
    candidates: list[list[str | None]]  # (Tt, k) the text each top-k token would add (END; None: maps to nothing)
    logprobs: list[list[float]]  # (Tt, k) their log-probs
    picked: list[int]  # (Tt,) index of the sampled token among the candidates, -1 when outside the top-k
    tails: list[float] | None = None  # (Tt,) log of the mass outside the top-k; None: 1 - sum of the top-k


@dataclass
class Aligned:
    """The teacher's distribution over the student's tokens, one row per student completion token (Ts rows)."""

    ids: list[list[int]]  # (Ts, <= k) student ids, distinct per row ([] where there is none)
    logprobs: list[list[float]]  # (Ts, <= k)
    tails: list[float]  # (Ts,) log of the mass outside the ids (0.0 where there is none: all of it)
    mask: list[bool]  # (Ts,) whether the row is a teacher distribution
    kept: list[float] = field(default_factory=list)  # per aligned position with a real teacher row: mass kept / top-k


@dataclass
class AlignStats:
    """Counts over many rows, for generate's summary."""

    rows: int = 0  # rows aligned across tokenizers
    positions: int = 0  # their student completion tokens
    aligned: int = 0  # ... with a teacher distribution
    kept_sum: float = 0.0  # sum over aligned positions of (teacher mass kept / teacher top-k mass)
    kept_n: int = 0

    def add(self, alignment: Aligned) -> None:
        self.rows += 1
        self.positions += len(alignment.mask)
        self.aligned += sum(alignment.mask)
        self.kept_sum += sum(alignment.kept)
        self.kept_n += len(alignment.kept)

    def to_dict(self) -> dict:
        return {
            "rows": self.rows,
            "positions": self.positions,
            "aligned_share": self.aligned / self.positions if self.positions else 0.0,
            "mass_kept": self.kept_sum / self.kept_n if self.kept_n else 0.0,
        }

    def line(self) -> str:
        stats = self.to_dict()
        return (
            f"{stats['rows']} rows aligned across tokenizers by text spans: {stats['aligned_share']:.1%} of student "
            f"tokens get a teacher distribution, keeping {stats['mass_kept']:.1%} of the teacher's top-k mass on "
            "average"
        )


def _logsumexp(values: list[float]) -> float:
    top = max(values, default=NEG_INF)
    return top if top == NEG_INF else top + math.log(sum(math.exp(v - top) for v in values))


def _log1mexp(x: float) -> float:
    """log(1 - exp(x)) for x <= 0, accurate at both ends."""
    if x >= 0:
        return NEG_INF
    return math.log(-math.expm1(x)) if x > -0.693 else math.log1p(-math.exp(x))


def align(
    teacher: TeacherTokens,
    starts: list[int | None],
    ends: list[int | None],
    ids: list[int],
    is_end: list[bool],
    first_id: Callable[[str], int | None],
    eos_id: int,
    stopped: bool = False,
) -> Aligned:
    """The teacher's top-k onto the student's completion tokens (the module docstring's rules).

    starts, ends (Ts,): each student token's character span in the completion (None: not on a character boundary);
    ids (Ts,): the student's tokens; is_end (Ts,): the end-of-sequence token (zero width, at the end).
    first_id(text): the student's first token of its tokenization of text, or None. stopped: the teacher stopped
    without an end token of its own (an API's finish_reason "stop"): the student's end token is then certain.
    """
    real = [i for i, s in enumerate(teacher.starts) if s is not None and teacher.pieces[i] not in (None, END, "")]
    at_start = {}
    for i in real:
        at_start.setdefault(teacher.starts[i], i)
    end_of = {i: teacher.starts[i] + len(teacher.pieces[i]) for i in real}  # type: ignore[operator]
    next_real = {a: b for a, b in zip(real, real[1:])}
    teacher_end = next((i for i, p in enumerate(teacher.pieces) if p == END), None)
    out = Aligned(ids=[], logprobs=[], tails=[], mask=[])

    def none() -> None:
        out.ids.append([])
        out.logprobs.append([])
        out.tails.append(0.0)
        out.mask.append(False)

    for j, student_id in enumerate(ids):
        if is_end[j]:
            if teacher_end is None:
                if stopped:  # the teacher's distribution there is unknown; it did stop: certain
                    out.ids.append([eos_id])
                    out.logprobs.append([0.0])
                    out.tails.append(NEG_INF)
                    out.mask.append(True)
                else:
                    none()
                continue
            chain, target = [teacher_end], eos_id
        else:
            i = at_start.get(starts[j]) if starts[j] is not None and ends[j] is not None else None
            if i is None:
                none()
                continue
            chain, target = [i], student_id
            while end_of[chain[-1]] < ends[j]:  # the student token runs past this teacher token: follow the path
                nxt = next_real.get(chain[-1])
                if nxt is None or teacher.starts[nxt] != end_of[chain[-1]]:
                    break
                chain.append(nxt)
            path_unknown = len(chain) > 1 and any(teacher.picked[p] < 0 for p in chain)
            if end_of[chain[-1]] < ends[j] or path_unknown:  # text past the teacher's, or a path off its top-k
                none()
                continue
        i = chain[0]
        lps = teacher.logprobs[i]
        merged: dict[int, list[float]] = {}
        dropped = [teacher.tails[i] if teacher.tails is not None else _log1mexp(min(0.0, _logsumexp(lps)))]
        for c, (text, lp) in enumerate(zip(teacher.candidates[i], lps)):
            if lp == NEG_INF:
                continue
            if c == teacher.picked[i]:
                path = lp + sum(teacher.logprobs[p][teacher.picked[p]] for p in chain[1:])
                merged.setdefault(target, []).append(path)
                if len(chain) > 1:
                    dropped.append(lp + _log1mexp(min(0.0, path - lp)))
                continue
            to = eos_id if text == END else (first_id(text) if text else None)
            if to is None:
                dropped.append(lp)
            else:
                merged.setdefault(to, []).append(lp)
        ranked = sorted(((x, _logsumexp(v)) for x, v in merged.items()), key=lambda item: -item[1])
        if not ranked:  # nothing landed on a student token: no distribution, rather than "all in the tail"
            none()
            continue
        out.ids.append([x for x, _ in ranked])
        out.logprobs.append([lp for _, lp in ranked])
        out.tails.append(_logsumexp(dropped))
        out.mask.append(True)
        top_mass = math.exp(_logsumexp(lps))
        if top_mass > 0:
            out.kept.append(min(1.0, sum(math.exp(lp) for _, lp in ranked) / top_mass))
    return out


def rectangle(alignment: Aligned, k: int) -> tuple[list[list[int]], list[list[float]], list[float]]:
    """(ids (Ts, k), logprobs (Ts, k), tails (Ts,)) for the codec: every row k distinct ids, missing ones at -inf;
    a row past k keeps its k most likely and adds the rest to its tail."""
    from distillab.teachers.openai_compat import pad_topk

    ids, lps, tails = [], [], []
    for row_ids, row_lps, tail in zip(alignment.ids, alignment.logprobs, alignment.tails):
        tails.append(min(0.0, _logsumexp([tail, *row_lps[k:]])))  # round-off must not make a mass over 1
        ids.append(row_ids[:k])
        lps.append(row_lps[:k])
    ids, lps = pad_topk(ids, lps, k)
    return ids, lps, tails


# ----------------------------------------------------------------------------------------------------
# Reading each side as text.


def prefix_offsets(ids: list[int], decode: Callable[[list[int]], str], text: str) -> list[int | None]:
    """(T + 1,) the character offset after each prefix of ids: len(decode(ids[:t])), or None where that prefix is
    not a prefix of text (it ends inside a character, or the decoder rewrites it)."""
    out: list[int | None] = []
    for t in range(len(ids) + 1):
        prefix = decode(ids[:t])
        out.append(len(prefix) if text.startswith(prefix) else None)
    return out


def student_spans(completion_ids: list[int], tokenizer, text: str):
    """The student's completion tokens as (starts, ends, is_end), each (Ts,): character spans in text, the
    end-of-sequence token zero-width at its end."""
    eos = tokenizer.eos_token_id
    body = completion_ids[:-1] if completion_ids and completion_ids[-1] == eos else completion_ids
    offsets = prefix_offsets(body, lambda x: tokenizer.decode(x, skip_special_tokens=True), text)
    starts, ends = offsets[:-1], offsets[1:]
    is_end = [False] * len(body)
    if len(body) < len(completion_ids):
        starts, ends, is_end = starts + [len(text)], ends + [len(text)], is_end + [True]
    return starts, ends, is_end


class FirstToken:
    """first_id for align: the student's first token of a text's tokenization (special tokens by their names)."""

    def __init__(self, tokenizer):
        self.tokenizer, self.cache = tokenizer, {}

    def __call__(self, text: str) -> int | None:
        if text not in self.cache:
            ids = self.tokenizer(text, add_special_tokens=False)["input_ids"] if text else []
            self.cache[text] = ids[0] if ids else None
        return self.cache[text]


def teacher_from_ids(resp: dict, ids, logprobs, tails, tokenizer, pieces_cache: dict | None = None) -> TeacherTokens:
    """A local teacher's response (token_ids, text) and its decoded top-k (ids (Tt, k), logprobs (Tt, k), tails (Tt,)
    or None) -> TeacherTokens, read with the teacher's tokenizer."""
    token_ids, text = list(resp["token_ids"]), resp["text"]
    ends_with = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
    specials = set(tokenizer.all_special_ids)
    decode = lambda x: tokenizer.decode(x, skip_special_tokens=True)  # noqa: E731
    offsets = prefix_offsets(token_ids, decode, text)
    cache = pieces_cache if pieces_cache is not None else {}

    def after(prev: int | None, cand: int) -> str | None:
        """The text cand adds after the sampled token prev (None: it does not extend it cleanly)."""
        if cand in ends_with:
            return END
        if cand in specials:
            return None
        key = (prev, cand)
        if key not in cache:
            head = decode([prev]) if prev is not None else ""
            both = decode([prev, cand] if prev is not None else [cand])
            cache[key] = both[len(head) :] if both.startswith(head) and len(both) > len(head) else None
        return cache[key]

    starts, pieces, candidates, picked = [], [], [], []
    for t, tid in enumerate(token_ids):
        start, stop = offsets[t], offsets[t + 1]
        starts.append(start)
        if tid in ends_with:
            pieces.append(END)
        elif start is None or stop is None:
            pieces.append(None)
        else:
            pieces.append(text[start:stop])
        prev = token_ids[t - 1] if t else None
        row = [int(x) for x in ids[t]]
        candidates.append([after(prev, c) for c in row])
        picked.append(row.index(tid) if tid in row else -1)
    n = len(token_ids)
    return TeacherTokens(
        starts=starts,
        pieces=pieces,
        candidates=candidates,
        logprobs=[list(map(float, r)) for r in logprobs[:n]],
        picked=picked,
        tails=None if tails is None else [float(x) for x in tails[:n]],
    )


def teacher_from_strings(resp: dict) -> TeacherTokens | None:
    """An API response's token strings (tokens, top_tokens, top_logprobs) -> TeacherTokens; None when the strings do
    not spell the text. Strings past the end of the text (an end token the server wrote out) are END."""
    text, tokens = resp["text"], resp["tokens"]
    starts, pieces, at = [], [], 0
    for s in tokens:
        starts.append(at)
        if at == len(text) and s:  # past the text: an end token the server wrote out
            pieces.append(END)
            continue
        if not text.startswith(s, at):
            return None
        pieces.append(s)
        at += len(s)
    if at != len(text):
        return None
    candidates = [
        [END if (piece == END and s == tokens[t]) else s for s in row]
        for t, (row, piece) in enumerate(zip(resp["top_tokens"], pieces))
    ]
    picked = [row.index(tokens[t]) if tokens[t] in row else -1 for t, row in enumerate(resp["top_tokens"])]
    return TeacherTokens(
        starts=starts,
        pieces=pieces,
        candidates=candidates,
        logprobs=[list(r) for r in resp["top_logprobs"]],
        picked=picked,
    )


def encode(alignment: Aligned, k: int) -> dict:
    """The codec's arrays of the aligned top-k, with its tails. A position without a teacher distribution is stored
    as one with no mass on its ids (all in the tail), which collate reads as none (kd mask false)."""
    from distillab.topk_codec import encode_topk

    ids, lps, tails = rectangle(alignment, k)
    return encode_topk(ids, lps, tail_logprob=tails)


def fill_rows(top_ids: list, top_lps: list, k: int) -> tuple[list[list[int]], list[list[float]]]:
    """Rows where some positions are None (no teacher distribution) -> (ids (Ts, k), logprobs (Ts, k)): those get k
    filler ids at -inf, no mass on the ids, which collate reads as no distribution (kd mask false)."""
    from distillab.teachers.openai_compat import pad_topk

    return pad_topk([row or [] for row in top_ids], [row or [] for row in top_lps], k)


def load_tokenizer_dir(name: str, what: str):
    """A tokenizer from a directory of its files (a model directory, or the files alone) or lab:NAME; a one-line
    UserError naming `what` (the config key it came from) when there is none."""
    from transformers import AutoTokenizer

    from distillab import models
    from distillab.errors import UserError

    path = models.LAB_CHECKPOINTS / name[len("lab:") :] if name.startswith("lab:") else Path(name).expanduser()
    try:
        return AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    except (OSError, ValueError, TypeError, KeyError) as err:
        detail = " ".join(f"{type(err).__name__}: {err}".split())[:200]
        raise UserError(
            f"{what} = {name!r}: no tokenizer there ({detail}); give a directory of tokenizer files"
        ) from None


def probe(teacher_tok, student_tok, texts: list[str]) -> tuple[float, float]:
    """What generate checks before a teacher of another tokenizer is paid, on sample texts: (the share of texts the
    teacher's tokenizer gives back when it decodes its own tokens of them, the share of the student's tokens of those
    texts that get a teacher distribution when the teacher's tokens are aligned onto them, its tokenization as the
    sampled path, certain). Spans are read from decoded prefixes (prefix_offsets): a tokenizer that does not give
    its text back (a normalizer that lowercases, a decoder that joins tokens with spaces) has none past its first
    difference, and its top-k cannot be aligned."""
    aligner, given_back = Aligner(student_tok, teacher_tok=teacher_tok), 0
    for text in texts:
        ids = teacher_tok(text, add_special_tokens=False)["input_ids"]
        if teacher_tok.decode(ids, skip_special_tokens=True) != text:
            continue
        given_back += 1
        completion_ids = student_tok(text, add_special_tokens=False)["input_ids"]
        aligner.from_ids({"token_ids": ids, "text": text}, [[i] for i in ids], [[0.0]] * len(ids), None, completion_ids)
    return given_back / max(len(texts), 1), aligner.stats.to_dict()["aligned_share"]


class Aligner:
    """What generate needs to align many rows: the student's tokenizer, the teacher's (loaded when first needed),
    their caches, and the counts."""

    def __init__(self, student_tok, teacher_model: str | None = None, teacher_tok=None):
        self.student_tok, self.teacher_model = student_tok, teacher_model
        self.first = FirstToken(student_tok)
        self.stats = AlignStats()
        self._teacher_tok, self._pieces = teacher_tok, {}

    def teacher_tok(self):
        if self._teacher_tok is None and self.teacher_model is not None:
            from distillab import models

            self._teacher_tok = models.load_tokenizer(self.teacher_model)
        return self._teacher_tok

    def from_ids(self, resp: dict, ids, logprobs, tails, completion_ids: list[int]) -> Aligned | None:
        """A local teacher's row onto the student's completion_ids; None when the teacher's tokenizer is unknown."""
        tok = self.teacher_tok()
        if tok is None:
            return None
        teacher = teacher_from_ids(resp, ids, logprobs, tails, tok, self._pieces)
        return self._align(teacher, resp, completion_ids)

    def from_strings(self, resp: dict, completion_ids: list[int]) -> Aligned | None:
        teacher = teacher_from_strings(resp)
        return None if teacher is None else self._align(teacher, resp, completion_ids)

    def _align(self, teacher: TeacherTokens, resp: dict, completion_ids: list[int]) -> Aligned:
        starts, ends, is_end = student_spans(completion_ids, self.student_tok, resp["text"])
        alignment = align(
            teacher,
            starts,
            ends,
            completion_ids,
            is_end,
            self.first,
            self.student_tok.eos_token_id,
            stopped=resp.get("finish_reason") == "stop",
        )
        self.stats.add(alignment)
        return alignment
