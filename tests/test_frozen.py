"""Frozen parameters: only trainable leaves are credited, and the contraction
spends no work on frozen ones."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optax_shapley as oxs
import toy
from optax_shapley import metrics, truth

B, N, D, H, C, V, LR = 6, 30, 5, 8, 3, 7, 0.1

_K = jax.random.split(jax.random.key(0), 6)
X = jax.random.normal(_K[0], (N, D))
Y = jax.random.randint(_K[1], (N,), 0, C)
XV = jax.random.normal(_K[2], (V, D))
YV = jnp.arange(V) % C
IDS = [np.random.default_rng(s).permutation(N)[:B] for s in range(3)]


class Backbone(nn.Module):
  """A Dense backbone, a raw-parameter gain (forward-mode fallback), a head."""
  @nn.compact
  def __call__(self, x):
    h = jnp.tanh(nn.Dense(H, name="backbone")(x))
    h = h * self.param("gain", nn.initializers.ones, (H,))
    return nn.Dense(C, name="head")(h)


MODEL = Backbone()
PARAMS = MODEL.init(_K[3], X[:B])["params"]


pel, val_loss = toy.losses(MODEL, XV, YV)


def frozen_optimizer(frozen):
  labels = {k: ("frozen" if k in frozen else "train") for k in PARAMS}
  return optax.multi_transform(
      {"train": optax.sgd(LR), "frozen": optax.set_to_zero()}, labels)


def _run(tx, loss=pel, params=PARAMS, extra=()):
  @jax.jit
  def step(p, s, x, y, ids):
    _, g, f = oxs.value_grad_and_factors(loss)(p, x, y, *extra)
    u, s = tx.update(g, s, p, factors=f, example_ids=ids, val_loss=val_loss)
    return optax.apply_updates(p, u), s

  state, out = tx.init(params), []
  for ids in IDS:
    new, state = step(params, state, X[ids], Y[ids], jnp.asarray(ids))
    out.append((params, np.asarray(oxs.step_values(state))))
    params = new
  return out, state


def _sgd_reference(params, ids, trainable):
  """LR * x_i . grad L(w) over the trainable leaves only, x_i = grad l_i / B."""
  pe = truth.per_example_grads(pel, params, X[ids], Y[ids])
  v = jax.grad(lambda p: jnp.mean(val_loss(p)))(params)
  return sum(LR / B * np.tensordot(np.asarray(leaf), np.asarray(vl),
                                   axes=np.ndim(vl))
             for k in trainable
             for leaf, vl in zip(jax.tree.leaves(pe[k]), jax.tree.leaves(v[k])))


@pytest.mark.parametrize("frozen", [("backbone",), ("backbone", "gain")])
def test_frozen_leaves_get_no_credit(frozen):
  """With the backbone frozen by optax.set_to_zero, the sgd metric (which
  does not look at the update) must count only the trainable leaves."""
  tx = oxs.with_shapley(frozen_optimizer(frozen), num_examples=N,
                        metric="sgd", evaluation="start", learning_rate=LR,
                        batch_size=B)
  out, state = _run(tx)
  trainable = [k for k in PARAMS if k not in frozen]
  for (params, sv), ids in zip(out, IDS):
    ref = _sgd_reference(params, ids, trainable)
    np.testing.assert_allclose(sv, ref, rtol=1e-5, atol=1e-6 * np.abs(ref).max())
  oxs.check(state)


def test_update_dependence_finds_the_frozen_leaves():
  tx = frozen_optimizer(("backbone", "gain"))
  s = tx.init(PARAMS)
  g = jax.tree.map(jnp.ones_like, PARAMS)
  got = metrics.frozen_leaves(lambda g: tx.update(g, s, PARAMS)[0], g)
  names = [jax.tree_util.keystr(p) for p, _ in
           jax.tree_util.tree_flatten_with_path(PARAMS)[0]]
  assert sorted(names[i] for i in got) == sorted(
      n for n in names if "backbone" in n or "gain" in n)
  # Global-norm clipping couples every leaf to the gradient: nothing frozen.
  tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adam(1e-3))
  s = tx.init(PARAMS)
  assert metrics.frozen_leaves(lambda g: tx.update(g, s, PARAMS)[0], g) == ()


def test_frozen_fallback_leaf_costs_no_forward_mode_pass():
  """The raw 'gain' parameter goes through the forward-mode fallback (a
  re-trace of the per-example loss) unless it is frozen."""
  traces = []

  def counting_loss(p, x, y):
    traces.append(1)
    return pel(p, x, y)

  def traces_of(frozen):
    traces.clear()
    tx = oxs.with_shapley(frozen_optimizer(frozen), num_examples=N, metric="secant",
                          batch_size=B)
    ids = IDS[0]
    x, y = X[ids], Y[ids]

    def step(p, s):
      _, g, f = oxs.value_grad_and_factors(counting_loss)(p, x, y)
      return tx.update(g, s, p, factors=f, example_ids=jnp.asarray(ids),
                       val_loss=val_loss)[1]

    jax.eval_shape(step, PARAMS, tx.init(PARAMS))
    return len(traces)

  assert traces_of(("backbone", "gain")) == traces_of(("backbone",)) - 1


class LoRADense(nn.Module):
  """y = x W + (x A) B with W frozen (not in the trainable params)."""
  rank: int = 2

  @nn.compact
  def __call__(self, x, frozen_kernel):
    a = nn.Dense(self.rank, use_bias=False, name="lora_a")(x)
    return x @ frozen_kernel + nn.Dense(frozen_kernel.shape[1], use_bias=False,
                                        name="lora_b")(a)


def test_lora_adapters_on_a_frozen_dense():
  model = LoRADense()
  w = jax.random.normal(_K[4], (D, C))
  adapters = model.init(_K[5], X[:B], w)["params"]
  adapters = jax.tree.map(lambda a: a + 0.1, adapters)   # lora_b not all zero

  def lora_loss(p, x, y):
    return optax.softmax_cross_entropy_with_integer_labels(
        model.apply({"params": p}, x, w), y)

  lora_val = lambda p: lora_loss(p, XV, YV)
  tx = oxs.sgd(LR, num_examples=N, metric="sgd", evaluation="start",
               batch_size=B)
  ids = IDS[0]
  _, g, f = oxs.value_grad_and_factors(lora_loss)(adapters, X[ids], Y[ids])
  assert not f.fallback_leaves and len(f.calls) == 2
  _, s = tx.update(g, tx.init(adapters), adapters, factors=f,
                   example_ids=jnp.asarray(ids), val_loss=lora_val)
  pe = truth.per_example_grads(lora_loss, adapters, X[ids], Y[ids])
  v = jax.grad(lambda p: jnp.mean(lora_val(p)))(adapters)
  ref = sum(LR / B * np.tensordot(np.asarray(a), np.asarray(b), axes=np.ndim(b))
            for a, b in zip(jax.tree.leaves(pe), jax.tree.leaves(v)))
  np.testing.assert_allclose(oxs.step_values(s), ref, rtol=1e-5,
                             atol=1e-6 * np.abs(ref).max())
