"""Compact storage of a teacher's top-k next-token distribution: ids lossless, log-probs to 1/32 nat.

Layout of one sequence's top-k (T positions, k ids each), as six small arrays (each fits a Parquet binary column):

    id_b0, id_b1, id_b2   (T, k) uint8   byte planes (low, middle, high) of the id deltas: per position the ids are
                                         sorted ascending, the first is stored as is and each next one as the gap to
                                         the previous minus 1. Gaps between sorted ids are small (a vocab of V split
                                         into k + 1 gaps), so the middle plane is mostly small values and the high
                                         plane mostly 0; keeping the planes apart lets zstd's entropy coder see that.
                                         Ids must be distinct per position and < 2**24.
    top                   (T,) uint16    -(the position's highest log-prob) in steps of 2**-8 nat (error <= 0.002 nat;
                                         a top-1 log-prob is >= -log V, so 4096 codes, [-16, 0], cover V < 8.8M).
    below_top             (T, k) uint8   (decoded top - log-prob) in steps of LOGPROB_STEP = 1/16 nat, clamped to 255.
    tail                  (T,) uint16    -log(mass outside the ids) in steps of TAIL_STEP = 2**-8 nat: the stored tail
                                         is within 0.2% (relative) of the tail it was given, or derived, at encode
                                         (65535 means below e**-255). Stored because the tail is what the sparse losses
                                         need most precisely and 1 - sum(quantised probabilities) would not give it: a
                                         3% error on a 0.1 probability swamps a 1e-3 tail. Pass it on as
                                         TeacherDist(tail_logprob=...).

Where the tail comes from decides how good it is. A producer that has the full distribution should pass
``tail_logprob=tail_logprob_outside(logprobs, ids)``: a logsumexp over the entries outside the ids, whose relative error
is that of the log-probs' common shift (~1e-6 in fp32), whatever the tail's size. Without it, encode_topk derives
log(1 - sum(exp(logprobs))) in float64 from the k log-probs it is given: exact for those numbers, but 1 - S inherits
their error, an absolute error up to eps * (1 - tail) for log-probs off by eps nats. Log-probs from an fp32
log_softmax over a large vocab share an error of 1e-6 to 1e-5 nats (the rounding of their normaliser), so derived
tails below ~1e-4 can be off by over 10% and tails below ~1e-6 are noise (the losses floor the teacher's tail at 1e-6);
through tail_logprob_outside the same fp32 log-probs give every tail to the 0.2% above (tests/test_topk_codec.py
measures both).

Measured sizes (benchmarks/bench_topk_storage.py, k = 20, Parquet + zstd): about 20 bytes/token for the low id plane
(the low byte of a gap is uniform), 11-16 for the middle plane (vocab 32k-152k), ~17.5 for below_top on LM-like
distributions, ~1.5 each for top and tail.

Decoding gives the ids sorted ascending per position (the losses don't care about order) and the log-probs in that
order. Error bound: every log-prob within LOGPROB_RANGE (15.94 nats) of its position's top decodes within
MAX_LOGPROB_ERROR = 1/32 nat (a relative probability error under 3.2%; bf16 storage of a log-prob near -10 errs by up to
0.039 nat). Log-probs further below the top (probability under 1.2e-7 of the top's, including -inf) decode to
top - LOGPROB_RANGE, an absolute probability error under 1.2e-7 each. Gaps are measured from the DECODED top, so errors
do not add up.
"""

from __future__ import annotations

import numpy as np
import torch

LOGPROB_STEP = 1.0 / 16  # nats per below_top code
LOGPROB_RANGE = 255 * LOGPROB_STEP  # 15.9375 nats: below_top codes 0..255
MAX_LOGPROB_ERROR = LOGPROB_STEP / 2  # for log-probs within LOGPROB_RANGE of their position's top
# top and tail steps: finer costs bytes (each halving adds ~1/8 byte/token after zstd) for precision nothing else has
TOP_STEP = 2.0**-8  # nats per top code
TAIL_STEP = 2.0**-8  # nats per tail code
MAX_ID = 2**24 - 1  # three byte planes

FIELDS: dict[str, np.dtype] = {  # name -> dtype, for turning stored bytes back into arrays
    "id_b0": np.dtype(np.uint8),
    "id_b1": np.dtype(np.uint8),
    "id_b2": np.dtype(np.uint8),
    "top": np.dtype("<u2"),  # little-endian, so stored bytes read back the same anywhere
    "below_top": np.dtype(np.uint8),
    "tail": np.dtype("<u2"),
}


def _numpy(x) -> np.ndarray:
    return x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)


def tail_logprob_outside(logprobs: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """log of the mass outside the ids: full-vocab log-probs (..., V), top-k ids (..., k) -> (..., ) in their dtype.

    A logsumexp over the entries that are not among the ids, never 1 - sum(p[ids]), so it is as precise (relatively)
    for a 1e-9 tail as for a 0.5 one; -inf when the ids cover the vocab. Logits work too after a log_softmax.
    """
    return logprobs.scatter(-1, ids, float("-inf")).logsumexp(-1)


def encode_topk(ids, logprobs, tail_logprob=None) -> dict[str, np.ndarray]:
    """ids (T, k) int, logprobs (T, k) float (torch or numpy) -> the six arrays described in the module docstring.

    tail_logprob (T,): log of the mass outside the ids, best from tail_logprob_outside on the full distribution; by
    default log(1 - sum(exp(logprobs))) in float64 from the given log-probs (see the module docstring for what that
    costs). NaN is refused, not stored (it would decode as a tail of mass 1), and so is a tail above 0 (mass over 1).
    """
    ids, logprobs = _numpy(ids).astype(np.int64), _numpy(logprobs).astype(np.float64)
    if ids.ndim != 2 or ids.shape != logprobs.shape:
        raise ValueError(f"ids and logprobs must both be (T, k), got {ids.shape} and {logprobs.shape}")
    if tail_logprob is not None:
        tail_logprob = _numpy(tail_logprob).astype(np.float64)
        if tail_logprob.shape != (len(ids),):
            raise ValueError(f"tail_logprob must be (T,) = ({len(ids)},), got {tail_logprob.shape}")
        if np.isnan(tail_logprob).any():
            raise ValueError("tail_logprob contains NaN; pass None to derive every tail from the log-probs")
        if (tail_logprob > 1e-6).any():  # round-off may put a full tail a hair above log 1
            raise ValueError(f"tail_logprob above 0 (a mass over 1): {tail_logprob.max()}")
    if ids.size and (ids.min() < 0 or ids.max() > MAX_ID):
        raise ValueError(f"ids must be in [0, {MAX_ID}], got [{ids.min()}, {ids.max()}]")
    if np.isnan(logprobs).any():
        raise ValueError("logprobs contain NaN")
    order = np.argsort(ids, axis=1, kind="stable")
    ids = np.take_along_axis(ids, order, axis=1)  # (T, k) ascending per position
    logprobs = np.take_along_axis(logprobs, order, axis=1)  # (T, k) in the same order
    gaps = np.diff(ids, axis=1) - 1  # (T, k - 1), >= 0 for distinct ids
    if (gaps < 0).any():
        raise ValueError("ids must be distinct per position")
    deltas = np.concatenate([ids[:, :1], gaps], axis=1).astype(np.uint32)  # (T, k)
    top = logprobs.max(axis=1, initial=-np.inf) if logprobs.size else np.zeros(len(ids))  # (T,)
    top_code = np.clip(np.rint(-top / TOP_STEP), 0, 65535).astype("<u2")  # (T,)
    top_decoded = -top_code.astype(np.float64) * TOP_STEP
    with np.errstate(invalid="ignore"):  # -inf log-probs give +inf gaps, clamped to 255 below
        below = np.rint((top_decoded[:, None] - logprobs) / LOGPROB_STEP)  # (T, k)
    below_code = np.clip(below, 0, 255).astype(np.uint8)
    if tail_logprob is None:
        with np.errstate(divide="ignore"):  # an empty tail is log 0 = -inf, stored as the last code
            tail_logprob = np.log(np.clip(-np.expm1(np.logaddexp.reduce(logprobs, axis=1)), 0, None))  # (T,)
    tail_code = np.clip(np.rint(-tail_logprob / TAIL_STEP), 0, 65535).astype("<u2")  # -inf: the last code
    return {
        "id_b0": (deltas & 0xFF).astype(np.uint8),
        "id_b1": ((deltas >> 8) & 0xFF).astype(np.uint8),
        "id_b2": (deltas >> 16).astype(np.uint8),
        "top": top_code,
        "below_top": below_code,
        "tail": tail_code,
    }


def decode_topk(fields: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The arrays from encode_topk (or their raw bytes, e.g. read back from Parquet) -> ids (T, k) int64 sorted
    ascending per position, logprobs (T, k) float32, tail_logprob (T,) float32: TeacherDist(ids=, logprobs=,
    tail_logprob=)."""
    arrays = {name: _as_array(fields[name], dtype) for name, dtype in FIELDS.items()}
    n_positions = arrays["top"].size
    k = arrays["below_top"].size // max(n_positions, 1)
    planes = [arrays[name].reshape(n_positions, k).astype(np.int64) for name in ("id_b0", "id_b1", "id_b2")]
    deltas = planes[0] | (planes[1] << 8) | (planes[2] << 16)  # (T, k)
    deltas[:, 1:] += 1  # gaps were stored minus 1
    ids = np.cumsum(deltas, axis=1)  # (T, k)
    top = -arrays["top"].astype(np.float64) * TOP_STEP  # (T,)
    logprobs = top[:, None] - arrays["below_top"].reshape(n_positions, k).astype(np.float64) * LOGPROB_STEP
    tail = -arrays["tail"].astype(np.float64) * TAIL_STEP  # (T,)
    logprobs, tail = torch.from_numpy(logprobs.astype(np.float32)), torch.from_numpy(tail.astype(np.float32))
    return torch.from_numpy(ids), logprobs, tail


def _as_array(value, dtype: np.dtype) -> np.ndarray:
    if isinstance(value, (bytes, bytearray, memoryview)):
        return np.frombuffer(value, dtype=dtype)
    return np.asarray(value, dtype=dtype)
