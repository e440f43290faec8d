"""``medalign-eval demo``: the grounding comparison, LoRA-FT vs MedAlign, in a few minutes on a CPU.

The quick arm of ``bench/grounding.py`` (:mod:`evaluation.grounding`): generated scans whose answers
depend on where the lesion is (:mod:`shared.grounding_data`), a tiny unimed-b expert whose CLS
attention falls on the lesion by construction (written by ``medalign-cache lesion-expert``, run as
its own process: evaluation never imports the teacher side), ``medalign-cache build``, a tiny LLaVA
student, two ``medalign-train`` runs from the one cache (plain LoRA, alpha = beta = 0, and
MedAlign), ``medalign-eval generate`` + ``score`` for each. It ends by printing both runs' held-out
accuracy and the share of their question-to-image attention on the lesion, draws the attention
figure of one test question for both runs (:mod:`evaluation.attention_map`) and runs
``medalign-eval tsne`` for both (the t-SNE of the visual tokens of 20 test images coloured lesion /
background, with the separability per layer: :func:`evaluation.grounding.tsne_separability`).

Every stage runs as the same command a user would type, and the commands are printed.
"""

from __future__ import annotations

from pathlib import Path

import click

from evaluation.grounding import (Recipe, final_losses, generate_and_score, lesion_attention_masses, prepare,
                                  separability_summary, train_arm, tsne_separability)

#: The demo's sizes: the full test split, fewer questions for the attention mass.
MASS_QUESTIONS = 300


def run_pipeline(out: Path, steps: int = Recipe.steps, mass_questions: int = MASS_QUESTIONS) -> dict:
    """Prepare, train both runs, evaluate; returns the numbers and the paths."""
    import torch

    from evaluation.attention_map import write_attention_figure
    from evaluation.generate import load_generator
    from evaluation.grounding_metrics import correct_per_question, sign_test
    from shared.records import load_records, question_text, record_image

    recipe = Recipe(steps=steps)
    click.secho(f"MedAlign grounding demo -> {out} (commands below; their output is in {out / 'commands.log'})",
                bold=True, err=True)
    setup = prepare(out, layers=recipe.layers)
    first = load_records(setup.data["test"])[2]  # a quadrant question
    results: dict = {"setup": setup, "runs": {}}
    for arm in ("lora", "medalign"):
        run_dir = out / "runs" / arm
        train_arm(setup, arm, 0, recipe, run_dir)
        preds, metrics, _ = generate_and_score(setup, run_dir, recipe)
        ok = correct_per_question(preds, setup.data["test"])
        mass = lesion_attention_masses(setup.student, run_dir, setup.data["test"], setup.data["images"],
                                       setup.data["grid_masks"], recipe.align_layer, limit=mass_questions)
        gen = load_generator(setup.student, run_dir, dtype=torch.float32, device=torch.device("cpu"))
        figure = run_dir / "attention.png"
        write_attention_figure(gen, setup.data["images"] / record_image(first), question_text(first), figure,
                               layer=recipe.align_layer, max_new_tokens=6)
        del gen
        tsne = tsne_separability(setup, run_dir, recipe)
        results["runs"][arm] = {"correct": ok, "mass": float(mass.mean()), "dir": run_dir, "figure": figure,
                                "metrics": metrics, "losses": final_losses(run_dir),
                                "tsne_figure": Path(tsne["figure"]), "separability": separability_summary(tsne),
                                "tsne_tokens": tsne["tokens"], "tsne_images": tsne["images"]}
    results["p_value"] = sign_test(results["runs"]["medalign"]["correct"], results["runs"]["lora"]["correct"])["p_value"]
    return results


def _num(x) -> str:
    return "n/a" if x is None else f"{x:.3f}"


def _cell(s: dict) -> str:
    return f"{_num(s['probe_accuracy'])} ({_num(s['probe_balanced_accuracy'])}) / {_num(s['silhouette'])}"


@click.command()
@click.option("--out", default="medalign-demo", show_default=True, type=click.Path(file_okay=False, path_type=Path))
@click.option("--steps", default=Recipe.steps, show_default=True, help="Optimizer steps per training run.")
def demo(out, steps):
    """LoRA-FT vs MedAlign on generated scans with tiny models (no downloads), in a few minutes."""
    res = run_pipeline(out, steps)
    lora, med = res["runs"]["lora"], res["runs"]["medalign"]
    n = lora["correct"].size
    click.secho(f"\nResults on {n} held-out questions (tiny models, generated scans: see README, 'The demo'):",
                bold=True)
    click.echo(f"  {'run':10s} {'accuracy':>9s} {'lesion attention mass':>22s}  final L_vis / L_att")
    for name, r in (("LoRA-FT", lora), ("MedAlign", med)):
        click.echo(f"  {name:10s} {r['correct'].mean():9.4f} {r['mass']:22.3f}  "
                   f"{r['losses']['vis_loss']:.4f} / {r['losses']['att_loss']:.4f}")
    click.echo(f"  paired sign test MedAlign vs LoRA-FT over the questions: p = {res['p_value']:.3g}; "
               f"uniform attention would put ~0.1 on the lesion")
    layers = list(lora["separability"])
    click.echo(f"\n  lesion vs background visual tokens ({lora['tsne_tokens']} tokens of {lora['tsne_images']} test "
               f"images) per layer: linear-probe accuracy (balanced; split by image) / silhouette")
    click.echo(f"  {'run':10s} " + " ".join(f"{'layer ' + L:>22s}" for L in layers))
    for name, r in (("LoRA-FT", lora), ("MedAlign", med)):
        click.echo(f"  {name:10s} " + " ".join(f"{_cell(r['separability'][L]):>22s}" for L in layers))
    click.echo(f"  (guessing background scores {_num(lora['separability'][layers[0]]['majority_fraction'])}; "
               f"layer 0 is the frozen projector's output, the same for both runs)")
    setup = res["setup"]
    click.echo(f"""
Artefacts:
  data (LLaVA-style JSON, images, lesion masks)  {setup.data['root']}
  teacher (hand-set unimed-b checkpoint)         {setup.teacher}
  teacher cache                                  {setup.cache}   (medalign-cache info {setup.cache})
  student                                        {setup.student}
  runs (adapter, preds_test.jsonl, metrics)      {lora['dir']}  {med['dir']}
  attention figures (one test question)          {lora['figure']}  {med['figure']}
  t-SNE figures (+ .json: separability per layer) {lora['tsne_figure']}  {med['tsne_figure']}
  full log of every command                      {setup.log}
All arms over several seeds: python bench/grounding.py (BENCHMARKS.md). Real data: "Reproducing the paper" in README.md.""")
