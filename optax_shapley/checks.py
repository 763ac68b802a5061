"""Checks of a step's credit: bad input, non-finite values, the add-up check.

A step whose credit fails a check adds nothing to the values table; the
reasons are kept as bits of ``ShapleyState.error`` (:data:`STEP_ERRORS`) and
:func:`describe` turns them into the message of
:func:`optax_shapley.check`.  Input that is wrong at trace time (or concrete
and wrong) raises at once, before anything is accumulated.
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from optax_shapley.factors import Factors


class StepError(NamedTuple):
  """One reason a step's credit was skipped: a bit of ``ShapleyState.error``.

  ``with_id``, for the reasons an example id causes: ``text`` naming the id
  (``{id}`` is replaced by it).
  """
  bit: int
  text: str
  with_id: str | None = None


#: An example id outside ``[0, num_examples)``.
ID_OUT_OF_RANGE = StepError(
    1, "an example id was out of range [0, num_examples)",
    "example id {id} was out of range [0, num_examples)")
#: An example id twice in one batch.
DUPLICATE_ID = StepError(2, "an example id appeared twice in one batch",
                         "example id {id} appeared twice in one batch")
#: A NaN or infinite value, loss or validation gradient.
NON_FINITE = StepError(
    4, "a step value was NaN or infinite (NaN/inf loss, gradient or "
    "validation loss)")
#: The values did not add up to ``g . d`` (the add-up check).  The causes
#: are the user's, most likely first; a capture bug comes last.
CAPTURE_MISMATCH = StepError(
    8, "the per-example values did not add up to grads . d. Likely causes: "
    "(1) the grads passed to update and the factors were computed from "
    "different batches (pass the grads value_grad_and_factors returned with "
    "its factors); (2) gradient accumulation nested the wrong way: "
    "optax.MultiSteps(oxs.adam(...)) instead of "
    "oxs.with_shapley(optax.MultiSteps(optax.adam(lr), k), ...); (3) a "
    "penalty or regulariser term in the per-example loss given to the "
    "capture that is not in the loss whose gradient was passed to update, "
    "or vice versa; (4) the loss reads a parameter outside the captured "
    "layers (e.g. an L2 penalty on a kernel, or a kernel read directly). "
    "If none applies, please report the model")
#: ``optax.MultiSteps`` did not step where the kept micro-batches said
#: (:mod:`optax_shapley.accumulation`).
ACCUMULATION = StepError(
    16, "optax.MultiSteps did not step after the k micro-batches kept for "
    "it, or stepped with another accumulated gradient (an every_k_schedule "
    "that changes), or a transformation before with_shapley changed a "
    "micro-batch's gradient (put clipping inside the MultiSteps: "
    "optax.MultiSteps(optax.chain(clip, adam), k)): the accumulated step "
    "was not credited")
#: ``closed_form="adam"`` with hyperparameters that are not the optimizer's.
CLOSED_FORM = StepError(
    32, "the optimizer's step did not match Adam's closed form with the "
    "learning_rate, b1, b2 and eps given to with_shapley(closed_form='adam') "
    "(pass the optimizer's own, or leave closed_form=None): the step was not "
    "credited")
#: Every reason, in bit order.
STEP_ERRORS = (ID_OUT_OF_RANGE, DUPLICATE_ID, NON_FINITE, CAPTURE_MISMATCH,
               ACCUMULATION, CLOSED_FORM)

#: The add-up check's relative tolerance.  ``sum_i x_i . d`` must equal
#: ``g . d`` (the ``x_i`` add up to the batch gradient), and a larger gap
#: means the capture missed a use of some parameter.
CAPTURE_RTOL = 1e-2
#: Largest relative distance of the received gradient from ``c`` times the
#: batch gradient of the factors for the rescaling to count as one scalar.
RESCALE_RTOL = 1e-4


def bits(error: StepError, flag) -> jax.Array:
  """int32: ``error.bit`` where ``flag`` is true, else 0."""
  return jnp.asarray(flag).astype(jnp.int32) * error.bit


def describe(error: int, skipped: int, first_step: int = -1,
             first_error: int = 0, first_id: int = -1) -> str | None:
  """The message of :func:`optax_shapley.check`, or ``None`` when ``error``
  is 0.

  Args:
    error: the bitmask of every skipped step's reasons.
    skipped: how many steps were skipped.
    first_step: the first skipped step, counted from 1 (-1: unknown).
    first_error: that step's bitmask.
    first_id: the example id that made it fail, if an id bit is set in
      ``first_error``.
  """
  if not error:
    return None
  tail = " The values of the other steps are unaffected."
  if first_step < 0:
    return (f"{skipped} step(s) were not credited: "
            f"{_reasons(error)}.{tail}")
  steps = (f"step {first_step} was" if skipped <= 1 else
           f"step {first_step} (and {skipped - 1} later step(s)) were")
  message = f"{steps} not credited: {_reasons(first_error, first_id)}."
  later = error & ~first_error
  if later:
    message += f" Later steps also: {_reasons(later)}."
  return message + tail


def _reasons(error: int, example_id: int | None = None) -> str:
  """The texts of the bits of ``error``; the id reasons name
  ``example_id`` when given."""
  return "; ".join(
      e.with_id.format(id=example_id)
      if e.with_id is not None and example_id is not None else e.text
      for e in STEP_ERRORS if error & e.bit)


def update_arguments(params, factors, example_ids, val_loss,
                     num_examples: int) -> jax.Array:
  """Checks the arguments of ``tx.update``; returns ``example_ids`` as an
  array.

  Raises:
    ValueError: ``params``, ``factors``, ``example_ids`` or ``val_loss``
      missing; ids of the wrong shape or dtype; concrete ids out of range or
      repeated.
    TypeError: ``val_loss`` is not callable.
  """
  if params is None:
    raise ValueError(
        "with_shapley needs params (tx.update(grads, state, params, ...))")
  if not isinstance(factors, Factors):
    raise ValueError("tx.update needs factors=..., from "
                     "optax_shapley.value_grad_and_factors on the same batch")
  if example_ids is None or val_loss is None:
    raise ValueError("tx.update needs example_ids=... and val_loss=...")
  if not callable(val_loss):
    raise TypeError(
        "val_loss must be a function params -> f32[V] of per-example "
        f"validation losses, got {type(val_loss).__name__}")
  ids = jnp.asarray(example_ids)
  if ids.shape != (factors.batch_size,):
    raise ValueError(
        f"example_ids has shape {ids.shape} but the factors are for "
        f"a batch of {factors.batch_size} examples")
  if not jnp.issubdtype(ids.dtype, jnp.integer):
    raise ValueError(f"example_ids must be integers, got {ids.dtype}")
  if not isinstance(example_ids, jax.core.Tracer):
    a = np.asarray(example_ids)
    bad = a[(a < 0) | (a >= num_examples)]
    if bad.size:
      raise ValueError(
          f"example id {int(bad[0])} out of range [0, {num_examples})")
    uniq, counts = np.unique(a, return_counts=True)
    if (counts > 1).any():
      raise ValueError(f"example id {int(uniq[counts > 1][0])} appears more "
                       "than once in the batch")
  return ids


def attributable_optimizer(inner_state) -> None:
  """Refuses optimizers whose step is not a step of the model being valued.

  ``optax.contrib.schedule_free`` (``schedule_free_adamw``, ...) takes
  its gradient at, and returns updates of, the interpolated point ``y``,
  while the model it trains is ``x = schedule_free_eval_params(state, y)``.
  The one-step utilities ``L(y_t) - L(y_{t+1})`` then sum to the loss
  change of ``y``, not of the model one evaluates, and ``x``'s change is
  not a function of the update alone.

  ``optax.MultiSteps`` (gradient accumulation) steps once per ``k``
  micro-batches with their mean gradient.  Passed to ``with_shapley`` as the
  ``MultiSteps`` object itself it is credited as one batch
  (:mod:`optax_shapley.accumulation`); anywhere else (inside a chain, or as
  ``MultiSteps(...).gradient_transformation()``) each update would see one
  micro-batch's factors and the others' shares would get no credit.

  Args:
    inner_state: the wrapped optimizer's state (the inner optimizer's, for
      an accumulating ``MultiSteps``).

  Raises:
    ValueError: the state holds an ``optax.contrib.ScheduleFreeState`` or
      an ``optax.MultiStepsState``.
  """
  if optax.tree_utils.tree_get_all_with_path(inner_state, "MultiStepsState"):
    raise ValueError(
        "with_shapley cannot attribute this optax.MultiSteps: pass the "
        "MultiSteps object itself as the optimizer, "
        "oxs.with_shapley(optax.MultiSteps(optax.adam(lr), every_k_schedule=k), "
        "num_examples=N), not inside an optax.chain nor as "
        ".gradient_transformation(); there each update sees only its own "
        "micro-batch's factors, so the earlier micro-batches would be "
        "credited nothing. Do not nest the other way either: "
        "optax.MultiSteps(oxs.adam(...)) gives oxs a mean gradient that its "
        "factors do not add up to, and every step is skipped.")
  found = optax.tree_utils.tree_get_all_with_path(inner_state,
                                                 "ScheduleFreeState")
  if found:
    raise ValueError(
        "with_shapley cannot attribute optax.contrib.schedule_free "
        "optimizers: their gradient and updates are of the interpolated "
        "point y, but the model is x = schedule_free_eval_params(state, y), "
        "so the values would account for the validation loss of y, not of "
        "the model you evaluate. Use an optimizer whose params are the "
        "model (e.g. oxs.adamw with a schedule).")


def step_error(ids, step_vals, num_examples: int) -> jax.Array:
  """int32 bitmask of the in-graph checks of ids and values; 0 when valid."""
  out_of_range = jnp.any((ids < 0) | (ids >= num_examples))
  s = jnp.sort(ids)
  dup = jnp.any(s[1:] == s[:-1]) if ids.shape[0] > 1 else jnp.array(False)
  return (bits(ID_OUT_OF_RANGE, out_of_range) | bits(DUPLICATE_ID, dup)
          | bits(NON_FINITE, ~jnp.all(jnp.isfinite(step_vals))))


def offending_id(ids, num_examples: int) -> jax.Array:
  """int32: the example id that fails :func:`step_error`'s id checks.

  The first id of ``ids`` (int[B]) outside ``[0, num_examples)``; else one
  that appears twice; else -1.  Only meaningful where the step's error has
  an id bit (-1 is also an out-of-range id).
  """
  none = jnp.array(-1, jnp.int32)
  if ids.shape[0] == 0:
    return none
  out_of_range = (ids < 0) | (ids >= num_examples)
  dup = none
  if ids.shape[0] > 1:
    s = jnp.sort(ids)
    repeated = s[1:] == s[:-1]
    dup = jnp.where(jnp.any(repeated), s[1:][jnp.argmax(repeated)], none)
  return jnp.where(jnp.any(out_of_range), ids[jnp.argmax(out_of_range)],
                   dup).astype(jnp.int32)


def all_finite(tree) -> jax.Array:
  """bool[]: every entry of every inexact leaf of ``tree`` is finite."""
  return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)
                            if jnp.issubdtype(jnp.result_type(x), jnp.inexact)]
                           or [jnp.array(True)]))


def upstream_scale(grads, factors: Factors, axis_name, divisor):
  """``(divisor / c, error)`` where ``grads = c * factors.grads``.

  When ``tx.update`` receives exactly the arrays ``value_grad_and_factors``
  returned (the usual case, decided at trace time) ``c = 1`` and nothing is
  computed.  Otherwise (a transformation earlier in an ``optax.chain``
  changed them) ``c = <g', g> / <g, g>``, and ``error`` is
  :data:`CAPTURE_MISMATCH` unless ``|g' - c g| <= RESCALE_RTOL |g'|``: a
  global scalar (``clip_by_global_norm``) is this step's fixed factor on
  every share; anything else cannot be attributed from these factors.
  Under data parallelism (``axis_name``) the received gradient is a
  reduction of the local ones, so it is never compared.
  """
  none = jnp.zeros([], jnp.int32)
  ref = factors.grads
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
  return divisor / c, bits(CAPTURE_MISMATCH, bad)


#: Largest relative gap between the real step's response to the gradient,
#: ``u(g) - u(0)``, and Adam's closed form of it.
CLOSED_FORM_RTOL = 1e-3
#: Entries of each parameter leaf the closed-form check compares.
CLOSED_FORM_SAMPLE = 256


def closed_form_error(grads, u_g, u_0, scale) -> jax.Array:
  """:data:`CLOSED_FORM` unless ``u(g) - u(0) = -S g`` to
  :data:`CLOSED_FORM_RTOL` (summed over the entries given: the caller
  passes a sample of each leaf), with ``S`` Adam's
  closed-form secant scale (:func:`optax_shapley.adam_state.adam_secant_scale`)
  and ``u(g)``, ``u(0)`` the real optimizer's; the rounding of ``u`` in its
  own dtype widens the tolerance."""
  gap = size = slack = jnp.zeros([], jnp.float32)
  for g, a, b, sc in zip(*map(jax.tree.leaves, (grads, u_g, u_0, scale))):
    change = a.astype(jnp.float32) - b.astype(jnp.float32)
    gap = gap + jnp.sum(jnp.abs(change + sc * g.astype(jnp.float32)))
    size = size + jnp.sum(jnp.abs(change))
    slack = slack + 4 * float(jnp.finfo(a.dtype).eps) * (
        jnp.sum(jnp.abs(a.astype(jnp.float32)))
        + jnp.sum(jnp.abs(b.astype(jnp.float32))))
  return bits(CLOSED_FORM, gap > CLOSED_FORM_RTOL * size + slack)


def add_up_error(step_vals, grads, directions, axis_name=None,
                 skip_leaves=(), extra_expected=None,
                 g_dot: Callable | None = None) -> jax.Array:
  """:data:`CAPTURE_MISMATCH` unless ``sum_i x_i . d_e = g . d_e`` for all e.

  The per-example shares ``x_i`` sum to the batch gradient ``g``, so the
  values of a step must sum to ``g . d``; one dot product per estimator.
  ``step_vals`` f32[B_local, E]; sums run over ``axis_name`` when given.
  Leaves in ``skip_leaves`` (ghost kernels) contribute ``extra_expected``
  f32[E] instead of ``g . d``.  ``g_dot``, when given, maps the directions
  to trees of per-leaf f32[E] ``g . d`` and bounds on their rounding error
  (:func:`optax_shapley.adam_state.adam_gradient_dot`, ``g`` read back from
  Adam's moments); it replaces the dot products with ``grads`` and the
  bounds widen the tolerance ``CAPTURE_RTOL * (sum_i |x_i . d| + |g . d|)``.
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
  return bits(CAPTURE_MISMATCH, bad)
