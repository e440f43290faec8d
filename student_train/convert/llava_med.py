"""``convert-model --from llava-med``: the original LLaVA-Med-1.5 checkpoint (``llava_mistral``).

As released by Microsoft and written by the LLaVA code base: a Mistral language model, the
``mlp2x_gelu`` projector, CLIP weights usually absent (``mm_vision_tower`` is the hub name
``openai/clip-vit-large-patch14-336``, so the tower comes from ``--vision-tower``). The layout and
the conversion are described in :mod:`student_train.convert.original_llava`. No ``medalign.json`` is
written: the Mistral backbone's default template (``vicuna_v1``) is what LLaVA-Med trains with.
"""

from __future__ import annotations

from student_train.convert.original_llava import SourceLayout

LLAVA_MED = SourceLayout(name="llava-med", title="LLaVA-Med-1.5", model_types=("llava_mistral",),
                         text_config_class="MistralConfig")

