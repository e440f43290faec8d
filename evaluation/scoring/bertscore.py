"""BERTScore as the ``bert_score`` package computes it, from a local model directory (no hub).

MedHEval's ``run_all_metrics.py`` calls ``bert_score.score(model_answers, ground_truths,
lang='en')``: roberta-large, layer 17 (``model2layers``), no idf, no baseline rescaling. A local
directory defeats the package's name lookup, so the layer is passed explicitly (default 17 here;
a model that is not a 24-layer roberta gets a note). What is reproduced (bert_score 0.3.13,
``utils.py``):

* text: ``strip()``; an empty text is ``[CLS] [SEP]`` (the package's
  ``build_inputs_with_special_tokens([])``, a method transformers 5 no longer has);
  else ``tokenizer.encode(text, add_special_tokens=True, max_length=model_max_length,
  truncation=True)``, with ``add_prefix_space=True`` for RoBERTa/GPT-2 tokenizers, i.e. a space
  put before the text (transformers 5's tokenizers ignore that argument, so the package run under
  transformers 5 tokenises the first word differently from the authors' runs; a tokenizer
  saved without ``model_max_length`` gets the model's position count, minus 2 for RoBERTa);
* embeddings: the output of the first ``layer`` encoder layers (the package truncates
  ``encoder.layer``; so do we), each token vector L2-normalised;
* greedy matching over *all* tokens, special tokens included, but with weight 0 for ``[CLS]`` and
  ``[SEP]`` (idf off: every other token weighs 1): ``P = sum_c w_c max_r cos(c, r) / sum_c w_c``,
  ``R`` likewise over the reference, ``F = 2PR / (P + R)`` (NaN -> 0);
* a text of exactly two tokens (empty) on either side: P = R = F = 0 (the package's warning case).

One difference: inside a batch the package pads the similarity matrix with zeros, so a token
whose cosines are all negative gets max 0 when the other text is shorter than the batch's
longest; here the max runs over real tokens only (batch-independent). With roberta-large layer
17 the cosines are positive and the two agree.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from evaluation.scoring.lexical import mean
from shared.errors import MedAlignError

DEFAULT_LAYER = 17
"""bert_score's layer for roberta-large (``lang='en'``)."""


@dataclass(frozen=True)
class BertScoreConfig:
    """Settings for :func:`load_bertscore`."""

    model_dir: Path
    """Local directory with a transformers encoder and its tokenizer (``save_pretrained`` output)."""
    layer: int = DEFAULT_LAYER
    """Encoder layers used (0 = embeddings); 17 = bert_score's roberta-large setting."""
    batch_size: int = 16
    device: str = "cpu"

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise MedAlignError(f"BERTScore batch size must be >= 1, got {self.batch_size}")


class BertScorer:
    """A loaded encoder; :meth:`score` follows the report-metric contract."""

    def __init__(self, cfg: BertScoreConfig, tok, model, n_layers: int) -> None:
        self.cfg, self.tok, self.model = cfg, tok, model
        self._n_layers = n_layers
        name = type(tok).__name__
        self._prefix_space = name.startswith(("Roberta", "GPT2"))
        self._zero_ids = {tok.cls_token_id, tok.sep_token_id}
        mc = model.config
        self._max_len = int(min(tok.model_max_length, 10**6))
        if self._max_len >= 10**6:  # a tokenizer saved without model_max_length
            pos = int(getattr(mc, "max_position_embeddings", 512))
            self._max_len = pos - 2 if getattr(mc, "model_type", None) == "roberta" else pos
        self.info = {"model_dir": str(cfg.model_dir), "layer": cfg.layer, "idf": False,
                     "rescale_with_baseline": False, "model_type": getattr(mc, "model_type", None),
                     "num_hidden_layers_in_model": self._n_layers}
        if not (getattr(mc, "model_type", None) == "roberta" and self._n_layers == 24
                and getattr(mc, "hidden_size", None) == 1024 and cfg.layer == DEFAULT_LAYER):
            self.info["note"] = ("not roberta-large at layer 17: the paper's BERTScore setting is "
                                 "roberta-large (24 layers, hidden 1024) with layer 17")

    def encode(self, text: str) -> list[int]:
        text = text.strip()
        if text == "":
            return [self.tok.cls_token_id, self.tok.sep_token_id]
        if self._prefix_space:  # what add_prefix_space=True did in transformers 3/4
            text = " " + text
        return list(self.tok.encode(text, add_special_tokens=True, truncation=True,
                                    max_length=self._max_len))

    def _embed(self, texts: list[str], progress: bool) -> dict[str, tuple]:
        import torch
        from tqdm import tqdm

        ids = {t: self.encode(t) for t in texts}
        order = sorted(ids, key=lambda t: -len(ids[t]))
        out: dict[str, tuple] = {}
        pad = self.tok.pad_token_id if self.tok.pad_token_id is not None else 0
        bs = self.cfg.batch_size
        for start in tqdm(range(0, len(order), bs), desc="BERTScore", unit="batch",
                          disable=not progress):
            batch = order[start:start + bs]
            width = max(len(ids[t]) for t in batch)
            x = torch.full((len(batch), width), pad, dtype=torch.long)
            mask = torch.zeros((len(batch), width), dtype=torch.long)
            for i, t in enumerate(batch):
                x[i, :len(ids[t])] = torch.tensor(ids[t])
                mask[i, :len(ids[t])] = 1
            with torch.no_grad():
                h = self.model(x.to(self.cfg.device), attention_mask=mask.to(self.cfg.device))[0]
            h = h.float().cpu()
            for i, t in enumerate(batch):
                e = h[i, :len(ids[t])]
                w = torch.tensor([0.0 if j in self._zero_ids else 1.0 for j in ids[t]])
                out[t] = (e / e.norm(dim=-1, keepdim=True), w)
        return out

    def score(self, hyps: list[str], refs: list[str], *, progress: bool = False) -> dict:
        """Per pair P/R/F1 and their means (fractions)."""
        if len(hyps) != len(refs):
            raise ValueError("hypotheses and references differ in length")
        emb = self._embed(list(dict.fromkeys(hyps + refs)), progress)
        ps, rs, fs = [], [], []
        for h, r in zip(hyps, refs):
            (eh, wh), (er, wr) = emb[h], emb[r]
            if len(wh) == 2 or len(wr) == 2:
                p = rr = f = 0.0
            else:
                sim = eh @ er.T
                p = float((sim.max(dim=1).values * wh).sum() / wh.sum())
                rr = float((sim.max(dim=0).values * wr).sum() / wr.sum())
                f = 2 * p * rr / (p + rr) if p + rr != 0 else 0.0
                f = 0.0 if math.isnan(f) else f
            ps.append(p)
            rs.append(rr)
            fs.append(f)
        per = {"bertscore_precision": ps, "bertscore_recall": rs, "bertscore_f1": fs}
        return {"per_report": per, "mean": {k: mean(v) for k, v in per.items()},
                "info": dict(self.info)}


def load_bertscore(cfg: BertScoreConfig) -> BertScorer:
    """Load the tokenizer and encoder from ``cfg.model_dir`` and keep the first ``layer`` layers."""
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
    layers = getattr(getattr(model, "encoder", None), "layer", None)
    if layers is None:
        raise MedAlignError(f"--bertscore-model {model_dir}: not a BERT-style encoder "
                            "(no encoder.layer)")
    n = len(layers)
    if not 0 <= cfg.layer <= n:
        raise MedAlignError(f"BERTScore layer {cfg.layer} out of range 0..{n} for {model_dir} "
                            "(--bertscore-layer)")
    model.encoder.layer = layers[:cfg.layer]
    model.to(cfg.device).eval()
    return BertScorer(cfg, tok, model, n)
