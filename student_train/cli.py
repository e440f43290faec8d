"""``medalign-train``: LoRA fine-tuning of a LLaVA student with MedAlign's distillation losses.

Thin entry point: parse the flags (and ``--config run.yaml``), build a :class:`TrainConfig`, run
the recipe. Flags typed on the command line win over the YAML file, which wins over the defaults.
"""

from __future__ import annotations

import sys

import click

from shared.errors import MedAlignError
from student_train.config import ATT_NORMS, DEFAULT_ATT_NORM, TrainConfig, read_yaml_config


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
@click.option("--cache", type=str, default=None, help="Teacher cache directory (not needed when --alpha 0 --beta 0).")
@click.option("--model", type=str, default=None, help="HF-format LLaVA student directory.  [required]")
@click.option("--data", type=str, default=None, help="LLaVA-style training JSON.  [required]")
@click.option("--image-root", type=str, default=None, help="Directory the records' image paths are relative to.  [required]")
@click.option("--out", type=str, default=None, help="RUN_DIR for the adapter, W, config, logs, checkpoints.  [required]")
@click.option("--template", type=str, default=None,
              help="Prompt template (vicuna_v1, llava_v1, mistral_instruct, huatuo); default: the model's "
                   "medalign.json, else by backbone.")
@click.option("--align-layer", type=int, default=20, help="Decoder layer l (0-based): W on layers[l-1], L_att at layers[l].")
@click.option("--alpha", type=float, default=1.0, help="Weight of L_vis (0: MedAlign-att ablation).")
@click.option("--beta", type=float, default=0.06, help="Weight of L_att (0: MedAlign-vis ablation).")
@click.option("--eps", type=float, default=1.0, help="Rotation scale: X~ = X + eps X W^T.")
@click.option("--att-norm", type=click.Choice(ATT_NORMS), default=DEFAULT_ATT_NORM,
              help="Normalisation for L_att (l2 = reference code and published runs; sum = a true KL, "
                   "needs a much smaller beta; softmax = the paper's wording, near-uniform).")
@click.option("--lora-r", type=int, default=32)
@click.option("--lora-alpha", type=float, default=16)
@click.option("--lora-dropout", type=float, default=0.05)
@click.option("--lr", type=float, default=2e-4, help="Learning rate of LoRA and W.")
@click.option("--projector-lr", type=float, default=0.0,
              help="Learning rate of the projector (0, the default: frozen, as the reference).")
@click.option("--weight-decay", type=float, default=0.0)
@click.option("--max-grad-norm", type=float, default=1.0, help="Gradient clipping (0 disables).")
@click.option("--warmup-ratio", type=float, default=0.03)
@click.option("--epochs", type=float, default=9)
@click.option("--max-steps", type=int, default=None, help="Total optimizer steps (overrides --epochs).")
@click.option("--batch-size", type=int, default=1, help="Samples per device per micro-batch.")
@click.option("--grad-accum", type=int, default=8, help="Micro-batches per optimizer step.")
@click.option("--max-length", type=int, default=1024, help="Longer samples (image tokens expanded) are skipped and counted.")
@click.option("--bf16/--no-bf16", default=False, help="bf16 frozen weights + autocast (trainable weights fp32).")
@click.option("--gradient-checkpointing/--no-gradient-checkpointing", default=False)
@click.option("--seed", type=int, default=0)
@click.option("--resume", is_flag=True, default=False, help="Continue RUN_DIR's last checkpoint.")
@click.option("--stop-after", type=int, default=None,
              help="Stop this invocation after N optimizer steps with a checkpoint (continue with --resume).")
@click.option("--allow-missing", is_flag=True, default=False,
              help="Train samples whose image is not in the cache with the LM loss only.")
@click.option("--trust-remote-code", is_flag=True, default=False, help="Allow custom code from the model directory.")
@click.option("--num-workers", type=int, default=0, help="DataLoader workers per process.")
@click.option("--log-every", type=int, default=1, help="Optimizer steps between console log lines.")
@click.option("--save-every", type=int, default=0, help="Optimizer steps between checkpoints (0: per epoch).")
@click.option("--keep-checkpoints", type=int, default=1, help="How many recent checkpoints to keep.")
@click.option("--device", type=str, default="auto", help="auto, cpu, cuda or cuda:K (torchrun: cuda:LOCAL_RANK).")
def main(config_file, **flags):
    """Fine-tune a LLaVA student with LoRA and MedAlign's L_vis / L_att from a teacher cache.

    The same command runs multi-GPU under `torchrun --nproc-per-node K`.
    """
    try:
        cfg = TrainConfig.from_flat(flags)
        from student_train.recipe import train
        train(cfg)
    except MedAlignError as e:
        click.echo(f"Error: {e}", err=True)
        sys.exit(2)


if __name__ == "__main__":
    main()
