"""Accuracy of bfloat16 factors against float32 factors, per step.

``value_grad_and_factors(..., factor_dtype=jnp.bfloat16)`` stores the kept
layer inputs and output cotangents in bfloat16 (half their memory; the
contraction still accumulates in float32).  For the fidelity models and the
bench MLP and CNN, trains 100 Adam steps on random batches with the default
estimator and the exact rule in float32, and at every step also runs the
bfloat16-factor capture on the same parameters, state and batch.  Reports
the Pearson R lost against the float32 values (the ``auto`` accuracy
contract of issue 5 is <= 0.001 at steps >= 10) and the largest error
relative to the largest value.

Usage: python docs/experiments/factor_dtype.py [B] [models]
e.g.   python docs/experiments/factor_dtype.py 32 mlp,cnn,transformer
       python docs/experiments/factor_dtype.py 256 bench_mlp,bench_cnn
"""
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax

import optax_shapley as oxs

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from ghost_accuracy import problem  # pylint: disable=wrong-import-position


def run(name, batch_size, steps=100):
  prob = problem(name)
  n = prob.num_examples
  tx = oxs.adam(1e-3, contraction="exact", num_examples=n,
                batch_size=batch_size)
  pel, val_loss = prob.per_example_loss, prob.val_loss

  def make(factor_dtype):
    capture = oxs.value_grad_and_factors(pel, factor_dtype=factor_dtype)

    @jax.jit
    def step(p, st, ids, *batch):
      _, g, f = capture(p, *batch)
      u, st = tx.update(g, st, p, factors=f, example_ids=ids, val_loss=val_loss)
      return optax.apply_updates(p, u), st
    return step

  step32, step16 = make(None), make(jnp.bfloat16)
  p, st = prob.params, tx.init(prob.params)
  rng = np.random.default_rng(0)
  lost, rel = [], []
  for t in range(1, steps + 1):
    ids = rng.choice(n, batch_size, replace=False)
    batch = tuple(jnp.asarray(a[ids]) for a in prob.inputs)
    _, st16 = step16(p, st, jnp.asarray(ids), *batch)
    p, st = step32(p, st, jnp.asarray(ids), *batch)
    oxs.check(st16)
    v32, v16 = np.asarray(st.step_values), np.asarray(st16.step_values)
    if t >= 10:
      lost.append(1 - np.corrcoef(v32, v16)[0, 1])
      rel.append(np.abs(v16 - v32).max() / np.abs(v32).max())
  return max(lost), float(np.median(rel)), max(rel)


def main():
  batch = int(sys.argv[1]) if len(sys.argv) > 1 else 32
  names = (sys.argv[2] if len(sys.argv) > 2 else "mlp,cnn,transformer").split(",")
  for name in names:
    worst, rel_med, rel_max = run(name, batch)
    print(f"{name}: B={batch} bfloat16 factors, steps >= 10: max R lost "
          f"{worst:.1e}; error / max |value| median {rel_med:.1e}, max "
          f"{rel_max:.1e}", flush=True)


if __name__ == "__main__":
  main()
