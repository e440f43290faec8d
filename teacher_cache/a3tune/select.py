"""Prompt-aware mask selection: the top-k crops of an image by cosine to the question's query text.

The authors' ``retrieve_relevant_crop_biomed_topk`` (``Segment/sam.py``): scores = L2-normalised
image features @ the L2-normalised text feature (times 100, which does not change the order), then
``sorted(range(n), key=score, reverse=True)[:topk]``: descending, ties in mask order (Python's sort
is stable under ``reverse``). No crop -> no selection (their ``(None, None)``): the question gets
no labels. Scores are computed in float32, as theirs.
"""

from __future__ import annotations

import numpy as np


def top_k(image_features: np.ndarray, text_feature: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """``(indices int64 [min(k, M)], cosines float32 [min(k, M)])`` of the best masks, best first.

    Args:
        image_features: (M, D) L2-normalised crop features (M may be 0).
        text_feature: (D,) L2-normalised query feature.
        k: how many to keep (>= 1).
    """
    if k < 1:
        raise ValueError(f"top-k must be >= 1, got {k}")
    feats = np.asarray(image_features, np.float32)
    if feats.shape[0] == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.float32)
    scores = feats @ np.asarray(text_feature, np.float32)
    order = np.argsort(-scores, kind="stable")[:k]  # descending; equal scores keep mask order
    return order.astype(np.int64), scores[order].astype(np.float32)





def selection_name(template: str, top_k: int, clip_sha256: str, qkeys: list[str], image_rows: list[int],
                   query_shas: list[str]) -> str:
    """``selection-<16 hex>``: a digest of everything the selection depends on."""
    import hashlib
    import json

    body = json.dumps({"template": template, "top_k": top_k, "biomedclip": clip_sha256, "qkey": qkeys,
                       "image_row": image_rows, "query_sha": query_shas}, separators=(",", ":"))
    return "selection-" + hashlib.sha256(body.encode()).hexdigest()[:16]


def compute_selection(questions: list[dict], read_features, encode_texts, top_k_: int,
                      progress: bool = True) -> dict[str, np.ndarray]:
    """The selection's columns for ``questions`` (``{"qkey", "image_row", "text", "query_sha"}`` each).

    ``read_features(row) -> (M, D)`` gives an image row's stored crop features (read once per image: the
    questions are visited grouped by image); ``encode_texts(list) -> (T, D)`` the normalised text features
    of the distinct query texts, in order of first appearance (so a re-selection embeds the very batches a
    build did). Returns ``qkey``, ``image_row``, ``query_sha``, ``top_idx`` (Q, k) int16 -1-padded and
    ``top_score`` (Q, k) float32 0-padded.
    """
    from tqdm.auto import tqdm

    texts = list(dict.fromkeys(q["text"] for q in questions))
    text_of = {t: i for i, t in enumerate(texts)}
    feats = encode_texts(texts)
    n = len(questions)
    idx = np.full((n, top_k_), -1, np.int16)
    score = np.zeros((n, top_k_), np.float32)
    order = sorted(range(n), key=lambda i: questions[i]["image_row"])
    current, image_feats = None, None
    for i in tqdm(order, desc="selecting masks", unit="q", disable=not progress, leave=False):
        row = questions[i]["image_row"]
        if row != current:
            current, image_feats = row, read_features(row)
        sel, s = top_k(image_feats, feats[text_of[questions[i]["text"]]], top_k_)
        idx[i, :len(sel)] = sel
        score[i, :len(sel)] = s
    return {"qkey": [q["qkey"] for q in questions], "image_row": np.asarray([q["image_row"] for q in questions],
                                                                            np.int32),
            "query_sha": [q["query_sha"] for q in questions], "top_idx": idx, "top_score": score}
__all__ = ["compute_selection", "selection_name", "top_k"]
