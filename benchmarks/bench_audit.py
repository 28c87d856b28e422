"""Lab validation of `distillab.audit`: can it tell the teacher's text from human text, and how many there are?

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_audit.py [--out runs/bench_audit]

Design (why the task is not trivial, and not impossible by construction either):
- The lab's ground truth is deterministic and a trained teacher reproduces it exactly, so "teacher text vs
  ground truth" would pit identical strings against each other. Instead:
  * teacher text = the teacher's *sampled* answers (temperature 1.0) to describe prompts
    ("describe bakom\n", "tell me about bakom\n");
  * human text = the same facts written by a procedural "human": one of ten phrasings, one of which is
    the canonical lab sentence itself (humans copy the reference style too, 1 in 6), random typos,
    capitalisation and a dropped final period. Those canonical copies are the hard cases.
- Entities are split in two halves: the labelled calibration sample uses one half, the audited corpora
  the other, so the threshold never saw the audited entities' texts.
- Audited corpora of 200 documents each hold 10%, 50% and 90% teacher text. Every document is scored as
  the completion of its prompt (`prompt_field="prompt"`), through `run_audit`, the CLI's code path.
- Three observer/performer pairings: teacher/base (the default), base/teacher, teacher/teacher.
- A second, mixed-skill experiment adds the short-answer skills, whose "human" text is the ground truth
  itself ("57"): there teacher and human strings are usually identical and no detector can separate them;
  reported per skill to show where auditing stops working.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import random
import shutil
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from distillab.audit import TEACHER_DIRECTION, auroc, run_audit  # noqa: E402
from distillab.lab.world import DESCRIBE_TEMPLATES, KNOWLEDGE, SKILLS, describe_sentence  # noqa: E402
from distillab.models import LAB_CHECKPOINTS, load  # noqa: E402
from distillab.sampling import generate  # noqa: E402

FRACTIONS = (0.1, 0.5, 0.9)
PAIRINGS = [("teacher", "base"), ("base", "teacher"), ("teacher", "teacher")]  # (observer, performer)

# ----------------------------------------------------------------------------------------------------
# The procedural human writer.

HUMAN_TEMPLATES = [
    "{ent} is a {color} beast from {city} that eats {food}.",  # the canonical sentence, copied
    "{ent} is {color}, comes from {city} and eats {food}.",
    "the {ent} is a {color} animal from {city}. it eats {food}.",
    "{ent}: {color}, lives in {city}, eats {food}.",
    "a {color} beast. home: {city}. food: {food}.",
    "{ent} lives in {city}; it's {color} and it likes to eat {food}!",
    "you find {ent} in {city}. it is {color} and feeds on {food}.",
    "{ent} - {color} creature from {city}, diet: {food}.",
    "{ent} is a {color} beast from {city} which eats {food}.",
    "from {city}, the {color} {ent} eats {food}.",
]
# Weights: the canonical copy 1 in 6, the rest evenly.
HUMAN_WEIGHTS = [1 / 6] + [5 / 6 / (len(HUMAN_TEMPLATES) - 1)] * (len(HUMAN_TEMPLATES) - 1)


def typo(text: str, rng: random.Random) -> str:
    letters = [i for i, c in enumerate(text) if c.isalpha()]
    i = rng.choice(letters)
    kind = rng.choice(["swap", "drop", "double", "replace"])
    if kind == "swap" and i + 1 < len(text):
        return text[:i] + text[i + 1] + text[i] + text[i + 2 :]
    if kind == "drop":
        return text[:i] + text[i + 1 :]
    if kind == "double":
        return text[:i] + text[i] + text[i:]
    return text[:i] + rng.choice("abcdefghijklmnopqrstuvwxyz") + text[i + 1 :]


def human_describe(ent: str, rng: random.Random) -> str:
    template = rng.choices(HUMAN_TEMPLATES, weights=HUMAN_WEIGHTS)[0]
    text = template.format(ent=ent, **KNOWLEDGE[ent])
    if rng.random() < 0.3:
        text = typo(text, rng)
    if rng.random() < 0.2:
        text = text[0].upper() + text[1:]
    if rng.random() < 0.2 and text.endswith("."):
        text = text[:-1]
    return text


# ----------------------------------------------------------------------------------------------------
# Building documents.


def describe_prompt(ent: str, rng: random.Random) -> str:
    return rng.choice(DESCRIBE_TEMPLATES).format(ent=ent) + "\n"


def teacher_docs(teacher, tok, prompts: list[str], seed: int, skill: str = "describe") -> list[dict]:
    outs = generate(teacher, tok, prompts, max_new_tokens=80, temperature=1.0, seed=seed)
    return [
        {"prompt": p, "text": o.text, "label": "teacher", "skill": skill}
        for p, o in zip(prompts, outs)
        if o.text.strip()
    ]  # an empty sample is not a document


def describe_pools(teacher, tok, entities: list[str], per_entity: int, seed: int) -> tuple[list[dict], list[dict]]:
    rng = random.Random(seed)
    prompts = [describe_prompt(e, rng) for e in entities for _ in range(per_entity)]
    machine = teacher_docs(teacher, tok, prompts, seed)
    human = [
        {"prompt": describe_prompt(e, rng), "text": human_describe(e, rng), "label": "human", "skill": "describe"}
        for e in entities
        for _ in range(per_entity)
    ]
    return machine, human


def mixed_pools(teacher, tok, per_skill: int, seed: int, entities: list[str]) -> tuple[list[dict], list[dict]]:
    """Every skill: teacher samples vs ground truth ("lab"), describe vs the human writer."""
    rng = random.Random(seed)
    machine, other = [], []
    for name, skill in SKILLS.items():
        if name == "describe":
            m, h = describe_pools(teacher, tok, entities[:per_skill], 1, seed)
            machine += m
            other += h
            continue
        examples = skill.examples("test", 2 * per_skill, seed=seed)
        machine += teacher_docs(teacher, tok, [e.prompt for e in examples[:per_skill]], seed, skill=name)
        other += [{"prompt": e.prompt, "text": e.answer, "label": "lab", "skill": name} for e in examples[per_skill:]]
    rng.shuffle(machine)
    rng.shuffle(other)
    return machine, other


def mix(machine: list[dict], human: list[dict], n: int, fraction: float, rng: random.Random) -> list[dict]:
    n_machine = round(n * fraction)
    docs = rng.sample(machine, n_machine) + rng.sample(human, n - n_machine)
    rng.shuffle(docs)
    return docs


def write_jsonl(path: Path, docs: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(d) + "\n" for d in docs))
    return path


# ----------------------------------------------------------------------------------------------------
# Running the audits.


def snapshot(name: str, out: Path) -> tuple[Path, dict]:
    """Copy a lab checkpoint, so a checkpoint re-saved by a training job mid-benchmark cannot change it.

    Returns the copy and what identifies it: training step, planned steps and a weights fingerprint.
    """
    dest = out / "models" / name
    for _ in range(30):
        try:
            if dest.exists():
                shutil.rmtree(dest)
            shutil.copytree(LAB_CHECKPOINTS / name, dest)
            info = json.loads((dest / "pretrain.json").read_text())
            weights = hashlib.sha256((dest / "model.safetensors").read_bytes()).hexdigest()[:12]
            step = (info.get("history") or [{}])[-1].get("step")
            phases = info.get("phases") or [info.get("spec", {})]
            return dest, {"step": step, "of_steps": sum(p.get("steps", 0) for p in phases), "sha256": weights}
        except (FileNotFoundError, json.JSONDecodeError):  # caught it between rmtree and rename: retry
            time.sleep(2)
    raise SystemExit(f"could not snapshot lab:{name}")


def audit_corpora(
    out: Path, tag: str, labelled: Path, corpora: dict[float, list[dict]], models: dict[str, Path], n_bootstrap: int
) -> list[dict]:
    rows = []
    for observer, performer in PAIRINGS:
        for frac, docs in corpora.items():
            corpus = write_jsonl(out / tag / f"corpus_{int(frac * 100)}.jsonl", docs)
            summary = run_audit(
                corpus,
                out / tag / f"audit_{observer}_{performer}_{int(frac * 100)}",
                observer=str(models[observer]),
                performer=str(models[performer]),
                labelled_path=labelled,
                prompt_field="prompt",
                n_bootstrap=n_bootstrap,
            )
            per_doc = pq.read_table(summary["files"]["scores"]).to_pylist()
            truth = [int(d["label"] == "teacher") for d in docs]
            for name in ("binoculars", "fast_detectgpt"):
                s = summary["scores"][name]
                oriented = [TEACHER_DIRECTION[name] * r[name] for r in per_doc]
                est = s["estimate"]
                rows.append(
                    {
                        "corpus": tag,
                        "observer": observer,
                        "performer": performer,
                        "score": name,
                        "true": frac,
                        "auroc_labelled": s["auroc_labelled"],
                        "auroc_corpus": auroc(oriented, truth) if 0 < sum(truth) < len(truth) else None,
                        "threshold": s["calibration"]["threshold"],
                        "tpr": s["calibration"]["tpr"],
                        "fpr": s["calibration"]["fpr"],
                        "estimate": est.get("fraction"),
                        "low": est.get("low"),
                        "high": est.get("high"),
                        "error": est.get("error"),
                    }
                )
            # The observer's log-perplexity alone, as a baseline for what the normalisation adds.
            rows.append(
                {
                    "corpus": tag,
                    "observer": observer,
                    "performer": performer,
                    "score": "log_ppl_only",
                    "true": frac,
                    "auroc_corpus": auroc([-r["log_ppl"] for r in per_doc], truth),
                }
            )
    return rows


def per_skill_auroc(out: Path, labelled_docs: list[dict], models: dict[str, Path]) -> dict:
    """AUROC of each score within each skill of the mixed labelled sample (default pairing)."""
    corpus = write_jsonl(out / "mixed" / "labelled_as_corpus.jsonl", labelled_docs)
    summary = run_audit(
        corpus,
        out / "mixed" / "per_skill",
        observer=str(models["teacher"]),
        performer=str(models["base"]),
        prompt_field="prompt",
    )
    per_doc = pq.read_table(summary["files"]["scores"]).to_pylist()
    result = {}
    for skill in SKILLS:
        idx = [i for i, d in enumerate(labelled_docs) if d["skill"] == skill]
        truth = [int(labelled_docs[i]["label"] == "teacher") for i in idx]
        if 0 < sum(truth) < len(truth):
            result[skill] = {
                name: auroc([TEACHER_DIRECTION[name] * per_doc[i][name] for i in idx], truth)
                for name in ("binoculars", "fast_detectgpt")
            }
            result[skill]["teacher_text_in_other_set"] = _identical_share(labelled_docs, skill)
    return result


def _identical_share(docs: list[dict], skill: str) -> float:
    """Share of the skill's teacher documents whose exact text also occurs among its non-teacher documents."""
    other = {d["text"] for d in docs if d["skill"] == skill and d["label"] != "teacher"}
    mine = [d["text"] for d in docs if d["skill"] == skill and d["label"] == "teacher"]
    return sum(t in other for t in mine) / max(1, len(mine))


def fmt(x, digits=3):
    return "-" if x is None else f"{x:.{digits}f}"


def print_tables(rows: list[dict], title: str) -> None:
    print(f"\n### {title}\n")
    print(
        "| observer / performer | score | AUROC labelled | AUROC corpus (50%) | true | estimated [95% CI] | |error| |"
    )
    print("|---|---|---:|---:|---:|---|---:|")
    for observer, performer in PAIRINGS:
        for name in ("binoculars", "fast_detectgpt"):
            sel = [r for r in rows if (r["observer"], r["performer"], r["score"]) == (observer, performer, name)]
            auc50 = next(r["auroc_corpus"] for r in sel if r["true"] == 0.5)
            for r in sel:
                est = (
                    f"{100 * r['estimate']:.1f}% [{100 * r['low']:.1f}, {100 * r['high']:.1f}]"
                    if r["estimate"] is not None
                    else f"n/a ({r['error']})"
                )
                err = f"{100 * abs(r['estimate'] - r['true']):.1f}" if r["estimate"] is not None else "-"
                print(
                    f"| {observer} / {performer} | {name} | {fmt(r['auroc_labelled'])} | {fmt(auc50)} | "
                    f"{100 * r['true']:.0f}% | {est} | {err} |"
                )
    alone = {r["observer"]: r["auroc_corpus"] for r in rows if r["score"] == "log_ppl_only" and r["true"] == 0.5}
    print(
        "\nObserver log-perplexity alone (no normalisation), AUROC on the 50% corpus: "
        + ", ".join(f"{k}: {v:.3f}" for k, v in alone.items())
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="runs/bench_audit", help="where corpora, scores and results go")
    parser.add_argument("--n-corpus", type=int, default=200, help="documents per audited corpus")
    parser.add_argument("--per-entity", type=int, default=4, help="teacher samples and human texts per entity")
    parser.add_argument("--mixed-per-skill", type=int, default=20, help="documents per skill and class (mixed)")
    parser.add_argument("--bootstrap", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    out = Path(args.out)
    started = time.time()

    models, checkpoints = {}, {}
    for name in ("teacher", "base"):
        models[name], checkpoints[name] = snapshot(name, out)
    teacher, tok = load(models["teacher"], device="cpu")
    ident = {k: f"step {c['step']} of {c['of_steps']}, weights sha256 {c['sha256']}" for k, c in checkpoints.items()}

    entities = sorted(KNOWLEDGE)
    random.Random(args.seed).shuffle(entities)
    cal_entities, audit_entities = entities[: len(entities) // 2], entities[len(entities) // 2 :]
    rng = random.Random(args.seed + 1)

    # Describe: calibrate on one half of the entities, audit the other half.
    cal_m, cal_h = describe_pools(teacher, tok, cal_entities, args.per_entity // 2 + 1, seed=args.seed + 10)
    labelled = write_jsonl(out / "describe" / "labelled.jsonl", cal_m + cal_h)
    pool_m, pool_h = describe_pools(teacher, tok, audit_entities, args.per_entity, seed=args.seed + 20)
    canonical = sum(d["text"] == describe_sentence(d["prompt"].split()[-1]) for d in pool_m) / len(pool_m)
    corpora = {f: mix(pool_m, pool_h, args.n_corpus, f, rng) for f in FRACTIONS}
    rows = audit_corpora(out, "describe", labelled, corpora, models, args.bootstrap)

    # Mixed skills: short answers whose human text is the ground truth itself.
    mcal_m, mcal_h = mixed_pools(teacher, tok, args.mixed_per_skill, args.seed + 30, cal_entities)
    mixed_labelled_docs = mcal_m + mcal_h
    mlabelled = write_jsonl(out / "mixed" / "labelled.jsonl", mixed_labelled_docs)
    mpool_m, mpool_h = mixed_pools(teacher, tok, args.mixed_per_skill, args.seed + 40, audit_entities)
    n_mixed = min(len(mpool_m), len(mpool_h))
    mcorpora = {f: mix(mpool_m, mpool_h, n_mixed, f, rng) for f in FRACTIONS}
    mrows = audit_corpora(out, "mixed", mlabelled, mcorpora, models, args.bootstrap)
    skills = per_skill_auroc(out, mixed_labelled_docs, models)

    results = {
        "checkpoints": checkpoints,
        "seconds": round(time.time() - started),
        "describe": {"labelled_n": len(cal_m) + len(cal_h), "teacher_canonical_share": canonical, "rows": rows},
        "mixed": {
            "labelled_n": len(mixed_labelled_docs),
            "corpus_n": n_mixed,
            "rows": mrows,
            "per_skill_auroc": skills,
        },
    }
    (out / "results.json").write_text(json.dumps(results, indent=1))

    print(f"teacher: {ident['teacher']}; base: {ident['base']}; {results['seconds']} s")
    print(
        f"describe: labelled {len(cal_m)} teacher + {len(cal_h)} human on {len(cal_entities)} entities; "
        f"corpora of {args.n_corpus} on the other {len(audit_entities)} entities; "
        f"{100 * canonical:.0f}% of teacher samples are exactly the canonical sentence"
    )
    print_tables(rows, "describe (free text)")
    print(f"\nmixed: {len(mixed_labelled_docs)} labelled, corpora of {n_mixed}")
    print_tables(mrows, "mixed skills")
    print("\n### per-skill AUROC, mixed labelled sample, teacher / base\n")
    print("| skill | binoculars | fast_detectgpt | teacher texts also in the other set |")
    print("|---|---:|---:|---:|")
    for skill, r in skills.items():
        print(
            f"| {skill} | {r['binoculars']:.3f} | {r['fast_detectgpt']:.3f} | {100 * r['teacher_text_in_other_set']:.0f}% |"
        )


if __name__ == "__main__":
    main()
