"""A low-rank sketch of the per-layer direction: accuracy and cost.

For a Dense kernel used at ``T`` tokens per example, the exact contraction
of example ``i`` with the direction ``D`` (``d_in x d_out``) is
``sum_t a_it^T D b_it``: ``T d_in d_out`` multiply-adds per example. With a
rank-``K`` truncated SVD ``D ~ U_K S_K V_K^T`` it becomes
``sum_t (a_it U_K S_K) . (b_it V_K)``: ``T K (d_in + d_out)`` plus one SVD
per step. This script takes the bench transformer (d = 64, T = 128, B = 64,
V = 4) after 30 Adam steps, computes the default direction (secant at the
midpoint), and for every ``nn.Dense`` call (the MLP blocks) compares the
exact values with the rank-``K`` sketch: Pearson R of the whole step's
values (the other layers exact) and the relative error of those calls'
part.

Usage: python docs/experiments/sketch.py
"""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

import optax_shapley as oxs
from optax_shapley import estimators, metrics
from optax_shapley.experiments import bench


def main(ranks=(1, 2, 4, 8, 16, 32), steps=(30, 100)):
  cfg = bench.BenchConfig(models=("transformer",), val_sizes=(4,))
  s = bench.setup("transformer", cfg)
  prob = s.problem.with_val_size(4)
  pel, batch, val = prob.per_example_loss, s.batch, prob.val_inputs
  adam = optax.adam(1e-3)
  params, st = prob.params, adam.init(prob.params)
  rng = np.random.default_rng(1)

  @jax.jit
  def train(p, st, tok, tgt):
    g = jax.grad(lambda q: jnp.mean(pel(q, tok, tgt)))(p)
    u, st = adam.update(g, st, p)
    return optax.apply_updates(p, u), st

  toks, tgts = batch
  for t in range(1, max(steps) + 1):
    idx = rng.permutation(toks.shape[0])
    params, st = train(params, st, toks[idx], tgts[idx])
    if t not in steps:
      continue
    _, g, f = oxs.value_grad_and_factors(pel)(params, *batch)
    update_of = lambda gg: adam.update(gg, st, params)[0]
    u_g, u_0 = update_of(g), update_of(jax.tree.map(jnp.zeros_like, g))
    mid = estimators.MIDPOINT.point(params, u_g, u_0)
    v = jax.grad(lambda q: jnp.mean(pel(q, *val)))(mid)
    d = metrics.scale_times(metrics.secant_scale(update_of, g, u_g, u_0), v)
    total = np.asarray(oxs.contract(f, jax.tree.map(lambda x: x[None], d)))[:, 0]
    leaves = jax.tree.leaves(d)
    exact_part = np.zeros_like(total)
    sketch_part = {k: np.zeros_like(total) for k in ranks}
    for plan, (inputs, cot) in zip(f.plans, f.calls):
      if type(plan.module) is not nn.Dense:
        continue
      kernel = dict(plan.param_map)[("kernel",)]
      dk = leaves[kernel]
      a = inputs[0].reshape(inputs[0].shape[0], -1, dk.shape[0])
      b = cot.reshape(cot.shape[0], -1, dk.shape[1])
      exact_part += np.asarray(jnp.einsum("btd,de,bte->b", a, dk, b))
      u, sv, vt = jnp.linalg.svd(dk, full_matrices=False)
      for k in ranks:
        left = jnp.einsum("btd,dk->btk", a, u[:, :k] * sv[:k])
        right = jnp.einsum("bte,ke->btk", b, vt[:k])
        sketch_part[k] += np.asarray(jnp.sum(left * right, axis=(1, 2)))
    for k in ranks:
      approx = total - exact_part + sketch_part[k]
      r = np.corrcoef(approx, total)[0, 1]
      rel = np.linalg.norm(sketch_part[k] - exact_part) / np.linalg.norm(exact_part)
      print(f"step {t}, rank {k:2d}: Pearson R of the step values vs exact "
            f"{r:.6f}, relative error of the Dense part {rel:.3f}", flush=True)


if __name__ == "__main__":
  main()
