"""Small reference Flax models and per-example losses."""

from __future__ import annotations

from typing import Sequence

import flax.linen as nn
import jax
import optax

__all__ = ["MLP", "cross_entropy"]


class MLP(nn.Module):
  """Multi-layer perceptron: ``Dense -> relu`` for every hidden width, then a
  final ``Dense`` producing logits.

  Attributes:
    features: layer widths, hidden ones first, the last one the number of
      outputs (classes), e.g. ``(64, 10)``.
  """

  features: Sequence[int]

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    x = x.reshape((x.shape[0], -1))
    for width in self.features[:-1]:
      x = nn.relu(nn.Dense(width)(x))
    return nn.Dense(self.features[-1])(x)


def cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
  """Per-example softmax cross-entropy with integer labels: ``f32[B]``."""
  return optax.softmax_cross_entropy_with_integer_labels(logits, labels)
