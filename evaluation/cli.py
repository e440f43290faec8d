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


_PATH_DIR = click.Path(file_okay=False, path_type=Path)
_PATH_FILE = click.Path(dir_okay=False, path_type=Path)
_PATH_ANY = click.Path(path_type=Path)


@main.command()
@click.option("--pred", "pred", required=True, type=_PATH_FILE,
              help="Predictions, JSONL with question_id and text (LLaVA-Med answer format).")
@click.option("--gt", "gt", required=True, type=_PATH_FILE,
              help="Ground truth, LLaVA-style JSON list (id, conversations, answer_type).")
@click.option("--task", type=click.Choice(["vqa", "report"]), required=True,
              help="vqa: LLaVA-Med-compatible and strict VQA metrics; report: MedHEval-compatible "
                   "and strict report metrics (BLEU, ROUGE, METEOR, BERTScore, CheXbert, RadGraph, "
                   "RaTEScore).")
@click.option("--out", type=_PATH_FILE, default=None,
              help="Write the metrics JSON here and a markdown summary next to it (metrics.md); "
                   "without it the JSON goes to stdout.")
@click.option("--chexbert", type=_PATH_FILE, default=None,
              help="CheXbert checkpoint chexbert.pth (reports: semb_score, CheXbert F1).")
@click.option("--chexbert-tokenizer", type=_PATH_DIR, default=None,
              help="bert-base-uncased tokenizer directory for --chexbert.")
@click.option("--radgraph", type=_PATH_ANY, default=None,
              help="RadGraph 1.0.0 model.tar.gz or its extracted directory (reports).")
@click.option("--radgraph-encoder", type=_PATH_DIR, default=None,
              help="Config and tokenizer directory of the encoder RadGraph was trained from.")
@click.option("--ratescore-ner", type=_PATH_DIR, default=None,
              help="RaTE-NER-Deberta directory (reports: RaTEScore).")
@click.option("--ratescore-encoder", type=_PATH_DIR, default=None,
              help="BioLORD-2023-C directory for --ratescore-ner.")
@click.option("--bertscore-model", type=_PATH_DIR, default=None,
              help="Local encoder directory for BERTScore (reports; the paper's: roberta-large).")
@click.option("--bertscore-layer", type=int, default=None,
              help="Encoder layers used by BERTScore (0 = embeddings); default 17, bert_score's "
                   "roberta-large setting.")
@click.option("--nltk-data", type=_PATH_DIR, default=None,
              help="Folder holding NLTK data (corpora/wordnet for METEOR, tokenizers/punkt_tab for "
                   "BLEU/METEOR tokens); NLTK_DATA and nltk's default folders are searched too.")
@click.option("--batch-size", type=click.IntRange(min=1), default=16, show_default=True,
              help="Reports per forward pass for the model-based report metrics.")
@click.option("--device", default="auto", show_default=True,
              help="Device for the report models: auto, cpu, cuda or cuda:K.")
def score(pred: Path, gt: Path, task: str, out: Path | None, chexbert: Path | None,
          chexbert_tokenizer: Path | None, radgraph: Path | None, radgraph_encoder: Path | None,
          ratescore_ner: Path | None, ratescore_encoder: Path | None, bertscore_model: Path | None,
          bertscore_layer: int | None, nltk_data: Path | None, batch_size: int, device: str) -> None:
    """Score predictions against ground truth (VQA joined by id; reports as described in the
    README: two blocks, medheval and strict)."""
    from evaluation.scoring.score import score_files
    from evaluation.scoring.summary import markdown_summary

    if bertscore_layer is not None and bertscore_model is None:
        raise MedAlignError("--bertscore-layer needs --bertscore-model")
    requests = {name: paths for name, paths, pair in (
        ("bertscore", {"model_dir": bertscore_model,
                       **({} if bertscore_layer is None else {"layer": bertscore_layer})},
         ("--bertscore-model", bertscore_model, None, None)),
        ("chexbert", {"checkpoint": chexbert, "tokenizer_dir": chexbert_tokenizer},
         ("--chexbert", chexbert, "--chexbert-tokenizer", chexbert_tokenizer)),
        ("radgraph", {"archive": radgraph, "encoder_dir": radgraph_encoder},
         ("--radgraph", radgraph, None, None)),
        ("ratescore", {"ner_dir": ratescore_ner, "encoder_dir": ratescore_encoder},
         ("--ratescore-ner", ratescore_ner, "--ratescore-encoder", ratescore_encoder)),
    ) if _requested(*pair)}
    if radgraph_encoder is not None and radgraph is None:
        raise MedAlignError("--radgraph-encoder needs --radgraph")
    scorers = {}
    notes = []
    if task == "report":
        from evaluation.scoring.clinical import load_scorer, resolve_device

        dev = resolve_device(device) if requests else "cpu"
        scorers = {name: load_scorer(name, paths, batch_size=batch_size, device=dev)
                   for name, paths in requests.items()}
    elif requests:
        notes.append("the report-metric model flags are only used with --task report")
    metrics = score_files(pred, gt, task, nltk_data=nltk_data, scorers=scorers, progress=True)
    metrics["notes"].extend(notes)
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


def _requested(flag: str, value: Path | None, flag2: str | None, value2: Path | None) -> bool:
    """A metric is requested when its first flag is given; its second flag then is required."""
    if value is None:
        if value2 is not None:
            raise MedAlignError(f"{flag2} needs {flag}")
        return False
    if flag2 is not None and value2 is None:
        raise MedAlignError(f"{flag} needs {flag2}")
    return True


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
# `generate`, `attention`, `demo` and `tsne` are implemented elsewhere and registered here.
from evaluation.attention_cli import attention  # noqa: E402
from evaluation.demo import demo  # noqa: E402
from evaluation.generate_cli import generate  # noqa: E402
from evaluation.tsne_cli import tsne  # noqa: E402

main.add_command(generate)
main.add_command(attention)
main.add_command(demo)
main.add_command(tsne)
from evaluation.merge_cli import merge  # noqa: E402

main.add_command(merge)


if __name__ == "__main__":
    main()
