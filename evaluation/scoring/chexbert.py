"""CheXbert: CXR-Report-Metric's ``semb_score`` and the 14-observation F1, from a local
``chexbert.pth`` (Smit et al. 2020), written from the vendored code in MedHEval
(``CXRMetric/CheXbert/src/{encode,bert_tokenizer}.py``, ``models/bert_encoder.py``,
``CXRMetric/run_eval.py: add_semb_col``).

* Model: ``bert-base-uncased`` plus 14 linear heads on the ``[CLS]`` vector (13 x 4 classes
  blank/positive/negative/uncertain, 1 x 2 for No Finding). Checkpoint ``chexbert.pth`` =
  ``{'epoch', 'model_state_dict': {'module.bert.*', 'module.linear_heads.{0..13}.*'},
  'optimizer_state_dict'}`` (saved from ``nn.DataParallel``), read with
  ``torch.load(weights_only=True)``; ``module.`` is stripped, ``bert.embeddings.position_ids``
  (a buffer older transformers saved) dropped, and the rest loaded strictly: missing or unexpected
  keys and wrong shapes are a :class:`MedAlignError` naming them. The BERT config comes from
  ``config.json`` in the tokenizer directory when present, else from the checkpoint's shapes
  (heads = hidden / 64, as bert-base).
* Text (``get_impressions_from_csv``): strip, newlines to spaces, runs of whitespace to one
  space, strip. Ids: ``[CLS] + wordpieces + [SEP]`` cut to ``[CLS] + wordpieces[:510] + [SEP]``;
  a text with no wordpieces is ``[CLS] [SEP]``. Batches padded with id 0 and masked.
* ``semb_score`` (the paper's "CheXbert" column): cosine between the ground truth's and the
  prediction's ``last_hidden_state[:, 0]`` (no pooler, heads unused), per pair, then the mean.
* Strict extras, f1chexbert's "rrg" labels: a head's argmax is positive when it is 1 (positive) or
  3 (uncertain), else negative; ``chexbert_micro_f1_14 = 2 sum TP / (2 sum TP + sum FP + sum FN)``
  over the 14 observations x pairs (ground truth = reference labels), ``chexbert_macro_f1_14`` the
  mean of the 14 per-observation F1 (0 when an observation is positive on neither side, sklearn's
  default ``zero_division``), and the same over the 5 observations Cardiomegaly, Edema,
  Consolidation, Atelectasis, Pleural Effusion (``_5``).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

from evaluation.scoring.lexical import mean
from shared.errors import MedAlignError

CONDITIONS: tuple[str, ...] = (
    "Enlarged Cardiomediastinum", "Cardiomegaly", "Lung Opacity", "Lung Lesion", "Edema",
    "Consolidation", "Pneumonia", "Atelectasis", "Pneumothorax", "Pleural Effusion",
    "Pleural Other", "Fracture", "Support Devices", "No Finding")
FIVE: tuple[str, ...] = ("Cardiomegaly", "Edema", "Consolidation", "Atelectasis", "Pleural Effusion")
MAX_IDS = 512
_WS = re.compile(r"\s+")


@dataclass(frozen=True)
class CheXbertConfig:
    """Local files only: the ``chexbert.pth`` checkpoint and a bert-base-uncased tokenizer dir."""

    checkpoint: Path
    tokenizer_dir: Path
    batch_size: int = 16
    device: str = "cpu"


def clean_report(text: str) -> str:
    """``get_impressions_from_csv``: strip, newlines -> spaces, whitespace runs -> one space."""
    return _WS.sub(" ", str(text).strip().replace("\n", " ")).strip()


def rrg_labels(head_argmax: list[int]) -> list[int]:
    """f1chexbert "rrg": 1 when a head says positive (1) or uncertain (3), else 0."""
    return [int(c in (1, 3)) for c in head_argmax]


def f1_micro_macro(refs: list[list[int]], hyps: list[list[int]], cols: list[int]) -> tuple[float, float]:
    """Multi-label micro and macro F1 over the columns ``cols`` (see the module docstring)."""
    per, tp_all, fp_all, fn_all = [], 0, 0, 0
    for j in cols:
        tp = sum(r[j] and h[j] for r, h in zip(refs, hyps))
        fp = sum((not r[j]) and h[j] for r, h in zip(refs, hyps))
        fn = sum(r[j] and not h[j] for r, h in zip(refs, hyps))
        per.append(2 * tp / (2 * tp + fp + fn) if 2 * tp + fp + fn else 0.0)
        tp_all, fp_all, fn_all = tp_all + tp, fp_all + fp, fn_all + fn
    denom = 2 * tp_all + fp_all + fn_all
    return (2 * tp_all / denom if denom else 0.0), sum(per) / len(per)


def _state_dict(path: Path) -> dict:
    import torch

    if not path.is_file():
        raise MedAlignError(f"--chexbert: not a file: {path}")
    try:
        ckpt = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unreadable file is the user's input error
        raise MedAlignError(f"--chexbert {path}: cannot read it as a torch checkpoint "
                            f"({type(e).__name__}: {e})") from None
    if not isinstance(ckpt, dict) or not isinstance(ckpt.get("model_state_dict"), dict):
        raise MedAlignError(f"--chexbert {path}: no 'model_state_dict' (expected CheXbert's "
                            "{'epoch', 'model_state_dict', 'optimizer_state_dict'})")
    sd = {}
    for k, v in ckpt["model_state_dict"].items():
        k = k.removeprefix("module.")
        if k != "bert.embeddings.position_ids":
            sd[k] = v
    return sd


def _bert_config(sd: dict, tokenizer_dir: Path):
    from transformers import BertConfig

    cfg_file = tokenizer_dir / "config.json"
    if cfg_file.is_file():
        return BertConfig(**json.loads(cfg_file.read_text(encoding="utf-8")))
    try:
        vocab, hidden = sd["bert.embeddings.word_embeddings.weight"].shape
        n_layers = 1 + max(int(k.split(".")[3]) for k in sd if k.startswith("bert.encoder.layer."))
        return BertConfig(
            vocab_size=vocab, hidden_size=hidden, num_hidden_layers=n_layers,
            num_attention_heads=max(hidden // 64, 1),
            intermediate_size=sd["bert.encoder.layer.0.intermediate.dense.weight"].shape[0],
            max_position_embeddings=sd["bert.embeddings.position_embeddings.weight"].shape[0],
            type_vocab_size=sd["bert.embeddings.token_type_embeddings.weight"].shape[0])
    except (KeyError, ValueError) as e:
        raise MedAlignError(f"--chexbert: cannot infer the BERT size from the checkpoint ({e}); "
                            f"put bert-base-uncased's config.json in {tokenizer_dir}") from None


def _model(config):
    from torch import nn
    from transformers import BertModel

    class CheXbertModel(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.bert = BertModel(config)
            h = config.hidden_size
            self.linear_heads = nn.ModuleList([nn.Linear(h, 4) for _ in range(13)] + [nn.Linear(h, 2)])

    return CheXbertModel()


class CheXbertScorer:
    """A loaded CheXbert; :meth:`score` follows the report-metric contract."""

    def __init__(self, cfg: CheXbertConfig, tok, model) -> None:
        self.cfg, self.tok, self.model = cfg, tok, model

    def input_ids(self, text: str) -> list[int]:
        """``[CLS] + wordpieces[:510] + [SEP]`` of the cleaned text (``[CLS] [SEP]`` if empty)."""
        pieces = self.tok.tokenize(clean_report(text))
        ids = self.tok.convert_tokens_to_ids(pieces)[:MAX_IDS - 2]
        return [self.tok.cls_token_id, *ids, self.tok.sep_token_id]

    def encode(self, texts: list[str], progress: bool = False):
        """``(cls_vectors (N, H) float32, head argmax (N, 14))`` for the texts."""
        import torch
        from tqdm import tqdm

        ids = [self.input_ids(t) for t in texts]
        order = sorted(range(len(ids)), key=lambda i: -len(ids[i]))
        hid = self.model.bert.config.hidden_size
        vecs = torch.zeros((len(ids), hid), dtype=torch.float32)
        heads = torch.zeros((len(ids), len(CONDITIONS)), dtype=torch.long)
        bs = self.cfg.batch_size
        for s in tqdm(range(0, len(order), bs), desc="CheXbert", unit="batch", disable=not progress):
            idx = order[s:s + bs]
            width = max(len(ids[i]) for i in idx)
            x = torch.zeros((len(idx), width), dtype=torch.long)
            mask = torch.zeros((len(idx), width), dtype=torch.long)
            for r, i in enumerate(idx):
                x[r, :len(ids[i])] = torch.tensor(ids[i])
                mask[r, :len(ids[i])] = 1
            with torch.no_grad():
                cls = self.model.bert(x.to(self.cfg.device),
                                      attention_mask=mask.to(self.cfg.device))[0][:, 0]
                out = [head(cls).argmax(dim=1) for head in self.model.linear_heads]
            vecs[idx] = cls.float().cpu()
            heads[idx] = torch.stack(out, dim=1).cpu()
        return vecs, heads

    def score(self, hyps: list[str], refs: list[str], *, progress: bool = False) -> dict:
        """Per pair ``semb_score``; corpus 14- and 5-observation micro/macro F1 (fractions)."""
        import torch

        if len(hyps) != len(refs):
            raise ValueError("hypotheses and references differ in length")
        uniq = list(dict.fromkeys(hyps + refs))
        vecs, heads = self.encode(uniq, progress)
        pos = {t: i for i, t in enumerate(uniq)}
        h_idx = torch.tensor([pos[t] for t in hyps], dtype=torch.long)
        r_idx = torch.tensor([pos[t] for t in refs], dtype=torch.long)
        hv, rv = vecs[h_idx], vecs[r_idx]
        cos = (hv * rv).sum(dim=1) / (hv.norm(dim=1) * rv.norm(dim=1))
        semb = [float(c) for c in cos]
        hl = [rrg_labels(heads[i].tolist()) for i in h_idx.tolist()]
        rl = [rrg_labels(heads[i].tolist()) for i in r_idx.tolist()]
        res: dict = {"semb_score": mean(semb)}
        if hyps:
            five = [CONDITIONS.index(c) for c in FIVE]
            for name, cols in (("14", list(range(len(CONDITIONS)))), ("5", five)):
                mi, ma = f1_micro_macro(rl, hl, cols)
                res[f"chexbert_micro_f1_{name}"], res[f"chexbert_macro_f1_{name}"] = mi, ma
        else:
            res.update(dict.fromkeys(("chexbert_micro_f1_14", "chexbert_macro_f1_14",
                                      "chexbert_micro_f1_5", "chexbert_macro_f1_5")))
        return {"per_report": {"semb_score": semb}, "mean": res,
                "info": {"checkpoint": str(self.cfg.checkpoint), "labels": "f1chexbert rrg "
                         "(positive or uncertain = 1)", "max_ids": MAX_IDS}}


def load_chexbert(cfg: CheXbertConfig) -> CheXbertScorer:
    """Load ``chexbert.pth`` strictly (see the module docstring) and the tokenizer directory."""
    from transformers import AutoTokenizer

    tok_dir = Path(cfg.tokenizer_dir)
    if not tok_dir.is_dir():
        raise MedAlignError(f"--chexbert-tokenizer: not a directory: {tok_dir}")
    try:
        tok = AutoTokenizer.from_pretrained(str(tok_dir), local_files_only=True)
    except (OSError, ValueError) as e:
        raise MedAlignError(f"--chexbert-tokenizer {tok_dir}: cannot load a tokenizer ({e})") from None
    sd = _state_dict(Path(cfg.checkpoint))
    model = _model(_bert_config(sd, tok_dir))
    expected = set(model.state_dict()) - {"bert.embeddings.position_ids"}
    missing, unexpected = sorted(expected - set(sd)), sorted(set(sd) - expected)
    if missing or unexpected:
        raise MedAlignError(f"--chexbert {cfg.checkpoint}: not a CheXbert checkpoint for this "
                            f"BERT: missing keys {missing[:5]}{' ...' if len(missing) > 5 else ''}, "
                            f"unexpected keys {unexpected[:5]}{' ...' if len(unexpected) > 5 else ''}")
    try:
        model.load_state_dict(sd, strict=False)  # key sets checked above; shapes checked here
    except RuntimeError as e:
        raise MedAlignError(f"--chexbert {cfg.checkpoint}: {e}") from None
    if tok.vocab_size != model.bert.config.vocab_size:
        raise MedAlignError(f"--chexbert-tokenizer {tok_dir}: vocabulary of {tok.vocab_size} "
                            f"wordpieces, the checkpoint has {model.bert.config.vocab_size}")
    model.to(cfg.device).eval()
    return CheXbertScorer(cfg, tok, model)
