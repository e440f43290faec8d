"""Scoring of generated answers: VQA (LLaVA-Med-compatible and strict) and reports.

Public API: :func:`score_files` (files -> metrics dict), :func:`score_vqa`,
:func:`score_reports`, :func:`normalize_word`, :func:`markdown_summary`, :func:`compare_table`.
"""

from evaluation.scoring.bertscore import BertScoreConfig, load_bertscore
from evaluation.scoring.join import Joined, join_by_id, load_ground_truth, load_predictions
from evaluation.scoring.normalize import normalize_answer, normalize_word
from evaluation.scoring.report import score_reports
from evaluation.scoring.score import score_files
from evaluation.scoring.summary import compare_table, markdown_summary
from evaluation.scoring.vqa import score_vqa

__all__ = [
    "BertScoreConfig", "Joined", "compare_table", "join_by_id", "load_bertscore", "load_ground_truth",
    "load_predictions", "markdown_summary", "normalize_answer", "normalize_word", "score_files",
    "score_reports", "score_vqa",
]
