"""The ghost (pairwise) contraction for nn.Dense against the exact rule."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optax_shapley as oxs
import toy
from optax_shapley import ghost

B, N, D, H, C, V, T = 8, 40, 6, 12, 3, 5, 4
_K = jax.random.split(jax.random.key(0), 6)


class SeqMLP(nn.Module):
  @nn.compact
  def __call__(self, x):                    # [B, T, D] -> [B, C]
    h = jnp.tanh(nn.Dense(H)(x))
    h = nn.LayerNorm()(h)
    return nn.Dense(C)(h.mean(axis=1))


MODEL = SeqMLP()
X = jax.random.normal(_K[0], (N, T, D))
Y = jax.random.randint(_K[1], (N,), 0, C)
XV = jax.random.normal(_K[2], (V, T + 1, D))   # another sequence length
YV = jnp.arange(V) % C
PARAMS = MODEL.init(_K[3], X[:B])["params"]


pel, val_loss = toy.losses(MODEL, XV, YV)


@functools.cache
def _values(contraction, metric, steps=4, **kw):
  """Step values of ``steps`` training steps, f32[steps, B] (read-only).
  Deterministic, so computed once per module for the tests that compare
  against the same run (the exact sgd run, the rank-1 ghost secant run)."""
  tx = oxs.adam(1e-2, num_examples=N, batch_size=B, metric=metric,
                evaluation="midpoint" if metric != "sgd" else "start",
                contraction=contraction, **kw)

  @jax.jit
  def step(p, s, x, y, ids):
    _, g, f = oxs.value_grad_and_factors(pel)(p, x, y)
    u, s = tx.update(g, s, p, factors=f, example_ids=ids, val_loss=val_loss)
    return optax.apply_updates(p, u), s

  p, s, out = PARAMS, tx.init(PARAMS), []
  for t in range(steps):
    ids = np.arange(B) + B * (t % (N // B))
    p, s = step(p, s, X[ids], Y[ids], jnp.asarray(ids))
    out.append(np.asarray(oxs.step_values(s)))
  oxs.check(s)
  out = np.stack(out)
  out.flags.writeable = False
  return out


def test_ghost_values_match_the_dense_contraction():
  rng = np.random.default_rng(0)
  a, b = rng.normal(size=(5, 3, 6)), rng.normal(size=(5, 3, 7))
  ap, bp = rng.normal(size=(2, 4, 6)), rng.normal(size=(2, 4, 7))
  r, q = rng.normal(size=(6, 2)), rng.normal(size=(7, 2))
  c = rng.normal(size=7)
  d_w = (r @ q.T) * (ap.reshape(-1, 6).T @ bp.reshape(-1, 7))
  ref = np.einsum("bti,io,bto->b", a, d_w, b) + np.einsum("bto,o->b", b, c)
  got = ghost.ghost_values(*(jnp.asarray(z) for z in (a, b, ap, bp, r, q, c)))
  np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5 * np.abs(ref).max())


def test_factorisations():
  rng = np.random.default_rng(1)
  row, col = rng.random(9) + 0.1, rng.random(5) + 0.1
  r, q = ghost.factor_log_metric(jnp.asarray(np.outer(row, col)))
  np.testing.assert_allclose(r @ q.T, np.outer(row, col), rtol=1e-5)
  # Entries <= 0 (a zeroed or negative metric entry) get no weight: the
  # positive entries still give the rank-1 matrix back exactly.
  spoilt = np.outer(row, col)
  spoilt[2, :] = 0.0
  spoilt[4, 1], spoilt[0, 3] = -3.0, -1e-3
  r, q = ghost.factor_log_metric(jnp.asarray(spoilt),
                                 jnp.asarray(rng.random((9, 5)) + 0.5),
                                 sweeps=200)
  keep = spoilt > 0
  keep[2, :] = False
  np.testing.assert_allclose((r @ q.T)[keep], np.outer(row, col)[keep],
                             rtol=1e-4)
  assert np.all(np.isfinite(r)) and np.all(r > 0) and np.all(q > 0)
  m = rng.normal(size=(9, 5)) @ np.diag([5.0, 2.0, 0, 0, 0]) @ rng.normal(size=(5, 5))
  r, q = ghost.factor_metric(jnp.asarray(m), rank=2, iterations=4)
  np.testing.assert_allclose(r @ q.T, m, atol=1e-4 * np.abs(m).max())


def test_forced_ghost_is_exact_for_a_rank_one_metric():
  """The sgd metric is eta everywhere (rank 1): ghost = exact rule."""
  exact = _values("exact", "sgd")
  forced = _values("ghost", "sgd", ghost_tol=float("inf"))
  np.testing.assert_allclose(forced, exact, rtol=1e-4,
                             atol=1e-5 * np.abs(exact).max())


def test_spot_check_falls_back_to_exact():
  """With tolerance 0 the spot check rejects every ghost result: values are
  the exact ones; with an infinite tolerance they are the rank-1 ghost's."""
  exact = _values("exact", "secant")
  strict = _values("ghost", "secant", ghost_tol=0.0)
  np.testing.assert_allclose(strict, exact, rtol=1e-5,
                             atol=1e-6 * np.abs(exact).max())
  loose = _values("ghost", "secant", ghost_tol=float("inf"))
  assert not np.allclose(loose, exact, rtol=1e-3)
  r = [np.corrcoef(loose[t], exact[t])[0, 1] for t in range(len(exact))]
  assert min(r[1:]) > 0.9, r


def test_ghost_without_spot_check_keeps_the_ghost_values():
  """``ghost_tol=None`` skips the spot check: the values are the rank-1
  ghost's (those of an infinite tolerance), and the add-up check, computed
  from the validation factors, still passes (``oxs.check`` inside)."""
  loose = _values("ghost", "secant", ghost_tol=float("inf"))
  unchecked = _values("ghost", "secant", ghost_tol=None)
  np.testing.assert_allclose(unchecked, loose, rtol=1e-5,
                             atol=1e-6 * np.abs(loose).max())
  # Independent of the ghost code path: with the sgd metric (rank 1) the
  # unchecked ghost values are the exact rule's.
  exact = _values("exact", "sgd")
  np.testing.assert_allclose(_values("ghost", "sgd", ghost_tol=None), exact,
                             rtol=1e-4, atol=1e-5 * np.abs(exact).max())


@pytest.mark.parametrize("contraction", ["auto", "ghost"])
def test_bad_contraction_name_and_modes_run(contraction):
  vals = _values(contraction, "fixed_state", steps=2)
  assert np.all(np.isfinite(vals))
  with pytest.raises(ValueError, match="contraction"):
    oxs.adam(1e-3, num_examples=N, contraction="pairwise")


class SharedDense(nn.Module):
  @nn.compact
  def __call__(self, x):
    f = nn.Dense(D)
    h = jnp.tanh(f(jnp.tanh(f(x))))
    return nn.Dense(C)(h.mean(axis=1))


def test_shared_kernel_is_left_to_the_exact_rule():
  """A Dense applied twice has G summed over both calls; one call's
  validation factors cannot give it, so that kernel stays exact even when
  ghost is forced (regression: the add-up check used to skip the step)."""
  model = SharedDense()
  params = model.init(_K[4], X[:B])["params"]
  loss = lambda p, x, y: optax.softmax_cross_entropy_with_integer_labels(
      model.apply({"params": p}, x), y)
  vl = lambda p: loss(p, XV, YV)
  out = {}
  for mode in ("exact", "ghost"):
    tx = oxs.adam(1e-2, num_examples=N, batch_size=B, metric="sgd",
                  evaluation="start", contraction=mode,
                  ghost_tol=float("inf"))
    _, g, f = oxs.value_grad_and_factors(loss)(params, X[:B], Y[:B])
    _, s = tx.update(g, tx.init(params), params, factors=f,
                     example_ids=jnp.arange(B), val_loss=vl)
    oxs.check(s)
    out[mode] = np.asarray(oxs.step_values(s))
  np.testing.assert_allclose(out["ghost"], out["exact"], rtol=1e-4,
                             atol=1e-6 * np.abs(out["exact"]).max())


def test_linearized_scale_with_both_signs_falls_back():
  """The rank-1 log-magnitude factorisation drops signs; Adam's linearized
  metric has negative entries early on, so those calls must use the exact
  rule even with an infinite tolerance."""
  exact = _values("exact", "linearized", steps=3)
  forced = _values("ghost", "linearized", steps=3, ghost_tol=float("inf"))
  r = [np.corrcoef(forced[t], exact[t])[0, 1] for t in range(3)]
  assert min(r) > 0.99, r


def _doubled_dot_general(lhs, rhs, dimension_numbers, precision=None,
                         preferred_element_type=None, **kwargs):
  """A custom product, ``2 a W``: not the ``y = a W`` the ghost rule assumes."""
  return 2.0 * jax.lax.dot_general(lhs, rhs, dimension_numbers, precision,
                                   preferred_element_type=preferred_element_type,
                                   **kwargs)


def test_dense_with_a_custom_dot_general_keeps_the_exact_rule():
  from optax_shapley import layers
  assert layers.has_ghost_rule(nn.Dense(3), "__call__")
  assert not layers.has_ghost_rule(
      nn.Dense(3, dot_general=_doubled_dot_general), "__call__")

  class Doubled(nn.Module):
    @nn.compact
    def __call__(self, x):
      h = jnp.tanh(nn.Dense(H, dot_general=_doubled_dot_general)(x))
      return nn.Dense(C, dot_general=_doubled_dot_general)(h.mean(axis=1))

  model = Doubled()
  params = model.init(_K[4], X[:B])["params"]
  pel2, val2 = toy.losses(model, XV, YV)
  lr = 1e-2
  # Forced ghost rule without its spot check: a custom product must still
  # be contracted exactly (sgd at the start: phi_i = lr x_i . grad L(w)).
  tx = oxs.adam(lr, num_examples=N, batch_size=B, metric="sgd",
                evaluation="start", contraction="ghost", ghost_tol=None)
  ids = jnp.arange(B)
  _, g, f = oxs.value_grad_and_factors(pel2)(params, X[:B], Y[:B])
  _, s = tx.update(g, tx.init(params), params, factors=f, example_ids=ids,
                   val_loss=val2)
  oxs.check(s)
  per_example = jax.vmap(lambda x, y: jax.grad(
      lambda p: pel2(p, x[None], y[None])[0])(params))(X[:B], Y[:B])
  v = jax.grad(lambda p: jnp.mean(val2(p)))(params)
  want = sum(jnp.tensordot(pe, vv, axes=vv.ndim) for pe, vv in zip(
      jax.tree.leaves(per_example), jax.tree.leaves(v))) * lr / B
  np.testing.assert_allclose(oxs.step_values(s), want, rtol=1e-4,
                             atol=1e-6 * float(jnp.abs(want).max()))
