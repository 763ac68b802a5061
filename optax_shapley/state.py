"""The state of the Shapley transformation, and finding it inside a chain."""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import optax


class ShapleyState(NamedTuple):
  """State of :func:`optax_shapley.with_shapley`.

  Attributes:
    inner_state: the wrapped optax optimizer's state.
    values: f32[num_examples] (``[num_examples, E]`` with several estimators,
      ``[..., K]`` with several targets): accumulated values
      ``Phi_i = sum_t phi_{t,i}``; positive = helpful.  Zero rows with
      ``table="none"``.
    step_values: f32[B] (``[B, E]``, ``[B, K]`` or ``[B, E, K]`` as
      ``values``): the last step's values, aligned with the last
      ``example_ids`` (gathered in device order under data parallelism).
      Zeros before the first step, NaN after a skipped step.
    count: int32, number of steps taken (update calls: with
      ``optax.MultiSteps``, micro-batches).
    skipped: int32, number of steps whose credit was skipped (see ``error``).
    error: int32 bitmask of the reasons credit was skipped
      (:data:`optax_shapley.checks.STEP_ERRORS`), over all steps.
    first_error_step: int32, the first skipped step, counted from 1 as
      ``count`` (step ``t`` is the ``t``-th update); -1 if none.
    first_error: int32 bitmask of that step's reasons; 0 if none.
    first_error_id: int32, an example id that made that step fail
      (the first out-of-range id, else one that appeared twice); -1 if
      none (meaningful only where ``first_error`` has an id bit: -1 itself
      can be an out-of-range id).
    exact_steps: int32, number of credited steps that an estimator with an
      exact fallback (``metric="auto"``) credited by exact Shapley values of
      the real update instead of its one-direction metric.
    pending: with gradient accumulation (``optax.MultiSteps``), the
      micro-batches kept until the optimizer steps
      (:class:`optax_shapley.accumulation.PendingMicroBatches`); ``None``
      otherwise, and before the first update.
  """
  inner_state: optax.OptState
  values: jax.Array
  step_values: jax.Array
  count: jax.Array
  skipped: jax.Array
  error: jax.Array
  first_error_step: jax.Array
  first_error: jax.Array
  first_error_id: jax.Array
  exact_steps: jax.Array
  pending: Any = None


def find_state(state) -> ShapleyState:
  """The :class:`ShapleyState` itself, or the one inside a chain's state.

  Raises:
    ValueError: there is none, or several (two Shapley transformations in
      one optimizer: which one's values are meant is ambiguous).
  """
  if isinstance(state, ShapleyState):
    return state
  is_state = lambda x: isinstance(x, ShapleyState)
  found = [s for s in jax.tree.leaves(state, is_leaf=is_state) if is_state(s)]
  if not found:
    raise ValueError("no ShapleyState in this optimizer state")
  if len(found) > 1:
    raise ValueError(
        f"this optimizer state holds {len(found)} ShapleyStates; pass the "
        "one you mean (e.g. state[k] of an optax.chain)")
  return found[0]
