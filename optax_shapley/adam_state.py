r"""Closed forms that depend on ``optax.scale_by_adam``'s state.

Adam (Kingma & Ba 2015, Algorithm 1) as ``optax.scale_by_adam`` computes it,
with ``t = count + 1`` after the step:

.. math::

    \mu' = \beta_1 \mu + (1 - \beta_1) g, \qquad
    \nu' = \beta_2 \nu + (1 - \beta_2) g^2, \qquad
    u(g) = -\eta \, \frac{\mu' / (1 - \beta_1^t)}
                        {\sqrt{\nu' / (1 - \beta_2^t)} + \epsilon}

Everything here reads the moments ``mu``, ``nu`` and ``count`` of that
state: the paper's ``fixed_state`` metric, the secant metric in closed form,
and the batch gradient read back from the first moment after the update.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from optax_shapley import metrics


def find_adam_state(state) -> optax.ScaleByAdamState:
  """The one ``optax.ScaleByAdamState`` inside an optimizer state.

  Found with ``optax.tree_utils.tree_get_all_with_path``, so it is found
  inside ``optax.chain``, ``optax.inject_hyperparams`` or
  ``optax.masked`` alike.

  Raises:
    ValueError: the state holds none (the optimizer is not Adam-like), or
      several (e.g. two Adam optimizers in an ``optax.multi_transform``):
      which moments a metric should read is then ambiguous, and guessing the
      first would silently attribute one partition with another's moments.
  """
  found = [(path, s) for path, s in optax.tree_utils.tree_get_all_with_path(
      state, "ScaleByAdamState") if isinstance(s, optax.ScaleByAdamState)]
  if not found:
    raise ValueError(
        "this metric needs Adam's moments, but the optimizer state holds no "
        "optax.ScaleByAdamState; use metric='secant' or 'linearized', which "
        "work for any optax optimizer.")
  if len(found) > 1:
    where = "; ".join("".join(map(str, path)) for path, _ in found)
    raise ValueError(
        f"the optimizer state holds {len(found)} optax.ScaleByAdamState "
        f"(at {where}), e.g. one per partition of an optax.multi_transform: "
        "which moments this metric should read is ambiguous. Use "
        "metric='secant' or 'linearized' with oxs.with_shapley, which read "
        "the optimizer's update instead of its state.")
  return found[0][1]


def fixed_state_scale(like, adam_state, *, learning_rate, b1, b2, eps,
                      previous=False, prev_state=None):
  r"""The paper's Adam-aware metric with the moments frozen, ``d = S * v``.

  Ding, Zhang, Wang, Hu (2026), "In-Run Data Shapley for Adam Optimizer":
  only the fresh gradient's share of the first moment varies with the
  coalition, so elementwise:

  .. math::

      S = \eta_t \, \frac{1 - \beta_1}{1 - \beta_1^t} \,
          \frac{1}{\sqrt{\hat v} + \epsilon}, \qquad
      \hat v = \frac{\nu_t}{1 - \beta_2^t}

  with ``nu_t`` and ``t`` from ``adam_state``, the state *after* the step
  (``previous=False``), or ``nu_{t-1}, t-1`` from ``prev_state``
  (``previous=True``; the paper's Taylor base point, ``vhat_0 = 0``).
  Returns a tree like ``like``, float32.
  """
  t = adam_state.count.astype(jnp.float32)
  c1 = (1.0 - b1) / (1.0 - b1 ** t)
  if previous:
    nu, tv = prev_state.nu, prev_state.count.astype(jnp.float32)
  else:
    nu, tv = adam_state.nu, t
  bc2 = 1.0 - b2 ** tv

  def scale(n):
    vhat = jnp.where(bc2 > 0, n / jnp.where(bc2 > 0, bc2, 1.0), 0.0)
    return learning_rate * c1 / (jnp.sqrt(vhat) + eps)

  return jax.tree.map(lambda _, n: scale(n), like, nu)


class FrozenStep(NamedTuple):
  r"""``optax.adam``'s step with the moments before it frozen, as a function
  of the gradient: per entry

  .. math::

      u(g) = -\eta \, \frac{A + a g}{\sqrt{V + b g^2} + \epsilon}, \qquad
      A = \frac{\beta_1 \mu}{c_1}, \; a = \frac{1 - \beta_1}{c_1}, \;
      V = \frac{\beta_2 \nu}{c_2}, \; b = \frac{1 - \beta_2}{c_2}

  with ``c_k = 1 - beta_k^t``, ``t = count + 1``.  ``big_a`` and ``vh0``
  are trees like the moments (float32); ``a`` and ``b`` are f32[].
  """
  big_a: Any
  a: jax.Array
  vh0: Any
  b: jax.Array


def frozen_step(adam_state, *, b1, b2) -> FrozenStep:
  """The :class:`FrozenStep` of ``adam_state`` (the state before the step)."""
  t = adam_state.count.astype(jnp.float32) + 1.0
  c1, c2 = 1.0 - b1 ** t, 1.0 - b2 ** t
  return FrozenStep(
      big_a=jax.tree.map(lambda m: b1 * m.astype(jnp.float32) / c1,
                         adam_state.mu),
      a=(1.0 - b1) / c1,
      vh0=jax.tree.map(lambda n: b2 * n.astype(jnp.float32) / c2,
                       adam_state.nu),
      b=(1.0 - b2) / c2)


def adam_secant_scale(g, adam_state, *, learning_rate, b1, b2, eps):
  r"""``S = -(u(g) - u(0)) / g`` of ``optax.adam`` in closed form, elementwise.

  With the moments ``mu``, ``nu`` and ``count`` of ``adam_state`` (the state
  *before* this step), ``t = count + 1``, ``c1 = 1 - b1^t``,
  ``c2 = 1 - b2^t``, ``A = b1 mu / c1``, ``a = (1 - b1) / c1``,
  ``vhat(g) = (b2 nu + (1 - b2) g^2) / c2``, ``s = sqrt(vhat(g))``,
  ``s0 = sqrt(vhat(0))``, ``D = s + eps`` and ``D0 = s0 + eps``, Adam's step
  is ``u(g) = -eta (A + a g) / D`` and, using
  ``D - D0 = (1 - b2) g^2 / (c2 (s + s0))``:

  .. math::

      S = \eta \left( \frac{a}{D}
          - \frac{A (1 - \beta_2)\, g}{c_2 (s + s_0)\, D\, D_0} \right)

  The same quantity as :func:`optax_shapley.metrics.secant_scale` without
  its cancellation: it is finite at ``g = 0`` (where it is the derivative
  ``eta a / D0``), needs neither ``u(0)`` nor a ``jax.jvp``, and is one
  elementwise expression per leaf (XLA's CPU backend still splits its square
  roots and divisions into a few loops).  Weight decay (AdamW) does not
  depend on ``g`` and cancels.  Returns a tree like ``g``, float32.
  """
  step = frozen_step(adam_state, b1=b1, b2=b2)

  def one(gi, big_a, vh0):
    gi = gi.astype(jnp.float32)
    s0 = jnp.sqrt(vh0)
    s = jnp.sqrt(vh0 + step.b * gi * gi)
    d, d0 = s + eps, s0 + eps
    both = s + s0
    cross = jnp.where(both > 0, big_a * step.b * gi
                      / (jnp.where(both > 0, both, 1.0) * d * d0), 0.0)
    return learning_rate * (step.a / d - cross)

  return jax.tree.map(one, g, step.big_a, step.vh0)


def adam_ray_nonlinearity(g, adam_state, weight, *, learning_rate, b1, b2,
                          eps) -> jax.Array:
  r""":func:`optax_shapley.metrics.ray_nonlinearity` of ``optax.adam``'s
  step in closed form, one elementwise pass per leaf: no ``jax.jvp`` of the
  update, no ``u(0)``.

  With ``A``, ``a``, ``V``, ``b`` of :class:`FrozenStep`, ``R(s) =
  sqrt(V + b s^2 g^2)`` and ``D = R + eps``, the step along the ray is
  ``u(s g) = -eta (A + a s g) / D(s)``, so

  .. math::

      J(g/2)\, g = \frac{d}{ds} u(s g)\Big|_{s = 1/2}
        = -\eta \left(\frac{a g}{D} - \frac{(A + a g / 2)\, b g^2 / 2}
                                         {R\, D^2}\right)

  and ``u(g) - u(0) = -S g`` with ``S`` of :func:`adam_secant_scale`.
  Entries with ``g = 0`` count as 0, as there.  Returns f32[].
  """
  step = frozen_step(adam_state, b1=b1, b2=b2)

  def deriv(gi, big_a, vh0):
    gi = gi.astype(jnp.float32)
    r = jnp.sqrt(vh0 + step.b * gi * gi / 4)
    d = r + eps
    bend = jnp.where(r > 0, (big_a + step.a * gi / 2) * step.b * gi * gi / 2
                     / (jnp.where(r > 0, r, 1.0) * d * d), 0.0)
    return -learning_rate * (step.a * gi / d - bend)

  scale = adam_secant_scale(g, adam_state, learning_rate=learning_rate,
                            b1=b1, b2=b2, eps=eps)
  change = jax.tree.map(lambda sc, gi: -sc * gi.astype(jnp.float32), scale, g)
  return metrics.nonlinearity_ratio(
      jax.tree.map(deriv, g, step.big_a, step.vh0), change, g, weight)


def adam_gradient(prev_state: optax.ScaleByAdamState,
                  new_state: optax.ScaleByAdamState, *, b1: float) -> Any:
  r"""The gradient ``g`` that Adam folded into its first moment this step.

  ``optax.scale_by_adam`` sets ``mu' = b1 mu + (1 - b1) g``, so
  elementwise:

  .. math::

      g = \frac{\mu' - \beta_1 \mu}{1 - \beta_1}

  up to a rounding error of about ``2^-24 (|mu'| + b1 |mu|) / (1 - b1)``.
  Both moments are arguments and outputs of the training step, alive for
  all of it, so an expression of ``g`` written this way is fused into its
  users instead of keeping a gradient-sized buffer alive from the train
  backward pass through the validation pass.  Where ``|mu| >> |g|`` the
  relative error of ``g`` is large (the digits were lost when ``mu'`` was
  rounded), but :func:`adam_secant_scale` reads ``g`` only through
  ``(1 - b2) g^2`` next to ``b2 nu`` and a cross term of relative size about
  ``(1 - b2) mu g / vhat``, both then small.  Returns a tree like ``mu``,
  float32.
  """
  inv = 1.0 / (1.0 - b1)
  return jax.tree.map(
      lambda m1, m0: (m1.astype(jnp.float32) - b1 * m0.astype(jnp.float32)) * inv,
      new_state.mu, prev_state.mu)


def adam_gradient_dot(directions, prev_state: optax.ScaleByAdamState,
                      new_state: optax.ScaleByAdamState, *, b1: float) -> Any:
  """``g . d`` per leaf from the moments, without keeping ``g``, and a bound
  on its rounding error.

  With :func:`adam_gradient`'s ``g = (mu' - b1 mu) / (1 - b1)``::

      g . d   ~= (mu' . d - b1 mu . d) / (1 - b1)
      |error| <= 2^-20 |d|_2 (|mu'|_2 + b1 |mu|_2) / (1 - b1)

  ``mu'`` was rounded to float32 after ``(1 - b1) g`` was added to
  ``b1 mu``, so where ``|mu| >> |g|`` (late in training, ``b1`` near 1) the
  digits of ``g`` are gone before this function sees them: the error
  relative to ``|g| |d|`` grows like ``2^-24 |mu| / ((1 - b1) |g|)``.  The
  bound is the sum of the terms' rounding errors (a few times
  ``2^-24 |d_j| (|mu'_j| + b1 |mu_j|)``, with room for the summation), made
  an upper bound by Cauchy-Schwarz so that every reduction reads only
  ``d`` and the moments: XLA then keeps no product of them in memory.
  ``directions`` has leaves ``[E, *leaf.shape]`` (one direction per row);
  returns two trees of f32[E]: the dot products and their error bounds.
  """
  inv = 1.0 / (1.0 - b1)

  def one(d, m1, m0):
    axes = tuple(range(1, d.ndim))
    d, m1, m0 = (x.astype(jnp.float32) for x in (d, m1, m0))
    dot = (jnp.sum(d * m1, axis=axes) - b1 * jnp.sum(d * m0, axis=axes)) * inv
    norm = lambda x, ax: jnp.sqrt(jnp.sum(x * x, axis=ax))
    err = norm(d, axes) * (norm(m1, None) + b1 * norm(m0, None))
    return dot, err * (inv * 2.0 ** -20)

  pairs = jax.tree.map(one, directions, new_state.mu, prev_state.mu)
  is_pair = lambda x: isinstance(x, tuple)
  return (jax.tree.map(lambda p: p[0], pairs, is_leaf=is_pair),
          jax.tree.map(lambda p: p[1], pairs, is_leaf=is_pair))


def float32_moments(inner_state, grads) -> bool:
  """Whether the state holds one Adam state whose first moment is float32
  and shaped like ``grads`` (trace time): :func:`adam_gradient` then loses
  only the digits of ``g`` that float32 ``mu'`` lost (a bfloat16 moment
  would lose most)."""
  try:
    mu = find_adam_state(inner_state).mu
  except ValueError:
    return False
  if jax.tree.structure(mu) != jax.tree.structure(grads):
    return False
  return all(m.dtype == jnp.float32 and m.shape == g.shape
             for m, g in zip(jax.tree.leaves(mu), jax.tree.leaves(grads)))


def flat_update(adam_state, *, learning_rate, b1, b2, eps):
  r"""``optax.adam``'s step with its moments frozen, on one flat vector.

  The :class:`FrozenStep` of ``adam_state`` (the state before the step)
  with its trees raveled and joined leaf by leaf (``jax.tree.leaves``
  order) into ``f32[P]``: one elementwise expression for every parameter, so a computation that
  evaluates the update many times (the per-coordinate games of
  :func:`optax_shapley.metrics.prefix_normal_values`) holds one copy of it
  rather than one per leaf.  AdamW's weight decay does not depend on ``g``
  and is left out: it cancels in every difference of updates.

  Returns:
    ``(flatten, update)``: ``flatten`` maps a tree like the moments, with
    optional leading axes common to its leaves, to ``f32[..., P]``;
    ``update`` maps ``f32[P]`` to ``f32[P]``.
  """
  dims = jax.tree.leaves(jax.tree.map(jnp.ndim, adam_state.mu))

  def flatten(tree):
    leaves = [x.astype(jnp.float32) for x in jax.tree.leaves(tree)]
    lead = leaves[0].shape[:leaves[0].ndim - dims[0]]
    return jnp.concatenate([x.reshape(lead + (-1,)) for x in leaves], axis=-1)

  step = frozen_step(adam_state, b1=b1, b2=b2)
  big_a, vh0 = flatten(step.big_a), flatten(step.vh0)

  def update(g):
    return -learning_rate * (big_a + step.a * g) / (
        jnp.sqrt(vh0 + step.b * g * g) + eps)

  return flatten, update
