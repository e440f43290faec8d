"""Expert medical CLIP image encoders: offline loading and one-pass teacher signals.

One module a job:

- :mod:`~teacher_cache.experts.registry`: what each expert is (:class:`ExpertSpec`, :data:`EXPERTS`);
  a new expert is one entry there;
- :mod:`~teacher_cache.experts.checkpoint`: reading weights from local files, one reader per
  on-disk form (UniMed ``.pt``, open_clip directory), and :func:`weights_sha256`;
- :mod:`~teacher_cache.experts.towers`: building the image tower and the forward pass that reads
  ``E_v`` and ``E_a`` from its last block (definitions there);
- :mod:`~teacher_cache.experts.loader`: :func:`load_expert` -> :class:`Expert`.
"""

from teacher_cache.experts.checkpoint import weights_file, weights_sha256
from teacher_cache.experts.loader import Expert, load_expert
from teacher_cache.experts.registry import (EXPERTS, OPENAI_MEAN, OPENAI_STD, ExpertSpec,
                                            get_expert, list_experts)

__all__ = [
    "EXPERTS", "Expert", "ExpertSpec", "OPENAI_MEAN", "OPENAI_STD", "get_expert",
    "list_experts", "load_expert", "weights_file", "weights_sha256",
]
