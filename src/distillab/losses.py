"""Distillation losses: small pure functions from student logits and a teacher distribution to a scalar.

Every loss takes student logits (..., T, V), a target, a token mask (..., T) bool and a temperature, and returns the
mean over the masked-in tokens (``reduction="mean"``) or ``(sum, token_count)`` (``reduction="sum"``), so that a
trainer can divide by the token count of a whole gradient-accumulation window instead of averaging per micro-batch.
Masked-out tokens are dropped before any arithmetic, so garbage (even NaN) at padded positions cannot leak in.

The target is a :class:`TeacherDist` for the distillation losses, or int64 labels (..., T) for ``ce``.
:data:`REGISTRY` is the one list of losses (name -> :class:`LossSpec`): ``kd_loss`` dispatches on it, config.py writes
the names of :data:`LOSS_NAMES` out (it must not import torch; tests/test_losses.py holds the two equal), and
tests/test_losses.py checks every entry against a naive reference.

Divergences (p = teacher, q = student, both at the given temperature)::

    forward_kl        KL(p || q)
    reverse_kl        KL(q || p)
    jsd               beta * KL(p || m) + (1 - beta) * KL(q || m),  m = beta * p + (1 - beta) * q   (GKD, eq. 1)
                      beta = 0 returns KL(p || q) and beta = 1 returns KL(q || p) exactly. That is GKD's (and TRL's)
                      convention: the unscaled formula itself goes to 0 at both ends, but jsd(beta) / beta -> KL(p || q)
                      as beta -> 0 and jsd(beta) / (1 - beta) -> KL(q || p) as beta -> 1, so the endpoints are those
                      limits of the rescaled divergence.
    skew_forward_kl   KL(p || alpha * p + (1 - alpha) * q)   (DistiLLM's alpha-SKL; alpha = 0 is forward_kl)
    skew_reverse_kl   KL(q || alpha * q + (1 - alpha) * p)   (DistiLLM's alpha-SRKL; alpha = 0 is reverse_kl)
    tvd               0.5 * sum |p - q|
    ce                -log q[label]  (plain next-token cross-entropy; temperature divides the logits too)

Temperature. Dense logits (student and teacher) are divided by ``temperature`` before the softmax. The loss is NOT
multiplied by temperature**2 (Hinton's gradient-scale correction); GKD and TRL don't either, and a caller who wants it
can scale the result.

Sparse teacher (top-k) and the tail bucket. A cached teacher is stored as its top-k ids (..., T, k) and their
log-probabilities (..., T, k), normalised over the teacher's FULL vocab, so their probabilities sum to S <= 1. The
missing mass is kept as one "tail bucket". The student is compared on the same k + 1 buckets: its probabilities at the k
teacher ids, plus its own tail 1 - sum(q[ids]). The student tail is computed as a logsumexp over the student logits that
are NOT among the ids (never as 1 - sum, which cancels catastrophically when the tail is tiny). All divergences are then
exact divergences between these two (k + 1)-bucket distributions.
Temperature in the sparse case: the student logits are divided by ``temperature`` as in the dense case. The teacher's
stored log-probs were computed at ``TeacherDist.logprob_temperature`` (default 1); they are re-tempered by scaling them
with ``logprob_temperature / temperature`` and renormalising over the k ids to the top-k's mass, i.e. the teacher's
mass inside its top-k is redistributed as the tempered teacher would, while the tail keeps its stored mass (the tail's
shape is unknown, so its tempered mass is too). When ``temperature == logprob_temperature`` the stored log-probs are
used as they are, and with k = V this re-tempering is exactly the dense tempered softmax.

The rules of the sparse teacher, each checked (a ValueError names the first offending position):
- Ids are distinct per position and inside the (student's, or ``vocab_size``'s) vocab, so k <= V; their order does not
  matter. They cover the vocab exactly when k = V: then both tails are empty and every loss equals its dense value.
  Coverage is decided by the ids alone, never by the student's values: a student with -inf logits outside the ids has
  an empty tail while the teacher's is not, and gets what the dense loss gives it, +inf for forward KL (finite for the
  losses that mix q into the reference: jsd, skew KLs, tvd, reverse KL).
- The teacher's tail mass is ``exp(tail_logprob)`` where the producer stored it (more precise than 1 - S of rounded or
  quantised log-probs; the top-k are then renormalised to 1 - tail), and 1 - S where it did not: ``tail_logprob=None``
  for the whole batch, or NaN at a position (a row with no stored tail: a collate fills NaN, never 0, which is a
  tail of mass 1). A stored tail must agree with its top-k, |S + tail - 1| <= TAIL_TOLERANCE (the codec's worst case,
  0.034, is a third of it; a missing tail stored as 0 is far outside), and a log tail above 0 (mass over 1) is an error.
- A position whose log-probs are all -inf puts all its mass in the tail (S = 0, tail 1): the student is pulled to put
  its mass outside those ids.
- A teacher tail below TAIL_FLOOR (1e-6, about the round-off of an fp32 sum of k probabilities; S above 1 included) is
  raised to it, with the top-k renormalised to 1 - TAIL_FLOOR, because a softmax teacher always has some mass there
  and an empty teacher tail would make reverse KL infinite against any student with a tail.
Sparse against dense. At ``temperature == logprob_temperature`` with a teacher tail of at least TAIL_FLOOR (or k = V),
the bucket distributions are a coarsening of the full ones, so by the data processing inequality (every loss here is
an f-divergence) the sparse loss never exceeds the full-vocab loss against the same teacher. Where the floor lifts a
smaller tail, the teacher moves by less than TAIL_FLOOR in total variation and the sparse loss can exceed the dense one
slightly: for forward KL by at most TAIL_FLOOR * (log(1 / student tail) + log(k) + 15) (a cross-entropy term plus
Fannes' bound on the entropy change), 1e-4 nats for a student tail of e**-80.

Padded vocabularies. Models sharing a tokenizer often pad the embedding matrix differently (e.g. 151,936 vs 152,064
rows); padded rows are never real tokens. :func:`align_vocab` truncates both logits to the smaller size. In the
sparse case, ``TeacherDist.vocab_size`` (when given) truncates the student logits to the teacher's true vocab the same
way, and a top-k id outside the student's vocab is an error that names both sizes.

Chunked full-vocab KD. :func:`chunked_kd_loss` computes any of these losses from hidden states and the ``lm_head``
weight (then the model's own final logit transform, see distillab.logits) a chunk of tokens at a time, and never
materialises the (N, V) logits of all tokens (nor the teacher's): the gradients w.r.t. the hidden states and the lm_head
weight are computed chunk by chunk during the forward, the way Liger's fused linear cross-entropy does, so peak memory
is about one chunk's logits plus the weight gradient.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import Tensor

NEG_INF = float("-inf")
TAIL_FLOOR = 1e-6  # smallest teacher tail mass used in the sparse case (unless the ids cover the vocab)
LOG_TAIL_FLOOR = math.log(TAIL_FLOOR)
TAIL_TOLERANCE = 0.1  # largest |top-k mass + stored tail mass - 1| accepted from a producer


@dataclass(frozen=True)
class TeacherDist:
    """The teacher's next-token distribution: dense ``logits`` OR sparse top-k (``ids``, ``logprobs``)."""

    logits: Tensor | None = None  # (..., T, Vt) raw teacher logits
    ids: Tensor | None = None  # (..., T, k) int64, distinct per position
    logprobs: Tensor | None = None  # (..., T, k) log-probs at ids, normalised over the teacher's full vocab
    tail_logprob: Tensor | None = None  # (..., T) log mass outside the ids; None, or NaN at a position: 1 - sum(p)
    logprob_temperature: float = 1.0  # the temperature the stored logprobs were computed at
    vocab_size: int | None = None  # the teacher's true vocab (sparse only): student logits beyond it are padding

    def __post_init__(self):
        dense, sparse = self.logits is not None, self.ids is not None or self.logprobs is not None
        if dense == sparse:
            raise ValueError("TeacherDist needs either logits, or ids and logprobs (not both, not neither)")
        if sparse and (self.ids is None or self.logprobs is None or self.ids.shape != self.logprobs.shape):
            raise ValueError("a sparse TeacherDist needs ids and logprobs of the same shape (..., T, k)")
        if self.tail_logprob is not None and (not sparse or self.tail_logprob.shape != self.ids.shape[:-1]):
            raise ValueError("tail_logprob goes with a sparse TeacherDist and has shape (..., T)")

    @property
    def is_sparse(self) -> bool:
        return self.ids is not None


@dataclass(frozen=True)
class TeacherHidden:
    """A dense teacher given as final hidden states and its lm_head, for :func:`chunked_kd_loss`."""

    hidden: Tensor  # (..., T, Ht)
    lm_head_weight: Tensor  # (Vt, Ht)
    logit_transform: Callable[[Tensor], Tensor] | None = None  # the teacher's final transform (distillab.logits)


def align_vocab(student_logits: Tensor, teacher_logits: Tensor) -> tuple[Tensor, Tensor]:
    """Truncate both logits to the smaller last dim, the true shared vocab (the rest is embedding padding). Views."""
    vocab = min(student_logits.shape[-1], teacher_logits.shape[-1])
    return student_logits[..., :vocab], teacher_logits[..., :vocab]


# ---------------------------------------------------------------------------------------------------------------------
# Bucket log-probabilities: both distributions as (N, B) log-probs over the same B buckets (B = V dense, k + 1 sparse).


def _compute_dtype(x: Tensor) -> torch.dtype:
    # bf16/fp16 softmaxes over 100k+ entries lose too much; fp64 stays fp64 so tests can check to 1e-12
    return torch.float64 if x.dtype == torch.float64 else torch.float32


class _LogSumExpOutside(torch.autograd.Function):
    """log sum_{j not in ids} exp(x_j) per row: (N, V), (N, k) -> (N, 1); -inf, with a zero gradient, for a row whose
    ids cover everything.

    Written by hand for two reasons: torch.logsumexp's backward is NaN on an all -inf row even under a zero incoming
    gradient (exp(-inf - -inf)), and the plain version (masked copy, shifted copy, exp, saved exp) keeps four (N, V)
    temporaries where this keeps one, which is most of the chunked loss's memory.
    """

    @staticmethod
    def forward(ctx, x, ids):
        rest = x.scatter(-1, ids, NEG_INF)  # (N, V), the only temporary
        row_max = rest.amax(-1, keepdim=True)  # (N, 1), shift for a stable exp
        row_max = torch.where(torch.isinf(row_max), 0.0, row_max)
        total = rest.sub_(row_max).exp_().sum(-1, keepdim=True)  # (N, 1); 0 only when nothing is outside the ids
        del rest
        out = row_max + torch.log(total)  # log 0 = -inf for an empty row
        ctx.save_for_backward(x, ids, out)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        x, ids, out = ctx.saved_tensors
        # d out / d x_j = exp(x_j - out) off the ids, 0 on them (and for an empty row, all of whose entries are ids)
        finite_out = torch.where(torch.isinf(out), 0.0, out)
        grad = torch.exp(x - finite_out).mul_(grad_out).scatter_(-1, ids, 0.0)  # (N, V)
        return grad, None


def _log1mexp(x: Tensor) -> Tensor:
    """log(1 - exp(x)) for x <= 0, accurate at both ends (Maechler 2012)."""
    return torch.where(x > -math.log(2), torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


def _tempered_log_softmax(logits: Tensor, temperature: float) -> Tensor:
    logits = logits.to(_compute_dtype(logits))
    if temperature != 1.0:  # skipping it at 1 saves an (N, V) copy
        logits = logits / temperature
    return F.log_softmax(logits, dim=-1)


def _student_sparse_buckets(student_logits: Tensor, ids: Tensor, temperature: float) -> Tensor:
    """Student log-probs at the teacher's k ids plus its tail bucket. (N, V), (N, k) -> (N, k + 1)."""
    log_q = _tempered_log_softmax(student_logits, temperature)  # (N, V)
    at_ids = log_q.gather(-1, ids)  # (N, k)
    # the tail as a logsumexp over the non-top-k entries: exact even when it is 1e-12 of the mass
    tail = _LogSumExpOutside.apply(log_q, ids)  # (N, 1)
    return torch.cat([at_ids, tail], dim=-1)  # (N, k + 1)


def _teacher_sparse_buckets(teacher: TeacherDist, temperature: float, covers: bool, dtype: torch.dtype) -> Tensor:
    """Teacher log-probs at its k ids, re-tempered within the top-k, plus its tail bucket. -> (N, k + 1).

    covers: the ids cover the whole (shared) vocab, so nothing is outside them. The rules are the module docstring's.
    """
    stored = teacher.logprobs.to(dtype)  # (N, k)
    empty = stored.amax(-1, keepdim=True) == NEG_INF  # (N, 1) no mass on any id: it is all in the tail
    stored = stored.masked_fill(empty, 0.0)  # any finite values: their mass is set to 0 below; keeps NaN out
    # log(1 - S); S a hair above 1 (rounding, quantisation) gives -inf here, then the floor below
    derived = _log1mexp(torch.logsumexp(stored, -1, keepdim=True).clamp(max=0.0))  # (N, 1)
    if teacher.tail_logprob is not None:
        given = teacher.tail_logprob.to(dtype)[:, None]  # (N, 1), NaN where the producer stored none
        derived = torch.where(torch.isnan(given), derived, given)
    log_tail = derived.masked_fill(empty, 0.0)
    if covers:
        log_tail = torch.full_like(log_tail, NEG_INF)
    else:
        # A softmax teacher always has some mass outside its top-k, and an empty teacher tail would make reverse KL
        # infinite against a student that has any; 1 - S below ~1e-6 is round-off of the fp32 sum anyway.
        log_tail = log_tail.clamp(min=LOG_TAIL_FLOOR)
    log_mass = _log1mexp(log_tail)  # (N, 1) log of the top-k's mass, 1 - tail (-inf for an empty row)
    rescale = teacher.logprob_temperature / temperature
    # the (tempered) teacher's distribution inside its top-k, scaled to the top-k's mass; at rescale 1 with a derived
    # tail this is the stored log-probs up to round-off
    at_ids = F.log_softmax(stored * rescale, dim=-1) + log_mass  # (N, k)
    return torch.cat([at_ids, log_tail], dim=-1)  # (N, k + 1)


def _bucket_logprobs(student_logits: Tensor, teacher: TeacherDist, temperature: float) -> tuple[Tensor, Tensor]:
    """(log_p teacher, log_q student), each (N, B), from student logits (N, V) and a teacher on the same N tokens."""
    if not teacher.is_sparse:
        student_logits, teacher_logits = align_vocab(student_logits, teacher.logits)
        log_q = _tempered_log_softmax(student_logits, temperature)  # (N, V)
        log_p = _tempered_log_softmax(teacher_logits.to(log_q.dtype), temperature)  # (N, V)
        return log_p, log_q
    if teacher.vocab_size is not None:
        student_logits = student_logits[..., : teacher.vocab_size]
    vocab = student_logits.shape[-1]
    _check_sparse_teacher(teacher, vocab)
    log_q = _student_sparse_buckets(student_logits, teacher.ids, temperature)  # (N, k + 1)
    # distinct in-range ids cover the vocab exactly when there are V of them
    log_p = _teacher_sparse_buckets(teacher, temperature, teacher.ids.shape[-1] == vocab, log_q.dtype)  # (N, k + 1)
    return log_p, log_q


def _check_sparse_teacher(teacher: TeacherDist, vocab: int) -> None:
    """The sparse rules of the module docstring, on the selected (N, k) rows; a ValueError names the first bad one."""
    ids, k = teacher.ids, teacher.ids.shape[-1]
    where = f"teacher vocab {teacher.vocab_size if teacher.vocab_size is not None else 'not given'}"
    if k > vocab:
        raise ValueError(f"{k} teacher top-k ids per position, more than the student's vocab of {vocab} ({where})")
    if ids.numel() == 0:
        return
    lowest, highest = int(ids.min()), int(ids.max())
    if lowest < 0 or highest >= vocab:
        bad = highest if highest >= vocab else lowest
        raise ValueError(f"teacher top-k id {bad} is outside the student's vocab of {vocab} ({where})")
    ordered = ids.sort(-1).values  # (N, k)
    repeats = ordered[:, 1:] == ordered[:, :-1]  # (N, k - 1)
    if bool(repeats.any()):
        row, col = (int(i) for i in repeats.nonzero()[0])
        raise ValueError(
            f"teacher top-k ids repeat within a position (id {int(ordered[row, col])} twice at selected "
            f"token {row}): each id's mass would be counted twice"
        )
    if k == vocab and bool((teacher.logprobs.amax(-1) == NEG_INF).any()):
        raise ValueError("a teacher position whose ids cover the whole vocab has no finite log-prob: no distribution")
    if teacher.tail_logprob is None:
        return
    tail = teacher.tail_logprob.double()  # (N,)
    top_mass = teacher.logprobs.double().logsumexp(-1).exp()  # (N,) S
    off = (tail > 1e-6) | ((top_mass + tail.exp() - 1).abs() > TAIL_TOLERANCE)  # NaN tails compare False: derived
    if bool(off.any()):
        row = int(off.nonzero()[0])
        raise ValueError(
            f"teacher tail_logprob {tail[row].item():.4g} (mass {tail[row].exp().item():.4g}) at selected token {row} "
            f"disagrees with its top-k mass {top_mass[row].item():.4g}: they must sum to 1 within {TAIL_TOLERANCE}. "
            "A position without a stored tail is NaN (derived as 1 - top-k mass), never 0 (a tail of mass 1)"
        )


# ---------------------------------------------------------------------------------------------------------------------
# Divergences between bucket distributions: (N, B) log-probs -> (N,) per token. Zero-probability buckets (an empty
# tail) are handled so that 0 * log 0 = 0 in the value AND no NaN reaches the gradient.


def _kl(log_a: Tensor, log_b: Tensor) -> Tensor:
    """KL(a || b) per row: sum a * (log a - log b), with 0 * log(0 / b) = 0."""
    # -inf - -inf is NaN; the where keeps it out of the value, and its backward sends 0 (not 0 * NaN) to log_b
    log_ratio = torch.where(log_a == NEG_INF, 0.0, log_a - log_b)
    return (log_a.exp() * log_ratio).sum(-1)


def _log_mix(log_a: Tensor, log_b: Tensor, weight_a: float) -> Tensor:
    """log(weight_a * a + (1 - weight_a) * b), elementwise, for weight_a in [0, 1]."""
    both_zero = (log_a == NEG_INF) & (log_b == NEG_INF)  # logaddexp's backward is NaN there
    log_a = log_a.masked_fill(both_zero, 0.0) + (math.log(weight_a) if weight_a > 0 else NEG_INF)
    log_b = log_b.masked_fill(both_zero, 0.0) + (math.log1p(-weight_a) if weight_a < 1 else NEG_INF)
    return torch.logaddexp(log_a, log_b).masked_fill(both_zero, NEG_INF)


def _forward_kl(log_p: Tensor, log_q: Tensor, beta: float, alpha: float) -> Tensor:
    return _kl(log_p, log_q)


def _reverse_kl(log_p: Tensor, log_q: Tensor, beta: float, alpha: float) -> Tensor:
    return _kl(log_q, log_p)


def _jsd(log_p: Tensor, log_q: Tensor, beta: float, alpha: float) -> Tensor:
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"jsd needs 0 <= beta <= 1, got {beta}")
    if beta == 0.0:  # GKD's convention: the limit of jsd / beta
        return _kl(log_p, log_q)
    if beta == 1.0:  # ... and of jsd / (1 - beta)
        return _kl(log_q, log_p)
    log_m = _log_mix(log_p, log_q, beta)  # (N, B) mixture beta * p + (1 - beta) * q
    return beta * _kl(log_p, log_m) + (1.0 - beta) * _kl(log_q, log_m)


def _skew_forward_kl(log_p: Tensor, log_q: Tensor, beta: float, alpha: float) -> Tensor:
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"skew KL needs 0 <= alpha <= 1, got {alpha}")
    return _kl(log_p, _log_mix(log_p, log_q, alpha))  # KL(p || alpha p + (1 - alpha) q)


def _skew_reverse_kl(log_p: Tensor, log_q: Tensor, beta: float, alpha: float) -> Tensor:
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"skew KL needs 0 <= alpha <= 1, got {alpha}")
    return _kl(log_q, _log_mix(log_q, log_p, alpha))  # KL(q || alpha q + (1 - alpha) p)


def _tvd(log_p: Tensor, log_q: Tensor, beta: float, alpha: float) -> Tensor:
    return 0.5 * (log_p.exp() - log_q.exp()).abs().sum(-1)


@dataclass(frozen=True)
class LossSpec:
    """One loss: what kd_loss needs to compute it, and what its tests need to check it against a naive reference.

    The dense and the sparse teacher share the divergence: both arrive as log-probs over the same B buckets (the vocab,
    or the k ids plus the tail), so a new divergence is one function of (log_p, log_q) and one entry here.
    """

    divergence: Callable[[Tensor, Tensor, float, float], Tensor] | None  # (log_p, log_q (N, B), beta, alpha) -> (N,)
    formula: str  # p = teacher, q = student: what tests/test_losses.py writes out naively, one token at a time
    params: tuple[str, ...] = ()  # which of beta, alpha it reads (the tests move exactly these off their defaults)
    labels: bool = False  # its target is int64 labels (..., T), not a TeacherDist; divergence is None


REGISTRY: dict[str, LossSpec] = {
    "ce": LossSpec(divergence=None, formula="-log q[label]", labels=True),
    "forward_kl": LossSpec(divergence=_forward_kl, formula="KL(p || q)"),
    "reverse_kl": LossSpec(divergence=_reverse_kl, formula="KL(q || p)"),
    "jsd": LossSpec(
        divergence=_jsd, formula="beta KL(p || m) + (1 - beta) KL(q || m), m = beta p + (1 - beta) q", params=("beta",)
    ),
    "skew_forward_kl": LossSpec(
        divergence=_skew_forward_kl, formula="KL(p || alpha p + (1 - alpha) q)", params=("alpha",)
    ),
    "skew_reverse_kl": LossSpec(
        divergence=_skew_reverse_kl, formula="KL(q || alpha q + (1 - alpha) p)", params=("alpha",)
    ),
    "tvd": LossSpec(divergence=_tvd, formula="0.5 sum |p - q|"),
}
LOSS_NAMES: tuple[str, ...] = tuple(REGISTRY)  # config.LossName spells these out
KD_LOSS_NAMES: tuple[str, ...] = tuple(name for name, spec in REGISTRY.items() if not spec.labels)


def _spec(name: str) -> LossSpec:
    if name not in REGISTRY:
        raise KeyError(f"unknown loss {name!r}; known: {', '.join(LOSS_NAMES)}")
    return REGISTRY[name]


def _token_losses(
    name: str, student_logits: Tensor, target: TeacherDist | Tensor, temperature: float, beta: float, alpha: float
) -> Tensor:
    """Per-token loss (N,) from student logits (N, V) and a target already restricted to the same N tokens."""
    spec = _spec(name)
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if spec.labels:
        if isinstance(target, TeacherDist):
            raise TypeError(f"{name} takes int64 labels (..., T), not a TeacherDist")
        log_q = _tempered_log_softmax(student_logits, temperature)  # (N, V)
        return F.nll_loss(log_q, target, reduction="none")  # (N,)
    if not isinstance(target, TeacherDist):
        raise TypeError(f"{name} takes a TeacherDist, not {type(target).__name__}")
    log_p, log_q = _bucket_logprobs(student_logits, target, temperature)  # (N, B) each
    return spec.divergence(log_p, log_q, beta, alpha)


# ---------------------------------------------------------------------------------------------------------------------
# Masking and reduction


def _select_tokens(x: Tensor, mask: Tensor | None, lead_shape: torch.Size) -> Tensor:
    """(..., T, *rest) -> (N, *rest), the masked-in tokens only. A full mask is a view, not a copy of the logits."""
    if mask is None or bool(mask.all()):
        return x.reshape(-1, *x.shape[len(lead_shape) :])
    return x[mask]


def _select_target(target: TeacherDist | TeacherHidden | Tensor, mask: Tensor | None, lead_shape: torch.Size):
    if isinstance(target, TeacherHidden):
        return replace(target, hidden=_select_tokens(target.hidden, mask, lead_shape))
    if isinstance(target, TeacherDist):
        if target.is_sparse:
            tail = target.tail_logprob
            return replace(
                target,
                ids=_select_tokens(target.ids, mask, lead_shape),
                logprobs=_select_tokens(target.logprobs, mask, lead_shape),
                tail_logprob=None if tail is None else _select_tokens(tail[..., None], mask, lead_shape)[:, 0],
            )
        return replace(target, logits=_select_tokens(target.logits, mask, lead_shape))
    return _select_tokens(target, mask, lead_shape)  # labels (..., T) -> (N,)


def _check_mask(mask: Tensor | None, lead_shape: torch.Size) -> None:
    if mask is not None and (mask.dtype != torch.bool or mask.shape != lead_shape):
        raise ValueError(f"mask must be bool of shape {tuple(lead_shape)}, got {mask.dtype} {tuple(mask.shape)}")


def _reduce(total: Tensor, n_tokens: int, reduction: str):
    if reduction == "sum":
        return total, n_tokens
    if reduction == "mean":
        return total / max(n_tokens, 1)  # no tokens -> 0, with a (zero) gradient path
    raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")


# ---------------------------------------------------------------------------------------------------------------------
# Public losses on logits


def kd_loss(
    name: str,
    student_logits: Tensor,
    target: TeacherDist | Tensor,
    mask: Tensor | None = None,
    temperature: float = 1.0,
    beta: float = 0.5,
    alpha: float = 0.1,
    reduction: str = "mean",
):
    """Any loss in REGISTRY by name; the uniform call a trainer uses. target: TeacherDist, or labels (..., T) for "ce".

    student_logits (..., T, V); mask (..., T) bool (None = every token). beta is used by jsd only, alpha by the
    skew KLs only. Returns the mean over masked-in tokens, or (sum, token_count) with reduction="sum".
    """
    lead_shape = student_logits.shape[:-1]  # (..., T)
    _check_mask(mask, lead_shape)
    logits = _select_tokens(student_logits, mask, lead_shape)  # (N, V)
    per_token = _token_losses(name, logits, _select_target(target, mask, lead_shape), temperature, beta, alpha)  # (N,)
    return _reduce(per_token.sum(), per_token.shape[0], reduction)


def forward_kl(student_logits, teacher: TeacherDist, mask=None, temperature=1.0, reduction="mean"):
    """KL(teacher || student), mean over masked tokens. Shapes: (..., T, V), TeacherDist, (..., T)."""
    return kd_loss("forward_kl", student_logits, teacher, mask, temperature, reduction=reduction)


def reverse_kl(student_logits, teacher: TeacherDist, mask=None, temperature=1.0, reduction="mean"):
    """KL(student || teacher), mean over masked tokens."""
    return kd_loss("reverse_kl", student_logits, teacher, mask, temperature, reduction=reduction)


def jsd(student_logits, teacher: TeacherDist, mask=None, temperature=1.0, reduction="mean", beta=0.5):
    """GKD's generalized JSD; beta = 0 is forward KL, beta = 1 reverse KL (see the module docstring)."""
    return kd_loss("jsd", student_logits, teacher, mask, temperature, beta=beta, reduction=reduction)


def skew_forward_kl(student_logits, teacher: TeacherDist, mask=None, temperature=1.0, reduction="mean", alpha=0.1):
    """DistiLLM's alpha-skew KL: KL(p || alpha p + (1 - alpha) q)."""
    return kd_loss("skew_forward_kl", student_logits, teacher, mask, temperature, alpha=alpha, reduction=reduction)


def skew_reverse_kl(student_logits, teacher: TeacherDist, mask=None, temperature=1.0, reduction="mean", alpha=0.1):
    """DistiLLM's alpha-skew reverse KL: KL(q || alpha q + (1 - alpha) p)."""
    return kd_loss("skew_reverse_kl", student_logits, teacher, mask, temperature, alpha=alpha, reduction=reduction)


def tvd(student_logits, teacher: TeacherDist, mask=None, temperature=1.0, reduction="mean"):
    """Total variation distance 0.5 * sum |p - q|."""
    return kd_loss("tvd", student_logits, teacher, mask, temperature, reduction=reduction)


def ce(student_logits, labels: Tensor, mask=None, temperature=1.0, reduction="mean"):
    """Cross-entropy against int64 labels (..., T) (already shifted to align with the logits)."""
    return kd_loss("ce", student_logits, labels, mask, temperature, reduction=reduction)


# ---------------------------------------------------------------------------------------------------------------------
# Chunked full-vocab KD from hidden states


# 256 tokens: 128 MiB of fp32 logits at a 128k vocab. Much smaller chunks are slower, not just leaner: every chunk
# adds a rank-`chunk` update into the whole (V, H) lm_head gradient, which is memory-bound below ~128 rows on a CPU
# (measured in benchmarks/bench_chunked_loss.py: 64 rows took 1.4x the naive time, 256 rows 0.9x).
DEFAULT_CHUNK_SIZE = 256


def _chunk_target(target, start: int, end: int):
    """The target rows [start, end) of already-selected (N, ...) targets; a TeacherHidden becomes dense logits."""
    if isinstance(target, TeacherHidden):
        logits = target.hidden[start:end] @ target.lm_head_weight.T  # (c, Vt), teacher: no grad
        return TeacherDist(logits=logits if target.logit_transform is None else target.logit_transform(logits))
    if isinstance(target, TeacherDist):
        if target.is_sparse:
            tail = None if target.tail_logprob is None else target.tail_logprob[start:end]
            return replace(target, ids=target.ids[start:end], logprobs=target.logprobs[start:end], tail_logprob=tail)
        return replace(target, logits=target.logits[start:end])
    return target[start:end]


class _ChunkedLinearLoss(torch.autograd.Function):
    """scale * (sum of per-token losses of hidden @ weight.T). The gradients for hidden and weight are made chunk by
    chunk in forward, so no (N, V) tensor ever exists; backward only multiplies them by the incoming gradient, in place
    (a copy would double the (V, H) weight gradient), and skips even that for the usual incoming 1."""

    @staticmethod
    def forward(ctx, hidden, weight, name, target, chunk_size, temperature, beta, alpha, scale, transform):
        # hidden (N, H), weight (V, H)
        want_hidden_grad, want_weight_grad = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_hidden = torch.zeros_like(hidden) if want_hidden_grad else None  # (N, H)
        grad_weight = torch.zeros_like(weight) if want_weight_grad else None  # (V, H)
        total = torch.zeros((), dtype=_compute_dtype(hidden), device=hidden.device)
        for start in range(0, hidden.shape[0], chunk_size):
            end = min(start + chunk_size, hidden.shape[0])
            hidden_chunk = hidden[start:end]  # (c, H)
            # made with grad off (Function.forward runs so): a leaf, so autograd stops at the logits
            logits = hidden_chunk @ weight.T  # (c, V), the only student logits alive
            chunk_target = _chunk_target(target, start, end)
            with torch.enable_grad():
                logits.requires_grad_(True)
                # the model's own final step (softcap, scale), inside the graph so its derivative reaches grad_logits
                final = logits if transform is None else transform(logits)  # (c, V)
                chunk_loss = _token_losses(name, final, chunk_target, temperature, beta, alpha).sum() * scale
                (grad_logits,) = torch.autograd.grad(chunk_loss, logits)  # (c, V)
            total += chunk_loss.detach()
            if want_hidden_grad:
                grad_hidden[start:end] = grad_logits @ weight  # (c, H)
            if want_weight_grad:
                grad_weight.addmm_(grad_logits.T, hidden_chunk)  # (V, H) += (V, c) @ (c, H)
            del logits, final, grad_logits, chunk_loss, chunk_target  # free this chunk's logits before the next is made
        ctx.save_for_backward(grad_hidden, grad_weight)
        ctx.backward_done = False
        return total

    @staticmethod
    def backward(ctx, grad_total):
        if ctx.backward_done:  # the saved gradients were scaled in place; a second pass would scale them twice
            raise RuntimeError("chunked_kd_loss supports a single backward pass (no retain_graph reuse)")
        ctx.backward_done = True
        grad_hidden, grad_weight = ctx.saved_tensors
        if bool(grad_total != 1):
            for grad in (grad_hidden, grad_weight):
                if grad is not None:
                    grad.mul_(grad_total.to(grad.dtype))
        return grad_hidden, grad_weight, None, None, None, None, None, None, None, None


def chunked_kd_loss(
    name: str,
    student_hidden: Tensor,
    lm_head_weight: Tensor,
    target: TeacherHidden | TeacherDist | Tensor,
    mask: Tensor | None = None,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    temperature: float = 1.0,
    beta: float = 0.5,
    alpha: float = 0.1,
    reduction: str = "mean",
    logit_transform: Callable[[Tensor], Tensor] | None = None,
):
    """Any loss in REGISTRY computed from the student's final hidden states, without materialising all logits.

    student_hidden (..., T, H); lm_head_weight (V, H) (no bias, as in Llama/Qwen heads); target: a TeacherHidden
    (hidden (..., T, Ht), lm_head_weight (Vt, Ht), its own logit_transform), a sparse or dense TeacherDist, or labels
    (..., T) for "ce"; mask (..., T). chunk_size tokens are turned into logits at a time. logit_transform: the student
    model's final step after its lm_head (``distillab.logits.logit_transform(model)``: Gemma 2's softcap, Cohere's
    scale, ...), elementwise and parameter-free; None is the identity. Equal to
    kd_loss(name, logit_transform(student_hidden @ lm_head_weight.T), ...) in value and in the gradients w.r.t.
    student_hidden and lm_head_weight; no gradient flows to the teacher. Not twice differentiable.
    """
    lead_shape = student_hidden.shape[:-1]  # (..., T)
    _check_mask(mask, lead_shape)
    hidden = _select_tokens(student_hidden, mask, lead_shape)  # (N, H)
    selected = _select_target(target, mask, lead_shape)
    n_tokens = hidden.shape[0]
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    _spec(name)
    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
    # the mean's 1 / N is applied inside, so a plain loss.backward() hands the Function an incoming gradient of 1
    scale = 1.0 / max(n_tokens, 1) if reduction == "mean" else 1.0
    total = _ChunkedLinearLoss.apply(
        hidden, lm_head_weight, name, selected, chunk_size, temperature, beta, alpha, scale, logit_transform
    )
    return total if reduction == "mean" else (total, n_tokens)
