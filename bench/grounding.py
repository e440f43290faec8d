"""MedAlign vs LoRA-FT where the answer depends on looking at the lesion (issue 13).

    python bench/grounding.py [--seeds 0,1,2] [--arms lora,medalign,...] [--quick] [--json OUT] [--out WORKDIR]

Generated scans (:mod:`shared.grounding_data`), a tiny unimed-b expert whose CLS attention falls on
the lesion by construction (:mod:`teacher_cache.lesion_expert`), a tiny LLaVA student with primed
position embeddings; every stage through the real commands (:mod:`evaluation.grounding`), one
cache for all runs. Per arm and seed: held-out accuracy, the share of the question tokens'
attention to the image that falls on the lesion's patches at the align layer (the capture L_att
trains), and L_vis / L_att at the end of training; per arm: mean, std and the paired sign test
(and bootstrap interval) against LoRA-FT over the pooled (seed, question) pairs. For the arms of
``--tsne-arms`` (default lora and medalign; ~15 s a run) ``medalign-eval tsne`` on the first 20 test
images with the lesion masks as regions (:func:`evaluation.grounding.tsne_separability`): per layer
(0, the align layer, the last) how well a linear probe (split by image) and the silhouette separate
lesion from background tokens; the figure is ``runs/ARM-seedS/tsne.png``.

``--quick``: seed 0 of lora and medalign only, smaller test subset for the attention mass.
"""

from __future__ import annotations

import json
import os
import platform
import sys
import time
from pathlib import Path

import click
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from evaluation.grounding import (ARMS, TSNE_IMAGES, Recipe, final_losses, generate_and_score,  # noqa: E402
                                  lesion_attention_masses, prepare, separability_summary, train_arm,
                                  tsne_separability)
from evaluation.grounding_metrics import correct_per_question, paired_bootstrap, sign_test  # noqa: E402


def student_probe(setup, max_images: int = 200) -> dict:
    """Linear probes on the student's visual tokens (the projector's output, what the language model
    reads), fitted on the train images, scored on the test images: lesion vs non-lesion patch
    (balanced accuracy; chance 0.5) and the patch's quadrant (accuracy; chance 0.25)."""
    import torch
    from sklearn.linear_model import LogisticRegression
    from transformers import AutoImageProcessor, LlavaForConditionalGeneration

    from shared.grounding_data import GRID, load_grid_masks
    from shared.images import mean_colour
    from student_train.inputs import student_pixels

    model = LlavaForConditionalGeneration.from_pretrained(setup.student).eval()
    proc = AutoImageProcessor.from_pretrained(setup.student)
    masks = load_grid_masks(setup.data["grid_masks"])
    background = mean_colour(tuple(proc.image_mean))

    def tokens(prefix):
        names = sorted(n for n in masks if n.startswith(prefix))[:max_images]
        px = torch.stack([student_pixels(proc, setup.data["images"] / n, background) for n in names])
        with torch.no_grad():
            feats = model.get_image_features(pixel_values=px)
        feats = getattr(feats, "pooler_output", feats)
        feats = torch.stack(list(feats)) if isinstance(feats, (list, tuple)) else feats
        pos = np.tile(np.arange(GRID * GRID), len(names))
        quad = (pos // GRID >= GRID // 2) * 2 + (pos % GRID >= GRID // 2)
        return feats.reshape(-1, feats.shape[-1]).float().numpy(), np.concatenate([masks[n] for n in names]), quad

    x_tr, y_tr, q_tr = tokens("train")
    x_te, y_te, q_te = tokens("test")
    pred = LogisticRegression(max_iter=3000, class_weight="balanced").fit(x_tr, y_tr).predict(x_te)
    balanced = 0.5 * ((pred & y_te).sum() / y_te.sum() + (~pred & ~y_te).sum() / (~y_te).sum())
    quad_acc = (LogisticRegression(max_iter=3000).fit(x_tr, q_tr).predict(x_te) == q_te).mean()
    return {"lesion_patch_balanced_accuracy": float(balanced), "lesion_patch_chance": 0.5,
            "patch_quadrant_accuracy": float(quad_acc), "patch_quadrant_chance": 0.25,
            "train_tokens": int(len(y_tr)), "test_tokens": int(len(y_te))}


def run_benchmark(out: Path, seeds: list[int], arms: list[str], recipe: Recipe, mass_limit: int | None,
                  split: str = "test", sizes: dict[str, int] | None = None, tsne_arms=("lora", "medalign"),
                  tsne_images: int = TSNE_IMAGES) -> dict:
    """Run every arm x seed (resumable: finished runs are reused) and return the result document;
    the runs of ``tsne_arms`` also get the t-SNE step (``separability`` per layer)."""
    t_start = time.perf_counter()
    setup = prepare(out, sizes=sizes, layers=recipe.layers)
    probe = student_probe(setup)
    click.secho(f"student visual-token probes: {probe}", bold=True, err=True)
    runs: dict[str, dict[str, dict]] = {a: {} for a in arms}
    correct: dict[str, dict[int, np.ndarray]] = {a: {} for a in arms}
    for seed in seeds:
        for arm in arms:
            run_dir = out / "runs" / f"{arm}-seed{seed}"
            t0 = time.perf_counter()
            train_s = train_arm(setup, arm, seed, recipe, run_dir)
            preds, metrics, gen_s = generate_and_score(setup, run_dir, recipe, split)
            ok = correct_per_question(preds, setup.data[split])
            mass = lesion_attention_masses(setup.student, run_dir, setup.data[split], setup.data["images"],
                                           setup.data["grid_masks"], recipe.align_layer, limit=mass_limit)
            correct[arm][seed] = ok
            runs[arm][str(seed)] = {"accuracy": float(ok.mean()), "lesion_attention_mass": float(mass.mean()),
                                    "questions": int(ok.size), "mass_questions": int(mass.size),
                                    "final_losses": final_losses(run_dir), "train_s": round(train_s, 1),
                                    "eval_s": round(gen_s, 1), "run_dir": str(run_dir)}
            if arm in tsne_arms:
                sep = tsne_separability(setup, run_dir, recipe, split, max_images=tsne_images)
                runs[arm][str(seed)].update({"separability": separability_summary(sep), "tsne_figure": sep["figure"],
                                             "tsne_tokens": sep["tokens"], "tsne_images": sep["images"],
                                             "tsne_s": sep["grounding"]["wall_s"]})
            runs[arm][str(seed)]["wall_s"] = round(time.perf_counter() - t0, 1)
            click.secho(f"{arm} seed {seed}: accuracy {ok.mean():.4f} lesion mass {mass.mean():.4f} "
                        f"losses {runs[arm][str(seed)]['final_losses']}", bold=True, err=True)
    summary = {}
    for arm in arms:
        acc = np.array([runs[arm][str(s)]["accuracy"] for s in seeds])
        mass = np.array([runs[arm][str(s)]["lesion_attention_mass"] for s in seeds])
        entry = {"accuracy_mean": float(acc.mean()), "accuracy_std": float(acc.std(ddof=1)) if len(acc) > 1 else 0.0,
                 "lesion_attention_mass_mean": float(mass.mean()),
                 "lesion_attention_mass_std": float(mass.std(ddof=1)) if len(mass) > 1 else 0.0}
        if arm != "lora" and "lora" in arms:
            a = np.concatenate([correct[arm][s] for s in seeds])
            b = np.concatenate([correct["lora"][s] for s in seeds])
            test = sign_test(a, b)
            entry.update({"vs_lora_p_value": test["p_value"], "vs_lora_sign_test": test,
                          "vs_lora_bootstrap": paired_bootstrap(a, b),
                          "vs_lora_per_seed_p": {str(s): sign_test(correct[arm][s], correct["lora"][s])["p_value"]
                                                 for s in seeds},
                          "above_lora_every_seed": bool(all(runs[arm][str(s)]["accuracy"] > runs["lora"][str(s)]["accuracy"]
                                                            for s in seeds)),
                          "mass_ratio_vs_lora": float(mass.mean() / max(summary["lora"]["lesion_attention_mass_mean"], 1e-12))})
        if arm in tsne_arms:
            entry["separability_mean"] = mean_separability([runs[arm][str(s)]["separability"] for s in seeds])
        summary[arm] = entry
    return {"student_probe": probe, "tsne_arms": [a for a in arms if a in tsne_arms], "seeds": seeds, "arms": arms, "split": split, "recipe": recipe.__dict__, "runs": runs, "summary": summary,
            "setup_timings_s": setup.timings, "total_s": round(time.perf_counter() - t_start, 1),
            "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "load_avg_end": os.getloadavg(),
                        "torch_threads": os.environ.get("OMP_NUM_THREADS")},
            "date_utc": time.strftime("%Y-%m-%d %H:%M", time.gmtime())}


def mean_separability(per_seed: list[dict]) -> dict:
    """Per layer and score, the mean over seeds (None where a seed has no score)."""
    out = {}
    for layer in per_seed[0]:
        vals = {k: [d[layer][k] for d in per_seed] for k in per_seed[0][layer]}
        out[layer] = {k: None if any(x is None for x in v) else float(np.mean(v)) for k, v in vals.items()}
    return out


def _num(x, fmt: str = ".3f") -> str:
    return "n/a" if x is None else format(x, fmt)


def print_separability(doc: dict) -> None:
    """Lesion vs background tokens per layer: probe accuracy (balanced) / silhouette, per arm."""
    arms = doc.get("tsne_arms", [])
    if not arms:
        return
    layers = list(doc["summary"][arms[0]]["separability_mean"])
    first = doc["runs"][arms[0]][str(doc["seeds"][0])]
    click.echo(f"\nLesion vs background visual tokens ({first['tsne_tokens']} tokens of {first['tsne_images']} "
               f"test images; probe split by image; accuracy to beat: the majority share), "
               f"mean over {len(doc['seeds'])} seed(s):")
    click.echo("| arm | " + " | ".join(f"layer {L}: probe acc (balanced) / silhouette" for L in layers) + " |")
    click.echo("|---|" + "---|" * len(layers))
    for arm in arms:
        sep = doc["summary"][arm]["separability_mean"]
        click.echo(f"| {arm} | " + " | ".join(
            f"{_num(sep[L]['probe_accuracy'])} ({_num(sep[L]['probe_balanced_accuracy'])}) / "
            f"{_num(sep[L]['silhouette'])}" for L in layers) + " |")
    maj = doc["summary"][arms[0]]["separability_mean"][layers[0]]["majority_fraction"]
    click.echo(f"majority share (background): {_num(maj)}")


def print_table(doc: dict) -> None:
    click.echo(f"\n| arm | accuracy (mean +- std over {len(doc['seeds'])} seeds) | lesion attention mass | "
               "p vs lora (sign test) | final L_vis | final L_att |")
    click.echo("|---|---|---|---|---|---|")
    for arm in doc["arms"]:
        s = doc["summary"][arm]
        losses = [doc["runs"][arm][str(x)]["final_losses"] for x in doc["seeds"]]
        lv = np.mean([v["vis_loss"] for v in losses])
        la = np.mean([v["att_loss"] for v in losses])
        p = f"{s['vs_lora_p_value']:.2g}" if "vs_lora_p_value" in s else "-"
        click.echo(f"| {arm} | {s['accuracy_mean']:.4f} +- {s['accuracy_std']:.4f} | "
                   f"{s['lesion_attention_mass_mean']:.3f} +- {s['lesion_attention_mass_std']:.3f} | {p} | "
                   f"{lv:.4f} | {la:.4f} |")


@click.command()
@click.option("--seeds", default="0,1,2", show_default=True, help="Comma-separated training seeds.")
@click.option("--arms", default=",".join(ARMS), show_default=True, help=f"Comma-separated arms of {', '.join(ARMS)}.")
@click.option("--quick", is_flag=True, help="Seed 0 of lora and medalign only (the demo's comparison).")
@click.option("--json", "json_out", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Write the result document here.")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=Path("grounding-bench"),
              show_default=True, help="Work directory (data, cache, student, runs; reused when rerun).")
@click.option("--steps", type=int, default=Recipe.steps, show_default=True, help="Optimizer steps per run.")
@click.option("--mass-questions", type=int, default=300, show_default=True,
              help="Test questions whose attention mass is measured (the first ones; 0: all).")
@click.option("--split", type=click.Choice(["test", "val"]), default="test", show_default=True,
              help="Evaluate on the held-out test split or the validation split (for tuning).")
@click.option("--tsne-arms", default="lora,medalign", show_default=True,
              help="Arms whose runs get the t-SNE step (separability per layer; ~15 s a run); 'all' or ''.")
@click.option("--tsne-images", type=int, default=TSNE_IMAGES, show_default=True,
              help="Images of the split the t-SNE step embeds (36 tokens each).")
def main(seeds, arms, quick, json_out, out, steps, mass_questions, split, tsne_arms, tsne_images):
    """Run the grounding benchmark and print its table."""
    seed_list = [0] if quick else [int(s) for s in seeds.split(",") if s.strip()]
    arm_list = ["lora", "medalign"] if quick else [a.strip() for a in arms.split(",") if a.strip()]
    bad = [a for a in arm_list if a not in ARMS]
    if bad:
        raise click.BadParameter(f"unknown arm(s) {bad}; valid: {', '.join(ARMS)}", param_hint="--arms")
    tsne_list = list(ARMS) if tsne_arms.strip() == "all" else [a.strip() for a in tsne_arms.split(",") if a.strip()]
    bad = [a for a in tsne_list if a not in ARMS]
    if bad:
        raise click.BadParameter(f"unknown arm(s) {bad}; valid: {', '.join(ARMS)}", param_hint="--tsne-arms")
    doc = run_benchmark(out, seed_list, arm_list, Recipe(steps=steps), mass_questions or None, split,
                        tsne_arms=tsne_list, tsne_images=tsne_images)
    print_table(doc)
    print_separability(doc)
    if json_out:
        json_out.parent.mkdir(parents=True, exist_ok=True)
        json_out.write_text(json.dumps(doc, indent=1) + "\n")
        click.echo(f"wrote {json_out}")


if __name__ == "__main__":
    main()
