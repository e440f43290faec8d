"""``medalign-data``: turn public datasets and the original student checkpoints into what the pipeline reads.

    medalign-data convert --format vqa-rad --input "VQA_RAD Dataset Public.json" --out data/vqa-rad
    medalign-data convert-model --from llava-med llava-med-v1.5-mistral-7b --out llava-med-hf \\
        --vision-tower clip-vit-large-patch14-336
    medalign-data convert-model --from huatuo HuatuoGPT-Vision-7B --out huatuo-hf
    medalign-data regions --from slake --input Slake1.0 --out data/slake-regions

The group lives in ``student_train`` because ``convert-model`` needs the student-model converters
(:mod:`student_train.convert`); ``convert`` only calls the dataset converters of :mod:`shared.convert`.
"""

from __future__ import annotations

import click

from shared.cli import user_errors


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def main() -> None:
    """Dataset and checkpoint converters for MedAlign."""


@main.command()
@click.option("--format", "fmt", required=True,
              type=click.Choice(["vqa-rad", "slake", "pathvqa", "iu-xray", "mimic-cxr", "omnimedvqa"]),
              help="Source dataset format.")
@click.option("--input", "input_path", required=True, type=click.Path(path_type=str),
              help="Source file or folder (see the README for what each format accepts).")
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False, path_type=str),
              help="Output folder: train.json, test.json (val.json when the source has one), convert_stats.json.")
@click.option("--image-root", type=click.Path(path_type=str), default=None,
              help="If given, drop records whose image file is missing under this folder (counted).")
@click.option("--prompt", default=None, help="Report formats only: the question asked for every report.")
def convert(fmt: str, input_path: str, out_dir: str, image_root: str | None, prompt: str | None) -> None:
    """Convert a public dataset release into LLaVA-style JSON."""
    from shared.convert.datasets import convert_dataset

    with user_errors():
        stats, files = convert_dataset(fmt, input_path, out_dir, image_root=image_root, prompt=prompt)
    for line in stats.summary_lines():
        click.echo(line)
    click.echo("wrote " + ", ".join(str(f) for f in files))


@main.command()
@click.option("--from", "source_format", required=True, type=click.Choice(["slake"]),
              help="Source of the masks (slake: the release's imgs/xmlab*/mask.png).")
@click.option("--input", "input_path", required=True, type=click.Path(file_okay=False, path_type=str),
              help="The SLAKE release folder (holding imgs/) or its imgs folder.")
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False, path_type=str),
              help="Output regions folder: regions.json and masks/ (format: shared/regions.py).")
@click.option("--labels", default=None, type=click.Path(dir_okay=False, path_type=str),
              help="Label table naming the mask values (default: the release's mask.txt, if any).")
def regions(source_format: str, input_path: str, out_dir: str, labels: str | None) -> None:
    """Convert per-image region masks into a regions folder (medalign-eval tsne --regions)."""
    from shared.convert.slake_masks import convert_slake_masks

    with user_errors():
        stats = convert_slake_masks(input_path, out_dir, labels)
    for line in stats.summary_lines():
        click.echo(line)
    click.echo(f"wrote {out_dir}/regions.json (--image-root: the release's imgs folder)")


def _layout(name: str):
    """The :class:`~student_train.convert.original_llava.SourceLayout` of a ``--from`` name."""
    if name == "huatuo":
        from student_train.convert.huatuo import HUATUO
        return HUATUO
    from student_train.convert.llava_med import LLAVA_MED
    return LLAVA_MED


@main.command("convert-model")
@click.option("--from", "source_format", required=True, type=click.Choice(["llava-med", "huatuo"]),
              help="Source checkpoint layout (llava-med: the original LLaVA-Med-1.5 llava_mistral folder; "
                   "huatuo: the original HuatuoGPT-Vision-7B llava_qwen2 folder).")
@click.argument("src", type=click.Path(path_type=str))
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False, path_type=str),
              help="Output folder for the LlavaForConditionalGeneration checkpoint.")
@click.option("--vision-tower", default=None, type=click.Path(path_type=str),
              help="Local CLIP folder (e.g. clip-vit-large-patch14-336); needed when SRC has no vision weights "
                   "(and, for huatuo, its config's mm_vision_tower is not a folder).")
@click.option("--dtype", default="keep", show_default=True,
              type=click.Choice(["keep", "float32", "float16", "bfloat16"]),
              help="Output dtype; 'keep' uses the source embedding's dtype.")
@click.option("--max-shard-size", default=5.0, show_default=True, type=click.FloatRange(min=1e-6),
              help="Largest output shard, in GB (10^9 bytes).")
@click.option("--overwrite", is_flag=True, help="Write into a non-empty output folder.")
def convert_model(source_format: str, src: str, out_dir: str, vision_tower: str | None, dtype: str,
                  max_shard_size: float, overwrite: bool) -> None:
    """Convert an original LLaVA-Med-1.5 or HuatuoGPT-Vision checkpoint into a transformers
    LlavaForConditionalGeneration folder."""
    from student_train.convert.original_llava import convert_original

    with user_errors():
        report = convert_original(_layout(source_format), src, out_dir, vision_tower=vision_tower, dtype=dtype,
                                  max_shard_bytes=int(max_shard_size * 1e9), overwrite=overwrite)
    for line in report.summary_lines():
        click.echo(line)


if __name__ == "__main__":
    main()
