"""RadGraph scores of generated reports: CXR-Report-Metric's ``radgraph_combined`` and RadGraph-F1.

The model (RadGraph 1.0.0, DyGIE++) runs in :mod:`evaluation.scoring.radgraph_model`. Here:

* the annotation of a report in the form ``radgraph_inference/inference.py``'s ``get_entity``
  writes it: entities numbered from "1" in prediction order, each with ``tokens`` (its words
  joined by spaces), ``label``, ``start_ix``/``end_ix`` and ``relations`` = ``[label, object id]``
  for the predicted relations whose subject is this entity's span and whose object span is also
  a predicted entity (others are dropped);
* ``radgraph_evaluate_model.py``: entity set = {(tokens, label)}, relation set =
  {((tokens, label), (object tokens, object label), relation label)}; F1 between the reference's
  and the prediction's set, 0 when precision + recall (or either denominator) is 0, so two empty
  sets score 0; a missing report (None or empty) has empty sets;
* ``CXRMetric/run_eval.py``'s ``add_radgraph_col``: ``radgraph_combined`` = (entity F1 +
  relation F1) / 2 per report, the paper's RadGraph column (medheval block);
* RadGraph-F1 (Delbrouck et al., the ``radgraph`` package 0.1.18 ``rewards.py``), strict block:
  ``simple`` = F1 over {(tokens, label)}; ``partial`` = over {(tokens, label)} for entities without
  relations and {(tokens, label, True)} for those with; ``complete`` = over {(tokens, label)} for
  entities without relations and {(lower(tokens), label, relation, lower(object tokens))} per
  relation for those with; 0 when either report is empty (length 0) or has no entities. The
  package defaults to the radgraph-xl model; here it runs on the archive given (recorded in
  ``info``), as the package does for ``model_type="radgraph"``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from shared.errors import MedAlignError

MEDHEVAL_METRICS = ("radgraph_combined",)
STRICT_METRICS = ("radgraph_entity_f1", "radgraph_relation_f1", "radgraph_f1_simple",
                  "radgraph_f1_partial", "radgraph_f1_complete")


@dataclass(frozen=True)
class RadGraphConfig:
    """Local files for RadGraph; nothing is downloaded."""

    archive: Path
    """RadGraph 1.0.0 ``model.tar.gz`` or its extracted directory (``--radgraph``)."""
    encoder_dir: Path | None = None
    """Config and tokenizer of the encoder it was trained from (``--radgraph-encoder``); None =
    the archive's ``model_name`` when that is a local directory."""
    batch_size: int = 16
    device: str = "cpu"

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise MedAlignError(f"RadGraph batch size must be >= 1, got {self.batch_size}")


def annotation_dict(ann) -> dict:
    """``get_entity``'s form of one :class:`~evaluation.scoring.radgraph_model.Annotation`."""
    words = ann.words
    ner_spans = [[a, b] for a, b, _ in ann.entities]
    entities = {}
    for idx, (start, end, label) in enumerate(ann.entities):
        rels = []
        for s1, e1, s2, e2, lab in ann.relations:
            if [s1, e1] != [start, end]:
                continue
            if [s2, e2] in ner_spans:
                rels.append([lab, str(ner_spans.index([s2, e2]) + 1)])
        entities[str(idx + 1)] = {"tokens": " ".join(words[start:end + 1]), "label": label,
                                  "start_ix": start, "end_ix": end, "relations": rels}
    return {"text": " ".join(words), "entities": entities}


def entity_set(ann: dict | None) -> set:
    """{(tokens, label)} of a report (``parse_entity_relation``); empty for a missing report."""
    if not ann:
        return set()
    return {(e["tokens"], e["label"]) for e in ann["entities"].values()}


def relation_set(ann: dict | None) -> set:
    """{((tokens, label), (object tokens, object label), relation)} of a report."""
    if not ann:
        return set()
    ents = ann["entities"]
    return {((e["tokens"], e["label"]), (ents[r[1]]["tokens"], ents[r[1]]["label"]), r[0])
            for e in ents.values() for r in e["relations"]}


def set_f1(test: set, retrieved: set) -> float:
    """``compute_f1`` of ``radgraph_evaluate_model.py``: 0 where a denominator is 0."""
    tp = len(test & retrieved)
    precision = tp / len(retrieved) if retrieved else 0.0
    recall = tp / len(test) if test else 0.0
    return 2 * precision * recall / (precision + recall) if precision + recall else 0.0


def _candidates(ann: dict, level: str) -> set:
    out = set()
    ents = ann["entities"]
    for e in ents.values():
        if level == "simple" or not e["relations"]:
            out.add((e["tokens"], e["label"]))
        elif level == "partial":
            out.add((e["tokens"], e["label"], True))
        else:
            out.update((e["tokens"].lower(), e["label"], r[0], ents[r[1]]["tokens"].lower())
                       for r in e["relations"])
    return out


def radgraph_f1(hyp_ann: dict | None, ref_ann: dict | None) -> dict[str, float]:
    """RadGraph-F1 simple/partial/complete of one pair (``rewards.compute_reward``, level "all")."""
    if not hyp_ann or not ref_ann or not hyp_ann["entities"] or not ref_ann["entities"]:
        return {"simple": 0.0, "partial": 0.0, "complete": 0.0}
    out = {}
    for level in ("simple", "partial", "complete"):
        hyp, ref = _candidates(hyp_ann, level), _candidates(ref_ann, level)
        # The package's precision counts hypothesis items found in the reference, and vice versa.
        out[level] = set_f1(ref, hyp)
    return out


def pair_scores(hyp_ann: dict | None, ref_ann: dict | None) -> dict[str, float]:
    """Every per-report RadGraph metric of one (prediction, reference) pair of annotations."""
    ent = set_f1(entity_set(ref_ann), entity_set(hyp_ann))
    rel = set_f1(relation_set(ref_ann), relation_set(hyp_ann))
    f1 = radgraph_f1(hyp_ann, ref_ann)
    return {"radgraph_combined": (ent + rel) / 2, "radgraph_entity_f1": ent,
            "radgraph_relation_f1": rel, "radgraph_f1_simple": f1["simple"],
            "radgraph_f1_partial": f1["partial"], "radgraph_f1_complete": f1["complete"]}


class RadGraphScorer:
    """The loaded model plus the metrics; :meth:`annotate` and :meth:`score`."""

    def __init__(self, cfg: RadGraphConfig):
        from evaluation.scoring.radgraph_model import RadGraphModel

        self.cfg = cfg
        self.model = RadGraphModel(Path(cfg.archive), None if cfg.encoder_dir is None
                                   else Path(cfg.encoder_dir), device=cfg.device)

    def annotate(self, texts: list[str | None], *, progress: bool = False) -> list[dict | None]:
        """``get_entity``-form annotations; None for a missing (None or empty) report. Each
        distinct text is run once; texts are batched by length."""
        unique = sorted({t for t in texts if t}, key=lambda t: (len(t), t))
        done: dict[str, dict] = {}
        bs = self.cfg.batch_size
        bar = None
        if progress:
            from tqdm import tqdm

            bar = tqdm(total=len(unique), desc="RadGraph", unit="report")
        for at in range(0, len(unique), bs):
            batch = unique[at:at + bs]
            for text, ann in zip(batch, self.model.annotate(batch)):
                done[text] = annotation_dict(ann)
            if bar is not None:
                bar.update(len(batch))
        if bar is not None:
            bar.close()
        return [done[t] if t else None for t in texts]

    def score(self, hyps: list[str | None], refs: list[str | None], *, progress: bool = False) -> dict:
        """Per-report and mean RadGraph metrics of the given pairs (medheval names first)."""
        if len(hyps) != len(refs):
            raise MedAlignError(f"RadGraph: {len(hyps)} predictions but {len(refs)} references")
        anns = self.annotate(list(hyps) + list(refs), progress=progress)
        rows = [pair_scores(h, r) for h, r in zip(anns[:len(hyps)], anns[len(hyps):])]
        names = MEDHEVAL_METRICS + STRICT_METRICS
        per = {m: [row[m] for row in rows] for m in names}
        mean = {m: (sum(v) / len(v) if v else None) for m, v in per.items()}
        s = self.model.settings
        info = {
            "model": str(self.cfg.archive), "encoder": str(self.model.encoder_dir),
            "trained_from": s.model_name, "label_prefix": s.prefix,
            "max_span_width": s.max_span_width, "spans_per_word": s.spans_per_word,
            "max_length": s.max_length, "device": self.cfg.device, "batch_size": self.cfg.batch_size,
            "n_pairs": len(rows), "medheval_metrics": list(MEDHEVAL_METRICS),
            "strict_metrics": list(STRICT_METRICS),
            "tokenizer": "CXR-Report-Metric radgraph_inference regex ('-' not split)",
            "radgraph_f1_model": "the --radgraph archive (the radgraph package's default is "
                                 "radgraph-xl; these values are for this model)",
        }
        return {"per_report": per, "mean": mean, "info": info}


def load_radgraph(cfg: RadGraphConfig) -> RadGraphScorer:
    """Load the RadGraph model once, strictly; :class:`MedAlignError` on bad files."""
    return RadGraphScorer(cfg)
