"""The validation pass: ``grad L(wbar)`` at each evaluation point.

The target is the mean of ``val_loss(params)``, f32[V], or with
``num_targets=K`` the ``K`` weighted sums ``L_k(w) = sum_v W[k, v] l_v(w)``
(:func:`optax_shapley.class_targets`).  One forward and one backward pass per
evaluation point; with targets the ``K`` gradients come from one
``jax.vjp`` with the rows of ``W`` as cotangents, vectorised.  Where the
ghost rule needs them, the pass also keeps its Dense factors
(:func:`optax_shapley.capture.validation_factors`).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from optax_shapley import capture, checks


class ValidationPass(NamedTuple):
  """The validation gradients of one step, by evaluation point name.

  Attributes:
    grads: ``{evaluation name: grad L(wbar)}``, trees like the parameters
      (leaves ``[K, ...]`` with targets).
    calls: ``{evaluation name: {call key: (inputs, cotangent)}}``, the
      validation factors of each probed call (only for the ghost rule).
    finite: bool[], every validation loss and gradient is finite.
  """
  grads: dict
  calls: dict
  finite: jax.Array


def check_shape(val_loss, params) -> None:
  """Checks that ``val_loss(params)`` gives per-example losses (trace time).

  Raises:
    ValueError: ``val_loss(params)`` is not of shape ``[V]``.
  """
  out = jax.eval_shape(val_loss, params)
  if not hasattr(out, "shape") or len(out.shape) != 1:
    raise ValueError(
        "val_loss(params) must return per-example validation losses of shape "
        f"[V]; got {getattr(out, 'shape', type(out))}")


def target_weights(val_weights, num_targets, val_loss, params):
  """``val_weights`` as f32[K, V] after checking it against ``num_targets``
  and the shape of ``val_loss(params)``; ``None`` without targets.

  Raises:
    ValueError: ``val_weights`` given without ``num_targets``, missing
      with it, or not of shape ``[K, V]``.
  """
  if num_targets is None:
    if val_weights is not None:
      raise ValueError("val_weights needs with_shapley(..., num_targets=K)")
    return None
  if val_weights is None:
    raise ValueError(f"with_shapley(num_targets={num_targets}) needs "
                     "tx.update(..., val_weights=W) with W of shape [K, V]")
  (v,) = jax.eval_shape(val_loss, params).shape
  w = jnp.asarray(val_weights)
  if w.shape != (num_targets, v):
    raise ValueError(f"val_weights must have shape [num_targets, V] = "
                     f"[{num_targets}, {v}], got {list(w.shape)}")
  return w.astype(jnp.float32)


def _target_grads(val_loss, w_bar, weights):
  """``(losses f32[V], grads)``: the validation losses and ``grad L_k(w_bar)``
  for every row ``k`` of ``weights`` f32[K, V] (leaves ``[K, ...]``), from one
  forward pass and a vectorised ``jax.vjp``."""
  losses, vjp = jax.vjp(lambda p: val_loss(p).astype(jnp.float32), w_bar)
  return losses, jax.vmap(lambda w: vjp(w)[0])(weights)


def factor_shapes(val_loss, params) -> dict:
  """``{call key: (inputs, cotangent)}`` of the validation pass as shapes
  (``jax.eval_shape``: nothing runs), for planning the ghost rule."""
  shapes = jax.eval_shape(capture.validation_factors(val_loss), params)[2]
  return {pl.key: c for pl, c in zip(shapes.plans, shapes.calls)}


def run(val_loss, points: dict, weights, keep_factors: bool) -> ValidationPass:
  """The validation gradients at every point of ``points``
  (``{evaluation name: wbar}``); with ``weights`` f32[K, V] one per target;
  with ``keep_factors`` (the ghost rule, one target) also the factors."""
  mean = lambda p: jnp.mean(val_loss(p).astype(jnp.float32))
  grads, calls, finite = {}, {}, jnp.array(True)
  for name, w_bar in points.items():
    if keep_factors:
      losses, grads[name], vf = capture.validation_factors(val_loss)(w_bar)
      calls[name] = {pl.key: c for pl, c in zip(vf.plans, vf.calls)}
    elif weights is not None:
      losses, grads[name] = _target_grads(val_loss, w_bar, weights)
    else:
      losses, grads[name] = jax.value_and_grad(mean)(w_bar)
    # The metrics zero a direction's non-finite entries (a secant's 0/0);
    # a NaN/inf validation loss or gradient must not pass as a clean step.
    finite = finite & checks.all_finite((losses, grads[name]))
  return ValidationPass(grads, calls, finite)
