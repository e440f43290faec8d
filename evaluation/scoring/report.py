"""Report-generation scoring in two blocks, as MedHEval scores it and with its quirks fixed.

``medheval`` (paper-compatible): the rows of MedHEval's ``run_all_metrics.py`` (BERTScore P/R/F1,
BLEU, METEOR, ROUGE-1/2/L P/R/F1 with the swapped P/R, RaTEScore) on its line-order pairs, plus
``semb_score`` (CheXbert) and ``radgraph_combined`` from ``run_eval.py`` on its study-id pairs,
each step with its own cleaning (:mod:`evaluation.scoring.report_pairs`). ``strict``: the same
metrics (ROUGE P/R the right way round) and the clinical metrics' extras (CheXbert 14/5-observation
micro/macro F1, RadGraph-F1, ...) on one id pairing with the prefix removed as a prefix.

Metric definitions: :mod:`~evaluation.scoring.lexical`, :mod:`~evaluation.scoring.bertscore`,
:mod:`~evaluation.scoring.chexbert`, and the RadGraph and RaTEScore modules
(:mod:`~evaluation.scoring.clinical` wires them in). All values are fractions, as the
reference writes them (``units: "fraction"``; the summaries and ``compare`` show x100). A metric
whose files are not given is ``null`` with a note naming the flag.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from evaluation.scoring.clinical import SPECS, BlockScorer, not_computed_note
from evaluation.scoring.join import Joined, Prediction
from evaluation.scoring.lexical import LEXICAL_KEYS, ROUGE_KEYS, lexical_scores
from evaluation.scoring.nltk_data import (
    PUNKT_HELP,
    PUNKT_UNTRAINED,
    WORDNET_HELP,
    find_wordnet,
    word_tokenizer,
)
from evaluation.scoring.report_pairs import (
    PairingError,
    ReportPairs,
    line_pairs,
    strict_pairs,
    study_id_pairs,
)

MEDHEVAL_KEYS: tuple[str, ...] = (
    "bertscore_precision", "bertscore_recall", "bertscore_f1", "bleu", "meteor", *ROUGE_KEYS,
    "ratescore", "semb_score", "radgraph_combined")
CLINICAL_ORDER: tuple[str, ...] = ("bertscore", "ratescore", "chexbert", "radgraph")


def _lexical(pairs: ReportPairs, tokenize, wordnet, *, swapped: bool) -> dict[str, Any]:
    if not len(pairs):
        return dict.fromkeys(LEXICAL_KEYS)
    return lexical_scores(pairs.hyps, pairs.refs, tokenize=tokenize, wordnet=wordnet,
                          swapped_rouge=swapped)["mean"]


def score_reports(records: list[dict], preds: list[Prediction], joined: Joined, *,
                  nltk_data: str | Path | None = None, scorers: dict[str, Any] | None = None,
                  wordnet=None, tokenize=None, progress: bool = False) -> dict[str, Any]:
    """Both blocks. ``preds`` in prediction-file line order; ``joined`` = records joined by id;
    ``scorers``: loaded scorers by metric name (``bertscore``, ``chexbert``, ``radgraph``,
    ``ratescore``), absent ones reported as not computed. ``wordnet`` / ``tokenize`` override
    the NLTK lookups (tests).

    Returns ``{"units", "medheval", "strict", "num_reports", "num_line_pairs", "num_id_pairs",
    "report_info", "notes"}``."""
    scorers = scorers or {}
    notes: list[str] = []
    info: dict[str, Any] = {}
    if tokenize is None:
        tokenize, info["word_tokenize"] = word_tokenizer(nltk_data)
        if info["word_tokenize"] == PUNKT_UNTRAINED:
            notes.append("BLEU/METEOR tokens: nltk's English Punkt model was not found, so "
                         "sentences are split by an untrained Punkt (an approximation of "
                         "word_tokenize); " + PUNKT_HELP)
    wn = wordnet if wordnet is not None else find_wordnet(nltk_data)
    if wn is None:
        notes.append("meteor not computed: the NLTK WordNet corpus was not found; " + WORDNET_HELP)
    elif getattr(wn, "root", None) is not None:
        info["meteor_wordnet"] = str(wn.root)

    line = line_pairs(records, preds)
    strict = strict_pairs(joined)
    notes += line.notes
    try:
        by_id: ReportPairs | None = study_id_pairs(records, preds)
        notes += by_id.notes
    except PairingError as e:
        by_id = None
        notes.append(f"medheval semb_score and radgraph_combined not computed: {e}")

    med: dict[str, Any] = dict.fromkeys(MEDHEVAL_KEYS)
    med.update(_lexical(line, tokenize, wn, swapped=True))
    strict_block: dict[str, Any] = dict.fromkeys(MEDHEVAL_KEYS)
    strict_block.update(_lexical(strict, tokenize, wn, swapped=False))

    for name in CLINICAL_ORDER:
        spec = SPECS[name]
        if name not in scorers:
            notes.append(not_computed_note(name))
            continue
        runner = scorers[name] if isinstance(scorers[name], BlockScorer) else \
            BlockScorer(name, scorers[name], progress=progress)
        med_pairs = line if spec.medheval_pairs == "line" else by_id
        if med_pairs is not None and len(med_pairs):
            res = runner.score(med_pairs.hyps, med_pairs.refs, "medheval")
            for k in spec.medheval_keys:
                med[k] = res["mean"].get(k)
        if len(strict):
            res = runner.score(strict.hyps, strict.refs, "strict")
            strict_block.update(res["mean"])
            info[name] = res.get("info", {})
    return {"units": "fraction", "medheval": med, "strict": strict_block,
            "num_reports": len(strict), "num_line_pairs": len(line),
            "num_id_pairs": None if by_id is None else len(by_id),
            "report_info": info, "notes": notes}
