"""fastText document classifier: one text normalisation, supervised training, P(label | text) scoring.

fastText reads one example per line, so a newline inside a document must go. PreSelect's training script
replaces newlines with spaces while the datatrove scorer it uses at inference deletes them (a
train/inference mismatch); here :func:`normalise` is the single rule applied both when the training file
is written and when documents are scored.

fasttext-wheel 0.9.2 under numpy 2: ``predict("one string")`` raises (``np.array(copy=False)``), and
``predict(list, k=-1)`` returns the top label's probability for *every* label (a multilinePredict bug), so
the probability of a label that is not the top one is wrong there. Scoring therefore calls the binding's
single-line predict (``model.f.predict(line + "\\n", k, threshold, on_unicode_error)``), which is what
``predict(str)`` runs under numpy 1, and is as fast per document as the list call.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

LABEL_PREFIX = "__label__"
# resources of a fastText scoring stage: the model loads in a fraction of a second, so each worker process
# loads it once and scores inside the read tasks, one CPU each (no actor pool, no extra copy of the input)
SCORING_RESOURCES = {"compute": "tasks", "num_cpus": 1.0, "batch_size": 2048}


def normalise(text: str) -> str:
    """Line breaks (``\\n``, ``\\r``) become spaces: the text fastText sees at training and at scoring."""
    return text.replace("\r", " ").replace("\n", " ")


@dataclass
class FastTextParams:
    """Supervised fastText settings; defaults are PreSelect's (``epoch=3, lr=0.1, wordNgrams=2``, rest fastText's).

    Args:
        epoch: passes over the training file.
        lr: learning rate.
        word_ngrams: word n-gram length (2 = unigrams + bigrams).
        dim: vector size.
        bucket: hash buckets for n-grams; the model file is about (words + bucket) x dim x 4 bytes
            (2,000,000 -> ~800 MB), so shrink it for small data and tests.
        min_count: minimal word count.
        thread: training threads; 1 with a fixed ``seed`` gives a byte-identical model.
        seed: seeds fastText and the order of the training lines.
    """

    epoch: int = 3
    lr: float = 0.1
    word_ngrams: int = 2
    dim: int = 100
    bucket: int = 2_000_000
    min_count: int = 1
    thread: int = 1
    seed: int = 0


def train_classifier(texts: list[str], labels: list[str], out: str | Path, params: FastTextParams | None = None) -> Path:
    """Train a supervised fastText model on ``__label__<label> <normalised text>`` lines and save it to ``out``.

    The lines are written in a seeded random order (the reference writes all positives, then all
    negatives, which with one training thread would make SGD see the classes in blocks).

    Args:
        texts: documents.
        labels: one label name per document (e.g. ``"1"`` / ``"0"``), without the ``__label__`` prefix.
        out: path of the ``.bin`` model written (parent directories are created).
        params: training settings (PreSelect's by default).
    """
    import fasttext

    p = params or FastTextParams()
    if len(texts) != len(labels):
        raise ValueError(f"train_classifier: {len(texts)} texts but {len(labels)} labels")
    if len(set(labels)) < 2:
        raise ValueError(f"train_classifier: need at least two distinct labels, got {sorted(set(labels))}")
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    order = np.random.default_rng(p.seed).permutation(len(texts))
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=".fasttext-") as tmp:
        train_file = Path(tmp) / "train.txt"
        with open(train_file, "w", encoding="utf-8", newline="\n") as f:
            for i in order:
                f.write(f"{LABEL_PREFIX}{labels[i]} {normalise(texts[i])}\n")
        model = fasttext.train_supervised(
            input=str(train_file),
            epoch=p.epoch,
            lr=p.lr,
            wordNgrams=p.word_ngrams,
            dim=p.dim,
            bucket=p.bucket,
            minCount=p.min_count,
            thread=p.thread,
            seed=p.seed,
            verbose=0,
        )
        partial = Path(tmp) / "model.bin"
        model.save_model(str(partial))
        os.replace(partial, out)
    return out


class FastTextScorer:
    """Loads a supervised fastText model once; :meth:`proba` gives P(label | normalised text) per document.

    Args:
        path: the ``.bin`` model file.
        label: the label whose probability is returned, e.g. ``__label__1``.
    """

    def __init__(self, path: str | Path, label: str = f"{LABEL_PREFIX}1"):
        import fasttext

        if not Path(path).is_file():
            raise FileNotFoundError(f"fastText model not found: {path}")
        self.model = fasttext.load_model(str(path))
        if label not in self.model.get_labels():
            raise ValueError(f"fastText model {path} has no label {label!r}; its labels: {self.model.get_labels()}")
        self.label = label
        self._predict = self.model.f.predict  # the single-line binding; see the module docstring

    def proba(self, texts: list[str]) -> np.ndarray:
        """P(``label``) for each text, float32, exactly as fastText computes it (``predict(text, k=-1)``)."""
        out = np.empty(len(texts), dtype=np.float32)
        label, predict = self.label, self._predict
        for i, text in enumerate(texts):
            out[i] = next(p for p, name in predict(normalise(text) + "\n", -1, 0.0, "strict") if name == label)
        return out
