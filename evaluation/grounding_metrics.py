"""The grounding benchmark's numbers: per-question correctness, lesion attention mass, paired tests.

* :func:`correct_per_question`: a prediction is correct when its normalised text equals the
  normalised answer (lower case, punctuation and extra spaces removed): the answers are one closed
  set (yes / no / the four quadrants), so there is no partial credit.
* :func:`lesion_mass`: ``sum_i a_i m_i / sum_i a_i`` per row, ``a`` the attention to the N image
  tokens and ``m`` the lesion's patch mask: the share of the attention to the image that lands on
  the lesion (uniform attention scores the lesion's patch fraction, ~0.1 here).
* :func:`sign_test`: exact two-sided sign (McNemar) test on the discordant pairs of two 0/1 vectors
  over the same questions; :func:`paired_bootstrap`: the mean difference and its percentile
  interval, questions resampled with replacement.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import numpy as np

_PUNCT = re.compile(r"[^a-z0-9 ]+")


def normalise(text: str) -> str:
    return " ".join(_PUNCT.sub(" ", str(text).lower()).split())


def correct_per_question(preds: Path, gt: Path) -> np.ndarray:
    """[Q] bool in the order of the records of ``gt`` (a missing prediction is wrong)."""
    from shared.records import answer_text, load_records

    by_id = {}
    for line in Path(preds).read_text().splitlines():
        if line.strip():
            obj = json.loads(line)
            by_id[str(obj["question_id"]).strip()] = obj.get("text", "")
    recs = load_records(gt)
    return np.array([normalise(by_id.get(str(r["id"]).strip(), "")) == normalise(answer_text(r) or "") for r in recs])


def lesion_mass(attn: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """attn [B, N] non-negative, mask [B, N] bool -> [B] share of each row's mass on the mask."""
    attn = np.asarray(attn, dtype=np.float64)
    total = attn.sum(-1)
    return np.where(total > 0, (attn * np.asarray(mask, dtype=np.float64)).sum(-1) / np.maximum(total, 1e-300), 0.0)


def sign_test(a: np.ndarray, b: np.ndarray) -> dict:
    """Exact two-sided sign test of ``a`` vs ``b`` ([Q] 0/1 each, the same questions).

    Returns ``{"a_only", "b_only", "p_value"}``: the discordant counts and
    ``min(1, 2 * P(X <= min(a_only, b_only)))`` for X ~ Binomial(a_only + b_only, 1/2)
    (1.0 when no pair is discordant).
    """
    a, b = np.asarray(a, dtype=bool), np.asarray(b, dtype=bool)
    if a.shape != b.shape:
        raise ValueError(f"paired vectors differ in shape: {a.shape} vs {b.shape}")
    n10, n01 = int((a & ~b).sum()), int((~a & b).sum())
    n, k = n10 + n01, min(n10, n01)
    if n == 0:
        return {"a_only": n10, "b_only": n01, "p_value": 1.0}
    # log-space binomial tail, exact for any n here
    logs = [math.lgamma(n + 1) - math.lgamma(i + 1) - math.lgamma(n - i + 1) - n * math.log(2) for i in range(k + 1)]
    top = max(logs)
    tail = math.exp(top) * sum(math.exp(v - top) for v in logs)
    return {"a_only": n10, "b_only": n01, "p_value": min(1.0, 2.0 * tail)}


def paired_bootstrap(a: np.ndarray, b: np.ndarray, n_boot: int = 2000, seed: int = 0) -> dict:
    """Mean of ``a - b`` over questions with a 95% percentile interval (questions resampled)."""
    d = np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(d), size=(n_boot, len(d)))
    means = d[idx].mean(1)
    return {"mean_diff": float(d.mean()), "ci95": [float(np.quantile(means, 0.025)), float(np.quantile(means, 0.975))],
            "p_le_0": float((means <= 0).mean())}


__all__ = ["correct_per_question", "lesion_mass", "normalise", "paired_bootstrap", "sign_test"]
