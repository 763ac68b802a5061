"""The values table: where accumulated values live and how a step adds to it.

``with_shapley(table=...)``:

- ``"replicated"`` (default): every device holds the whole
  ``[num_examples, ...]`` table; a step scatter-adds its credit.
- ``"sharded"``: each device on the data axis owns a contiguous slice of
  example ids (device ``k`` of ``D`` holds ids ``[k N/D, (k+1) N/D)``) and
  adds the credit of the ids it owns.
- ``"none"``: no table; values are read from each step's ``step_values``
  and streamed (:class:`optax_shapley.ValueWriter`).

Also the O(B) collectives of a step: gathering ids and values over the data
axis, and replicating them under an explicit-sharding mesh.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from optax_shapley.state import ShapleyState

#: The kinds of table ``with_shapley(table=...)`` accepts.
TABLES = ("replicated", "sharded", "none")


def check_kind(table: str) -> None:
  """Raises ``ValueError`` for an unknown ``table``."""
  if table not in TABLES:
    raise ValueError(f"table must be one of {TABLES}, got {table!r}")


def init(table: str, num_examples: int, value_shape: tuple) -> jax.Array:
  """The empty table: ``f32[num_examples, *value_shape]`` (zero rows for
  ``"none"``)."""
  rows = 0 if table == "none" else num_examples
  return jnp.zeros((rows,) + value_shape, jnp.float32)


def add(values, table: str, ids, credit, ok, num_examples: int, axis_name):
  """``values`` with ``credit`` (f32[B_global, ...], zero where the step was
  skipped) added at the global ``ids`` (gathered over ``axis_name``)."""
  if table == "none":
    return values
  if table == "sharded" and axis_name is not None:
    return _add_to_shard(values, ids, credit, ok, num_examples, axis_name)
  return _scatter_add(values, jnp.where(ok, ids, 0), credit)


def _explicit_sharding(x):
  """``x``'s sharding if it lives on a mesh with explicit axes, else None."""
  sharding = getattr(jax.typeof(x), "sharding", None)
  mesh = getattr(sharding, "mesh", None)
  if mesh is None or getattr(mesh, "empty", True) or not any(
      t == jax.sharding.AxisType.Explicit for t in mesh.axis_types):
    return None
  return sharding


def replicated(x):
  """``x`` (O(B): ids, step values) gathered onto every device when an
  explicit-sharding mesh has it split over the batch; unchanged otherwise."""
  sharding = _explicit_sharding(x)
  if sharding is None or all(s is None for s in sharding.spec):
    return x
  return jax.sharding.reshard(x, P())


def gather(x, axis_name) -> jax.Array:
  """Concatenates ``x`` over ``axis_name`` in device order, device-invariant.

  A ``psum`` of one-hot blocks rather than ``all_gather``: under
  ``shard_map`` with ``check_vma`` the result is then typed as replicated, so
  the state can leave with ``out_specs=P()``.  Communication is O(B).
  """
  n = jax.lax.psum(1, axis_name)
  i = jax.lax.axis_index(axis_name)
  buf = jnp.zeros((n,) + x.shape, x.dtype).at[i].set(x)
  return jax.lax.psum(buf, axis_name).reshape((n * x.shape[0],) + x.shape[1:])


def _scatter_add(values, ids, credit):
  """``values.at[ids].add(credit)``; under an explicit-sharding mesh the
  output keeps the table's own sharding (the compiler cannot infer it from
  batch-sharded ids)."""
  sharding = _explicit_sharding(values)
  if sharding is not None:
    return values.at[ids].add(credit, mode="drop", out_sharding=sharding)
  return values.at[ids].add(credit, mode="drop")


def _add_to_shard(local, ids, credit, ok, num_examples, axis_name):
  """Adds the gathered ``credit`` of global ``ids`` to this device's slice
  ``local`` of a table sharded over ``axis_name``; ids outside the slice
  are dropped (another device owns them)."""
  rows = local.shape[0]
  devices = jax.lax.psum(1, axis_name)
  if rows * devices != num_examples:
    raise ValueError(
        f"table='sharded': state.values holds {rows} rows per device on "
        f"{devices} devices, but num_examples is {num_examples}; shard the "
        "values over the data axis (state_partition_specs) with num_examples "
        "divisible by the axis size")
  start = jax.lax.axis_index(axis_name) * rows
  local_ids = jnp.where(ok, ids - start, -1)
  local_ids = jnp.where((local_ids >= 0) & (local_ids < rows), local_ids, rows)
  return local.at[local_ids].add(credit, mode="drop")


def state_partition_specs(state, axis_name: str):
  """``PartitionSpec`` tree for ``state`` (or an optimizer state containing
  a :class:`ShapleyState`) under ``jax.shard_map``: the values table split
  over ``axis_name`` (rows), everything else replicated (``P()``).

  Use it as the state's ``in_specs``/``out_specs`` with ``table="sharded"``;
  for ``jax.jit`` build ``NamedSharding(mesh, spec)`` from it.

  Example:
    >>> import jax.numpy as jnp, optax_shapley as oxs
    >>> from jax.sharding import PartitionSpec as P
    >>> tx = oxs.adam(1e-3, num_examples=8, batch_size=2, table="sharded",
    ...               axis_name="data")
    >>> specs = oxs.state_partition_specs(tx.init({"w": jnp.zeros(3)}), "data")
    >>> specs.values == P("data"), specs.count == P()
    (True, True)
  """
  is_state = lambda x: isinstance(x, ShapleyState)

  def spec(x):
    if is_state(x):
      scalars = ShapleyState(*[P()] * len(ShapleyState._fields))
      return scalars._replace(
          inner_state=jax.tree.map(lambda _: P(), x.inner_state),
          values=P(axis_name),
          pending=jax.tree.map(lambda _: P(), x.pending))
    return P()

  return jax.tree.map(spec, state, is_leaf=is_state)
