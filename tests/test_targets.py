"""Several validation targets in one run (``num_targets``, ``val_weights``)
against one single-target run per row, and ``class_targets``."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optax_shapley as oxs
import toy

B, N, D_IN, V, CLASSES = 6, 20, 5, 9, 3
LR = 1e-2


_P = toy.problem(toy.TanhMLP(CLASSES), 1, (N, D_IN), V, CLASSES)
X_ALL, Y_ALL, XV, YV, PARAMS = _P.X, _P.Y, _P.XV, _P.YV, _P.PARAMS
per_example_loss, val_loss = _P.per_example_loss, _P.val_loss
BATCH_IDS = [np.array(b) for b in ([0, 3, 5, 7, 11, 19], [3, 4, 5, 6, 12, 18],
                                   [19, 0, 2, 8, 9, 3])]


def runner(tx, weights=None, vl=val_loss):
  """``go(*vl_args)``: a run from PARAMS with validation loss
  ``vl(params, *vl_args)``; values after len(BATCH_IDS) steps, and the last
  step's values.  ``vl_args`` are arguments of the compiled step, so runs
  that differ only in them (one per target row) share one compilation."""
  @jax.jit
  def step(params, state, x, y, ids, vl_args):
    _, g, f = oxs.value_grad_and_factors(per_example_loss)(params, x, y)
    extra = {} if weights is None else {"val_weights": weights}
    u, state = tx.update(g, state, params, factors=f, example_ids=ids,
                         val_loss=lambda p: vl(p, *vl_args), **extra)
    return optax.apply_updates(params, u), state

  def go(*vl_args):
    params, state = PARAMS, tx.init(PARAMS)
    for ids in BATCH_IDS:
      params, state = step(params, state, X_ALL[ids], Y_ALL[ids],
                           jnp.asarray(ids, jnp.int32), vl_args)
    oxs.check(state)
    return np.asarray(oxs.values(state)), np.asarray(oxs.step_values(state))
  return go


def run(tx, weights=None, vl=val_loss):
  """Values after len(BATCH_IDS) steps, and the last step's values."""
  return runner(tx, weights, vl)()


def weights():
  w = np.asarray(oxs.class_targets(np.asarray(YV), CLASSES))
  mixed = np.linspace(-1.0, 2.0, V, dtype=np.float32) / V   # signed weights
  return np.concatenate([w, mixed[None], oxs.mean_target(V)])  # [K=5, V]


def single_target(p, scaled_row):
  """The same target as a plain run: mean of V * W[k, v] * l_v, with
  ``scaled_row = V * W[k]`` (see :func:`scaled`)."""
  return scaled_row * val_loss(p)


def scaled(row):
  return V * jnp.asarray(row)


ADAM = dict(learning_rate=LR, b1=0.9, b2=0.999, eps=1e-8, elementwise=True)


@pytest.mark.parametrize("metric,evaluation", [
    ("secant", "midpoint"), ("fixed_state", "start"), ("sgd", "start"),
    ("removal", "end"), ("coalitions", "midpoint")])
def test_each_target_equals_its_own_run(metric, evaluation):
  w = weights()
  tx = oxs.with_shapley(optax.adam(LR), num_examples=N, metric=metric,
                        evaluation=evaluation, num_targets=len(w), **ADAM)
  vals, step = run(tx, w)
  assert vals.shape == (N, len(w)) and step.shape == (B, len(w))
  # One plain single-target run per row, all through one compiled step.
  tx1 = oxs.with_shapley(optax.adam(LR), num_examples=N, metric=metric,
                         evaluation=evaluation, **ADAM)
  single = runner(tx1, vl=single_target)
  for k, row in enumerate(w):
    ref, _ = single(scaled(row))
    np.testing.assert_allclose(vals[:, k], ref, rtol=2e-4,
                               atol=2e-4 * np.abs(ref).max())
  # The mean row is the default target.
  default, _ = run(oxs.with_shapley(optax.adam(LR), num_examples=N,
                                    metric=metric, evaluation=evaluation,
                                    **ADAM))
  np.testing.assert_allclose(vals[:, -1], default, rtol=2e-4,
                             atol=2e-4 * np.abs(default).max())


def test_sgd_values_per_class_against_vmap_grad():
  """First step, sgd@start: phi_ik = lr * grad l_i / B . grad L_k, with
  per-example gradients from jax.vmap(jax.grad)."""
  w = oxs.class_targets(np.asarray(YV), CLASSES)
  tx = oxs.sgd(LR, num_examples=N, metric="sgd", evaluation="start",
               num_targets=CLASSES)
  ids = BATCH_IDS[0]
  _, g, f = oxs.value_grad_and_factors(per_example_loss)(
      PARAMS, X_ALL[ids], Y_ALL[ids])
  _, state = tx.update(g, tx.init(PARAMS), PARAMS, factors=f,
                       example_ids=jnp.asarray(ids), val_loss=val_loss,
                       val_weights=w)
  pe = jax.vmap(jax.grad(lambda p, x, y: per_example_loss(p, x[None], y[None])[0]),
                in_axes=(None, 0, 0))(PARAMS, X_ALL[ids], Y_ALL[ids])
  for k in range(CLASSES):
    gk = jax.grad(lambda p: jnp.sum(jnp.asarray(w[k]) * val_loss(p)))(PARAMS)
    ref = LR / B * sum(jnp.einsum("b...,...->b", a, c) for a, c in
                       zip(jax.tree.leaves(pe), jax.tree.leaves(gk)))
    np.testing.assert_allclose(oxs.step_values(state)[:, k], ref, rtol=1e-4,
                               atol=1e-9)


def test_several_estimators_and_targets_shape():
  w = weights()
  tx = oxs.with_shapley(optax.adam(LR), num_examples=N,
                        metric=("secant", "sgd", "removal"),
                        evaluation=("midpoint", "start", "end"),
                        num_targets=len(w), **ADAM)
  vals, step = run(tx, w)
  assert vals.shape == (N, 3, len(w)) and step.shape == (B, 3, len(w))
  single, _ = run(oxs.with_shapley(optax.adam(LR), num_examples=N,
                                   metric="sgd", evaluation="start",
                                   num_targets=len(w), **ADAM), w)
  np.testing.assert_allclose(vals[:, 1], single, rtol=1e-5, atol=1e-9)


def test_ghost_contraction_falls_back_to_exact_with_targets():
  w = weights()
  kw = dict(num_examples=N, num_targets=len(w), **ADAM)
  ghost, _ = run(oxs.with_shapley(optax.adam(LR), contraction="ghost", **kw), w)
  exact, _ = run(oxs.with_shapley(optax.adam(LR), contraction="exact", **kw), w)
  np.testing.assert_allclose(ghost, exact, rtol=1e-6, atol=1e-9)


def test_bad_target_arguments():
  tx = oxs.with_shapley(optax.adam(LR), num_examples=N, num_targets=2, **ADAM)
  with pytest.raises(ValueError, match=r"needs tx.update\(..., val_weights"):
    run(tx)
  with pytest.raises(ValueError, match=r"shape \[num_targets, V\] = \[2, 9\]"):
    run(tx, np.ones((3, V), np.float32))
  with pytest.raises(ValueError, match="val_weights needs"):
    run(oxs.with_shapley(optax.adam(LR), num_examples=N, **ADAM),
        np.ones((1, V), np.float32))
  with pytest.raises(ValueError, match="num_targets must be >= 1"):
    oxs.with_shapley(optax.adam(LR), num_examples=N, num_targets=0)


def test_class_targets():
  labels = np.array([0, 1, 1, 0, 1, 2])
  w = oxs.class_targets(labels, 3)
  np.testing.assert_allclose(w, [[.5, 0, 0, .5, 0, 0],
                                 [0, 1 / 3, 1 / 3, 0, 1 / 3, 0],
                                 [0, 0, 0, 0, 0, 1]], rtol=1e-6)
  assert w.dtype == np.float32
  with pytest.raises(ValueError, match=r"class\(es\) \[1\] have no validation"):
    oxs.class_targets(np.array([0, 2, 2]), 3)
  with pytest.raises(ValueError, match="label 3 is outside"):
    oxs.class_targets(np.array([0, 3]), 3)
  with pytest.raises(ValueError, match="labels must be int"):
    oxs.class_targets(np.array([0.0, 1.0]), 2)
