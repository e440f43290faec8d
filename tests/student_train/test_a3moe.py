"""A3MoE on a tiny LLaVA student: installing (plain model, PeftModel without q/k LoRA, bf16 base),
training forwards through ``moe_inputs`` (batch == per-sample, gradient checkpointing == plain,
every parameter gets a gradient, a DDP step), the balance loss, and the save/load round trip."""

from __future__ import annotations

import json

import pytest
import torch

from shared.errors import MedAlignError
from student_train import a3moe as M
from student_train import inputs as I
from student_train.data import collate
from student_train.model import load_student
from student_train.templates import get_template

QUESTIONS = [("Is there a mass?", "yes"), ("Where is the lesion located in the left upper lobe?", "the left lung")]


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def randomise(handles, seed: int = 0, scale: float = 0.5) -> None:
    """Non-zero B (a trained-looking MoE) and sharper routers."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in handles.modules():
            m.moe_b.copy_(torch.randn(m.moe_b.shape, generator=g) * scale)
            if m.moe_router is not None:
                m.moe_router.weight.mul_(10.0)


def samples(model, tokenizer, qa=QUESTIONS, seed: int = 0):
    tmpl = get_template("vicuna_v1")
    img, n = int(model.config.image_token_id), M.unwrap(model).config.image_seq_length
    out = []
    g = torch.Generator().manual_seed(seed)
    for q, a in qa:
        it = I.expand(I.encode_sample(tokenizer, tmpl, q, a, img), img, n)
        it["pixel_values"] = torch.randn(3, 32, 32, generator=g)
        out.append(it)
    return out


def forward(model, batch):
    with M.moe_inputs(model, question_mask=batch["query_mask"]):
        return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                     pixel_values=batch["pixel_values"], labels=batch.get("labels"), use_cache=False)


@pytest.fixture
def moe_model(tiny_llama_dir):
    model, tok = load_student(tiny_llama_dir)
    h = M.install_moe(model, M.MoeSettings(dropout=0.0))
    randomise(h)
    model.eval()
    return model, tok, h


def test_presets_and_settings_json():
    assert M.MOE_PRESETS["vqa"] == M.MoeSettings(q_experts=8, k_experts=16, k_top_k=1, r=16, alpha=8.0)
    assert M.MOE_PRESETS["report"] == M.MoeSettings(q_experts=1, k_experts=8, k_top_k=2)
    s = M.MoeSettings(reference_sparse=True, k_top_k=2)
    assert M.MoeSettings.from_json(json.loads(json.dumps(s.to_json()))) == s
    with pytest.raises(MedAlignError):
        M.MoeSettings(k_experts=2, k_top_k=3)
    with pytest.raises(MedAlignError):
        M.MoeSettings.from_json({"q_experts": 2, "bogus": 1})


def test_install_on_every_layer(moe_model):
    model, _, h = moe_model
    layers = model.model.language_model.layers
    assert len(h.q) == len(h.k) == len(layers)
    for i, layer in enumerate(layers):
        assert layer.self_attn.q_proj is h.q[i] and layer.self_attn.k_proj is h.k[i]
        assert h.q[i].moe_a.shape == (8, 16, 64) and h.k[i].moe_b.shape == (16, 32, 16)
    assert all(p.dtype == torch.float32 and p.requires_grad for p in h.parameters())
    with pytest.raises(RuntimeError):
        M.install_moe(model, M.MoeSettings())


def test_install_on_a_peft_model_without_q_k_lora(tiny_llama_dir):
    from peft import LoraConfig, get_peft_model

    model, _ = load_student(tiny_llama_dir, dtype=torch.bfloat16)
    for p in model.parameters():
        p.requires_grad_(False)
    peft = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=r".*language_model.*\.(v_proj|o_proj)"))
    h = M.install_moe(peft, M.MOE_PRESETS["report"])
    assert M.get_moe(peft) is h
    assert all(p.dtype == torch.float32 for p in h.parameters())
    trainable = {n for n, p in peft.named_parameters() if p.requires_grad}
    assert any("q_proj.moe_a" in n for n in trainable) and any("v_proj.lora_A" in n for n in trainable)
    assert not any(".base." in n for n in trainable)
    model2, _ = load_student(tiny_llama_dir)
    with_q = get_peft_model(model2, LoraConfig(r=4, target_modules=r".*language_model.*\.q_proj"))
    with pytest.raises(MedAlignError, match="q_proj"):
        M.install_moe(with_q, M.MoeSettings())


def test_bf16_base_forward(tiny_llama_dir):
    model, tok = load_student(tiny_llama_dir, dtype=torch.bfloat16)
    h = M.install_moe(model, M.MoeSettings(dropout=0.0))
    randomise(h)
    model.eval()
    batch = collate(samples(model, tok), pad_id=tok.pad_token_id)
    batch["pixel_values"] = batch["pixel_values"].bfloat16()
    out = forward(model, batch)
    assert out.logits.dtype == torch.bfloat16 and torch.isfinite(out.loss)


def test_batch_of_two_equals_two_single_forwards(moe_model):
    model, tok, h = moe_model
    items = samples(model, tok)
    batch = collate(items, pad_id=tok.pad_token_id)
    both = forward(model, batch).logits
    routing = {i: g.clone() for i, g in h.state.q_routing.items()}
    for b, it in enumerate(items):
        one = forward(model, collate([it], pad_id=tok.pad_token_id)).logits[0]
        n = len(it["input_ids"])
        torch.testing.assert_close(both[b, :n], one, rtol=1e-4, atol=1e-4)
        for i, g in h.state.q_routing.items():
            torch.testing.assert_close(routing[i][b], g[0], rtol=1e-5, atol=1e-6)


def test_routing_uses_exactly_the_question_tokens(moe_model):
    """The q router reads the mean of the q_proj input over query_mask; changing a token outside
    the question but before it (the system prompt) changes the hidden states, not which rows count."""
    model, tok, h = moe_model
    it = samples(model, tok)[0]
    batch = collate([it], pad_id=tok.pad_token_id)
    seen = {}
    handle = model.model.language_model.layers[1].self_attn.q_proj.register_forward_pre_hook(
        lambda _m, a: seen.setdefault("x", a[0].detach().clone()))
    forward(model, batch)
    handle.remove()
    m = h.q[1]
    qm = it["query_mask"]
    want = torch.softmax(m.moe_router(seen["x"][0, qm].float().mean(0)), -1)
    torch.testing.assert_close(h.state.q_routing[1][0], want, rtol=1e-5, atol=1e-6)
    # the mask is the prompt tail after the image: starts right after the last image token, ends before the answer
    img = int(model.config.image_token_id)
    ids = it["input_ids"]
    last_img = int(torch.nonzero(ids == img).max())
    first_ans = int(torch.nonzero(it["labels"] != I.IGNORE_INDEX).min())
    assert torch.nonzero(qm).flatten().tolist() == list(range(last_img + 1, first_ans))


def test_training_forward_without_moe_inputs_is_an_error(moe_model):
    model, tok, _ = moe_model
    model.train()
    batch = collate(samples(model, tok), pad_id=tok.pad_token_id)
    with pytest.raises(RuntimeError, match="moe_inputs"):
        model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
              pixel_values=batch["pixel_values"], use_cache=False)


def _grads(model, tok, h, checkpointing: bool):
    from student_train.model import enable_gradient_checkpointing

    model.train()
    if checkpointing:
        enable_gradient_checkpointing(model)
    batch = collate(samples(model, tok), pad_id=tok.pad_token_id)
    model.zero_grad(set_to_none=True)
    out = forward(model, batch)  # the backward below runs after the moe_inputs block
    loss = out.loss + 0.5 * M.balance_loss(model)
    loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad and p.grad is not None}, loss


def test_gradient_checkpointing_gives_the_same_gradients(tiny_llama_dir):
    results = []
    for ckpt in (False, True):
        model, tok = load_student(tiny_llama_dir)
        for p in model.parameters():
            p.requires_grad_(False)
        torch.manual_seed(0)
        h = M.install_moe(model, M.MoeSettings(dropout=0.0))
        randomise(h)
        results.append(_grads(model, tok, h, ckpt))
    (g0, l0), (g1, l1) = results
    torch.testing.assert_close(l0, l1)
    assert g0.keys() == g1.keys() and len(g0) == len(h.parameters())
    for n in g0:
        torch.testing.assert_close(g0[n], g1[n], rtol=1e-4, atol=1e-6, msg=n)


def test_every_expert_gets_a_gradient_and_the_balance_loss_reaches_the_key_routers(tiny_llama_dir):
    model, tok = load_student(tiny_llama_dir)
    for p in model.parameters():
        p.requires_grad_(False)
    h = M.install_moe(model, M.MoeSettings(k_experts=16, k_top_k=1, reference_sparse=True))
    randomise(h)
    model.train()
    batch = collate(samples(model, tok)[:1], pad_id=tok.pad_token_id)
    forward(model, batch)
    bal = M.balance_loss(model)
    assert bal.ndim == 0 and float(bal.detach()) > 0
    bal.backward()
    for m in h.k:
        assert float(m.moe_router.weight.grad.abs().sum()) > 0  # their router learns from the balance loss only
    model.zero_grad(set_to_none=True)
    out = forward(model, batch)
    out.loss.backward()
    assert all(p.grad is not None for p in h.parameters())  # unchosen experts: connected zeros (DDP)
    assert all(float(m.moe_router.weight.grad.abs().sum()) == 0 for m in h.k)  # theirs: no gate, no LM gradient


def test_balance_loss_without_an_image_forward_is_a_connected_zero(moe_model):
    model, _, h = moe_model
    h.state.clear()
    z = M.balance_loss(model)
    assert float(z.detach()) == 0.0 and z.requires_grad


def test_ddp_step_with_unchosen_experts(tiny_llama_dir, tmp_path):
    """Two steps in a one-process gloo DDP without find_unused_parameters: a parameter without a
    gradient in step 1 would make step 2 fail."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    model, tok = load_student(tiny_llama_dir)
    for p in model.parameters():
        p.requires_grad_(False)
    h = M.install_moe(model, M.MoeSettings(k_experts=16))
    randomise(h)
    model.train()
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    try:
        ddp = DDP(model)
        batch = collate(samples(model, tok)[:1], pad_id=tok.pad_token_id)
        for _ in range(2):
            with M.moe_inputs(ddp, question_mask=batch["query_mask"]):
                out = ddp(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                          pixel_values=batch["pixel_values"], labels=batch["labels"], use_cache=False)
            (out.loss + 0.01 * M.balance_loss(ddp)).backward()
    finally:
        dist.destroy_process_group()


def test_save_load_round_trip_gives_identical_logits(tiny_llama_dir, tmp_path, moe_model):
    model, tok, h = moe_model
    batch = collate(samples(model, tok), pad_id=tok.pad_token_id)
    want = forward(model, batch).logits
    M.save_moe(model, tmp_path)
    meta = json.loads((tmp_path / M.MOE_CONFIG).read_text())
    assert meta["settings"] == h.settings.to_json() and (tmp_path / M.MOE_WEIGHTS).is_file()
    fresh, _ = load_student(tiny_llama_dir)
    fresh.eval()
    assert M.load_moe(fresh, tmp_path).settings == h.settings
    torch.testing.assert_close(forward(fresh, batch).logits, want, rtol=0, atol=0)
    assert M.load_moe(fresh, tmp_path / "nothing") is None


def test_load_errors(tiny_llama_dir, tmp_path, moe_model):
    model, _, _ = moe_model
    M.save_moe(model, tmp_path)
    other, _ = load_student(tiny_llama_dir)
    M.install_moe(other, M.MoeSettings(k_experts=4))
    with pytest.raises(MedAlignError, match="other settings"):
        M.load_moe(other, tmp_path)
    (tmp_path / M.MOE_WEIGHTS).unlink()
    with pytest.raises(MedAlignError, match="moe.safetensors"):
        M.load_moe(load_student(tiny_llama_dir)[0], tmp_path)
    (tmp_path / M.MOE_CONFIG).write_text("{not json")
    with pytest.raises(MedAlignError, match="moe.json"):
        M.load_moe(load_student(tiny_llama_dir)[0], tmp_path)
