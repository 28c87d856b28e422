"""Provenance columns, lineage fractions over two generations (hand-computed), the lineage's losses, and the
one-line errors of a missing lineage or a dataset without provenance."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from distillab.errors import UserError
from distillab.modelcard import write_model_card
from distillab.provenance import (
    PROVENANCE_COLUMNS,
    build_lineage,
    declared_rows,
    load_lineage,
    provenance_row,
    provenance_table,
    require_lineage,
    teacher_params_hash,
)
from tests.helpers import provenance_dataset


def test_teacher_row_has_every_column_and_a_stable_params_hash():
    row = provenance_row(
        "teacher",
        teacher_id="lab:teacher",
        endpoint="local",
        sampling={"temperature": 1.0, "top_p": 0.9},
        request_hash="abc123",
    )
    assert tuple(row) == PROVENANCE_COLUMNS
    assert row["source"] == "teacher" and row["teacher_id"] == "lab:teacher" and row["request_hash"] == "abc123"
    # Same endpoint and sampling in another key order: same hash. Another temperature: another hash.
    assert row["teacher_params_hash"] == teacher_params_hash("local", {"top_p": 0.9, "temperature": 1.0})
    assert row["teacher_params_hash"] != teacher_params_hash("local", {"top_p": 0.9, "temperature": 0.0})
    assert row["teacher_params_hash"] != teacher_params_hash("http://x/v1", {"top_p": 0.9, "temperature": 1.0})
    assert row["created_at"].endswith("Z") and "T" in row["created_at"]


def test_ground_truth_row_has_no_teacher():
    row = provenance_row("lab", teacher_id="ignored", request_hash="ignored")
    assert row["source"] == "lab"
    assert row["teacher_id"] is None and row["teacher_params_hash"] is None and row["request_hash"] is None


def test_teacher_row_needs_a_teacher():
    with pytest.raises(UserError, match="teacher_id"):
        provenance_row("teacher")


def test_user_declared_rows():
    human = declared_rows(3, "human")
    assert len(human) == 3 and all(r["source"] == "human" and r["teacher_id"] is None for r in human)
    teacher = declared_rows(2, "teacher", teacher_id="gpt-x")
    assert [r["teacher_id"] for r in teacher] == ["gpt-x", "gpt-x"] and teacher[0]["teacher_params_hash"] is None
    assert declared_rows(1, "teacher")[0]["teacher_id"] == "undeclared"
    with pytest.raises(UserError, match="allowed: teacher, human, lab"):
        declared_rows(1, "gpt")


def test_provenance_table_is_typed_even_when_all_null():
    table = provenance_table(declared_rows(2, "lab"))
    assert table.column_names == list(PROVENANCE_COLUMNS)
    assert all(field.type == pa.string() for field in table.schema)


def test_two_generation_lineage_fractions(tmp_path):
    # Generation 1: lab:base trained 1 epoch on 300 tokens by teacher A and 100 human tokens.
    data1 = provenance_dataset(
        tmp_path / "d1.parquet", [("teacher", "A", 100), ("teacher", "A", 200), ("human", None, 100)]
    )
    lin1 = build_lineage(data1, "lab:base", ["A"], {"losses": ["forward_kl"], "epochs": 1})
    assert lin1["token_fractions"] == {"human": 0.25, "teacher:A": 0.75}
    assert lin1["effective_fractions"] == lin1["token_fractions"]
    model1 = tmp_path / "gen1"
    write_model_card(model1, lin1)

    # Generation 2: gen1 trained 2 epochs on 200 tokens by teacher B and 200 lab ground-truth tokens.
    data2 = provenance_dataset(
        tmp_path / "d2.parquet", [("teacher", "B", 150), ("teacher", "B", 50), ("lab", None, 200)]
    )
    lin2 = build_lineage(data2, str(model1), ["B", "C"], {"loss": "reverse_kl", "epochs": 2})
    assert lin2["token_fractions"] == {"lab": 0.5, "teacher:B": 0.5}
    # Weights: w1 = 1 x 400 = 400, w2 = 2 x 400 = 800, total 1200.
    # A: 400 x 0.75 / 1200 = 1/4; human: 400 x 0.25 / 1200 = 1/12; B and lab: 800 x 0.5 / 1200 = 1/3 each.
    expected = {"teacher:A": 1 / 4, "human": 1 / 12, "teacher:B": 1 / 3, "lab": 1 / 3}
    assert lin2["effective_fractions"] == pytest.approx(expected)
    assert lin2["effective_tokens"] == {"human": 100, "lab": 400, "teacher:A": 300, "teacher:B": 400}
    assert [g["generation"] for g in lin2["generations"]] == [1, 2]
    assert lin2["generations"][0]["model"] == "gen1" and lin2["root_model"] == "lab:base"
    assert lin2["teachers"] == ["A", "B", "C"]  # C supplied no text (logits only) but is listed
    assert lin2["generations"][1]["losses"] == ["reverse_kl"]
    d = lin2["generations"][1]["dataset"]
    assert (d["examples"], d["training_tokens"], d["prompt_tokens"]) == (3, 400, 15)


def test_missing_lineage_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="not found"):
        require_lineage(tmp_path / "nope")
    with pytest.raises(UserError, match="no lineage.json"):
        require_lineage(tmp_path)
    assert load_lineage(tmp_path) is None


def test_dataset_without_provenance_is_a_user_error(tmp_path):
    pq.write_table(pa.table({"completion_ids": [[1, 2]]}), tmp_path / "d.parquet")
    with pytest.raises(UserError, match="missing column"):
        build_lineage(tmp_path / "d.parquet", "lab:base")


def test_losses_from_the_trainer_summary(tmp_path):
    data = provenance_dataset(tmp_path / "d.parquet", [("teacher", "T", 10)])
    summary = {"loss": "forward_kl", "kd_weight": 1.0, "sft_weight": 0.5, "epochs": 0.0}
    lineage = build_lineage(data, "lab:base", None, summary)
    assert lineage["generations"][0]["losses"] == {"forward_kl": 1.0, "sft": 0.5}
    assert lineage["generations"][0]["train"] == summary  # kept verbatim
    only_kd = build_lineage(data, "lab:base", None, {"loss": "reverse_kl", "kd_weight": 1.0, "sft_weight": 0.0})
    assert only_kd["generations"][0]["losses"] == {"reverse_kl": 1.0}
