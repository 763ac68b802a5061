"""Validation targets: weights over the validation examples, one row each.

A target is a weighted validation loss ``L_k(w) = sum_v W[k, v] l_v(w)``;
``with_shapley(..., num_targets=K)`` credits every training example against
each of the ``K`` rows of ``W`` in the same run
(``tx.update(..., val_weights=W)``).  Per-class targets separate "helps the
class it claims to be" from "hurts every other class": a mislabelled example
lowers the loss of its wrong class but raises that of its true one, which
the overall mean can average away.
"""

from __future__ import annotations

import numpy as np

__all__ = ["class_targets", "mean_target"]


def class_targets(labels, num_classes: int) -> np.ndarray:
  """One target per class: the mean validation loss over that class.

  Args:
    labels: int[V], the validation examples' classes in ``[0, num_classes)``.
    num_classes: ``K``.

  Returns:
    ``W`` f32[K, V] with ``W[k, v] = 1 / n_k`` where ``labels[v] == k``
    (``n_k`` the class's validation count) and 0 elsewhere; each row sums
    to 1.

  Raises:
    ValueError: labels not one-dimensional integers, a label outside
      ``[0, num_classes)``, or a class with no validation example (its
      target would be empty).

  Example:
    Two classes among four validation examples; row ``k`` averages the
    losses of class ``k``:

    >>> import optax_shapley as oxs
    >>> W = oxs.class_targets([0, 1, 1, 0], num_classes=2)
    >>> print(W)
    [[0.5 0.  0.  0.5]
     [0.  0.5 0.5 0. ]]
    >>> print(W.dtype, W.sum(axis=1))
    float32 [1. 1.]
  """
  labels = np.asarray(labels)
  if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
    raise ValueError(f"labels must be int[V], got {labels.dtype}{list(labels.shape)}")
  if num_classes < 1:
    raise ValueError(f"num_classes must be >= 1, got {num_classes}")
  bad = labels[(labels < 0) | (labels >= num_classes)]
  if bad.size:
    raise ValueError(f"label {int(bad[0])} is outside [0, {num_classes})")
  onehot = labels[None, :] == np.arange(num_classes)[:, None]      # [K, V]
  counts = onehot.sum(axis=1)
  empty = np.flatnonzero(counts == 0)
  if empty.size:
    raise ValueError(
        f"class(es) {empty.tolist()} have no validation example, so their "
        "targets would be empty; use a larger or stratified validation set")
  return (onehot / counts[:, None]).astype(np.float32)


def mean_target(num_val: int) -> np.ndarray:
  """The overall mean as one target: ``W`` f32[1, V] of ``1/V``.

  Args:
    num_val: ``V``, the number of validation examples.

  Returns:
    ``W`` f32[1, V], every entry ``1 / V``.

  Raises:
    ValueError: ``num_val < 1``.

  Example:
    The overall mean and one target per class, ``1 + C`` rows for
    ``with_shapley(..., num_targets=1 + C)`` and ``tx.update(...,
    val_weights=W)``:

    >>> import numpy as np
    >>> import optax_shapley as oxs
    >>> print(oxs.mean_target(4))
    [[0.25 0.25 0.25 0.25]]
    >>> y_val = np.array([0, 1, 2, 1])
    >>> W = np.concatenate([oxs.mean_target(4), oxs.class_targets(y_val, 3)])
    >>> W.shape
    (4, 4)
  """
  if num_val < 1:
    raise ValueError(f"num_val must be >= 1, got {num_val}")
  return np.full((1, num_val), 1.0 / num_val, np.float32)
