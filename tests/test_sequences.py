"""Sequence losses and loss shapes: a token mean over a padding mask with
different training and validation lengths, several validation examples, and
the sum / mean reductions."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

import optax_shapley as oxs
from optax_shapley import truth

B, N, VOCAB, D, T_TRAIN, T_VAL, V, LR = 5, 20, 13, 8, 8, 5, 6, 1e-2


class TinySeq(nn.Module):
  """Embed + learned positions (raw param, sliced to T) + Dense per token."""
  max_len: int = 16

  @nn.compact
  def __call__(self, tok):
    pos = self.param("pos", nn.initializers.normal(0.1), (self.max_len, D))
    h = nn.Embed(VOCAB, D)(tok) + pos[: tok.shape[1]]
    h = nn.LayerNorm()(jnp.tanh(nn.Dense(D)(h)))
    return nn.Dense(VOCAB)(h)


MODEL = TinySeq()
_K = jax.random.split(jax.random.key(0), 6)
TOK = jax.random.randint(_K[0], (N, T_TRAIN), 0, VOCAB)
TGT = jax.random.randint(_K[1], (N, T_TRAIN), 0, VOCAB)
# Valid lengths 3..8: the padding differs between examples.
MASK = (jnp.arange(T_TRAIN)[None] < 3 + jnp.arange(N)[:, None] % 6).astype(jnp.float32)
VTOK = jax.random.randint(_K[2], (V, T_VAL), 0, VOCAB)
VTGT = jax.random.randint(_K[3], (V, T_VAL), 0, VOCAB)
PARAMS = MODEL.init(_K[4], TOK[:B])["params"]
IDS = [np.random.default_rng(s).permutation(N)[:B] for s in range(3)]


def pel(p, tok, tgt, mask):
  """Mean next-token cross-entropy over the valid tokens: f32[B]."""
  ce = optax.softmax_cross_entropy_with_integer_labels(
      MODEL.apply({"params": p}, tok), tgt)
  return jnp.sum(ce * mask, axis=1) / jnp.sum(mask, axis=1)


def val_loss_of(vtok, vtgt):
  return lambda p: pel(p, vtok, vtgt, jnp.ones(vtok.shape, jnp.float32))


def _run(tx, val_loss, reduction="mean", steps=3):
  @jax.jit
  def step(p, s, tok, tgt, mask, ids):
    _, g, f = oxs.value_grad_and_factors(pel, reduction=reduction)(p, tok, tgt, mask)
    u, s = tx.update(g, s, p, factors=f, example_ids=ids, val_loss=val_loss)
    return optax.apply_updates(p, u), s

  params, state, out = PARAMS, tx.init(PARAMS), []
  for ids in IDS[:steps]:
    new, state = step(params, state, TOK[ids], TGT[ids], MASK[ids],
                      jnp.asarray(ids))
    out.append((params, np.asarray(oxs.step_values(state))))
    params = new
  oxs.check(state)
  return out


def test_padded_token_mean_train_8_validate_5():
  """sgd/start is LR * x_i . grad L(w): checks the masked token mean, the
  T=8 training and T=5 validation shapes against vmap(grad)."""
  val_loss = val_loss_of(VTOK, VTGT)
  tx = oxs.adam(LR, num_examples=N, metric="sgd", evaluation="start",
                batch_size=B)
  for (params, sv), ids in zip(_run(tx, val_loss), IDS):
    pe = truth.per_example_grads(pel, params, TOK[ids], TGT[ids], MASK[ids])
    v = jax.grad(lambda p: jnp.mean(val_loss(p)))(params)
    ref = sum(LR / B * np.tensordot(np.asarray(a), np.asarray(c), axes=np.ndim(c))
              for a, c in zip(jax.tree.leaves(pe), jax.tree.leaves(v)))
    np.testing.assert_allclose(sv, ref, rtol=1e-4, atol=1e-5 * np.abs(ref).max())


def test_padding_does_not_change_a_value():
  """Extra padding (mask 0) with arbitrary tokens leaves the loss and the
  per-example values of the other positions unchanged."""
  ids = IDS[0]
  tok, tgt, mask = TOK[ids], TGT[ids], MASK[ids]
  noise = jax.random.randint(_K[5], tok.shape, 0, VOCAB)
  tok2 = jnp.where(mask > 0, tok, noise)
  v = jax.tree.map(lambda x: jax.random.normal(_K[5], (1,) + x.shape), PARAMS)
  got = [oxs.contract(oxs.value_grad_and_factors(pel)(PARAMS, t, tgt, mask)[2], v)
         for t in (tok, tok2)]
  # Padded tokens still pass through the position-wise layers but get zero
  # loss weight, so their cotangents are zero: values agree to rounding.
  np.testing.assert_allclose(got[0], got[1], rtol=1e-5, atol=1e-7)


def test_several_validation_examples_average_without_cross_terms():
  """With evaluation at the start, d is linear in grad L, so the values for
  a validation set of V examples are the mean of the values for each
  validation example alone: no cross terms between validation examples.
  (eps=1e-3 keeps Adam's first step well conditioned in float32.)"""
  tx_of = lambda: oxs.adam(LR, eps=1e-3, num_examples=N,
                           metric=("secant", "linearized", "sgd"),
                           evaluation="start", batch_size=B)
  k = 3
  together = _run(tx_of(), val_loss_of(VTOK[:k], VTGT[:k]), steps=1)[0][1]
  alone = np.mean([_run(tx_of(), val_loss_of(VTOK[j:j + 1], VTGT[j:j + 1]),
                        steps=1)[0][1] for j in range(k)], axis=0)
  assert together.shape == (B, 3)
  np.testing.assert_allclose(together, alone, rtol=0,
                             atol=1e-5 * np.abs(alone).max())


def test_sum_and_mean_reductions():
  """x_i is grad l_i for "sum" and grad l_i / B for "mean": the contraction
  differs by exactly B.  Through the transform the values are those of the
  step really taken: SGD with the same learning rate takes a B times larger
  step from a sum, so its first-step sgd/start values are B^2 times larger
  (B from x_i, B from nothing else: the sgd metric is LR * x_i . grad L);
  Adam is invariant to the gradient's scale (up to eps), so sum and mean give
  the same values at every step."""
  ids = IDS[0]
  args = (TOK[ids], TGT[ids], MASK[ids])
  d = jax.tree.map(lambda x: jax.random.normal(_K[5], (2,) + x.shape), PARAMS)
  mean = oxs.contract(oxs.value_grad_and_factors(pel)(PARAMS, *args)[2], d)
  total = oxs.contract(
      oxs.value_grad_and_factors(pel, reduction="sum")(PARAMS, *args)[2], d)
  np.testing.assert_allclose(total, B * np.asarray(mean), rtol=1e-6,
                             atol=1e-6 * B * np.abs(mean).max())

  val_loss = val_loss_of(VTOK, VTGT)
  sgd = [oxs.sgd(LR, num_examples=N, metric="sgd", evaluation="start",
                 batch_size=B) for _ in range(2)]
  s_mean = _run(sgd[0], val_loss, "mean", steps=1)[0][1]
  s_sum = _run(sgd[1], val_loss, "sum", steps=1)[0][1]
  np.testing.assert_allclose(s_sum, B * s_mean, rtol=1e-5)

  adam = [oxs.adam(LR, eps=1e-12, num_examples=N, batch_size=B)
          for _ in range(2)]
  a_mean = _run(adam[0], val_loss, "mean")
  a_sum = _run(adam[1], val_loss, "sum")
  for (_, m), (_, s) in zip(a_mean, a_sum):
    np.testing.assert_allclose(s, m, rtol=0, atol=1e-4 * np.abs(m).max())
