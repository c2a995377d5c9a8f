"""Synthetic Criteo-format click logs with a hidden teacher, deterministic by seed.

Each of the 26 categorical columns draws ranks from a power law (Zipf-like, exponent 1.05-1.4)
over its own vocabulary (sizes in the proportions of the Kaggle set, capped by
``max_vocab``), written as 32-bit hex values; each column and dense feature is missing at its
own rate (an empty field). The 13 dense features are heavy-tailed counts (the second can be
negative, as in Criteo). The label is a Bernoulli draw from a hidden teacher: a logistic
model over per-category weights, the dense features' log(x + 1) and one pairwise category
interaction, with a bias for a click rate of roughly a quarter to a third. A model trained on
the file can reach at most about the teacher's own AUC, which ``generate`` returns.

Rows are generated in fixed blocks, each from its own seed, so the output depends only on
``seed``, ``rows`` and ``max_vocab``.
"""

from __future__ import annotations

import os
from typing import Callable

import numpy as np

from ..artifact.staging import atomic_file
from .arch import KAGGLE_TABLES
from .criteo import NUM_CAT, NUM_DENSE

BLOCK = 1 << 15


class Teacher:
    """The generator's hidden parameters (a function of the seed and ``max_vocab`` only)."""

    def __init__(self, seed: int, max_vocab: int):
        rng = np.random.default_rng(np.random.SeedSequence([seed, 0x7EAC4E2]))
        self.vocab = np.array([max(2, min(c, max_vocab)) for c in KAGGLE_TABLES])   # the Kaggle set's counts
        self.zipf = rng.uniform(1.05, 1.4, NUM_CAT)
        self.cat_missing = rng.choice([0.0, 0.0, 0.02, 0.1, 0.4], NUM_CAT)
        self.dense_missing = rng.choice([0.0, 0.05, 0.2, 0.45], NUM_DENSE)
        self.dense_scale = rng.uniform(0.5, 4.0, NUM_DENSE)
        self.cdf = []
        self.cat_weights = []
        for k in range(NUM_CAT):
            p = 1.0 / np.arange(1, self.vocab[k] + 1) ** self.zipf[k]
            self.cdf.append(np.cumsum(p) / p.sum())
            self.cat_weights.append(rng.normal(0, rng.uniform(0.1, 0.6), self.vocab[k]))
        self.dense_weights = rng.normal(0, 0.25, NUM_DENSE)
        self.pair = tuple(rng.choice(NUM_CAT, 2, replace=False))
        self.pair_weights = rng.normal(0, 0.5, 1009)
        self.hex_mult = rng.integers(1 << 20, 1 << 31, NUM_CAT) * 2 + 1   # odd: ranks stay unique
        self.hex_add = rng.integers(0, 1 << 32, NUM_CAT)
        self.bias = 0.0
        self.bias = float(-np.log(3) - np.mean(self._logits(*self._draw(
            np.random.default_rng(np.random.SeedSequence([seed, 0xB1A5])), 4096))))

    def _draw(self, rng: np.random.Generator, n: int):
        ranks = np.stack([np.searchsorted(self.cdf[k], rng.random(n)) for k in range(NUM_CAT)],
                         axis=1)
        dense = np.floor(rng.lognormal(0, 1.3, (n, NUM_DENSE)) * self.dense_scale).astype(
            np.int64)
        dense[:, 1] -= (rng.random(n) < 0.1) * rng.integers(1, 4, n)   # I2 goes negative
        return ranks, dense

    def _logits(self, ranks: np.ndarray, dense: np.ndarray) -> np.ndarray:
        z = np.full(len(ranks), self.bias)
        for k in range(NUM_CAT):
            z += self.cat_weights[k][ranks[:, k]]
        z += np.log1p(np.maximum(dense, 0)) @ self.dense_weights
        a, b = self.pair
        z += self.pair_weights[(ranks[:, a] * 31 + ranks[:, b]) % len(self.pair_weights)]
        return z

    def block(self, seed: int, index: int, n: int):
        """(labels, click probabilities, dense with -1 for missing, hex values or -1)."""
        rng = np.random.default_rng(np.random.SeedSequence([seed, 1, index]))
        ranks, dense = self._draw(rng, n)
        prob = 1.0 / (1.0 + np.exp(-self._logits(ranks, dense)))
        labels = (rng.random(n) < prob).astype(np.int64)
        values = (ranks * self.hex_mult + self.hex_add) % (1 << 32)
        values[rng.random((n, NUM_CAT)) < self.cat_missing] = -1
        dense_missing = rng.random((n, NUM_DENSE)) < self.dense_missing
        return labels, prob, dense, dense_missing, values


def _lines(labels, dense, dense_missing, values) -> str:
    dense_s = dense.astype(str)
    dense_s[dense_missing] = ""
    hex_s = np.char.mod("%08x", np.maximum(values, 0))
    hex_s[values < 0] = ""
    cols = np.concatenate([labels.astype(str)[:, None], dense_s, hex_s], axis=1)
    return "".join("\t".join(row) + "\n" for row in cols.tolist())


def generate(path: str, rows: int, seed: int = 0, max_vocab: int = 100_000,
             progress: Callable[[int], None] | None = None) -> float:
    """Write ``rows`` Criteo-format lines to ``path`` (atomically); return the teacher's AUC
    on them (the AUC its own click probabilities reach against the drawn labels)."""
    from sklearn.metrics import roc_auc_score

    if rows < 1 or max_vocab < 2:
        raise ValueError("rows must be positive and max_vocab at least 2")
    teacher = Teacher(seed, max_vocab)
    probs, labels_all = [], []
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with atomic_file(path) as tmp, open(tmp, "w") as f:
        for index, start in enumerate(range(0, rows, BLOCK)):
            n = min(BLOCK, rows - start)
            labels, prob, dense, missing, values = teacher.block(seed, index, n)
            f.write(_lines(labels, dense, missing, values))
            probs.append(prob)
            labels_all.append(labels)
            if progress:
                progress(n)
    labels_all, probs = np.concatenate(labels_all), np.concatenate(probs)
    if labels_all.min() == labels_all.max():
        return float("nan")
    return float(roc_auc_score(labels_all, probs))
