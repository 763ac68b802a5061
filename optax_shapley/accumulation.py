r"""Gradient accumulation: ``optax.MultiSteps`` credited as one batch.

``optax.MultiSteps(opt, every_k_schedule=k)`` steps ``opt`` once per ``k``
update calls, with the mean (or sum) of the ``k`` micro-batches' gradients;
the other calls return zero updates, so every micro-batch's gradient is
taken at the same parameters ``w``.  That step is the step ``opt`` takes on
the concatenated batch of the ``k`` micro-batches, and this module lets the
Shapley transformation credit it as such: each call keeps its micro-batch's
factors and ids (:class:`PendingMicroBatches`), and the call at which the
optimizer steps contracts all ``k`` of them at once
(:func:`concatenate`).  With ``use_grad_mean=True`` (``MultiSteps``'s
default) the accumulated gradient is

.. math::

    \bar g = \frac1k \sum_{j=1}^k g_j = \frac1k \sum_{j, i} x_{j,i},

so each example's share is ``x_{j,i} / k``: :attr:`MicroSteps.divisor`.

Memory: ``k - 1`` micro-batches' factors (the inputs and output cotangents
of every probed call, and the arguments of the forward-mode fallback) and
ids live in the optimizer state between steps: allocated by ``init`` when
``with_shapley`` is given ``micro_batch_factors``, else by the first update.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from optax_shapley.factors import Factors


class MicroSteps(NamedTuple):
  """What the transformation needs of an ``optax.MultiSteps`` (static).

  Attributes:
    k: micro-batches per optimizer step (a constant ``every_k_schedule``).
    mean: ``use_grad_mean``: the optimizer receives the micro-batches' mean
      gradient (``True``) or their sum.
    inner: the wrapped optimizer (``MultiSteps.inner_opt``).
  """
  k: int
  mean: bool
  inner: Any

  @property
  def divisor(self) -> int:
    """``k`` for a mean, ``1`` for a sum: an example's share of the
    accumulated gradient is its micro-batch share over this."""
    return self.k if self.mean else 1


def micro_steps(multi_steps: optax.MultiSteps) -> MicroSteps:
  """Reads ``k``, ``use_grad_mean`` and the inner optimizer.

  ``optax.MultiSteps`` keeps its schedule and mean flag as attributes
  without a public accessor; they are read here, in one place, and the
  transformation checks at every call that the optimizer steps where ``k``
  says (:data:`optax_shapley.checks.ACCUMULATION`), so a schedule that
  varies is caught rather than credited wrongly.

  Raises:
    ValueError: ``every_k_schedule`` is not a constant positive int (a
      schedule function whose value at step 0 is not a Python int), or this
      optax's ``MultiSteps`` does not keep the attributes read here.
  """
  try:
    schedule = multi_steps._every_k_schedule  # pylint: disable=protected-access
    mean = bool(multi_steps._use_grad_mean)   # pylint: disable=protected-access
  except AttributeError as e:
    raise ValueError(
        "with_shapley does not recognise this optax version's MultiSteps "
        f"({e}); attribute the concatenated batch in one update instead")
  k = schedule(0)
  if isinstance(k, bool) or not isinstance(k, int) or k < 1:
    raise ValueError(
        "with_shapley(optax.MultiSteps(...)) needs a constant int "
        f"every_k_schedule (micro-batches kept per step); got {k!r} at step "
        "0. A schedule of accumulation lengths is not supported.")
  return MicroSteps(k=k, mean=mean, inner=multi_steps.inner_opt)


class PendingMicroBatches(NamedTuple):
  """The micro-batches seen since the optimizer last stepped.

  Slot ``j`` holds the ``j``-th micro-batch of the current accumulation
  (``MultiStepsState.mini_step`` at its call); ``k - 1`` slots, since the
  ``k``-th micro-batch arrives with the step itself.

  Attributes:
    calls: ``Factors.calls`` of each micro-batch, every leaf stacked
      ``[k - 1, B, ...]``.
    fallback_args: the loss arguments kept for the forward-mode fallback,
      stacked ``[k - 1, ...]``, or ``None`` when no leaf takes it.
    ids: int32[k - 1, B], the micro-batches' example ids.
    error: int32[], :mod:`~optax_shapley.checks` bits of the kept
      micro-batches (a gradient changed before the transformation), added
      to the step's.
  """
  calls: Any
  fallback_args: Any
  ids: jax.Array
  error: jax.Array


def empty(factors: Factors, k: int) -> PendingMicroBatches:
  """Zero slots shaped like one micro-batch's ``factors`` (arrays or
  ``jax.ShapeDtypeStruct``, e.g. from ``jax.eval_shape``) and its ids."""
  slots = lambda x: jnp.zeros((k - 1,) + tuple(x.shape), x.dtype)
  args = None if factors.fallback is None else factors.fallback[1]
  ids = jax.ShapeDtypeStruct((factors.batch_size,), jnp.int32)
  return PendingMicroBatches(
      calls=jax.tree.map(slots, factors.calls),
      fallback_args=jax.tree.map(slots, args),
      ids=slots(ids), error=jnp.zeros([], jnp.int32))


def check_like(pending: PendingMicroBatches, factors: Factors) -> None:
  """Raises ``ValueError`` unless this micro-batch's ``factors`` fit the
  slots of ``pending`` (trace time): same layer calls, shapes and dtypes."""
  args = None if factors.fallback is None else factors.fallback[1]
  want = jax.tree.map(lambda b: (tuple(b.shape[1:]), b.dtype),
                      (pending.calls, pending.fallback_args))
  got = jax.tree.map(lambda x: (tuple(jnp.shape(x)), jnp.result_type(x)),
                     (factors.calls, args))
  same = (jax.tree.structure(got) == jax.tree.structure(want)
          and jax.tree.leaves(got) == jax.tree.leaves(want))
  if not same or pending.ids.shape[1:] != (factors.batch_size,):
    raise ValueError(
        "with_shapley(optax.MultiSteps(...)): this micro-batch's factors do "
        "not match the micro-batch buffers in the state (allocated from "
        "micro_batch_factors, or by the first update): every micro-batch "
        "needs the same batch size and input shapes. Kept shapes "
        f"{jax.tree.leaves(want)[:4]}..., got {jax.tree.leaves(got)[:4]}...")


def store(pending: PendingMicroBatches, slot, factors: Factors,
          ids: jax.Array, error) -> PendingMicroBatches:
  """``pending`` with slot ``slot`` (int32[]) set to this micro-batch and
  its ``error`` bits added (unchanged for ``k = 1``: nothing is kept)."""
  if pending.ids.shape[0] == 0:
    return pending
  put = lambda buf, x: jax.lax.dynamic_update_index_in_dim(
      buf, x.astype(buf.dtype), slot, 0)
  args = None if factors.fallback is None else factors.fallback[1]
  return PendingMicroBatches(
      calls=jax.tree.map(put, pending.calls, factors.calls),
      fallback_args=jax.tree.map(put, pending.fallback_args, args),
      ids=put(pending.ids, ids.astype(jnp.int32)),
      error=pending.error | error)


def concatenate(pending: PendingMicroBatches, factors: Factors,
                ids: jax.Array) -> tuple[Factors, jax.Array]:
  """The ``k`` micro-batches as one batch: ``(factors, ids)`` of
  ``k * B`` examples, micro-batch-major (the kept slots in order, then this
  call's), as a :class:`~optax_shapley.factors.Factors` with
  ``micro_batches = k``.  Its shares are the micro-batches' ``x_{j,i}``
  (divide by :attr:`MicroSteps.divisor` for the accumulated gradient's).
  """
  k = pending.ids.shape[0] + 1
  if k == 1:
    return factors, ids.astype(jnp.int32)
  join = lambda buf, x: jnp.concatenate(
      [buf.reshape((-1,) + buf.shape[2:]), x.astype(buf.dtype)])
  calls = jax.tree.map(join, pending.calls, factors.calls)
  fallback = None
  if factors.fallback is not None:
    params, args = factors.fallback
    kept = tuple(jax.tree.map(lambda b, j=j: b[j], pending.fallback_args)
                 for j in range(k - 1))
    fallback = (params, kept + (args,))
  joined = Factors(
      calls=calls, fallback=fallback, grads=None, plans=factors.plans,
      fallback_leaves=factors.fallback_leaves, loss_fn=factors.loss_fn,
      params_treedef=factors.params_treedef,
      batch_size=k * factors.batch_size, reduction=factors.reduction,
      micro_batches=k)
  return joined, join(pending.ids, ids.astype(jnp.int32))


def accumulated_gradient(micro: MicroSteps, grads, state: optax.MultiStepsState):
  """The gradient ``MultiSteps`` hands its optimizer at a step taken with
  this call's ``grads``: the running mean (Welford's update,
  ``acc + (g - acc) / (n + 1)``) or sum, as ``MultiSteps`` computes it,
  cast like ``grads``."""
  n = state.mini_step
  acc = jax.tree.map(
      lambda g, a: a + (g - a) / (n + 1) if micro.mean else g + a,
      grads, state.acc_grads)
  return jax.tree.map(lambda a, g: a.astype(jnp.result_type(g)), acc, grads)
