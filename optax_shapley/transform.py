r"""The Shapley transformation: any optax optimizer plus per-example values.

``with_shapley(inner, num_examples=N)`` wraps an optax transformation.  Its
updates are the inner optimizer's; alongside, every step credits each
example ``i`` of the batch with

.. math::

    \phi_{t,i} \approx x_i \cdot d_t, \qquad
    d_t = -D_t^\top \nabla L(\bar w_t), \qquad
    x_i = c\, \nabla \ell_i(w_t)

approximating the Shapley value of the one-step utility
``U_t(S) = L(w_t) - L(w_t + u_t(g_S))`` (positive: example ``i`` lowered the
validation loss), and accumulates ``Phi_i = sum_t phi_{t,i}``.

This module is the orchestration of a step: the inner update, the
evaluation points and validation gradients (:mod:`~optax_shapley.validation`),
each estimator's direction (:mod:`~optax_shapley.estimators`), the
contraction against the batch's factors (:mod:`~optax_shapley.contraction`),
the checks (:mod:`~optax_shapley.checks`) and the values table
(:mod:`~optax_shapley.table`).
"""

from __future__ import annotations

from typing import Any, Sequence
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax

from optax_shapley import (accumulation, adam_state, checks, dependence,
                           estimators, layers, metrics, table as tables,
                           validation, vma)
from optax_shapley.contraction import (contract, ghost_contract, ghost_plans,
                                       per_example_rows)
from optax_shapley.factors import Factors
from optax_shapley.state import ShapleyState, find_state

__all__ = ["with_shapley", "adam", "adamw", "sgd", "values", "step_values",
           "check"]


def with_shapley(
    inner: optax.GradientTransformation,
    *,
    num_examples: int,
    metric: str | Sequence[str] = "auto",
    evaluation: str | Sequence[str] = "midpoint",
    batch_size: int | None = None,
    contraction: str = "auto",
    axis_name: str | None = None,
    learning_rate: float | optax.Schedule | None = None,
    b1: float | None = None,
    b2: float | None = None,
    eps: float | None = None,
    fixed_state_previous: bool = False,
    elementwise: bool | None = None,
    secant_nodes: int | None = None,
    coalition_permutations: int | None = None,
    coalition_chunk: int | None = None,
    exact_threshold: float = 0.1,
    exact_memory: int | None = None,
    ghost_rank: int | None = None,
    ghost_tol: float | None = 0.03,
    num_targets: int | None = None,
    table: str = "replicated",
    closed_form: str | None = None,
    micro_batch_factors: Any = None,
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

  The returned updates are ``inner.update``'s: the same computation on the
  same inputs, and bit-identical to an ``inner.update`` call in the same
  compiled program.  Against a separately compiled ``inner.update`` they may
  differ by rounding, a few ulp of a leaf's largest entry: XLA chooses
  fusions, layouts and reduction orders for each program as a whole (e.g.
  the order of the sum in ``optax.clip_by_global_norm``), and an
  ``optimization_barrier`` around the update does not pin them.  Values are
  accumulated in ``state.values``; read them with :func:`values`.

  Args:
    inner: any optax transformation (the optimizer), or an
      ``optax.MultiSteps`` object (gradient accumulation: call ``update``
      once per micro-batch with its factors and ids; the step the optimizer
      takes after ``k`` of them is credited as one step on their
      concatenated batch, :mod:`optax_shapley.accumulation`; its
      ``every_k_schedule`` must be a constant int).
    num_examples: ``N``, the size of the values table.
    metric: ``"auto"`` (default): ``"secant"``, except at the steps whose
      :func:`optax_shapley.metrics.ray_nonlinearity` is above
      ``exact_threshold`` (Adam's sign-descent first steps, a restart of its
      moments), which are credited by Shapley values of the real update
      (``state.exact_steps`` counts them): exact enumeration of the
      coalitions up to 12 examples, beyond that ``"prefix_normal"`` for an
      optimizer that acts coordinate-wise, else ``"coalitions"`` by
      permutations.  Or
      ``"secant"`` (the one-direction secant at every step),
      ``"linearized"``, ``"fixed_state"`` (the
      paper's method, Adam only), ``"sgd"`` (In-Run Data Shapley baseline)
      or ``"removal"`` (each example's share taken out of the real update,
      :func:`optax_shapley.metrics.removal_values`; with ``"end"``,
      leave-one-out) or ``"coalitions"`` (Shapley values of the real update
      re-run on coalitions, first order in the loss only,
      :func:`optax_shapley.metrics.coalition_values`) or
      ``"prefix_normal"`` (the same utility for an elementwise optimizer,
      coordinate by coordinate, :func:`optax_shapley.metrics.prefix_normal_values`);
      these three form
      per-example gradients, so they cost ``B`` times the parameters' memory
      (``prefix_normal``: a few examples' at a time) and many optimizer
      updates.  A tuple tracks several estimators in one
      run.
    evaluation: ``"midpoint"`` (default), ``"start"`` or ``"end"``; a tuple
      pairs with ``metric`` (a single name is broadcast).
    batch_size: the (global) batch size ``B``, to size ``step_values`` at
      ``init`` (the accumulated ``k B`` with ``optax.MultiSteps``).
      Needed when the update is the body of ``jax.lax.scan`` (or
      a ``while_loop``), whose carry must keep its shape, and to restore a
      checkpoint into ``init``'s structure.  If ``None`` the first update
      changes its shape: a jitted Python loop compiles the step twice, and
      the update warns at trace time (naming ``batch_size=``) because inside
      ``scan`` the next error is JAX's carry-type error.  The update cannot
      tell a ``scan`` body from a first ``jit`` trace, so it warns rather
      than raises.
    contraction: ``"exact"``: every module call by its exact rule;
      ``"ghost"``: ``nn.Dense`` kernels by the ghost rule
      (:mod:`optax_shapley.ghost`: validation factors and a rank
      ``ghost_rank`` factorisation of the elementwise metric) wherever the
      metric is elementwise; ``"auto"`` (default): per Dense call, the ghost
      rule where its cost model says it is cheaper, else exact.
    ghost_rank: ``K`` of the metric factorisation (``None``: 1, the paper's
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
      ``contraction.GHOST_SPOT_CHECK`` (8) examples (a cheap spot check); otherwise that call
      is contracted exactly (``inf``: always ghost).  The default 0.03 kept
      the Pearson R lost against the exact rule below 0.001 at steps >= 10
      on every fidelity model with the ghost rule forced; 0.05 lost up to
      0.005 on their 32-wide layers (``docs/bench.md``).  ``None``: no spot
      check and no fallback (the cheapest ghost rule; its accuracy is that of
      the factorisation, see ``docs/bench.md``).  With a number (``inf``
      included) a rank-1 factorisation is also refused where more than
      ``contraction.GHOST_NEGATIVE_MASS`` (1%) of the direction sits on negative metric
      entries; ``None`` never refuses.
    axis_name: the data-parallel axis under ``jax.pmap`` / ``jax.shard_map``.
    learning_rate, b1, b2, eps: the Adam hyperparameters, needed by the
      ``sgd`` (``learning_rate`` only) and ``fixed_state`` metrics.
    fixed_state_previous: ``fixed_state`` uses ``vhat_{t-1}`` (the paper's
      Taylor base point) instead of ``vhat_t``.
    coalition_permutations: permutations per step of the ``"coalitions"``
      metric when ``B > 12`` (exact enumeration below); ``None``: 64.
    coalition_chunk: coalitions (``B <= 12``) or permutations re-run at
      once by ``"coalitions"`` and the exact steps of ``"auto"``; ``None``:
      16.  Their memory is about ``3 * coalition_chunk`` parameter-sized
      trees on top of the ``B`` per-example gradients.  ``"prefix_normal"``
      forms at most this many examples' gradients at once, fewer where
      they would exceed
      :data:`optax_shapley.estimators.PREFIX_CHUNK_BYTES`.
    exact_threshold: ``"auto"`` credits a step by Shapley values of its update where
      the step's :func:`optax_shapley.metrics.ray_nonlinearity` is above
      this (0.1: the first 3-4 steps of Adam from initialisation on the
      bundled models); ``inf``: never, the secant at every step.
    exact_memory: bytes the exact steps of ``"auto"`` may use
      (:func:`optax_shapley.estimators.exact_memory_need`): for an
      elementwise optimizer beyond 12 examples a few examples' gradients
      and about ten parameter-sized trees, whatever ``B``; else
      ``(B + 3 coalition_chunk) * P * 4`` for ``P`` parameters (``B``
      global under data parallelism); ``None``: 1 GiB.  Above it ``"auto"``
      is the secant at every step and warns at trace time.  Under
      ``jax.jit`` both branches are compiled, so this memory counts in the
      compiled step's peak even at steps that do not use it.
    micro_batch_factors: with ``inner`` an ``optax.MultiSteps``: the
      factors of one micro-batch, or their shapes (``jax.eval_shape`` of
      the capture, e.g. ``jax.eval_shape(oxs.value_grad_and_factors(loss),
      params, x, y)[2]``; under ``jax.pmap`` one device's).  ``init`` then
      allocates the ``k - 1`` micro-batches' buffers, so the state has the
      same structure before and after an update: a jitted step compiles
      once, a ``lax.scan`` over micro-batches carries it, and a checkpoint
      restores into ``init``'s state.  ``None``: the first update allocates
      them.  A later micro-batch of other shapes raises ``ValueError``.
    closed_form: ``"adam"`` when ``inner`` is ``optax.adam`` / ``optax.adamw``
      with these ``learning_rate``, ``b1``, ``b2``, ``eps`` (set by
      :func:`adam` and :func:`adamw`): the secant metric is then computed in
      closed form (:func:`optax_shapley.adam_state.adam_secant_scale`, one
      elementwise expression) instead of from ``u(g)``, ``u(0)`` and a ``jax.jvp``
      of the update.  ``None`` (default): from the update, for any optimizer.
    elementwise: whether ``inner`` acts coordinate-wise (``du/dg`` is
      diagonal: Adam, AdamW, SGD, RMSProp, Lion): the ``secant`` and
      ``linearized`` metrics are then elementwise scales (an exact difference
      quotient, a ``jax.jvp`` of ones), else ``secant`` integrates
      ``jax.vjp`` along the ray with ``secant_nodes``-point quadrature
      (``None``: 3; optimizers that mix coordinates: global-norm clipping, Adafactor).
      ``None`` (default): decided at trace time from the update's jaxpr
      (:func:`optax_shapley.dependence.is_coordinatewise`, sound: it only
      says so when it can prove it).  ``False``: always the quadrature.
      ``True``: the user's assertion, trusted where the analysis cannot see
      it (an unlisted primitive); a ``UserWarning`` names the primitives at
      which the analysis lost track, since a wrong ``True`` gives wrong
      values.

  Raises:
    ValueError: unknown metric/evaluation/contraction, or a metric that needs
      hyperparameters that were not given, or ``num_targets < 1``.  At
      ``init``: ``inner`` is an ``optax.contrib.schedule_free`` optimizer,
      or holds an ``optax.MultiSteps`` other than as ``inner`` itself
      (:func:`optax_shapley.checks.attributable_optimizer`).  An
      ``optax.MultiSteps`` with a schedule of accumulation lengths, or with
      ``table="none"``; at ``update``, one under ``jax.shard_map``.  At
      ``update``: ``val_weights`` missing with ``num_targets``, given
      without it, or not of shape ``[K, V]``.
  """
  multi = isinstance(metric, (tuple, list)) or isinstance(evaluation, (tuple, list))
  num_examples = _static_int("num_examples", num_examples)
  batch_size, num_targets = (_static_int(name, value, optional=True) for name, value in
                             (("batch_size", batch_size), ("num_targets", num_targets)))
  (secant_nodes, coalition_permutations, coalition_chunk, ghost_rank,
   exact_memory) = (
      _static_int(name, value, default=default) for name, value, default in (
          ("secant_nodes", secant_nodes, 3),
          ("coalition_permutations", coalition_permutations, 64),
          ("coalition_chunk", coalition_chunk, 16),
          ("ghost_rank", ghost_rank, 1),
          ("exact_memory", exact_memory, 2 ** 30)))
  if elementwise not in (None, True, False):
    raise ValueError(f"elementwise must be None, True or False, got {elementwise!r}")
  if closed_form not in (None, "adam"):
    raise ValueError(f"closed_form must be None or 'adam', got {closed_form!r}")
  # Hyperparameters may be arrays (optax.inject_hyperparams): no == here.
  if closed_form == "adam" and any(h is None for h in (learning_rate, b1, b2, eps)):
    raise ValueError("closed_form='adam' needs learning_rate, b1, b2 and eps")
  if contraction not in ("auto", "exact", "ghost"):
    raise ValueError("contraction must be 'auto', 'exact' or 'ghost', got "
                     f"{contraction!r}")
  if num_examples <= 0:
    raise ValueError(f"num_examples must be positive, got {num_examples}")
  if num_targets is not None and num_targets < 1:
    raise ValueError(f"num_targets must be >= 1, got {num_targets}")
  tables.check_kind(table)
  settings = estimators.Settings(
      learning_rate=learning_rate, b1=b1, b2=b2, eps=eps,
      fixed_state_previous=fixed_state_previous, elementwise=elementwise,
      adam_closed_form=closed_form == "adam", secant_nodes=secant_nodes,
      coalition_permutations=coalition_permutations,
      coalition_chunk=coalition_chunk, exact_threshold=exact_threshold,
      exact_memory=exact_memory)
  ests = estimators.resolve(metric, evaluation, settings)
  linear = tuple(k for k, e in enumerate(ests) if e.metric.linear)
  need_zero = any(e.needs_zero_update(settings) for e in ests)
  value_shape = ((len(ests),) if multi else ()) + (
      (num_targets,) if num_targets is not None else ())

  micro = (accumulation.micro_steps(inner)
           if isinstance(inner, optax.MultiSteps) else None)
  if micro_batch_factors is not None and micro is None:
    raise ValueError(
        "micro_batch_factors is for gradient accumulation: pass it with "
        "with_shapley(optax.MultiSteps(opt, every_k_schedule=k), ...)")
  if micro_batch_factors is not None and not isinstance(micro_batch_factors,
                                                        Factors):
    raise ValueError(
        "micro_batch_factors must be the Factors of one micro-batch (the "
        "third output of oxs.value_grad_and_factors, or its jax.eval_shape), "
        f"got {type(micro_batch_factors).__name__}")
  if micro is not None and table == "none":
    raise ValueError(
        "table='none' cannot stream the values of optax.MultiSteps: its "
        "steps credit k micro-batches at once; keep a table")
  multi_steps = inner
  inner = optax.with_extra_args_support(inner)

  def init_fn(params):
    inner_state = inner.init(params)
    checks.attributable_optimizer(
        inner_state if micro is None else inner_state.inner_opt_state)
    return ShapleyState(
        inner_state=inner_state,
        values=tables.init(table, num_examples, value_shape),
        step_values=jnp.zeros((batch_size or 0,) + value_shape, jnp.float32),
        count=jnp.zeros([], jnp.int32),
        skipped=jnp.zeros([], jnp.int32),
        error=jnp.zeros([], jnp.int32),
        first_error_step=jnp.full([], -1, jnp.int32),
        first_error=jnp.zeros([], jnp.int32),
        first_error_id=jnp.full([], -1, jnp.int32),
        exact_steps=jnp.zeros([], jnp.int32),
        pending=(None if micro_batch_factors is None else
                 accumulation.empty(micro_batch_factors, micro.k)),
    )

  def attribute(step, params, factors, val_loss, val_weights, divisor=1):
    """``(values f32[B_local, ...], error int32[], exact bool[])`` of one
    optimizer step on the batch of ``factors``."""
    validation.check_shape(val_loss, params)
    weights = validation.target_weights(val_weights, num_targets, val_loss,
                                        params)
    dep = dependence.analyse(step.update_of, step.grads)
    # Known only now: whether the secant/linearized metrics are elementwise.
    traced = settings._replace(elementwise=_elementwise(elementwise, dep))
    frozen = dep.frozen
    # Which Dense calls take the ghost rule is decided at trace time from
    # shapes, so the validation pass keeps its factors only when used.
    plans = {}
    if (contraction != "exact" and linear and weights is None
        and all(ests[k].metric.is_elementwise(traced) for k in linear)
        and any(layers.has_ghost_rule(p.module, p.method)
                for p in factors.plans)):
      plans = ghost_plans(
          factors, validation.factor_shapes(val_loss, params), frozen,
          contraction, ghost_rank)
    evaluations = {e.evaluation.name: e.evaluation for e in ests}
    points = {name: e.point(params, step.u_g, step.u_0)
              for name, e in evaluations.items()}
    val = validation.run(val_loss, points, weights, keep_factors=bool(plans))
    step, g_dot = _read_back_gradient(step, traced)
    closed = _closed_form_error(step, traced)
    local, mismatch, exact = _step_values(
        ests, linear, traced, step, val, weights, num_targets, frozen,
        factors, plans, g_dot, ghost_rank, ghost_tol, axis_name, divisor)
    return (local, mismatch | closed
            | checks.bits(checks.NON_FINITE, ~val.finite), exact)

  def update_fn(updates, state, params=None, *, factors=None, example_ids=None,
                val_loss=None, val_weights=None, **extra_args):
    ids = checks.update_arguments(params, factors, example_ids, val_loss,
                                  num_examples)
    if micro is not None:
      return _accumulate(updates, state, params, factors, ids, val_loss,
                         val_weights, extra_args)
    step = _inner_step(inner, updates, state.inner_state, params, extra_args,
                       need_zero, settings.learning_rate, state.count,
                       axis_name)
    local, error, exact = attribute(step, params, factors, val_loss,
                                    val_weights)
    new_state = _credit(state, step.new_state, local, ids, error, exact,
                        multi, table, num_examples, axis_name)
    _warn_if_resized(state.step_values, new_state.step_values, batch_size)
    return step.u_g, new_state

  def _accumulate(updates, state, params, factors, ids, val_loss,
                  val_weights, extra_args):
    """One call of ``optax.MultiSteps``: keep this micro-batch, or (at the
    ``k``-th) credit the ``k`` micro-batches as one batch
    (:mod:`optax_shapley.accumulation`)."""
    if vma.axes_of(ids):
      raise ValueError(
          "with_shapley(optax.MultiSteps(...)) under jax.shard_map is not "
          "supported: the micro-batches kept between steps are per-device "
          "state, which the state's replicated out_specs cannot hold. Use "
          "jax.pmap.")
    old = state.inner_state
    out, new = multi_steps.update(updates, old, params, **extra_args)
    if state.pending is None:
      pending = accumulation.empty(factors, micro.k)
    else:
      pending = state.pending
      accumulation.check_like(pending, factors)
    stepped = new.gradient_step != old.gradient_step
    taken = stepped | (new.mini_step != old.mini_step)  # not skipped
    last = old.mini_step == micro.k - 1

    # A transformation before this one (clip_by_global_norm) may have
    # rescaled this micro-batch's gradient: each micro-batch would need its
    # own factor, so the step is refused rather than credited unscaled.
    scale, bad = checks.upstream_scale(updates, factors, axis_name, 1.0)
    changed = checks.bits(checks.ACCUMULATION, (jnp.asarray(bad) != 0) | (
        jnp.abs(jnp.asarray(scale, jnp.float32) - 1) > checks.RESCALE_RTOL))

    def at_step():
      joined, all_ids = accumulation.concatenate(pending, factors, ids)
      acc = accumulation.accumulated_gradient(micro, updates, old)
      step = _inner_step(micro.inner, acc, old.inner_opt_state, params,
                         extra_args, need_zero, settings.learning_rate,
                         old.gradient_step, axis_name)
      local, error, exact = attribute(step, params, joined, val_loss,
                                      val_weights, micro.divisor)
      same = _close(step.u_g, out)
      error = (error | pending.error | changed
               | checks.bits(checks.ACCUMULATION, ~last | ~same))
      return local.astype(jnp.float32), all_ids, error, exact

    def between():             # no step: nothing credited
      rows = micro.k * factors.batch_size
      return (jnp.zeros((rows, len(ests)) + value_shape[multi:], jnp.float32),
              jnp.zeros([rows], jnp.int32), jnp.zeros([], jnp.int32),
              jnp.zeros([], bool))

    local, all_ids, error, exact = jax.lax.cond(stepped, at_step, between)
    error = error | checks.bits(checks.ACCUMULATION, ~stepped & taken & last)
    pending = jax.lax.cond(
        taken & ~stepped,
        lambda: accumulation.store(pending, old.mini_step, factors, ids,
                                   changed),
        lambda: pending)
    pending = pending._replace(error=jnp.where(stepped, 0, pending.error))
    new_state = _credit(state, new, local, all_ids, error, exact, multi,
                        table, num_examples, axis_name, credited=stepped,
                        micro=(micro.k, factors.batch_size))
    _warn_if_resized(state.step_values, new_state.step_values, batch_size)
    return out, new_state._replace(pending=pending)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def _static_int(name: str, value, *, optional: bool = False, default=None):
  """``value`` as a Python int (shapes and loop counts are fixed at trace
  time); ``None`` stays ``None`` where ``optional``, else becomes
  ``default``.

  Raises:
    ValueError: ``value`` is an array: ``optax.inject_hyperparams`` turns
      every int argument not named in ``static_args`` into one.
  """
  if value is None:
    return None if optional else default
  if isinstance(value, (jax.Array, np.ndarray)) or not isinstance(
      value, (int, np.integer)):
    raise ValueError(
        f"{name} must be a Python int, got {type(value).__name__} {value!r}. "
        "Under optax.inject_hyperparams name it in static_args, e.g. "
        "optax.inject_hyperparams(oxs.adam, static_args=('num_examples', "
        "'batch_size'))")
  return int(value)


def _elementwise(asserted: bool | None,
                 dep: dependence.UpdateDependence) -> bool:
  """``with_shapley(elementwise=...)`` against what the jaxpr shows."""
  if asserted is None:
    return dep.coordinatewise
  if asserted and not dep.coordinatewise:
    warnings.warn(
        "with_shapley(elementwise=True), but the optimizer's update could not "
        "be shown to act coordinate-wise on the gradient (the dependence "
        f"analysis lost track at: {', '.join(dep.mixing) or 'its tree'}). If "
        "it mixes coordinates (global-norm clipping, Adafactor) the secant "
        "values are wrong; leave elementwise=None to decide from the update.",
        stacklevel=3)
  return asserted


def _inner_step(inner, grads, inner_state, params, extra_args, need_zero,
                learning_rate, count, axis_name) -> estimators.Step:
  """The inner optimizer's update, with ``u(0)`` where an estimator needs it;
  ``count``: the optimizer steps taken before this one."""
  inner_update = lambda g: inner.update(g, inner_state, params, **extra_args)
  u_g, new_inner = inner_update(grads)
  update_of = lambda g: inner_update(g)[0]
  u_0 = update_of(jax.tree.map(jnp.zeros_like, grads)) if need_zero else None
  return estimators.Step(
      grads=grads, late_grads=grads, update_of=update_of, u_g=u_g, u_0=u_0,
      prev_state=inner_state, new_state=new_inner,
      eta=estimators.learning_rate_at(learning_rate, count),
      count=count, axis_name=axis_name)


def _closed_form_error(step: estimators.Step, settings: estimators.Settings):
  """:data:`~optax_shapley.checks.CLOSED_FORM` where Adam's closed form with
  the given hyperparameters is not the optimizer's step (compared where
  ``u(0)`` is at hand: the default midpoint evaluation)."""
  if not settings.adam_closed_form or step.u_0 is None:
    return jnp.zeros([], jnp.int32)
  # Wrong hyperparameters show in every entry: about CLOSED_FORM_SAMPLE
  # entries of each leaf, spread over it, are compared (a full pass costs
  # the bench MLP's step 15%).
  def sample(tree):
    def one(x):
      flat = x.reshape(-1)
      return flat[::max(1, flat.size // checks.CLOSED_FORM_SAMPLE)]
    return jax.tree.map(one, tree)

  adam = adam_state.find_adam_state(step.prev_state)
  adam = adam._replace(mu=sample(adam.mu), nu=sample(adam.nu))
  g = sample(step.late_grads)
  scale = adam_state.adam_secant_scale(
      g, adam, learning_rate=step.eta, b1=settings.b1, b2=settings.b2,
      eps=settings.eps)
  return checks.closed_form_error(g, sample(step.u_g), sample(step.u_0), scale)


def _read_back_gradient(step: estimators.Step, settings: estimators.Settings):
  """``(step, g_dot)``: after the update, Adam's closed form reads the
  gradient back from Adam's moments (arguments and outputs of the step), so
  no gradient-sized buffer lives through the validation pass; ``g_dot``
  gives the add-up check's ``g . d`` the same way (else ``None``)."""
  if not (settings.adam_closed_form
          and adam_state.float32_moments(step.prev_state, step.grads)):
    return step, None
  prev = adam_state.find_adam_state(step.prev_state)
  new = adam_state.find_adam_state(step.new_state)
  late = adam_state.adam_gradient(prev, new, b1=settings.b1)
  g_dot = lambda d: adam_state.adam_gradient_dot(d, prev, new, b1=settings.b1)
  return step._replace(late_grads=late), g_dot


def _step_values(ests, linear, settings, step, val, weights, num_targets,
                 frozen, factors, plans, g_dot, ghost_rank, ghost_tol,
                 axis_name, divisor=1):
  """This device's values, f32[B_local, E] (``[B_local, E, K]`` with
  targets), the int32 error of the add-up and rescale checks, and whether
  an estimator credited this step by its exact metric (bool[]).
  ``divisor``: the shares of the optimizer's gradient are the factors'
  over this (:attr:`optax_shapley.accumulation.MicroSteps.divisor`)."""
  # Under data parallelism x_i carries 1/B_local for a mean; 1/B_global wanted.
  dp_mean = axis_name is not None and factors.reduction == "mean"
  n_dev = (jax.lax.psum(1, axis_name) if dp_mean else 1) * divisor
  # An earlier transformation in a chain (clip_by_global_norm) may have
  # rescaled the batch gradient: the shares are then c * x_i.
  n_dev, mismatch = checks.upstream_scale(step.grads, factors, axis_name, n_dev)
  columns = [None] * len(ests)
  if linear:
    dirs, scales = _directions([ests[k] for k in linear], settings, step, val,
                               weights, frozen)
    num_k = 1 if weights is None else num_targets
    # Rows are (estimator, target) pairs, estimator-major: [E_lin * K, ...].
    stacked = jax.tree.map(
        lambda *xs: jnp.stack(xs).astype(jnp.float32).reshape(
            (-1,) + xs[0].shape[(weights is not None):]), *dirs)
    lin = contract(factors, stacked, frozen, skip_calls=tuple(plans))
    ghost_expected, ghost_kernels = None, ()
    if plans:
      names = [ests[k].evaluation.name for k in linear]
      extra, ghost_expected = ghost_contract(
          factors, plans, scales, [val.grads[n] for n in names],
          [val.calls[n] for n in names], stacked, step.late_grads, ghost_rank,
          ghost_tol, axis_name)
      lin = lin + extra
      ghost_kernels = tuple(kernel for kernel, _ in plans.values())
    lin = lin / n_dev
    mismatch = mismatch | checks.add_up_error(
        lin, step.grads, stacked, axis_name, skip_leaves=ghost_kernels,
        extra_expected=ghost_expected, g_dot=g_dot)
    lin = lin.reshape((lin.shape[0], len(linear), num_k))
    for j, k in enumerate(linear):
      columns[k] = lin[:, j] if weights is not None else lin[:, j, 0]
  def open_rows():
    rows = per_example_rows(factors, step.grads, frozen)
    return lambda start, size: jax.tree.map(lambda x: x / n_dev,
                                            rows(start, size))

  shares = metrics.Shares(factors.batch_size, open_rows)

  def values_of(metric, name, x):
    column = lambda v: metric.values(settings, step, x, v)
    v = val.grads[name]
    # Targets: vmap over the K gradients; the updates do not depend on
    # them, so only the final dot products are batched.
    return column(v) if weights is None else jax.vmap(column, out_axes=1)(v)

  exact = jnp.zeros([], bool)
  if len(linear) < len(ests):
    # Formed once where several estimators (or exact branches) read them.
    users = sum((not e.metric.linear) + (e.metric.exact is not None)
                for e in ests)
    if users > 1:
      shares = metrics.Shares.of(shares.all())
    for k, est in enumerate(ests):
      if not est.metric.linear:
        columns[k] = values_of(est.metric, est.evaluation.name, shares)
  for k, est in enumerate(ests):
    metric = est.metric
    if metric.exact is None or not _exact_fits(settings, factors, step):
      continue
    v = val.grads[est.evaluation.name]
    weight = jax.tree.map(lambda a: jnp.abs(a.astype(jnp.float32)) if
                          weights is None else jnp.abs(a).sum(0), v)
    hit = metric.exact_when(settings, step, weight)
    # Both branches replicated: on an explicit-sharding mesh the secant's
    # values are split over the batch, the coalitions' are not.
    columns[k] = jax.lax.cond(
        hit, lambda m=metric.exact, n=est.evaluation.name: tables.replicated(
            values_of(m, n, shares).astype(jnp.float32)),
        lambda c=columns[k]: tables.replicated(c.astype(jnp.float32)))
    exact = exact | hit
  return jnp.stack(columns, axis=1), mismatch, exact


def _exact_fits(settings, factors, step) -> bool:
  """Whether the exact steps
  (:func:`~optax_shapley.estimators.exact_memory_need`) fit in
  ``settings.exact_memory`` bytes (trace time); warns once per trace where
  they do not."""
  size = sum(int(np.prod(jnp.shape(x))) for x in jax.tree.leaves(step.grads))
  b = factors.batch_size * (jax.lax.psum(1, step.axis_name)
                            if step.axis_name is not None else 1)
  need = estimators.exact_memory_need(settings, size, b)
  if need <= settings.exact_memory:
    return True
  warnings.warn(
      f"metric='auto' credits every step by the secant: its exact steps "
      f"would need {need / 2**20:.0f} MiB for {b} examples' gradients of "
      f"{size} parameters, over exact_memory={settings.exact_memory} bytes. "
      "Adam's first steps are then misread (see the estimators guide); raise "
      "exact_memory, or warm the learning rate up from 0.", stacklevel=2)
  return False


def _directions(linear_ests, settings, step, val, weights, frozen):
  """``d = -D^T grad L(wbar)`` per linear estimator (leaves ``[K, ...]``
  with targets), zero on frozen leaves, and each one's elementwise scale
  ``S`` (``d = S * v``) or ``None``."""
  dirs, scales = [], []
  for est in linear_ests:
    metric = est.metric
    scale = (metric.scale(settings, step) if metric.is_elementwise(settings)
             else None)

    def direction(v, metric=metric, scale=scale):
      if scale is not None:
        return metrics.scale_times(scale, v)
      return metric.direction(settings, step, v)

    v = val.grads[est.evaluation.name]
    d = direction(v) if weights is None else jax.vmap(direction)(v)
    dirs.append(_zero_leaves(d, frozen))
    scales.append(scale)
  return dirs, scales


def _credit(state, new_inner, local, ids, error, exact, multi, table,
            num_examples, axis_name, credited=None,
            micro=(1, 0)) -> ShapleyState:
  """The new state: the step's values gathered, checked and added.
  ``credited`` (bool[], gradient accumulation): whether this call credits
  anything; where not, only ``error`` is recorded and ``step_values`` keep
  the last step's.  ``micro``: ``(k, B_local)`` of accumulated
  micro-batches, whose rows are put in the order of the concatenated
  global micro-batches."""
  ids = ids.astype(jnp.int32)
  if axis_name is not None:
    local, ids = tables.gather(local, axis_name), tables.gather(ids, axis_name)
    k, b = micro
    if k > 1:       # [device, micro-batch, example] -> [micro-batch, device, ...]
      order = lambda x: jnp.swapaxes(
          x.reshape((-1, k, b) + x.shape[1:]), 0, 1).reshape(x.shape)
      local, ids = order(local), order(ids)
  else:           # plain jit on an explicit mesh: replicate the O(B) parts
    local, ids = tables.replicated(local), tables.replicated(ids)
  step_vals = local if multi else local[:, 0]
  id_error = checks.step_error(ids, step_vals, num_examples)
  if credited is not None:
    id_error = jnp.where(credited, id_error, 0)
  error = error | id_error
  ok = error == 0
  add = ok if credited is None else ok & credited
  credit = jnp.where(add, step_vals, 0).astype(jnp.float32)
  new_step_vals = jnp.where(ok, step_vals, jnp.nan).astype(jnp.float32)
  if credited is not None and state.step_values.shape == step_vals.shape:
    new_step_vals = jnp.where(credited | ~ok, new_step_vals, state.step_values)
  # Only the first failing step is recorded; later ones do not overwrite it.
  first = ~ok & (state.first_error_step < 0)
  keep = lambda new, old: jnp.where(first, new, old).astype(jnp.int32)
  return state._replace(
      inner_state=new_inner,
      values=tables.add(state.values, table, ids, credit, add, num_examples,
                        axis_name),
      step_values=new_step_vals,
      count=state.count + 1,
      skipped=state.skipped + (~ok).astype(jnp.int32),
      error=state.error | error,
      first_error_step=keep(state.count + 1, state.first_error_step),
      first_error=keep(error, state.first_error),
      first_error_id=keep(checks.offending_id(ids, num_examples),
                          state.first_error_id),
      exact_steps=state.exact_steps + (add & exact).astype(jnp.int32),
  )


def _close(a, b, rtol: float = 1e-4) -> jax.Array:
  """bool[]: ``|a - b| <= rtol |b|`` (2-norms over the trees)."""
  sq = lambda t: sum(jnp.sum(jnp.square(x.astype(jnp.float32)))
                     for x in jax.tree.leaves(t))
  ref = sq(b)
  close = sq(jax.tree.map(lambda x, y: x - y, a, b)) <= rtol ** 2 * ref
  return close | ~jnp.isfinite(ref)    # non-finite: the NON_FINITE check's


def _warn_if_resized(old, new, batch_size) -> None:
  """Warns when a traced update changes ``step_values``' shape (``old`` to
  ``new``): ``batch_size`` at ``init`` was missing or not the batch's."""
  if old.shape == new.shape or not isinstance(old, jax.core.Tracer):
    return
  warnings.warn(
      f"with_shapley: this update changes step_values from shape {old.shape} "
      f"(init, batch_size={batch_size}) to {new.shape}; pass "
      f"batch_size={new.shape[0]} (the global batch size) to with_shapley / "
      "oxs.adam. Otherwise a jitted step compiles twice, and as the body of "
      "jax.lax.scan the update fails with a carry-type error on "
      "state.step_values.", stacklevel=3)


def _zero_leaves(tree, indices):
  """``tree`` with the leaves at ``indices`` (leaves order) set to zero."""
  if not indices:
    return tree
  leaves, treedef = jax.tree.flatten(tree)
  return treedef.unflatten([jnp.zeros_like(x) if i in indices else x
                            for i, x in enumerate(leaves)])


def adam(learning_rate, b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8,
         *, num_examples: int, metric="auto", evaluation="midpoint",
         batch_size: int | None = None, contraction: str = "auto",
         axis_name: str | None = None, fixed_state_previous: bool = False,
         secant_nodes: int | None = None,
         coalition_permutations: int | None = None,
         coalition_chunk: int | None = None, exact_threshold: float = 0.1,
         exact_memory: int | None = None,
         ghost_rank: int | None = None, ghost_tol: float | None = 0.03,
         num_targets: int | None = None,
         table: str = "replicated") -> optax.GradientTransformationExtraArgs:
  """``optax.adam`` with in-run data Shapley values (see :func:`with_shapley`).

  The updates are ``optax.adam(learning_rate, b1, b2, eps)``'s (to the
  rounding :func:`with_shapley` describes).

  The keyword options after ``num_examples`` are :func:`with_shapley`'s,
  spelled out (not ``**kwargs``) so that ``optax.inject_hyperparams`` can
  bind them: ``optax.inject_hyperparams(oxs.adam, static_args=(
  "num_examples", "batch_size"))(learning_rate=1e-3, num_examples=N,
  batch_size=B)`` makes the learning rate (and ``b1``, ``b2``, ``eps``,
  ``ghost_tol``) hyperparameters of the state, and the metrics read the
  value in ``state.hyperparams`` at each step.  The integer options that
  fix shapes or loop counts (``secant_nodes``, ``coalition_permutations``,
  ``ghost_rank``) default to ``None`` (with_shapley's default) so that they
  are not turned into arrays; ``num_examples``, ``batch_size`` and
  ``num_targets`` must be named in ``static_args``.

  Example:
    One attributed step of a linear classifier; ``N = 10`` training
    examples, ``B = 4`` of them in the batch:

    >>> import jax, jax.numpy as jnp, optax, flax.linen as nn
    >>> import optax_shapley as oxs
    >>> model = nn.Dense(3)
    >>> x = jax.random.normal(jax.random.key(0), (4, 5))
    >>> y = jnp.array([0, 1, 2, 0])
    >>> params = model.init(jax.random.key(1), x)["params"]
    >>> def per_example_loss(p, x, y):                    # -> f32[B]
    ...   logits = model.apply({"params": p}, x)
    ...   return optax.softmax_cross_entropy_with_integer_labels(logits, y)
    >>> val_loss = lambda p: per_example_loss(p, x[:2], y[:2])   # f32[V]
    >>> tx = oxs.adam(1e-2, num_examples=10, batch_size=4)
    >>> state = tx.init(params)
    >>> capture = oxs.value_grad_and_factors(per_example_loss)
    >>> losses, grads, factors = capture(params, x, y)
    >>> ids = jnp.array([3, 1, 4, 7])
    >>> updates, state = tx.update(grads, state, params, factors=factors,
    ...                            example_ids=ids, val_loss=val_loss)
    >>> params = optax.apply_updates(params, updates)
    >>> oxs.values(state).shape, oxs.step_values(state).shape
    ((10,), (4,))
    >>> bool(oxs.values(state)[0] == 0)        # example 0 was not in the batch
    True
    >>> oxs.check(state)                       # raises if a step was skipped
  """
  return with_shapley(
      optax.adam(learning_rate, b1=b1, b2=b2, eps=eps),
      num_examples=num_examples, metric=metric, evaluation=evaluation,
      learning_rate=learning_rate, b1=b1, b2=b2, eps=eps, elementwise=True,
      closed_form="adam", batch_size=batch_size, contraction=contraction,
      axis_name=axis_name, fixed_state_previous=fixed_state_previous,
      secant_nodes=secant_nodes, coalition_permutations=coalition_permutations,
      coalition_chunk=coalition_chunk, exact_threshold=exact_threshold,
      exact_memory=exact_memory,
      ghost_rank=ghost_rank, ghost_tol=ghost_tol, num_targets=num_targets,
      table=table)


def adamw(learning_rate, b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8,
          weight_decay: float = 1e-4, *, num_examples: int, metric="auto",
          evaluation="midpoint", mask=None, batch_size: int | None = None,
          contraction: str = "auto", axis_name: str | None = None,
          fixed_state_previous: bool = False, secant_nodes: int | None = None,
          coalition_permutations: int | None = None,
          coalition_chunk: int | None = None, exact_threshold: float = 0.1,
          exact_memory: int | None = None,
          ghost_rank: int | None = None, ghost_tol: float | None = 0.03,
          num_targets: int | None = None,
          table: str = "replicated") -> optax.GradientTransformationExtraArgs:
  """``optax.adamw`` with in-run data Shapley values (see :func:`with_shapley`).

  Weight decay does not depend on the gradient, so it belongs to nobody:
  it drops out of every metric (it is part of ``u(0)``).  A callable
  ``mask`` must be in ``static_args`` under ``optax.inject_hyperparams``
  (it would be taken for a schedule, as for ``optax.adamw``); otherwise
  ``optax.inject_hyperparams`` works as for :func:`adam`.
  """
  return with_shapley(
      optax.adamw(learning_rate, b1=b1, b2=b2, eps=eps,
                  weight_decay=weight_decay, mask=mask),
      num_examples=num_examples, metric=metric, evaluation=evaluation,
      learning_rate=learning_rate, b1=b1, b2=b2, eps=eps, elementwise=True,
      closed_form="adam", batch_size=batch_size, contraction=contraction,
      axis_name=axis_name, fixed_state_previous=fixed_state_previous,
      secant_nodes=secant_nodes, coalition_permutations=coalition_permutations,
      coalition_chunk=coalition_chunk, exact_threshold=exact_threshold,
      exact_memory=exact_memory,
      ghost_rank=ghost_rank, ghost_tol=ghost_tol, num_targets=num_targets,
      table=table)


def sgd(learning_rate, momentum: float | None = None, nesterov: bool = False,
        *, num_examples: int, metric="auto", evaluation="midpoint",
        batch_size: int | None = None, contraction: str = "auto",
        axis_name: str | None = None, secant_nodes: int | None = None,
        coalition_permutations: int | None = None,
        coalition_chunk: int | None = None, exact_threshold: float = 0.1,
        exact_memory: int | None = None,
        ghost_rank: int | None = None, ghost_tol: float | None = 0.03,
        num_targets: int | None = None,
        table: str = "replicated") -> optax.GradientTransformationExtraArgs:
  """``optax.sgd`` with in-run data Shapley values (see :func:`with_shapley`).

  With ``metric="sgd", evaluation="start"`` and no momentum this is
  first-order In-Run Data Shapley (Wang et al. 2024).
  ``optax.inject_hyperparams`` works as for :func:`adam` (the ``sgd``
  metric then reads the injected learning rate).
  """
  return with_shapley(
      optax.sgd(learning_rate, momentum=momentum, nesterov=nesterov),
      num_examples=num_examples, metric=metric, evaluation=evaluation,
      learning_rate=learning_rate, elementwise=True, batch_size=batch_size,
      contraction=contraction, axis_name=axis_name, secant_nodes=secant_nodes,
      coalition_permutations=coalition_permutations,
      coalition_chunk=coalition_chunk, exact_threshold=exact_threshold,
      exact_memory=exact_memory, ghost_rank=ghost_rank,
      ghost_tol=ghost_tol, num_targets=num_targets, table=table)


def values(state) -> jax.Array:
  """Accumulated values ``Phi``: f32[num_examples] (``[N, E]`` for several
  estimators; a trailing ``K`` with ``num_targets``, ``[N, K]`` or
  ``[N, E, K]``).  Positive = the example lowered the validation loss.

  Args:
    state: a :class:`ShapleyState`, or an optimizer state holding one.

  Raises:
    ValueError: the transformation was built with ``table="none"``, or the
      state holds no (or several) ``ShapleyState``.
  """
  s = find_state(state)
  if s.values.shape[0] == 0:
    raise ValueError("this state keeps no values table (table='none'); "
                     "stream step_values with oxs.ValueWriter and sum them "
                     "with oxs.reduce_values")
  return s.values


def step_values(state) -> jax.Array:
  """The last step's values, f32[B] (``[B, E]``, ``[B, K]``, ``[B, E, K]``
  as for :func:`values`), aligned with its ids; NaN if its credit was
  skipped."""
  return find_state(state).step_values


def check(state) -> None:
  """Raises ``ValueError`` if any step's credit was skipped, naming why.

  Values of the other steps are untouched; the skipped steps added nothing.
  The message names the first skipped step, counted from 1 like
  ``state.count`` (step ``t`` is the ``t``-th update), its reasons and, for
  a bad example id, the id (the first out-of-range id of that batch, or one
  that appeared twice), then the reasons of later skipped steps.  The
  reasons are kept as bits of ``ShapleyState.error``
  (:data:`optax_shapley.checks.STEP_ERRORS`).

  Example:
    Three steps with a repeated id (``[3, 3]``) at the second:

    >>> import jax, jax.numpy as jnp, optax, optax_shapley as oxs
    >>> params = {"w": jnp.zeros(3)}
    >>> per_example_loss = lambda p, x: (x @ p["w"] - 1.0) ** 2   # -> f32[B]
    >>> val_loss = lambda p: per_example_loss(p, jnp.ones((2, 3)))
    >>> tx = oxs.adam(1e-2, num_examples=5, batch_size=2)
    >>> state = tx.init(params)
    >>> @jax.jit
    ... def step(params, state, x, ids):
    ...   _, grads, factors = oxs.value_grad_and_factors(per_example_loss)(
    ...       params, x)
    ...   updates, state = tx.update(grads, state, params, factors=factors,
    ...                              example_ids=ids, val_loss=val_loss)
    ...   return optax.apply_updates(params, updates), state
    >>> x = jnp.eye(2, 3)
    >>> for ids in ([0, 1], [3, 3], [2, 4]):
    ...   params, state = step(params, state, x, jnp.array(ids))
    >>> oxs.check(state)
    Traceback (most recent call last):
    ...
    ValueError: step 2 was not credited: example id 3 appeared twice in one batch. The values of the other steps are unaffected.
  """
  s = find_state(state)
  read = lambda x: int(np.asarray(x).max())   # replicated over devices
  message = checks.describe(
      read(s.error), read(s.skipped), read(s.first_error_step),
      read(s.first_error), read(s.first_error_id))
  if message:
    raise ValueError(message)
