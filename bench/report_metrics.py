"""Reports/s of each report metric of ``medalign-eval score --task report`` at batch 1 and 16.

Random-weight models at their real sizes are saved in the real formats and loaded through the
real paths (timing does not depend on the weights): CheXbert = bert-base-uncased + 14 heads in a
``chexbert.pth``; BERTScore = roberta-large at layer 17; RadGraph 1.0.0 = a BERT-base encoder
(BiomedBERT-sized) with its DyGIE++ NER and relation heads in an allennlp ``model.tar.gz``
(``tests/evaluation/radgraph_tiny.py`` at ``REAL_SIZE``); RaTEScore = a DeBERTa-v3-base token
classifier (RaTE-NER-Deberta) and an MPNet-base encoder (BioLORD-2023-C) in Hugging Face
directories (``tests/evaluation/ratescore_models.py``). Real model files given with
``--radgraph``/``--radgraph-encoder`` or ``--ratescore-ner``/``--ratescore-encoder`` are timed
instead. The tokenizers are trained on (or hold) the benchmark's words, so that words are whole
pieces as in the real vocabularies; the random heads' entity counts (which set RadGraph's relation
and RaTEScore's encoder work) are printed, as they differ from a trained model's. The lexical
metrics (BLEU, ROUGE; METEOR needs WordNet) have no batch.
``--pairs`` synthetic report pairs (different lengths) are scored once per batch size per repeat,
interleaved; the median time gives reports (pairs) per second. Loading is not timed.

    python bench/report_metrics.py --pairs 32 --threads 1
    python bench/report_metrics.py --preset tiny            # a quick check of the script
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "evaluation"))

from radgraph_tiny import REAL_SIZE as RADGRAPH_REAL
from radgraph_tiny import TINY_ENCODER as RADGRAPH_TINY
from radgraph_tiny import build_tiny_radgraph
from ratescore_models import (
    ENCODER_REAL_SIZE,
    NER_REAL_SIZE,
    TINY_SIZE,
    make_encoder_dir,
    make_ner_dir,
)

from evaluation.scoring.clinical import load_scorer
from evaluation.scoring.lexical import lexical_scores
from evaluation.scoring.nltk_data import word_tokenizer

PHRASES = ("the heart is normal in size", "the mediastinum is unremarkable", "no acute cardiopulmonary process",
           "there is a small left pleural effusion", "no pneumothorax is seen", "lungs are clear bilaterally",
           "mild degenerative changes of the thoracic spine", "stable appearance of the right lower lobe opacity",
           "median sternotomy wires are intact", "the endotracheal tube terminates above the carina")
PRESETS = {"full": {"bert": (768, 12, 12, 3072), "roberta": (1024, 24, 16, 4096), "layer": 17,
                    "radgraph": RADGRAPH_REAL, "rate_ner": NER_REAL_SIZE, "rate_enc": ENCODER_REAL_SIZE},
           "tiny": {"bert": (64, 2, 1, 128), "roberta": (64, 3, 2, 128), "layer": 2,
                    "radgraph": {"encoder_size": RADGRAPH_TINY}, "rate_ner": {"size": TINY_SIZE},
                    "rate_enc": {"size": TINY_SIZE}}}


def reports(n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    return [". ".join(rng.choice(PHRASES).capitalize() for _ in range(rng.randint(2, 8))) + "."
            for _ in range(n)]


def words(texts: list[str]) -> list[str]:
    return sorted({w for t in texts for w in t.lower().replace(".", " . ").split()})


def make_chexbert(root: Path, size, texts) -> dict:
    from transformers import BertConfig, BertModel, BertTokenizer

    hidden, layers, heads, inter = size
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words(texts)]
    vocab += [f"[unused{i}]" for i in range(30522 - len(vocab))]
    tok_dir = root / "bert-base-uncased"
    BertTokenizer(vocab={w: i for i, w in enumerate(vocab)}).save_pretrained(tok_dir)
    cfg = BertConfig(vocab_size=len(vocab), hidden_size=hidden, num_hidden_layers=layers,
                     num_attention_heads=heads, intermediate_size=inter)
    cfg.save_pretrained(tok_dir)
    bert = BertModel(cfg)
    sd = {f"module.bert.{k}": v for k, v in bert.state_dict().items()}
    for i in range(14):
        head = torch.nn.Linear(hidden, 4 if i < 13 else 2)
        sd[f"module.linear_heads.{i}.weight"], sd[f"module.linear_heads.{i}.bias"] = head.weight, head.bias
    torch.save({"epoch": 0, "model_state_dict": sd, "optimizer_state_dict": {}}, str(root / "chexbert.pth"))
    return {"checkpoint": root / "chexbert.pth", "tokenizer_dir": tok_dir}


def make_roberta(root: Path, size, texts) -> Path:
    from tokenizers import ByteLevelBPETokenizer
    from transformers import RobertaConfig, RobertaModel, RobertaTokenizer

    hidden, layers, heads, inter = size
    d = root / "roberta-large"
    d.mkdir()
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(texts, vocab_size=1000, special_tokens=["<s>", "<pad>", "</s>", "<unk>", "<mask>"])
    bpe.save_model(str(d))
    RobertaTokenizer.from_pretrained(str(d), model_max_length=512).save_pretrained(d)
    RobertaModel(RobertaConfig(vocab_size=50265, hidden_size=hidden, num_hidden_layers=layers,
                               num_attention_heads=heads, intermediate_size=inter,
                               max_position_embeddings=514, pad_token_id=1)).save_pretrained(d)
    return d


def make_radgraph(root: Path, size: dict, texts) -> dict:
    from evaluation.scoring.radgraph_model import tokenize_report

    words = sorted({w.lower() for t in texts for w in tokenize_report(t)})
    archive, encoder = build_tiny_radgraph(root / "radgraph", words=tuple(words), compresslevel=1,
                                           **size)
    return {"archive": archive, "encoder_dir": encoder}


def make_ratescore(root: Path, ner_size: dict, enc_size: dict, texts) -> dict:
    sentences = sorted({s.strip() + "." for t in texts for s in t.split(".") if s.strip()})
    # Vocabularies as large as the corpus allows, so that the benchmark's words are whole pieces.
    ner = make_ner_dir(root / "rate-ner", corpus=sentences, spm_vocab=2000, hard_vocab_limit=False,
                       **ner_size)
    enc = make_encoder_dir(root / "biolord", corpus=sentences, wordpieces=2000,
                           initializer_range=0.02, **enc_size)
    return {"ner_dir": ner, "encoder_dir": enc}


def entity_counts(name: str, scorer, texts: list[str]) -> str:
    """What the random heads emit, per report (this sets the work after the encoders)."""
    n = len(texts)
    if name == "radgraph":
        anns = scorer.annotate(texts)
        ents = sum(len(a["entities"]) for a in anns)
        rels = sum(len(e["relations"]) for a in anns for e in a["entities"].values())
        return f"radgraph: {ents / n:.1f} entities, {rels / n:.1f} relations per report"
    if name == "ratescore":
        ents = scorer.entities(texts, block="medheval")
        flat = [s for side in ents for s, _ in side]
        return (f"ratescore: {len(flat) / n:.1f} entities per report, {len(set(flat))} distinct "
                f"entity strings in {n} reports")
    return ""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pairs", type=int, default=32)
    ap.add_argument("--batch-sizes", default="1,16")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--preset", choices=sorted(PRESETS), default="full")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch.set_num_threads (on a loaded shared CPU, 1 avoids oversubscription)")
    ap.add_argument("--radgraph", type=Path)
    ap.add_argument("--radgraph-encoder", type=Path)
    ap.add_argument("--ratescore-ner", type=Path)
    ap.add_argument("--ratescore-encoder", type=Path)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    hyps, refs = reports(args.pairs, 1), reports(args.pairs, 2)
    preset = PRESETS[args.preset]
    sizes = [int(b) for b in args.batch_sizes.split(",")]
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        metrics = {"chexbert": make_chexbert(root, preset["bert"], hyps + refs),
                   "bertscore": {"model_dir": make_roberta(root, preset["roberta"], hyps + refs),
                                 "layer": preset["layer"]}}
        sources = {"radgraph": "given files" if args.radgraph else f"random, preset {args.preset}",
                   "ratescore": "given files" if args.ratescore_ner else f"random, preset {args.preset}"}
        metrics["radgraph"] = ({"archive": args.radgraph, "encoder_dir": args.radgraph_encoder}
                               if args.radgraph else make_radgraph(root, preset["radgraph"], hyps + refs))
        metrics["ratescore"] = ({"ner_dir": args.ratescore_ner, "encoder_dir": args.ratescore_encoder}
                                if args.ratescore_ner else
                                make_ratescore(root, preset["rate_ner"], preset["rate_enc"], hyps + refs))
        tokenize, _ = word_tokenizer()
        times = {("lexical (BLEU, ROUGE)", 0): []}
        scorers = {(n, b): load_scorer(n, p, batch_size=b, device=args.device)
                   for n, p in metrics.items() for b in sizes}
        for key, s in scorers.items():   # warm-up
            s.score(hyps[:2], refs[:2])
        notes = [entity_counts(n, scorers[(n, sizes[0])], hyps + refs) for n in ("radgraph", "ratescore")]
        notes.append(f"models: radgraph {sources['radgraph']}, ratescore {sources['ratescore']}")
        for _ in range(args.repeats):
            t = time.perf_counter()
            lexical_scores(hyps, refs, tokenize=tokenize, wordnet=None, swapped_rouge=True)
            times[("lexical (BLEU, ROUGE)", 0)].append(time.perf_counter() - t)
            for key, s in scorers.items():
                t = time.perf_counter()
                s.score(hyps, refs)
                times.setdefault(key, []).append(time.perf_counter() - t)
    print(f"{args.pairs} report pairs, preset {args.preset}, device {args.device}, "
          f"torch threads {torch.get_num_threads()}, median of {args.repeats}, "
          f"load average {' '.join(f'{x:.2f}' for x in __import__('os').getloadavg())}")
    print("\n".join(notes))
    print("| metric | batch | reports/s |\n|---|---:|---:|")
    for (name, b), ts in times.items():
        print(f"| {name} | {b or '-'} | {args.pairs / statistics.median(ts):.2f} |")


if __name__ == "__main__":
    main()
