"""Answer generation for evaluation: a trained student (base + LoRA adapter + W) answers a test set.

* :func:`resolve_template`: the prompt template of a run / model.
* :func:`load_generator` -> :class:`Generator` (model, tokenizer, image processor, template, stop ids).
* :func:`generate_ids` / :func:`generate_answers`: one batch, LEFT-padded (:func:`left_pad`), decoded
  by a method of :mod:`evaluation.decoding` (``--decoding NAME``).
* :func:`run_generate`: the ``generate`` command (settings: :mod:`evaluation.generate_config`;
  questions: :mod:`evaluation.questions`; the resumable answer file: :mod:`evaluation.answer_file`).

The model sees exactly what it saw in training, by construction: prompts and pixels come from
:mod:`student_train.inputs`, the encoder the training data uses. With a training run,
:func:`student_train.model.load_trained` merges the LoRA weights and installs ``W``, which rotates
the visual positions of the prefill only (the forward that holds the image tokens), never the
single-token decoding steps.

Batches are LEFT-padded (every prompt ends at the last column, so the first generated token of
every row is predicted from that row's own last prompt token); position ids follow the
attention mask, so a padded row computes what it computes alone.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from evaluation.answer_file import append_lines, check_first_line, model_id, prepare_output, run_metadata
from evaluation.decoding.base import DecodeContext, left_pad, question_seed
from evaluation.decoding.plain import PerQuestionSampler  # noqa: F401 - re-exported (tests, older callers)
from evaluation.generate_config import DecodingConfig, GenerateConfig
from evaluation.questions import Question, load_questions
from shared.errors import MedAlignError
from shared.images import mean_colour, resolve_image_path
from shared.records import read_json
from shared.runtime import resolve_device, torch_dtype
from student_train.families import DEFAULT_FAMILY, FAMILIES, StudentFamily, student_family
from student_train.inputs import encode_prompt, student_pixels
from student_train.templates import PromptTemplate, get_template, template_for_model


# --------------------------------------------------------------------------- template


def run_template_name(run_dir: str | Path) -> str | None:
    """The template a training run used: ``config.json``'s ``data.template``, else the resolved
    name in ``data_stats.json``; None when the run records neither."""
    run_dir = Path(run_dir)
    if (run_dir / "config.json").is_file():
        cfg = read_json(run_dir / "config.json")
        name = (cfg.get("data") or {}).get("template") if isinstance(cfg, dict) else None
        if name:
            return str(name)
    if (run_dir / "data_stats.json").is_file():
        stats = read_json(run_dir / "data_stats.json")
        name = stats.get("template") if isinstance(stats, dict) else None
        if name:
            return str(name)
    return None


def resolve_template(model_dir: str | Path, run_dir: str | Path | None, name: str | None) -> tuple[PromptTemplate, str]:
    """The prompt template and where it came from.

    Order: the run's template (``config.json``, else ``data_stats.json``; a ``--template`` that
    disagrees with it is an error, since a student answers garbage in a format it was not trained
    on); else ``--template``; else the model's ``medalign.json``; else the default for the
    language backbone (:func:`student_train.templates.template_for_model`).
    """
    if run_dir is not None:
        recorded = run_template_name(run_dir)
        if recorded:
            if name and name != recorded:
                raise MedAlignError(
                    f"--template {name} disagrees with the run {run_dir}, which was trained with the "
                    f"{recorded} template; drop --template")
            return get_template(recorded), f"run {run_dir}"
    if name:
        return get_template(name), "--template"
    template = template_for_model(model_dir)
    src = "medalign.json" if (Path(model_dir) / "medalign.json").is_file() else "backbone default"
    return template, src


# --------------------------------------------------------------------------- the model


@dataclass
class Generator:
    """A loaded student ready to answer."""

    model: Any
    tokenizer: Any
    image_processor: Any
    template: PromptTemplate
    template_source: str
    image_token_id: int
    num_image_tokens: int
    pad_id: int
    eos_ids: list[int]
    add_bos: bool
    device: torch.device
    dtype: torch.dtype
    family: StudentFamily = FAMILIES[DEFAULT_FAMILY]
    """The student's family (the decoding methods' family-dependent defaults)."""

    @property
    def background(self) -> tuple[int, int, int]:
        return mean_colour(tuple(self.image_processor.image_mean))


def load_generator(model_dir: str | Path, run_dir: str | Path | None = None, *, template: str | None = None,
                   dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
                   trust_remote_code: bool = False) -> Generator:
    """Base student (+ adapter and W from ``run_dir``), tokenizer, image processor and template."""
    from student_train.inputs import adds_bos, answer_end_id, load_image_processor
    from student_train.model import load_student, load_trained, num_image_tokens

    tmpl, src = resolve_template(model_dir, run_dir, template)  # before loading anything
    device = torch.device(device)
    if run_dir is not None:
        model, tokenizer = load_trained(model_dir, run_dir, dtype=dtype, device=device,
                                        trust_remote_code=trust_remote_code)
    else:
        model, tokenizer = load_student(model_dir, dtype=dtype, device=device, trust_remote_code=trust_remote_code)
        model.eval()
    processor = load_image_processor(model_dir, trust_remote_code=trust_remote_code)
    cfg = model.config
    pad_id = tokenizer.pad_token_id
    if pad_id is None:
        pad_id = model.generation_config.pad_token_id
    if pad_id is None:
        pad_id = tokenizer.eos_token_id
    eos_ids: list[int] = []
    # the token that ended every answer in training (the template's stop string, e.g. <|endoftext|>) stops too
    for cand in (tokenizer.eos_token_id, model.generation_config.eos_token_id, answer_end_id(tokenizer, tmpl)):
        for e in cand if isinstance(cand, (list, tuple)) else [cand]:
            if e is not None and int(e) not in eos_ids:
                eos_ids.append(int(e))
    if not eos_ids:
        raise MedAlignError(f"{model_dir}: the tokenizer has no EOS token; answers would never end")
    return Generator(model, tokenizer, processor, tmpl, src, int(cfg.image_token_id), num_image_tokens(model),
                     int(pad_id), eos_ids, adds_bos(tokenizer), device, dtype, student_family(model_dir))


def _clean(text: str, stop_str: str) -> str:
    if stop_str and stop_str in text:
        text = text[: text.index(stop_str)]
    return text.strip()


@torch.inference_mode()
def generate_ids(gen: Generator, questions: list[str], pixels: torch.Tensor, decoding: DecodingConfig,
                 *, keys: list[str] | None = None) -> list[list[int]]:
    """Answer a batch: ``questions`` (B strings) about ``pixels`` [B, 3, S, S], LEFT-padded, with the
    decoding method of ``decoding`` (:mod:`evaluation.decoding`; resolved for the student here if it
    is not yet). Sampling (and any other randomness) draws per question: :func:`question_seed` of
    ``decoding.seed`` and the question's key (``keys``, default the question text).

    Returns the B generated token id lists, cut at the first end-of-answer id (excluded).
    """
    decoding = decoding.resolved(gen.family)
    seqs = [encode_prompt(gen.tokenizer, gen.template, q, gen.image_token_id, gen.num_image_tokens,
                          add_bos=gen.add_bos)[0] for q in questions]
    input_ids, attention_mask = left_pad(seqs, gen.pad_id)
    seeds = [question_seed(decoding.seed, k) for k in (keys if keys is not None else questions)]
    ctx = DecodeContext(gen=gen, input_ids=input_ids.to(gen.device), attention_mask=attention_mask.to(gen.device),
                        prompts=seqs, pixels=pixels.to(gen.device, gen.dtype), seeds=seeds,
                        max_new_tokens=int(decoding.max_new_tokens), family=gen.family)
    return decoding.method.decode(ctx, dict(decoding.params))


def generate_answers(gen: Generator, questions: list[str], pixels: torch.Tensor, decoding: DecodingConfig,
                     *, keys: list[str] | None = None) -> list[str]:
    """:func:`generate_ids` decoded (special tokens skipped, cut at the template's stop string, stripped)."""
    ids = generate_ids(gen, questions, pixels, decoding, keys=keys)
    texts = gen.tokenizer.batch_decode(ids, skip_special_tokens=True)
    return [_clean(t, gen.template.stop_str) for t in texts]


# --------------------------------------------------------------------------- the command


def batches_to_run(questions: list[Question], done: set[str], batch_size: int) -> list[tuple[int, list[Question]]]:
    """``(batch index, questions still to answer)`` over a FIXED partition of the question list
    into batches of ``batch_size``: a resumed run with the same batch size runs the very batches
    (the same padding) an uninterrupted run would; sampling is seeded per question regardless."""
    out = []
    for b, start in enumerate(range(0, len(questions), batch_size)):
        todo = [q for q in questions[start:start + batch_size] if q.key not in done]
        if todo:
            out.append((b, todo))
    return out


def run_generate(cfg: GenerateConfig, *, log: Callable[[str], None] = print, progress: bool = True) -> dict[str, Any]:
    """The ``generate`` command: validate, load, answer the questions not yet in ``cfg.out``.

    Under torchrun (``WORLD_SIZE`` > 1) each rank answers its contiguous slice on its own device into
    its own part beside ``--out``; rank 0 merges the parts into ``--out`` once every rank has finished
    (:mod:`evaluation.answer_parts`). Returns ``{"questions", "already_done", "written",
    "truncated_bytes", "template"}`` (for the whole job).
    """
    from shared.distributed import destroy_distributed, init_distributed, world_from_env

    dist = world_from_env()
    if not dist.enabled:
        return _run_generate(cfg, dist, None, log, progress)
    dist, device = init_distributed(cfg.device, backend="gloo")  # cuda -> cuda:LOCAL_RANK
    try:
        return _run_generate(cfg, dist, device, log if dist.is_main else (lambda _m: None), progress and dist.is_main)
    finally:
        destroy_distributed(dist)


def _run_generate(cfg: GenerateConfig, dist, device, log: Callable[[str], None], progress: bool) -> dict[str, Any]:
    from evaluation.answer_parts import answered_ids, existing_parts, merge_answer_files, part_path, question_slice
    from shared.distributed import Heartbeat, run_step

    questions = load_questions(cfg.data, cfg.closed_suffix, cfg.limit)
    root = Path(cfg.image_root)
    if not root.is_dir():
        raise MedAlignError(f"--image-root {root} is not a directory")
    missing = [q.image for q in questions if not resolve_image_path(root, q.image).is_file()]
    if missing:
        raise MedAlignError(f"{len(missing)} image file(s) not found under --image-root {root}: "
                            + ", ".join(missing[:5]) + (" ..." if len(missing) > 5 else ""))
    if cfg.adapter is not None:
        from student_train.model import check_adapter_dir
        check_adapter_dir(Path(cfg.adapter))  # before loading anything
    template, _ = resolve_template(cfg.model, cfg.adapter, cfg.template)
    device = device if device is not None else resolve_device(cfg.device)
    family = student_family(cfg.model)
    cfg = cfg.resolved(family, device)
    mid = model_id(cfg.model, cfg.adapter)
    meta = run_metadata(cfg, template.name)
    out = Path(cfg.out)
    bs = int(cfg.batch_size)
    questions = chunk = question_slice(questions, bs, int(cfg.num_chunks), int(cfg.chunk_idx))  # --num-chunks
    summary = {"questions": len(questions), "already_done": 0, "written": 0, "truncated_bytes": 0,
               "template": template.name}
    in_parts = dist.enabled or bool(existing_parts(out))
    if not in_parts:  # one process: append to --out itself
        mine, done, others = out, set(), []
    else:  # rank r writes its own part; what earlier runs (any K) answered is read from theirs
        mine = part_path(out, dist.rank, dist.world_size)
        if cfg.overwrite:
            run_step(dist, f"clearing {out}", lambda: [p.unlink(missing_ok=True) for p in [out, *existing_parts(out)]]
                     if dist.is_main else None)
        ours = {part_path(out, r, dist.world_size) for r in range(dist.world_size)}
        others = [p for p in [out, *existing_parts(out)] if p.is_file() and p not in ours]
        questions = question_slice(questions, bs, dist.world_size, dist.rank)
    known = {q.key for q in questions}

    def prepare():
        if mine.exists() and not cfg.overwrite:
            check_first_line(mine, mid, meta)  # before truncating anything: a foreign file stays untouched
            state = prepare_output(mine)
        else:
            state = prepare_output(mine, overwrite=True)
        done = state.done & known
        for p in others:
            done |= answered_ids(p, mid, meta) & known
        return state, done

    state, done = run_step(dist, f"opening {mine}", prepare)  # a refused file fails every rank
    if state.truncated_bytes:
        log(f"{mine}: removed a partial last line ({state.truncated_bytes} bytes) left by an interrupted run")
    if state.done - known and not in_parts:
        log(f"Warning: {out} holds {len(state.done - known)} id(s) that are not in {cfg.data}")
    todo = batches_to_run(questions, done, bs)
    n_todo = sum(len(b) for _, b in todo)
    counts = dist.gather_json([len(done), n_todo, state.truncated_bytes])
    summary.update(already_done=sum(c[0] for c in counts), truncated_bytes=sum(c[2] for c in counts))
    total_todo = sum(c[1] for c in counts)
    if summary["already_done"]:
        log(f"resuming {out}: {summary['already_done']} of {summary['questions']} answered, {total_todo} to go")
    bar = None
    if progress and total_todo:
        from tqdm import tqdm
        bar = tqdm(total=total_todo, desc="generate" + (f" ({dist.world_size} ranks)" if dist.enabled else ""),
                   dynamic_ncols=True)
    try:
        with Heartbeat(dist, f"generate into {out}",
                       on_beat=(lambda n: bar.update(n - bar.n)) if bar is not None else None) as beat:
            if todo:
                _answer_batches(cfg, dist, device, mid, meta, root, mine, todo, beat, log, family)
    finally:
        if bar is not None:
            bar.close()
    summary["written"] = total_todo
    if in_parts:
        keys = [q.key for q in chunk]
        run_step(dist, f"merging into {out}", lambda: merge_answer_files(
            keys, [p for p in [out, *existing_parts(out)] if p.is_file()], out,
            remove=existing_parts(out)) if dist.is_main else None)
    elif not todo:
        log(f"{out}: all {len(questions)} questions already answered")
    return summary


def _answer_batches(cfg, dist, device, mid, meta, root, mine, todo, beat, log, family) -> None:
    from shared.distributed import maybe_die

    gen = load_generator(cfg.model, cfg.adapter, template=cfg.template, dtype=torch_dtype(cfg.dtype), device=device,
                         trust_remote_code=cfg.trust_remote_code)
    log(f"model {mid} on {device} ({cfg.dtype}); template {gen.template.name} ({gen.template_source}); "
        f"{gen.num_image_tokens} image tokens; decoding {cfg.decoding.describe()}, "
        f"max {cfg.decoding.max_new_tokens} new tokens "
        f"({family.name} default: {cfg.decoding.method.max_new_tokens(family)}); "
        f"batch {cfg.batch_size}" + (f"; {dist.world_size} ranks" if dist.enabled else ""))
    for b, batch in todo:
        beat.check()
        pixels = torch.stack([student_pixels(gen.image_processor, resolve_image_path(root, q.image), gen.background)
                              for q in batch])
        texts = generate_answers(gen, [q.question for q in batch], pixels, cfg.decoding,
                                 keys=[q.key for q in batch])
        append_lines(mine, [{"question_id": q.qid, "prompt": q.question, "text": t, "model_id": mid,
                             "metadata": meta} for q, t in zip(batch, texts)])
        beat.add(len(batch))
        maybe_die("batch", dist)
