r"""Metrics ``D_t``: how the optimizer's step responds to the gradient.

Every estimator credits example ``i`` at step ``t`` with

.. math::

    \phi_{t,i} \approx x_i \cdot d_t, \qquad
    d_t = -D_t^\top \nabla L(\bar w_t), \qquad
    x_i = c\, \nabla \ell_i(w_t)

where ``x_i = c * grad l_i(w_t)`` is the example's share of the batch
gradient, ``L`` the validation objective and ``D_t`` the *metric*: how the
optimizer step ``u_t(g) = tx.update(g, s_{t-1}, w_t)[0]`` changes when the
gradient changes.  The functions below give ``d_t`` (a tree like the
parameters) from ``v = grad L(wbar_t)``, or the elementwise scale ``S`` with
``d_t = S * v`` where the metric is diagonal; the metrics that are not
linear in ``x_i`` (:func:`removal_values`, :func:`coalition_values`,
:func:`prefix_normal_values`) give the values themselves.  Which of these
an estimator uses is said by its
:class:`optax_shapley.estimators.Metric`; Adam's closed forms are in
:mod:`optax_shapley.adam_state`.

Sign convention: ``phi > 0`` means example ``i`` lowered the validation loss.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from optax_shapley import shapley, vma
# Moved to :mod:`optax_shapley.dependence`; kept importable from here.
from optax_shapley.dependence import frozen_leaves  # noqa: F401

UpdateFn = Callable[[Any], Any]   # g -> u(g), the inner step with state frozen


class Shares(NamedTuple):
  """The per-example gradient shares ``x_i`` of a batch, formed a few
  examples at a time, so that no ``B x P`` array need exist at once.

  Attributes:
    num_examples: ``B``, the examples (this device's under data
      parallelism).
    open_rows: ``() -> rows``, called once where the shares are needed
      (work shared by all chunks, such as a forward pass, happens there);
      ``rows(start, size)`` gives a tree like the parameters with leaves
      ``f32[size, ...]``: ``x_start, ..., x_{start+size-1}``; ``start`` may
      be traced (int32[]), ``size`` is a Python int.
  """
  num_examples: int
  open_rows: Callable[[], Callable[[Any, int], Any]]

  @classmethod
  def of(cls, shares) -> "Shares":
    """The shares of a formed tree with leaves ``[B, ...]``."""
    b = jax.tree.leaves(shares)[0].shape[0]
    return cls(b, lambda: lambda start, size: jax.tree.map(
        lambda x: jax.lax.dynamic_slice_in_dim(x, start, size), shares))

  def all(self):
    """Every ``x_i``: a tree with leaves ``f32[B, ...]``."""
    return self.open_rows()(0, self.num_examples)


def _chunk_starts(b: int, size: int):
  """``(starts, fresh)`` of ``ceil(b / size)`` chunks of ``size`` rows
  covering ``0..b-1``: the last chunk ends at ``b`` and may overlap the one
  before; ``fresh[c, r]`` says row ``r`` of chunk ``c`` is not in an earlier
  chunk."""
  m = -(-b // size)
  starts = np.minimum(np.arange(m) * size, b - size)
  fresh = starts[:, None] + np.arange(size)[None] >= np.arange(m)[:, None] * size
  return jnp.asarray(starts, jnp.int32), jnp.asarray(fresh)


def finite_or_zero(tree):
  """``tree`` with its non-finite entries set to 0 (a metric where the
  update's Jacobian is not finite, see :func:`linearized_direction`)."""
  return jax.tree.map(lambda x: jnp.where(jnp.isfinite(x), x, 0), tree)


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
  return finite_or_zero(jax.tree.map(jnp.negative, jt_v))


def secant_direction(update_fn: UpdateFn, g, u_g, u_0, val_grad, *,
                     elementwise: bool = True, nodes: int = 3,
                     rtol: float = 1e-3) -> Any:
  r"""Secant (Aumann-Shapley) metric: ``D = int_0^1 du/dg(s g) ds``.

  The ray average of the Jacobian, so that ``D g = u(g) - u(0)`` and the
  values sum to the step's whole effect (efficiency).  For an elementwise
  optimizer it is the difference quotient, elementwise:

  .. math::

      D = \frac{u(g) - u(0)}{g}

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
    return finite_or_zero(acc)

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


def coalition_values(update_fn: UpdateFn, u_0, shares, val_grad, key, *,
                     num_permutations: int = 64, batch_size: int = 64) -> jax.Array:
  r"""Shapley values of the optimizer's real response, first order in ``L``.

  The one-step utility with the loss linearised at ``wbar`` but the update
  exact:

  .. math::

      U(S) = -\nabla L(\bar w) \cdot (u(g_S) - u(0)), \qquad
      g_S = \sum_{i \in S} x_i

  re-runs the optimizer update on coalitions of the batch (no validation
  forward passes): all ``2^B`` of them when ``B <= 12`` (exact Shapley,
  ``batch_size`` coalitions at a time), else ``num_permutations`` random
  permutations in antithetic pairs (Castro et al. 2009 sampling), each
  walked once with the coalition's gradient as a running sum: ``B`` updates
  per permutation, ``batch_size`` permutations at a time, so beyond the
  shares the memory is a few times ``batch_size`` parameter-sized trees.  Unlike the one-direction
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

  def gain(u):
    """``-v . (u - u(0))`` of one update (leaves like the parameters)."""
    return -sum(jnp.vdot(a, (c - z).astype(jnp.float32))
                for a, c, z in zip(v, jax.tree.leaves(u), base))

  if b <= shapley.EXACT_MAX_PLAYERS:
    def utility(mask):
      g = jax.tree.map(
          lambda x: jnp.tensordot(mask.astype(x.dtype), x, axes=1), shares)
      return gain(update_fn(g))

    masks = shapley.subset_masks(b).astype(np.float32)
    return shapley.exact_values(
        jax.lax.map(utility, jnp.asarray(masks), batch_size=batch_size))
  p = 2 * max(1, num_permutations // 2)
  perms = shapley.permutations(key, p, b)                      # [P, B]
  chunk = max(1, min(batch_size, p))
  pad = -p % chunk
  perms = jnp.concatenate([perms, perms[:pad]]) if pad else perms
  weight = jnp.concatenate([jnp.ones(p), jnp.zeros(pad)]).reshape(-1, chunk)

  def walk(args):
    """Marginals of ``chunk`` permutations, summed per player: one pass
    along each order with the coalition's gradient as a running sum."""
    order, w = args                                             # [C, B], [C]
    def visit(carry, k):
      prefix, before = carry
      who = order[:, k]
      prefix = jax.tree.map(lambda acc, x: acc + x[who], prefix, shares)
      after = jax.vmap(lambda g: gain(update_fn(g)))(prefix)
      return (prefix, after), after - before
    # Under shard_map the carry must vary along the axes its updates do.
    axes = vma.axes_of((shares, v, base, order))
    zeros = lambda shape, dtype: vma.mark_varying(jnp.zeros(shape, dtype), axes)
    start = (jax.tree.map(lambda x: zeros((chunk,) + x.shape[1:], x.dtype),
                          shares), zeros((chunk,), jnp.float32))
    _, marginal = jax.lax.scan(visit, start, jnp.arange(b))     # [B, C]
    out = jnp.zeros((chunk, b), jnp.float32).at[
        jnp.arange(chunk)[:, None], order].set(marginal.T)
    return w @ out

  chunks = (perms.reshape(-1, chunk, b), weight)
  return jax.lax.map(walk, chunks).sum(0) / p


#: Gauss-Hermite nodes of the directly evaluated small prefixes of
#: :func:`prefix_normal_values`, and Gauss-Legendre nodes over the rest.
PREFIX_DIRECT_NODES = 4
PREFIX_SIZE_NODES = 8
PREFIX_SMOOTHING_NODES = 8


def _hermite(n: int):
  """Probabilists' Gauss-Hermite nodes and weights summing to 1 (the
  expectation over ``z ~ N(0, 1)``)."""
  z, w = np.polynomial.hermite_e.hermegauss(n)
  return z, w / w.sum()


def prefix_normal_values(update_fn: UpdateFn, u_0, shares, val_grad, *,
                         batch_size: int = 16, u_g=None,
                         axis_name: str | None = None) -> jax.Array:
  r"""Shapley values of an elementwise optimizer's real update, first order
  in ``L``, each coordinate's game solved with normal-approximated prefixes.

  The utility is that of :func:`coalition_values`.  When the update acts
  coordinate-wise (Adam, with its state frozen), it is a sum of games of
  one variable each,

  .. math::

      U(S) = -\sum_j v_j \bigl(u_j(g_{S,j}) - u_j(0)\bigr), \qquad
      \phi_i = -\sum_j v_j \psi_{ij}, \qquad
      \psi_{ij} = \frac{1}{n_j} \sum_{k=0}^{n_j - 1}
        \mathbb{E}_{|S| = k}\bigl[u_j(P_S + x_{ij}) - u_j(P_S)\bigr]

  where ``n_j`` counts the examples with ``x_ij != 0`` (the others are null
  players of coordinate ``j``) and ``P_S`` sums ``x_lj`` over ``k`` of the
  other ``n_j - 1`` of them, drawn without replacement.  ``k = 0``
  (``u(x_i) - u(0)``) and ``k = n_j - 1`` (``u(g) - u(g - x_i)``) are exact.
  For the others ``P_S`` is taken as normal, mean ``q (g_j - x_ij)`` with
  ``q = k / (n_j - 1)`` and variance ``k (n_j - 1 - k) / (n_j - 2)`` times
  the others' variance (the normal approximation of pivot probabilities in
  Owen's multilinear extension, Owen 1972; Leech 2003):

  - ``k = 1, 2`` (one node of the sum), ``PREFIX_DIRECT_NODES``-point
    Gauss-Hermite for each ``(i, j)``;
  - ``k >= 3``, second order in ``x_ij`` about the mean ``m_k = q g_j``,
    ``x_ij A_j + x_ij^2 C_j / 2`` with
    ``A_j = sum_k h_k'(m_k)``, ``C_j = sum_k (1 - 2 q) h_k''(m_k)``,
    ``h_k(m) = E_z u_j(m + s_k z)``, the derivatives by Stein's identity
    (``h' = E[u z] / s``, ``h'' = E[u (z^2 - 1)] / s^2``,
    ``PREFIX_SMOOTHING_NODES``-point Gauss-Hermite) and the sum over ``k`` by
    ``PREFIX_SIZE_NODES``-point Gauss-Legendre, once per coordinate.

  Follows Adam's sign-descent first step like :func:`coalition_values`
  (measured against 1024-8192 of its permutations at ``B = 32-256``), at a
  cost that does not grow with the permutations: ``2 + 2 *
  PREFIX_DIRECT_NODES`` elementwise updates per example and coordinate, plus
  ``PREFIX_SIZE_NODES * PREFIX_SMOOTHING_NODES`` per coordinate.  Only for
  an update that is elementwise in the gradient: a coordinate-mixing one is
  not a sum of such games.

  The ``x_i`` are formed ``batch_size`` at a time, twice: once for the
  per-coordinate count, sum and sum of squares, once for the values; the
  memory is ``batch_size`` examples' shares and their updates, plus about
  ten parameter-sized arrays, whatever ``B``.  Under data parallelism
  (``axis_name``) only those three sums cross devices.

  Args:
    update_fn: ``g -> u(g)`` with the optimizer state frozen, elementwise;
      ``u_0 = u(0)``.
    shares: the ``x_i``, a :class:`Shares` or a tree like the gradient with
      leaves ``[B, ...]``.
    val_grad: ``grad L(wbar)``.
    batch_size: examples whose shares and updates are formed at once.
    u_g: ``u(g)`` at the batch gradient ``g = sum_i x_i`` where known.
    axis_name: the data-parallel axis the examples are split over (each
      device holds its own ``B``), or ``None``.

  Returns:
    f32[B] (this device's examples); positive = the example lowered the
    validation loss.
  """
  f32 = lambda t: jax.tree.map(lambda a: a.astype(jnp.float32), t)
  if not isinstance(shares, Shares):
    shares = Shares.of(shares)
  v, u_0 = f32(val_grad), f32(u_0)
  update = lambda g: f32(update_fn(g))
  tmap = jax.tree.map
  b = shares.num_examples
  size = max(1, min(batch_size, b))
  starts, fresh = _chunk_starts(b, size)
  rows_at = shares.open_rows()
  rows = lambda c: f32(rows_at(starts[c], size))

  def sums(c):
    """Count of nonzeros, sum and sum of squares of chunk ``c``'s new rows."""
    x = rows(c)
    keep = lambda a: jnp.where(
        fresh[c].reshape((-1,) + (1,) * (a.ndim - 1)), a, 0)
    return (tmap(lambda a: keep(a != 0).sum(0).astype(jnp.float32), x),
            tmap(lambda a: keep(a).sum(0), x),
            tmap(lambda a: keep(a * a).sum(0), x))

  def add_chunk(total, c):
    return tmap(jnp.add, total, sums(c)), None

  # The first chunk starts the carry: it varies like the shares under
  # shard_map, as the sums of the later chunks do.
  (n, g, sq), _ = jax.lax.scan(add_chunk, sums(0), jnp.arange(1, len(starts)))
  if axis_name is not None:
    n, g, sq = jax.lax.psum((n, g, sq), axis_name)
  u_g = update(g) if u_g is None else f32(u_g)
  others = tmap(lambda c: c - 1, n)

  def variance(count, total, squares):
    """Population variance of ``count`` numbers from their sums."""
    c = jnp.maximum(count, 1)
    return jnp.maximum(squares / c - (total / c) ** 2, 0)

  def prefix_std(k, o, var):
    """Std of the sum of ``k`` of ``o`` numbers of variance ``var``, drawn
    without replacement (0 where ``k`` is not below ``o``)."""
    return jnp.sqrt(jnp.maximum(k * (o - k), 0) / jnp.maximum(o - 1, 1) * var)

  # k >= 3: A and C per coordinate, over k in [2.5, n - 1.5].
  zs, wz = _hermite(PREFIX_SMOOTHING_NODES)
  xs, wx = np.polynomial.legendre.leggauss(PREFIX_SIZE_NODES)
  var = tmap(variance, n, g, sq)
  span = tmap(lambda o: jnp.maximum(o - 3, 0), others)
  # Stein's identity with Gauss-Hermite weights: h' and h'' (0 at s = 0).
  he1 = jnp.asarray(wz * zs, jnp.float32)
  he2 = jnp.asarray(wz * (zs * zs - 1), jnp.float32)

  def size_node(coefs, node_weight):
    """Adds one Gauss-Legendre node of the sum over ``k`` to ``A`` and
    ``C`` (a ``lax.scan`` body: one copy of the update in the program)."""
    node, weight = node_weight
    k = tmap(lambda l: 2.5 + l * (node + 1) / 2, span)
    q = tmap(lambda k, o: k / jnp.maximum(o, 1), k, others)
    s = tmap(prefix_std, k, others, var)
    safe = tmap(lambda s: jnp.where(s > 0, s, jnp.inf), s)

    def smoothing_node(moments, z_w):
      z, w1, w2 = z_w
      fz = update(tmap(lambda q, a, s: q * a + s * z, q, g, s))
      m1, m2 = moments
      return (tmap(lambda m, f: m + w1 * f, m1, fz),
              tmap(lambda m, f: m + w2 * f, m2, fz)), None

    zero = tmap(jnp.zeros_like, g)
    (m1, m2), _ = jax.lax.scan(smoothing_node, (zero, zero),
                               (jnp.asarray(zs, jnp.float32), he1, he2))
    coef_a, coef_c = coefs
    coef_a = tmap(lambda acc, m, sf, l: acc + weight * l / 2 * m / sf,
                  coef_a, m1, safe, span)
    coef_c = tmap(lambda acc, m, sf, q, l: acc + weight * l / 2 * (1 - 2 * q)
                  * m / sf ** 2, coef_c, m2, safe, q, span)
    return (coef_a, coef_c), None

  (coef_a, coef_c), _ = jax.lax.scan(
      size_node, (tmap(jnp.zeros_like, g), tmap(jnp.zeros_like, g)),
      (jnp.asarray(xs, jnp.float32), jnp.asarray(wx, jnp.float32)))

  # k = 1, 2 at one node: k_d = 0.5 + L/2, weight L = min(n - 2, 2).
  length = tmap(lambda o: jnp.clip(o - 1, 0, 2), others)
  k_d = tmap(lambda l: 0.5 + l / 2, length)
  q_d = tmap(lambda k, o: k / jnp.maximum(o, 1), k_d, others)
  zd, wd = _hermite(PREFIX_DIRECT_NODES)

  def one(x):
    """``phi_i`` of one example (leaves like the parameters)."""
    # The prefix of the others: their mean and variance without x_i.
    mean = tmap(lambda q, a, xi: q * (a - xi), q_d, g, x)
    s_d = tmap(lambda k, o, a, b, xi: prefix_std(
        k, o, variance(o, a - xi, b - xi * xi)), k_d, others, g, sq, x)

    small = tmap(jnp.zeros_like, x)
    for z, w in zip(zd, wd):       # unrolled: fused per example
      at = tmap(lambda mu, s: mu + s * z, mean, s_d)
      with_i = update(tmap(jnp.add, at, x))
      without = update(at)
      small = tmap(lambda acc, a, b: acc + w * (a - b), small, with_i, without)
    first = update(x)
    last = update(tmap(jnp.subtract, g, x))
    total = jnp.zeros([], jnp.float32)
    for leaf in zip(*map(jax.tree.leaves, (x, n, u_0, u_g, first, last, small,
                                           length, coef_a, coef_c, v))):
      xi, c, f0, fg, f1, fl, sm, l, a, cc, vj = leaf
      psi = ((f1 - f0) + jnp.where(c >= 2, fg - fl, 0) + l * sm
             + xi * a + xi * xi * cc / 2) / jnp.maximum(c, 1)
      total = total - jnp.vdot(vj, jnp.where(xi != 0, psi, 0))
    return total

  # Chunk by chunk; row i is read back from chunk i // size (the last one
  # for the rows the last chunk covers).
  per_chunk = jax.lax.map(lambda c: jax.vmap(one)(rows(c)),
                          jnp.arange(len(starts)))            # [chunks, size]
  i = jnp.arange(b)
  c = jnp.minimum(i // size, len(starts) - 1)
  return per_chunk[c, i - starts[c]]


def ray_nonlinearity(update_fn: UpdateFn, g, u_g, u_0, weight) -> jax.Array:
  r"""How far the step is from quadratic along its ray, weighted by the target.

  .. math::

      \nu = \frac{\sum_j w_j \,\bigl|(J(g/2)\, g)_j - (u(g) - u(0))_j\bigr|}
                 {\sum_j w_j \,\bigl|(u(g) - u(0))_j\bigr|},
      \qquad w = |\nabla L(\bar w)|

  where ``J(g/2) g`` is the directional derivative of the update at the
  middle of the ray (one ``jax.jvp``, any optax update).  The midpoint rule
  is exact for a quadratic, so ``nu = 0`` wherever each coordinate's step is
  quadratic along ``s g, s in [0, 1]``: there the secant metric follows the
  step.  Adam's first step is sign descent, flat except at ``g = 0``, so
  ``J(g/2) g ~ 0`` and ``nu ~ 1``; as the second moment fills, ``nu`` falls
  (about 0.34, 0.16, 0.15, 0.07 at steps 2-5 of the digits MLP at lr 1e-3,
  below 0.02 from step 12 on).  ``nu`` measures the shape of the step, not
  its size: a warm-up from a small learning rate has the same ``nu`` at
  the same step.  Entries where the derivative is not finite (``g_j = 0``
  under Adam's first step) count as 0.  Returns f32[] (0 where the step
  does not move the target's coordinates).

  Args:
    update_fn: ``g -> u(g)`` with the optimizer state frozen.
    g: the batch gradient; ``u_g = u(g)``, ``u_0 = u(0)``.
    weight: a tree like ``g`` of non-negative weights, ``|grad L(wbar)|``.
  """
  half = jax.tree.map(lambda x: x / 2, g)
  _, deriv = jax.jvp(update_fn, (half,), (g,))
  change = jax.tree.map(lambda a, b: (a - b).astype(jnp.float32), u_g, u_0)
  return nonlinearity_ratio(deriv, change, g, weight)


def nonlinearity_ratio(deriv, change, g, weight) -> jax.Array:
  """``nu`` of :func:`ray_nonlinearity` from ``J(g/2) g`` (``deriv``) and
  ``u(g) - u(0)`` (``change``), trees like ``g``; entries of ``deriv`` that
  are not finite or where ``g = 0`` count as 0.  Returns f32[]."""
  num = den = jnp.zeros([], jnp.float32)
  for w, d, gi, c in zip(*map(jax.tree.leaves, (weight, deriv, g, change))):
    w, c = w.astype(jnp.float32), c.astype(jnp.float32)
    d = jnp.where(jnp.isfinite(d) & (gi != 0), d, 0).astype(jnp.float32)
    num = num + jnp.sum(w * jnp.abs(d - c))
    den = den + jnp.sum(w * jnp.abs(c))
  return jnp.where(den > 0, num / jnp.where(den > 0, den, 1), 0.0)


# ---------------------------------------------------------------------------
# Elementwise scales: d = S * v.  The ghost rule factors S per Dense kernel.


def scale_times(scale, val_grad):
  """``d = S * v`` leaf by leaf, non-finite entries set to 0."""
  return finite_or_zero(jax.tree.map(lambda a, v: a * v, scale, val_grad))


def sgd_scale(like, *, learning_rate):
  """SGD metric ``D = -eta I``: ``S = eta`` everywhere, ``d = eta v``.

  First-order In-Run Data Shapley (Wang et al. 2024, eq. 5) / TracIn: the
  value is ``eta x_i . grad L(w)``.  Wrong under Adam, kept as the baseline.
  """
  return jax.tree.map(lambda x: jnp.full(jnp.shape(x), learning_rate,
                                         jnp.float32), like)


def linearized_scale(update_fn: UpdateFn, g):
  """``S = -du/dg`` for an elementwise optimizer (its Jacobian is diagonal):
  one ``jax.jvp`` with a tangent of ones; non-finite entries set to 0."""
  ones = jax.tree.map(jnp.ones_like, g)
  _, deriv = jax.jvp(update_fn, (g,), (ones,))
  return finite_or_zero(jax.tree.map(jnp.negative, deriv))


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
