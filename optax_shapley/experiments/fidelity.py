"""Fidelity report: every estimator against ground truth of the real step.

``optax-shapley fidelity`` trains each bundled model (an MLP and a small CNN
on scikit-learn digits, a 2-layer character transformer on Python's own
standard-library source) with Adam and, at chosen steps, compares the step
values of every estimator with ground truth computed by re-running the real
optimizer step on coalitions of the batch (:mod:`optax_shapley.truth`):

- Shapley values: exact by enumeration of all ``2^B`` coalitions when
  ``B <= 12`` (standard error 0), else Monte-Carlo with antithetic
  permutations, added in rounds until the largest standard error is below
  ``target_se`` (default 2%) of the values' spread (their standard deviation);
- leave-one-out ``U(B) - U(B minus {i})``.

Reported per model, step and estimator: Pearson and Spearman R against
Shapley and against leave-one-out, the slope of the least-squares line of the
values on the Shapley values (1 = the right scale), and the efficiency gap
``(sum_i phi_i - (U(B) - U(empty))) / |U(B) - U(empty)|``.

Accumulated values are checked on a whole run of their own: the same model
trained from its initialisation on a random subset of ``accumulate_examples``
training examples for ``accumulate_epochs`` epochs (shuffled, ``B`` per
step), with exact Shapley values computed at *every* step, summed per
example, and compared with each estimator's accumulated values at the end.
(Exact truth at every step of the main 1001-step run would take the
transformer about 35 minutes on 2 cores.)

Training uses the plain optax update except at the steps examined, where the
Shapley transformation computes all estimators at once; its updates are
bit-identical to optax's, so both paths train the same model.
"""

from __future__ import annotations

import dataclasses
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

import optax_shapley as oxs
from optax_shapley import shapley, truth
from optax_shapley.experiments import problems
from optax_shapley.experiments import reports

MODELS = problems.MODELS
DEFAULT_STEPS = (1, 2, 3, 6, 21, 101, 301, 1001)
# The default, every one-direction metric at every evaluation point, plus the two
# per-example-gradient references: exact removal at the end (leave-one-out)
# and Shapley of the update re-run on coalitions at the midpoint.
ESTIMATORS = (("auto", "midpoint"),) + tuple(
    (m, e) for m in ("sgd", "fixed_state", "linearized", "secant")
    for e in ("start", "midpoint", "end")) + (
        ("removal", "end"), ("coalitions", "midpoint"))
# Estimators whose semantics is leave-one-out rather than Shapley.
LOO_ESTIMATORS = (("linearized", "end"), ("removal", "end"))
# The default estimator.
DEFAULT = ("auto", "midpoint")


def estimator_name(metric: str, evaluation: str) -> str:
  return f"{metric}@{evaluation}"


@dataclasses.dataclass(frozen=True)
class Config:
  """Settings of one fidelity run (the command's options).

  Attributes:
    models: which of :data:`MODELS` to run.
    steps: 1-based training steps at which to compare with ground truth.
    learning_rate, b1, b2, eps: Adam's hyperparameters.
    weight_decay: AdamW weight decay; ``None`` for Adam.
    clip: global-norm clipping before Adam (``optax.clip_by_global_norm``);
      ``None`` for none.
    batch_size: ``B``, the players of each step's game.
    val_size: validation examples (the target's size); ``None``: the model's
      default (100 images, 32 sequences).
    seed: seed of data split, initialisation and batch order.
    accumulate_examples: training examples of the whole run whose
      accumulated values are compared with summed exact per-step Shapley
      values.
    accumulate_epochs: epochs of that run (0: skip it).
    target_se: Monte-Carlo stopping rule, largest standard error over the
      values' standard deviation.
    max_permutations: Monte-Carlo budget per step.
    truth: ``"auto"`` (exact for ``B <= 12``, else Monte-Carlo), ``"exact"``
      or ``"monte_carlo"``.
  """
  models: tuple[str, ...] = MODELS
  steps: tuple[int, ...] = DEFAULT_STEPS
  learning_rate: float = 1e-3
  b1: float = 0.9
  b2: float = 0.999
  eps: float = 1e-8
  weight_decay: float | None = None
  clip: float | None = None
  batch_size: int = 10
  val_size: int | None = None
  seed: int = 0
  accumulate_examples: int = 100
  accumulate_epochs: int = 10
  target_se: float = 0.02
  max_permutations: int = 2000
  truth: str = "auto"

  def __post_init__(self):
    if self.truth not in ("auto", "exact", "monte_carlo"):
      raise ValueError(f"truth must be auto, exact or monte_carlo, got {self.truth!r}")
    if self.truth == "exact" and self.batch_size > 16:
      raise ValueError("exact Shapley enumerates 2^B coalitions; use B <= 16")
    unknown = set(self.models) - set(MODELS)
    if unknown:
      raise ValueError(f"unknown model(s) {sorted(unknown)}; choose from {MODELS}")
    if not self.steps or min(self.steps) < 1:
      raise ValueError(f"steps must be positive integers, got {self.steps}")
    if self.batch_size < 2:
      raise ValueError(f"batch_size must be >= 2, got {self.batch_size}")
    if self.accumulate_epochs and self.accumulate_examples < self.batch_size:
      raise ValueError(
          f"accumulate_examples ({self.accumulate_examples}) must be at least "
          f"batch_size ({self.batch_size})")


Problem = problems.Problem


def make_problem(name: str, seed: int = 0, val_size: int | None = None) -> Problem:
  """The bundled fidelity models: ``"mlp"``, ``"cnn"`` or ``"transformer"``
  at the sizes of :class:`problems.Sizes`' defaults."""
  return problems.make(name, seed, val_size)


def make_optimizer(cfg: Config) -> optax.GradientTransformation:
  """Adam, or AdamW with ``weight_decay``, after optional global-norm clipping."""
  if cfg.weight_decay is None:
    tx = optax.adam(cfg.learning_rate, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps)
  else:
    tx = optax.adamw(cfg.learning_rate, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps,
                     weight_decay=cfg.weight_decay)
  if cfg.clip is not None:
    tx = optax.chain(optax.clip_by_global_norm(cfg.clip), tx)
  return tx


def shapley_truth(utility, num_players: int, key, target_se: float = 0.02,
                  max_permutations: int = 2000, round_size: int = 100,
                  method: str = "auto"):
  """Shapley values of ``utility`` with standard errors and the method used.

  Exact enumeration for ``num_players <= 12`` (``method="auto"``) or always
  (``"exact"``); otherwise (or with ``"monte_carlo"``) antithetic
  Monte-Carlo permutations in rounds of ``round_size`` until
  ``max(stderr) <= target_se * std(values)`` or ``max_permutations``.

  Returns:
    ``(values f64[n], stderr f64[n], method, permutations)``.
  """
  if method == "exact" or (method == "auto" and num_players <= shapley.EXACT_MAX_PLAYERS):
    v = truth.exact_shapley(utility, num_players)
    return v, np.zeros(num_players), "exact", 0
  total, mean, var, used = 0, None, None, 0
  while True:
    key, sub = jax.random.split(key)
    m, se = truth.monte_carlo_shapley(utility, num_players, sub, round_size)
    n = round_size // 2                                  # antithetic samples
    if mean is None:
      mean, var = m, (se ** 2) * n                       # per-sample variance
    else:
      mean = (total * mean + n * m) / (total + n)
      var = (total * var + n * (se ** 2) * n) / (total + n)
    total += n
    used += round_size
    stderr = np.sqrt(var / total)
    if stderr.max() <= target_se * mean.std() or used >= max_permutations:
      return mean, stderr, "monte_carlo", used


def _pearson(a, b) -> float:
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  if a.std() == 0 or b.std() == 0:
    return float("nan")
  return float(np.corrcoef(a, b)[0, 1])


def _spearman(a, b) -> float:
  from scipy.stats import spearmanr
  return float(spearmanr(a, b).statistic)


def _slope(values, reference) -> float:
  if np.std(reference) == 0:
    return float("nan")
  return float(np.polyfit(reference, values, 1)[0])


def step_report(values: np.ndarray, shapley: np.ndarray, loo: np.ndarray,
                whole: float) -> dict:
  """Per-estimator statistics of one step; ``values`` f[B, E]."""
  out = {}
  for j, (m, e) in enumerate(ESTIMATORS):
    v = values[:, j]
    out[estimator_name(m, e)] = dict(
        pearson_shapley=_pearson(v, shapley), spearman_shapley=_spearman(v, shapley),
        pearson_loo=_pearson(v, loo), spearman_loo=_spearman(v, loo),
        slope_shapley=_slope(v, shapley), slope_loo=_slope(v, loo),
        efficiency_gap=float((v.sum() - whole) / abs(whole)) if whole else float("nan"))
  return out


class _Trainer:
  """The two jitted steps of a run: plain optax, and the Shapley
  transformation tracking every estimator of :data:`ESTIMATORS`."""

  def __init__(self, problem: Problem, cfg: Config, num_examples: int):
    self.inner = inner = make_optimizer(cfg)
    self.tx = tx = oxs.with_shapley(
        inner, num_examples=num_examples, metric=tuple(m for m, _ in ESTIMATORS),
        evaluation=tuple(e for _, e in ESTIMATORS), batch_size=cfg.batch_size,
        learning_rate=cfg.learning_rate, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps,
        elementwise=cfg.clip is None)
    pel, val_loss = problem.per_example_loss, problem.val_loss

    @jax.jit
    def shapley_step(params, state, ids, *batch):
      _, g, f = oxs.value_grad_and_factors(pel)(params, *batch)
      u, state = tx.update(g, state, params, factors=f, example_ids=ids,
                           val_loss=val_loss)
      return optax.apply_updates(params, u), state

    @jax.jit
    def plain_step(params, state, *batch):
      g = jax.grad(lambda p: jnp.mean(pel(p, *batch)))(params)
      u, inner_state = inner.update(g, state.inner_state, params)
      state = state._replace(inner_state=inner_state, count=state.count + 1)
      return optax.apply_updates(params, u), state

    self.shapley_step, self.plain_step = shapley_step, plain_step


def _ground_truth(problem: Problem, inner, params, state, batch, key,
                  cfg: Config) -> dict:
  """Shapley values (with standard errors), leave-one-out and the whole
  effect ``U(B) - U(empty)`` of the real step on ``batch``."""
  pe = truth.per_example_grads(problem.per_example_loss, params, *batch)
  utility = truth.step_utility(inner, state.inner_state, params, pe,
                               problem.val_loss)
  b = cfg.batch_size
  shap, se, method, perms = shapley_truth(utility, b, key, cfg.target_se,
                                          cfg.max_permutations,
                                          method=cfg.truth)
  return dict(shapley=shap, se=se, method=method, permutations=perms,
              loo=truth.leave_one_out(utility, b),
              whole=float(utility(np.ones(b))) - float(utility(np.zeros(b))))


def run_model(problem: Problem, cfg: Config, progress: bool = False) -> dict:
  """Trains ``problem`` for ``max(cfg.steps)`` steps and reports fidelity,
  then runs the accumulation check (:func:`run_accumulation`)."""
  t0 = time.perf_counter()
  n, b = problem.num_examples, cfg.batch_size
  run = _Trainer(problem, cfg, n)
  params, state = problem.params, run.tx.init(problem.params)
  rng = np.random.default_rng(cfg.seed)
  key = jax.random.key(cfg.seed)
  last = max(cfg.steps)
  steps_out = []
  bar = oxs.Progress(total=last, batch_size=b, enabled=progress,
                     desc=problem.name)
  for t in range(1, last + 1):
    ids = rng.choice(n, b, replace=False)
    batch = tuple(jnp.asarray(a[ids]) for a in problem.inputs)
    if t not in cfg.steps:
      params, state = run.plain_step(params, state, *batch)
      bar.update()
      continue
    key, sub = jax.random.split(key)
    gt = _ground_truth(problem, run.inner, params, state, batch, sub, cfg)
    shap = gt["shapley"]
    params, state = run.shapley_step(params, state, jnp.asarray(ids, jnp.int32),
                                     *batch)
    values = np.asarray(oxs.step_values(state), np.float64)
    steps_out.append(dict(
        step=t, truth=gt["method"], permutations=gt["permutations"],
        shapley_se_over_spread=(float(gt["se"].max() / shap.std())
                                if shap.std() else 0.0),
        whole_effect=gt["whole"],
        estimators=step_report(values, shap, gt["loo"], gt["whole"]),
        shapley=shap.tolist(), leave_one_out=gt["loo"].tolist(),
        values=values.tolist()))
    bar.update(state)
  bar.close()
  oxs.check(state)
  accumulated = (run_accumulation(problem, cfg, progress)
                 if cfg.accumulate_epochs else None)
  return dict(model=problem.name, description=problem.description,
              num_examples=n, steps=steps_out, accumulated=accumulated,
              seconds=time.perf_counter() - t0)


def run_accumulation(problem: Problem, cfg: Config,
                     progress: bool = False) -> dict:
  """A whole run with Shapley values of the real step at every step.

  Trains ``problem`` from its initialisation on ``cfg.accumulate_examples``
  training examples (a seeded random subset) for ``cfg.accumulate_epochs``
  epochs, each a fresh shuffle cut into batches of ``B`` (a remainder is
  dropped). At every step the ground truth of the real step is computed
  (:func:`_ground_truth`) and summed per example; at the end the accumulated
  values of every estimator (``oxs.values``) are compared with those sums.

  Returns:
    dict with ``examples``, ``epochs``, ``steps``, ``seconds`` and, per
    estimator, Pearson and Spearman R of the accumulated values against the
    summed per-step Shapley values (``truth``: ``"exact"``, or
    ``"monte_carlo"`` where a step's batch was above 12), the slope of the least-squares line of
    the accumulated values on those sums (``slope``, 1 = the right scale),
    and Pearson R without step 1 (Adam's sign step;
    ``pearson_from_step_2``); ``exact_steps``: how many steps the default
    credited by exact Shapley values of the real update.
  """
  t0 = time.perf_counter()
  b = cfg.batch_size
  rng = np.random.default_rng(cfg.seed + 1)
  subset = np.sort(rng.choice(problem.num_examples, cfg.accumulate_examples,
                              replace=False))
  n = len(subset)
  inputs = tuple(a[subset] for a in problem.inputs)
  run = _Trainer(problem, cfg, n)
  params, state = problem.params, run.tx.init(problem.params)
  key = jax.random.key(cfg.seed + 1)
  per_epoch = n // b
  total = per_epoch * cfg.accumulate_epochs
  acc_truth = np.zeros(n)
  bar = oxs.Progress(total=total, batch_size=b, enabled=progress,
                     desc=f"{problem.name} whole run")
  t, methods = 0, set()
  for _ in range(cfg.accumulate_epochs):
    order = rng.permutation(n)
    for k in range(per_epoch):
      ids = order[k * b:(k + 1) * b]
      batch = tuple(jnp.asarray(a[ids]) for a in inputs)
      key, sub = jax.random.split(key)
      gt = _ground_truth(problem, run.inner, params, state, batch, sub, cfg)
      acc_truth[ids] += gt["shapley"]
      methods.add(gt["method"])
      params, state = run.shapley_step(params, state,
                                       jnp.asarray(ids, jnp.int32), *batch)
      t += 1
      if t == 1:
        first_truth = acc_truth.copy()
        first_values = np.asarray(oxs.values(state), np.float64)
      bar.update(state)
  bar.close()
  oxs.check(state)
  acc_values = np.asarray(oxs.values(state), np.float64)
  later_truth, later_values = acc_truth - first_truth, acc_values - first_values
  out = dict(examples=n, epochs=cfg.accumulate_epochs, steps=t,
             exact_steps=int(state.exact_steps),
             truth="exact" if methods == {"exact"} else "monte_carlo",
             seconds=time.perf_counter() - t0)
  columns = {estimator_name(m, e): acc_values[:, j]
             for j, (m, e) in enumerate(ESTIMATORS)}
  later_columns = {estimator_name(m, e): later_values[:, j]
                   for j, (m, e) in enumerate(ESTIMATORS)}
  for name, v in columns.items():
    out[name] = dict(pearson=_pearson(v, acc_truth),
                     spearman=_spearman(v, acc_truth),
                     slope=_slope(v, acc_truth),
                     pearson_from_step_2=_pearson(later_columns[name],
                                                  later_truth))
  return out


def _truth_words(acc: dict) -> str:
  """How the whole run's per-step truth was computed, in words."""
  return ("exact" if acc.get("truth", "exact") == "exact"
          else "Monte-Carlo (permutations)")


def run_fidelity(cfg: Config = Config(), out_dir: str | None = "runs/fidelity",
                 progress: bool = False, verbose: bool = True) -> dict:
  """Runs every model of ``cfg``; writes ``fidelity.json``, ``table.md`` and
  ``fidelity.png`` to ``out_dir`` (unless ``None``) and returns the report."""
  report = dict(config=dataclasses.asdict(cfg), jax=jax.__version__,
                estimators=[estimator_name(m, e) for m, e in ESTIMATORS],
                models=[])
  for name in cfg.models:
    problem = make_problem(name, cfg.seed, cfg.val_size)
    result = run_model(problem, cfg, progress=progress)
    report["models"].append(result)
    if verbose:
      print(format_model(result))
  if out_dir is not None:
    reports.write(out_dir, "fidelity", report, format_markdown(report))
    plot(report, os.path.join(out_dir, "fidelity.png"))
  return report


def _cell(x: float) -> str:
  if x != x:                                   # NaN
    return "-"
  if abs(x) >= 0.9995:
    return f"{x:.5f}"
  if abs(x) >= 0.99:
    return f"{x:.4f}"
  return f"{x:.3f}"


def format_model(result: dict) -> str:
  """Plain-text table: Pearson R per estimator (rows) and step (columns)."""
  steps = result["steps"]
  head = f"{'':24s}" + "".join(f"{'t=' + str(s['step']):>9s}" for s in steps)
  lines = [f"{result['model']}: {result['description']} "
           f"({result['seconds']:.0f} s)",
           "Pearson R against Shapley (leave-one-out for * rows); "
           "slope against the same truth in brackets at the last step", head]
  for m, e in ESTIMATORS:
    name = estimator_name(m, e)
    loo = (m, e) in LOO_ESTIMATORS
    key = "pearson_loo" if loo else "pearson_shapley"
    cells = "".join(f"{_cell(s['estimators'][name][key]):>9s}" for s in steps)
    slope = steps[-1]["estimators"][name]["slope_loo" if loo else "slope_shapley"]
    lines.append(f"{name + (' *' if loo else ''):24s}{cells}  [{slope:.3f}]")
  truths = ", ".join(
      f"t={s['step']}: {s['truth']}"
      + (f" ({s['permutations']} perms, se/spread {s['shapley_se_over_spread']:.3f})"
         if s["truth"] != "exact" else "") for s in steps)
  lines.append(f"ground truth: {truths}")
  acc = result["accumulated"]
  if acc:
    pick = [estimator_name(m, e) for m, e in (
        DEFAULT, ("secant", "midpoint"), ("fixed_state", "start"),
        ("coalitions", "midpoint"), ("sgd", "start"))]
    best = ", ".join(f"{name} {acc[name]['pearson']:.4f} "
                     f"[{acc[name]['slope']:.3f}]" for name in pick)
    lines.append(f"whole run ({acc['examples']} examples, {acc['epochs']} "
                 f"epochs, {acc['steps']} steps, {acc['exact_steps']} of them "
                 f"exact for the default): accumulated values, Pearson R "
                 f"[slope] vs summed {_truth_words(acc)} per-step Shapley: "
                 f"{best}")
  return "\n".join(lines) + "\n"


def format_markdown(report: dict) -> str:
  """Markdown tables of the report (the ones in docs/fidelity.md)."""
  cfg = report["config"]
  out = [f"Adam lr {cfg['learning_rate']:g} (b1 {cfg['b1']}, b2 {cfg['b2']}), "
         f"B = {cfg['batch_size']}, seed {cfg['seed']}, weight decay "
         f"{cfg['weight_decay']}, clip {cfg['clip']}; jax {report['jax']}.\n"]
  for res in report["models"]:
    steps = res["steps"]
    out.append(f"\n### {res['model']}: {res['description']}\n")
    for kind in ("pearson", "spearman"):
      out.append(f"\n{kind.capitalize()} R against exact Shapley (leave-one-out "
                 "for the rows so marked); slope of the values on that truth "
                 "at the last step:\n")
      out.append("| estimator | " + " | ".join(f"t={s['step']}" for s in steps)
                 + " | slope (last) |")
      out.append("|---" * (len(steps) + 2) + "|")
      for m, e in ESTIMATORS:
        name = estimator_name(m, e)
        loo = (m, e) in LOO_ESTIMATORS
        key = f"{kind}_loo" if loo else f"{kind}_shapley"
        cells = " | ".join(_cell(s["estimators"][name][key]) for s in steps)
        slope = steps[-1]["estimators"][name]["slope_loo" if loo else "slope_shapley"]
        label = f"{name} vs leave-one-out" if loo else name
        out.append(f"| {label} | {cells} | {slope:.3f} |")
    out.append("\nGround truth and efficiency per step:\n")
    out.append("| | " + " | ".join(f"t={s['step']}" for s in steps) + " |")
    out.append("|---" * (len(steps) + 1) + "|")
    out.append("| Shapley truth | " + " | ".join(
        s["truth"] if s["truth"] == "exact" else
        f"MC {s['permutations']}, se/spread {s['shapley_se_over_spread']:.3f}"
        for s in steps) + " |")
    out.append("| U(B) - U(empty) | " + " | ".join(
        f"{s['whole_effect']:.3g}" for s in steps) + " |")
    for name in ("auto@midpoint", "secant@midpoint"):
      out.append(f"| efficiency gap, {name} | " + " | ".join(
          f"{s['estimators'][name]['efficiency_gap']:+.3f}"
          for s in steps) + " |")
    acc = res["accumulated"]
    if acc:
      out.append(f"\nWhole run ({acc['examples']} training examples, "
                 f"{acc['epochs']} epochs, {acc['steps']} steps, "
                 f"{_truth_words(acc)} truth at every step; the default "
                 f"credited {acc['exact_steps']} of them exactly): accumulated "
                 f"values against the summed {_truth_words(acc)} per-step "
                 f"Shapley values:\n")
      out.append("| estimator | Pearson R | slope | Spearman R | Pearson R, "
                 "without step 1 |")
      out.append("|---|---|---|---|---|")
      for name in [estimator_name(m, e) for m, e in ESTIMATORS]:
        a = acc[name]
        out.append(f"| {name} | {_cell(a['pearson'])} | {a['slope']:.3f} | "
                   f"{_cell(a['spearman'])} | "
                   f"{_cell(a['pearson_from_step_2'])} |")
  return "\n".join(out) + "\n"


PLOTTED = (DEFAULT, ("sgd", "start"), ("fixed_state", "start"), ("fixed_state", "midpoint"),
           ("secant", "midpoint"), ("linearized", "end"), ("removal", "end"),
           ("coalitions", "midpoint"))


def plot(report: dict, path: str) -> None:
  """``1 - R`` against step (log-log, better is up), one panel per model, one
  line per estimator."""
  plt = reports.pyplot()
  results = report["models"]
  fig, axes = plt.subplots(1, len(results), figsize=(5 * len(results), 4),
                           squeeze=False)
  for ax, res in zip(axes[0], results):
    steps = [s["step"] for s in res["steps"]]
    for m, e in PLOTTED:
      name = estimator_name(m, e)
      loo = (m, e) in LOO_ESTIMATORS
      r = [s["estimators"][name]["pearson_loo" if loo else "pearson_shapley"]
           for s in res["steps"]]
      gap = np.clip(1.0 - np.asarray(r, np.float64), 1e-6, 2.0)
      ax.plot(steps, gap, marker="o", label=name + (" (vs LOO)" if loo else ""))
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_ylim(2.0, 1e-6)                       # better is up
    ax.axhline(1e-3, color="gray", lw=0.5, ls="--")
    ax.set_xlabel("step")
    ax.set_ylabel("1 - Pearson R vs ground truth (R = 0.999 dashed)")
    ax.set_title(res["model"])
  axes[0][0].legend(fontsize=7, loc="lower right")
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)
