"""Training data: LLaVA-style records -> tokenised samples with image tokens, labels and teacher rows.

Everything that can be wrong with the data is found when the dataset is built, before a model is
loaded or an output directory created: malformed JSON, records without an image or a ``gpt`` turn,
missing image files, images absent from the teacher cache. The build is deterministic, so every
DDP rank builds the identical sample list (too-long samples are dropped and counted, identically).

Each sample is the template's prompt and answer tokenised as LLaVA does: the ``<image>``
placeholder splits the prompt, the text pieces are tokenised separately and the placeholder becomes
``N`` copies of the image token id. A sample's fields (see :func:`collate`):

* ``labels``: -100 everywhere except the answer tokens (answer text, template suffix, end token:
  :func:`answer_end_id`);
* ``query_mask``: the prompt tokens after the image up to the start of the answer (the query rows
  of ``L_att``).

Images are read with :func:`shared.images.load_image`, padded to a square with the processor's
mean colour (LLaVA ``image_aspect_ratio=pad``) and processed by the model's CLIP image processor
with the PIL backend (the torchvision one differs from the reference pixels by up to 0.015). The
teacher cache is opened lazily in whichever process reads it (one reader per DataLoader worker).
A record may name a ``teacher_image`` whose cache row trains it instead of its own image's (the
grounding benchmark's shuffled-teacher control); that image's bytes are checked against the row.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from shared.errors import MedAlignError
from shared.images import mean_colour, resolve_image_path, sha256_file
from shared.records import answer_text, first_turn, load_records, question_text, record_id, record_image
from student_train.inputs import (IGNORE_INDEX, Encoded, adds_bos, answer_end_id, encode_sample, expand,
                                  student_image)
from student_train.templates import PromptTemplate

#: How many offending records an error message lists.
SHOW = 5


@dataclass
class DataStats:
    """What happened to the records of the data file (saved as ``data_stats.json``)."""

    records: int = 0
    used: int = 0
    too_long: int = 0
    too_long_ids: list[str] = field(default_factory=list)
    no_teacher: int = 0
    no_teacher_ids: list[str] = field(default_factory=list)
    max_length: int = 0
    longest: int = 0

    def to_json(self) -> dict[str, Any]:
        return {k: (v[:20] if isinstance(v, list) else v) for k, v in self.__dict__.items()}


@dataclass(frozen=True)
class Sample:
    """A validated, tokenised training sample."""

    index: int
    """Position of the record in the data file."""
    record_id: str
    image: str
    """Dataset-relative image path."""
    enc: Encoded
    teacher_row: int | str | None
    """Row in the teacher cache (MedAlign) or the question key (another method's lookup); None
    without a teacher entry (or without a cache)."""
    teacher_image: str | None = None
    """The image whose teacher signals train this sample (the record's ``teacher_image``, by
    default its own ``image``)."""


def teacher_image(rec: dict) -> str | None:
    """The image whose teacher row trains the record: ``teacher_image`` when the record names one
    (a control such as the grounding benchmark's shuffled teacher), else the record's own image."""
    return rec.get("teacher_image") or record_image(rec)


def _describe(path, i: int, rec: dict) -> str:
    rid = record_id(rec)
    return f"{path} record {i}" + (f" (id {rid})" if rid else "")


def _listing(items: list[str], total: int) -> str:
    more = f" ... and {total - len(items)} more" if total > len(items) else ""
    return "; ".join(items) + more


def build_samples(
    data_path: str | Path,
    image_root: str | Path,
    tokenizer,
    template: PromptTemplate,
    *,
    image_token_id: int,
    num_image_tokens: int,
    max_length: int,
    cache_path: str | Path | None = None,
    allow_missing: bool = False,
    lookup=None,
) -> tuple[list[Sample], DataStats]:
    """Load, validate and tokenise a dataset; deterministic (identical on every rank).

    Raises :class:`MedAlignError` naming the offending records for: malformed JSON (file, line,
    column), a record without an image or without a ``gpt`` turn, a missing image file, and (unless
    ``allow_missing``) images absent from the cache at ``cache_path``. Samples longer than
    ``max_length`` tokens once the image tokens are expanded are dropped and counted.

    ``lookup`` (another method's teacher, e.g. :class:`student_train.methods.a3tune_data.A3Lookup`):
    ``lookup(record) -> teacher key or None`` instead of the MedAlign cache at ``cache_path``; it has
    a ``path`` (named in the messages) and may raise a MedAlignError for a stale entry.
    """
    records = load_records(data_path)
    if not records:
        raise MedAlignError(f"{data_path}: no records")
    root = Path(image_root)
    if not root.is_dir():
        raise MedAlignError(f"--image-root {root} is not a directory")
    no_image, no_answer, missing_file = [], [], []
    for i, rec in enumerate(records):
        img = record_image(rec)
        if img is None:
            no_image.append(_describe(data_path, i, rec))
        elif not resolve_image_path(root, img).is_file():
            missing_file.append(f"{img} ({_describe(data_path, i, rec)})")
        if first_turn(rec, "gpt") is None and "answer" not in rec:
            no_answer.append(_describe(data_path, i, rec))
    if no_image:
        raise MedAlignError(f"{len(no_image)} record(s) have no image (training needs one per sample): "
                            + _listing(no_image[:SHOW], len(no_image)))
    if no_answer:
        raise MedAlignError(f"{len(no_answer)} record(s) have no 'gpt' turn to learn from: "
                            + _listing(no_answer[:SHOW], len(no_answer)))
    if missing_file:
        raise MedAlignError(f"{len(missing_file)} image file(s) not found under --image-root {root}: "
                            + _listing(missing_file[:SHOW], len(missing_file)))

    rows: list[int | str | None] = [None] * len(records)
    stats = DataStats(records=len(records), max_length=max_length)
    if lookup is not None:
        cache_path = lookup.path
        rows = [lookup(rec) for rec in records]
        absent = [f"question {record_id(rec) or i} ({_describe(data_path, i, rec)})"
                  for i, rec in enumerate(records) if rows[i] is None]
        what = "question(s)"
    elif cache_path is not None:
        from shared.cache import open_cache
        reader = open_cache(cache_path)  # index lookups only; the dataset reopens lazily per worker
        absent = []
        for i, rec in enumerate(records):
            rows[i] = reader.lookup(teacher_image(rec), root)
            if rows[i] is None:
                absent.append(f"{teacher_image(rec)} ({_describe(data_path, i, rec)})")
        del reader
        what = "image(s)"
    if cache_path is not None and absent and not allow_missing:
        raise MedAlignError(
            f"{len(absent)} of {len(records)} {what} are not in the teacher cache {cache_path}: "
            + _listing(absent[:SHOW], len(absent))
            + ". Build the cache for this data, or pass --allow-missing to train those samples "
              "with the LM loss only")

    samples: list[Sample] = []
    bos, end = adds_bos(tokenizer), answer_end_id(tokenizer, template)
    for i, rec in enumerate(records):
        enc = encode_sample(tokenizer, template, question_text(rec), answer_text(rec), image_token_id,
                            add_bos=bos, end_id=end)
        length = enc.length(num_image_tokens)
        stats.longest = max(stats.longest, length)
        if length > max_length:
            stats.too_long += 1
            stats.too_long_ids.append(record_id(rec) or str(i))
            continue
        if cache_path is not None and rows[i] is None:
            stats.no_teacher += 1
            stats.no_teacher_ids.append(record_id(rec) or str(i))
        samples.append(Sample(i, record_id(rec), record_image(rec), enc, rows[i], teacher_image(rec)))
    stats.used = len(samples)
    if not samples:
        raise MedAlignError(f"{data_path}: all {len(records)} samples are longer than --max-length "
                            f"{max_length} once the {num_image_tokens} image tokens are expanded "
                            f"(the longest is {stats.longest})")
    return samples, stats


class TrainDataset(torch.utils.data.Dataset):
    """Samples -> tensors. Reads the image and (lazily, per process) the teacher cache.

    Without ``cache_path`` and ``teacher`` (plain LoRA fine-tuning) no cache is opened and no teacher
    keys are returned. ``teacher`` (another method's source, e.g.
    :class:`student_train.methods.a3tune_data.A3Teacher`) gives a sample's teacher fields by
    ``teacher.fields(sample.teacher_row, image path, image sha256)``.
    """

    def __init__(self, samples: list[Sample], image_root: str | Path, image_processor, *,
                 image_token_id: int, num_image_tokens: int, cache_path: str | Path | None = None,
                 teacher=None):
        self.samples = samples
        self.image_root = Path(image_root)
        self.processor = image_processor
        self.image_token_id = int(image_token_id)
        self.num_image_tokens = int(num_image_tokens)
        self.cache_path = None if cache_path is None else str(cache_path)
        self.teacher = teacher
        self.background = mean_colour(tuple(image_processor.image_mean))
        self._reader = None  # opened on first read in the process that reads

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_reader"] = None
        return state

    def __len__(self) -> int:
        return len(self.samples)

    def _cache(self):
        """The teacher cache, opened on first use in the process that reads it."""
        if self._reader is None:
            from shared.cache import open_cache
            self._reader = open_cache(self.cache_path)
        return self._reader

    def _teacher(self, row: int | None) -> tuple[torch.Tensor, torch.Tensor, bool]:
        n = self.num_image_tokens
        if row is None:
            return torch.zeros(n, n), torch.zeros(n), False
        sim, attn = self._cache().read(row)
        return torch.tensor(sim, dtype=torch.float32), torch.tensor(attn, dtype=torch.float32), True

    def _check_key(self, rel: str, row: int, digest: str) -> None:
        """The image's bytes must be the ones its cache row was computed from (an image edited after
        the build would be trained with a stale teacher row)."""
        stored = self._cache().key_of(row)
        if stored and stored != digest:
            raise MedAlignError(f"image {rel} changed since the teacher cache {self.cache_path} was built (its "
                                f"sha256 {digest[:12]}... is not the cached row's {stored[:12]}...); rebuild "
                                "the cache (medalign-cache build) or restore the image")

    def __getitem__(self, i: int) -> dict[str, Any]:
        s = self.samples[i]
        item = expand(s.enc, self.image_token_id, self.num_image_tokens)
        try:
            item["pixel_values"], digest = student_image(
                self.processor, resolve_image_path(self.image_root, s.image), self.background)
            if self.teacher is not None:
                item.update(self.teacher.fields(s.teacher_row, s.image, digest))
            if self.cache_path is not None and s.teacher_row is not None:
                if s.teacher_image not in (None, s.image):  # another image's row: check that image's bytes
                    digest = sha256_file(resolve_image_path(self.image_root, s.teacher_image))
                self._check_key(s.teacher_image or s.image, s.teacher_row, digest)
        except MedAlignError as e:  # plain MedAlignError survives the DataLoader worker boundary
            raise MedAlignError(f"sample {s.record_id or s.index}: {e}") from None
        if self.cache_path is not None:
            sim, attn, ok = self._teacher(s.teacher_row)
            item.update(teacher_sim=sim, teacher_attn=attn, teacher_mask=ok)
        return item


def collate(items: list[dict[str, Any]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad a list of samples into the batch dict ``compute_losses`` consumes.

    ``input_ids`` [B,T] (pad id), ``attention_mask`` [B,T], ``labels`` [B,T] (-100 on padding),
    ``query_mask`` [B,T] bool, ``pixel_values`` [B,3,S,S]; with a teacher also ``teacher_sim``
    [B,N,N], ``teacher_attn`` [B,N] float32 and ``teacher_mask`` [B] bool.
    """
    b = len(items)
    t = max(len(it["input_ids"]) for it in items)
    input_ids = torch.full((b, t), int(pad_id), dtype=torch.long)
    attention_mask = torch.zeros((b, t), dtype=torch.long)
    labels = torch.full((b, t), IGNORE_INDEX, dtype=torch.long)
    query_mask = torch.zeros((b, t), dtype=torch.bool)
    for k, it in enumerate(items):
        n = len(it["input_ids"])
        input_ids[k, :n] = it["input_ids"]
        attention_mask[k, :n] = 1
        labels[k, :n] = it["labels"]
        query_mask[k, :n] = it["query_mask"]
    batch = {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels,
             "query_mask": query_mask, "pixel_values": torch.stack([it["pixel_values"] for it in items])}
    if "teacher_sim" in items[0]:
        batch["teacher_sim"] = torch.stack([it["teacher_sim"] for it in items]).float()
        batch["teacher_attn"] = torch.stack([it["teacher_attn"] for it in items]).float()
        batch["teacher_mask"] = torch.tensor([bool(it["teacher_mask"]) for it in items], dtype=torch.bool)
    return batch


class Collator:
    """Picklable collate_fn bound to a pad id (DataLoader workers need a picklable callable), and to
    a method's teacher source, whose ``collate(items)`` adds its batch fields."""

    def __init__(self, pad_id: int, teacher=None):
        self.pad_id = int(pad_id)
        self.teacher = teacher

    def __call__(self, items):
        batch = collate(items, self.pad_id)
        if self.teacher is not None:
            batch.update(self.teacher.collate(items))
        return batch


class RankSampler(torch.utils.data.DistributedSampler):
    """torch's :class:`~torch.utils.data.DistributedSampler` over ``range(n)`` that can start part-way
    into this rank's slice of an epoch (resuming mid-epoch).

    Epoch ``e`` shuffles with seed ``seed + e``, the order is padded by wrapping around to a multiple
    of ``world_size`` (every rank gets the same number of samples, so no rank waits on another) and
    rank ``r`` takes positions ``r, r + W, ...``. ``skip`` drops the first indices of this rank's slice.
    """

    def __init__(self, n: int, *, rank: int = 0, world_size: int = 1, seed: int = 0, shuffle: bool = True):
        super().__init__(range(n), num_replicas=world_size, rank=rank, shuffle=shuffle, seed=seed)
        self.skip = 0

    def set_epoch(self, epoch: int, skip: int = 0) -> None:
        super().set_epoch(epoch)
        self.skip = skip

    def __iter__(self):
        return itertools.islice(super().__iter__(), self.skip, None)

    def __len__(self) -> int:
        return self.num_samples - self.skip
