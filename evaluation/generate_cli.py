"""``medalign-eval generate``: answer a test set with a (trained) student, LLaVA-Med JSONL out.

The options are generated from :class:`~evaluation.generate_config.GenerateConfig` and
:class:`~evaluation.generate_config.DecodingConfig` (their field docstrings are the help); importing
this module does not import torch.
"""

from __future__ import annotations

import dataclasses

import click

from evaluation.generate_config import DecodingConfig, GenerateConfig
from shared.cli import dataclass_options, user_errors

_DECODING_KEYS = {f.name for f in dataclasses.fields(DecodingConfig)}


@click.command()
@dataclass_options(GenerateConfig, DecodingConfig)
def generate(**flags) -> None:
    """Generate answers for a test set (LLaVA-Med answer JSONL, resumable).

    Defaults are the reference's evaluation: 5-beam search, max new tokens and half precision on
    CUDA per student family (LLaVA-Med: 1024, float16; HuatuoGPT: 128, bfloat16).
    """
    with user_errors():
        from evaluation.generate import run_generate

        given = {k: v for k, v in flags.items() if v is not None}
        decoding = DecodingConfig(**{k: v for k, v in given.items() if k in _DECODING_KEYS})
        cfg = GenerateConfig(decoding=decoding, **{k: v for k, v in given.items() if k not in _DECODING_KEYS})
        summary = run_generate(cfg, log=lambda m: click.echo(m, err=True))
        click.echo(f"wrote {summary['written']} answer(s) to {cfg.out} ({summary['already_done']} already there, "
                   f"{summary['questions']} questions)", err=True)
