"""BiomedCLIP's image *and* text towers from a local open_clip directory, for A3Tune's mask ranking.

The image tower is the expert loader's (:func:`teacher_cache.experts.load_expert`, strict, the
``visual.*`` keys); its output is BiomedCLIP's ``encode_image`` (timm trunk, CLS token, linear
projection). The text tower is open_clip's ``HFTextEncoder`` built exactly as open_clip builds it
(``AutoConfig`` + ``AutoModel.from_config(..., add_pooling_layer=False)``, the config's pooler and
projection), but from a local directory instead of the config's ``hf_model_name``, and filled
strictly from the checkpoint's ``text.*`` keys. The tokenizer is open_clip's ``HFTokenizer`` (the
config's ``context_length``, 256 for BiomedCLIP) over the same local directory.

Where the BERT files live: BiomedCLIP's hub snapshot carries only ``open_clip_config.json`` and
the weights; the text tower's ``config.json`` and tokenizer (``vocab.txt``, or ``tokenizer.json``)
are those of ``microsoft/BiomedNLP-BiomedBERT-base-uncased-abstract``. Put them in the BiomedCLIP
directory itself or in a subdirectory named after that repository's last part
(``DIR/BiomedNLP-BiomedBERT-base-uncased-abstract/``); the subdirectory wins. Loading never reaches
a hub: only existing local directories are passed to transformers, the tokenizer with
``local_files_only=True``, and huggingface_hub is put in offline mode while loading.

Crop embedding (the authors' ``retrieve_relevant_crop_biomed_topk``): each crop (uint8 H x W x 3,
already masked and cut by :func:`teacher_cache.a3tune.geometry.crop_for_clip`) becomes a PIL image
as it is (so the authors' BGR array stays BGR-as-RGB in ``stretch`` geometry), then BiomedCLIP's own
evaluation transform (bicubic resize of the short side to 224, centre crop: ``Preprocess`` with
geometry ``crop``), then ``encode_image``, then L2 normalisation. Texts: tokenised, ``encode_text``,
L2-normalised (their mean over one description is the description itself).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from shared.errors import MedAlignError
from shared.images import Preprocess, sha256_file

#: a text tower directory needs this and one of the tokenizer files
TEXT_CONFIG = "config.json"
TOKENIZER_FILES = ("vocab.txt", "tokenizer.json")
_TOKENIZER_EXTRAS = ("tokenizer_config.json", "special_tokens_map.json")
#: the checkpoint key open_clip drops for transformers >= 4.31 (position ids became a non-persistent buffer)
_POSITION_IDS = "transformer.embeddings.position_ids"


@contextlib.contextmanager
def hub_offline():
    """huggingface_hub / transformers in offline mode for the block (env and the parsed constant)."""
    import huggingface_hub.constants as hc

    saved_env = {k: os.environ.get(k) for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}
    saved = hc.HF_HUB_OFFLINE
    os.environ.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    hc.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        hc.HF_HUB_OFFLINE = saved
        for k, v in saved_env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _dir_files(directory: Path):
    from teacher_cache.experts.checkpoint import _open_clip_dir_files, _read_dir_config

    cfg_path, weights_path = _open_clip_dir_files(directory)
    model_cfg, pre = _read_dir_config(cfg_path)
    return cfg_path, weights_path, model_cfg, pre


def text_tower_dir(directory: str | Path, text_cfg: dict) -> Path:
    """Where the BERT config and tokenizer are (module docstring); a MedAlignError naming what to put where."""
    directory = Path(directory)
    name = str(text_cfg.get("hf_model_name") or "")
    candidates = ([directory / name.rstrip("/").split("/")[-1]] if name else []) + [directory]
    for cand in candidates:
        if (cand / TEXT_CONFIG).is_file() and any((cand / t).is_file() for t in TOKENIZER_FILES):
            return cand
    raise MedAlignError(
        f"--biomedclip {directory}: no text tower files; put the BERT {TEXT_CONFIG} and its tokenizer "
        f"({' or '.join(TOKENIZER_FILES)}) of {name or 'the text model'} into {candidates[0]} (nothing is "
        "downloaded)")


def _used_files(directory: Path) -> list[Path]:
    cfg_path, weights_path, model_cfg, _ = _dir_files(directory)
    tdir = text_tower_dir(directory, model_cfg.get("text_cfg") or {})
    text = [tdir / n for n in (TEXT_CONFIG, *TOKENIZER_FILES, *_TOKENIZER_EXTRAS) if (tdir / n).is_file()]
    return [cfg_path, weights_path, *text]


def biomedclip_sha256(directory: str | Path) -> str:
    """The directory's digest: sha256 over ``relative path NUL file sha256 LF`` of every file the load reads
    (the open_clip config, the weights, the text config and tokenizer files), in that order."""
    directory = Path(directory)
    h = hashlib.sha256()
    for path in _used_files(directory):
        h.update(f"{path.relative_to(directory).as_posix()}\0{sha256_file(path)}\n".encode())
    return h.hexdigest()


def _load_strict(module: nn.Module, state: dict, what: str) -> None:
    expected = module.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    bad = [k for k in set(expected) & set(state) if tuple(expected[k].shape) != tuple(state[k].shape)]
    if missing or unexpected or bad:
        raise MedAlignError(f"{what}: the text tower does not match the checkpoint: missing {missing[:4]}, "
                            f"unexpected {unexpected[:4]}, shape mismatches {sorted(bad)[:4]} (keys after 'text.')")
    module.load_state_dict(state, strict=True, assign=True)


@dataclass
class BiomedClip:
    """A loaded BiomedCLIP: ``visual`` (encode_image), ``text`` (HFTextEncoder, None when not loaded),
    ``tokenizer``, ``preprocess`` (the crop transform), ``embed_dim``, ``sha256`` (:func:`biomedclip_sha256`)."""

    visual: nn.Module
    text: nn.Module | None
    tokenizer: object | None
    preprocess: Preprocess
    device: torch.device
    embed_dim: int
    sha256: str
    context_length: int

    @torch.inference_mode()
    def encode_crops(self, crops: list[np.ndarray], batch_size: int = 64) -> np.ndarray:
        """(M, D) float32 L2-normalised image features of uint8 H x W x 3 crops (module docstring)."""
        from PIL import Image

        if not crops:
            return np.zeros((0, self.embed_dim), np.float32)
        out = []
        for i in range(0, len(crops), batch_size):
            pix = np.stack([self.preprocess(Image.fromarray(np.ascontiguousarray(c, dtype=np.uint8)))
                            for c in crops[i:i + batch_size]])
            feats = self.visual(torch.from_numpy(pix).to(self.device)).float()
            out.append(torch.nn.functional.normalize(feats, dim=-1).cpu().numpy())
        return np.concatenate(out).astype(np.float32, copy=False)

    @torch.inference_mode()
    def encode_texts(self, texts: list[str], batch_size: int = 64) -> np.ndarray:
        """(T, D) float32 L2-normalised text features."""
        if self.text is None:
            raise RuntimeError("this BiomedClip was loaded without its text tower")
        out = []
        for i in range(0, len(texts), batch_size):
            ids = self.tokenizer(list(texts[i:i + batch_size])).to(self.device)
            feats = self.text(ids).float()
            out.append(torch.nn.functional.normalize(feats, dim=-1).cpu().numpy())
        return np.concatenate(out).astype(np.float32, copy=False) if out else np.zeros((0, self.embed_dim), np.float32)

    def to_json(self) -> dict:
        pp = self.preprocess.to_json()
        return {"name": "biomedclip", "dir_sha256": self.sha256, "embed_dim": self.embed_dim,
                "context_length": self.context_length, "preprocessing": pp}


def _build_text(directory: Path, model_cfg: dict, weights_path: Path, device: torch.device):
    from open_clip.hf_model import HFTextEncoder
    from open_clip.tokenizer import HFTokenizer

    from teacher_cache.experts.checkpoint import _torch_load

    text_cfg = dict(model_cfg.get("text_cfg") or {})
    if not text_cfg.get("hf_model_name"):
        raise MedAlignError(f"--biomedclip {directory}: open_clip_config.json's text_cfg has no hf_model_name; "
                            "not a BiomedCLIP-style (HF text tower) model")
    tdir = text_tower_dir(directory, text_cfg)
    with hub_offline():
        with torch.device("meta"):
            text = HFTextEncoder(str(tdir), output_dim=int(model_cfg["embed_dim"]),
                                 proj_type=text_cfg.get("hf_proj_type"), pooler_type=text_cfg.get("hf_pooler_type"),
                                 pretrained=False)
        context = int(text_cfg.get("context_length", 256))
        tokenizer = HFTokenizer(str(tdir), context_length=context, local_files_only=True,
                                **(text_cfg.get("tokenizer_kwargs") or {}))
    obj = _torch_load(weights_path)
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    state = {}
    for k, v in obj.items():
        k = k[len("module."):] if k.startswith("module.") else k
        if k.startswith("text."):
            state[k[len("text."):]] = v.to(torch.float32 if v.is_floating_point() else v.dtype, copy=True)
    if _POSITION_IDS in state and _POSITION_IDS not in text.state_dict():
        del state[_POSITION_IDS]
    _load_strict(text, state, str(weights_path))
    # non-persistent buffers (position ids, token type ids) are not in any state dict: rebuild them off meta
    for name, buf in list(text.named_buffers()):
        if buf.is_meta:
            mod_name, _, attr = name.rpartition(".")
            mod = text.get_submodule(mod_name)
            size = buf.shape
            if attr == "position_ids":
                new = torch.arange(size[-1]).expand(size).clone()
            else:
                new = torch.zeros(size, dtype=buf.dtype)
            mod.register_buffer(attr, new, persistent=False)
    text.eval().requires_grad_(False).to(device)
    return text, tokenizer, context


def load_biomedclip(directory: str | Path, device: str = "cpu", *, with_text: bool = True) -> BiomedClip:
    """BiomedCLIP from its local open_clip directory, float32 (module docstring); ``with_text=False`` skips
    the text tower (the image part of a build needs only the image tower)."""
    from shared.runtime import resolve_device
    from teacher_cache.experts import load_expert

    directory = Path(str(directory).removeprefix("local-dir:")).expanduser()
    dev = resolve_device(str(device), "--device")
    _, weights_path, model_cfg, _ = _dir_files(directory)
    sha = biomedclip_sha256(directory)  # also checks the text files are there, before any weight is read
    expert = load_expert("biomedclip", directory, device=dev, dtype=torch.float32, geometry="crop")
    text = tokenizer = None
    context = int((model_cfg.get("text_cfg") or {}).get("context_length", 256))
    if with_text:
        text, tokenizer, context = _build_text(directory, model_cfg, weights_path, dev)
    return BiomedClip(visual=expert.visual, text=text, tokenizer=tokenizer, preprocess=expert.preprocess, device=dev,
                      embed_dim=int(model_cfg["embed_dim"]), sha256=sha, context_length=context)


__all__ = ["BiomedClip", "biomedclip_sha256", "hub_offline", "load_biomedclip", "text_tower_dir"]
