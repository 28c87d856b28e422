"""Prompts: a run's prompt records, read from the lab skills or a prompts file.

A prompts file is JSONL, Parquet or a `datasets` save_to_disk directory, read lazily (a line, a batch or a row
at a time); its records hold a plain prompt or an OpenAI conversation (`messages`), under the column names of
[data] *_column. Every source gives the same record: {prompt, messages, answer, skill, line}. A conversation's
final assistant turn is its reference answer; `prompt` is its plain text (chat.plain_text), which keys shards,
dev splits and completions endpoints.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from distillab import chat
from distillab.config import RunConfig
from distillab.errors import UserError, not_utf8
from distillab.lab.world import get_skill


class PromptStream:
    """A prompt source that can be read more than once, lazily: iter() starts it again."""

    def __init__(self, make):
        self._make = make

    def __iter__(self):
        return self._make()


@dataclass(frozen=True)
class Columns:
    """Where a prompts file keeps each field ([data] prompt_column / messages_column / answer_column)."""

    prompt: str = "prompt"
    messages: str = "messages"
    answer: str = "answer"

    @classmethod
    def of(cls, data) -> Columns:
        return cls(prompt=data.prompt_column, messages=data.messages_column, answer=data.answer_column)


def load_prompts(cfg: RunConfig) -> list[dict]:
    """[{prompt, messages, answer, skill}] from the prompts file when given, else from the lab skills' train split
    (no messages: a plain prompt is one user turn)."""
    return list(prompt_stream(cfg))


def prompt_stream(cfg: RunConfig):
    """The prompts of load_prompts, read lazily from a prompts file (a list for lab skills: they are small)."""
    if cfg.data.prompts_file:
        path, columns = Path(cfg.data.prompts_file), Columns.of(cfg.data)
        if path.is_dir():
            return PromptStream(lambda: iter_hf_prompts(path, columns))
        if path.suffix == ".parquet":
            return PromptStream(lambda: iter_parquet_prompts(path, columns))
        return PromptStream(lambda: iter_jsonl_prompts(path, columns))
    rows = []
    for name in cfg.data.skills:
        try:
            skill = get_skill(name)
        except ValueError as err:
            raise UserError(str(err)) from None
        rows += [
            {"prompt": example.prompt, "answer": example.answer, "skill": name}
            for example in skill.examples("train", cfg.data.n_prompts, seed=cfg.data.seed)
        ]
    return rows


def read_jsonl_prompts(path: Path, columns: Columns = Columns()) -> list[dict]:
    return list(iter_jsonl_prompts(path, columns))


def iter_jsonl_prompts(path: Path, columns: Columns = Columns()):
    """{prompt, messages, answer, skill, line} per non-empty line, read a line at a time; errors name the file
    and line."""
    what = "prompt file"
    if path.is_dir():
        raise UserError(f"{what} {path} is a directory: give a JSONL file")
    if not path.is_file():
        raise UserError(f"{what} not found: {path}")
    seen = False
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8-sig" if lineno == 1 else "utf-8")
            except UnicodeDecodeError as err:
                raise not_utf8(f"{path}:{lineno}", err) from None
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as err:
                raise UserError(f"{where}: malformed JSON ({err.msg})") from None
            seen = True
            yield _prompt_record(obj, where, lineno, columns)
    if not seen:
        raise UserError(f"{what} is empty: {path}")


def iter_parquet_prompts(path: Path, columns: Columns = Columns()):
    """The same records from a Parquet file with a prompt or messages column (optional answer, "skill"), a batch
    at a time."""
    import pyarrow.parquet as pq

    if not path.is_file():
        raise UserError(f"prompt file not found: {path}")
    import pyarrow as pa

    lineno = 0
    try:  # a damaged file may fail at its footer or at any page
        reader = pq.ParquetFile(path)
        wanted = _columns_read(reader.schema_arrow.names, columns, path)
        for batch in reader.iter_batches(batch_size=4096, columns=wanted):
            for obj in batch.to_pylist():
                lineno += 1
                yield _prompt_record(obj, f"{path}: row {lineno}", lineno, columns)
    except (pa.ArrowException, OSError) as err:
        raise UserError(
            f"prompt file {path} is not a readable Parquet file (after row {lineno}: {err}): write it again, or "
            "give JSONL (a file not named .parquet) or a datasets save_to_disk directory"
        ) from None
    if not lineno:
        raise UserError(f"prompt file is empty: {path}")


def iter_hf_prompts(path: Path, columns: Columns = Columns()):
    """The same records from a Hugging Face `datasets` directory (Dataset.save_to_disk; of a DatasetDict, its
    "train" split or its only one), memory-mapped and read a row at a time."""
    import datasets
    import pyarrow as pa

    for record in ("state.json", "dataset_info.json", "dataset_dict.json"):  # their errors would not name them
        if (path / record).is_file():
            try:
                json.loads((path / record).read_text(encoding="utf-8"))
            except (UnicodeDecodeError, json.JSONDecodeError) as err:
                raise UserError(
                    f"prompt file {path}: {path / record} is corrupt ({err}): save the dataset again (save_to_disk)"
                ) from None
    try:
        ds = datasets.load_from_disk(str(path))
    except FileNotFoundError:
        raise UserError(
            f"prompt file {path} is a directory without a saved Hugging Face dataset (save_to_disk): "
            "give a JSONL or Parquet file, or such a directory"
        ) from None
    except (pa.ArrowException, OSError, ValueError, KeyError) as err:
        data = ", ".join(p.name for p in sorted(path.glob("*.arrow"))) or "none"
        raise UserError(
            f"prompt file {path}: its saved dataset cannot be read (data files: {data}; {type(err).__name__}: "
            f"{err}): save the dataset again (save_to_disk)"
        ) from None
    if isinstance(ds, datasets.DatasetDict):
        if "train" not in ds and len(ds) != 1:
            raise UserError(
                f"{path}: a dataset with splits {', '.join(ds)}: save the split to use on its own (or name it train)"
            )
        ds = ds["train"] if "train" in ds else next(iter(ds.values()))
    ds = ds.select_columns(_columns_read(ds.column_names, columns, path))
    for lineno, obj in enumerate(ds, 1):
        yield _prompt_record(obj, f"{path}: row {lineno}", lineno, columns)
    if not len(ds):
        raise UserError(f"prompt file is empty: {path}")


def _columns_read(names: list[str], columns: Columns, path: Path) -> list[str]:
    """The columns of a table-shaped prompts file to read; one without a prompt or messages column is refused."""
    if columns.prompt not in names and columns.messages not in names:
        raise UserError(
            f'{path}: needs a "{columns.prompt}" or a "{columns.messages}" column (has '
            f"{', '.join(names[:8]) or 'none'}; [data] prompt_column / messages_column name others)"
        )
    return [c for c in (columns.prompt, columns.messages, columns.answer, "skill") if c in names]


def _prompt_record(obj, where: str, line: int, columns: Columns = Columns()) -> dict:
    """{prompt, messages, answer, skill, line}. A conversation: messages = the turns the teacher answers, prompt
    = their plain text (chat.plain_text: what keys shards, splits and completions endpoints), and a final
    assistant turn is the answer. A plain prompt: messages None."""
    if not isinstance(obj, dict):
        raise UserError(f'{where}: each line needs a JSON object with "{columns.prompt}" or "{columns.messages}"')
    answer = obj.get(columns.answer)
    if answer is not None and not isinstance(answer, str):
        raise UserError(f'{where}: "{columns.answer}" must be a string')
    skill = obj.get("skill")
    if obj.get(columns.messages) is not None:  # the conversation, over a prompt beside it (often its first user turn)
        messages = chat.check_messages(obj[columns.messages], where, columns.messages)
        turns, reference = chat.split_conversation(messages, where, columns.messages)
        if reference is not None and answer is not None:
            raise UserError(
                f'{where}: two answers: "{columns.answer}" and the conversation\'s final assistant turn; keep one'
            )
        return {
            "prompt": chat.plain_text(turns),
            "messages": turns,
            "answer": reference if answer is None else answer,
            "skill": skill,
            "line": line,
        }
    if not isinstance(obj.get(columns.prompt), str) or not obj[columns.prompt]:
        raise UserError(
            f'{where}: each line needs a non-empty string field "{columns.prompt}" or a "{columns.messages}" list'
        )
    return {"prompt": obj[columns.prompt], "messages": None, "answer": answer, "skill": skill, "line": line}
