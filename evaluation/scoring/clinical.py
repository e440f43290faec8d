"""The model-based report metrics, wired in lazily: CheXbert, RadGraph, RaTEScore (and BERTScore).

Each lives in its own module with the same contract (``<Name>Config`` of local paths plus
``batch_size``/``device``, ``load_<name>(cfg)``, ``scorer.score(hyps, refs, progress=...)`` ->
``{"per_report", "mean", "info"}``). A module is imported only when its files are given, so a
user without one metric's files (or its optional packages) still gets the others; the missing
metric is ``null`` with a note naming the flags that supply it.

Which of a metric's outputs go into which block, and which pairing the ``medheval`` block uses
for it (:mod:`evaluation.scoring.report_pairs`): CheXbert's ``semb_score`` and RadGraph's
``radgraph_combined`` come from ``run_eval.py`` (study-id pairs), RaTEScore and BERTScore from
``run_all_metrics.py`` (line pairs). The ``strict`` block takes every output of each metric on the
strict pairs. A scorer whose ``score`` takes ``block=`` (RaTEScore: the package's
post-processing quirks vs fixed) is told which block it is scoring.
"""

from __future__ import annotations

import importlib
import inspect
from dataclasses import dataclass
from typing import Any

from shared.errors import MedAlignError


@dataclass(frozen=True)
class MetricSpec:
    """Where a metric lives and how the ``medheval`` block uses it."""

    name: str
    module: str
    config_class: str
    loader: str
    medheval_keys: tuple[str, ...]
    medheval_pairs: str
    """"id" (run_eval.py: int(question_id), shared ids, sorted) or "line" (run_all_metrics.py)."""
    flags: str


SPECS: dict[str, MetricSpec] = {s.name: s for s in (
    MetricSpec("bertscore", "evaluation.scoring.bertscore", "BertScoreConfig", "load_bertscore",
               ("bertscore_precision", "bertscore_recall", "bertscore_f1"), "line",
               "--bertscore-model DIR (a local roberta-large; --bertscore-layer, default 17)"),
    MetricSpec("ratescore", "evaluation.scoring.ratescore", "RaTEScoreConfig", "load_ratescore",
               ("ratescore",), "line", "--ratescore-ner NER_DIR --ratescore-encoder ENCODER_DIR"),
    MetricSpec("chexbert", "evaluation.scoring.chexbert", "CheXbertConfig", "load_chexbert",
               ("semb_score",), "id", "--chexbert chexbert.pth --chexbert-tokenizer BERT_DIR"),
    MetricSpec("radgraph", "evaluation.scoring.radgraph", "RadGraphConfig", "load_radgraph",
               ("radgraph_combined",), "id", "--radgraph model.tar.gz|DIR --radgraph-encoder ENCODER_DIR"),
)}


def resolve_device(device: str) -> str:
    """``auto`` -> ``cuda`` when available, else ``cpu``; ``cpu``, ``cuda``, ``cuda:K`` kept."""
    import torch

    d = device.strip().lower()
    if d == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if d == "cpu" or d == "cuda" or (d.startswith("cuda:") and d[5:].isdigit()):
        if d != "cpu" and not torch.cuda.is_available():
            raise MedAlignError(f"--device {device}: CUDA is not available here")
        return d
    raise MedAlignError(f"--device must be auto, cpu, cuda or cuda:K, got {device!r}")


def load_scorer(name: str, paths: dict[str, Any], *, batch_size: int = 16, device: str = "cpu"):
    """Import the metric's module and load its scorer from ``paths`` (its config's path fields)."""
    spec = SPECS[name]
    try:
        mod = importlib.import_module(spec.module)
    except ImportError as e:
        raise MedAlignError(f"{name}: cannot import {spec.module} ({e}); install what it needs "
                            f"or leave out {spec.flags.split()[0]}") from None
    cfg = getattr(mod, spec.config_class)(**paths, batch_size=batch_size, device=device)
    return getattr(mod, spec.loader)(cfg)


class BlockScorer:
    """Runs one loaded scorer for a block, reusing the result when both blocks hand it the same
    pairs (common: the two cleanings agree on most report sets)."""

    def __init__(self, name: str, scorer, *, progress: bool = False) -> None:
        self.name, self.scorer, self.progress = name, scorer, progress
        self._takes_block = "block" in inspect.signature(scorer.score).parameters
        self._cache: dict[tuple, dict] = {}

    def score(self, hyps: list[str], refs: list[str], block: str) -> dict:
        key = (tuple(hyps), tuple(refs), block if self._takes_block else None)
        if key not in self._cache:
            kw = {"block": block} if self._takes_block else {}
            res = self.scorer.score(list(hyps), list(refs), progress=self.progress, **kw)
            if not isinstance(res, dict) or not isinstance(res.get("mean"), dict):
                raise MedAlignError(f"{self.name}: scorer returned no 'mean' dict")
            self._cache[key] = res
        return self._cache[key]


def not_computed_note(name: str) -> str:
    spec = SPECS[name]
    keys = ", ".join(spec.medheval_keys)
    return f"{keys} not computed: pass {spec.flags}"
