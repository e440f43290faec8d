"""Convert a checkpoint in the original LLaVA code base's layout into a transformers
``LlavaForConditionalGeneration`` directory.

LLaVA-Med-1.5 (``llava_mistral``, :mod:`student_train.convert.llava_med`) and HuatuoGPT-Vision-7B
(``llava_qwen2``, :mod:`student_train.convert.huatuo`) share one layout; a :class:`SourceLayout` says what
differs (the accepted ``model_type``, the language model's config class, where the vision tower
may live, the prompt template to record)::

    config.json        model_type, the language model's fields, mm_vision_tower, mm_hidden_size,
                       mm_projector_type "mlp2x_gelu", mm_vision_select_layer -2,
                       mm_vision_select_feature "patch", image_aspect_ratio "pad"
    *.safetensors | pytorch_model*.bin (+ index)
        model.embed_tokens.*, model.layers.*, model.norm.*, lm_head.*      the language model
        model.mm_projector.{0,2}.*                                         Linear, GELU, Linear
        model.vision_tower.vision_tower.vision_model.*                     CLIP (often absent)
    tokenizer files

Destination (transformers 5 names, checked against a meta-device instance of the target model)::

    model.vision_tower.*                         <- ...vision_model.*  (or a local CLIP folder)
    model.multi_modal_projector.linear_{1,2}.*   <- model.mm_projector.{0,2}.*
    model.language_model.*                       <- model.{embed_tokens,layers,norm}.*
    lm_head.*                                    <- lm_head.*

An ``<image>`` special token is added to the tokenizer (id ``len(tokenizer)``). Where the
embedding already has a row for that id (Qwen2 checkpoints carry spare rows beyond the
tokenizer), nothing is resized and every row keeps its trained value; otherwise the embedding and
lm_head grow by the new rows, initialised to the mean of the existing rows (the image rows of the
embedding are always replaced by image features, so only the lm_head row matters: it gives the
token an average logit). LLaVA's pad-to-square preprocessing is not part of the CLIP image
processor; it is recorded as ``image_aspect_ratio: "pad"`` in both ``config.json`` and
``preprocessor_config.json`` and applied by our own code (:func:`shared.images.expand2square`).

The conversion runs in four steps, one module each: :mod:`~student_train.convert.weights` reads the
source tensors' names and shapes, :mod:`~student_train.convert.plan` maps and checks every one,
:mod:`~student_train.convert.hf_files` builds the config, tokenizer and image processor, and
:mod:`~student_train.convert.shards` streams the weights into safetensors shards.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import torch

from shared.errors import MedAlignError
from shared.runtime import check_dtype_name, torch_dtype
from student_train.convert.hf_files import (copy_source_files, llava_config, read_source_config, save_model_files,
                                            tokenizer_with_image_token, vision_config)
from student_train.convert.plan import SRC_VISION_PREFIX, check_plan, find_vision_tower, plan_tensors
from student_train.convert.shards import INDEX_NAME, write_shards
from student_train.convert.weights import WeightSource

EMBED_KEY = "model.embed_tokens.weight"


@dataclass(frozen=True)
class SourceLayout:
    """What distinguishes one original-LLaVA checkpoint family from another."""

    name: str
    """The ``--from`` name, recorded as ``converted_from.format``."""
    title: str
    """The model family, for messages (``LLaVA-Med-1.5``)."""
    model_types: tuple[str, ...]
    """Accepted ``model_type`` values of the source ``config.json``."""
    text_config_class: str
    """The transformers config class of the language model (``MistralConfig``)."""
    extra_text_keys: tuple[str, ...] = ()
    """Source fields carried into the text config besides :data:`TEXT_CONFIG_KEYS`."""
    tower_in_model_dir: bool = False
    """Whether a relative ``mm_vision_tower`` names a folder inside the model directory (the
    family's loader joins it to the model path); otherwise it is only a hub name, for messages."""
    template: str | None = None
    """The prompt template written to ``medalign.json`` (None: none written, the backbone decides)."""


@dataclass
class ModelConversionReport:
    """What :func:`convert_original` did."""

    out_dir: Path
    image_token_id: int
    vocab_size_before: int
    vocab_size_after: int
    vision_weights_from: str
    dtype: str
    tensors_written: int
    files: list[str]
    dropped: Counter = field(default_factory=Counter)
    template: str | None = None

    def summary_lines(self) -> list[str]:
        rows = ("a spare row: nothing resized" if self.vocab_size_after == self.vocab_size_before
                else "new rows initialised to the mean")
        lines = [f"wrote {self.tensors_written} tensors ({self.dtype}) in {len(self.files)} file(s) to {self.out_dir}",
                 f"vision tower weights from: {self.vision_weights_from}",
                 f"<image> token id {self.image_token_id}; vocab {self.vocab_size_before} -> "
                 f"{self.vocab_size_after} ({rows})"]
        if self.template:
            lines.append(f"prompt template (medalign.json): {self.template}")
        lines += [f"dropped buffer {name}: {n}" for name, n in sorted(self.dropped.items())]
        return lines


def convert_original(layout: SourceLayout, src: str | Path, dst: str | Path, vision_tower: str | Path | None = None,
                     dtype: str = "keep", max_shard_bytes: int = 5_000_000_000,
                     overwrite: bool = False) -> ModelConversionReport:
    """Convert the ``layout`` checkpoint folder ``src`` into a ``LlavaForConditionalGeneration`` folder ``dst``.

    ``vision_tower``: a local CLIP folder (HF ``CLIPModel`` or ``CLIPVisionModel``); required when
    the checkpoint holds no vision tower weights and the layout's config names no tower folder
    (:func:`~student_train.convert.plan.find_vision_tower`), and then the source of them. When the
    checkpoint has its own tower, a folder only supplies the config and the image processor (without
    one, the tower's config is inferred from the tensor shapes). ``dtype``: ``keep`` (the dtype of the
    source embedding) or float32/float16/bfloat16. Nothing is written until every name and shape is checked.
    """
    from transformers import LlavaForConditionalGeneration

    src, dst = Path(src), Path(dst)
    if not src.is_dir():
        raise MedAlignError(f"source checkpoint folder not found: {src}")
    check_dtype_name(dtype, "dtype", extra=("keep",))
    if dst.exists() and any(dst.iterdir()) and not overwrite:
        raise MedAlignError(f"output folder {dst} is not empty; choose a new folder or pass --overwrite")
    vdir = Path(vision_tower) if vision_tower is not None else None
    if vdir is not None and not vdir.is_dir():
        raise MedAlignError(f"--vision-tower {vdir} is not a folder")

    cfg = read_source_config(src, layout)
    weights = WeightSource(src)
    has_vision = any(k.startswith(SRC_VISION_PREFIX) for k in weights.key_file)
    tower = find_vision_tower(src, cfg, layout, vdir, has_vision)
    vision = vision_config(tower, weights.shapes, cfg, src)
    plan, dropped = plan_tensors(weights, tower, has_vision, layout)

    # Tokenizer: the source's, plus <image> (saved over the copied files at the end).
    tokenizer, image_token_id = tokenizer_with_image_token(src)
    if EMBED_KEY not in weights.shapes:
        raise MedAlignError(f"{src}: no {EMBED_KEY}")
    vocab_before = weights.shapes[EMBED_KEY][0]
    vocab_after = max(vocab_before, len(tokenizer), image_token_id + 1)  # == vocab_before on a spare row
    target = weights.dtypes[EMBED_KEY] if dtype == "keep" else torch_dtype(dtype)
    config = llava_config(cfg, layout, vision, tower, image_token_id, vocab_before, vocab_after, target)

    # Check the plan against the target model's own names and shapes (meta device: no memory).
    with torch.device("meta"):
        expected = {k: tuple(v.shape) for k, v in LlavaForConditionalGeneration(config).state_dict().items()}
    planned = check_plan(plan, expected, config.tie_word_embeddings, vocab_before, dropped)

    # Everything is checked: only now is the output folder touched.
    dst.mkdir(parents=True, exist_ok=True)
    for stale in [*dst.glob("model*.safetensors"), dst / INDEX_NAME]:
        stale.unlink(missing_ok=True)  # --overwrite: shards of an earlier conversion must not linger
    copy_source_files(src, dst)
    files = write_shards(planned, expected, target, vocab_after, max_shard_bytes, dst)
    save_model_files(dst, config, tokenizer, tower, layout.template)
    return ModelConversionReport(out_dir=dst, image_token_id=image_token_id, vocab_size_before=vocab_before,
                                 vocab_size_after=vocab_after, vision_weights_from=tower.weights_from,
                                 dtype=str(target).replace("torch.", ""), tensors_written=len(planned),
                                 files=files, dropped=dropped, template=layout.template)
