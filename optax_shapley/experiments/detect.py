"""Finding corrupted training data by value, against standard baselines.

``optax-shapley detect`` corrupts a seeded share of a bundled dataset's
training split (labels flipped to a wrong class, or inputs replaced by
Gaussian noise), trains an MLP with Adam once, and in that run values every
training example against several validation targets at once
(``with_shapley(num_targets=K)``): the overall mean validation loss and one
target per class (:func:`optax_shapley.class_targets`).  Each example gets a
suspicion score (higher = more likely corrupted) from:

- ``value``: minus its accumulated value against the overall target
  (the default estimator, ``auto@midpoint``: the Adam-aware secant, with
  exact Shapley values of the real update at Adam's sign-descent first
  steps);
- ``value_class_min``: minus its most negative per-class value (an example
  that hurts one class a lot is suspect even if it helps the others);
- ``value_class_zmin``: the same in units of each class target's standard
  deviation over the training examples (classes whose values spread more
  no longer dominate the minimum);
- ``value_class_neg``: minus the sum of its negative per-class values;
- ``sgd_value``, ``sgd_value_class_min``, ... : the same with the SGD proxy
  (``sgd@start``, first-order In-Run Data Shapley);
- baselines: ``final_loss`` (training loss at the end under the given
  label), ``final_margin`` (minus the margin of the given label's logit
  over the best other one), ``loss_sum`` (training loss summed over the
  steps that used the example), ``tracin`` (minus the TracIn-CP score
  ``sum_c lr * grad l_i(w_c) . grad L(w_c)`` over checkpoints at evenly
  spaced epochs; Pruthi et al. 2020), and ``random``.

Reported per score: AUROC for "corrupted" and precision among the ``k``
highest-scored examples, ``k`` the true number corrupted.
"""

from __future__ import annotations

import csv
import dataclasses
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

import optax_shapley as oxs
from optax_shapley.experiments import data
from optax_shapley.experiments import reports
from optax_shapley.experiments.models import MLP, cross_entropy

__all__ = ["Config", "Attribution", "attribute", "suspicion_scores",
           "run_detect", "CORRUPTIONS"]

CORRUPTIONS = ("flip", "noise")
#: (metric, evaluation) tracked in the run: the default and the SGD proxy.
ESTIMATORS = (("auto", "midpoint"), ("sgd", "start"))
VALUE_PREFIX = {("auto", "midpoint"): "value", ("sgd", "start"): "sgd_value"}


@dataclasses.dataclass(frozen=True)
class Config:
  """One detection run.

  Attributes:
    dataset: one of :data:`optax_shapley.experiments.data.TABULAR_DATASETS`.
    corruption: ``"flip"`` (labels to a uniformly drawn wrong class) or
      ``"noise"`` (inputs replaced by Gaussian noise of each feature's mean
      and standard deviation, labels kept).
    fraction: share of training examples corrupted.
    epochs, batch_size, learning_rate, hidden: the MLP and its Adam training
      (each epoch a fresh shuffle cut into full batches).  The defaults
      train long enough for the network to memorise its corrupted labels, as
      large networks do: on digits with 20% flipped, test accuracy drops from
      0.97-0.99 (clean part only) to 0.88-0.94, and the final loss no longer
      separates the flipped examples as well.
    val_size, test_size: clean validation (the targets) and test splits, a
      count or a fraction of the dataset.
    seed: seeds the corruption, initialisation and batch order.
    split_seed: seeds the train / validation / test split (held fixed when
      several seeds are compared, so they share one test set).
    checkpoints: TracIn checkpoints (evenly spaced epoch ends, the last
      included).
  """
  dataset: str = "digits"
  corruption: str = "flip"
  fraction: float = 0.2
  epochs: int = 60
  batch_size: int = 32
  learning_rate: float = 3e-3
  hidden: tuple[int, ...] = (128,)
  val_size: float | int = 0.2
  test_size: float | int = 0.2
  seed: int = 0
  split_seed: int = 0
  checkpoints: int = 5

  def __post_init__(self):
    if self.dataset not in data.TABULAR_DATASETS:
      raise ValueError(f"unknown dataset {self.dataset!r}; choose from "
                       f"{data.TABULAR_DATASETS}")
    if self.corruption not in CORRUPTIONS:
      raise ValueError(f"unknown corruption {self.corruption!r}; choose from "
                       f"{CORRUPTIONS}")
    if not 0.0 < self.fraction < 1.0:
      raise ValueError(f"fraction must be in (0, 1), got {self.fraction}")
    if self.epochs < 1 or self.checkpoints < 1:
      raise ValueError("epochs and checkpoints must be >= 1")


@dataclasses.dataclass
class Attribution:
  """What one training run measured.

  Attributes:
    split: the data, training split corrupted.
    corrupted: bool[N], the ground truth of the corruption.
    values: f64[N, E, K] accumulated values per estimator
      (:data:`ESTIMATORS`) and target (0: overall mean, ``1 + c``: class c).
    baselines: name -> f64[N] suspicion scores of the baselines.
    test_accuracy, val_loss: of the final model.
    seconds: wall time of the run.
    exact_steps: steps the default credited by exact Shapley values
      (``ShapleyState.exact_steps``).
  """
  split: data.Split
  corrupted: np.ndarray
  values: np.ndarray
  baselines: dict[str, np.ndarray]
  test_accuracy: float
  val_loss: float
  seconds: float
  exact_steps: int = 0


def corrupted_split(cfg: Config) -> tuple[data.Split, np.ndarray]:
  """The dataset with its training split corrupted, and the corruption mask."""
  split = data.load_tabular_split(cfg.dataset, cfg.split_seed,
                                  val_size=cfg.val_size,
                                  test_size=cfg.test_size)
  if cfg.corruption == "flip":
    y, mask = data.flip_labels(split.y_train, cfg.fraction, split.num_classes,
                               seed=cfg.seed)
    return split._replace(y_train=y), mask
  X, mask = data.noise_inputs(split.X_train, cfg.fraction, seed=cfg.seed)
  return split._replace(X_train=X), mask


def mlp(hidden, num_classes: int):
  """The MLP (hidden widths ``hidden``) and its per-example cross-entropy
  ``per_example_loss(params, x f32[B, D], y int[B]) -> f32[B]``."""
  model = MLP(features=(*hidden, num_classes))

  def per_example_loss(params, x, y):
    return cross_entropy(model.apply({"params": params}, x), y)

  return model, per_example_loss


def epoch_batches(rng, n, b):
  """One epoch's batches: a fresh shuffle cut into ``n // b`` full batches."""
  per = n // b
  return rng.permutation(n)[:per * b].reshape(per, b)


def attribute(cfg: Config, progress: bool = False) -> Attribution:
  """Trains on the corrupted data once, tracking values and baselines."""
  t0 = time.perf_counter()
  split, corrupted = corrupted_split(cfg)
  C, N, B = split.num_classes, len(split.y_train), cfg.batch_size
  if not 1 <= B <= N:
    raise ValueError(f"batch_size must be in [1, {N}], got {B}")
  model, pel = mlp(cfg.hidden, C)
  params = model.init(jax.random.key(cfg.seed), split.X_train[:1])["params"]
  X_val, y_val = jnp.asarray(split.X_val), jnp.asarray(split.y_val)
  weights = jnp.asarray(np.concatenate([
      oxs.mean_target(len(split.y_val)),
      oxs.class_targets(split.y_val, C)]))                 # [1 + C, V]

  def val_loss(p):
    return pel(p, X_val, y_val)

  tx = oxs.adam(cfg.learning_rate, num_examples=N,
                metric=tuple(m for m, _ in ESTIMATORS),
                evaluation=tuple(e for _, e in ESTIMATORS), batch_size=B,
                num_targets=1 + C)

  @jax.jit
  def step(params, state, loss_sum, x, y, ids):
    losses, g, f = oxs.value_grad_and_factors(pel)(params, x, y)
    u, state = tx.update(g, state, params, factors=f, example_ids=ids,
                         val_loss=val_loss, val_weights=weights)
    return (optax.apply_updates(params, u), state,
            loss_sum.at[ids].add(losses))

  @jax.jit
  def tracin_scores(p, x, y):
    """``lr * grad l_i(w) . grad L(w)`` for every training example."""
    _, _, f = oxs.value_grad_and_factors(pel, reduction="sum")(p, x, y)
    v = jax.grad(lambda q: jnp.mean(val_loss(q)))(p)
    return cfg.learning_rate * oxs.contract(f, jax.tree.map(
        lambda a: a[None], v))[:, 0]

  X_tr, y_tr = jnp.asarray(split.X_train), jnp.asarray(split.y_train)
  state = tx.init(params)
  loss_sum = jnp.zeros(N, jnp.float32)
  tracin = np.zeros(N)
  marks = set(np.linspace(cfg.epochs, 0, cfg.checkpoints, endpoint=False)
              .round().astype(int).tolist())
  rng = np.random.default_rng(cfg.seed)
  bar = oxs.Progress(total=cfg.epochs * (N // B), batch_size=B,
                     enabled=progress, desc=f"detect {cfg.dataset}")
  for epoch in range(1, cfg.epochs + 1):
    for ids_np in epoch_batches(rng, N, B):
      ids = jnp.asarray(ids_np, jnp.int32)
      params, state, loss_sum = step(params, state, loss_sum, X_tr[ids],
                                     y_tr[ids], ids)
      bar.update(state)
    if epoch in marks:
      tracin += np.asarray(tracin_scores(params, X_tr, y_tr), np.float64)
  bar.close()
  oxs.check(state)
  vals = np.asarray(oxs.values(state), np.float64)
  if not np.all(np.isfinite(vals)):
    raise FloatingPointError("non-finite values")

  logits = np.asarray(model.apply({"params": params}, X_tr), np.float64)
  given = logits[np.arange(N), split.y_train]
  others = np.where(np.eye(C, dtype=bool)[split.y_train], -np.inf, logits)
  test_logits = model.apply({"params": params}, jnp.asarray(split.X_test))
  baselines = {
      "final_loss": np.asarray(pel(params, X_tr, y_tr), np.float64),
      "final_margin": -(given - others.max(axis=1)),
      "loss_sum": np.asarray(loss_sum, np.float64),
      "tracin": -tracin,
      "random": np.random.default_rng(cfg.seed + 1).random(N),
  }
  return Attribution(
      split=split, corrupted=corrupted, values=vals, baselines=baselines,
      test_accuracy=float(np.mean(np.asarray(test_logits).argmax(-1)
                                  == split.y_test)),
      val_loss=float(jnp.mean(val_loss(params))),
      seconds=time.perf_counter() - t0,
      exact_steps=int(state.exact_steps))


def suspicion_scores(att: Attribution) -> dict[str, np.ndarray]:
  """Every score of the module docstring, f64[N] each, higher = more
  suspect; value-based ones first."""
  out = {}
  for j, est in enumerate(ESTIMATORS):
    prefix = VALUE_PREFIX[est]
    v = att.values[:, j]                       # [N, 1 + C]
    out[prefix] = -v[:, 0]
    out[f"{prefix}_class_min"] = -v[:, 1:].min(axis=1)
    spread = v[:, 1:].std(axis=0)
    z = v[:, 1:] / np.where(spread > 0, spread, 1.0)
    out[f"{prefix}_class_zmin"] = -z.min(axis=1)
    out[f"{prefix}_class_neg"] = -np.minimum(v[:, 1:], 0.0).sum(axis=1)
  out.update(att.baselines)
  return out


def detection_metrics(scores: dict[str, np.ndarray], corrupted) -> dict:
  """AUROC and precision at ``k = corrupted.sum()`` per score."""
  from sklearn.metrics import roc_auc_score
  corrupted = np.asarray(corrupted, bool)
  k = int(corrupted.sum())
  out = {}
  for name, s in scores.items():
    top = np.argsort(-s, kind="stable")[:k]
    out[name] = dict(auroc=float(roc_auc_score(corrupted, s)),
                     precision_at_k=float(corrupted[top].mean()))
  return out


def run_detect(cfg: Config = Config(), out_dir: str | None = "runs/detect",
               progress: bool = False, verbose: bool = True) -> dict:
  """Runs :func:`attribute` and writes ``scores.csv``, ``roc.png``,
  ``detect.json`` and ``table.md`` to ``out_dir`` (unless ``None``)."""
  att = attribute(cfg, progress=progress)
  scores = suspicion_scores(att)
  metrics = detection_metrics(scores, att.corrupted)
  report = dict(
      config=dataclasses.asdict(cfg), jax=jax.__version__,
      num_train=len(att.corrupted), num_corrupted=int(att.corrupted.sum()),
      num_val=len(att.split.y_val), num_test=len(att.split.y_test),
      num_classes=att.split.num_classes, test_accuracy=att.test_accuracy,
      val_loss=att.val_loss, seconds=att.seconds,
      exact_steps=att.exact_steps, metrics=metrics)
  if out_dir is not None:
    reports.write(out_dir, "detect", report, format_markdown(report))
    with open(os.path.join(out_dir, "scores.csv"), "w", newline="") as f:
      w = csv.writer(f)
      names = list(scores)
      w.writerow(["id", "label", "corrupted", *names])
      for i in range(len(att.corrupted)):
        w.writerow([i, int(att.split.y_train[i]), int(att.corrupted[i]),
                    *(repr(float(scores[n][i])) for n in names)])
    plot_roc(scores, att.corrupted, metrics, os.path.join(out_dir, "roc.png"),
             title=_title(report))
  if verbose:
    print(format_markdown(report))
  return report


def _title(report: dict) -> str:
  c = report["config"]
  what = "labels flipped" if c["corruption"] == "flip" else "inputs noised"
  return (f"{c['dataset']}: {report['num_corrupted']} of {report['num_train']} "
          f"training examples' {what}")


def format_markdown(report: dict) -> str:
  c = report["config"]
  lines = [f"{_title(report)} (seed {c['seed']}); MLP {tuple(c['hidden'])}, "
           f"Adam lr {c['learning_rate']:g}, B = {c['batch_size']}, "
           f"{c['epochs']} epochs; {report['num_val']} clean validation "
           f"examples as 1 + {report['num_classes']} targets; test accuracy "
           f"{report['test_accuracy']:.4f}; {report['exact_steps']} exact "
           f"steps; {report['seconds']:.0f} s.\n",
           f"| score | AUROC | precision at {report['num_corrupted']} |",
           "|---|---|---|"]
  for name, m in report["metrics"].items():
    lines.append(f"| {name} | {m['auroc']:.4f} | {m['precision_at_k']:.3f} |")
  return "\n".join(lines) + "\n"


def plot_roc(scores, corrupted, metrics, path, title="") -> None:
  """ROC curves of every score."""
  plt = reports.pyplot()
  from sklearn.metrics import roc_curve
  fig, ax = plt.subplots(figsize=(6, 5))
  for name, s in scores.items():
    fpr, tpr, _ = roc_curve(corrupted, s)
    ax.plot(fpr, tpr, lw=1.2, ls="-" if "value" in name else "--",
            label=f"{name} ({metrics[name]['auroc']:.3f})")
  ax.plot([0, 1], [0, 1], "k:", lw=0.8)
  ax.set_xlabel("false positive rate")
  ax.set_ylabel("true positive rate")
  ax.set_title(title, fontsize=9)
  ax.legend(loc="lower right", fontsize=7)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)
