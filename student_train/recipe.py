"""The training recipe: ``setup -> train -> save_checkpoint -> cleanup``, read top to bottom.

The training method (``--method``: MedAlign, A3Tune; :mod:`student_train.methods`) prepares the
student, gives the loss step and names the logged loss terms; the rest is shared.

One process per device (:mod:`student_train.distributed`). Under ``torchrun --nproc-per-node K``
every rank builds the same validated sample list, reads its own slice of each epoch's order
(:class:`~student_train.data.RankSampler`: torch's DistributedSampler plus the resume offset),
opens the teacher cache itself (lazily, per DataLoader worker), and the gradients are averaged by
``DistributedDataParallel`` (gloo on CPU, nccl on GPU).

Everything that can be wrong with the inputs is checked by :func:`~student_train.plan.plan_run`
before the model is loaded or ``RUN_DIR`` is created. ``RUN_DIR`` then holds::

    adapter_config.json, adapter_model.safetensors   the PEFT adapter (PeftModel.from_pretrained)
    rotation.safetensors, rotation.json              W (fp32) and its layer / eps (when alpha or beta > 0)
    moe.safetensors, moe.json                        A3MoE's experts and settings (--method a3tune --a3-moe)
    config.json                                      the resolved configuration
    teacher.json                                     the cache identity (who taught the run), or null
    data_stats.json                                  records used / skipped as too long / without teacher
    train_log.jsonl                                  one line per optimizer step (rank 0)
    tb/                                              TensorBoard: loss, the method's terms (MedAlign:
                                                     lm_loss, vis_loss, att_loss; A3Tune: lm_loss,
                                                     a3_att_loss, balance_loss), lr, grad_norm,
                                                     samples_per_s, peak_mem_mib
    checkpoints/step-XXXXXXXX/                       the latest checkpoint(s), written atomically

The adapter and W in the run root are written when the run completes.
"""

from __future__ import annotations

import math
import time
from contextlib import nullcontext

import torch

from shared.errors import MedAlignError
from shared.fileio import atomic_write_json
from shared.runtime import torch_dtype
from student_train import checkpoint
from student_train.checkpoint import CHECKPOINTS
from student_train.config import TrainConfig
from student_train.data import Collator, RankSampler, TrainDataset
from student_train.distributed import destroy_distributed, init_distributed
from student_train.plan import Plan, plan_run
from student_train.rng import seed_everything
from student_train.methods import get_method
from student_train.train_log import StepLog, log, peak_memory_mib


class Recipe:
    """Train one student. ``run()`` = ``setup() -> train() -> save_final() -> cleanup()``."""

    def __init__(self, cfg: TrainConfig):
        self.cfg = cfg
        self.method = get_method(cfg.method.method)
        self.log_names = self.method.log_names
        self.plan: Plan | None = None
        self.dist = None
        self.step_log: StepLog | None = None
        self.global_step = 0

    # ---- setup ------------------------------------------------------------------------------
    def setup(self) -> None:
        self.dist, self.device = init_distributed(self.cfg.run.device)
        self.plan = plan = plan_run(self.cfg, self.dist.world_size)  # raises before anything is loaded or written
        self.cfg = cfg = plan.cfg  # grad_accum resolved for this world size
        self.dist.barrier()
        self._load_model()
        self._setup_data()
        self._setup_optimizer()
        self.out = cfg.out
        if self.dist.rank == 0:
            self._create_run_dir()
        self.dist.barrier()
        if plan.resume_from is not None:
            state = checkpoint.load_checkpoint(
                plan.resume_from, self.dist, trainable=self.trainable, optimizer=self.optimizer,
                scheduler=self.scheduler, device=self.device, total_steps=self.total_steps)
            self.global_step = int(state["global_step"])
        else:
            seed_everything(cfg.run.seed + self.dist.rank)
        if self.dist.rank == 0:
            self.step_log = StepLog(self.out, step=self.global_step, total_steps=self.total_steps,
                                    log_every=cfg.run.log_every, names=self.log_names)
        self._describe()

    def _load_model(self) -> None:
        from student_train.model import enable_gradient_checkpointing, load_student

        cfg = self.cfg
        dtype = torch_dtype("bfloat16" if cfg.model.bf16 else "float32")
        model, _ = load_student(cfg.model.model, dtype=dtype, device=self.device,
                                trust_remote_code=cfg.model.trust_remote_code)
        seed_everything(cfg.run.seed)  # identical LoRA init on every rank
        model = self.method.prepare(model, cfg, train_projector=cfg.optim.projector_lr > 0)
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
                                    **self.method.dataset_kwargs(cfg, plan))
        self.sampler = RankSampler(len(self.dataset), rank=self.dist.rank, world_size=self.dist.world_size,
                                   seed=cfg.run.seed)
        bs, ga = cfg.optim.batch_size, cfg.optim.grad_accum
        self.micro_per_epoch = -(-self.sampler.num_samples // bs)
        self.steps_per_epoch = -(-self.micro_per_epoch // ga)
        self.total_steps = cfg.optim.max_steps or math.ceil(cfg.optim.epochs * self.steps_per_epoch)

    def _loader(self, epoch: int, step_in_epoch: int):
        bs, ga = self.cfg.optim.batch_size, self.cfg.optim.grad_accum
        self.sampler.set_epoch(epoch, skip=min(step_in_epoch * ga * bs, self.sampler.num_samples))
        # The loader draws its worker seed from its own generator, never from the global RNG
        # (which drives dropout), so a resumed run sees the same random stream.
        return torch.utils.data.DataLoader(
            self.dataset, batch_size=bs, sampler=self.sampler, collate_fn=Collator(self.plan.pad_id, self.dataset.teacher),
            num_workers=self.cfg.data.num_workers, pin_memory=self.device.type == "cuda",
            generator=torch.Generator().manual_seed(self.cfg.run.seed))

    def _setup_optimizer(self) -> None:
        from transformers import get_cosine_schedule_with_warmup

        from student_train.model import param_groups

        o = self.cfg.optim
        groups = param_groups(self.model, o.lr, o.projector_lr)
        self.optimizer = torch.optim.AdamW(groups, lr=o.lr, weight_decay=o.weight_decay)
        # what the reference's HF Trainer uses: linear warmup from 0, then half a cosine down to 0
        self.scheduler = get_cosine_schedule_with_warmup(
            self.optimizer, math.ceil(o.warmup_ratio * self.total_steps), self.total_steps)
        self.trainable = [(n, p) for n, p in self.model.named_parameters() if p.requires_grad]

    def _create_run_dir(self) -> None:
        plan = self.plan
        self.out.mkdir(parents=True, exist_ok=True)
        (self.out / CHECKPOINTS).mkdir(exist_ok=True)
        atomic_write_json(self.out / "config.json", self.cfg.to_dict())
        teacher = plan.teacher if plan.teacher is not None else {
            "teacher": None, "reason": self.method.no_teacher_reason}
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
            who = plan.teacher.get("expert") or plan.teacher.get("method")
            log(f"teacher: {who} cache {plan.teacher.get('path')}; "
                f"{s.no_teacher} sample(s) without a teacher entry train with the LM loss only", r)
        else:
            log(f"teacher: none ({self.method.no_teacher_reason})"
                + ("; --cache is not used" if cfg.align.cache else ""), r)
        log(f"trainable parameters: {n_train:,}; {self.dist.world_size} process(es) on {self.device}; "
            f"{self.steps_per_epoch} optimizer steps per epoch, {self.total_steps} in total"
            + (f"; resuming at step {self.global_step} from {plan.resume_from}" if plan.resume_from else ""), r)

    # ---- train ------------------------------------------------------------------------------
    def train(self) -> bool:
        """Run until ``total_steps`` (or ``--stop-after``); returns True when the run is complete."""
        cfg = self.cfg
        stop_at = self.total_steps if cfg.run.stop_after is None else min(
            self.total_steps, self.global_step + cfg.run.stop_after)
        while self.global_step < stop_at:
            epoch, step_in_epoch = divmod(self.global_step, self.steps_per_epoch)
            batches = iter(self._loader(epoch, step_in_epoch))
            while step_in_epoch < self.steps_per_epoch and self.global_step < stop_at:
                window = min(cfg.optim.grad_accum, self.micro_per_epoch - step_in_epoch * cfg.optim.grad_accum)
                record = self._optimizer_step(batches, window, step=self.global_step + 1, epoch=epoch)
                self.global_step += 1
                step_in_epoch += 1
                if self.step_log is not None:
                    self.step_log.write(record)
                end_of_epoch = step_in_epoch == self.steps_per_epoch
                if ((cfg.run.save_every and self.global_step % cfg.run.save_every == 0) or end_of_epoch
                        or self.global_step == stop_at):
                    self.save_checkpoint()
        return self.global_step >= self.total_steps

    def _check_finite(self, step: int, losses: dict[str, float], grad_norm: float) -> None:
        """Stop before a non-finite loss or gradient reaches the weights: nothing is updated or saved
        from this step, and the last checkpoint stays resumable. (The losses are already averaged
        over the ranks and the gradients all-reduced, so every rank stops at the same step.)"""
        bad = [name.removesuffix("_loss") for name in self.log_names[1:] if not math.isfinite(losses[name])]
        if not bad and math.isfinite(grad_norm):
            return
        what = f"loss term(s) {', '.join(bad)}" if bad else f"gradient norm ({grad_norm})"
        last = checkpoint.find_checkpoint(self.out)
        resume = f"the last checkpoint ({last.name}) is resumable with --resume" if last else "no checkpoint was written"
        raise MedAlignError(f"step {step}: non-finite {what}; stopped before updating the weights "
                            f"(lower --lr, check the data and the teacher cache); {resume}")

    def _optimizer_step(self, batches, window: int, *, step: int, epoch: int) -> dict:
        """Accumulate ``window`` micro-batches, clip, step; returns this step's log record (means over
        the micro-batches and ranks, sample counts summed over the ranks)."""
        cfg = self.cfg
        t0 = time.perf_counter()
        names = self.log_names
        sums = torch.zeros(len(names) + 2, device=self.device)
        for m in range(window):
            batch = next(batches)
            terms = self._loss_step(batch, window, sync=m == window - 1)
            sums[: len(names)] += torch.stack([terms[k] for k in names]) / window
            sums[-2] += len(batch["input_ids"])
            if "teacher_mask" in batch:
                sums[-1] += int((~batch["teacher_mask"]).sum())
        params = [p for _, p in self.trainable]
        if cfg.optim.max_grad_norm > 0:
            grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.optim.max_grad_norm)  # the norm before clipping
        else:
            grad_norm = torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None])
        means = self.dist.mean(sums[: len(names)]).tolist()
        self._check_finite(step, dict(zip(names, means)), float(grad_norm))
        lrs = [g["lr"] for g in self.optimizer.param_groups]  # the rates this step used
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        counts = self.dist.sum(sums[-2:])
        samples = int(counts[0])
        peak = self.dist.max(torch.tensor([peak_memory_mib(self.device)], device=self.device))
        record = {"step": step, "epoch": epoch, **dict(zip(names, means)), "lr": lrs[0],
                  "grad_norm": float(grad_norm), "samples_per_s": samples / max(time.perf_counter() - t0, 1e-9),
                  "peak_mem_mib": float(peak[0]), "samples": samples}
        if self.plan.teacher:
            record["no_teacher"] = int(counts[1])
        if len(lrs) > 1:
            record["projector_lr"] = lrs[1]
        return record

    def _loss_step(self, batch: dict, window: int, sync: bool) -> dict[str, torch.Tensor]:
        """Forward + backward of one micro-batch; returns the detached loss terms."""
        batch = {k: v.to(self.device, non_blocking=True) for k, v in batch.items()}
        ctx = nullcontext() if sync or not self.dist.enabled else self.ddp.no_sync()
        autocast = torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.cfg.model.bf16)
        with ctx:
            with autocast:
                losses = self.method.compute_losses(self.ddp, batch, self.cfg)
            (losses["loss"] / window).backward()
        return {k: losses[k].detach().float() for k in self.log_names}

    # ---- save -------------------------------------------------------------------------------
    def save_checkpoint(self):
        """``checkpoints/step-N`` with everything a bit-identical resume needs (see :mod:`student_train.checkpoint`)."""
        epoch, step_in_epoch = divmod(self.global_step, self.steps_per_epoch)
        state = {"global_step": self.global_step, "epoch": epoch, "step_in_epoch": step_in_epoch,
                 "total_steps": self.total_steps, "world_size": self.dist.world_size}
        return checkpoint.save_checkpoint(self.out, self.dist, model=self.model, trainable=self.trainable,
                                          optimizer=self.optimizer, scheduler=self.scheduler, state=state,
                                          keep=self.cfg.run.keep_checkpoints)

    def save_final(self) -> None:
        """Adapter + W into RUN_DIR."""
        if self.dist.rank == 0:
            checkpoint.save_final(self.out, self.model)
            log(f"done: {self.global_step} steps; adapter and W in {self.out}")
        self.dist.barrier()

    def cleanup(self) -> None:
        if self.step_log is not None:
            self.step_log.close()
        destroy_distributed(self.dist)

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
