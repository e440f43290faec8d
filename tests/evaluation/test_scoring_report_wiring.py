"""The model metrics wired into both blocks, with small fake scorers in the contract's shape:
which pairs and cleaning each block hands them, which outputs land where, the lazy import, the
not-computed notes, and the CLI flags that build the configs."""

import json
import sys
import types
from dataclasses import dataclass
from pathlib import Path

import pytest
from click.testing import CliRunner

from evaluation.cli import main
from evaluation.scoring.clinical import BlockScorer, load_scorer
from evaluation.scoring.join import Prediction, join_by_id
from evaluation.scoring.report import score_reports
from evaluation.scoring.report_pairs import NO_REPORT
from shared.errors import MedAlignError


class FakeRadGraph:
    """Scores a pair by the hypothesis' length; records what it was given."""

    def __init__(self):
        self.calls = []

    def score(self, hyps, refs, *, progress=False):
        self.calls.append((list(hyps), list(refs)))
        per = {"radgraph_combined": [len(h) / 100 for h in hyps],
               "radgraph_simple": [0.5 for _ in hyps]}
        return {"per_report": per, "mean": {k: sum(v) / len(v) for k, v in per.items()},
                "info": {"model": "fake"}}


class FakeRaTE:
    """Takes ``block=`` like RaTEScore."""

    def __init__(self):
        self.calls = []

    def score(self, hyps, refs, *, progress=False, block="medheval"):
        self.calls.append((list(hyps), list(refs), block))
        v = 0.25 if block == "medheval" else 0.75
        return {"per_report": {"ratescore": [v] * len(hyps)}, "mean": {"ratescore": v}, "info": {}}


def rec(i, report):
    return {"id": i, "conversations": [{"from": "human", "value": "<image>\nDescribe."},
                                       {"from": "gpt", "value": report}]}


def setup_case():
    records = [rec(2, "Heart size is normal."), rec(1, "Small left effusion.")]
    preds = [Prediction("1", "Assistant: Small left effusion.", 1), Prediction("2", "Normal.", 2)]
    return records, preds, join_by_id(records, {p.qid: p for p in preds})


def test_each_block_gets_its_own_pairs_and_cleaning():
    records, preds, joined = setup_case()
    rg, rate = FakeRadGraph(), FakeRaTE()
    res = score_reports(records, preds, joined, tokenize=str.split, wordnet=None,
                        scorers={"radgraph": rg, "ratescore": rate})
    # medheval radgraph: run_eval.py pairs (sorted int ids, < 10 chars -> NO_REPORT)
    assert rg.calls[0] == ([" Small left effusion.", NO_REPORT],
                           ["Small left effusion.", "Heart size is normal."])
    # strict radgraph: ground-truth order, prefix removed, no substitution
    assert rg.calls[1] == (["Normal.", "Small left effusion."],
                           ["Heart size is normal.", "Small left effusion."])
    assert res["medheval"]["radgraph_combined"] == pytest.approx((21 / 100 + 20 / 100) / 2)
    assert "radgraph_simple" not in res["medheval"]                # strict extra only
    assert res["strict"]["radgraph_simple"] == 0.5
    assert res["strict"]["radgraph_combined"] == pytest.approx((7 / 100 + 20 / 100) / 2)
    # ratescore: line pairs for medheval (line 1 with record 1), told which block it scores
    assert rate.calls[0] == ([" Small left effusion.", "Normal."],
                             ["Heart size is normal.", "Small left effusion."], "medheval")
    assert rate.calls[1][2] == "strict"
    assert res["medheval"]["ratescore"] == 0.25 and res["strict"]["ratescore"] == 0.75
    assert res["report_info"]["radgraph"] == {"model": "fake"}
    assert any("semb_score not computed: pass --chexbert" in n for n in res["notes"])
    assert not any("radgraph_combined not computed" in n for n in res["notes"])


def test_same_pairs_in_both_blocks_are_scored_once():
    records = [rec(1, "Heart size is normal."), rec(2, "Lungs are clear bilaterally.")]
    preds = [Prediction("1", "Heart size is normal.", 1), Prediction("2", "Lungs are clear.", 2)]
    rg = FakeRadGraph()
    score_reports(records, preds, join_by_id(records, {p.qid: p for p in preds}),
                  tokenize=str.split, wordnet=None, scorers={"radgraph": rg})
    assert len(rg.calls) == 1
    runner = BlockScorer("ratescore", FakeRaTE())
    runner.score(["a"], ["b"], "medheval")
    runner.score(["a"], ["b"], "strict")
    assert len(runner.scorer.calls) == 2                            # block-aware: not shared


@dataclass(frozen=True)
class FakeConfig:
    archive: Path
    encoder_dir: Path | None = None
    batch_size: int = 16
    device: str = "cpu"


@pytest.fixture
def fake_radgraph_module(monkeypatch):
    mod = types.ModuleType("evaluation.scoring.radgraph")
    mod.RadGraphConfig = FakeConfig
    mod.loaded = []

    def load_radgraph(cfg):
        mod.loaded.append(cfg)
        return FakeRadGraph()

    mod.load_radgraph = load_radgraph
    monkeypatch.setitem(sys.modules, "evaluation.scoring.radgraph", mod)
    return mod


def test_load_scorer_imports_lazily_and_builds_the_config(fake_radgraph_module, tmp_path):
    s = load_scorer("radgraph", {"archive": tmp_path / "model.tar.gz", "encoder_dir": None},
                    batch_size=4, device="cpu")
    assert isinstance(s, FakeRadGraph)
    assert fake_radgraph_module.loaded == [FakeConfig(tmp_path / "model.tar.gz", None, 4, "cpu")]


def test_a_module_that_cannot_be_imported_is_a_clean_error(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "evaluation.scoring.ratescore", None)
    with pytest.raises(MedAlignError, match="leave out --ratescore-ner"):
        load_scorer("ratescore", {"ner_dir": tmp_path, "encoder_dir": tmp_path})


def test_cli_flags_reach_the_scorer(fake_radgraph_module, tmp_path):
    records, preds, _ = setup_case()
    gt = tmp_path / "gt.json"
    gt.write_text(json.dumps(records))
    pred = tmp_path / "pred.jsonl"
    pred.write_text("".join(json.dumps({"question_id": p.qid, "text": p.text}) + "\n" for p in preds))
    archive = tmp_path / "model.tar.gz"
    archive.write_bytes(b"")
    r = CliRunner().invoke(main, ["score", "--pred", str(pred), "--gt", str(gt), "--task", "report",
                                  "--radgraph", str(archive), "--radgraph-encoder", str(tmp_path),
                                  "--batch-size", "3", "--device", "cpu"])
    assert r.exit_code == 0, r.output
    assert fake_radgraph_module.loaded == [FakeConfig(archive, tmp_path, 3, "cpu")]
    m = json.loads(r.stdout)
    assert m["medheval"]["radgraph_combined"] == pytest.approx(0.205)
    assert m["strict"]["radgraph_simple"] == 0.5
    assert "Warning: ratescore not computed" in r.stderr
