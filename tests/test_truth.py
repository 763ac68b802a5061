"""Independent checks of the ground truth in ``optax_shapley.truth``."""

import itertools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from optax_shapley import truth


# ---------------------------------------------------------------------------
# Hand-made games


def _brute_force_shapley(value_fn, n):
  """Shapley values by enumerating all n! orderings (numpy, float64)."""
  phi = np.zeros(n)
  for perm in itertools.permutations(range(n)):
    mask = np.zeros(n)
    prev = value_fn(mask)
    for j in perm:
      mask[j] = 1.0
      cur = value_fn(mask)
      phi[j] += cur - prev
      prev = cur
  return phi / math.factorial(n)


def test_exact_additive_plus_interaction():
  a = jnp.array([0.3, -1.2, 2.0, 0.5, -0.1])
  c, const = 0.7, 4.0

  def utility(mask):
    return const + mask @ a + c * mask[0] * mask[1]

  phi = truth.exact_shapley(utility, 5)
  expected = np.array(a, dtype=np.float64)
  expected[:2] += c / 2  # the interaction is split equally
  assert phi.dtype == np.float64 and phi.shape == (5,)
  np.testing.assert_allclose(phi, expected, rtol=1e-6, atol=1e-7)
  # Efficiency: the constant U(empty) belongs to nobody.
  np.testing.assert_allclose(phi.sum(), float(a.sum()) + c, rtol=1e-6)


def test_exact_weighted_majority_game():
  # Weights [3, 1, 1, 1, 0], quota 4. Player 0 is pivotal unless it comes
  # before all of players 1..3 (probability 1/4): phi_0 = 3/4. Players 1..3
  # are symmetric and share the remaining 1/4; player 4 is a null player.
  weights = jnp.array([3.0, 1.0, 1.0, 1.0, 0.0])

  def utility(mask):
    return (mask @ weights >= 4.0).astype(mask.dtype)

  phi = truth.exact_shapley(utility, 5)
  np.testing.assert_allclose(phi, [0.75, 1 / 12, 1 / 12, 1 / 12, 0.0], atol=1e-12)
  assert phi[1] == phi[2] == phi[3]  # symmetry
  assert phi[4] == 0.0  # null player
  assert np.isclose(phi.sum(), 1.0)  # efficiency: U(all) - U(empty) = 1


def test_exact_matches_permutation_enumeration_on_random_game():
  n = 5
  table = np.random.default_rng(0).normal(size=2**n)
  powers = 2 ** np.arange(n)

  def value_np(mask):
    return table[int(np.asarray(mask) @ powers)]

  table_j = jnp.asarray(table)

  def utility(mask):
    index = jnp.round(mask @ powers).astype(jnp.int32)
    return table_j[index]

  phi = truth.exact_shapley(utility, n, chunk_size=7)  # 7 does not divide 32
  np.testing.assert_allclose(phi, _brute_force_shapley(value_np, n), atol=1e-12)
  np.testing.assert_allclose(phi.sum(), table[-1] - table[0], atol=1e-12)


def test_exact_rejects_too_many_players():
  with pytest.raises(ValueError, match="2\\^n"):
    truth.exact_shapley(lambda m: jnp.sum(m), 17)
  with pytest.raises(ValueError):
    truth.exact_shapley(lambda m: jnp.sum(m), 0)


def _nonlinear_game(n=8):
  w = jnp.asarray(np.random.default_rng(1).uniform(0.2, 2.0, size=n))

  def utility(mask):
    s = mask @ w
    return jnp.sqrt(s + 1.0) + 0.3 * mask[0] * mask[3] - 0.5 * jnp.tanh(s - 2.0)

  return utility, n


def test_monte_carlo_converges_to_exact():
  utility, n = _nonlinear_game()
  exact = truth.exact_shapley(utility, n)
  key = jax.random.PRNGKey(0)
  for antithetic in (True, False):
    values, stderr = truth.monte_carlo_shapley(
        utility, n, key, num_permutations=400, antithetic=antithetic
    )
    assert values.dtype == np.float64 and stderr.shape == (n,)
    assert np.all(stderr > 0)
    assert np.all(np.abs(values - exact) <= 4 * stderr + 1e-12), (values, exact, stderr)
    # Every permutation is efficient, so the estimate is too.
    np.testing.assert_allclose(values.sum(), exact.sum(), rtol=1e-10)


def test_monte_carlo_stderr_shrinks():
  utility, n = _nonlinear_game()
  key = jax.random.PRNGKey(1)
  _, few = truth.monte_carlo_shapley(utility, n, key, num_permutations=50)
  _, many = truth.monte_carlo_shapley(utility, n, key, num_permutations=1600)
  # sqrt(1600 / 50) ~ 5.7; allow for noise in the stderr estimates.
  assert np.mean(many) < 0.4 * np.mean(few)


def test_monte_carlo_exact_on_additive_game():
  a = jnp.array([1.0, -2.0, 0.5, 3.0])
  values, stderr = truth.monte_carlo_shapley(
      lambda m: m @ a + 1.0, 4, jax.random.PRNGKey(2), num_permutations=6
  )
  np.testing.assert_allclose(values, a, atol=1e-12)
  np.testing.assert_allclose(stderr, 0.0, atol=1e-12)


def test_monte_carlo_argument_errors():
  with pytest.raises(ValueError, match="even"):
    truth.monte_carlo_shapley(jnp.sum, 3, jax.random.PRNGKey(0), num_permutations=5)
  values, stderr = truth.monte_carlo_shapley(
      jnp.sum, 3, jax.random.PRNGKey(0), num_permutations=5, antithetic=False
  )
  np.testing.assert_allclose(values, 1.0)


def test_leave_one_out_additive_equals_weights():
  a = jnp.array([0.25, -1.0, 3.5, 0.0, 2.0, -0.75])
  loo = truth.leave_one_out(lambda m: m @ a - 5.0, 6)
  assert loo.dtype == np.float64
  np.testing.assert_allclose(loo, a, atol=1e-12)


def test_leave_one_out_majority_game():
  weights = jnp.array([3.0, 1.0, 1.0, 1.0, 0.0])
  loo = truth.leave_one_out(lambda m: (m @ weights >= 4.0).astype(m.dtype), 5)
  np.testing.assert_allclose(loo, [1.0, 0.0, 0.0, 0.0, 0.0])


# ---------------------------------------------------------------------------
# The real step: SGD on a linear model, closed forms


def _linear_problem(seed=0, b=7, d=5, v=9):
  rng = np.random.default_rng(seed)
  x = rng.normal(size=(b, d))
  y = rng.normal(size=b)
  params = {"w": rng.normal(size=d), "b": np.array(0.3)}
  resid = x @ params["w"] + params["b"] - y  # l_i = 0.5 * resid_i^2
  grads = {"w": resid[:, None] * x, "b": resid}  # by hand, not by JAX
  return rng, x, y, params, grads


def test_sgd_linear_val_loss_is_additive():
  rng, x, _, params, grads = _linear_problem()
  b, d = x.shape
  a = rng.normal(size=(9, d))
  c = rng.normal(size=9)
  lr = 0.1

  def val_loss(p):  # linear in the parameters
    return jnp.asarray(a) @ p["w"] + jnp.asarray(c) * p["b"]

  # NumPy float64 trees go in as they are: jnp.asarray outside 64-bit mode
  # would round them to float32 before step_utility could cast them.
  params_j, grads_j = params, grads
  tx = optax.sgd(lr)
  # Per-example term: lr/B * (abar . grad_w l_i + cbar * grad_b l_i).
  terms = lr / b * (grads["w"] @ a.mean(0) + grads["b"] * c.mean())

  for reduction, scale in (("mean", 1.0), ("sum", float(b))):
    utility = truth.step_utility(
        tx, tx.init(params_j), params_j, grads_j, val_loss, reduction=reduction
    )
    masks = rng.integers(0, 2, size=(3, 4, b)).astype(np.float64)
    u = utility(masks)
    assert u.shape == (3, 4) and u.dtype == jnp.float64
    np.testing.assert_allclose(np.asarray(u), scale * masks @ terms, rtol=1e-10, atol=1e-14)
    np.testing.assert_allclose(float(utility(np.zeros(b))), 0.0, atol=1e-14)

  utility = truth.step_utility(tx, tx.init(params_j), params_j, grads_j, val_loss)
  np.testing.assert_allclose(truth.exact_shapley(utility, b), terms, rtol=1e-9, atol=1e-14)
  np.testing.assert_allclose(truth.leave_one_out(utility, b), terms, rtol=1e-9, atol=1e-14)
  assert abs(truth.efficiency_gap(utility, terms)) < 1e-13


def test_sgd_quadratic_val_loss_shapley_closed_form():
  # L(w) = 0.5 mean_v (a_v . w - z_v)^2, so U(S) is quadratic in the mask:
  # U(m) = lr * gL . G m / B - lr^2 / (2 B^2) m^T G^T H G m, with G the per-example
  # gradients as columns and H = mean_v a_v a_v^T. A pairwise term m_i m_j is
  # shared equally, so phi_i = alpha_i - sum_j beta_ij.
  rng, x, _, params, grads = _linear_problem(seed=3, b=6)
  params = {"w": params["w"]}
  grads = {"w": grads["w"]}
  b, d = x.shape
  a = rng.normal(size=(11, d))
  z = rng.normal(size=11)
  lr = 0.05

  def val_loss(p):
    return 0.5 * (jnp.asarray(a) @ p["w"] - jnp.asarray(z)) ** 2

  tx = optax.sgd(lr)
  utility = truth.step_utility(tx, tx.init(params), params, grads, val_loss)
  gmat = grads["w"].T  # [d, B]
  grad_l = a.T @ (a @ params["w"] - z) / len(z)
  hess = a.T @ a / len(z)
  alpha = lr / b * gmat.T @ grad_l
  beta = lr**2 / (2 * b**2) * gmat.T @ hess @ gmat
  expected = alpha - beta.sum(axis=1)
  phi = truth.exact_shapley(utility, b)
  np.testing.assert_allclose(phi, expected, rtol=1e-9, atol=1e-15)
  # Leave-one-out differs: U(all) - U(all - i) = alpha_i - 2 sum_j beta_ij + beta_ii.
  loo = truth.leave_one_out(utility, b)
  np.testing.assert_allclose(
      loo, alpha - 2 * beta.sum(axis=1) + np.diag(beta), rtol=1e-9, atol=1e-15
  )


def test_step_utility_argument_errors():
  params = {"w": jnp.ones(3)}
  grads = {"w": jnp.ones((4, 3))}
  tx = optax.sgd(0.1)
  with pytest.raises(ValueError, match="reduction"):
    truth.step_utility(tx, tx.init(params), params, grads, jnp.sum, reduction="max")
  with pytest.raises(ValueError, match="leading"):
    truth.step_utility(
        tx, tx.init(params), {"w": jnp.ones(3), "v": jnp.ones(2)},
        {"w": jnp.ones((4, 3)), "v": jnp.ones((5, 2))}, lambda p: p["w"],
    )
  utility = truth.step_utility(tx, tx.init(params), params, grads, lambda p: p["w"])
  with pytest.raises(ValueError, match="mask"):
    utility(jnp.ones(5))


# ---------------------------------------------------------------------------
# The real step: Flax MLP, Adam


class _MLP(nn.Module):

  @nn.compact
  def __call__(self, x):
    x = nn.tanh(nn.Dense(16)(x))
    return nn.Dense(3)(x)


def _mlp_problem(b=6, v=20, d=5):
  k = jax.random.split(jax.random.PRNGKey(0), 5)
  model = _MLP()
  x = jax.random.normal(k[0], (b, d))
  y = jax.random.randint(k[1], (b,), 0, 3)
  xv = jax.random.normal(k[2], (v, d))
  yv = jax.random.randint(k[3], (v,), 0, 3)
  params = model.init(k[4], x)

  def per_example_loss(p, x, y):
    return optax.softmax_cross_entropy_with_integer_labels(model.apply(p, x), y)

  def val_loss(p):
    return per_example_loss(p, xv, yv)

  return model, x, y, params, per_example_loss, val_loss


def test_per_example_grads_matches_jacrev():
  model, x, y, params, per_example_loss, _ = _mlp_problem()
  for dtype, tol in ((None, 1e-5), (jnp.float64, 1e-12)):
    grads = truth.per_example_grads(per_example_loss, params, x, y, dtype=dtype)
    with truth.enable_x64():
      p = jax.tree.map(lambda a: jnp.asarray(a, dtype or a.dtype), params)
      ref = jax.jit(jax.jacrev(per_example_loss))(p, x, y)
    for g, r in zip(jax.tree.leaves(grads), jax.tree.leaves(ref)):
      assert g.shape == r.shape and g.shape[0] == x.shape[0]
      assert g.dtype == (dtype or jnp.float32)
      np.testing.assert_allclose(np.asarray(g), np.asarray(r), rtol=tol, atol=tol)
  # Not scaled by 1/B: the mean over examples is the batch gradient.
  with truth.enable_x64():
    p64 = jax.tree.map(lambda a: jnp.asarray(a, jnp.float64), params)
    full = jax.jit(jax.grad(lambda p: jnp.mean(per_example_loss(p, x, y))))(p64)
  grads = truth.per_example_grads(per_example_loss, params, x, y)
  for g, f in zip(jax.tree.leaves(grads), jax.tree.leaves(full)):
    np.testing.assert_allclose(np.asarray(g).mean(0), np.asarray(f), rtol=1e-10, atol=1e-14)


def test_per_example_grads_errors():
  with pytest.raises(ValueError, match="batched"):
    truth.per_example_grads(lambda p, s: p * s, jnp.ones(()), 2.0)
  with pytest.raises(ValueError, match="batch size"):
    truth.per_example_grads(lambda p, a, b: p * a + b, jnp.ones(()), jnp.ones(3), jnp.ones(4))


def test_flax_mlp_runs_in_float64_with_float64_params():
  model, x, _, params, _, _ = _mlp_problem()
  with truth.enable_x64():
    p64 = jax.tree.map(lambda a: jnp.asarray(a, jnp.float64), params)
    assert model.apply(p64, x).dtype == jnp.float64  # x itself is float32
    assert x.dtype == jnp.float32


def test_adam_step_utility_matches_direct_update():
  model, x, y, params, per_example_loss, val_loss = _mlp_problem()
  b = x.shape[0]
  tx = optax.adam(1e-2)
  x64_before = bool(jax.config.jax_enable_x64)

  # A couple of real float64 steps, so that the moments are non-trivial.
  with truth.enable_x64():
    p = jax.tree.map(lambda a: jnp.asarray(a, jnp.float64), params)
    state = tx.init(p)
    batch_grad = jax.grad(lambda p: jnp.mean(per_example_loss(p, x, y)))
    for _ in range(2):
      updates, state = tx.update(batch_grad(p), state, p)
      p = optax.apply_updates(p, updates)
    assert state[0].count.dtype == jnp.int32

  grads = truth.per_example_grads(per_example_loss, p, x, y)
  utility = truth.step_utility(tx, state, p, grads, val_loss)
  assert bool(jax.config.jax_enable_x64) == x64_before  # nothing leaked

  with truth.enable_x64():
    base = jnp.mean(val_loss(p))
    full_updates, _ = tx.update(batch_grad(p), state, p)
    direct_full = base - jnp.mean(val_loss(optax.apply_updates(p, full_updates)))
    zero = jax.tree.map(jnp.zeros_like, p)
    momentum_updates, _ = tx.update(zero, state, p)
    direct_empty = base - jnp.mean(val_loss(optax.apply_updates(p, momentum_updates)))

  u_full = utility(jnp.ones(b))
  u_empty = utility(jnp.zeros(b))
  assert u_full.dtype == jnp.float64
  np.testing.assert_allclose(float(u_full), float(direct_full), rtol=1e-10, atol=1e-15)
  np.testing.assert_allclose(float(u_empty), float(direct_empty), rtol=1e-10, atol=1e-15)
  assert float(u_empty) != 0.0  # the momentum step moves the parameters

  # Efficiency of the exact Shapley values of the real step.
  phi = truth.exact_shapley(utility, b)
  np.testing.assert_allclose(phi.sum(), float(u_full - u_empty), rtol=1e-10, atol=1e-15)
  assert abs(truth.efficiency_gap(utility, phi)) < 1e-13

  # Batched masks agree with single calls.
  masks = np.random.default_rng(0).integers(0, 2, size=(2, 3, b))
  batched = np.asarray(utility(masks))
  singles = np.array([[float(utility(m)) for m in row] for row in masks])
  np.testing.assert_allclose(batched, singles, rtol=1e-12, atol=1e-16)

  # Float32 utility: same numbers up to float32 rounding.
  utility32 = truth.step_utility(tx, state, p, grads, val_loss, dtype=jnp.float32)
  u32 = utility32(jnp.ones(b))
  assert u32.dtype == jnp.float32
  np.testing.assert_allclose(float(u32), float(u_full), rtol=1e-3, atol=1e-6)
