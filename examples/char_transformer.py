"""A character transformer on Python's own standard-library source, with the
value of every training sequence for next-character prediction on held-out
text.  Learned positions, tied input/output embeddings, causal attention.

    .venv/bin/python examples/char_transformer.py --steps 200
"""

import argparse

import jax
import jax.numpy as jnp
import numpy as np
import optax

import optax_shapley as oxs
from optax_shapley.experiments import data
from optax_shapley.experiments.models import CharTransformer, token_cross_entropy


def main(steps: int = 200, batch_size: int = 16, seed: int = 0) -> np.ndarray:
  split = data.load_text_split(seed=seed, seq_len=32, val_size=64)
  n = len(split.tokens_train)
  model = CharTransformer(vocab_size=split.vocab_size, d_model=32, max_len=32)
  params = model.init(jax.random.key(seed), split.tokens_train[:1])["params"]
  vt, vy = jnp.asarray(split.tokens_val), jnp.asarray(split.targets_val)

  def per_example_loss(params, tokens, targets):   # -> f32[B], token mean
    return token_cross_entropy(model.apply({"params": params}, tokens), targets)

  def val_loss(params):
    return per_example_loss(params, vt, vy)

  tx = oxs.adam(3e-3, num_examples=n, batch_size=batch_size)
  state = tx.init(params)

  @jax.jit
  def step(params, state, tokens, targets, ids):
    losses, grads, factors = oxs.value_grad_and_factors(per_example_loss)(
        params, tokens, targets)
    updates, state = tx.update(grads, state, params, factors=factors,
                               example_ids=ids, val_loss=val_loss)
    return optax.apply_updates(params, updates), state, losses.mean()

  rng = np.random.default_rng(seed)
  for t in range(steps):
    ids = rng.choice(n, batch_size, replace=False)
    params, state, loss = step(params, state, split.tokens_train[ids],
                               split.targets_train[ids],
                               jnp.asarray(ids, jnp.int32))
    if (t + 1) % max(1, steps // 4) == 0:
      print(f"step {t + 1}: train loss {float(loss):.3f}, "
            f"validation loss {float(val_loss(params).mean()):.3f}")

  oxs.check(state)
  values = np.asarray(oxs.values(state))
  seen = np.flatnonzero(values != 0)
  for name, i in (("least", seen[np.argmin(values[seen])]),
                  ("most", seen[np.argmax(values[seen])])):
    text = data.decode_text(split.tokens_train[i])
    print(f"{name} valuable sequence #{i} ({values[i]:+.2e}): {text!r}")
  return values


if __name__ == "__main__":
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--steps", type=int, default=200)
  parser.add_argument("--batch-size", type=int, default=16)
  parser.add_argument("--seed", type=int, default=0)
  a = parser.parse_args()
  main(a.steps, a.batch_size, a.seed)
