"""Small models and seeded data shared by the tests."""

import types

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax


class TanhMLP(nn.Module):
  """``Dense(16) -> tanh -> Dense(classes)``: every parameter in a Dense."""
  classes: int = 3

  @nn.compact
  def __call__(self, x):
    return nn.Dense(self.classes)(jnp.tanh(nn.Dense(16)(x)))


class DenseGain(nn.Module):
  """Dense layers (ghost factors) plus a raw parameter (jvp fallback)."""
  classes: int = 3

  @nn.compact
  def __call__(self, x):
    h = jnp.tanh(nn.Dense(16)(x))
    gain = self.param("gain", nn.initializers.normal(1.0), (16,))
    return nn.Dense(self.classes)(h * gain)


def losses(model, xv, yv):
  """``(per_example_loss(params, x, y) -> f32[B], val_loss(params) ->
  f32[V])``: softmax cross-entropy of ``model`` against integer labels."""
  def per_example_loss(p, a, b):
    return optax.softmax_cross_entropy_with_integer_labels(
        model.apply({"params": p}, a), b)

  return per_example_loss, lambda p: per_example_loss(p, xv, yv)


def problem(model, seed, x_shape, num_val, classes=3):
  """Seeded inputs ``X`` (``x_shape``, features last), labels ``Y``, a
  validation set of ``num_val``, ``PARAMS`` and the two losses."""
  k = jax.random.split(jax.random.key(seed), 4)
  x = jax.random.normal(k[0], x_shape)
  y = jax.random.randint(k[1], x_shape[:-1], 0, classes)
  xv = jax.random.normal(k[2], (num_val, x_shape[-1]))
  yv = jnp.arange(num_val) % classes
  params = model.init(k[3], x.reshape((-1, x_shape[-1]))[:2])["params"]
  per_example_loss, val_loss = losses(model, xv, yv)
  return types.SimpleNamespace(
      X=x, Y=y, XV=xv, YV=yv, PARAMS=params, per_example_loss=per_example_loss,
      val_loss=val_loss)
