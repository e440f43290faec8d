"""``medalign-train``: LoRA fine-tuning of a LLaVA student with MedAlign's distillation losses.

Thin entry point: parse the flags (and ``--config run.yaml``), build a :class:`TrainConfig`, run
the recipe. The options are generated from the dataclasses of :mod:`student_train.config` (their
field docstrings are the help). Flags typed on the command line win over the YAML file, which wins
over the defaults.
"""

from __future__ import annotations

import click

from shared.cli import dataclass_options, user_errors
from shared.errors import MedAlignError
from student_train.config import GROUPS, TrainConfig, read_yaml_config


def _load_config(ctx: click.Context, _param, value):
    """Eager ``--config``: the YAML's settings become the defaults of the other options."""
    if value:
        try:
            settings = read_yaml_config(value)
        except MedAlignError as e:
            click.echo(f"Error: {e}", err=True)
            ctx.exit(2)
        ctx.default_map = {**(ctx.default_map or {}), **settings}
    return value


@click.command(context_settings={"help_option_names": ["-h", "--help"], "show_default": True})
@click.option("--config", "config_file", type=click.Path(dir_okay=False), is_eager=True, expose_value=True,
              callback=_load_config, help="YAML file holding any of these settings (flat keys, e.g. align_layer: 20); "
              "flags typed on the command line win.")
@dataclass_options(*GROUPS.values())
def main(config_file, **flags):
    """Fine-tune a LLaVA student with LoRA and MedAlign's L_vis / L_att from a teacher cache.

    The same command runs multi-GPU under `torchrun --nproc-per-node K`.
    """
    with user_errors():
        cfg = TrainConfig.from_flat(flags)
        from student_train.recipe import train
        train(cfg)


if __name__ == "__main__":
    main()
