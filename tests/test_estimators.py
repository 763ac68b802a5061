"""Estimators as objects: a metric added in one place works end to end."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optax_shapley as oxs
import toy
from optax_shapley import estimators, metrics

B, N = 6, 12
P = toy.problem(toy.TanhMLP(), seed=3, x_shape=(N, 5), num_val=4)


def _step_values(tx):
  ids = jnp.arange(B)
  _, g, f = oxs.value_grad_and_factors(P.per_example_loss)(
      P.PARAMS, P.X[:B], P.Y[:B])
  _, s = tx.update(g, tx.init(P.PARAMS), P.PARAMS, factors=f, example_ids=ids,
                   val_loss=P.val_loss)
  oxs.check(s)
  return np.asarray(oxs.step_values(s))


def test_a_new_metric_is_one_object(monkeypatch):
  """A metric ``D = -2 eta I`` registered in ``estimators.METRICS`` only: its
  values at the start are twice the sgd baseline's, which are
  ``eta x_i . grad L(w)`` by per-example gradients from ``jax.vmap``."""
  double = estimators.Metric(
      name="double_sgd", requires=("learning_rate",),
      is_elementwise=lambda s: True,
      scale=lambda s, step: metrics.sgd_scale(step.grads,
                                              learning_rate=2 * step.eta))
  monkeypatch.setitem(estimators.METRICS, double.name, double)
  lr = 1e-2
  got = _step_values(oxs.adam(lr, num_examples=N, batch_size=B,
                              metric="double_sgd", evaluation="start"))
  per_example = jax.vmap(lambda x, y: jax.grad(
      lambda p: P.per_example_loss(p, x[None], y[None])[0])(P.PARAMS))(
          P.X[:B], P.Y[:B])
  v = jax.grad(lambda p: jnp.mean(P.val_loss(p)))(P.PARAMS)
  want = sum(jnp.tensordot(pe, vv, axes=vv.ndim) for pe, vv in zip(
      jax.tree.leaves(per_example), jax.tree.leaves(v))) * 2 * lr / B
  np.testing.assert_allclose(got, want, rtol=1e-4,
                             atol=1e-6 * float(jnp.abs(want).max()))


def test_required_hyperparameters_are_named():
  with pytest.raises(ValueError, match="missing: b1, b2, eps"):
    oxs.with_shapley(optax.adam(1e-3), num_examples=N, metric="fixed_state",
                     learning_rate=1e-3)
  with pytest.raises(ValueError, match="missing: learning_rate"):
    oxs.with_shapley(optax.sgd(1e-3), num_examples=N, metric="sgd")


def test_estimator_objects_say_what_they_need():
  closed = estimators.Settings(learning_rate=1.0, b1=0.9, b2=0.999, eps=1e-8,
                               elementwise=True, adam_closed_form=True)
  generic = closed._replace(
      adam_closed_form=False, elementwise=False)
  secant = estimators.METRICS["secant"]
  assert not secant.needs_zero_update(closed) and secant.needs_zero_update(generic)
  assert secant.is_elementwise(closed) and not secant.is_elementwise(generic)
  assert secant.linear and not estimators.METRICS["removal"].linear
  mid = estimators.Estimator(secant, estimators.EVALUATIONS["midpoint"])
  assert mid.name == "secant@midpoint" and mid.needs_zero_update(closed)
