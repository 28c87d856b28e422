"""Provenance: who wrote each training example, and the lineage of every model distillab trains.

Four parts, each built on the one before:

1. Row provenance. Every row of `data/train.parquet` carries the columns in `PROVENANCE_COLUMNS`:
   `source` ("teacher" | "human" | "lab"), `teacher_id`, `teacher_params_hash` (hash of endpoint +
   sampling parameters), `request_hash` (the teacher cache key) and `created_at` (ISO-8601 UTC).
   `provenance_row` makes one for a teacher completion or ground truth; `declared_rows` tags a dataset the
   user brought, by the source the user declares. This module is the single source of truth for them.

2. Lineage of one training run (`build_lineage`). What fraction of the training tokens came from which
   source. *Training tokens are completion tokens* (`completion_ids`, end-of-sequence included): those are
   the positions the loss is computed on, so they are what the student learns to write. Prompt tokens are
   inputs, identical whoever wrote the answer; they are counted and reported, but not attributed.
   A source key is "teacher:<teacher_id>" for teacher text and "human" / "lab" otherwise.

3. Composition over generations. A model trained from a base that itself has a `lineage.json` inherits
   the parent's generations. The *effective fraction* of source s is

       effective(s) = sum_g w_g * f_g(s) / sum_g w_g,     w_g = epochs_g * training_tokens_g

   i.e. each generation counts by the number of supervised tokens it trained on (dataset completion tokens
   times epochs), and the effective mix is the mix of all supervision the model received after the root
   base model. The root's own pretraining is not counted (it is not ours to know); the root is named.
   Text is attributed to the model that wrote it, even when that teacher was itself distilled.
   Teachers that only supplied logits (KD targets on someone else's text) are listed in `teachers` and
   `losses`, not in the token fractions: the fractions answer "who wrote what the model learned to write".

4. Saving (`save_lineage`): `lineage.json` in the model's directory. The model card beside it, and the text
   `distillab lineage` prints, are `distillab.modelcard`'s.
"""

from __future__ import annotations

import hashlib
import json
import math
from datetime import UTC, datetime
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from distillab.config import check_hub_id
from distillab.errors import UserError
from distillab.files import file_digest, write_atomic

LINEAGE_FORMAT = "distillab-lineage/1"
LINEAGE_FILE = "lineage.json"

SOURCES = ("teacher", "human", "lab")  # teacher: a model wrote it; human: people; lab: the world's ground truth
PROVENANCE_COLUMNS = ("source", "teacher_id", "teacher_params_hash", "request_hash", "created_at")
# Every column is a string; typed explicitly so an all-null column is still `string`, not `null`.
PROVENANCE_SCHEMA = pa.schema([(name, pa.string()) for name in PROVENANCE_COLUMNS])
UNDECLARED_TEACHER = "undeclared"  # a user-brought dataset declared teacher-written without naming the model
OWN_EVAL_LABEL = "distilled"  # evaluate's label for the run's own student (eval/distilled.json)


# ----------------------------------------------------------------------------------------------------
# Row provenance.


def utc_now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


def _canonical_json(obj) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str)


def teacher_params_hash(endpoint: str | None, sampling: dict | None) -> str:
    """Hash of where the teacher was called and how it sampled: rows with equal hashes are comparable."""
    canonical = _canonical_json({"endpoint": endpoint, "sampling": sampling or {}})
    return hashlib.sha256(canonical.encode()).hexdigest()[:16]


def check_source(source: str) -> str:
    if source not in SOURCES:
        raise UserError(f"unknown data source {source!r}; allowed: {', '.join(SOURCES)}")
    return source


def provenance_row(
    source: str,
    teacher_id: str | None = None,
    endpoint: str | None = None,
    sampling: dict | None = None,
    request_hash: str | None = None,
    created_at: str | None = None,
) -> dict:
    """The provenance columns of one example. Teacher rows must name the teacher; others carry no teacher."""
    check_source(source)
    if source == "teacher":
        if not teacher_id:
            raise UserError("a teacher-written row needs teacher_id (the model that wrote it)")
        params = teacher_params_hash(endpoint, sampling)
    else:
        teacher_id, params, request_hash = None, None, None  # nobody was asked: nothing to hash or cache
    return {
        "source": source,
        "teacher_id": teacher_id,
        "teacher_params_hash": params,
        "request_hash": request_hash,
        "created_at": created_at or utc_now(),
    }


def declared_rows(n: int, source: str, teacher_id: str | None = None) -> list[dict]:
    """Provenance for n rows of a user-brought dataset, tagged by the source the user declares.

    Declared teacher text has no request and no known sampling parameters, so those stay null; an unnamed
    teacher is recorded as "undeclared" so the lineage still counts its tokens as teacher-written.
    """
    check_source(source)
    created = utc_now()
    if source == "teacher":
        row = {
            "source": "teacher",
            "teacher_id": teacher_id or UNDECLARED_TEACHER,
            "teacher_params_hash": None,
            "request_hash": None,
            "created_at": created,
        }
    else:
        row = provenance_row(source, created_at=created)
    return [dict(row) for _ in range(n)]


def provenance_table(rows: list[dict]) -> pa.Table:
    """The provenance columns as a typed Arrow table, to append to the dataset's other columns."""
    return pa.Table.from_pylist([{k: r.get(k) for k in PROVENANCE_COLUMNS} for r in rows], schema=PROVENANCE_SCHEMA)


def source_key(source: str, teacher_id: str | None) -> str:
    return f"teacher:{teacher_id or UNDECLARED_TEACHER}" if source == "teacher" else source


# ----------------------------------------------------------------------------------------------------
# Lineage of one run, and composition with the base model's lineage.


def _dataset_digest(dataset_path: Path) -> str:
    """sha256 of the dataset file; for a sharded dataset, of its shards' digests in name order."""
    from distillab.dataset import dataset_files

    files = dataset_files(dataset_path)
    if len(files) == 1:
        return file_digest(files[0])
    return hashlib.sha256("".join(file_digest(f) for f in files).encode()).hexdigest()


def _dataset_token_counts(dataset_path: Path) -> dict:
    """Completion (training) tokens per source key, plus totals, read from the dataset's Parquet file."""
    from distillab.dataset import dataset_files

    files = dataset_files(dataset_path)  # the file, or the shards of `generate --shard I/N` processes
    if not files:
        raise UserError(f"dataset not found: {dataset_path}")
    names = set(pq.read_schema(files[0]).names)
    missing = [c for c in ("source", "teacher_id", "completion_ids") if c not in names]
    if missing:
        raise UserError(
            f"{dataset_path}: missing column(s) {', '.join(missing)}; was it written by distillab generate?"
        )
    cols = ["source", "teacher_id", "completion_ids"] + (["prompt_ids"] if "prompt_ids" in names else [])
    cols += ["answer_ids"] if "answer_ids" in names else []  # a reasoning row's answer alone: the rest is its trace
    tokens: dict[str, int] = {}
    examples, prompt_tokens, reasoning_rows, trace_tokens = 0, 0, 0, 0
    for f in files:  # a record batch at a time: memory follows the batch, not the dataset
        for batch in pq.ParquetFile(f).iter_batches(batch_size=8192, columns=cols):
            examples += batch.num_rows
            completion_lens = pc.list_value_length(batch["completion_ids"]).fill_null(0).to_pylist()
            for source, teacher, n in zip(
                batch["source"].to_pylist(), batch["teacher_id"].to_pylist(), completion_lens
            ):
                key = source_key(check_source(source), teacher)
                tokens[key] = tokens.get(key, 0) + n
            if "prompt_ids" in cols:
                prompt_tokens += pc.sum(pc.list_value_length(batch["prompt_ids"])).as_py() or 0
            if "answer_ids" in cols:
                answers = pc.list_value_length(batch["answer_ids"])
                reasoning_rows += batch.num_rows - answers.null_count
                traced = pc.subtract(pc.list_value_length(batch["completion_ids"]), answers)
                trace_tokens += pc.sum(traced).as_py() or 0
    return {
        "examples": examples,
        "training_tokens": sum(tokens.values()),
        "prompt_tokens": prompt_tokens if "prompt_ids" in cols else None,
        "reasoning_rows": reasoning_rows,  # rows carrying a reasoning teacher's trace (distillab.reasoning)
        "trace_tokens": trace_tokens,  # ... and their completion tokens beyond the answer alone: the trace's
        "tokens_by_source": dict(sorted(tokens.items())),
    }


def _fractions(tokens: dict[str, float]) -> dict[str, float]:
    total = sum(tokens.values())
    return {k: (v / total if total else 0.0) for k, v in sorted(tokens.items())}


def effective_tokens(generations: list[dict]) -> dict[str, float]:
    """Training tokens per source summed over generations, each counted epochs times (module docstring)."""
    weighted: dict[str, float] = {}
    for gen in generations:
        for key, n in gen["tokens_by_source"].items():
            weighted[key] = weighted.get(key, 0.0) + gen["epochs"] * n
    return dict(sorted(weighted.items()))


def effective_fractions(generations: list[dict]) -> dict[str, float]:
    """sum_g w_g f_g(s) / sum_g w_g with w_g = epochs_g x training tokens_g: the epoch-weighted token share."""
    return _fractions(effective_tokens(generations))


def _losses_from_weights(summary: dict) -> dict | list:
    """The trainer names one KD loss plus weights: {kd loss: kd_weight, "sft": sft_weight}, zero weights dropped.

    "sft" is cross-entropy on the written text, kept apart from a KD loss that may itself be named "ce".
    """
    if not summary.get("loss"):
        return []
    if "kd_weight" not in summary and "sft_weight" not in summary:
        return [summary["loss"]]
    weights = {summary["loss"]: summary.get("kd_weight", 1.0), "sft": summary.get("sft_weight", 0.0)}
    return {name: w for name, w in weights.items() if w}


def _base_model_dir(base_model: str) -> Path | None:
    """Where the base model lives, if it is a local directory (lab checkpoints included)."""
    if base_model.startswith("lab:"):
        from distillab.models import LAB_CHECKPOINTS

        path = LAB_CHECKPOINTS / base_model[len("lab:") :]
    else:
        path = Path(base_model).expanduser()
    return path if path.is_dir() else None


def build_lineage(
    dataset_path: str | Path,
    base_model: str,
    teacher_ids: list[str] | None = None,
    train_summary: dict | None = None,
    *,
    model_name: str | None = None,
    datasets: list[str] | None = None,
    parent_lineage: dict | None = None,
    student_hub_id: str | None = None,
) -> dict:
    """The lineage of a model trained from `base_model` on `dataset_path`, composed with the base's lineage.

    teacher_ids: every teacher involved (those that only supplied logits too); teachers found in the data
    are added. train_summary: what the trainer reports; read here are "losses" (list of names, or a
    {name: weight} dict), "loss" (a single name), "epochs" (default 1) and everything else kept verbatim.
    datasets: public dataset ids to name in the card's front matter. parent_lineage: overrides reading
    `lineage.json` from the base model's directory (tests, or a base that moved). student_hub_id: the Hub id
    of the base model as the user names it (e.g. "HuggingFaceTB/SmolLM2-135M"), for the card's `base_model`;
    None leaves `base_model` out of the front matter. A malformed id is a UserError.
    """
    hub_id = check_hub_id(student_hub_id) if student_hub_id is not None else None
    dataset_path = Path(dataset_path)
    summary = dict(train_summary or {})
    counts = _dataset_token_counts(dataset_path)
    data_teachers = [k.split(":", 1)[1] for k in counts["tokens_by_source"] if k.startswith("teacher:")]
    teachers = sorted(set(teacher_ids or []) | set(data_teachers))
    losses = summary.get("losses") or _losses_from_weights(summary)
    epochs = float(summary.get("epochs", 1.0))
    if not (epochs >= 0 and math.isfinite(epochs)):
        raise UserError(f"train_summary epochs must be a number >= 0, got {summary.get('epochs')!r}")

    if parent_lineage is None:
        base_dir = _base_model_dir(base_model)
        parent_lineage = load_lineage(base_dir) if base_dir is not None else None
    parent_generations = list(parent_lineage["generations"]) if parent_lineage else []

    generation = {
        "generation": len(parent_generations) + 1,
        "model": model_name,
        "base_model": base_model,
        "base_model_hub_id": hub_id,
        "teachers": teachers,
        "dataset": {
            "path": str(dataset_path),
            "sha256": _dataset_digest(dataset_path),
            **{k: v for k, v in counts.items() if k != "tokens_by_source"},
        },
        "tokens_by_source": counts["tokens_by_source"],
        "token_fractions": _fractions(counts["tokens_by_source"]),
        "epochs": epochs,
        "losses": losses,
        "train": summary,
        "created_at": utc_now(),
    }
    generations = parent_generations + [generation]
    return {
        "format": LINEAGE_FORMAT,
        "model": model_name,
        "base_model": base_model,
        "base_model_hub_id": hub_id,  # the card's base_model; None: not on the Hub, or not said
        "root_model": generations[0]["base_model"],
        "teachers": sorted({t for g in generations for t in g["teachers"]}),
        "datasets": sorted(set(datasets or []) | set((parent_lineage or {}).get("datasets") or [])),
        "generations": generations,
        "token_fractions": generation["token_fractions"],  # this run's data only
        "effective_tokens": effective_tokens(generations),  # epochs x training tokens, whole chain
        "effective_fractions": effective_fractions(generations),  # the whole chain (module docstring)
        "eval": None,  # filled by modelcard.update_lineage after evaluation: {model label: {suite: score}}
        "cost": None,  # filled by modelcard.update_lineage from the cost ledger
    }


# ----------------------------------------------------------------------------------------------------
# Reading and writing lineage.json.


def load_lineage(model_dir: str | Path) -> dict | None:
    """The lineage saved in a model directory, or None when the directory or its lineage.json is absent."""
    path = Path(model_dir) / LINEAGE_FILE
    if not path.is_file():
        return None
    try:
        lineage = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise UserError(f"{path}: not valid JSON ({err.msg} at line {err.lineno})") from None
    if not isinstance(lineage, dict) or lineage.get("format") != LINEAGE_FORMAT:
        raise UserError(f"{path}: not a distillab lineage (expected format {LINEAGE_FORMAT!r})")
    return lineage


def require_lineage(model_dir: str | Path) -> dict:
    """load_lineage for the CLI: a missing directory or a model without lineage is a one-line UserError."""
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise UserError(f"model directory not found: {model_dir}")
    lineage = load_lineage(model_dir)
    if lineage is None:
        raise UserError(f"no {LINEAGE_FILE} in {model_dir}: it was not trained by distillab (or the card was removed)")
    return lineage


def save_lineage(model_dir: str | Path, lineage: dict) -> dict:
    """Write lineage.json into model_dir (atomically) and return the lineage as saved: the model, and the run's
    own generation, named after the directory when the lineage does not name them."""
    model_dir = Path(model_dir)
    lineage = dict(lineage)
    lineage["model"] = lineage.get("model") or model_dir.name
    last = dict(lineage["generations"][-1])  # the run being written is the model in this directory
    last["model"] = last.get("model") or lineage["model"]
    lineage["generations"] = lineage["generations"][:-1] + [last]
    write_atomic(model_dir / LINEAGE_FILE, json.dumps(lineage, indent=1, default=str) + "\n")
    return lineage
