"""``medalign-eval``: score generated answers and compare runs.

Subcommands here: ``score`` and ``compare``. ``generate`` and ``attention`` live in their own
modules and are registered at the bottom of this file (see "Subcommands from other modules").
A :class:`MedAlignError` from any subcommand prints ``Error: <message>`` and exits with status 2.
"""

from __future__ import annotations

import json
from pathlib import Path

import click

from shared.cli import UserErrorGroup
from shared.errors import MedAlignError


@click.group(cls=UserErrorGroup)
def main() -> None:
    """MedAlign evaluation: score predictions and compare runs."""


@main.command()
@click.option("--pred", "pred", required=True, type=click.Path(dir_okay=False, path_type=Path),
              help="Predictions, JSONL with question_id and text (LLaVA-Med answer format).")
@click.option("--gt", "gt", required=True, type=click.Path(dir_okay=False, path_type=Path),
              help="Ground truth, LLaVA-style JSON list (id, conversations, answer_type).")
@click.option("--task", type=click.Choice(["vqa", "report"]), required=True,
              help="vqa: LLaVA-Med-compatible and strict VQA metrics; report: BLEU/ROUGE-L/METEOR/BERTScore.")
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Write the metrics JSON here and a markdown summary next to it (metrics.md); "
                   "without it the JSON goes to stdout.")
@click.option("--bertscore-model", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Local encoder directory for BERTScore (reports); skipped when not given.")
@click.option("--bertscore-layer", type=int, default=None,
              help="Hidden layer for BERTScore (0 = embeddings); default: the last layer.")
@click.option("--nltk-data", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Folder holding NLTK data (corpora/wordnet) for METEOR; NLTK_DATA and nltk's "
                   "default folders are searched too.")
def score(pred: Path, gt: Path, task: str, out: Path | None, bertscore_model: Path | None,
          bertscore_layer: int | None, nltk_data: Path | None) -> None:
    """Score predictions against ground truth, joined by id."""
    from evaluation.scoring.bertscore import BertScoreConfig
    from evaluation.scoring.score import score_files
    from evaluation.scoring.summary import markdown_summary

    if bertscore_layer is not None and bertscore_model is None:
        raise MedAlignError("--bertscore-layer needs --bertscore-model")
    bs_cfg = None
    if bertscore_model is not None and task == "report":
        bs_cfg = BertScoreConfig(model_dir=bertscore_model, layer=bertscore_layer)
    metrics = score_files(pred, gt, task, nltk_data=nltk_data, bertscore_cfg=bs_cfg)
    if bertscore_model is not None and task != "report":
        metrics["notes"].append("--bertscore-model is only used with --task report")
    for ids, what in ((metrics["missing_ids"], "ground-truth ids have no prediction (scored as empty)"),
                      (metrics["extra_ids"], "prediction ids are not in the ground truth (ignored)")):
        if ids:
            shown = ", ".join(ids[:10]) + (", ..." if len(ids) > 10 else "")
            click.echo(f"Warning: {len(ids)} {what}: {shown}", err=True)
    for note in metrics["notes"]:
        if "not computed" in note:
            click.echo(f"Warning: {note}", err=True)
    if out is None:
        click.echo(json.dumps(metrics, indent=2))
        return
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(metrics, indent=2) + "\n", encoding="utf-8")
    summary = markdown_summary(metrics, title=f"{task} metrics: {pred.name}")
    md = out.with_suffix(".md")
    md.write_text(summary, encoding="utf-8")
    click.echo(summary)
    click.echo(f"wrote {out} and {md}", err=True)


@main.command()
@click.argument("metrics", nargs=-1, required=True,
                type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--names", default=None,
              help="Comma-separated column names, one per file (default: file stem, or the "
                   "parent folder for metrics.json).")
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Also write the table to this markdown file.")
def compare(metrics: tuple[Path, ...], names: str | None, out: Path | None) -> None:
    """Side-by-side table of metrics JSON files: rows = metrics, columns = runs, best in bold."""
    from evaluation.scoring.summary import compare_table, load_metrics, run_name

    if names is not None:
        cols = [n.strip() for n in names.split(",")]
        if len(cols) != len(metrics):
            raise MedAlignError(f"--names gives {len(cols)} names for {len(metrics)} files")
    else:
        cols = [run_name(p) for p in metrics]
    table = compare_table([(c, load_metrics(p)) for c, p in zip(cols, metrics)])
    click.echo(table, nl=False)
    if out is not None:
        out.write_text(table, encoding="utf-8")


# --- Subcommands from other modules ----------------------------------------------------------
# `generate` and `attention` are implemented elsewhere and registered here.
from evaluation.attention_cli import attention  # noqa: E402
from evaluation.demo import demo  # noqa: E402
from evaluation.generate_cli import generate  # noqa: E402

main.add_command(generate)
main.add_command(attention)
main.add_command(demo)


if __name__ == "__main__":
    main()
