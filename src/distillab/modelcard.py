"""The lineage as people read it: the Hugging Face model card beside `lineage.json`, and the text
`distillab lineage MODEL_DIR` prints.

The card (`model_card`, from templates/model_card.md.j2) is a `README.md` with YAML front matter and readable
sections: lineage, token fractions, training, verification (when [verify] checked the teacher's samples),
decontamination (what the training prompts were checked against), evaluation, cost. `write_model_card` saves
lineage.json and the card; `update_lineage` fills the lineage's eval, cost, verification and decontamination slots
later and rewrites both. The eval slot holds
every model of the run's evaluation, {label: {suite: score}} (teacher, base, ...); the model itself is
`OWN_EVAL_LABEL`. The front matter's `model-index` lists only the model's own results, and `base_model` is the
Hub id the user gave (`student_hub_id`), omitted otherwise: `lab:base` or a local path is no Hub id, and a wrong
one would link the card to someone else's model.
"""

from __future__ import annotations

from functools import cache
from pathlib import Path

import yaml

from distillab.files import write_atomic
from distillab.provenance import OWN_EVAL_LABEL, require_lineage, save_lineage

CARD_FILE = "README.md"


def write_model_card(model_dir: str | Path, lineage: dict) -> None:
    """Write lineage.json and the Hugging Face model card README.md into model_dir, each atomically."""
    lineage = save_lineage(model_dir, lineage)
    write_atomic(Path(model_dir) / CARD_FILE, model_card(lineage))


def update_lineage(
    model_dir: str | Path,
    eval: dict | None = None,
    cost: dict | None = None,
    verification: dict | None = None,
    decontamination: dict | None = None,
) -> dict:
    """Fill the eval and/or cost slots of a saved lineage (keys merge), and rewrite the card. verification: what
    [verify] checked and kept (records.Verification's JSON), shown as its own section. decontamination: the
    training prompts against the scored suites (data/decontamination.json: distillab.decontaminate), likewise.

    eval: {model label: {suite: score, or {metric: score}}} for every model evaluated beside this one; this
    model's own scores are under OWN_EVAL_LABEL (the card's model-index lists those and nothing else)."""
    lineage = require_lineage(model_dir)
    if eval is not None:
        lineage["eval"] = {**(lineage.get("eval") or {}), **eval}
    if cost is not None:
        lineage["cost"] = {**(lineage.get("cost") or {}), **cost}
    if verification is not None:
        lineage["verification"] = verification
    if decontamination is not None:
        lineage["decontamination"] = decontamination
    write_model_card(model_dir, lineage)
    return lineage


# ----------------------------------------------------------------------------------------------------
# The card.


def model_card(lineage: dict) -> str:
    """The README.md text: YAML front matter, then lineage, fractions, losses, data, eval and cost."""
    others = {k: v for k, v in (lineage.get("eval") or {}).items() if k != OWN_EVAL_LABEL}
    return _card_template().render(
        lineage=lineage,
        last=lineage["generations"][-1],
        hub=lineage.get("base_model_hub_id"),
        front_matter=yaml.safe_dump(_front_matter(lineage), sort_keys=False).rstrip(),
        effective_tokens={k: f"{v:g}" for k, v in lineage["effective_tokens"].items()},
        own=_flat_numbers(_own_eval(lineage)),
        others=_flat_numbers(others),
        costs=_flat_numbers(lineage.get("cost")),
        verification=_verification(lineage.get("verification")),
        decontamination=_decontamination(lineage.get("decontamination")),
    )


def _decontamination(record: dict | None) -> dict | None:
    """[decontaminate]'s record with its sentence, and its examples on one line each (a Markdown list item)."""
    if not record:
        return None
    from distillab.decontaminate import summary_line

    def flat(text) -> str:
        return " ".join(str(text).split()).replace("`", "'")

    examples = [{**e, "prompt": flat(e["prompt"]), "match": flat(e.get("match", ""))} for e in record["examples"]]
    return {**record, "line": summary_line(record), "examples": examples}


def _verification(block: dict | None) -> dict | None:
    """[verify]'s block with its table rows: each skill, then all of them when there are several."""
    if not block:
        return None
    rows = list(block["skills"].items()) + ([("all", block["total"])] if len(block["skills"]) > 1 else [])
    return {**block, "rows": rows}


@cache
def _card_template():
    """Markdown, not HTML: nothing to escape, and the text goes in as written."""
    import jinja2

    env = jinja2.Environment(
        loader=jinja2.PackageLoader("distillab", "templates"),
        autoescape=False,
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=True,
        undefined=jinja2.StrictUndefined,
    )
    env.filters.update(
        pct=_pct,
        g=lambda x: f"{x:g}",
        epochs=_epochs,
        loss_text=_loss_text,
        by_share=_by_share,
        share=lambda x: "-" if x is None else _pct(x),
        number=lambda x, fmt: "-" if x is None else fmt % x,
    )
    return env.get_template("model_card.md.j2")


def _front_matter(lineage: dict) -> dict:
    meta: dict = {}
    if lineage.get("base_model_hub_id"):  # the Hub links the card to this id: only one the user gave
        meta["base_model"] = lineage["base_model_hub_id"]
    meta |= {"library_name": "transformers", "tags": ["distillation", "knowledge-distillation", "distillab"]}
    if lineage.get("datasets"):
        meta["datasets"] = list(lineage["datasets"])
    results = []
    for suite, scores in _own_eval(lineage).items():  # the teacher's and base's scores are not this model's
        named = _flat_numbers(scores if isinstance(scores, dict) else {"score": scores})
        if named:
            results.append(
                {
                    "task": {"type": "text-generation"},
                    "dataset": {"name": suite, "type": "distillab-eval"},
                    "metrics": [
                        {"type": metric, "name": f"{suite} {metric}", "value": float(value)} for metric, value in named
                    ],
                }
            )
    if results:
        meta["model-index"] = [{"name": lineage.get("model") or "student", "results": results}]
    return meta


def _own_eval(lineage: dict) -> dict:
    """This model's scores, {suite: score or {metric: score}}: the OWN_EVAL_LABEL entry of the eval slot."""
    own = (lineage.get("eval") or {}).get(OWN_EVAL_LABEL)
    return own if isinstance(own, dict) else {}


# ----------------------------------------------------------------------------------------------------
# The terminal text, and the words and numbers both share.


def format_lineage(lineage: dict) -> str:
    """What `distillab lineage MODEL_DIR` prints: generations, then this run's and the effective mix."""
    lines = [
        f"model: {lineage.get('model') or '?'}",
        f"base model: {lineage['base_model']}",
        f"root model: {lineage['root_model']}",
        f"teachers: {', '.join(lineage['teachers']) or 'none'}",
        "",
        "generations:",
    ]
    for gen in lineage["generations"]:
        lines.append(
            f"  {gen['generation']}. {gen['base_model']} -> {gen.get('model') or '?'}: "
            f"{gen['dataset']['examples']} examples, {gen['dataset']['training_tokens']} training tokens "
            f"x {_epochs(gen['epochs'])}, losses: {_loss_text(gen['losses'])}"
        )
        for key, frac in _by_share(gen["token_fractions"]):
            lines.append(f"       {key:<32} {_pct(frac):>7}")
    lines += ["", "effective fractions (epochs x training tokens over all generations):"]
    for key, frac in _by_share(lineage["effective_fractions"]):
        lines.append(f"  {key:<34} {_pct(frac):>7}")
    for title, slot in (("eval", "eval"), ("cost", "cost")):
        rows = _flat_numbers(lineage.get(slot))
        lines += ["", f"{title}:"] + ([f"  {n:<34} {v:.6g}" for n, v in rows] if rows else ["  not recorded"])
    return "\n".join(lines)


def _by_share(fractions: dict[str, float]) -> list[tuple[str, float]]:
    """(source, fraction) pairs, the largest share first."""
    return sorted(fractions.items(), key=lambda kv: -kv[1])


def _pct(x: float) -> str:
    return f"{100 * x:.1f}%"


def _epochs(n: float) -> str:
    return f"{n:g} epoch" + ("" if n == 1 else "s")


def _loss_text(losses) -> str:
    text = (
        ", ".join(f"{k} (weight {v:g})" for k, v in losses.items())
        if isinstance(losses, dict)
        else ", ".join(map(str, losses or []))
    )
    return text or "not recorded"


def _flat_numbers(nested: dict | None, prefix: str = "") -> list[tuple[str, float]]:
    """Nested eval/cost dicts as (dotted name, number) rows, for tables and the model-index."""
    rows = []
    for key, value in (nested or {}).items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            rows += _flat_numbers(value, name + ".")
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            rows.append((name, value))
    return rows
