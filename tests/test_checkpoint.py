"""Checkpoint and resume with orbax-checkpoint: a run interrupted at step k
and restored from its checkpoint continues bit-identically; a process killed
during a save leaves the previous checkpoint usable."""

import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp

import optax_shapley as oxs
import toy

B, N, D_IN, CLASSES, STEPS, STOP = 6, 24, 5, 3, 6, 3


_P = toy.problem(toy.TanhMLP(CLASSES), 3, (N, D_IN), 7, CLASSES)
X, Y, XV, YV, PARAMS = _P.X, _P.Y, _P.XV, _P.YV, _P.PARAMS
per_example_loss = _P.per_example_loss
IDS = [np.random.default_rng(t).permutation(N)[:B] for t in range(STEPS)]


# A chain with clipping and a schedule: the whole optimizer state round-trips.
TX = optax.chain(
    optax.clip_by_global_norm(1.0),
    oxs.with_shapley(optax.adam(optax.linear_schedule(1e-2, 1e-3, STEPS)),
                     num_examples=N, batch_size=B,
                     metric=("secant", "sgd"), evaluation=("midpoint", "start"),
                     learning_rate=1e-2))


@jax.jit
def step(params, state, ids):
  _, g, f = oxs.value_grad_and_factors(per_example_loss)(params, X[ids], Y[ids])
  u, state = TX.update(g, state, params, factors=f, example_ids=ids,
                       val_loss=lambda p: per_example_loss(p, XV, YV))
  return optax.apply_updates(params, u), state


def train(params, state, steps):
  for t in steps:
    params, state = step(params, state, jnp.asarray(IDS[t], jnp.int32))
  return params, state


def test_resume_is_bit_identical(tmp_path):
  full_p, full_s = train(PARAMS, TX.init(PARAMS), range(STEPS))

  p, s = train(PARAMS, TX.init(PARAMS), range(STOP))
  with ocp.CheckpointManager(tmp_path / "ckpt") as mgr:
    mgr.save(STOP, args=ocp.args.StandardSave({"params": p, "opt_state": s}))
    mgr.wait_until_finished()
  del p, s                                          # "the process ends"

  abstract = jax.eval_shape(lambda: {"params": PARAMS,
                                     "opt_state": TX.init(PARAMS)})
  with ocp.CheckpointManager(tmp_path / "ckpt") as mgr:
    assert mgr.latest_step() == STOP
    restored = mgr.restore(STOP, args=ocp.args.StandardRestore(abstract))
  p, s = train(restored["params"], restored["opt_state"], range(STOP, STEPS))

  for a, b in zip(jax.tree.leaves((full_p, full_s)), jax.tree.leaves((p, s))):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  assert oxs.values(s).shape == (N, 2) and np.abs(oxs.values(s)).max() > 0
  oxs.check(s)


CHILD = textwrap.dedent("""
    import os, signal, sys
    import jax, jax.numpy as jnp, numpy as np
    import orbax.checkpoint as ocp
    sys.path.insert(0, {tests!r})
    import test_checkpoint as T
    p, s = T.train(T.PARAMS, T.TX.init(T.PARAMS), range(2))
    mgr = ocp.CheckpointManager({path!r})
    mgr.save(2, args=ocp.args.StandardSave({{"params": p, "opt_state": s}}))
    mgr.wait_until_finished()
    import optax_shapley as oxs
    np.save({expected!r}, np.asarray(oxs.values(s)))
    p, s = T.train(p, s, range(2, 4))
    # A large extra item makes the next save slow; kill the process mid-way.
    big = jnp.ones((64, 1024, 1024), jnp.float32)
    mgr.save(4, args=ocp.args.StandardSave({{"params": p, "opt_state": s,
                                             "big": big}}))
    os.kill(os.getpid(), signal.SIGKILL)
""")


def test_killed_during_save_keeps_previous_checkpoint(tmp_path):
  path, expected = str(tmp_path / "ckpt"), str(tmp_path / "values.npy")
  code = CHILD.format(tests=os.path.dirname(__file__), path=path,
                      expected=expected)
  proc = subprocess.run([sys.executable, "-c", code], capture_output=True,
                        text=True, timeout=300)
  assert proc.returncode == -9, proc.stderr[-2000:]
  with ocp.CheckpointManager(path) as mgr:
    assert mgr.latest_step() == 2        # step 4 never committed
    abstract = jax.eval_shape(lambda: {"params": PARAMS,
                                       "opt_state": TX.init(PARAMS)})
    restored = mgr.restore(2, args=ocp.args.StandardRestore(abstract))
  state = restored["opt_state"]
  np.testing.assert_array_equal(np.asarray(oxs.values(state)),
                                np.load(expected))
  # And the run continues from it like an uninterrupted one.
  p, s = train(restored["params"], state, range(2, STEPS))
  ref_p, ref_s = train(PARAMS, TX.init(PARAMS), range(STEPS))
  np.testing.assert_array_equal(np.asarray(oxs.values(s)),
                                np.asarray(oxs.values(ref_s)))
