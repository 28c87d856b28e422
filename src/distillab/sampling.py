"""Batched generation from a local HF causal LM (KV cache through `model.generate`), with top-k logprobs.

Used by the local teacher backend, by evaluation and by `serve`: one place that turns prompts into
completions, so all three see the same tokens.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from distillab.topk_codec import tail_logprob_outside


@dataclass
class Generation:
    text: str
    token_ids: list[int]  # completion tokens, ending with the end-of-sequence token when it stopped
    prompt_tokens: int
    finish_reason: str  # "stop" (end-of-sequence) or "length"
    top_ids: list[list[int]] = field(default_factory=list)  # per completion token: k token ids
    top_logprobs: list[list[float]] = field(default_factory=list)  # per completion token: their logprobs
    top_tail: list[float] = field(default_factory=list)  # per completion token: log of the mass outside the top-k
    token_logprobs: list[float] = field(default_factory=list)  # logprob of each sampled token


def encode_example(tokenizer, prompt: str, completion: str) -> tuple[list[int], list[int]]:
    """(prompt ids with <bos>, completion ids ending with end-of-sequence): how every stage tokenizes a pair."""
    prompt_ids = tokenizer(prompt)["input_ids"]
    completion_ids = tokenizer(completion, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    return prompt_ids, completion_ids


@torch.no_grad()
def generate(
    model,
    tokenizer,
    prompts: list[str],
    *,
    max_new_tokens: int = 64,
    temperature: float = 0.0,
    top_p: float = 1.0,
    top_k_logprobs: int = 0,
    batch_size: int = 64,
    seed: int = 0,
) -> list[Generation]:
    """Complete each prompt. Greedy when temperature == 0. Logprobs are of the untempered distribution."""
    model.eval()
    device = next(model.parameters()).device
    tokenizer.padding_side = "left"
    encoded = [tokenizer(p)["input_ids"] for p in prompts]
    # Longest first, so batches hold similar lengths and the first batch shows the peak memory.
    order = sorted(range(len(prompts)), key=lambda i: -len(encoded[i]))
    results: list[Generation | None] = [None] * len(prompts)
    torch.manual_seed(seed)
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        batch = tokenizer.pad({"input_ids": [encoded[i] for i in idx]}, return_tensors="pt").to(device)
        sampling = (
            dict(do_sample=True, temperature=temperature, top_p=top_p) if temperature > 0 else dict(do_sample=False)
        )
        out = model.generate(
            **batch,
            max_new_tokens=max_new_tokens,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
            return_dict_in_generate=True,
            output_logits=True,
            top_k=None,
            **sampling,
        )
        new_tokens = out.sequences[:, batch["input_ids"].shape[1] :]  # (B, steps)
        logprobs = torch.stack(out.logits, dim=1).float().log_softmax(-1)  # (B, steps, V)
        chosen_lp = logprobs.gather(-1, new_tokens.unsqueeze(-1)).squeeze(-1)  # (B, steps)
        if top_k_logprobs:
            top_lp, top_id = logprobs.topk(top_k_logprobs, dim=-1)  # (B, steps, k)
            # from the full distribution, not 1 - sum(top-k): a 1e-6 tail stays precise (topk_codec's docstring)
            tail = tail_logprob_outside(logprobs, top_id)  # (B, steps)
        for row, i in enumerate(idx):
            ids = new_tokens[row].tolist()
            stopped = tokenizer.eos_token_id in ids
            text_len = ids.index(tokenizer.eos_token_id) if stopped else len(ids)
            n = text_len + 1 if stopped else text_len  # keep the end-of-sequence step: students learn to stop
            results[i] = Generation(
                text=tokenizer.decode(ids[:text_len], skip_special_tokens=True),
                token_ids=ids[:n],
                prompt_tokens=len(encoded[i]),
                finish_reason="stop" if stopped else "length",
                top_ids=top_id[row, :n].tolist() if top_k_logprobs else [],
                top_logprobs=top_lp[row, :n].tolist() if top_k_logprobs else [],
                top_tail=tail[row, :n].tolist() if top_k_logprobs else [],
                token_logprobs=chosen_lp[row, :n].tolist(),
            )
    return results  # type: ignore[return-value]
