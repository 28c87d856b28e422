"""The general prompts retain's replay answers, by the first source that exists (retain.general_prompt_source):
`retain.general_prompts_file`, the lab's general skills' train split (lab runs), or prompts the base model writes
itself (Magpie-style: sampled from the empty prompt, or from its chat template's user prefix), so replay works
with zero outside data. Writing them is a stage of its own (SampledPrompts, run by distillab.generate before the
replay set): a rerun reads the same set back.
"""

from __future__ import annotations

import json
import random
import time
from dataclasses import dataclass
from pathlib import Path

from distillab import models, retain
from distillab.config import RunConfig
from distillab.files import fingerprint, read_json, write_atomic
from distillab.prompts import read_jsonl_prompts
from distillab.rundir import RunDir
from distillab.stage import StageContext


def general_prompts(cfg: RunConfig, run: RunDir) -> list[dict]:
    """[{prompt, answer, skill}] the replay set is built from, by the first source that exists
    (retain.general_prompt_source): the general prompts file, the lab's general skills, the base model's own."""
    r = cfg.retain
    source = retain.general_prompt_source(cfg)
    if source == "file":
        return read_jsonl_prompts(Path(r.general_prompts_file))[: r.n_general_prompts]
    if source == "lab":
        from distillab.lab.world import get_skill

        general = retain.lab_general_skills(cfg)
        per_skill = -(-r.n_general_prompts // len(general))
        rows = [
            {"prompt": e.prompt, "answer": e.answer, "skill": s}
            for s in general
            for e in get_skill(s).examples("train", per_skill, seed=cfg.data.seed + 1)
        ]
        return random.Random(cfg.data.seed).sample(rows, min(len(rows), r.n_general_prompts))
    return SampledPrompts().load(cfg, run).prompts


@dataclass
class PromptSet:
    prompts: list[dict]
    seconds: float  # what writing them took (the ledger's retain cost)
    skipped: bool = False


class SampledPrompts:
    """data/sampled_prompts.json: general prompts the base model writes itself (Magpie), for replay with no prompts
    file and no lab general skills: sampled after its chat template's user prefix, or after <bos> when it has no
    template, cut where the prompt ends (the template's end of turn, or a newline). The same for every shard."""

    name = "sampled_prompts"

    def fingerprint(self, cfg: RunConfig, run: RunDir) -> str:
        return fingerprint("sampled_prompts", cfg.train.student, cfg.retain.n_general_prompts, cfg.data.seed)

    def outputs(self, cfg: RunConfig, run: RunDir) -> list[Path]:
        return [run.sampled_prompts]

    def run(self, cfg: RunConfig, run: RunDir, ctx: StageContext) -> PromptSet:
        import torch

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
        ctx.log(f"retain: the base model wrote {len(prompts)} general prompts in {time.time() - began:.0f}s")
        seconds = round(time.time() - began, 2)
        write_atomic(run.sampled_prompts, json.dumps({"seconds": seconds, "prompts": prompts}))
        return PromptSet(prompts=prompts, seconds=seconds)

    def load(self, cfg: RunConfig, run: RunDir) -> PromptSet:
        saved = read_json(run.sampled_prompts)
        return PromptSet(prompts=saved["prompts"], seconds=saved["seconds"])


def user_turn_frame(tok) -> tuple[str, str | None]:
    """(text before a user message, text that ends it) from the chat template; ("", None) without one."""
    if not getattr(tok, "chat_template", None):
        return "", None
    marker = "\x00USER\x00"
    rendered = tok.apply_chat_template([{"role": "user", "content": marker}], tokenize=False)
    before, after = rendered.split(marker, 1)
    return before, (after.strip().splitlines() or [None])[0] or None


def sample_texts(model, tok, prefix: str, n: int, generator, max_new_tokens: int = 48) -> list[str]:
    """n samples (temperature 1) continuing `prefix` (after <bos>), decoded without special tokens."""
    import torch

    model.eval()
    ids = (
        tok(prefix)["input_ids"] if prefix else [tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id]
    )
    device = next(model.parameters()).device
    torch.manual_seed(int(torch.randint(0, 2**31 - 1, (1,), generator=generator)))
    with torch.no_grad():
        out = model.generate(
            input_ids=torch.tensor([ids] * n, device=device),
            do_sample=True,
            temperature=1.0,
            top_k=None,
            max_new_tokens=max_new_tokens,
            pad_token_id=tok.pad_token_id,
            eos_token_id=tok.eos_token_id,
        )
    return [tok.decode(row[len(ids) :], skip_special_tokens=True) for row in out.tolist()]
