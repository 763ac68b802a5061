"""The bundled problems of the experiments: a model, its data and its losses.

One builder for the fidelity report, the bench and the studies under
``docs/experiments``: an MLP and a CNN on scikit-learn's digits, and a
character transformer on the Python standard library's own source
(:mod:`optax_shapley.experiments.data`), at sizes given by :class:`Sizes`.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from optax_shapley.experiments import data, models

#: The bundled models.
MODELS = ("mlp", "cnn", "transformer")


class Sizes(NamedTuple):
  """The sizes of the bundled models and their validation sets.

  Attributes:
    mlp_hidden: hidden widths of the MLP.
    cnn_features: channels of the CNN's two convolutions.
    d_model, num_heads: the transformer's width and heads.
    seq_len: training sequence length; val_seq_len: validation (``None``:
      the same).
    max_len: longest sequence the positional embedding covers.
    positions: ``"param"`` or ``"embed"`` (:class:`models.CharTransformer`).
    val_images, val_sequences: default validation sizes.
  """
  mlp_hidden: tuple[int, ...] = (32,)
  cnn_features: tuple[int, int] = (8, 16)
  d_model: int = 32
  num_heads: int = 2
  seq_len: int = 16
  val_seq_len: int | None = 12
  max_len: int = 32
  positions: str = "param"
  val_images: int = 100
  val_sequences: int = 32


@dataclasses.dataclass(frozen=True)
class Problem:
  """A model, its data and its losses.

  Attributes:
    name: one of :data:`MODELS`.
    description: for reports.
    params: the initial parameters.
    per_example_loss: ``(params, *inputs) -> f32[B]``.
    inputs: training arrays with the example on axis 0 (``N`` rows).
    val_inputs: validation arrays (``V`` rows).
  """
  name: str
  description: str
  params: Any
  per_example_loss: Callable[..., jax.Array]
  inputs: tuple[np.ndarray, ...]
  val_inputs: tuple[jax.Array, ...]

  @property
  def num_examples(self) -> int:
    return len(self.inputs[0])

  def val_loss(self, params) -> jax.Array:
    """Per-example validation losses, f32[V]."""
    return self.per_example_loss(params, *self.val_inputs)

  def with_val_size(self, num_val: int) -> Problem:
    """The problem with its first ``num_val`` validation examples."""
    return dataclasses.replace(
        self, val_inputs=tuple(x[:num_val] for x in self.val_inputs))


def make(name: str, seed: int = 0, val_size: int | None = None,
         sizes: Sizes = Sizes()) -> Problem:
  """The bundled problem ``name`` (:data:`MODELS`), initialised from ``seed``.

  Raises:
    ValueError: an unknown name.
  """
  key = jax.random.key(seed)
  if name in ("mlp", "cnn"):
    split = data.load_digits_split(seed=seed,
                                   val_size=val_size or sizes.val_images)
    if name == "mlp":
      model = models.MLP(features=tuple(sizes.mlp_hidden) + (split.num_classes,))
      widths = "-".join(str(w) for w in (64,) + model.features)
      desc = f"MLP {widths} on scikit-learn digits"
    else:
      f0, f1 = sizes.cnn_features
      model = models.CNN(features=(f0, f1), num_classes=split.num_classes)
      desc = (f"CNN (conv 3x3x{f0}, conv 3x3x{f1} stride 2, dense) on "
              "scikit-learn digits")
    params = model.init(key, split.X_train[:1])["params"]

    def pel(p, x, y):
      return models.cross_entropy(model.apply({"params": p}, x), y)

    val = (jnp.asarray(split.X_val), jnp.asarray(split.y_val))
    return Problem(name, f"{desc}, {len(split.y_val)} validation images",
                   params, pel, (split.X_train, split.y_train), val)
  if name == "transformer":
    val_len = sizes.val_seq_len or sizes.seq_len
    split = data.load_text_split(seed=seed, seq_len=sizes.seq_len,
                                 val_seq_len=val_len,
                                 val_size=val_size or sizes.val_sequences)
    model = models.CharTransformer(
        vocab_size=split.vocab_size, d_model=sizes.d_model,
        num_heads=sizes.num_heads, max_len=sizes.max_len,
        positions=sizes.positions)
    params = model.init(key, split.tokens_train[:1])["params"]

    def pel(p, tok, tgt):
      return models.token_cross_entropy(model.apply({"params": p}, tok), tgt)

    val = (jnp.asarray(split.tokens_val), jnp.asarray(split.targets_val))
    return Problem(
        name, f"{model.num_layers}-layer character transformer "
        f"(d={sizes.d_model}, {sizes.num_heads} heads, tied embedding, "
        f"learned positions) on stdlib source, train T={sizes.seq_len}, "
        f"{len(split.tokens_val)} validation sequences of T={val_len}",
        params, pel, (split.tokens_train, split.targets_train), val)
  raise ValueError(f"unknown model {name!r}; choose from {MODELS}")
