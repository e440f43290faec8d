"""``medalign-data convert-model --from huatuo``: a tiny random HuatuoGPT-Vision checkpoint written in
the ORIGINAL layout (``llava_qwen2`` config, original key names, q/k/v biases, a Qwen2-style
tokenizer in the release's files) is converted, loaded with
``LlavaForConditionalGeneration.from_pretrained`` and its logits compared with an independent
re-implementation of the original forward (tests/shared/llava_reference.py) on the huatuo prompt.
The tower comes from the checkpoint, from a relative ``mm_vision_tower`` folder or from
``--vision-tower``; the ``<image>`` token lands on a spare embedding row or, without one, grows it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from llava_reference import IMAGE, N_IMAGE, VP, language_weights, ref_llava, vision_weights, write_clip_folder
from safetensors.torch import save_file

from student_train.convert.cli import main

D = 32
LAYERS = 2
HEADS, KV_HEADS = 4, 2
INTER = 64
ROPE_THETA = 1_000_000.0
RMS_EPS = 1e-6
VH = 64                 # CLIP hidden size
TOKENS = 303            # the tiny Qwen2 tokenizer: 300 BPE tokens + <|endoftext|>, <|im_start|>, <|im_end|>
SPARE_ROWS = 320        # a Qwen2-like embedding with rows beyond the tokenizer (the real one: 152064 > 151646)
REL_TOWER = "vit/clip_vit_large_patch14_336"


def llava_qwen2_config(rows: int, mm_vision_tower: str) -> dict:
    """The fields of HuatuoGPT-Vision-7B's config.json (Qwen2 + LLaVA's mm_* fields), tiny sizes."""
    return {
        "architectures": ["LlavaQwen2ForCausalLM"], "model_type": "llava_qwen2", "_name_or_path": "tiny",
        "vocab_size": rows, "hidden_size": D, "intermediate_size": INTER, "num_hidden_layers": LAYERS,
        "num_attention_heads": HEADS, "num_key_value_heads": KV_HEADS, "hidden_act": "silu",
        "max_position_embeddings": 256, "rms_norm_eps": RMS_EPS, "rope_theta": ROPE_THETA,
        "use_sliding_window": False, "sliding_window": 131072, "max_window_layers": 28,
        "tie_word_embeddings": False, "bos_token_id": 300, "eos_token_id": 300, "torch_dtype": "bfloat16",
        "use_cache": True, "attention_dropout": 0.0, "initializer_range": 0.02,
        "mm_vision_tower": mm_vision_tower, "mm_hidden_size": VH, "mm_projector_type": "mlp2x_gelu",
        "mm_vision_select_layer": -2, "mm_vision_select_feature": "patch", "mm_patch_merge_type": "flat",
        "mm_use_im_start_end": False, "mm_use_im_patch_token": False, "image_aspect_ratio": "pad",
        "tokenizer_model_max_length": 2048, "tokenizer_padding_side": "right", "tune_mm_mlp_adapter": False,
        "freeze_mm_mlp_adapter": False, "use_mm_proj": True, "mm_projector_lr": None,
    }


def write_qwen2_tokenizer(folder: Path, files: str) -> None:
    """The tiny Qwen2 tokenizer as a release ships it: ``tokenizer.json`` + ``tokenizer_config.json``
    (``files="json"``), or ``vocab.json`` + ``merges.txt`` + ``tokenizer_config.json`` (``"bpe"``)."""
    from student_train.tiny import qwen2_tokenizer

    tok = qwen2_tokenizer()
    assert len(tok) == TOKENS
    tok.save_pretrained(str(folder))
    if files == "bpe":
        model = json.loads((folder / "tokenizer.json").read_text())["model"]
        (folder / "tokenizer.json").unlink()
        (folder / "vocab.json").write_text(json.dumps(model["vocab"]))
        (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(" ".join(m) for m in model["merges"]) + "\n")
        cfg = json.loads((folder / "tokenizer_config.json").read_text())
        cfg["added_tokens_decoder"] = {str(300 + i): {"content": c, "special": True, "lstrip": False, "rstrip": False,
                                                      "normalized": False, "single_word": False}
                                       for i, c in enumerate(["<|endoftext|>", "<|im_start|>", "<|im_end|>"])}
        (folder / "tokenizer_config.json").write_text(json.dumps(cfg))


def write_checkpoint(root: Path, tower: str, rows: int = SPARE_ROWS, seed: int = 0) -> tuple[Path, Path | None, dict, int]:
    """A tiny HuatuoGPT-Vision folder, two bf16 safetensors shards + index (as released).

    ``tower``: ``embedded`` (``model.vision_tower.vision_tower.*`` inside, config inferred from shapes,
    one 64-dim head), ``relative`` (a CLIP folder at ``SRC/vit/...`` named by a relative
    ``mm_vision_tower``, 2 heads) or ``flag`` (a CLIP folder outside, for ``--vision-tower``; the config
    names the hub id). Returns (src, CLIP folder or None, original state dict, vision heads).
    """
    gen = torch.Generator().manual_seed(seed)
    src = root / "HuatuoGPT-Vision-7B"
    src.mkdir()
    vheads = 1 if tower == "embedded" else 2
    vis = vision_weights(VH, 48, gen)
    lang = language_weights(rows=rows, d=D, layers=LAYERS, heads=HEADS, kv_heads=KV_HEADS, inter=INTER,
                            mm_hidden=VH, gen=gen, qkv_bias=True)
    name = {"embedded": REL_TOWER, "relative": REL_TOWER, "flag": "openai/clip-vit-large-patch14-336"}[tower]
    (src / "config.json").write_text(json.dumps(llava_qwen2_config(rows, name)))
    write_qwen2_tokenizer(src, "json" if tower == "embedded" else "bpe")
    (src / "generation_config.json").write_text(json.dumps({"bos_token_id": 300, "eos_token_id": 300}))
    stored = dict(lang)
    if tower == "embedded":
        stored.update({VP + k: v for k, v in vis.items()})
    stored = {k: v.to(torch.bfloat16) if v.is_floating_point() else v for k, v in stored.items()}  # as released
    keys = sorted(stored)
    weight_map = {}
    for i, part in enumerate([keys[: len(keys) // 2], keys[len(keys) // 2:]]):
        shard = f"model-{i + 1:05d}-of-00002.safetensors"
        save_file({k: stored[k] for k in part}, str(src / shard))
        weight_map.update({k: shard for k in part})
    (src / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    # What the sources hold, in float32: the checkpoint's bf16 tensors and (if not inside) the float32 CLIP folder.
    original = {k: v.float() for k, v in stored.items()}
    original.update({VP + k: v.float() for k, v in vis.items() if VP + k not in original})
    clip = None
    if tower != "embedded":
        clip = write_clip_folder(src / REL_TOWER if tower == "relative" else root / "clip", vis, VH, vheads)
        from transformers import CLIPImageProcessor
        CLIPImageProcessor(size={"shortest_edge": IMAGE}, crop_size={"height": IMAGE, "width": IMAGE},
                           image_mean=[0.5, 0.25, 0.75]).save_pretrained(str(clip))
    return src, clip, original, vheads


def convert(src: Path, dst: Path, *extra: str):
    return CliRunner().invoke(main, ["convert-model", "--from", "huatuo", str(src), "--out", str(dst), *extra])


HUATUO_SYSTEM = ("A chat between a curious user and an artificial intelligence assistant. "
                 "The assistant gives helpful, detailed, and polite answers to the user's questions.")


@pytest.mark.parametrize("tower,rows", [("embedded", SPARE_ROWS), ("relative", SPARE_ROWS), ("flag", TOKENS)])
def test_converted_logits_match_original_forward(tmp_path, tower, rows):
    from transformers import AutoTokenizer, CLIPImageProcessor, LlavaForConditionalGeneration

    src, clip, original, vheads = write_checkpoint(tmp_path, tower, rows)
    dst = tmp_path / "hf"
    result = convert(src, dst, *(["--vision-tower", str(clip), "--dtype", "float32"] if tower == "flag" else []))
    assert result.exit_code == 0, result.output + repr(result.exception)
    spare = rows > TOKENS
    assert ("a spare row: nothing resized" in result.output) == spare
    assert "prompt template (medalign.json): huatuo" in result.output

    model, info = LlavaForConditionalGeneration.from_pretrained(str(dst), dtype=torch.float32, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    model.eval()
    cfg = model.config
    assert cfg.text_config.model_type == "qwen2" and cfg.text_config.rope_parameters["rope_theta"] == ROPE_THETA
    assert cfg.text_config.rms_norm_eps == RMS_EPS and not cfg.text_config.use_sliding_window
    assert cfg.vision_feature_layer == -2 and cfg.vision_feature_select_strategy == "default"
    assert cfg.projector_hidden_act == "gelu" and cfg.image_aspect_ratio == "pad" and cfg.image_seq_length == N_IMAGE
    assert cfg.vision_config.num_attention_heads == vheads
    assert cfg.converted_from["format"] == "huatuo"
    assert cfg.converted_from["vision_weights"] == ("checkpoint" if tower == "embedded" else str(clip))
    assert json.loads((dst / "medalign.json").read_text()) == {"template": "huatuo"}
    proc = CLIPImageProcessor.from_pretrained(str(dst))
    assert proc.crop_size == {"height": IMAGE, "width": IMAGE} and proc.image_aspect_ratio == "pad"
    if clip is not None:  # the tower folder's own processor (its mean colour pads the images)
        assert list(proc.image_mean) == [0.5, 0.25, 0.75]

    # Tokenizer: <image> is the added token after the last one; no BOS; <|endoftext|> ends answers.
    tok = AutoTokenizer.from_pretrained(str(dst))
    image_id = tok.convert_tokens_to_ids("<image>")
    assert image_id == TOKENS == cfg.image_token_id and len(tok) == TOKENS + 1
    assert image_id < cfg.text_config.vocab_size == max(rows, TOKENS + 1)
    assert tok.bos_token is None and tok.eos_token == "<|endoftext|>"
    assert tok("yes <image> no", add_special_tokens=True)["input_ids"] == (
        tok("yes ", add_special_tokens=False)["input_ids"] + [image_id] + tok(" no", add_special_tokens=False)["input_ids"])

    emb = model.get_input_embeddings().weight.detach()
    head = model.lm_head.weight.detach()
    assert emb.shape == head.shape == (max(rows, TOKENS + 1), D)
    torch.testing.assert_close(emb[:rows], original["model.embed_tokens.weight"], rtol=0, atol=0)
    torch.testing.assert_close(head[:rows], original["lm_head.weight"], rtol=0, atol=0)
    if not spare:
        torch.testing.assert_close(head[rows], original["lm_head.weight"].mean(0), rtol=1e-6, atol=1e-6)

    # The huatuo prompt (conv_huatuo_v1), tokenised on each side of <image> as the reference does.
    question = "Is there a mass?"
    prompt = f"{HUATUO_SYSTEM} <|user|>: <image>\n{question} <|assistant|>:"
    head_text, tail_text = prompt.split("<image>")
    before = tok(head_text, add_special_tokens=False)["input_ids"]
    after = tok(tail_text, add_special_tokens=False)["input_ids"]
    pixels = torch.randn(1, 3, IMAGE, IMAGE, generator=torch.Generator().manual_seed(7))
    ids = torch.tensor([before + [image_id] * N_IMAGE + after])
    out_dtype = torch.float32 if tower == "flag" else torch.bfloat16  # --dtype float32, else kept from the source
    ref_sd = {k: v.to(out_dtype).float() for k, v in original.items()}
    with torch.no_grad():
        logits = model(input_ids=ids, pixel_values=pixels).logits
        expected = ref_llava(ref_sd, before, after, pixels, vheads, layers=LAYERS, heads=HEADS, kv_heads=KV_HEADS,
                             theta=ROPE_THETA, eps=RMS_EPS)
        other = model(input_ids=ids, pixel_values=torch.zeros_like(pixels)).logits
    assert logits.shape == (1, len(before) + N_IMAGE + len(after), max(rows, TOKENS + 1))
    torch.testing.assert_close(logits[..., :rows], expected, rtol=1e-4, atol=1e-4)
    assert (other[0, -1] - logits[0, -1]).abs().max() > 1e-3  # the splice is not a no-op

    # Our generator reads the same prompt and stops at <|endoftext|>.
    from evaluation.generate import load_generator
    from student_train.inputs import encode_prompt

    gen = load_generator(dst)
    assert gen.template.name == "huatuo" and not gen.add_bos
    assert tok.convert_tokens_to_ids("<|endoftext|>") in gen.eos_ids
    assert encode_prompt(tok, gen.template, question, image_id, N_IMAGE, add_bos=gen.add_bos)[0] == ids[0].tolist()


def test_missing_tower_is_a_clean_error(tmp_path):
    src, clip, _, _ = write_checkpoint(tmp_path, "relative")
    for f in clip.iterdir():
        f.unlink()
    clip.rmdir()
    out = tmp_path / "o"
    r = convert(src, out)
    assert r.exit_code == 2
    assert "no vision tower weights" in r.output and "--vision-tower" in r.output
    assert f"mm_vision_tower {REL_TOWER!r} is not a folder" in r.output and str(src / REL_TOWER) in r.output
    assert not out.exists()


def test_conflicting_towers_are_refused(tmp_path):
    src, clip, _, _ = write_checkpoint(tmp_path, "relative")
    other = write_clip_folder(tmp_path / "other-clip", vision_weights(VH, 48, torch.Generator().manual_seed(3)), VH, 2)
    r = convert(src, tmp_path / "o", "--vision-tower", str(other))
    assert r.exit_code == 2 and "drop --vision-tower" in r.output and str(clip) in r.output
    assert not (tmp_path / "o").exists()
    assert convert(src, tmp_path / "o2", "--vision-tower", str(clip)).exit_code == 0  # the same folder is fine


def test_wrong_shape_and_missing_bias_are_named(tmp_path):
    from safetensors.torch import load_file

    src, _, _, _ = write_checkpoint(tmp_path, "embedded")
    index = json.loads((src / "model.safetensors.index.json").read_text())["weight_map"]
    key = "model.layers.1.self_attn.k_proj.bias"
    shard = src / index[key]
    sd = load_file(str(shard))
    sd[key] = torch.zeros(7, dtype=torch.bfloat16)
    save_file(sd, str(shard))
    r = convert(src, tmp_path / "o")
    assert r.exit_code == 2 and key in r.output and "[7]" in r.output and "disagree" in r.output
    assert not (tmp_path / "o").exists()

    del sd[key]  # a checkpoint without Qwen2's q/k/v biases (e.g. a Llama/Mistral decoder) is refused
    save_file(sd, str(shard))
    index.pop(key)
    (src / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": index}))
    r = convert(src, tmp_path / "o")
    assert r.exit_code == 2 and "no source" in r.output and "model.language_model.layers.1.self_attn.k_proj.bias" in r.output
    assert not (tmp_path / "o").exists()


def test_refuses_other_layouts(tmp_path):
    src, _, _, _ = write_checkpoint(tmp_path, "embedded")
    cfg = json.loads((src / "config.json").read_text())
    cfg["model_type"] = "llava_mistral"
    (src / "config.json").write_text(json.dumps(cfg))
    r = convert(src, tmp_path / "o")
    assert r.exit_code == 2 and "not a HuatuoGPT-Vision checkpoint" in r.output and "llava_qwen2" in r.output
    r = CliRunner().invoke(main, ["convert-model", "--from", "llava-med", str(src), "--out", str(tmp_path / "o")])
    assert r.exit_code == 2 and "_proj.bias" in r.output and "does not have" in r.output  # Mistral has no q/k/v biases
    assert not (tmp_path / "o").exists()
