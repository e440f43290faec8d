"""Prompt templates: exact strings against LLaVA's, MedAlign's and HuatuoGPT-Vision's reference formats."""

import json

import pytest

from shared.errors import MedAlignError
from student_train.templates import get_template, list_templates, template_for_model

VICUNA_SYSTEM = ("A chat between a curious user and an artificial intelligence assistant. "
                 "The assistant gives helpful, detailed, and polite answers to the user's questions.")


def llava_two_style(system, roles, sep, sep2, messages):
    """LLaVA's Conversation.get_prompt for SeparatorStyle.TWO, written out independently."""
    seps = [sep, sep2]
    ret = system + seps[0]
    for i, (role, message) in enumerate(messages):
        if message:
            ret += role + ": " + message + seps[i % 2]
        else:
            ret += role + ":"
    return ret


def llava_llama2_style(system, messages, sep="<s>", sep2="</s>"):
    """LLaVA's get_prompt for SeparatorStyle.LLAMA_2 (conv_mistral_instruct has system '')."""
    wrap_sys = lambda msg: f"<<SYS>>\n{msg}\n<</SYS>>\n\n" if len(msg) > 0 else msg  # noqa: E731
    ret = ""
    for i, (_, message) in enumerate(messages):
        if message:
            if i == 0:
                message = wrap_sys(system) + message
            if i % 2 == 0:
                ret += sep + f"[INST] {message} [/INST]"
            else:
                ret += " " + message + " " + sep2
    return ret.lstrip(sep)


@pytest.mark.parametrize("question", ["Is there a mass?", "<image>\nIs there a mass?", "Is there a mass? <image>"])
def test_vicuna_v1_matches_llava(question):
    t = get_template("vicuna_v1")
    msg = "<image>\n" + question.replace("<image>", "").strip()
    ref_prompt = llava_two_style(VICUNA_SYSTEM, ("USER", "ASSISTANT"), " ", "</s>",
                                 [("USER", msg), ("ASSISTANT", None)])
    ref_full = llava_two_style(VICUNA_SYSTEM, ("USER", "ASSISTANT"), " ", "</s>",
                               [("USER", msg), ("ASSISTANT", "yes")])
    prompt, full = t.build_training_text(question, "yes")
    assert prompt == t.build_prompt(question) == ref_prompt
    assert full + t.stop_str == ref_full


def test_mistral_instruct_matches_llava():
    t = get_template("mistral_instruct")
    msg = "<image>\nWhat organ?"
    assert t.build_prompt("What organ?") == llava_llama2_style("", [("USER", msg), ("ASSISTANT", None)])
    _, full = t.build_training_text("What organ?", "the liver")
    assert full + t.stop_str == llava_llama2_style("", [("USER", msg), ("ASSISTANT", "the liver")])


def huatuo_two_style(system, roles, sep, sep2, messages):
    """MedAlign's huatuoGPT_V/llava/conversation.py get_prompt for SeparatorStyle.TWO, written out:
    unlike LLaVA's, a message is stripped, sep2 is followed by a space, and the result is stripped."""
    ret = system + sep
    for i, (role, message) in enumerate(messages):
        if message:
            ret += role + ": " + str(message).strip() + (sep2 + " " if i % 2 else sep)
        else:
            ret += role + ":"
    return ret.strip()


@pytest.mark.parametrize("question", ["What organ?", "<image>\nWhat organ?", " What organ? <image>"])
def test_huatuo_matches_conv_huatuo_v1(question):
    t = get_template("huatuo")
    msg = "<image>\n" + question.replace("<image>", "").strip()
    roles = ("<|user|>", "<|assistant|>")
    ref_prompt = huatuo_two_style(VICUNA_SYSTEM, roles, " ", "<|endoftext|>", [(roles[0], msg), (roles[1], None)])
    ref_full = huatuo_two_style(VICUNA_SYSTEM, roles, " ", "<|endoftext|>", [(roles[0], msg), (roles[1], " liver ")])
    prompt, full = t.build_training_text(question, " liver ")
    assert prompt == t.build_prompt(question) == ref_prompt
    assert full + t.stop_str == ref_full
    assert prompt == (VICUNA_SYSTEM + " <|user|>: <image>\nWhat organ? <|assistant|>:")
    assert full == prompt + " liver" and t.stop_str == "<|endoftext|>"


def test_huatuo_chat_matches_its_cli():
    t = get_template("huatuo_chat")
    # HuatuoGPT-Vision cli.py: f"<|user|>\n{h}\n<|assistant|>\n" with h = "<image>\n" + text, then f"{g} \n"
    assert t.build_prompt("What organ?") == "<|user|>\n<image>\nWhat organ?\n<|assistant|>\n"
    assert t.build_training_text("What organ?", "liver")[1] == "<|user|>\n<image>\nWhat organ?\n<|assistant|>\nliver \n"


def test_numbers_as_answers_and_unknown_name():
    assert get_template("vicuna_v1").build_training_text("How many?", 3)[1].endswith("ASSISTANT: 3")
    with pytest.raises(MedAlignError) as e:
        get_template("chatml")
    for name in list_templates():
        assert name in str(e.value)


def test_template_for_model(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llava", "text_config": {"model_type": "qwen2"}}))
    assert template_for_model(tmp_path).name == "huatuo"
    assert template_for_model(tmp_path, "mistral_instruct").name == "mistral_instruct"
    (tmp_path / "medalign.json").write_text(json.dumps({"template": "vicuna_v1"}))
    assert template_for_model(tmp_path).name == "vicuna_v1"
    (tmp_path / "medalign.json").write_text(json.dumps({"template": "nope"}))
    with pytest.raises(MedAlignError, match="nope"):
        template_for_model(tmp_path)
    (tmp_path / "medalign.json").unlink()
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llava", "text_config": {"model_type": "gemma"}}))
    with pytest.raises(MedAlignError, match="--template"):
        template_for_model(tmp_path)
