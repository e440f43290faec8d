"""A3MoE (A3Tune's ``moe_llava.py``): LoRA-expert mixtures on every language layer's q_proj and k_proj.

* :class:`MoeSettings`, :data:`MOE_PRESETS` (``vqa``: q 8 experts dense, k 16 experts top-1, as
  their VQA scripts; ``report``: q 1 expert (a plain LoRA), k 8 experts top-2, as their report
  scripts); r 16, alpha 8, dropout 0.05 (their ``LoRALayer`` takes ``--lora_dropout``, 0.05).
* :func:`install_moe` replaces each ``self_attn.q_proj`` / ``k_proj`` ``nn.Linear`` (of a plain
  ``LlavaForConditionalGeneration`` or of a ``PeftModel`` whose LoRA excludes them) by a
  :class:`student_train.a3moe_layers.MoeLinear` (the maths are in that module's docstring).
* Routing inputs. Training wraps its forward in :func:`moe_inputs` (the question mask: the
  ``query_mask`` of :func:`student_train.inputs.expand`, i.e. the prompt tokens after the image up
  to the answer -- the newline after the image, the question and the template's tail such as
  ``" ASSISTANT:"``; the image mask: ``input_ids == image_token_id`` unless given). A forward
  outside it (generation) locates both from the tokens: the image tokens are ``input_ids ==
  image_token_id`` (or the mask of :func:`image_positions` for an ``inputs_embeds`` forward), the
  question tokens every attended position after the row's last image token -- exactly the
  ``query_mask`` of the same prompt, since generation prompts end where the answer starts; a row
  with no image token (a text-only branch) routes by all its attended tokens.
* Generation. The prefill (a forward whose KV cache is empty) computes the q routing [L, B, E]
  and keeps it ON the KV cache object it filled; a decoding step (cache non-empty) routes every
  q_proj by it, and the k experts do nothing (no image token is ever in a step: the image keys
  were made at the prefill and sit in the cache). The cache's ``reorder_cache`` /
  ``batch_select_indices`` / ``batch_repeat_interleave`` carry the routing along, so beam search
  (which expands the prompt before its prefill and reorders the cache per step) and any
  branch's ``select`` keep each row's routing with its keys; every decoding branch has its own
  cache, hence its own routing.
* :func:`balance_loss`: v1's ``llava.py`` on the k routers of the last forward, per sample ``b``:
  ``sum_e mean(p_e) * mean(h_e)`` over all layers and b's image tokens (``h`` the 0/1 top-k
  choice), averaged over the samples with image tokens (no factor E, as theirs).
* :func:`save_moe` / :func:`load_moe`: ``moe.safetensors`` (fp32) + ``moe.json``.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch
import torch.nn as nn

from shared.errors import MedAlignError
from student_train.a3moe_layers import MoeLinear, MoeState
from student_train.alignment import decoder_layers, unwrap

MOE_WEIGHTS = "moe.safetensors"
MOE_CONFIG = "moe.json"
MOE_FORMAT = 1
_CACHE_ATTR = "_a3moe_routing"


@dataclass(frozen=True)
class MoeSettings:
    """The experts on q_proj and k_proj (defaults: the authors' VQA scripts)."""

    q_experts: int = 8
    """Experts on every q_proj (1: a plain LoRA on every token)."""
    q_top_k: int = 0
    """0: the dense mixture, every token, routed per sample (what all their scripts run); k > 0: only
    the sample's top-k experts (their non-dense branch)."""
    k_experts: int = 16
    """Experts on every k_proj, on the image tokens only."""
    k_top_k: int = 1
    """Experts per image token (token-level routing)."""
    r: int = 16
    """Rank of every expert."""
    alpha: float = 8.0
    """LoRA alpha of every expert (scaling alpha / r)."""
    dropout: float = 0.05
    """Dropout on each expert's input (theirs: ``--lora_dropout``, 0.05)."""
    reference_sparse: bool = False
    """The authors' k forward: no gate multiply, and with top-k > 1 the last expert overwrites."""

    def __post_init__(self):
        if self.q_experts < 1 or self.k_experts < 1:
            raise MedAlignError(f"A3MoE: q_experts and k_experts must be >= 1, got {self.q_experts}, {self.k_experts}")
        if not 0 <= self.q_top_k <= self.q_experts:
            raise MedAlignError(f"A3MoE: q_top_k must be in 0..{self.q_experts} (0: dense), got {self.q_top_k}")
        if not 1 <= self.k_top_k <= self.k_experts:
            raise MedAlignError(f"A3MoE: k_top_k must be in 1..{self.k_experts}, got {self.k_top_k}")
        if self.r < 1 or not self.alpha > 0 or not 0 <= self.dropout < 1:
            raise MedAlignError(f"A3MoE: bad r {self.r} / alpha {self.alpha} / dropout {self.dropout}")

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, d: dict) -> MoeSettings:
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise MedAlignError(f"A3MoE settings: unknown keys {sorted(unknown)}")
        return cls(**d)


MOE_PRESETS = {"vqa": MoeSettings(), "report": MoeSettings(q_experts=1, k_experts=8, k_top_k=2)}


@dataclass
class MoeHandles:
    """What :func:`install_moe` attached (kept on the bare model as ``_a3moe``)."""

    settings: MoeSettings
    state: MoeState
    q: list[MoeLinear]
    k: list[MoeLinear]
    image_token_id: int
    hooks: list

    def modules(self) -> list[MoeLinear]:
        return self.q + self.k

    def parameters(self) -> list[nn.Parameter]:
        return [p for m in self.modules() for n, p in m.named_parameters() if not n.startswith("base.")]


def get_moe(model: nn.Module) -> MoeHandles | None:
    return getattr(unwrap(model), "_a3moe", None)


# --------------------------------------------------------------------------- routing inputs


def _cache_of(kwargs: dict):
    return kwargs.get("cache", kwargs.get("past_key_values"))


def _cache_len(cache) -> int:
    if cache is None or not hasattr(cache, "get_seq_length"):
        return 0
    return int(cache.get_seq_length())


def locate_question(image_mask: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
    """[B, T] bool: the attended positions after each row's last image token (all attended
    positions of a row without one)."""
    t = image_mask.shape[1]
    idx = torch.arange(t, device=image_mask.device)
    last = torch.where(image_mask, idx, torch.full_like(idx, -1)).max(dim=1).values
    q = idx[None, :] > last[:, None]
    if attention_mask is not None:
        q = q & attention_mask.to(q.device).bool()
    return q


def _pre_hook(handles: MoeHandles, module, args, kwargs):
    st = handles.state
    st.clear()
    cache = _cache_of(kwargs)
    if _cache_len(cache) > 0:  # a decoding step: the prefill's routing, no image tokens
        if handles.settings.q_experts > 1:
            routing = getattr(cache, _CACHE_ATTR, None)
            if routing is None:
                raise RuntimeError("A3MoE: this KV cache was filled without the MoE's routing (prefill first)")
            st.fixed_routing = routing
        return
    ids = kwargs.get("input_ids", args[0] if args else None)
    embeds = kwargs.get("inputs_embeds")
    shape = tuple(ids.shape) if ids is not None else tuple(embeds.shape[:2])
    if st.pending is not None:
        qm, im = st.pending
        if im is None:
            if ids is None:
                raise MedAlignError("A3MoE: moe_inputs without image_mask needs a forward with input_ids")
            im = ids == handles.image_token_id
    else:
        if module.training:
            raise RuntimeError("A3MoE: a training forward must run inside a3moe.moe_inputs(...)")
        if ids is not None:
            im = ids == handles.image_token_id
        elif st.embeds_image is not None:
            im = st.embeds_image
        else:
            im = torch.zeros(shape, dtype=torch.bool, device=embeds.device)
        qm = locate_question(im, kwargs.get("attention_mask"))
    if tuple(qm.shape) != shape or tuple(im.shape) != shape:
        raise MedAlignError(f"A3MoE: question/image masks {tuple(qm.shape)}/{tuple(im.shape)} do not match "
                            f"the forward's [B, T] = {list(shape)}")
    st.question_mask, st.image_mask = qm.bool(), im.bool()
    st.image_rows = torch.nonzero(st.image_mask)[:, 0]


def _carry(cache, name: str, transform) -> None:
    original = getattr(cache, name, None)
    if original is None:
        return

    def wrapped(arg, *a, **kw):
        out = original(arg, *a, **kw)
        routing = getattr(cache, _CACHE_ATTR, None)
        if routing is not None:
            setattr(cache, _CACHE_ATTR, transform(routing, arg))
        return out

    setattr(cache, name, wrapped)


def _post_hook(handles: MoeHandles, module, args, kwargs, output):
    st = handles.state
    if st.fixed_routing is not None or handles.settings.q_experts == 1:
        return
    cache = getattr(output, "past_key_values", None)
    cache = _cache_of(kwargs) if cache is None else cache
    if cache is None or not st.q_routing:
        return
    routing = torch.stack([st.q_routing[m.layer] for m in handles.q]).detach()  # [L, B, E]
    if not getattr(cache, "_a3moe_carried", False):
        select = (lambda r, idx: r.index_select(1, torch.as_tensor(idx, device=r.device).long()))
        _carry(cache, "reorder_cache", select)
        _carry(cache, "batch_select_indices", select)
        _carry(cache, "batch_repeat_interleave", lambda r, n: r.repeat_interleave(int(n), dim=1))
        cache._a3moe_carried = True
    setattr(cache, _CACHE_ATTR, routing)
    return


@contextlib.contextmanager
def moe_inputs(model: nn.Module, *, question_mask: torch.Tensor,
               image_mask: torch.Tensor | None = None) -> Iterator[None]:
    """The routing inputs of the forwards inside the block: ``question_mask`` [B, T] bool (the q
    routers average these rows' hidden states) and ``image_mask`` [B, T] bool (the k experts act
    on these rows; None: ``input_ids == image_token_id``). What a forward used stays on the model
    until the next forward, so a checkpointed backward after the block recomputes the same."""
    handles = get_moe(model)
    if handles is None:
        yield
        return
    previous = handles.state.pending
    handles.state.pending = (question_mask.bool(), None if image_mask is None else image_mask.bool())
    try:
        yield
    finally:
        handles.state.pending = previous


@contextlib.contextmanager
def image_positions(model: nn.Module, mask: torch.Tensor | None) -> Iterator[None]:
    """Inside, a forward fed ``inputs_embeds`` takes ``mask`` [B, T] bool as its image positions
    (the k experts act there, the question is what follows). A no-op without the MoE."""
    handles = get_moe(model)
    if handles is None or mask is None:
        yield
        return
    previous = handles.state.embeds_image
    handles.state.embeds_image = mask.bool()
    try:
        yield
    finally:
        handles.state.embeds_image = previous


# --------------------------------------------------------------------------- install / loss


def install_moe(model: nn.Module, settings: MoeSettings) -> MoeHandles:
    """Put the experts on every language layer's q_proj and k_proj; the new parameters are fp32
    and trainable, the base Linear frozen. Installing twice is an error."""
    base = unwrap(model)
    if get_moe(base) is not None:
        raise RuntimeError("A3MoE is already installed on this model")
    state = MoeState()
    handles = MoeHandles(settings, state, [], [], int(base.config.image_token_id), [])
    s = settings
    for i, layer in enumerate(decoder_layers(base)):
        attn = layer.self_attn
        for kind, experts, top_k in (("q", s.q_experts, s.q_top_k), ("k", s.k_experts, s.k_top_k)):
            lin = getattr(attn, f"{kind}_proj")
            if type(lin) is not nn.Linear:
                raise MedAlignError(f"A3MoE: layer {i} {kind}_proj is a {type(lin).__name__}, not a plain Linear "
                                    "(exclude q_proj/k_proj from the LoRA targets)")
            moe = MoeLinear(lin, kind, i, state, experts=experts, top_k=top_k, r=s.r, alpha=s.alpha,
                            dropout=s.dropout, reference_sparse=s.reference_sparse)
            moe.train(lin.training)
            setattr(attn, f"{kind}_proj", moe)
            (handles.q if kind == "q" else handles.k).append(moe)
    lm = base.model
    handles.hooks.append(lm.register_forward_pre_hook(lambda m, a, k: _pre_hook(handles, m, a, k), with_kwargs=True))
    handles.hooks.append(lm.register_forward_hook(lambda m, a, k, o: _post_hook(handles, m, a, k, o),
                                                  with_kwargs=True))
    object.__setattr__(base, "_a3moe", handles)
    return handles


def balance_loss(model: nn.Module) -> torch.Tensor:
    """0-dim fp32: the load-balancing loss of the last forward's k routers (module docstring);
    a zero attached to the k routers when that forward routed no image token."""
    handles = get_moe(model)
    if handles is None:
        return torch.zeros(())
    st = handles.state
    routers = [m.moe_router for m in handles.k if m.moe_router is not None]
    if not st.k_probs or st.image_rows is None or st.image_rows.numel() == 0:
        if not routers:
            return torch.zeros((), device=unwrap(model).device)
        return sum(r.weight.sum() for r in routers) * 0.0
    probs = torch.stack([st.k_probs[i] for i in sorted(st.k_probs)]).mean(0)  # [P, E]
    hard = torch.stack([st.k_hard[i] for i in sorted(st.k_hard)]).mean(0)
    rows = st.image_rows.to(probs.device)
    b = int(rows.max()) + 1
    count = torch.zeros(b, device=probs.device).index_add(0, rows, torch.ones_like(rows, dtype=torch.float32))
    p_mean = probs.new_zeros(b, probs.shape[1]).index_add(0, rows, probs)
    h_mean = hard.new_zeros(b, hard.shape[1]).index_add(0, rows, hard)
    has = count > 0
    per_sample = (p_mean[has] / count[has, None] * (h_mean[has] / count[has, None])).sum(1)
    return per_sample.mean()


# --------------------------------------------------------------------------- saving / loading


def moe_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """``{"layers.{i}.{q|k}.{moe_a|moe_b|moe_router.weight|moe_router.bias}": fp32 tensor}``."""
    handles = get_moe(model)
    if handles is None:
        raise RuntimeError("A3MoE is not installed on this model")
    out = {}
    for m in handles.modules():
        for name, p in m.named_parameters():
            if not name.startswith("base."):
                out[f"layers.{m.layer}.{m.kind}.{name}"] = p.detach().float().cpu().contiguous()
    return out


def save_moe(model: nn.Module, run_dir: str | Path) -> None:
    """Write ``moe.safetensors`` (every expert and router, fp32) and ``moe.json`` (the settings)."""
    from safetensors.torch import save_file

    handles = get_moe(model)
    if handles is None:
        raise RuntimeError("A3MoE is not installed on this model")
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    save_file(moe_state_dict(model), str(run_dir / MOE_WEIGHTS))
    meta = {"format": MOE_FORMAT, "settings": handles.settings.to_json(), "num_layers": len(handles.q)}
    (run_dir / MOE_CONFIG).write_text(json.dumps(meta, indent=2) + "\n")


def read_moe_settings(run_dir: str | Path) -> MoeSettings | None:
    """The settings in ``run_dir/moe.json``, or None when the run has no MoE."""
    path = Path(run_dir) / MOE_CONFIG
    if not path.is_file():
        return None
    try:
        meta = json.loads(path.read_text())
        if meta.get("format") != MOE_FORMAT:
            raise MedAlignError(f"{path}: unknown A3MoE format {meta.get('format')!r} (expected {MOE_FORMAT})")
        return MoeSettings.from_json(meta["settings"])
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise MedAlignError(f"{path}: not a valid A3MoE config ({e})") from None


def load_moe(model: nn.Module, run_dir: str | Path) -> MoeHandles | None:
    """Install the MoE of ``run_dir`` on ``model`` (unless installed with the same settings) and
    load its weights; None when ``run_dir`` has no ``moe.json``."""
    from safetensors.torch import load_file

    run_dir = Path(run_dir)
    settings = read_moe_settings(run_dir)
    if settings is None:
        return None
    if not (run_dir / MOE_WEIGHTS).is_file():
        raise MedAlignError(f"{run_dir} has {MOE_CONFIG} but no {MOE_WEIGHTS}; did the run finish?")
    handles = get_moe(model)
    if handles is None:
        handles = install_moe(model, settings)
    elif handles.settings != settings:
        raise MedAlignError(f"{run_dir / MOE_CONFIG}: the model's MoE has other settings ({handles.settings})")
    saved = load_file(str(run_dir / MOE_WEIGHTS))
    params = {f"layers.{m.layer}.{m.kind}.{n}": p for m in handles.modules()
              for n, p in m.named_parameters() if not n.startswith("base.")}
    if set(saved) != set(params):
        missing, extra = sorted(set(params) - set(saved)), sorted(set(saved) - set(params))
        raise MedAlignError(f"{run_dir / MOE_WEIGHTS} does not fit this student: missing {missing[:3]}, "
                            f"unexpected {extra[:3]}")
    with torch.no_grad():
        for name, p in params.items():
            if tuple(saved[name].shape) != tuple(p.shape):
                raise MedAlignError(f"{run_dir / MOE_WEIGHTS}: {name} has shape {tuple(saved[name].shape)}, "
                                    f"the student needs {tuple(p.shape)}")
            p.copy_(saved[name].to(p.device, p.dtype))
    return handles


__all__ = ["MOE_CONFIG", "MOE_PRESETS", "MOE_WEIGHTS", "MoeHandles", "MoeSettings", "balance_loss", "get_moe",
           "image_positions", "install_moe", "load_moe", "locate_question", "moe_inputs", "moe_state_dict",
           "read_moe_settings", "save_moe"]
