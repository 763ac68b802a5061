"""Small reference Flax models and per-example losses."""

from __future__ import annotations

from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

__all__ = ["MLP", "CNN", "CharTransformer", "cross_entropy",
           "token_cross_entropy"]


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


class CNN(nn.Module):
  """Small convnet for 8x8 grey images (scikit-learn digits).

  ``Conv(features[0], 3x3) -> relu -> Conv(features[1], 3x3, stride 2) ->
  relu -> flatten -> Dense(num_classes)``, ``"SAME"`` padding, so an 8x8
  image becomes ``4 x 4 x features[1]`` before the dense layer.

  Attributes:
    features: channels of the two convolutions.
    num_classes: number of outputs.
    image_shape: ``(H, W, C)`` of one image; flat inputs are reshaped to it.
  """

  features: Sequence[int] = (8, 16)
  num_classes: int = 10
  image_shape: Sequence[int] = (8, 8, 1)

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    """``x``: ``f32[B, 64]`` (row-major) or ``f32[B, 8, 8, 1]``.
    Returns logits ``f32[B, num_classes]``."""
    x = x.reshape((x.shape[0], *self.image_shape))
    x = nn.relu(nn.Conv(self.features[0], (3, 3))(x))
    x = nn.relu(nn.Conv(self.features[1], (3, 3), strides=(2, 2))(x))
    x = x.reshape((x.shape[0], -1))
    return nn.Dense(self.num_classes)(x)


class _Block(nn.Module):
  """Pre-LayerNorm decoder block: causal self-attention, then an MLP."""

  num_heads: int
  mlp_dim: int

  @nn.compact
  def __call__(self, x: jax.Array, mask: jax.Array) -> jax.Array:
    d = x.shape[-1]
    y = nn.LayerNorm()(x)
    y = nn.MultiHeadDotProductAttention(num_heads=self.num_heads,
                                        qkv_features=d)(y, y, mask=mask)
    x = x + y
    y = nn.LayerNorm()(x)
    y = nn.Dense(d)(nn.gelu(nn.Dense(self.mlp_dim)(y)))
    return x + y


class CharTransformer(nn.Module):
  """Decoder-only character transformer with a tied output layer.

  ``h = Embed(tokens) + pos[:T]``, then ``num_layers`` pre-LayerNorm blocks
  (causal multi-head self-attention with a residual, then ``Dense -> gelu ->
  Dense`` with a residual), a final LayerNorm, and logits
  ``embed.attend(h) = h E^T`` through the token embedding ``E``.  The
  positional embedding ``pos`` is a raw parameter ``f32[max_len, d_model]``
  sliced to the input length, so one set of parameters serves any
  ``T <= max_len`` (e.g. training on ``T = 16`` and validating on ``T = 12``).
  No dropout: the loss of an example depends on that example alone.

  Attributes:
    vocab_size: number of token ids.
    d_model: width of the residual stream.
    num_heads: attention heads (``d_model`` divisible by it).
    num_layers: number of blocks.
    mlp_dim: hidden width of the MLPs; ``None``: ``4 * d_model``.
    max_len: longest sequence the positional embedding covers.
    positions: ``"param"`` (the raw parameter above; its per-example values
      go through the forward-mode fallback, one extra forward and tangent
      pass of the model per step) or ``"embed"`` (an ``nn.Embed`` looked up
      with the position ids broadcast over the batch, so the capture's
      gather rule applies: the fast choice).
  """

  vocab_size: int
  d_model: int = 32
  num_heads: int = 2
  num_layers: int = 2
  mlp_dim: int | None = None
  max_len: int = 256
  positions: str = "param"

  @nn.compact
  def __call__(self, tokens: jax.Array) -> jax.Array:
    """``tokens``: ``int[B, T]``, ``T <= max_len``.
    Returns logits ``f32[B, T, vocab_size]``."""
    t = tokens.shape[-1]
    if t > self.max_len:
      raise ValueError(f"sequence length {t} exceeds max_len={self.max_len}")
    embed = nn.Embed(self.vocab_size, self.d_model,
                     embedding_init=nn.initializers.normal(self.d_model**-0.5))
    if self.positions == "param":
      pos = self.param("pos_embedding", nn.initializers.normal(0.02),
                       (self.max_len, self.d_model))[:t]
    elif self.positions == "embed":
      ids = jnp.broadcast_to(jnp.arange(t), tokens.shape)
      pos = nn.Embed(self.max_len, self.d_model, name="pos_embed",
                     embedding_init=nn.initializers.normal(0.02))(ids)
    else:
      raise ValueError(f"positions must be 'param' or 'embed', got {self.positions!r}")
    h = embed(tokens) + pos
    mask = nn.make_causal_mask(tokens)
    mlp_dim = 4 * self.d_model if self.mlp_dim is None else self.mlp_dim
    for _ in range(self.num_layers):
      h = _Block(self.num_heads, mlp_dim)(h, mask)
    return embed.attend(nn.LayerNorm()(h))


def cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
  """Per-example softmax cross-entropy with integer labels: ``f32[B]``."""
  return optax.softmax_cross_entropy_with_integer_labels(logits, labels)


def token_cross_entropy(logits: jax.Array, targets: jax.Array,
                        mask: jax.Array | None = None) -> jax.Array:
  """Per-sequence next-token loss: ``f32[B]``.

  Args:
    logits: ``f[B, T, V]``.
    targets: ``int[B, T]``, the next token at every position.
    mask: optional ``f[B, T]`` (or bool), 1 for positions that count.

  Returns:
    ``f32[B]``: for each sequence, the mean over its valid positions of the
    softmax cross-entropy (0 for a sequence without valid positions).
  """
  ce = optax.softmax_cross_entropy_with_integer_labels(logits, targets)
  if mask is None:
    return jnp.mean(ce, axis=-1)
  mask = jnp.asarray(mask, ce.dtype)
  return jnp.sum(ce * mask, axis=-1) / jnp.maximum(jnp.sum(mask, axis=-1), 1.0)
