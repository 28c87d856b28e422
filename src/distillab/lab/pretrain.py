"""Pretrain the lab's shipped checkpoints: a teacher that knows the whole world and a weaker base student.

`distillab lab pretrain` runs this. Both are ordinary HF Llama models with the lab tokenizer, saved as
safetensors under distillab/lab/checkpoints/<name>/. The loop is deliberately plain (not the distillation
trainer): it is a one-off project script, and it must stay reproducible for a fixed number of steps.
Loss is on answer tokens only: prompts are random strings, predicting them teaches nothing.
"""

from __future__ import annotations

import json
import math
import random
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from distillab.batching import collate
from distillab.files import atomic_dir
from distillab.lab.tokenizer import CHAT_TEMPLATE, build_tokenizer
from distillab.lab.world import ALL_SKILLS, SIGNAL_SKILLS, SKILLS
from distillab.sampling import encode_example


@dataclass
class PretrainSpec:
    """One phase of pretraining (its own AdamW, warmup and cosine schedule); `then` is the next phase."""

    hidden: int
    layers: int
    heads: int
    steps: int
    lr: float
    batch: int = 64
    warmup: int = 200
    seed: int = 0
    skill_weights: dict[str, float] | None = None  # default: uniform, knowledge skills doubled, signal skills 0
    then: PretrainSpec | None = None
    init: str | None = None  # a shipped checkpoint to continue from (its architecture wins): None, from scratch


# The teacher's second phase spends its steps where the first left it weakest (arithmetic, counting,
# recall in unseen phrasings) at a lower learning rate, still drawing every skill so none is forgotten.
TEACHER_PHASE_2 = PretrainSpec(
    hidden=192,
    layers=6,
    heads=6,
    steps=3000,
    lr=4e-4,
    warmup=100,
    seed=1,
    skill_weights={"add": 5.0, "sub": 5.0, "count": 3.0, "recall": 4.0, "sort": 2.0},
)
PRESETS = {
    # ~2.7M parameters: the teacher that knows the whole world.
    "teacher": PretrainSpec(hidden=192, layers=6, heads=6, steps=8000, lr=1e-3, then=TEACHER_PHASE_2),
    # ~0.8M parameters, a sixth of the teacher's steps: a small open model that never saw the knowledge base.
    "base": PretrainSpec(
        hidden=128, layers=4, heads=4, steps=2000, lr=2e-3, skill_weights={"recall": 0.0, "describe": 0.0}
    ),
    # The shipped teacher, taught the signal skills on their teacher region only (world.SIGNAL_SKILLS): habits as
    # draws from each entity's distribution, column addition with its trace; the classic skills are replayed so
    # none is forgotten. `distillab demo --signal` distils from it.
    "signal-teacher": PretrainSpec(
        hidden=192,
        layers=6,
        heads=6,
        steps=1500,
        lr=5e-4,
        warmup=100,
        seed=2,
        skill_weights={"habit": 3.0, "carry": 4.0},
        init="teacher",
    ),
}
CHECKPOINTS = Path(__file__).parent / "checkpoints"


def llama_config(spec: PretrainSpec, tokenizer) -> LlamaConfig:
    return LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=spec.hidden,
        intermediate_size=int(spec.hidden * 2.75) // 8 * 8,
        num_hidden_layers=spec.layers,
        num_attention_heads=spec.heads,
        num_key_value_heads=spec.heads,
        max_position_embeddings=256,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=True,
    )


def skill_weights(spec: PretrainSpec) -> dict[str, float]:
    weights = {name: 2.0 if skill.family == "knowledge" else 1.0 for name, skill in SKILLS.items()}
    weights.update({name: 0.0 for name in SIGNAL_SKILLS})
    weights.update(spec.skill_weights or {})
    return weights


def training_pool(tokenizer, spec: PretrainSpec, per_skill: int = 20000) -> list[list[tuple[list[int], list[int]]]]:
    pools = []
    for name, weight in skill_weights(spec).items():
        if weight > 0:
            split = "teacher" if name in SIGNAL_SKILLS else "train"  # signal skills keep the student's half unseen
            ids = [
                encode_example(tokenizer, ex.prompt, ex.completion)
                for ex in ALL_SKILLS[name].examples(split, per_skill, seed=spec.seed)
            ]
            pools.append((weight, ids))
    return pools


def quick_eval(model, tokenizer, n: int = 40, skills=SKILLS) -> dict[str, float]:
    from distillab.reasoning import final_answer
    from distillab.sampling import generate

    scores = {}
    for name in skills:
        skill = ALL_SKILLS[name]
        exs = skill.examples("test", n)
        outs = generate(model, tokenizer, [e.prompt for e in exs], max_new_tokens=96)
        scores[name] = sum(skill.score(final_answer(o.text), e.answer) for o, e in zip(outs, exs)) / len(exs)
    return scores


def pretrain(
    name: str,
    out_dir: Path,
    steps: int | None = None,
    eval_every: int = 1000,
    log=print,
    from_phase: int = 0,
    tokenizer=None,
) -> dict:
    """Train preset `name` phase by phase into out_dir (re-saved at every evaluation).

    steps overrides the first phase's step count. from_phase > 0 starts from the checkpoint already in out_dir
    (the output of the earlier phases), as a run that stopped between phases would. tokenizer: another than the
    lab's character-level one (benchmarks/bench_cross_tokenizer.py pretrains a BPE student).
    """
    phases, spec = [], PRESETS[name]
    while spec is not None:
        phases.append(replace(spec, then=None))
        spec = spec.then
    if steps is not None:
        phases[0].steps = steps
    tokenizer = tokenizer or build_tokenizer()
    torch.manual_seed(phases[0].seed)
    model = LlamaForCausalLM(llama_config(phases[0], tokenizer))
    history: list[dict] = []
    if phases[0].init:  # the checkpoint beside out_dir when there is one (`lab pretrain all --out`), else shipped
        beside = out_dir.parent / phases[0].init
        init = beside if (beside / "model.safetensors").is_file() else CHECKPOINTS / phases[0].init
        model = LlamaForCausalLM.from_pretrained(str(init), use_safetensors=True)
    if from_phase:
        model = LlamaForCausalLM.from_pretrained(str(out_dir), use_safetensors=True)
        history = json.loads((out_dir / "pretrain.json").read_text())["history"]
    n_params = sum(p.numel() for p in model.parameters())
    started = time.time()
    for index, phase in enumerate(phases):
        if index < from_phase:
            continue
        log(f"[{name}] phase {index + 1}/{len(phases)}: {n_params / 1e6:.2f}M parameters, {phase.steps} steps")
        _train_phase(name, model, tokenizer, phase, index, out_dir, phases, n_params, history, eval_every, started, log)
    return history[-1]


def _train_phase(
    name,
    model,
    tokenizer,
    spec: PretrainSpec,
    index: int,
    out_dir: Path,
    phases,
    n_params,
    history: list[dict],
    eval_every: int,
    started: float,
    log,
) -> None:
    torch.manual_seed(spec.seed)
    rng = random.Random(spec.seed)
    pools = training_pool(tokenizer, spec)
    weights = [w for w, _ in pools]
    opt = torch.optim.AdamW(model.parameters(), lr=spec.lr, betas=(0.9, 0.98), weight_decay=0.01)
    done_before = sum(p.steps for p in phases[:index])

    def lr_at(step: int) -> float:  # linear warmup, cosine down to 10%
        if step < spec.warmup:
            return spec.lr * (step + 1) / spec.warmup
        progress = (step - spec.warmup) / max(1, spec.steps - spec.warmup)
        return spec.lr * (0.1 + 0.45 * (1 + math.cos(math.pi * progress)))

    queue: list = []
    for step in range(spec.steps):
        model.train()
        if not queue:  # length-grouped batches: padding a 20-token example to 70 would triple the cost
            picks = rng.choices(range(len(pools)), weights=weights, k=spec.batch * 16)
            drawn = sorted((rng.choice(pools[i][1]) for i in picks), key=lambda pc: len(pc[0]) + len(pc[1]))
            queue = [drawn[i : i + spec.batch] for i in range(0, len(drawn), spec.batch)]
            rng.shuffle(queue)
        batch = collate([{"prompt_ids": p, "completion_ids": c} for p, c in queue.pop()], tokenizer.pad_token_id)
        batch.pop("prompt_len")
        for group in opt.param_groups:
            group["lr"] = lr_at(step)
        loss = model(**batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if step % 100 == 0:
            log(f"[{name}] step {done_before + step} loss {loss.item():.4f} {time.time() - started:.0f}s")
        if (step + 1) % eval_every == 0 or step + 1 == spec.steps:
            trained = [name for name, weight in skill_weights(spec).items() if weight > 0 or name in SKILLS]
            scores = quick_eval(model, tokenizer, skills=trained)
            mean = sum(scores.values()) / len(scores)
            history.append({"step": done_before + step + 1, "phase": index + 1, "mean": mean, **scores})
            log(
                f"[{name}] eval step {done_before + step + 1} mean {mean:.3f} "
                + " ".join(f"{k}={v:.2f}" for k, v in scores.items())
            )
            _save(model, tokenizer, out_dir, phases, n_params, history, time.time() - started)


def _save(model, tokenizer, out_dir: Path, phases, n_params, history, seconds) -> None:
    tokenizer.chat_template = tokenizer.chat_template or CHAT_TEMPLATE  # chat data on the lab: its last user turn
    with atomic_dir(out_dir) as tmp:
        model.save_pretrained(str(tmp), safe_serialization=True)
        tokenizer.save_pretrained(str(tmp))
        (tmp / "pretrain.json").write_text(
            json.dumps(
                {
                    "phases": [asdict(p) for p in phases],
                    "parameters": n_params,
                    "seconds": round(seconds),
                    "history": history,
                },
                indent=1,
            )
        )
