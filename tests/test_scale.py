"""Scale: every data-parallel mode on 8 simulated CPU devices gives the
single-device values; sharded and table-free values; O(B) communication."""

import re
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

import optax_shapley as oxs
import toy

DEVICES, B, N, D_IN, V, CLASSES, STEPS = 8, 16, 40, 5, 7, 3, 3


_P = toy.problem(toy.DenseGain(CLASSES), 2, (STEPS, B, D_IN), V, CLASSES)
X, Y, XV, YV, PARAMS = _P.X, _P.Y, _P.XV, _P.YV, _P.PARAMS
per_example_loss, val_loss = _P.per_example_loss, _P.val_loss
IDS = jnp.asarray(np.stack([np.random.default_rng(s).permutation(N)[:B]
                            for s in range(STEPS)]), jnp.int32)


def make_tx(axis_name=None, **kw):
  kw.setdefault("num_examples", N)
  return oxs.adam(1e-2, batch_size=B, axis_name=axis_name, **kw)


def mesh(kind=AxisType.Auto):
  return jax.make_mesh((DEVICES,), ("d",), axis_types=(kind,))


def plain_step(tx):
  def step(p, st, x, y, ids):
    _, g, f = oxs.value_grad_and_factors(per_example_loss)(p, x, y)
    u, st = tx.update(g, st, p, factors=f, example_ids=ids, val_loss=val_loss)
    return optax.apply_updates(p, u), st
  return step


def shard_map_step(tx, m, state_specs=P()):
  @jax.jit
  @partial(jax.shard_map, mesh=m,
           in_specs=(P(), state_specs, P("d"), P("d"), P("d")),
           out_specs=(P(), state_specs))
  def step(p, st, x, y, ids):
    _, g, f = oxs.value_grad_and_factors(per_example_loss)(p, x, y)
    g = jax.tree.map(lambda a: a / jax.lax.psum(1, "d"), g)   # see docs
    u, st = tx.update(g, st, p, factors=f, example_ids=ids, val_loss=val_loss)
    return optax.apply_updates(p, u), st
  return step


def run(step, st, place=lambda *a: a):
  p, out = PARAMS, []
  for t in range(STEPS):
    p, st = step(p, st, *place(X[t], Y[t], IDS[t]))
    out.append(np.asarray(oxs.step_values(st)))
  oxs.check(st)
  return np.asarray(oxs.values(st)), out, st


@pytest.fixture(scope="module")
def reference():
  tx = make_tx()
  return run(jax.jit(plain_step(tx)), tx.init(PARAMS))


def on_data_axis(m):
  return lambda *a: tuple(jax.device_put(x, NamedSharding(m, P("d")))
                          for x in a)


def run_mode(mode):
  if mode == "pmap":
    tx = make_tx("d")

    @partial(jax.pmap, axis_name="d")
    def step(p, st, x, y, ids):
      _, g, f = oxs.value_grad_and_factors(per_example_loss)(p, x, y)
      g = jax.lax.pmean(g, "d")
      u, st = tx.update(g, st, p, factors=f, example_ids=ids,
                        val_loss=val_loss)
      return optax.apply_updates(p, u), st

    rep = lambda t: jax.tree.map(lambda a: jnp.stack([a] * DEVICES), t)
    split = lambda a: a.reshape((DEVICES, -1) + a.shape[1:])
    p, st, out = rep(PARAMS), rep(tx.init(PARAMS)), []
    for t in range(STEPS):
      p, st = step(p, st, split(X[t]), split(Y[t]), split(IDS[t]))
      out.append(np.asarray(oxs.step_values(st))[0])
    return np.asarray(oxs.values(st))[0], out
  if mode.startswith("shard_map"):
    kind = AxisType.Explicit if mode.endswith("explicit") else AxisType.Auto
    m = mesh(kind)
    tx = make_tx("d")
    with jax.set_mesh(m):
      return run(shard_map_step(tx, m), tx.init(PARAMS), on_data_axis(m))[:2]
  kind = AxisType.Explicit if mode == "jit_explicit" else AxisType.Auto
  m = mesh(kind)
  tx = make_tx()                           # no axis_name: the compiler shards
  with jax.set_mesh(m):
    return run(jax.jit(plain_step(tx)), tx.init(PARAMS), on_data_axis(m))[:2]


STEP1_REL, LATER_REL = 2e-5, 2e-6     # see tests/test_data_parallel.py


def assert_matches(reference, values, step_values):
  ref_values, ref_steps, _ = reference
  scale = np.abs(ref_values).max()
  for t, (sv, ref) in enumerate(zip(step_values, ref_steps)):
    np.testing.assert_allclose(sv, ref, rtol=0, atol=(
        STEP1_REL if t == 0 else LATER_REL) * scale, err_msg=f"step {t + 1}")
  np.testing.assert_allclose(values, ref_values, rtol=0,
                             atol=(STEP1_REL + 2 * LATER_REL) * scale)


@pytest.mark.parametrize("mode", ["shard_map", "shard_map_explicit",
                                  "jit_auto", "jit_explicit", "pmap"])
def test_every_data_parallel_mode_matches_one_device(reference, mode):
  assert jax.device_count() >= DEVICES
  values, step_values = run_mode(mode)
  assert values.shape == (N,)
  assert_matches(reference, values, step_values)


@pytest.mark.parametrize("mode", ["jit_explicit", "shard_map", "pmap"])
def test_exact_steps_one_example_at_a_time_match_one_device(
    reference, mode, monkeypatch):
  """The exact steps of ``auto`` (B = 16: per-coordinate games) forming one
  example's gradient at a time, against the one-device run: a chunk that
  does not split evenly over the devices (an explicit-sharding mesh), and
  per-device chunks whose sums cross devices (shard_map, pmap)."""
  from optax_shapley import estimators
  monkeypatch.setattr(estimators, "PREFIX_CHUNK_BYTES", 1)
  values, step_values = run_mode(mode)
  assert_matches(reference, values, step_values)


def test_sharded_table_under_shard_map(reference):
  m = mesh()
  tx = make_tx("d", table="sharded")
  st = tx.init(PARAMS)
  specs = oxs.state_partition_specs(st, "d")
  st = jax.device_put(st, jax.tree.map(lambda s: NamedSharding(m, s), specs))
  values, step_values, st = run(shard_map_step(tx, m, specs), st)
  # Each device holds N / 8 rows of the table.
  shards = oxs.values(st).addressable_shards
  assert len(shards) == DEVICES and all(s.data.shape == (N // DEVICES,)
                                        for s in shards)
  assert_matches(reference, values, step_values)


def test_sharded_table_needs_divisible_num_examples():
  m = mesh()
  tx = make_tx("d", table="sharded", num_examples=N + 4)
  st = tx.init(PARAMS)
  st = st._replace(values=st.values[:N])      # what a caller could pass
  specs = oxs.state_partition_specs(st, "d")
  with pytest.raises(ValueError, match="num_examples is 44"):
    run(shard_map_step(tx, m, specs), st)


def test_sharded_table_under_jit(reference):
  m = mesh()
  tx = make_tx(table="sharded")
  st = tx.init(PARAMS)
  st = st._replace(values=jax.device_put(st.values, NamedSharding(m, P("d"))))
  with jax.set_mesh(m):
    values, step_values, st = run(jax.jit(plain_step(tx)), st, on_data_axis(m))
  assert_matches(reference, values, step_values)


def _collective_shapes(hlo: str):
  ops = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all",
         "collective-permute")
  shapes = []
  for line in hlo.splitlines():
    for op in ops:
      m = re.search(rf"=\s*(.*?)\s{op}(?:-start)?\(", line)
      if m:          # the result type(s) between "=" and the op name
        shapes += [tuple(int(d) for d in dims.split(",") if d)
                   for dims in re.findall(r"\[([\d,]*)\]", m.group(1))]
  return shapes


@pytest.mark.parametrize("table", ["replicated", "sharded"])
def test_communication_is_order_batch_not_num_examples(table):
  """Collectives in the compiled step move O(B) values, never O(N): with
  N = 100003 (no other array has that size) no collective's shape has a
  dimension >= N / 8."""
  n = 100_003 if table == "replicated" else 100_000
  m = mesh()
  tx = make_tx("d", num_examples=n, table=table)
  st = tx.init(PARAMS)
  specs = oxs.state_partition_specs(st, "d") if table == "sharded" else P()
  step = shard_map_step(tx, m, specs)
  hlo = step.lower(PARAMS, st, X[0], Y[0], IDS[0]).compile().as_text()
  shapes = _collective_shapes(hlo)
  assert shapes, "expected some collectives (gradient sum, ids, values)"
  largest = max(max(s, default=1) for s in shapes)
  assert largest < n // DEVICES, (largest, shapes)


def test_table_free_values_for_1e8_examples(tmp_path, reference):
  """table="none": no N-sized array anywhere (state or compiled step), and
  the streamed records reduce to the single-device values."""
  n = 10 ** 8
  tx = make_tx(table="none", num_examples=n)
  st = tx.init(PARAMS)
  assert st.values.shape == (0,)
  step = jax.jit(plain_step(tx))
  mem = step.lower(PARAMS, st, X[0], Y[0], IDS[0]).compile().memory_analysis()
  if mem is not None:
    total = (mem.argument_size_in_bytes + mem.output_size_in_bytes
             + mem.temp_size_in_bytes)
    assert total < n                     # far below 4 bytes per example
  offset = n - N                         # ids near the top of the range
  p = PARAMS
  with oxs.ValueWriter(str(tmp_path / "vals"), steps_per_file=2) as w:
    for t in range(STEPS):
      p, st = step(p, st, X[t], Y[t], IDS[t] + offset)
      w.write(t, IDS[t] + offset, oxs.step_values(st))
  ids, vals = oxs.reduce_values(str(tmp_path / "vals"))
  assert ids.min() >= offset and ids.max() < n
  ref_values = reference[0]
  np.testing.assert_allclose(vals, ref_values[ids - offset], rtol=1e-6,
                             atol=1e-9)
  with pytest.raises(ValueError, match="keeps no values table"):
    oxs.values(st)


def test_streamed_records_are_idempotent_on_resume(tmp_path):
  d = str(tmp_path / "vals")
  rng = np.random.default_rng(0)
  recs = [(t, rng.permutation(10)[:4], rng.normal(size=4)) for t in range(6)]
  with oxs.ValueWriter(d, steps_per_file=4) as w:    # crashes after step 4
    for t, i, v in recs[:5]:
      w.write(t, i, v)
  with oxs.ValueWriter(d, steps_per_file=4) as w:    # resumed from step 3
    for t, i, v in recs[3:]:
      w.write(t, i, v)
  dense = oxs.reduce_values(d, num_examples=10)
  expected = np.zeros(10)
  for _, i, v in recs:
    np.add.at(expected, i, v)
  np.testing.assert_allclose(dense, expected, rtol=1e-6)
  with pytest.raises(ValueError, match="out of range"):
    oxs.reduce_values(d, num_examples=5)


def test_progress_logs_throughput_and_running_mean(caplog, reference):
  _, _, state = reference
  with caplog.at_level("INFO", logger="optax_shapley"):
    with oxs.Progress(total=4, batch_size=B, log_every=2, interactive=False,
                      desc="job") as bar:
      for _ in range(4):
        bar.update(state)
  lines = [r.getMessage() for r in caplog.records]
  assert len(lines) == 2 and lines[1].startswith("job: step 4/4")
  mean = float(np.mean(np.asarray(oxs.step_values(state))))
  assert "examples/s" in lines[1] and f"mean value {mean:+.3e}" in lines[1]
  silent = oxs.Progress(total=4, interactive=False, enabled=False)
  silent.update(state)
  assert silent.steps == 0


def test_progress_rate_excludes_the_first_step(caplog, monkeypatch):
  """The first call of a jitted step compiles; the rate starts after it."""
  from optax_shapley import progress
  clock = iter([100.0, 101.0, 102.0])   # 3 updates; the first one compiled
  monkeypatch.setattr(progress.time, "perf_counter", lambda: next(clock))
  with caplog.at_level("INFO", logger="optax_shapley"):
    bar = oxs.Progress(total=3, batch_size=4, log_every=3, interactive=False)
    for _ in range(3):
      bar.update()
  (line,) = [r.getMessage() for r in caplog.records]
  assert "1.0 steps/s" in line and "4 examples/s" in line, line
