"""``medalign-data convert-model --from llava-med``: a tiny random LLaVA-Med checkpoint written in the
ORIGINAL layout (llava_mistral config, original key names, an offline tokenizer) is converted, loaded
with ``LlavaForConditionalGeneration.from_pretrained`` and its logits compared with an independent
re-implementation of the original forward pass (CLIP hidden_states[-2] minus CLS -> Linear-GELU-Linear
-> spliced at the <image> position -> Mistral)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import save_file

from llava_reference import IMAGE, N_IMAGE, VP, language_weights, ref_llava, vision_weights, write_clip_folder

from student_train.convert.cli import main

V = 40          # tiny vocab; the <image> token becomes id V
D = 32          # Mistral hidden size
LAYERS = 2
HEADS, KV_HEADS = 4, 2
INTER = 64
ROPE_THETA = 1_000_000.0
RMS_EPS = 1e-5


# --- tiny offline tokenizer --------------------------------------------------------------------

def build_tiny_tokenizer(folder: Path) -> None:
    """A WordLevel tokenizer of exactly V tokens, wrapped in PreTrainedTokenizerFast and saved."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["<unk>", "<s>", "</s>"] + [f"w{i}" for i in range(V - 3)]
    tok = Tokenizer(models.WordLevel(vocab={w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    fast.save_pretrained(str(folder))


# --- tiny random checkpoint in the original LLaVA-Med layout ------------------------------------

def llava_mistral_config(mm_hidden: int) -> dict:
    return {
        "architectures": ["LlavaMistralForCausalLM"], "model_type": "llava_mistral", "_name_or_path": "tiny",
        "vocab_size": V, "hidden_size": D, "intermediate_size": INTER, "num_hidden_layers": LAYERS,
        "num_attention_heads": HEADS, "num_key_value_heads": KV_HEADS, "hidden_act": "silu",
        "max_position_embeddings": 128, "rms_norm_eps": RMS_EPS, "rope_theta": ROPE_THETA, "sliding_window": None,
        "tie_word_embeddings": False, "bos_token_id": 1, "eos_token_id": 2, "torch_dtype": "float32",
        "use_cache": False, "attention_dropout": 0.0,
        "mm_vision_tower": "openai/clip-vit-large-patch14-336", "mm_hidden_size": mm_hidden,
        "mm_projector_type": "mlp2x_gelu", "mm_vision_select_layer": -2, "mm_vision_select_feature": "patch",
        "mm_patch_merge_type": "flat", "mm_use_im_start_end": False, "mm_use_im_patch_token": False,
        "image_aspect_ratio": "pad", "tokenizer_model_max_length": 2048, "tokenizer_padding_side": "right",
        "freeze_mm_mlp_adapter": False, "tune_mm_mlp_adapter": False, "use_mm_proj": True,
    }


def write_checkpoint(root: Path, layout: str) -> tuple[Path, Path | None, dict, int]:
    """Write a tiny LLaVA-Med folder (and a CLIP folder when the tower is not embedded).

    ``layout``: ``embedded`` (vision weights inside, one model.safetensors, 64-dim heads so the
    tower's config is inferred from shapes) or ``clip-dir`` (no vision weights; two
    pytorch_model-*.bin shards + index; CLIPModel folder with its own config, 2 heads of 32).
    Returns (src, clip_dir, original state dict, vision heads).
    """
    gen = torch.Generator().manual_seed(0 if layout == "embedded" else 1)
    src = root / "llava-med"
    src.mkdir()
    vh, vheads = (64, 1) if layout == "embedded" else (64, 2)
    vis = vision_weights(vh, 48, gen)
    lang = language_weights(rows=V, d=D, layers=LAYERS, heads=HEADS, kv_heads=KV_HEADS, inter=INTER, mm_hidden=vh, gen=gen)
    (src / "config.json").write_text(json.dumps(llava_mistral_config(vh)))
    build_tiny_tokenizer(src)
    (src / "generation_config.json").write_text(json.dumps({"bos_token_id": 1, "eos_token_id": 2}))
    original = dict(lang)
    original.update({VP + k: v for k, v in vis.items()})
    if layout == "embedded":
        save_file(original, str(src / "model.safetensors"))
        return src, None, original, vheads
    keys = sorted(lang)
    halves = [keys[: len(keys) // 2], keys[len(keys) // 2:]]
    weight_map = {}
    for i, part in enumerate(halves):
        name = f"pytorch_model-{i + 1:05d}-of-00002.bin"
        torch.save({k: lang[k] for k in part}, src / name)
        weight_map.update({k: name for k in part})
    (src / "pytorch_model.bin.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    clip = write_clip_folder(root / "clip", vis, vh, vheads)
    return src, clip, original, vheads


def ref_llava_med(sd: dict, before: list[int], after: list[int], pixels: torch.Tensor, heads: int) -> torch.Tensor:
    """Original LLaVA-Med: CLIP -> projector -> spliced -> Mistral (no biases), written in llava_reference."""
    return ref_llava(sd, before, after, pixels, heads, layers=LAYERS, heads=HEADS, kv_heads=KV_HEADS,
                     theta=ROPE_THETA, eps=RMS_EPS)


# --- tests -------------------------------------------------------------------------------------

@pytest.mark.parametrize("layout", ["embedded", "clip-dir"])
def test_converted_logits_match_original_forward(tmp_path, layout):
    from transformers import AutoTokenizer, CLIPImageProcessor, LlavaForConditionalGeneration

    src, clip, original, vheads = write_checkpoint(tmp_path, layout)
    dst = tmp_path / "hf"
    args = ["convert-model", "--from", "llava-med", str(src), "--out", str(dst)]
    if clip is not None:
        args += ["--vision-tower", str(clip), "--max-shard-size", "0.00003"]  # ~30 kB: several shards
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output + repr(result.exception)
    assert "dropped buffer" in result.output

    model, info = LlavaForConditionalGeneration.from_pretrained(str(dst), dtype=torch.float32,
                                                                output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    model.eval()
    cfg = model.config
    tok = AutoTokenizer.from_pretrained(str(dst))
    assert len(tok) == V + 1 and tok.convert_tokens_to_ids("<image>") == V == cfg.image_token_id
    assert tok("w3 <image> w4")["input_ids"] == [6, V, 7]
    assert cfg.vision_feature_layer == -2 and cfg.vision_feature_select_strategy == "default"
    assert cfg.projector_hidden_act == "gelu" and cfg.image_aspect_ratio == "pad"
    assert cfg.text_config.vocab_size == V + 1 and cfg.text_config.rope_parameters["rope_theta"] == ROPE_THETA
    assert cfg.vision_config.num_attention_heads == vheads and cfg.image_seq_length == 4
    proc = CLIPImageProcessor.from_pretrained(str(dst))
    assert proc.crop_size == {"height": IMAGE, "width": IMAGE} and proc.image_aspect_ratio == "pad"
    if clip is not None:
        assert (dst / "model.safetensors.index.json").is_file()
        assert len(list(dst.glob("model-*-of-*.safetensors"))) > 1
    assert (dst / "generation_config.json").is_file()

    # The new embedding / lm_head rows are the mean of the old ones; the old rows are unchanged.
    emb = model.get_input_embeddings().weight.detach()
    head = model.lm_head.weight.detach()
    assert emb.shape == (V + 1, D) and head.shape == (V + 1, D)
    torch.testing.assert_close(emb[:V], original["model.embed_tokens.weight"], rtol=0, atol=0)
    torch.testing.assert_close(head[V], original["lm_head.weight"].mean(0), rtol=1e-6, atol=1e-6)

    gen = torch.Generator().manual_seed(7)
    pixels = torch.randn(1, 3, IMAGE, IMAGE, generator=gen)
    before, after = [1, 5, 9], [12, 3, 30]
    n_img = N_IMAGE
    ids = torch.tensor([before + [V] * n_img + after])
    with torch.no_grad():
        logits = model(input_ids=ids, pixel_values=pixels).logits
        expected = ref_llava_med(original, before, after, pixels, vheads)
    assert logits.shape == (1, len(before) + n_img + len(after), V + 1)
    torch.testing.assert_close(logits[..., :V], expected, rtol=1e-5, atol=1e-5)
    # The rows that follow the image really depend on it (the splice is not a no-op).
    with torch.no_grad():
        other = model(input_ids=ids, pixel_values=torch.zeros_like(pixels)).logits
    assert (other[0, -1] - logits[0, -1]).abs().max() > 1e-3


def test_missing_vision_tower_is_a_clean_error(tmp_path):
    src, _, _, _ = write_checkpoint(tmp_path, "clip-dir")
    result = CliRunner().invoke(main, ["convert-model", "--from", "llava-med", str(src), "--out", str(tmp_path / "o")])
    assert result.exit_code == 2
    assert "--vision-tower" in result.output and "clip-vit-large-patch14-336" in result.output


def test_refuses_non_llava_med_and_nonempty_output(tmp_path):
    src, clip, _, _ = write_checkpoint(tmp_path, "clip-dir")
    out = tmp_path / "busy"
    out.mkdir()
    (out / "x").write_text("x")
    r = CliRunner().invoke(main, ["convert-model", "--from", "llava-med", str(src), "--out", str(out),
                                  "--vision-tower", str(clip)])
    assert r.exit_code == 2 and "not empty" in r.output
    cfg = json.loads((src / "config.json").read_text())
    cfg["mm_projector_type"] = "linear"
    (src / "config.json").write_text(json.dumps(cfg))
    r = CliRunner().invoke(main, ["convert-model", "--from", "llava-med", str(src), "--out", str(tmp_path / "o2"),
                                  "--vision-tower", str(clip)])
    assert r.exit_code == 2 and "mm_projector_type='linear'" in r.output


def test_weights_disagreeing_with_config_are_refused(tmp_path):
    src, clip, _, _ = write_checkpoint(tmp_path, "clip-dir")
    cfg = json.loads((src / "config.json").read_text())
    cfg["intermediate_size"] = INTER * 2
    (src / "config.json").write_text(json.dumps(cfg))
    r = CliRunner().invoke(main, ["convert-model", "--from", "llava-med", str(src), "--out", str(tmp_path / "o"),
                                  "--vision-tower", str(clip)])
    assert r.exit_code == 2 and "mlp." in r.output and "disagree" in r.output
    assert not (tmp_path / "o").exists()


def test_sentencepiece_tokenizer_without_the_package_is_a_clean_error(tmp_path):
    import importlib.util

    if importlib.util.find_spec("sentencepiece") is not None:
        pytest.skip("sentencepiece is installed")
    src, clip, _, _ = write_checkpoint(tmp_path, "clip-dir")
    (src / "tokenizer.json").unlink()
    (src / "tokenizer.model").write_bytes(b"\x0a\x00")
    r = CliRunner().invoke(main, ["convert-model", "--from", "llava-med", str(src), "--out", str(tmp_path / "o"),
                                  "--vision-tower", str(clip)])
    assert r.exit_code == 2 and "pip install sentencepiece" in r.output
    assert not (tmp_path / "o").exists()  # nothing written before every check passed


def test_overwrite_replaces_earlier_shards(tmp_path):
    from transformers import LlavaForConditionalGeneration

    src, clip, original, _ = write_checkpoint(tmp_path, "clip-dir")
    out = tmp_path / "hf"
    base = ["convert-model", "--from", "llava-med", str(src), "--out", str(out), "--vision-tower", str(clip)]
    assert CliRunner().invoke(main, base + ["--max-shard-size", "0.00003"]).exit_code == 0
    assert (out / "model.safetensors.index.json").is_file()
    r = CliRunner().invoke(main, base + ["--overwrite", "--dtype", "bfloat16"])
    assert r.exit_code == 0, r.output
    assert sorted(p.name for p in out.glob("model*")) == ["model.safetensors"]
    model = LlavaForConditionalGeneration.from_pretrained(str(out))
    w = model.model.multi_modal_projector.linear_1.weight
    assert w.dtype == torch.bfloat16
    torch.testing.assert_close(w.float(), original["model.mm_projector.0.weight"].bfloat16().float(), rtol=0, atol=0)
