"""Everything of a conversion but the weights: the source ``config.json`` read and checked, the
``LlavaConfig`` built from it, the tokenizer with its ``<image>`` token, the image processor, and
the files they are saved as (``config.json``, tokenizer files, ``preprocessor_config.json``,
``medalign.json``).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from shared.errors import MedAlignError
from shared.records import read_json
from student_train.convert.plan import SRC_VISION_PREFIX, VisionTower

if TYPE_CHECKING:
    from student_train.convert.original_llava import SourceLayout

IMAGE_TOKEN = "<image>"
#: Language-model fields carried from the source config into the text config (every layout).
TEXT_CONFIG_KEYS = (
    "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
    "num_key_value_heads", "head_dim", "hidden_act", "max_position_embeddings", "initializer_range",
    "rms_norm_eps", "rope_theta", "rope_scaling", "rope_parameters", "sliding_window", "attention_dropout",
    "tie_word_embeddings", "bos_token_id", "eos_token_id", "pad_token_id",
)
#: Files copied verbatim from the source folder (the tokenizer is then re-saved over its own files).
COPY_FILES = ("tokenizer.model", "tokenizer.json", "vocab.json", "merges.txt", "tokenizer_config.json",
              "special_tokens_map.json", "added_tokens.json", "generation_config.json", "chat_template.json",
              "chat_template.jinja")
SELECT_FEATURE = {"patch": "default", "cls_patch": "full"}


def read_source_config(src: Path, layout: SourceLayout) -> dict:
    """The source ``config.json``, refused unless it is a ``layout`` checkpoint this converter supports."""
    cfg = read_json(src / "config.json")
    if not isinstance(cfg, dict):
        raise MedAlignError(f"{src / 'config.json'}: expected a JSON object")
    mt = cfg.get("model_type")
    if mt not in layout.model_types:
        raise MedAlignError(f"{src / 'config.json'}: model_type {mt!r} is not a {layout.title} checkpoint "
                            f"(expected one of {', '.join(layout.model_types)})")
    checks = {
        "mm_projector_type": (cfg.get("mm_projector_type", "linear"), ("mlp2x_gelu",)),
        "mm_patch_merge_type": (cfg.get("mm_patch_merge_type", "flat"), ("flat",)),
        "mm_vision_select_feature": (cfg.get("mm_vision_select_feature", "patch"), tuple(SELECT_FEATURE)),
        "image_aspect_ratio": (cfg.get("image_aspect_ratio", "square"), ("pad", "square")),
    }
    for key, (value, allowed) in checks.items():
        if value not in allowed:
            raise MedAlignError(f"{src / 'config.json'}: {key}={value!r} is not supported "
                                f"(supported: {', '.join(allowed)})")
    if cfg.get("mm_use_im_start_end"):
        raise MedAlignError(f"{src / 'config.json'}: mm_use_im_start_end=true (image start/end tokens) is not supported")
    for key in ("mm_hidden_size", "hidden_size", "vocab_size"):
        if not isinstance(cfg.get(key), int):
            raise MedAlignError(f"{src / 'config.json'}: missing integer field {key!r}")
    return cfg


def vision_config(tower: VisionTower, shapes: dict[str, tuple[int, ...]], cfg: dict, src: Path):
    """The tower's ``CLIPVisionConfig``: from its folder when there is one, else inferred from the
    checkpoint's tensor shapes; its hidden size must be the source's ``mm_hidden_size``."""
    config = (_vision_config_from_dir(tower.folder, tower.what) if tower.folder is not None
              else _vision_config_from_shapes(shapes))
    if config.hidden_size != cfg["mm_hidden_size"]:
        raise MedAlignError(f"vision tower hidden size {config.hidden_size} != mm_hidden_size "
                            f"{cfg['mm_hidden_size']} in {src / 'config.json'}")
    return config


def _vision_config_from_dir(vdir: Path, what: str):
    from transformers import CLIPVisionConfig

    if not (vdir / "config.json").is_file():
        raise MedAlignError(f"{what} {vdir}: no config.json (expected a local CLIP model folder)")
    mt = read_json(vdir / "config.json").get("model_type")
    if mt not in ("clip", "clip_vision_model"):
        raise MedAlignError(f"{what} {vdir}: model_type {mt!r} is not a CLIP model")
    return CLIPVisionConfig.from_pretrained(str(vdir))


def _vision_config_from_shapes(shapes: dict[str, tuple[int, ...]]):
    """A CLIPVisionConfig inferred from the embedded tower's tensor shapes (OpenAI CLIP layout:
    64-dim heads, QuickGELU, LayerNorm eps 1e-5)."""
    from transformers import CLIPVisionConfig

    p = SRC_VISION_PREFIX
    hidden = shapes[p + "embeddings.class_embedding"][0]
    patch = shapes[p + "embeddings.patch_embedding.weight"][-1]
    positions = shapes[p + "embeddings.position_embedding.weight"][0]
    side = round((positions - 1) ** 0.5)
    if side * side != positions - 1:
        raise MedAlignError(f"vision tower: {positions} position embeddings is not 1 + a square grid")
    layers = 1 + max(int(k[len(p + "encoder.layers."):].split(".")[0])
                     for k in shapes if k.startswith(p + "encoder.layers."))
    inter = shapes[p + "encoder.layers.0.mlp.fc1.weight"][0]
    if hidden % 64:
        raise MedAlignError(f"vision tower hidden size {hidden} is not a multiple of 64; "
                            "pass --vision-tower DIR with the CLIP config.json")
    return CLIPVisionConfig(hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                            num_attention_heads=hidden // 64, image_size=side * patch, patch_size=patch,
                            hidden_act="quick_gelu", layer_norm_eps=1e-5)


def llava_config(cfg: dict, layout: SourceLayout, vision, tower: VisionTower, image_token_id: int,
                 vocab_before: int, vocab_after: int, dtype: torch.dtype):
    """The target ``LlavaConfig``: the source's language-model fields, the tower's config, LLaVA's
    feature selection and pad-to-square, and where the conversion came from (``converted_from``)."""
    import transformers
    from transformers import LlavaConfig

    text_kwargs = {k: cfg[k] for k in TEXT_CONFIG_KEYS + layout.extra_text_keys if k in cfg}
    text_kwargs["vocab_size"] = vocab_after
    text_config = getattr(transformers, layout.text_config_class)(**text_kwargs)
    strategy = SELECT_FEATURE[cfg.get("mm_vision_select_feature", "patch")]
    grid = vision.image_size // vision.patch_size
    config = LlavaConfig(
        vision_config=vision, text_config=text_config, image_token_id=image_token_id,
        vision_feature_layer=cfg.get("mm_vision_select_layer", -2), vision_feature_select_strategy=strategy,
        projector_hidden_act="gelu", multimodal_projector_bias=True,
        image_seq_length=grid * grid + (1 if strategy == "full" else 0),
        tie_word_embeddings=text_config.tie_word_embeddings, dtype=dtype,
        image_aspect_ratio=cfg.get("image_aspect_ratio", "square"),
        converted_from={"format": layout.name, "model_type": cfg["model_type"],
                        "mm_vision_tower": cfg.get("mm_vision_tower"), "vision_weights": tower.weights_from,
                        "vocab_size_before": vocab_before},
    )
    config.architectures = ["LlavaForConditionalGeneration"]
    return config


def tokenizer_with_image_token(src: Path):
    """The source tokenizer plus ``<image>`` as an added special token (id ``len(tokenizer)``
    unless the tokenizer already has it); returns (tokenizer, image token id)."""
    tokenizer = _load_tokenizer(src)
    if IMAGE_TOKEN not in tokenizer.get_vocab():
        from tokenizers import AddedToken
        tokenizer.add_tokens([AddedToken(IMAGE_TOKEN, special=True, normalized=False)], special_tokens=True)
    return tokenizer, tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)


def _load_tokenizer(src: Path):
    """The source tokenizer, loaded from a copy of its files alone (the llava_mistral config.json
    next to them only confuses the auto classes), else from the source folder itself."""
    import importlib.util
    import tempfile

    from transformers import AutoTokenizer

    if (not (src / "tokenizer.json").is_file() and (src / "tokenizer.model").is_file()
            and importlib.util.find_spec("sentencepiece") is None):
        raise MedAlignError(f"{src} has a SentencePiece tokenizer.model and no tokenizer.json; transformers 5 "
                            "needs the 'sentencepiece' package to read it (pip install sentencepiece)")
    errors = []
    with tempfile.TemporaryDirectory(prefix="medalign-tok-") as tmp:
        copy_source_files(src, Path(tmp))
        for folder in (tmp, str(src)):
            try:
                return AutoTokenizer.from_pretrained(folder)
            except Exception as e:  # noqa: BLE001 - report any tokenizer loading failure cleanly
                errors.append(f"{type(e).__name__}: {e}")
    raise MedAlignError(f"{src}: cannot load the tokenizer ({errors[-1]})")


def copy_source_files(src: Path, dst: Path) -> None:
    """Copy the tokenizer and generation files of :data:`COPY_FILES` that ``src`` has into ``dst``."""
    for name in COPY_FILES:
        if (src / name).is_file():
            shutil.copy2(src / name, dst / name)


def save_model_files(dst: Path, config, tokenizer, tower: VisionTower, template: str | None) -> None:
    """Write ``config.json``, the tokenizer, ``preprocessor_config.json`` (the tower folder's CLIP
    image processor, else a default one at the tower's size; ``image_aspect_ratio`` recorded in it)
    and, when the layout names a template, ``medalign.json``."""
    from transformers import CLIPImageProcessor

    config.save_pretrained(str(dst))
    tokenizer.save_pretrained(str(dst))
    if tower.folder is not None and (tower.folder / "preprocessor_config.json").is_file():
        processor = CLIPImageProcessor.from_pretrained(str(tower.folder))
    else:
        s = config.vision_config.image_size
        processor = CLIPImageProcessor(size={"shortest_edge": s}, crop_size={"height": s, "width": s})
    processor.image_aspect_ratio = config.image_aspect_ratio
    processor.save_pretrained(str(dst))
    if template:
        (dst / "medalign.json").write_text(json.dumps({"template": template}, indent=2) + "\n", encoding="utf-8")
