"""Shared pieces of the decoding-method tests (``test_decoding_*.py``): a tiny student, a training run
with a non-zero W, questions of different lengths, pixels, and an independent W hook for the
no-cache references. Each method's reference loop itself lives in its own test file.

    from decoding_helpers import QUESTIONS, make_student, make_w_run, pixels, prompt_ids, rotated
    from decoding_helpers import single_thread  # noqa: F401 - the fixture, used by pytestmark below
    pytestmark = pytest.mark.usefixtures("single_thread")
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import pytest
import torch

from student_train import inputs as I
from student_train.tiny import save_tiny_llava

#: The align layer of the test runs (the tiny students have 4 decoder layers).
LAYER = 2
#: Three prompts of different token lengths (a batch of them is really left-padded).
QUESTIONS = ["Is there a mass?",
             "Where is the lesion located in the left upper lobe of the lung and is it a mass?",
             "CT?"]
KEYS = ["10", "a11", "12"]


@pytest.fixture(scope="module")
def single_thread():
    """One torch thread for the module, restored after: the test models are tiny, and on a shared
    2-core machine torch's worker threads spin against other processes (5x slower here)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def make_student(path: Path, backbone: str = "llama", **shape) -> Path:
    """A tiny random LLaVA student (4 decoder layers, 16 image tokens)."""
    return save_tiny_llava(path, backbone, layers=4, seed=0, **shape)


def make_w_run(model_dir: Path, out: Path, w_scale: float = 3.0, seed: int = 1) -> tuple[Path, torch.Tensor]:
    """A training run directory as medalign-train writes it: a zero LoRA update (B = 0) and
    W = w_scale * randn / sqrt(d) at :data:`LAYER`. Returns (run dir, W)."""
    from student_train.alignment import get_handles
    from student_train.config import AlignArgs, LoraArgs
    from student_train.model import load_student, prepare_student, save_trained

    model, _ = load_student(model_dir)
    torch.manual_seed(seed)
    peft = prepare_student(model, LoraArgs(lora_r=4), AlignArgs(align_layer=LAYER, alpha=1.0, beta=0.0),
                           train_projector=False)
    rot = get_handles(peft).rotation
    d = rot.weight.shape[0]
    with torch.no_grad():
        rot.weight.copy_(w_scale * torch.randn(d, d) / d ** 0.5)
    save_trained(peft, out)
    (out / "config.json").write_text(json.dumps({"data": {"template": "vicuna_v1"}, "align": {"align_layer": LAYER}}))
    (out / "teacher.json").write_text(json.dumps({"expert": "unimed-b", "fingerprint": "abc123"}))
    return out, rot.weight.detach().clone()


def pixels(gen, n: int, seed: int = 0) -> torch.Tensor:
    """``n`` random normalised images [n, 3, S, S] (what the image processor outputs, roughly)."""
    size = gen.model.config.vision_config.image_size
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def prompt_ids(gen, question: str) -> list[int]:
    """The generation prompt's token ids (image tokens expanded), as ``generate`` builds them."""
    return I.encode_prompt(gen.tokenizer, gen.template, question, gen.image_token_id, gen.num_image_tokens,
                           add_bos=gen.add_bos)[0]


@contextlib.contextmanager
def rotated(model, w: torch.Tensor, layer: int, mask: torch.Tensor):
    """Independently of student_train.alignment: add ``X W^T`` (fp32) to the rows ``mask`` [1, T]
    of ``layers[layer-1]``'s output in every forward whose length is ``mask``'s (full forwards)."""
    def hook(_m, _a, out):
        h = out[0] if isinstance(out, tuple) else out
        if h.shape[1] != mask.shape[1]:
            return None
        h = h.clone()
        h[mask] = (h[mask].float() + h[mask].float() @ w.t()).to(h.dtype)
        return (h,) + tuple(out[1:]) if isinstance(out, tuple) else h

    handle = model.model.language_model.layers[layer - 1].register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


def full_logits(model, seq: list[int], n_prompt: int, px: torch.Tensor | None, image_token_id: int,
                rotation: tuple[torch.Tensor, int] | None = None) -> torch.Tensor:
    """Last-position fp32 logits of ONE full forward (no cache, no padding) over ``seq`` (prompt +
    answer so far), independently of evaluation.decoding: the image features of ``px`` [1, 3, S, S]
    go into the PROMPT's image positions (an image token id the model generated stays a token),
    ``px=None`` reads the sequence as text only; ``rotation = (W, layer)`` rotates the prompt's image
    positions with :func:`rotated`."""
    ids = torch.tensor([seq])
    emb = model.get_input_embeddings()(ids)
    mask = ids == image_token_id
    mask[:, n_prompt:] = False
    if px is not None and bool(mask.any()):
        feats = model.model.get_image_features(pixel_values=px, return_dict=True).pooler_output[0]
        emb = emb.clone()
        emb[mask] = feats.to(emb.dtype)
    ctx = rotated(model, *rotation, mask) if rotation is not None else contextlib.nullcontext()
    with ctx:
        out = model(inputs_embeds=emb, attention_mask=torch.ones_like(ids), use_cache=False)
    return out.logits[0, -1].float()


def count_forwards(model):
    """A context manager recording the sequence length of every language-model forward (a list)."""
    @contextlib.contextmanager
    def cm():
        lengths: list[int] = []
        h = model.model.language_model.register_forward_pre_hook(
            lambda _m, _a, kw: lengths.append(int(kw["inputs_embeds"].shape[1])), with_kwargs=True)
        try:
            yield lengths
        finally:
            h.remove()
    return cm()
