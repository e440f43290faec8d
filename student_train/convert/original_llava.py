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
"""

from __future__ import annotations

import json
import shutil
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import torch

from shared.errors import MedAlignError
from shared.records import read_json

IMAGE_TOKEN = "<image>"
DTYPES = {"keep": None, "float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
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
#: Buffers some checkpoints carry that the target model does not keep.
DROPPABLE_SUFFIXES = ("position_ids", "rotary_emb.inv_freq")
CLIP_VISION_PREFIXES = ("embeddings.", "pre_layrnorm.", "encoder.", "post_layernorm.")
SRC_VISION_PREFIX = "model.vision_tower.vision_tower.vision_model."
SELECT_FEATURE = {"patch": "default", "cls_patch": "full"}
#: Target tensors whose vocabulary rows may grow when ``<image>`` needs a new row.
RESIZABLE = frozenset({"model.language_model.embed_tokens.weight", "lm_head.weight"})


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


# ---------------------------------------------------------------------------------------------
# Reading checkpoints lazily: (key -> file) first, tensors one file at a time.

class WeightSource:
    """The tensors of a checkpoint folder (safetensors or ``pytorch_model*.bin``, sharded or not).

    ``key_file`` maps every tensor name to its file without loading data; ``tensors(file)`` yields
    one file's tensors. ``.bin`` files are read with ``torch.load(weights_only=True)`` (mmap when
    the file allows it); no pickle code is ever executed.
    """

    def __init__(self, folder: Path):
        self.folder = folder
        self.files = self._weight_files(folder)
        self._bin_cache: tuple[Path, dict] | None = None
        self.key_file: dict[str, Path] = {}
        self.shapes: dict[str, tuple[int, ...]] = {}
        self.dtypes: dict[str, torch.dtype] = {}
        for f in self.files:
            for k in self._read_meta(f):
                self.key_file[k] = f

    @staticmethod
    def _weight_files(folder: Path) -> list[Path]:
        for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
            index = folder / index_name
            if index.is_file():
                weight_map = read_json(index).get("weight_map")
                if not isinstance(weight_map, dict):
                    raise MedAlignError(f"{index}: no 'weight_map' object")
                files = sorted({folder / name for name in weight_map.values()})
                missing = [f.name for f in files if not f.is_file()]
                if missing:
                    raise MedAlignError(f"{index} lists missing shard(s): {', '.join(missing)}")
                return files
        for pattern in ("*.safetensors", "pytorch_model*.bin"):
            files = sorted(folder.glob(pattern))
            if files:
                return files
        raise MedAlignError(f"{folder}: no weights found (model.safetensors[.index.json] or pytorch_model*.bin)")

    def _read_meta(self, f: Path) -> Iterator[str]:
        """Yield the tensor names of file ``f``, recording their shapes and dtypes."""
        if f.suffix == ".safetensors":
            from safetensors import safe_open
            with safe_open(str(f), framework="pt") as sf:
                for k in sf.keys():
                    sl = sf.get_slice(k)
                    self.shapes[k] = tuple(sl.get_shape())
                    self.dtypes[k] = _safetensors_dtype(sl.get_dtype())
                    yield k
        else:
            for k, t in self._load_bin(f).items():
                if not isinstance(t, torch.Tensor):
                    continue
                self.shapes[k] = tuple(t.shape)
                self.dtypes[k] = t.dtype
                yield k

    def _load_bin(self, f: Path) -> dict:
        if self._bin_cache is not None and self._bin_cache[0] == f:
            return self._bin_cache[1]
        self._bin_cache = None
        try:
            try:
                sd = torch.load(f, map_location="cpu", weights_only=True, mmap=True)
            except RuntimeError:  # legacy (pre-zip) serialisation cannot be memory-mapped
                sd = torch.load(f, map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001 - any unpickling refusal is a user-facing error
            raise MedAlignError(f"{f}: cannot load with torch.load(weights_only=True): {e}") from None
        if isinstance(sd, dict) and isinstance(sd.get("state_dict"), dict):
            sd = sd["state_dict"]
        if not isinstance(sd, dict):
            raise MedAlignError(f"{f}: expected a dict of tensors, got {type(sd).__name__}")
        self._bin_cache = (f, sd)
        return sd

    def tensors(self, f: Path, keys: set[str]) -> Iterator[tuple[str, torch.Tensor]]:
        """The tensors named in ``keys`` from file ``f``, in file order."""
        if f.suffix == ".safetensors":
            from safetensors import safe_open
            with safe_open(str(f), framework="pt") as sf:
                for k in sf.keys():
                    if k in keys:
                        yield k, sf.get_tensor(k)
        else:
            for k, t in self._load_bin(f).items():
                if k in keys:
                    yield k, t
            self._bin_cache = None


def _safetensors_dtype(name: str) -> torch.dtype:
    table = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64,
             "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
             "BOOL": torch.bool}
    return table.get(name, torch.float32)


# ---------------------------------------------------------------------------------------------
# Configs

def _read_source_config(src: Path, layout: SourceLayout) -> dict:
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


# ---------------------------------------------------------------------------------------------
# Key mapping

def map_original_key(key: str) -> str | None:
    """Original LLaVA name -> transformers 5 name (None: not a weight of the layout)."""
    if key.startswith(SRC_VISION_PREFIX):
        return "model.vision_tower." + key[len(SRC_VISION_PREFIX):]
    if key.startswith("model.mm_projector."):
        rest = key[len("model.mm_projector."):]
        index, _, param = rest.partition(".")
        linear = {"0": "linear_1", "2": "linear_2"}.get(index)
        return None if linear is None else f"model.multi_modal_projector.{linear}.{param}"
    if key.startswith("model.vision_tower."):
        return None
    if key.startswith("model."):
        return "model.language_model." + key[len("model."):]
    if key.startswith("lm_head."):
        return key
    return None


def map_clip_key(key: str) -> str | None:
    """A CLIP folder's vision weight -> transformers 5 name (None: text tower, projections...)."""
    if key.startswith("vision_model."):
        return "model.vision_tower." + key[len("vision_model."):]
    if key.startswith(CLIP_VISION_PREFIXES):
        return "model.vision_tower." + key
    return None


# ---------------------------------------------------------------------------------------------
# The conversion

@dataclass
class _Planned:
    source: WeightSource
    src_key: str
    dst_key: str


@dataclass(frozen=True)
class _VisionTower:
    """Where the CLIP tower comes from: ``folder`` (config, image processor and, when the
    checkpoint has none, the weights) and ``what`` names that folder in messages."""

    folder: Path | None
    what: str
    weights_from: str


def _find_vision_tower(src: Path, cfg: dict, layout: SourceLayout, flag_dir: Path | None,
                       has_vision: bool) -> _VisionTower:
    """The checkpoint's own tower weights when it carries them; the config's ``mm_vision_tower``
    folder (absolute, or relative to the model directory) for layouts whose loader reads it; else
    ``--vision-tower``. A folder in the config and another on the command line are refused."""
    name = cfg.get("mm_vision_tower")
    cfg_dir = looked = None
    if layout.tower_in_model_dir and isinstance(name, str) and name:
        looked = Path(name) if Path(name).is_absolute() else src / name
        cfg_dir = looked if looked.is_dir() else None
    if cfg_dir is not None and flag_dir is not None and cfg_dir.resolve() != flag_dir.resolve():
        raise MedAlignError(f"{src / 'config.json'}: mm_vision_tower {name!r} is the folder {cfg_dir}, the tower "
                            f"{layout.title} loads; --vision-tower {flag_dir} names another one (drop --vision-tower)")
    if cfg_dir is not None:
        folder, what = cfg_dir, "mm_vision_tower"
    else:
        folder, what = flag_dir, "--vision-tower"
    if not has_vision and folder is None:
        where = f" and mm_vision_tower {name!r} is not a folder (looked for {looked})" if looked else ""
        raise MedAlignError(
            f"{src} holds no vision tower weights ({SRC_VISION_PREFIX}*){where}; pass --vision-tower DIR, a local "
            f"copy of {name or 'the CLIP vision tower'!r} (config.json + weights)")
    return _VisionTower(folder, what, "checkpoint" if has_vision else str(folder))


def _plan_tensors(weights: WeightSource, tower: _VisionTower, has_vision: bool,
                  layout: SourceLayout) -> tuple[list[_Planned], Counter]:
    """Every source tensor -> its new name, from the checkpoint and (if needed) the CLIP folder."""
    plan: list[_Planned] = []
    dropped: Counter = Counter()
    unknown: list[str] = []
    for k in weights.key_file:
        new = map_original_key(k)
        if new is None:
            if k.endswith(DROPPABLE_SUFFIXES):
                dropped[k.rsplit(".", 1)[-1]] += 1
            else:
                unknown.append(k)
            continue
        plan.append(_Planned(weights, k, new))
    if unknown:
        raise MedAlignError(f"{weights.folder}: {len(unknown)} tensor(s) with names {layout.title} does not use, "
                            f"e.g. {', '.join(sorted(unknown)[:5])}")
    if not has_vision:
        clip = WeightSource(tower.folder)
        for k in clip.key_file:
            new = map_clip_key(k)
            if new is not None:
                plan.append(_Planned(clip, k, new))
    return plan, dropped


def _check_plan(plan: list[_Planned], expected: dict[str, tuple[int, ...]], tied: bool, vocab_before: int,
                dropped: Counter) -> dict[str, _Planned]:
    """The plan keyed by target name, after checking it covers the target model exactly, with the
    target's shapes (the vocabulary rows of the embedding and lm_head may grow)."""
    planned: dict[str, _Planned] = {}
    for p in plan:
        if p.dst_key not in expected:
            if p.src_key.endswith(DROPPABLE_SUFFIXES):
                dropped[p.src_key.rsplit(".", 1)[-1]] += 1
                continue
            raise MedAlignError(f"{p.source.folder}: tensor {p.src_key} maps to {p.dst_key}, "
                                "which the target model does not have")
        planned[p.dst_key] = p
    if tied:  # the lm_head is the embedding: never written separately
        expected.pop("lm_head.weight", None)
        planned.pop("lm_head.weight", None)
    missing = sorted(set(expected) - set(planned))
    if missing:
        raise MedAlignError(f"{len(missing)} weight(s) of the target model have no source, e.g. "
                            f"{', '.join(missing[:5])}")
    for k, p in planned.items():
        shape = p.source.shapes[p.src_key]
        want = expected[k]
        ok = shape == want or (k in RESIZABLE and shape[1:] == want[1:] and shape[0] == vocab_before)
        if not ok:
            raise MedAlignError(f"{p.source.folder}: {p.src_key} has shape {list(shape)}, the target "
                                f"{k} needs {list(want)} (config and weights disagree)")
    return planned


def _tokenizer_with_image_token(src: Path):
    """The source tokenizer plus ``<image>`` as an added special token (id ``len(tokenizer)``
    unless the tokenizer already has it); returns (tokenizer, image token id)."""
    tokenizer = _load_tokenizer(src)
    if IMAGE_TOKEN not in tokenizer.get_vocab():
        from tokenizers import AddedToken
        tokenizer.add_tokens([AddedToken(IMAGE_TOKEN, special=True, normalized=False)], special_tokens=True)
    return tokenizer, tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)


def convert_original(layout: SourceLayout, src: str | Path, dst: str | Path, vision_tower: str | Path | None = None,
                     dtype: str = "keep", max_shard_bytes: int = 5_000_000_000,
                     overwrite: bool = False) -> ModelConversionReport:
    """Convert the ``layout`` checkpoint folder ``src`` into a ``LlavaForConditionalGeneration`` folder ``dst``.

    ``vision_tower``: a local CLIP folder (HF ``CLIPModel`` or ``CLIPVisionModel``); required when
    the checkpoint holds no vision tower weights and the layout's config names no tower folder
    (:func:`_find_vision_tower`), and then the source of them. When the checkpoint has its own
    tower, a folder only supplies the config and the image processor (without one, the tower's
    config is inferred from the tensor shapes). ``dtype``: ``keep`` (the dtype of the source
    embedding) or float32/float16/bfloat16. Nothing is written until every name and shape is checked.
    """
    import transformers
    from transformers import CLIPImageProcessor, LlavaConfig, LlavaForConditionalGeneration

    src, dst = Path(src), Path(dst)
    if not src.is_dir():
        raise MedAlignError(f"source checkpoint folder not found: {src}")
    if dtype not in DTYPES:
        raise MedAlignError(f"unknown dtype {dtype!r}; choose one of: {', '.join(DTYPES)}")
    if dst.exists() and any(dst.iterdir()) and not overwrite:
        raise MedAlignError(f"output folder {dst} is not empty; choose a new folder or pass --overwrite")
    vdir = Path(vision_tower) if vision_tower is not None else None
    if vdir is not None and not vdir.is_dir():
        raise MedAlignError(f"--vision-tower {vdir} is not a folder")

    cfg = _read_source_config(src, layout)
    weights = WeightSource(src)
    has_vision = any(k.startswith(SRC_VISION_PREFIX) for k in weights.key_file)
    tower = _find_vision_tower(src, cfg, layout, vdir, has_vision)
    vision_config = (_vision_config_from_dir(tower.folder, tower.what) if tower.folder is not None
                     else _vision_config_from_shapes(weights.shapes))
    if vision_config.hidden_size != cfg["mm_hidden_size"]:
        raise MedAlignError(f"vision tower hidden size {vision_config.hidden_size} != mm_hidden_size "
                            f"{cfg['mm_hidden_size']} in {src / 'config.json'}")
    plan, dropped = _plan_tensors(weights, tower, has_vision, layout)

    # Tokenizer: the source's, plus <image> (saved over the copied files at the end).
    tokenizer, image_token_id = _tokenizer_with_image_token(src)
    embed_key = "model.embed_tokens.weight"
    if embed_key not in weights.shapes:
        raise MedAlignError(f"{src}: no {embed_key}")
    vocab_before = weights.shapes[embed_key][0]
    vocab_after = max(vocab_before, len(tokenizer), image_token_id + 1)  # == vocab_before on a spare row
    target = DTYPES[dtype] or weights.dtypes[embed_key]

    text_kwargs = {k: cfg[k] for k in TEXT_CONFIG_KEYS + layout.extra_text_keys if k in cfg}
    text_kwargs["vocab_size"] = vocab_after
    text_config = getattr(transformers, layout.text_config_class)(**text_kwargs)
    strategy = SELECT_FEATURE[cfg.get("mm_vision_select_feature", "patch")]
    grid = vision_config.image_size // vision_config.patch_size
    config = LlavaConfig(
        vision_config=vision_config, text_config=text_config, image_token_id=image_token_id,
        vision_feature_layer=cfg.get("mm_vision_select_layer", -2), vision_feature_select_strategy=strategy,
        projector_hidden_act="gelu", multimodal_projector_bias=True,
        image_seq_length=grid * grid + (1 if strategy == "full" else 0),
        tie_word_embeddings=text_config.tie_word_embeddings, dtype=target,
        image_aspect_ratio=cfg.get("image_aspect_ratio", "square"),
        converted_from={"format": layout.name, "model_type": cfg["model_type"],
                        "mm_vision_tower": cfg.get("mm_vision_tower"), "vision_weights": tower.weights_from,
                        "vocab_size_before": vocab_before},
    )
    config.architectures = ["LlavaForConditionalGeneration"]

    # Check the plan against the target model's own names and shapes (meta device: no memory).
    with torch.device("meta"):
        expected = {k: tuple(v.shape) for k, v in LlavaForConditionalGeneration(config).state_dict().items()}
    planned = _check_plan(plan, expected, config.tie_word_embeddings, vocab_before, dropped)

    # Everything is checked: only now is the output folder touched.
    dst.mkdir(parents=True, exist_ok=True)
    for stale in [*dst.glob("model*.safetensors"), dst / "model.safetensors.index.json"]:
        stale.unlink(missing_ok=True)  # --overwrite: shards of an earlier conversion must not linger
    for name in COPY_FILES:
        if (src / name).is_file():
            shutil.copy2(src / name, dst / name)
    files = _write_shards(planned, expected, target, vocab_after, max_shard_bytes, dst)

    config.save_pretrained(str(dst))
    tokenizer.save_pretrained(str(dst))
    if tower.folder is not None and (tower.folder / "preprocessor_config.json").is_file():
        processor = CLIPImageProcessor.from_pretrained(str(tower.folder))
    else:
        s = vision_config.image_size
        processor = CLIPImageProcessor(size={"shortest_edge": s}, crop_size={"height": s, "width": s})
    processor.image_aspect_ratio = config.image_aspect_ratio
    processor.save_pretrained(str(dst))
    if layout.template:
        (dst / "medalign.json").write_text(json.dumps({"template": layout.template}, indent=2) + "\n", encoding="utf-8")
    return ModelConversionReport(out_dir=dst, image_token_id=image_token_id, vocab_size_before=vocab_before,
                                 vocab_size_after=vocab_after, vision_weights_from=tower.weights_from,
                                 dtype=str(target).replace("torch.", ""), tensors_written=len(planned),
                                 files=files, dropped=dropped, template=layout.template)


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
        for name in COPY_FILES:
            if (src / name).is_file():
                shutil.copy2(src / name, Path(tmp) / name)
        for folder in (tmp, str(src)):
            try:
                return AutoTokenizer.from_pretrained(folder)
            except Exception as e:  # noqa: BLE001 - report any tokenizer loading failure cleanly
                errors.append(f"{type(e).__name__}: {e}")
    raise MedAlignError(f"{src}: cannot load the tokenizer ({errors[-1]})")


def _resize_rows(t: torch.Tensor, rows: int) -> torch.Tensor:
    """Append rows equal to the mean of the existing rows (computed in fp32)."""
    extra = rows - t.shape[0]
    if extra <= 0:
        return t
    mean = t.float().mean(dim=0, keepdim=True).to(t.dtype)
    return torch.cat([t, mean.expand(extra, -1)], dim=0)


def _write_shards(planned: dict[str, _Planned], expected: dict[str, tuple[int, ...]], target: torch.dtype,
                  vocab_after: int, max_shard_bytes: int, dst: Path) -> list[str]:
    """Stream tensors source file by source file into safetensors shards of at most ``max_shard_bytes``."""
    from safetensors.torch import save_file

    # Shard assignment in source order, so every source file is read once.
    order: list[tuple[WeightSource, Path, list[_Planned]]] = []
    groups: dict[tuple[int, Path], list[_Planned]] = {}
    for p in planned.values():
        key = (id(p.source), p.source.key_file[p.src_key])
        if key not in groups:
            groups[key] = []
            order.append((p.source, key[1], groups[key]))
        groups[key].append(p)
    itemsize = torch.empty((), dtype=target).element_size()
    shards: list[list[str]] = [[]]
    size = 0
    for _, _, group in order:
        for p in group:
            nbytes = itemsize * _numel(expected[p.dst_key])
            if shards[-1] and size + nbytes > max_shard_bytes:
                shards.append([])
                size = 0
            shards[-1].append(p.dst_key)
            size += nbytes
    n = len(shards)
    names = ["model.safetensors"] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
    shard_of = {k: i for i, keys in enumerate(shards) for k in keys}

    buffers: list[dict[str, torch.Tensor]] = [{} for _ in range(n)]
    remaining = [len(keys) for keys in shards]
    for source, f, group in order:
        by_src = {p.src_key: p for p in group}
        for src_key, t in source.tensors(f, set(by_src)):
            p = by_src[src_key]
            t = t.to(target) if t.is_floating_point() else t
            if p.dst_key in RESIZABLE:
                t = _resize_rows(t, vocab_after)
            i = shard_of[p.dst_key]
            buffers[i][p.dst_key] = t.contiguous().clone()
            remaining[i] -= 1
            if remaining[i] == 0:
                save_file(buffers[i], str(dst / names[i]), metadata={"format": "pt"})
                buffers[i] = {}
    if any(remaining):
        raise MedAlignError("internal error: some planned tensors were not found while writing")
    if n > 1:
        total = sum(itemsize * _numel(expected[k]) for k in shard_of)
        index = {"metadata": {"total_size": total}, "weight_map": {k: names[i] for k, i in sorted(shard_of.items())}}
        (dst / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")
    return names


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n

