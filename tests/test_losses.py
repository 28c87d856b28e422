"""distillab.losses against a naive float64 reference written out by hand, values and gradients."""

from __future__ import annotations

import math

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from distillab.losses import (
    KD_LOSS_NAMES,
    LOSS_NAMES,
    REGISTRY,
    TAIL_FLOOR,
    TeacherDist,
    TeacherHidden,
    align_vocab,
    ce,
    chunked_kd_loss,
    forward_kl,
    jsd,
    kd_loss,
    reverse_kl,
    tvd,
)

KD_LOSSES = list(KD_LOSS_NAMES)  # every test below runs on every registered loss
NEG = -math.inf
BETA, ALPHA = 0.3, 0.2  # off the defaults, so a loss that ignores its parameter fails


# ---------------------------------------------------------------------------------------------------------------------
# The naive reference: one token at a time, probabilities written out, float64.


def ref_softmax(x):  # (V,) -> (V,)
    e = torch.exp(x - x.max())
    return e / e.sum()


def ref_kl(a, b):  # KL(a || b) over explicit entries, 0 * log 0 = 0
    return sum(a[i] * torch.log(a[i] / b[i]) for i in range(len(a)) if a[i] > 0)


def ref_jsd(p, q, beta):
    m = beta * p + (1 - beta) * q
    return beta * ref_kl(p, m) + (1 - beta) * ref_kl(q, m)


# One naive reference per registered divergence, written from its formula; a loss added to losses.REGISTRY without one
# here fails test_every_registered_loss_has_a_reference.
REFERENCES = {
    "forward_kl": lambda p, q, beta, alpha: ref_kl(p, q),
    "reverse_kl": lambda p, q, beta, alpha: ref_kl(q, p),
    "jsd": lambda p, q, beta, alpha: ref_jsd(p, q, beta),
    "skew_forward_kl": lambda p, q, beta, alpha: ref_kl(p, alpha * p + (1 - alpha) * q),
    "skew_reverse_kl": lambda p, q, beta, alpha: ref_kl(q, alpha * q + (1 - alpha) * p),
    "tvd": lambda p, q, beta, alpha: 0.5 * sum(abs(p[i] - q[i]) for i in range(len(p))),
}


def ref_divergence(name, p, q, beta=BETA, alpha=ALPHA):
    return REFERENCES[name](p, q, beta, alpha)


def ref_dense(name, student, teacher, mask, temperature):  # (B, T, V), (B, T, V'), (B, T)
    vocab = min(student.shape[-1], teacher.shape[-1])
    losses = []
    for b, t in mask.nonzero().tolist():
        p = ref_softmax(teacher[b, t, :vocab] / temperature)
        q = ref_softmax(student[b, t, :vocab] / temperature)
        losses.append(ref_divergence(name, p, q))
    return sum(losses) / len(losses)


def ref_sparse(name, student, ids, logprobs, mask, temperature, logprob_temperature=1.0, tail=None):
    losses = []
    for b, t in mask.nonzero().tolist():
        q_full = ref_softmax(student[b, t] / temperature)
        q_ids = torch.stack([q_full[i] for i in ids[b, t].tolist()])
        q = torch.cat([q_ids, (1 - q_ids.sum()).reshape(1)])  # k student buckets + its tail
        stored = torch.exp(logprobs[b, t])
        mass = stored.sum() if tail is None else 1 - tail[b, t]
        tempered = torch.exp(logprobs[b, t] * logprob_temperature / temperature)
        p = torch.cat([mass * tempered / tempered.sum(), (1 - mass).reshape(1)])  # top-k mass kept, tail kept
        losses.append(ref_divergence(name, p, q))
    return sum(losses) / len(losses)


def ref_ce(student, labels, mask, temperature):
    losses = [-torch.log(ref_softmax(student[b, t] / temperature)[labels[b, t]]) for b, t in mask.nonzero().tolist()]
    return sum(losses) / len(losses)


# ---------------------------------------------------------------------------------------------------------------------
# Data


def make_logits(seed, shape, scale=2.0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g, dtype=torch.float64) * scale).requires_grad_(True)


def make_mask(seed, shape):
    g = torch.Generator().manual_seed(seed)
    mask = torch.rand(shape, generator=g) > 0.35
    mask.view(-1)[0] = True
    mask.view(-1)[-1] = False  # always at least one masked-out token
    return mask


def top_k(teacher_logits, k, temperature=1.0):  # -> ids (…, k), logprobs (…, k) normalised over the full vocab
    logprobs = torch.log_softmax(teacher_logits.detach() / temperature, dim=-1)
    values, ids = logprobs.topk(k, dim=-1)
    return ids, values


def grad(loss, x):
    return torch.autograd.grad(loss, x)[0]


def kd(name, student, target, mask, temperature, **kw):
    return kd_loss(name, student, target, mask, temperature, beta=BETA, alpha=ALPHA, **kw)


B, T, V = 2, 4, 11


# ---------------------------------------------------------------------------------------------------------------------
# Dense and sparse losses against the reference


@pytest.mark.parametrize("name", KD_LOSSES)
def test_dense_matches_reference(name):
    student, teacher = make_logits(0, (B, T, V)), make_logits(1, (B, T, V)).detach()
    mask, temperature = make_mask(2, (B, T)), 1.7
    got = kd(name, student, TeacherDist(logits=teacher), mask, temperature)
    want = ref_dense(name, student, teacher, mask, temperature)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    got_grad, want_grad = grad(got, student), grad(want, student)
    torch.testing.assert_close(got_grad, want_grad, rtol=1e-9, atol=1e-12)
    assert got_grad[~mask].abs().max() == 0  # masked tokens contribute nothing


@pytest.mark.parametrize("name", KD_LOSSES)
@pytest.mark.parametrize("logprob_temperature", [1.0, 1.3])
def test_sparse_matches_reference(name, logprob_temperature):
    student, teacher = make_logits(3, (B, T, V)), make_logits(4, (B, T, V))
    ids, logprobs = top_k(teacher, k=4, temperature=logprob_temperature)
    mask, temperature = make_mask(5, (B, T)), 2.0
    target = TeacherDist(ids=ids, logprobs=logprobs, logprob_temperature=logprob_temperature)
    got = kd(name, student, target, mask, temperature)
    want = ref_sparse(name, student, ids, logprobs, mask, temperature, logprob_temperature)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    got_grad, want_grad = grad(got, student), grad(want, student)
    torch.testing.assert_close(got_grad, want_grad, rtol=1e-9, atol=1e-12)
    assert got_grad[~mask].abs().max() == 0


@pytest.mark.parametrize("name", ["forward_kl", "reverse_kl", "jsd"])
def test_sparse_explicit_tail_matches_reference(name):
    # a stored tail mass overrides 1 - sum(exp(logprobs)); the top-k are renormalised to 1 - tail
    student, teacher = make_logits(40, (B, T, V)), make_logits(41, (B, T, V))
    ids, logprobs = top_k(teacher, k=3)
    true_tail = 1 - logprobs.exp().sum(-1)
    logprobs = logprobs + 0.02  # as if quantisation had pushed them up a little
    noise = torch.rand((B, T), generator=torch.Generator().manual_seed(42), dtype=torch.float64) * 0.08 - 0.04
    tail = true_tail + noise  # a stored tail that is not 1 - sum(p), within TAIL_TOLERANCE of it
    mask = make_mask(43, (B, T))
    got = kd(name, student, TeacherDist(ids=ids, logprobs=logprobs, tail_logprob=tail.log()), mask, 1.4)
    want = ref_sparse(name, student, ids, logprobs, mask, 1.4, tail=tail)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(grad(got, student), grad(want, student), rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("name", KD_LOSSES)
def test_sparse_with_all_ids_equals_dense(name):
    # k = V: both tails are exactly empty, and re-tempering the top-k is the dense tempered softmax
    student, teacher = make_logits(6, (B, T, V)), make_logits(7, (B, T, V)).detach()
    mask, temperature = make_mask(8, (B, T)), 0.7
    ids, logprobs = top_k(teacher, k=V)
    sparse = kd(name, student, TeacherDist(ids=ids, logprobs=logprobs), mask, temperature)
    dense = kd(name, student, TeacherDist(logits=teacher), mask, temperature)
    torch.testing.assert_close(sparse, dense, rtol=1e-10, atol=1e-12)
    sparse_grad, dense_grad = grad(sparse, student), grad(dense, student)
    assert torch.isfinite(sparse_grad).all()
    torch.testing.assert_close(sparse_grad, dense_grad, rtol=1e-9, atol=1e-12)


def test_sparse_tail_is_accurate_when_tiny():
    # a student whose mass outside the ids is ~1e-20: 1 - sum(q[ids]) would round to 0 in float32, logsumexp doesn't
    student = torch.full((1, 1, 6), -50.0)
    student[..., :2] = 0.0
    ids = torch.tensor([[[0, 1]]])
    target = TeacherDist(ids=ids, logprobs=torch.log(torch.tensor([[[0.25, 0.25]]])))  # teacher tail 0.5
    got = reverse_kl(student, target)  # student tail = 4 e^-50 / (2 + 4 e^-50)
    q_tail = 4 * math.exp(-50) / (2 + 4 * math.exp(-50))
    q_id = (1 - q_tail) / 2
    want = 2 * q_id * math.log(q_id / 0.25) + q_tail * math.log(q_tail / 0.5)
    assert got.dtype == torch.float32
    assert got.item() == pytest.approx(want, rel=1e-5)


@pytest.mark.parametrize("name", ["forward_kl", "reverse_kl"])
def test_sparse_tail_floor_when_logprobs_sum_above_one(name):
    # quantised log-probs can sum above 1: the teacher tail becomes TAIL_FLOOR (not 0, which would make reverse KL
    # infinite) and the top-k are renormalised to 1 - TAIL_FLOOR
    student = make_logits(9, (1, 2, 5))
    ids = torch.tensor([[[0, 3, 4]] * 2])
    normalised = torch.log_softmax(make_logits(10, (1, 2, 3)).detach(), -1)  # sums to 1 over the 3 ids
    got = kd(name, student, TeacherDist(ids=ids, logprobs=normalised + 1e-3), None, 1.0)
    tail = torch.full((1, 2), TAIL_FLOOR, dtype=torch.float64)
    want = ref_sparse(name, student, ids, normalised, torch.ones(1, 2, dtype=torch.bool), 1.0, tail=tail)
    assert torch.isfinite(got)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("temperature", [1.0, 2.5])
def test_ce_matches_reference(temperature):
    student = make_logits(11, (B, T, V))
    labels = torch.randint(0, V, (B, T), generator=torch.Generator().manual_seed(12))
    mask = make_mask(13, (B, T))
    labels[~mask] = -100  # an ignore index at masked positions must not matter
    got = ce(student, labels, mask, temperature)
    want = ref_ce(student, labels, mask, temperature)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(grad(got, student), grad(want, student), rtol=1e-9, atol=1e-12)


# ---------------------------------------------------------------------------------------------------------------------
# JSD conventions, masks, reduction, vocab padding, registry


@pytest.mark.parametrize("sparse", [False, True])
def test_jsd_beta_limits(sparse):
    student, teacher = make_logits(14, (B, T, V)), make_logits(15, (B, T, V)).detach()
    mask, temperature = make_mask(16, (B, T)), 1.3
    ids, logprobs = top_k(teacher, 5)
    target = TeacherDist(ids=ids, logprobs=logprobs) if sparse else TeacherDist(logits=teacher)
    fkl = forward_kl(student, target, mask, temperature)
    rkl = reverse_kl(student, target, mask, temperature)
    # the endpoints are exactly forward / reverse KL (GKD's convention) ...
    torch.testing.assert_close(jsd(student, target, mask, temperature, beta=0.0), fkl, rtol=0, atol=0)
    torch.testing.assert_close(jsd(student, target, mask, temperature, beta=1.0), rkl, rtol=0, atol=0)
    # ... which are the true limits of the rescaled divergence
    eps = 1e-6
    torch.testing.assert_close(jsd(student, target, mask, temperature, beta=eps) / eps, fkl, rtol=1e-4, atol=0)
    torch.testing.assert_close(jsd(student, target, mask, temperature, beta=1 - eps) / eps, rkl, rtol=1e-4, atol=0)


@pytest.mark.parametrize("name", KD_LOSSES + ["ce"])
@pytest.mark.parametrize("sparse", [False, True])
def test_masked_tokens_contribute_nothing_even_if_nan(name, sparse):
    student, teacher = make_logits(17, (B, T, V)), make_logits(18, (B, T, V)).detach()
    mask = make_mask(19, (B, T))
    labels = teacher.argmax(-1)
    ids, logprobs = top_k(teacher, 3)

    def target(poison):
        if name == "ce":
            return labels
        nan = torch.full_like(logprobs, math.nan) if poison else logprobs
        if sparse:
            return TeacherDist(ids=ids, logprobs=torch.where(mask[..., None], logprobs, nan))
        return TeacherDist(logits=torch.where(mask[..., None], teacher, math.nan) if poison else teacher)

    clean = kd(name, student, target(False), mask, 1.0)
    poisoned_student = torch.where(mask[..., None], student, math.nan)
    poisoned = kd(name, poisoned_student, target(True), mask, 1.0)
    torch.testing.assert_close(poisoned, clean, rtol=0, atol=0)
    g = grad(poisoned, student)
    assert torch.isfinite(g).all() and g[~mask].abs().max() == 0


@pytest.mark.parametrize("name", KD_LOSSES)
def test_reduction_sum_normalises_across_microbatches(name):
    # a gradient-accumulation window of two micro-batches with different token counts: sum / count over the window
    # must equal the mean over all its tokens at once (a mean of per-micro-batch means would not)
    student, teacher = make_logits(20, (4, T, V)), make_logits(21, (4, T, V)).detach()
    mask = make_mask(22, (4, T))
    mask[2:, 1:] = False  # the second micro-batch has far fewer tokens
    whole = kd(name, student, TeacherDist(logits=teacher), mask, 1.5)
    halves = (slice(0, 2), slice(2, 4))
    parts = [kd(name, student[h], TeacherDist(logits=teacher[h]), mask[h], 1.5, reduction="sum") for h in halves]
    sums, counts = zip(*parts)
    assert list(counts) == [int(mask[:2].sum()), int(mask[2:].sum())]
    torch.testing.assert_close(sum(sums) / sum(counts), whole, rtol=1e-12, atol=0)
    torch.testing.assert_close(whole, ref_dense(name, student, teacher, mask, 1.5), rtol=1e-10, atol=1e-12)


def test_no_tokens_gives_zero_not_nan():
    student = make_logits(23, (1, 3, V))
    loss = forward_kl(student, TeacherDist(logits=student.detach()), torch.zeros(1, 3, dtype=torch.bool))
    assert loss.item() == 0.0
    assert grad(loss, student).abs().max() == 0


@pytest.mark.parametrize("name", KD_LOSSES)
def test_padded_vocab_is_truncated_to_the_shared_vocab(name):
    # the true vocab is 11; one model pads its embedding to 16 rows (big logits there, so a loss that let them in
    # would differ), the other has exactly the true vocab
    true_student, true_teacher = make_logits(24, (B, T, V)), make_logits(25, (B, T, V)).detach()
    padding = torch.full((B, T, 5), 9.0)
    mask = make_mask(26, (B, T))
    want = ref_dense(name, true_student, true_teacher, mask, 1.2)
    padded_student = kd(name, torch.cat([true_student, padding], -1), TeacherDist(logits=true_teacher), mask, 1.2)
    torch.testing.assert_close(padded_student, want, rtol=1e-10, atol=1e-12)
    padded_teacher = kd(name, true_student, TeacherDist(logits=torch.cat([true_teacher, padding], -1)), mask, 1.2)
    torch.testing.assert_close(padded_teacher, want, rtol=1e-10, atol=1e-12)
    s, t = align_vocab(torch.zeros(2, 151_936), torch.zeros(2, 152_064))
    assert s.shape[-1] == t.shape[-1] == 151_936


def test_sparse_vocab_size_truncates_padded_student():
    true_student, teacher = make_logits(27, (B, T, V)), make_logits(28, (B, T, V)).detach()
    student = torch.cat([true_student, torch.full((B, T, 3), 9.0)], -1)  # padded student
    ids, logprobs = top_k(teacher, 4)
    mask = make_mask(29, (B, T))
    got = forward_kl(student, TeacherDist(ids=ids, logprobs=logprobs, vocab_size=V), mask)
    want = ref_sparse("forward_kl", true_student, ids, logprobs, mask, 1.0)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


def test_sparse_id_outside_student_vocab_names_both_sizes():
    student = make_logits(30, (1, 2, 8))
    ids = torch.tensor([[[0, 9], [1, 2]]])
    with pytest.raises(ValueError, match=r"9 .* student's vocab of 8 .*teacher vocab 10"):
        forward_kl(student, TeacherDist(ids=ids, logprobs=torch.full((1, 2, 2), -1.0), vocab_size=10))


def test_every_registered_loss_has_a_reference():
    assert set(REFERENCES) == set(KD_LOSS_NAMES)  # ce's reference is ref_ce
    assert LOSS_NAMES == tuple(REGISTRY) and set(LOSS_NAMES) == set(KD_LOSS_NAMES) | {"ce"}
    for spec in REGISTRY.values():
        assert spec.formula and set(spec.params) <= {"beta", "alpha"}
        assert (spec.divergence is None) == spec.labels


@pytest.mark.parametrize("name", KD_LOSSES)
def test_each_loss_reads_exactly_its_declared_params(name):
    # the registry says which of beta / alpha a loss reads; moving the others must change nothing
    student, teacher = make_logits(44, (B, T, V)), make_logits(45, (B, T, V)).detach()
    target = TeacherDist(logits=teacher)
    base = kd_loss(name, student, target, None, 1.0, beta=0.3, alpha=0.2)
    for param in ("beta", "alpha"):
        moved = kd_loss(name, student, target, None, 1.0, **{"beta": 0.3, "alpha": 0.2, param: 0.6})
        assert (moved != base) == (param in REGISTRY[name].params), param


def test_registry_and_uniform_call():
    student, teacher = make_logits(31, (B, T, V)), make_logits(32, (B, T, V)).detach()
    mask = make_mask(33, (B, T))
    target = TeacherDist(logits=teacher)
    assert jsd(student, target, mask, 1.0, beta=BETA) == kd("jsd", student, target, mask, 1.0)
    with pytest.raises(KeyError, match="unknown loss 'kl'; known: ce, forward_kl"):
        kd_loss("kl", student, target, mask)
    with pytest.raises(TypeError):
        kd_loss("ce", student, target, mask)
    with pytest.raises(ValueError):
        TeacherDist(logits=teacher, ids=teacher.argmax(-1, keepdim=True))


# ---------------------------------------------------------------------------------------------------------------------
# Chunked KD from hidden states


def rel_err(a, b):
    return ((a - b).norm() / b.norm()).item()


CHUNK_CASES = [(name, "dense") for name in KD_LOSSES] + [(name, "sparse") for name in KD_LOSSES] + [("ce", "labels")]


@pytest.mark.parametrize("name,teacher_kind", CHUNK_CASES)
def test_chunked_equals_unchunked(name, teacher_kind):
    g = torch.Generator().manual_seed(34)
    b, t, h, vocab, teacher_h, teacher_vocab = 2, 9, 8, 37, 12, 40  # teacher vocab padded past the student's
    hidden = torch.randn(b, t, h, generator=g).requires_grad_(True)  # float32: the precision it will run at
    weight = (torch.randn(vocab, h, generator=g) * 0.5).requires_grad_(True)
    teacher_hidden = torch.randn(b, t, teacher_h, generator=g)
    teacher_weight = torch.randn(teacher_vocab, teacher_h, generator=g) * 0.5
    mask = make_mask(35, (b, t))
    teacher_logits = teacher_hidden @ teacher_weight.T
    if teacher_kind == "dense":
        chunked_target, full_target = TeacherHidden(teacher_hidden, teacher_weight), TeacherDist(logits=teacher_logits)
    elif teacher_kind == "sparse":
        ids, logprobs = top_k(teacher_logits[..., :vocab], 6)
        chunked_target = full_target = TeacherDist(ids=ids, logprobs=logprobs.float(), vocab_size=vocab)
    else:
        chunked_target = full_target = torch.randint(0, vocab, (b, t), generator=g)

    full = kd(name, hidden @ weight.T, full_target, mask, 1.5)
    chunked = chunked_kd_loss(
        name, hidden, weight, chunked_target, mask, chunk_size=5, temperature=1.5, beta=BETA, alpha=ALPHA
    )
    upstream = 3.0 if teacher_kind == "dense" else 1.0  # an incoming gradient other than 1 must be applied
    full_grads = torch.autograd.grad(full, (hidden, weight))
    chunked_grads = torch.autograd.grad(chunked * upstream, (hidden, weight))
    assert abs(chunked.item() - full.item()) <= 1e-5 * abs(full.item())
    assert rel_err(chunked_grads[0], upstream * full_grads[0]) <= 1e-5
    assert rel_err(chunked_grads[1], upstream * full_grads[1]) <= 1e-5
    assert chunked_grads[0][~mask].abs().max() == 0


def test_chunked_reduction_sum_and_default_chunk():
    g = torch.Generator().manual_seed(36)
    hidden = torch.randn(3, 7, 8, generator=g, requires_grad=True)
    weight = torch.randn(50, 8, generator=g, requires_grad=True)
    labels = torch.randint(0, 50, (3, 7), generator=g)
    mask = make_mask(37, (3, 7))
    total, count = chunked_kd_loss("ce", hidden, weight, labels, mask, reduction="sum")
    want_total, want_count = ce(hidden @ weight.T, labels, mask, reduction="sum")
    assert count == want_count == int(mask.sum())
    assert abs(total.item() - want_total.item()) <= 1e-5 * abs(want_total.item())
    # normalising by a gradient-accumulation window's token count after the fact gives the mean's gradients
    (chunked_grad,) = torch.autograd.grad(total / count, weight, retain_graph=True)
    (want_grad,) = torch.autograd.grad(want_total / want_count, weight)
    assert rel_err(chunked_grad, want_grad) <= 1e-5
    with pytest.raises(RuntimeError, match="single backward"):  # its saved gradients were scaled in place
        torch.autograd.grad(total, weight)


class LargestTensor(TorchDispatchMode):
    """Records the largest tensor any op produces."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for x in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(x, torch.Tensor):
                self.largest = max(self.largest, x.numel())
        return out


@pytest.mark.parametrize("teacher_kind", ["dense", "sparse"])
def test_chunked_never_materialises_all_logits(teacher_kind):
    g = torch.Generator().manual_seed(38)
    n, h, vocab, chunk = 512, 4, 128, 16  # all logits: 65536 entries; one chunk's: 2048
    hidden = torch.randn(n, h, generator=g, requires_grad=True)
    weight = torch.randn(vocab, h, generator=g, requires_grad=True)
    teacher_hidden, teacher_weight = torch.randn(n, h, generator=g), torch.randn(vocab, h, generator=g)
    if teacher_kind == "dense":
        target = TeacherHidden(teacher_hidden, teacher_weight)
    else:
        ids, logprobs = top_k(teacher_hidden @ teacher_weight.T, 4)
        target = TeacherDist(ids=ids, logprobs=logprobs)
    with LargestTensor() as probe:
        loss = chunked_kd_loss("jsd", hidden, weight, target, None, chunk_size=chunk)
        loss.backward()
    assert probe.largest <= max(chunk * vocab, n * h, vocab * h)  # a chunk's logits, the hidden states, the weight
    assert probe.largest < n * vocab / 8


# ---------------------------------------------------------------------------------------------------------------------
# Sparse-teacher edge cases: the rules of the module docstring, each one a bug once


def one_position(logits):  # (V,) -> (1, 1, V) float64 leaf
    return torch.tensor(logits, dtype=torch.float64).reshape(1, 1, -1).requires_grad_(True)


@pytest.mark.parametrize("name", KD_LOSSES)
def test_student_with_no_mass_outside_the_ids_keeps_the_teacher_tail(name):
    # the teacher's tail (0.3) is real mass; a student with -inf logits outside the ids has none there. That used to
    # drop the teacher's tail (forward KL finite, against a teacher renormalised to its top-k); now coverage comes from
    # the ids alone and every loss is the dense one's: forward KL +inf, the others finite and exact
    student = one_position([1.0, -0.5, NEG, NEG, NEG])
    ids = torch.tensor([[[0, 1]]])
    logprobs = torch.log(torch.tensor([[[0.4, 0.3]]], dtype=torch.float64))
    got = kd(name, student, TeacherDist(ids=ids, logprobs=logprobs), None, 1.0)
    want = ref_sparse(name, student, ids, logprobs, torch.ones(1, 1, dtype=torch.bool), 1.0)
    dense_teacher = torch.log(torch.tensor([[[0.4, 0.3, 0.1, 0.1, 0.1]]], dtype=torch.float64))
    dense = kd(name, student, TeacherDist(logits=dense_teacher), None, 1.0)
    if name == "forward_kl":
        assert got.item() == math.inf == want.item() == dense.item()
        return
    assert math.isfinite(got.item())
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    assert got.item() <= dense.item() + 1e-12  # a coarsening of the dense loss, as the docstring says
    assert torch.isfinite(grad(got, student)[..., :2]).all()


def test_duplicate_ids_and_more_ids_than_vocab_are_refused():
    student = make_logits(46, (1, 2, 5))
    logprobs = torch.full((1, 2, 3), -2.0)
    with pytest.raises(ValueError, match=r"ids repeat within a position \(id 3 twice at selected token 1\)"):
        forward_kl(student, TeacherDist(ids=torch.tensor([[[0, 1, 2], [3, 4, 3]]]), logprobs=logprobs))
    with pytest.raises(ValueError, match="6 teacher top-k ids per position, more than the student's vocab of 5"):
        forward_kl(student, TeacherDist(ids=torch.tensor([[[0, 1, 2, 3, 4, 0]] * 2]), logprobs=torch.zeros(1, 2, 6)))
    # masked-out positions are not checked (padding may hold anything)
    mask = torch.tensor([[True, False]])
    forward_kl(student, TeacherDist(ids=torch.tensor([[[0, 1, 2], [3, 3, 3]]]), logprobs=logprobs), mask)


@pytest.mark.parametrize("stored_tail", [False, True])
def test_teacher_row_with_no_mass_on_its_ids_is_all_tail(stored_tail):
    # all -inf log-probs (an API that returned no alternatives, or none that map to the student's vocab): the teacher's
    # whole mass is outside the ids. It used to give NaN.
    student = one_position([0.5, -1.0, 2.0, 0.0, 1.0])
    ids = torch.tensor([[[0, 2]]])
    logprobs = torch.full((1, 1, 2), NEG, dtype=torch.float64)
    tail = torch.zeros(1, 1, dtype=torch.float64) if stored_tail else None  # log 1: the stored tail agrees
    target = TeacherDist(ids=ids, logprobs=logprobs, tail_logprob=tail)
    q = torch.softmax(student.detach()[0, 0], -1)
    q_ids, q_tail = q[0] + q[2], 1 - q[0] - q[2]
    assert forward_kl(student, target).item() == pytest.approx(-math.log(q_tail), rel=1e-12)  # KL((0, 0, 1) || q)
    assert tvd(student, target).item() == pytest.approx(q_ids.item(), rel=1e-12)
    assert reverse_kl(student, target).item() == math.inf  # the student has mass where the teacher has none
    for name in KD_LOSSES:
        loss = kd(name, student, target, None, 1.5)
        assert not math.isnan(loss.item()), name
        if math.isfinite(loss.item()):
            assert torch.isfinite(grad(loss, student)).all(), name


def test_a_missing_tail_is_nan_and_derived_never_mass_one():
    student, teacher = make_logits(47, (B, T, V)), make_logits(48, (B, T, V))
    ids, logprobs = top_k(teacher, 4)
    mask = make_mask(49, (B, T))
    derived = ref_sparse("reverse_kl", student, ids, logprobs, mask, 1.3)  # tail = 1 - sum(p) everywhere
    # NaN at a position: no tail stored there, derive it; stored tails elsewhere are used as stored
    true_tail = (1 - logprobs.exp().sum(-1)).log()
    some_missing = torch.where(torch.arange(T) % 2 == 0, math.nan, true_tail)
    got = reverse_kl(student, TeacherDist(ids=ids, logprobs=logprobs, tail_logprob=some_missing), mask, 1.3)
    torch.testing.assert_close(got, derived, rtol=1e-10, atol=1e-12)
    all_missing = torch.full((B, T), math.nan, dtype=torch.float64)
    got = reverse_kl(student, TeacherDist(ids=ids, logprobs=logprobs, tail_logprob=all_missing), mask, 1.3)
    torch.testing.assert_close(got, derived, rtol=1e-10, atol=1e-12)
    # a collate that filled 0 (log 1: all the mass outside the ids) for rows without a tail used to train silently
    # towards "put everything outside the teacher's top-k"; it contradicts the top-k's own mass, so it is an error
    with pytest.raises(ValueError, match=r"disagrees with its top-k mass .* never 0 \(a tail of mass 1\)"):
        reverse_kl(student, TeacherDist(ids=ids, logprobs=logprobs, tail_logprob=torch.zeros(B, T)), mask)
    with pytest.raises(ValueError, match="tail_logprob 0.5 "):  # mass above 1
        reverse_kl(student, TeacherDist(ids=ids, logprobs=logprobs - 5, tail_logprob=torch.full((B, T), 0.5)), mask)


@pytest.mark.parametrize("name", KD_LOSSES)
def test_sparse_never_exceeds_dense_when_the_tail_is_above_the_floor(name):
    # the data processing inequality the docstring promises, at temperature == logprob_temperature
    for seed in range(3):
        student, teacher = make_logits(50 + seed, (B, T, V)), make_logits(60 + seed, (B, T, V)).detach()
        ids, logprobs = top_k(teacher, 3 + seed, temperature=1.4)
        assert (1 - logprobs.exp().sum(-1)).min() > TAIL_FLOOR
        sparse = kd(name, student, TeacherDist(ids=ids, logprobs=logprobs, logprob_temperature=1.4), None, 1.4)
        dense = kd(name, student, TeacherDist(logits=teacher), None, 1.4)
        assert sparse.item() <= dense.item() + 1e-12


def test_the_tail_floor_can_exceed_dense_by_at_most_its_bound():
    # the teacher's true tail is ~1e-13 and the student's ~e^-40: the floor lifts the teacher's tail to 1e-6, and the
    # sparse forward KL then exceeds the dense one, by less than TAIL_FLOOR * (log(1 / q_tail) + log(k) + 15)
    teacher = torch.tensor([[[3.0, 2.0, 1.0, -27.0]]], dtype=torch.float64)
    student = one_position([1.0, 2.0, 3.0, -38.0])
    ids, logprobs = top_k(teacher, 3)
    sparse = forward_kl(student, TeacherDist(ids=ids, logprobs=logprobs)).item()
    dense = forward_kl(student, TeacherDist(logits=teacher)).item()
    q_tail = torch.softmax(student.detach()[0, 0], -1)[3].item()
    assert sparse > dense
    assert sparse - dense <= TAIL_FLOOR * (math.log(1 / q_tail) + math.log(3) + 15)


@pytest.mark.parametrize("teacher_kind", ["dense", "sparse"])
def test_chunked_applies_the_logit_transform(teacher_kind):
    # a softcap on the student's and on a dense teacher's logits (Gemma 2's final step): the chunked loss equals the
    # loss on transformed logits, value and gradients; without the transform it would not
    g = torch.Generator().manual_seed(70)
    hidden = (torch.randn(2, 6, 8, generator=g, dtype=torch.float64) * 3).requires_grad_(True)
    weight = torch.randn(20, 8, generator=g, dtype=torch.float64).requires_grad_(True)
    teacher_hidden, teacher_weight = torch.randn(2, 6, 8, generator=g, dtype=torch.float64) * 3, weight.detach() * 2

    def softcap(x):
        return torch.tanh(x / 4.0) * 4.0

    mask = make_mask(71, (2, 6))
    if teacher_kind == "dense":
        target = TeacherHidden(teacher_hidden, teacher_weight, logit_transform=softcap)
        full_target = TeacherDist(logits=softcap(teacher_hidden @ teacher_weight.T))
    else:
        ids, logprobs = top_k(softcap(teacher_hidden @ teacher_weight.T), 5)
        target = full_target = TeacherDist(ids=ids, logprobs=logprobs)
    want = kd("jsd", softcap(hidden @ weight.T), full_target, mask, 1.2)
    got = chunked_kd_loss(
        "jsd", hidden, weight, target, mask, chunk_size=4, temperature=1.2, beta=BETA, logit_transform=softcap
    )
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-14)
    got_grads, want_grads = torch.autograd.grad(got, (hidden, weight)), torch.autograd.grad(want, (hidden, weight))
    for got_grad, want_grad in zip(got_grads, want_grads):
        torch.testing.assert_close(got_grad, want_grad, rtol=1e-10, atol=1e-13)
    untransformed = chunked_kd_loss("jsd", hidden, weight, target, mask, chunk_size=4, temperature=1.2, beta=BETA)
    assert abs(untransformed.item() - want.item()) > 1e-3


def test_config_accepts_exactly_the_registered_losses():
    # config.py's loss names come from (or must match) losses.LOSS_NAMES: a registered loss the config refuses, or a
    # configured name the registry lacks, fails here rather than at training time
    from typing import get_args

    from distillab import config

    assert set(get_args(config.LossName)) == set(LOSS_NAMES)
