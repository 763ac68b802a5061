"""Fidelity against ground truth from really re-running the Adam step.

An MLP trained with Adam on scikit-learn digits, B = 10.  At steps >= 3 the
library's step values are compared with exact Shapley values (enumeration of
all 2^10 coalitions of the real optimizer step, float64) and with exact
leave-one-out.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optax_shapley as oxs
from optax_shapley import truth
from optax_shapley.experiments import data, models

B, LR, STEPS = 10, 1e-3, (3, 6, 21, 51)
ESTIMATORS = (("secant", "midpoint"), ("linearized", "end"),
              ("fixed_state", "start"), ("sgd", "start"), ("removal", "end"))


@pytest.fixture(scope="module")
def run():
  """Trains 21 steps; at STEPS records step values and the ground truth."""
  split = data.load_digits_split(seed=0, val_size=100)
  model = models.MLP(features=(32, 10))
  params = model.init(jax.random.key(0), split.X_train[:1])["params"]

  def per_example_loss(p, x, y):
    return models.cross_entropy(model.apply({"params": p}, x), y)

  xv, yv = jnp.asarray(split.X_val), jnp.asarray(split.y_val)
  val_loss = lambda p: per_example_loss(p, xv, yv)
  tx = oxs.adam(LR, num_examples=len(split.X_train), batch_size=B,
                metric=tuple(m for m, _ in ESTIMATORS),
                evaluation=tuple(e for _, e in ESTIMATORS))
  state = tx.init(params)

  @jax.jit
  def step(p, s, x, y, ids):
    _, g, f = oxs.value_grad_and_factors(per_example_loss)(p, x, y)
    u, s = tx.update(g, s, p, factors=f, example_ids=ids, val_loss=val_loss)
    return optax.apply_updates(p, u), s

  rng = np.random.default_rng(0)
  out = {}
  for t in range(1, max(STEPS) + 1):
    ids = rng.choice(len(split.X_train), B, replace=False)
    x, y = split.X_train[ids], split.y_train[ids]
    if t in STEPS:
      pe = truth.per_example_grads(per_example_loss, params, x, y)
      utility = truth.step_utility(optax.adam(LR), state.inner_state, params,
                                   pe, val_loss)
      shapley = truth.exact_shapley(utility, B)
      loo = truth.leave_one_out(utility, B)
      whole = float(utility(np.ones(B))) - float(utility(np.zeros(B)))
    params, state = step(params, state, x, y, ids)
    if t in STEPS:
      out[t] = dict(values=np.asarray(oxs.step_values(state), np.float64),
                    shapley=shapley, loo=loo, whole=whole)
  return out


def _r(a, b):
  return float(np.corrcoef(a, b)[0, 1])


@pytest.mark.parametrize("t", STEPS)
def test_secant_midpoint_matches_exact_shapley(run, t):
  r = _r(run[t]["values"][:, 0], run[t]["shapley"])
  assert r >= 0.999, r


@pytest.mark.parametrize("t", STEPS)
def test_removal_end_matches_leave_one_out(run, t):
  """Leave-one-out, first order in the validation loss only: the optimizer's
  response to removing x_i is computed exactly (measured R 0.9999 at t=3, 6,
  11, 101 and 0.99999 at t=21, slope 0.99-1.01)."""
  loo, got = run[t]["loo"], run[t]["values"][:, 4]
  assert _r(got, loo) >= 0.999, _r(got, loo)
  slope = np.polyfit(loo, got, 1)[0]
  assert 0.95 <= slope <= 1.05, slope


@pytest.mark.parametrize("t", STEPS)
def test_linearized_end_matches_leave_one_out(run, t):
  """First-order leave-one-out in both the loss and the optimizer.  Removing
  one of ten examples changes a gradient coordinate by up to its whole size
  (inputs that are rarely non-zero: Adam's vhat there is one example's), and
  Adam's update is nonlinear in the gradient, so the Jacobian is looser at
  the earliest steps: measured R 0.981 at t=3 and t=6, 0.994 at t=11, 0.9991
  at t=21, 0.9997 at t=51, 0.995 at t=101, while exact removal (above) gives
  0.9999 at each,
  so the gap is the optimizer's nonlinearity, not the loss's curvature."""
  r = _r(run[t]["values"][:, 1], run[t]["loo"])
  assert r >= (0.999 if t >= 21 else 0.97), r


def test_adam_aware_beats_sgd_baseline_early(run):
  """The paper's finding: SGD-style values fit Adam's step worse."""
  sec = np.mean([_r(run[t]["values"][:, 0], run[t]["shapley"]) for t in STEPS])
  sgd = np.mean([_r(run[t]["values"][:, 3], run[t]["shapley"]) for t in STEPS])
  assert sec > sgd, (sec, sgd)


@pytest.mark.parametrize("t", STEPS)
def test_efficiency(run, t):
  """Values sum to the whole step's effect ``U(B) - U(empty)``.

  The secant metric makes ``sum_i phi_i = -grad L(wbar) . (u(g) - u(0))``
  exactly; with the midpoint ``wbar`` that equals ``U(B) - U(empty)`` up to
  the midpoint rule's third-order error in the step (about 1% of the step's
  effect here), hence the 3% tolerance.  Exact Shapley is efficient by
  construction, which checks the ground truth's bookkeeping.
  """
  v = run[t]
  np.testing.assert_allclose(v["shapley"].sum(), v["whole"], rtol=1e-9, atol=1e-12)
  np.testing.assert_allclose(v["values"][:, 0].sum(), v["whole"], rtol=0.03)


def test_secant_sum_is_exactly_the_midpoint_directional_derivative():
  """``sum_i phi_i = -grad L(mid) . (u(g) - u(0))`` to float32 precision."""
  split = data.load_digits_split(seed=1, val_size=50)
  model = models.MLP(features=(16, 10))
  params = model.init(jax.random.key(1), split.X_train[:1])["params"]
  pel = lambda p, x, y: models.cross_entropy(model.apply({"params": p}, x), y)
  val_loss = lambda p: pel(p, split.X_val, split.y_val)
  # The secant itself (the default credits Adam's first steps exactly, at
  # B > 12 by prefix_normal, which is not exactly efficient).
  tx = oxs.adam(1e-2, num_examples=len(split.X_train), batch_size=16,
                metric="secant")
  inner = optax.adam(1e-2)
  state = tx.init(params)
  for t in range(4):
    ids = np.arange(16) + 16 * t
    x, y = split.X_train[ids], split.y_train[ids]
    _, g, f = oxs.value_grad_and_factors(pel)(params, x, y)
    u, new = tx.update(g, state, params, factors=f, example_ids=ids,
                       val_loss=val_loss)
    upd = lambda gg: inner.update(gg, state.inner_state, params)[0]
    u_g, u_0 = upd(g), upd(jax.tree.map(jnp.zeros_like, g))
    mid = jax.tree.map(lambda w, a, b: w + (a + b) / 2, params, u_g, u_0)
    v = jax.grad(lambda p: val_loss(p).mean())(mid)
    pred = -sum(float(jnp.vdot(a, b - c)) for a, b, c in zip(
        jax.tree.leaves(v), jax.tree.leaves(u_g), jax.tree.leaves(u_0)))
    np.testing.assert_allclose(float(oxs.step_values(new).sum()), pred, rtol=1e-4)
    params, state = optax.apply_updates(params, u), new
