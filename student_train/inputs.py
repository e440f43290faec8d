"""The student's inputs, one definition for training and generation: prompt tokens and pixels.

"Generate sees exactly what training saw" holds by construction: :mod:`student_train.data` builds
training samples with :func:`encode_sample` / :func:`expand` and :func:`student_pixels`, and
``medalign-eval generate`` builds its prompts with :func:`encode_prompt` and the same
:func:`student_pixels`.

Tokens, as LLaVA's ``tokenizer_image_token``: the template's prompt is split at its single
``<image>``; the text before and after it are tokenised separately without special tokens; BOS
first when the tokenizer itself adds one (Llama/Mistral do, Qwen2 does not); ``<image>`` becomes
``N`` copies of the image token id. In training the text after the image is the prompt tail and the
answer tokenised together (the answer is tokenised in context) and the answer's end token
(:func:`answer_end_id`) follows. The query rows of ``L_att`` are the prompt tokens after the image,
up to the start of the answer.

Pixels: the image read by :func:`shared.images.load_image`, padded to a square with the processor's
mean colour (LLaVA ``image_aspect_ratio=pad``), then the model's CLIP image processor with the PIL
backend (the torchvision one differs from the reference pixels by up to 0.015).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from shared.errors import MedAlignError
from shared.images import expand2square, load_image
from shared.records import IMAGE_PLACEHOLDER
from student_train.templates import PromptTemplate

IGNORE_INDEX = -100


@dataclass(frozen=True)
class Encoded:
    """One tokenised sample, image placeholder NOT expanded (compact; expanded in ``__getitem__``).

    ``ids`` holds the text token ids with a single ``image_token_id`` at ``image_pos``; tokens at
    positions ``>= answer_start`` are supervised.
    """

    ids: np.ndarray
    image_pos: int
    answer_start: int

    def length(self, num_image_tokens: int) -> int:
        return len(self.ids) - 1 + num_image_tokens


def _encode_text(tokenizer, text: str) -> tuple[list[int], list[tuple[int, int]] | None]:
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=bool(tokenizer.is_fast))
    return list(enc["input_ids"]), (list(map(tuple, enc["offset_mapping"])) if tokenizer.is_fast else None)


def adds_bos(tokenizer) -> bool:
    """Whether ``tokenizer`` prepends its BOS token by default (``add_special_tokens=True``)."""
    bos = tokenizer.bos_token_id
    return bos is not None and list(tokenizer("a", add_special_tokens=True)["input_ids"][:1]) == [bos]


def answer_end_id(tokenizer, template: PromptTemplate) -> int:
    """The token that ends a supervised answer: the template's ``stop_str`` where the tokenizer has
    it as one token (the reference appends ``sep2`` as text: conv_huatuo_v1's ``<|endoftext|>``,
    LLaVA's ``</s>``), else the tokenizer's EOS."""
    stop = template.stop_str
    if stop:
        ids = tokenizer(stop, add_special_tokens=False)["input_ids"]
        if len(ids) == 1 and tokenizer.convert_ids_to_tokens(ids[0]) == stop:
            return int(ids[0])
    if tokenizer.eos_token_id is None:
        raise MedAlignError("the tokenizer has no EOS token; cannot mark the end of answers")
    return int(tokenizer.eos_token_id)


def encode_sample(tokenizer, template: PromptTemplate, question: str, answer: str, image_token_id: int,
                  *, add_bos: bool | None = None, end_id: int | None = None) -> Encoded:
    """Tokenise one (question, answer) with ``template`` the way LLaVA's ``tokenizer_image_token`` does.

    The prompt is split at its single ``<image>``; the text before it and the text after it
    (prompt tail + answer) are tokenised separately, and the answer's first token is found from the
    character offsets (a token that starts at or after the prompt's end is an answer token), so the
    answer is tokenised in context exactly as in the full text. BOS is prepended when the tokenizer
    itself adds one (Llama/Mistral tokenizers do, Qwen2's does not); the end token
    (:func:`answer_end_id`, computed once by the caller or here) is appended.
    """
    prompt, full = template.build_training_text(question, answer)
    head, sep, _ = prompt.partition(IMAGE_PLACEHOLDER)
    assert sep, "templates always contain the image placeholder"
    tail_full = full[len(head) + len(IMAGE_PLACEHOLDER):]
    tail_prompt_len = len(prompt) - len(head) - len(IMAGE_PLACEHOLDER)

    head_ids, _ = _encode_text(tokenizer, head) if head else ([], None)
    tail_ids, offsets = _encode_text(tokenizer, tail_full)
    if offsets is not None:
        n_prompt_tail = next((i for i, (s, _) in enumerate(offsets) if s >= tail_prompt_len), len(tail_ids))
    else:  # slow tokenizer: tokenise the prompt tail on its own
        n_prompt_tail = len(_encode_text(tokenizer, tail_full[:tail_prompt_len])[0])
    if image_token_id in head_ids or image_token_id in tail_ids:
        raise MedAlignError("the question or answer text contains the image token itself")

    ids: list[int] = []
    if adds_bos(tokenizer) if add_bos is None else add_bos:
        ids.append(int(tokenizer.bos_token_id))
    ids += head_ids
    image_pos = len(ids)
    ids.append(int(image_token_id))
    answer_start = len(ids) + n_prompt_tail
    ids += tail_ids
    ids.append(answer_end_id(tokenizer, template) if end_id is None else int(end_id))
    return Encoded(np.asarray(ids, dtype=np.int64), image_pos, answer_start)


def expand(enc: Encoded, image_token_id: int, num_image_tokens: int) -> dict[str, torch.Tensor]:
    """Expand the placeholder into ``num_image_tokens`` image ids; build labels and the query mask.

    Returns ``input_ids`` [T] long, ``labels`` [T] long, ``query_mask`` [T] bool with
    ``T = enc.length(num_image_tokens)``.
    """
    n = num_image_tokens
    ids = torch.from_numpy(enc.ids)
    input_ids = torch.cat([ids[:enc.image_pos], torch.full((n,), image_token_id, dtype=torch.long),
                           ids[enc.image_pos + 1:]])
    shift = n - 1
    answer_start = enc.answer_start + shift
    labels = torch.full_like(input_ids, IGNORE_INDEX)
    labels[answer_start:] = input_ids[answer_start:]
    query_mask = torch.zeros(len(input_ids), dtype=torch.bool)
    query_mask[enc.image_pos + n:answer_start] = True
    return {"input_ids": input_ids, "labels": labels, "query_mask": query_mask}


def encode_prompt(tokenizer, template: PromptTemplate, question: str, image_token_id: int,
                  num_image_tokens: int, *, add_bos: bool) -> tuple[list[int], int]:
    """Token ids of the template's prompt with the image placeholder expanded.

    The same split and tokenisation as :func:`encode_sample` (module docstring), without an answer.

    Returns:
        (ids, query_start): the ids, and the index of the first prompt token after the image
        (the query rows of L_att run from there to the end of the prompt).
    """
    prompt = template.build_prompt(question)
    head, sep, tail = prompt.partition(IMAGE_PLACEHOLDER)
    assert sep, "templates always contain the image placeholder"
    head_ids = _encode_text(tokenizer, head)[0] if head else []
    tail_ids = _encode_text(tokenizer, tail)[0]
    if image_token_id in head_ids or image_token_id in tail_ids:
        raise MedAlignError("the question text contains the image token itself")
    ids = [int(tokenizer.bos_token_id)] if add_bos else []
    ids += head_ids + [int(image_token_id)] * int(num_image_tokens)
    return ids + tail_ids, len(ids)


def load_image_processor(model_dir: str | Path, *, trust_remote_code: bool = False):
    """The model's CLIP image processor with the PIL backend (reference-exact pixels)."""
    from transformers import AutoImageProcessor
    try:
        return AutoImageProcessor.from_pretrained(str(model_dir), backend="pil",
                                                  trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as e:
        raise MedAlignError(f"{model_dir}: cannot load the image processor ({e})") from None



def student_image(processor, path: str | Path, background: tuple[int, int, int]) -> tuple[torch.Tensor, str]:
    """``(pixels [3, S, S] float32, sha256 of the file's bytes)`` of the image at ``path``: padded to a
    square with ``background`` (the processor's mean colour, :func:`shared.images.mean_colour`) and
    processed. The digest is what the teacher cache keys its rows by."""
    img, digest = load_image(path)
    img = expand2square(img, background)
    out = processor(images=img, return_tensors="pt")["pixel_values"]
    return torch.as_tensor(out[0], dtype=torch.float32), digest


def student_pixels(processor, path: str | Path, background: tuple[int, int, int]) -> torch.Tensor:
    """The pixels of :func:`student_image` (generation and figures, where no cache row is checked)."""
    return student_image(processor, path, background)[0]
