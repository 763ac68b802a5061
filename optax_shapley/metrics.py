"""Metrics ``D_t`` and evaluation points ``wbar_t`` (docs/index.md, "Estimators").

Every estimator credits example ``i`` at step ``t`` with::

    phi_{t,i} ~= x_i . d_t,      d_t = -D_t^T grad L(wbar_t)

where ``x_i = c * grad l_i(w_t)`` is the example's share of the batch
gradient, ``L`` the validation objective and ``D_t`` the *metric*: how the
optimizer step ``u_t(g) = tx.update(g, s_{t-1}, w_t)[0]`` changes when the
gradient changes.  Each function below returns ``d_t`` (a tree like the
parameters) given ``v = grad L(wbar_t)``.

Sign convention: ``phi > 0`` means example ``i`` lowered the validation loss.
"""

from __future__ import annotations

import math
from typing import Any, Callable

import jax
from jax.extend import core as jex_core
import jax.numpy as jnp
import numpy as np
import optax

METRICS = ("sgd", "fixed_state", "linearized", "secant", "removal",
           "coalitions")
# Metrics whose value is x_i . d for a direction d (the rest are nonlinear in x_i).
LINEAR_METRICS = ("sgd", "fixed_state", "linearized", "secant")
EVALUATIONS = ("start", "midpoint", "end")

UpdateFn = Callable[[Any], Any]   # g -> u(g), the inner step with state frozen


def _finite_or_zero(tree):
  return jax.tree.map(lambda x: jnp.where(jnp.isfinite(x), x, 0), tree)


def frozen_leaves(update_fn: UpdateFn, g) -> tuple[int, ...]:
  """Leaves (in ``jax.tree.leaves`` order) whose update ignores the gradient.

  ``optax.set_to_zero`` on a frozen backbone (inside ``optax.multi_transform``
  or a chain) makes ``u(g)`` constant in those leaves: every metric is zero
  there, so they are skipped by the contraction and the ``sgd`` and
  ``fixed_state`` metrics, which do not look at the update, are zeroed there
  too.  Found at trace time from the dependencies of ``jax.make_jaxpr`` of the
  update (sound: an equation depends on ``g`` if any of its inputs does), so
  no runtime cost.
  """
  closed = jax.make_jaxpr(update_fn)(g)
  jaxpr = closed.jaxpr
  live = set(jaxpr.invars)
  for eqn in jaxpr.eqns:
    if any(not isinstance(v, jex_core.Literal) and v in live for v in eqn.invars):
      live.update(eqn.outvars)
  return tuple(i for i, v in enumerate(jaxpr.outvars)
               if isinstance(v, jex_core.Literal) or v not in live)


def learning_rate_at(learning_rate, step) -> jax.Array:
  """``eta_t``: a float, or an optax schedule evaluated at the 0-based step."""
  if callable(learning_rate):
    return jnp.asarray(learning_rate(step), jnp.float32)
  return jnp.asarray(learning_rate, jnp.float32)


def sgd_direction(val_grad, *, learning_rate) -> Any:
  """SGD metric ``D = -eta I``: ``d = eta * v``.

  First-order In-Run Data Shapley (Wang et al. 2024, eq. 5) / TracIn: the
  value is ``eta * x_i . grad L(w)``.  Wrong under Adam, kept as the baseline.
  """
  return jax.tree.map(lambda v: learning_rate * v, val_grad)


def find_adam_state(state) -> optax.ScaleByAdamState:
  """The first ``optax.ScaleByAdamState`` inside an optimizer state.

  Raises:
    ValueError: the state holds none (the inner optimizer is not Adam-like).
  """
  found = [s for s in jax.tree.leaves(
      state, is_leaf=lambda x: isinstance(x, optax.ScaleByAdamState))
           if isinstance(s, optax.ScaleByAdamState)]
  if not found:
    raise ValueError(
        "metric 'fixed_state' needs Adam moments, but the inner optimizer "
        "state holds no optax.ScaleByAdamState; use metric='secant' or "
        "'linearized', which work for any optax optimizer.")
  return found[0]


def fixed_state_direction(val_grad, adam_state: optax.ScaleByAdamState, *,
                          learning_rate, b1: float, b2: float, eps: float,
                          previous: bool = False, prev_state=None) -> Any:
  """The paper's Adam-aware closed form with the moments frozen.

  Ding, Zhang, Wang, Hu (2026), "In-Run Data Shapley for Adam Optimizer":
  only the fresh gradient's share of the first moment varies with the
  coalition, so elementwise::

      D = -eta_t * (1 - b1) / (1 - b1^t) / (sqrt(vhat) + eps),
      vhat = nu_t / (1 - b2^t)

  with ``nu_t`` and ``t`` from the state *after* the step (``previous=False``)
  or ``nu_{t-1}, t-1`` from ``prev_state`` (``previous=True``; the Taylor base
  point, ``vhat_0 = 0``).  ``d = -D * v``.
  """
  return scale_times(fixed_state_scale(
      val_grad, adam_state, learning_rate=learning_rate, b1=b1, b2=b2, eps=eps,
      previous=previous, prev_state=prev_state), val_grad)


def linearized_direction(update_fn: UpdateFn, g, val_grad) -> Any:
  """Exact Jacobian metric ``D = du/dg`` at ``g_t``: ``d = -D^T v``.

  Generic: a ``jax.vjp`` of any optax update with the state held fixed,
  second-moment path included.  With ``evaluation="end"`` this is the
  first-order leave-one-out ``U(B) - U(B minus {i})``.  Entries where the
  Jacobian is not finite (Adam with ``vhat = 0`` and ``g = 0``: the derivative
  of ``sqrt`` at 0) are set to 0; there the batch gradient is exactly zero,
  which in practice means every per-example gradient is zero too.
  """
  _, vjp = jax.vjp(update_fn, g)
  (jt_v,) = vjp(val_grad)
  return _finite_or_zero(jax.tree.map(jnp.negative, jt_v))


def secant_direction(update_fn: UpdateFn, g, u_g, u_0, val_grad, *,
                     elementwise: bool = True, nodes: int = 3,
                     rtol: float = 1e-3) -> Any:
  """Secant (Aumann-Shapley) metric: ``D = int_0^1 du/dg(s g) ds``.

  The ray average of the Jacobian, so that ``D g = u(g) - u(0)`` and the
  values sum to the step's whole effect (efficiency).  For an elementwise
  optimizer it is the difference quotient, elementwise::

      D = (u(g) - u(0)) / g

  Where that quotient is unreliable (``g = 0``, or ``|u(g) - u(0)|`` below
  ``rtol * max(|u(g)|, |u(0)|)`` so float32 cancellation would dominate) the
  derivative ``du/dg`` at ``g / 2`` is used instead (forward mode, one
  ``jax.jvp`` with a tangent of ones, which is the diagonal for an elementwise
  optimizer); the change of ``u`` there is then tiny and nearly linear.

  ``elementwise=False`` (optimizers that mix coordinates, e.g. global-norm
  clipping) integrates ``J(s g)^T v`` over the ray with ``nodes``-point
  Gauss-Legendre quadrature, one ``jax.vjp`` per node.

  Returns ``d = -D^T v``; non-finite entries set to 0 (see
  :func:`linearized_direction`).
  """
  if not elementwise:
    xs, ws = np.polynomial.legendre.leggauss(nodes)
    xs, ws = (xs + 1.0) / 2.0, ws / 2.0
    acc = jax.tree.map(jnp.zeros_like, val_grad)
    for s, w in zip(xs, ws):
      _, vjp = jax.vjp(update_fn, jax.tree.map(lambda x: s * x, g))
      (jt_v,) = vjp(val_grad)
      acc = jax.tree.map(lambda a, j: a - w * j, acc, jt_v)
    return _finite_or_zero(acc)

  return scale_times(secant_scale(update_fn, g, u_g, u_0, rtol=rtol), val_grad)


def removal_values(update_fn: UpdateFn, g, u_g, per_example, val_grad, *,
                   batch_size: int = 16) -> jax.Array:
  """Exact removal of each example from the optimizer step, first order in L.

  ``phi_i = grad L(wbar) . (u(g - x_i) - u(g))``: how much the validation
  loss would rise if example ``i``'s share ``x_i`` were taken out of this
  step's gradient, with the optimizer's response computed exactly (Adam's
  second moment included) rather than through its Jacobian.  With
  ``evaluation="end"`` this is leave-one-out ``U(B) - U(B minus {i})`` to first
  order in the validation loss only; :func:`linearized_direction` is its
  first-order expansion in ``x_i`` as well, which is loose where ``x_i`` is
  comparable to ``g`` under Adam (early steps, coordinates that are rarely
  non-zero).

  Needs the per-example gradients (``B`` times the parameters' memory) and
  ``B`` optimizer updates, mapped ``batch_size`` at a time; any optax update.

  Args:
    update_fn: ``g -> u(g)``, the inner update with the state frozen.
    g: the batch gradient; ``u_g = update_fn(g)``.
    per_example: tree like ``g`` with leaves ``[B, ...]``, the shares ``x_i``
      (summing to ``g``).
    val_grad: ``grad L(wbar)``.

  Returns:
    f32[B]; positive = removing the example would raise the validation loss.
  """
  def one(x_i):
    u_i = update_fn(jax.tree.map(lambda a, b: a - b.astype(a.dtype), g, x_i))
    return sum(jnp.vdot(v.astype(jnp.float32), (a - b).astype(jnp.float32))
               for v, a, b in zip(jax.tree.leaves(val_grad), jax.tree.leaves(u_i),
                                  jax.tree.leaves(u_g)))

  return jax.lax.map(one, per_example, batch_size=batch_size)


COALITIONS_EXACT_MAX = 12


def shapley_weights(num_players: int) -> np.ndarray:
  """``W`` f64[2^n, n] with ``phi = W^T U`` for ``U`` on all coalitions.

  Row ``S`` (bit ``i`` of the row index = player ``i`` in ``S``):
  ``W[S, i] = w(|S| - 1)`` if ``i in S`` else ``-w(|S|)``, with the Shapley
  weight ``w(s) = s! (n - s - 1)! / n!``.
  """
  n = num_players
  masks = ((np.arange(2 ** n)[:, None] >> np.arange(n)) & 1).astype(bool)
  size = masks.sum(1)
  fact = np.array([math.factorial(k) for k in range(n + 1)], np.float64)
  w = lambda s: fact[s] * fact[n - s - 1] / fact[n]
  inside = w(np.clip(size - 1, 0, n - 1))[:, None]
  outside = w(np.clip(size, 0, n - 1))[:, None]
  return np.where(masks, inside, -outside)


def coalition_values(update_fn: UpdateFn, u_0, shares, val_grad, key, *,
                     num_permutations: int = 64, batch_size: int = 64) -> jax.Array:
  """Shapley values of the optimizer's real response, first order in ``L``.

  The one-step utility with the loss linearised at ``wbar`` but the update
  exact::

      U(S) = -grad L(wbar) . (u(g_S) - u(0)),    g_S = sum_{i in S} x_i

  re-runs the optimizer update on coalitions of the batch (no validation
  forward passes): all ``2^B`` of them when ``B <= 12`` (exact Shapley), else
  ``num_permutations`` random permutations in antithetic pairs, each costing
  ``B - 1`` updates (Castro et al. 2009 sampling).  Unlike the one-direction
  metrics this follows Adam's nonlinearity in the coalition, including the
  sign-descent first step; it needs the per-example gradients (``B`` times
  the parameters' memory) and many optimizer updates, so it is a reference,
  not a fast path.  Any optax update.

  Args:
    update_fn: ``g -> u(g)`` with the optimizer state frozen; ``u_0 = u(0)``.
    shares: tree like the gradient with leaves ``[B, ...]``, the ``x_i``.
    val_grad: ``grad L(wbar)``.
    key: ``jax.random`` key for the permutations (unused when exact).

  Returns:
    f32[B]; positive = the example lowered the validation loss.
  """
  b = jax.tree.leaves(shares)[0].shape[0]
  v = [x.astype(jnp.float32) for x in jax.tree.leaves(val_grad)]
  base = jax.tree.leaves(u_0)

  def utility(mask):
    g = jax.tree.map(lambda x: jnp.tensordot(mask.astype(x.dtype), x, axes=1),
                     shares)
    u = jax.tree.leaves(update_fn(g))
    return -sum(jnp.vdot(a, (c - z).astype(jnp.float32))
                for a, c, z in zip(v, u, base))

  if b <= COALITIONS_EXACT_MAX:
    w = shapley_weights(b)
    masks = ((np.arange(2 ** b)[:, None] >> np.arange(b)) & 1).astype(np.float32)
    us = jax.lax.map(utility, jnp.asarray(masks), batch_size=batch_size)
    return jnp.asarray(w.T, jnp.float32) @ us
  half = max(1, num_permutations // 2)
  perms = jax.vmap(lambda k: jax.random.permutation(k, b))(
      jax.random.split(key, half))
  perms = jnp.concatenate([perms, perms[:, ::-1]])            # antithetic
  # Prefix coalitions 1..B-1 of every permutation (U(empty)=0, U(all) known).
  rank = jnp.argsort(perms, axis=1)                            # position of i
  k = jnp.arange(1, b)
  prefix = (rank[:, None, :] < k[None, :, None]).astype(jnp.float32)
  inner = jax.lax.map(utility, prefix.reshape(-1, b), batch_size=batch_size)
  inner = inner.reshape(perms.shape[0], b - 1)
  total = utility(jnp.ones((b,), jnp.float32))
  curve = jnp.concatenate([jnp.zeros((perms.shape[0], 1)), inner,
                           jnp.full((perms.shape[0], 1), total)], axis=1)
  marginal = curve[:, 1:] - curve[:, :-1]                      # [P, B] by position
  per_player = jnp.take_along_axis(marginal, rank, axis=1)     # [P, B] by player
  return per_player.mean(axis=0)


# ---------------------------------------------------------------------------
# Elementwise scales: d = S * v.  The ghost rule factors S per Dense kernel.


def scale_times(scale, val_grad):
  """``d = S * v`` leaf by leaf, non-finite entries set to 0."""
  return _finite_or_zero(jax.tree.map(lambda a, v: a * v, scale, val_grad))


def sgd_scale(like, *, learning_rate):
  """``S = eta`` everywhere (:func:`sgd_direction`)."""
  return jax.tree.map(lambda x: jnp.full(jnp.shape(x), learning_rate,
                                         jnp.float32), like)


def fixed_state_scale(like, adam_state, *, learning_rate, b1, b2, eps,
                      previous=False, prev_state=None):
  """``S`` of :func:`fixed_state_direction` (``d = S * v``), a tree like
  ``like``: ``eta (1 - b1) / (1 - b1^t) / (sqrt(vhat) + eps)``."""
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


def linearized_scale(update_fn: UpdateFn, g):
  """``S = -du/dg`` for an elementwise optimizer (its Jacobian is diagonal):
  one ``jax.jvp`` with a tangent of ones; non-finite entries set to 0."""
  ones = jax.tree.map(jnp.ones_like, g)
  _, deriv = jax.jvp(update_fn, (g,), (ones,))
  return _finite_or_zero(jax.tree.map(jnp.negative, deriv))


def secant_scale(update_fn: UpdateFn, g, u_g, u_0, *, rtol: float = 1e-3):
  """``S = -(u(g) - u(0)) / g`` elementwise (:func:`secant_direction`), with
  the derivative at ``g / 2`` where the quotient is unreliable; non-finite
  entries set to 0."""
  half = jax.tree.map(lambda x: x / 2, g)
  ones = jax.tree.map(jnp.ones_like, g)
  _, deriv = jax.jvp(update_fn, (half,), (ones,))

  def one(gi, ug, u0, dm):
    diff = ug - u0
    size = jnp.maximum(jnp.abs(ug), jnp.abs(u0))
    ok = (gi != 0) & (jnp.abs(diff) > rtol * size)
    metric = jnp.where(ok, diff / jnp.where(ok, gi, 1), dm)
    return jnp.where(jnp.isfinite(metric), -metric, 0)

  return jax.tree.map(one, g, u_g, u_0, deriv)


def adam_secant_scale(g, adam_state, *, learning_rate, b1, b2, eps):
  """``S = -(u(g) - u(0)) / g`` of ``optax.adam`` in closed form, elementwise.

  With the moments ``mu``, ``nu`` and ``count`` of ``adam_state`` (the state
  *before* this step), ``t = count + 1``, ``c1 = 1 - b1^t``,
  ``c2 = 1 - b2^t``, ``A = b1 mu / c1``, ``a = (1 - b1) / c1``,
  ``vhat(g) = (b2 nu + (1 - b2) g^2) / c2``, ``s = sqrt(vhat(g))``,
  ``s0 = sqrt(vhat(0))``, ``D = s + eps`` and ``D0 = s0 + eps``, Adam's step
  is ``u(g) = -eta (A + a g) / D`` and, using
  ``D - D0 = (1 - b2) g^2 / (c2 (s + s0))``::

      S = eta (a / D - A (1 - b2) g / (c2 (s + s0) D D0))

  The same quantity as :func:`secant_scale` without its cancellation: it is
  finite at ``g = 0`` (where it is the derivative ``eta a / D0``), needs
  neither ``u(0)`` nor a ``jax.jvp``, and is one elementwise expression per
  leaf (XLA's CPU backend still splits its square roots and divisions into
  a few loops; ``docs/bench.md``).  Weight decay (AdamW) does not depend on
  ``g`` and cancels.  Returns a tree like ``g``, float32.
  """
  t = adam_state.count.astype(jnp.float32) + 1.0
  c1 = 1.0 - b1 ** t
  c2 = 1.0 - b2 ** t
  a = (1.0 - b1) / c1

  def one(gi, mu, nu):
    gi = gi.astype(jnp.float32)
    big_a = b1 * mu.astype(jnp.float32) / c1
    vh0 = b2 * nu.astype(jnp.float32) / c2
    s0 = jnp.sqrt(vh0)
    s = jnp.sqrt(vh0 + (1.0 - b2) * gi * gi / c2)
    d, d0 = s + eps, s0 + eps
    both = s + s0
    cross = jnp.where(both > 0, big_a * (1.0 - b2) * gi
                      / (c2 * jnp.where(both > 0, both, 1.0) * d * d0), 0.0)
    return learning_rate * (a / d - cross)

  return jax.tree.map(one, g, adam_state.mu, adam_state.nu)


def adam_gradient(prev_state: optax.ScaleByAdamState,
                  new_state: optax.ScaleByAdamState, *, b1: float) -> Any:
  """The gradient ``g`` that Adam folded into its first moment this step.

  ``optax.scale_by_adam`` sets ``mu' = b1 mu + (1 - b1) g`` (Kingma & Ba
  2015, Algorithm 1), so elementwise::

      g = (mu' - b1 mu) / (1 - b1)

  up to a rounding error of about ``2^-24 (|mu'| + b1 |mu|) / (1 - b1)``.
  Both moments are arguments and outputs of the training step, alive for
  all of it, so an expression of ``g`` written this way is fused into its
  users instead of keeping a gradient-sized buffer alive from the train
  backward pass through the validation pass (``docs/bench.md``, "Memory").
  Where ``|mu| >> |g|`` the relative error of ``g`` is large (the digits
  were lost when ``mu'`` was rounded), but :func:`adam_secant_scale` reads
  ``g`` only through ``(1 - b2) g^2`` next to ``b2 nu`` and a cross term of
  relative size about ``(1 - b2) mu g / vhat``, both then small.  Returns a
  tree like ``mu``, float32.
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


def evaluation_point(name: str, params, u_g, u_0=None):
  """``wbar_t``: ``start`` = ``w_t``; ``midpoint`` = ``w_t + (u(0) + u(g))/2``;
  ``end`` = ``w_t + u(g)``."""
  if name == "start":
    return params
  if name == "end":
    return optax.apply_updates(params, u_g)
  if name == "midpoint":
    mid = jax.tree.map(lambda a, b: (a + b) / 2, u_0, u_g)
    return optax.apply_updates(params, mid)
  raise ValueError(f"evaluation must be one of {EVALUATIONS}, got {name!r}")
