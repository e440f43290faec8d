"""Cross-check with the ``radgraph`` package 0.1.18 (allennlp's DyGIE++ code, vendored) on the same
tiny archive: the annotations must be identical and RadGraph-F1 equal to 1e-6. Skips without the
package.

The package's ``model_type="radgraph"`` path is RadGraph 1.0.0's (the same tokeniser regex, the
``radgraph__`` label prefix). Two test-only patches make its vendored allennlp run on transformers 5,
which removed two tokenizer methods it calls: ``encode_plus`` (now the tokenizer's ``__call__``)
and ``build_inputs_with_special_tokens`` (BERT's ``[CLS] ids [SEP]``, used when folding at
``max_length``). The archive has no ``position_ids`` buffer: the package loads ``weights.th``
strictly into transformers 5's BERT, which no longer saves it.
"""

from __future__ import annotations

import shutil

import pytest

try:
    from .radgraph_tiny import build_tiny_radgraph
except ImportError:
    from radgraph_tiny import build_tiny_radgraph

from evaluation.scoring.radgraph import RadGraphConfig, load_radgraph

radgraph_pkg = pytest.importorskip("radgraph", reason="the radgraph package (0.1.18) is not installed")

REFS = ["There is mild edema in the left lower lobe, and a right pleural effusion.",
        "Heart size is normal. X-ray of the chest/lung: stable tube in place (1/2).",
        "No acute cardiopulmonary process.",
        "Mild edema in the right lung.",
        "Stable tube. No acute process."]
HYPS = ["There is mild edema in the left lower lobe, and a pleural effusion.",
        "Heart size is normal. X-ray of the chest/lung: tube in place (1/2).",
        "No acute cardiopulmonary process.",
        "",
        "Stable tube, no acute process!"]


@pytest.fixture
def patched_tokenizers(monkeypatch):
    from transformers.tokenization_utils_base import PreTrainedTokenizerBase

    monkeypatch.setattr(PreTrainedTokenizerBase, "encode_plus",
                        lambda self, *a, **k: self(*a, **k), raising=False)
    monkeypatch.setattr(PreTrainedTokenizerBase, "build_inputs_with_special_tokens",
                        lambda self, ids, ids2=None: [self.cls_token_id, *ids, self.sep_token_id],
                        raising=False)


def _both(tmp_path, max_length):
    model_dir, encoder = build_tiny_radgraph(tmp_path, prefix="radgraph", position_ids=False,
                                             max_length=max_length, as_tar=False)
    cache = tmp_path / "cache"
    shutil.copytree(model_dir, cache / "radgraph")  # the package's <cache>/<model_type>/ layout
    ours = load_radgraph(RadGraphConfig(model_dir, encoder, batch_size=3))
    return ours, cache


@pytest.mark.parametrize("max_length", [512, 12])
def test_annotations_equal_the_package(tmp_path, patched_tokenizers, max_length):
    ours, cache = _both(tmp_path, max_length)
    theirs = radgraph_pkg.RadGraph(model_type="radgraph", model_cache_dir=str(cache), cuda=-1)
    texts = REFS + [h for h in HYPS if h]
    got = ours.annotate(texts)
    want = theirs(texts)
    assert len(want) == len(texts)
    n_rel = 0
    for i, g in enumerate(got):
        w = want[str(i)]
        assert g["text"] == w["text"]
        assert g["entities"] == w["entities"], texts[i]
        n_rel += sum(len(e["relations"]) for e in w["entities"].values())
    n_ent = sum(len(w["entities"]) for w in want.values())
    assert n_rel > 0 and n_ent > 2 * len(texts)  # a non-degenerate check


def test_radgraph_f1_equals_the_package(tmp_path, patched_tokenizers):
    ours, cache = _both(tmp_path, 512)
    f1 = radgraph_pkg.F1RadGraph(reward_level="all", model_type="radgraph",
                                 model_cache_dir=str(cache), cuda=-1)
    _, (simple, partial, complete), _, _ = f1(refs=REFS, hyps=HYPS)
    per = ours.score(HYPS, REFS)["per_report"]
    assert per["radgraph_f1_simple"] == pytest.approx(simple, abs=1e-6)
    assert per["radgraph_f1_partial"] == pytest.approx(partial, abs=1e-6)
    assert per["radgraph_f1_complete"] == pytest.approx(complete, abs=1e-6)
    strictly_between = [v for v in simple + complete if 0 < v < 1]
    assert strictly_between, (simple, complete)  # not only 0s and 1s
