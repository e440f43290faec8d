"""``medalign-eval attention``: the student's question-to-image attention over the image (paper Fig. 6)."""

from __future__ import annotations

from pathlib import Path

import click

from shared.runtime import DTYPE_NAMES


@click.command()
@click.option("--model", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="HF-format LLaVA student directory (the base model).")
@click.option("--adapter", default=None, type=click.Path(file_okay=False, path_type=Path),
              help="Training run directory: adapter, W, template.")
@click.option("--image", required=True, type=click.Path(dir_okay=False, path_type=Path), help="The image file.")
@click.option("--question", required=True, help="The question asked about the image.")
@click.option("--out", required=True, type=click.Path(dir_okay=False, path_type=Path),
              help="Figure file (.png, .pdf, .svg).")
@click.option("--layer", type=int, default=None,
              help="0-based decoder layer (default: the run's align layer, else 20 clipped to the model).")
@click.option("--map-out", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Also write the map, the layer and the answer as JSON here.")
@click.option("--template", default=None, help="Prompt template when the run does not record one.")
@click.option("--max-new-tokens", type=int, default=64, show_default=True)
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda or cuda:K.")
@click.option("--dtype", type=click.Choice(DTYPE_NAMES), default="float32", show_default=True)
@click.option("--trust-remote-code", is_flag=True)
def attention(model, adapter, image, question, out, layer, map_out, template, max_new_tokens, device, dtype,
              trust_remote_code) -> None:
    """Draw the attention from the question tokens to the image patches at one layer, with the answer."""
    from evaluation.attention_map import default_layer, write_attention_figure
    from evaluation.generate import load_generator
    from shared.runtime import resolve_device, torch_dtype
    from shared.errors import MedAlignError
    from student_train.model import num_layers

    if not image.is_file():
        raise MedAlignError(f"--image {image} not found")
    if max_new_tokens < 1:
        raise MedAlignError(f"--max-new-tokens must be >= 1, got {max_new_tokens}")
    gen = load_generator(model, adapter, template=template, dtype=torch_dtype(dtype), device=resolve_device(device),
                         trust_remote_code=trust_remote_code)
    n = num_layers(gen.model)
    if layer is None:
        layer = default_layer(adapter, n)
    result = write_attention_figure(gen, image, question, out, layer=layer, max_new_tokens=max_new_tokens,
                                    map_out=map_out)
    click.echo(f"layer {result.layer}, {result.query_rows} query tokens, {result.grid}x{result.grid} patches; "
               f"answer: {result.answer!r}", err=True)
    click.echo(f"wrote {out}" + (f" and {map_out}" if map_out else ""), err=True)
