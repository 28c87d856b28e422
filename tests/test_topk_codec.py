"""distillab.topk_codec: ids round-trip exactly, log-probs within the documented bound."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from distillab.losses import TeacherDist, forward_kl
from distillab.topk_codec import (
    LOGPROB_RANGE,
    MAX_LOGPROB_ERROR,
    TAIL_STEP,
    TOP_STEP,
    decode_topk,
    encode_topk,
    tail_logprob_outside,
)


def sample_topk(seed, n_positions, vocab, k, peak):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(n_positions, vocab, generator=g) * peak
    logprobs, ids = torch.log_softmax(logits, -1).topk(k, dim=-1)  # (T, k) each, in rank order
    return ids, logprobs


def sorted_by_id(ids, logprobs):
    order = ids.argsort(-1)
    return ids.gather(-1, order), logprobs.gather(-1, order)


@pytest.mark.parametrize("vocab,peak", [(32000, 1.0), (151936, 6.0), (300, 20.0)])
def test_round_trip(vocab, peak):
    ids, logprobs = sample_topk(0, 64, vocab, 20, peak)
    ids[0, :3] = torch.tensor([0, vocab - 1, 1])  # the extremes of the id range
    fields = encode_topk(ids, logprobs)
    # through raw bytes, as read back from Parquet
    got_ids, got_logprobs, got_tail = decode_topk({name: array.tobytes() for name, array in fields.items()})
    want_ids, want_logprobs = sorted_by_id(ids, logprobs)
    want_tail = (1 - want_logprobs.double().exp().sum(-1)).clamp(min=0).log()
    representable = want_tail > -255  # smaller tails (0 included) are stored as "below e^-255"
    assert (got_tail.double() - want_tail)[representable].abs().max() <= TAIL_STEP / 2 + 1e-6
    assert (got_tail[~representable] <= -255).all()
    assert torch.equal(got_ids, want_ids)
    in_range = want_logprobs >= want_logprobs.max(-1, keepdim=True).values - LOGPROB_RANGE
    error = (got_logprobs.double() - want_logprobs.double()).abs()
    assert error[in_range].max() <= MAX_LOGPROB_ERROR + 1e-6  # + float32 rounding of the inputs
    # the top log-prob itself is kept to TOP_STEP
    top_error = (got_logprobs.max(-1).values.double() - want_logprobs.max(-1).values.double()).abs()
    assert top_error.max() <= TOP_STEP / 2 + 1e-6
    # out-of-range entries are tiny probabilities and stay tiny
    if (~in_range).any():
        assert got_logprobs[~in_range].exp().max() <= math.exp(-LOGPROB_RANGE + 1e-3)


def test_bound_is_tight_not_vacuous():
    # a log-prob halfway between two codes errs by (almost) exactly the bound, so the bound is the real one
    ids = torch.tensor([[3, 7]])
    logprobs = torch.tensor([[0.0, -(5 + 0.499) / 16]], dtype=torch.float64)
    _, got, _ = decode_topk(encode_topk(ids, logprobs))
    assert abs(got[0, 1].item() - logprobs[0, 1].item()) == pytest.approx(MAX_LOGPROB_ERROR, abs=2e-3)


def test_neg_inf_and_errors():
    ids = torch.tensor([[5, 2, 9]])
    logprobs = torch.tensor([[-0.1, -float("inf"), -2.0]])
    got_ids, got_logprobs, _ = decode_topk(encode_topk(ids, logprobs))
    assert got_ids.tolist() == [[2, 5, 9]]
    assert got_logprobs[0, 0].item() == pytest.approx(-0.1 - LOGPROB_RANGE, abs=TOP_STEP / 2 + 1e-6)
    with pytest.raises(ValueError, match="distinct"):
        encode_topk(torch.tensor([[4, 4]]), torch.zeros(1, 2))
    with pytest.raises(ValueError, match="ids must be in"):
        encode_topk(torch.tensor([[-1, 4]]), torch.zeros(1, 2))
    with pytest.raises(ValueError, match="NaN"):
        encode_topk(torch.tensor([[1, 4]]), torch.tensor([[0.0, float("nan")]]))


def test_compact():
    ids, logprobs = sample_topk(1, 512, 32000, 20, 1.0)
    fields = encode_topk(ids, logprobs)
    assert sum(np.asarray(a).nbytes for a in fields.values()) == 512 * (20 * 4 + 2 + 2)  # before any compression


def test_decoded_teacher_gives_nearly_the_same_loss():
    # end to end: the loss against the decoded top-k is within the quantisation error of the loss against the original
    ids, logprobs = sample_topk(2, 256, 5000, 20, 4.0)
    student = torch.randn(256, 5000, generator=torch.Generator().manual_seed(3)) * 2
    exact = forward_kl(student, TeacherDist(ids=ids, logprobs=logprobs))
    got_ids, got_logprobs, got_tail = decode_topk(encode_topk(ids, logprobs))
    decoded = forward_kl(student, TeacherDist(ids=got_ids, logprobs=got_logprobs, tail_logprob=got_tail))
    assert abs(decoded.item() - exact.item()) <= 0.01 * exact.item()


def test_tail_from_the_full_distribution_is_stored_to_its_bound():
    # LM-like fp32 logits (offset ~20-45, V = 8000) with tails from 1e-8 to 1e-2. The float64 truth is the fp32 logits
    # themselves. Through tail_logprob_outside every stored tail is within TAIL_STEP / 2 (0.2%) of it; derived from the
    # fp32 top-k log-probs (1 - sum p) the small ones are far off, which is why producers should pass it
    g = torch.Generator().manual_seed(5)
    n, vocab, k = 128, 8000, 20
    logits = torch.randn(n, vocab, generator=g) * 2 + 20
    logits[:, :k] += torch.linspace(5, 26, n)[:, None]
    truth = logits.double().log_softmax(-1)
    logprobs = logits.log_softmax(-1)  # fp32, as generation makes them
    top, ids = logprobs.topk(k, -1)
    exact = tail_logprob_outside(truth, ids)  # (T,) float64
    assert exact.exp().min() < 1e-7 and exact.exp().max() > 1e-3
    _, _, stored = decode_topk(encode_topk(ids, top, tail_logprob=tail_logprob_outside(logprobs, ids)))
    assert (stored.double() - exact).abs().max() <= TAIL_STEP / 2 + 2e-5
    _, _, derived = decode_topk(encode_topk(ids, top))
    small = exact.exp() < 1e-4
    assert (derived.double() - exact)[small].abs().max() > 0.1  # > 10% off: the docstring's warning, measured


def test_nan_or_positive_tail_is_refused_not_stored_as_mass_one():
    ids, logprobs = torch.tensor([[1, 4]]), torch.log(torch.tensor([[0.5, 0.2]]))
    with pytest.raises(ValueError, match="tail_logprob contains NaN"):  # it used to encode as a tail of mass 1
        encode_topk(ids, logprobs, tail_logprob=torch.tensor([float("nan")]))
    with pytest.raises(ValueError, match="above 0"):
        encode_topk(ids, logprobs, tail_logprob=torch.tensor([0.1]))
    with pytest.raises(ValueError, match=r"must be \(T,\)"):
        encode_topk(ids, logprobs, tail_logprob=torch.tensor([-1.0, -1.0]))
    # an empty tail (-inf: the ids cover the vocab) is legitimate and stored as the last code
    _, _, tail = decode_topk(encode_topk(ids, logprobs, tail_logprob=torch.tensor([float("-inf")])))
    assert tail.item() <= -255


def test_a_teachers_tiny_tail_survives_the_request_cache():
    """The local teacher hands its exact tail (from the full distribution) to the cache, which stores it through
    the codec: a 1e-6 tail keeps the codec's 0.2%, where 1 - sum(top-k) from fp32 log-probs is far off."""
    from distillab.cache import decode_response, encode_response
    from distillab.topk_codec import decode_topk, tail_logprob_outside

    torch.manual_seed(0)
    logits = torch.randn(6, 90) * 0.1
    logits[:, :20] += 16.0  # the top 20 hold all but ~1e-6 of the mass
    logprobs = logits.float().log_softmax(-1)  # (T, V) fp32, as a teacher computes them
    top_lp, top_id = logprobs.topk(20, dim=-1)
    exact = tail_logprob_outside(logits.double().log_softmax(-1), top_id)  # (T,) float64 reference
    assert float(exact.exp().max()) < 1e-5
    response = {
        "text": "x",
        "token_ids": [5] * 6,
        "top_ids": top_id.tolist(),
        "top_logprobs": top_lp.tolist(),
        "top_tail": tail_logprob_outside(logprobs, top_id).tolist(),
        "prompt_tokens": 3,
        "completion_tokens": 6,
    }
    _, _, tail = decode_topk(decode_response(encode_response(response), raw_topk=True)["topk"])
    assert np.allclose(np.exp(np.asarray(tail)), exact.exp().numpy(), rtol=2e-3)
    # without the teacher's tail the cache derives 1 - sum(p) from the fp32 log-probs: the test above can fail
    _, _, derived = decode_topk(decode_response(encode_response(response | {"top_tail": None}), raw_topk=True)["topk"])
    assert not np.allclose(np.exp(np.asarray(derived)), exact.exp().numpy(), rtol=2e-3)
