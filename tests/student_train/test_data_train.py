"""Training data: tokenisation against LLaVA's own recipe, labels, query rows, pixels, teacher rows,
bad input, padding and the per-rank sampler."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch
from PIL import Image
from train_helpers import write_images, write_records, write_teacher_cache

from shared.errors import MedAlignError
from student_train.data import Collator, RankSampler, TrainDataset, build_samples, collate
from student_train.inputs import IGNORE_INDEX, encode_sample, expand, load_image_processor
from student_train.templates import get_template

N = 16  # tiny students: 32 px / 8 px patches -> 4 x 4


def _student(dirs, backbone):
    from transformers import AutoTokenizer
    path = dirs[backbone]
    tok = AutoTokenizer.from_pretrained(path)
    cfg = json.loads((path / "config.json").read_text())
    image_id = cfg.get("image_token_id", cfg.get("image_token_index"))
    return path, tok, image_id


@pytest.fixture(scope="module", params=["llama", "mistral", "qwen2"])
def any_student(request, tiny_student_dirs):
    return _student(tiny_student_dirs, request.param)


@pytest.fixture(scope="module")
def student(tiny_student_dirs):
    return _student(tiny_student_dirs, "llama")


def llava_tokenizer_image_token(tokenizer, prompt, image_token_id):
    """LLaVA's mm_utils.tokenizer_image_token, written out: chunks tokenised with special tokens,
    the first chunk's BOS kept once, one image id between chunks."""
    chunks = [tokenizer(c)["input_ids"] for c in prompt.split("<image>")]
    ids, offset = [], 0
    if chunks and chunks[0] and chunks[0][0] == tokenizer.bos_token_id:
        offset = 1
        ids.append(chunks[0][0])
    seps = [[image_token_id] * (offset + 1)] * len(chunks)
    interleaved = [x for pair in zip(chunks, seps) for x in pair][:-1]
    for x in interleaved:
        ids.extend(x[offset:])
    return ids


@pytest.mark.parametrize("name", ["vicuna_v1", "mistral_instruct", "huatuo", "huatuo_chat"])
def test_tokenisation_matches_llava(any_student, name):
    _, tok, image_id = any_student
    t = get_template(name)
    for q, a in [("Is there a mass?", "yes"), ("<image>\nWhere is the lesion located?", "right lower lobe"),
                 ("How many?", "3")]:
        enc = encode_sample(tok, t, q, a, image_id)
        prompt, full = t.build_training_text(q, a)
        ref = llava_tokenizer_image_token(tok, full, image_id) + [tok.eos_token_id]
        assert enc.ids.tolist() == ref
        item = expand(enc, image_id, N)
        ids, labels, qm = item["input_ids"], item["labels"], item["query_mask"]
        assert len(ids) == enc.length(N) == len(ref) - 1 + N
        img = (ids == image_id).nonzero().flatten()
        assert len(img) == N and img.tolist() == list(range(img[0], img[0] + N))
        # supervised = answer text + suffix + EOS, exactly
        sup = ids[labels != IGNORE_INDEX].tolist()
        assert sup[-1] == tok.eos_token_id
        assert tok.decode(sup[:-1]) == t.answer_prefix + a.strip() + t.answer_suffix
        assert (labels[labels != IGNORE_INDEX] == ids[labels != IGNORE_INDEX]).all()
        first_sup = int((labels != IGNORE_INDEX).nonzero()[0])
        assert (labels[:first_sup] == IGNORE_INDEX).all() and (labels[first_sup:] != IGNORE_INDEX).all()
        # query rows = what follows the image in the prompt, up to the answer
        q_idx = qm.nonzero().flatten().tolist()
        assert q_idx == list(range(int(img[-1]) + 1, first_sup))
        tail = prompt.split("<image>", 1)[1]
        assert tok.decode(ids[qm].tolist()) == tail


def huatuo_preprocess_v1(tokenizer, conversation, image_token_id):
    """MedAlign's huatuoGPT_V/llava/train/train.py preprocess_v1 for one single-turn conversation,
    written out: pad = unk (the reference sets pad_token = unk_token), rounds split at sep2, the
    instruction masked up to len(tokens of "... <|assistant|>: ") - 1, the token after the round
    (sep2) kept as the last supervised one; a length mismatch would mask everything."""
    ids = llava_tokenizer_image_token(tokenizer, conversation, image_token_id)
    targets = list(ids)
    total_len = sum(1 for t in ids if t != tokenizer.unk_token_id)
    sep = " " + "<|assistant|>" + ": "
    cur_len = 0
    for rou in conversation.split("<|endoftext|>"):
        if rou == "":
            break
        parts = rou.split(sep)
        if len(parts) != 2:
            break
        parts[0] += sep
        round_len = len(llava_tokenizer_image_token(tokenizer, rou, image_token_id))
        instruction_len = len(llava_tokenizer_image_token(tokenizer, parts[0], image_token_id)) - 1
        targets[cur_len:cur_len + instruction_len] = [IGNORE_INDEX] * instruction_len
        cur_len += round_len
    targets[cur_len + 1:] = [IGNORE_INDEX] * len(targets[cur_len + 1:])
    assert cur_len == total_len, "the reference would mask this whole sample"
    return ids, targets


@pytest.mark.parametrize("eos", ["<|endoftext|>", "<|im_end|>"])  # Qwen2 base / Qwen2-Instruct-style EOS
def test_huatuo_supervision_matches_medalign_preprocess_v1(eos):
    from student_train.tiny import qwen2_tokenizer
    from test_templates import VICUNA_SYSTEM, huatuo_two_style

    tok = qwen2_tokenizer()
    tok.add_tokens(["<image>"], special_tokens=True)
    tok.eos_token = eos  # the reference appends the text <|endoftext|> whatever the EOS is
    image_id = tok.convert_tokens_to_ids("<image>")
    eot = tok.convert_tokens_to_ids("<|endoftext|>")
    t = get_template("huatuo")
    roles = ("<|user|>", "<|assistant|>")
    for q, a in [("Is there a mass?", "yes"), ("<image>\nWhere is the lesion located?", "right lower lobe"),
                 ("How many?", "3")]:
        msg = "<image>\n" + q.replace("<image>", "").strip()
        conversation = huatuo_two_style(VICUNA_SYSTEM, roles, " ", "<|endoftext|>", [(roles[0], msg), (roles[1], a)])
        ref_ids, ref_targets = huatuo_preprocess_v1(tok, conversation, image_id)
        item = expand(encode_sample(tok, t, q, a, image_id), image_id, 1)  # one image id, as the reference's -200
        assert item["input_ids"].tolist() == ref_ids
        assert item["labels"].tolist() == ref_targets
        sup = [i for i in ref_targets if i != IGNORE_INDEX]
        assert sup[-1] == eot and sup.count(eot) == 1 and tok.decode(sup[:-1]) == " " + a
        assert tok.bos_token_id is None and ref_ids[0] != image_id


@pytest.fixture()
def dataset_dir(tmp_path):
    images = write_images(tmp_path / "images", 6)
    write_records(tmp_path / "train.json", images)
    return tmp_path, images


def _build(student, ds_dir, **kw):
    path, tok, image_id = student
    args = dict(image_token_id=image_id, num_image_tokens=N, max_length=1024)
    args.update(kw)
    return build_samples(ds_dir / "train.json", ds_dir / "images", tok, get_template("vicuna_v1"), **args)


def test_dataset_items_pixels_and_teacher(student, dataset_dir):
    path, tok, image_id = student
    d, images = dataset_dir
    cache, arrays = write_teacher_cache(d / "cache", d / "images", images, 4, skip=(images[2],))
    with pytest.raises(MedAlignError, match=r"1 of 6 image\(s\) are not in the teacher cache.*img/002.png.*--allow-missing"):
        _build(student, d, cache_path=cache)
    samples, stats = _build(student, d, cache_path=cache, allow_missing=True)
    assert stats.used == 6 and stats.no_teacher == 1 and stats.no_teacher_ids == ["q2"]
    proc = load_image_processor(path)
    assert type(proc).__name__ == "CLIPImageProcessorPil"
    ds = TrainDataset(samples, d / "images", proc, image_token_id=image_id, num_image_tokens=N, cache_path=cache)
    mean, std = np.array(proc.image_mean), np.array(proc.image_std)
    for i in range(6):
        item = ds[i]
        # independent LLaVA pad-to-square + CLIP preprocessing
        img = Image.open(d / "images" / images[i]).convert("RGB")
        w, h = img.size
        side = max(w, h)
        canvas = Image.new("RGB", (side, side), tuple(int(m * 255) for m in mean))
        canvas.paste(img, ((side - w) // 2, (side - h) // 2))
        arr = np.asarray(canvas.resize((32, 32), Image.Resampling.BICUBIC), dtype=np.float64) / 255.0
        ref = ((arr - mean) / std).transpose(2, 0, 1)
        np.testing.assert_allclose(item["pixel_values"].numpy(), ref, atol=1e-5)
        if images[i] in arrays:
            sim, attn = arrays[images[i]]
            assert item["teacher_mask"] is True
            np.testing.assert_allclose(item["teacher_sim"].numpy(), sim, atol=1e-3)  # float16 storage
            np.testing.assert_allclose(item["teacher_attn"].numpy(), attn, rtol=0, atol=1e-7)
        else:
            assert item["teacher_mask"] is False and not item["teacher_sim"].any() and not item["teacher_attn"].any()


def test_cache_lookup_falls_back_to_content_hash(student, dataset_dir):
    d, images = dataset_dir
    cache, _ = write_teacher_cache(d / "cache", d / "images", images, 4, index_paths=False)
    samples, stats = _build(student, d, cache_path=cache)
    assert stats.no_teacher == 0 and [s.teacher_row for s in samples] == list(range(6))


def test_reader_is_opened_lazily_per_process(student, dataset_dir):
    path, tok, image_id = student
    d, images = dataset_dir
    cache, _ = write_teacher_cache(d / "cache", d / "images", images, 4)
    samples, _ = _build(student, d, cache_path=cache)
    ds = TrainDataset(samples, d / "images", load_image_processor(path), image_token_id=image_id,
                      num_image_tokens=N, cache_path=cache)
    assert ds._reader is None
    ds[0]
    assert ds._reader is not None
    assert copy.deepcopy(ds)._reader is None  # a worker starts without the parent's reader (__getstate__)
    col = Collator(tok.pad_token_id)
    kw = dict(batch_size=2, collate_fn=col, sampler=RankSampler(6, seed=3))
    a = list(torch.utils.data.DataLoader(ds, num_workers=0, **kw))
    b = list(torch.utils.data.DataLoader(ds, num_workers=2, **kw))
    assert len(a) == len(b) == 3
    for x, y in zip(a, b):
        assert x.keys() == y.keys()
        for k in x:
            assert torch.equal(x[k], y[k]), k


def test_collate_right_pads(student, dataset_dir):
    path, tok, image_id = student
    d, _ = dataset_dir
    samples, _ = _build(student, d)
    ds = TrainDataset(samples, d / "images", load_image_processor(path), image_token_id=image_id, num_image_tokens=N)
    items = [ds[0], ds[1], ds[3]]
    assert "teacher_sim" not in items[0]
    batch = collate(items, pad_id=tok.pad_token_id)
    lengths = [len(it["input_ids"]) for it in items]
    assert batch["input_ids"].shape == (3, max(lengths)) and batch["pixel_values"].shape == (3, 3, 32, 32)
    for k, it in enumerate(items):
        n = lengths[k]
        assert torch.equal(batch["input_ids"][k, :n], it["input_ids"])
        assert (batch["input_ids"][k, n:] == tok.pad_token_id).all()
        assert batch["attention_mask"][k].tolist() == [1] * n + [0] * (max(lengths) - n)
        assert (batch["labels"][k, n:] == IGNORE_INDEX).all() and not batch["query_mask"][k, n:].any()
        assert int((batch["input_ids"][k] == image_id).sum()) == N
    assert batch["query_mask"].dtype == torch.bool and batch["labels"].dtype == torch.long


def test_too_long_samples_are_skipped_and_counted(student, dataset_dir):
    d, _ = dataset_dir
    full, _ = _build(student, d)
    lengths = [s.enc.length(N) for s in full]
    limit = sorted(lengths)[3]
    samples, stats = _build(student, d, max_length=limit)
    assert [s.index for s in samples] == [s.index for s in full if s.enc.length(N) <= limit]
    assert stats.too_long == sum(n > limit for n in lengths) > 0 and stats.longest == max(lengths)
    with pytest.raises(MedAlignError, match="all 6 samples are longer than --max-length 10"):
        _build(student, d, max_length=10)


def test_bad_inputs_have_clear_messages(student, tmp_path):
    images = write_images(tmp_path / "images", 3)
    f = tmp_path / "train.json"
    f.write_text('[{"id": 1, "image": "img/000.png",\n  "conversations": [}]')
    with pytest.raises(MedAlignError, match=r"train.json:2:\d+: malformed JSON"):
        _build(student, tmp_path)
    recs = write_records(f, images)
    recs[1]["conversations"] = recs[1]["conversations"][:1]
    f.write_text(json.dumps(recs))
    with pytest.raises(MedAlignError, match=r"1 record\(s\) have no 'gpt' turn.*record 1 \(id 1\)"):
        _build(student, tmp_path)
    recs = write_records(f, images)
    recs[0]["image"] = "img/nope.png"
    recs[2]["image"] = "elsewhere/x.jpg"
    f.write_text(json.dumps(recs))
    with pytest.raises(MedAlignError, match=r"2 image file\(s\) not found.*img/nope.png.*elsewhere/x.jpg"):
        _build(student, tmp_path)
    recs = write_records(f, images)
    del recs[0]["image"]
    f.write_text(json.dumps(recs))
    with pytest.raises(MedAlignError, match="have no image"):
        _build(student, tmp_path)


def test_rank_sampler_slices_cover_the_epoch():
    n, w = 11, 3
    samplers = [RankSampler(n, rank=r, world_size=w, seed=5) for r in range(w)]
    for epoch in (0, 1):
        parts = []
        for s in samplers:
            s.set_epoch(epoch)
            parts.append(list(s))
        assert all(len(p) == 4 for p in parts)  # ceil(11 / 3), padded by wrapping
        flat = [i for p in parts for i in p]
        assert set(flat) == set(range(n)) and len(flat) == 12
        g = torch.Generator().manual_seed(5 + epoch)
        perm = torch.randperm(n, generator=g).tolist()
        perm += perm[:1]
        assert parts[1] == perm[1::3]
    assert list(samplers[0]) != (samplers[0].set_epoch(0) or list(samplers[0]))  # epochs differ
    s = samplers[2]
    s.set_epoch(1, skip=3)
    full = RankSampler(n, rank=2, world_size=w, seed=5)
    full.set_epoch(1)
    assert list(s) == list(full)[3:] and len(s) == 1
