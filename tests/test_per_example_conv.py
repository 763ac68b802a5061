"""The per-example rule for convolutions with few input channels: their
per-example kernel gradients (one strided input slice per kernel tap)
replace the kept output cotangent.  Checked against per-example gradients from vmap(grad), the batch
gradient from jax.grad, and under shard_map against one device."""

from functools import partial

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

import optax_shapley as oxs
import toy
from optax_shapley import contraction

B = 6

# name: (nn.Conv settings, example shape, whether the per-example rule
# covers it; otherwise the call keeps its factors).
CONVS = {
    "same_3x3": (dict(features=5, kernel_size=(3, 3)), (7, 7, 2), True),
    "same_stride2_even": (dict(features=4, kernel_size=(4, 4), strides=2),
                          (8, 8, 1), True),
    "valid_stride2": (dict(features=4, kernel_size=(3, 3), strides=(2, 2),
                           padding="VALID"), (9, 9, 1), True),
    "dilated_same_no_bias": (dict(features=4, kernel_size=(2, 3),
                                  kernel_dilation=(2, 1), use_bias=False),
                             (6, 8, 1), True),
    "explicit_padding": (dict(features=3, kernel_size=(3, 2),
                              padding=((1, 0), (2, 1))), (6, 6, 2), True),
    "conv1d_int_padding": (dict(features=6, kernel_size=(5,), padding=2),
                           (16, 1), True),
    "int_kernel_size": (dict(features=3, kernel_size=3), (16, 1), True),
    "negative_padding_crops": (dict(features=3, kernel_size=(3, 3),
                                    padding=((-1, 2), (1, 1))), (8, 8, 1),
                               True),
    "conv3d_stride2": (dict(features=2, kernel_size=(2, 2, 2), strides=2),
                       (4, 4, 4, 1), True),
    "keyword_input": (dict(features=4, kernel_size=(3, 3)), (6, 6, 1), True),
    # A user-supplied convolution: the rule cannot know what it computes.
    "custom_conv_keeps_factors": (
        dict(features=4, kernel_size=(3, 3),
             conv_general_dilated=lambda *a, **k: 2.0 * jax.lax.conv_general_dilated(*a, **k)),
        (6, 6, 1), False),
    "circular_keeps_factors": (dict(features=4, kernel_size=(3, 3),
                                    padding="CIRCULAR"), (6, 6, 1), False),
    "causal_keeps_factors": (dict(features=6, kernel_size=(5,),
                                  padding="CAUSAL"), (16, 1), False),
}


class Net(nn.Module):
  conv: dict
  keyword: bool = False

  @nn.compact
  def __call__(self, x):
    conv = nn.Conv(**self.conv)
    h = nn.relu(conv(inputs=x) if self.keyword else conv(x))
    return nn.Dense(3)(h.reshape(h.shape[0], -1))


class TwoConvs(nn.Module):
  """Both convolutions take the rule; the second one's input cotangent
  comes from the rule's own backward pass."""

  @nn.compact
  def __call__(self, x):
    h = jnp.tanh(nn.Conv(2, (3, 3))(x))
    h = jnp.tanh(nn.Conv(3, (3, 3), strides=2)(h))
    return nn.Dense(3)(h.reshape(h.shape[0], -1))


def _setup(name):
  if name == "two_convs":
    model, shape = TwoConvs(), (8, 8, 1)
  else:
    conv, shape, _ = CONVS[name]
    model = Net(conv, keyword=name == "keyword_input")
  k1, k2, k3 = jax.random.split(jax.random.key(3), 3)
  x = jax.random.normal(k1, (B,) + shape)
  y = jax.random.randint(k2, (B,), 0, 3)
  params = model.init(k3, x)["params"]
  pel, _ = toy.losses(model, x, y)
  return params, pel, x, y


def _vmap_grads(pel, params, x, y):
  return jax.vmap(lambda xi, yi: jax.grad(
      lambda p: pel(p, xi[None], yi[None])[0])(params))(x, y)


@pytest.mark.parametrize("name", sorted(CONVS) + ["two_convs"])
def test_per_example_rule_matches_vmap_grad(name):
  params, pel, x, y = _setup(name)
  _, grads, factors = jax.jit(oxs.value_grad_and_factors(pel))(params, x, y)
  taken = [p.per_example for p in factors.plans]
  expect = ([True, True] if name == "two_convs" else [CONVS[name][2]]) + [False]
  assert taken == expect, taken
  ref_grads = jax.grad(lambda p: jnp.mean(pel(p, x, y)))(params)
  for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(ref_grads)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
  ref = jax.tree.map(lambda r: r / B, _vmap_grads(pel, params, x, y))
  got = jax.jit(contraction.per_example_grads)(factors, grads)
  for g, r in zip(jax.tree.leaves(got), jax.tree.leaves(ref)):
    np.testing.assert_allclose(g, r, rtol=0, atol=1e-5 * float(np.abs(r).max()))
  d = jax.tree.map(lambda a: jax.random.normal(jax.random.key(a.size),
                                               (2,) + a.shape), params)
  dots = np.asarray(jax.jit(oxs.contract)(factors, d))
  ref_dots = sum(jnp.einsum("b...,e...->be", r, e)
                 for r, e in zip(jax.tree.leaves(ref), jax.tree.leaves(d)))
  ref_dots = np.asarray(ref_dots)
  np.testing.assert_allclose(dots, ref_dots, rtol=0,
                             atol=1e-5 * np.abs(ref_dots).max())


def test_never_keeps_factors_and_agrees():
  params, pel, x, y = _setup("valid_stride2")
  d = jax.tree.map(lambda a: jnp.ones((1,) + a.shape), params)
  out = {}
  for mode in ("auto", "never"):
    _, _, f = oxs.value_grad_and_factors(pel, per_example=mode)(params, x, y)
    out[mode] = (f, np.asarray(oxs.contract(f, d)))
  assert [p.per_example for p in out["never"][0].plans] == [False, False]
  np.testing.assert_allclose(out["auto"][1], out["never"][1], rtol=1e-5,
                             atol=1e-7)
  with pytest.raises(ValueError, match="per_example"):
    oxs.value_grad_and_factors(pel, per_example="always")


def test_per_example_rule_under_shard_map():
  """Each device forms its own examples' gradients; the batch gradient of
  the convolution is summed over devices like any other leaf."""
  devices = 2
  assert jax.device_count() >= devices
  params, pel, x, y = _setup("same_3x3")
  d = jax.tree.map(lambda a: jnp.ones((1,) + a.shape), params)
  _, g_ref, f_ref = oxs.value_grad_and_factors(pel)(params, x, y)
  ref = np.asarray(oxs.contract(f_ref, d))
  mesh = jax.make_mesh((devices,), ("d",),
                       axis_types=(jax.sharding.AxisType.Auto,))

  @jax.jit
  @partial(jax.shard_map, mesh=mesh, in_specs=(P(), P("d"), P("d")),
           out_specs=(P(), P("d")))
  def step(p, x, y):
    _, g, f = oxs.value_grad_and_factors(pel)(p, x, y)
    assert f.plans[0].per_example
    g = jax.tree.map(lambda a: a / jax.lax.psum(1, "d"), g)
    return g, oxs.contract(f, d) / devices

  g, got = step(params, x, y)
  # psum adds the devices' partial sums in another order than one device.
  for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(g_ref)):
    np.testing.assert_allclose(a, b, rtol=1e-5,
                               atol=1e-6 * float(np.abs(b).max()))
  np.testing.assert_allclose(got, ref, rtol=1e-5,
                             atol=1e-6 * float(np.abs(ref).max()))
