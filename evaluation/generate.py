"""Answer generation for evaluation: a trained student (base + LoRA adapter + W) writes LLaVA-Med JSONL.

Public API:

* :class:`DecodingConfig` (greedy / beam / nucleus) and :class:`GenerateConfig` (the whole run).
* :func:`load_questions`: LLaVA-style records -> :class:`Question` s (ids kept, closed suffix applied).
* :func:`with_closed_suffix`: LLaVA-Med's answer-options suffix for closed questions.
* :func:`resolve_template`: the prompt template of a run / model.
* :func:`load_generator` -> :class:`Generator` (model, tokenizer, image processor, template).
* :func:`encode_prompt`, :func:`left_pad`, :func:`image_pixels`, :func:`generate_answers`.
* :func:`prepare_output` (resume: ids already written, partial last line truncated) and
  :func:`run_generate` (the command).

The model sees exactly what it saw in training: the template's prompt tokenised as LLaVA's
``tokenizer_image_token`` does (the text around ``<image>`` tokenised separately, BOS when the
tokenizer adds one, the placeholder expanded into ``N`` copies of the image token id), and the
image padded to a square with the processor's mean colour and processed with the PIL backend.
With a training run, :func:`student_train.model.load_trained` merges the LoRA weights and
installs ``W``, which rotates the visual positions of the prefill only (the forward that holds
the image tokens), never the single-token decoding steps.

Batches are LEFT-padded (every prompt ends at the last column, so the first generated token of
every row is predicted from that row's own last prompt token); position ids follow the
attention mask, so a padded row computes what it computes alone.

Output: one JSON object per line, ``{"question_id", "prompt", "text", "model_id", "metadata"}``
(LLaVA-Med's answer-file format; ``question_id`` is the record's id, an int when the record's id
is an int). Each batch's lines are written with one ``write`` + ``flush`` + ``fsync``, so an
interrupted run leaves whole lines (at worst a partial last line, which the next run truncates)
and resumes after the last id written.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from shared.errors import MedAlignError
from shared.runtime import check_device_flag, check_dtype_name, resolve_device, torch_dtype
from shared.images import expand2square, load_image, mean_colour, resolve_image_path
from shared.records import (IMAGE_PLACEHOLDER, answer_type, load_records, question_text, read_json, record_id,
                            record_image)
from student_train.templates import PromptTemplate, get_template, template_for_model

DECODINGS = ("greedy", "beam", "nucleus")
CLOSED_SUFFIX_MODES = ("auto", "always", "never")
#: ``--dtype auto`` / ``--max-new-tokens auto`` resolve per student family (:func:`student_family`).
AUTO = "auto"


@dataclass(frozen=True)
class StudentFamily:
    """The reference's evaluation settings for one student family (MedAlign ``llava/eval/model_vqa.py``)."""

    name: str
    max_new_tokens: int
    """``max_new_tokens`` of the reference's beam and greedy runs."""
    cuda_dtype: str
    """The half precision the reference evaluates in on CUDA (float32 on CPU)."""


#: LLaVA-Med-1.5 (``llava-med-1.5/llava/eval/model_vqa.py``: fp16, 1024 new tokens) and
#: HuatuoGPT-Vision (``huatuoGPT_V/llava/eval/model_vqa.py``: bf16, 128 new tokens), by the student's
#: language backbone.
FAMILIES = {"llava-med": StudentFamily("llava-med", 1024, "float16"),
            "huatuo": StudentFamily("huatuo", 128, "bfloat16")}
BACKBONE_FAMILY = {"llama": "llava-med", "mistral": "llava-med", "qwen2": "huatuo"}

#: LLaVA-Med's answer-options suffix for closed (yes/no) questions. LLaVA-Med's evaluation script
#: (``llava/eval/model_vqa.py``) adds nothing itself: the suffix is part of the question text of
#: its prepared test files, appended to every CLOSED question (VQA-RAD: all 272 closed test
#: questions; PathVQA: the yes/no ones, which are its closed ones). See :func:`with_closed_suffix`.
CLOSED_SUFFIX = " Please choose from the following two options: [yes, no]"
_HAS_OPTIONS = re.compile(r"please choose from the following", re.IGNORECASE)


# --------------------------------------------------------------------------- configuration


@dataclass
class DecodingConfig:
    """How answers are decoded (``model.generate`` settings)."""

    mode: str = "beam"
    """beam (default, as the paper and the reference: num_beams, no sampling) | greedy (do_sample False,
    1 beam; the reference's scripts report it too) | nucleus (sampling with top_p, temperature)."""
    num_beams: int = 5
    """Beams for ``beam``."""
    top_p: float = 0.9
    """Nucleus mass for ``nucleus``."""
    temperature: float = 1.0
    """Softmax temperature for ``nucleus``."""
    max_new_tokens: int | str = AUTO
    """Longest answer in tokens; ``auto``: the student family's (LLaVA-Med 1024, HuatuoGPT 128)."""
    seed: int = 0
    """Seed of the sampling (each batch is seeded with ``seed + batch index``)."""

    def __post_init__(self):
        if self.mode not in DECODINGS:
            raise MedAlignError(f"unknown --decoding {self.mode!r}; valid: {', '.join(DECODINGS)}")
        if int(self.num_beams) < 1:
            raise MedAlignError(f"--num-beams must be >= 1, got {self.num_beams}")
        if not 0 < float(self.top_p) <= 1:
            raise MedAlignError(f"--top-p must be in (0, 1], got {self.top_p}")
        if not float(self.temperature) > 0:
            raise MedAlignError(f"--temperature must be > 0, got {self.temperature}")
        if self.max_new_tokens != AUTO:
            try:
                self.max_new_tokens = int(self.max_new_tokens)
            except (TypeError, ValueError):
                raise MedAlignError(f"--max-new-tokens must be an integer or auto, got {self.max_new_tokens!r}") from None
            if self.max_new_tokens < 1:
                raise MedAlignError(f"--max-new-tokens must be >= 1, got {self.max_new_tokens}")

    def resolved(self, family: StudentFamily) -> "DecodingConfig":
        """A copy with ``max_new_tokens: auto`` replaced by the family's value."""
        if self.max_new_tokens != AUTO:
            return self
        return dataclasses.replace(self, max_new_tokens=family.max_new_tokens)

    def generate_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for ``model.generate`` (only those the mode uses)."""
        if self.max_new_tokens == AUTO:
            raise MedAlignError("max_new_tokens 'auto' must be resolved for the student first (DecodingConfig.resolved)")
        kw: dict[str, Any] = {"max_new_tokens": int(self.max_new_tokens)}
        if self.mode == "greedy":
            kw.update(do_sample=False, num_beams=1)
        elif self.mode == "beam":
            # no early_stopping, as the reference passes none: the model's generation config decides
            # (transformers' default False: stop when no running beam can beat the finished ones)
            kw.update(do_sample=False, num_beams=int(self.num_beams))
        else:
            kw.update(do_sample=True, num_beams=1, top_p=float(self.top_p), top_k=0,
                      temperature=float(self.temperature))
        return kw

    def to_json(self) -> dict[str, Any]:
        """The settings that matter for the mode (written into every line's metadata)."""
        d: dict[str, Any] = {"decoding": self.mode, "max_new_tokens": self.max_new_tokens}
        if self.mode == "beam":
            d["num_beams"] = int(self.num_beams)
        if self.mode == "nucleus":
            d.update(top_p=float(self.top_p), temperature=float(self.temperature), seed=int(self.seed))
        return d


@dataclass
class GenerateConfig:
    """One ``medalign-eval generate`` run."""

    model: str
    """HF-format LLaVA student directory (the base model)."""
    data: str
    """LLaVA-style JSON list of test records."""
    image_root: str
    """Directory the records' image paths are relative to."""
    out: str
    """Output JSONL (appended to when it exists: resume)."""
    adapter: str | None = None
    """Training run directory (PEFT adapter + rotation W + config.json + teacher.json)."""
    decoding: DecodingConfig = field(default_factory=DecodingConfig)
    """Decoding settings."""
    batch_size: int = 8
    """Questions per ``generate`` call."""
    device: str = "auto"
    """auto (cuda when available) | cpu | cuda | cuda:K."""
    dtype: str = AUTO
    """auto (the reference's: on CUDA float16 for LLaVA-Med, bfloat16 for HuatuoGPT; float32 on CPU) |
    float32 | bfloat16 | float16."""
    template: str | None = None
    """Prompt template name when neither the run nor the model records one."""
    limit: int | None = None
    """Only the first K questions of the data file."""
    closed_suffix: str = "auto"
    """auto (LLaVA-Med: closed questions) | always | never."""
    overwrite: bool = False
    """Start a fresh output file instead of resuming."""
    trust_remote_code: bool = False
    """Allow custom modelling code from the model directory."""

    def __post_init__(self):
        if int(self.batch_size) < 1:
            raise MedAlignError(f"--batch-size must be >= 1, got {self.batch_size}")
        if self.limit is not None and int(self.limit) < 1:
            raise MedAlignError(f"--limit must be >= 1, got {self.limit}")
        check_dtype_name(self.dtype, extra=(AUTO,))

    def resolved(self, family: StudentFamily, device: torch.device) -> "GenerateConfig":
        """A copy with every ``auto`` replaced: the family's ``max_new_tokens``, and its half precision
        on CUDA (float32 on CPU, where half precision is slow and not what anyone evaluates with)."""
        dtype = self.dtype
        if dtype == AUTO:
            dtype = family.cuda_dtype if device.type == "cuda" else "float32"
        return dataclasses.replace(self, dtype=dtype, decoding=self.decoding.resolved(family))
        if self.closed_suffix not in CLOSED_SUFFIX_MODES:
            raise MedAlignError(f"unknown --closed-suffix {self.closed_suffix!r}; valid: {', '.join(CLOSED_SUFFIX_MODES)}")
        check_device_flag(self.device)


def student_family(model_dir: str | Path) -> StudentFamily:
    """The family whose reference evaluation settings apply, by the language backbone in the
    student's ``config.json`` (``text_config.model_type``): qwen2 -> HuatuoGPT, else LLaVA-Med."""
    try:
        cfg = read_json(Path(model_dir) / "config.json")
    except MedAlignError:
        cfg = {}
    backbone = (cfg.get("text_config") or {}).get("model_type") if isinstance(cfg, dict) else None
    return FAMILIES[BACKBONE_FAMILY.get(backbone, "llava-med")]


# --------------------------------------------------------------------------- questions


@dataclass(frozen=True)
class Question:
    """One test question, ready to prompt."""

    qid: int | str
    """The record's id as given (int ids stay ints; a record without id gets its index)."""
    image: str
    """Dataset-relative image path."""
    question: str
    """The question text sent to the template (``<image>`` removed, closed suffix applied)."""

    @property
    def key(self) -> str:
        """The id as the trimmed string used to join and to resume."""
        return str(self.qid).strip()


def with_closed_suffix(question: str, atype: str | None, mode: str) -> str:
    """LLaVA-Med's answer-options suffix, as its prepared test files carry it.

    ``auto`` (default, reproduces LLaVA-Med): appended when the record's ``answer_type`` is
    ``CLOSED``; ``always``: appended to every question; ``never``: the question as given. A
    question that already holds "Please choose from the following ..." is never given a second
    one. LLaVA-Med's VQA-RAD file capitalises the options ("[Yes, No]") where the ground-truth
    answer is capitalised, which leaks the answer's case; this always writes ``[yes, no]``.
    """
    if mode not in CLOSED_SUFFIX_MODES:
        raise MedAlignError(f"unknown closed-suffix mode {mode!r}; valid: {', '.join(CLOSED_SUFFIX_MODES)}")
    if mode == "never" or _HAS_OPTIONS.search(question):
        return question
    if mode == "always" or atype == "CLOSED":
        return question + CLOSED_SUFFIX
    return question


def load_questions(data: str | Path, closed_suffix: str = "auto", limit: int | None = None) -> list[Question]:
    """Read a LLaVA-style test file into questions (the first ``limit`` records only, if given).

    Raises :class:`MedAlignError` for records without an image or without a question, and for
    repeated ids (answers are joined and resumed by id), naming the records.
    """
    records = load_records(data)
    if limit is not None:
        records = records[: int(limit)]
    if not records:
        raise MedAlignError(f"{data}: no records")
    out: list[Question] = []
    seen: dict[str, int] = {}
    problems: list[str] = []
    for i, rec in enumerate(records):
        raw_id = rec.get("id", rec.get("question_id"))
        qid: int | str = i if raw_id is None or str(raw_id).strip() == "" else raw_id
        if isinstance(qid, bool) or not isinstance(qid, (int, str)):
            qid = str(qid)
        image = record_image(rec)
        q = question_text(rec)
        where = f"record {i} (id {record_id(rec) or i})"
        if image is None:
            problems.append(f"{where}: no image")
            continue
        if not q:
            problems.append(f"{where}: no question (no human turn)")
            continue
        question = Question(qid, image, with_closed_suffix(q, answer_type(rec), closed_suffix))
        if question.key in seen:
            problems.append(f"{where}: id {question.key!r} repeats record {seen[question.key]}")
            continue
        seen[question.key] = i
        out.append(question)
    if problems:
        shown = "; ".join(problems[:5]) + (f" ... and {len(problems) - 5} more" if len(problems) > 5 else "")
        raise MedAlignError(f"{data}: {len(problems)} record(s) cannot be asked: {shown}")
    return out


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

    @property
    def background(self) -> tuple[int, int, int]:
        return mean_colour(tuple(self.image_processor.image_mean))


def load_generator(model_dir: str | Path, run_dir: str | Path | None = None, *, template: str | None = None,
                   dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
                   trust_remote_code: bool = False) -> Generator:
    """Base student (+ adapter and W from ``run_dir``), tokenizer, image processor and template."""
    from student_train.data import adds_bos, answer_end_id, load_image_processor
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
                     int(pad_id), eos_ids, adds_bos(tokenizer), device, dtype)


def encode_prompt(tokenizer, template: PromptTemplate, question: str, image_token_id: int,
                  num_image_tokens: int, *, add_bos: bool) -> tuple[list[int], int]:
    """Token ids of the template's prompt with the image placeholder expanded.

    Like LLaVA's ``tokenizer_image_token`` (and :func:`student_train.data.encode_sample`): the text
    before and after ``<image>`` is tokenised separately without special tokens, BOS first when
    the tokenizer adds one, ``<image>`` becomes ``num_image_tokens`` copies of ``image_token_id``.

    Returns:
        (ids, query_start): the ids, and the index of the first prompt token after the image
        (the query rows of L_att run from there to the end of the prompt).
    """
    prompt = template.build_prompt(question)
    head, sep, tail = prompt.partition(IMAGE_PLACEHOLDER)
    assert sep, "templates always contain the image placeholder"
    head_ids = list(tokenizer(head, add_special_tokens=False)["input_ids"]) if head else []
    tail_ids = list(tokenizer(tail, add_special_tokens=False)["input_ids"])
    if image_token_id in head_ids or image_token_id in tail_ids:
        raise MedAlignError("the question text contains the image token itself")
    ids = [int(tokenizer.bos_token_id)] if add_bos else []
    ids += head_ids + [int(image_token_id)] * int(num_image_tokens)
    return ids + tail_ids, len(ids)


def left_pad(seqs: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """LEFT-pad token id lists: ``input_ids`` [B, T] (pad id) and ``attention_mask`` [B, T] (0 on padding)."""
    t = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), t), int(pad_id), dtype=torch.long)
    mask = torch.zeros((len(seqs), t), dtype=torch.long)
    for i, s in enumerate(seqs):
        if s:
            ids[i, t - len(s):] = torch.tensor(s, dtype=torch.long)
            mask[i, t - len(s):] = 1
    return ids, mask


def image_pixels(processor, path: str | Path, background: tuple[int, int, int]) -> torch.Tensor:
    """[3, S, S] float32 pixels: the image padded to a square with ``background`` and processed
    (exactly :meth:`student_train.data.TrainDataset.pixels`)."""
    img, _ = load_image(path)
    img = expand2square(img, background)
    out = processor(images=img, return_tensors="pt")["pixel_values"]
    return torch.as_tensor(out[0], dtype=torch.float32)


def _clean(text: str, stop_str: str) -> str:
    if stop_str and stop_str in text:
        text = text[: text.index(stop_str)]
    return text.strip()


@torch.inference_mode()
def generate_ids(gen: Generator, questions: list[str], pixels: torch.Tensor, decoding: DecodingConfig,
                 *, seed: int | None = None) -> list[list[int]]:
    """Answer a batch: ``questions`` (B strings) about ``pixels`` [B, 3, S, S], LEFT-padded, one
    ``generate`` call; ``seed`` (when given) seeds torch's RNG right before it.

    Returns the B generated token id lists, cut at the first end-of-answer id (excluded).
    """
    seqs = [encode_prompt(gen.tokenizer, gen.template, q, gen.image_token_id, gen.num_image_tokens,
                          add_bos=gen.add_bos)[0] for q in questions]
    input_ids, attention_mask = left_pad(seqs, gen.pad_id)
    if seed is not None:
        torch.manual_seed(seed)
    out = gen.model.generate(
        input_ids=input_ids.to(gen.device),
        attention_mask=attention_mask.to(gen.device),
        pixel_values=pixels.to(gen.device, gen.dtype),
        pad_token_id=gen.pad_id,
        eos_token_id=gen.eos_ids,
        **decoding.generate_kwargs(),
    )
    result = []
    for row in out[:, input_ids.shape[1]:].cpu().tolist():
        cut = next((i for i, t in enumerate(row) if t in gen.eos_ids), len(row))
        result.append(row[:cut])
    return result


def generate_answers(gen: Generator, questions: list[str], pixels: torch.Tensor, decoding: DecodingConfig,
                     *, seed: int | None = None) -> list[str]:
    """:func:`generate_ids` decoded (special tokens skipped, cut at the template's stop string, stripped)."""
    ids = generate_ids(gen, questions, pixels, decoding, seed=seed)
    texts = gen.tokenizer.batch_decode(ids, skip_special_tokens=True)
    return [_clean(t, gen.template.stop_str) for t in texts]


# --------------------------------------------------------------------------- output / resume


@dataclass
class ResumeState:
    """What an existing output file holds."""

    done: set[str]
    """Ids already answered (trimmed strings)."""
    lines: int
    """Complete lines kept."""
    truncated_bytes: int
    """Bytes of a partial last line removed (0 when the file ended cleanly)."""
    first: dict | None
    """The first answer line, to check it was written with the same settings."""


def prepare_output(path: str | Path, *, overwrite: bool = False) -> ResumeState:
    """Make ``path`` ready for appending and report what it already holds.

    A missing file (or ``overwrite``) starts empty. Otherwise a trailing partial line (a run killed
    mid-write) is truncated away; every remaining line must be a JSON object with a
    ``question_id``, else :class:`MedAlignError` names the line.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if overwrite or not path.exists():
        path.write_bytes(b"")
        return ResumeState(set(), 0, 0, None)
    data = path.read_bytes()
    cut = 0
    if data and not data.endswith(b"\n"):
        keep = data.rfind(b"\n") + 1
        cut = len(data) - keep
        data = data[:keep]
        with open(path, "r+b") as f:
            f.truncate(keep)
            f.flush()
            os.fsync(f.fileno())
    done: set[str] = set()
    first = None
    n = 0
    for lineno, line in enumerate(data.decode("utf-8", errors="replace").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise MedAlignError(f"{path}:{lineno}: not a JSON line ({e.msg}); is this an answer file? "
                                "Use another --out or --overwrite") from None
        if not isinstance(obj, dict) or "question_id" not in obj:
            raise MedAlignError(f"{path}:{lineno}: no question_id; is this an answer file? "
                                "Use another --out or --overwrite")
        done.add(str(obj["question_id"]).strip())
        first = first or obj
        n += 1
    return ResumeState(done, n, cut, first)


def append_lines(path: str | Path, rows: list[dict]) -> None:
    """Append rows as JSON lines with one write, then flush and fsync (never a partial batch on
    a clean stop; at worst a partial last line on a kill, which :func:`prepare_output` removes)."""
    if not rows:
        return
    payload = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows).encode("utf-8")
    with open(path, "ab") as f:
        f.write(payload)
        f.flush()
        os.fsync(f.fileno())


def _teacher_identity(run_dir: str | Path | None) -> Any:
    if run_dir is None:
        return None
    p = Path(run_dir) / "teacher.json"
    return read_json(p) if p.is_file() else None


def model_id(model_dir: str | Path, run_dir: str | Path | None) -> str:
    """``<model dir name>`` or ``<model dir name>+<run dir name>``."""
    name = Path(model_dir).resolve().name
    return name if run_dir is None else f"{name}+{Path(run_dir).resolve().name}"


def run_metadata(cfg: GenerateConfig, template: str) -> dict[str, Any]:
    """The ``metadata`` written on every line: decoding, adapter, teacher identity, template, ..."""
    return {
        **cfg.decoding.to_json(),
        "adapter": None if cfg.adapter is None else str(Path(cfg.adapter).resolve()),
        "teacher": _teacher_identity(cfg.adapter),
        "template": template,
        "closed_suffix": cfg.closed_suffix,
        "dtype": cfg.dtype,
    }


#: Metadata keys that must agree between a resumed file and the current run.
_RESUME_KEYS = ("decoding", "max_new_tokens", "num_beams", "top_p", "temperature", "seed", "adapter",
                "template", "closed_suffix", "dtype")


def _check_resumable(path: Path, first: dict | None, mid: str, meta: dict) -> None:
    if first is None:
        return
    old = first.get("metadata") or {}
    diffs = [k for k in _RESUME_KEYS if old.get(k) != meta.get(k)]
    if first.get("model_id") != mid:
        diffs.insert(0, "model_id")
    if diffs:
        detail = ", ".join(f"{k}: {old.get(k) if k != 'model_id' else first.get('model_id')!r} -> "
                           f"{meta.get(k) if k != 'model_id' else mid!r}" for k in diffs)
        raise MedAlignError(f"{path} was written with other settings ({detail}); resuming would mix "
                            "them. Use another --out, or --overwrite to start again")


def batches_to_run(questions: list[Question], done: set[str], batch_size: int) -> list[tuple[int, list[Question]]]:
    """``(batch index, questions still to answer)`` over a FIXED partition of the question list
    into batches of ``batch_size``: a resumed run with the same batch size runs the very batches
    (and seeds) an uninterrupted run would."""
    out = []
    for b, start in enumerate(range(0, len(questions), batch_size)):
        todo = [q for q in questions[start:start + batch_size] if q.key not in done]
        if todo:
            out.append((b, todo))
    return out


def run_generate(cfg: GenerateConfig, *, log: Callable[[str], None] = print, progress: bool = True) -> dict[str, Any]:
    """The ``generate`` command: validate, load, answer the questions not yet in ``cfg.out``.

    Returns ``{"questions", "already_done", "written", "truncated_bytes", "template"}``.
    """
    questions = load_questions(cfg.data, cfg.closed_suffix, cfg.limit)
    root = Path(cfg.image_root)
    if not root.is_dir():
        raise MedAlignError(f"--image-root {root} is not a directory")
    missing = [q.image for q in questions if not resolve_image_path(root, q.image).is_file()]
    if missing:
        raise MedAlignError(f"{len(missing)} image file(s) not found under --image-root {root}: "
                            + ", ".join(missing[:5]) + (" ..." if len(missing) > 5 else ""))
    if cfg.adapter is not None and not (Path(cfg.adapter) / "adapter_config.json").is_file():
        raise MedAlignError(f"--adapter {cfg.adapter} holds no PEFT adapter (adapter_config.json missing)")
    template, _ = resolve_template(cfg.model, cfg.adapter, cfg.template)
    device = resolve_device(cfg.device)
    family = student_family(cfg.model)
    cfg = cfg.resolved(family, device)
    mid = model_id(cfg.model, cfg.adapter)
    meta = run_metadata(cfg, template.name)
    out = Path(cfg.out)
    if out.exists() and not cfg.overwrite:
        _check_first_line(out, mid, meta)  # before truncating anything: a foreign file stays untouched
        state = prepare_output(out)
    else:
        state = prepare_output(out, overwrite=True)
    if state.truncated_bytes:
        log(f"{out}: removed a partial last line ({state.truncated_bytes} bytes) left by an interrupted run")
    known = {q.key for q in questions}
    done = state.done & known
    if state.done - known:
        log(f"Warning: {out} holds {len(state.done - known)} id(s) that are not in {cfg.data}")
    todo = batches_to_run(questions, done, int(cfg.batch_size))
    n_todo = sum(len(b) for _, b in todo)
    summary = {"questions": len(questions), "already_done": len(done), "written": 0,
               "truncated_bytes": state.truncated_bytes, "template": template.name}
    if done:
        log(f"resuming {out}: {len(done)} of {len(questions)} answered, {n_todo} to go")
    if not todo:
        log(f"{out}: all {len(questions)} questions already answered")
        return summary

    gen = load_generator(cfg.model, cfg.adapter, template=cfg.template, dtype=torch_dtype(cfg.dtype), device=device,
                         trust_remote_code=cfg.trust_remote_code)
    log(f"model {mid} on {device} ({cfg.dtype}); template {gen.template.name} ({gen.template_source}); "
        f"{gen.num_image_tokens} image tokens; decoding {cfg.decoding.mode}"
        f"{f' ({cfg.decoding.num_beams} beams)' if cfg.decoding.mode == 'beam' else ''}, "
        f"max {cfg.decoding.max_new_tokens} new tokens ({family.name} default: {family.max_new_tokens}); "
        f"batch {cfg.batch_size}")
    bar = None
    if progress:
        from tqdm import tqdm
        bar = tqdm(total=n_todo, desc="generate", dynamic_ncols=True)
    try:
        for b, batch in todo:
            pixels = torch.stack([image_pixels(gen.image_processor, resolve_image_path(root, q.image), gen.background)
                                  for q in batch])
            texts = generate_answers(gen, [q.question for q in batch], pixels, cfg.decoding,
                                     seed=int(cfg.decoding.seed) + b)
            append_lines(out, [{"question_id": q.qid, "prompt": q.question, "text": t, "model_id": mid,
                                "metadata": meta} for q, t in zip(batch, texts)])
            summary["written"] += len(batch)
            if bar is not None:
                bar.update(len(batch))
    finally:
        if bar is not None:
            bar.close()
    return summary


def _check_first_line(out: Path, mid: str, meta: dict) -> None:
    """Raise unless ``out``'s first complete line was written with the same settings."""
    with open(out, "rb") as f:
        head = f.readline()
    if not head.endswith(b"\n"):  # empty, or only a partial first line: nothing to compare
        return
    try:
        first = json.loads(head)
    except json.JSONDecodeError as e:
        raise MedAlignError(f"{out}:1: not a JSON line ({e.msg}); is this an answer file? "
                            "Use another --out or --overwrite") from None
    if not isinstance(first, dict):
        raise MedAlignError(f"{out}:1: not an answer line; use another --out or --overwrite")
    _check_resumable(out, first, mid, meta)


__all__ = [
    "CLOSED_SUFFIX", "DecodingConfig", "GenerateConfig", "StudentFamily", "FAMILIES", "student_family", "Question", "Generator", "ResumeState",
    "with_closed_suffix", "load_questions", "run_template_name", "resolve_template", "load_generator",
    "encode_prompt", "left_pad", "image_pixels", "generate_ids", "generate_answers", "prepare_output", "append_lines",
    "batches_to_run", "run_generate", "model_id", "run_metadata",
]
