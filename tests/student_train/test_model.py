"""The prepared student: LoRA placement, W = 0 identity, gradients, checkpointing, prefill-only
rotation, save/load round trip, and the user-facing errors."""

from __future__ import annotations

import json

import pytest
import torch
from peft import PeftModel
from transformers import LlamaConfig, LlavaForConditionalGeneration

from shared.errors import MedAlignError
from student_train.alignment import ATTN_IMPL, get_handles, unwrap
from student_train.config import AlignArgs, LoraArgs
from student_train.model import (
    compute_losses,
    enable_gradient_checkpointing,
    load_student,
    load_trained,
    num_image_tokens,
    num_layers,
    param_groups,
    prepare_student,
    save_trained,
)

LAYER = 2
NO_DROPOUT = LoraArgs(lora_r=4, lora_alpha=8, lora_dropout=0.0)


def prepared(student_dir, *, alpha=1.0, beta=1.0, train_projector=True, w_std=0.0, b_std=0.0, seed=0):
    model, _ = load_student(student_dir)
    align = AlignArgs(align_layer=LAYER, alpha=alpha, beta=beta)
    model = prepare_student(model, NO_DROPOUT, align, train_projector=train_projector)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        handles = get_handles(model)
        if w_std and handles is not None:
            handles.rotation.weight.copy_(torch.randn(handles.rotation.weight.shape, generator=g) * w_std)
        if b_std:
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.copy_(torch.randn(p.shape, generator=g) * b_std)
    return model, align


def logits_of(model, batch):
    with torch.no_grad():
        return model(
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], pixel_values=batch["pixel_values"]
        ).logits


def test_sizes(tiny_llama_dir):
    model, tok = load_student(tiny_llama_dir)
    assert num_image_tokens(model) == 16 and num_layers(model) == 4
    assert tok.convert_tokens_to_ids("<image>") == model.config.image_token_id


def test_lora_only_on_language_model_linears(tiny_qwen2_dir):
    model, _ = prepared(tiny_qwen2_dir, train_projector=False)
    base = unwrap(model)
    wrapped = {n.rsplit(".lora_A", 1)[0] for n, _ in base.named_modules() if n.endswith("lora_A")}
    lm_linears = {
        n
        for n, m in LlavaForConditionalGeneration.from_pretrained(tiny_qwen2_dir).named_modules()
        if isinstance(m, torch.nn.Linear) and n.startswith("model.language_model.")
    }
    assert wrapped == lm_linears and len(lm_linears) == 4 * 7
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert all("lora_" in n or "medalign_rotation" in n for n in trainable)
    assert sum("medalign_rotation" in n for n in trainable) == 1
    assert not any("vision_tower" in n or "multi_modal_projector" in n or "lm_head" in n for n in trainable)
    assert [g["name"] for g in param_groups(model, 1e-3, 0.0)] == ["lora"]


def test_projector_trainable_and_grouped(tiny_llama_dir):
    model, _ = prepared(tiny_llama_dir, train_projector=True)
    groups = {g["name"]: g for g in param_groups(model, 2e-4, 2e-5)}
    assert groups["projector"]["lr"] == 2e-5 and groups["lora"]["lr"] == 2e-4
    assert len(groups["projector"]["params"]) == 4  # linear_1/linear_2 weight + bias
    w = get_handles(model).rotation.weight
    assert any(p is w for p in groups["lora"]["params"]) and w.dtype == torch.float32


@pytest.mark.parametrize("backbone", ["llama", "mistral", "qwen2"])
def test_zero_w_leaves_forward_unchanged(tiny_student_dirs, tiny_make_batch, backbone):
    base = LlavaForConditionalGeneration.from_pretrained(tiny_student_dirs[backbone]).eval()
    model, _ = prepared(tiny_student_dirs[backbone])
    model.eval()
    assert unwrap(model).config.text_config._attn_implementation == ATTN_IMPL
    batch = tiny_make_batch(base, [30, 25, 27], [2, 4, 0], seed=1)
    ref = logits_of(base, batch)
    torch.testing.assert_close(logits_of(model, batch), ref, rtol=0, atol=1e-6)
    with torch.no_grad():  # a non-zero W does change it (the comparison can fail)
        get_handles(model).rotation.weight.normal_(0, 0.1)
    assert (logits_of(model, batch) - ref).abs().max() > 1e-3


def test_plain_lora_needs_no_teacher_and_installs_nothing(tiny_llama_dir, tiny_make_batch):
    model, align = prepared(tiny_llama_dir, alpha=0.0, beta=0.0)
    assert get_handles(model) is None
    assert unwrap(model).config.text_config._attn_implementation == "sdpa"
    batch = tiny_make_batch(model, [30, 26], [1, 3])
    for key in ("teacher_sim", "teacher_attn", "teacher_mask", "query_mask"):
        batch.pop(key)
    out = compute_losses(model, batch, align)
    assert out["vis_loss"].item() == 0.0 and out["att_loss"].item() == 0.0
    assert out["loss"].item() == pytest.approx(out["lm_loss"].item())


def test_capture_skipped_when_beta_zero(tiny_llama_dir, tiny_make_batch):
    model, align = prepared(tiny_llama_dir, alpha=1.0, beta=0.0)
    handles = get_handles(model)
    assert not handles.capture and unwrap(model).config.text_config._attn_implementation == "sdpa"
    out = compute_losses(model, tiny_make_batch(model, [30, 26], [1, 3]), align)
    assert out["att_loss"].item() == 0.0 and out["vis_loss"].item() > 0
    assert handles.state.attn is None


def grads(model, batch, align, only=None):
    model.zero_grad(set_to_none=True)
    out = compute_losses(model, batch, align)
    (out[only] if only else out["loss"]).backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad and p.grad is not None}


def test_gradients_reach_w_and_lora(tiny_mistral_dir, tiny_make_batch):
    model, align = prepared(tiny_mistral_dir, w_std=0.05)
    model.train()
    batch = tiny_make_batch(model, [30, 25], [2, 5], n_query=[4, 3], seed=4)
    g = grads(model, batch, align)
    w_name = next(n for n in g if "medalign_rotation" in n)
    assert g[w_name].abs().sum() > 0
    # LoRA B starts at zero: B gets gradient, A does not (yet)
    b_names = [n for n in g if "lora_B" in n]
    assert len(b_names) == 28 and all(g[n].abs().sum() > 0 for n in b_names)
    assert all(g[n].abs().sum() == 0 for n in g if "lora_A" in n)
    # once B is non-zero, A gets gradient too
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.02)
    g = grads(model, batch, align)
    assert all(g[n].abs().sum() > 0 for n in g if "lora_A" in n)
    # each auxiliary loss alone: L_vis reaches W; L_att reaches the q/k LoRA of layers[l] and W
    g_vis = grads(model, batch, align, only="vis_loss")
    assert g_vis[w_name].abs().sum() > 0
    g_att = grads(model, batch, align, only="att_loss")
    q_name = f"layers.{LAYER}.self_attn.q_proj.lora_B"
    assert sum(v.abs().sum() for n, v in g_att.items() if q_name in n) > 0
    assert g_att[w_name].abs().sum() > 0
    assert all(v.abs().sum() == 0 for n, v in g_att.items() if f"layers.{LAYER + 1}." in n)


@pytest.mark.parametrize("backbone", ["llama", "qwen2"])
def test_gradient_checkpointing_same_gradients(tiny_student_dirs, tiny_make_batch, backbone):
    model, align = prepared(tiny_student_dirs[backbone], w_std=0.05, b_std=0.02)
    model.train()
    batch = tiny_make_batch(model, [30, 25, 28], [2, 5, 0], n_query=[4, 3, 6], teacher=[True, True, False])
    align = AlignArgs(align_layer=LAYER, alpha=1.0, beta=0.5)
    plain = grads(model, batch, align)
    enable_gradient_checkpointing(model)
    assert unwrap(model).model.language_model.gradient_checkpointing
    ckpt = grads(model, batch, align)
    assert plain.keys() == ckpt.keys()
    for n in plain:
        torch.testing.assert_close(ckpt[n], plain[n], rtol=1e-4, atol=1e-7, msg=n)
    att_only = grads(model, batch, align, only="att_loss")  # L_att's own gradient survives checkpointing
    assert sum(v.abs().sum() for n, v in att_only.items() if f"layers.{LAYER}.self_attn.k_proj" in n) > 0


def test_rotation_applied_at_prefill_only(tiny_llama_dir, tiny_make_batch):
    model, _ = prepared(tiny_llama_dir, w_std=0.2)
    model.eval()
    handles = get_handles(model)
    calls = []
    hook = handles.rotation.register_forward_hook(lambda m, a, o: calls.append(a[0].shape[0]))
    batch = tiny_make_batch(model, [26], [1])
    ids = batch["input_ids"][:, :24]
    with torch.no_grad():
        gen = model.generate(
            input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values=batch["pixel_values"],
            max_new_tokens=4, do_sample=False,
        )
    assert gen.shape[1] == 28
    assert calls == [16]  # once, at the prefill, on the 16 visual rows; not on the 3 decoding steps
    # the cached decoding equals a full no-cache recompute (the rotation applied once per position)
    with torch.no_grad():
        full = model(input_ids=gen[:, :-1], pixel_values=batch["pixel_values"], use_cache=False).logits
    assert torch.equal(full[0, 23:].argmax(-1), gen[0, 24:])
    hook.remove()


def test_a_generated_image_token_is_not_rotated(tiny_llama_dir, tiny_make_batch):
    """The image positions come from the prompt, never from the growing sequence: a decoding step
    (a forward with a filled cache) whose one new token is the image token id is not rotated."""
    from transformers import DynamicCache

    model, _ = prepared(tiny_llama_dir, w_std=0.2)
    model.eval()
    handles = get_handles(model)
    calls = []
    hook = handles.rotation.register_forward_hook(lambda m, a, o: calls.append(a[0].shape[0]))
    batch = tiny_make_batch(model, [26], [1])
    ids = batch["input_ids"][:, :24]
    image_id = int(model.config.image_token_id)
    cache = DynamicCache()
    with torch.no_grad():
        model(input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values=batch["pixel_values"],
              cache=cache, use_cache=True)
        assert calls == [16]
        step = torch.tensor([[image_id]])
        model(input_ids=step, attention_mask=torch.ones(1, 25, dtype=torch.long), cache=cache,
              use_cache=True)
    assert calls == [16], "a decoding step's generated image token was rotated"
    hook.remove()


def test_save_and_load_trained_round_trip(tiny_qwen2_dir, tiny_make_batch, tmp_path):
    model, align = prepared(tiny_qwen2_dir, w_std=0.05, b_std=0.05, train_projector=True)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "multi_modal_projector" in n and p.requires_grad:
                p.add_(0.1)
    model.eval()
    batch = tiny_make_batch(model, [30, 25], [2, 4], seed=7)
    want = logits_of(model, batch)
    save_trained(model, tmp_path / "run")
    files = {p.name for p in (tmp_path / "run").iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors", "rotation.safetensors", "rotation.json"} <= files
    meta = json.loads((tmp_path / "run" / "rotation.json").read_text())
    assert meta == {"layer": LAYER, "eps": 1.0, "hidden_size": 64}
    for merge in (False, True):
        loaded, tok = load_trained(tiny_qwen2_dir, tmp_path / "run", merge=merge)
        assert get_handles(loaded).rotation.weight.dtype == torch.float32
        torch.testing.assert_close(logits_of(loaded, batch), want, rtol=1e-4, atol=1e-5)
    # the adapter alone is a standard PEFT adapter (W comes from rotation.safetensors, not from it)
    plain = PeftModel.from_pretrained(LlavaForConditionalGeneration.from_pretrained(tiny_qwen2_dir), tmp_path / "run")
    assert (logits_of(plain.eval(), batch) - want).abs().max() > 1e-4  # W missing -> different


def test_align_layer_out_of_range(tiny_llama_dir):
    model, _ = load_student(tiny_llama_dir)
    for bad in (4, 7):
        with pytest.raises(MedAlignError, match=r"valid values are 1\.\.3"):
            prepare_student(model, NO_DROPOUT, AlignArgs(align_layer=bad), train_projector=False)
    with pytest.raises(MedAlignError, match=">= 1"):
        AlignArgs(align_layer=0)


@pytest.mark.parametrize(
    "kwargs, match",
    [({"att_norm": "max"}, "valid: l2, sum, softmax"), ({"alpha": -1.0}, ">= 0"), ({"att_clamp": 0.0}, "> 0")],
)
def test_align_config_validation(kwargs, match):
    with pytest.raises(MedAlignError, match=match):
        AlignArgs(**kwargs)


def test_non_llava_directory_is_refused(tmp_path):
    LlamaConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32).save_pretrained(tmp_path)
    with pytest.raises(MedAlignError, match="is not a LLaVA model .*'llama'"):
        load_student(tmp_path)
    with pytest.raises(MedAlignError, match="does not exist"):
        load_student(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(MedAlignError, match="no config.json"):
        load_student(tmp_path / "empty")


def test_incomplete_model_and_adapter_folders_name_the_missing_file(tiny_llama_dir, tmp_path):
    """A config.json without weights, an adapter_config.json without weights: one clear line, not a
    transformers/PEFT traceback."""
    import shutil

    broken = tmp_path / "model"
    shutil.copytree(tiny_llama_dir, broken)
    for f in broken.glob("model*.safetensors*"):
        f.unlink()
    with pytest.raises(MedAlignError, match=r"has a config.json but no weights \(none of model.safetensors"):
        load_student(broken)
    run = tmp_path / "run"
    run.mkdir()
    (run / "adapter_config.json").write_text("{}")
    with pytest.raises(MedAlignError, match=r"has adapter_config.json but no adapter weights"):
        load_trained(tiny_llama_dir, run)
