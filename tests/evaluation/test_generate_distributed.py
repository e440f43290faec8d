"""Generation in slices: ``torchrun -m evaluation.cli generate``, ``--num-chunks``, ``medalign-eval merge``.

A slice is a contiguous run of whole batches, so each slice runs the very batches of a one-process
run and sampling is seeded per question: merged files equal a one-process run byte for byte. The
``--num-chunks`` and merge checks run in-process (fast); one 2-process greedy run on CPU (gloo) is in
the fast suite, beam, sampling and a rank killed with ``kill -9`` then resumed with 1 process are slow.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from click.testing import CliRunner

from evaluation.answer_parts import existing_parts, question_slice
from evaluation.cli import main
from evaluation.questions import load_questions
from shared.distributed import KILL_ENV, TIMEOUT_ENV
from student_train.tiny import save_tiny_llava


@pytest.fixture(scope="module")
def student(tmp_path_factory):
    return save_tiny_llava(tmp_path_factory.mktemp("gen") / "llama", "llama", layers=2, seed=0)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory, vqa_rad_subset_dir):
    """11 questions about 4 real VQA-RAD images (the committed CC0 subset; int and string ids)."""
    root = vqa_rad_subset_dir / "images"
    names = sorted(p.name for p in root.iterdir() if p.suffix.lower() in (".jpg", ".jpeg", ".png"))[:4]
    qs = ["Is there a mass?", "What organ is shown?", "Is the liver normal?", "Where is the lesion?"]
    recs = [{"id": i if i % 3 else f"q{i}", "image": names[i % 4], "answer_type": "OPEN",
             "conversations": [{"from": "human", "value": f"<image>\n{qs[i % 4]} ({i})"},
                               {"from": "gpt", "value": "x"}]} for i in range(11)]
    data = tmp_path_factory.mktemp("data") / "test.json"
    data.write_text(json.dumps(recs))
    return data, root


def _args(student, dataset, out, *extra):
    data, root = dataset
    return ["generate", "--model", str(student), "--data", str(data), "--image-root", str(root), "--out", str(out),
            "--decoding", "greedy", "--max-new-tokens", "5", "--batch-size", "2", "--device", "cpu", *extra]


def _one(args):
    res = CliRunner().invoke(main, args)
    assert res.exit_code == 0, res.output
    return res


def _torchrun(args, nproc=2, env=None, timeout=300):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore", TIMEOUT_ENV: "60", **(env or {})}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc),
           "-m", "evaluation.cli", *args]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)


def test_slices_are_whole_batches_covering_every_question_once(dataset):
    qs = load_questions(dataset[0])
    for parts in (1, 2, 3, 4, 7):
        slices = [question_slice(qs, 2, parts, i) for i in range(parts)]
        assert [q for s in slices for q in s] == qs  # contiguous, in order, each once
        starts = np.cumsum([0] + [len(s) for s in slices])[:-1]
        assert all(int(st) % 2 == 0 for st, s in zip(starts, slices) if s)  # each starts on a batch boundary


@pytest.mark.parametrize("decoding", [("greedy",), pytest.param(("beam", "--decoding-arg", "num_beams=3"),
                                                                 marks=pytest.mark.slow),
                                      pytest.param(("nucleus", "--seed", "5"), marks=pytest.mark.slow)])
def test_two_process_generate_equals_one_process(student, dataset, tmp_path, decoding):
    mode, *rest = decoding
    extra = ("--decoding", mode, *rest)
    _one(_args(student, dataset, tmp_path / "one.jsonl", *extra))
    out = tmp_path / "two.jsonl"
    proc = _torchrun(_args(student, dataset, out, *extra))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert out.read_bytes() == (tmp_path / "one.jsonl").read_bytes()  # line for line, byte for byte
    assert existing_parts(out) == []  # the parts are gone once the merged file is complete
    assert proc.stderr.count("wrote 11 answer(s)") == 1  # rank 0 reports for the job


@pytest.mark.slow
def test_killed_rank_fails_and_any_k_resumes(student, dataset, tmp_path):
    """Rank 1 SIGKILLs itself after its first batch: the job fails (no hang), the parts stay, and a
    1-process --resume (the same command) finishes the file equal to an uninterrupted run."""
    _one(_args(student, dataset, tmp_path / "one.jsonl"))
    out = tmp_path / "two.jsonl"
    proc = _torchrun(_args(student, dataset, out), env={KILL_ENV: "1:batch"}, timeout=240)
    assert proc.returncode != 0
    assert not out.exists() and len(existing_parts(out)) == 2
    res = _one(_args(student, dataset, out))  # 1 process picks up both parts of the 2-process run
    assert "resuming" in res.output
    assert out.read_bytes() == (tmp_path / "one.jsonl").read_bytes()
    assert existing_parts(out) == []


def test_num_chunks_merged_equal_one_process(student, dataset, tmp_path):
    _one(_args(student, dataset, tmp_path / "one.jsonl"))
    parts = [tmp_path / f"chunk{i}.jsonl" for i in range(3)]
    for i, p in enumerate(parts):
        _one(_args(student, dataset, p, "--num-chunks", "3", "--chunk-idx", str(i)))
    assert [p.read_bytes().count(b"\n") for p in parts] == [4, 4, 3]
    merged = tmp_path / "merged.jsonl"
    data = str(dataset[0])
    res = CliRunner().invoke(main, ["merge", "--out", str(merged), "--data", data, *map(str, reversed(parts))])
    assert res.exit_code == 0, res.output
    assert merged.read_bytes() == (tmp_path / "one.jsonl").read_bytes()

    def refused(*given):
        r = CliRunner().invoke(main, ["merge", "--out", str(tmp_path / "bad.jsonl"), "--data", data, *map(str, given)])
        assert r.exit_code == 2 and not (tmp_path / "bad.jsonl").exists()
        return r.output

    assert "miss 3 of 11" in refused(parts[0], parts[1])  # a missing chunk
    assert "given twice" in refused(parts[0], parts[1], parts[2], parts[1])  # the same file twice
    copy = tmp_path / "copy.jsonl"
    copy.write_bytes(parts[1].read_bytes())
    assert "answered twice" in refused(parts[0], parts[1], copy, parts[2])  # a duplicated chunk
    other = tmp_path / "other.jsonl"  # another run's chunk (other settings)
    _one(_args(student, dataset, other, "--num-chunks", "3", "--chunk-idx", "2", "--max-new-tokens", "3"))
    assert "foreign part" in refused(parts[0], parts[1], other)
    stranger = tmp_path / "stranger.jsonl"  # a part answering another question file
    line = json.loads(parts[2].read_bytes().splitlines()[0])
    stranger.write_text(json.dumps({**line, "question_id": "not-a-question"}) + "\n")
    assert "foreign part" in refused(parts[0], parts[1], parts[2], stranger)
    unfinished = tmp_path / "unfinished.jsonl"
    unfinished.write_bytes(parts[2].read_bytes()[:-7])
    assert "partial line" in refused(parts[0], parts[1], unfinished)


def test_chunk_flags_are_checked(student, dataset, tmp_path):
    r = CliRunner().invoke(main, _args(student, dataset, tmp_path / "x.jsonl", "--num-chunks", "2", "--chunk-idx", "2"))
    assert r.exit_code == 2 and "--chunk-idx" in r.output


@pytest.mark.slow
def test_two_processes_resume_a_one_process_file(student, dataset, tmp_path):
    """A one-process run killed mid-line, resumed by 2 processes: the ranks skip what --out holds,
    rank 0 merges --out and the parts into the uninterrupted file."""
    full = tmp_path / "one.jsonl"
    _one(_args(student, dataset, full, "--decoding", "nucleus"))
    lines = full.read_bytes().splitlines(keepends=True)
    out = tmp_path / "resumed.jsonl"
    out.write_bytes(b"".join(lines[:3]) + lines[3][:9])
    proc = _torchrun(_args(student, dataset, out, "--decoding", "nucleus"))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert out.read_bytes() == full.read_bytes() and existing_parts(out) == []
