"""``convert-model --from huatuo``: the original HuatuoGPT-Vision-7B checkpoint (``llava_qwen2``).

HuatuoGPT-Vision's own code (``LlavaQwen2ForCausalLM``, also copied into MedAlign's
``huatuoGPT_V/llava``) is the only loader of this layout: a Qwen2 language model (q/k/v biases,
no BOS token), the ``mlp2x_gelu`` projector, CLIP ViT-L/14-336 features from
``hidden_states[-2]`` without CLS, pad-to-square images. Its vision tower is built from
``mm_vision_tower``, a path that ``build_vision_tower`` joins to the model directory when it is
relative, and then overwritten by the checkpoint's own ``model.vision_tower.vision_tower.*``
tensors where the checkpoint carries them; this converter takes the tower from the same places in
the same order, then from ``--vision-tower``.

Qwen2 checkpoints have more embedding rows than tokens (152,064 rows for 151,646 tokens), so the
``<image>`` token added at id ``len(tokenizer)`` lands on a spare row and nothing is resized.
``medalign.json`` names the ``huatuo`` template (``conv_huatuo_v1``, what MedAlign trained and
evaluated HuatuoGPT-Vision with). The conversion itself is :mod:`student_train.convert.original_llava`.
"""

from __future__ import annotations

from student_train.convert.original_llava import SourceLayout

HUATUO = SourceLayout(name="huatuo", title="HuatuoGPT-Vision", model_types=("llava_qwen2",),
                      text_config_class="Qwen2Config",
                      extra_text_keys=("use_sliding_window", "max_window_layers", "layer_types"),
                      tower_in_model_dir=True, template="huatuo")

