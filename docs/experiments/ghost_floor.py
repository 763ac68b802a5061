"""What the ghost-contracted step costs at least, estimator by estimator.

The attributed step of ``optax-shapley bench`` does more than the method
needs: the spot check of the ghost rule, the add-up check, in-graph input
checks.  This script times the bare minimum of each estimator on the bench
MLP (64-256-256-10 on digits, B = 256, V = 4) against the plain optax step,
in one process, interleaved, after 30 Adam steps on random batches:

- the train forward and backward pass with its ghost factors
  (``oxs.value_grad_and_factors``) and the real ``optax.adam`` update;
- ``midpoint`` only: ``u(0)`` and the midpoint parameters;
- the validation pass with its factors at the evaluation point;
- the metric's elementwise scale ``S`` of every kernel and its rank-1
  factorisation (``ghost.factor_log_metric``, weighted by ``|G|``); for
  ``sgd`` the scale is ``eta`` (no work);
- the ghost values (``ghost.ghost_values``) added to a values table.

No checks, no fallback.  So each row is a floor for that estimator with the
rank-1 ghost rule on this machine; the difference between rows is what the
metric and the evaluation point cost.

Usage: python docs/experiments/ghost_floor.py
"""
import jax
import jax.numpy as jnp
import optax

import optax_shapley as oxs
from optax_shapley import adam_state, ghost
from optax_shapley.experiments import bench

LR, B1, B2, EPS = 1e-3, 0.9, 0.999, 1e-8


def _kernel_index(plan):
  return dict(plan.param_map)[("kernel",)]


def _step(pel, batch, val, metric, evaluation, adam):
  b = jax.tree.leaves(batch)[0].shape[0]

  def step(p, st, values):
    _, g, f = oxs.value_grad_and_factors(pel)(p, *batch)
    u, new_st = adam.update(g, st, p)
    w = p
    if evaluation == "midpoint":
      u0 = adam.update(jax.tree.map(jnp.zeros_like, g), st, p)[0]
      w = jax.tree.map(lambda x, a, c: x + (a + c) / 2, p, u, u0)
    _, vg, vf = oxs.value_grad_and_factors(pel)(w, *val)
    moments = adam_state.find_adam_state(st)
    if metric == "fixed_state":
      scale = adam_state.fixed_state_scale(
          g, adam_state.find_adam_state(new_st), learning_rate=LR, b1=B1, b2=B2,
          eps=EPS)
    elif metric == "secant":
      scale = adam_state.adam_secant_scale(g, moments, learning_rate=LR, b1=B1,
                                        b2=B2, eps=EPS)
    phi = jnp.zeros(b)
    for plan, (ins, cot), (vins, vcot) in zip(f.plans, f.calls, vf.calls):
      k = _kernel_index(plan)
      if metric == "sgd":
        r = jnp.full((ins[0].shape[-1], 1), LR)
        q = jnp.ones((cot.shape[-1], 1))
      else:
        r, q = ghost.factor_log_metric(jax.tree.leaves(scale)[k],
                                       jnp.abs(jax.tree.leaves(vg)[k]))
      phi = phi + ghost.ghost_values(ins[0], cot, vins[0], vcot, r, q)
    return optax.apply_updates(p, u), new_st, values.at[jnp.arange(b)].add(phi)

  return step


def main(rounds=40, repeat=3):
  cfg = bench.BenchConfig(models=("mlp",), val_sizes=(4,))
  s = bench.setup("mlp", cfg)
  prob = s.problem.with_val_size(4)
  pel, batch, val = prob.per_example_loss, s.batch, prob.val_inputs
  b = jax.tree.leaves(batch)[0].shape[0]
  adam = optax.adam(LR, b1=B1, b2=B2, eps=EPS)

  train = bench.plain_step(pel, adam)

  steps = {"plain": lambda p, st, values: (*train(p, st, *batch), values)}
  for metric in ("sgd", "fixed_state", "secant"):
    for evaluation in ("start", "midpoint"):
      steps[f"{metric}@{evaluation}"] = _step(pel, batch, val, metric,
                                              evaluation, adam)
  p, st = bench.warm_adam_state(s, adam)      # a trained Adam state
  args = (p, st, jnp.zeros(b))
  compiled = {m: jax.jit(fn).lower(*args).compile() for m, fn in steps.items()}
  med = bench.time_interleaved(compiled, {m: args for m in compiled}, rounds,
                               repeat, seed=1)
  print("| step | ms | throughput vs plain |\n|---|---|---|")
  for m, t in med.items():
    print(f"| {m} | {1e3 * t:.2f} | {med['plain'] / t:.3f} |")


if __name__ == "__main__":
  main()
