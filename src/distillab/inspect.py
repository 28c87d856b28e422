"""`distillab inspect RUN --row N`: one training row as the trainer sees it.

The row is read as train reads it (trainrows.ArrowRows), through the same steps build_trainer puts it through
([train] traces = false: its answer alone; train.max_length: cut or left out) and collated as a batch of one
(batching.collate). Each token then shows whether it carries a label and which loss term reaches it under the run's
config, and, where the teacher's top-k is stored, the teacher's most likely next tokens at that position in the
student's vocabulary (what KD pulls the student toward). The tokens are the student's: the dataset's ids were made
with its tokenizer (the run config's train.student).

Only what the data decides is shown: on-policy steps ([train] on_policy_fraction) train on the student's own samples
instead of rows, and a dense local teacher scores those, so they have no row to show.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow.parquet as pq

from distillab.batching import answers_only, collate, limit_length
from distillab.config import RunConfig, load_config
from distillab.dataset import dataset_files
from distillab.errors import UserError
from distillab.rundir import RunDir
from distillab.trainrows import ArrowRows

DATASETS = ("train", "replay")  # what train reads: the teacher's answers, retain's replay set
TEXT_FIELDS = ("skill", "source", "teacher_id", "messages", "prompt", "reasoning", "completion")


@dataclass
class TokenView:
    position: int
    id: int
    text: str  # the token decoded alone, as the student's tokenizer writes it
    loss: str  # "masked" (no label), "KD", "CE", "KD+CE": the terms this token's label enters (row_view docstring)
    teacher: list[tuple[str, int, float]] | None = None  # the teacher's top tokens here: (text, id, probability)


@dataclass
class RowView:
    dataset: Path
    row: int
    rows: int  # the dataset's row count
    fields: dict  # the row's text columns (TEXT_FIELDS) that it has
    tokens: list[TokenView] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # what the trainer's steps did to the row, and the loss weights

    @property
    def labelled(self) -> list[TokenView]:
        return [t for t in self.tokens if t.loss != "masked"]


def load_run(run_or_config: Path) -> tuple[RunDir, RunConfig]:
    """(the run directory, its config): a run directory and its run.toml, or a run config and the directory it names."""
    path = Path(run_or_config)
    if path.is_file():
        cfg = load_config(path)
        return RunDir(cfg.run_dir), cfg
    run = RunDir(path)
    if not run.config.is_file():
        raise UserError(f"{path}: neither a run config nor a run directory with a run.toml")
    return run, load_config(run.config)


def row_view(run_or_config: Path, row: int = 0, dataset: str = "train", top: int = 3) -> RowView:
    """Row `row` of data/<dataset>.parquet as the trainer sees it, the teacher's `top` tokens at each label.

    A labelled token's loss: "CE" alone with loss = "ce" or kd_weight = 0; otherwise "KD" where the teacher's top-k
    holds a distribution for it (and "KD+CE" with sft_weight > 0), and "CE" where it holds none (the text stands in
    for KD at kd_weight: a replay row of `dataset` source, a position cross-tokenizer alignment left out).
    """
    from distillab import models

    if dataset not in DATASETS:
        raise UserError(f"unknown dataset {dataset!r}; choose one of: {', '.join(DATASETS)}")
    run, cfg = load_run(run_or_config)
    source = ArrowRows(run.dataset(dataset))
    if not 0 <= row < len(source):
        raise UserError(
            f"row {row} is out of range: {run.dataset(dataset)} has {len(source):,} rows (0-{len(source) - 1})"
        )
    record = source.fetch([row])[0]
    t = cfg.train
    view = RowView(
        dataset=run.dataset(dataset),
        row=row,
        rows=len(source),
        fields=text_fields(run.dataset(dataset), row),
    )
    trained = answers_only([record], t.traces)
    if trained is not None and not isinstance(trained, list):
        trained = trained.fetch([0])
        if record.get("answer_ids") is not None:  # a row with a reasoning trace
            view.notes.append("[train] traces = false: the row trains on its answer alone (answer_ids)")
    limited = limit_length(trained, t.max_length, t.overflow)
    if limited is not None and not isinstance(limited, list):
        if not len(limited):
            view.notes.append(
                f"left out by train.max_length = {t.max_length} (overflow {t.overflow!r}): never trained on"
            )
            return view
        kept = limited.fetch([0])[0]
        if len(kept["completion_ids"]) < len(trained[0]["completion_ids"]):
            view.notes.append(
                f"cut by train.max_length = {t.max_length}: {len(kept['completion_ids'])} of "
                f"{len(trained[0]['completion_ids'])} completion tokens kept"
            )
        trained = [kept]
    tok = models.load_tokenizer(t.student)
    _fill_tokens(view, trained[0], tok, cfg, top)
    return view


def text_fields(path: Path, row: int) -> dict:
    """Row `row`'s TEXT_FIELDS from the dataset's Parquet files, those it has (the Arrow copy train reads holds its
    ids alone): the one row group holding it is read."""
    for file in dataset_files(path):
        parquet = pq.ParquetFile(file)
        for group in range(parquet.num_row_groups):
            n = parquet.metadata.row_group(group).num_rows
            if row < n:
                names = [c for c in TEXT_FIELDS if c in parquet.schema_arrow.names]
                record = parquet.read_row_group(group, columns=names).slice(row, 1).to_pylist()[0]
                return {k: v for k, v in record.items() if v is not None}
            row -= n
    return {}


def _fill_tokens(view: RowView, row: dict, tok, cfg: RunConfig, top: int) -> None:
    batch = collate([row], tok.pad_token_id if tok.pad_token_id is not None else 0)
    ids, labels = batch["input_ids"][0].tolist(), batch["labels"][0].tolist()  # (T,) each
    t = cfg.train
    kd_on = t.loss != "ce" and t.kd_weight > 0
    has_teacher = "kd_mask" in batch
    view.notes.append(
        f"loss weights: kd_weight {t.kd_weight:g} ({t.loss}), sft_weight {t.sft_weight:g}"
        + ("" if has_teacher else "; no teacher top-k in this row: its labels train on the text (CE)")
    )
    for position, (token_id, label) in enumerate(zip(ids, labels)):
        predicted_at = position - 1  # collate puts the teacher's distribution for token t at index t - 1
        teacher = None
        if has_teacher and label != -100 and bool(batch["kd_mask"][0, predicted_at]):
            ranked = sorted(
                zip(batch["top_ids"][0, predicted_at].tolist(), batch["top_logprobs"][0, predicted_at].tolist()),
                key=lambda pair: -pair[1],
            )[:top]
            teacher = [(tok.decode([i]), i, math.exp(lp)) for i, lp in ranked]
        if label == -100:
            loss = "masked"
        elif kd_on and teacher is not None:
            loss = "KD+CE" if t.sft_weight > 0 else "KD"
        else:
            loss = "CE"
        view.tokens.append(TokenView(position, token_id, tok.decode([token_id]), loss, teacher))


def quoted(text: str) -> str:
    """Text in double quotes with newlines and the like escaped (JSON's escapes), so a token stays on one line."""
    return json.dumps(text, ensure_ascii=False)


def render(view: RowView):
    """The view as a rich renderable: a header, the notes, one table line a token."""
    from rich.console import Group
    from rich.table import Table
    from rich.text import Text

    labelled = view.labelled
    header = [
        Text(f"row {view.row} of {view.dataset} ({view.rows:,} rows)"),
        *(Text(f"{k}: {v if k == 'messages' else quoted(str(v))}") for k, v in view.fields.items()),  # JSON already
        Text(
            f"{len(view.tokens)} tokens: {len(view.tokens) - len(labelled)} masked (no label, no loss), "
            f"{len(labelled)} labelled, {sum(t.teacher is not None for t in labelled)} with a teacher distribution"
        ),
        *(Text(note) for note in view.notes),
    ]
    table = Table("#", "token", "id", "loss", "teacher's top tokens here (probability)")
    for t in view.tokens:
        teacher = "  ".join(f"{quoted(text)} {p:.3f}" for text, _, p in t.teacher) if t.teacher else ""
        table.add_row(str(t.position), Text(quoted(t.text)), str(t.id), t.loss, Text(teacher))  # Text: no markup
    return Group(*header, table)
