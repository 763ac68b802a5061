"""Bundled datasets for examples, experiments and tests.

Everything here is plain numpy, seeded and deterministic: the same arguments
always give the same arrays.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

__all__ = ["Split", "load_digits_split", "flip_labels"]


class Split(NamedTuple):
  """Train / validation / test arrays of one dataset.

  Attributes:
    X_train: ``f32[N, D]`` training inputs.
    y_train: ``i32[N]`` training labels.
    X_val: ``f32[V, D]`` validation inputs.
    y_val: ``i32[V]`` validation labels.
    X_test: ``f32[M, D]`` test inputs.
    y_test: ``i32[M]`` test labels.
    num_classes: number of classes.
  """

  X_train: np.ndarray
  y_train: np.ndarray
  X_val: np.ndarray
  y_val: np.ndarray
  X_test: np.ndarray
  y_test: np.ndarray
  num_classes: int


def _sizes(n: int, size: float | int) -> int:
  if isinstance(size, float) and 0.0 < size < 1.0:
    return int(round(size * n))
  size = int(size)
  if not 0 <= size <= n:
    raise ValueError(f"split size {size} out of range for {n} examples")
  return size


def load_digits_split(seed: int = 0, val_size: float | int = 300,
                      test_size: float | int = 0.2) -> Split:
  """scikit-learn's 8x8 digits (1797 images, 10 classes), split three ways.

  Pixels are scaled from ``0..16`` to ``[0, 1]``; ``X`` is ``float32 [N, 64]``
  (row-major 8x8 image), ``y`` is ``int32``. The split is a seeded random
  permutation; the training split is what is left after test and validation.

  Args:
    seed: seed of the permutation.
    val_size: validation size, a count or (if a float in ``(0, 1)``) a fraction
      of the whole dataset.
    test_size: test size, same convention.

  Returns:
    A :class:`Split`.
  """
  from sklearn.datasets import load_digits  # optional dependency ([demo])

  digits = load_digits()
  X = (np.asarray(digits.data, np.float32) / 16.0).astype(np.float32)
  y = np.asarray(digits.target, np.int32)
  n = len(y)
  n_test, n_val = _sizes(n, test_size), _sizes(n, val_size)
  if n_test + n_val >= n:
    raise ValueError("validation and test splits leave no training data")
  perm = np.random.default_rng(seed).permutation(n)
  test, val, train = np.split(perm, [n_test, n_test + n_val])
  return Split(X[train], y[train], X[val], y[val], X[test], y[test],
               int(y.max()) + 1)


def flip_labels(y, fraction: float, num_classes: int, seed: int = 0):
  """Flips exactly ``round(fraction * N)`` labels, each to a different class.

  The flipped examples are a seeded uniform sample without replacement; each
  gets a new label drawn uniformly from the ``num_classes - 1`` other classes.

  Args:
    y: ``int[N]`` labels.
    fraction: share of labels to flip, in ``[0, 1]``.
    num_classes: number of classes (>= 2).
    seed: seed.

  Returns:
    ``(noisy_y, flipped)``: ``int32[N]`` labels and a ``bool[N]`` mask, true
    where the label was changed.
  """
  y = np.asarray(y)
  if not 0.0 <= fraction <= 1.0:
    raise ValueError(f"fraction must be in [0, 1], got {fraction}")
  if num_classes < 2:
    raise ValueError("flipping labels needs at least 2 classes")
  n = y.shape[0]
  k = int(round(fraction * n))
  rng = np.random.default_rng(seed)
  idx = rng.choice(n, size=k, replace=False)
  # An offset in 1..C-1 (mod C) always lands on a different class, uniformly.
  offset = rng.integers(1, num_classes, size=k)
  noisy = y.astype(np.int32).copy()
  noisy[idx] = (noisy[idx] + offset) % num_classes
  flipped = np.zeros(n, bool)
  flipped[idx] = True
  return noisy, flipped
