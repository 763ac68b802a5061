"""Capture and exact contraction against per-example gradients from vmap(grad)."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optax_shapley as oxs
from optax_shapley import contraction

B, T, D_IN, VOCAB = 5, 4, 6, 11


class DenseFlat(nn.Module):
  @nn.compact
  def __call__(self, x):
    h = nn.relu(nn.Dense(8)(x))
    return nn.Dense(3, use_bias=False)(h)


class DenseSeq(nn.Module):
  @nn.compact
  def __call__(self, x):              # x: [B, T, d]
    h = jnp.tanh(nn.Dense(7)(x))
    return nn.Dense(3)(h.mean(axis=1))


class EmbedLN(nn.Module):
  @nn.compact
  def __call__(self, tok):            # tok: int[B, T]
    h = nn.Embed(VOCAB, 8)(tok)
    h = nn.LayerNorm()(h)
    return nn.Dense(3)(h.sum(axis=1))


class RawParam(nn.Module):
  """Learned positions broadcast over the batch: the jvp fallback."""
  @nn.compact
  def __call__(self, x):              # x: [B, T, d]
    pos = self.param("pos", nn.initializers.normal(0.5), (T, D_IN))
    gain = self.param("gain", nn.initializers.ones, (1, T, 1))
    h = nn.Dense(5)((x + pos) * gain)
    return nn.Dense(3)(jnp.tanh(h).mean(axis=1))


class Shared(nn.Module):
  """One Dense called twice (weight sharing, a residual reuse)."""
  @nn.compact
  def __call__(self, x):
    dense = nn.Dense(D_IN)
    h = jnp.tanh(dense(x))
    h = x + dense(h)
    return nn.Dense(3)(h)


class Tied(nn.Module):
  """Tied input/output embedding through Embed.attend."""
  @nn.compact
  def __call__(self, tok):
    emb = nn.Embed(VOCAB, 8)
    h = jnp.tanh(emb(tok)).mean(axis=1)
    return emb.attend(nn.Dense(8)(h))


class MoreLayers(nn.Module):
  @nn.compact
  def __call__(self, x):              # x: [B, T, d]
    h = nn.DenseGeneral((2, 3))(x)    # [B, T, 2, 3]
    h = nn.RMSNorm()(h.reshape(x.shape[0], T, 6))
    h = nn.Conv(4, (3,), padding="SAME")(h)
    return nn.DenseGeneral(3, axis=(-2, -1))(h)


CASES = {
    "dense_flat": (DenseFlat, "flat"),
    "dense_seq": (DenseSeq, "seq"),
    "embed_layernorm": (EmbedLN, "tokens"),
    "raw_param_fallback": (RawParam, "seq"),
    "shared_module": (Shared, "flat"),
    "tied_embedding": (Tied, "tokens"),
    "densegeneral_rmsnorm_conv": (MoreLayers, "seq"),
}


def _inputs(kind, key):
  if kind == "flat":
    return jax.random.normal(key, (B, D_IN))
  if kind == "seq":
    return jax.random.normal(key, (B, T, D_IN))
  return jax.random.randint(key, (B, T), 0, VOCAB)


def _setup(name):
  cls, kind = CASES[name]
  model = cls()
  k1, k2, k3 = jax.random.split(jax.random.key(0), 3)
  x = _inputs(kind, k1)
  y = jax.random.randint(k2, (B,), 0, 3)
  params = model.init(k3, x)["params"]

  def per_example_loss(p, x, y):
    return optax.softmax_cross_entropy_with_integer_labels(
        model.apply({"params": p}, x), y)

  return params, per_example_loss, x, y


def _reference_dots(per_example_loss, params, directions, x, y, scale):
  """c * grad l_i . d_e from vmap(grad) over single-example batches."""
  def one(xi, yi):
    return jax.grad(lambda p: per_example_loss(p, xi[None], yi[None])[0])(params)
  pe = jax.vmap(one)(x, y)
  dots = sum(jnp.einsum("b...,e...->be", g, d)
             for g, d in zip(jax.tree.leaves(pe), jax.tree.leaves(directions)))
  return np.asarray(dots) * scale


def _directions(params, num=3, seed=7):
  leaves, treedef = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.key(seed), len(leaves))
  return jax.tree.unflatten(treedef, [
      jax.random.normal(k, (num,) + x.shape) for k, x in zip(keys, leaves)])


@pytest.mark.parametrize("name", sorted(CASES))
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_contraction_matches_vmap_grad(name, reduction):
  params, pel, x, y = _setup(name)
  losses, grads, factors = jax.jit(
      oxs.value_grad_and_factors(pel, reduction=reduction))(params, x, y)
  np.testing.assert_allclose(losses, pel(params, x, y), rtol=1e-6)
  reduce = jnp.mean if reduction == "mean" else jnp.sum
  ref_grads = jax.grad(lambda p: reduce(pel(p, x, y)))(params)
  for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(ref_grads)):
    # float32 sums in another order (a per-example rule adds B shares):
    # entries near 0 are compared at the leaf's scale.
    np.testing.assert_allclose(a, b, rtol=1e-5,
                               atol=1e-6 * float(np.abs(b).max()))
  d = _directions(params)
  got = np.asarray(jax.jit(oxs.contract)(factors, d))
  ref = _reference_dots(pel, params, d, x, y, 1.0 / B if reduction == "mean" else 1.0)
  rel = np.abs(got - ref).max() / np.abs(ref).max()
  assert rel <= 1e-5, rel


@pytest.mark.parametrize("name", sorted(CASES))
def test_bfloat16_factors_stay_close_to_vmap_grad(name):
  """factor_dtype=bfloat16 stores the factors at half the memory; the
  contraction still accumulates in float32, so the dots keep about bf16's
  relative precision (2**-9 per entry), and the batch gradient is exact."""
  params, pel, x, y = _setup(name)
  _, grads, factors = jax.jit(oxs.value_grad_and_factors(
      pel, factor_dtype=jnp.bfloat16))(params, x, y)
  kept = [a for arrays, cot in factors.calls for a in (*arrays, cot)
          if jnp.issubdtype(a.dtype, jnp.floating)]
  assert all(a.dtype == jnp.bfloat16 for a in kept)
  ref_grads = jax.grad(lambda p: jnp.mean(pel(p, x, y)))(params)
  for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(ref_grads)):
    # float32 sums in another order (a per-example rule adds B shares):
    # entries near 0 are compared at the leaf's scale.
    np.testing.assert_allclose(a, b, rtol=1e-5,
                               atol=1e-6 * float(np.abs(b).max()))
  d = _directions(params)
  got = np.asarray(jax.jit(oxs.contract)(factors, d))
  assert got.dtype == np.float32
  ref = _reference_dots(pel, params, d, x, y, 1.0 / B)
  rel = np.abs(got - ref).max() / np.abs(ref).max()
  assert 1e-6 < rel <= 1e-2, rel     # rounded (measured 1.5e-3 to 3.5e-3)


def test_factor_dtype_must_be_floating():
  with pytest.raises(ValueError, match="factor_dtype"):
    oxs.value_grad_and_factors(lambda p, x: x, factor_dtype=jnp.int8)


@pytest.mark.parametrize("name", sorted(CASES))
def test_per_example_grads_from_factors_match_vmap_grad(name):
  """The Jacobian of the contraction is the per-example gradient, x_i."""
  params, pel, x, y = _setup(name)
  _, grads, factors = oxs.value_grad_and_factors(pel)(params, x, y)
  got = jax.jit(contraction.per_example_grads)(factors, grads)

  def one(xi, yi):
    return jax.grad(lambda p: pel(p, xi[None], yi[None])[0])(params)
  ref = jax.vmap(one)(x, y)
  for g, r in zip(jax.tree.leaves(got), jax.tree.leaves(ref)):
    assert g.shape == r.shape and g.dtype == jnp.float32
    np.testing.assert_allclose(g, r / B, rtol=0,
                               atol=1e-5 * float(np.abs(r / B).max()))


def test_every_leaf_is_ruled_or_falls_back():
  params, pel, x, y = _setup("raw_param_fallback")
  _, _, factors = oxs.value_grad_and_factors(pel)(params, x, y)
  names = [jax.tree_util.keystr(k) for k, _ in
           jax.tree_util.tree_flatten_with_path(params)[0]]
  fallback = {names[i] for i in factors.fallback_leaves}
  assert fallback == {"['gain']", "['pos']"}
  assert len(factors.plans) == 2


def test_shared_module_keeps_one_record_per_call():
  params, pel, x, y = _setup("shared_module")
  _, _, factors = oxs.value_grad_and_factors(pel)(params, x, y)
  keys = [p.key for p in factors.plans]
  assert (("Dense_0",), "__call__", 0) in keys and (("Dense_0",), "__call__", 1) in keys
  assert not factors.fallback_leaves


def test_factors_cross_jit_boundary():
  params, pel, x, y = _setup("embed_layernorm")
  _, _, factors = jax.jit(oxs.value_grad_and_factors(pel))(params, x, y)
  d = _directions(params, num=1)
  # Factors returned from one jit and contracted in another.
  got = np.asarray(jax.jit(oxs.contract)(factors, d))
  ref = _reference_dots(pel, params, d, x, y, 1.0 / B)
  assert np.abs(got - ref).max() / np.abs(ref).max() <= 1e-5


def test_batchnorm_in_training_mode_is_refused():
  class BN(nn.Module):
    @nn.compact
    def __call__(self, x, train):
      return nn.Dense(2)(nn.BatchNorm(use_running_average=not train)(x))

  model = BN()
  x = jnp.ones((B, D_IN))
  variables = model.init(jax.random.key(0), x, False)

  def pel(p, x):
    out, _ = model.apply({"params": p, "batch_stats": variables["batch_stats"]},
                         x, True, mutable=["batch_stats"])
    return out.sum(-1)

  with pytest.raises(oxs.UnsupportedModuleError, match="BatchNorm"):
    oxs.value_grad_and_factors(pel)(variables["params"], x)

  def pel_eval(p, x):
    return model.apply({"params": p, "batch_stats": variables["batch_stats"]},
                       x, False).sum(-1)
  oxs.value_grad_and_factors(pel_eval)(variables["params"], x)


def test_loss_must_be_per_example():
  params, pel, x, y = _setup("dense_flat")
  with pytest.raises(ValueError, match=r"shape \[B\]"):
    oxs.value_grad_and_factors(lambda p, x, y: pel(p, x, y).mean())(params, x, y)


class PosEmbed(nn.Module):
  """Positions arange(T) through an nn.Embed, broadcast over the batch."""
  @nn.compact
  def __call__(self, x):              # x: [B, T, d]
    pos = nn.Embed(T, D_IN)(jnp.arange(x.shape[1]))
    return nn.Dense(3)(jnp.tanh(x + pos).mean(axis=1))


def test_unbatched_call_with_length_equal_to_batch_falls_back():
  """T == B must not make the position table look per-example."""
  model = PosEmbed()
  x = jax.random.normal(jax.random.key(1), (T, T, D_IN))      # B == T
  y = jnp.arange(T) % 3
  params = model.init(jax.random.key(2), x)["params"]
  pel = lambda p, x, y: optax.softmax_cross_entropy_with_integer_labels(
      model.apply({"params": p}, x), y)
  _, _, factors = oxs.value_grad_and_factors(pel)(params, x, y)
  assert len(factors.fallback_leaves) == 1       # the position table
  d = _directions(params)
  ref = _reference_dots(pel, params, d, x, y, 1.0 / T)
  got = np.asarray(oxs.contract(factors, d))
  assert np.abs(got - ref).max() / np.abs(ref).max() <= 1e-5


@pytest.mark.parametrize("inner", ["lax_scan", "vmap", "checkpoint"])
def test_module_inside_an_inner_transform_falls_back(inner):
  """A Dense applied inside lax.scan / vmap / checkpoint within the loss."""
  dense = nn.Dense(D_IN)
  head = nn.Dense(3)
  x = jax.random.normal(jax.random.key(3), (B, D_IN))
  y = jnp.arange(B) % 3
  params = {"dense": dense.init(jax.random.key(4), x)["params"],
            "head": head.init(jax.random.key(5), x)["params"]}

  def pel(p, x, y):
    f = lambda h: jnp.tanh(dense.apply({"params": p["dense"]}, h))
    if inner == "lax_scan":
      h, _ = jax.lax.scan(lambda h, _: (f(h), None), x, None, length=2)
    elif inner == "vmap":
      h = jax.vmap(f)(x)
    else:
      h = jax.checkpoint(f)(x)
    return optax.softmax_cross_entropy_with_integer_labels(
        head.apply({"params": p["head"]}, h), y)

  _, _, factors = jax.jit(oxs.value_grad_and_factors(pel))(params, x, y)
  d = _directions(params)
  ref = _reference_dots(pel, params, d, x, y, 1.0 / B)
  got = np.asarray(oxs.contract(factors, d))
  assert np.abs(got - ref).max() / np.abs(ref).max() <= 1e-5


def test_loss_vmapped_over_examples_warns_with_the_reason():
  """The per-example-dropout pattern: the whole model runs inside a
  jax.vmap over examples, so no call is probed; the warning must say so
  (not blame the batch arguments) and the values stay exact."""
  params, pel, x, y = _setup("dense_flat")
  one = lambda p, xi, yi: pel(p, xi[None], yi[None])[0]
  vmapped = lambda p, x, y: jax.vmap(one, in_axes=(None, 0, 0))(p, x, y)
  with pytest.warns(UserWarning, match="inside a jax.vmap") as record:
    _, _, f = oxs.value_grad_and_factors(vmapped)(params, x, y)
  assert "closes over" not in str(record[0].message)
  assert not f.plans
  d = _directions(params)
  ref = _reference_dots(pel, params, d, x, y, 1.0 / B)
  np.testing.assert_allclose(np.asarray(oxs.contract(f, d)), ref, rtol=1e-4,
                             atol=1e-5 * np.abs(ref).max())


def test_loss_closing_over_its_data_falls_back_exactly():
  """With the data closed over, nothing proves a call per-example (here a
  position table eye(T) with T == B would pass a shape test): every leaf
  goes through the exact forward-mode fallback."""
  t = B

  class Pos(nn.Module):
    @nn.compact
    def __call__(self, x):
      pos = nn.Dense(D_IN)(jnp.eye(t))          # [T, D]: not per-example
      return nn.Dense(3)(jnp.tanh(x + pos).mean(axis=1))

  model = Pos()
  x = jax.random.normal(jax.random.key(2), (B, t, D_IN))
  y = jnp.arange(B) % 3
  params = model.init(jax.random.key(3), x)["params"]
  pel = lambda p, x, y: optax.softmax_cross_entropy_with_integer_labels(
      model.apply({"params": p}, x), y)
  d = _directions(params)
  with pytest.warns(UserWarning, match="closes over its data"):
    _, _, f = oxs.value_grad_and_factors(lambda p: pel(p, x, y))(params)
  assert not f.plans                   # nothing probed, all leaves fall back
  got = np.asarray(oxs.contract(f, d))
  ref = _reference_dots(pel, params, d, x, y, 1.0 / B)
  np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-5 * np.abs(ref).max())


@pytest.mark.parametrize("conv", [dict(), dict(feature_group_count=2)])
def test_per_example_grads_memory_grows_with_b_not_b_squared(conv):
  """Formed per example, not as ``B`` transposed passes over the whole
  batch: compiled temporaries stay within a few copies of the ``B x P``
  output (a dense direction basis makes ``B^2``-sized buffers).  Checked
  for the conv tap rule and the generic per-example vjp."""
  class Net(nn.Module):
    @nn.compact
    def __call__(self, x):
      x = nn.relu(nn.Conv(8, (3, 3), **conv)(x))
      return nn.Dense(4)(nn.relu(nn.Conv(32, (3, 3), **conv)(x)).mean((1, 2)))

  b = 64
  x = jax.random.normal(jax.random.key(0), (b, 4, 4, 4))   # factors < B x P
  y = jnp.arange(b) % 4
  model = Net()
  params = model.init(jax.random.key(1), x[:1])["params"]

  def pel(p, x, y):
    return optax.softmax_cross_entropy_with_integer_labels(
        model.apply({"params": p}, x), y)

  def run(p, x, y):
    _, grads, factors = oxs.value_grad_and_factors(pel)(p, x, y)
    return contraction.per_example_grads(factors, grads)

  def temp(fn):
    return jax.jit(fn).lower(params, x, y).compile().memory_analysis(
    ).temp_size_in_bytes

  out_bytes = 4 * b * sum(a.size for a in jax.tree.leaves(params))
  capture = temp(lambda p, x, y: oxs.value_grad_and_factors(pel)(p, x, y))
  assert temp(run) <= capture + 8 * out_bytes, (temp(run), capture, out_bytes)
