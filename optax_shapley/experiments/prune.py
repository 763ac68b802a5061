"""Pruning by value: remove the lowest-valued data, retrain, compare.

``optax-shapley prune`` runs :func:`optax_shapley.experiments.detect.attribute`
(one attributed training run on the corrupted data) for each seed, ranks the
training examples by each score, removes the most suspect fraction (several
fractions), retrains the same MLP from scratch with the same seed (same
initialisation, same batch-order generator) on what is left, and reports test
accuracy and validation loss, mean and spread (standard deviation) over the
seeds.  Also the opposite direction, removing the *least* suspect (highest
valued) first, which must hurt, and random removal.  The reference is the
same training on all the (corrupted) data.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from optax_shapley.experiments import detect, reports

__all__ = ["Config", "retrain", "run_prune", "METHODS"]

#: Scores compared by default (see :func:`detect.suspicion_scores`).
METHODS = ("value_class_zmin", "value", "sgd_value_class_zmin", "sgd_value",
           "final_loss", "tracin", "random")


@dataclasses.dataclass(frozen=True)
class Config:
  """A pruning study.

  Attributes:
    detect: the corrupted data, model and training (its ``seed`` is
      replaced by each of ``seeds``).
    fractions: shares of the training set removed.
    seeds: one attributed run and its retrainings per seed.
    methods: scores to prune by.
  """
  detect: detect.Config = detect.Config()
  fractions: tuple[float, ...] = (0.05, 0.1, 0.2, 0.3)
  seeds: tuple[int, ...] = (0, 1, 2, 3, 4)
  methods: tuple[str, ...] = METHODS

  def __post_init__(self):
    if not self.fractions or not all(0.0 < f < 1.0 for f in self.fractions):
      raise ValueError(f"fractions must be in (0, 1), got {self.fractions}")
    if not self.seeds:
      raise ValueError("seeds must not be empty")


def retrain(cfg: detect.Config, split, keep: np.ndarray) -> dict:
  """Trains the MLP of ``cfg`` from scratch on the training rows ``keep``.

  Same initialisation (``cfg.seed``) and batch-order generator as
  :func:`detect.attribute`, plain ``optax.adam``; each epoch is one jitted
  ``lax.scan`` over its batches.

  Returns:
    ``{"test_accuracy": float, "val_loss": float}``.
  """
  model, pel, tx, epoch = _trainer(tuple(cfg.hidden), split.num_classes,
                                   cfg.learning_rate)
  params = model.init(jax.random.key(cfg.seed), split.X_train[:1])["params"]
  X, y = split.X_train[keep], split.y_train[keep]
  n, b = len(keep), min(cfg.batch_size, len(keep))
  state = tx.init(params)
  rng = np.random.default_rng(cfg.seed)
  for _ in range(cfg.epochs):
    order = detect.epoch_batches(rng, n, b)
    params, state = epoch(params, state, jnp.asarray(X[order]),
                          jnp.asarray(y[order]))
  logits = model.apply({"params": params}, jnp.asarray(split.X_test))
  val = pel(params, jnp.asarray(split.X_val), jnp.asarray(split.y_val))
  return dict(test_accuracy=float(np.mean(np.asarray(logits).argmax(-1)
                                          == split.y_test)),
              val_loss=float(jnp.mean(val)))


@functools.lru_cache(maxsize=8)
def _trainer(hidden, num_classes, learning_rate):
  """Model, loss, optimizer and a jitted epoch (``lax.scan`` over batches
  ``xs`` f32[S, B, D], ``ys`` i32[S, B]), shared by all retrainings."""
  model, pel = detect.mlp(hidden, num_classes)
  tx = optax.adam(learning_rate)

  @jax.jit
  def epoch(params, state, xs, ys):
    def body(carry, batch):
      p, s = carry
      g = jax.grad(lambda q: jnp.mean(pel(q, *batch)))(p)
      u, s = tx.update(g, s, p)
      return (optax.apply_updates(p, u), s), None
    return jax.lax.scan(body, (params, state), (xs, ys))[0]

  return model, pel, tx, epoch


def run_prune(cfg: Config = Config(), out_dir: str | None = "runs/prune",
              progress: bool = False, verbose: bool = True) -> dict:
  """Runs the study; writes ``prune.json``, ``table.md`` and ``prune.png``
  to ``out_dir`` (unless ``None``) and returns the report.

  Report: ``full`` (all data) and, per method, direction (``"lowest"``:
  most suspect removed first; ``"highest"``: least suspect first; random
  has one) and fraction, per-seed test accuracies and validation losses
  with their means and standard deviations, the share of the removed
  examples that were corrupted, and the paired test-accuracy gains over
  all data (``gain_vs_full``) and over random removal of the same fraction
  (``gain_vs_random``), each a mean and standard deviation over seeds of
  per-seed differences (seeds share the split, so pairing removes the
  variation common to both).  ``vs_sgd``: each Adam-aware score minus its
  SGD-proxy counterpart (``value...`` vs ``sgd_value...``), test accuracy
  and validation loss, paired the same way.  ``detection``: every score's
  AUROC and precision (:func:`detect.detection_metrics`) over the seeds.
  """
  t0 = time.perf_counter()
  runs = []
  for seed in cfg.seeds:
    dcfg = dataclasses.replace(cfg.detect, seed=seed)
    att = detect.attribute(dcfg, progress=progress)
    scores = detect.suspicion_scores(att)
    unknown = set(cfg.methods) - set(scores)
    if unknown:
      raise ValueError(f"unknown method(s) {sorted(unknown)}; choose from "
                       f"{sorted(scores)}")
    n = len(att.corrupted)
    one = dict(full=retrain(dcfg, att.split, np.arange(n)), pruned={},
               detection=detect.detection_metrics(scores, att.corrupted))
    for method in cfg.methods:
      order = np.argsort(-scores[method], kind="stable")   # most suspect first
      for direction in (("lowest",) if method == "random"
                        else ("lowest", "highest")):
        ranked = order if direction == "lowest" else order[::-1]
        for f in cfg.fractions:
          k = int(round(f * n))
          keep = np.sort(ranked[k:])
          res = retrain(dcfg, att.split, keep)
          res["corrupted_removed"] = float(att.corrupted[ranked[:k]].mean())
          one["pruned"][(method, direction, f)] = res
    runs.append(one)

  def summary(rows):
    out = {}
    for key in rows[0]:
      xs = np.array([r[key] for r in rows], np.float64)
      # One seed measures no spread: NaN (printed "nan"), not a zero.
      out[key] = dict(mean=float(xs.mean()),
                      std=float(xs.std(ddof=1)) if len(xs) > 1 else float("nan"),
                      per_seed=xs.tolist())
    return out

  results = []
  for key in runs[0]["pruned"]:
    method, direction, f = key
    rows = []
    for r in runs:
      acc = r["pruned"][key]["test_accuracy"]
      rows.append(dict(r["pruned"][key], gain_vs_full=acc
                       - r["full"]["test_accuracy"]))
      if ("random", "lowest", f) in r["pruned"]:
        rows[-1]["gain_vs_random"] = (
            acc - r["pruned"][("random", "lowest", f)]["test_accuracy"])
    results.append(dict(method=method, direction=direction, fraction=f,
                        **summary(rows)))
  # The Adam-aware scores against their SGD-proxy counterparts, paired.
  vs_sgd = []
  for method in cfg.methods:
    if not method.startswith("value") or f"sgd_{method}" not in cfg.methods:
      continue
    for f in cfg.fractions:
      rows = []
      for r in runs:
        a = r["pruned"][(method, "lowest", f)]
        b = r["pruned"][(f"sgd_{method}", "lowest", f)]
        rows.append(dict(test_accuracy=a["test_accuracy"] - b["test_accuracy"],
                         val_loss=a["val_loss"] - b["val_loss"]))
      vs_sgd.append(dict(method=method, fraction=f, **summary(rows)))
  detection = {name: summary([r["detection"][name] for r in runs])
               for name in runs[0]["detection"]}
  report = dict(config=dataclasses.asdict(cfg), jax=jax.__version__,
                full=summary([r["full"] for r in runs]), results=results,
                vs_sgd=vs_sgd, detection=detection,
                seconds=time.perf_counter() - t0)
  if out_dir is not None:
    reports.write(out_dir, "prune", report, format_markdown(report))
    plot(report, os.path.join(out_dir, "prune.png"))
  if verbose:
    print(format_markdown(report))
  return report


def find(report: dict, method: str, direction: str, fraction: float) -> dict:
  """The result row of ``(method, direction, fraction)``."""
  for r in report["results"]:
    if (r["method"], r["direction"], r["fraction"]) == (method, direction,
                                                         fraction):
      return r
  raise KeyError((method, direction, fraction))


def format_markdown(report: dict) -> str:
  c = report["config"]
  d = c["detect"]
  what = "labels flipped" if d["corruption"] == "flip" else "inputs noised"
  fr = c["fractions"]
  full = report["full"]["test_accuracy"]
  lines = [
      f"{d['dataset']}, {d['fraction']:.0%} of training {what}; MLP "
      f"{tuple(d['hidden'])}, Adam lr {d['learning_rate']:g}, B = "
      f"{d['batch_size']}, {d['epochs']} epochs; seeds {c['seeds']}; "
      f"{report['seconds']:.0f} s.  Test accuracy, mean +- standard "
      f"deviation over seeds (share of the removed that were corrupted in "
      f"brackets).  All data: {full['mean']:.4f} +- {full['std']:.4f}.\n",
      "| score | removed first | " + " | ".join(f"{f:.0%}" for f in fr) + " |",
      "|---|---|" + "---|" * len(fr)]
  methods = list(dict.fromkeys(r["method"] for r in report["results"]))
  for method in methods:
    for direction in ("lowest", "highest"):
      try:
        rows = [find(report, method, direction, f) for f in fr]
      except KeyError:
        continue
      label = ("most suspect" if direction == "lowest" else "least suspect")
      if method == "random":
        label = "random"
      cells = " | ".join(
          f"{r['test_accuracy']['mean']:.4f} +- {r['test_accuracy']['std']:.4f}"
          f" ({r['corrupted_removed']['mean']:.2f})" for r in rows)
      lines.append(f"| {method} | {label} | {cells} |")
  lines += ["", "Paired test-accuracy gain of removing the most suspect "
            "first, over training on all data / over random removal of the "
            "same fraction (mean +- standard deviation over seeds of the "
            "per-seed differences):", "",
            "| score | " + " | ".join(f"{f:.0%}" for f in fr) + " |",
            "|---|" + "---|" * len(fr)]
  for method in methods:
    if method == "random":
      continue
    rows = [find(report, method, "lowest", f) for f in fr]
    cells = " | ".join(
        f"{r['gain_vs_full']['mean']:+.4f} +- {r['gain_vs_full']['std']:.4f} / "
        f"{r['gain_vs_random']['mean']:+.4f} +- {r['gain_vs_random']['std']:.4f}"
        for r in rows)
    lines.append(f"| {method} | {cells} |")
  lines += ["", "Validation loss (mean +- standard deviation over seeds), "
            f"most suspect removed first; all data: "
            f"{report['full']['val_loss']['mean']:.4f} +- "
            f"{report['full']['val_loss']['std']:.4f}:", "",
            "| score | " + " | ".join(f"{f:.0%}" for f in fr) + " |",
            "|---|" + "---|" * len(fr)]
  for method in methods:
    rows = [find(report, method, "lowest", f) for f in fr]
    cells = " | ".join(f"{r['val_loss']['mean']:.4f} +- "
                       f"{r['val_loss']['std']:.4f}" for r in rows)
    lines.append(f"| {method} | {cells} |")
  if report.get("detection"):
    lines += ["", "Detection over the same seeds, AUROC / precision at the "
              "corrupted count (mean +- standard deviation):", "",
              "| score | AUROC | precision |", "|---|---|---|"]
    for name, m in report["detection"].items():
      lines.append(f"| {name} | {m['auroc']['mean']:.4f} +- "
                   f"{m['auroc']['std']:.4f} | "
                   f"{m['precision_at_k']['mean']:.3f} +- "
                   f"{m['precision_at_k']['std']:.3f} |")
  if report.get("vs_sgd"):
    lines += ["", "Adam-aware score minus its SGD-proxy counterpart, most "
              "suspect removed first, paired per seed: test accuracy / "
              "validation loss (mean +- standard deviation):", "",
              "| score | " + " | ".join(f"{f:.0%}" for f in fr) + " |",
              "|---|" + "---|" * len(fr)]
    for method in dict.fromkeys(r["method"] for r in report["vs_sgd"]):
      rows = [r for r in report["vs_sgd"] if r["method"] == method]
      cells = " | ".join(
          f"{r['test_accuracy']['mean']:+.4f} +- {r['test_accuracy']['std']:.4f}"
          f" / {r['val_loss']['mean']:+.4f} +- {r['val_loss']['std']:.4f}"
          for r in rows)
      lines.append(f"| {method} vs sgd_{method} | {cells} |")
  return "\n".join(lines) + "\n"


def plot(report: dict, path: str) -> None:
  """Test accuracy against the fraction removed, one line per score and
  direction (solid: most suspect first; dotted: least suspect first)."""
  plt = reports.pyplot()
  fig, ax = plt.subplots(figsize=(7, 5))
  full = report["full"]["test_accuracy"]
  ax.axhline(full["mean"], color="k", lw=0.8, label="all data")
  ax.axhspan(full["mean"] - full["std"], full["mean"] + full["std"],
             color="k", alpha=0.08)
  fr = report["config"]["fractions"]
  methods = list(dict.fromkeys(r["method"] for r in report["results"]))
  for i, method in enumerate(methods):
    color = f"C{i}"
    for direction, style in (("lowest", "-"), ("highest", ":")):
      try:
        rows = [find(report, method, direction, f) for f in fr]
      except KeyError:
        continue
      ax.errorbar(fr, [r["test_accuracy"]["mean"] for r in rows],
                  yerr=[r["test_accuracy"]["std"] for r in rows], color=color,
                  ls=style, marker="o", ms=3, capsize=2,
                  label=method if direction == "lowest" else None)
  ax.set_xlabel("fraction of training data removed (solid: most suspect "
                "first, dotted: least)")
  ax.set_ylabel("test accuracy")
  ax.legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)
