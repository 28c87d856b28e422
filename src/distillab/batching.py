"""Rows -> torch: the training set (task rows, with retain replay in a fixed batch-by-batch order), its order
(TrainOrder: global batches, the same on any number of processes; length grouping), its batches (collate, packing),
and right padding for scoring.

Rows come from a RowSource: trainrows.ArrowRows (a dataset streamed from its Arrow copy) or ListRows (rows in memory),
either seen through LengthLimit where train.max_length is set.
"""

from __future__ import annotations

import numpy as np
import torch

from distillab.dataset import TOPK_KEYS
from distillab.errors import UserError
from distillab.trainrows import ArrowRows


class ListRows:
    """Rows already in memory (tests, benchmarks, small callers of build_trainer): the ArrowRows interface."""

    def __init__(self, rows: list[dict]):
        self.rows = rows
        self.prompt_lengths = np.array([len(r["prompt_ids"]) for r in rows], dtype=np.int64)
        self.completion_lengths = np.array([len(r["completion_ids"]) for r in rows], dtype=np.int64)
        self.answer_lengths = np.array(
            [-1 if r.get("answer_ids") is None else len(r["answer_ids"]) for r in rows], dtype=np.int64
        )  # a reasoning row's answer alone; -1: a row without a trace
        with_topk = [r["top_ids"] for r in rows if r.get("top_ids") is not None and len(r["top_ids"])]
        self.max_teacher_id = max((int(torch.as_tensor(ids).max()) for ids in with_topk), default=-1)
        self.has_topk = bool(with_topk)

    def __len__(self) -> int:
        return len(self.rows)

    def fetch(self, indices) -> list[dict]:
        return [self.rows[i] for i in indices]


RowSource = ArrowRows | ListRows

PER_TOKEN = ("completion_ids", *TOPK_KEYS)  # a row's columns with one entry per completion token


class LengthLimit:
    """train.max_length over a RowSource, itself one: a row longer than max_length tokens (prompt + completion) has its
    completion cut at the end, the teacher's top-k with it position for position (overflow "truncate"), or is left
    out ("drop"). A row whose prompt alone leaves no room for one completion token is left out either way: cutting
    its prompt would train on an answer to a question the student never saw. The counts go to train_summary.json."""

    def __init__(self, source: RowSource, max_length: int, overflow: str):
        self.source, self.max_length = source, max_length
        prompt, completion = source.prompt_lengths.astype(np.int64), source.completion_lengths.astype(np.int64)
        over = prompt + completion > max_length
        left_out = over if overflow == "drop" else prompt >= max_length
        self.kept = np.flatnonzero(~left_out)  # (kept,) the source's row of each of these rows
        self.prompt_lengths = prompt[self.kept]
        self.completion_lengths = np.minimum(completion, max_length - prompt)[self.kept]
        self.truncated_rows = int((over & ~left_out).sum())
        self.dropped_rows = int(left_out.sum())
        self.tokens_cut = int(completion.sum() - self.completion_lengths.sum())  # cut ends + dropped completions
        self.max_teacher_id, self.has_topk = source.max_teacher_id, source.has_topk

    def __len__(self) -> int:
        return len(self.kept)

    def fetch(self, indices) -> list[dict]:
        rows = self.source.fetch(self.kept[np.asarray(indices, dtype=np.int64)].tolist())
        return [cut_row(row, self.max_length - len(row["prompt_ids"])) for row in rows]


def cut_row(row: dict, n: int) -> dict:
    """The row with its completion and every per-token column cut to the first n positions."""
    if len(row["completion_ids"]) <= n:
        return row
    return row | {key: row[key][:n] for key in PER_TOKEN if row.get(key) is not None}


class AnswersOnly:
    """[train] traces = false over a RowSource, itself one: a row with a reasoning trace trains on its answer alone
    (answer_ids: the answer as the student's template writes it without a trace) instead of trace + answer, for
    comparison. The teacher's top-k stays on the answer's tokens when they are the last tokens of completion_ids (the
    answer tokenized alike inside the whole), else the row trains on its text. Rows without a trace are unchanged."""

    def __init__(self, source: RowSource):
        self.source = source
        answers = source.answer_lengths
        self.prompt_lengths = source.prompt_lengths
        self.completion_lengths = np.where(answers >= 0, answers, source.completion_lengths)
        self.answer_lengths = np.full(len(answers), -1)  # no trace left to leave out
        self.max_teacher_id, self.has_topk = source.max_teacher_id, source.has_topk

    def __len__(self) -> int:
        return len(self.source)

    def fetch(self, indices) -> list[dict]:
        return [answer_only(row) for row in self.source.fetch(indices)]


def answer_only(row: dict) -> dict:
    """A row with a reasoning trace as its answer alone (AnswersOnly); a row without one as it is."""
    if row.get("answer_ids") is None:
        return row
    answer, completion = list(row["answer_ids"]), list(row["completion_ids"])
    start = len(completion) - len(answer)
    at_end = start >= 0 and completion[start:] == answer
    return (
        row
        | {"completion_ids": answer, "answer_ids": None}
        | {key: row[key][start:] if at_end and row.get(key) is not None else None for key in TOPK_KEYS}
    )


def answers_only(rows: RowSource | list[dict] | None, traces: bool) -> RowSource | list[dict] | None:
    """rows as [train] traces lets them through: unchanged when the traces are trained on (or without rows)."""
    if traces or rows is None:
        return rows
    return AnswersOnly(ListRows(rows) if isinstance(rows, list) else rows)


def limit_length(
    rows: RowSource | list[dict] | None, max_length: int | None, overflow: str
) -> RowSource | list[dict] | None:
    """rows as train.max_length lets them through: unchanged without a limit (or without rows)."""
    if max_length is None or rows is None:
        return rows
    return LengthLimit(ListRows(rows) if isinstance(rows, list) else rows, max_length, overflow)


def right_pad(id_lists: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids, attention mask), both (B, T): each sequence from position 0, pad_id after it. Right padding keeps
    every sequence's positions 0..n-1, as in training, so scores match unpadded ones."""
    width = max(len(ids) for ids in id_lists)
    ids = torch.full((len(id_lists), width), pad_id, dtype=torch.long)  # (B, T)
    mask = torch.zeros((len(id_lists), width), dtype=torch.long)  # (B, T)
    for row, seq in enumerate(id_lists):
        ids[row, : len(seq)] = torch.tensor(seq, dtype=torch.long)
        mask[row, : len(seq)] = 1
    return ids, mask


class DistillDataset(torch.utils.data.Dataset):
    """The task rows; with retain replay, the task and replay rows in a fixed batch-by-batch order
    (retain.batch_layout), read sequentially so every batch holds the configured replay share. An item is its own
    index: the collator (Collator) fetches and decodes a whole batch at once."""

    def __init__(
        self,
        task: RowSource | list[dict],
        vocab_size: int,
        replay: RowSource | list[dict] | None = None,
        layout: list[tuple[str, int]] | None = None,
    ):
        self.task = task if not isinstance(task, list) else ListRows(task)
        self.replay = replay if not isinstance(replay, list) else ListRows(replay)
        self.sources = [self.task] + ([self.replay] if self.replay is not None else [])
        for name, source in zip(("task", "replay"), self.sources):
            if source.max_teacher_id >= vocab_size:
                raise UserError(
                    f"teacher token ids reach past the student's vocabulary ({vocab_size}) in the {name} "
                    f"rows (up to {source.max_teacher_id}): teacher and student tokenizers differ"
                )
        if layout is None:  # item i is task row i
            self.group, self.index = np.zeros(len(self.task), np.int8), np.arange(len(self.task))
        else:  # (n,) each: 0 task / 1 replay, and the row in that source
            self.group = np.array([source == "replay" for source, _ in layout], dtype=np.int8)
            self.index = np.array([j for _, j in layout], dtype=np.int64)
        self.layout = layout

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, i: int) -> int:
        return i

    def lengths(self) -> np.ndarray:
        """(n,) prompt + completion tokens of each item."""
        out = np.zeros(len(self.index), np.int64)
        for g, source in enumerate(self.sources):
            where = self.group == g
            out[where] = (source.prompt_lengths + source.completion_lengths)[self.index[where]]
        return out

    def pass_tokens(self) -> tuple[int, int]:
        """(rows, prompt + completion tokens) of one pass over the training data: task and replay rows, each once."""
        return (
            sum(len(s) for s in self.sources),
            int(sum((s.prompt_lengths + s.completion_lengths).sum() for s in self.sources)),
        )

    def fetch(self, items) -> list[dict]:
        """The items' rows, decoded, in order: one fetch per source."""
        items = np.asarray(items, dtype=np.int64)
        rows: list = [None] * len(items)
        for g, source in enumerate(self.sources):
            where = np.flatnonzero(self.group[items] == g)
            if where.size:
                for at, row in zip(where.tolist(), source.fetch(self.index[items[where]].tolist())):
                    rows[at] = row
        return rows


class Collator:
    """DataLoader collate_fn: a batch of items -> their rows, fetched and decoded together -> collate. An item past
    the dataset's end is a filler (TrainOrder): a one-token row with nothing to predict."""

    def __init__(self, data: DistillDataset, pad_id: int, pack: bool = False):
        self.data, self.pad_id, self.pack = data, pad_id, pack

    def __call__(self, items: list[int]) -> dict[str, torch.Tensor]:
        rows = self.data.fetch([i for i in items if i < len(self.data)])  # fillers come last in an order
        filler = {"prompt_ids": [self.pad_id], "completion_ids": [], "filler": True}
        return collate(rows + [filler] * (len(items) - len(rows)), self.pad_id, pack=self.pack)


def group_by_length(
    order: np.ndarray,
    lengths: np.ndarray,
    groups: np.ndarray,
    batch_size: int,
    rng: np.random.Generator,
    span: int = 64,
) -> np.ndarray:
    """`order` (items, batch after batch) with rows moved between the batches of each window of `span` batches so
    that a batch holds rows of similar length: in a window, each group's items (task, replay) are sorted by length,
    longest first, and dealt back into that group's places in order, so every batch keeps its count of each group
    (the replay share) and the window its rows; then the window's full batches are shuffled (by rng), so long and
    short batches alternate at random. Padding then follows the spread of lengths inside a window's sorted slices."""
    out = np.array(order, dtype=np.int64)
    window = span * batch_size
    for start in range(0, len(out), window):
        items = out[start : start + window]  # a view: edits land in out
        for group in np.unique(groups[items]):
            places = np.flatnonzero(groups[items] == group)
            members = items[places]
            items[places] = members[np.argsort(-lengths[members], kind="stable")]
        full = len(items) // batch_size
        batches = items[: full * batch_size].reshape(full, batch_size)
        batches[:] = batches[rng.permutation(full)]
    return out


class TrainOrder(torch.utils.data.Sampler):
    """The epoch's items, the same on every process (from the seed and the epoch), in global batches of
    per_device x processes items: accelerate gives each process its per-device slice of every global batch, so P
    processes of b rows see, micro-batch by micro-batch, the rows one process of P x b rows sees.

    The order: the retain layout as it is, or a permutation (torch.randperm seeded with seed + epoch: the one the
    Trainer draws through accelerate's SeedableRandomSampler, so one process trains on what it always did); with
    train.group_by_length, the layout or numpy's permutation through group_by_length over global batches.

    Under P > 1 processes the order ends with filler items (past the dataset's end; Collator) up to a whole global
    batch: the epoch's last, partial batch is split as one process would take it, the fillers predicting nothing
    (the loss divides by the global token count), where accelerate would otherwise fill it up with rows from the
    epoch's start, trained twice."""

    def __init__(self, data: DistillDataset, per_device: int, processes: int, seed: int, group_by_length: bool):
        self.data, self.seed, self.epoch = data, seed, 0
        self.global_batch = per_device * processes
        self.lengths = data.lengths() if group_by_length else None
        whole_batches = -(-len(data) // self.global_batch)
        self.size = len(data) if processes == 1 else whole_batches * self.global_batch

    def set_epoch(self, epoch: int) -> None:  # the Trainer (through accelerate) calls it before each epoch
        self.epoch = epoch

    def __len__(self) -> int:
        return self.size

    def __iter__(self):
        n = len(self.data)
        if self.lengths is not None:  # train.group_by_length: numpy's draws from (seed, epoch)
            rng = np.random.default_rng([self.seed, self.epoch])
            order = np.arange(n) if self.data.layout is not None else rng.permutation(n)
            order = group_by_length(order, self.lengths, self.data.group, self.global_batch, rng)
        elif self.data.layout is not None:
            order = np.arange(n)
        else:
            order = torch.randperm(n, generator=torch.Generator().manual_seed(self.seed + self.epoch)).numpy()
        yield from order.tolist()
        yield from range(n, self.size)  # fillers


def collate(rows: list[dict], pad_id: int, pack: bool | int = False) -> dict[str, torch.Tensor]:
    """Right-padded batch. Position t predicts token t+1, so the completion's j-th token (at index
    len(prompt)+j) is predicted at index len(prompt)+j-1: labels and teacher top-k sit at those indices.

    pack: the same examples in fewer rows, as wide as the longest (or `pack` tokens, when an int and wider; first fit,
    longest first): position_ids restart at 0 for each example (and for the padding after the last), which is how
    the model keeps examples apart (see train.model_inputs); an example's last token predicts nothing, since the
    next one's first token is a prompt token (label -100). No prompt_len: on-policy steps, which read it, refuse
    packing."""
    lengths = [len(r["prompt_ids"]) + len(r["completion_ids"]) for r in rows]
    width = max(max(lengths), 0 if pack is True else int(pack))
    places = pack_rows(lengths, width) if pack else [(b, 0) for b in range(len(rows))]
    n_rows = max(row for row, _ in places) + 1
    k = max((len(r["top_ids"][0]) for r in rows if r.get("top_ids") is not None and len(r["top_ids"])), default=0)
    input_ids = torch.full((n_rows, width), pad_id, dtype=torch.long)  # (B, T)
    attention_mask = torch.zeros((n_rows, width), dtype=torch.long)  # (B, T)
    labels = torch.full((n_rows, width), -100, dtype=torch.long)  # (B, T) HF convention: label[t] = input[t]
    top_ids = torch.zeros((n_rows, width, max(k, 1)), dtype=torch.long)  # (B, T, k) at the predicting index
    top_logprobs = torch.full((n_rows, width, max(k, 1)), -1e4)  # (B, T, k)
    top_tail = torch.full(
        (n_rows, width), float("nan")
    )  # (B, T) log of the teacher's mass outside its top-k; NaN: none stored
    kd_mask = torch.zeros((n_rows, width), dtype=torch.bool)  # (B, T) where a teacher distribution exists
    position_ids = torch.zeros((n_rows, width), dtype=torch.long)  # (B, T) packed only
    prompt_len = torch.zeros(n_rows, dtype=torch.long)
    for (b, at), r in zip(places, rows):
        prompt, completion = list(r["prompt_ids"]), list(r["completion_ids"])
        if pack and not prompt:
            raise UserError("train.packing needs a prompt of at least one token in every row")
        n_ids = len(prompt) + len(completion)
        start = at + len(prompt) - 1  # where the completion's first token is predicted
        input_ids[b, at : at + n_ids] = torch.tensor(prompt + completion)
        attention_mask[b, at : at + n_ids] = 1
        labels[b, at + len(prompt) : at + n_ids] = torch.tensor(completion)
        position_ids[b, at : at + n_ids] = torch.arange(n_ids)
        prompt_len[b] = len(prompt)
        if k and r.get("top_ids") is not None and len(r["top_ids"]):
            n = min(len(r["top_ids"]), len(completion))
            top_ids[b, start : start + n] = torch.as_tensor(r["top_ids"][:n])
            top_logprobs[b, start : start + n] = torch.as_tensor(r["top_logprobs"][:n])
            if r.get("top_tail") is not None:
                top_tail[b, start : start + n] = torch.as_tensor(r["top_tail"][:n])
            # a position whose ids hold no mass (top-1 below -200; a real one is >= -log V) has no teacher
            # distribution: a token crosstok could not align. It trains on its text instead.
            kd_mask[b, start : start + n] = top_logprobs[b, start : start + n].amax(-1) > -200.0
    out = {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
    if pack:  # the padding after a row's last example is a segment of its own, positions from 0
        for b in range(n_rows):
            used = int(attention_mask[b].sum())
            position_ids[b, used:] = torch.arange(width - used)
        out["position_ids"] = position_ids
    else:
        out["prompt_len"] = prompt_len
        if any(r.get("filler") for r in rows):  # TrainOrder's fillers: an on-policy step samples nothing for them
            out["filler"] = torch.tensor([bool(r.get("filler")) for r in rows])
    if k:
        out.update(top_ids=top_ids, top_logprobs=top_logprobs, top_tail=top_tail, kd_mask=kd_mask)
    return out


def pack_rows(lengths: list[int], width: int) -> list[tuple[int, int]]:
    """(row, offset) of each example packed into rows of `width` tokens: first fit, longest first (deterministic)."""
    free: list[int] = []  # free tokens left in each row
    places: list[tuple[int, int]] = [(0, 0)] * len(lengths)
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        row = next((r for r, room in enumerate(free) if room >= lengths[i]), len(free))
        if row == len(free):
            free.append(width)
        places[i] = (row, width - free[row])
        free[row] -= lengths[i]
    return places
