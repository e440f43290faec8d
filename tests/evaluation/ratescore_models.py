"""Tiny random-weight RaTEScore models in the real formats, for the tests.

- NER: a ``Angelakeke/RaTE-NER-Deberta``-shaped directory: a DeBERTa-v2 token classifier with the
  package's 11 labels in ``config.id2label``, its SentencePiece ``spm.model`` trained here on a few
  report sentences, and a DebertaV2Tokenizer ``tokenizer_config.json``.
- Encoder: a ``FremyCompany/BioLORD-2023-C``-shaped directory: an MPNet with a WordPiece
  ``vocab.txt`` trained here and an MPNetTokenizer ``tokenizer_config.json``.

The classifier weights are scaled up so that the random NER emits every label, entities included;
the encoder has a large init range so that entity cosines differ (at 0.02 they are all ~0.9999 and
the nearest entity is decided by float rounding); with the default seed the NER labels ``[SEP]``
I-, so that 0.5.0's decoder bug (an entity open at the end of a sentence dropped) occurs in the tests.

Sizes, tokenizer corpus and vocabulary sizes are parameters so that ``bench/report_metrics.py`` can
build both at their real sizes (:data:`NER_REAL_SIZE`, :data:`ENCODER_REAL_SIZE`: DeBERTa-v3-base,
MPNet-base); the defaults are the tests' tiny models.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

LABELS = ["B-ABNORMALITY", "I-ABNORMALITY", "B-NON-ABNORMALITY", "I-NON-ABNORMALITY", "B-DISEASE",
          "I-DISEASE", "B-NON-DISEASE", "I-NON-DISEASE", "B-ANATOMY", "I-ANATOMY", "O"]
#: (hidden, layers, attention heads, intermediate) of the tests' tiny models.
TINY_SIZE = (32, 2, 2, 64)
#: RaTE-NER-Deberta = DeBERTa-v3-base: 768 x 12 layers, 12 heads, 128100 embeddings, 256 buckets.
NER_REAL_SIZE = {"size": (768, 12, 12, 3072), "vocab_size": 128100, "position_buckets": 256}
#: BioLORD-2023-C = MPNet-base (all-mpnet-base-v2): 768 x 12 layers, 12 heads, 30527 wordpieces.
ENCODER_REAL_SIZE = {"size": (768, 12, 12, 3072), "vocab_size": 30527}

CORPUS = [
    "No acute cardiopulmonary process.", "Heart size is normal.", "Lungs are clear.",
    "There is no pleural effusion or pneumothorax.", "Mild cardiomegaly with small bilateral effusions.",
    "The mediastinum is unremarkable.", "Stable right lower lobe opacity, likely atelectasis.",
    "No focal consolidation.", "Degenerative changes of the thoracic spine.",
    "Pulmonary vasculature is within normal limits.", "Possible left basilar pneumonia.",
    "Interval increase in the size of the right pleural effusion.", "Osseous structures are intact.",
    "Enlarged cardiac silhouette, Kerley B lines, edema.", "Calcified granuloma in the left upper lobe.",
]


def make_ner_dir(root: Path, seed: int = 1, scale: float = 1.0, i_bias: float = 0.5, *,
                 size: tuple[int, int, int, int] = TINY_SIZE, corpus: list[str] = CORPUS,
                 spm_vocab: int = 120, hard_vocab_limit: bool = True, vocab_size: int | None = None,
                 position_buckets: int = 64) -> Path:
    """Write the tiny DeBERTa-v2 NER directory under ``root`` and return it. ``i_bias`` favours
    the I- labels, so that entities run on to the end of sentences (where 0.5.0's decoder errs).

    ``size``: (hidden, layers, heads, intermediate); ``corpus``/``spm_vocab``: what the
    SentencePiece model is trained on and its size (``hard_vocab_limit=False``: at most that);
    ``vocab_size``: the embedding rows (default: the SentencePiece size)."""
    import sentencepiece as spm
    import torch
    from transformers import DebertaV2Config, DebertaV2ForTokenClassification

    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(list(corpus) * 4), model_writer=buf, vocab_size=spm_vocab,
        hard_vocab_limit=hard_vocab_limit, model_type="unigram",
        pad_id=0, bos_id=1, eos_id=2, unk_id=3, pad_piece="[PAD]", bos_piece="[CLS]",
        eos_piece="[SEP]", unk_piece="[UNK]", user_defined_symbols=["[MASK]"], minloglevel=2)
    (root / "spm.model").write_bytes(buf.getvalue())
    (root / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "DebertaV2Tokenizer", "do_lower_case": False, "split_by_punct": False,
        "vocab_type": "spm", "bos_token": "[CLS]", "eos_token": "[SEP]", "unk_token": "[UNK]",
        "sep_token": "[SEP]", "pad_token": "[PAD]", "cls_token": "[CLS]", "mask_token": "[MASK]",
        "model_max_length": 512}))
    sp = spm.SentencePieceProcessor(model_proto=buf.getvalue())
    hidden, layers, heads, inter = size
    cfg = DebertaV2Config(
        vocab_size=vocab_size or sp.get_piece_size(), hidden_size=hidden, num_hidden_layers=layers,
        num_attention_heads=heads, intermediate_size=inter, max_position_embeddings=512,
        relative_attention=True, position_buckets=position_buckets, pos_att_type=["p2c", "c2p"], norm_rel_ebd="layer_norm",
        position_biased_input=False, type_vocab_size=0, pad_token_id=0,
        id2label=dict(enumerate(LABELS)), label2id={lab: i for i, lab in enumerate(LABELS)})
    torch.manual_seed(seed)
    model = DebertaV2ForTokenClassification(cfg).eval()
    with torch.no_grad():
        model.classifier.weight.normal_(0.0, scale)
        model.classifier.bias.copy_(torch.tensor([i_bias if lab.startswith("I-") else 0.0
                                                  for lab in LABELS]))
    model.save_pretrained(str(root))
    return root


def make_encoder_dir(root: Path, seed: int = 1, *, size: tuple[int, int, int, int] = TINY_SIZE,
                     corpus: list[str] = CORPUS, wordpieces: int = 200, vocab_size: int | None = None,
                     initializer_range: float = 0.5) -> Path:
    """Write the tiny MPNet encoder directory under ``root`` and return it.

    ``size``: (hidden, layers, heads, intermediate); ``corpus``/``wordpieces``: what the WordPiece
    vocabulary is trained on and its size; ``vocab_size``: pad ``vocab.txt`` with ``[unusedN]``
    to this many entries."""
    import torch
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers
    from transformers import MPNetConfig, MPNetModel

    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    specials = ["<s>", "<pad>", "</s>", "[UNK]", "<mask>"]
    wp = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    wp.normalizer = normalizers.BertNormalizer(lowercase=True)
    wp.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    wp.train_from_iterator(list(corpus), trainers.WordPieceTrainer(
        vocab_size=wordpieces, special_tokens=specials, show_progress=False))
    vocab = [w for w, _ in sorted(wp.get_vocab().items(), key=lambda kv: kv[1])]
    if vocab_size is not None:
        vocab += [f"[unused{i}]" for i in range(vocab_size - len(vocab))]
    (root / "vocab.txt").write_text("".join(w + "\n" for w in vocab))
    (root / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "MPNetTokenizer", "do_lower_case": True, "bos_token": "<s>",
        "eos_token": "</s>", "sep_token": "</s>", "cls_token": "<s>", "unk_token": "[UNK]",
        "pad_token": "<pad>", "mask_token": "<mask>", "model_max_length": 512}))
    hidden, layers, heads, inter = size
    cfg = MPNetConfig(vocab_size=len(vocab), hidden_size=hidden, num_hidden_layers=layers,
                      num_attention_heads=heads, intermediate_size=inter, max_position_embeddings=514,
                      pad_token_id=1, initializer_range=initializer_range,
                      bos_token_id=0, eos_token_id=2)
    torch.manual_seed(seed)
    MPNetModel(cfg).eval().save_pretrained(str(root))
    return root
