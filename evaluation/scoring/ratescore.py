"""RaTEScore (Zhao et al., 2024) as ``RaTEScore==0.5.0`` computes it with its defaults, from local files.

Per report: split into sentences (:mod:`evaluation.scoring.ratescore_text`), run the DeBERTa NER
(``Angelakeke/RaTE-NER-Deberta`` format: labels from ``config.id2label``, max length 512) on each
sentence, decode its IOB labels into typed entities (ABNORMALITY, NON-ABNORMALITY, DISEASE,
NON-DISEASE, ANATOMY) and pool them over the report's sentences. Each entity string is embedded by
the BioLORD encoder (``FremyCompany/BioLORD-2023-C`` format, an MPNet: ``last_hidden_state[:, 0]``,
max length 30). For a reference/candidate pair with entity sets G and C::

    S(G -> C) = sum_g cos(g, c*) * W[type g, type c*] * N(g, c*) / sum_g W[type g, type c*]
    c* = the entity of C nearest to g by cosine; N = 0.3612 when one type is the negation of the
    other (DISEASE/NON-DISEASE, ABNORMALITY/NON-ABNORMALITY and the two crossed pairs), else 1
    RaTEScore = 2 S(G->C) S(C->G) / (S(G->C) + S(C->G))   (0 when the sum is 0)

with W the 0.5.0 type-weight matrix (:data:`TYPE_WEIGHTS`, not symmetric), S = 0 when its weight sum
is 0, and 0.5 when either side (or both) has no entity.

Blocks (``block``): ``medheval`` reproduces the package's post-processing exactly (its IOB decoder
with the stale-``end`` bug, ties between equally near entities broken by ``torch.topk`` as the
package does); ``strict`` decodes without that bug and breaks ties by the first nearest entity.
In both, the package's pairing bug is fixed: 0.5.0 flattens the sentences of all reports, so a
report with no usable sentence (empty, or only sentences of < 3 characters) produces no entry and
every later pair is scored against the wrong report (the last ones are dropped); here such a report
has no entities and its pair scores 0.5. ``info["no_sentence"]`` counts them.

Differences from the package that do not change the definition: the NER runs over all sentences of
all reports in length-sorted batches and each distinct entity string is embedded once (the package
runs batch 1 and embeds per report); padding changes values by float rounding only (~1e-7).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from evaluation.scoring.ratescore_text import (
    decode_package,
    decode_strict,
    keep_sentences,
    make_splitter,
)
from shared.errors import MedAlignError

NER_MAX_LENGTH = 512
ENCODER_MAX_LENGTH = 30
NEG_WEIGHT = 0.3612
NO_ENTITY_SCORE = 0.5
TYPES = ("ABNORMALITY", "NON-ABNORMALITY", "DISEASE", "NON-DISEASE", "ANATOMY")
#: Pairs (first side's type, matched type) weighted by NEG_WEIGHT.
NEG_PAIRS = frozenset({
    ("NON-DISEASE", "DISEASE"), ("NON-ABNORMALITY", "ABNORMALITY"), ("DISEASE", "NON-DISEASE"),
    ("ABNORMALITY", "NON-ABNORMALITY"), ("NON-DISEASE", "ABNORMALITY"), ("NON-ABNORMALITY", "DISEASE"),
    ("DISEASE", "NON-ABNORMALITY"), ("ABNORMALITY", "NON-DISEASE"),
})
_MATRIX_050 = {
    "abnormality_abnormality": 0.4276119164393705, "abnormality_anatomy": 0.6240929990607657,
    "abnormality_disease": 0.0034478181112993847, "abnormality_non-abnormality": 0.5431049700217344,
    "abnormality_non-disease": 0.27005425386213877, "anatomy_abnormality": 0.7487824274337533,
    "anatomy_anatomy": 0.2856134859160784, "anatomy_disease": 0.4592143222158069,
    "anatomy_non-abnormality": 0.02097055139911715, "anatomy_non-disease": 0.00013736314126696204,
    "disease_abnormality": 0.8396510075734789, "disease_anatomy": 0.9950209388542061,
    "disease_disease": 0.8460555030578727, "disease_non-abnormality": 0.9820689020512646,
    "disease_non-disease": 0.3789136708096537, "non-abnormality_abnormality": 0.16546764653692908,
    "non-abnormality_anatomy": 0.018670610691852826, "non-abnormality_disease": 0.719397354576018,
    "non-abnormality_non-abnormality": 0.0009357166071730684,
    "non-abnormality_non-disease": 0.0927333564267591, "non-disease_abnormality": 0.7759420231214385,
    "non-disease_anatomy": 0.1839139293714062, "non-disease_disease": 0.10073046076318157,
    "non-disease_non-abnormality": 0.03860183811876373, "non-disease_non-disease": 0.34065681486566446,
}
#: RaTEScore 0.5.0's DEFAULT_MATRIX: (first side's type, matched type) -> weight.
TYPE_WEIGHTS: dict[tuple[str, str], float] = {
    tuple(k.upper().split("_")): v for k, v in _MATRIX_050.items()}
BLOCKS = ("medheval", "strict")
SHIFT_NOTE = ("RaTEScore 0.5.0 drops a report with no usable sentence from its flattened sentence "
              "list, shifting every later pair; fixed here: such a report has no entities (0.5)")


@dataclass(frozen=True)
class RaTEScoreConfig:
    """Local files and settings for :func:`load_ratescore`. Nothing is downloaded."""

    ner_dir: Path
    """RaTE-NER-Deberta directory (config.json with id2label, weights, spm.model/tokenizer files)."""
    encoder_dir: Path
    """BioLORD-2023-C directory (an MPNet: config.json, weights, vocab.txt/tokenizer files)."""
    batch_size: int = 16
    """Sentences per NER forward pass and entity strings per encoder forward pass."""
    device: str = "cpu"
    """Torch device ("cpu", "cuda", "cuda:1"); "auto" = cuda when available."""
    block: str = "medheval"
    """Whose post-processing applies by default: "medheval" (the package's) or "strict"."""
    splitter: str = "auto"
    """Sentence splitter: "auto" (medspacy when installed, else rules), "medspacy" or "rules"."""

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise MedAlignError(f"RaTEScore batch size must be >= 1, got {self.batch_size}")
        if self.block not in BLOCKS:
            raise MedAlignError(f"RaTEScore block must be one of {BLOCKS}, got {self.block!r}")


def _check_dir(path: Path, flag: str) -> Path:
    path = Path(path)
    if not path.is_dir() or not (path / "config.json").is_file():
        raise MedAlignError(f"{flag} {path}: not a model directory (no config.json)")
    return path


def _load_pair(path: Path, flag: str, model_cls, optional: tuple[str, ...] = ()):
    """Tokenizer and model from a local directory; missing weights are an error (no random init),
    except those whose names start with one of ``optional`` (parts the metric does not use)."""
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
        model, info = model_cls.from_pretrained(str(path), local_files_only=True,
                                                output_loading_info=True)
    except (OSError, ValueError, KeyError) as e:
        raise MedAlignError(f"{flag} {path}: cannot load a model and tokenizer from it ({e})") from None
    missing = sorted(k for k in info.get("missing_keys") or [] if not k.startswith(optional))
    mismatched = sorted(str(k) for k in (info.get("mismatched_keys") or []))
    if missing or mismatched:
        raise MedAlignError(f"{flag} {path}: the weights do not fit the config: missing "
                            f"{missing[:8]}{' ...' if len(missing) > 8 else ''}, mismatched {mismatched[:8]}")
    tok.padding_side = "right"
    return tok, model.eval(), sorted(info.get("unexpected_keys") or [])


def _labels(config, path: Path) -> dict[int, str]:
    id2label = {int(k): str(v) for k, v in (getattr(config, "id2label", None) or {}).items()}
    bad = [lab for lab in id2label.values()
           if lab != "O" and not (lab[:2] in ("B-", "I-") and lab[2:] in TYPES)]
    if not id2label or bad or "O" not in id2label.values():
        raise MedAlignError(f"--ratescore-ner {path}: config.id2label must hold 'O' and B-/I- labels "
                            f"of {TYPES}; unusable: {bad or sorted(id2label.values())}")
    return id2label


def load_ratescore(cfg: RaTEScoreConfig) -> RaTEScoreScorer:
    """Load the NER and the encoder once (strictly: missing weights fail) and the splitter."""
    import torch
    from transformers import AutoModel, AutoModelForTokenClassification

    ner_dir = _check_dir(cfg.ner_dir, "--ratescore-ner")
    enc_dir = _check_dir(cfg.encoder_dir, "--ratescore-encoder")
    device = cfg.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    ner_tok, ner, ner_extra = _load_pair(ner_dir, "--ratescore-ner", AutoModelForTokenClassification)
    id2label = _labels(ner.config, ner_dir)
    if ner.config.num_labels != len(id2label):
        raise MedAlignError(f"--ratescore-ner {ner_dir}: {ner.config.num_labels} outputs but "
                            f"{len(id2label)} labels in id2label")
    # The pooler is unused (the [CLS] hidden state is the embedding) and may be absent from the file.
    enc_tok, enc, enc_extra = _load_pair(enc_dir, "--ratescore-encoder", AutoModel, ("pooler.",))
    splitter_name, split = make_splitter(cfg.splitter)
    return RaTEScoreScorer(cfg, ner_tok, ner.to(device), id2label, enc_tok, enc.to(device),
                           split, splitter_name, device,
                           enc_extra + ner_extra)


def directional(a_emb, a_types: list[str], b_emb, b_types: list[str], *, block: str = "medheval") -> float:
    """S(A -> B): each entity of A matched to its nearest entity of B by cosine, weighted by the type
    matrix and the negation weight (module docstring). ``a_emb``/``b_emb`` are (n, d) tensors."""
    import torch
    import torch.nn.functional as F

    a = F.normalize(a_emb.float(), p=2, dim=1)
    b = F.normalize(b_emb.float(), p=2, dim=1)
    num = 0.0
    den = 0.0
    for row, a_type in zip(a, a_types):
        sims = torch.matmul(b, row)
        if block == "medheval":
            value, index = torch.topk(sims, 1, largest=True)
            value, index = value[0], index[0]
        else:
            index = torch.argmax(sims)
            value = sims[index]
        b_type = b_types[int(index)]
        weight = TYPE_WEIGHTS[(a_type, b_type)]
        neg = NEG_WEIGHT if (a_type, b_type) in NEG_PAIRS else 1
        num += float(value) * weight * neg
        den += weight
    return num / den if den != 0 else 0


def pair_score(ref_emb, ref_types: list[str], hyp_emb, hyp_types: list[str], *,
               block: str = "medheval") -> float:
    """RaTEScore of one pair: 0.5 when either side has no entity, else the harmonic mean of the two
    directions (0 when they sum to 0)."""
    if len(ref_types) == 0 or len(hyp_types) == 0:
        return NO_ENTITY_SCORE
    p = directional(ref_emb, ref_types, hyp_emb, hyp_types, block=block)
    r = directional(hyp_emb, hyp_types, ref_emb, ref_types, block=block)
    return 0 if p + r == 0 else 2 * p * r / (p + r)


def _batches(lengths: list[int], batch_size: int) -> list[list[int]]:
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    return [order[i:i + batch_size] for i in range(0, len(order), batch_size)]


def _padded(enc: dict, rows: list[int], pad_id: int, device):
    """One batch of pre-tokenised rows, right-padded (input_ids with pad_id, other keys with 0)."""
    import torch

    width = max(len(enc["input_ids"][i]) for i in rows)
    out = {}
    for key, values in enc.items():
        fill = pad_id if key == "input_ids" else 0
        out[key] = torch.tensor([list(values[i]) + [fill] * (width - len(values[i])) for i in rows],
                                dtype=torch.long, device=device)
    return out


class RaTEScoreScorer:
    """Loaded models and splitter; :meth:`score` scores report pairs. Build with :func:`load_ratescore`."""

    def __init__(self, cfg, ner_tok, ner, id2label, enc_tok, enc, split, splitter_name, device,
                 unexpected_keys):
        self.cfg = cfg
        self.ner_tok, self.ner, self.id2label = ner_tok, ner, id2label
        self.enc_tok, self.enc = enc_tok, enc
        self.split, self.splitter_name, self.device = split, splitter_name, device
        self.unexpected_keys = unexpected_keys

    def sentences(self, report: str) -> list[str]:
        """The report's usable sentences (split, stripped, no-word and < 3-character ones dropped)."""
        return keep_sentences(self.split(str(report)))

    def entities(self, reports: list[str], *, block: str, progress: bool = False) -> list[list[tuple[str, str]]]:
        """Per report: its ``(entity string, type)`` list over all its sentences, in order."""
        return self._entities([self.sentences(r) for r in reports], block=block, progress=progress)

    def _entities(self, per_report: list[list[str]], *, block: str, progress: bool) -> list[list[tuple[str, str]]]:
        import torch

        sents, owner = [], []
        for r, report_sents in enumerate(per_report):
            sents.extend(report_sents)
            owner.extend([r] * len(report_sents))
        out: list[list[tuple[str, str]]] = [[] for _ in per_report]
        if not sents:
            return out
        tok = self.ner_tok
        enc = dict(tok(sents, max_length=NER_MAX_LENGTH, truncation=True))
        special = set(tok.all_special_ids)
        decoded: list[list[tuple[str, str]]] = [[] for _ in sents]
        batches = _batches([len(x) for x in enc["input_ids"]], self.cfg.batch_size)
        for rows in _progress(batches, progress, "RaTEScore NER"):
            inputs = _padded(enc, rows, tok.pad_token_id, self.device)
            with torch.no_grad():
                pred = self.ner(**inputs).logits.argmax(dim=2).tolist()
            for row, labels in zip(rows, pred):
                ids = enc["input_ids"][row]
                tokens = tok.convert_ids_to_tokens(ids)
                labels = [self.id2label[x] for x in labels[:len(ids)]]
                if block == "medheval":
                    spans = decode_package(tokens, labels)
                else:
                    spans = decode_strict(labels, [i in special for i in ids])
                decoded[row] = [(tok.convert_tokens_to_string(tokens[s:e + 1]), t) for s, e, t in spans]
        for row, ents in enumerate(decoded):
            out[owner[row]].extend(ents)
        return out

    def embed(self, strings: list[str], *, progress: bool = False) -> dict[str, object]:
        """Each distinct entity string -> its encoder vector (the [CLS] last hidden state, on CPU)."""
        import torch

        unique = list(dict.fromkeys(strings))
        if not unique:
            return {}
        tok = self.enc_tok
        enc = dict(tok(unique, max_length=ENCODER_MAX_LENGTH, truncation=True))
        vectors: dict[str, object] = {}
        for rows in _progress(_batches([len(x) for x in enc["input_ids"]], self.cfg.batch_size),
                              progress, "RaTEScore encoder"):
            inputs = _padded(enc, rows, tok.pad_token_id, self.device)
            with torch.no_grad():
                cls = self.enc(**inputs).last_hidden_state[:, 0, :].float().cpu()
            for row, vec in zip(rows, cls):
                vectors[unique[row]] = vec
        return vectors

    def score(self, hyps: list[str], refs: list[str], *, progress: bool = False,
              block: str | None = None) -> dict:
        """RaTEScore per pair and mean. ``block`` overrides the config's ("medheval"/"strict").

        Returns ``{"per_report": {"ratescore": [...]}, "mean": {"ratescore": m}, "info": {...}}``;
        the mean of no pairs is None."""
        import torch

        block = block or self.cfg.block
        if block not in BLOCKS:
            raise MedAlignError(f"RaTEScore block must be one of {BLOCKS}, got {block!r}")
        if len(hyps) != len(refs):
            raise ValueError(f"{len(hyps)} candidate reports but {len(refs)} references")
        sentences = [self.sentences(r) for r in list(refs) + list(hyps)]
        ents = self._entities(sentences, block=block, progress=progress)
        ref_ents, hyp_ents = ents[:len(refs)], ents[len(refs):]
        vectors = self.embed([s for side in ents for s, _ in side], progress=progress)

        def stack(side):
            return torch.stack([vectors[s] for s, _ in side]) if side else None

        scores = []
        for ref, hyp in zip(ref_ents, hyp_ents):
            scores.append(float(pair_score(stack(ref), [t for _, t in ref], stack(hyp),
                                           [t for _, t in hyp], block=block)))
        no_sentence = {"hyp": sum(1 for x in sentences[len(refs):] if not x),
                       "ref": sum(1 for x in sentences[:len(refs)] if not x)}
        info = {
            "block": block, "splitter": self.splitter_name,
            "ner_dir": str(self.cfg.ner_dir), "encoder_dir": str(self.cfg.encoder_dir),
            "no_entities": sum(1 for r, h in zip(ref_ents, hyp_ents) if not r or not h),
            "no_sentence": no_sentence, "package_bug_fixed": SHIFT_NOTE,
        }
        if self.unexpected_keys:
            info["unused_weights"] = self.unexpected_keys[:20]
        mean = math.fsum(scores) / len(scores) if scores else None
        return {"per_report": {"ratescore": scores}, "mean": {"ratescore": mean}, "info": info}


def _progress(items, on: bool, desc: str):
    if not on:
        return items
    from tqdm import tqdm

    return tqdm(items, desc=desc, unit="batch")
