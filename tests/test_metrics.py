"""Closed forms of optimizer metrics against the real optax update."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from optax_shapley import adam_state, metrics, truth


def test_adam_secant_scale_is_the_difference_quotient_of_optax_adam():
  """The closed form against ``-(u(g) - u(0)) / g`` of the real optax.adam /
  adamw update (weight decay cancels), and at ``g = 0`` against the
  derivative from ``jax.jvp``."""
  k = jax.random.split(jax.random.key(3), 8)
  p = {"w": jax.random.normal(k[0], (400,))}
  for tx in (optax.adam(1e-2, b1=0.8, b2=0.99),
             optax.adamw(1e-2, b1=0.8, b2=0.99, weight_decay=0.1)):
    st = tx.init(p)
    for i in range(4):
      st = tx.update({"w": jax.random.normal(k[i + 1], (400,))}, st, p)[1]
    mag = jnp.logspace(-3, 1, 400)
    g = {"w": jax.random.normal(k[6], (400,)) * mag * (jnp.arange(400) >= 20)}
    upd = lambda gg: tx.update(gg, st, p)[0]
    cf = adam_state.adam_secant_scale(g, adam_state.find_adam_state(st),
                                   learning_rate=1e-2, b1=0.8, b2=0.99,
                                   eps=1e-8)["w"]
    u_g, u_0 = upd(g)["w"], upd({"w": jnp.zeros(400)})["w"]
    gw = g["w"]
    quotient = -(u_g - u_0) / jnp.where(gw == 0, 1.0, gw)
    big = jnp.abs(gw) > 1e-1        # where float32 cancellation is small
    np.testing.assert_allclose(cf[big], quotient[big], rtol=2e-4)
    _, deriv = jax.jvp(upd, ({"w": jnp.zeros(400)},), ({"w": jnp.ones(400)},))
    np.testing.assert_allclose(cf[:20], -deriv["w"][:20], rtol=1e-5)


def test_adam_gradient_is_read_back_from_optax_moments():
  """``(mu' - b1 mu) / (1 - b1)`` against the gradient optax.adam was given,
  ``g . d`` from the moments within its own error bound of ``tensordot``
  with that gradient (also where ``|mu| >> |g|``, when the digits of ``g``
  are lost in ``mu'``), and the secant scale computed from the read-back
  gradient against the scale computed from the gradient."""
  k = jax.random.split(jax.random.key(5), 8)
  p = {"w": jax.random.normal(k[0], (300,)), "b": jnp.zeros((4, 5))}
  for b1, g_size in ((0.0, 1.0), (0.9, 1.0), (0.99, 1.0), (0.99, 1e-3),
                     (0.999, 1e-4)):
    tx = optax.adam(1e-2, b1=b1, b2=0.999)
    st = tx.init(p)
    for i in range(5):
      st = tx.update(jax.tree.map(
          lambda a, i=i: jax.random.normal(jax.random.fold_in(k[1], i), a.shape),
          p), st, p)[1]
    mag = {"w": jnp.logspace(-3, 1, 300), "b": jnp.ones((4, 5))}
    g = jax.tree.map(lambda a, m: g_size * jax.random.normal(k[2], a.shape) * m,
                     p, mag)
    new = tx.update(g, st, p)[1]
    prev_adam, new_adam = adam_state.find_adam_state(st), adam_state.find_adam_state(new)
    got = adam_state.adam_gradient(prev_adam, new_adam, b1=b1)
    for name in p:
      # Rounding of mu' (float32), amplified by 1 / (1 - b1).
      bound = (2.0 ** -22 * (np.abs(new_adam.mu[name]) + b1 * np.abs(prev_adam.mu[name]))
               / (1 - b1))
      assert np.all(np.abs(got[name] - g[name]) <= bound + 1e-30), (b1, name)
    d = jax.tree.map(lambda a: jax.random.normal(k[3], (3,) + a.shape), p)
    dots, errs = adam_state.adam_gradient_dot(d, prev_adam, new_adam, b1=b1)
    for name in p:
      ref = np.tensordot(np.asarray(d[name], np.float64),
                         np.asarray(g[name], np.float64), axes=g[name].ndim)
      err = np.abs(np.asarray(dots[name], np.float64) - ref)
      assert np.all(err <= np.asarray(errs[name])), (b1, g_size, name, err, errs[name])
      # The bound is not vacuous: well below |d| |g| where the moments
      # still hold the digits of g.
      if g_size == 1.0:
        dg = np.linalg.norm(np.asarray(d[name]).reshape(3, -1), axis=1) * float(
            np.linalg.norm(g[name]))
        assert np.all(np.asarray(errs[name]) <= 1e-3 * dg), (b1, name)
    kw = dict(learning_rate=1e-2, b1=b1, b2=0.999, eps=1e-8)
    from_g = adam_state.adam_secant_scale(g, prev_adam, **kw)
    from_mu = adam_state.adam_secant_scale(got, prev_adam, **kw)
    for name in p:
      np.testing.assert_allclose(from_mu[name], from_g[name], rtol=1e-4)


def test_find_adam_state_refuses_two_adam_states():
  params = {"a": jnp.ones(3), "b": jnp.ones(2)}
  two = optax.multi_transform({"x": optax.adam(1e-3), "y": optax.adam(1e-2)},
                              {"a": "x", "b": "y"})
  with pytest.raises(ValueError, match="2 optax.ScaleByAdamState"):
    adam_state.find_adam_state(two.init(params))
  one = optax.chain(optax.clip_by_global_norm(1.0), optax.adam(1e-3))
  assert isinstance(adam_state.find_adam_state(one.init(params)),
                    optax.ScaleByAdamState)
  with pytest.raises(ValueError, match="no optax.ScaleByAdamState"):
    adam_state.find_adam_state(optax.sgd(0.1).init(params))
  assert not adam_state.float32_moments(two.init(params), params)


def _quadratic_update(a, b):
  """An elementwise update ``u(g) = a g + b g^2`` (leaves like ``a``)."""
  return lambda g: jax.tree.map(lambda ai, bi, gi: ai * gi + bi * gi * gi,
                                a, b, g)


@pytest.mark.parametrize("players,chunk", [(8, 16), (40, 16), (40, 7)])
def test_prefix_normal_is_exact_for_a_quadratic_update(players, chunk):
  """For ``u_j(s) = a_j s + b_j s^2`` each coordinate's Shapley value is
  ``a_j x_ij + b_j x_ij g_j`` (the cross terms ``2 b x_l x_m`` split
  evenly), which the normal approximation reproduces: it reads only the
  mean of the prefix sums for a quadratic.  Checked against that closed
  form at B = 40 and against exact enumeration at B = 8, with shares that
  are zero for many examples (coordinates with 0 to B players).  The
  shares are formed ``chunk`` at a time: 40 = 16 + 16 + 8 and 5 x 7 + 5
  end in a chunk that overlaps the one before."""
  k = jax.random.split(jax.random.key(3), 5)
  shape = {"w": (players, 7, 5), "c": (players, 3)}
  def keep(s):
    """Coordinate ``c`` has ``c mod (B + 1)`` players, scattered."""
    i, c = np.arange(s[0])[:, None], np.arange(int(np.prod(s[1:])))[None]
    return (((7 * i + 3 * c) % players) < c % (players + 1)).reshape(s)
  shares = {n: (jax.random.normal(k[0 if n == "w" else 1], s) *
                keep(s)).astype(jnp.float32) for n, s in shape.items()}
  like = jax.tree.map(lambda x: x[0], shares)
  a = jax.tree.map(lambda x, kk: jax.random.normal(kk, x.shape), like,
                   {"w": k[2], "c": k[3]})
  b = jax.tree.map(lambda x: 0.3 * jnp.cos(jnp.arange(x.size).reshape(x.shape)),
                   like)
  v = jax.tree.map(lambda x: jnp.sin(1.0 + jnp.arange(x.size)).reshape(x.shape),
                   like)
  update = _quadratic_update(a, b)
  zero = jax.tree.map(jnp.zeros_like, like)
  formed = []
  def rows(start, size):
    formed.append(size)
    return jax.tree.map(lambda x: jax.lax.dynamic_slice_in_dim(x, start, size),
                        shares)
  got = np.asarray(metrics.prefix_normal_values(
      update, update(zero), metrics.Shares(players, lambda: rows), v,
      batch_size=chunk))
  assert set(formed) == {min(chunk, players)}
  g = jax.tree.map(lambda x: x.sum(0), shares)
  closed = -sum(np.asarray(x, np.float64).reshape(players, -1) @
                np.asarray(vj * (aj + bj * gj), np.float64).ravel()
                for x, vj, aj, bj, gj in zip(*map(jax.tree.leaves,
                                                  (shares, v, a, b, g))))
  np.testing.assert_allclose(got, closed, rtol=0,
                             atol=1e-5 * np.abs(closed).max())
  if players <= 12:
    def utility(mask):
      g_s = jax.tree.map(lambda x: jnp.tensordot(mask, x.astype(jnp.float64),
                                                 axes=1), shares)
      u = update(g_s)
      return -sum(jnp.vdot(vj, uj) for vj, uj in
                  zip(jax.tree.leaves(v), jax.tree.leaves(u)))
    with truth.enable_x64():
      exact = truth.exact_shapley(utility, players)
    np.testing.assert_allclose(closed, exact, rtol=0,
                               atol=1e-6 * np.abs(exact).max())
