"""Prompt templates: how a question and its answer become the text a student is trained on.

A template turns one single-turn VQA / report record into

* ``build_prompt(question)``: the text the model sees before it answers (used for training and
  for generation), with the ``<image>`` placeholder first, followed by a newline, as LLaVA puts it;
* ``build_training_text(question, answer) -> (prompt, full)``: ``full = prompt + answer_prefix +
  answer + answer_suffix``. The end-of-answer token is appended after ``full`` as a token id
  (never as text): the id of the template's ``stop_str`` when the tokenizer has it as one token
  (the reference appends its ``sep2`` as text, which such a tokenizer reads as that one token),
  else the tokenizer's EOS id. The answer text, the suffix and that token are the supervised
  tokens (:func:`student_train.data.answer_end_id`).

Registered templates (all single-turn, transcribed from the public reference code):

* ``vicuna_v1``: LLaVA's ``conv_vicuna_v1`` (``SeparatorStyle.TWO``, sep ``" "``, sep2 ``"</s>"``);
  what LLaVA-Med-1.5 and MedAlign train with.
  ``"{system} USER: <image>\\n{q} ASSISTANT:"`` + ``" {a}"`` + EOS (``</s>``).
* ``llava_v1``: LLaVA's ``conv_llava_v1``: the same layout with the "curious human" system prompt.
* ``mistral_instruct``: LLaVA's ``conv_mistral_instruct`` (``SeparatorStyle.LLAMA_2``, empty
  system): ``"[INST] <image>\\n{q} [/INST]"`` + ``" {a} "`` + EOS (``</s>``).
* ``huatuo``: MedAlign's ``conv_huatuo_v1`` (``huatuoGPT_V/llava/conversation.py``:
  ``SeparatorStyle.TWO``, sep ``" "``, sep2 ``"<|endoftext|>"``, roles ``<|user|>`` /
  ``<|assistant|>``, the vicuna system prompt), what MedAlign trained and evaluated
  HuatuoGPT-Vision-7B with: ``"{system} <|user|>: <image>\\n{q} <|assistant|>:"`` + ``" {a}"`` +
  ``<|endoftext|>``. No BOS (Qwen2's tokenizer has none).
* ``huatuo_chat``: HuatuoGPT-Vision's own chat format (its ``cli.py``):
  ``"<|user|>\\n<image>\\n{q}\\n<|assistant|>\\n"`` + ``"{a} \\n"`` + EOS.
"""

from __future__ import annotations

from dataclasses import dataclass

from shared.errors import MedAlignError
from shared.records import IMAGE_PLACEHOLDER


@dataclass(frozen=True)
class PromptTemplate:
    """One single-turn chat format.

    The prompt is ``system + user_prefix + "<image>\\n" + question + user_suffix``; the supervised
    part is ``answer_prefix + answer + answer_suffix`` followed by the EOS token id.
    """

    name: str
    """Registry name."""
    system: str
    """System prompt text placed before the user turn ("" for none)."""
    user_prefix: str
    """Text between the system prompt and the user's message."""
    user_suffix: str
    """Text after the user's message, ending where the answer starts."""
    answer_prefix: str
    """Text before the answer (supervised), e.g. the space after ``ASSISTANT:``."""
    answer_suffix: str
    """Text after the answer, before the EOS id (supervised)."""
    stop_str: str
    """The textual end-of-answer marker (``</s>`` for LLaVA's templates): generation stops at it,
    and its token, when the tokenizer has it as one, ends every supervised answer."""

    def build_prompt(self, question: str) -> str:
        """The prompt for ``question`` (any ``<image>`` in it is moved to the front, as LLaVA does)."""
        q = str(question).replace(IMAGE_PLACEHOLDER, "").strip()
        return f"{self.system}{self.user_prefix}{IMAGE_PLACEHOLDER}\n{q}{self.user_suffix}"

    def build_training_text(self, question: str, answer: str) -> tuple[str, str]:
        """``(prompt, full)``: ``full`` is the prompt followed by the supervised answer text
        (the EOS id is appended by the tokenisation, not here)."""
        prompt = self.build_prompt(question)
        return prompt, prompt + self.answer_prefix + str(answer).strip() + self.answer_suffix


_VICUNA_SYSTEM = ("A chat between a curious user and an artificial intelligence assistant. "
                  "The assistant gives helpful, detailed, and polite answers to the user's questions.")
_LLAVA_V1_SYSTEM = ("A chat between a curious human and an artificial intelligence assistant. "
                    "The assistant gives helpful, detailed, and polite answers to the human's questions.")

TEMPLATES: dict[str, PromptTemplate] = {
    t.name: t
    for t in (
        # SeparatorStyle.TWO: system + " " + "USER: " + msg + " " + "ASSISTANT:" [+ " " + answer + "</s>"]
        PromptTemplate("vicuna_v1", _VICUNA_SYSTEM, " USER: ", " ASSISTANT:", " ", "", "</s>"),
        PromptTemplate("llava_v1", _LLAVA_V1_SYSTEM, " USER: ", " ASSISTANT:", " ", "", "</s>"),
        # SeparatorStyle.LLAMA_2 with an empty system: "[INST] msg [/INST]" [+ " " + answer + " " + "</s>"]
        PromptTemplate("mistral_instruct", "", "[INST] ", " [/INST]", " ", " ", "</s>"),
        # conv_huatuo_v1, SeparatorStyle.TWO: system + " " + "<|user|>: " + msg + " " + "<|assistant|>:"
        # [+ " " + answer + "<|endoftext|>"]
        PromptTemplate("huatuo", _VICUNA_SYSTEM, " <|user|>: ", " <|assistant|>:", " ", "", "<|endoftext|>"),
        # HuatuoGPT-Vision's cli.py: f"<|user|>\n{h}\n<|assistant|>\n" then f"{answer} \n"
        PromptTemplate("huatuo_chat", "", "<|user|>\n", "\n<|assistant|>\n", "", " \n", "<|endoftext|>"),
    )
}

def list_templates() -> list[str]:
    return sorted(TEMPLATES)


def get_template(name: str) -> PromptTemplate:
    """The registered template ``name``; an unknown name lists the valid ones."""
    try:
        return TEMPLATES[name]
    except KeyError:
        raise MedAlignError(
            f"unknown prompt template {name!r}; valid: {', '.join(list_templates())}") from None


def template_for_model(model_dir, name: str | None = None) -> PromptTemplate:
    """The template a student uses: ``name`` if given, else ``medalign.json``'s ``template`` in the
    model directory, else its family's (:mod:`student_train.families`, by the language backbone)."""
    import json
    from pathlib import Path

    from student_train.families import BACKBONE_FAMILY, FAMILIES, backbone_of

    if name:
        return get_template(name)
    model_dir = Path(model_dir)
    marker = model_dir / "medalign.json"
    if marker.is_file():
        try:
            declared = json.loads(marker.read_text()).get("template")
        except (json.JSONDecodeError, AttributeError) as e:
            raise MedAlignError(f"{marker}: malformed ({e}); expected {{\"template\": \"<name>\"}}") from None
        if declared:
            return get_template(str(declared))
    backbone = backbone_of(model_dir)
    if backbone in BACKBONE_FAMILY:
        return get_template(FAMILIES[BACKBONE_FAMILY[backbone]].template)
    raise MedAlignError(
        f"{model_dir}: cannot tell which prompt template this student uses (language backbone "
        f"{backbone!r}, no medalign.json); pass --template ({', '.join(list_templates())})")
