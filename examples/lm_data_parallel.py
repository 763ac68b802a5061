"""Data-parallel language-model attribution: jax.shard_map over a data mesh,
one or many processes, checkpoint/resume with orbax.

A character transformer on Python's standard-library source; every step
credits each sequence of the global batch with its in-run Shapley value
against held-out text.  The global batch is split over the ``data`` mesh
axis; each process feeds its own slice (``make_array_from_process_local_data``).

One process, 4 simulated CPU devices::

    .venv/bin/python examples/lm_data_parallel.py --cpu-devices 4 --steps 20

Two processes on this machine (CPU collectives over loopback), 2 devices each::

    for i in 0 1; do .venv/bin/python examples/lm_data_parallel.py \\
        --cpu-devices 2 --coordinator 127.0.0.1:12355 --num-processes 2 \\
        --process-id $i --steps 20 & done; wait

On a TPU pod slice or a Slurm/Open MPI GPU cluster, start one process per
host with no coordinator flags: ``jax.distributed.initialize()`` reads the
topology from the environment.  ``--ckpt-dir`` saves the whole state (params,
Adam state, values, counters) every ``--ckpt-every`` steps and resumes from
the latest checkpoint; the values of a resumed run equal an uninterrupted
one's.  ``--values-out`` writes the final values table (``.npy``, process 0).
"""

import argparse
import logging
import os
from functools import partial


def parse(argv=None):
  p = argparse.ArgumentParser(
      description=" ".join(__doc__.split("\n\n")[0].split()))
  p.add_argument("--steps", type=int, default=8)
  p.add_argument("--batch-size", type=int, default=8, help="global batch")
  p.add_argument("--seq-len", type=int, default=16)
  p.add_argument("--d-model", type=int, default=32)
  p.add_argument("--lr", type=float, default=3e-3)
  p.add_argument("--mesh-data", type=int, default=None,
                 help="devices on the data axis (default: all)")
  p.add_argument("--table", choices=("replicated", "sharded"),
                 default="replicated")
  p.add_argument("--ckpt-dir", default=None)
  p.add_argument("--ckpt-every", type=int, default=4)
  p.add_argument("--values-out", default=None)
  p.add_argument("--stop-after", type=int, default=None,
                 help="exit after this step (to test resuming)")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--cpu-devices", type=int, default=None,
                 help="simulate this many CPU devices per process")
  p.add_argument("--coordinator", default=None, help="host:port of process 0")
  p.add_argument("--num-processes", type=int, default=None)
  p.add_argument("--process-id", type=int, default=None)
  p.add_argument("--distributed", action="store_true",
                 help="jax.distributed.initialize() from the environment "
                      "(TPU pods, Slurm)")
  return p.parse_args(argv)


def main(argv=None):
  args = parse(argv)
  import jax
  if args.cpu_devices:
    jax.config.update("jax_num_cpu_devices", args.cpu_devices)
  if args.coordinator:
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address=args.coordinator,
                               num_processes=args.num_processes,
                               process_id=args.process_id)
  elif args.distributed:
    jax.distributed.initialize()

  import jax.numpy as jnp
  import numpy as np
  import optax
  import orbax.checkpoint as ocp
  from jax.sharding import NamedSharding, PartitionSpec as P

  import optax_shapley as oxs
  from optax_shapley.experiments import data
  from optax_shapley.experiments.models import CharTransformer, token_cross_entropy

  logging.getLogger("optax_shapley").setLevel(logging.INFO)
  first = jax.process_index() == 0
  n_data = args.mesh_data or jax.device_count()
  mesh = jax.make_mesh((n_data,), ("data",), devices=jax.devices()[:n_data])
  B = args.batch_size
  if B % n_data:
    raise SystemExit(f"--batch-size {B} must be divisible by {n_data} devices")

  split = data.load_text_split(seed=args.seed, seq_len=args.seq_len,
                               val_size=16)
  # A multiple of 8 examples, so a sharded table splits evenly on 1, 2, 4
  # or 8 devices and every layout trains on the same examples.
  n = len(split.tokens_train) // 8 * 8
  if n % n_data:
    raise SystemExit(f"{n} examples do not split over {n_data} devices")
  model = CharTransformer(vocab_size=split.vocab_size, d_model=args.d_model,
                          max_len=args.seq_len, positions="embed")
  params = model.init(jax.random.key(args.seed),
                      split.tokens_train[:1])["params"]
  vt, vy = jnp.asarray(split.tokens_val), jnp.asarray(split.targets_val)

  def per_example_loss(p, tokens, targets):
    return token_cross_entropy(model.apply({"params": p}, tokens), targets)

  def val_loss(p):
    return per_example_loss(p, vt, vy)

  tx = oxs.adam(args.lr, num_examples=n, batch_size=B, axis_name="data",
                table=args.table)
  state = tx.init(params)
  specs = oxs.state_partition_specs(state, "data")
  if args.table == "replicated":
    specs = jax.tree.map(lambda _: P(), specs)
  shardings = jax.tree.map(lambda s: NamedSharding(mesh, s), specs)
  replicated = NamedSharding(mesh, P())

  @jax.jit
  @partial(jax.shard_map, mesh=mesh,
           in_specs=(P(), specs, P("data"), P("data"), P("data")),
           out_specs=(P(), specs, P()))
  def step(p, st, tokens, targets, ids):
    losses, g, f = oxs.value_grad_and_factors(per_example_loss)(p, tokens,
                                                                targets)
    # Inside shard_map the gradient w.r.t. the replicated params is already
    # summed over the data axis: divide by its size for the global mean.
    g = jax.tree.map(lambda a: a / jax.lax.psum(1, "data"), g)
    u, st = tx.update(g, st, p, factors=f, example_ids=ids, val_loss=val_loss)
    return optax.apply_updates(p, u), st, jax.lax.pmean(losses.mean(), "data")

  start = 0
  mgr = None
  params = jax.device_put(params, replicated)
  state = jax.device_put(state, shardings)
  if args.ckpt_dir:
    mgr = ocp.CheckpointManager(os.path.abspath(args.ckpt_dir))
    if mgr.latest_step() is not None:
      start = mgr.latest_step()
      abstract = jax.tree.map(
          lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
          {"params": params, "opt_state": state},
          {"params": jax.tree.map(lambda _: replicated, params),
           "opt_state": shardings})
      restored = mgr.restore(start, args=ocp.args.StandardRestore(abstract))
      params, state = restored["params"], restored["opt_state"]
      if first:
        print(f"resumed from step {start}", flush=True)

  # The global batch of step t is the same whatever the process layout;
  # each process passes the rows its devices hold.
  rng = np.random.default_rng(args.seed)
  order = [rng.choice(n, B, replace=False) for _ in range(args.steps)]
  per_proc = B // jax.process_count()
  lo = jax.process_index() * per_proc
  batch_sharding = NamedSharding(mesh, P("data"))
  put = lambda a: jax.make_array_from_process_local_data(batch_sharding, a)

  bar = oxs.Progress(total=args.steps, batch_size=B, enabled=first,
                     log_every=max(1, args.steps // 4), desc="lm")
  bar.steps = start
  for t in range(start, args.steps):
    ids = order[t][lo:lo + per_proc]
    params, state, loss = step(
        params, state, put(split.tokens_train[ids]),
        put(split.targets_train[ids]), put(ids.astype(np.int32)))
    bar.update(state)
    if mgr is not None and (t + 1) % args.ckpt_every == 0:
      mgr.save(t + 1, args=ocp.args.StandardSave(
          {"params": params, "opt_state": state}))
    if args.stop_after is not None and t + 1 >= args.stop_after:
      break
  bar.close()
  if mgr is not None:
    mgr.wait_until_finished()
    mgr.close()
  oxs.check(state)
  values = oxs.values(state)
  if args.table == "sharded":
    from jax.experimental import multihost_utils
    values = multihost_utils.process_allgather(values, tiled=True)
  else:
    values = values.addressable_shards[0].data
  values = np.asarray(values)
  if first:
    print(f"train loss at step {t + 1} {float(loss):.3f}; "
          f"{int((values != 0).sum())} "
          f"sequences credited, values in [{values.min():+.2e}, "
          f"{values.max():+.2e}]", flush=True)
    if args.values_out:
      np.save(args.values_out, values)
  return values


if __name__ == "__main__":
  main()
