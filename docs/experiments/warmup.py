"""Learning-rate warm-up and the accumulated values of a whole run.

Adam's first step is sign descent (``vhat_1 = g^2``), which no
one-direction estimator follows, and it moves every weight by the first
learning rate.  This reruns the whole-run check of ``optax-shapley
fidelity`` (100 training examples, 10 epochs of ``B = 10``, exact Shapley
values of the real step at every step, summed per example) with a learning
rate that rises linearly from 0 to 1e-3 over the first ``W`` steps and then
stays there (``optax.linear_schedule``), and prints Pearson R and the slope of
the default's and four other estimators' accumulated values against the
summed exact values.  ``W = 0``
is the constant learning rate of the fidelity report.

Usage: python docs/experiments/warmup.py [models] [W,...]
e.g.   python docs/experiments/warmup.py mlp 0,10
"""
import sys
import time

import optax

from optax_shapley.experiments import fidelity as F


def main(models=("mlp",), warmups=(0, 10), lr=1e-3):
  rows = (F.estimator_name(*F.DEFAULT), "secant@midpoint",
          "coalitions@midpoint", "fixed_state@start", "sgd@start")
  for name in models:
    problem = F.make_problem(name)
    for w in warmups:
      sched = lr if w == 0 else optax.linear_schedule(0.0, lr, w)
      cfg = F.Config(models=(name,), learning_rate=sched)
      t0 = time.perf_counter()
      acc = F.run_accumulation(problem, cfg)
      print(f"{name}, warm-up {w} steps ({time.perf_counter() - t0:.0f} s, "
            f"{acc['exact_steps']} steps credited exactly by the default):")
      for r in rows:
        a = acc[r]
        print(f"  {r:24s} Pearson {a['pearson']:.4f}  slope {a['slope']:.3f}"
              f"  without step 1 {a['pearson_from_step_2']:.4f}")


if __name__ == "__main__":
  models = tuple(sys.argv[1].split(",")) if len(sys.argv) > 1 else ("mlp",)
  warmups = (tuple(int(w) for w in sys.argv[2].split(","))
             if len(sys.argv) > 2 else (0, 10))
  main(models, warmups)
