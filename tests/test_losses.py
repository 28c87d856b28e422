"""distillab.losses against a naive float64 reference written out by hand, values and gradients."""

from __future__ import annotations

import math

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from distillab.losses import (
    LOSSES,
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
)

KD_LOSSES = ["forward_kl", "reverse_kl", "jsd", "skew_forward_kl", "skew_reverse_kl", "tvd"]
BETA, ALPHA = 0.3, 0.2  # off the defaults, so a loss that ignores its parameter fails


# ---------------------------------------------------------------------------------------------------------------------
# The naive reference: one token at a time, probabilities written out, float64.


def ref_softmax(x):  # (V,) -> (V,)
    e = torch.exp(x - x.max())
    return e / e.sum()


def ref_kl(a, b):  # KL(a || b) over explicit entries, 0 * log 0 = 0
    return sum(a[i] * torch.log(a[i] / b[i]) for i in range(len(a)) if a[i] > 0)


def ref_divergence(name, p, q, beta=BETA, alpha=ALPHA):
    if name == "forward_kl":
        return ref_kl(p, q)
    if name == "reverse_kl":
        return ref_kl(q, p)
    if name == "jsd":
        m = beta * p + (1 - beta) * q
        return beta * ref_kl(p, m) + (1 - beta) * ref_kl(q, m)
    if name == "skew_forward_kl":
        return ref_kl(p, alpha * p + (1 - alpha) * q)
    if name == "skew_reverse_kl":
        return ref_kl(q, alpha * q + (1 - alpha) * p)
    if name == "tvd":
        return 0.5 * sum(abs(p[i] - q[i]) for i in range(len(p)))
    raise KeyError(name)


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
    logprobs = logprobs + 0.05  # as if quantisation had pushed them up a little
    tail = torch.rand((B, T), generator=torch.Generator().manual_seed(42), dtype=torch.float64) * 0.5 + 0.1
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


def test_registry_and_uniform_call():
    assert set(LOSSES) == {"ce", "forward_kl", "reverse_kl", "jsd", "skew_forward_kl", "skew_reverse_kl", "tvd"}
    student, teacher = make_logits(31, (B, T, V)), make_logits(32, (B, T, V)).detach()
    mask = make_mask(33, (B, T))
    target = TeacherDist(logits=teacher)
    assert LOSSES["jsd"](student, target, mask, 1.0, beta=BETA) == kd("jsd", student, target, mask, 1.0)
    skew = LOSSES["skew_reverse_kl"](student, target, mask, alpha=ALPHA)
    assert skew == kd("skew_reverse_kl", student, target, mask, 1.0)
    with pytest.raises(KeyError, match="unknown loss"):
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
