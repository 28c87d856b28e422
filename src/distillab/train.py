"""Stage 2, train: the student learns from the teacher's data on `transformers.Trainer`.

Off-policy: each example is prompt + the teacher's completion; the loss on completion tokens is
  sft_weight * cross-entropy(teacher text) + kd_weight * divergence(student || teacher top-k logprobs).
On-policy (GKD's λ = on_policy_fraction): on that share of steps the student samples its own completions
for the batch's prompts and a local teacher scores every sampled token (dense logits).
Both terms are *sums over tokens divided by the token count of the whole gradient-accumulation window*
(`num_items_in_batch`), so 4 micro-batches of 1 give the gradients of 1 batch of 4.

One subclass of Trainer (compute_loss only): DDP/FSDP/DeepSpeed through accelerate keep working.
"""

from __future__ import annotations

import json
import math
import os
import random
import shutil
import time
from pathlib import Path

import torch
from transformers import PrinterCallback, Trainer, TrainerCallback, TrainingArguments

from distillab import losses, models, retain
from distillab.config import RunConfig, write_atomic
from distillab.dataset import DistillDataset, collate, read_dataset
from distillab.errors import UserError
from distillab.rundir import fingerprint, is_fresh, mark_fresh

# ----------------------------------------------------------------------------------------------------
# The loss: one compute_loss, summed over tokens and divided by the window's token count.


class DistillTrainer(Trainer):
    loss_is_scaled_for_ga = True  # compute_loss divides by the whole window's token count itself

    def __init__(self, *args, distill: "DistillSettings", **kwargs):
        super().__init__(*args, **kwargs)
        self.distill = distill

    def _get_train_sampler(self, *args, **kwargs):
        if getattr(self.train_dataset, "layout", None) is not None:  # the order is the batch composition: keep it
            return torch.utils.data.SequentialSampler(self.train_dataset)
        return super()._get_train_sampler(*args, **kwargs)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        inputs = dict(inputs)
        prompt_len = inputs.pop("prompt_len")
        d = self.distill
        on_policy = d.teacher_model is not None and d.rng.random() < d.on_policy_fraction
        if on_policy:
            inputs = on_policy_batch(model, d.teacher_model, inputs, prompt_len, d)
        labels = inputs.pop("labels")
        top_ids, top_lp, kd_mask = inputs.pop("top_ids", None), inputs.pop("top_logprobs", None), inputs.pop("kd_mask", None)
        top_tail = inputs.pop("top_tail", None)
        teacher_logits = inputs.pop("teacher_logits", None)
        row_weight = inputs.pop("row_weight", None)  # (B,) retain replay rows weigh more: see replay_weight
        pred_mask = torch.zeros_like(labels, dtype=torch.bool)  # (B, T) index t predicts labels[t+1]
        pred_mask[:, :-1] = labels[:, 1:] != -100
        targets = torch.zeros_like(labels)
        targets[:, :-1] = labels[:, 1:].clamp(min=0)
        n_tokens = num_items_in_batch if num_items_in_batch is not None else pred_mask.sum()
        if on_policy:  # the window's count was of the teacher's completions; these are the student's own
            n_tokens = pred_mask.sum().clamp(min=1) * self.current_gradient_accumulation_steps

        teacher, kd_positions = None, torch.zeros_like(pred_mask)
        if d.kd_weight and teacher_logits is not None:
            teacher, kd_positions = losses.TeacherDist(logits=teacher_logits), pred_mask
        elif d.kd_weight and top_ids is not None:
            teacher, kd_positions = losses.TeacherDist(ids=top_ids, logprobs=top_lp, tail_logprob=top_tail), kd_mask
        # Tokens with no teacher distribution (a replay dataset's answers, a teacher whose top-k could not be
        # kept) stand in for KD with cross-entropy on their text, at the KD weight.
        ce_terms = [(d.sft_weight, pred_mask), (d.kd_weight, pred_mask & ~kd_positions.bool())]  # (weight, (B, T))
        kd_terms = [(d.kd_weight, kd_positions.bool())] if teacher is not None else []
        if row_weight is not None:  # split each term by row weight: a weighted sum over tokens, same divisor
            groups = [(float(w), (row_weight == w)[:, None]) for w in row_weight.unique()]
            ce_terms = [(w * g, m & rows) for w, m in ce_terms for g, rows in groups]
            kd_terms = [(w * g, m & rows) for w, m in kd_terms for g, rows in groups]
        ce_terms = [(w, m) for w, m in ce_terms if w and m.any()]
        kd_terms = [(w, m) for w, m in kd_terms if w and m.any()]
        total = 0.0
        if d.chunk_size:  # never materialise (B, T, V): losses straight from hidden states, a chunk at a time
            hidden, weight = hidden_states(model, inputs), lm_head_weight(model)  # (B, T, H), (V, H)
            for w, mask in ce_terms:
                total = total + w * losses.chunked_kd_loss("ce", hidden, weight, targets, mask, chunk_size=d.chunk_size,
                                                           reduction="sum")[0]
            for w, mask in kd_terms:
                total = total + w * losses.chunked_kd_loss(
                    d.loss, hidden, weight, teacher, mask, chunk_size=d.chunk_size,
                    temperature=d.temperature, beta=d.beta, alpha=d.alpha, reduction="sum")[0]
        else:
            logits = model(**inputs).logits  # (B, T, V)
            for w, mask in ce_terms:
                total = total + w * losses.ce(logits, targets, mask, reduction="sum")[0]
            for w, mask in kd_terms:
                total = total + w * losses.kd_loss(
                    d.loss, logits, teacher, mask, temperature=d.temperature, beta=d.beta, alpha=d.alpha,
                    reduction="sum")[0]
        loss = total / n_tokens
        if self.args.average_tokens_across_devices and self.accelerator.num_processes > 1:
            loss = loss * self.accelerator.num_processes  # DDP averages gradients; n_tokens is the global count
        return loss


class DistillSettings:
    """What compute_loss needs beyond the batch: the loss choice and, for on-policy steps, the teacher."""

    def __init__(self, cfg: RunConfig, teacher_model=None, pad_id: int = 0, eos_id: int = 0):
        t = cfg.train
        self.loss, self.temperature, self.beta, self.alpha = t.loss, t.kd_temperature, t.beta, t.alpha
        self.sft_weight = t.sft_weight if t.loss != "ce" else max(t.sft_weight, 1.0)
        self.kd_weight = t.kd_weight if t.loss != "ce" else 0.0
        self.on_policy_fraction, self.chunk_size = t.on_policy_fraction, t.chunk_size
        self.teacher_model, self.pad_id, self.eos_id = teacher_model, pad_id, eos_id
        self.max_new_tokens = cfg.teacher.max_new_tokens
        self.rng = random.Random(t.seed)


def hidden_states(model, inputs) -> torch.Tensor:
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return base.model(**inputs).last_hidden_state


def lm_head_weight(model) -> torch.Tensor:
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return base.lm_head.weight


@torch.no_grad()
def _sample(model, prompts: torch.Tensor, prompt_mask: torch.Tensor, d: DistillSettings) -> torch.Tensor:
    was_training = model.training
    model.eval()
    out = model.generate(input_ids=prompts, attention_mask=prompt_mask, do_sample=True, temperature=1.0, top_k=None,
                         max_new_tokens=d.max_new_tokens, pad_token_id=d.pad_id, eos_token_id=d.eos_id)
    model.train(was_training)
    return out[:, prompts.shape[1] :]  # (B, new)


def on_policy_batch(model, teacher, inputs: dict, prompt_len: torch.Tensor, d: DistillSettings) -> dict:
    """Replace the teacher's completions by the student's own samples, scored by the teacher (dense logits)."""
    batch = prompt_len.shape[0]
    width = int(prompt_len.max())
    prompts = torch.full((batch, width), d.pad_id, dtype=torch.long)  # left-padded for generation
    prompt_mask = torch.zeros((batch, width), dtype=torch.long)
    for b in range(batch):
        n = int(prompt_len[b])
        prompts[b, width - n :] = inputs["input_ids"][b, :n]
        prompt_mask[b, width - n :] = 1
    sampled = _sample(model, prompts.to(inputs["input_ids"].device), prompt_mask.to(prompts.device), d)
    # Completion = samples up to and including the first end-of-sequence token.
    rows = []
    for b in range(batch):
        ids = sampled[b].tolist()
        ids = ids[: ids.index(d.eos_id) + 1] if d.eos_id in ids else ids
        ids = [i for i in ids if i != d.pad_id] or [d.eos_id]
        rows.append({"prompt_ids": inputs["input_ids"][b, : int(prompt_len[b])].tolist(), "completion_ids": ids})
    new = collate(rows, d.pad_id)
    new.pop("prompt_len")
    device = inputs["input_ids"].device
    new = {k: v.to(device) for k, v in new.items()}
    with torch.no_grad():
        teacher_logits = teacher(input_ids=new["input_ids"], attention_mask=new["attention_mask"]).logits  # (B, T, V_t)
    new["teacher_logits"] = teacher_logits
    return new


# ----------------------------------------------------------------------------------------------------
# The stage.


class _Timing(TrainerCallback):
    """Wall time of the training loop, and progress(step, max_steps, loss) for a progress bar."""

    def __init__(self, progress=None):
        self.seconds = 0.0
        self._began = None
        self.progress = progress

    def on_log(self, args, state, control, logs=None, **kw):
        if self.progress and logs and "loss" in logs:
            self.progress(state.global_step, state.max_steps, float(logs["loss"]))

    def on_train_begin(self, args, state, control, **kw):
        self._began = time.time()

    def on_train_end(self, args, state, control, **kw):
        self.seconds = time.time() - self._began


def check_tokenizers(student_tok, teacher_name: str) -> None:
    teacher_tok = models.load_tokenizer(teacher_name)
    if teacher_tok.get_vocab() != student_tok.get_vocab():
        raise UserError(f"teacher {teacher_name!r} and student {student_tok.name_or_path!r} use different tokenizers "
                        f"({len(teacher_tok)} vs {len(student_tok)} tokens): logit distillation needs a shared one")


def run_train(cfg: RunConfig, log=print, stop_after_steps: int | None = None, progress=None) -> dict:
    """Train the student into run_dir/student. Returns the training summary (also written to student/)."""
    run_dir, t = cfg.run_dir, cfg.train
    data_path = run_dir / "data" / "train.parquet"
    rows = read_dataset(data_path)
    if not rows:
        raise UserError(f"dataset {data_path} has no rows")
    replay_path = run_dir / "data" / "replay.parquet"
    replay = read_dataset(replay_path) if cfg.retain.replay_fraction > 0 else None
    if replay is not None and not replay:
        raise UserError(f"replay set {replay_path} has no rows")
    stamp = fingerprint("train", t.model_dump(), data_path,
                        *([cfg.retain.replay_fraction, cfg.retain.select_checkpoints, replay_path] if replay else []),
                        *(["select_checkpoints"] if cfg.retain.select_checkpoints else []))
    student_dir = run_dir / "student"
    if is_fresh(run_dir, "train", stamp) and (student_dir / "config.json").is_file():
        return json.loads((student_dir / "train_summary.json").read_text()) | {"skipped": True}

    torch.manual_seed(t.seed)
    model, tok = models.load(t.student)
    uses_teacher_logprobs = any(r.get("top_ids") for r in rows) and t.kd_weight > 0 and t.loss != "ce"
    teacher_model = None
    if uses_teacher_logprobs or t.on_policy_fraction > 0:
        if not cfg.teacher.base_url and rows[0].get("source") == "teacher":
            check_tokenizers(tok, cfg.teacher.model)
    if t.on_policy_fraction > 0:
        if cfg.teacher.base_url:
            raise UserError("on-policy distillation needs a local teacher (teacher.base_url must be unset)")
        teacher_model = models.load_model(cfg.teacher.model).eval()
    if t.lora:
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=t.lora_r, lora_alpha=t.lora_alpha, target_modules="all-linear",
                                                 task_type="CAUSAL_LM"))
    ckpt_dir = run_dir / "checkpoints"
    timing = _Timing(progress)
    callbacks = [timing] + ([_StopAfter(stop_after_steps)] if stop_after_steps else [])
    trainer = build_trainer(cfg, rows, model, tok, ckpt_dir, teacher_model, callbacks, replay=replay)
    resume = any(ckpt_dir.glob("checkpoint-*"))
    if resume:
        log(f"train: resuming from {max(ckpt_dir.glob('checkpoint-*'), key=lambda p: int(p.name.split('-')[1])).name}")
    result = trainer.train(resume_from_checkpoint=True if resume else None)
    if stop_after_steps and trainer.state.global_step < (trainer.state.max_steps or 0):
        return {"interrupted_at": trainer.state.global_step}
    losses_seen = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    n_tokens = sum(len(r["completion_ids"]) for r in rows)
    seen = trainer.train_dataset.layout_rows() if replay else rows
    summary = {
        "student": t.student, "loss": t.loss, "kd_weight": t.kd_weight, "sft_weight": t.sft_weight,
        "on_policy_fraction": t.on_policy_fraction, "lora": t.lora, "steps": trainer.state.global_step,
        "train_seconds": round(timing.seconds, 2), "examples": len(rows), "completion_tokens": n_tokens,
        "epochs": round(float(trainer.state.epoch or 0), 3), "final_loss": losses_seen[-1] if losses_seen else None,
        "flops": train_flops(model, n_tokens_seen(trainer, seen)), "loss_history": trainer.state.log_history,
        "train_loss": result.training_loss,
    }
    if replay:
        summary["replay"] = {"fraction": cfg.retain.replay_fraction, "source": cfg.retain.replay_source,
                             "rows": len(replay), "per_batch": retain.replay_per_batch(t.batch_size, cfg.retain.replay_fraction)}
    if trainer.is_world_process_zero():  # under torchrun/accelerate every process gets here; one writes
        _save_student(trainer.model, tok, student_dir, summary, cfg)
        mark_fresh(run_dir, "train", stamp)
    return summary


def build_trainer(cfg: RunConfig, rows: list[dict], model, tok, output_dir: Path, teacher_model=None,
                  callbacks=(), optimizers=(None, None), replay: list[dict] | None = None) -> DistillTrainer:
    t = cfg.train
    dataset = DistillDataset(rows, model.config.vocab_size)
    epochs = t.epochs
    if replay:  # a fixed order that puts the replay share in every batch, long enough for the whole run
        per_batch = t.batch_size - retain.replay_per_batch(t.batch_size, cfg.retain.replay_fraction)
        world = int(os.environ.get("WORLD_SIZE", "1"))
        n_batches = (t.max_steps * t.grad_accum * world if t.max_steps > 0
                     else math.ceil(t.epochs * len(rows) / per_batch))
        layout = retain.batch_layout(len(rows), len(replay), t.batch_size, cfg.retain.replay_fraction, n_batches, t.seed)
        weight = retain.replay_weight(rows, replay) if cfg.retain.balance_replay_tokens else 1.0
        replay = [r | {"loss_weight": weight} for r in replay]
        dataset, epochs = DistillDataset(rows, model.config.vocab_size, replay, layout), 1.0
    args = TrainingArguments(
        output_dir=str(output_dir), per_device_train_batch_size=t.batch_size, gradient_accumulation_steps=t.grad_accum,
        learning_rate=t.lr, num_train_epochs=epochs, max_steps=t.max_steps, warmup_steps=t.warmup_ratio,
        lr_scheduler_type="cosine", weight_decay=0.0, logging_steps=1, save_steps=t.save_steps,
        save_total_limit=None if cfg.retain.select_checkpoints else 2, seed=t.seed, data_seed=t.seed, report_to=[], remove_unused_columns=False,
        dataloader_num_workers=0, disable_tqdm=True, use_cpu=not torch.cuda.is_available(),
        average_tokens_across_devices=True,
    )
    trainer = DistillTrainer(
        model=model, args=args, train_dataset=dataset,
        data_collator=lambda batch: collate(batch, tok.pad_token_id), callbacks=list(callbacks),
        optimizers=optimizers, distill=DistillSettings(cfg, teacher_model, tok.pad_token_id, tok.eos_token_id),
    )
    trainer.remove_callback(PrinterCallback)  # a dict per step on stdout; the CLI draws its own progress bar
    return trainer


class _StopAfter(TrainerCallback):
    """Ends training after N steps: what a kill looks like to the checkpoint logic (used by tests)."""

    def __init__(self, steps: int):
        self.steps = steps

    def on_step_end(self, args, state, control, **kw):
        if state.global_step >= self.steps:
            control.should_save = True
            control.should_training_stop = True


def n_tokens_seen(trainer, rows) -> int:
    per_epoch = sum(len(r["prompt_ids"]) + len(r["completion_ids"]) for r in rows)
    steps_per_epoch = max(1, -(-len(rows) // (trainer.args.per_device_train_batch_size * trainer.args.gradient_accumulation_steps)))
    return int(per_epoch * trainer.state.global_step / steps_per_epoch)


def train_flops(model, tokens: int) -> float:
    """6 * parameters * tokens: the usual forward+backward estimate (trainable or not, all weights run)."""
    return 6.0 * sum(p.numel() for p in model.parameters()) * tokens


def _save_student(model, tok, student_dir: Path, summary: dict, cfg: RunConfig) -> None:
    if hasattr(model, "merge_and_unload"):  # LoRA: ship a plain model, adapters merged in
        model = model.merge_and_unload()
    tmp = student_dir.with_name(student_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(str(tmp), safe_serialization=True)
    tok.save_pretrained(str(tmp))
    write_atomic(tmp / "train_summary.json", json.dumps(summary, indent=1, default=float))
    from distillab import provenance

    lineage = provenance.build_lineage(cfg.run_dir / "data" / "train.parquet", base_model=cfg.train.student,
                                       train_summary=summary)
    lineage["model"] = f"{cfg.name}/student"  # the name it will have, not the temp directory's
    provenance.write_model_card(tmp, lineage)
    shutil.rmtree(student_dir, ignore_errors=True)
    tmp.rename(student_dir)
