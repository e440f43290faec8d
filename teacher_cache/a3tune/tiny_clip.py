"""A tiny random-weight BiomedCLIP directory with a real (tiny) BERT text tower, in the real format.

:func:`save_tiny_biomedclip_clip` writes what a user assembles for ``--biomedclip``: BiomedCLIP's
open_clip directory (``open_clip_config.json``, ``open_clip_pytorch_model.bin`` with ``visual.*``
from :func:`teacher_cache.tiny.save_random_biomedclip`'s tiny timm trunk and ``text.*`` of a real
``HFTextEncoder``) plus the text model's files as the BiomedBERT hub repository has them, a BERT
``config.json`` and a ``vocab.txt``, in ``DIR/BiomedNLP-BiomedBERT-base-uncased-abstract/`` (or in
``DIR`` itself with ``subdir=False``). The vocabulary is the BERT specials, a few whole words, single
characters and their ``##`` continuations, so any lower-case English text tokenises.
"""

from __future__ import annotations

import copy
import json
import string
from pathlib import Path

import torch

from teacher_cache.tiny import BIOMEDCLIP_TEXT_CFG, TINY_BIOMEDCLIP_MODEL_CFG, TINY_BIOMEDCLIP_PREPROCESS, \
    _perturb, save_random_biomedclip

#: the text tower's sizes: 2 layers, width 32, 2 heads; 64 positions (the tiny context is 32 tokens)
TINY_BERT_CONFIG = {"architectures": ["BertForMaskedLM"], "model_type": "bert", "hidden_size": 32,
                    "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 64,
                    "max_position_embeddings": 64, "type_vocab_size": 2, "hidden_act": "gelu",
                    "hidden_dropout_prob": 0.1, "attention_probs_dropout_prob": 0.1, "layer_norm_eps": 1e-12,
                    "pad_token_id": 0, "initializer_range": 0.02}
TINY_CONTEXT_LENGTH = 32
TINY_CLIP_MODEL_CFG = {**copy.deepcopy(TINY_BIOMEDCLIP_MODEL_CFG),
                       "text_cfg": {**BIOMEDCLIP_TEXT_CFG, "context_length": TINY_CONTEXT_LENGTH}}
TEXT_SUBDIR = BIOMEDCLIP_TEXT_CFG["hf_model_name"].split("/")[-1]


#: whole words of the query templates and common questions, so tiny-context texts are not all truncated alike
_WORDS = ("medical image imgaing of and lungs chest abdomen ct head brain pathology x ray is there a the in this "
          "what are lesion seen")


def tiny_vocab() -> list[str]:
    chars = list(string.ascii_lowercase + string.digits + string.punctuation)
    return ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *_WORDS.split(), *chars, *(f"##{c}" for c in chars)]


def _text_state(text_dir: Path, embed_dim: int, seed: int) -> dict[str, torch.Tensor]:
    from open_clip.hf_model import HFTextEncoder

    from teacher_cache.a3tune.biomedclip import hub_offline

    torch.manual_seed(seed + 7)
    cfg = TINY_CLIP_MODEL_CFG["text_cfg"]
    with hub_offline():
        text = HFTextEncoder(str(text_dir), output_dim=embed_dim, proj_type=cfg["hf_proj_type"],
                             pooler_type=cfg["hf_pooler_type"], pretrained=False)
    _perturb(text, seed + 7)
    return {f"text.{k}": v.clone() for k, v in text.state_dict().items()}


def save_tiny_biomedclip_clip(directory: str | Path, seed: int = 0, subdir: bool = True) -> Path:
    """Write the tiny BiomedCLIP directory (module docstring); returns it."""
    directory = Path(directory)
    text_dir = directory / TEXT_SUBDIR if subdir else directory
    text_dir.mkdir(parents=True, exist_ok=True)
    vocab = tiny_vocab()
    (text_dir / "vocab.txt").write_text("\n".join(vocab) + "\n", encoding="utf-8")
    (text_dir / "config.json").write_text(json.dumps({**TINY_BERT_CONFIG, "vocab_size": len(vocab)}, indent=2),
                                          encoding="utf-8")
    state = _text_state(text_dir, int(TINY_CLIP_MODEL_CFG["embed_dim"]), seed)
    return save_random_biomedclip(directory, TINY_CLIP_MODEL_CFG, TINY_BIOMEDCLIP_PREPROCESS, seed, text_state=state)


__all__ = ["TINY_BERT_CONFIG", "TINY_CLIP_MODEL_CFG", "TINY_CONTEXT_LENGTH", "save_tiny_biomedclip_clip",
           "tiny_vocab"]
