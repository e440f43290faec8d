"""The grounding experiment's pipeline: MedAlign vs LoRA-FT where the answer depends on the lesion.

Used by ``bench/grounding.py`` (all arms, several seeds) and ``medalign-eval demo`` (the quick
comparison). Every stage runs as the command a user would type, in a subprocess
(:func:`run_command`):

1. data: :func:`shared.grounding_data.make_grounding_dataset` (scans, lesion masks, questions);
2. teacher: ``medalign-cache lesion-expert`` writes a tiny unimed-b expert whose CLS attention falls
   on the lesion by construction (:mod:`teacher_cache.lesion_expert`), and ``medalign-cache build``
   builds the one cache every run uses;
3. student: a tiny random-weight LLaVA (:func:`make_student`), its vision tower *primed* by scaling
   the CLIP position embeddings by :data:`POSITION_SCALE` so that a patch token says where it is (a
   pretrained CLIP's do; a random one's position embeddings are 15x weaker than its pixel content);
4. ``medalign-train`` per arm (:data:`ARMS`) and seed, ``medalign-eval generate`` + ``score``;
5. per question: correct or not (:func:`evaluation.grounding_metrics.correct_per_question`) and the
   student's attention mass on the lesion patches at the align layer, through the capture training
   uses (:func:`lesion_attention_masses`);
6. per run: ``medalign-eval tsne`` on the test images with the lesion masks as ``--regions``
   (:func:`tsne_separability`): the t-SNE figure and the separability of lesion vs background
   tokens (probe accuracy, silhouette) at :func:`tsne_layers`.

The shuffled-teacher control trains from a data file whose records name another image's
``teacher_image`` (a derangement of the train images), through the same cache and command.
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import click
import numpy as np

from shared.errors import MedAlignError
from shared.grounding_data import (GRID, IMAGE_SIZE, PATCH_SIZE, REGIONS_DIR, SPLITS, load_grid_masks,
                                   make_grounding_dataset, write_lesion_regions)
from shared.regions import REGIONS_FILE

_ENTRY = {
    "medalign-cache": "teacher_cache.cli",
    "medalign-train": "student_train.cli",
    "medalign-eval": "evaluation.cli",
}

ARMS = ("lora", "medalign", "medalign-vis", "medalign-att", "shuffled")
#: Scale applied to the random student's CLIP position embeddings (see the module docstring).
POSITION_SCALE = 10.0
#: Test images the t-SNE step embeds (36 tokens each, 720 in all; ~5% of them lesion): ~15 s per
#: run on 2 CPU cores, half of it the command's imports.
TSNE_IMAGES = 20


def _env() -> dict[str, str]:
    """The environment of a subprocess: this source tree first on the path, so the commands run the
    same code as this process (an editable install elsewhere would otherwise win outside the repo)."""
    root = str(Path(__file__).resolve().parents[1])
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([root, *filter(None, [env.get("PYTHONPATH")])])
    return env


def run_command(tool: str, *args, log: Path, quiet: bool = False, env: dict[str, str] | None = None) -> float:
    """Run one of our CLIs in a subprocess, echoing the command; stdout goes to ``log`` (stderr too
    when ``quiet``); ``env`` adds variables to its environment. Returns the seconds it took; a
    failure raises :class:`MedAlignError`."""
    shown = " ".join([tool, *(shlex.quote(str(a)) for a in args)])
    click.secho(f"\n$ {shown}", fg="cyan", err=True)
    cmd = [sys.executable, "-c", f"import sys; from {_ENTRY[tool]} import main; sys.exit(main())", *map(str, args)]
    t0 = time.perf_counter()
    with open(log, "a") as f:
        f.write(f"$ {shown}\n")
        f.flush()
        proc = subprocess.run(cmd, stdout=f, stderr=f if quiet else None, env={**_env(), **(env or {})})
    if proc.returncode != 0:
        raise MedAlignError(f"`{shown}` failed with status {proc.returncode}; see {log}")
    dt = time.perf_counter() - t0
    click.echo(f"  done in {dt:.0f}s", err=True)
    return dt


@dataclass(frozen=True)
class Recipe:
    """The training and evaluation settings shared by every arm (only alpha/beta/teacher differ)."""

    steps: int = 150
    batch_size: int = 8
    lr: float = 3e-3
    lora_r: int = 16
    align_layer: int = 1
    alpha: float = 1.0
    beta: float = 1.0
    att_norm: str = "sum"
    layers: int = 4
    gen_batch_size: int = 64

    def arm_flags(self, arm: str, cache: Path) -> tuple:
        if arm not in ARMS:
            raise MedAlignError(f"unknown arm {arm!r}; valid: {', '.join(ARMS)}")
        alpha, beta = {"lora": (0, 0), "medalign": (self.alpha, self.beta), "shuffled": (self.alpha, self.beta),
                       "medalign-vis": (self.alpha, 0), "medalign-att": (0, self.beta)}[arm]
        flags = ("--alpha", alpha, "--beta", beta)
        return flags if arm == "lora" else ("--cache", cache, "--att-norm", self.att_norm, *flags)


@dataclass
class Setup:
    """Where the prepared inputs are."""

    work: Path
    data: dict[str, Path]
    teacher: Path
    cache: Path
    student: Path
    shuffled_train: Path
    log: Path
    timings: dict[str, float] = field(default_factory=dict)


def make_student(out: Path, layers: int = 4, seed: int = 0, position_scale: float = POSITION_SCALE) -> Path:
    """The tiny Mistral-backbone LLaVA (48 px images, 8 px patches: 6 x 6 = 36 image tokens) with its
    CLIP position embeddings scaled by ``position_scale`` (the priming of the module docstring)."""
    from safetensors.torch import load_file, save_file
    from student_train.tiny import save_tiny_llava

    save_tiny_llava(out, "mistral", layers=layers, image_size=IMAGE_SIZE, patch_size=PATCH_SIZE,
                    template="mistral_instruct", seed=seed)
    path = out / "model.safetensors"
    state = load_file(path)
    keys = [k for k in state if k.endswith("embeddings.position_embedding.weight") and "vision" in k]
    if len(keys) != 1:
        raise RuntimeError(f"expected one vision position embedding in {path}, found {keys}")
    state[keys[0]] = state[keys[0]] * position_scale
    save_file(state, path, metadata={"format": "pt"})
    (out / "grounding_student.json").write_text(json.dumps({"position_scale": position_scale, "seed": seed}) + "\n")
    return out


def shuffled_records(train: Path, out: Path, seed: int = 0) -> Path:
    """``train`` with each record's ``teacher_image`` set to another train image (a derangement)."""
    recs = json.loads(train.read_text())
    images = sorted({r["image"] for r in recs})
    rng = np.random.default_rng(seed)
    perm = rng.permutation(len(images))
    partner = {images[i]: images[perm[(k + 1) % len(perm)]] for k, i in enumerate(perm)}  # one cycle: no fixed point
    for r in recs:
        r["teacher_image"] = partner[r["image"]]
    out.write_text(json.dumps(recs, indent=1))
    return out


def prepare(work: Path, *, sizes: dict[str, int] | None = None, data_seed: int = 0, layers: int = 4) -> Setup:
    """Data, teacher, cache and student under ``work`` (each step skipped when already there)."""
    work.mkdir(parents=True, exist_ok=True)
    log = work / "commands.log"
    timings: dict[str, float] = {}
    data_dir = work / "data"
    t0 = time.perf_counter()
    if (data_dir / "grid_masks.json").is_file():
        sizes = dict(SPLITS if sizes is None else sizes)
        data = {"root": data_dir, "images": data_dir / "images", "masks": data_dir / "masks",
                "grid_masks": data_dir / "grid_masks.json", "regions": data_dir / REGIONS_DIR / REGIONS_FILE,
                **{k: data_dir / f"{k}.json" for k in sizes}}
        if not data["regions"].is_file():  # a work dir from before the data wrote regions/
            write_lesion_regions(data_dir)
    else:
        data = make_grounding_dataset(data_dir, data_seed, sizes)
    timings["data"] = time.perf_counter() - t0
    teacher = work / "teacher" / "lesion-unimed-b.pt"
    if not teacher.is_file():
        timings["teacher"] = run_command("medalign-cache", "lesion-expert", "--out", teacher, log=log, quiet=True)
    cache = work / "cache"
    if not (cache / "manifest.json").is_file():
        timings["cache"] = run_command(
            "medalign-cache", "build", "--expert", "unimed-b", "--weights", teacher, "--model-config",
            teacher.with_suffix(".json"), *(x for k in ("train", "val", "test") if k in data for x in ("--data", data[k])),
            "--image-root", data["images"], "--grid", GRID, "--out", cache, "--num-workers", 0, "--batch-size", 64,
            log=log, quiet=True)
    student = work / "student"
    if not (student / "grounding_student.json").is_file():
        t0 = time.perf_counter()
        make_student(student, layers)
        timings["student"] = time.perf_counter() - t0
    shuffled = shuffled_records(data["train"], work / "data" / "train_shuffled_teacher.json")
    return Setup(work, data, teacher, cache, student, shuffled, log, timings)


def train_arm(setup: Setup, arm: str, seed: int, recipe: Recipe, run_dir: Path) -> float:
    """``medalign-train`` for one arm and seed into ``run_dir`` (skipped when its adapter exists)."""
    if (run_dir / "adapter_config.json").is_file():
        return 0.0
    data = setup.shuffled_train if arm == "shuffled" else setup.data["train"]
    return run_command(
        "medalign-train", "--model", setup.student, "--data", data, "--image-root", setup.data["images"],
        "--out", run_dir, "--align-layer", recipe.align_layer, "--max-steps", recipe.steps,
        "--batch-size", recipe.batch_size, "--grad-accum", 1, "--lr", recipe.lr, "--lora-r", recipe.lora_r,
        "--lora-alpha", 2 * recipe.lora_r, "--seed", seed, "--num-workers", 0, "--log-every", max(recipe.steps // 5, 1),
        *recipe.arm_flags(arm, setup.cache), log=setup.log, quiet=True)


def generate_and_score(setup: Setup, run_dir: Path, recipe: Recipe, split: str = "test") -> tuple[Path, Path, float]:
    """``medalign-eval generate`` (greedy, the closed questions as written) + ``score`` on ``split``."""
    preds, metrics = run_dir / f"preds_{split}.jsonl", run_dir / f"metrics_{split}.json"
    dt = 0.0
    if not metrics.is_file():
        dt += run_command("medalign-eval", "generate", "--model", setup.student, "--adapter", run_dir,
                          "--data", setup.data[split], "--image-root", setup.data["images"], "--out", preds,
                          "--batch-size", recipe.gen_batch_size, "--decoding", "greedy", "--max-new-tokens", 6,
                          "--closed-suffix", "never", "--device", "cpu", log=setup.log, quiet=True)
        dt += run_command("medalign-eval", "score", "--pred", preds, "--gt", setup.data[split], "--task", "vqa",
                          "--out", metrics, log=setup.log, quiet=True)
    return preds, metrics, dt


def tsne_layers(recipe: Recipe) -> tuple[int, ...]:
    """The hidden states ``medalign-eval tsne`` embeds: 0, the projected image tokens (the projector
    is frozen, so the same for every arm: the control); the align layer's input (1 for the 4-layer
    student: after W, where L_vis pulls the tokens towards the teacher's S_e); the last decoder
    layer's input (3: the deepest state the command reaches)."""
    return tuple(sorted({0, recipe.align_layer, recipe.layers - 1}))


def tsne_separability(setup: Setup, run_dir: Path, recipe: Recipe, split: str = "test", *,
                      max_images: int = TSNE_IMAGES, out: Path | None = None) -> dict:
    """``medalign-eval tsne`` of one run at :func:`tsne_layers` on ``split``'s first ``max_images``
    images, ``--regions`` = the lesion masks (0 background, 1 lesion). Writes ``out`` (default
    ``run_dir/tsne.png``; ``tsne_SPLIT.png`` off the test split) and the command's JSON beside it,
    with ``"grounding": {"split", "max_images", "wall_s"}`` added, and returns that JSON (the run is
    skipped when the files are there for the same layers, split and images). ``layers[L]`` holds
    ``probe_accuracy``, ``probe_balanced_accuracy``, ``majority_fraction``, ``silhouette``, ...

    The command runs with ``OMP_NUM_THREADS=1`` unless the caller set it: scikit-learn's
    Barnes-Hut t-SNE gradient on a few hundred points spins its OpenMP threads against whatever
    else runs (same results; 48 s vs 19 s for 20 images on a loaded 2-core machine)."""
    out = run_dir / ("tsne.png" if split == "test" else f"tsne_{split}.png") if out is None else out
    side = out.with_suffix(".json")
    layers = tsne_layers(recipe)
    asked = {"split": split, "max_images": int(max_images)}
    if side.is_file() and out.is_file():
        doc = json.loads(side.read_text())
        done = doc.get("grounding", {})
        if sorted(map(int, doc.get("layers", {}))) == list(layers) and all(done.get(k) == v for k, v in asked.items()):
            return doc
    dt = run_command("medalign-eval", "tsne", "--model", setup.student, "--adapter", run_dir,
                     "--data", setup.data[split], "--image-root", setup.data["images"],
                     "--regions", setup.data["regions"], "--out", out, "--layers", ",".join(map(str, layers)),
                     "--max-images", max_images, "--device", "cpu", log=setup.log, quiet=True,
                     env={} if "OMP_NUM_THREADS" in os.environ else {"OMP_NUM_THREADS": "1"})
    doc = json.loads(side.read_text())
    doc["grounding"] = {**asked, "wall_s": round(dt, 1)}
    side.write_text(json.dumps(doc, indent=2) + "\n")
    return doc


def separability_summary(doc: dict) -> dict[str, dict[str, float | None]]:
    """Per layer of a :func:`tsne_separability` document: probe accuracy, balanced accuracy, the
    majority share the accuracy must beat, silhouette."""
    keys = ("probe_accuracy", "probe_balanced_accuracy", "majority_fraction", "silhouette")
    return {L: {k: s.get(k) for k in keys} for L, s in doc["layers"].items()}


def lesion_attention_masses(model: Path, run_dir: Path, data: Path, image_root: Path, grid_masks: Path,
                            layer: int, limit: int | None = None) -> np.ndarray:
    """Per test question, the share of the question tokens' attention to the image that falls on the
    lesion's patches at decoder ``layer`` (:func:`evaluation.attention_map.question_attention`, i.e.
    :func:`student_train.alignment.capture_attention`, the capture ``L_att`` trains; W applied)."""
    import torch

    from evaluation.attention_map import question_attention
    from evaluation.generate import load_generator
    from evaluation.grounding_metrics import lesion_mass
    from shared.records import load_records, question_text, record_image
    from student_train.inputs import student_pixels

    masks = load_grid_masks(grid_masks)
    gen = load_generator(model, run_dir, dtype=torch.float32, device=torch.device("cpu"))
    recs = load_records(data)[:limit]
    out = np.zeros(len(recs), dtype=np.float64)
    pixels_of: dict[str, torch.Tensor] = {}
    for i, rec in enumerate(recs):
        image = record_image(rec)
        if image not in pixels_of:
            pixels_of = {image: student_pixels(gen.image_processor, image_root / image, gen.background)[None]}
        attn, _ = question_attention(gen, question_text(rec), pixels_of[image], layer)
        out[i] = lesion_mass(attn[None], masks[image][None])[0]
    return out


def final_losses(run_dir: Path, last: int = 10) -> dict[str, float]:
    """Mean of the last ``last`` steps' loss terms in the run's ``train_log.jsonl``."""
    lines = [json.loads(ln) for ln in (run_dir / "train_log.jsonl").read_text().splitlines() if ln.strip()]
    tail = lines[-last:]
    return {k: float(np.mean([r[k] for r in tail])) for k in ("lm_loss", "vis_loss", "att_loss")}


__all__ = ["ARMS", "POSITION_SCALE", "TSNE_IMAGES", "Recipe", "Setup", "final_losses",
           "generate_and_score", "lesion_attention_masses", "make_student", "prepare", "run_command",
           "separability_summary", "shuffled_records", "train_arm", "tsne_layers", "tsne_separability"]
