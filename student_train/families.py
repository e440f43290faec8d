"""Student families: for each language backbone, the prompt template a student of that family is
trained with and the reference's evaluation settings (one table for training and generation).

LLaVA-Med-1.5 (Llama/Mistral backbones): the ``vicuna_v1`` template; the reference evaluates with
5-beam search, 1024 new tokens, float16 (``llava-med-1.5/llava/eval/model_vqa.py``).
HuatuoGPT-Vision (Qwen2): the ``huatuo`` template (MedAlign's ``conv_huatuo_v1``); 128 new tokens,
bfloat16 (``huatuoGPT_V/llava/eval/model_vqa.py``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class StudentFamily:
    """One family of students and the reference's settings for it."""

    name: str
    template: str
    """The prompt template its students are trained and evaluated with (student_train/templates.py)."""
    max_new_tokens: int
    """``max_new_tokens`` of the reference's beam and greedy runs."""
    cuda_dtype: str
    """The half precision the reference evaluates in on CUDA (float32 on CPU)."""


FAMILIES = {"llava-med": StudentFamily("llava-med", "vicuna_v1", 1024, "float16"),
            "huatuo": StudentFamily("huatuo", "huatuo", 128, "bfloat16")}
#: The language backbone (``text_config.model_type``) -> its family.
BACKBONE_FAMILY = {"llama": "llava-med", "mistral": "llava-med", "qwen2": "huatuo"}
DEFAULT_FAMILY = "llava-med"


def backbone_of(model_dir: str | Path) -> str | None:
    """The language backbone's ``model_type`` from a LLaVA directory's ``config.json`` (None if unreadable)."""
    try:
        cfg = json.loads((Path(model_dir) / "config.json").read_text())
        return (cfg.get("text_config") or {}).get("model_type")
    except (OSError, json.JSONDecodeError, AttributeError):
        return None


def student_family(model_dir: str | Path) -> StudentFamily:
    """The family of the student in ``model_dir`` by its backbone (unknown backbones: LLaVA-Med's)."""
    return FAMILIES[BACKBONE_FAMILY.get(backbone_of(model_dir), DEFAULT_FAMILY)]
