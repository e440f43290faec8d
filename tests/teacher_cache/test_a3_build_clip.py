"""BiomedCLIP's two towers from a local directory (never a hub), the crop embedding, the top-k selection."""

from __future__ import annotations

import socket

import numpy as np
import pytest
import torch
from PIL import Image

from shared.errors import MedAlignError
from teacher_cache.a3tune.biomedclip import biomedclip_sha256, load_biomedclip
from teacher_cache.a3tune.select import top_k
from teacher_cache.a3tune.tiny_clip import TINY_CONTEXT_LENGTH, save_tiny_biomedclip_clip


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    return save_tiny_biomedclip_clip(tmp_path_factory.mktemp("clip") / "biomedclip")


@pytest.fixture()
def no_network(monkeypatch):
    """Every hub entry point and every socket connection raises."""
    import huggingface_hub
    import huggingface_hub.file_download as fd
    import transformers.utils.hub as th

    def refuse(*a, **k):
        raise AssertionError(f"network/hub access attempted: {a[:1]}")

    for mod, name in [(huggingface_hub, "hf_hub_download"), (fd, "hf_hub_download"), (th, "hf_hub_download"),
                      (huggingface_hub, "snapshot_download"), (th, "snapshot_download"),
                      (huggingface_hub.HfApi, "model_info"), (socket.socket, "connect"),
                      (socket, "create_connection"), (socket, "getaddrinfo")]:
        monkeypatch.setattr(mod, name, refuse)


def test_loads_offline_root_and_subdir(clip_dir, tmp_path, no_network):
    model = load_biomedclip(clip_dir)
    assert model.text is not None and model.embed_dim == 32 and model.context_length == TINY_CONTEXT_LENGTH
    ids = model.tokenizer(["Medical image of CHEST and lungs. Is there a lesion?"])
    assert ids.shape == (1, TINY_CONTEXT_LENGTH) and int(ids[0, 0]) == 2  # [CLS] first, from our vocab.txt
    flat = save_tiny_biomedclip_clip(tmp_path / "flat", subdir=False)  # BERT files in the directory itself
    a = load_biomedclip(flat).encode_texts(["is there a lesion"])
    b = model.encode_texts(["is there a lesion"])
    np.testing.assert_allclose(a, b, atol=1e-6)  # same seed, same weights: the location does not matter
    assert biomedclip_sha256(clip_dir) != biomedclip_sha256(flat)  # the digest names the files read


def test_text_tower_against_plain_bert(clip_dir):
    """encode_text = mlp(proj) of BERT's CLS hidden state: recomputed with transformers directly."""
    from transformers import BertModel, BertTokenizer

    model = load_biomedclip(clip_dir)
    tdir = clip_dir / "BiomedNLP-BiomedBERT-base-uncased-abstract"
    from transformers import BertConfig
    cfg = BertConfig.from_pretrained(tdir)
    bert = BertModel(cfg, add_pooling_layer=False).eval()
    state = torch.load(clip_dir / "open_clip_pytorch_model.bin", weights_only=True)
    bert.load_state_dict({k[len("text.transformer."):]: v for k, v in state.items()
                          if k.startswith("text.transformer.")}, strict=True)
    tok = BertTokenizer(str(tdir / "vocab.txt"))
    text = "Medical imgaing of abdomen CT.Is this an MRI?"
    enc = tok([text], padding="max_length", max_length=TINY_CONTEXT_LENGTH, truncation=True, return_tensors="pt")
    with torch.no_grad():
        h = bert(input_ids=enc.input_ids, attention_mask=(enc.input_ids != 0).long()).last_hidden_state[:, 0]
        w0, w2 = state["text.proj.0.weight"], state["text.proj.2.weight"]
        f = torch.nn.functional.gelu(h @ w0.T) @ w2.T
        f = f / f.norm(dim=-1, keepdim=True)
    np.testing.assert_allclose(model.encode_texts([text]), f.numpy(), atol=1e-5)


def test_missing_text_files_named(tmp_path):
    d = save_tiny_biomedclip_clip(tmp_path / "c")
    (d / "BiomedNLP-BiomedBERT-base-uncased-abstract" / "vocab.txt").unlink()
    with pytest.raises(MedAlignError, match="vocab.txt"):
        load_biomedclip(d)


def test_crop_embedding_is_pil_then_crop_transform(clip_dir):
    """A crop becomes a PIL image as is (BGR stays BGR-as-RGB), then resize-short-side-224-style + centre crop
    (here the tiny tower's 160), normalised with the directory's mean/std, encode_image, L2 norm."""
    model = load_biomedclip(clip_dir)
    rng = np.random.default_rng(0)
    crop = rng.integers(0, 255, (23, 51, 3), dtype=np.uint8)
    s = 160
    img = Image.fromarray(crop)
    w, h = img.size
    nw, nh = int(s * w / h), s  # the short side (h) becomes s, the long one truncated
    img = img.resize((nw, nh), Image.Resampling.BICUBIC)
    left = int(round((nw - s) / 2.0))
    img = img.crop((left, 0, left + s, s))
    x = (np.asarray(img, np.float32) / 255 - np.array([0.5, 0.45, 0.4], np.float32)) / np.array([0.3, 0.25, 0.2],
                                                                                                  np.float32)
    with torch.no_grad():
        f = model.visual(torch.from_numpy(x.transpose(2, 0, 1).copy())[None]).float()
    f = (f / f.norm(dim=-1, keepdim=True)).numpy()
    got = model.encode_crops([crop, crop[..., ::-1]])
    np.testing.assert_allclose(got[0], f[0], atol=1e-5)
    assert np.abs(got[1] - got[0]).max() > 1e-4  # channel order matters: BGR crops embed differently


def test_top_k_against_python_sorted():
    rng = np.random.default_rng(1)
    for m in (0, 1, 3, 9, 20):
        feats = rng.normal(size=(m, 16)).astype(np.float32)
        feats /= np.maximum(np.linalg.norm(feats, axis=1, keepdims=True), 1e-9)
        if m >= 4:
            feats[3] = feats[1]  # a tie: the lower mask index first, as Python's stable sort
        text = rng.normal(size=16).astype(np.float32)
        text /= np.linalg.norm(text)
        for k in (1, 4, 8):
            idx, scores = top_k(feats, text, k)
            s = [float(np.dot(feats[i].astype(np.float64), text)) for i in range(m)]
            want = sorted(range(m), key=lambda i: s[i], reverse=True)[:k]  # the authors' line
            assert idx.tolist() == want
            np.testing.assert_allclose(scores, [s[i] for i in want], atol=1e-6)
    with pytest.raises(ValueError):
        top_k(np.zeros((2, 3), np.float32), np.zeros(3, np.float32), 0)
