"""Bundled datasets for examples, experiments and tests.

Everything here is plain numpy, seeded and deterministic: the same arguments
always give the same arrays.
"""

from __future__ import annotations

import os
import sysconfig
from typing import NamedTuple, Sequence

import numpy as np

__all__ = [
    "Split",
    "TextSplit",
    "TEXT_FILES",
    "VOCAB",
    "UNKNOWN_ID",
    "encode_text",
    "decode_text",
    "load_digits_split",
    "load_tabular_split",
    "TABULAR_DATASETS",
    "noise_inputs",
    "load_text_split",
    "flip_labels",
]


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


def _split_indices(n: int, seed: int, val_size, test_size):
  """``(train, val, test)`` index arrays of a seeded permutation of ``n``."""
  n_test, n_val = _sizes(n, test_size), _sizes(n, val_size)
  if n_test + n_val >= n:
    raise ValueError("validation and test splits leave no training data")
  perm = np.random.default_rng(seed).permutation(n)
  test, val, train = np.split(perm, [n_test, n_test + n_val])
  return train, val, test


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
  train, val, test = _split_indices(len(y), seed, val_size, test_size)
  return Split(X[train], y[train], X[val], y[val], X[test], y[test],
               int(y.max()) + 1)


#: Bundled scikit-learn classification datasets for :func:`load_tabular_split`.
TABULAR_DATASETS = ("digits", "breast_cancer", "wine")


def load_tabular_split(name: str, seed: int = 0,
                       val_size: float | int = 0.2,
                       test_size: float | int = 0.2) -> Split:
  """A bundled scikit-learn dataset, split three ways, inputs standardised.

  ``"digits"`` (1797 8x8 images, 10 classes) is :func:`load_digits_split`
  (pixels scaled to ``[0, 1]``); ``"breast_cancer"`` (569 x 30, 2 classes)
  and ``"wine"`` (178 x 13, 3 classes) are standardised per feature with the
  *training* split's mean and standard deviation.

  Args:
    name: one of :data:`TABULAR_DATASETS`.
    seed: seed of the permutation.
    val_size, test_size: a count, or a fraction of the whole dataset if a
      float in ``(0, 1)``.

  Returns:
    A :class:`Split` (``float32`` inputs, ``int32`` labels).

  Raises:
    ValueError: unknown ``name`` or splits that leave no training data.
  """
  if name == "digits":
    return load_digits_split(seed, val_size=val_size, test_size=test_size)
  if name not in TABULAR_DATASETS:
    raise ValueError(f"unknown dataset {name!r}; choose from {TABULAR_DATASETS}")
  from sklearn import datasets  # optional dependency ([demo])

  raw = getattr(datasets, f"load_{name}")()
  X = np.asarray(raw.data, np.float64)
  y = np.asarray(raw.target, np.int32)
  train, val, test = _split_indices(len(y), seed, val_size, test_size)
  mean, std = X[train].mean(0), X[train].std(0)
  X = ((X - mean) / np.where(std > 0, std, 1.0)).astype(np.float32)
  return Split(X[train], y[train], X[val], y[val], X[test], y[test],
               int(y.max()) + 1)


def noise_inputs(X, fraction: float, scale: float = 1.0, seed: int = 0):
  """Replaces the inputs of ``round(fraction * N)`` examples by noise.

  The chosen rows (a seeded uniform sample) become Gaussian noise with each
  feature's mean and ``scale`` times its standard deviation over ``X``: the
  label stays, the input no longer carries it.

  Args:
    X: ``f[N, ...]`` inputs.
    fraction: share of rows to corrupt, in ``[0, 1]``.
    scale: noise standard deviation in units of each feature's.
    seed: seed.

  Returns:
    ``(noisy_X, corrupted)``: ``float32`` inputs and a ``bool[N]`` mask.
  """
  X = np.asarray(X, np.float32)
  if not 0.0 <= fraction <= 1.0:
    raise ValueError(f"fraction must be in [0, 1], got {fraction}")
  n = X.shape[0]
  k = int(round(fraction * n))
  rng = np.random.default_rng(seed)
  idx = rng.choice(n, size=k, replace=False)
  noisy = X.copy()
  noisy[idx] = (X.mean(0) + scale * X.std(0)
                * rng.standard_normal((k,) + X.shape[1:])).astype(np.float32)
  corrupted = np.zeros(n, bool)
  corrupted[idx] = True
  return noisy, corrupted


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


# ---------------------------------------------------------------------------
# Character-level text from the Python standard library's own sources

#: Standard-library modules read by :func:`load_text_split`, in this order.
#: Plain ``.py`` files present in Python 3.11 and 3.12 (and later); their exact
#: text differs slightly between Python versions, so the arrays do too.
TEXT_FILES = ("bisect.py", "colorsys.py", "heapq.py", "string.py",
              "textwrap.py")

#: Characters with their own id: newline, then printable ASCII ``' '..'~'``.
#: Character ``VOCAB[k]`` has id ``k + 1``; id 0 (:data:`UNKNOWN_ID`) is every
#: other character (tab, non-ASCII).  The vocabulary has 97 ids.
VOCAB = "\n" + "".join(chr(c) for c in range(32, 127))
UNKNOWN_ID = 0


class TextSplit(NamedTuple):
  """Train / validation / test sequences for next-character prediction.

  ``tokens[n, s]`` is character ``s`` of sequence ``n`` and
  ``targets[n, s] = tokens`` shifted by one: the character that follows it.

  Attributes:
    tokens_train: ``i32[N, T]`` training inputs, ``T = seq_len``.
    targets_train: ``i32[N, T]`` training next-character targets.
    mask_train: ``f32[N, T]``, 1 for real tokens (all ones here: every
      sequence is a full cut; kept so losses written for padded data apply).
    tokens_val: ``i32[V, T']`` validation inputs, ``T' = val_seq_len``.
    targets_val: ``i32[V, T']`` validation targets.
    mask_val: ``f32[V, T']``, all ones.
    tokens_test: ``i32[M, T']`` test inputs (length ``val_seq_len``).
    targets_test: ``i32[M, T']`` test targets.
    mask_test: ``f32[M, T']``, all ones.
    vocab_size: number of ids, ``len(VOCAB) + 1`` (97).
  """

  tokens_train: np.ndarray
  targets_train: np.ndarray
  mask_train: np.ndarray
  tokens_val: np.ndarray
  targets_val: np.ndarray
  mask_val: np.ndarray
  tokens_test: np.ndarray
  targets_test: np.ndarray
  mask_test: np.ndarray
  vocab_size: int


_CHAR_TO_ID = {c: k + 1 for k, c in enumerate(VOCAB)}


def encode_text(text: str) -> np.ndarray:
  """Characters to ids (see :data:`VOCAB`): ``i32[len(text)]``."""
  return np.fromiter((_CHAR_TO_ID.get(c, UNKNOWN_ID) for c in text),
                     dtype=np.int32, count=len(text))


def decode_text(ids) -> str:
  """Ids back to characters; :data:`UNKNOWN_ID` becomes ``'?'``."""
  return "".join(VOCAB[i - 1] if 0 < i <= len(VOCAB) else "?"
                 for i in np.asarray(ids).reshape(-1).tolist())


def _read_stdlib(files: Sequence[str]) -> str:
  root = sysconfig.get_paths()["stdlib"]
  texts = []
  for name in files:
    with open(os.path.join(root, name), encoding="utf-8") as f:
      texts.append(f.read())
  return "".join(texts)


def load_text_split(seed: int = 0, seq_len: int = 32,
                    val_seq_len: int | None = None,
                    val_size: float | int = 0.1,
                    test_size: float | int = 0.1,
                    files: Sequence[str] = TEXT_FILES) -> TextSplit:
  """Character-level language-modelling data from Python's own stdlib sources.

  The modules ``files`` (default :data:`TEXT_FILES`, about 62k characters)
  are read from ``sysconfig.get_paths()["stdlib"]``, concatenated in the
  given order and mapped to ids with :func:`encode_text` (97 ids: unknown,
  newline, printable ASCII).  The id stream is cut into consecutive,
  non-overlapping blocks of ``max(seq_len, val_seq_len) + 1`` characters (the
  remainder is dropped); the blocks are shuffled by a seeded permutation and
  dealt to test, validation and training, in that order.  A training block
  gives ``tokens = block[:seq_len]``, ``targets = block[1:seq_len + 1]``;
  validation and test blocks do the same with ``val_seq_len``.  No character
  is shared between splits.

  Deterministic for a given Python installation: the same arguments give the
  same arrays.  The sources differ slightly between Python versions (3.11,
  3.12, ...), so the arrays do too.

  Args:
    seed: seed of the block permutation.
    seq_len: ``T``, training sequence length.
    val_seq_len: validation and test sequence length; ``None``: ``seq_len``.
    val_size: number of validation sequences, a count or (a float in
      ``(0, 1)``) a fraction of all blocks.
    test_size: number of test sequences, same convention.
    files: standard-library file names to read.

  Returns:
    A :class:`TextSplit`.

  Raises:
    ValueError: a non-positive length, or splits that leave no training data.
  """
  val_seq_len = seq_len if val_seq_len is None else int(val_seq_len)
  seq_len = int(seq_len)
  if seq_len < 1 or val_seq_len < 1:
    raise ValueError(f"sequence lengths must be >= 1, got {seq_len}, {val_seq_len}")
  ids = encode_text(_read_stdlib(files))
  block = max(seq_len, val_seq_len) + 1
  n = len(ids) // block
  blocks = ids[: n * block].reshape(n, block)
  n_test, n_val = _sizes(n, test_size), _sizes(n, val_size)
  if n_test + n_val >= n:
    raise ValueError("validation and test splits leave no training data")
  perm = np.random.default_rng(seed).permutation(n)
  test, val, train = np.split(perm, [n_test, n_test + n_val])

  def cut(rows, length):
    b = blocks[rows]
    return (np.ascontiguousarray(b[:, :length]),
            np.ascontiguousarray(b[:, 1:length + 1]),
            np.ones((len(rows), length), np.float32))

  return TextSplit(*cut(train, seq_len), *cut(val, val_seq_len),
                   *cut(test, val_seq_len), len(VOCAB) + 1)
