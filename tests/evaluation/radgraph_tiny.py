"""A tiny random-weight RadGraph archive in the real allennlp/DyGIE++ format, for the tests.

``model.tar.gz`` holds what ``allennlp train`` writes for RadGraph (dygiepp's template config):
``config.json`` (the expanded config: reader, model, trainer sections), ``weights.th`` (a plain
state dict with every DyGIE module's parameters, coref and events included, under allennlp's
module names) and ``vocabulary/`` (``non_padded_namespaces.txt``, ``<prefix>__ner_labels.txt``
starting with the empty null label, ``<prefix>__relation_labels.txt``). The encoder is a BERT
(one layer by default) whose config and WordPiece vocabulary (with "1" and "2", which allennlp's
tokenizer probes with) are saved next to it. The NER and relation scorers are scaled so that the
random model emits some entities and relations, not none and not all.

The sizes are parameters (``encoder_size``, ``feature_size``, ``ff_dim``, ``words``,
``vocab_size``) so that ``bench/report_metrics.py`` can build one at RadGraph 1.0.0's real size
(:data:`REAL_SIZE`); the defaults are the tests' tiny model.
"""

from __future__ import annotations

import json
import tarfile
from pathlib import Path

WORDS = ["no", "acute", "cardiopulmonary", "process", "pleural", "effusion", "left", "right",
         "lung", "lower", "lobe", "opacity", "heart", "size", "is", "normal", "there", "mild",
         "edema", "x", "ray", "tube", "in", "place", "stable", "and", "of", "the", "chest",
         "1", "2", "a", "b", ".", ",", "-", "/", ":", "(", ")", "?", "!", "##s", "##al", "##ly"]
SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
NER_LABELS = ["", "ANAT-DP", "OBS-DP", "OBS-U", "OBS-DA"]
REL_LABELS = ["modify", "located_at", "suggestive_of"]
HIDDEN, FEATURE, FF = 16, 4, 12
#: The tests' encoder: (hidden, layers, attention heads, intermediate, max positions).
TINY_ENCODER = (HIDDEN, 1, 2, 32, 600)
#: RadGraph 1.0.0: a BERT-base encoder (BiomedBERT/PubMedBERT-base, 30522 wordpieces) and
#: dygiepp's template sizes (feature_size 20, two 150-unit feed-forward layers).
REAL_SIZE = {"encoder_size": (768, 12, 12, 3072, 512), "feature_size": 20, "ff_dim": 150, "vocab_size": 30522}


def _config(encoder: Path, max_length: int, spans_per_word: float, feature: int, ff: int) -> dict:
    emb = {"type": "pretrained_transformer_mismatched", "model_name": str(encoder),
           "max_length": max_length}
    return {
        "dataset_reader": {"type": "dygie", "max_span_width": 8, "token_indexers": {"bert": dict(emb)}},
        "model": {
            "type": "dygie",
            "embedder": {"token_embedders": {"bert": dict(emb)}},
            "feature_size": feature,
            "feedforward_params": {"dropout": 0.4, "hidden_dims": ff, "num_layers": 2},
            "initializer": {"regexes": [["_span_width_embedding.weight", {"type": "xavier_normal"}]]},
            "loss_weights": {"coref": 0, "events": 0, "ner": 0.2, "relation": 1},
            "max_span_width": 8,
            "module_initializer": {"regexes": [[".*weight", {"type": "xavier_normal"}],
                                               [".*weight_matrix", {"type": "xavier_normal"}]]},
            "modules": {"coref": {"coref_prop": 0, "max_antecedents": 100, "spans_per_word": 0.3},
                        "events": {"argument_spans_per_word": 0.8,
                                   "loss_weights": {"arguments": 1, "trigger": 0.2},
                                   "trigger_spans_per_word": 0.3},
                        "ner": {}, "relation": {"spans_per_word": spans_per_word}},
            "target_task": "relation",
        },
        "train_data_path": "train.json", "validation_data_path": "dev.json", "test_data_path": "test.json",
        "data_loader": {"sampler": {"type": "random"}},
        "trainer": {"cuda_device": 0, "num_epochs": 50, "validation_metric": "+MEAN__relation_f1"},
        "numpy_seed": 1337, "pytorch_seed": 133, "random_seed": 13370,
    }


def build_tiny_radgraph(root: Path, *, prefix: str = "None", max_length: int = 512,
                        spans_per_word: float = 0.5, position_ids: bool = True, seed: int = 0,
                        as_tar: bool = True, encoder_size: tuple[int, int, int, int, int] = TINY_ENCODER,
                        feature_size: int = FEATURE, ff_dim: int = FF, words: tuple[str, ...] = (),
                        vocab_size: int | None = None, compresslevel: int = 9) -> tuple[Path, Path]:
    """Write ``root/encoder/`` and ``root/model.tar.gz`` (or ``root/model/``); return both paths.

    ``position_ids``: include the encoder's ``embeddings.position_ids`` buffer in ``weights.th``
    (transformers 3.x, which RadGraph 1.0.0 was trained with, saved it; 4.31+ does not).
    ``encoder_size``: (hidden, layers, heads, intermediate, max positions) of the BERT; ``feature_size``:
    the span width embedding size; ``ff_dim``: the feed-forward width; ``words``: wordpieces added to
    the vocabulary (so that a benchmark's words are whole pieces, as in a real vocabulary);
    ``vocab_size``: pad the vocabulary with ``[unusedN]`` to this size.
    """
    import torch
    from transformers import BertConfig, BertModel, BertTokenizer

    root = Path(root)
    hidden, layers, heads, inter, positions = encoder_size
    encoder = root / "encoder"
    encoder.mkdir(parents=True, exist_ok=True)
    vocab = SPECIAL + WORDS + sorted(set(words) - set(SPECIAL + WORDS))
    if vocab_size is not None:
        vocab += [f"[unused{i}]" for i in range(vocab_size - len(vocab))]
    cfg = BertConfig(vocab_size=len(vocab), hidden_size=hidden, num_hidden_layers=layers,
                     num_attention_heads=heads, intermediate_size=inter,
                     max_position_embeddings=positions)
    cfg.save_pretrained(encoder)
    BertTokenizer(vocab={w: i for i, w in enumerate(vocab)}).save_pretrained(encoder)

    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    bert = BertModel(cfg)
    state = {f"_embedder.token_embedder_bert._matched_embedder.transformer_model.{k}": v.clone()
             for k, v in bert.state_dict().items()}
    if position_ids:
        state["_embedder.token_embedder_bert._matched_embedder.transformer_model."
              "embeddings.position_ids"] = torch.arange(positions).expand((1, -1)).clone()
    span = 2 * hidden + feature_size

    def rand(*shape, scale=1.0, shift=0.0):
        return torch.randn(*shape, generator=g) * scale + shift

    def ff(base, d_in, layers=2, out=ff_dim):
        for i in range(layers):
            state[f"{base}_linear_layers.{i}.weight"] = rand(out, d_in if i == 0 else out, scale=d_in ** -0.5 if i == 0 else out ** -0.5)
            state[f"{base}_linear_layers.{i}.bias"] = rand(out, scale=0.1)

    state["_endpoint_span_extractor._span_width_embedding.weight"] = rand(8, feature_size)
    ner = f"_ner._ner_scorers.{prefix}__ner_labels."
    ff(ner + "0._module.", span)
    state[ner + "1._module.weight"] = rand(len(NER_LABELS) - 1, ff_dim, scale=1.5)
    state[ner + "1._module.bias"] = rand(len(NER_LABELS) - 1, scale=0.3, shift=-2.2)
    prune = f"_relation._mention_pruners.{prefix}__relation_labels._scorer."
    # The pruner scores spans as the NER scorer does (its features, the summed label logits), as
    # a trained model's would correlate, so that kept pairs are often entity pairs.
    for i in range(2):
        for part in ("weight", "bias"):
            state[f"{prune}0._module._linear_layers.{i}.{part}"] = \
                state[f"{ner}0._module._linear_layers.{i}.{part}"].clone()
    state[prune + "1._module.weight"] = state[ner + "1._module.weight"].sum(0, keepdim=True) * 0.5
    state[prune + "1._module.bias"] = state[ner + "1._module.bias"].sum(0, keepdim=True) * 0.5
    ff(f"_relation._relation_feedforwards.{prefix}__relation_labels.", 3 * span)
    state[f"_relation._relation_scorers.{prefix}__relation_labels.weight"] = rand(len(REL_LABELS), ff_dim, scale=1.5)
    state[f"_relation._relation_scorers.{prefix}__relation_labels.bias"] = rand(len(REL_LABELS), scale=0.3, shift=-1.0)
    # Coref and events: built by DyGIE whatever the loss weights, so present in a real weights.th.
    state["_coref._distance_embedding.weight"] = rand(10, feature_size)
    ff("_coref._antecedent_feedforward._module.", 3 * span + feature_size)
    ff("_coref._mention_pruner._scorer.0._module.", span)
    state["_coref._mention_pruner._scorer.1._module.weight"] = rand(1, ff_dim)
    state["_coref._mention_pruner._scorer.1._module.bias"] = rand(1)
    state["_coref._antecedent_scorer._module.weight"] = rand(1, ff_dim)
    state["_coref._antecedent_scorer._module.bias"] = rand(1)
    ff("_coref._f_network.", 2 * span, layers=1, out=span)
    state["_events._distance_embedding.weight"] = rand(10, feature_size)

    model = root / "model"
    (model / "vocabulary").mkdir(parents=True, exist_ok=True)
    (model / "config.json").write_text(json.dumps(_config(encoder, max_length, spans_per_word, feature_size, ff_dim), indent=2))
    torch.save(state, model / "weights.th")
    (model / "vocabulary" / "non_padded_namespaces.txt").write_text("*tags\n*labels\n")
    (model / "vocabulary" / f"{prefix}__ner_labels.txt").write_text("\n".join(NER_LABELS) + "\n")
    (model / "vocabulary" / f"{prefix}__relation_labels.txt").write_text("\n".join(REL_LABELS) + "\n")
    if not as_tar:
        return model, encoder
    archive = root / "model.tar.gz"
    with tarfile.open(archive, "w:gz", compresslevel=compresslevel) as tar:
        for p in sorted(model.rglob("*")):
            tar.add(p, arcname=p.relative_to(model).as_posix(), recursive=False)
    return archive, encoder
