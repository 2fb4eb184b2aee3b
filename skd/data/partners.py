"""CS-KD partner drawing (docs/methods.md §2.2, ``alinlab/cs-kd`` ``PairBatchSampler``).

For every anchor, a partner uniform over **all** training samples of the anchor's class: with
replacement, independently per anchor, the anchor itself possible (probability 1/n_c).
``exclude_self`` is the opt-in clean variant (docs/methods.md §10): uniform over the class's *other*
samples (a class with a single sample still pairs it with itself, having no other).
"""
from __future__ import annotations

import numpy as np

from skd.errors import DataError


class PartnerSampler:
    """Per-class sample-id arrays built from the labels of all samples (``SampleIndex.labels``),
    so drawing needs no scan of the shards: ids sorted by class, plus each class's start."""

    def __init__(self, labels: np.ndarray, num_classes: int | None = None,
                 exclude_self: bool = False) -> None:
        labels = np.asarray(labels)
        if labels.ndim != 1 or labels.size == 0:
            raise ValueError(f"labels must be a non-empty 1-d array, got shape {labels.shape}")
        if labels.min() < 0:
            raise ValueError(f"negative label {int(labels.min())}")
        num_classes = int(labels.max()) + 1 if num_classes is None else num_classes
        if labels.max() >= num_classes:
            raise ValueError(f"label {int(labels.max())} outside [0, {num_classes})")
        id_dtype = np.int32 if labels.size < 2**31 else np.int64
        self.ids_by_class = np.argsort(labels, kind="stable").astype(id_dtype)
        """Sample ids grouped by class (ascending id inside each class)."""
        self.class_counts = np.bincount(labels, minlength=num_classes).astype(np.int64)
        self.class_starts = np.concatenate([[0], np.cumsum(self.class_counts)[:-1]]).astype(np.int64)
        self.num_classes = num_classes
        self.exclude_self = exclude_self

    def class_ids(self, label: int) -> np.ndarray:
        """All sample ids of class ``label``."""
        start = self.class_starts[label]
        return self.ids_by_class[start:start + self.class_counts[label]]

    def draw(self, labels, generator: np.random.Generator, anchors=None) -> np.ndarray:
        """One partner id (int64) per label: uniform over that class's samples, or over its other
        samples when ``exclude_self`` (then ``anchors``, the anchors' sample ids, are required)."""
        labels = np.asarray(labels, dtype=np.int64).reshape(-1)
        if labels.size and (labels.min() < 0 or labels.max() >= self.num_classes):
            raise ValueError(f"labels must lie in [0, {self.num_classes})")
        counts = self.class_counts[labels]
        if (counts == 0).any():
            empty = sorted(set(labels[counts == 0].tolist()))
            raise DataError(f"no training samples of class(es) {empty} to draw a partner from")
        if not self.exclude_self:
            picks = generator.integers(0, counts)  # uniform in [0, n_c) per anchor
        else:
            if anchors is None:
                raise ValueError("exclude_self needs the anchors' sample ids")
            anchors = np.asarray(anchors, dtype=np.int64).reshape(-1)
            # Draw among the n_c − 1 others, then step over the anchor's slot in its class.
            slots = np.array([np.searchsorted(self.class_ids(c), a) for c, a in zip(labels, anchors)],
                             dtype=np.int64)
            picks = generator.integers(0, np.maximum(counts - 1, 1))
            picks = np.where(counts > 1, picks + (picks >= slots), 0)
        return self.ids_by_class[self.class_starts[labels] + picks].astype(np.int64)
