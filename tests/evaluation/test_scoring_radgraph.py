"""RadGraph: the tokeniser, the entity/relation sets and F1s (hand-computed), RadGraph-F1's three
levels, and the DyGIE++ inference on a tiny random archive in the real format (loading, strict
checks, folding at max_length, prefixes, the scorer's output)."""

from __future__ import annotations

import json
import tarfile

import pytest

try:
    from .radgraph_tiny import build_tiny_radgraph
except ImportError:  # rootdir-relative import when tests/evaluation is on sys.path
    from radgraph_tiny import build_tiny_radgraph

from evaluation.scoring.radgraph import (
    RadGraphConfig,
    annotation_dict,
    entity_set,
    load_radgraph,
    pair_scores,
    radgraph_f1,
    relation_set,
    set_f1,
)
from evaluation.scoring.radgraph_model import Annotation, tokenize_report
from shared.errors import MedAlignError

TEXTS = ["No acute cardiopulmonary process.",
         "There is mild edema in the left lower lobe, and a right pleural effusion.",
         "Heart size is normal. X-ray of the chest/lung: stable tube in place (1/2).",
         "Mild edema in the right lung."]


def _ann(entities):
    """A get_entity-form annotation from {id: (tokens, label, [(rel, object id), ...])}."""
    return {"entities": {k: {"tokens": t, "label": lab, "relations": [list(r) for r in rels]}
                         for k, (t, lab, rels) in entities.items()}}


# ---- tokeniser ---------------------------------------------------------------------------------

def test_tokenizer_splits_punctuation_but_not_the_hyphen():
    assert tokenize_report("X-ray of the chest/lung: stable (1/2), no effusion!") == [
        "X-ray", "of", "the", "chest", "/", "lung", ":", "stable", "(", "1", "/", "2", ")", ",",
        "no", "effusion", "!"]
    assert tokenize_report("well-defined.No") == ["well-defined", ".", "No"]
    assert tokenize_report("  a\tb\n") == ["a", "b"]
    assert tokenize_report("") == []


# ---- sets and F1 (radgraph_evaluate_model.py) --------------------------------------------------

def test_set_f1_hand_computed_and_zero_denominators():
    ref = {("effusion", "OBS-DP"), ("pleural", "ANAT-DP"), ("left", "ANAT-DP")}
    hyp = {("effusion", "OBS-DP"), ("right", "ANAT-DP")}
    assert set_f1(ref, hyp) == pytest.approx(2 * 0.5 * (1 / 3) / (0.5 + 1 / 3))  # 0.4
    assert set_f1(ref, hyp) == pytest.approx(0.4)
    assert set_f1(ref, ref) == 1.0
    assert set_f1(set(), set()) == 0.0  # both empty: 0, not 1
    assert set_f1(ref, set()) == 0.0 and set_f1(set(), hyp) == 0.0
    assert set_f1(ref, {("x", "OBS-DP")}) == 0.0


def test_entity_and_relation_sets_and_the_combined_score():
    ref = _ann({"1": ("effusion", "OBS-DP", [("located_at", "2")]), "2": ("pleural", "ANAT-DP", []),
                "3": ("X-ray", "ANAT-DP", [("modify", "2")])})
    hyp = _ann({"1": ("effusion", "OBS-DP", [("located_at", "2")]), "2": ("pleural", "ANAT-DP", []),
                "3": ("x-ray", "ANAT-DP", [])})
    assert entity_set(ref) == {("effusion", "OBS-DP"), ("pleural", "ANAT-DP"), ("X-ray", "ANAT-DP")}
    assert relation_set(ref) == {(("effusion", "OBS-DP"), ("pleural", "ANAT-DP"), "located_at"),
                                 (("X-ray", "ANAT-DP"), ("pleural", "ANAT-DP"), "modify")}
    s = pair_scores(hyp, ref)
    assert s["radgraph_entity_f1"] == pytest.approx(2 / 3)  # 2 of 3 each way: case matters
    assert s["radgraph_relation_f1"] == pytest.approx(2 / 3)  # P = 1/1, R = 1/2
    assert s["radgraph_combined"] == pytest.approx((2 / 3 + 2 / 3) / 2)
    assert next(iter(s)) == "radgraph_combined"


def test_missing_or_empty_reports_score_zero():
    ref = _ann({"1": ("effusion", "OBS-DP", [])})
    empty = _ann({})
    for hyp in (None, empty):
        s = pair_scores(hyp, ref)
        assert all(v == 0.0 for v in s.values()), s
    assert all(v == 0.0 for v in pair_scores(empty, empty).values())
    assert all(v == 0.0 for v in pair_scores(ref, None).values())


def test_annotation_dict_keeps_only_relations_between_entities():
    words = ("mild", "x-ray", "edema", "left", "lung")
    ann = Annotation(words, entities=((0, 0, "OBS-DP"), (1, 2, "OBS-DA"), (4, 4, "ANAT-DP")),
                     relations=((0, 0, 4, 4, "located_at"),   # kept: both are entities
                                (0, 0, 3, 4, "modify"),       # object span not an entity: dropped
                                (3, 3, 4, 4, "modify"),       # subject not an entity: dropped
                                (1, 2, 1, 2, "modify")))      # the diagonal is allowed
    d = annotation_dict(ann)
    assert d["text"] == "mild x-ray edema left lung"
    assert d["entities"] == {
        "1": {"tokens": "mild", "label": "OBS-DP", "start_ix": 0, "end_ix": 0,
              "relations": [["located_at", "3"]]},
        "2": {"tokens": "x-ray edema", "label": "OBS-DA", "start_ix": 1, "end_ix": 2,
              "relations": [["modify", "2"]]},
        "3": {"tokens": "lung", "label": "ANAT-DP", "start_ix": 4, "end_ix": 4, "relations": []}}


def test_radgraph_f1_levels_hand_computed():
    ref = _ann({"1": ("Effusion", "OBS-DP", [("located_at", "2")]), "2": ("pleural", "ANAT-DP", []),
                "3": ("edema", "OBS-DP", [])})
    hyp = _ann({"1": ("effusion", "OBS-DP", [("located_at", "2")]), "2": ("pleural", "ANAT-DP", []),
                "3": ("edema", "OBS-DP", [("modify", "2")])})
    f = radgraph_f1(hyp, ref)
    # simple: {(tokens, label)}: ref {Effusion, pleural, edema}, hyp {effusion, pleural, edema}: 2/3
    assert f["simple"] == pytest.approx(2 / 3)
    # partial: ref {(Effusion, OBS-DP, True), pleural, edema}; hyp {(effusion, .., True), pleural,
    # (edema, OBS-DP, True)}: only pleural matches: 1/3
    assert f["partial"] == pytest.approx(1 / 3)
    # complete: lower-cased tokens for related entities: ref {(effusion, OBS-DP, located_at,
    # pleural), pleural, edema}; hyp {(effusion, .., located_at, pleural), pleural,
    # (edema, OBS-DP, modify, pleural)}: 2/3
    assert f["complete"] == pytest.approx(2 / 3)
    assert radgraph_f1(hyp, _ann({})) == {"simple": 0.0, "partial": 0.0, "complete": 0.0}
    assert radgraph_f1(None, ref) == {"simple": 0.0, "partial": 0.0, "complete": 0.0}


# ---- the model on a tiny archive ---------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("radgraph")
    archive, encoder = build_tiny_radgraph(root)
    return archive, encoder, load_radgraph(RadGraphConfig(archive, encoder, batch_size=2))


def test_tiny_model_emits_entities_and_relations(tiny):
    _, _, scorer = tiny
    anns = scorer.annotate(TEXTS)
    assert all(a["entities"] for a in anns)
    assert sum(len(e["relations"]) for a in anns for e in a["entities"].values()) > 0
    assert "X-ray" in anns[2]["text"].split()  # the hyphen is not split
    spans = [len(a["text"].split()) for a in anns]
    assert all(0 < len(a["entities"]) < s * 8 for a, s in zip(anns, spans))


def test_batching_and_order_do_not_change_annotations(tiny):
    archive, encoder, scorer = tiny
    one = load_radgraph(RadGraphConfig(archive, encoder, batch_size=1))
    assert scorer.annotate(TEXTS) == one.annotate(list(reversed(TEXTS)))[::-1]


def test_score_output_shape_and_identical_reports(tiny):
    _, _, scorer = tiny
    out = scorer.score(TEXTS, TEXTS)
    assert next(iter(out["per_report"])) == "radgraph_combined"
    for m in ("radgraph_entity_f1", "radgraph_f1_simple", "radgraph_f1_partial", "radgraph_f1_complete"):
        assert out["per_report"][m] == [1.0] * len(TEXTS)
    # identical reports: relation F1 is 1 where there are relations and 0 where there are none
    # (two empty sets score 0), so the combined score of a relation-less report is 0.5
    has_rel = [bool(relation_set(a)) for a in scorer.annotate(TEXTS)]
    assert has_rel == [False, True, True, False]  # the fixture's seed gives both kinds
    assert out["per_report"]["radgraph_relation_f1"] == [float(r) for r in has_rel]
    assert out["per_report"]["radgraph_combined"] == [1.0 if r else 0.5 for r in has_rel]
    out = scorer.score([TEXTS[3], None, ""], [TEXTS[1], TEXTS[1], TEXTS[1]])
    assert out["per_report"]["radgraph_combined"][1:] == [0.0, 0.0]
    assert out["mean"]["radgraph_combined"] == pytest.approx(
        sum(out["per_report"]["radgraph_combined"]) / 3)
    assert out["info"]["label_prefix"] == "None" and out["info"]["max_span_width"] == 8
    assert out["info"]["spans_per_word"] == 0.5
    with pytest.raises(MedAlignError, match="predictions"):
        scorer.score(["a"], [])


def test_directory_prefix_and_position_ids_variants_agree(tiny, tmp_path):
    _, _, scorer = tiny
    want = scorer.annotate(TEXTS)
    model_dir, enc = build_tiny_radgraph(tmp_path / "a", prefix="radgraph", position_ids=False,
                                         as_tar=False)
    other = load_radgraph(RadGraphConfig(model_dir, enc))
    assert other.annotate(TEXTS) == want
    assert other.score(TEXTS[:1], TEXTS[:1])["info"]["label_prefix"] == "radgraph"
    # encoder_dir None: the archive's model_name, a local directory here
    assert load_radgraph(RadGraphConfig(model_dir)).annotate(TEXTS[:1]) == want[:1]


def test_folding_at_max_length_uses_each_segments_own_encoding(tmp_path):
    import torch

    archive, enc = build_tiny_radgraph(tmp_path, max_length=8)
    model = load_radgraph(RadGraphConfig(archive, enc)).model
    words = tokenize_report(TEXTS[1])  # 16 one-piece words: segments of 6 + 6 + 4
    pieces = model._wordpieces(words)
    assert all(len(p) == 1 for p in pieces)
    vecs = model._word_vectors([pieces])[0]
    tok = model.tokenizer
    flat = [p[0] for p in pieces]
    for start in (0, 6, 12):
        ids = [tok.cls_token_id] + flat[start:start + 6] + [tok.sep_token_id]
        with torch.no_grad():
            h = model.encoder(input_ids=torch.tensor([ids])).last_hidden_state[0, 1:-1]
        torch.testing.assert_close(vecs[start:start + 6], h, atol=1e-5, rtol=1e-5)


def _rewrite(archive, tmp_path, edit_config=None, edit_state=None, drop=None):
    import io

    import torch

    out = tmp_path / "edited"
    out.mkdir()
    with tarfile.open(archive) as tar:
        tar.extractall(out, filter="data")
    if edit_config:
        cfg = json.loads((out / "config.json").read_text())
        edit_config(cfg)
        (out / "config.json").write_text(json.dumps(cfg))
    if edit_state:
        state = torch.load(io.BytesIO((out / "weights.th").read_bytes()), weights_only=True)
        edit_state(state)
        torch.save(state, out / "weights.th")
    if drop:
        (out / drop).unlink()
    return out


@pytest.mark.parametrize("case, match", [
    ("coref", "coreference"), ("missing_key", "lacks _relation._relation_scorers"),
    ("extra_key", "does not know"), ("encoder_key", "encoder weights"),
    ("no_relation_vocab", "no None__relation_labels"), ("no_config", "missing"),
])
def test_bad_archives_fail_clearly(tiny, tmp_path, case, match):
    archive, enc, _ = tiny
    kwargs = {
        "coref": {"edit_config": lambda c: c["model"]["modules"]["coref"].update(coref_prop=1)},
        "missing_key": {"edit_state": lambda s: s.pop("_relation._relation_scorers.None__relation_labels.bias")},
        "extra_key": {"edit_state": lambda s: s.update({"_other.weight": s["_events._distance_embedding.weight"]})},
        "encoder_key": {"edit_state": lambda s: s.pop(next(k for k in s if k.endswith("pooler.dense.bias")))},
        "no_relation_vocab": {"drop": "vocabulary/None__relation_labels.txt"},
        "no_config": {"drop": "config.json"},
    }[case]
    bad = _rewrite(archive, tmp_path, **kwargs)
    with pytest.raises(MedAlignError, match=match):
        load_radgraph(RadGraphConfig(bad, enc))


def test_missing_files_and_encoder_fail_clearly(tiny, tmp_path):
    archive, enc, _ = tiny
    with pytest.raises(MedAlignError, match="no such file"):
        load_radgraph(RadGraphConfig(tmp_path / "nope.tar.gz", enc))
    (tmp_path / "junk.tar.gz").write_bytes(b"not a tar")
    with pytest.raises(MedAlignError, match="readable"):
        load_radgraph(RadGraphConfig(tmp_path / "junk.tar.gz", enc))
    hub = _rewrite(archive, tmp_path, edit_config=lambda c: c["model"]["embedder"]["token_embedders"]
                   ["bert"].update(model_name="some-org/some-bert"))
    with pytest.raises(MedAlignError, match="--radgraph-encoder"):
        load_radgraph(RadGraphConfig(hub))
    with pytest.raises(MedAlignError, match="--radgraph-encoder"):
        load_radgraph(RadGraphConfig(archive, tmp_path))
    with pytest.raises(MedAlignError, match="batch size"):
        RadGraphConfig(archive, enc, batch_size=0)
