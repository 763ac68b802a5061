"""Contraction: ``x_i . d`` for every example without per-example gradients.

For each probed call the exact rule of :mod:`optax_shapley.layers` (the
module re-applied with the direction in place of its parameters, dotted with
the kept output cotangent), the per-example shares of calls planned
per-example, and an exact forward-mode ``jax.jvp`` for every other leaf
(the fallback).  Dense calls may instead take the ghost rule
(:mod:`optax_shapley.ghost`), chosen per call by a cost model and checked at
every step against the exact rule on a few examples.
"""

from __future__ import annotations

import collections
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from optax_shapley import ghost, layers, table, vma
from optax_shapley.factors import Factors, param_paths

# Examples on which ghost values are checked against the exact rule each step.
GHOST_SPOT_CHECK = 8
# The rank-1 ghost rule is used only where at most this share of the
# direction's mass (sum |S G|) sits on negative metric entries.
GHOST_NEGATIVE_MASS = 1e-2


def contract(factors: Factors, directions: Any,
             skip_leaves: tuple[int, ...] = (),
             skip_calls: tuple[int, ...] = ()) -> jax.Array:
  """Each example's gradient share dotted with each direction, ``f32[B, E]``.

  Entry ``(i, e)`` is ``x_i . d_e``, without forming ``x_i``.

  Args:
    factors: from :func:`optax_shapley.value_grad_and_factors`.
    directions: a tree like ``params`` whose leaves carry a leading axis
      ``E`` (one direction per estimator).
    skip_leaves: indices (``jax.tree.leaves(params)`` order) of leaves whose
      direction is known to be zero (frozen parameters): calls owning only
      such leaves and fallback work on them are skipped.
    skip_calls: indices into ``factors.plans`` of calls contracted elsewhere
      (the ghost rule).

  Returns:
    f32[B, E] where entry ``(i, e)`` is ``c * grad l_i(w) . d_e``.
  """
  d_leaves = factors.params_treedef.flatten_up_to(directions)
  num_dirs = d_leaves[0].shape[0]
  total = jnp.zeros((factors.batch_size, num_dirs), jnp.float32)
  skip = frozenset(skip_leaves)
  for n, (plan, (arrays, cotangent)) in enumerate(zip(factors.plans,
                                                      factors.calls)):
    if n in skip_calls or (skip and plan.owns_only(skip)):
      continue
    if plan.per_example:       # cotangent: the per-example gradients
      shares = dict(param_paths(cotangent))
      for path, i in plan.param_map:
        x, d = shares[path], d_leaves[i]
        total = total + jnp.tensordot(
            x.astype(jnp.float32), d.astype(jnp.float32),
            axes=(tuple(range(1, x.ndim)), tuple(range(1, d.ndim))))
      continue
    call_args, call_kwargs = plan.call_args(arrays)

    def one(d_mod, plan=plan, call_args=call_args, call_kwargs=call_kwargs,
            cotangent=cotangent):
      return layers.contract(plan.module, plan.method, d_mod, call_args,
                             call_kwargs, cotangent)

    d_mod = plan.module_params(d_leaves)
    total = total + jax.vmap(one, out_axes=1)(d_mod)
  fb = tuple(i for i in factors.fallback_leaves if i not in skip)
  if fb:
    total = total + _fallback_contract(factors, d_leaves, fb)
  return total


def _fallback_contract(factors: Factors, d_leaves, fb) -> jax.Array:
  """Exact ``c * jvp(l_i, d)`` restricted to the leaves ``fb``, f32[B, E]
  (one forward-mode pass per micro-batch, rows in micro-batch order)."""
  params, _ = factors.fallback
  leaves = factors.params_treedef.flatten_up_to(params)
  primals = tuple(leaves[i] for i in fb)
  tangents = tuple(d_leaves[i] for i in fb)

  def rows(args):
    def loss_of(fb_vals):
      full = list(leaves)
      for i, v in zip(fb, fb_vals):
        full[i] = v
      return factors.loss_fn(jax.tree.unflatten(factors.params_treedef, full),
                             *args)

    def one(tangent):
      tangent = tuple(t.astype(p.dtype) for t, p in zip(tangent, primals))
      # A tangent that varies over a shard_map axis needs a primal that does.
      prim = tuple(vma.mark_varying(p, vma.varying_axes(t))
                   for p, t in zip(primals, tangent))
      return jax.jvp(loss_of, (prim,), (tangent,))[1]

    return jax.vmap(one, out_axes=1)(tangents)

  out = jnp.concatenate([rows(args) for args in factors.fallback_batches()])
  return out.astype(jnp.float32) * factors.scale


def per_example_grads(factors: Factors, like: Any,
                      skip_leaves: tuple[int, ...] = (),
                      rows: tuple[Any, int] | None = None) -> Any:
  """The per-example gradient shares ``x_i = c * grad l_i(w)``, formed.

  Call by call, each example's gradient of the call's exact rule
  (:func:`optax_shapley.layers.contract`) with respect to the direction,
  on that example's inputs and output cotangent alone (``jax.vmap`` over
  the examples of ``jax.grad``): ``B`` weight gradients of one example each,
  the cost of one batch weight gradient.  ``nn.Conv`` calls the tap rule
  covers use :func:`optax_shapley.layers.conv_per_example_grads`; calls
  planned per-example already hold their shares.  Leaves on the
  forward-mode fallback come from the reverse-mode Jacobian of their exact
  ``jax.jvp`` contraction, one transposed pass of the whole batch per
  example (``B`` times the fallback's work).  Costs ``B`` times the
  parameters' memory; used by estimators that are not linear in
  ``x_i`` (``"removal"``, ``"coalitions"``, the exact steps of ``"auto"``),
  not by the ghost path.

  Args:
    factors: from :func:`optax_shapley.value_grad_and_factors`.
    like: a tree like ``params`` (e.g. the batch gradient), for shapes.
    skip_leaves: as in :func:`contract`; those leaves come out as zeros.
    rows: ``(start, size)``: only examples ``start .. start + size - 1``
      (``start`` may be traced, ``size`` is static), at ``size / B`` of the
      cost and memory; ``None``: all ``B``.  To form many such chunks, use
      :func:`per_example_rows`.

  Returns:
    A tree like ``params`` whose leaves are ``f32[B, *leaf.shape]``
    (``[size, ...]`` with ``rows``); zeros for leaves that no call or
    fallback owns (non-float or unused) or skipped.
  """
  start, size = (0, factors.batch_size) if rows is None else rows
  return per_example_rows(factors, like, skip_leaves)(start, size)


def per_example_rows(factors: Factors, like: Any,
                     skip_leaves: tuple[int, ...] = ()):
  """``(start, size) -> per_example_grads(factors, like, skip_leaves,
  rows=(start, size))``, for forming the shares a chunk at a time: the
  forward pass the fallback's Jacobian needs is taken once, here, and each
  chunk costs its own examples' share of the rest."""
  # Under shard_map the direction must vary like the factors: the transpose
  # of a device-invariant input is a psum, which would add the devices' x_i.
  axes = vma.axes_of((factors.calls, factors.fallback))
  like_leaves = factors.params_treedef.flatten_up_to(like)
  skip = frozenset(skip_leaves)
  fb = tuple(i for i in factors.fallback_leaves if i not in skip)
  vjp = None
  if fb:
    zeros = [vma.mark_varying(jnp.zeros(jnp.shape(like_leaves[i]), jnp.float32),
                              axes) for i in fb]

    def values(d_fb):
      d_leaves = list(like_leaves)
      for i, d in zip(fb, d_fb):
        d_leaves[i] = d[None]
      # On an explicit-sharding mesh the B values are split over the batch;
      # replicated, the basis rows below are their cotangents.
      return table.replicated(_fallback_contract(factors, d_leaves, fb)[:, 0])

    _, vjp = jax.vjp(values, zeros)

  def rows(start, b):
    # Gathered first on an explicit-sharding mesh: a chunk of the batch
    # need not split evenly over its devices.
    take = lambda t: jax.tree.map(lambda a: jax.lax.dynamic_slice_in_dim(
        table.replicated(a), start, b), t)
    if b == factors.batch_size:
      take = lambda t: t
    out = [vma.mark_varying(jnp.zeros((b,) + jnp.shape(x), jnp.float32), axes)
           for x in like_leaves]
    for plan, (arrays, cotangent) in zip(factors.plans, factors.calls):
      if skip and plan.owns_only(skip):
        continue
      owner = dict(plan.param_map)
      for path, x in _call_shares(plan, take(tuple(arrays)), take(cotangent),
                                  like_leaves, axes):
        i = owner[path]
        if i not in skip:
          out[i] = out[i] + x.astype(jnp.float32)
    if fb:
      basis = vma.mark_varying(take(jnp.eye(factors.batch_size,
                                            dtype=jnp.float32)), axes)
      for i, x in zip(fb, jax.vmap(lambda e: vjp(e)[0])(basis)):
        out[i] = out[i] + x
    return jax.tree.unflatten(factors.params_treedef, out)

  return rows


def _call_shares(plan, arrays, cotangent, like_leaves, axes):
  """``((path, f32[B, *leaf]), ...)``: one call's per-example shares."""
  if plan.per_example:       # cotangent: the per-example gradients
    return tuple(param_paths(cotangent))
  if layers.has_tap_rule(plan.module, plan.method,
                         tuple(jnp.shape(a) for a in arrays)):
    (x,) = arrays
    return tuple(layers.conv_per_example_grads(plan.module, x,
                                               cotangent).items())
  zero = plan.module_params({i: vma.mark_varying(
      jnp.zeros(jnp.shape(like_leaves[i]), jnp.float32), axes)
      for _, i in plan.param_map})

  def one(arrays_i, cot_i):
    args_i, kwargs_i = plan.call_args(tuple(a[None] for a in arrays_i))
    return jax.grad(lambda d: layers.contract(
        plan.module, plan.method, d, args_i, kwargs_i, cot_i[None])[0])(zero)

  # On an explicit-sharding mesh the inputs and the cotangent may be split
  # differently over the batch, which vmap refuses: gathered (exact path).
  arrays, cotangent = jax.tree.map(table.replicated, (tuple(arrays), cotangent))
  return tuple(param_paths(jax.vmap(one)(arrays, cotangent)))


def ghost_plans(factors, val_calls, frozen, contraction, rank) -> dict:
  """``{call index: (kernel leaf, bias leaf)}`` of the Dense calls to contract
  by the ghost rule: the validation pass saw the call, its kernel is
  trainable, and (``"auto"``) the cost model says the ghost rule is cheaper.
  ``val_calls``: ``{key: (inputs, cotangent)}`` (shapes suffice)."""
  chosen = {}
  # A kernel used by several calls (shared weights) has G summed over all of
  # them, which one call's validation factors do not give: exact rule.
  owners = collections.Counter(i for pl in factors.plans for _, i in pl.param_map)
  val_owners = collections.Counter(key[0] for key in val_calls)
  for idx, plan in enumerate(factors.plans):
    if not layers.has_ghost_rule(plan.module, plan.method) or plan.per_example:
      continue
    names = {path: i for path, i in plan.param_map}
    kernel = names.get(("kernel",))
    if (kernel is None or kernel in frozen or plan.key not in val_calls
        or owners[kernel] != 1 or val_owners[plan.key[0]] != 1):
      continue
    inputs, cot = factors.calls[idx]
    (a,) = inputs
    tokens = int(np.prod(a.shape[:-1]))
    d_in, d_out = a.shape[-1], cot.shape[-1]
    val_tokens = int(np.prod(val_calls[plan.key][0][0].shape[:-1]))
    per_example = tokens // max(factors.batch_size, 1)
    if (contraction == "ghost" or ghost.ghost_cost(
        tokens, val_tokens, d_in, d_out, rank,
        spot_tokens=min(GHOST_SPOT_CHECK, factors.batch_size) * per_example)
        < ghost.exact_cost(tokens, d_in, d_out)):
      chosen[idx] = (kernel, names.get(("bias",)))
  return chosen


def ghost_contract(factors: Factors, plans: dict, scales, val_grads, val_calls,
                   stacked, grads, rank: int, tol, axis_name=None):
  """Values of the chosen Dense calls, f32[B_local, E_lin], and what they add
  up to, f32[E_lin] (``g . d`` over the chosen kernels, for the add-up check).

  Args:
    factors: the batch's factors; plans: from :func:`ghost_plans`.
    scales, val_grads, val_calls: per linear estimator ``j``, its
      elementwise scale ``S``, its validation gradient ``G`` and its
      validation pass's ``{call key: (inputs, cotangent)}``.
    stacked: the directions, leaves ``[E_lin, ...]``.
    grads: the batch gradient ``g``.
    rank: ``K`` of the factorisation; tol: the spot check's tolerance, or
      ``None`` for no spot check.

  Per call and estimator the scale is factored (rank 1: log-magnitude two-way
  means weighted by ``|G|``; rank ``K > 1``: subspace iteration) and the
  ghost values are spot-checked against the exact rule on the first
  ``GHOST_SPOT_CHECK`` examples: within ``tol`` (relative 2-norm) the ghost
  values stand, otherwise the call is contracted exactly (``lax.cond``: the
  exact branch only runs when needed).  Under data parallelism the check's
  error is summed over ``axis_name``, so every device decides alike.

  The add-up target of a ghost call is ``g . ((r q^T) * G)``, computed from
  the validation factors (``G = sum_r a'_r b'_r^T``) as
  ``sum_{r,k} ((r_k * a'_r)^T g) . (q_k * b'_r)``: ``R K`` products with the
  kernel gradient instead of forming the factored direction.
  """
  original = factors.params_treedef.flatten_up_to(stacked)
  g_leaves = jax.tree.leaves(grads)
  num_dirs = len(scales)
  total = jnp.zeros((factors.batch_size, num_dirs), jnp.float32)
  expected = jnp.zeros((num_dirs,), jnp.float32)
  f32 = jnp.float32
  for idx, (kernel, bias) in plans.items():
    plan = factors.plans[idx]
    (a,), b = factors.calls[idx]
    call_args, call_kwargs = plan.call_args((a,))
    g_kernel = g_leaves[kernel].astype(f32)
    cols, sums = [], []
    for j in range(num_dirs):
      s_k = jax.tree.leaves(scales[j])[kernel].astype(f32)
      g_k = jax.tree.leaves(val_grads[j])[kernel].astype(f32)
      if rank == 1:
        r, q = ghost.factor_log_metric(s_k, jnp.abs(g_k))
      else:
        r, q = ghost.factor_metric(s_k, rank)
      (va,), vb = val_calls[j][plan.key]
      bias_dir = None if bias is None else original[bias][j]
      ghost_vals = ghost.ghost_values(a, b, va, vb, r, q, bias_dir)
      ap = va.reshape(-1, va.shape[-1]).astype(f32)             # [R, d_in]
      bp = vb.reshape(-1, vb.shape[-1]).astype(f32)             # [R, d_out]
      left = jnp.einsum("ri,ik,io->rko", ap, r, g_kernel)
      factored = jnp.einsum("rko,ro,ok->", left, bp, q)
      if tol is None:             # no spot check: the ghost values stand
        cols.append(ghost_vals)
        sums.append(factored)
        continue
      # Spot check: the exact rule on the first few examples of the batch.
      d_mod = plan.module_params([x[j] for x in original])
      m = min(GHOST_SPOT_CHECK, factors.batch_size)
      spot = layers.contract(plan.module, plan.method, d_mod, (a[:m],),
                             call_kwargs, b[:m])
      num = jnp.sum(jnp.square(ghost_vals[:m] - spot))
      den = jnp.sum(jnp.square(spot))
      if axis_name is not None:
        num, den = jax.lax.psum((num, den), axis_name)
      ok = jnp.sqrt(num) <= tol * (jnp.sqrt(den) + 1e-30)
      if rank == 1:
        # Positive factors cannot follow a metric of both signs: the share
        # of the direction on negative entries must be negligible.
        mass = jnp.abs(s_k * g_k)
        ok = ok & (jnp.sum(jnp.where(s_k < 0, mass, 0.0))
                   <= GHOST_NEGATIVE_MASS * jnp.sum(mass))

      def use_exact(_, d_mod=d_mod, b=b):
        return layers.contract(plan.module, plan.method, d_mod, call_args,
                               call_kwargs, b)

      cols.append(jax.lax.cond(ok, lambda _, gv=ghost_vals: gv, use_exact, None))
      exact = jnp.vdot(g_kernel, original[kernel][j].astype(f32))
      sums.append(jnp.where(ok, factored, exact))
    total = total + jnp.stack(cols, axis=1)
    expected = expected + jnp.stack(sums)
  return total, expected
