"""``medalign-eval generate``: answer a test set with a (trained) student, LLaVA-Med JSONL out."""

from __future__ import annotations

from pathlib import Path

import click

from shared.runtime import DTYPE_NAMES

# The choices, spelled here so that importing the CLI does not import torch (evaluation.generate
# holds the same tuples; tests check they agree).
DECODINGS = ("greedy", "beam", "nucleus")
CLOSED_SUFFIX_MODES = ("auto", "always", "never")


@click.command()
@click.option("--model", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="HF-format LLaVA student directory (the base model).")
@click.option("--adapter", default=None, type=click.Path(file_okay=False, path_type=Path),
              help="Training run directory (medalign-train --out): PEFT adapter, W, template, teacher.json.")
@click.option("--data", required=True, type=click.Path(dir_okay=False, path_type=Path),
              help="LLaVA-style JSON list of test records (id, image, conversations, answer_type).")
@click.option("--image-root", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="Directory the records' image paths are relative to.")
@click.option("--out", required=True, type=click.Path(dir_okay=False, path_type=Path),
              help="Answer file (JSONL). An existing file is resumed: ids already in it are skipped.")
@click.option("--decoding", type=click.Choice(DECODINGS), default="beam", show_default=True,
              help="beam: the paper's and the reference's default; greedy: the reference's other reported run.")
@click.option("--num-beams", type=int, default=5, show_default=True, help="Beams for --decoding beam.")
@click.option("--top-p", type=float, default=0.9, show_default=True, help="Nucleus mass for --decoding nucleus.")
@click.option("--temperature", type=float, default=1.0, show_default=True, help="For --decoding nucleus.")
@click.option("--max-new-tokens", default="auto", show_default=True,
              help="Longest answer; auto: the reference's per student family (LLaVA-Med 1024, HuatuoGPT 128).")
@click.option("--batch-size", type=int, default=8, show_default=True)
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda or cuda:K.")
@click.option("--seed", type=int, default=0, show_default=True, help="Sampling seed (batch k uses seed + k).")
@click.option("--template", default=None,
              help="Prompt template when the run does not record one (default: medalign.json, else by backbone).")
@click.option("--limit", type=int, default=None, help="Only the first K records.")
@click.option("--dtype", type=click.Choice(("auto", *DTYPE_NAMES)), default="auto", show_default=True,
              help="auto: the reference's half precision on CUDA (LLaVA-Med float16, HuatuoGPT bfloat16), "
                   "float32 on CPU.")
@click.option("--closed-suffix", type=click.Choice(CLOSED_SUFFIX_MODES), default="auto", show_default=True,
              help="auto: append ' Please choose from the following two options: [yes, no]' to CLOSED "
                   "questions as LLaVA-Med's test files do; always; never.")
@click.option("--overwrite", is_flag=True, help="Start the answer file afresh instead of resuming it.")
@click.option("--trust-remote-code", is_flag=True, help="Allow custom modelling code from the model directory.")
def generate(model, adapter, data, image_root, out, decoding, num_beams, top_p, temperature, max_new_tokens,
             batch_size, device, seed, template, limit, dtype, closed_suffix, overwrite, trust_remote_code) -> None:
    """Generate answers for a test set (LLaVA-Med answer JSONL, resumable)."""
    from evaluation.generate import DecodingConfig, GenerateConfig, run_generate

    cfg = GenerateConfig(
        model=str(model), adapter=None if adapter is None else str(adapter), data=str(data),
        image_root=str(image_root), out=str(out),
        decoding=DecodingConfig(mode=decoding, num_beams=num_beams, top_p=top_p, temperature=temperature,
                                max_new_tokens=max_new_tokens, seed=seed),
        batch_size=batch_size, device=device, dtype=dtype, template=template, limit=limit,
        closed_suffix=closed_suffix, overwrite=overwrite, trust_remote_code=trust_remote_code)
    summary = run_generate(cfg, log=lambda m: click.echo(m, err=True))
    click.echo(f"wrote {summary['written']} answer(s) to {out} ({summary['already_done']} already there, "
               f"{summary['questions']} questions)", err=True)
