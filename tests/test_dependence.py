"""Trace-time dependence of the optimizer step on the gradient: coordinate-wise
detection against the Jacobian computed by ``jax.jacobian``."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from optax_shapley import dependence, metrics

# A tiny tree: two leaves of different shapes and a scalar.
PARAMS = {"a": jnp.linspace(-1.0, 1.0, 6).reshape(2, 3),
          "b": jnp.array([0.3, -0.2, 0.5, 0.1]), "c": jnp.array(0.7)}
G = {"a": jnp.array([[0.5, -0.1, 0.2], [0.05, -0.3, 0.4]]),
     "b": jnp.array([0.2, 0.15, -0.6, 0.3]), "c": jnp.array(-0.25)}


def _sum_leaf(g):
  """Hand-written: every entry of a leaf moves with the leaf's sum."""
  return jax.tree.map(lambda x: -0.1 * x.sum() * jnp.ones_like(x), g)


def _mix_leaves(g):
  """Hand-written: leaf 'b' picks up leaf 'c'."""
  return {"a": -g["a"], "b": -g["b"] * g["c"], "c": -g["c"]}


def _permute(g):
  """Hand-written: entries of a leaf swapped (same shape, not diagonal)."""
  return {"a": -g["a"][::-1], "b": -g["b"], "c": -g["c"]}


def _custom_calls(g):
  """custom_jvp (jax.nn.relu), jit and remat around elementwise maths."""
  f = jax.jit(lambda x: jax.checkpoint(jnp.tanh)(jax.nn.relu(x) + x ** 2))
  return jax.tree.map(f, g)


COORDINATEWISE = {
    "adam": lambda: optax.adam(1e-2),
    "adamw": lambda: optax.adamw(1e-2, weight_decay=0.1),
    "sgd": lambda: optax.sgd(0.1),
    "sgd_momentum": lambda: optax.sgd(0.1, momentum=0.9),
    "sgd_nesterov": lambda: optax.sgd(0.1, momentum=0.9, nesterov=True),
    "rmsprop": lambda: optax.rmsprop(1e-2),
    "adagrad": lambda: optax.adagrad(1e-2),
    "lion": lambda: optax.lion(1e-3),
    "adam_schedule": lambda: optax.chain(
        optax.scale_by_adam(),
        optax.scale_by_schedule(optax.linear_schedule(-1e-2, 0.0, 10))),
    "apply_if_finite": lambda: optax.apply_if_finite(optax.adam(1e-2), 3),
    "masked": lambda: optax.masked(optax.adam(1e-2),
                                   {"a": True, "b": False, "c": True}),
    "multi_transform": lambda: optax.multi_transform(
        {"x": optax.adam(1e-2), "y": optax.adam(1e-3)},
        {"a": "x", "b": "y", "c": "x"}),
    "elementwise_clip": lambda: optax.chain(optax.clip(0.1), optax.adam(1e-2)),
    "inject_hyperparams": lambda: optax.inject_hyperparams(optax.adam)(
        learning_rate=1e-2),
}

MIXING = {
    "clip_by_global_norm": lambda: optax.chain(
        optax.clip_by_global_norm(0.1), optax.adam(1e-2)),
    "adafactor": lambda: optax.adafactor(1e-2),
    "clip_by_block_rms": lambda: optax.chain(optax.clip_by_block_rms(0.1),
                                             optax.sgd(0.1)),
}

HAND_WRITTEN = {"sum_within_leaf": (_sum_leaf, False),
                "mix_leaves": (_mix_leaves, False),
                "permute_within_leaf": (_permute, False),
                "custom_calls": (_custom_calls, True)}


def _update_of(tx):
  state = tx.init(PARAMS)
  # One step first, so that moments are non-zero.
  state = tx.update(G, state, PARAMS)[1]
  return lambda g: tx.update(g, state, PARAMS)[0]


def _jacobian_is_diagonal(update_fn, g) -> bool:
  """Reference: the full Jacobian at ``g`` and at a second point, zero off
  the diagonal of the flattened gradient."""
  flat, unravel = jax.flatten_util.ravel_pytree(g)
  f = lambda x: jax.flatten_util.ravel_pytree(update_fn(unravel(x)))[0]
  for point in (flat, 0.7 * flat + 0.05):
    jac = np.asarray(jax.jacobian(f)(point))
    assert jac.shape == (flat.size, flat.size)
    if np.any(jac - np.diag(np.diag(jac)) != 0):
      return False
  return True


def _cases():
  for name, make in COORDINATEWISE.items():
    yield name, (lambda make=make: _update_of(make())), True
  for name, make in MIXING.items():
    yield name, (lambda make=make: _update_of(make())), False
  for name, (fn, expected) in HAND_WRITTEN.items():
    yield name, (lambda fn=fn: fn), expected


CASES = {name: (make, expected) for name, make, expected in _cases()}


@pytest.mark.parametrize("name", sorted(CASES))
def test_coordinatewise_detection_agrees_with_the_jacobian(name):
  make, expected = CASES[name]
  update_fn = make()
  assert dependence.is_coordinatewise(update_fn, G) is expected
  assert _jacobian_is_diagonal(update_fn, G) is expected


def test_schedule_free_is_coordinatewise_in_the_gradient():
  """Its step is elementwise; :func:`oxs.with_shapley` refuses it for
  another reason (tested in test_transform)."""
  tx = optax.contrib.schedule_free_adamw(1e-2)
  update_fn = _update_of(tx)
  assert dependence.is_coordinatewise(update_fn, G)
  assert _jacobian_is_diagonal(update_fn, G)


def test_a_leaf_from_a_reduction_over_another_leaf_is_not():
  """A same-shaped leaf fed by another leaf's reduction: mixed."""
  fn = lambda g: {"a": g["a"] * jnp.sum(g["b"]), "b": g["b"], "c": g["c"]}
  assert not dependence.is_coordinatewise(fn, G)


def test_cond_on_the_gradient_is_not_but_on_the_state_is():
  on_g = lambda g: jax.tree.map(
      lambda x: jax.lax.cond(x.sum() > 0, lambda y: y, lambda y: -y, x), g)
  assert not dependence.is_coordinatewise(on_g, G)
  flag = jnp.array(True)
  on_state = lambda g: jax.tree.map(
      lambda x: jax.lax.cond(flag, lambda y: 2 * y, lambda y: jnp.zeros_like(y),
                             x), g)
  assert dependence.is_coordinatewise(on_state, G)


def test_frozen_and_coordinatewise_from_one_trace():
  tx = optax.multi_transform({"t": optax.adam(1e-2), "f": optax.set_to_zero()},
                             {"a": "t", "b": "f", "c": "t"})
  dep = dependence.analyse(_update_of(tx), G)
  assert dep == dependence.UpdateDependence(frozen=(1,), coordinatewise=True)
  # The old import path still works.
  assert metrics.frozen_leaves(_update_of(tx), G) == (1,)
