"""Noisy-label detection demo: which training examples did not help?

scikit-learn digits, a seeded share of the training labels flipped to a wrong
class, a clean validation split, a small MLP trained with Adam. In the same
run the transform tracks three estimators of every example's in-run data
Shapley value (positive = lowered the validation loss):

- ``auto_midpoint``: the default (``metric="auto"``): the Adam-aware
  ``secant`` estimator, with exact Shapley values of the real update
  (``coalitions``) at Adam's sign-descent early steps;
- ``sgd_start``: the first-order In-Run Data Shapley / TracIn baseline, which
  treats the step as plain gradient descent;
- ``coalitions_midpoint``: the per-example-gradient reference, which re-runs
  Adam's update on sampled coalitions at every step.

A flipped label should get a low value. Each estimator is scored by the AUROC
of ``-value`` for "label was flipped" (overall, and within each true-label
class, averaged), next to a post-hoc baseline: the per-example training loss
at the end of training under the given label.

Outputs (in ``out_dir``): ``values.csv``, ``values.png`` (a 2x2 figure:
clean-vs-flipped value histograms per estimator and the ROC curves),
``lowest.png`` (the lowest-valued training images) and ``summary.json``.
"""

from __future__ import annotations

import csv
import json
import os
import time
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

import optax_shapley as oxs
from optax_shapley.experiments.data import flip_labels, load_digits_split
from optax_shapley.experiments import reports
from optax_shapley.experiments.models import MLP, cross_entropy

__all__ = ["ESTIMATORS", "per_class_auroc", "run_demo"]

#: (metric, evaluation) pairs tracked in one run; the first is the default.
ESTIMATORS: tuple[tuple[str, str], ...] = (
    ("auto", "midpoint"), ("sgd", "start"), ("coalitions", "midpoint"))
FINAL_LOSS = "final_loss"

#: Printed under the scores by :func:`format_summary`.
EXPLANATION = (
    "Why final_loss is strong here: the small MLP does not memorise the "
    "flipped labels,\n"
    "  so at the end it still has a high training loss on them (a post-hoc "
    "check of the trained model).\n"
    "What in-run values add: they say which examples raised the validation "
    "loss during training,\n"
    "  step by step, and need no trained model to be inspected after the "
    "fact.")


def _column(metric: str, evaluation: str) -> str:
  return f"{metric}_{evaluation}"


def per_class_auroc(flipped, score, classes) -> float:
  """AUROC of ``score`` for ``flipped`` within each class, averaged.

  Classes with no flipped or no clean example are skipped (``nan`` if none is
  left). Removes what the overall AUROC credits for ranking whole classes
  apart (an estimator can score flipped examples low only because their class
  is valued low).
  """
  from sklearn.metrics import roc_auc_score
  flipped = np.asarray(flipped, bool)
  score = np.asarray(score)
  classes = np.asarray(classes)
  per = [roc_auc_score(flipped[m], score[m])
         for m in (classes == c for c in np.unique(classes))
         if 0 < flipped[m].sum() < m.sum()]
  return float(np.mean(per)) if per else float("nan")


def run_demo(out_dir: str = "runs/demo", seed: int = 0, *, epochs: int = 20,
             batch_size: int = 32, noise: float = 0.2,
             learning_rate: float = 3e-3, hidden: Sequence[int] = (64,),
             val_size: int = 300, test_size: float = 0.2,
             num_lowest: int = 20, progress: bool = True,
             verbose: bool = True) -> dict:
  """Trains on noisy digits, values every training example, writes reports.

  Args:
    out_dir: where the CSV and figures go (created if missing).
    seed: seeds the split, the label flips, the initialisation and the batch
      order.
    epochs: passes over the training set. Each epoch is reshuffled and cut
      into ``N // batch_size`` full batches (the remainder is dropped, a
      different one each epoch).
    batch_size: examples per step.
    noise: share of training labels flipped to a wrong class.
    learning_rate: Adam's learning rate.
    hidden: hidden layer widths of the MLP.
    val_size: size of the clean validation split (the value target).
    test_size: test split, count or fraction.
    num_lowest: how many lowest-valued images ``lowest.png`` shows.
    progress: show progress (:class:`optax_shapley.Progress`).
    verbose: print the summary.

  Returns:
    The summary, also written to ``summary.json``. Its keys: the run's
    settings ``seed`` (int), ``epochs`` (int), ``batch_size`` (int),
    ``noise`` (float), ``learning_rate`` (float) and ``hidden`` (list of
    int), as passed, and

    - ``num_train`` (int): training examples;
    - ``num_flipped`` (int): training labels flipped to a wrong class;
    - ``num_val`` (int): clean validation examples (the value target);
    - ``num_test`` (int): test examples;
    - ``steps`` (int): optimizer steps, ``epochs * (num_train // batch_size)``;
    - ``test_accuracy`` (float): accuracy of the trained MLP on the test split;
    - ``auroc`` (dict str -> float): per column (``auto_midpoint``,
      ``sgd_start``, ``coalitions_midpoint``, then ``final_loss``), the AUROC
      for "label was flipped" of ``-value`` (estimators) or of the final
      training loss (``final_loss``); 0.5 is chance, 1 is perfect;
    - ``per_class_auroc`` (dict str -> float): the same AUROC computed within
      each true-label class and averaged (:func:`per_class_auroc`);
    - ``num_lowest`` (int): ``min(num_lowest, num_train)``;
    - ``flipped_in_lowest`` (dict str -> int): per estimator, how many of
      its ``num_lowest`` lowest-valued examples have a flipped label;
    - ``default`` (str): the column of the default estimator;
    - ``seconds`` (float): wall time of the whole run;
    - ``files`` (dict str -> str): paths of ``csv`` (``values.csv``),
      ``values_png`` and ``lowest_png``.
  """
  t0 = time.perf_counter()
  os.makedirs(out_dir, exist_ok=True)

  split = load_digits_split(seed, val_size=val_size, test_size=test_size)
  C = split.num_classes
  y_true = split.y_train
  y_given, flipped = flip_labels(y_true, noise, C, seed=seed)
  N = len(y_given)
  B = int(batch_size)
  if not 1 <= B <= N:
    raise ValueError(f"batch_size must be in [1, {N}], got {B}")
  steps_per_epoch = N // B

  model = MLP(features=(*hidden, C))
  params = model.init(jax.random.PRNGKey(seed), jnp.zeros((1, split.X_train.shape[1])))["params"]
  X_val, y_val = jnp.asarray(split.X_val), jnp.asarray(split.y_val)

  def per_example_loss(params, x, y):
    return cross_entropy(model.apply({"params": params}, x), y)

  def val_loss(params):
    return cross_entropy(model.apply({"params": params}, X_val), y_val)

  metrics = tuple(m for m, _ in ESTIMATORS)
  evaluations = tuple(e for _, e in ESTIMATORS)
  tx = oxs.adam(learning_rate, num_examples=N, metric=metrics,
                evaluation=evaluations, batch_size=B)
  state = tx.init(params)

  @jax.jit
  def step(params, state, x, y, ids):
    losses, grads, factors = oxs.value_grad_and_factors(per_example_loss)(params, x, y)
    updates, state = tx.update(grads, state, params, factors=factors,
                               example_ids=ids, val_loss=val_loss)
    return optax.apply_updates(params, updates), state, losses.mean()

  X_tr = jnp.asarray(split.X_train)
  y_tr = jnp.asarray(y_given)
  rng = np.random.default_rng(seed)
  bar = oxs.Progress(total=epochs * steps_per_epoch, batch_size=B,
                     enabled=progress, desc="demo")
  for _ in range(epochs):
    perm = rng.permutation(N)[: steps_per_epoch * B].reshape(steps_per_epoch, B)
    for ids_np in perm:
      ids = jnp.asarray(ids_np, jnp.int32)
      params, state, _ = step(params, state, X_tr[ids], y_tr[ids], ids)
      bar.update(state)
  bar.close()

  oxs.check(state)
  vals = np.asarray(oxs.values(state), np.float64).reshape(N, len(ESTIMATORS))
  if not np.all(np.isfinite(vals)):
    raise FloatingPointError("non-finite values")

  apply = jax.jit(lambda p, x: model.apply({"params": p}, x))
  test_pred = np.asarray(apply(params, jnp.asarray(split.X_test))).argmax(-1)
  test_acc = float(np.mean(test_pred == split.y_test))
  final_loss = np.asarray(per_example_loss(params, X_tr, y_tr), np.float64)

  from sklearn.metrics import roc_auc_score

  names = [_column(m, e) for m, e in ESTIMATORS]
  scores = {n: -vals[:, j] for j, n in enumerate(names)}  # low value = suspect
  scores[FINAL_LOSS] = final_loss                           # high loss = suspect
  auroc = {n: float(roc_auc_score(flipped, s)) for n, s in scores.items()}
  class_auroc = {n: per_class_auroc(flipped, s, y_true)
                 for n, s in scores.items()}
  k = min(num_lowest, N)
  flipped_in_lowest = {n: int(flipped[np.argsort(vals[:, j], kind="stable")[:k]].sum())
                       for j, n in enumerate(names)}

  csv_path = os.path.join(out_dir, "values.csv")
  with open(csv_path, "w", newline="") as f:
    w = csv.writer(f)
    w.writerow(["id", "given_label", "true_label", "flipped", *names])
    for i in range(N):
      w.writerow([i, int(y_given[i]), int(y_true[i]), int(flipped[i]),
                  *(repr(float(v)) for v in vals[i])])

  fig_path = os.path.join(out_dir, "values.png")
  _plot_values(fig_path, names, vals, scores, flipped, auroc)
  low_path = os.path.join(out_dir, "lowest.png")
  order = np.argsort(vals[:, 0], kind="stable")[:k]
  _plot_lowest(low_path, split.X_train[order], y_given[order], y_true[order],
               vals[order, 0], names[0])

  seconds = time.perf_counter() - t0
  summary = {
      "seed": seed, "epochs": epochs, "batch_size": B, "noise": noise,
      "learning_rate": learning_rate, "hidden": list(hidden),
      "num_train": N, "num_flipped": int(flipped.sum()),
      "num_val": len(split.y_val), "num_test": len(split.y_test),
      "steps": epochs * steps_per_epoch,
      "test_accuracy": test_acc, "auroc": auroc,
      "per_class_auroc": class_auroc,
      "num_lowest": k, "flipped_in_lowest": flipped_in_lowest,
      "default": names[0],
      "seconds": seconds,
      "files": {"csv": csv_path, "values_png": fig_path, "lowest_png": low_path},
  }
  with open(os.path.join(out_dir, "summary.json"), "w") as f:
    json.dump(summary, f, indent=2)
  if verbose:
    print(format_summary(summary))
  return summary


def format_summary(s: dict) -> str:
  """The summary as printed by ``optax-shapley demo``."""
  lines = [
      f"digits: {s['num_train']} train ({s['num_flipped']} labels flipped, "
      f"{s['noise']:.0%}), {s['num_val']} clean validation, {s['num_test']} test; "
      f"MLP {tuple(s['hidden'])}, Adam lr={s['learning_rate']:g}, "
      f"B={s['batch_size']}, {s['epochs']} epochs ({s['steps']} steps)",
      f"test accuracy: {s['test_accuracy']:.4f}",
      "detecting flipped labels (score = -value; final_loss: score = "
      "training loss at the end):",
      f"  {'':<20} {'AUROC':>7} {'per-class':>9}   "
      f"{'flipped in ' + str(s['num_lowest']) + ' lowest':>20}",
  ]
  for name, a in s["auroc"].items():
    low = s["flipped_in_lowest"].get(name)
    low = f"{low}/{s['num_lowest']}" if low is not None else "-"
    tag = "  (default)" if name == s.get("default") else ""
    lines.append(f"  {name:<20} {a:>7.4f} {s['per_class_auroc'][name]:>9.4f}"
                 f"   {low:>20}{tag}")
  lines.append(EXPLANATION)
  lines.append(f"wrote {s['files']['csv']}, {s['files']['values_png']}, "
               f"{s['files']['lowest_png']}  ({s['seconds']:.1f} s)")
  return "\n".join(lines)


def _plot_values(path, names, vals, scores, flipped, auroc):
  """2x2: a clean-vs-flipped histogram per estimator (x clipped to the
  1%-99% quantiles), then the ROC curves."""
  from sklearn.metrics import roc_curve
  plt = reports.pyplot()
  clean_c, flip_c = "tab:blue", "tab:orange"
  fig, axes = plt.subplots(2, 2, figsize=(10, 8))
  panels = list(axes.flat)
  for j, name in enumerate(names[:3]):
    ax = panels[j]
    v = vals[:, j]
    lo, hi = np.quantile(v, [0.01, 0.99])
    if not hi > lo:
      lo, hi = v.min(), v.max() + 1e-12
    e = int(np.floor(np.log10(max(abs(lo), abs(hi), 1e-300))))
    scale = 10.0 ** e
    lo, hi = lo / scale, hi / scale
    vc = np.clip(v / scale, lo, hi)       # outside 1%-99%: in the end bins
    bins = np.linspace(lo, hi, 40)
    for mask, colour, label in ((~flipped, clean_c, "clean"),
                                (flipped, flip_c, "flipped")):
      ax.hist(vc[mask], bins=bins, weights=np.full(mask.sum(), 1 / mask.sum()),
              alpha=0.55, color=colour, label=f"{label} ({int(mask.sum())})")
    ax.axvline(0.0, color="k", lw=0.7)
    ax.set_xlim(lo, hi)
    ax.set_title(f"{name}: AUROC {auroc[name]:.3f}")
    ax.set_xlabel(f"accumulated value (x 1e{e}; 1%-99% range; "
                  "positive = helpful)")
    ax.set_ylabel("share of the group")
    ax.legend(fontsize=8)
  ax = panels[3]
  styles = ({"lw": 3.0, "alpha": 0.6}, {"lw": 1.5}, {"lw": 1.2, "ls": "--"},
            {"lw": 1.5, "ls": "-.", "color": "k"})
  for (name, s), style in zip(scores.items(), styles):
    fpr, tpr, _ = roc_curve(flipped, s)
    ax.plot(fpr, tpr, label=f"{name} ({auroc[name]:.3f})", **style)
  ax.plot([0, 1], [0, 1], "k:", lw=0.8)
  ax.set_xlabel("false positive rate")
  ax.set_ylabel("true positive rate")
  ax.set_title("ROC: detecting flipped labels")
  ax.legend(loc="lower right", fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def _plot_lowest(path, images, given, true, values, name):
  plt = reports.pyplot()
  k = len(images)
  cols = min(5, max(k, 1))
  rows = max(1, -(-k // cols))
  fig, axes = plt.subplots(rows, cols, figsize=(2.0 * cols, 2.3 * rows),
                           squeeze=False)
  for a, ax in enumerate(axes.flat):
    ax.axis("off")
    if a >= k:
      continue
    ax.imshow(images[a].reshape(8, 8), cmap="gray_r", vmin=0, vmax=1)
    wrong = given[a] != true[a]
    ax.set_title(f"given {given[a]} / true {true[a]}\n{values[a]:.2e}",
                 fontsize=8, color="tab:red" if wrong else "k")
  fig.suptitle(f"{k} lowest {name} values (red: label was flipped)", fontsize=10)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)
