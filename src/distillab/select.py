"""Stage select: choose the student on the dev split by retain's rule, and make it the run's student/.

It runs after train and before evaluate when the config selects (retain.merge_alphas or
retain.select_checkpoints). Every saved checkpoint (or the last one), merged with the base at each α of the
grid and as trained (α = 1), is a candidate; each is scored on dev (retain.dev_scores), retain.select picks one,
and its weights replace student/'s. retain.json records every candidate's dev scores, the rule's sentence and
the seconds it took (the ledger's cost); a copy in student/ marks the weights as chosen. Test is scored once,
afterwards, by evaluate, on the choice.
"""

from __future__ import annotations

import copy
import shutil
import time
from dataclasses import asdict
from pathlib import Path

from distillab import models, retain
from distillab.config import RunConfig
from distillab.errors import UserError
from distillab.files import atomic_dir, fingerprint, read_json, write_json
from distillab.rundir import RunDir
from distillab.stage import StageContext, run_stage


def choose_student(cfg: RunConfig, log=print) -> dict | None:
    """Score every candidate on dev, apply the rule, write the chosen one as student/.
    Returns the selection record (also retain.json); None when the run does not select."""
    if not cfg.retain.selects:
        return None
    return run_stage(SelectStudent(), cfg, StageContext(log=log))


def select_stages(cfg: RunConfig) -> list[SelectStudent]:
    """[the select stage] when the config selects, else []: what a pipeline runs between train and evaluate."""
    return [SelectStudent()] if cfg.retain.selects else []


def candidate_checkpoints(cfg: RunConfig, run: RunDir) -> list[Path]:
    """The checkpoints the candidates come from: every complete one with select_checkpoints, else the last."""
    found = retain.checkpoints(run.checkpoints)
    if not found:
        raise UserError(f"no complete checkpoint in {run.checkpoints} to choose from: run `distillab train`")
    return found if cfg.retain.select_checkpoints else found[-1:]


class SelectStudent:
    """select: stamped on the [retain] section, eval.general and the candidate checkpoints' weights; its record
    is retain.json's dict."""

    name = "select"

    def fingerprint(self, cfg: RunConfig, run: RunDir) -> str:
        sources = candidate_checkpoints(cfg, run)
        return fingerprint(
            "select",
            cfg.retain.model_dump(),
            cfg.eval.general,
            [p.name for p in sources],
            *[f for p in sources for f in sorted(p.glob("*.safetensors"))],
        )

    def outputs(self, cfg: RunConfig, run: RunDir) -> list:
        # student/retain.json marks the chosen weights: a retrained student/ (the last step's) has none
        return [run.retain_record, run.student_retain_record, run.student_weights]

    def run(self, cfg: RunConfig, run: RunDir, ctx: StageContext) -> dict:
        r, log = cfg.retain, ctx.log
        sources = {p.name: p for p in candidate_checkpoints(cfg, run)}
        alphas = sorted(set(r.merge_alphas) | {1.0})
        began = time.time()
        base_model, tok = models.load(cfg.train.student)
        base_state = {k: v.detach().clone() for k, v in base_model.state_dict().items()}
        base_task, base_general = retain.dev_scores(base_model, tok, cfg)
        log(f"retain: base on dev: task {base_task:.3f}, general {base_general:.3f}")
        candidates, model = [], copy.deepcopy(base_model)  # the one the candidates' weights are loaded into
        for path in sources.values():
            tuned = retain.checkpoint_state(path, base_model)
            step = int(path.name.split("-")[-1])
            for alpha in alphas:
                retain.load_weights(model, retain.interpolate(base_state, tuned, alpha))
                dev_task, dev_general = retain.dev_scores(model, tok, cfg)
                candidate = retain.Candidate(
                    checkpoint=path.name, step=step, alpha=alpha, dev_task=dev_task, dev_general=dev_general
                )
                log(f"retain: {candidate.label}: dev task {dev_task:.3f}, general {dev_general:.3f}")
                candidates.append(candidate)
        chosen, why = retain.select(candidates, base_general, r.max_general_drop)
        retain.load_weights(
            model,
            retain.interpolate(
                base_state, retain.checkpoint_state(sources[chosen.checkpoint], base_model), chosen.alpha
            ),
        )
        record = {
            "rule": why,
            "max_general_drop": r.max_general_drop,
            "split": "dev",
            "base_dev": {"task": base_task, "general": base_general},
            "chosen": asdict(chosen) | {"label": chosen.label},
            "candidates": [asdict(c) | {"label": c.label} for c in candidates],
            "recipe": retain.recipe(cfg, chosen),
            "selection_seconds": round(time.time() - began, 2),
        }
        _write_student(model, run, record)
        write_json(run.retain_record, record)
        log(f"retain: chose {chosen.label} ({why})")
        return record

    def load(self, cfg: RunConfig, run: RunDir) -> dict:
        return read_json(run.retain_record)


def _write_student(model, run: RunDir, record: dict) -> None:
    """The chosen weights and their record into student/, keeping its tokenizer, summaries and model card.
    student/ is built whole beside the old one and swapped in: a kill leaves the old student or the new."""
    student = run.student
    with atomic_dir(student, "select.tmp") as staging:
        # the trained weights (and a LoRA adapter, which is not the chosen merge) are replaced by the chosen ones
        shutil.copytree(
            student, staging, ignore=shutil.ignore_patterns("*.safetensors", "*.safetensors.index.json", "adapter")
        )
        model.save_pretrained(str(staging), safe_serialization=True)
        write_json(staging / run.student_retain_record.name, record)
