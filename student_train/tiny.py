"""Tiny random-weight LLaVA students for tests and benchmarks, built entirely offline.

``save_tiny_llava(out_dir, backbone)`` writes a directory that loads exactly like a real
HF-format LLaVA student:

* ``config.json`` + ``model.safetensors``: a ``LlavaForConditionalGeneration`` with a tiny CLIP
  vision tower and a Llama / Mistral / Qwen2 language model (random weights, fixed seed);
* a ``PreTrainedTokenizerFast`` (byte-level BPE trained in-process on a small fixed corpus) with
  ``<s>``, ``</s>``, ``<pad>``, ``<unk>`` and an ``<image>`` special token whose id is the config's
  ``image_token_id``; like the real ones, the llama/mistral tokenizers prepend ``<s>`` by default
  (``add_special_tokens=True``) and the qwen2 one does not;
* a ``CLIPImageProcessor`` whose resize/crop size is ``image_size``;
* ``medalign.json`` ``{"template": ...}`` naming the prompt template (optional for real models).

The grid side is ``G = image_size // patch_size`` and the student has ``N = G * G`` image tokens
(vision_feature_select_strategy ``default`` drops CLS; vision_feature_layer ``-2``).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from shared.errors import MedAlignError

BACKBONES = ("llama", "mistral", "qwen2")

#: Default prompt template per backbone, written to ``medalign.json``.
DEFAULT_TEMPLATES = {"llama": "vicuna_v1", "mistral": "mistral_instruct", "qwen2": "huatuo"}

SPECIAL_TOKENS = ("<unk>", "<s>", "</s>", "<pad>", "<image>")
IMAGE_TOKEN = "<image>"

# A small fixed corpus: prompt-template words, medical VQA vocabulary, digits and punctuation,
# so that typical test prompts tokenise into few tokens while any text stays encodable (byte level).
_CORPUS = [
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions.",
    "USER: ASSISTANT: [INST] [/INST] <|im_start|> <|im_end|> system user assistant",
    "Is there evidence of a pneumothorax? yes no. Is the liver normal? Where is the lesion located?",
    "What organ is shown in this image? The chest x-ray shows the heart and the lungs.",
    "What imaging modality was used? CT MRI ultrasound x-ray. Is this an axial plane image?",
    "Are the kidneys enlarged? Is there a mass in the left upper lobe? right lower lobe brain",
    "abdomen pelvis fracture effusion edema cardiomegaly opacity nodule contrast T1 T2 FLAIR",
    "0 1 2 3 4 5 6 7 8 9 10 100 . , ? ! : ; ' \" ( ) - / a b c d e f g h i j k l m n o p q r s t u v w x y z",
    "A B C D E F G H I J K L M N O P Q R S T U V W X Y Z the of and in is are was were with to",
]


def _build_tokenizer(vocab_size: int, add_bos: bool = True):
    """A byte-level BPE tokenizer trained on :data:`_CORPUS`, wrapped for transformers.

    With ``add_bos`` the tokenizer prepends ``<s>`` when ``add_special_tokens=True`` (as the
    Llama/Mistral tokenizers do); Qwen2's tokenizer adds nothing, and neither adds an EOS.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_CORPUS * 4, trainer=trainer)
    if add_bos:
        bos_id = tok.token_to_id("<s>")
        tok.post_processor = processors.TemplateProcessing(
            single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", bos_id)]
        )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
        additional_special_tokens=[IMAGE_TOKEN],
        model_max_length=4096,
        padding_side="right",
    )
    return fast


def qwen2_tokenizer(vocab_size: int = 300):
    """A tiny Qwen2-style tokenizer: transformers' ``Qwen2Tokenizer`` (Qwen2's pre-tokenizer regex,
    byte-level BPE, no BOS, ``<|endoftext|>`` as EOS, pad and unk) over a BPE of ``vocab_size``
    regular tokens trained on :data:`_CORPUS`, with ``<|endoftext|>``, ``<|im_start|>`` and
    ``<|im_end|>`` as added special tokens after them (ids ``vocab_size``.., as in Qwen2 releases).
    """
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers, trainers
    from transformers import Qwen2Tokenizer
    from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    bpe.train_from_iterator(_CORPUS * 4, trainer=trainers.BpeTrainer(
        vocab_size=vocab_size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    model = json.loads(bpe.to_str())["model"]
    return Qwen2Tokenizer(vocab=model["vocab"], merges=[tuple(m) for m in model["merges"]],
                          additional_special_tokens=["<|im_start|>", "<|im_end|>"])


def tiny_llava_config(
    backbone: str = "llama",
    *,
    vocab_size: int,
    image_token_id: int,
    pad_token_id: int,
    bos_token_id: int,
    eos_token_id: int,
    image_size: int = 32,
    patch_size: int = 8,
    hidden: int = 64,
    layers: int = 4,
    heads: int = 4,
    kv_heads: int = 2,
    intermediate: int | None = None,
    vision_hidden: int = 32,
    vision_layers: int = 2,
    vision_heads: int = 2,
    max_positions: int = 4096,
):
    """The ``LlavaConfig`` of a tiny student.

    Args:
        backbone: ``"llama"``, ``"mistral"`` or ``"qwen2"``.
        vocab_size, image_token_id, pad_token_id, bos_token_id, eos_token_id: from the tokenizer.
        image_size, patch_size: vision tower geometry; ``N = (image_size // patch_size) ** 2``.
        hidden, layers, heads, kv_heads, intermediate, max_positions: language-model shape.
        vision_hidden, vision_layers, vision_heads: CLIP vision tower shape.
    """
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, MistralConfig, Qwen2Config

    if backbone not in BACKBONES:
        raise MedAlignError(f"unknown backbone {backbone!r}; valid: {', '.join(BACKBONES)}")
    if image_size % patch_size:
        raise MedAlignError(f"image_size {image_size} is not a multiple of patch_size {patch_size}")
    if vision_layers < 2:
        raise MedAlignError("vision_layers must be >= 2 (vision_feature_layer is -2)")
    text_kwargs = dict(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=intermediate or 2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        max_position_embeddings=max_positions,
        pad_token_id=pad_token_id,
        bos_token_id=bos_token_id,
        eos_token_id=eos_token_id,
        tie_word_embeddings=False,
    )
    if backbone == "llama":
        text = LlamaConfig(**text_kwargs)
    elif backbone == "mistral":
        text = MistralConfig(sliding_window=None, **text_kwargs)
    else:
        text = Qwen2Config(use_sliding_window=False, **text_kwargs)
    vision = CLIPVisionConfig(
        hidden_size=vision_hidden,
        intermediate_size=2 * vision_hidden,
        num_hidden_layers=vision_layers,
        num_attention_heads=vision_heads,
        image_size=image_size,
        patch_size=patch_size,
        projection_dim=vision_hidden,
    )
    grid = image_size // patch_size
    return LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_index=image_token_id,
        image_seq_length=grid * grid,
        vision_feature_select_strategy="default",
        vision_feature_layer=-2,
        projector_hidden_act="gelu",
        tie_word_embeddings=False,
    )


def save_tiny_llava(
    out_dir: str | Path,
    backbone: str = "llama",
    *,
    vocab_size: int = 400,
    template: str | None = None,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    **shape,
) -> Path:
    """Build and save a tiny random-weight LLaVA student; returns ``Path(out_dir)``.

    Args:
        out_dir: directory to write (created; existing files are overwritten).
        backbone: ``"llama"``, ``"mistral"`` or ``"qwen2"``.
        vocab_size: BPE vocabulary target size (the 5 special tokens included).
        template: prompt template name for ``medalign.json`` (default per backbone:
            :data:`DEFAULT_TEMPLATES`).
        seed: weight initialisation seed (same seed -> identical weights).
        dtype: dtype of the saved weights.
        **shape: the model's shape, as keywords of :func:`tiny_llava_config` (``image_size=32``,
            ``patch_size=8``, ``hidden=64``, ``layers=4``, ``heads=4``, ``kv_heads=2``, ...).
    """
    from transformers import CLIPImageProcessor, LlavaForConditionalGeneration

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = _build_tokenizer(vocab_size, add_bos=backbone != "qwen2")
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    config = tiny_llava_config(
        backbone,
        vocab_size=len(tokenizer),
        image_token_id=ids[IMAGE_TOKEN],
        pad_token_id=ids["<pad>"],
        bos_token_id=ids["<s>"],
        eos_token_id=ids["</s>"],
        **shape,
    )
    image_size = config.vision_config.image_size
    config.pad_token_id = ids["<pad>"]
    fork = torch.random.fork_rng(devices=[])
    with fork:
        torch.manual_seed(seed)
        model = LlavaForConditionalGeneration(config)
        # Random init of a tiny model is std 0.02: make the logits/attention less degenerate so
        # that tests comparing attention patterns see non-uniform probabilities.
        with torch.no_grad():
            for name, p in model.named_parameters():
                if p.dim() >= 2 and "embed" not in name:
                    p.normal_(0.0, 1.0 / p.shape[-1] ** 0.5)
    model = model.to(dtype)
    model.generation_config.pad_token_id = ids["<pad>"]
    model.generation_config.bos_token_id = ids["<s>"]
    model.generation_config.eos_token_id = ids["</s>"]
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    CLIPImageProcessor(
        size={"shortest_edge": image_size},
        crop_size={"height": image_size, "width": image_size},
        do_center_crop=True,
        do_resize=True,
        do_normalize=True,
        do_convert_rgb=True,
    ).save_pretrained(out)
    (out / "medalign.json").write_text(
        json.dumps({"template": template or DEFAULT_TEMPLATES[backbone]}, indent=2) + "\n"
    )
    return out
