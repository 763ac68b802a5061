"""The default metric ``"auto"``: the secant, with exact Shapley values of the
real update at the steps where the secant cannot follow Adam.

References: a float64 finite difference for the nonlinearity criterion, the
``coalitions`` and ``secant`` columns of the same run, and exact Shapley
values of every real step (``truth.step_utility``, all ``2^B`` coalitions)
summed over a whole run from initialisation."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optax_shapley as oxs
import toy
from optax_shapley import adam_state, metrics, truth

B, N, D_IN, V, CLASSES = 6, 30, 5, 9, 3


MODEL = toy.TanhMLP(CLASSES)
_K = jax.random.split(jax.random.key(7), 4)
X_ALL = jax.random.normal(_K[0], (N, D_IN))
Y_ALL = jax.random.randint(_K[1], (N,), 0, CLASSES)
XV = jax.random.normal(_K[2], (V, D_IN))
YV = jnp.arange(V) % CLASSES
PARAMS = MODEL.init(_K[3], X_ALL[:B])["params"]
per_example_loss, val_loss = toy.losses(MODEL, XV, YV)


def _batches(steps, seed=0):
  rng = np.random.default_rng(seed)
  out = []
  while len(out) < steps:
    order = rng.permutation(N)
    out += [order[k * B:(k + 1) * B] for k in range(N // B)]
  return out[:steps]


def _run(tx, steps, inner=None, truth_too=False):
  """``steps`` steps from initialisation; returns the final state, every
  step's (exact_steps, step_values) and, with ``truth_too``, the exact
  Shapley values of every real step summed per example."""
  @jax.jit
  def step(p, st, x, y, ids):
    _, g, f = oxs.value_grad_and_factors(per_example_loss)(p, x, y)
    u, st = tx.update(g, st, p, factors=f, example_ids=ids, val_loss=val_loss)
    return optax.apply_updates(p, u), st

  p, st = PARAMS, tx.init(PARAMS)
  acc, per_step = np.zeros(N), []
  for ids in _batches(steps):
    x, y = X_ALL[ids], Y_ALL[ids]
    if truth_too:
      pe = truth.per_example_grads(per_example_loss, p, x, y)
      utility = truth.step_utility(inner, st.inner_state, p,
                                   pe, val_loss)
      acc[ids] += truth.exact_shapley(utility, B)
    p, st = step(p, st, x, y, jnp.asarray(ids, jnp.int32))
    per_step.append((int(st.exact_steps), np.asarray(oxs.step_values(st))))
  oxs.check(st)
  return st, per_step, acc


def test_ray_nonlinearity_against_a_float64_finite_difference():
  """``nu`` from one ``jax.jvp``, and Adam's closed form of it, against a
  central difference of the real optax.adam update along ``g`` at ``g / 2``
  in float64; 0 for SGD (linear); near 1 at Adam's first step (sign
  descent)."""
  k = jax.random.split(jax.random.key(1), 6)
  p = {"w": jax.random.normal(k[0], (50,)), "b": jnp.zeros((3, 4))}
  rand = lambda key: jax.tree.map(
      lambda a: jax.random.normal(jax.random.fold_in(key, a.size), a.shape), p)
  g, w = rand(k[1]), jax.tree.map(jnp.abs, rand(k[2]))
  tx = optax.adam(1e-2)
  st = tx.init(p)
  for i in range(3):
    st = tx.update(rand(k[3 + i]), st, p)[1]
  upd = lambda gg: tx.update(gg, st, p)[0]
  zero = jax.tree.map(jnp.zeros_like, g)
  got = float(metrics.ray_nonlinearity(upd, g, upd(g), upd(zero), w))
  with truth.enable_x64():
    f64 = lambda t: jax.tree.map(lambda a: jnp.asarray(a, jnp.float64), t)
    st64, p64, g64, w64 = f64(st), f64(p), f64(g), f64(w)
    u = lambda gg: tx.update(gg, st64, p64)[0]
    h = 1e-5
    at = lambda s: u(jax.tree.map(lambda a: s * a, g64))
    deriv = jax.tree.map(lambda a, b: (a - b) / (2 * h), at(0.5 + h), at(0.5 - h))
    change = jax.tree.map(jnp.subtract, at(1.0), at(0.0))
    num = sum(jnp.sum(ww * jnp.abs(d - c)) for ww, d, c in zip(
        *map(jax.tree.leaves, (w64, deriv, change))))
    den = sum(jnp.sum(ww * jnp.abs(c)) for ww, c in zip(
        *map(jax.tree.leaves, (w64, change))))
    ref = float(num / den)
  assert 0.01 < ref < 0.9
  np.testing.assert_allclose(got, ref, rtol=1e-3)
  # oxs.adam's closed form, against the same difference.
  closed = float(adam_state.adam_ray_nonlinearity(
      g, adam_state.find_adam_state(st), w, learning_rate=1e-2, b1=0.9,
      b2=0.999, eps=1e-8))
  np.testing.assert_allclose(closed, ref, rtol=1e-3)
  first_state = adam_state.find_adam_state(tx.init(p))
  assert float(adam_state.adam_ray_nonlinearity(
      g, first_state, w, learning_rate=1e-2, b1=0.9, b2=0.999,
      eps=1e-8)) > 0.99

  sgd = optax.sgd(0.1, momentum=0.9)
  s_sgd = sgd.update(g, sgd.init(p), p)[1]
  u_sgd = lambda gg: sgd.update(gg, s_sgd, p)[0]
  assert float(metrics.ray_nonlinearity(u_sgd, g, u_sgd(g), u_sgd(zero), w)) < 1e-6

  first = lambda gg: tx.update(gg, tx.init(p), p)[0]
  assert float(metrics.ray_nonlinearity(first, g, first(g), first(zero), w)) > 0.99


def test_auto_is_coalitions_where_nonlinear_and_the_secant_elsewhere():
  """Step by step, ``auto``'s column is the ``coalitions`` column of the
  same run at the steps it counts as exact, and the ``secant`` column at the
  others; step 1 (sign descent) is exact, and later steps are not."""
  tx = oxs.adam(1e-2, num_examples=N, batch_size=B,
                metric=("auto", "coalitions", "secant"), evaluation="midpoint")
  _, per_step, _ = _run(tx, 15)
  exact_before = 0
  kinds = []
  for t, (exact, sv) in enumerate(per_step):
    took_exact = exact > exact_before
    exact_before = exact
    kinds.append(took_exact)
    other = sv[:, 1] if took_exact else sv[:, 2]
    np.testing.assert_array_equal(sv[:, 0], other, err_msg=f"step {t + 1}")
    assert np.abs(sv[:, 1] - sv[:, 2]).max() > 0    # the two columns differ
  assert kinds[0] and not any(kinds[-5:]), kinds


def test_auto_accumulated_values_track_exact_shapley_of_the_whole_run():
  """20 steps from initialisation at a constant learning rate: the default's
  accumulated values against exact Shapley values of every real step summed
  per example (float64, all 2^6 coalitions): Pearson R >= 0.99 and slope
  1 +- 0.05.  The secant alone misreads the sign-descent steps."""
  inner = optax.adam(1e-2)
  tx = oxs.adam(1e-2, num_examples=N, batch_size=B,
                metric=("auto", "secant"), evaluation="midpoint")
  st, _, acc = _run(tx, 20, inner=inner, truth_too=True)
  v = np.asarray(oxs.values(st), np.float64)
  r = [np.corrcoef(v[:, j], acc)[0, 1] for j in range(2)]
  slope = [np.polyfit(acc, v[:, j], 1)[0] for j in range(2)]
  assert r[0] >= 0.99 and abs(slope[0] - 1) <= 0.05, (r, slope)
  assert r[1] < r[0] and abs(slope[1] - 1) > abs(slope[0] - 1), (r, slope)
  assert 1 <= int(st.exact_steps) <= 10


def test_infinite_threshold_is_the_secant():
  tx = oxs.adam(1e-2, num_examples=N, batch_size=B, metric=("auto", "secant"),
                exact_threshold=float("inf"))
  st, per_step, _ = _run(tx, 3)
  assert int(st.exact_steps) == 0
  for _, sv in per_step:
    np.testing.assert_array_equal(sv[:, 0], sv[:, 1])


def test_exact_memory_bound_warns_and_keeps_the_secant():
  tx = oxs.adam(1e-2, num_examples=N, batch_size=B, metric=("auto", "secant"),
                exact_memory=1000)
  with pytest.warns(UserWarning, match="exact_memory"):
    st, per_step, _ = _run(tx, 2)
  assert int(st.exact_steps) == 0
  np.testing.assert_array_equal(per_step[0][1][:, 0], per_step[0][1][:, 1])


def test_exact_steps_form_per_example_gradients_a_chunk_at_a_time():
  """The compiled step of ``"auto"`` at B = 128 on an MLP of P = 42k
  parameters holds a few examples' gradients at a time, not all ``B x P``
  (21 MB): a working memory that large is mapped afresh at every call of
  the step and costs even the steps the secant credits a page fault per
  page touched.  The chunked values are checked against the closed form
  and enumeration in test_metrics, and against one device in
  test_data_parallel."""
  class Wide(nn.Module):
    @nn.compact
    def __call__(self, x):
      return nn.Dense(CLASSES)(jnp.tanh(nn.Dense(200)(x)))

  b, d_in = 128, 200
  x = jax.random.normal(jax.random.key(0), (b, d_in))
  y = jnp.arange(b) % CLASSES
  model = Wide()
  params = model.init(jax.random.key(1), x[:1])["params"]
  pel, vloss = toy.losses(model, x[:4], y[:4])
  num_params = sum(a.size for a in jax.tree.leaves(params))

  def temp(metric):
    tx = oxs.adam(1e-3, num_examples=b, batch_size=b, metric=metric)

    def step(p, st, x, y):
      _, g, f = oxs.value_grad_and_factors(pel)(p, x, y)
      return tx.update(g, st, p, factors=f, example_ids=jnp.arange(b),
                       val_loss=vloss)

    return jax.jit(step).lower(params, tx.init(params), x, y).compile(
    ).memory_analysis().temp_size_in_bytes

  all_shares = 4 * b * num_params
  secant, auto = temp("secant"), temp("auto")
  assert auto - secant < all_shares / 4, (auto, secant, all_shares)


@pytest.mark.parametrize("chunk_bytes", [1, 2 ** 30])
def test_chunked_shares_equal_the_formed_ones(monkeypatch, chunk_bytes):
  """``prefix_normal`` on Dense calls and a parameter on the forward-mode
  fallback at B = 20: shares formed one example at a time, or 16 at a time
  (the last chunk overlapping the first), give the values of the shares
  formed all at once (the reference: with a second estimator that reads
  them, ``removal``, the shares are formed once, whole).  Fails if a chunk
  takes the wrong rows of a Dense call or of the fallback's basis."""
  from optax_shapley import estimators
  prob = toy.problem(toy.DenseGain(), 2, (20, 5), 6)
  _, g, f = oxs.value_grad_and_factors(prob.per_example_loss)(
      prob.PARAMS, prob.X, prob.Y)
  assert f.fallback_leaves                  # the raw parameter

  def values(tx):
    _, s = jax.jit(lambda g, s, f: tx.update(
        g, s, prob.PARAMS, factors=f, example_ids=jnp.arange(20),
        val_loss=prob.val_loss))(g, tx.init(prob.PARAMS), f)
    oxs.check(s)
    return np.asarray(oxs.step_values(s))

  # With a second, non-linear estimator the shares are formed once, whole.
  whole = values(oxs.adam(1e-2, num_examples=20, batch_size=20,
                          metric=("prefix_normal", "removal")))[:, 0]
  monkeypatch.setattr(estimators, "PREFIX_CHUNK_BYTES", chunk_bytes)
  got = values(oxs.adam(1e-2, num_examples=20, batch_size=20,
                        metric="prefix_normal"))
  assert np.abs(whole).max() > 0
  np.testing.assert_allclose(got, whole, rtol=0, atol=1e-5 * np.abs(whole).max())
