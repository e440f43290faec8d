"""The MedAlign training recipe: ``setup -> train -> save_checkpoint -> cleanup``, read top to bottom.

One process per device. Under ``torchrun --nproc-per-node K`` every rank builds the same validated
sample list, reads its own slice of each epoch's order (:class:`~student_train.data.RankSampler`),
opens the teacher cache itself (lazily, per DataLoader worker), and the gradients are averaged by
``DistributedDataParallel`` (gloo on CPU, nccl on GPU).

Everything that can be wrong with the inputs is checked by :func:`plan_run` before the model is
loaded or ``RUN_DIR`` is created. ``RUN_DIR`` then holds::

    adapter_config.json, adapter_model.safetensors   the PEFT adapter (PeftModel.from_pretrained)
    rotation.safetensors, rotation.json              W (fp32) and its layer / eps (when alpha or beta > 0)
    config.json                                      the resolved configuration
    teacher.json                                     the cache identity (who taught the run), or null
    data_stats.json                                  records used / skipped as too long / without teacher
    train_log.jsonl                                  one line per optimizer step (rank 0)
    tb/                                              TensorBoard: loss, lm_loss, vis_loss, att_loss, lr, samples_per_s
    checkpoints/step-XXXXXXXX/                       the latest checkpoint(s), written atomically

The adapter and W in the run root are written when the run completes.
"""

from __future__ import annotations

import json
import math
import os
import random
import shutil
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from shared.errors import MedAlignError
from shared.fileio import atomic_write_json
from shared.runtime import resolve_device
from student_train.config import RESUMABLE_CHANGES, TrainConfig
from student_train.data import (Collator, DataStats, RankSampler, Sample, TrainDataset, build_samples,
                                load_image_processor)
from student_train.templates import PromptTemplate, template_for_model

CHECKPOINTS = "checkpoints"
LOG_NAMES = ("loss", "lm_loss", "vis_loss", "att_loss")


def log(msg: str, rank: int = 0) -> None:
    if rank == 0:
        from tqdm import tqdm
        tqdm.write(msg)


# --------------------------------------------------------------------------- plan (validation)


@dataclass
class Plan:
    """Everything validated before the model is loaded or RUN_DIR is touched."""

    cfg: TrainConfig
    llava_config: Any
    tokenizer: Any
    image_processor: Any
    template: PromptTemplate
    image_token_id: int
    num_image_tokens: int
    pad_id: int
    samples: list[Sample]
    stats: DataStats
    teacher: dict | None
    """The cache identity, None for plain LoRA fine-tuning."""
    resume_from: Path | None


def _llava_config(cfg: TrainConfig):
    from transformers import AutoConfig, LlavaConfig

    model_dir = Path(cfg.model.model)
    if not model_dir.is_dir():
        raise MedAlignError(f"--model {model_dir} does not exist")
    if not (model_dir / "config.json").is_file():
        raise MedAlignError(f"--model {model_dir} is not a Hugging Face model directory (no config.json)")
    try:
        config = AutoConfig.from_pretrained(model_dir, trust_remote_code=cfg.model.trust_remote_code)
    except Exception as e:  # noqa: BLE001 - a config that cannot be read is a user-facing problem
        hint = "" if cfg.model.trust_remote_code else " (custom code needs --trust-remote-code)"
        raise MedAlignError(f"cannot read the model config in {model_dir}: {e}{hint}") from None
    if not isinstance(config, LlavaConfig):
        raise MedAlignError(
            f"--model {model_dir} is not a LLaVA model (model_type {getattr(config, 'model_type', None)!r}); "
            "a student must be an HF-format LlavaForConditionalGeneration directory (model_type 'llava')")
    return config


def find_checkpoint(run_dir: Path) -> Path | None:
    """The latest complete checkpoint in ``run_dir`` (temporary, half-written ones are ignored)."""
    root = run_dir / CHECKPOINTS
    if not root.is_dir():
        return None
    done = sorted(p for p in root.glob("step-*") if (p / "state.json").is_file())
    return done[-1] if done else None


def _check_resumable(cfg: TrainConfig, run_dir: Path) -> None:
    saved_path = run_dir / "config.json"
    if not saved_path.is_file():
        raise MedAlignError(f"{run_dir} has checkpoints but no config.json; cannot check what it was trained with")
    saved = {k: v for group in json.loads(saved_path.read_text()).values() for k, v in group.items()}
    now = cfg.flat()
    changed = sorted(k for k in now if k not in RESUMABLE_CHANGES and saved.get(k) != now[k])
    if changed:
        diffs = ", ".join(f"{k}: {saved.get(k)!r} -> {now[k]!r}" for k in changed)
        raise MedAlignError(f"--resume with different settings than {run_dir} was trained with ({diffs}); "
                            "use the same settings or a new --out")


def plan_run(cfg: TrainConfig) -> Plan:
    """Validate the model directory, layer, cache, data and RUN_DIR, in that order; load nothing big."""
    from transformers import AutoTokenizer

    from student_train.alignment import check_layer
    from student_train.model import num_image_tokens, num_layers

    llava_config = _llava_config(cfg)
    check_layer(cfg.align.align_layer, num_layers(llava_config))
    n_tokens = num_image_tokens(llava_config)
    image_token_id = int(llava_config.image_token_id)

    teacher = None
    cache_path = None
    if cfg.align.distill:
        from shared.cache import open_cache
        reader = open_cache(cfg.align.cache)
        m = reader.manifest
        if m.num_tokens != n_tokens:
            raise MedAlignError(
                f"the cache {cfg.align.cache} holds teacher signals on a {m.grid}x{m.grid} grid "
                f"(N = {m.num_tokens}, expert {m.expert}) but the student {cfg.model.model} has "
                f"{n_tokens} image tokens per image; build the cache with --grid matching the student")
        teacher = reader.identity()
        cache_path = cfg.align.cache
        del reader

    try:
        tokenizer = AutoTokenizer.from_pretrained(cfg.model.model, trust_remote_code=cfg.model.trust_remote_code)
    except Exception as e:  # noqa: BLE001
        raise MedAlignError(f"cannot load the tokenizer of {cfg.model.model}: {e}") from None
    pad_id = next((t for t in (tokenizer.pad_token_id, tokenizer.unk_token_id, tokenizer.eos_token_id)
                   if t is not None), None)
    if pad_id is None:
        raise MedAlignError(f"the tokenizer of {cfg.model.model} has no pad, unk or eos token to pad with")
    template = template_for_model(cfg.model.model, cfg.data.template)
    image_processor = load_image_processor(cfg.model.model, trust_remote_code=cfg.model.trust_remote_code)

    samples, stats = build_samples(
        cfg.data.data, cfg.data.image_root, tokenizer, template,
        image_token_id=image_token_id, num_image_tokens=n_tokens, max_length=cfg.data.max_length,
        cache_path=cache_path, allow_missing=cfg.data.allow_missing)

    out = cfg.out
    resume_from = None
    if out.exists() and not out.is_dir():
        raise MedAlignError(f"--out {out} exists and is not a directory")
    if cfg.run.resume:
        resume_from = find_checkpoint(out)
        if resume_from is not None:
            _check_resumable(cfg, out)
    elif out.is_dir() and any(out.iterdir()):
        raise MedAlignError(f"--out {out} already exists and is not empty; pass --resume to continue "
                            "that run, or choose a new directory")
    return Plan(cfg, llava_config, tokenizer, image_processor, template, image_token_id, n_tokens, pad_id,
                samples, stats, teacher, resume_from)


# --------------------------------------------------------------------------- distributed


@dataclass
class Dist:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    def barrier(self) -> None:
        if self.enabled:
            torch.distributed.barrier()

    def mean(self, t: torch.Tensor) -> torch.Tensor:
        if self.enabled:
            torch.distributed.all_reduce(t)
            t = t / self.world_size
        return t


def init_distributed(device_flag: str) -> tuple[Dist, torch.device]:
    """Read torchrun's environment, pick the device, init the process group when WORLD_SIZE > 1."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    dist = Dist(int(os.environ.get("RANK", "0")), world, int(os.environ.get("LOCAL_RANK", "0")))
    device = resolve_device(device_flag)
    if device.type == "cuda":
        if device_flag in ("auto", "cuda"):  # under torchrun each rank takes its own GPU
            device = torch.device(f"cuda:{dist.local_rank}")
        torch.cuda.set_device(device)
    if dist.enabled and not torch.distributed.is_initialized():
        torch.distributed.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return dist, device


# --------------------------------------------------------------------------- RNG state (JSON, no pickle)


def rng_state() -> dict:
    np_state = np.random.get_state()
    py = random.getstate()
    state = {"python": [py[0], list(py[1]), py[2]],
             "numpy": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])],
             "torch": torch.get_rng_state().tolist()}
    if torch.cuda.is_available():
        state["cuda"] = [s.tolist() for s in torch.cuda.get_rng_state_all()]
    return state


def set_rng_state(state: dict) -> None:
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    n = state["numpy"]
    np.random.set_state((n[0], np.asarray(n[1], dtype=np.uint32), n[2], n[3], n[4]))
    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([torch.tensor(s, dtype=torch.uint8) for s in state["cuda"]])


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


# --------------------------------------------------------------------------- the recipe


def cosine_with_warmup(warmup: int, total: int):
    """LR multiplier of transformers' ``get_cosine_schedule_with_warmup`` (what the reference's
    HF Trainer uses): linear from 0 over ``warmup`` steps, then half a cosine down to 0 at ``total``."""
    def f(step: int) -> float:
        if step < warmup:
            return step / max(1, warmup)
        progress = (step - warmup) / max(1, total - warmup)
        return max(0.0, 0.5 * (1.0 + math.cos(math.pi * progress)))
    return f


class Recipe:
    """Train one student. ``run()`` = ``setup() -> train() -> save_final() -> cleanup()``."""

    def __init__(self, cfg: TrainConfig):
        self.cfg = cfg
        self.plan: Plan | None = None
        self.writer = None
        self.pbar = None
        self.global_step = 0

    # ---- setup ------------------------------------------------------------------------------
    def setup(self) -> None:
        cfg = self.cfg
        self.dist, self.device = init_distributed(cfg.run.device)
        self.plan = plan = plan_run(cfg)  # raises before anything is loaded or written
        self.dist.barrier()
        self._load_model()
        self._setup_data()
        self._setup_optimizer()
        self.out = cfg.out
        if self.dist.rank == 0:
            self._create_run_dir()
        self.dist.barrier()
        if plan.resume_from is not None:
            self._load_checkpoint(plan.resume_from)
        else:
            seed_everything(cfg.run.seed + self.dist.rank)
        if self.dist.rank == 0:
            from torch.utils.tensorboard import SummaryWriter
            from tqdm import tqdm
            self.writer = SummaryWriter(str(self.out / "tb"), purge_step=self.global_step + 1)
            self._truncate_log(self.global_step)
            self.pbar = tqdm(total=self.total_steps, initial=self.global_step, desc="train", dynamic_ncols=True)
        self._describe()

    def _load_model(self) -> None:
        from student_train.model import enable_gradient_checkpointing, load_student, prepare_student

        cfg = self.cfg
        dtype = torch.bfloat16 if cfg.model.bf16 else torch.float32
        model, _ = load_student(cfg.model.model, dtype=dtype, device=self.device,
                                trust_remote_code=cfg.model.trust_remote_code)
        self.align = cfg.align
        seed_everything(cfg.run.seed)  # identical LoRA init on every rank
        model = prepare_student(model, cfg.lora, cfg.align, train_projector=cfg.optim.projector_lr > 0)
        for p in model.parameters():  # trainable weights in fp32 (bf16 runs keep the frozen base in bf16)
            if p.requires_grad and p.dtype != torch.float32:
                p.data = p.data.float()
        if cfg.model.gradient_checkpointing:
            enable_gradient_checkpointing(model)
        model.train()
        self.model = model
        if self.dist.enabled:
            from torch.nn.parallel import DistributedDataParallel
            self.ddp = DistributedDataParallel(
                model, device_ids=[self.device.index] if self.device.type == "cuda" else None)
        else:
            self.ddp = model

    def _setup_data(self) -> None:
        cfg, plan = self.cfg, self.plan
        self.dataset = TrainDataset(plan.samples, cfg.data.image_root, plan.image_processor,
                                    image_token_id=plan.image_token_id, num_image_tokens=plan.num_image_tokens,
                                    cache_path=cfg.align.cache if plan.teacher else None)
        self.sampler = RankSampler(len(self.dataset), rank=self.dist.rank, world_size=self.dist.world_size,
                                   seed=cfg.run.seed)
        bs, ga = cfg.optim.batch_size, cfg.optim.grad_accum
        self.micro_per_epoch = -(-self.sampler.per_rank // bs)
        self.steps_per_epoch = -(-self.micro_per_epoch // ga)
        self.total_steps = cfg.optim.max_steps or math.ceil(cfg.optim.epochs * self.steps_per_epoch)

    def _loader(self, epoch: int, step_in_epoch: int):
        bs, ga = self.cfg.optim.batch_size, self.cfg.optim.grad_accum
        self.sampler.set_epoch(epoch, skip=min(step_in_epoch * ga * bs, self.sampler.per_rank))
        # The loader draws its worker seed from its own generator, never from the global RNG
        # (which drives dropout), so a resumed run sees the same random stream.
        return torch.utils.data.DataLoader(
            self.dataset, batch_size=bs, sampler=self.sampler, collate_fn=Collator(self.plan.pad_id),
            num_workers=self.cfg.data.num_workers, pin_memory=self.device.type == "cuda",
            generator=torch.Generator().manual_seed(self.cfg.run.seed))

    def _setup_optimizer(self) -> None:
        from student_train.model import param_groups

        o = self.cfg.optim
        groups = param_groups(self.model, o.lr, o.projector_lr)
        self.optimizer = torch.optim.AdamW(groups, lr=o.lr, weight_decay=o.weight_decay)
        warmup = math.ceil(o.warmup_ratio * self.total_steps)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, cosine_with_warmup(warmup, self.total_steps))
        self.trainable = [(n, p) for n, p in self.model.named_parameters() if p.requires_grad]

    def _create_run_dir(self) -> None:
        plan = self.plan
        self.out.mkdir(parents=True, exist_ok=True)
        (self.out / CHECKPOINTS).mkdir(exist_ok=True)
        atomic_write_json(self.out / "config.json", self.cfg.to_dict())
        teacher = plan.teacher if plan.teacher is not None else {
            "teacher": None, "reason": "alpha = beta = 0: plain LoRA fine-tuning, no teacher signals"}
        atomic_write_json(self.out / "teacher.json", teacher)
        atomic_write_json(self.out / "data_stats.json", {**plan.stats.to_json(), "template": plan.template.name,
                                                        "num_image_tokens": plan.num_image_tokens})

    def _describe(self) -> None:
        plan, cfg, r = self.plan, self.cfg, self.dist.rank
        s = plan.stats
        n_train = sum(p.numel() for _, p in self.trainable)
        log(f"data: {s.used} of {s.records} samples ({s.too_long} skipped as longer than --max-length "
            f"{s.max_length}); template {plan.template.name}; {plan.num_image_tokens} image tokens", r)
        if plan.teacher:
            log(f"teacher: {plan.teacher.get('expert')} cache {plan.teacher.get('path')}; "
                f"{s.no_teacher} sample(s) without a teacher entry train with the LM loss only", r)
        else:
            log("teacher: none (alpha = beta = 0, plain LoRA fine-tuning)"
                + ("; --cache is not used" if cfg.align.cache else ""), r)
        log(f"trainable parameters: {n_train:,}; {self.dist.world_size} process(es) on {self.device}; "
            f"{self.steps_per_epoch} optimizer steps per epoch, {self.total_steps} in total"
            + (f"; resuming at step {self.global_step} from {plan.resume_from}" if plan.resume_from else ""), r)

    # ---- train ------------------------------------------------------------------------------
    def _loss_step(self, batch: dict, window: int, sync: bool) -> dict[str, torch.Tensor]:
        """Forward + backward of one micro-batch; returns the detached loss terms."""
        from student_train.model import compute_losses

        batch = {k: v.to(self.device, non_blocking=True) for k, v in batch.items()}
        ctx = nullcontext() if sync or not self.dist.enabled else self.ddp.no_sync()
        autocast = torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.cfg.model.bf16)
        with ctx:
            with autocast:
                losses = compute_losses(self.ddp, batch, self.align)
            (losses["loss"] / window).backward()
        return {k: losses[k].detach().float() for k in LOG_NAMES}

    def train(self) -> bool:
        """Run until ``total_steps`` (or ``--stop-after``); returns True when the run is complete."""
        cfg = self.cfg
        ga = cfg.optim.grad_accum
        stop_at = self.total_steps if cfg.run.stop_after is None else min(
            self.total_steps, self.global_step + cfg.run.stop_after)
        while self.global_step < stop_at:
            epoch, step_in_epoch = divmod(self.global_step, self.steps_per_epoch)
            batches = iter(self._loader(epoch, step_in_epoch))
            while step_in_epoch < self.steps_per_epoch and self.global_step < stop_at:
                window = min(ga, self.micro_per_epoch - step_in_epoch * ga)
                t0 = time.perf_counter()
                sums = torch.zeros(len(LOG_NAMES) + 2, device=self.device)
                for m in range(window):
                    batch = next(batches)
                    terms = self._loss_step(batch, window, sync=m == window - 1)
                    sums[: len(LOG_NAMES)] += torch.stack([terms[k] for k in LOG_NAMES]) / window
                    sums[-2] += len(batch["input_ids"])
                    if "teacher_mask" in batch:
                        sums[-1] += int((~batch["teacher_mask"]).sum())
                if cfg.optim.max_grad_norm > 0:
                    torch.nn.utils.clip_grad_norm_([p for _, p in self.trainable], cfg.optim.max_grad_norm)
                lrs = [g["lr"] for g in self.optimizer.param_groups]  # the rates this step used
                self.optimizer.step()
                self.scheduler.step()
                self.optimizer.zero_grad(set_to_none=True)
                self.global_step += 1
                step_in_epoch += 1
                counts = sums[-2:].clone()
                if self.dist.enabled:
                    torch.distributed.all_reduce(counts)
                means = self.dist.mean(sums[: len(LOG_NAMES)].clone())
                self._log_step(epoch, means, counts, lrs, time.perf_counter() - t0)
                end_of_epoch = step_in_epoch == self.steps_per_epoch
                if ((cfg.run.save_every and self.global_step % cfg.run.save_every == 0) or end_of_epoch
                        or self.global_step == stop_at):
                    self.save_checkpoint()
        return self.global_step >= self.total_steps

    def _log_step(self, epoch: int, means: torch.Tensor, counts: torch.Tensor, lrs: list[float],
                  seconds: float) -> None:
        if self.dist.rank != 0:
            return
        values = dict(zip(LOG_NAMES, means.tolist()))
        samples = int(counts[0])
        record = {"step": self.global_step, "epoch": epoch, **values, "lr": lrs[0],
                  "samples_per_s": samples / max(seconds, 1e-9), "samples": samples}
        if self.plan.teacher:
            record["no_teacher"] = int(counts[1])
        if len(lrs) > 1:
            record["projector_lr"] = lrs[1]
        for k, v in record.items():
            if k not in ("step", "epoch", "samples"):
                self.writer.add_scalar(k, v, self.global_step)
        with open(self.out / "train_log.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")
        self.pbar.update(1)
        self.pbar.set_postfix(loss=f"{values['loss']:.4f}", lr=f"{lrs[0]:.2e}")
        if self.global_step % self.cfg.run.log_every == 0:
            terms = " ".join(f"{k} {values[k]:.4f}" for k in LOG_NAMES)
            log(f"step {self.global_step}/{self.total_steps} epoch {epoch} {terms} lr {lrs[0]:.3e} "
                f"{record['samples_per_s']:.2f} samples/s")

    def _truncate_log(self, step: int) -> None:
        """Drop log lines past the checkpoint being resumed (steps that will be redone)."""
        path = self.out / "train_log.jsonl"
        if path.is_file():
            keep = [ln for ln in path.read_text().splitlines() if ln.strip() and json.loads(ln)["step"] <= step]
            path.write_text("".join(ln + "\n" for ln in keep))

    # ---- checkpoints ------------------------------------------------------------------------
    def save_checkpoint(self) -> Path:
        """Write ``checkpoints/step-N`` atomically: adapter + W (standard format), every trainable
        tensor, optimizer, scheduler, data position and each rank's RNG states."""
        from safetensors.torch import save_file

        from student_train.model import save_trained

        name = f"step-{self.global_step:08d}"
        root = self.out / CHECKPOINTS
        tmp = root / f".tmp-{name}"
        if self.dist.rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        self.dist.barrier()
        atomic_write_json(tmp / f"rng-rank{self.dist.rank:05d}.json", rng_state())
        if self.dist.rank == 0:
            save_trained(self.model, tmp)
            save_file({n: p.detach().cpu().contiguous() for n, p in self.trainable}, str(tmp / "trainable.safetensors"))
            torch.save(self.optimizer.state_dict(), tmp / "optimizer.pt")
            atomic_write_json(tmp / "scheduler.json", self.scheduler.state_dict())
        self.dist.barrier()
        if self.dist.rank == 0:
            epoch, step_in_epoch = divmod(self.global_step, self.steps_per_epoch)
            atomic_write_json(tmp / "state.json", {
                "global_step": self.global_step, "epoch": epoch, "step_in_epoch": step_in_epoch,
                "total_steps": self.total_steps, "world_size": self.dist.world_size})
            final = root / name
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)
            done = sorted(p for p in root.glob("step-*") if (p / "state.json").is_file())
            for old in done[: -self.cfg.run.keep_checkpoints]:
                shutil.rmtree(old, ignore_errors=True)
        self.dist.barrier()
        return root / name

    def _load_checkpoint(self, ckpt: Path) -> None:
        from safetensors.torch import load_file

        state = json.loads((ckpt / "state.json").read_text())
        if state["world_size"] != self.dist.world_size:
            raise MedAlignError(f"{ckpt} was written by {state['world_size']} process(es); resume it with the "
                                f"same number (now {self.dist.world_size})")
        if state["total_steps"] != self.total_steps:
            raise MedAlignError(f"{ckpt} belongs to a run of {state['total_steps']} steps, this one has "
                                f"{self.total_steps}; the data or schedule changed")
        tensors = load_file(str(ckpt / "trainable.safetensors"))
        params = dict(self.trainable)
        if set(tensors) != set(params):
            raise MedAlignError(f"{ckpt} holds different trainable weights than this model")
        with torch.no_grad():
            for n, p in params.items():
                p.copy_(tensors[n].to(p.device, p.dtype))
        self.optimizer.load_state_dict(torch.load(ckpt / "optimizer.pt", map_location=self.device, weights_only=True))
        self.scheduler.load_state_dict(json.loads((ckpt / "scheduler.json").read_text()))
        set_rng_state(json.loads((ckpt / f"rng-rank{self.dist.rank:05d}.json").read_text()))
        self.global_step = int(state["global_step"])

    # ---- final outputs, cleanup -------------------------------------------------------------
    def save_final(self) -> None:
        """Adapter + W into RUN_DIR (moved in from a temporary directory)."""
        from student_train.model import save_trained

        if self.dist.rank == 0:
            tmp = self.out / ".final-tmp"
            shutil.rmtree(tmp, ignore_errors=True)
            save_trained(self.model, tmp)
            for f in sorted(tmp.iterdir()):
                os.replace(f, self.out / f.name)
            tmp.rmdir()
            log(f"done: {self.global_step} steps; adapter and W in {self.out}")
        self.dist.barrier()

    def cleanup(self) -> None:
        if self.pbar is not None:
            self.pbar.close()
        if self.writer is not None:
            self.writer.close()
        if getattr(self, "dist", None) is not None and self.dist.enabled and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()

    def run(self) -> bool:
        try:
            self.setup()
            complete = self.train()
            if complete:
                self.save_final()
            else:
                log(f"stopped after step {self.global_step} of {self.total_steps}; continue with --resume",
                    self.dist.rank)
            return complete
        finally:
            self.cleanup()


def train(cfg: TrainConfig) -> bool:
    """Run the recipe; True when training completed (False: stopped early by --stop-after)."""
    return Recipe(cfg).run()
