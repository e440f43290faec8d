"""The student's question-to-image attention at one decoder layer, drawn over the image (paper Fig. 6).

For one image and one question the prompt is built exactly as for generation and training
(:func:`student_train.inputs.encode_prompt`). One prefill forward runs through the capture that
training uses for ``L_att`` (:func:`student_train.alignment.capture_attention`: the same ``M_a``,
SDPA everywhere, the probabilities recomputed for the query rows of ``layers[L]`` only): the
probability from the query rows (the prompt tokens after the image, up to the end of the prompt) to
the N image-token columns, averaged over heads and over the query rows, reshaped to the G x G grid.
With a training run, W rotates the prefill's visual positions as in generation, so a layer
``L >= l`` sees the rotated states.

The figure shows the image as the student sees it (padded to a square with the processor's mean
colour), the map upsampled over it, the question and the greedy answer the student generates.
"""

from __future__ import annotations

import json
import math
import textwrap
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from shared.errors import MedAlignError
from shared.images import expand2square, load_image

DEFAULT_LAYER = 20


@dataclass
class AttentionResult:
    """The map and what it was computed from."""

    layer: int
    """0-based decoder layer L."""
    grid: int
    """G: the map is G x G (N = G^2 image tokens)."""
    attn: np.ndarray
    """[N] float32, head- and query-row-averaged attention probabilities to the image tokens."""
    query_rows: int
    """Number of prompt tokens after the image (the averaged rows)."""
    question: str
    answer: str

    def to_json(self) -> dict:
        return {"layer": self.layer, "grid": self.grid, "query_rows": self.query_rows,
                "question": self.question, "answer": self.answer,
                "attn": [float(x) for x in self.attn]}


def default_layer(run_dir: str | Path | None, num_layers: int) -> int:
    """The run's align layer (``rotation.json``, else ``config.json``'s ``align.align_layer``),
    else :data:`DEFAULT_LAYER`; clipped to the model's last layer."""
    layer = None
    if run_dir is not None:
        run_dir = Path(run_dir)
        for name, keys in (("rotation.json", ("layer",)), ("config.json", ("align", "align_layer"))):
            p = run_dir / name
            if p.is_file() and layer is None:
                try:
                    v = json.loads(p.read_text())
                    for k in keys:
                        v = v[k]
                    layer = int(v)
                except (json.JSONDecodeError, KeyError, TypeError, ValueError):
                    layer = None
    if layer is None:
        layer = DEFAULT_LAYER
    return max(0, min(int(layer), num_layers - 1))


@torch.inference_mode()
def question_attention(gen, question: str, pixels: torch.Tensor, layer: int) -> tuple[np.ndarray, int]:
    """Head- and row-averaged attention of the question tokens to the image tokens at ``layers[layer]``.

    Args:
        gen: a :class:`evaluation.generate.Generator`.
        question: the question text (the template is applied here).
        pixels: [1, 3, S, S] processed image.
        layer: 0-based decoder layer.
    Returns:
        (attn [N] float32 numpy, number of query rows).
    """
    from student_train.alignment import capture_attention
    from student_train.inputs import encode_prompt

    ids, q_start = encode_prompt(gen.tokenizer, gen.template, question, gen.image_token_id, gen.num_image_tokens,
                                 add_bos=gen.add_bos)
    if q_start >= len(ids):
        raise MedAlignError("the prompt has no token after the image; nothing attends to it")
    input_ids = torch.tensor([ids], device=gen.device)
    query_mask = torch.zeros_like(input_ids, dtype=torch.bool)
    query_mask[0, q_start:] = True
    m_a, rows = capture_attention(gen.model, layer, input_ids=input_ids, attention_mask=torch.ones_like(input_ids),
                                  pixel_values=pixels.to(gen.device, gen.dtype), query_mask=query_mask)
    return m_a[0].cpu().numpy().astype(np.float32), int(rows[0])


def _printable(text: str) -> str:
    """Control characters (which fonts cannot draw) shown as '?'."""
    return "".join(c if c.isprintable() or c == "\n" else "?" for c in text)


def attention_figure(gen, image_path: str | Path, question: str, *, layer: int, max_new_tokens: int = 64) -> tuple[AttentionResult, object]:
    """Compute the map and the greedy answer; returns ``(result, matplotlib Figure)``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from evaluation.generate import generate_answers
    from evaluation.generate_config import DecodingConfig
    from student_train.inputs import student_pixels

    pixels = student_pixels(gen.image_processor, image_path, gen.background)[None]
    attn, rows = question_attention(gen, question, pixels, layer)
    answer = generate_answers(gen, [question], pixels, DecodingConfig(mode="greedy", max_new_tokens=max_new_tokens))[0]
    g = int(round(math.sqrt(attn.shape[0])))
    if g * g != attn.shape[0]:
        raise MedAlignError(f"{attn.shape[0]} image tokens do not form a square grid")
    result = AttentionResult(layer, g, attn, rows, question, answer)

    img, _ = load_image(image_path)
    square = np.asarray(expand2square(img, gen.background))
    side = square.shape[0]
    fig, axes = plt.subplots(1, 2, figsize=(10, 5.8))
    axes[0].imshow(square)
    axes[0].set_title("image as the student sees it\n(padded to a square)")
    axes[1].imshow(square)
    heat = axes[1].imshow(attn.reshape(g, g), cmap="jet", alpha=0.5, interpolation="bilinear",
                          extent=(0, side, side, 0))
    axes[1].set_title(f"question -> image attention\nlayer {layer}, {g}x{g} patches, mean over heads")
    fig.colorbar(heat, ax=axes[1], fraction=0.046, pad=0.04)
    for ax in axes:
        ax.axis("off")
    text = "Q: " + textwrap.fill(_printable(question), 110) + "\nA: " + textwrap.fill(_printable(answer) or "(empty)", 110)
    fig.text(0.02, 0.02, text, ha="left", va="bottom", fontsize=9, family="monospace")
    fig.tight_layout(rect=(0, 0.12, 1, 1))
    return result, fig


def write_attention_figure(gen, image_path: str | Path, question: str, out: str | Path, *, layer: int,
                           max_new_tokens: int = 64, map_out: str | Path | None = None) -> AttentionResult:
    """Compute, draw and save the figure to ``out`` (format from its suffix, e.g. .png / .pdf);
    the map and answer also as JSON to ``map_out`` when given."""
    import matplotlib.pyplot as plt

    result, fig = attention_figure(gen, image_path, question, layer=layer, max_new_tokens=max_new_tokens)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120, bbox_inches="tight")  # the two-line titles stay inside the picture
    plt.close(fig)
    if map_out is not None:
        Path(map_out).parent.mkdir(parents=True, exist_ok=True)
        Path(map_out).write_text(json.dumps(result.to_json(), indent=1) + "\n")
    return result


__all__ = ["AttentionResult", "default_layer", "question_attention", "attention_figure", "write_attention_figure"]
