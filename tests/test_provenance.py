"""Provenance columns, lineage fractions over two generations (hand-computed), and the model card: its
model-index holds only this model's results, its base_model only a Hub id the user gave."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from distillab.errors import UserError
from distillab.modelcard import format_lineage, update_lineage, write_model_card
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


def test_teacher_row_has_every_column_and_a_stable_params_hash():
    row = provenance_row("teacher", teacher_id="lab:teacher", endpoint="local",
                         sampling={"temperature": 1.0, "top_p": 0.9}, request_hash="abc123")
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


def _dataset(path, rows):
    """rows: (source, teacher_id, completion length); prompts are 5 tokens each."""
    prov = [provenance_row(s, teacher_id=t) if s == "teacher" else provenance_row(s) for s, t, _ in rows]
    table = pa.table({
        "prompt": ["p"] * len(rows),
        "completion": ["c"] * len(rows),
        "prompt_ids": pa.array([[1] * 5 for _ in rows], type=pa.list_(pa.int32())),
        "completion_ids": pa.array([[7] * n for *_, n in rows], type=pa.list_(pa.int32())),
    })
    for name in PROVENANCE_COLUMNS:
        table = table.append_column(name, pa.array([p[name] for p in prov], type=pa.string()))
    pq.write_table(table, path)
    return path


def test_two_generation_lineage_fractions(tmp_path):
    # Generation 1: lab:base trained 1 epoch on 300 tokens by teacher A and 100 human tokens.
    data1 = _dataset(tmp_path / "d1.parquet", [("teacher", "A", 100), ("teacher", "A", 200), ("human", None, 100)])
    lin1 = build_lineage(data1, "lab:base", ["A"], {"losses": ["forward_kl"], "epochs": 1})
    assert lin1["token_fractions"] == {"human": 0.25, "teacher:A": 0.75}
    assert lin1["effective_fractions"] == lin1["token_fractions"]
    model1 = tmp_path / "gen1"
    write_model_card(model1, lin1)

    # Generation 2: gen1 trained 2 epochs on 200 tokens by teacher B and 200 lab ground-truth tokens.
    data2 = _dataset(tmp_path / "d2.parquet", [("teacher", "B", 150), ("teacher", "B", 50), ("lab", None, 200)])
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


def test_model_card_and_lineage_round_trip(tmp_path):
    data = _dataset(tmp_path / "d.parquet", [("teacher", "lab:teacher", 30), ("lab", None, 10)])
    lineage = build_lineage(data, "lab:base", None, {"losses": {"forward_kl": 1.0, "ce": 0.5}},
                            datasets=["org/prompts"])
    model = tmp_path / "student"
    write_model_card(model, lineage)
    saved = load_lineage(model)
    assert saved["model"] == "student" and saved["eval"] is None and saved["cost"] is None

    update_lineage(model, eval={"distilled": {"task": {"exact": 0.9}}}, cost={"teacher_usd": 1.25})
    update_lineage(model, eval={"base": {"general": {"exact": 0.4}}})
    saved = load_lineage(model)
    assert saved["eval"] == {"distilled": {"task": {"exact": 0.9}}, "base": {"general": {"exact": 0.4}}}
    assert saved["cost"] == {"teacher_usd": 1.25}

    card = (model / "README.md").read_text()
    assert card.startswith("---\n")
    meta = yaml.safe_load(card.split("---\n")[1])
    assert "distillation" in meta["tags"] and meta["datasets"] == ["org/prompts"]
    (results,) = meta["model-index"][0]["results"]  # the base's general score is not this model's result
    assert results["dataset"]["name"] == "task"
    assert results["metrics"] == [{"type": "exact", "name": "task exact", "value": 0.9}]
    for section in ("## Lineage", "## Training tokens by source", "## Training", "## Evaluation", "## Cost"):
        assert section in card
    assert "| teacher:lab:teacher | 30 | 75.0% |" in card and "forward_kl (weight 1)" in card
    assert "| base.general.exact | 0.4 |" in card.split("for comparison")[1]  # shown, but apart and labelled

    text = format_lineage(saved)
    assert "teacher:lab:teacher" in text and "75.0%" in text and "distilled.task.exact" in text
    assert json.loads((model / "lineage.json").read_text()) == saved


def test_model_index_lists_only_this_models_results(tmp_path):
    """The pipeline's eval slot: every model of the run's evaluation, this one under "distilled"."""
    data = _dataset(tmp_path / "d.parquet", [("teacher", "T", 10)])
    model = tmp_path / "student"
    write_model_card(model, build_lineage(data, "lab:base", None, {"loss": "forward_kl"}))
    meta = yaml.safe_load((model / "README.md").read_text().split("---\n")[1])
    assert "model-index" not in meta  # not evaluated yet: no results, rather than someone else's
    update_lineage(model, eval={"teacher": {"task": 0.83, "general": 0.99}, "base": {"task": 0.0, "general": 0.54},
                                "distilled": {"task": 0.49, "general": 0.001}, "zero_distill": {"task": 0.47}})
    card = (model / "README.md").read_text()
    meta = yaml.safe_load(card.split("---\n")[1])
    (entry,) = meta["model-index"]
    assert entry["name"] == "student"
    scores = {r["dataset"]["name"]: [m["value"] for m in r["metrics"]] for r in entry["results"]}
    assert scores == {"task": [0.49], "general": [0.001]}
    own = card.split("## Evaluation")[1].split("for comparison")[0]
    assert "| task | 0.49 |" in own and "0.83" not in own and "0.54" not in own


def test_base_model_is_a_hub_id_only_when_given(tmp_path):
    data = _dataset(tmp_path / "d.parquet", [("teacher", "T", 10)])
    local_base = tmp_path / "my-base"
    local_base.mkdir()

    def front_matter(lineage, name):
        write_model_card(tmp_path / name, lineage)
        return yaml.safe_load((tmp_path / name / "README.md").read_text().split("---\n")[1])

    for base in ("lab:base", str(local_base)):  # neither is a Hub id: no base_model at all
        lineage = build_lineage(data, base)
        assert lineage["base_model_hub_id"] is None and "base_model" not in front_matter(lineage, "plain")
    lineage = build_lineage(data, str(local_base), student_hub_id="HuggingFaceTB/SmolLM2-135M")
    assert front_matter(lineage, "hub")["base_model"] == "HuggingFaceTB/SmolLM2-135M"
    assert lineage["base_model"] == str(local_base)  # where it was trained from is still recorded
    assert lineage["generations"][-1]["base_model_hub_id"] == "HuggingFaceTB/SmolLM2-135M"
    update_lineage(tmp_path / "hub", eval={"distilled": {"task": 0.5}})  # rewriting the card keeps it
    card = (tmp_path / "hub" / "README.md").read_text()
    assert yaml.safe_load(card.split("---\n")[1])["base_model"] == "HuggingFaceTB/SmolLM2-135M"
    for bad in ("lab:base", "/models/x", "a/b/c", "org/na me"):
        with pytest.raises(UserError, match="not a Hugging Face Hub id"):
            build_lineage(data, "lab:base", student_hub_id=bad)


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
    data = _dataset(tmp_path / "d.parquet", [("teacher", "T", 10)])
    summary = {"loss": "forward_kl", "kd_weight": 1.0, "sft_weight": 0.5, "epochs": 0.0}
    lineage = build_lineage(data, "lab:base", None, summary)
    assert lineage["generations"][0]["losses"] == {"forward_kl": 1.0, "sft": 0.5}
    assert lineage["generations"][0]["train"] == summary  # kept verbatim
    only_kd = build_lineage(data, "lab:base", None, {"loss": "reverse_kl", "kd_weight": 1.0, "sft_weight": 0.0})
    assert only_kd["generations"][0]["losses"] == {"reverse_kl": 1.0}
