"""The README's usage, runnable: value every training example of an MLP
trained with Adam on scikit-learn digits, then print the most and least
valuable ones.

    .venv/bin/python examples/mlp_digits.py --epochs 5
"""

import argparse

import jax
import jax.numpy as jnp
import numpy as np
import optax

import optax_shapley as oxs
from optax_shapley.experiments import data
from optax_shapley.experiments.models import MLP, cross_entropy


def main(epochs: int = 5, batch_size: int = 32, seed: int = 0) -> np.ndarray:
  split = data.load_digits_split(seed=seed, val_size=300)
  n = len(split.X_train)
  model = MLP(features=(64, split.num_classes))
  params = model.init(jax.random.key(seed), split.X_train[:1])["params"]
  x_val, y_val = jnp.asarray(split.X_val), jnp.asarray(split.y_val)

  def per_example_loss(params, x, y):      # -> f32[B]
    return cross_entropy(model.apply({"params": params}, x), y)

  def val_loss(params):                    # -> f32[V]; its mean is the target
    return per_example_loss(params, x_val, y_val)

  tx = oxs.adam(3e-3, num_examples=n, batch_size=batch_size)
  state = tx.init(params)

  @jax.jit
  def step(params, state, x, y, ids):
    losses, grads, factors = oxs.value_grad_and_factors(per_example_loss)(
        params, x, y)
    updates, state = tx.update(grads, state, params, factors=factors,
                               example_ids=ids, val_loss=val_loss)
    return optax.apply_updates(params, updates), state, losses.mean()

  rng = np.random.default_rng(seed)
  for epoch in range(epochs):
    order = rng.permutation(n)
    for start in range(0, n - batch_size + 1, batch_size):
      ids = order[start:start + batch_size]
      params, state, loss = step(params, state, split.X_train[ids],
                                 split.y_train[ids], jnp.asarray(ids, jnp.int32))
    print(f"epoch {epoch + 1}: last batch loss {float(loss):.3f}, "
          f"validation loss {float(val_loss(params).mean()):.3f}")

  oxs.check(state)                         # raises if a step's credit was skipped
  values = np.asarray(oxs.values(state))   # f32[N]; positive = helpful
  order = np.argsort(values)
  for name, rows in (("least", order[:5]), ("most", order[::-1][:5])):
    print(f"{name} valuable:", ", ".join(
        f"#{i} (label {split.y_train[i]}, value {values[i]:+.2e})" for i in rows))
  return values


if __name__ == "__main__":
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--epochs", type=int, default=5)
  parser.add_argument("--batch-size", type=int, default=32)
  parser.add_argument("--seed", type=int, default=0)
  a = parser.parse_args()
  main(a.epochs, a.batch_size, a.seed)
