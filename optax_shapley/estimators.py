r"""Estimators: a metric ``D_t`` and an evaluation point ``wbar_t``, as objects.

Every estimator credits example ``i`` at step ``t`` with (or, for the
metrics that form per-example gradients, instead of)

.. math::

    \phi_{t,i} \approx x_i \cdot d_t, \qquad
    d_t = -D_t^\top \nabla L(\bar w_t), \qquad
    x_i = c\, \nabla \ell_i(w_t)

A :class:`Metric` owns everything about one ``D_t``: its name, which
hyperparameters it needs, whether it needs the momentum-only step ``u(0)``,
whether it is elementwise (``d = S * v``, so the ghost rule can factor
``S``), and how it computes its scale, its direction or its values.  An
:class:`Evaluation` owns one ``wbar_t``.  :data:`METRICS` and
:data:`EVALUATIONS` list them by name; adding a metric is one object here and
one entry in :data:`METRICS`.  The maths are in :mod:`optax_shapley.metrics`
and :mod:`optax_shapley.adam_state`.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from optax_shapley import adam_state, metrics, shapley


class Settings(NamedTuple):
  """What the transformation knows when it is built (static).

  Attributes:
    learning_rate: ``eta`` (a float or an optax schedule), or ``None``.
    b1, b2, eps: Adam's hyperparameters, or ``None``.
    fixed_state_previous: ``fixed_state`` reads ``vhat_{t-1}``.
    elementwise: the optimizer acts coordinate-wise (``with_shapley`` sets
      it per trace from the update's jaxpr unless the user asserted it).
    adam_closed_form: the optimizer is ``optax.adam``/``adamw`` with these
      hyperparameters, so the secant metric has a closed form.
    secant_nodes: Gauss-Legendre nodes of the secant for optimizers that mix
      coordinates.
    coalition_permutations: permutations per step of ``"coalitions"``.
    coalition_chunk: coalitions whose updates are formed at once.
    exact_threshold: ``"auto"`` credits a step by ``"coalitions"`` where
      its :func:`~optax_shapley.metrics.ray_nonlinearity` is above this.
    exact_memory: the bytes those steps may use.
  """
  learning_rate: Any = None
  b1: float | None = None
  b2: float | None = None
  eps: float | None = None
  fixed_state_previous: bool = False
  elementwise: bool | None = False
  adam_closed_form: bool = False
  secant_nodes: int = 3
  coalition_permutations: int = 64
  coalition_chunk: int = 16
  exact_threshold: float = 0.1
  exact_memory: int = 2 ** 30


class Step(NamedTuple):
  """One training step's quantities that an estimator may read (traced).

  Attributes:
    grads: ``g``, the batch gradient as the optimizer received it.
    late_grads: ``g`` for use after the update: read back from Adam's
      moments where that saves memory (:func:`~optax_shapley.adam_state.adam_gradient`),
      else ``grads``.
    update_of: ``g -> u(g)``, the optimizer's update with its state frozen.
    u_g: ``u(g)``, the update really applied.
    u_0: ``u(0)``, the momentum-only step, or ``None`` when no estimator of
      the run needs it.
    prev_state, new_state: the optimizer state before and after the step.
    eta: ``eta_t``, f32[], or ``None`` without a learning rate.
    count: int32[], steps taken before this one.
    axis_name: the data-parallel axis, or ``None``.
  """
  grads: Any
  late_grads: Any
  update_of: Callable[[Any], Any]
  u_g: Any
  u_0: Any
  prev_state: Any
  new_state: Any
  eta: Any
  count: jax.Array
  axis_name: str | None


def _never(settings: Settings) -> bool:
  del settings
  return False


def _always(settings: Settings) -> bool:
  del settings
  return True


@dataclasses.dataclass(frozen=True)
class Metric:
  """One metric ``D_t``.

  Attributes:
    name: what ``with_shapley(metric=...)`` calls it.
    requires: the :class:`Settings` fields it needs (``with_shapley``
      raises if one is ``None``).
    needs_zero_update: ``settings -> bool``, whether it reads ``u(0)``.
    is_elementwise: ``settings -> bool``, whether ``D_t`` is diagonal there,
      so that ``d = S * v`` with ``S = scale(settings, step)``.
    scale: ``(settings, step) -> S``, a tree like the parameters.
    direction: ``(settings, step, v) -> d`` where it is not elementwise.
    values: ``(settings, step, shares, v) -> f32[B]`` for a metric that is
      not linear in ``x_i``: it forms the per-example gradient shares from
      ``shares`` (a :class:`~optax_shapley.metrics.Shares`), all at once
      (``B`` times the parameters' memory) or a few at a time; ``None`` for
      the one-direction metrics.
    exact: for a one-direction metric, the per-example-gradient metric that
      replaces it at the steps where ``exact_when`` holds; ``None``: never.
    exact_when: ``(settings, step, w) -> bool[]`` with ``w = |grad L|``
      (summed over targets), traced: whether this step is credited by
      ``exact``.  The same on every device.
  """
  name: str
  requires: tuple[str, ...] = ()
  needs_zero_update: Callable[[Settings], bool] = _never
  is_elementwise: Callable[[Settings], bool] = _never
  scale: Callable[[Settings, Step], Any] | None = None
  direction: Callable[[Settings, Step, Any], Any] | None = None
  values: Callable[[Settings, Step, Any, Any], jax.Array] | None = None
  exact: Metric | None = None
  exact_when: Callable[[Settings, Step, Any], jax.Array] | None = None

  @property
  def linear(self) -> bool:
    """``phi_i = x_i . d``: one direction per step, no per-example gradient."""
    return self.values is None


def _fixed_state_scale(settings: Settings, step: Step):
  return adam_state.fixed_state_scale(
      step.grads, adam_state.find_adam_state(step.new_state),
      learning_rate=step.eta, b1=settings.b1, b2=settings.b2,
      eps=settings.eps, previous=settings.fixed_state_previous,
      prev_state=adam_state.find_adam_state(step.prev_state))


def _secant_scale(settings: Settings, step: Step):
  if settings.adam_closed_form:
    return adam_state.adam_secant_scale(
        step.late_grads, adam_state.find_adam_state(step.prev_state),
        learning_rate=step.eta, b1=settings.b1, b2=settings.b2,
        eps=settings.eps)
  return metrics.secant_scale(step.update_of, step.grads, step.u_g, step.u_0)


def _global_values(step: Step, shares, run):
  """``run(shares)`` over the global batch: under data parallelism the
  shares are all-gathered (``B_global`` times the parameters' memory on
  every device) and each device keeps its own slice of the values."""
  if step.axis_name is None:
    return run(shares)
  local = jax.tree.leaves(shares)[0].shape[0]
  full = jax.tree.map(
      lambda x: jax.lax.all_gather(x, step.axis_name, tiled=True), shares)
  start = jax.lax.axis_index(step.axis_name) * local
  return jax.lax.dynamic_slice_in_dim(run(full), start, local)


def _coalition_values(settings: Settings, step: Step, shares, v):
  key = jax.random.fold_in(jax.random.key(0), step.count)
  return _global_values(step, shares.all(), lambda s: metrics.coalition_values(
      step.update_of, step.u_0, s, v, key,
      num_permutations=settings.coalition_permutations,
      batch_size=settings.coalition_chunk))


#: Bytes of per-example gradient shares (and their updates)
#: ``"prefix_normal"`` forms at once.  Small enough that the step's working
#: memory is not dominated by them on small models (a large working memory
#: is mapped afresh at every call of the compiled step: on CPU each page the
#: step then touches costs a page fault, ~1 ms a step on the bench MLP).
PREFIX_CHUNK_BYTES = 4 * 2 ** 20

#: Parameter-sized arrays ``"prefix_normal"`` keeps per example in a chunk:
#: the share, the updates at its direct nodes and their sums.
_PREFIX_COPIES_PER_EXAMPLE = 8


def _num_params(like) -> int:
  return sum(int(np.prod(jnp.shape(x))) for x in jax.tree.leaves(like))


def prefix_chunk(settings: Settings, num_params: int) -> int:
  """Examples whose shares ``"prefix_normal"`` forms at once: at most
  ``coalition_chunk``, within :data:`PREFIX_CHUNK_BYTES`, at least 1."""
  per_example = 4 * num_params * _PREFIX_COPIES_PER_EXAMPLE
  return max(1, min(settings.coalition_chunk,
                    PREFIX_CHUNK_BYTES // max(per_example, 1)))


def _prefix_normal_values(settings: Settings, step: Step, shares, v):
  if not settings.elementwise:
    raise ValueError(
        "metric='prefix_normal' needs an optimizer that acts coordinate-wise "
        "(its update of each parameter entry reads only that entry's "
        "gradient); this one mixes coordinates. Use metric='coalitions'.")
  chunk = prefix_chunk(settings, _num_params(step.grads))
  if settings.adam_closed_form and adam_state.float32_moments(
      step.prev_state, step.grads):
    # One flat vector: one copy of the update in the program, not one a leaf.
    flatten, update = adam_state.flat_update(
        adam_state.find_adam_state(step.prev_state), learning_rate=step.eta,
        b1=settings.b1, b2=settings.b2, eps=settings.eps)
    def open_flat():
      rows = shares.open_rows()
      return lambda start, size: flatten(rows(start, size))

    flat = metrics.Shares(shares.num_examples, open_flat)
    v_flat = flatten(v)
    return metrics.prefix_normal_values(
        update, update(jnp.zeros_like(v_flat)), flat, v_flat,
        batch_size=chunk, axis_name=step.axis_name)
  return metrics.prefix_normal_values(
      step.update_of, step.u_0, shares, v, u_g=step.u_g, batch_size=chunk,
      axis_name=step.axis_name)


def _uses_prefix_normal(settings: Settings, players: int) -> bool:
  return bool(settings.elementwise) and players > shapley.EXACT_MAX_PLAYERS


def exact_memory_need(settings: Settings, num_params: int,
                      players: int) -> int:
  """Bytes :data:`SHAPLEY_OF_UPDATE` needs for ``players`` examples (global
  under data parallelism) of ``num_params`` parameters: a few chunks and
  ten parameter-sized arrays for ``"prefix_normal"``, else every share and
  ``3 coalition_chunk`` updates."""
  if _uses_prefix_normal(settings, players):
    chunk = prefix_chunk(settings, num_params)
    return 4 * num_params * (chunk * (_PREFIX_COPIES_PER_EXAMPLE + 1) + 10)
  return 4 * num_params * (players + 3 * settings.coalition_chunk)


def _exact_values(settings: Settings, step: Step, shares, v):
  """Exact enumeration up to ``EXACT_MAX_PLAYERS`` examples, else the
  per-coordinate games of an elementwise optimizer, else permutations."""
  players = shares.num_examples * (
      1 if step.axis_name is None else jax.lax.psum(1, step.axis_name))
  if _uses_prefix_normal(settings, players):
    return _prefix_normal_values(settings, step, shares, v)
  return _coalition_values(settings, step, shares, v)


#: The SGD metric ``D = -eta I`` (first-order In-Run Data Shapley, TracIn).
SGD = Metric(
    name="sgd", requires=("learning_rate",), is_elementwise=_always,
    scale=lambda s, step: metrics.sgd_scale(step.grads, learning_rate=step.eta))

#: The paper's Adam-aware metric with the moments frozen
#: (:func:`~optax_shapley.adam_state.fixed_state_scale`).
FIXED_STATE = Metric(
    name="fixed_state", requires=("learning_rate", "b1", "b2", "eps"),
    is_elementwise=_always, scale=_fixed_state_scale)

#: The exact Jacobian ``du/dg`` at ``g_t``
#: (:func:`~optax_shapley.metrics.linearized_direction`).
LINEARIZED = Metric(
    name="linearized", is_elementwise=lambda s: s.elementwise,
    scale=lambda s, step: metrics.linearized_scale(step.update_of, step.grads),
    direction=lambda s, step, v: metrics.linearized_direction(
        step.update_of, step.grads, v))

#: The ray average of the Jacobian (Aumann-Shapley), the default
#: (:func:`~optax_shapley.metrics.secant_direction`,
#: :func:`~optax_shapley.adam_state.adam_secant_scale`).
SECANT = Metric(
    name="secant", needs_zero_update=lambda s: not s.adam_closed_form,
    is_elementwise=lambda s: s.elementwise, scale=_secant_scale,
    direction=lambda s, step, v: metrics.secant_direction(
        step.update_of, step.grads, step.u_g, step.u_0, v, elementwise=False,
        nodes=s.secant_nodes))

#: Each example's share taken out of the real update
#: (:func:`~optax_shapley.metrics.removal_values`).
REMOVAL = Metric(
    name="removal",
    values=lambda s, step, shares, v: metrics.removal_values(
        step.update_of, step.grads, step.u_g, shares.all(), v))

#: Shapley values of the real update re-run on coalitions
#: (:func:`~optax_shapley.metrics.coalition_values`).
COALITIONS = Metric(name="coalitions", needs_zero_update=_always,
                    values=_coalition_values)

#: Shapley values of an elementwise optimizer's real update, coordinate by
#: coordinate with normal-approximated prefix sums
#: (:func:`~optax_shapley.metrics.prefix_normal_values`).
PREFIX_NORMAL = Metric(name="prefix_normal", needs_zero_update=_always,
                       values=_prefix_normal_values)

#: What ``"auto"`` credits its nonlinear steps by: :data:`COALITIONS`
#: enumerated exactly up to ``EXACT_MAX_PLAYERS`` examples, beyond that
#: :data:`PREFIX_NORMAL` for an elementwise optimizer, else
#: :data:`COALITIONS` by permutations.
SHAPLEY_OF_UPDATE = Metric(name="shapley_of_update", needs_zero_update=_always,
                           values=_exact_values)


def _nonlinear_step(settings: Settings, step: Step, weight) -> jax.Array:
  if settings.adam_closed_form:
    nu = adam_state.adam_ray_nonlinearity(
        step.late_grads, adam_state.find_adam_state(step.prev_state), weight,
        learning_rate=step.eta, b1=settings.b1, b2=settings.b2,
        eps=settings.eps)
  else:
    nu = metrics.ray_nonlinearity(step.update_of, step.late_grads, step.u_g,
                                  step.u_0, weight)
  hit = nu > settings.exact_threshold
  if step.axis_name is not None:     # one branch on every device
    hit = jax.lax.pmax(hit.astype(jnp.int32), step.axis_name) > 0
  return hit


#: The default metric, the secant, with exact Shapley values of the real
#: update (``coalitions``) at the steps where the secant cannot follow it, decided
#: per step by :func:`~optax_shapley.metrics.ray_nonlinearity` (Adam's
#: sign-descent first steps, and again after a restart of its moments).
AUTO = dataclasses.replace(
    SECANT, name="auto", needs_zero_update=_always, exact=SHAPLEY_OF_UPDATE,
    exact_when=_nonlinear_step)

#: Every metric, by name.
METRICS: dict[str, Metric] = {
    m.name: m for m in (AUTO, SGD, FIXED_STATE, LINEARIZED, SECANT, REMOVAL,
                        COALITIONS, PREFIX_NORMAL)}


@dataclasses.dataclass(frozen=True)
class Evaluation:
  """One evaluation point ``wbar_t``.

  Attributes:
    name: what ``with_shapley(evaluation=...)`` calls it.
    needs_zero_update: whether it reads ``u(0)``.
    point: ``(params, u_g, u_0) -> wbar_t``.
  """
  name: str
  needs_zero_update: bool
  point: Callable[[Any, Any, Any], Any]


#: ``w_t``: first-order Taylor (the paper; In-Run Data Shapley).
START = Evaluation("start", False, lambda params, u_g, u_0: params)

#: ``w_t + (u(0) + u(g)) / 2``: exact Shapley when ``L`` is quadratic along
#: the step (the second-order In-Run term at first-order cost).
MIDPOINT = Evaluation(
    "midpoint", True, lambda params, u_g, u_0: optax.apply_updates(
        params, jax.tree.map(lambda a, b: (a + b) / 2, u_0, u_g)))

#: ``w_t + u(g)``: leave-one-out (with ``removal``, or ``linearized`` to
#: first order).
END = Evaluation("end", False,
                 lambda params, u_g, u_0: optax.apply_updates(params, u_g))

#: Every evaluation point, by name.
EVALUATIONS: dict[str, Evaluation] = {e.name: e for e in (START, MIDPOINT, END)}


class Estimator(NamedTuple):
  """A metric at an evaluation point: one column of the values."""
  metric: Metric
  evaluation: Evaluation

  @property
  def name(self) -> str:
    return f"{self.metric.name}@{self.evaluation.name}"

  def needs_zero_update(self, settings: Settings) -> bool:
    return (self.metric.needs_zero_update(settings)
            or self.evaluation.needs_zero_update)


def _as_tuple(x) -> tuple:
  return tuple(x) if isinstance(x, (tuple, list)) else (x,)


def resolve(metric: str | Sequence[str], evaluation: str | Sequence[str],
            settings: Settings) -> tuple[Estimator, ...]:
  """The estimators named by ``with_shapley(metric=..., evaluation=...)``.

  A single name is broadcast against a tuple.

  Raises:
    ValueError: different lengths, an unknown name, or a metric whose
      required hyperparameters are not in ``settings``.
  """
  ms, es = _as_tuple(metric), _as_tuple(evaluation)
  if len(ms) != len(es) and 1 not in (len(ms), len(es)):
    raise ValueError(
        f"metric {metric!r} and evaluation {evaluation!r} must have the same "
        "length, or one of them must be a single name")
  n = max(len(ms), len(es))
  ms, es = ms * (n // len(ms)), es * (n // len(es))
  for m in ms:
    if m not in METRICS:
      raise ValueError(f"unknown metric {m!r}; choose from {tuple(METRICS)}")
  for e in es:
    if e not in EVALUATIONS:
      raise ValueError(
          f"unknown evaluation {e!r}; choose from {tuple(EVALUATIONS)}")
  out = tuple(Estimator(METRICS[m], EVALUATIONS[e]) for m, e in zip(ms, es))
  for est in out:
    missing = [h for h in est.metric.requires if getattr(settings, h) is None]
    if missing:
      raise ValueError(f"metric {est.metric.name!r} needs "
                       f"{', '.join(est.metric.requires)}; missing: "
                       f"{', '.join(missing)}")
  return out


def learning_rate_at(learning_rate, step) -> jax.Array | None:
  """``eta_t``: a float, or an optax schedule evaluated at the 0-based step;
  ``None`` without a learning rate."""
  if learning_rate is None:
    return None
  if callable(learning_rate):
    return jnp.asarray(learning_rate(step), jnp.float32)
  return jnp.asarray(learning_rate, jnp.float32)
