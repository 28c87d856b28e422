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
none qualifies, the highest dev task score - general drop. The chosen candidate becomes run_dir/student;
run_dir/retain.json records every candidate's dev scores, the rule and its seconds (the ledger's cost).
"""

from __future__ import annotations

import copy
import hashlib
import json
import random
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from distillab import models
from distillab.config import RunConfig
from distillab.files import write_atomic
from distillab.errors import UserError
from distillab.files import fingerprint
from distillab.rundir import is_fresh, mark_fresh

NO_GENERAL_PROMPTS = ("retain.replay_fraction > 0 needs general prompts: set retain.general_prompts_file, "
                      "or retain.sample_general_prompts = true to let the base model write them")

# ----------------------------------------------------------------------------------------------------
# Dev split of a user's prompts, and the general prompts replay answers.


def split_dev_prompts(prompts: list[dict], dev_fraction: float) -> tuple[list[dict], list[dict]]:
    """(train, dev) by a stable hash of each prompt: the same prompt is always on the same side."""
    def unit(text: str) -> float:
        return int.from_bytes(hashlib.sha256(("dev|" + text).encode()).digest()[:8], "big") / 2**64

    train = [p for p in prompts if unit(p["prompt"]) >= dev_fraction]
    dev = [p for p in prompts if unit(p["prompt"]) < dev_fraction]
    return train, dev


def general_prompts(cfg: RunConfig, log=print) -> list[dict]:
    """[{prompt, answer, skill}] the replay set is built from, by the first source that exists."""
    r = cfg.retain
    if r.general_prompts_file:
        from distillab.generate import read_jsonl_prompts

        return read_jsonl_prompts(Path(r.general_prompts_file))[: r.n_general_prompts]
    general = lab_general_skills(cfg)
    if general:
        from distillab.lab.world import get_skill

        per_skill = -(-r.n_general_prompts // len(general))
        rows = [{"prompt": e.prompt, "answer": e.answer, "skill": s}
                for s in general for e in get_skill(s).examples("train", per_skill, seed=cfg.data.seed + 1)]
        return random.Random(cfg.data.seed).sample(rows, min(len(rows), r.n_general_prompts))
    if r.sample_general_prompts:
        return sampled_prompts(cfg, log)
    raise UserError(NO_GENERAL_PROMPTS)


def lab_general_skills(cfg: RunConfig) -> list[str]:
    """The lab's general skills, for a run whose task is lab skills (a user's prompts get no lab replay)."""
    if cfg.data.prompts_file:
        return []
    from distillab.evaluate import suites

    return suites(cfg)[1]


def check_retain(cfg: RunConfig) -> None:
    """What can be refused before anything is written."""
    r = cfg.retain
    if r.replay_fraction > 0:
        has_prompts = r.general_prompts_file or lab_general_skills(cfg) or r.sample_general_prompts
        if not has_prompts:
            raise UserError(NO_GENERAL_PROMPTS)
        if r.replay_source == "dataset" and not r.general_prompts_file:
            raise UserError("retain.replay_source = \"dataset\" needs retain.general_prompts_file with an "
                            "\"answer\" on every line")
        if r.replay_source == "teacher" and cfg.data.source != "teacher":
            raise UserError("retain.replay_source = \"teacher\" needs data.source = \"teacher\"")
    if r.general_dev_file:
        from distillab.evaluate import load_task_suite

        load_task_suite(r.general_dev_file)  # a bad line is an error now, not after training


def sampled_prompts(cfg: RunConfig, log=print) -> list[dict]:
    """Prompts the base model writes itself (Magpie): sampled after its chat template's user prefix, or after
    <bos> when it has no template, cut where the prompt ends (the template's end of turn, or a newline).
    Cached in data/sampled_prompts.json so a rerun replays the same set."""
    path = cfg.run_dir / "data" / "sampled_prompts.json"
    stamp = fingerprint("sampled_prompts", cfg.train.student, cfg.retain.n_general_prompts, cfg.data.seed)
    if path.is_file():
        saved = json.loads(path.read_text())
        if saved.get("stamp") == stamp:
            return saved["prompts"]
    began = time.time()
    model, tok = models.load(cfg.train.student)
    prefix, end = user_turn_frame(tok)
    want, seen, attempts = cfg.retain.n_general_prompts, {}, 0
    generator = torch.Generator().manual_seed(cfg.data.seed)
    while len(seen) < want and attempts < 20:
        attempts += 1
        texts = sample_texts(model, tok, prefix, n=min(256, 2 * (want - len(seen))), generator=generator)
        for text in texts:
            prompt = text.split(end)[0].strip() if end else text.split("\n")[0].strip()
            if prompt:
                seen.setdefault(prompt + ("" if end else "\n"), None)
    prompts = [{"prompt": p, "answer": None, "skill": "sampled"} for p in list(seen)[:want]]
    log(f"retain: the base model wrote {len(prompts)} general prompts in {time.time() - began:.0f}s")
    write_atomic(path, json.dumps({"stamp": stamp, "seconds": round(time.time() - began, 2), "prompts": prompts}))
    return prompts


def user_turn_frame(tok) -> tuple[str, str | None]:
    """(text before a user message, text that ends it) from the chat template; ("", None) without one."""
    if not getattr(tok, "chat_template", None):
        return "", None
    marker = "\x00USER\x00"
    rendered = tok.apply_chat_template([{"role": "user", "content": marker}], tokenize=False)
    before, after = rendered.split(marker, 1)
    return before, (after.strip().splitlines() or [None])[0] or None


@torch.no_grad()
def sample_texts(model, tok, prefix: str, n: int, generator: torch.Generator, max_new_tokens: int = 48) -> list[str]:
    """n samples (temperature 1) continuing `prefix` (after <bos>), decoded without special tokens."""
    model.eval()
    ids = tok(prefix)["input_ids"] if prefix else [tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id]
    device = next(model.parameters()).device
    torch.manual_seed(int(torch.randint(0, 2**31 - 1, (1,), generator=generator)))
    out = model.generate(input_ids=torch.tensor([ids] * n, device=device), do_sample=True, temperature=1.0, top_k=None,
                         max_new_tokens=max_new_tokens, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
    return [tok.decode(row[len(ids):], skip_special_tokens=True) for row in out.tolist()]


def generate_replay(cfg: RunConfig, progress=None, log=print):
    """data/replay.parquet: the general prompts answered by retain.replay_source."""
    from distillab.generate import generate_dataset

    r = cfg.retain
    check_retain(cfg)
    prompts = general_prompts(cfg, log)
    if r.replay_source == "dataset":
        missing = [i for i, p in enumerate(prompts) if p.get("answer") is None]
        if missing:
            raise UserError(f"{r.general_prompts_file}: line {missing[0] + 1} has no \"answer\" "
                            "(retain.replay_source = \"dataset\" trains on the answers you bring)")
        return generate_dataset(cfg, prompts, "replay", cfg.teacher, "human", progress=progress, log=log)
    if r.replay_source == "teacher":
        return generate_dataset(cfg, prompts, "replay", cfg.teacher, "teacher", progress=progress, log=log)
    base = cfg.teacher.model_copy(update={  # the frozen base student answers: local, greedy, free
        "model": cfg.train.student, "base_url": None, "api_key_env": None, "mode": "completions", "max_usd": None,
        "usd_per_1m_input": None, "usd_per_1m_output": None, "temperature": 0.0})
    return generate_dataset(cfg, prompts, "replay", base, "teacher", progress=progress, log=log,
                            teacher_label=f"{cfg.train.student} (self)")


# ----------------------------------------------------------------------------------------------------
# Replay in every batch.


def replay_per_batch(batch_size: int, fraction: float) -> int:
    """Replay rows in a batch of batch_size: the nearest whole share, at least one when replay is on,
    and at least one task row."""
    if fraction <= 0:
        return 0
    return min(batch_size - 1, max(1, round(batch_size * fraction)))


def batch_layout(n_task: int, n_replay: int, batch_size: int, fraction: float, n_batches: int,
                 seed: int) -> list[tuple[str, int]]:
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
        batch = [("replay", next(replay)) for _ in range(per_batch)] + \
                [("task", next(task)) for _ in range(batch_size - per_batch)]
        rng.shuffle(batch)
        layout += batch
    return layout


# ----------------------------------------------------------------------------------------------------
# Merge and choose.


def interpolate(base: dict[str, torch.Tensor], tuned: dict[str, torch.Tensor], alpha: float) -> dict[str, torch.Tensor]:
    """(1-α)·base + α·tuned for every floating tensor (WiSE-FT); other tensors are the tuned model's."""
    return {name: ((1 - alpha) * base[name] + alpha * t) if t.is_floating_point() and name in base else t
            for name, t in tuned.items()}


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
        return best, (f"highest dev task score ({best.dev_task:.3f}) among the {len(keeping)} of {len(candidates)} "
                      f"candidates whose dev general score stayed >= base {base_dev_general:.3f} - "
                      f"{max_general_drop:g}")
    best = max(candidates, key=lambda c: (c.dev_task - max(0.0, base_dev_general - c.dev_general), -c.alpha))
    return best, (f"no candidate kept dev general >= base {base_dev_general:.3f} - {max_general_drop:g}: "
                  f"highest dev task - general drop ({best.dev_task:.3f} - "
                  f"{max(0.0, base_dev_general - best.dev_general):.3f})")


def load_weights(model, state: dict[str, torch.Tensor]) -> None:
    """Load a saved state into model. A checkpoint stores tied weights once (lm_head = embeddings), so a
    missing key is fine only when it shares its storage with a loaded one."""
    missing, unexpected = model.load_state_dict(state, strict=False)
    params = dict(model.named_parameters(remove_duplicate=False))
    loaded = {params[k].data_ptr() for k in state if k in params}
    untied = [k for k in missing if k not in params or params[k].data_ptr() not in loaded]
    if unexpected or untied:
        raise UserError(f"checkpoint weights do not fit the base model (missing {untied[:3]}, unexpected {unexpected[:3]})")


def checkpoints(ckpt_dir: Path) -> list[Path]:
    """Complete checkpoints, oldest first."""
    found = [p for p in ckpt_dir.glob("checkpoint-*") if p.name.split("-")[-1].isdigit()
             and (p / "trainer_state.json").is_file()]
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
    JSONL, see evaluate.load_task_suite: the user's own general checks) when given, else the lab's general
    skills' dev split."""
    from distillab.evaluate import load_task_suite, suites

    task, general = suites(cfg)
    examples: list[dict] = []
    dev_path = cfg.run_dir / "data" / "dev.parquet"
    if cfg.data.prompts_file and dev_path.is_file():
        import pyarrow.parquet as pq

        names = pq.read_schema(dev_path).names
        rows = pq.read_table(dev_path, columns=[c for c in ("prompt", "messages", "completion") if c in names]).to_pylist()
        # a conversation is asked as a conversation (each candidate's own chat template renders it)
        examples += [{"prompt": r["prompt"], "answer": r["completion"], "scorer": "word_f1", "skill": "dev:task",
                      **({"messages": json.loads(r["messages"])} if r.get("messages") else {})} for r in rows]
    if cfg.retain.general_dev_file:
        general = []
        examples += [ex | {"skill": f"dev:general:{ex['skill']}"} for ex in load_task_suite(cfg.retain.general_dev_file)]
    return task, general, examples


def dev_scores(model, tok, cfg: RunConfig) -> tuple[float | None, float | None]:
    """(task, general) on the dev split: the only scores selection ever sees."""
    from distillab.evaluate import score_model, suite_result

    task, general, examples = dev_suites(cfg)
    per_skill = score_model(model, tok, task + general, cfg.retain.dev_n_per_skill, cfg.teacher.max_new_tokens,
                            split="dev", task_examples=examples or None)
    task_names = task + [s for s in per_skill if s == "dev:task"]
    general_names = general + [s for s in per_skill if s.startswith("dev:general:")]
    return (suite_result({s: per_skill[s] for s in task_names}, 0)["score"],
            suite_result({s: per_skill[s] for s in general_names}, 0)["score"])


def choose_student(cfg: RunConfig, log=print) -> dict | None:
    """Score every candidate on dev, apply the rule, write the chosen one as run_dir/student.
    Returns the selection record (also run_dir/retain.json); None when the run does not select."""
    r, run_dir = cfg.retain, cfg.run_dir
    if not r.selects:
        return None
    found = checkpoints(run_dir / "checkpoints")
    if not found:
        raise UserError(f"no complete checkpoint in {run_dir / 'checkpoints'} to choose from: run `distillab train`")
    sources = found if r.select_checkpoints else found[-1:]
    alphas = sorted(set(r.merge_alphas) | {1.0})
    record_path = run_dir / "retain.json"
    stamp = fingerprint("select", r.model_dump(), cfg.eval.general, [str(p.name) for p in sources],
                        *[f for p in sources for f in sorted(p.glob("*.safetensors"))])
    # student/retain.json marks the chosen weights: a retrained student/ (the last step's) has none
    if is_fresh(run_dir, "select", stamp) and record_path.is_file() and (run_dir / "student" / "retain.json").is_file():
        return json.loads(record_path.read_text())
    began = time.time()
    base_model, tok = models.load(cfg.train.student)
    base_state = {k: v.detach().clone() for k, v in base_model.state_dict().items()}
    base_task, base_general = dev_scores(base_model, tok, cfg)
    log(f"retain: base on dev: task {base_task:.3f}, general {base_general:.3f}")
    candidates, model = [], copy.deepcopy(base_model)  # the one the candidates' weights are loaded into
    for path in sources:
        tuned = checkpoint_state(path, base_model)
        step = int(path.name.split("-")[-1])
        for alpha in alphas:
            load_weights(model, interpolate(base_state, tuned, alpha))
            c = Candidate(path.name, step, alpha)
            c.dev_task, c.dev_general = dev_scores(model, tok, cfg)
            log(f"retain: {c.label}: dev task {c.dev_task:.3f}, general {c.dev_general:.3f}")
            candidates.append(c)
    chosen, why = select(candidates, base_general, r.max_general_drop)
    load_weights(model, interpolate(base_state, checkpoint_state(run_dir / "checkpoints" / chosen.checkpoint,
                                                                  base_model), chosen.alpha))
    record = {
        "rule": why, "max_general_drop": r.max_general_drop, "split": "dev",
        "base_dev": {"task": base_task, "general": base_general},
        "chosen": asdict(chosen) | {"label": chosen.label},
        "candidates": [asdict(c) | {"label": c.label} for c in candidates],
        "recipe": recipe(cfg, chosen),
        "selection_seconds": round(time.time() - began, 2),
    }
    _write_student(model, run_dir / "student", record)
    write_atomic(record_path, json.dumps(record, indent=1))
    mark_fresh(run_dir, "select", stamp)
    log(f"retain: chose {chosen.label} ({why})")
    return record


def recipe(cfg: RunConfig, chosen: Candidate | None = None) -> dict:
    """What retain did, in the words of the config: the summary's `retain_recipe`."""
    r = cfg.retain
    out = {"replay_source": r.replay_source if r.replay_fraction > 0 else None,
           "replay_fraction": r.replay_fraction, "merge_alphas": r.merge_alphas,
           "select_checkpoints": r.select_checkpoints, "max_general_drop": r.max_general_drop,
           "lora": cfg.train.lora, "lr": cfg.train.lr}
    if chosen is not None:
        out |= {"alpha": chosen.alpha, "checkpoint": chosen.checkpoint, "step": chosen.step}
    return out


def _write_student(model, student_dir: Path, record: dict) -> None:
    """The chosen weights into student/, keeping its tokenizer, summaries and model card (temp + rename)."""
    tmp = student_dir.with_name(student_dir.name + ".select.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    # the trained weights (and a LoRA adapter, which is not the chosen merge) are replaced by the chosen ones
    shutil.copytree(student_dir, tmp, ignore=shutil.ignore_patterns("*.safetensors", "*.safetensors.index.json",
                                                                     "adapter"))
    model.save_pretrained(str(tmp), safe_serialization=True)
    write_atomic(tmp / "retain.json", json.dumps(record, indent=1))
    old = student_dir.with_name(student_dir.name + ".old.tmp")
    shutil.rmtree(old, ignore_errors=True)
    student_dir.rename(old)
    tmp.rename(student_dir)
    shutil.rmtree(old, ignore_errors=True)
