"""A Flax ``TrainState`` training script with the Shapley transformation
inside an ``optax.chain``: global-norm clipping, then Adam with a warm-up +
cosine learning-rate schedule; per-class validation targets; a progress bar
(or log lines when not on a terminal).

    .venv/bin/python examples/train_state.py --epochs 5

``TrainState.apply_gradients`` calls ``tx.update(grads, opt_state, params)``
without extra arguments, so the state here forwards them: the factors, the
example ids and the validation loss.  Clipping before the transformation
rescales the batch gradient by one scalar, which the transformation
recognises and applies to every example's share.
"""

import argparse
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax.training import train_state

import optax_shapley as oxs
from optax_shapley.experiments import data
from optax_shapley.experiments.models import MLP, cross_entropy


class ShapleyTrainState(train_state.TrainState):
  """``TrainState`` whose ``apply_gradients`` passes extra arguments
  (``factors``, ``example_ids``, ``val_loss``, ``val_weights``) to
  ``tx.update``."""

  def apply_gradients(self, *, grads: Any, **extra_args):
    updates, opt_state = self.tx.update(grads, self.opt_state, self.params,
                                        **extra_args)
    return self.replace(step=self.step + 1,
                        params=optax.apply_updates(self.params, updates),
                        opt_state=opt_state)


def main(epochs: int = 5, batch_size: int = 32, seed: int = 0,
         max_norm: float = 1.0) -> np.ndarray:
  split = data.load_digits_split(seed=seed, val_size=300)
  n, classes = len(split.X_train), split.num_classes
  model = MLP(features=(64, classes))
  steps_per_epoch = n // batch_size
  total = epochs * steps_per_epoch
  schedule = optax.warmup_cosine_decay_schedule(
      0.0, 3e-3, warmup_steps=max(1, total // 10), decay_steps=total)
  tx = optax.chain(
      optax.clip_by_global_norm(max_norm),
      oxs.adam(schedule, num_examples=n, batch_size=batch_size,
               num_targets=1 + classes))
  state = ShapleyTrainState.create(
      apply_fn=model.apply, tx=tx,
      params=model.init(jax.random.key(seed), split.X_train[:1])["params"])
  x_val, y_val = jnp.asarray(split.X_val), jnp.asarray(split.y_val)
  # Target 0: the overall validation loss; 1 + c: class c.
  weights = jnp.asarray(np.concatenate([
      oxs.mean_target(len(y_val)), oxs.class_targets(split.y_val, classes)]))

  def per_example_loss(params, x, y):
    return cross_entropy(state.apply_fn({"params": params}, x), y)

  def val_loss(params):
    return per_example_loss(params, x_val, y_val)

  @jax.jit
  def train_step(state, x, y, ids):
    losses, grads, factors = oxs.value_grad_and_factors(per_example_loss)(
        state.params, x, y)
    state = state.apply_gradients(grads=grads, factors=factors,
                                  example_ids=ids, val_loss=val_loss,
                                  val_weights=weights)
    return state, losses.mean()

  rng = np.random.default_rng(seed)
  with oxs.Progress(total=epochs * steps_per_epoch, batch_size=batch_size,
                    log_every=steps_per_epoch, desc="train") as bar:
    for _ in range(epochs):
      order = rng.permutation(n)[:steps_per_epoch * batch_size]
      for ids in order.reshape(steps_per_epoch, batch_size):
        state, loss = train_step(state, split.X_train[ids], split.y_train[ids],
                                 jnp.asarray(ids, jnp.int32))
        bar.update(state.opt_state)

  oxs.check(state.opt_state)
  values = np.asarray(oxs.values(state.opt_state))           # f32[N, 1 + C]
  acc = float(np.mean(np.asarray(state.apply_fn(
      {"params": state.params}, split.X_test)).argmax(-1) == split.y_test))
  print(f"test accuracy {acc:.4f}, final train loss {float(loss):.3f}")
  worst = np.argsort(values[:, 1:].min(axis=1))[:5]
  for i in worst:
    c = int(np.argmin(values[i, 1:]))
    print(f"least valuable #{i} (label {split.y_train[i]}): hurts class {c} "
          f"by {values[i, 1 + c]:+.2e}, overall {values[i, 0]:+.2e}")
  return values


if __name__ == "__main__":
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--epochs", type=int, default=5)
  p.add_argument("--batch-size", type=int, default=32)
  p.add_argument("--seed", type=int, default=0)
  a = p.parse_args()
  main(a.epochs, a.batch_size, a.seed)
