"""Throughput benchmark: the attributed step against the plain optax step.

``optax-shapley bench`` times, in one process, interleaved, after warm-up and
with ``block_until_ready``:

- ``plain``: ``jax.grad`` of the mean loss and ``optax.adam``'s
  update, jitted;
- ``exact`` / ``auto`` / ``ghost``: the same step through
  ``oxs.value_grad_and_factors`` and ``oxs.adam(..., contraction=mode)``
  (default estimator, secant at the midpoint; ``ghost`` forces the ghost
  rule on every Dense call, which its spot check may still send to the
  exact rule at a given step; ``bf16`` is ``auto`` with the factors stored
  in bfloat16, ``value_grad_and_factors(..., factor_dtype=jnp.bfloat16)``);
- ``naive``: the per-example-gradient baseline: ``jax.vmap(jax.grad)`` of the
  single-example loss, the same validation gradient and secant direction,
  and one dot product per example.

Each mode first takes ``train_steps`` steps on random training batches, so
that the timed step sees a trained optimizer state.  It reports the median step time, the throughput ratio ``plain / mode`` next
to its limit ``B / (B + V)`` (the validation pass is unavoidable), the peak
memory ratio from XLA's memory analysis of the compiled step (arguments,
outputs and temporaries), compile time, and the speed-up over ``naive``.
"""

from __future__ import annotations

import dataclasses
import statistics
import time
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

import optax_shapley as oxs
from optax_shapley import estimators, metrics
from optax_shapley.experiments import problems
from optax_shapley.experiments import reports

MODELS = problems.MODELS
MODES = ("plain", "exact", "auto", "ghost", "bf16", "naive")


@dataclasses.dataclass(frozen=True)
class BenchConfig:
  """Settings of ``optax-shapley bench``.

  Attributes:
    models: subset of :data:`MODELS`.
    val_sizes: validation sizes ``V`` to time.
    modes: subset of :data:`MODES`.
    batch_size: ``B`` for the MLP and CNN; ``text_batch_size`` and
      ``seq_len`` for the transformer.
    hidden: MLP hidden width.
    rounds: timed rounds per mode (interleaved, random order); the median
      is reported.
    repeat: consecutive calls per timing (after one untimed call of the same
      mode), averaged.
    seed: seed of initialisation and data.
    train_steps: steps each mode takes (on random training batches) before
      timing, so the optimizer state is a trained one: Adam's first steps are
      where the ghost rule's spot check falls back to the exact rule.
  """
  models: tuple[str, ...] = MODELS
  val_sizes: tuple[int, ...] = (4, 16, 64)
  modes: tuple[str, ...] = MODES
  batch_size: int = 256
  text_batch_size: int = 64
  seq_len: int = 128
  hidden: int = 256
  rounds: int = 20
  repeat: int = 3
  seed: int = 0
  train_steps: int = 30


@dataclasses.dataclass(frozen=True)
class Setup:
  """A bundled problem and the batch every mode is timed on.

  Attributes:
    problem: the model, its training arrays and its full validation arrays
      (sliced to each ``V``).
    batch: the timed batch (``B`` rows of ``problem.inputs``).
  """
  problem: problems.Problem
  batch: tuple

  @property
  def batch_size(self) -> int:
    return jax.tree.leaves(self.batch)[0].shape[0]


def setup(name: str, cfg: BenchConfig) -> Setup:
  """The bench's problem ``name`` (larger than the fidelity report's) and a
  random batch of it.

  Raises:
    ValueError: an unknown name.
  """
  if name not in MODELS:
    raise ValueError(f"unknown model {name!r}; choose from {MODELS}")
  text = name == "transformer"
  sizes = problems.Sizes(
      mlp_hidden=(cfg.hidden, cfg.hidden), cnn_features=(16, 32), d_model=64,
      num_heads=4, seq_len=cfg.seq_len, val_seq_len=None, max_len=cfg.seq_len,
      positions="embed")
  problem = problems.make(name, cfg.seed, max(cfg.val_sizes), sizes)
  b = cfg.text_batch_size if text else cfg.batch_size
  n = problem.num_examples
  ids = np.random.default_rng(cfg.seed).choice(n, b, replace=b > n)
  return Setup(problem, tuple(jnp.asarray(x[ids]) for x in problem.inputs))


def _steps(s: Setup, v: int, modes, lr=1e-3) -> dict[str, tuple[Callable, tuple]]:
  """Jittable step functions ``(params, opt_state, *batch) -> (params,
  opt_state)`` and their initial ``(params, opt_state)``."""
  prob = s.problem.with_val_size(v)
  pel, params, b = prob.per_example_loss, prob.params, s.batch_size
  val_loss = prob.val_loss
  adam = optax.adam(lr)
  out = {}
  if "plain" in modes:
    out["plain"] = (plain_step(pel, adam), (params, adam.init(params)))
  ids = jnp.arange(b, dtype=jnp.int32)
  for mode in ("exact", "auto", "ghost", "bf16"):
    if mode not in modes:
      continue
    tx = oxs.adam(lr, num_examples=b, batch_size=b,
                  contraction="auto" if mode == "bf16" else mode)
    capture = oxs.value_grad_and_factors(
        pel, factor_dtype=jnp.bfloat16 if mode == "bf16" else None)

    def attributed(p, st, *batch, tx=tx, capture=capture):
      _, g, f = capture(p, *batch)
      u, st = tx.update(g, st, p, factors=f, example_ids=ids, val_loss=val_loss)
      return optax.apply_updates(p, u), st
    out[mode] = (attributed, (params, tx.init(params)))
  if "naive" in modes:
    def naive(p, st, *batch):
      st, values = st
      def one(*ex):
        return jax.grad(lambda q: pel(q, *(x[None] for x in ex))[0])(p)
      pe = jax.vmap(one)(*batch)
      g = jax.tree.map(lambda x: x.mean(0), pe)
      update_of = lambda gg: adam.update(gg, st, p)[0]
      u_g, new_st = adam.update(g, st, p)
      u_0 = update_of(jax.tree.map(jnp.zeros_like, g))
      mid = estimators.MIDPOINT.point(p, u_g, u_0)
      vg = jax.grad(lambda q: jnp.mean(val_loss(q)))(mid)
      d = metrics.secant_direction(update_of, g, u_g, u_0, vg)
      phi = sum(jnp.tensordot(x, dd, axes=dd.ndim) / b
                for x, dd in zip(jax.tree.leaves(pe), jax.tree.leaves(d)))
      return optax.apply_updates(p, u_g), (new_st, values + phi)
    out["naive"] = (naive, (params, (adam.init(params), jnp.zeros(b))))
  return out


def _memory(compiled) -> int | None:
  try:
    m = compiled.memory_analysis()
  except Exception:  # pylint: disable=broad-except
    return None
  if m is None:
    return None
  return int(m.argument_size_in_bytes + m.output_size_in_bytes
             + m.temp_size_in_bytes)


def plain_step(per_example_loss: Callable, adam) -> Callable:
  """``(params, opt_state, *batch) -> (params, opt_state)``: the plain
  step, ``jax.grad`` of the mean loss plus the ``adam`` update."""
  def step(p, st, *batch):
    g = jax.grad(lambda q: jnp.mean(per_example_loss(q, *batch)))(p)
    u, st = adam.update(g, st, p)
    return optax.apply_updates(p, u), st
  return step


def warm_adam_state(s: Setup, adam, steps: int = 30, seed: int = 0):
  """``(params, adam_state)`` after ``steps`` plain steps of ``adam`` on
  random training batches of the setup's batch size."""
  prob = s.problem
  step = jax.jit(plain_step(prob.per_example_loss, adam))
  p, st = prob.params, adam.init(prob.params)
  for batch in _random_batches(s, steps, seed):
    p, st = step(p, st, *batch)
  return p, st


def _random_batches(s: Setup, count: int, seed: int) -> list[tuple]:
  """``count`` random training batches of the setup's batch size."""
  b, n, inputs = s.batch_size, s.problem.num_examples, s.problem.inputs
  rng = np.random.default_rng(seed)
  return [tuple(jnp.asarray(x[ids]) for x in inputs)
          for ids in (rng.choice(n, b, replace=b > n) for _ in range(count))]


def time_interleaved(compiled: dict[str, Callable], args: dict[str, tuple],
                     rounds: int, repeat: int, seed: int = 0) -> dict[str, float]:
  """Median seconds per call of each ``compiled[m](*args[m])``.

  Rounds run the functions in a fresh random order each; every timing is
  one untimed call followed by ``repeat`` timed calls (averaged), with
  ``block_until_ready``.  The untimed call matters: without it the function
  after ``naive`` (which streams B per-example gradients) starts on caches
  that ``naive`` has emptied, and looks slower than it is.
  """
  times = {m: [] for m in compiled}
  order = np.random.default_rng(seed)
  for _ in range(rounds):
    for m in order.permutation(list(compiled)):
      c = compiled[m]
      jax.block_until_ready(c(*args[m]))
      t0 = time.perf_counter()
      for _ in range(repeat):
        out = c(*args[m])
      jax.block_until_ready(out)
      times[m].append((time.perf_counter() - t0) / repeat)
  return {m: statistics.median(t) for m, t in times.items()}


def bench_one(s: Setup, v: int, cfg: BenchConfig) -> dict:
  """Times every mode of ``cfg`` for one model and validation size."""
  steps = _steps(s, v, cfg.modes)
  warm = _random_batches(s, cfg.train_steps, cfg.seed)
  compiled, args, compile_s, memory = {}, {}, {}, {}
  for mode, (fn, init) in steps.items():
    t0 = time.perf_counter()
    c = jax.jit(fn, donate_argnums=()).lower(*init, *s.batch).compile()
    compile_s[mode] = time.perf_counter() - t0
    memory[mode] = _memory(c)
    for batch in warm:          # a state trained on random batches
      init = c(*init, *batch)
    compiled[mode], args[mode] = c, (*init, *s.batch)
    for _ in range(2):                                   # warm-up
      jax.block_until_ready(c(*args[mode]))
  med = time_interleaved(compiled, args, cfg.rounds, cfg.repeat, cfg.seed)
  rows = {}
  for m in compiled:
    rows[m] = dict(
        median_ms=1e3 * med[m], compile_s=compile_s[m],
        throughput_vs_plain=med["plain"] / med[m] if "plain" in med else None,
        memory_vs_plain=(memory[m] / memory["plain"]
                         if memory.get(m) and memory.get("plain") else None),
        speedup_vs_naive=med["naive"] / med[m] if "naive" in med else None)
  b = s.batch_size
  return dict(model=s.problem.name, description=f"{s.problem.description}, B={b}",
              batch_size=b, val_size=v, limit=b / (b + v), modes=rows)


def run_bench(cfg: BenchConfig = BenchConfig(), out_dir: str | None = "runs/bench",
              verbose: bool = True) -> dict:
  """Runs the benchmark; writes ``bench.json`` and ``table.md``."""
  report = dict(config=dataclasses.asdict(cfg), jax=jax.__version__,
                backend=jax.default_backend(),
                device=str(jax.devices()[0].device_kind), results=[])
  for name in cfg.models:
    s = setup(name, cfg)
    for v in cfg.val_sizes:
      r = bench_one(s, v, cfg)
      report["results"].append(r)
      if verbose:
        print(format_result(r), flush=True)
  if out_dir is not None:
    reports.write(out_dir, "bench", report, format_markdown(report))
  return report


def _fmt(x, spec):
  return "-" if x is None else format(x, spec)


def format_result(r: dict) -> str:
  lines = [f"{r['model']} ({r['description']}), V={r['val_size']}: limit "
           f"B/(B+V) = {r['limit']:.3f}"]
  for m, row in r["modes"].items():
    lines.append(
        f"  {m:6s} {row['median_ms']:9.2f} ms  throughput "
        f"{_fmt(row['throughput_vs_plain'], '.3f')}  memory "
        f"{_fmt(row['memory_vs_plain'], '.2f')}x  compile "
        f"{row['compile_s']:.1f} s  vs naive {_fmt(row['speedup_vs_naive'], '.1f')}x")
  return "\n".join(lines)


def format_markdown(report: dict) -> str:
  out = [f"{report['backend']} ({report['device']}), jax {report['jax']}; "
         "median of interleaved timed steps after warm-up.\n",
         "| model | V | B/(B+V) | mode | ms/step | throughput vs plain | "
         "memory vs plain | compile s | speed-up vs naive |",
         "|---|---|---|---|---|---|---|---|---|"]
  for r in report["results"]:
    for m, row in r["modes"].items():
      out.append(
          f"| {r['model']} | {r['val_size']} | {r['limit']:.3f} | {m} | "
          f"{row['median_ms']:.2f} | {_fmt(row['throughput_vs_plain'], '.3f')} | "
          f"{_fmt(row['memory_vs_plain'], '.2f')} | {row['compile_s']:.1f} | "
          f"{_fmt(row['speedup_vs_naive'], '.1f')} |")
  return "\n".join(out) + "\n"
