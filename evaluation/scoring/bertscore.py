"""BERTScore F1 from a local model directory (no hub access), written from the paper's definition.

Zhang et al., "BERTScore: Evaluating Text Generation with BERT" (ICLR 2020): embed candidate and
reference with one hidden layer of a BERT-like encoder, L2-normalise each token vector, and
greedily match by cosine similarity::

    P = mean_{c in cand} max_{r in ref} cos(c, r)      R = mean_{r in ref} max_{c in cand} cos(c, r)
    F1 = 2 P R / (P + R)

Here: no idf weighting, no baseline rescaling, special tokens ([CLS], [SEP], <s>, ...) excluded,
texts truncated to the model's maximum length. The layer is fixed per run (``layer``; default the
last hidden layer) and recorded in the output, since BERTScore values depend on it: the
``bert_score`` package's defaults are e.g. layer 9 for ``bert-base-uncased`` and 17 for
``roberta-large``; pass the same layer to compare with numbers it produced.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from shared.errors import MedAlignError


@dataclass(frozen=True)
class BertScoreConfig:
    """Settings for :func:`bertscore`."""

    model_dir: Path
    """Local directory with a transformers encoder and its tokenizer (``save_pretrained`` output)."""
    layer: int | None = None
    """Index into ``hidden_states`` (0 = embeddings, L = last layer); None = last layer."""
    batch_size: int = 16
    """Texts embedded per forward pass."""
    device: str | None = None
    """Torch device; None = cuda when available, else cpu."""

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise MedAlignError(f"BERTScore batch size must be >= 1, got {self.batch_size}")


def _load(cfg: BertScoreConfig):
    from transformers import AutoModel, AutoTokenizer

    model_dir = Path(cfg.model_dir)
    if not model_dir.is_dir():
        raise MedAlignError(f"--bertscore-model: not a directory: {model_dir}")
    try:
        tok = AutoTokenizer.from_pretrained(str(model_dir), local_files_only=True)
        model = AutoModel.from_pretrained(str(model_dir), local_files_only=True)
    except (OSError, ValueError) as e:
        raise MedAlignError(f"--bertscore-model {model_dir}: cannot load a model and tokenizer "
                            f"from it ({e})") from None
    return tok, model


def _embed(texts: list[str], tok, model, layer: int, batch_size: int, device) -> list:
    """Per text: a (T_i, d) tensor of L2-normalised token vectors, special tokens removed."""
    import torch

    max_len = getattr(tok, "model_max_length", 512) or 512
    max_pos = getattr(model.config, "max_position_embeddings", None)
    if max_pos:
        max_len = min(max_len, max_pos)
    out = []
    for start in range(0, len(texts), batch_size):
        batch = texts[start:start + batch_size]
        enc = tok(batch, padding=True, truncation=True, max_length=max_len, return_tensors="pt",
                  return_special_tokens_mask=True)
        special = enc.pop("special_tokens_mask").bool()
        enc = {k: v.to(device) for k, v in enc.items()}
        with torch.no_grad():
            hidden = model(**enc, output_hidden_states=True).hidden_states[layer].float()
        hidden = torch.nn.functional.normalize(hidden, dim=-1).cpu()
        keep = enc["attention_mask"].cpu().bool() & ~special
        out.extend(hidden[i][keep[i]] for i in range(len(batch)))
    return out


def bertscore(candidates: list[str], references: list[str], cfg: BertScoreConfig) -> dict:
    """Mean BERTScore over pairs. Returns ``{"precision", "recall", "f1"}`` (fractions in [-1, 1],
    means over pairs), plus ``"per_pair_f1"``, ``"layer"`` and ``"model_dir"``. A pair where
    either side has no tokens scores 0."""
    import torch

    if len(candidates) != len(references):
        raise ValueError("candidates and references differ in length")
    tok, model = _load(cfg)
    n_layers = int(getattr(model.config, "num_hidden_layers"))
    layer = n_layers if cfg.layer is None else cfg.layer
    if not 0 <= layer <= n_layers:
        raise MedAlignError(f"BERTScore layer {layer} out of range 0..{n_layers} for {cfg.model_dir}")
    device = cfg.device or ("cuda" if torch.cuda.is_available() else "cpu")
    model.to(device).eval()
    cand = _embed([str(c) for c in candidates], tok, model, layer, cfg.batch_size, device)
    ref = _embed([str(r) for r in references], tok, model, layer, cfg.batch_size, device)
    ps, rs, fs = [], [], []
    for c, r in zip(cand, ref):
        if len(c) == 0 or len(r) == 0:
            p = rr = f = 0.0
        else:
            sim = c @ r.T
            p = sim.max(dim=1).values.mean().item()
            rr = sim.max(dim=0).values.mean().item()
            f = 0.0 if p + rr == 0 else 2 * p * rr / (p + rr)
        ps.append(p)
        rs.append(rr)
        fs.append(f)
    n = max(len(fs), 1)
    return {"precision": math.fsum(ps) / n, "recall": math.fsum(rs) / n, "f1": math.fsum(fs) / n,
            "per_pair_f1": fs, "layer": layer, "model_dir": str(cfg.model_dir)}
