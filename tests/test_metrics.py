"""Closed forms of optimizer metrics against the real optax update."""

import jax
import jax.numpy as jnp
import numpy as np
import optax

from optax_shapley import metrics


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
    cf = metrics.adam_secant_scale(g, metrics.find_adam_state(st),
                                   learning_rate=1e-2, b1=0.8, b2=0.99,
                                   eps=1e-8)["w"]
    u_g, u_0 = upd(g)["w"], upd({"w": jnp.zeros(400)})["w"]
    gw = g["w"]
    quotient = -(u_g - u_0) / jnp.where(gw == 0, 1.0, gw)
    big = jnp.abs(gw) > 1e-1        # where float32 cancellation is small
    np.testing.assert_allclose(cf[big], quotient[big], rtol=2e-4)
    _, deriv = jax.jvp(upd, ({"w": jnp.zeros(400)},), ({"w": jnp.ones(400)},))
    np.testing.assert_allclose(cf[:20], -deriv["w"][:20], rtol=1e-5)
