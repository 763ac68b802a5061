"""Accuracy of the ghost rule against the exact rule, per step.

For the fidelity models (``optax_shapley.experiments.fidelity``) and the
bench MLP, trains 100 Adam steps on random batches with the default
estimator (secant at the midpoint) and the exact rule, and at every step also
runs the ghost-forced transformation on the same parameters, state and batch
(the inner update is the same, so both see one trajectory).  Reports the
Pearson R lost against the exact values at a few steps, the largest loss at
steps >= 10 (the ``auto`` accuracy contract of issue 5 is <= 0.001), and at
how many of those steps some Dense call kept its ghost values (the others
went to the exact rule through the spot check).

Usage: python docs/experiments/ghost_accuracy.py [ghost_tol|none] [B] [models]
e.g.   python docs/experiments/ghost_accuracy.py 0.05 32 mlp,cnn,transformer,bench_mlp
"""
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax

import optax_shapley as oxs
from optax_shapley.experiments import bench, fidelity


def problem(name):
  """A fidelity model (``mlp``, ``cnn``, ``transformer``) or a bench model
  on digits at V = 4 (``bench_mlp``, ``bench_cnn``)."""
  if not name.startswith("bench_"):
    return fidelity.make_problem(name)
  model = name[len("bench_"):]
  s = bench.setup(model, bench.BenchConfig(models=(model,)))
  return s.problem.with_val_size(4)


def run(name, tol, batch_size, steps=100, report=(1, 3, 5, 10, 20, 50, 100)):
  prob = problem(name)
  n = prob.num_examples
  kw = dict(num_examples=n, batch_size=batch_size)
  exact = oxs.adam(1e-3, contraction="exact", **kw)
  forced = oxs.adam(1e-3, contraction="ghost", ghost_tol=tol, **kw)
  pel, val_loss = prob.per_example_loss, prob.val_loss

  def make(tx):
    @jax.jit
    def step(p, st, ids, *batch):
      _, g, f = oxs.value_grad_and_factors(pel)(p, *batch)
      u, st = tx.update(g, st, p, factors=f, example_ids=ids, val_loss=val_loss)
      return optax.apply_updates(p, u), st
    return step

  step_exact, step_ghost = make(exact), make(forced)
  p, st = prob.params, exact.init(prob.params)
  rng = np.random.default_rng(0)
  rows = []
  for t in range(1, steps + 1):
    ids = rng.choice(n, batch_size, replace=False)
    batch = tuple(jnp.asarray(a[ids]) for a in prob.inputs)
    _, st_g = step_ghost(p, st, jnp.asarray(ids), *batch)
    p, st = step_exact(p, st, jnp.asarray(ids), *batch)
    ve, vg = np.asarray(st.step_values), np.asarray(st_g.step_values)
    oxs.check(st_g)
    rows.append((t, np.corrcoef(ve, vg)[0, 1],
                 not np.allclose(ve, vg, rtol=1e-6, atol=1e-12)))
  r = {t: x for t, x, _ in rows}
  late = [(1 - x, used) for t, x, used in rows if t >= 10]
  return dict(model=name, loss={t: 1 - r[t] for t in report},
              max_loss_from_10=max(x for x, _ in late),
              ghost_steps_from_10=sum(u for _, u in late), steps_from_10=len(late))


def main():
  tol = sys.argv[1] if len(sys.argv) > 1 else "0.05"
  tol = None if tol == "none" else float(tol)
  batch = int(sys.argv[2]) if len(sys.argv) > 2 else 32
  names = (sys.argv[3] if len(sys.argv) > 3
           else "mlp,cnn,transformer,bench_mlp").split(",")
  for name in names:
    out = run(name, tol, batch)
    print(f"{name}: ghost_tol={tol} B={batch} R lost at steps "
          + ", ".join(f"{t}: {v:.1e}" for t, v in out["loss"].items())
          + f"; max at t >= 10: {out['max_loss_from_10']:.1e}; ghost kept at "
          f"{out['ghost_steps_from_10']}/{out['steps_from_10']} steps >= 10",
          flush=True)


if __name__ == "__main__":
  main()
