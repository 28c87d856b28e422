"""Audit a corpus for teacher-written text, with two zero-shot detectors computed from two local causal LMs.

Both detectors compare how likely the text is under a *scoring* model with how likely the scoring model
finds the text a *reference* model would have written in the same place. Here the scoring model is called
the observer (O) and the reference model the performer (P), in both scores:

  Binoculars (Hans et al., 2024), per document, over its scored tokens x_1..x_L:
      log PPL   = -1/L sum_i log O(x_i | x_<i)
      log X-PPL = -1/L sum_i sum_v P(v | x_<i) * log O(v | x_<i)   (cross-entropy of P's prediction under O)
      B = log PPL / log X-PPL                                      LOWER means more machine-like
  Fast-DetectGPT, analytic sampling discrepancy (Bao et al., 2024), per document:
      mu_i  = sum_v P(v | x_<i) log O(v | x_<i),   s2_i = sum_v P(v | x_<i) (log O(v | x_<i) - mu_i)^2
      D = (sum_i log O(x_i | x_<i) - sum_i mu_i) / sqrt(sum_i s2_i)  HIGHER means more machine-like

Roles in the lab. The observer must know the domain: a model that never saw the text's subject finds
human and teacher text equally surprising, and neither ratio can tell them apart. So the default observer
is the teacher (`lab:teacher`), the model suspected of writing the text, and the default performer is
`lab:base`, the weaker model that normalises for how predictable each position is to a generic model.
`benchmarks/bench_audit.py` measures all three pairings (teacher/base, base/teacher, teacher/teacher): on
held-out lab free text teacher/base Binoculars reaches AUROC 0.94, base/teacher 0.85; Fast-DetectGPT does
best with the teacher in both roles (white-box, `performer="lab:teacher"`).

Scoring context. A document may come with a prompt: the completion is scored conditioned on it and the
prompt tokens are not scored (in the lab, generated text is the answer to a prompt). Without a prompt the
text is scored after the tokenizer's beginning-of-sequence token (or from its second token, when the
tokenizer has none). The end-of-sequence token is not scored: a corpus holds text, not stop decisions.

From scores to a fraction. `calibrate_threshold` picks the threshold maximising Youden's J on a labelled
sample; `estimate_fraction` applies the classify-and-adjust estimator p = (rate - fpr) / (tpr - fpr),
clipped to [0, 1], with a bootstrap 95% interval that resamples both the corpus and the labelled sample.
Internally every score is oriented "higher = more teacher-like" (`TEACHER_DIRECTION`); files keep raw values.

Near chance, no number. When a score's AUROC on the labelled sample has a bootstrap interval that reaches 0.5
(97.5% per score: the headline picks the better of two, so together a 95% claim), the best threshold only fits the labelled sample's noise, and classify-and-adjust divides by that noise
(tpr - fpr near 0): a corpus that is 30% teacher-written read as 95% [75, 100]. Such a score gets no
estimate, and the summary says the texts are indistinguishable to this detector and what would help.
"""

from __future__ import annotations

import csv
import io
import json
import math
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from distillab.batching import right_pad
from distillab.errors import UserError
from distillab.files import write_atomic
from distillab.jsonl import read_jsonl

SCORE_NAMES = ("binoculars", "fast_detectgpt")
TEACHER_DIRECTION = {"binoculars": -1.0, "fast_detectgpt": 1.0}  # multiply to get "higher = teacher"
TEACHER_LABELS = {"teacher", "machine", "1", "true"}
OTHER_LABELS = {"human", "lab", "0", "false"}
SUMMARY_FILE = "audit_summary.json"
# The headline is the better of the scores, a choice made on the same labelled sample: each score's AUROC
# must clear 0.5 at 1 - 0.05 / len(SCORE_NAMES) (Bonferroni), so "distinguishable" is a 95% claim overall.
CHANCE_LEVEL = 1 - 0.05 / len(SCORE_NAMES)
SCORES_FILE = "scores.parquet"


# ----------------------------------------------------------------------------------------------------
# Tokenising documents: (ids, number of context tokens that are not scored).


def encode_document(
    tokenizer, text: str, prompt: str | None = None, max_length: int = 2048
) -> tuple[list[int], int, bool]:
    """Token ids of context + text, the context length, and whether it was truncated to max_length.

    Prompt and text are tokenised separately so the scored tokens are exactly the text's tokens.
    """
    context = tokenizer(prompt or "")["input_ids"]  # the model's leading special tokens (e.g. <bos>) included
    body = tokenizer(text, add_special_tokens=False)["input_ids"]
    if not context:
        if tokenizer.bos_token_id is not None:
            context = [tokenizer.bos_token_id]
        else:  # nothing to condition the first token on: it becomes context
            context, body = body[:1], body[1:]
    truncated = len(context) + len(body) > max_length
    if truncated:  # keep the end of the context (it conditions the text) and as much text as fits
        context = context[-max(1, min(len(context), max_length // 2)) :]
        body = body[: max_length - len(context)]
    return context + body, len(context), truncated


# ----------------------------------------------------------------------------------------------------
# Per-token statistics and per-document scores.


def _token_sums(
    obs_logits: torch.Tensor, perf_logits: torch.Tensor, input_ids: torch.Tensor, scored: torch.Tensor
) -> dict[str, torch.Tensor]:
    """Per-document sums over scored tokens. Logits (B, T, V), input_ids (B, T), scored (B, T) bool.

    Position t's logits predict token t+1, so token t+1 is scored when scored[:, t+1] is true.
    """
    vocab = min(obs_logits.shape[-1], perf_logits.shape[-1])  # models may pad their vocabularies differently
    # Clamped so a token with probability 0 times a log-probability of -inf gives 0, not nan.
    log_o = obs_logits[:, :-1, :vocab].float().log_softmax(-1).clamp_min(-1e4)  # (B, T-1, V)
    p = perf_logits[:, :-1, :vocab].float().softmax(-1)  # (B, T-1, V)
    target = input_ids[:, 1:]  # (B, T-1)
    mask = scored[:, 1:]  # (B, T-1)
    token_lp = log_o.gather(-1, target.unsqueeze(-1)).squeeze(-1)  # (B, T-1): log O(x_i)
    mean = (p * log_o).sum(-1)  # (B, T-1): E_{v~P} log O(v)
    var = (p * (log_o - mean.unsqueeze(-1)).square()).sum(-1)  # (B, T-1); centred, so no cancellation

    def total(x):  # where(), not a product: a padded position's value never reaches the sum, even if nan
        return torch.where(mask, x.double(), 0.0).sum(1)  # (B,)

    return {"n": mask.sum(1), "loglik": total(token_lp), "mean": total(mean), "var": total(var)}


def _scores_from_sums(n: float, loglik: float, mean: float, var: float) -> dict[str, float]:
    log_ppl, log_xppl = -loglik / n, -mean / n
    return {
        "log_ppl": log_ppl,
        "log_xppl": log_xppl,
        "binoculars": log_ppl / log_xppl if log_xppl > 0 else math.nan,
        "fast_detectgpt": (loglik - mean) / math.sqrt(max(var, 1e-12)),
    }


def _max_length(*models) -> int:
    lengths = [getattr(m.config, "max_position_embeddings", None) for m in models]
    return min([n for n in lengths if n] or [2048])


@torch.no_grad()
def score_documents(
    observer, performer, tokenizer, texts: list[str], prompts: list[str | None] | None = None, batch_size: int = 16
) -> list[dict]:
    """Binoculars and Fast-DetectGPT scores per document (see the module docstring), batched, no grad.

    Returns per document: n_tokens, truncated, log_ppl, log_xppl, binoculars, fast_detectgpt.
    observer and performer may be the same model object (then it runs once per batch). Memory is a few
    batch x length x vocabulary float tensors: lower batch_size for large-vocabulary models.
    """
    observer.eval()
    performer.eval()
    prompts = prompts if prompts is not None else [None] * len(texts)
    max_length = _max_length(observer, performer)
    encoded = [encode_document(tokenizer, t, p, max_length) for t, p in zip(texts, prompts)]
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    device = next(observer.parameters()).device
    order = sorted(range(len(texts)), key=lambda i: -len(encoded[i][0]))  # similar lengths share a batch
    results: list[dict | None] = [None] * len(texts)
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        width = max(len(encoded[i][0]) for i in idx)
        input_ids, attention = right_pad([encoded[i][0] for i in idx], pad_id)  # (B, T)
        scored = torch.zeros((len(idx), width), dtype=torch.bool)  # (B, T): text tokens only
        for row, i in enumerate(idx):
            ids, n_context, _ = encoded[i]
            scored[row, n_context : len(ids)] = True
        input_ids, attention = input_ids.to(device), attention.to(device)
        obs_logits = observer(input_ids=input_ids, attention_mask=attention).logits  # (B, T, V)
        perf_logits = (
            obs_logits
            if performer is observer
            else performer(
                input_ids=input_ids.to(next(performer.parameters()).device),
                attention_mask=attention.to(next(performer.parameters()).device),
            ).logits.to(device)
        )  # (B, T, V')
        sums = {
            k: v.cpu().tolist() for k, v in _token_sums(obs_logits, perf_logits, input_ids, scored.to(device)).items()
        }
        for row, i in enumerate(idx):
            n = sums["n"][row]
            stats = (
                _scores_from_sums(n, sums["loglik"][row], sums["mean"][row], sums["var"][row])
                if n > 0
                else dict.fromkeys(("log_ppl", "log_xppl", "binoculars", "fast_detectgpt"), math.nan)
            )
            results[i] = {"n_tokens": int(n), "truncated": encoded[i][2], **stats}
    return results  # type: ignore[return-value]


# ----------------------------------------------------------------------------------------------------
# From scores to decisions: AUROC, a threshold, and the estimated teacher-written fraction.
# All take scores oriented "higher = teacher" and labels 1 = teacher, 0 = not.


def _arrays(scores, labels=None):
    s = np.asarray(scores, dtype=np.float64)
    if labels is None:
        return s
    y = np.asarray(labels, dtype=np.int64)
    if s.shape != y.shape:
        raise ValueError(f"{len(s)} scores but {len(y)} labels")
    if not ((y == 1).any() and (y == 0).any()):
        raise UserError("the labelled sample needs both teacher-written and other documents")
    return s, y


def _average_ranks(x: np.ndarray) -> np.ndarray:
    """1-based ranks, ties sharing the mean of their ranks (what the Mann-Whitney U statistic needs)."""
    order = np.argsort(x, kind="mergesort")
    sorted_x = x[order]
    ranks = np.empty(len(x), dtype=np.float64)
    start = 0
    while start < len(x):
        end = start
        while end + 1 < len(x) and sorted_x[end + 1] == sorted_x[start]:
            end += 1
        ranks[order[start : end + 1]] = (start + end) / 2 + 1
        start = end + 1
    return ranks


def auroc(scores, labels) -> float:
    """P(score of a random teacher document > score of a random other one), ties counting one half."""
    s, y = _arrays(scores, labels)
    ranks = _average_ranks(s)
    n_pos, n_neg = int((y == 1).sum()), int((y == 0).sum())
    return float((ranks[y == 1].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def _auroc_sorted(pos: np.ndarray, neg_sorted: np.ndarray) -> float:
    """AUROC by counting, for each positive, the negatives below it (ties one half): no Python loop."""
    below = np.searchsorted(neg_sorted, pos, side="left")
    ties = np.searchsorted(neg_sorted, pos, side="right") - below
    return float((below + 0.5 * ties).sum() / (len(pos) * len(neg_sorted)))


def auroc_interval(scores, labels, n_bootstrap: int = 1000, seed: int = 0, level: float = 0.95) -> tuple[float, float]:
    """Percentile bootstrap interval of the AUROC, resampling each class on its own (both stay present)."""
    s, y = _arrays(scores, labels)
    pos, neg = s[y == 1], s[y == 0]
    rng = np.random.default_rng(seed)
    boot = np.empty(n_bootstrap)
    for b in range(n_bootstrap):
        boot[b] = _auroc_sorted(
            pos[rng.integers(0, len(pos), len(pos))], np.sort(neg[rng.integers(0, len(neg), len(neg))])
        )
    low, high = np.percentile(boot, [50 * (1 - level), 50 * (1 + level)])
    return float(low), float(high)


def indistinguishable_note(name: str, auc: float, interval: tuple[float, float], n_teacher: int, n_other: int) -> str:
    return (
        f"indistinguishable to this detector: on the labelled sample {name} has AUROC {auc:.3f} "
        f"[{CHANCE_LEVEL:.1%} CI {interval[0]:.3f}, {interval[1]:.3f}], which includes 0.5 (chance), so no fraction is "
        f"estimated: any number would be noise. What would help: an observer that knows the texts' domain "
        f"(the suspected teacher itself) paired with a performer that differs from it, or a larger labelled "
        f"sample ({n_teacher} teacher-written and {n_other} other documents now)"
    )


def _rates(s: np.ndarray, y: np.ndarray, threshold: float) -> tuple[float, float]:
    flagged = s >= threshold
    return float(flagged[y == 1].mean()), float(flagged[y == 0].mean())


def calibrate_threshold(scores, labels) -> dict:
    """The threshold (flag when score >= threshold) maximising Youden's J = tpr - fpr on a labelled sample.

    Candidates are midpoints between neighbouring distinct scores, so the threshold sits in a gap rather
    than on a training point.
    """
    s, y = _arrays(scores, labels)
    values = np.unique(s)
    candidates = np.concatenate([[values[0] - 1.0], (values[:-1] + values[1:]) / 2, [values[-1] + 1.0]])
    pos, neg = np.sort(s[y == 1]), np.sort(s[y == 0])
    tpr = 1.0 - np.searchsorted(pos, candidates, side="left") / len(pos)  # share of positives >= candidate
    fpr = 1.0 - np.searchsorted(neg, candidates, side="left") / len(neg)
    best = int(np.argmax(tpr - fpr))
    return {
        "threshold": float(candidates[best]),
        "tpr": float(tpr[best]),
        "fpr": float(fpr[best]),
        "youden_j": float(tpr[best] - fpr[best]),
    }


def _adjusted(rate, tpr, fpr):
    """Classify-and-adjust: E[rate] = p*tpr + (1-p)*fpr, solved for p and clipped to [0, 1]."""
    return np.clip((rate - fpr) / np.maximum(tpr - fpr, 1e-12), 0.0, 1.0)


def estimate_fraction(
    scores,
    threshold: float,
    tpr: float,
    fpr: float,
    *,
    labelled_scores=None,
    labelled_labels=None,
    n_bootstrap: int = 1000,
    seed: int = 0,
) -> dict:
    """Estimated teacher-written fraction of a corpus, with a bootstrap 95% interval.

    The interval resamples the corpus; given the labelled sample it also resamples that and recomputes
    tpr/fpr at the fixed threshold, so the interval includes calibration uncertainty.
    """
    if tpr - fpr <= 0:
        raise UserError(
            f"the detector has no skill on the labelled sample (tpr {tpr:.2f} <= fpr {fpr:.2f}); "
            "no fraction can be estimated"
        )
    s = _arrays(scores)
    rng = np.random.default_rng(seed)
    flagged = (s >= threshold).astype(np.float64)
    rate = float(flagged.mean())
    boot_rates = flagged[rng.integers(0, len(s), size=(n_bootstrap, len(s)))].mean(1)  # (n_bootstrap,)
    if labelled_scores is not None:
        ls, ly = _arrays(labelled_scores, labelled_labels)
        pos, neg = (ls[ly == 1] >= threshold).astype(float), (ls[ly == 0] >= threshold).astype(float)
        boot_tpr = pos[rng.integers(0, len(pos), size=(n_bootstrap, len(pos)))].mean(1)
        boot_fpr = neg[rng.integers(0, len(neg), size=(n_bootstrap, len(neg)))].mean(1)
    else:
        boot_tpr, boot_fpr = np.full(n_bootstrap, tpr), np.full(n_bootstrap, fpr)
    boot = _adjusted(boot_rates, boot_tpr, boot_fpr)
    low, high = np.percentile(boot, [2.5, 97.5])
    return {
        "fraction": float(_adjusted(rate, tpr, fpr)),
        "low": float(low),
        "high": float(high),
        "flagged_rate": rate,
        "n": len(s),
    }


# ----------------------------------------------------------------------------------------------------
# Reading corpora: JSONL or Parquet, a text column, optional prompt and label columns.


def _label_value(value, where: str) -> int:
    if isinstance(value, bool) or (isinstance(value, (int, float)) and value in (0, 1)):
        return int(value)
    text = str(value).strip().lower()
    if text in TEACHER_LABELS:
        return 1
    if text in OTHER_LABELS:
        return 0
    raise UserError(f"{where}: label {value!r} is not one of {sorted(TEACHER_LABELS | OTHER_LABELS)} or 0/1")


def _check_row(record, where: str, text_field: str, prompt_field: str | None, label_field: str | None) -> dict:
    if not isinstance(record, dict):
        raise UserError(f"{where}: expected a JSON object, got {type(record).__name__}")
    text = record.get(text_field)
    if not isinstance(text, str):
        present = ", ".join(sorted(record)) or "none"
        raise UserError(f"{where}: no string field {text_field!r} (fields: {present})")
    if not text:
        raise UserError(f"{where}: empty {text_field!r}")
    prompt = None
    if prompt_field is not None:
        prompt = record.get(prompt_field)
        if prompt is not None and not isinstance(prompt, str):
            raise UserError(f"{where}: field {prompt_field!r} must be a string")
    row = {"where": where, "text": text, "prompt": prompt}
    if label_field is not None:
        if record.get(label_field) is None:
            raise UserError(f"{where}: no label field {label_field!r}")
        row["label"] = _label_value(record[label_field], where)
    return row


def read_corpus(
    path: str | Path, text_field: str = "text", prompt_field: str | None = None, label_field: str | None = None
) -> list[dict]:
    """Rows {where, text, prompt[, label]} from a .jsonl or .parquet file; bad input is a UserError."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"corpus not found: {path}")
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".ndjson"):
        rows = [
            _check_row(record, where, text_field, prompt_field, label_field)
            for where, record in read_jsonl(path, "corpus")
        ]
    elif suffix == ".parquet":
        try:
            table = pq.read_table(path)
        except (pa.ArrowInvalid, OSError) as err:
            raise UserError(f"{path}: not a readable Parquet file ({err})") from None
        for name in [text_field, prompt_field, label_field]:
            if name is not None and name not in table.column_names:
                raise UserError(f"{path}: no column {name!r} (columns: {', '.join(table.column_names)})")
        rows = [
            _check_row(r, f"{path} row {i}", text_field, prompt_field, label_field)
            for i, r in enumerate(table.to_pylist())
        ]
    else:
        raise UserError(f"{path}: corpus must be .jsonl or .parquet")
    if not rows:
        raise UserError(f"{path}: empty corpus (no documents)")
    return rows


# ----------------------------------------------------------------------------------------------------
# The audit: score, calibrate, estimate, write.


def load_pair(observer: str, performer: str):
    """(observer model, performer model, tokenizer); the two must share a tokenizer (same vocabulary)."""
    from distillab.models import load

    obs_model, obs_tok = load(observer)
    if performer == observer:
        return obs_model, obs_model, obs_tok
    perf_model, perf_tok = load(performer)
    if obs_tok.get_vocab() != perf_tok.get_vocab():
        raise UserError(f"observer {observer!r} and performer {performer!r} do not share a tokenizer")
    return obs_model, perf_model.to(next(obs_model.parameters()).device), obs_tok


def _score_stats(raw: list[float]) -> dict:
    x = np.asarray([v for v in raw if math.isfinite(v)])
    return {"mean": float(x.mean()), "median": float(np.median(x)), "std": float(x.std())} if len(x) else {}


def _analyse(
    name: str,
    corpus_raw: list[float],
    labelled_raw: list[float] | None,
    labels: list[int] | None,
    n_bootstrap: int,
    seed: int,
) -> dict:
    """Summary of one score: stats, and with a labelled sample its AUROC, threshold and fraction estimate."""
    direction = TEACHER_DIRECTION[name]
    out = {"teacher_is": "lower" if direction < 0 else "higher", **_score_stats(corpus_raw)}
    if labelled_raw is None:
        return out
    keep = [i for i, v in enumerate(labelled_raw) if math.isfinite(v)]
    ls = [direction * labelled_raw[i] for i in keep]
    ly = [labels[i] for i in keep]
    cal = calibrate_threshold(ls, ly)
    corpus = [direction * v for v in corpus_raw if math.isfinite(v)]
    out["auroc_labelled"] = auroc(ls, ly)
    out["auroc_ci"] = list(auroc_interval(ls, ly, n_bootstrap, seed, level=CHANCE_LEVEL))
    out["calibration"] = {
        **cal,
        "threshold": direction * cal["threshold"],
        "rule": f"teacher if {name} {'<=' if direction < 0 else '>='} threshold",
    }
    if out["auroc_ci"][0] <= 0.5:
        # Near chance the best threshold on the labelled sample fits its noise, and classify-and-adjust turns
        # that noise into a confident fraction (a true 30% read as 95% [75, 100]): report no number instead.
        out["estimate"] = {
            "indistinguishable": True,
            "error": indistinguishable_note(name, out["auroc_labelled"], out["auroc_ci"], sum(ly), len(ly) - sum(ly)),
        }
        return out
    try:
        out["estimate"] = estimate_fraction(
            corpus,
            cal["threshold"],
            cal["tpr"],
            cal["fpr"],
            labelled_scores=ls,
            labelled_labels=ly,
            n_bootstrap=n_bootstrap,
            seed=seed,
        )
    except UserError as err:  # one useless score should not sink the other's estimate
        out["estimate"] = {"error": str(err)}
    return out


def _write_scores(out_dir: Path, rows: list[dict], scores: list[dict], flags: dict[str, list[bool]]) -> None:
    records = [
        {"index": i, "where": r["where"], **s, **{f"teacher_{k}": v[i] for k, v in flags.items()}}
        for i, (r, s) in enumerate(zip(rows, scores))
    ]
    sink = pa.BufferOutputStream()
    pq.write_table(pa.Table.from_pylist(records), sink)
    write_atomic(out_dir / SCORES_FILE, sink.getvalue().to_pybytes())
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=list(records[0]))
    writer.writeheader()
    writer.writerows(records)
    write_atomic(out_dir / "scores.csv", text.getvalue())


def _note(has_labelled: bool, by_score: dict) -> str | None:
    """Why there is no headline fraction, when there is none."""
    if not has_labelled:
        return "no labelled sample: pass one to calibrate a threshold and estimate a fraction"
    estimates = [v.get("estimate", {}) for v in by_score.values()]
    if any("fraction" in e for e in estimates):
        return None
    if all(e.get("indistinguishable") for e in estimates):  # the best score's note: its interval, the sample size
        return by_score[max(by_score, key=lambda k: by_score[k]["auroc_labelled"])]["estimate"]["error"]
    return "; ".join(f"{k}: {v['estimate']['error']}" for k, v in by_score.items())


def run_audit(
    corpus_path: str | Path,
    out_dir: str | Path,
    observer: str = "lab:teacher",
    performer: str = "lab:base",
    labelled_path: str | Path | None = None,
    text_field: str = "text",
    prompt_field: str | None = None,
    label_field: str = "label",
    batch_size: int = 16,
    n_bootstrap: int = 1000,
    seed: int = 0,
) -> dict:
    """Score every document of a corpus and estimate its teacher-written fraction.

    corpus_path: .jsonl or .parquet with a `text_field` column (and `prompt_field` when given).
    labelled_path: same format plus `label_field` (teacher/human/lab, 1/0, true/false); it calibrates the
    threshold and gives each score's AUROC. Without it the summary has score statistics but no fraction.
    Writes out_dir/scores.parquet, scores.csv and audit_summary.json; returns the summary.
    The fraction of the score with the higher labelled AUROC is reported as the headline estimate.
    """
    from distillab.files import check_creatable

    check_creatable(Path(out_dir), "audit output directory", "choose another --out")  # before an hour of scoring
    corpus = read_corpus(corpus_path, text_field, prompt_field)
    labelled = read_corpus(labelled_path, text_field, prompt_field, label_field) if labelled_path else None
    obs_model, perf_model, tokenizer = load_pair(observer, performer)

    def score(rows):
        return score_documents(
            obs_model,
            perf_model,
            tokenizer,
            [r["text"] for r in rows],
            [r["prompt"] for r in rows],
            batch_size=batch_size,
        )

    corpus_scores = score(corpus)
    labelled_scores = score(labelled) if labelled else None
    labels = [r["label"] for r in labelled] if labelled else None
    by_score = {
        name: _analyse(
            name,
            [s[name] for s in corpus_scores],
            [s[name] for s in labelled_scores] if labelled_scores else None,
            labels,
            n_bootstrap,
            seed,
        )
        for name in SCORE_NAMES
    }

    calibrated = {k: v for k, v in by_score.items() if "fraction" in v.get("estimate", {})}
    primary = max(calibrated, key=lambda k: calibrated[k]["auroc_labelled"]) if calibrated else None
    flags = {}
    for name in calibrated:
        threshold, direction = by_score[name]["calibration"]["threshold"], TEACHER_DIRECTION[name]
        flags[name] = [
            bool(math.isfinite(s[name]) and direction * s[name] >= direction * threshold) for s in corpus_scores
        ]

    out_dir = Path(out_dir)
    _write_scores(out_dir, corpus, corpus_scores, flags)
    summary = {
        "corpus": str(corpus_path),
        "n_documents": len(corpus),
        "n_scored_tokens": sum(s["n_tokens"] for s in corpus_scores),
        "n_truncated": sum(s["truncated"] for s in corpus_scores),
        "observer": observer,
        "performer": performer,
        "text_field": text_field,
        "prompt_field": prompt_field,
        "labelled": (
            {"path": str(labelled_path), "n": len(labelled), "n_teacher": int(sum(labels))} if labelled else None
        ),
        "primary_score": primary,
        "estimated_teacher_fraction": by_score[primary]["estimate"] if primary else None,
        "scores": by_score,
        "files": {"scores": str(out_dir / SCORES_FILE), "scores_csv": str(out_dir / "scores.csv")},
        "note": _note(labelled is not None, by_score),
    }
    write_atomic(out_dir / SUMMARY_FILE, json.dumps(summary, indent=1) + "\n")
    return summary
