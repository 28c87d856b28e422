"""Stage 2, train: the student learns from the teacher's data on `transformers.Trainer`.

The loss of one micro-batch (loss_step) is two sums over its completion tokens:
  ce = sft_weight * cross-entropy on the written text
       + kd_weight * cross-entropy on the text at the tokens with no teacher distribution (a replay dataset's
         answers, a teacher whose top-k could not be kept): they stand in for KD with their text
  kd = kd_weight * divergence(student || teacher) at the tokens with one (sparse top-k from the dataset, or
       dense logits of a local teacher)
loss = "ce" is SFT alone (config validation requires kd_weight = 0 with it).

On-policy (GKD's λ = on_policy_fraction): an optimizer step is on-policy with probability λ (a draw from the seed
and the step number, so every process and a resumed run draw the same). On such a step the student samples a
completion for every prompt of the whole accumulation window first, each cut after the first end-of-sequence token
it generated (kept: that is how the student learns to stop), and a local teacher scores every sampled token (dense).
GKD trains no cross-entropy on the student's own samples: on them the loss is kd_weight * divergence alone.

Normalisation, the one rule for every path: the sums are divided by the number of completion tokens of the whole
accumulation window on all processes (counted once the window's batches are known, on-policy samples included,
and summed across processes), then multiplied by the process count because DDP/FSDP average gradients. So
4 micro-batches of 1 give the gradient of 1 batch of 4, P processes the gradient of one, whatever the model's
`accepts_loss_kwargs` says (the Trainer's own count and scaling are replaced: _get_num_items_in_batch,
loss_is_scaled_for_ga). P processes of per_device_batch_size rows take the global batches one process of P times
as many takes (batching.TrainOrder), an epoch's last, partial one included: a process it does not reach gets filler
rows, whose zero loss still reaches every weight (DDP's all-reduce waits for every process's backward).

The student's path is chosen once at setup: dense (model(...).logits) or chunked (losses.chunked_kd_loss from the
final hidden states, with the family's final logit transform, distillab.logits; never B x T x V logits, an
on-policy teacher's included). The forward always goes through the (possibly DDP-wrapped) model: DDP all-reduces
gradients only after its own forward, so calling the body (`.model`) directly would skip the sync silently.
Generation and module lookups (decoder, lm_head) use the unwrapped model.

Long sequences (train.max_length, gradient_checkpointing, precision, attn_implementation): rows are cut or left out
before anything else sees them (batching.LengthLimit), so the order, the replay layout, the token counts and the
summary all follow the rows as trained; the other three are the model's and the Trainer's own switches, each
refused in one line, before the student loads, where this machine cannot run it (check_device_options).

Reasoning traces: a row's completion_ids are the teacher's trace + answer in the student's thinking format
(distillab.reasoning), so both carry loss and KD and the prompt neither; [train] traces = false trains on each such
row's answer_ids instead (batching.AnswersOnly, before max_length's cut).

Checkpoints are written to checkpoints/.saving/ and renamed into place when complete; resume takes the last
complete one and removes (and reports) any incomplete one. Each holds train_seconds.json: the training seconds of
the whole run so far, so a resumed run's summary counts every part. checkpoints/fingerprint.json names the train
stage's fingerprint they were made under: checkpoints of another config or other data are set aside, never resumed.
"""

from __future__ import annotations

import inspect
import json
import math
import os
import random
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, fields
from pathlib import Path

import torch
from torch import Tensor
from transformers import PrinterCallback, Trainer, TrainerCallback, TrainingArguments
from transformers.trainer_utils import rotate_checkpoints

from distillab import chat, losses, models, retain
from distillab import logits as logit_paths
from distillab.batching import (
    Collator,
    DistillDataset,
    LengthLimit,
    RowSource,
    TrainOrder,
    answers_only,
    collate,
    limit_length,
)
from distillab.config import RunConfig
from distillab.dataset import check_files, dataset_files
from distillab.errors import UserError
from distillab.files import atomic_dir, cannot_write, fingerprint, read_json, write_atomic, write_json
from distillab.rundir import RunDir
from distillab.stage import StageContext, run_stage
from distillab.trainrows import ArrowRows

# ----------------------------------------------------------------------------------------------------
# The loss step: one function, its terms as sums; the caller divides by the window's token count.


@dataclass
class LossTerms:
    ce: Tensor  # () weighted sum of cross-entropy over tokens
    kd: Tensor  # () weighted sum of the divergence over tokens
    n_tokens: Tensor  # () completion tokens of this micro-batch (the predictions made)

    @property
    def total(self) -> Tensor:
        return self.ce + self.kd


# head(loss name, target, mask (B, T), **loss kwargs) -> the loss summed over the masked-in tokens
Head = Callable[..., Tensor]


def next_token_targets(labels: Tensor) -> tuple[Tensor, Tensor]:
    """(B, T) labels with -100 -> (predicts (B, T) bool, targets (B, T)): index t predicts labels[t + 1]."""
    predicts = torch.zeros_like(labels, dtype=torch.bool)
    predicts[:, :-1] = labels[:, 1:] != -100
    targets = torch.zeros_like(labels)
    targets[:, :-1] = labels[:, 1:].clamp(min=0)
    return predicts, targets


def loss_step(head: Head, batch: dict, settings: DistillSettings) -> LossTerms:
    """The terms of the module docstring for one batch, the student's forward already in `head`."""
    predicts, targets = next_token_targets(batch["labels"])  # (B, T) each
    teacher, has_teacher = _teacher_of(batch, predicts, settings)  # has_teacher (B, T) bool
    sft = 0.0 if batch.get("student_written") else settings.sft_weight
    zero = predicts.new_zeros((), dtype=torch.float32)
    if not predicts.any():  # fillers only (batching.TrainOrder): a zero that reaches every weight, so that this
        # process's backward still joins DDP's gradient all-reduce
        somewhere = torch.zeros_like(predicts)
        somewhere[0, 0] = True
        return LossTerms(ce=0.0 * head("ce", targets, somewhere), kd=zero, n_tokens=predicts.sum())
    ce = zero
    # Disjoint masks, so each token's logits are used once: sft on tokens with a teacher, sft + kd on the rest
    for weight, mask in ((sft, predicts & has_teacher), (sft + settings.kd_weight, predicts & ~has_teacher)):
        if weight and mask.any():
            ce = ce + weight * head("ce", targets, mask)
    kd = zero
    if teacher is not None and has_teacher.any():
        kd = settings.kd_weight * head(
            settings.loss,
            teacher,
            has_teacher,
            temperature=settings.temperature,
            beta=settings.beta,
            alpha=settings.alpha,
        )
    return LossTerms(ce=ce, kd=kd, n_tokens=predicts.sum())


def _teacher_of(batch: dict, predicts: Tensor, settings: DistillSettings):
    """The teacher's distribution for the batch and where it exists (B, T): on-policy scores, the dataset's top-k,
    or none (loss "ce", kd_weight 0, a dataset without top-k)."""
    if not settings.kd_weight or settings.loss == "ce":
        return None, torch.zeros_like(predicts)
    if "teacher" in batch:  # on-policy: the local teacher scored every token
        return batch["teacher"], predicts
    if "top_ids" in batch:
        teacher = losses.TeacherDist(
            ids=batch["top_ids"], logprobs=batch["top_logprobs"], tail_logprob=batch["top_tail"]
        )
        return teacher, batch["kd_mask"] & predicts
    return None, torch.zeros_like(predicts)


def dense_head(model, unwrapped, batch: dict, settings: DistillSettings) -> Head:
    logits = model(**model_inputs(batch)).logits  # (B, T, V)

    def head(name, target, mask, **kw):
        return losses.kd_loss(name, logits, target, mask, reduction="sum", **kw)[0]

    return head


def chunked_head(model, unwrapped, batch: dict, settings: DistillSettings) -> Head:
    hidden = final_hidden_states(model, unwrapped, batch)  # (B, T, H)
    weight = _base(unwrapped).get_output_embeddings().weight  # (V, H)

    def head(name, target, mask, **kw):
        # in fp32 under bf16/fp16 autocast too: the loss makes its gradients inside its own forward, where autocast
        # would mix 16-bit logits with the fp32 weight gradient
        with torch.autocast(hidden.device.type, enabled=False):
            return losses.chunked_kd_loss(
                name,
                hidden.float(),
                weight,
                target,
                mask,
                chunk_size=settings.chunk_size,
                reduction="sum",
                logit_transform=settings.student_transform,
                **kw,
            )[0]

    return head


def model_inputs(batch: dict) -> dict:
    """The forward's inputs. A packed batch (batching.collate(pack=True)) gives position_ids that restart per example
    and no attention mask, with no cache: transformers then builds a mask that keeps each example to itself (its
    packed-sequence detection, masking_utils.find_packed_sequence_indices; flash-attention's varlen path reads the
    same position ids). check_packing proves it per model before training."""
    if "position_ids" in batch:
        return {"input_ids": batch["input_ids"], "position_ids": batch["position_ids"], "use_cache": False}
    return {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}


@torch.no_grad()
def check_packing(model) -> None:
    """Refuse train.packing, in one line, for a model that does not keep packed examples apart: the logits of an
    example packed after another must not depend on that other one, and must equal its logits alone."""
    base, vocab = _base(model), logit_paths.text_config(model.config).vocab_size
    device = next(base.parameters()).device
    gen = torch.Generator().manual_seed(0)
    first, other, second = (torch.randint(1, vocab, (n,), generator=gen).tolist() for n in (5, 5, 4))
    was_training = base.training
    base.eval()
    try:

        def logits(rows: list[list[int]]) -> Tensor:  # (T, V) of the last example, packed after the others
            pack = sum(map(len, rows)) if len(rows) > 1 else False  # one row
            batch = collate([{"prompt_ids": r[:1], "completion_ids": r[1:]} for r in rows], 0, pack=pack)
            out = base(**model_inputs({k: v.to(device) for k, v in batch.items()})).logits[0].float()
            return out[-len(rows[-1]) :] if len(rows) > 1 else out

        alone, after, after_other = logits([second]), logits([first, second]), logits([other, second])
    except Exception as err:  # noqa: BLE001 - any failure here means the model cannot take packed rows
        raise UserError(
            f"train.packing: {type(base).__name__} cannot take packed rows ({type(err).__name__}: {err}); "
            "set packing = false"
        ) from None
    finally:
        base.train(was_training)
    tol = 1e-3 * max(1.0, float(alone.abs().max())) * (1 if base.dtype == torch.float32 else 30)
    if not (torch.allclose(after, after_other, atol=tol) and torch.allclose(after, alone, atol=tol)):
        attn = getattr(base.config, "_attn_implementation", None)
        raise UserError(
            f"train.packing: {type(base).__name__} (attention {attn!r}) lets packed examples see each "
            "other or ignores their position ids; set packing = false"
        )


def _base(model):
    """The transformers model under a peft wrapper (accelerate's wrappers are already taken off)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def decoder_of(model):
    """The module whose first output is the final (normed) hidden states, for any family: get_decoder(), else the
    body named by base_model_prefix (`.model` for Llama, `.transformer` for GPT-2, `.language_model` nested)."""
    base = _base(model)
    decoder = base.get_decoder() if hasattr(base, "get_decoder") else None
    if decoder is None or decoder is base:
        decoder = getattr(base, getattr(base, "base_model_prefix", "model"), None)
    if decoder is None:
        raise UserError(f"chunked KD cannot find the decoder body of {type(base).__name__}: set train.chunk_size = 0")
    return decoder


def final_hidden_states(model, unwrapped, batch: dict) -> Tensor:
    """(B, T, H) through the model's own forward (under DDP, the wrapper's: its gradient sync depends on it), with
    the hidden states taken from the decoder by a hook and the lm_head run on the last position only."""
    captured = []
    handle = decoder_of(unwrapped).register_forward_hook(lambda module, args, out: captured.append(out[0]))
    try:
        model(**model_inputs(batch), logits_to_keep=1)
    finally:
        handle.remove()
    return captured[-1]


class DistillSettings:
    """What the loss step and the on-policy sampler need beyond the batch, decided once at setup: the loss and its
    weights, the student's path (dense or chunked) and, for on-policy steps, the teacher."""

    def __init__(self, cfg: RunConfig, model, teacher_model=None, pad_id: int = 0, eos_id: int = 0):
        t = cfg.train
        self.loss, self.temperature, self.beta, self.alpha = t.loss, t.kd_temperature, t.beta, t.alpha
        self.sft_weight, self.kd_weight = t.sft_weight, t.kd_weight  # config validation made them consistent
        self.on_policy_fraction, self.chunk_size, self.seed = t.on_policy_fraction, t.chunk_size, t.seed
        self.teacher_model, self.pad_id, self.eos_id = teacher_model, pad_id, eos_id
        self.max_new_tokens = cfg.teacher.max_new_tokens
        self.head = chunked_head if t.chunk_size else dense_head
        self.student_transform = self.teacher_transform = None
        if t.chunk_size:  # fail here, in one line, for a family whose logits chunked KD cannot reproduce
            self.student_transform = logit_paths.logit_transform(model)
            _check_logits_to_keep(model)
            decoder_of(model)
            if teacher_model is not None:
                self.teacher_transform = logit_paths.logit_transform(teacher_model)
                decoder_of(teacher_model)
        if t.packing:
            check_packing(model)

    def on_policy(self, step: int) -> bool:
        """Whether optimizer step `step` trains on the student's samples: the same draw on every process and resume."""
        draw = random.Random(f"{self.seed}:{step}").random()  # str seeds hash the same in every process
        return self.teacher_model is not None and draw < self.on_policy_fraction


def _check_logits_to_keep(model) -> None:
    base = _base(model)
    if "logits_to_keep" not in inspect.signature(base.forward).parameters:
        raise UserError(
            f"chunked KD needs a model whose forward takes logits_to_keep; {type(base).__name__}'s does "
            "not: set train.chunk_size = 0"
        )


def cut_at_eos(ids: list[int], eos_id: int) -> list[int]:
    """A sampled completion up to and including the first end-of-sequence token it generated. Kept when pad == eos:
    generate pads a finished row with pad, so everything after the first eos is padding, nothing before it is."""
    return ids[: ids.index(eos_id) + 1] if eos_id in ids else ids


@torch.no_grad()
def _sample(model, prompts: Tensor, prompt_mask: Tensor, settings: DistillSettings) -> Tensor:
    was_training = model.training
    model.eval()
    out = model.generate(
        input_ids=prompts,
        attention_mask=prompt_mask,
        do_sample=True,
        temperature=1.0,
        top_k=None,
        max_new_tokens=settings.max_new_tokens,
        pad_token_id=settings.pad_id,
        eos_token_id=settings.eos_id,
    )
    model.train(was_training)
    return out[:, prompts.shape[1] :]  # (B, new)


def on_policy_batch(student, batch: dict, settings: DistillSettings) -> dict:
    """The batch's prompts with the (unwrapped) student's own completions, every token scored by the teacher."""
    prompt_len, input_ids = batch["prompt_len"], batch["input_ids"]
    n, width, device = prompt_len.shape[0], int(prompt_len.max()), input_ids.device
    prompts = torch.full(
        (n, width), settings.pad_id, dtype=torch.long, device=device
    )  # (B, P) left-padded for generation
    prompt_mask = torch.zeros((n, width), dtype=torch.long, device=device)  # (B, P)
    for b in range(n):
        length = int(prompt_len[b])
        prompts[b, width - length :] = input_ids[b, :length]
        prompt_mask[b, width - length :] = 1
    sampled = _sample(student, prompts, prompt_mask, settings)  # (B, new)
    filler = batch.get("filler", torch.zeros(n, dtype=torch.bool))  # batching.TrainOrder's: they predict nothing
    rows = [
        {
            "prompt_ids": input_ids[b, : int(prompt_len[b])].tolist(),
            "completion_ids": [] if filler[b] else cut_at_eos(sampled[b].tolist(), settings.eos_id),
        }
        for b in range(n)
    ]
    new = {k: v.to(device) for k, v in collate(rows, settings.pad_id).items()}
    new["teacher"] = score_with_teacher(settings, new)
    new["student_written"] = True
    return new


@torch.no_grad()
def score_with_teacher(settings: DistillSettings, batch: dict):
    """The local teacher's distribution at every position: dense logits, or (chunked path) its final hidden states
    and lm_head, turned into logits a chunk at a time by the loss."""
    teacher = settings.teacher_model
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    if not settings.chunk_size:
        return losses.TeacherDist(logits=teacher(**inputs).logits)  # (B, T, Vt)
    hidden = decoder_of(teacher)(**inputs)[0]  # (B, T, Ht)
    return losses.TeacherHidden(
        hidden=hidden,
        lm_head_weight=_base(teacher).get_output_embeddings().weight,
        logit_transform=settings.teacher_transform,
    )


# ----------------------------------------------------------------------------------------------------
# The Trainer: windows of batches (on-policy sampled first), their global token count, the loss, atomic checkpoints.

SAVING = ".saving"  # checkpoints are written under checkpoints/.saving/ and renamed into place when complete
# torch.save's errors when a write fails (its C++ stream writer's words)
TORCH_WRITE_FAILED = ("inline_container", "PytorchStreamWriter", "file write failed", "iostream error")
SECONDS_FILE = "train_seconds.json"


class DistillTrainer(Trainer):
    loss_is_scaled_for_ga = True  # compute_loss divides by the whole window's token count itself

    def __init__(self, *args, distill: DistillSettings, group_by_length: bool = False, **kwargs):
        super().__init__(*args, **kwargs)
        self.distill, self.group_by_length = distill, group_by_length
        self.seconds_before, self._clock, self.train_seconds = 0.0, None, 0.0

    def _get_train_sampler(self, *args, **kwargs):
        """The same global batches on any number of processes, the last partial one too (batching.TrainOrder)."""
        per_device, processes, seed = self.args.per_device_train_batch_size, self.args.world_size, self.args.seed
        return TrainOrder(self.train_dataset, per_device, processes, seed, self.group_by_length)

    def get_batch_samples(self, epoch_iterator, num_batches, device):
        """The window's micro-batches, on an on-policy step replaced by the student's samples, and their global
        token count: known only once every micro-batch of the window is sampled."""
        batches = []
        for _ in range(num_batches):
            try:
                batches.append(next(epoch_iterator))
            except StopIteration:
                break
        if batches and self.distill.on_policy(self.state.global_step):
            student = self.accelerator.unwrap_model(self.model_wrapped)
            batches = [on_policy_batch(student, b, self.distill) for b in batches]
        return batches, self._get_num_items_in_batch(batches, device)

    def _get_num_items_in_batch(self, batch_samples, device):
        """Completion tokens (predictions) of the window, summed over every process: the one divisor."""
        local = sum(int(next_token_targets(b["labels"])[0].sum()) for b in batch_samples)
        count = torch.tensor([local], dtype=torch.long, device=device)
        if self.accelerator.num_processes > 1:
            count = self.accelerator.gather(count)
        return count.sum()

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        settings = self.distill
        terms = loss_step(
            settings.head(model, self.accelerator.unwrap_model(model), inputs, settings), inputs, settings
        )
        window = terms.n_tokens if num_items_in_batch is None else num_items_in_batch  # None: outside train()
        # DDP/FSDP average the processes' gradients; the divisor is already the global count, so undo the mean
        loss = terms.total / window.clamp(min=1) * self.accelerator.num_processes
        return (loss, {}) if return_outputs else loss

    # -- wall time over resumes, atomic checkpoints

    def train(self, resume_from_checkpoint=None, **kwargs):
        resumed = isinstance(resume_from_checkpoint, str)
        self.seconds_before = checkpoint_seconds(resume_from_checkpoint) if resumed else 0.0
        self._clock = time.monotonic()
        try:
            return super().train(resume_from_checkpoint=resume_from_checkpoint, **kwargs)
        finally:
            self.train_seconds = self.elapsed()

    def elapsed(self) -> float:
        """Training seconds of the whole run: the checkpoint's count plus this process's since train()."""
        return self.seconds_before + (time.monotonic() - self._clock if self._clock is not None else 0.0)

    def _save_checkpoint(self, model, trial):
        final_root = self.args.output_dir
        staging = os.path.join(final_root, SAVING)
        name = f"checkpoint-{self.state.global_step}"
        if self.args.should_save:
            shutil.rmtree(staging, ignore_errors=True)  # a save killed earlier
        self.accelerator.wait_for_everyone()
        self.args.output_dir = staging  # every file of the checkpoint (all processes' RNG states too) goes here
        try:
            super()._save_checkpoint(model, trial)
        except (OSError, RuntimeError) as err:
            # a full disk: torch.save reports it as a RuntimeError of its stream writer
            if not isinstance(err, OSError) and not any(w in str(err) for w in TORCH_WRITE_FAILED):
                raise
            shutil.rmtree(staging, ignore_errors=True)  # the half-written checkpoint: its room back
            then = "training resumes from the last whole checkpoint (from the start when there is none)"
            raise cannot_write(Path(staging, name), err, then) from None
        finally:
            self.args.output_dir = final_root
        if self.args.should_save:
            write_atomic(Path(staging, name, SECONDS_FILE), json.dumps({"train_seconds": self.elapsed()}))
        self.accelerator.wait_for_everyone()  # every process has written its part
        if self.args.should_save:
            final = os.path.join(final_root, name)
            shutil.rmtree(final, ignore_errors=True)  # the same step saved again (a resumed run reaching it)
            os.replace(os.path.join(staging, name), final)  # complete, in one step
            shutil.rmtree(staging, ignore_errors=True)
            rotate_checkpoints(final_root, save_total_limit=self.args.save_total_limit, use_mtime=False)
        self.accelerator.wait_for_everyone()


def checkpoint_seconds(path: str | Path) -> float:
    file = Path(path) / SECONDS_FILE
    if not file.is_file():
        return 0.0
    record = read_json(file, _damaged_hint(Path(path)))
    seconds = record.get("train_seconds") if isinstance(record, dict) else None
    if not isinstance(seconds, int | float) or isinstance(seconds, bool):
        raise UserError(f"{file} is damaged (no train_seconds): {_damaged_hint(Path(path))}")
    return float(seconds)


def check_checkpoint(checkpoint: Path) -> None:
    """Refuse, in one line naming the file, a checkpoint to resume whose files are damaged (cut short, overwritten),
    before the Trainer reads them: its state JSON parses, its safetensors headers read, its torch files are whole
    zip archives (what torch.save writes; the end of a cut one is missing)."""
    import zipfile

    from safetensors import safe_open

    hint = _damaged_hint(checkpoint)
    for file in sorted(checkpoint.iterdir()):
        if file.suffix == ".json" and not isinstance(read_json(file, hint), dict | list):
            raise UserError(f"{file} is damaged (not a JSON object): {hint}")
        if file.suffix == ".safetensors":
            try:
                with safe_open(str(file), framework="pt") as tensors:
                    tensors.keys()
            except Exception:  # noqa: BLE001 - safetensors raises its own error types for every kind of damage
                raise UserError(f"{file} is damaged (not safetensors): {hint}") from None
        if file.suffix in (".pt", ".pth", ".bin") and not zipfile.is_zipfile(file):
            raise UserError(f"{file} is damaged (not a whole torch file): {hint}")


def _damaged_hint(checkpoint: Path) -> str:
    return (
        f"delete {checkpoint} to resume from the checkpoint before it, or delete {checkpoint.parent} to train "
        "from the start"
    )


def keep_checkpoints_made_from(run: RunDir, made_from: str, log=print) -> None:
    """Keep checkpoints/ only when it was made under `made_from` (the train stage's fingerprint: the train config
    and the datasets' contents), so a rerun never resumes onto changed inputs: otherwise it is renamed aside to
    checkpoints.previous/ (one rename; an older one there is removed first) and training starts over. Checkpoints
    without a readable fingerprint.json (an older distillab's, or damaged) count as changed: what they were made
    from is unknown. Then checkpoints/fingerprint.json names `made_from`, before the first checkpoint is saved."""
    ckpt, found = run.checkpoints, _checkpoints_made_from(run)
    if ckpt.is_dir() and any(ckpt.iterdir()) and found != made_from:
        unknown = f"; {run.checkpoints_fingerprint} is missing or corrupt: what they were made from is unknown"
        log(
            "train: the config or data changed since checkpoints/ was written: starting over "
            f"(the old checkpoints moved to {run.checkpoints_previous}{unknown if found is None else ''})"
        )
        shutil.rmtree(run.checkpoints_previous, ignore_errors=True)
        ckpt.rename(run.checkpoints_previous)
    write_json(run.checkpoints_fingerprint, {"fingerprint": made_from})


def _checkpoints_made_from(run: RunDir) -> str | None:
    try:
        made_from = json.loads(run.checkpoints_fingerprint.read_text(encoding="utf-8"))
    except (OSError, ValueError):  # missing, unreadable, not UTF-8 or not JSON: unknown
        return None
    return made_from.get("fingerprint") if isinstance(made_from, dict) else None


def last_complete_checkpoint(ckpt_dir: Path, log=print) -> Path | None:
    """The checkpoint to resume from: the highest step whose trainer_state.json (written last) exists. The staging
    directory of a killed save is removed; so is, and said, a checkpoint without trainer_state.json (one not written
    whole in its place, e.g. copied in part or made by hand)."""
    shutil.rmtree(ckpt_dir / SAVING, ignore_errors=True)
    found = sorted(
        (p for p in ckpt_dir.glob("checkpoint-*") if p.name.split("-")[-1].isdigit()),
        key=lambda p: int(p.name.split("-")[-1]),
    )
    complete = [p for p in found if (p / "trainer_state.json").is_file()]
    for p in found:
        if p not in complete:
            log(f"train: removing incomplete {p.name} (no trainer_state.json: its save was interrupted)")
            shutil.rmtree(p)
    return complete[-1] if complete else None


# ----------------------------------------------------------------------------------------------------
# The stage.


class _Progress(TrainerCallback):
    """progress(step, max_steps, loss) for a progress bar."""

    def __init__(self, progress):
        self.progress = progress

    def on_log(self, args, state, control, logs=None, **kw):
        if logs and "loss" in logs:
            self.progress(state.global_step, state.max_steps, float(logs["loss"]))


def shares_tokenizer(student_tok, teacher_name: str) -> bool:
    """Whether a local teacher's dense logits index the student's vocab: the same tokens under the same ids.
    (Off-policy data needs no such check: generate wrote it in the student's ids, aligned by text spans when the
    teacher's tokenizer differs, see distillab.crosstok.)"""
    return models.load_tokenizer(teacher_name).get_vocab() == student_tok.get_vocab()


def check_tokenized_for(tok, student: str, data_path: Path, sample: int = 16) -> None:
    """The dataset holds token ids of the student generate tokenized for: the first rows' prompts, tokenized again
    by this student, must give the stored ids. A student (or tokenizer) changed since generate is refused: its ids
    would mean other tokens."""
    files = dataset_files(data_path)
    if not files or not check_files(files[:1]):
        return  # ArrowRows says what is missing
    import pyarrow.parquet as pq

    parquet = pq.ParquetFile(files[0])
    columns = [c for c in ("prompt", "messages", "prompt_ids") if c in parquet.schema_arrow.names]
    rows = next(parquet.iter_batches(batch_size=sample, columns=columns)).to_pylist()
    for r in rows:
        if chat.prompt_ids(tok, chat.turns_of(r)) != list(r["prompt_ids"]):
            raise UserError(
                f"{data_path} was tokenized for another student than {student!r} (its prompt ids differ "
                "from this student's tokenizer): rerun `distillab generate` for this student"
            )


LENGTH_FIELDS = ("max_length", "truncated_rows", "dropped_rows", "tokens_cut")


@dataclass
class TrainSummary:
    """student/train_summary.json: what was trained, how long it took, the loss it reached."""

    student: str
    loss: str
    kd_weight: float
    sft_weight: float
    on_policy_fraction: float
    lora: bool
    steps: int
    train_seconds: float  # the whole run's, every resumed part included
    examples: int
    completion_tokens: int
    epochs: float
    final_loss: float | None
    flops: float
    loss_history: list[dict]
    train_loss: float
    replay: dict | None = None  # retain's replay set (fraction, source, rows, per_batch); not in the file without one
    # train.max_length, and what it did to the training rows (task and replay); not in the file without a limit
    max_length: int | None = None
    truncated_rows: int = 0  # rows whose completion was cut at the end
    dropped_rows: int = 0  # rows left out (overflow "drop", or a prompt that leaves no room for the completion)
    tokens_cut: int = 0  # completion tokens not trained on: the cut ends and the left-out rows' completions
    # rows with a reasoning trace trained on trace + answer (True) or their answers alone (False, [train] traces =
    # false); None, not in the file: the dataset holds no trace
    traces: bool | None = None
    processes: int = 1  # training processes (torchrun, accelerate launch)
    global_batch: int = 0  # rows a step: per_device_batch_size x processes x grad_accum (0: not recorded)
    complete: bool = True  # False on a process other than world process zero: it writes and stamps nothing
    skipped: bool = False  # read back from student/: up to date, not trained now

    def to_dict(self) -> dict:
        """The JSON object of train_summary.json (`replay` only when there is a replay set)."""
        record = {f.name: getattr(self, f.name) for f in fields(self) if f.name not in ("complete", "skipped")}
        if self.replay is None:
            del record["replay"]
        if self.max_length is None:
            for name in LENGTH_FIELDS:
                del record[name]
        if self.traces is None:
            del record["traces"]
        return record


@dataclass
class TrainInterrupted:
    """A run stopped after `stop_after_steps` (what a kill looks like, for tests): not stamped, so a rerun resumes
    from its last checkpoint."""

    interrupted_at: int
    complete: bool = False

    def to_dict(self) -> dict:
        return {"interrupted_at": self.interrupted_at}


class TrainStage:
    """Stage 2 for stage.run_stage: the student in student/, stamped "train" with the train config and the datasets'
    contents. ctx.options["stop_after_steps"] ends a run early (tests); ctx.progress(step, max_steps, loss)."""

    name = "train"

    def fingerprint(self, cfg: RunConfig, run: RunDir) -> str:
        with_replay = cfg.retain.replay_fraction > 0
        return fingerprint(
            "train",
            cfg.train.model_dump(),
            *dataset_files(run.dataset("train")),  # or its shards
            *([cfg.retain.replay_fraction, *dataset_files(run.dataset("replay"))] if with_replay else []),
            *(["select_checkpoints"] if cfg.retain.select_checkpoints else []),
        )

    def outputs(self, cfg: RunConfig, run: RunDir) -> list[Path]:
        return [run.student_config, run.train_summary]

    def load(self, cfg: RunConfig, run: RunDir) -> TrainSummary:
        return TrainSummary(**read_json(run.train_summary, "delete student/ and rerun `distillab train`"))

    def run(self, cfg: RunConfig, run: RunDir, ctx: StageContext) -> TrainSummary | TrainInterrupted:
        t, log, stop_after_steps = cfg.train, ctx.log, ctx.options.get("stop_after_steps")
        if t.on_policy_fraction > 0 and cfg.teacher.base_url:  # refusals first: a failed start writes nothing
            raise UserError("on-policy distillation needs a local teacher (teacher.base_url must be unset)")
        check_device_options(t)
        check_launcher()
        torch.manual_seed(t.seed)
        model, tok = models.load(t.student, attn_implementation=t.attn_implementation)
        check_tokenized_for(tok, t.student, run.dataset("train"))
        rows = ArrowRows(run.dataset("train"))  # streamed: a batch reads its own rows, nothing holds them all
        replay = ArrowRows(run.dataset("replay")) if cfg.retain.replay_fraction > 0 else None

        uses_teacher_logprobs = rows.has_topk and t.kd_weight > 0 and t.loss != "ce"
        teacher_model = None
        if t.on_policy_fraction > 0:
            if shares_tokenizer(tok, cfg.teacher.model):
                teacher_model = models.load_model(cfg.teacher.model).eval()
            else:  # no teacher model: DistillSettings.on_policy is then never true
                log(
                    f"train: teacher {cfg.teacher.model!r} has another tokenizer than the student: on-policy steps "
                    "(dense teacher logits over the student's vocab) are impossible, so every step trains on the "
                    "dataset"
                )
        if not uses_teacher_logprobs and t.kd_weight > 0 and t.loss != "ce" and not teacher_model:
            log(
                "train: the dataset has no teacher top-k (logit KD impossible here): training SFT on the teacher's text"
            )
        if t.lora:
            from peft import LoraConfig, get_peft_model

            model = get_peft_model(
                model,
                LoraConfig(r=t.lora_r, lora_alpha=t.lora_alpha, target_modules="all-linear", task_type="CAUSAL_LM"),
            )
            if t.gradient_checkpointing:  # the frozen embeddings' output must carry a gradient into the first layer
                model.enable_input_require_grads()
        callbacks = [_Progress(ctx.progress)] if ctx.progress else []
        callbacks += [_StopAfter(stop_after_steps)] if stop_after_steps else []
        trainer = build_trainer(cfg, rows, model, tok, run.checkpoints, teacher_model, callbacks, replay=replay)
        if trainer.is_world_process_zero():
            log(batch_line(t))
            keep_checkpoints_made_from(run, self.fingerprint(cfg, run), log)
        trainer.accelerator.wait_for_everyone()  # no process looks for a checkpoint before stale ones are aside
        resume = last_complete_checkpoint(run.checkpoints, log) if run.checkpoints.is_dir() else None
        if resume:
            check_checkpoint(resume)
            log(f"train: resuming from {resume.name}")
        result = trainer.train(resume_from_checkpoint=str(resume) if resume else None)
        if stop_after_steps and trainer.state.global_step < (trainer.state.max_steps or 0):
            return TrainInterrupted(interrupted_at=trainer.state.global_step)
        losses_seen = [h["loss"] for h in trainer.state.log_history if "loss" in h]
        task = trainer.train_dataset.task  # the rows as trained: max_length's cuts made
        n_tokens = int(task.completion_lengths.sum())
        replay_set = None
        if replay:
            replay_set = {
                "fraction": cfg.retain.replay_fraction,
                "source": cfg.retain.replay_source,
                "rows": len(replay),
                "per_batch": retain.replay_per_batch(global_batch(t), cfg.retain.replay_fraction),
            }
        writes = trainer.is_world_process_zero()  # under torchrun/accelerate every process gets here; one writes
        summary = TrainSummary(
            student=t.student,
            loss=t.loss,
            kd_weight=t.kd_weight,
            sft_weight=t.sft_weight,
            on_policy_fraction=t.on_policy_fraction,
            lora=t.lora,
            steps=trainer.state.global_step,
            train_seconds=round(trainer.train_seconds, 2),
            examples=len(task),
            completion_tokens=n_tokens,
            epochs=round(float(trainer.state.epoch or 0), 3),
            final_loss=losses_seen[-1] if losses_seen else None,
            flops=train_flops(model, n_tokens_seen(trainer)),
            loss_history=trainer.state.log_history,
            train_loss=result.training_loss,
            replay=replay_set,
            **length_counts(trainer.train_dataset, t.max_length),
            traces=t.traces if (rows.answer_lengths >= 0).any() else None,
            processes=processes(),
            global_batch=global_batch(t, t.grad_accum),
            complete=writes,
        )
        if writes:
            _save_student(trainer.model, tok, run, summary, cfg)
        return summary


train_stage = TrainStage()


def run_train(cfg: RunConfig, log=print, stop_after_steps: int | None = None, progress=None) -> dict:
    """Train the student into student/ through run_stage. Returns train_summary.json's object ("skipped":
    True added when the student was up to date), or {"interrupted_at": step} for a run stopped early."""
    ctx = StageContext(log=log, progress=progress, options={"stop_after_steps": stop_after_steps})
    record = run_stage(train_stage, cfg, ctx)
    return record.to_dict() | ({"skipped": True} if getattr(record, "skipped", False) else {})


def build_trainer(
    cfg: RunConfig,
    rows: RowSource | list[dict],
    model,
    tok,
    output_dir: Path,
    teacher_model=None,
    callbacks=(),
    optimizers=(None, None),
    replay: RowSource | list[dict] | None = None,
) -> DistillTrainer:
    """The Trainer over the task rows (and replay rows): a trainrows.ArrowRows as run_train opens it, or rows in memory."""
    t = cfg.train
    vocab = logit_paths.text_config(model.config).vocab_size  # Gemma 3 4B+, 3n, 4: nested in a text config
    check_device_options(t)
    if t.gradient_checkpointing and not _base(model).supports_gradient_checkpointing:
        raise UserError(
            f"train.gradient_checkpointing: {type(_base(model)).__name__} does not support it; "
            "set gradient_checkpointing = false"
        )
    rows, replay = answers_only(rows, t.traces), answers_only(replay, t.traces)  # traces = false: answers alone
    rows, replay = limit_length(rows, t.max_length, t.overflow), limit_length(replay, t.max_length, t.overflow)
    if t.max_length is not None and not len(rows):
        raise UserError(
            f"train.max_length = {t.max_length} leaves no training row (overflow = {t.overflow!r}): "
            'raise max_length, or use overflow = "truncate"'
        )
    distill = DistillSettings(cfg, model, teacher_model, tok.pad_token_id, tok.eos_token_id)  # refuses early
    dataset = DistillDataset(rows, vocab)
    epochs = t.epochs
    if replay:  # a fixed order that puts the replay share in every global batch, long enough for the whole run
        batch = global_batch(t)  # one micro-batch on every process: split among them as it is (TrainOrder)
        per_batch = batch - retain.replay_per_batch(batch, cfg.retain.replay_fraction)
        n_batches = t.max_steps * t.grad_accum if t.max_steps > 0 else math.ceil(t.epochs * len(rows) / per_batch)
        layout = retain.batch_layout(len(rows), len(replay), batch, cfg.retain.replay_fraction, n_batches, t.seed)
        dataset, epochs = DistillDataset(dataset.task, vocab, replay, layout), 1.0
    args = TrainingArguments(
        output_dir=str(output_dir),
        per_device_train_batch_size=t.per_device_batch_size,
        gradient_accumulation_steps=t.grad_accum,
        learning_rate=t.lr,
        num_train_epochs=epochs,
        max_steps=t.max_steps,
        warmup_steps=t.warmup_ratio,
        lr_scheduler_type="cosine",
        weight_decay=0.0,
        logging_steps=1,
        save_steps=t.save_steps,
        save_total_limit=None if cfg.retain.select_checkpoints else 2,
        seed=t.seed,
        data_seed=t.seed,
        report_to=[],
        remove_unused_columns=False,
        dataloader_num_workers=0,
        disable_tqdm=True,
        use_cpu=not torch.cuda.is_available(),
        average_tokens_across_devices=True,
        bf16=t.precision == "bf16",
        fp16=t.precision == "fp16",
        **{CHECKPOINTING_ARG: t.gradient_checkpointing},
    )
    trainer = DistillTrainer(
        model=model,
        args=args,
        train_dataset=dataset,
        data_collator=Collator(dataset, tok.pad_token_id, pack=t.packing),
        callbacks=list(callbacks),
        optimizers=optimizers,
        distill=distill,
        group_by_length=t.group_by_length,
    )
    check_parallelism(t, fsdp=trainer.is_fsdp_enabled)
    if teacher_model is not None:
        teacher_model.to(trainer.args.device)
    trainer.remove_callback(PrinterCallback)  # a dict per step on stdout; the CLI draws its own progress bar
    return trainer


# transformers 5.x renames TrainingArguments' gradient_checkpointing to activation_checkpointing (the old name warns)
CHECKPOINTING_ARG = next(
    name
    for name in ("activation_checkpointing", "gradient_checkpointing")
    if name in TrainingArguments.__dataclass_fields__
)


def check_device_options(train_cfg) -> None:
    """Refuse, in one line and before the student loads, a precision or attention this machine cannot run. bf16
    runs on any CPU (torch's CPU autocast) and on a GPU that supports it; fp16 needs a GPU (the Trainer's fp16 is
    CUDA autocast with a loss scaler); flash_attention_2 needs its package, a GPU and 16-bit activations."""
    t, cuda = train_cfg, torch.cuda.is_available()
    if t.precision == "fp16" and not cuda:
        raise UserError('train.precision = "fp16" needs a CUDA GPU (none here): use "bf16" (CPU autocast) or "fp32"')
    if t.precision == "bf16" and cuda and not torch.cuda.is_bf16_supported():
        raise UserError(
            f'train.precision = "bf16": {torch.cuda.get_device_name()} does not support bfloat16: use "fp16" or "fp32"'
        )
    if t.attn_implementation == "flash_attention_2":
        import importlib.util

        lacking = [
            why
            for why, lacks in (
                (
                    "the flash-attn package is not installed (pip install flash-attn)",
                    importlib.util.find_spec("flash_attn") is None,
                ),
                ("it needs a CUDA GPU (none here)", not cuda),
                ('it needs 16-bit activations: set precision = "bf16" or "fp16"', t.precision == "fp32"),
            )
            if lacks
        ]
        if lacking:
            raise UserError(f'train.attn_implementation = "flash_attention_2": {lacking[0]}; or use "sdpa"')


def length_counts(data: DistillDataset, max_length: int | None) -> dict:
    """TrainSummary's max_length fields: what LengthLimit did to the task and replay rows."""
    limits = [source for source in data.sources if isinstance(source, LengthLimit)]
    return {"max_length": max_length} | {
        name: sum(getattr(limit, name) for limit in limits) for name in LENGTH_FIELDS[1:]
    }


def processes() -> int:
    """The training processes: WORLD_SIZE, as torchrun and `accelerate launch` set it (1 without either)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def global_batch(train_cfg, grad_accum: int = 1) -> int:
    """Rows of one micro-batch on every process (x grad_accum: of one optimizer step)."""
    return train_cfg.per_device_batch_size * processes() * grad_accum


def batch_line(train_cfg) -> str:
    """The start-up line that says what a step takes, and the batch size's new name when the config used the old."""
    t = train_cfg
    line = (
        f"train: global batch {global_batch(t, t.grad_accum)} rows a step = per_device_batch_size "
        f"{t.per_device_batch_size} x {processes()} process(es) x grad_accum {t.grad_accum}"
    )
    if t.old_batch_size_key:
        line += " (train.batch_size is now named per_device_batch_size, the same per-process meaning: rename it)"
    return line


def check_launcher() -> None:
    """Refuse, in one line, a launcher that was asked for several processes and started one: `accelerate launch
    --num_processes N` without --multi_gpu on a machine without N GPUs runs its simple launcher, one process that is
    told nothing of N (no WORLD_SIZE); accelerate's command line, this process's parent, still says N."""
    if "WORLD_SIZE" in os.environ or "ACCELERATE_MIXED_PRECISION" not in os.environ:  # not accelerate's one process
        return
    import psutil
    from accelerate.commands.launch import launch_command_parser

    try:
        argv = psutil.Process(os.getppid()).cmdline()
    except psutil.Error:
        return
    launch = next((i for i, arg in enumerate(argv) if Path(arg).name.endswith("launch")), None)
    if launch is None:  # `accelerate launch`, `accelerate-launch`, `python -m accelerate.commands.launch`
        return
    asked, _ = launch_command_parser().parse_known_args(argv[launch + 1 :])
    n = asked.num_processes or 1
    if n > 1:
        raise UserError(
            f"accelerate launch --num_processes {n} started one process (accelerate runs one without --multi_gpu "
            f"on a machine without {n} GPUs): add --multi_gpu, which on CPU starts {n} gloo processes as "
            f"`torchrun --nproc-per-node {n} -m distillab train CONFIG` does"
        )


def check_parallelism(train_cfg, fsdp: bool) -> None:
    """Refuse FSDP: chunked KD reads the lm_head weight outside the forward, and on-policy generates with the bare
    module, both of which FSDP has resharded by then; the rest is untested (see README)."""
    if fsdp and train_cfg.chunk_size:
        raise UserError("FSDP with chunked KD (train.chunk_size > 0) is not supported: use DDP, or chunk_size = 0")
    if fsdp and train_cfg.on_policy_fraction > 0:
        raise UserError("FSDP with on-policy distillation (train.on_policy_fraction > 0) is not supported: use DDP")
    if fsdp:  # the README's supported-models table lists what is tested; FSDP is not, so it is refused
        raise UserError(
            "FSDP is not supported yet (it is untested): use DDP (accelerate launch without an FSDP config)"
        )


class _StopAfter(TrainerCallback):
    """Ends training after N steps: what a kill looks like to the checkpoint logic (used by tests)."""

    def __init__(self, steps: int):
        self.steps = steps

    def on_step_end(self, args, state, control, **kw):
        if state.global_step >= self.steps:
            control.should_save = True
            control.should_training_stop = True


def n_tokens_seen(trainer) -> int:
    """Prompt + completion tokens trained on: one pass's tokens (task and replay rows, each once) times passes made."""
    n_rows, per_pass = trainer.train_dataset.pass_tokens()
    args = trainer.args
    steps_per_pass = max(
        1, -(-n_rows // (args.per_device_train_batch_size * args.world_size * args.gradient_accumulation_steps))
    )
    return int(per_pass * trainer.state.global_step / steps_per_pass)


def train_flops(model, tokens: int) -> float:
    """6 * parameters * tokens: the usual forward+backward estimate (trainable or not, all weights run)."""
    return 6.0 * sum(p.numel() for p in model.parameters()) * tokens


def _save_student(model, tok, run: RunDir, summary: TrainSummary, cfg: RunConfig) -> None:
    """student/: the plain model (LoRA merged in) that loads anywhere, and for LoRA runs also the adapter
    itself in student/adapter/ (PeftModel.from_pretrained(base, "student/adapter"))."""
    from distillab import modelcard, provenance

    with atomic_dir(run.student) as tmp:
        if hasattr(model, "merge_and_unload"):
            model.save_pretrained(str(tmp / "adapter"), safe_serialization=True)
            model = model.merge_and_unload()
        model.save_pretrained(str(tmp), safe_serialization=True)
        tok.save_pretrained(str(tmp))
        write_atomic(tmp / run.train_summary.name, json.dumps(summary.to_dict(), indent=1, default=float))
        lineage = provenance.build_lineage(
            run.dataset("train"),
            base_model=cfg.train.student,
            train_summary=summary.to_dict(),
            student_hub_id=cfg.train.student_hub_id,
        )
        lineage["model"] = f"{cfg.name}/student"  # the name it will have, not the staging directory's
        modelcard.write_model_card(tmp, lineage)
