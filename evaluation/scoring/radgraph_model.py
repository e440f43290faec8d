"""RadGraph 1.0.0 (DyGIE++) entity and relation inference in plain torch/transformers, no allennlp.

The model is the one CXR-Report-Metric runs through ``allennlp predict --predictor dygie`` (RadGraph
1.0.0, ``model.tar.gz``: allennlp ``config.json``, ``weights.th``, ``vocabulary/``), read from the
DyGIE++ code (github:dwadden/dygiepp, ``dygie/models/{dygie,ner,relation,entity_beam_pruner}.py``,
``dygie/data/dataset_readers/dygie.py``) and allennlp's pieces it uses (the mismatched
transformer indexer/embedder, ``EndpointSpanExtractor``, ``FeedForward``). A report is one sentence:

1. words: the report split by :func:`tokenize_report`; ``/.`` and ``/?`` are fed to the model as
   ``.`` and ``?`` (the reader's ``_normalize_word``), the output keeps the original words;
2. each word is cut into wordpieces on its own; the wordpieces are folded into segments of
   ``max_length`` (512) including the special tokens, each segment run through the encoder, and a
   word's vector is the mean of its wordpieces' last-layer vectors (zero for a word without any);
3. spans: every (start, end) with ``end - start < max_span_width`` (8), in start-then-end order;
   a span is ``[word[start], word[end], width_embedding[end - start]]``;
4. NER: feed-forward (ReLU) -> linear over the non-null labels, a zero score prepended for the null
   label, argmax; every span with a non-null label is an entity;
5. relations: a pruner (feed-forward -> linear -> one score) keeps the
   ``ceil(spans_per_word * n_words)`` best spans (top-k, then back in span order); for every ordered
   pair (i, j) of kept spans, the diagonal included, the pair ``[e_i, e_j, e_i * e_j]`` goes through
   a feed-forward and a linear layer over the relation labels, both spans' pruner scores are added,
   a zero null score is prepended, argmax; non-null pairs are relations.

Dropout is off (inference). Coreference and events are off in RadGraph's config (their weights,
present in ``weights.th``, are checked to exist and not used). The label namespace prefix is read
from the vocabulary files: ``None__`` (the archive CXR-Report-Metric uses, no ``dataset`` field)
and ``radgraph__`` (the ``radgraph`` package's copy) both occur.
"""

from __future__ import annotations

import io
import json
import re
import tarfile
from dataclasses import dataclass
from pathlib import Path

from shared.errors import MedAlignError

#: CXR-Report-Metric ``radgraph_inference/inference.py``: a space before and after each of the
#: class's characters, then whitespace split. The class ``[/,-,:,.,!?()]`` holds the range ``,-,``
#: (a comma to a comma), so ``-`` itself is not split off; kept exactly as written.
_SPLIT = re.compile(r"(?<! )(?=[/,-,:,.,!?()])|(?<=[/,-,:,.,!?()])(?! )")
_EMB = "_embedder.token_embedder_{}._matched_embedder.transformer_model."
#: weights.th prefixes of modules DyGIE builds but RadGraph's config switches off.
_UNUSED = ("_coref.", "_events.")


def tokenize_report(text: str) -> list[str]:
    """The words RadGraph 1.0.0 sees for a report (``inference.py``'s regex, then ``split()``)."""
    return _SPLIT.sub(" ", text).split()


@dataclass(frozen=True)
class RadGraphSettings:
    """What the archive's ``config.json`` and ``vocabulary/`` fix about the model."""

    prefix: str
    """Label namespace prefix (``None`` or ``radgraph``), from the vocabulary file names."""
    ner_labels: tuple[str, ...]
    """Index -> NER label; index 0 is the null label ``""``."""
    relation_labels: tuple[str, ...]
    """Index -> relation label (the null label is the prepended zero score, not in the file)."""
    max_span_width: int
    spans_per_word: float
    feature_size: int
    ff_layers: int
    max_length: int
    embedder_name: str
    model_name: str
    """The encoder the archive was trained from (its hub name or a path)."""


def _read_archive(path: Path) -> dict[str, bytes]:
    """``config.json``, ``weights.th`` and ``vocabulary/*`` of an archive or its extracted folder."""
    files: dict[str, bytes] = {}
    if path.is_dir():
        for p in path.rglob("*"):
            rel = p.relative_to(path).as_posix()
            if p.is_file() and (rel in ("config.json", "weights.th") or rel.startswith("vocabulary/")):
                files[rel] = p.read_bytes()
    elif path.is_file():
        try:
            with tarfile.open(path, "r:*") as tar:
                for m in tar.getmembers():
                    name = m.name.removeprefix("./")
                    if m.isfile() and (name in ("config.json", "weights.th")
                                       or name.startswith("vocabulary/")):
                        files[name] = tar.extractfile(m).read()
        except (tarfile.TarError, OSError) as e:
            raise MedAlignError(f"--radgraph {path}: not a readable model.tar.gz ({e})") from None
    else:
        raise MedAlignError(f"--radgraph {path}: no such file or directory")
    missing = [n for n in ("config.json", "weights.th", "vocabulary/non_padded_namespaces.txt")
               if n not in files]
    if missing:
        raise MedAlignError(f"--radgraph {path}: not a RadGraph/DyGIE++ archive, missing {missing}")
    return files


def _labels(files: dict[str, bytes], name: str) -> list[str]:
    # allennlp Vocabulary.set_from_file: one label per line, a trailing empty line ignored.
    lines = re.split(r"[\n\r]{1,2}", files[f"vocabulary/{name}.txt"].decode("utf-8"))
    if lines and lines[-1] == "":
        lines = lines[:-1]
    return [x.replace("@@NEWLINE@@", "\n") for x in lines]


def _non_padded(files: dict[str, bytes], namespace: str) -> bool:
    patterns = [x.strip() for x in files["vocabulary/non_padded_namespaces.txt"].decode().splitlines()]
    return any(namespace.endswith(p[1:]) if p.startswith("*") else namespace == p for p in patterns)


def read_settings(path: Path, files: dict[str, bytes]) -> RadGraphSettings:
    """Parse and check the archive's config and vocabulary; a clear error for anything unsupported."""
    try:
        cfg = json.loads(files["config.json"])
        model, reader = cfg["model"], cfg["dataset_reader"]
        (emb_name, emb), = model["embedder"]["token_embedders"].items()
        weights = model["loss_weights"]
        ff = model["feedforward_params"]
        settings = {"max_span_width": int(model["max_span_width"]),
                    "spans_per_word": float(model["modules"]["relation"]["spans_per_word"]),
                    "feature_size": int(model["feature_size"]), "ff_layers": int(ff["num_layers"]),
                    "max_length": int(emb.get("max_length") or 0), "embedder_name": emb_name,
                    "model_name": str(emb["model_name"])}
        coref_prop = model["modules"].get("coref", {}).get("coref_prop", 0)
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise MedAlignError(f"--radgraph {path}: config.json is not a DyGIE++ config ({e!r})") from None
    problems = []
    if model.get("type") != "dygie":
        problems.append(f"model type {model.get('type')!r} (need 'dygie')")
    if emb.get("type") != "pretrained_transformer_mismatched" or not emb.get("last_layer_only", True):
        problems.append("the embedder is not a last-layer pretrained_transformer_mismatched")
    if not (weights.get("ner", 0) > 0 and weights.get("relation", 0) > 0):
        problems.append(f"NER and relation must be on (loss_weights {weights})")
    if coref_prop or weights.get("coref", 0) > 0:
        problems.append("coreference propagation is on (not RadGraph's setting)")
    if int(reader.get("max_span_width", settings["max_span_width"])) != settings["max_span_width"]:
        problems.append("the reader's and the model's max_span_width differ")
    if settings["max_length"] < 3:
        problems.append("the embedder has no max_length")
    ner_files = sorted(n[len("vocabulary/"):-len("__ner_labels.txt")] for n in files
                       if n.startswith("vocabulary/") and n.endswith("__ner_labels.txt"))
    if len(ner_files) != 1:
        problems.append(f"need exactly one *__ner_labels.txt in vocabulary/, found {ner_files}")
    if problems:
        raise MedAlignError(f"--radgraph {path}: unsupported archive: " + "; ".join(problems))
    prefix = ner_files[0]
    if f"vocabulary/{prefix}__relation_labels.txt" not in files:
        raise MedAlignError(f"--radgraph {path}: vocabulary/ has {prefix}__ner_labels.txt "
                            f"but no {prefix}__relation_labels.txt")
    for ns in (f"{prefix}__ner_labels", f"{prefix}__relation_labels"):
        if not _non_padded(files, ns):
            raise MedAlignError(f"--radgraph {path}: label namespace {ns} is padded "
                                "(non_padded_namespaces.txt lacks '*labels')")
    ner = _labels(files, f"{prefix}__ner_labels")
    rel = _labels(files, f"{prefix}__relation_labels")
    if not ner or ner[0] != "" or len(ner) < 2 or not rel:
        raise MedAlignError(f"--radgraph {path}: {prefix}__ner_labels.txt must start with the empty "
                            "null label and both label files must name labels")
    return RadGraphSettings(prefix=prefix, ner_labels=tuple(ner), relation_labels=tuple(rel), **settings)


class _FeedForward:
    """allennlp FeedForward at inference: Linear -> ReLU for each layer (dropout is off)."""

    def __init__(self, layers):
        self.layers = layers

    def __call__(self, x):
        import torch.nn.functional as F

        for w, b in self.layers:
            x = F.relu(F.linear(x, w, b))
        return x


@dataclass(frozen=True)
class Annotation:
    """One report's RadGraph output, as the dygie predictor writes it (sentence offsets)."""

    words: tuple[str, ...]
    entities: tuple[tuple[int, int, str], ...]
    """(start, end, label), ends inclusive, in span order."""
    relations: tuple[tuple[int, int, int, int, str], ...]
    """(start1, end1, start2, end2, label), in kept-span pair order."""


class RadGraphModel:
    """The loaded DyGIE++ model; :meth:`annotate` runs batches of reports."""

    def __init__(self, archive: Path, encoder_dir: Path | None, device: str = "cpu"):
        import torch
        from transformers import AutoConfig, AutoModel, AutoTokenizer

        archive = Path(archive)
        files = _read_archive(archive)
        self.settings = s = read_settings(archive, files)
        if encoder_dir is None:
            if not Path(s.model_name).is_dir():
                raise MedAlignError(
                    f"--radgraph {archive} was trained from encoder {s.model_name!r}: pass its "
                    "config and tokenizer directory with --radgraph-encoder")
            encoder_dir = Path(s.model_name)
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(str(encoder_dir), local_files_only=True)
            enc_cfg = AutoConfig.from_pretrained(str(encoder_dir), local_files_only=True)
        except (OSError, ValueError) as e:
            raise MedAlignError(f"--radgraph-encoder {encoder_dir}: cannot load an encoder config "
                                f"and tokenizer from it ({e})") from None
        self.encoder_dir = Path(encoder_dir)
        try:
            state = torch.load(io.BytesIO(files.pop("weights.th")), map_location="cpu",
                               weights_only=True)
        except Exception as e:  # noqa: BLE001 - any unpickling failure is a bad file
            raise MedAlignError(f"--radgraph {archive}: weights.th cannot be loaded with "
                                f"weights_only=True ({e})") from None
        self.encoder = AutoModel.from_config(enc_cfg)
        self._load(archive, state, torch)
        self.device = torch.device(device)
        self.encoder.to(self.device).eval()
        for name in ("width", "ner_out", "prune_out", "rel_out"):
            setattr(self, name, tuple(t.to(self.device) for t in getattr(self, name)))
        for ff in (self.ner_ff, self.prune_ff, self.rel_ff):
            ff.layers = [(w.to(self.device), b.to(self.device)) for w, b in ff.layers]
        self._start, self._end = self._special_tokens()
        self._chunk = s.max_length - len(self._start) - len(self._end)
        if self._chunk < 1:
            raise MedAlignError(f"--radgraph {archive}: max_length {s.max_length} leaves no room "
                                "for wordpieces")

    def _special_tokens(self) -> tuple[list[int], list[int]]:
        """The ids put before and after one sequence, found as allennlp does (encode a probe word,
        "a" or else "1", with and without special tokens)."""
        for probe in ("a", "1"):
            bare = self.tokenizer(probe, add_special_tokens=False)["input_ids"]
            full = self.tokenizer(probe, add_special_tokens=True)["input_ids"]
            if len(bare) == 1 and full.count(bare[0]) == 1:
                at = full.index(bare[0])
                return full[:at], full[at + 1:]
        raise MedAlignError(f"--radgraph-encoder {self.encoder_dir}: cannot find the tokenizer's "
                            "special tokens (its vocabulary needs 'a' or '1' as one wordpiece)")

    def _load(self, archive: Path, state: dict, torch) -> None:
        """Split ``weights.th`` into the encoder and the heads; every key accounted for, strictly."""
        s = self.settings
        emb = _EMB.format(s.embedder_name)
        enc = {k[len(emb):]: v for k, v in state.items() if k.startswith(emb)}
        own = self.encoder.state_dict()
        if "embeddings.position_ids" in enc and "embeddings.position_ids" not in own:
            del enc["embeddings.position_ids"]  # a persistent buffer in older transformers
        missing = sorted(set(own) - set(enc))
        unexpected = sorted(set(enc) - set(own))
        if missing or unexpected:
            raise MedAlignError(f"--radgraph {archive}: the encoder weights do not fit "
                                f"--radgraph-encoder {self.encoder_dir}: missing {missing[:8]}, "
                                f"unexpected {unexpected[:8]}")
        try:
            self.encoder.load_state_dict(enc, strict=True)
        except RuntimeError as e:
            raise MedAlignError(f"--radgraph {archive}: encoder weights do not fit "
                                f"--radgraph-encoder {self.encoder_dir}: {e}") from None
        used = {emb + k for k in enc} | {emb + "embeddings.position_ids"}
        p = s.prefix

        def take(key):
            if key not in state:
                raise MedAlignError(f"--radgraph {archive}: weights.th lacks {key}")
            used.add(key)
            return state[key].float()

        def ff(base):
            return _FeedForward([(take(f"{base}_linear_layers.{i}.weight"),
                                  take(f"{base}_linear_layers.{i}.bias")) for i in range(s.ff_layers)])

        self.width = (take("_endpoint_span_extractor._span_width_embedding.weight"),)
        ner = f"_ner._ner_scorers.{p}__ner_labels."
        self.ner_ff = ff(ner + "0._module.")
        self.ner_out = (take(ner + "1._module.weight"), take(ner + "1._module.bias"))
        prune = f"_relation._mention_pruners.{p}__relation_labels._scorer."
        self.prune_ff = ff(prune + "0._module.")
        self.prune_out = (take(prune + "1._module.weight"), take(prune + "1._module.bias"))
        self.rel_ff = ff(f"_relation._relation_feedforwards.{p}__relation_labels.")
        rel = f"_relation._relation_scorers.{p}__relation_labels."
        self.rel_out = (take(rel + "weight"), take(rel + "bias"))
        checks = [(tuple(self.width[0].shape), (s.max_span_width, s.feature_size)),
                  (self.ner_out[0].shape[0], len(s.ner_labels) - 1),
                  (self.rel_out[0].shape[0], len(s.relation_labels)),
                  (self.ner_ff.layers[0][0].shape[1], 2 * self.encoder.config.hidden_size + s.feature_size),
                  (self.rel_ff.layers[0][0].shape[1], 3 * self.ner_ff.layers[0][0].shape[1])]
        bad = [f"{got} != {want}" for got, want in checks if got != want]
        if bad:
            raise MedAlignError(f"--radgraph {archive}: weight shapes do not fit config.json and "
                                f"vocabulary/: {bad}")
        extra = sorted(k for k in state if k not in used and not k.startswith(_UNUSED))
        if extra:
            raise MedAlignError(f"--radgraph {archive}: weights.th has keys this DyGIE++ "
                                f"reader does not know: {extra[:8]}")

    # ---- inference -------------------------------------------------------------------------

    def _wordpieces(self, words: list[str]) -> list[list[int]]:
        model_words = [w[1:] if w in ("/.", "/?") else w for w in words]  # DyGIEReader._normalize_word
        if not model_words:
            return []
        return self.tokenizer(model_words, add_special_tokens=False)["input_ids"]

    def _word_vectors(self, pieces_per_doc: list[list[list[int]]]):
        """Per document: an (n_words, hidden) tensor of mean-wordpiece vectors."""
        import torch

        segments, owner = [], []
        for d, pieces in enumerate(pieces_per_doc):
            flat = [i for p in pieces for i in p]
            for at in range(0, len(flat), self._chunk):
                segments.append(self._start + flat[at:at + self._chunk] + self._end)
                owner.append(d)
        hidden = self.encoder.config.hidden_size
        flat_vecs: list[list] = [[] for _ in pieces_per_doc]
        if segments:
            pad = self.tokenizer.pad_token_id or 0
            width = max(len(x) for x in segments)
            ids = torch.full((len(segments), width), pad, dtype=torch.long)
            mask = torch.zeros((len(segments), width), dtype=torch.long)
            for r, seg in enumerate(segments):
                ids[r, :len(seg)] = torch.tensor(seg)
                mask[r, :len(seg)] = 1
            with torch.no_grad():
                out = self.encoder(input_ids=ids.to(self.device),
                                   attention_mask=mask.to(self.device)).last_hidden_state.float()
            for r, seg in enumerate(segments):
                flat_vecs[owner[r]].append(out[r, len(self._start):len(seg) - len(self._end)])
        result = []
        for d, pieces in enumerate(pieces_per_doc):
            vecs = torch.cat(flat_vecs[d]) if flat_vecs[d] else torch.zeros((0, hidden), device=self.device)
            words = torch.zeros((len(pieces), hidden), device=self.device)
            at = 0
            for w, p in enumerate(pieces):
                if p:
                    words[w] = vecs[at:at + len(p)].sum(0) / len(p)
                at += len(p)
            result.append(words)
        return result

    def _heads(self, words, tokens: list[str]) -> Annotation:
        import torch
        import torch.nn.functional as F

        s = self.settings
        n = words.shape[0]
        spans = [(a, b) for a in range(n) for b in range(a, min(a + s.max_span_width, n))]
        if not spans:
            return Annotation(tuple(tokens), (), ())
        idx = torch.tensor(spans, device=self.device)
        starts, ends = idx[:, 0], idx[:, 1]
        emb = torch.cat([words[starts], words[ends], self.width[0][ends - starts]], -1)
        with torch.no_grad():
            ner = F.linear(self.ner_ff(emb), *self.ner_out)
            ner = torch.cat([ner.new_zeros(ner.shape[0], 1), ner], -1)
            ner_label = ner.max(-1)[1].tolist()
            entities = tuple((a, b, s.ner_labels[lab]) for (a, b), lab in zip(spans, ner_label) if lab != 0)
            # Pruner: the count is computed as dygie does, in float32 (ceil of n * spans_per_word).
            k = int(torch.ceil(torch.tensor([n]).float() * s.spans_per_word).long()[0])
            k = min(max(k, 1), len(spans))
            score = F.linear(self.prune_ff(emb), *self.prune_out)  # (S, 1)
            top = torch.sort(score.topk(k, 0)[1].squeeze(-1))[0]
            top_emb, top_score = emb[top], score[top].squeeze(-1)
            labels = torch.empty((k, k), dtype=torch.long, device=self.device)
            rows = max(1, (1 << 24) // max(1, k * top_emb.shape[1] * 3))
            for r0 in range(0, k, rows):
                e1 = top_emb[r0:r0 + rows].unsqueeze(1).expand(-1, k, -1)
                e2 = top_emb.unsqueeze(0).expand(e1.shape[0], -1, -1)
                rel = F.linear(self.rel_ff(torch.cat([e1, e2, e1 * e2], -1)), *self.rel_out)
                rel = rel + (top_score[r0:r0 + rows, None] + top_score[None, :]).unsqueeze(-1)
                rel = torch.cat([rel.new_zeros(*rel.shape[:2], 1), rel], -1)
                labels[r0:r0 + rows] = rel.max(-1)[1] - 1
        top_spans = [spans[i] for i in top.tolist()]
        lab = labels.tolist()
        relations = tuple((*top_spans[i], *top_spans[j], s.relation_labels[lab[i][j]])
                          for i, j in (labels >= 0).nonzero().tolist())
        return Annotation(tuple(tokens), entities, relations)

    def annotate(self, texts: list[str]) -> list[Annotation]:
        """RadGraph output for each text (one batch through the encoder)."""
        tokens = [tokenize_report(t) for t in texts]
        pieces = [self._wordpieces(t) for t in tokens]
        vectors = self._word_vectors(pieces)
        return [self._heads(v, t) for v, t in zip(vectors, tokens)]
