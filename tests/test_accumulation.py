"""Gradient accumulation: ``with_shapley(optax.MultiSteps(opt, k))`` called
once per micro-batch credits what ``oxs.adam`` credits for one step on the
concatenated batch of the ``k`` micro-batches (the reference: that run)."""

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import PartitionSpec as P

import optax_shapley as oxs
import toy

K, MB, N, LR, STEPS = 3, 4, 40, 1e-2, 4
# A Dense model with a raw parameter: factors and the forward-mode fallback.
PROB = toy.problem(toy.DenseGain(), 0, (N, 5), 6)
CAPTURE = oxs.value_grad_and_factors(PROB.per_example_loss)
# Distinct ids within each accumulated batch, overlapping across steps.
BATCHES = [np.random.default_rng(s).permutation(N)[:K * MB] for s in range(STEPS)]


def make_step(tx):
  @jax.jit
  def step(p, st, x, y, ids):
    _, g, f = CAPTURE(p, x, y)
    u, st = tx.update(g, st, p, factors=f, example_ids=ids,
                      val_loss=PROB.val_loss)
    return optax.apply_updates(p, u), st
  return step


def run(tx, batches, micro: bool):
  """Trains on ``batches`` (each split in ``K`` micro-batches if ``micro``);
  ``(params, state)``."""
  step, p = make_step(tx), PROB.PARAMS
  st = tx.init(p)
  for ids in batches:
    for part in (np.split(ids, K) if micro else [ids]):
      p, st = step(p, st, PROB.X[part], PROB.Y[part], jnp.asarray(part))
  return p, st


def assert_same_run(got, want, rtol=1e-5):
  (p_got, s_got), (p_want, s_want) = got, want
  oxs.check(s_got)
  oxs.check(s_want)
  v_got, v_want = np.asarray(oxs.values(s_got)), np.asarray(oxs.values(s_want))
  scale = np.abs(v_want).max()
  assert scale > 0
  np.testing.assert_allclose(v_got, v_want, rtol=0, atol=rtol * scale)
  for a, b in zip(jax.tree.leaves(p_got), jax.tree.leaves(p_want)):
    np.testing.assert_allclose(a, b, rtol=0, atol=1e-6)
  assert int(s_got.exact_steps) == int(s_want.exact_steps)


@pytest.mark.parametrize("metric", ["auto", "secant", "coalitions"])
def test_micro_batches_are_credited_as_the_concatenated_batch(metric):
  """The default (exact steps at Adam's start, then the secant) and two
  estimators on their own: the same values and parameters, to float32."""
  acc = oxs.with_shapley(
      optax.MultiSteps(optax.adam(LR), every_k_schedule=K), num_examples=N,
      metric=metric, batch_size=K * MB)
  whole = oxs.adam(LR, num_examples=N, metric=metric, batch_size=K * MB)
  got, want = run(acc, BATCHES, True), run(whole, BATCHES, False)
  assert_same_run(got, want)
  assert int(got[1].count) == K * STEPS
  if metric == "auto":
    assert int(got[1].exact_steps) >= 1
  # step_values: the last accumulated step's, aligned with its ids.
  np.testing.assert_allclose(oxs.step_values(got[1]), oxs.step_values(want[1]),
                             atol=1e-5 * np.abs(oxs.values(want[1])).max())


def test_summed_accumulation_is_the_step_of_k_times_the_rate():
  """``use_grad_mean=False``: SGD on the sum of the micro-batch means is SGD
  with ``k`` times the learning rate on the concatenated mean."""
  acc = oxs.with_shapley(
      optax.MultiSteps(optax.sgd(LR), every_k_schedule=K, use_grad_mean=False),
      num_examples=N, metric="secant", batch_size=K * MB)
  whole = oxs.with_shapley(optax.sgd(K * LR), num_examples=N, metric="secant",
                           batch_size=K * MB)
  assert_same_run(run(acc, BATCHES, True), run(whole, BATCHES, False))


def test_a_rejected_micro_batch_is_not_kept():
  """``should_skip_update_fn=optax.skip_not_finite``: a micro-batch with a
  NaN input (NaN gradient) in the middle is dropped by MultiSteps, and so
  by the values: the run equals the one without it."""
  acc = oxs.with_shapley(
      optax.MultiSteps(optax.adam(LR), every_k_schedule=K,
                       should_skip_update_fn=optax.skip_not_finite),
      num_examples=N, batch_size=K * MB)
  step, p = make_step(acc), PROB.PARAMS
  st = acc.init(p)
  parts = np.split(BATCHES[0], K)
  bad = np.setdiff1d(np.arange(N), BATCHES[0])[:MB]
  for part, x in [(parts[0], PROB.X[parts[0]]),
                  (bad, PROB.X[bad].at[0, 0].set(jnp.nan)),
                  (parts[1], PROB.X[parts[1]]), (parts[2], PROB.X[parts[2]])]:
    p, st = step(p, st, x, PROB.Y[part], jnp.asarray(part))
  whole = oxs.adam(LR, num_examples=N, batch_size=K * MB)
  assert_same_run((p, st), run(whole, BATCHES[:1], False))
  assert not np.any(oxs.values(st)[bad])


def test_one_micro_batch_per_step_is_the_plain_run():
  batches = [b[:MB] for b in BATCHES]
  got = run(oxs.with_shapley(optax.MultiSteps(optax.adam(LR), 1),
                             num_examples=N, batch_size=MB), batches, False)
  assert_same_run(got, run(oxs.adam(LR, num_examples=N, batch_size=MB),
                           batches, False))


def test_clipping_before_the_accumulation_is_refused():
  """``chain(clip_by_global_norm, with_shapley(MultiSteps))`` clips each
  micro-batch by its own factor: the step is not credited (clip inside
  the MultiSteps instead)."""
  acc = optax.chain(optax.clip_by_global_norm(1e-3), oxs.with_shapley(
      optax.MultiSteps(optax.adam(LR), every_k_schedule=K), num_examples=N,
      batch_size=K * MB))
  _, st = run(acc, BATCHES[:1], True)
  with pytest.raises(ValueError, match="changed a micro-batch's gradient"):
    oxs.check(st)
  assert not np.any(oxs.values(st))


def test_an_id_repeated_across_micro_batches_skips_the_step():
  acc = oxs.with_shapley(optax.MultiSteps(optax.adam(LR), every_k_schedule=K),
                         num_examples=N, batch_size=K * MB)
  ids = BATCHES[0].copy()
  ids[-1] = ids[0]                  # micro-batch 3 repeats one of micro-batch 1
  _, st = run(acc, [ids], True)
  with pytest.raises(ValueError, match=f"step {K} was not credited: example "
                     f"id {ids[0]} appeared twice"):
    oxs.check(st)
  assert not np.any(oxs.values(st))


def test_a_changing_schedule_is_caught():
  """``every_k_schedule`` read as ``K`` at step 0, then 2: the step taken
  after two micro-batches is not credited, and ``check`` says why."""
  acc = oxs.with_shapley(
      optax.MultiSteps(optax.adam(LR),
                       every_k_schedule=lambda s: jnp.where(s == 0, K, 2)
                       if isinstance(s, jax.Array) else K),
      num_examples=N, batch_size=K * MB)
  _, st = run(acc, BATCHES[:2], True)
  with pytest.raises(ValueError, match="optax.MultiSteps did not step"):
    oxs.check(st)


def test_other_placements_are_refused():
  ms = optax.MultiSteps(optax.adam(LR), every_k_schedule=K)
  for inner in (ms.gradient_transformation(),
                optax.chain(optax.clip(1.0), ms.gradient_transformation())):
    with pytest.raises(ValueError, match="pass the MultiSteps object itself"):
      oxs.with_shapley(inner, num_examples=N).init(PROB.PARAMS)
  with pytest.raises(ValueError, match="constant int every_k_schedule"):
    oxs.with_shapley(optax.MultiSteps(optax.adam(LR), lambda s: 2.0),
                     num_examples=N)
  with pytest.raises(ValueError, match="table='none'"):
    oxs.with_shapley(ms, num_examples=N, table="none")


def test_under_pmap_matches_one_device():
  """Two devices, each with half of every micro-batch; shard_map refused."""
  devices = 2
  tx = oxs.with_shapley(optax.MultiSteps(optax.adam(LR), every_k_schedule=K),
                        num_examples=N, axis_name="d", batch_size=K * MB)

  def body(p, st, x, y, ids):
    _, g, f = CAPTURE(p, x, y)
    u, st = tx.update(jax.lax.pmean(g, "d"), st, p, factors=f,
                      example_ids=ids, val_loss=PROB.val_loss)
    return optax.apply_updates(p, u), st

  step = jax.pmap(body, axis_name="d")
  split = lambda a: a.reshape((devices, -1) + a.shape[1:])
  replicate = lambda t: jax.tree.map(lambda a: jnp.stack([a] * devices), t)
  p, st = replicate(PROB.PARAMS), replicate(tx.init(PROB.PARAMS))
  for ids in BATCHES:
    for part in np.split(ids, K):
      p, st = step(p, st, split(PROB.X[part]), split(PROB.Y[part]),
                   split(jnp.asarray(part)))
  first = lambda t: jax.tree.map(lambda a: a[0], t)
  np.testing.assert_array_equal(oxs.values(st)[0], oxs.values(st)[1])
  whole = oxs.adam(LR, num_examples=N, batch_size=K * MB)
  want = run(whole, BATCHES, False)
  assert_same_run((first(p), first(st)), want, rtol=2e-5)
  # step_values in the order of the concatenated batch's ids.
  np.testing.assert_allclose(oxs.step_values(st)[0], oxs.step_values(want[1]),
                             atol=2e-5 * np.abs(oxs.values(want[1])).max())

  mesh = jax.make_mesh((devices,), ("d",),
                       axis_types=(jax.sharding.AxisType.Auto,))
  sharded = jax.jit(jax.shard_map(
      body, mesh=mesh, in_specs=(P(), P(), P("d"), P("d"), P("d")),
      out_specs=(P(), P())))
  with pytest.raises(ValueError, match="under jax.shard_map is not supported"):
    sharded(PROB.PARAMS, tx.init(PROB.PARAMS), PROB.X[:MB], PROB.Y[:MB],
            jnp.arange(MB))


def test_partition_specs_have_the_state_structure():
  """``state_partition_specs`` is a tree of the state's own structure, with
  or without pending micro-batches: mapping over state and specs together
  (as building an orbax restore target does) works."""
  tx = oxs.with_shapley(optax.MultiSteps(optax.adam(LR), every_k_schedule=K),
                        num_examples=N, batch_size=K * MB)
  st, part = tx.init(PROB.PARAMS), BATCHES[0][:MB]
  for pending in (False, True):
    assert (st.pending is not None) == pending
    specs = oxs.state_partition_specs(st, "d")
    sharded = jax.tree.map(lambda a, s: s == P("d"), st, specs)
    assert sum(jax.tree.leaves(sharded)) == 1 and specs.values == P("d")
    st = make_step(tx)(PROB.PARAMS, st, PROB.X[part], PROB.Y[part],
                       jnp.asarray(part))[1]


def test_buffers_allocated_at_init_let_a_scan_carry_the_state():
  """With ``micro_batch_factors`` (shapes from ``jax.eval_shape``) the state
  has its final structure at ``init``: the micro-batches of a whole run go
  through one ``lax.scan`` and credit what the concatenated run credits; a
  micro-batch of another size is refused."""
  like = jax.eval_shape(CAPTURE, PROB.PARAMS, PROB.X[:MB], PROB.Y[:MB])[2]
  acc = oxs.with_shapley(
      optax.MultiSteps(optax.adam(LR), every_k_schedule=K), num_examples=N,
      batch_size=K * MB, micro_batch_factors=like)
  st0 = acc.init(PROB.PARAMS)
  assert st0.pending is not None

  def body(carry, part):
    p, st = carry
    _, g, f = CAPTURE(p, PROB.X[part], PROB.Y[part])
    u, st = acc.update(g, st, p, factors=f, example_ids=part,
                       val_loss=PROB.val_loss)
    return (optax.apply_updates(p, u), st), None

  parts = jnp.asarray(np.concatenate([np.split(ids, K) for ids in BATCHES]))
  got, _ = jax.jit(lambda c: jax.lax.scan(body, c, parts))((PROB.PARAMS, st0))
  assert jax.tree.structure(got[1]) == jax.tree.structure(st0)
  whole = oxs.adam(LR, num_examples=N, batch_size=K * MB)
  assert_same_run(got, run(whole, BATCHES, False))

  _, g, f = CAPTURE(PROB.PARAMS, PROB.X[:MB + 1], PROB.Y[:MB + 1])
  with pytest.raises(ValueError, match="micro-batch buffers"):
    acc.update(g, st0, PROB.PARAMS, factors=f,
               example_ids=jnp.arange(MB + 1), val_loss=PROB.val_loss)
  with pytest.raises(ValueError, match="MultiSteps"):
    oxs.with_shapley(optax.adam(LR), num_examples=N, micro_batch_factors=like)
