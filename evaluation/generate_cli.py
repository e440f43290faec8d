"""``medalign-eval generate``: answer a test set with a (trained) student, LLaVA-Med JSONL out.

The options are generated from :class:`~evaluation.generate_config.GenerateConfig` and
:class:`~evaluation.generate_config.DecodingConfig` (their field docstrings are the help); importing
this module does not import torch (the decoding methods are read when the command runs or shows its
help). ``--help-decoding NAME`` prints a method's keys, defaults and how MedAlign's code differs.
"""

from __future__ import annotations

import dataclasses

import click

from evaluation.generate_config import DecodingConfig, GenerateConfig, MethodChoices
from shared.cli import LazyChoice, dataclass_options, user_errors

_DECODING_KEYS = {f.name for f in dataclasses.fields(DecodingConfig)}


def _help_decoding(ctx: click.Context, _param: click.Parameter, name: str | None) -> None:
    if name is None or ctx.resilient_parsing:
        return
    from evaluation.decoding import get
    from student_train.families import FAMILIES

    click.echo(get(name).help_text(list(FAMILIES.values())))
    ctx.exit(0)


@click.command()
@dataclass_options(GenerateConfig, DecodingConfig)
@click.option("--help-decoding", type=LazyChoice(MethodChoices()), default=None, is_eager=True, expose_value=False,
              callback=_help_decoding, metavar="NAME",
              help="Show a decoding method's keys (--decoding-arg), their defaults, what it does and how "
                   "MedAlign's code differs, then exit.")
def generate(**flags) -> None:
    """Generate answers for a test set (LLaVA-Med answer JSONL, resumable).

    Defaults are the reference's evaluation: 5-beam search, max new tokens and half precision on
    CUDA per student family (LLaVA-Med: 1024, float16; HuatuoGPT: 128, bfloat16). Other decodings:
    --decoding NAME [--decoding-arg KEY=VALUE ...]; --help-decoding NAME lists a method's keys.
    Under torchrun each rank answers a contiguous slice; rank 0 merges them into --out.
    """
    with user_errors():
        from evaluation.generate import run_generate
        from shared.distributed import world_from_env

        given = {k: v for k, v in flags.items() if v is not None}
        decoding = DecodingConfig(**{k: v for k, v in given.items() if k in _DECODING_KEYS})
        cfg = GenerateConfig(decoding=decoding, **{k: v for k, v in given.items() if k not in _DECODING_KEYS})
        summary = run_generate(cfg, log=lambda m: click.echo(m, err=True))
        if not world_from_env().is_main:  # torchrun: rank 0 reports for the job
            return
        click.echo(f"wrote {summary['written']} answer(s) to {cfg.out} ({summary['already_done']} already there, "
                   f"{summary['questions']} questions)", err=True)
