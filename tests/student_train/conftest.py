"""Fixtures for the student_train tests: tiny random-weight LLaVA students, built once per session.

Fixture names (for everyone writing tests under tests/student_train/):
  tiny_students_root   session tmp dir holding the students
  tiny_student_dirs    dict backbone -> Path of a saved tiny student, for "llama", "mistral", "qwen2"
                       (image 32 / patch 8 -> N = 16 image tokens, hidden 64, 4 layers, 4 heads,
                       2 kv heads; saved by student_train.tiny.save_tiny_llava, seed 0)
  tiny_llama_dir, tiny_mistral_dir, tiny_qwen2_dir   the same paths one by one
  tiny_make_batch      factory: tiny_make_batch(model, lengths, offsets, n_query=..., teacher=...,
                       seed=...) -> a padded batch dict in the S1/S2 interface format
                       (see make_batch below)

The students are treated as read-only: copy a directory before writing into it.
"""

from __future__ import annotations

import shutil

import pytest
import torch

from student_train.tiny import BACKBONES, save_tiny_llava

TINY_LAYERS = 4
TINY_ALIGN_LAYER = 2  # a valid 0-based align layer for the 4-layer tiny students


@pytest.fixture(scope="session")
def tiny_students_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny_students")
    yield root
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="session")
def tiny_student_dirs(tiny_students_root):
    return {bb: save_tiny_llava(tiny_students_root / bb, bb, layers=TINY_LAYERS, seed=0) for bb in BACKBONES}


@pytest.fixture(scope="session")
def tiny_llama_dir(tiny_student_dirs):
    return tiny_student_dirs["llama"]


@pytest.fixture(scope="session")
def tiny_mistral_dir(tiny_student_dirs):
    return tiny_student_dirs["mistral"]


@pytest.fixture(scope="session")
def tiny_qwen2_dir(tiny_student_dirs):
    return tiny_student_dirs["qwen2"]


def make_batch(
    model,
    lengths: list[int],
    offsets: list[int],
    *,
    n_query: int | list[int] = 4,
    teacher: list[bool] | None = None,
    seed: int = 0,
    pad_id: int = 3,
) -> dict:
    """A right-padded batch with random text around each sample's N image tokens.

    Sample b: ``lengths[b]`` real tokens, the image tokens at ``offsets[b] .. offsets[b]+N-1``,
    the next ``n_query[b]`` tokens are the query rows, the rest of the sample is the answer
    (labelled). Teacher tensors are random (S_e a real cosine matrix, E_a positive); samples with
    ``teacher[b] = False`` get zeros and ``teacher_mask`` False.
    """
    cfg = model.config
    n = (cfg.vision_config.image_size // cfg.vision_config.patch_size) ** 2
    img = cfg.image_token_id
    vocab = cfg.text_config.vocab_size
    b = len(lengths)
    nq = [n_query] * b if isinstance(n_query, int) else list(n_query)
    teacher = [True] * b if teacher is None else teacher
    t = max(lengths)
    g = torch.Generator().manual_seed(seed)
    ids = torch.full((b, t), pad_id, dtype=torch.long)
    am = torch.zeros(b, t, dtype=torch.long)
    qm = torch.zeros(b, t, dtype=torch.bool)
    labels = torch.full((b, t), -100, dtype=torch.long)
    for i, (length, off) in enumerate(zip(lengths, offsets)):
        assert off + n + nq[i] < length
        seq = torch.randint(10, vocab, (length,), generator=g)
        seq[off : off + n] = img
        ids[i, :length] = seq
        am[i, :length] = 1
        qm[i, off + n : off + n + nq[i]] = True
        ans = off + n + nq[i]
        labels[i, ans:length] = seq[ans:length]
    feats = torch.nn.functional.normalize(torch.randn(b, n, 8, generator=g), dim=-1)
    sim = feats @ feats.transpose(1, 2)
    attn = torch.rand(b, n, generator=g) + 0.05
    mask = torch.tensor(teacher, dtype=torch.bool)
    sim[~mask] = 0
    attn[~mask] = 0
    size = cfg.vision_config.image_size
    return {
        "input_ids": ids,
        "attention_mask": am,
        "labels": labels,
        "pixel_values": torch.randn(b, 3, size, size, generator=g),
        "query_mask": qm,
        "teacher_sim": sim.float(),
        "teacher_attn": attn.float(),
        "teacher_mask": mask,
    }


@pytest.fixture(scope="session")
def tiny_make_batch():
    return make_batch
