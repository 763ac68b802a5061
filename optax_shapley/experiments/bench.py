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
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

import optax_shapley as oxs
from optax_shapley import data, metrics, models
from optax_shapley.experiments import reports

MODELS = ("mlp", "cnn", "transformer")
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


@dataclasses.dataclass
class _Setup:
  name: str
  params: Any
  per_example_loss: Callable
  batch: tuple                 # the timed batch
  train_inputs: tuple          # training arrays, batches drawn for warm-up
  val_inputs: tuple            # full validation arrays; sliced to V
  description: str


def _setup(name: str, cfg: BenchConfig) -> _Setup:
  key = jax.random.key(cfg.seed)
  if name in ("mlp", "cnn"):
    split = data.load_digits_split(seed=cfg.seed, val_size=max(cfg.val_sizes))
    rng = np.random.default_rng(cfg.seed)
    ids = rng.choice(len(split.X_train), cfg.batch_size,
                     replace=cfg.batch_size > len(split.X_train))
    if name == "mlp":
      model = models.MLP(features=(cfg.hidden, cfg.hidden, split.num_classes))
      desc = f"MLP 64-{cfg.hidden}-{cfg.hidden}-10, B={cfg.batch_size}"
    else:
      model = models.CNN(features=(16, 32), num_classes=split.num_classes)
      desc = f"CNN conv16-conv32/2-dense, B={cfg.batch_size}"
    params = model.init(key, split.X_train[:1])["params"]

    def pel(p, x, y):
      return models.cross_entropy(model.apply({"params": p}, x), y)

    return _Setup(name, params, pel,
                  (jnp.asarray(split.X_train[ids]), jnp.asarray(split.y_train[ids])),
                  (split.X_train, split.y_train),
                  (jnp.asarray(split.X_val), jnp.asarray(split.y_val)), desc)
  if name == "transformer":
    split = data.load_text_split(seed=cfg.seed, seq_len=cfg.seq_len,
                                 val_size=max(cfg.val_sizes))
    rng = np.random.default_rng(cfg.seed)
    ids = rng.choice(len(split.tokens_train), cfg.text_batch_size,
                     replace=cfg.text_batch_size > len(split.tokens_train))
    model = models.CharTransformer(vocab_size=split.vocab_size, d_model=64,
                                   num_heads=4, max_len=cfg.seq_len,
                                   positions="embed")
    params = model.init(key, split.tokens_train[:1])["params"]

    def pel(p, tok, tgt):
      return models.token_cross_entropy(model.apply({"params": p}, tok), tgt)

    return _Setup(
        name, params, pel,
        (jnp.asarray(split.tokens_train[ids]), jnp.asarray(split.targets_train[ids])),
        (split.tokens_train, split.targets_train),
        (jnp.asarray(split.tokens_val), jnp.asarray(split.targets_val)),
        f"char transformer d=64, 2 layers, 4 heads, T={cfg.seq_len}, "
        f"B={cfg.text_batch_size}")
  raise ValueError(f"unknown model {name!r}; choose from {MODELS}")


def _steps(s: _Setup, v: int, modes, lr=1e-3) -> dict[str, tuple[Callable, tuple]]:
  """Jittable step functions ``(params, opt_state, *batch) -> (params,
  opt_state)`` and their initial ``(params, opt_state)``."""
  pel = s.per_example_loss
  b = jax.tree.leaves(s.batch)[0].shape[0]
  val = tuple(x[:v] for x in s.val_inputs)
  val_loss = lambda p: pel(p, *val)
  adam = optax.adam(lr)
  out = {}
  if "plain" in modes:
    out["plain"] = (plain_step(pel, adam), (s.params, adam.init(s.params)))
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
    out[mode] = (attributed, (s.params, tx.init(s.params)))
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
      mid = metrics.evaluation_point("midpoint", p, u_g, u_0)
      vg = jax.grad(lambda q: jnp.mean(val_loss(q)))(mid)
      d = metrics.secant_direction(update_of, g, u_g, u_0, vg)
      phi = sum(jnp.tensordot(x, dd, axes=dd.ndim) / b
                for x, dd in zip(jax.tree.leaves(pe), jax.tree.leaves(d)))
      return optax.apply_updates(p, u_g), (new_st, values + phi)
    out["naive"] = (naive, (s.params, (adam.init(s.params), jnp.zeros(b))))
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


def warm_adam_state(s: _Setup, adam, steps: int = 30, seed: int = 0):
  """``(params, adam_state)`` after ``steps`` plain steps of ``adam`` on
  random training batches of the setup's batch size."""
  b = jax.tree.leaves(s.batch)[0].shape[0]
  rng = np.random.default_rng(seed)
  n = len(s.train_inputs[0])
  step = jax.jit(plain_step(s.per_example_loss, adam))
  p, st = s.params, adam.init(s.params)
  for _ in range(steps):
    ids = rng.choice(n, b, replace=b > n)
    p, st = step(p, st, *(jnp.asarray(x[ids]) for x in s.train_inputs))
  return p, st


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


def bench_one(s: _Setup, v: int, cfg: BenchConfig) -> dict:
  """Times every mode of ``cfg`` for one model and validation size."""
  steps = _steps(s, v, cfg.modes)
  b = jax.tree.leaves(s.batch)[0].shape[0]
  rng = np.random.default_rng(cfg.seed)
  n = len(s.train_inputs[0])
  warm = [tuple(jnp.asarray(x[ids]) for x in s.train_inputs)
          for ids in (rng.choice(n, b, replace=b > n)
                      for _ in range(cfg.train_steps))]
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
  return dict(model=s.name, description=s.description, batch_size=b,
              val_size=v, limit=b / (b + v), modes=rows)


def run_bench(cfg: BenchConfig = BenchConfig(), out_dir: str | None = "runs/bench",
              verbose: bool = True) -> dict:
  """Runs the benchmark; writes ``bench.json`` and ``table.md``."""
  report = dict(config=dataclasses.asdict(cfg), jax=jax.__version__,
                backend=jax.default_backend(),
                device=str(jax.devices()[0].device_kind), results=[])
  for name in cfg.models:
    s = _setup(name, cfg)
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
