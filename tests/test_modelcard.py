"""The model card and lineage as people read them (modelcard.py): lineage.json and README.md round-trip, the card's
model-index holds only this model's results, its base_model only a Hub id the user gave; `distillab lineage`'s
text."""

from __future__ import annotations

import json

import pytest
import yaml

from distillab.errors import UserError
from distillab.modelcard import format_lineage, update_lineage, write_model_card
from distillab.provenance import build_lineage, load_lineage
from tests.helpers import provenance_dataset


def test_model_card_and_lineage_round_trip(tmp_path):
    data = provenance_dataset(tmp_path / "d.parquet", [("teacher", "lab:teacher", 30), ("lab", None, 10)])
    lineage = build_lineage(
        data, "lab:base", None, {"losses": {"forward_kl": 1.0, "ce": 0.5}}, datasets=["org/prompts"]
    )
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
    data = provenance_dataset(tmp_path / "d.parquet", [("teacher", "T", 10)])
    model = tmp_path / "student"
    write_model_card(model, build_lineage(data, "lab:base", None, {"loss": "forward_kl"}))
    meta = yaml.safe_load((model / "README.md").read_text().split("---\n")[1])
    assert "model-index" not in meta  # not evaluated yet: no results, rather than someone else's
    update_lineage(
        model,
        eval={
            "teacher": {"task": 0.83, "general": 0.99},
            "base": {"task": 0.0, "general": 0.54},
            "distilled": {"task": 0.49, "general": 0.001},
            "zero_distill": {"task": 0.47},
        },
    )
    card = (model / "README.md").read_text()
    meta = yaml.safe_load(card.split("---\n")[1])
    (entry,) = meta["model-index"]
    assert entry["name"] == "student"
    scores = {r["dataset"]["name"]: [m["value"] for m in r["metrics"]] for r in entry["results"]}
    assert scores == {"task": [0.49], "general": [0.001]}
    own = card.split("## Evaluation")[1].split("for comparison")[0]
    assert "| task | 0.49 |" in own and "0.83" not in own and "0.54" not in own


def test_base_model_is_a_hub_id_only_when_given(tmp_path):
    data = provenance_dataset(tmp_path / "d.parquet", [("teacher", "T", 10)])
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
