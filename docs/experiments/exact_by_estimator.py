"""The library's attributed step with the exact rule, estimator by estimator.

``optax-shapley bench`` times the default estimator (secant at the
midpoint).  This script times the same real step (``oxs.value_grad_and_factors``
plus ``oxs.adam(..., contraction="exact")``, every check included) for
other metrics and evaluation points on the bench MLP (64-256-256-10 on
digits, B = 256, V = 4) against the plain optax step, in one process,
interleaved, after 30 Adam steps on random batches.  The rows separate what
the exact contraction costs (``sgd`` at the start: no metric work, no
second point) from what the evaluation point and the metric add.

Usage: python docs/experiments/exact_by_estimator.py
"""
import jax
import jax.numpy as jnp
import optax

import optax_shapley as oxs
from optax_shapley.experiments import bench

LR = 1e-3
ESTIMATORS = (("sgd", "start"), ("fixed_state", "start"), ("secant", "start"),
              ("sgd", "midpoint"), ("secant", "midpoint"))


def main(rounds=30, repeat=3):
  cfg = bench.BenchConfig(models=("mlp",), val_sizes=(4,))
  s = bench.setup("mlp", cfg)
  prob = s.problem.with_val_size(4)
  pel, batch = prob.per_example_loss, s.batch
  b = jax.tree.leaves(batch)[0].shape[0]
  val_loss = prob.val_loss
  ids = jnp.arange(b, dtype=jnp.int32)
  adam = optax.adam(LR)

  plain = lambda p, st: bench.plain_step(pel, adam)(p, st, *batch)
  p, st = bench.warm_adam_state(s, adam)      # a trained Adam state

  compiled = {"plain": jax.jit(plain).lower(p, st).compile()}
  args = {"plain": (p, st)}
  for metric, evaluation in ESTIMATORS:
    tx = oxs.adam(LR, num_examples=b, batch_size=b, metric=metric,
                  evaluation=evaluation, contraction="exact")

    def step(p, state, tx=tx):
      _, g, f = oxs.value_grad_and_factors(pel)(p, *batch)
      u, state = tx.update(g, state, p, factors=f, example_ids=ids,
                           val_loss=val_loss)
      return optax.apply_updates(p, u), state

    state = tx.init(p)._replace(inner_state=st)
    name = f"{metric}@{evaluation}"
    compiled[name] = jax.jit(step).lower(p, state).compile()
    args[name] = (p, state)
  med = bench.time_interleaved(compiled, args, rounds, repeat, seed=1)
  print("| step (exact rule) | ms | throughput vs plain |\n|---|---|---|")
  for m, t in med.items():
    print(f"| {m} | {1e3 * t:.2f} | {med['plain'] / t:.3f} |")


if __name__ == "__main__":
  main()
