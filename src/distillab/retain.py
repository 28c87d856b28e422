"""Retain: distil the task and keep the model. Three methods that compose, one rule that chooses.

replay      A share of every training batch (`replay_fraction`) is general prompts answered by a source
            the user picks: the frozen base student itself with its own top-k logprobs (self-distillation:
            no outside data, no teacher spend; the default), the teacher (its tokens and dollars go in the
            ledger), or a dataset the user brings (prompt + answer: SFT). General prompts come from
            `general_prompts_file`, else the lab's general skills' train split (lab runs), else the base
            model writes them itself (Magpie-style: sampled from the empty prompt, or from its chat
            template's user prefix), so replay works with zero outside data.
merge       After training, θ = (1-α)·θ_base + α·θ_distilled for each α of `merge_alphas` (WiSE-FT). For a
            LoRA run the merged weights are θ_base + s·BA, so interpolating them scales the adapter by α.
checkpoints Every saved checkpoint is a candidate (`select_checkpoints`); merges apply to each.

Choosing looks at the dev split only (lab: world's dev split; a user's prompts: a held-out share), and
test is scored once, afterwards, on the chosen student. The rule (`select`): among the candidates whose
dev general score is >= base's dev general score - max_general_drop, the highest dev task score; when
none qualifies, the highest dev task score - general drop. The select stage (distillab.select) scores the
candidates, writes the chosen one as the run's student/ and records every candidate's dev scores, the rule and
its seconds (the ledger's cost) in retain.json.
"""

from __future__ import annotations

import copy
import hashlib
import json
import random
from dataclasses import dataclass
from pathlib import Path

import torch

from distillab.config import RunConfig
from distillab.errors import UserError
from distillab.prompts import read_jsonl_prompts
from distillab.rundir import RunDir
from distillab.scoring import load_task_suite, score_model, suite_result, suites

NO_GENERAL_PROMPTS = (
    "retain.replay_fraction > 0 needs general prompts: set retain.general_prompts_file, "
    "or retain.sample_general_prompts = true to let the base model write them"
)

# ----------------------------------------------------------------------------------------------------
# Dev split of a user's prompts, and where the general prompts replay answers come from (generate's stages
# write both datasets: distillab.generate, distillab.general_prompts).


def split_dev_prompts(prompts: list[dict], dev_fraction: float) -> tuple[list[dict], list[dict]]:
    """(train, dev) by a stable hash of each prompt: the same prompt is always on the same side."""

    def unit(text: str) -> float:
        return int.from_bytes(hashlib.sha256(("dev|" + text).encode()).digest()[:8], "big") / 2**64

    train = [p for p in prompts if unit(p["prompt"]) >= dev_fraction]
    dev = [p for p in prompts if unit(p["prompt"]) < dev_fraction]
    return train, dev


def general_prompt_source(cfg: RunConfig) -> str:
    """Where the replay set's general prompts come from, the first that exists: "file" (general_prompts_file),
    "lab" (the lab's general skills), "sampled" (the base model writes them)."""
    r = cfg.retain
    if r.general_prompts_file:
        return "file"
    if lab_general_skills(cfg):
        return "lab"
    if r.sample_general_prompts:
        return "sampled"
    raise UserError(NO_GENERAL_PROMPTS)


def lab_general_skills(cfg: RunConfig) -> list[str]:
    """The lab's general skills, for a run whose task is lab skills (a user's prompts get no lab replay)."""
    if cfg.data.prompts_file:
        return []
    return suites(cfg)[1]


def check_retain(cfg: RunConfig) -> None:
    """What can be refused before anything is written or asked: the settings, and the files they name, read."""
    r = cfg.retain
    if r.replay_fraction > 0:
        general_prompt_source(cfg)
        if r.replay_source == "dataset" and not r.general_prompts_file:
            raise UserError(
                'retain.replay_source = "dataset" needs retain.general_prompts_file with an "answer" on every line'
            )
        if r.replay_source == "teacher" and cfg.data.source != "teacher":
            raise UserError('retain.replay_source = "teacher" needs data.source = "teacher"')
        if r.general_prompts_file:
            general_prompts_file(cfg)
    if r.general_dev_file:
        load_task_suite(r.general_dev_file)  # a bad line is an error now, not after training


def general_prompts_file(cfg: RunConfig) -> list[dict]:
    """The prompt records replay uses from retain.general_prompts_file (its first n_general_prompts), each with an
    answer when replay_source = "dataset" trains on them; a missing or malformed file, or a line without its answer,
    is a one-line error naming the file and line."""
    r = cfg.retain
    records = read_jsonl_prompts(Path(r.general_prompts_file))[: r.n_general_prompts]
    if r.replay_source == "dataset":
        missing = [p for p in records if p.get("answer") is None]
        if missing:
            raise UserError(
                f'{r.general_prompts_file}: line {missing[0]["line"]} has no "answer" '
                '(retain.replay_source = "dataset" trains on the answers you bring)'
            )
    return records


# ----------------------------------------------------------------------------------------------------
# Replay in every batch.


def replay_per_batch(batch_size: int, fraction: float) -> int:
    """Replay rows in a batch of batch_size: the nearest whole share, at least one when replay is on,
    and at least one task row."""
    if fraction <= 0:
        return 0
    return min(batch_size - 1, max(1, round(batch_size * fraction)))


def batch_layout(
    n_task: int, n_replay: int, batch_size: int, fraction: float, n_batches: int, seed: int
) -> list[tuple[str, int]]:
    """The training order, batch after batch: ("task", i) and ("replay", j) entries, batch_size a batch, of
    which replay_per_batch(...) are replay rows. Each source is walked in its own shuffled order, reshuffled
    when it runs out, so the task rows are seen as evenly as without replay."""
    per_batch = replay_per_batch(batch_size, fraction)
    rng = random.Random(seed)

    def stream(n: int):
        while True:
            order = list(range(n))
            rng.shuffle(order)
            yield from order

    task, replay = stream(n_task), stream(n_replay)
    layout: list[tuple[str, int]] = []
    for _ in range(n_batches):
        batch = [("replay", next(replay)) for _ in range(per_batch)] + [
            ("task", next(task)) for _ in range(batch_size - per_batch)
        ]
        rng.shuffle(batch)
        layout += batch
    return layout


# ----------------------------------------------------------------------------------------------------
# Merge and choose.


def interpolate(base: dict[str, torch.Tensor], tuned: dict[str, torch.Tensor], alpha: float) -> dict[str, torch.Tensor]:
    """(1-α)·base + α·tuned for every floating tensor (WiSE-FT); other tensors are the tuned model's."""
    return {
        name: ((1 - alpha) * base[name] + alpha * t) if t.is_floating_point() and name in base else t
        for name, t in tuned.items()
    }


@dataclass
class Candidate:
    """One student the rule may choose: a checkpoint, merged with the base at weight alpha."""

    checkpoint: str  # checkpoint directory name ("checkpoint-400")
    step: int  # its training step
    alpha: float  # merge weight of the distilled side (1.0: the checkpoint as trained)
    dev_task: float | None = None  # dev-split task score
    dev_general: float | None = None  # dev-split general score

    @property
    def label(self) -> str:
        return f"step {self.step}, α={self.alpha:g}"


def select(candidates: list[Candidate], base_dev_general: float, max_general_drop: float) -> tuple[Candidate, str]:
    """The rule: highest dev task among candidates with dev general >= base - max_general_drop; when none
    qualifies, highest dev task - general drop. Reads dev scores only; returns (chosen, why in words)."""
    floor = base_dev_general - max_general_drop
    keeping = [c for c in candidates if c.dev_general >= floor - 1e-12]
    if keeping:
        best = max(keeping, key=lambda c: (c.dev_task, c.dev_general, -c.alpha))
        return best, (
            f"highest dev task score ({best.dev_task:.3f}) among the {len(keeping)} of {len(candidates)} "
            f"candidates whose dev general score stayed >= base {base_dev_general:.3f} - "
            f"{max_general_drop:g}"
        )
    best = max(candidates, key=lambda c: (c.dev_task - max(0.0, base_dev_general - c.dev_general), -c.alpha))
    return best, (
        f"no candidate kept dev general >= base {base_dev_general:.3f} - {max_general_drop:g}: "
        f"highest dev task - general drop ({best.dev_task:.3f} - "
        f"{max(0.0, base_dev_general - best.dev_general):.3f})"
    )


def load_weights(model, state: dict[str, torch.Tensor]) -> None:
    """Load a saved state into model. A checkpoint stores tied weights once (lm_head = embeddings), so a
    missing key is fine only when it shares its storage with a loaded one."""
    missing, unexpected = model.load_state_dict(state, strict=False)
    params = dict(model.named_parameters(remove_duplicate=False))
    loaded = {params[k].data_ptr() for k in state if k in params}
    untied = [k for k in missing if k not in params or params[k].data_ptr() not in loaded]
    if unexpected or untied:
        raise UserError(
            f"checkpoint weights do not fit the base model (missing {untied[:3]}, unexpected {unexpected[:3]})"
        )


def checkpoints(ckpt_dir: Path) -> list[Path]:
    """Complete checkpoints, oldest first."""
    found = [
        p
        for p in ckpt_dir.glob("checkpoint-*")
        if p.name.split("-")[-1].isdigit() and (p / "trainer_state.json").is_file()
    ]
    return sorted(found, key=lambda p: int(p.name.split("-")[-1]))


def checkpoint_state(path: Path, base_model) -> dict[str, torch.Tensor]:
    """A checkpoint's full weights: the model itself, or (LoRA) the base with the adapter merged in."""
    from safetensors.torch import load_file

    if (path / "adapter_config.json").is_file():
        from peft import PeftModel

        merged = PeftModel.from_pretrained(copy.deepcopy(base_model), str(path)).merge_and_unload()
        return {k: v.detach().clone() for k, v in merged.state_dict().items()}
    state: dict[str, torch.Tensor] = {}
    for f in sorted(path.glob("*.safetensors")):
        state.update(load_file(str(f)))
    if not state:
        raise UserError(f"checkpoint {path} has no safetensors weights")
    return state


def dev_suites(cfg: RunConfig) -> tuple[list[str], list[str], list[dict]]:
    """(task lab skills, general lab skills, user examples) scored on the dev split.

    Task: the lab task skills' dev split, or the held-out share of a user's prompts (data/dev.parquet) scored
    by word F1 against the reference the teacher (or the user) wrote. General: `general_dev_file` (a task-suite
    JSONL, see scoring.load_task_suite: the user's own general checks) when given, else the lab's general
    skills' dev split."""
    task, general = suites(cfg)
    examples: list[dict] = []
    dev_path = RunDir(cfg.run_dir).dataset("dev")
    if cfg.data.prompts_file and dev_path.is_file():
        import pyarrow.parquet as pq

        names = pq.read_schema(dev_path).names
        rows = pq.read_table(
            dev_path, columns=[c for c in ("prompt", "messages", "completion") if c in names]
        ).to_pylist()
        # a conversation is asked as a conversation (each candidate's own chat template renders it)
        examples += [
            {
                "prompt": r["prompt"],
                "answer": r["completion"],
                "scorer": "word_f1",
                "skill": "dev:task",
                **({"messages": json.loads(r["messages"])} if r.get("messages") else {}),
            }
            for r in rows
        ]
    if cfg.retain.general_dev_file:
        general = []
        examples += [
            ex | {"skill": f"dev:general:{ex['skill']}"} for ex in load_task_suite(cfg.retain.general_dev_file)
        ]
    return task, general, examples


def dev_scores(model, tok, cfg: RunConfig) -> tuple[float | None, float | None]:
    """(task, general) on the dev split: the only scores selection ever sees."""
    task, general, examples = dev_suites(cfg)
    per_skill = score_model(
        model,
        tok,
        task + general,
        cfg.retain.dev_n_per_skill,
        cfg.teacher.max_new_tokens,
        split="dev",
        task_examples=examples or None,
    )
    task_names = task + [s for s in per_skill if s == "dev:task"]
    general_names = general + [s for s in per_skill if s.startswith("dev:general:")]
    return (
        suite_result({s: per_skill[s] for s in task_names}, 0)["score"],
        suite_result({s: per_skill[s] for s in general_names}, 0)["score"],
    )


def recipe(cfg: RunConfig, chosen: Candidate | None = None) -> dict:
    """What retain did, in the words of the config: the summary's `retain_recipe`."""
    r = cfg.retain
    out = {
        "replay_source": r.replay_source if r.replay_fraction > 0 else None,
        "replay_fraction": r.replay_fraction,
        "merge_alphas": r.merge_alphas,
        "select_checkpoints": r.select_checkpoints,
        "max_general_drop": r.max_general_drop,
        "lora": cfg.train.lora,
        "lr": cfg.train.lr,
    }
    if chosen is not None:
        out |= {"alpha": chosen.alpha, "checkpoint": chosen.checkpoint, "step": chosen.step}
    return out
