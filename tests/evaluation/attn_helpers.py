"""Shared set-up of the PAI, DAMRO and AVISC tests (on top of ``decoding_helpers``): a student with a
trained run and the same student bare (for the references), running a method the way ``generate``
does, one-by-one runs, and plain greedy decoding through transformers' ``generate``."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from decoding_helpers import make_student, make_w_run, prompt_ids

from evaluation.generate import Generator, generate_ids, load_generator
from evaluation.generate_config import DecodingConfig

MAX_NEW = 6


@dataclass
class Students:
    """One tiny student twice: ``run`` with a trained run (LoRA merged, a large W at the prefill) and
    ``bare`` without (the references add W themselves); ``w`` the run's W."""

    run: Generator
    bare: Generator
    w: torch.Tensor


def students(tmp_path_factory, name: str) -> Students:
    model_dir = make_student(tmp_path_factory.mktemp(name) / "llama")
    run_dir, w = make_w_run(model_dir, tmp_path_factory.mktemp(f"{name}_run"))
    return Students(load_generator(model_dir, run_dir), load_generator(model_dir), w)


def decode(gen: Generator, method: str, questions: list[str], px: torch.Tensor, max_new: int = MAX_NEW,
           **given) -> list[list[int]]:
    """The method on one LEFT-padded batch, through ``generate_ids`` (``given``: its keys)."""
    return generate_ids(gen, questions, px, DecodingConfig(mode=method, args=dict(given), max_new_tokens=max_new))


def one_by_one(gen: Generator, method: str, questions: list[str], px: torch.Tensor, **given) -> list[list[int]]:
    return [decode(gen, method, [q], px[i:i + 1], **given)[0] for i, q in enumerate(questions)]


@torch.no_grad()
def greedy(gen: Generator, questions: list[str], px: torch.Tensor, max_new: int = MAX_NEW) -> list[list[int]]:
    """Plain greedy decoding through transformers' ``generate``, one question at a time."""
    out = []
    for i, q in enumerate(questions):
        ids = torch.tensor([prompt_ids(gen, q)])
        row = gen.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values=px[i:i + 1],
                                 do_sample=False, num_beams=1, max_new_tokens=max_new,
                                 pad_token_id=gen.pad_id, eos_token_id=gen.eos_ids)[0, ids.shape[1]:].tolist()
        cut = next((j for j, t in enumerate(row) if t in gen.eos_ids), len(row))
        out.append(row[:cut])
    return out
