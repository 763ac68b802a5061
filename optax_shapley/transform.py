"""The Shapley transformation: any optax optimizer plus per-example values.

``with_shapley(inner, num_examples=N)`` wraps an optax transformation.  Its
updates are exactly the inner optimizer's; alongside, every step credits each
example ``i`` of the batch with (docs/index.md, "What is computed" and "Estimators")::

    phi_{t,i} ~= x_i . d_t,    d_t = -D_t^T grad L(wbar_t),    x_i = c grad l_i(w_t)

approximating the Shapley value of the one-step utility
``U_t(S) = L(w_t) - L(w_t + u_t(g_S))`` (positive: example ``i`` lowered the
validation loss), and accumulates ``Phi_i = sum_t phi_{t,i}``.
"""

from __future__ import annotations

import collections
from typing import Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

import flax.linen as nn

from optax_shapley import capture, ghost, layers, metrics

# Bits of ShapleyState.error: why a step's credit was skipped.
ERROR_ID_OUT_OF_RANGE = 1
ERROR_DUPLICATE_ID = 2
ERROR_NON_FINITE = 4
ERROR_CAPTURE_MISMATCH = 8
# sum_i x_i . d must equal grads . d (the x_i add up to the batch gradient);
# a larger relative gap means the capture missed a use of some parameter.
CAPTURE_RTOL = 1e-2
# Examples on which ghost values are checked against the exact rule each step.
GHOST_SPOT_CHECK = 8
# The rank-1 ghost rule is used only where at most this share of the
# direction's mass (sum |S G|) sits on negative metric entries.
GHOST_NEGATIVE_MASS = 1e-2
# Where the accumulated values live (with_shapley(table=...)).
TABLES = ("replicated", "sharded", "none")
_ERROR_TEXT = {
    ERROR_ID_OUT_OF_RANGE: "an example id was out of range [0, num_examples)",
    ERROR_DUPLICATE_ID: "an example id appeared twice in one batch",
    ERROR_NON_FINITE: ("a step value was NaN or infinite (NaN/inf loss, "
                       "gradient or validation loss)"),
    ERROR_CAPTURE_MISMATCH: (
        "the per-example values did not add up to grads . d: the grads passed "
        "to update are not the gradient of the batch the factors came from, or "
        "the model uses a parameter outside the module calls the capture saw "
        "(e.g. an L2 penalty or a kernel read directly); please report the "
        "model"),
}


class ShapleyState(NamedTuple):
  """State of :func:`with_shapley`.

  Attributes:
    inner_state: the wrapped optax optimizer's state.
    values: f32[num_examples] (``[num_examples, E]`` with several estimators,
      ``[..., K]`` with several targets): accumulated values
      ``Phi_i = sum_t phi_{t,i}``; positive = helpful.
    step_values: f32[B] (``[B, E]``, ``[B, K]`` or ``[B, E, K]`` as
      ``values``): the last step's values, aligned with
      the last ``example_ids`` (gathered in device order under data
      parallelism).  Zeros before the first step.
    count: int32, number of steps taken.
    skipped: int32, number of steps whose credit was skipped (see ``error``).
    error: int32 bitmask of the reasons credit was skipped (``ERROR_*``).
  """
  inner_state: optax.OptState
  values: jax.Array
  step_values: jax.Array
  count: jax.Array
  skipped: jax.Array
  error: jax.Array


def _as_tuple(x):
  return tuple(x) if isinstance(x, (tuple, list)) else (x,)


def _estimators(metric, evaluation):
  """Broadcasts ``metric`` and ``evaluation`` to a list of pairs."""
  ms, es = _as_tuple(metric), _as_tuple(evaluation)
  if len(ms) != len(es) and 1 not in (len(ms), len(es)):
    raise ValueError(
        f"metric {metric!r} and evaluation {evaluation!r} must have the same "
        "length, or one of them must be a single name")
  n = max(len(ms), len(es))
  ms, es = ms * (n // len(ms)), es * (n // len(es))
  for m in ms:
    if m not in metrics.METRICS:
      raise ValueError(f"unknown metric {m!r}; choose from {metrics.METRICS}")
  for e in es:
    if e not in metrics.EVALUATIONS:
      raise ValueError(
          f"unknown evaluation {e!r}; choose from {metrics.EVALUATIONS}")
  return tuple(zip(ms, es))


def with_shapley(
    inner: optax.GradientTransformation,
    *,
    num_examples: int,
    metric: str | Sequence[str] = "secant",
    evaluation: str | Sequence[str] = "midpoint",
    batch_size: int | None = None,
    contraction: str = "auto",
    axis_name: str | None = None,
    learning_rate: float | optax.Schedule | None = None,
    b1: float | None = None,
    b2: float | None = None,
    eps: float | None = None,
    fixed_state_previous: bool = False,
    elementwise: bool = False,
    secant_nodes: int = 3,
    coalition_permutations: int = 64,
    ghost_rank: int = 1,
    ghost_tol: float | None = 0.03,
    num_targets: int | None = None,
    table: str = "replicated",
    closed_form: str | None = None,
) -> optax.GradientTransformationExtraArgs:
  """Wraps ``inner`` to accumulate per-example in-run data Shapley values.

  ``update(grads, state, params, *, factors, example_ids, val_loss,
  val_weights=None)``:

  - ``grads``: the batch gradient (global mean under data parallelism).
  - ``factors``: from :func:`optax_shapley.value_grad_and_factors` on the
    same batch (the local shard under data parallelism).
  - ``example_ids``: int[B], distinct ids in ``[0, num_examples)``.
  - ``val_loss``: ``params -> f32[V]`` per-example validation losses; the
    target is their mean ``L``.
  - ``val_weights``: f32[K, V], only with ``num_targets=K``: target ``k`` is
    ``L_k(w) = sum_v W[k, v] l_v(w)`` (a row of ``1/V`` is the mean;
    :func:`optax_shapley.class_targets` gives one target per class).  All
    ``K`` validation gradients come from one backward pass (``jax.vjp`` of
    ``val_loss`` with the ``K`` rows as cotangents, vectorised).

  The returned updates are bit-identical to ``inner.update``.  Values are
  accumulated in ``state.values``; read them with :func:`values`.

  Args:
    inner: any optax transformation (the optimizer).
    num_examples: ``N``, the size of the values table.
    metric: ``"secant"`` (default), ``"linearized"``, ``"fixed_state"`` (the
      paper's method, Adam only), ``"sgd"`` (In-Run Data Shapley baseline)
      or ``"removal"`` (each example's share taken out of the real update,
      :func:`optax_shapley.metrics.removal_values`; with ``"end"``,
      leave-one-out) or ``"coalitions"`` (Shapley values of the real update
      re-run on coalitions, first order in the loss only,
      :func:`optax_shapley.metrics.coalition_values`); these two form
      per-example gradients, so they cost ``B`` times the parameters' memory
      and many optimizer updates.  A tuple tracks several estimators in one
      run.
    evaluation: ``"midpoint"`` (default), ``"start"`` or ``"end"``; a tuple
      pairs with ``metric`` (a single name is broadcast).
    batch_size: the (global) batch size ``B``, to size ``step_values`` at
      ``init``; if ``None`` the first update changes its shape (one retrace).
    contraction: ``"exact"``: every module call by its exact rule;
      ``"ghost"``: ``nn.Dense`` kernels by the ghost rule
      (:mod:`optax_shapley.ghost`: validation factors and a rank
      ``ghost_rank`` factorisation of the elementwise metric) wherever the
      metric is elementwise; ``"auto"`` (default): per Dense call, the ghost
      rule where its cost model says it is cheaper, else exact.
    ghost_rank: ``K`` of the metric factorisation (1 = the paper's
      Linearized Ghost Approximation).
    num_targets: ``K``, the number of validation targets (rows of
      ``val_weights``); values then get a trailing axis ``K``.  ``None``
      (default): one target, the mean validation loss, and no trailing axis.
      With targets, every call is contracted by its exact rule (no ghost).
    table: where the accumulated values live.  ``"replicated"`` (default):
      every device holds the whole ``[num_examples, ...]`` table.
      ``"sharded"``: each device on ``axis_name`` owns a contiguous slice of
      example ids (device ``k`` of ``D`` holds ids ``[k N/D, (k+1) N/D)``;
      ``N`` must be divisible by ``D``); shard ``state.values`` over the
      axis (:func:`state_partition_specs` gives the specs).  Under plain
      ``jit`` without ``axis_name`` the table is one global array whatever
      its sharding, so ``"sharded"`` only documents the intent there.
      ``"none"``: no table (``values`` has zero rows); read each step's
      ``step_values`` and stream them with :class:`optax_shapley.ValueWriter`
      for ``num_examples`` beyond any device's memory.
    ghost_tol: a Dense call keeps its ghost values at a step only if they
      are within this relative error (2-norm) of the exact rule on the first
      ``GHOST_SPOT_CHECK`` examples (a cheap spot check); otherwise that call
      is contracted exactly (``inf``: always ghost).  The default 0.03 kept
      the Pearson R lost against the exact rule below 0.001 at steps >= 10
      on every fidelity model with the ghost rule forced; 0.05 lost up to
      0.005 on their 32-wide layers (``docs/bench.md``).  ``None``: no spot
      check and no fallback (the cheapest ghost rule; its accuracy is that of
      the factorisation, see ``docs/bench.md``).  With a number (``inf``
      included) a rank-1 factorisation is also refused where more than
      ``GHOST_NEGATIVE_MASS`` of the direction sits on negative metric
      entries; ``None`` never refuses.
    axis_name: the data-parallel axis under ``jax.pmap`` / ``jax.shard_map``.
    learning_rate, b1, b2, eps: the Adam hyperparameters, needed by the
      ``sgd`` (``learning_rate`` only) and ``fixed_state`` metrics.
    fixed_state_previous: ``fixed_state`` uses ``vhat_{t-1}`` (the paper's
      Taylor base point) instead of ``vhat_t``.
    coalition_permutations: permutations per step of the ``"coalitions"``
      metric when ``B > 12`` (exact enumeration below).
    closed_form: ``"adam"`` when ``inner`` is ``optax.adam`` / ``optax.adamw``
      with these ``learning_rate``, ``b1``, ``b2``, ``eps`` (set by
      :func:`adam` and :func:`adamw`): the secant metric is then computed in
      closed form (:func:`optax_shapley.metrics.adam_secant_scale`, one
      elementwise expression) instead of from ``u(g)``, ``u(0)`` and a ``jax.jvp``
      of the update.  ``None`` (default): from the update, for any optimizer.
    elementwise: ``inner`` acts coordinate-wise (Adam, AdamW, SGD, RMSProp):
      the secant metric is then an exact difference quotient.  Leave False
      for optimizers that mix coordinates (global-norm clipping); secant then
      uses ``secant_nodes``-point quadrature of ``jax.vjp`` along the ray.

  Raises:
    ValueError: unknown metric/evaluation/contraction, or a metric that needs
      hyperparameters that were not given, or ``num_targets < 1``.  At
      ``update``: ``val_weights`` missing with ``num_targets``, given
      without it, or not of shape ``[K, V]``.
  """
  ests = _estimators(metric, evaluation)
  multi = isinstance(metric, (tuple, list)) or isinstance(evaluation, (tuple, list))
  if closed_form not in (None, "adam"):
    raise ValueError(f"closed_form must be None or 'adam', got {closed_form!r}")
  if closed_form == "adam" and None in (learning_rate, b1, b2, eps):
    raise ValueError("closed_form='adam' needs learning_rate, b1, b2 and eps")
  if contraction not in ("auto", "exact", "ghost"):
    raise ValueError("contraction must be 'auto', 'exact' or 'ghost', got "
                     f"{contraction!r}")
  if num_examples <= 0:
    raise ValueError(f"num_examples must be positive, got {num_examples}")
  if num_targets is not None and num_targets < 1:
    raise ValueError(f"num_targets must be >= 1, got {num_targets}")
  if table not in TABLES:
    raise ValueError(f"table must be one of {TABLES}, got {table!r}")
  used = {m for m, _ in ests}
  if used & {"sgd", "fixed_state"} and learning_rate is None:
    raise ValueError("metrics 'sgd' and 'fixed_state' need learning_rate")
  if "fixed_state" in used and None in (b1, b2, eps):
    raise ValueError("metric 'fixed_state' needs the Adam b1, b2 and eps")
  inner = optax.with_extra_args_support(inner)
  num_est = len(ests)
  value_shape = ((num_est,) if multi else ()) + (
      (num_targets,) if num_targets is not None else ())

  def init_fn(params):
    b = 0 if batch_size is None else batch_size
    return ShapleyState(
        inner_state=inner.init(params),
        values=jnp.zeros((0 if table == "none" else num_examples,)
                         + value_shape, jnp.float32),
        step_values=jnp.zeros((b,) + value_shape, jnp.float32),
        count=jnp.zeros([], jnp.int32),
        skipped=jnp.zeros([], jnp.int32),
        error=jnp.zeros([], jnp.int32),
    )

  def update_fn(updates, state, params=None, *, factors=None, example_ids=None,
                val_loss=None, val_weights=None, **extra_args):
    if params is None:
      raise ValueError("with_shapley needs params (tx.update(grads, state, params, ...))")
    if not isinstance(factors, capture.Factors):
      raise ValueError("tx.update needs factors=..., from "
                       "optax_shapley.value_grad_and_factors on the same batch")
    if example_ids is None or val_loss is None:
      raise ValueError("tx.update needs example_ids=... and val_loss=...")
    if not callable(val_loss):
      raise TypeError(
          "val_loss must be a function params -> f32[V] of per-example "
          f"validation losses, got {type(val_loss).__name__}")
    grads = updates
    example_ids = jnp.asarray(example_ids)
    if example_ids.shape != (factors.batch_size,):
      raise ValueError(
          f"example_ids has shape {example_ids.shape} but the factors are for "
          f"a batch of {factors.batch_size} examples")
    if not jnp.issubdtype(example_ids.dtype, jnp.integer):
      raise ValueError(f"example_ids must be integers, got {example_ids.dtype}")
    _check_concrete_ids(example_ids, num_examples)

    inner_update = lambda g: inner.update(g, state.inner_state, params, **extra_args)
    u_g, new_inner = inner_update(grads)
    update_of = lambda g: inner_update(g)[0]
    need_zero = any(m == "coalitions" or e == "midpoint"
                    or (m == "secant" and closed_form != "adam")
                    for m, e in ests)
    u_0 = update_of(jax.tree.map(jnp.zeros_like, grads)) if need_zero else None

    val_mean = _validation_objective(val_loss, params)
    weights = _target_weights(val_weights, num_targets, val_loss, params)
    eta = (metrics.learning_rate_at(learning_rate, state.count)
           if learning_rate is not None else None)
    frozen = metrics.frozen_leaves(update_of, grads)
    linear = [k for k, (m, _) in enumerate(ests) if m in metrics.LINEAR_METRICS]

    # Which Dense calls take the ghost rule is decided at trace time from
    # shapes (the validation factors' shapes by jax.eval_shape), so the
    # validation pass keeps its factors only when some call uses them.
    val_capture = capture.value_grad_and_factors(
        lambda p: val_loss(p).astype(jnp.float32), per_example="never",
        _data_closed_over=True)
    plans = {}
    if (contraction != "exact" and linear and weights is None
        and all(ests[k][0] in ("sgd", "fixed_state") or elementwise for k in linear)
        and any(type(p.module) is nn.Dense for p in factors.plans)):
      vf_shape = jax.eval_shape(val_capture, params)[2]
      shape_calls = {pl.key: c for pl, c in zip(vf_shape.plans, vf_shape.calls)}
      plans = _ghost_plans(factors, shape_calls, frozen, contraction, ghost_rank)
    val_grads, val_calls = {}, {}
    val_finite = jnp.array(True)
    for e in dict.fromkeys(e for _, e in ests):
      w_bar = metrics.evaluation_point(e, params, u_g, u_0)
      if plans:        # the validation pass also keeps its Dense factors
        val_losses, val_grads[e], vf = val_capture(w_bar)
        val_calls[e] = {pl.key: c for pl, c in zip(vf.plans, vf.calls)}
      elif weights is not None:
        val_losses, val_grads[e] = _target_grads(val_loss, w_bar, weights)
      else:
        val_losses, val_grads[e] = jax.value_and_grad(val_mean)(w_bar)
      # The metrics zero a direction's non-finite entries (a secant's 0/0);
      # a NaN/inf validation loss or gradient must not pass as a clean step.
      val_finite = val_finite & _all_finite((val_losses, val_grads[e]))

    # After the update, the closed form reads the gradient back from Adam's
    # moments (arguments and outputs of the step), so no gradient-sized
    # buffer lives through the validation pass.
    late_g, g_dot = grads, None
    if closed_form == "adam" and _float32_moments(state.inner_state, grads):
      prev_adam = metrics.find_adam_state(state.inner_state)
      new_adam = metrics.find_adam_state(new_inner)
      late_g = metrics.adam_gradient(prev_adam, new_adam, b1=b1)
      g_dot = lambda d: metrics.adam_gradient_dot(d, prev_adam, new_adam, b1=b1)
    dirs, scales = [], []
    for k in linear:
      m, e = ests[k]
      v = val_grads[e]
      scale = None                       # S with d = S * v, when elementwise
      if m == "sgd":
        scale = metrics.sgd_scale(grads, learning_rate=eta)
      elif m == "fixed_state":
        scale = metrics.fixed_state_scale(
            grads, metrics.find_adam_state(new_inner), learning_rate=eta,
            b1=b1, b2=b2, eps=eps, previous=fixed_state_previous,
            prev_state=metrics.find_adam_state(state.inner_state))
      elif elementwise and m == "linearized":
        scale = metrics.linearized_scale(update_of, grads)
      elif elementwise and closed_form == "adam":
        scale = metrics.adam_secant_scale(
            late_g, metrics.find_adam_state(state.inner_state),
            learning_rate=eta, b1=b1, b2=b2, eps=eps)
      elif elementwise:
        scale = metrics.secant_scale(update_of, grads, u_g, u_0)
      def direction(v, m=m, scale=scale):
        if scale is not None:
          return metrics.scale_times(scale, v)
        if m == "linearized":
          return metrics.linearized_direction(update_of, grads, v)
        return metrics.secant_direction(update_of, grads, u_g, u_0, v,
                                        elementwise=False, nodes=secant_nodes)
      # With targets, v has leaves [K, ...]: one direction per target.
      d = direction(v) if weights is None else jax.vmap(direction)(v)
      dirs.append(_zero_leaves(d, frozen))
      scales.append(scale)
    # Under data parallelism x_i carries 1/B_local for a mean; 1/B_global wanted.
    dp_mean = axis_name is not None and factors.reduction == "mean"
    n_dev = jax.lax.psum(1, axis_name) if dp_mean else 1
    # An earlier transformation in a chain (clip_by_global_norm) may have
    # rescaled the batch gradient: the shares are then c * x_i.
    n_dev, rescale_error = _upstream_scale(grads, factors, axis_name, n_dev)
    columns = [None] * num_est
    mismatch = rescale_error
    num_k = 1 if weights is None else num_targets
    if dirs:
      # Rows are (estimator, target) pairs, estimator-major: [E_lin * K, ...].
      stacked = jax.tree.map(
          lambda *xs: jnp.stack(xs).astype(jnp.float32).reshape(
              (-1,) + xs[0].shape[(weights is not None):]), *dirs)
      lin = capture.contract(factors, stacked, frozen,
                             skip_calls=tuple(plans))     # f32[B_local, E_lin]
      ghost_expected, ghost_kernels = None, ()
      if plans:
        extra, ghost_expected = _ghost_contract(
            factors, plans, linear, ests, scales, val_grads, val_calls, stacked,
            late_g, ghost_rank, ghost_tol, axis_name)
        lin = lin + extra
        ghost_kernels = tuple(kernel for kernel, _ in plans.values())
      lin = lin / n_dev
      mismatch = _check_sum(lin, grads, stacked, axis_name,
                            skip_leaves=ghost_kernels,
                            extra_expected=ghost_expected,
                            g_dot=g_dot) | rescale_error
      lin = lin.reshape((lin.shape[0], len(linear), num_k))
      for j, k in enumerate(linear):
        columns[k] = lin[:, j] if weights is not None else lin[:, j, 0]
    if len(linear) < num_est:
      shares = jax.tree.map(lambda x: x / n_dev,
                            capture.per_example_grads(factors, grads, frozen))
      for k, (m, e) in enumerate(ests):
        if m == "removal":
          column = lambda v: metrics.removal_values(update_of, grads, u_g,
                                                    shares, v)
        elif m == "coalitions":
          column = lambda v: _coalitions(update_of, u_0, shares, v, state.count,
                                         axis_name, coalition_permutations)
        else:
          continue
        # Targets: vmap over the K gradients; the updates do not depend on
        # them, so only the final dot products are batched.
        columns[k] = (column(val_grads[e]) if weights is None
                      else jax.vmap(column, out_axes=1)(val_grads[e]))
    local = jnp.stack(columns, axis=1)                    # f32[B_local, E]

    ids = example_ids.astype(jnp.int32)
    if axis_name is not None:
      local = _gather(local, axis_name)
      ids = _gather(ids, axis_name)
    else:           # plain jit on an explicit mesh: replicate the O(B) parts
      local, ids = _replicated(local), _replicated(ids)
    step_vals = local if multi else local[:, 0]

    error = (_validate(ids, step_vals, num_examples) | mismatch
             | (~val_finite).astype(jnp.int32) * ERROR_NON_FINITE)
    ok = error == 0
    credit = jnp.where(ok, step_vals, 0).astype(jnp.float32)
    if table == "none":
      new_values = state.values
    elif table == "sharded" and axis_name is not None:
      new_values = _add_to_shard(state.values, ids, credit, ok, num_examples,
                                 axis_name)
    else:
      new_values = _scatter_add(state.values, jnp.where(ok, ids, 0), credit)
    new_state = ShapleyState(
        inner_state=new_inner,
        values=new_values,
        step_values=jnp.where(ok, step_vals, jnp.nan).astype(jnp.float32),
        count=state.count + 1,
        skipped=state.skipped + (~ok).astype(jnp.int32),
        error=state.error | error,
    )
    return u_g, new_state

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def _ghost_plans(factors, val_calls, frozen, contraction, rank) -> dict:
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
    if (type(plan.module) is not nn.Dense or plan.method != "__call__"
        or plan.per_example):
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


def _ghost_contract(factors, plans, linear, ests, scales, val_grads, val_calls,
                    stacked, grads, rank, tol, axis_name=None):
  """Values of the chosen Dense calls, f32[B_local, E_lin], and what they add
  up to, f32[E_lin] (``g . d`` over the chosen kernels, for the add-up check).

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
  total = jnp.zeros((factors.batch_size, len(linear)), jnp.float32)
  expected = jnp.zeros((len(linear),), jnp.float32)
  f32 = jnp.float32
  for idx, (kernel, bias) in plans.items():
    plan = factors.plans[idx]
    (a,), b = factors.calls[idx]
    call_args, call_kwargs = capture._unflatten_call_args(plan, ((a,)))  # pylint: disable=protected-access
    g_kernel = g_leaves[kernel].astype(f32)
    cols, sums = [], []
    for j, k in enumerate(linear):
      e = ests[k][1]
      s_k = jax.tree.leaves(scales[j])[kernel].astype(f32)
      g_k = jax.tree.leaves(val_grads[e])[kernel].astype(f32)
      if rank == 1:
        r, q = ghost.factor_log_metric(s_k, jnp.abs(g_k))
      else:
        r, q = ghost.factor_metric(s_k, rank)
      (va,), vb = val_calls[e][plan.key]
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
      d_mod = capture.module_direction(plan, [x[j] for x in original])
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


def _coalitions(update_of, u_0, shares, val_grad, count, axis_name,
                num_permutations):
  """The ``"coalitions"`` column for this device's examples, f32[B_local].

  Coalitions span the global batch, so under data parallelism the shares are
  all-gathered (``B_global`` times the parameters' memory on every device)
  and each device keeps its own slice.
  """
  key = jax.random.fold_in(jax.random.key(0), count)
  if axis_name is None:
    return metrics.coalition_values(update_of, u_0, shares, val_grad, key,
                                    num_permutations=num_permutations)
  local = jax.tree.leaves(shares)[0].shape[0]
  full = jax.tree.map(lambda x: jax.lax.all_gather(x, axis_name, tiled=True),
                      shares)
  vals = metrics.coalition_values(update_of, u_0, full, val_grad, key,
                                  num_permutations=num_permutations)
  start = jax.lax.axis_index(axis_name) * local
  return jax.lax.dynamic_slice_in_dim(vals, start, local)


def _explicit_sharding(x):
  """``x``'s sharding if it lives on a mesh with explicit axes, else None."""
  sharding = getattr(jax.typeof(x), "sharding", None)
  mesh = getattr(sharding, "mesh", None)
  if mesh is None or getattr(mesh, "empty", True) or not any(
      t == jax.sharding.AxisType.Explicit for t in mesh.axis_types):
    return None
  return sharding


def _replicated(x):
  """``x`` (O(B): ids, step values) gathered onto every device when an
  explicit-sharding mesh has it split over the batch; unchanged otherwise."""
  sharding = _explicit_sharding(x)
  if sharding is None or all(s is None for s in sharding.spec):
    return x
  return jax.sharding.reshard(x, jax.sharding.PartitionSpec())


# Largest relative distance of the received gradient from c * (the batch
# gradient of the factors) for the rescaling to count as one scalar.
RESCALE_RTOL = 1e-4


def _upstream_scale(grads, factors, axis_name, divisor):
  """``(divisor / c, error)`` where ``grads = c * factors.grads``.

  When ``tx.update`` receives exactly the arrays ``value_grad_and_factors``
  returned (the usual case, decided at trace time) ``c = 1`` and nothing is
  computed.  Otherwise (a transformation earlier in an ``optax.chain``
  changed them) ``c = <g', g> / <g, g>``, and ``error`` is
  ``ERROR_CAPTURE_MISMATCH`` unless ``|g' - c g| <= RESCALE_RTOL |g'|``: a
  global scalar (``clip_by_global_norm``) is this step's fixed factor on
  every share; anything else cannot be attributed from these factors.
  Under data parallelism (``axis_name``) the received gradient is a
  reduction of the local ones, so it is never compared.
  """
  none = jnp.zeros([], jnp.int32)
  ref = getattr(factors, "grads", None)
  if ref is None or axis_name is not None:
    return divisor, none
  got, want = jax.tree.leaves(grads), jax.tree.leaves(ref)
  if len(got) != len(want) or all(a is b for a, b in zip(got, want)):
    return divisor, none
  dot = lambda xs, ys: sum(jnp.vdot(x.astype(jnp.float32), y.astype(jnp.float32))
                           for x, y in zip(xs, ys))
  gg = dot(want, want)
  c = jnp.where(gg > 0, dot(got, want) / jnp.where(gg > 0, gg, 1.0), 1.0)
  resid = dot([a - c * b for a, b in zip(got, want)],
              [a - c * b for a, b in zip(got, want)])
  bad = resid > (RESCALE_RTOL ** 2) * dot(got, got)
  return divisor / c, bad.astype(jnp.int32) * ERROR_CAPTURE_MISMATCH


def _scatter_add(values, ids, credit):
  """``values.at[ids].add(credit)``; under an explicit-sharding mesh the
  output keeps the table's own sharding (the compiler cannot infer it from
  batch-sharded ids; docs/index.md, "Data parallel")."""
  sharding = _explicit_sharding(values)
  if sharding is not None:
    return values.at[ids].add(credit, mode="drop", out_sharding=sharding)
  return values.at[ids].add(credit, mode="drop")


def _add_to_shard(local, ids, credit, ok, num_examples, axis_name):
  """Adds the gathered ``credit`` of global ``ids`` to this device's slice
  ``local`` of a table sharded over ``axis_name``; ids outside the slice
  are dropped (another device owns them)."""
  rows = local.shape[0]
  devices = jax.lax.psum(1, axis_name)
  if rows * devices != num_examples:
    raise ValueError(
        f"table='sharded': state.values holds {rows} rows per device on "
        f"{devices} devices, but num_examples is {num_examples}; shard the "
        "values over the data axis (state_partition_specs) with num_examples "
        "divisible by the axis size")
  start = jax.lax.axis_index(axis_name) * rows
  local_ids = jnp.where(ok, ids - start, -1)
  local_ids = jnp.where((local_ids >= 0) & (local_ids < rows), local_ids, rows)
  return local.at[local_ids].add(credit, mode="drop")


def state_partition_specs(state, axis_name: str):
  """``PartitionSpec`` tree for ``state`` (or an optimizer state containing
  a :class:`ShapleyState`) under ``jax.shard_map``: the values table split
  over ``axis_name`` (rows), everything else replicated (``P()``).  Use it
  as the state's ``in_specs``/``out_specs`` with ``table="sharded"``; for
  ``jax.jit`` build ``NamedSharding(mesh, spec)`` from it."""
  from jax.sharding import PartitionSpec as P
  is_state = lambda x: isinstance(x, ShapleyState)

  def spec(x):
    if is_state(x):
      return ShapleyState(
          inner_state=jax.tree.map(lambda _: P(), x.inner_state),
          values=P(axis_name), step_values=P(), count=P(), skipped=P(),
          error=P())
    return P()

  return jax.tree.map(spec, state, is_leaf=is_state)


def _zero_leaves(tree, indices):
  """``tree`` with the leaves at ``indices`` (leaves order) set to zero."""
  if not indices:
    return tree
  leaves, treedef = jax.tree.flatten(tree)
  return treedef.unflatten([jnp.zeros_like(x) if i in indices else x
                            for i, x in enumerate(leaves)])


def _gather(x, axis_name) -> jax.Array:
  """Concatenates ``x`` over ``axis_name`` in device order, device-invariant.

  A ``psum`` of one-hot blocks rather than ``all_gather``: under
  ``shard_map`` with ``check_vma`` the result is then typed as replicated, so
  the state can leave with ``out_specs=P()``.  Communication is O(B).
  """
  n = jax.lax.psum(1, axis_name)
  i = jax.lax.axis_index(axis_name)
  buf = jnp.zeros((n,) + x.shape, x.dtype).at[i].set(x)
  return jax.lax.psum(buf, axis_name).reshape((n * x.shape[0],) + x.shape[1:])


def _target_weights(val_weights, num_targets, val_loss, params):
  """``val_weights`` as f32[K, V] after checking it against ``num_targets``
  and the shape of ``val_loss(params)``; ``None`` without targets."""
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


def _float32_moments(inner_state, grads) -> bool:
  """Whether Adam's first moment is float32 and shaped like ``grads``
  (trace time): :func:`metrics.adam_gradient` then loses only the digits of
  ``g`` that float32 ``mu'`` lost (a bfloat16 moment would lose most)."""
  try:
    mu = metrics.find_adam_state(inner_state).mu
  except ValueError:
    return False
  if jax.tree.structure(mu) != jax.tree.structure(grads):
    return False
  return all(m.dtype == jnp.float32 and m.shape == g.shape
             for m, g in zip(jax.tree.leaves(mu), jax.tree.leaves(grads)))


def _all_finite(tree) -> jax.Array:
  """bool[]: every entry of every inexact leaf of ``tree`` is finite."""
  return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)
                            if jnp.issubdtype(jnp.result_type(x), jnp.inexact)]
                           or [jnp.array(True)]))


def _validation_objective(val_loss, params) -> Callable:
  out = jax.eval_shape(val_loss, params)
  if not hasattr(out, "shape") or len(out.shape) != 1:
    raise ValueError(
        "val_loss(params) must return per-example validation losses of shape "
        f"[V]; got {getattr(out, 'shape', type(out))}")
  return lambda p: jnp.mean(val_loss(p).astype(jnp.float32))


def _check_concrete_ids(ids, num_examples):
  """Raises at once when the ids are concrete (not traced) and invalid."""
  if isinstance(ids, jax.core.Tracer):
    return
  a = np.asarray(ids)
  bad = a[(a < 0) | (a >= num_examples)]
  if bad.size:
    raise ValueError(f"example id {int(bad[0])} out of range [0, {num_examples})")
  uniq, counts = np.unique(a, return_counts=True)
  if (counts > 1).any():
    raise ValueError(f"example id {int(uniq[counts > 1][0])} appears more than "
                     "once in the batch")


def _check_sum(step_vals, grads, directions, axis_name=None,
               skip_leaves=(), extra_expected=None,
               g_dot=None) -> jax.Array:
  """``ERROR_CAPTURE_MISMATCH`` unless ``sum_i x_i . d_e = g . d_e`` for all e.

  The per-example shares ``x_i`` sum to the batch gradient ``g``, so the
  values of a step must sum to ``g . d``; one dot product per estimator.
  ``step_vals`` f32[B_local, E]; sums run over ``axis_name`` when given.
  Leaves in ``skip_leaves`` (ghost kernels) contribute ``extra_expected``
  f32[E] instead of ``g . d``.  ``g_dot``, when given, maps the directions
  to trees of per-leaf f32[E] ``g . d`` and bounds on their rounding error
  (:func:`metrics.adam_gradient_dot`, ``g`` read back from Adam's moments);
  it replaces the dot products with ``grads`` and the bounds widen the
  tolerance ``CAPTURE_RTOL * (sum_i |x_i . d| + |g . d|)``.
  """
  skip = frozenset(skip_leaves)
  slack = 0.0
  if g_dot is not None:
    dots, errs = (jax.tree.leaves(t) for t in g_dot(directions))
    slack = sum(errs)      # ghost kernels read the same recovered g
  else:
    dots = [jnp.tensordot(d, g.astype(jnp.float32), axes=g.ndim)
            for g, d in zip(jax.tree.leaves(grads), jax.tree.leaves(directions))]
  expected = sum(x for n, x in enumerate(dots) if n not in skip)
  if extra_expected is not None:
    expected = expected + extra_expected
  total = jnp.sum(step_vals, axis=0)
  size = jnp.sum(jnp.abs(step_vals), axis=0)
  if axis_name is not None:
    total, size = jax.lax.psum((total, size), axis_name)
  size = size + jnp.abs(expected)
  bad = jnp.any(jnp.abs(total - expected) > CAPTURE_RTOL * size + slack)
  return bad.astype(jnp.int32) * ERROR_CAPTURE_MISMATCH


def _validate(ids, step_vals, num_examples) -> jax.Array:
  """In-graph checks; int32 bitmask, 0 when the step's credit is valid."""
  out_of_range = jnp.any((ids < 0) | (ids >= num_examples))
  s = jnp.sort(ids)
  dup = jnp.any(s[1:] == s[:-1]) if ids.shape[0] > 1 else jnp.array(False)
  non_finite = ~jnp.all(jnp.isfinite(step_vals))
  return (out_of_range.astype(jnp.int32) * ERROR_ID_OUT_OF_RANGE
          | dup.astype(jnp.int32) * ERROR_DUPLICATE_ID
          | non_finite.astype(jnp.int32) * ERROR_NON_FINITE)


def adam(learning_rate, b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8,
         *, num_examples: int, metric="secant", evaluation="midpoint",
         **kwargs) -> optax.GradientTransformationExtraArgs:
  """``optax.adam`` with in-run data Shapley values (see :func:`with_shapley`).

  The updates are exactly ``optax.adam(learning_rate, b1, b2, eps)``'s.
  """
  return with_shapley(
      optax.adam(learning_rate, b1=b1, b2=b2, eps=eps),
      num_examples=num_examples, metric=metric, evaluation=evaluation,
      learning_rate=learning_rate, b1=b1, b2=b2, eps=eps, elementwise=True,
      closed_form="adam", **kwargs)


def adamw(learning_rate, b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8,
          weight_decay: float = 1e-4, *, num_examples: int, metric="secant",
          evaluation="midpoint", mask=None,
          **kwargs) -> optax.GradientTransformationExtraArgs:
  """``optax.adamw`` with in-run data Shapley values (see :func:`with_shapley`).

  Weight decay does not depend on the gradient, so it belongs to nobody:
  it drops out of every metric (it is part of ``u(0)``).
  """
  return with_shapley(
      optax.adamw(learning_rate, b1=b1, b2=b2, eps=eps,
                  weight_decay=weight_decay, mask=mask),
      num_examples=num_examples, metric=metric, evaluation=evaluation,
      learning_rate=learning_rate, b1=b1, b2=b2, eps=eps, elementwise=True,
      closed_form="adam", **kwargs)


def sgd(learning_rate, momentum: float | None = None, nesterov: bool = False,
        *, num_examples: int, metric="secant", evaluation="midpoint",
        **kwargs) -> optax.GradientTransformationExtraArgs:
  """``optax.sgd`` with in-run data Shapley values (see :func:`with_shapley`).

  With ``metric="sgd", evaluation="start"`` and no momentum this is
  first-order In-Run Data Shapley (Wang et al. 2024).
  """
  return with_shapley(
      optax.sgd(learning_rate, momentum=momentum, nesterov=nesterov),
      num_examples=num_examples, metric=metric, evaluation=evaluation,
      learning_rate=learning_rate, elementwise=True, **kwargs)


def values(state: ShapleyState) -> jax.Array:
  """Accumulated values ``Phi``: f32[num_examples] (``[N, E]`` for several
  estimators; a trailing ``K`` with ``num_targets``, ``[N, K]`` or
  ``[N, E, K]``).  Positive = the example lowered the validation loss.

  Raises:
    ValueError: the transformation was built with ``table="none"``.
  """
  s = _find(state)
  if s.values.shape[0] == 0:
    raise ValueError("this state keeps no values table (table='none'); "
                     "stream step_values with oxs.ValueWriter and sum them "
                     "with oxs.reduce_values")
  return s.values


def step_values(state: ShapleyState) -> jax.Array:
  """The last step's values, f32[B] (``[B, E]``, ``[B, K]``, ``[B, E, K]``
  as for :func:`values`), aligned with its ids."""
  return _find(state).step_values


def check(state) -> None:
  """Raises ``ValueError`` if any step's credit was skipped, naming why.

  Values of the other steps are untouched; the skipped steps added nothing.
  """
  s = _find(state)
  err, skipped = int(np.asarray(s.error).max()), int(np.asarray(s.skipped).max())
  if err:
    reasons = "; ".join(t for bit, t in _ERROR_TEXT.items() if err & bit)
    raise ValueError(f"{skipped} step(s) were not credited: {reasons}. The "
                     "values of the other steps are unaffected.")


def _find(state) -> ShapleyState:
  """The ShapleyState itself or the first one inside a chain's state."""
  if isinstance(state, ShapleyState):
    return state
  found = [s for s in jax.tree.leaves(
      state, is_leaf=lambda x: isinstance(x, ShapleyState))
           if isinstance(s, ShapleyState)]
  if not found:
    raise ValueError("no ShapleyState in this optimizer state")
  return found[0]
