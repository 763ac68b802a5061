"""Typed records of a captured batch: :class:`Factors` and :class:`CallPlan`.

What :func:`optax_shapley.value_grad_and_factors` hands to the
transformation, and what the contraction (:mod:`optax_shapley.contraction`)
reads: per probed module call, the call's inputs and its output cotangent
(or, for a call planned per-example, its parameters' per-example gradient
shares), plus the static plan of each call.
"""

from __future__ import annotations

import collections
import dataclasses
from typing import Any, Callable, Iterator

import flax.linen as nn
import jax


def param_paths(tree, prefix=()) -> Iterator[tuple[tuple, Any]]:
  """Yields ``(name path, leaf)`` for a nested dict of parameters."""
  if isinstance(tree, dict) or hasattr(tree, "items"):
    for k, v in tree.items():
      yield from param_paths(v, prefix + (k,))
  else:
    yield prefix, tree


def set_path(tree: dict, path: tuple, value) -> None:
  """``tree[path[0]]...[path[-1]] = value``, creating dicts on the way."""
  for k in path[:-1]:
    tree = tree.setdefault(k, {})
  tree[path[-1]] = value


@dataclasses.dataclass(frozen=True)
class CallPlan:
  """Static description of one probed module call (known at trace time).

  Attributes:
    key: ``(module path, method name, call index)``: the same in every trace
      of the loss.
    module: an unbound clone of the module, used to re-apply it with a
      direction in place of its parameters.
    method: the method called (``"__call__"``, ``"attend"``).
    param_map: ``((name path inside 'params', leaf index), ...)``: which
      leaves of ``jax.tree.leaves(params)`` the call owns.
    args_treedef: tree structure of the call's ``(args, kwargs)``.
    static_leaves: ``((position, value), ...)``, its non-array leaves.
    num_leaves: number of leaves of ``(args, kwargs)``.
    per_example: the call keeps its parameters' per-example gradients
      instead of factors (:func:`optax_shapley.layers.prefers_per_example`).
  """
  key: tuple
  module: nn.Module
  method: str
  param_map: tuple
  args_treedef: Any
  static_leaves: tuple
  num_leaves: int
  per_example: bool = False

  def call_args(self, arrays) -> tuple[tuple, dict]:
    """``(args, kwargs)`` of the call rebuilt from its array inputs."""
    static = dict(self.static_leaves)
    it = iter(arrays)
    leaves = [static[i] if i in static else next(it)
              for i in range(self.num_leaves)]
    return jax.tree.unflatten(self.args_treedef, leaves)

  def module_params(self, leaves) -> dict:
    """The module's ``'params'`` dict built from parameter leaves (a list
    in ``jax.tree.leaves(params)`` order, or a mapping from leaf index)."""
    out: dict = {}
    for path, idx in self.param_map:
      set_path(out, path, leaves[idx])
    return out

  def owns_only(self, leaves) -> bool:
    """Whether every leaf of the call is in the set ``leaves``."""
    return all(i in leaves for _, i in self.param_map)


@dataclasses.dataclass(frozen=True, eq=False)
class Factors:
  """Ghost factors of one batch, what the transformation contracts.

  They give ``x_i . d`` for any direction ``d`` without per-example
  gradients.

  ``x_i = c * grad l_i(w)`` is example ``i``'s share of the batch gradient
  (``c = 1/B`` for ``reduction="mean"``, ``1`` for ``"sum"``).  A pytree:
  the arrays are its leaves, the rest is static.

  Attributes:
    calls: per probed module call, ``(inputs, cotangent)``: the array inputs
      of the call (leading axis ``B``) and the output cotangent
      ``b = c * dl/dy``, f[B, ...]; for a call planned ``per_example``
      ``((), x)`` with ``x`` the call's ``'params'`` dict of per-example
      gradient shares ``c * dl_i/dtheta``, leaves ``f[B, *leaf.shape]``.
    fallback: ``(params, args)`` kept for the forward-mode fallback, or
      ``None`` when every trainable leaf is owned by a probed call; for
      ``micro_batches = k > 1``, ``(params, (args_1, ..., args_k))``, one
      per micro-batch (``fallback_batches()``).
    grads: the batch gradient ``sum_i x_i`` returned alongside these factors
      (the same arrays, no copy), or ``None``; it lets the transformation
      recognise gradients an earlier transformation in a chain has rescaled
      (global-norm clipping).
    plans: static, one :class:`~optax_shapley.factors.CallPlan` per entry
      of ``calls``.
    fallback_leaves: static, indices (``jax.tree.leaves(params)`` order) of
      the leaves contracted by ``jax.jvp``.
    loss_fn: static, the per-example loss (for the fallback).
    params_treedef: static, the tree structure of ``params``.
    batch_size: static, ``B`` (the local batch under data parallelism).
    reduction: static, ``"mean"`` or ``"sum"``.
    micro_batches: static, ``k``: these are ``k`` micro-batches of
      ``B / k`` examples each, concatenated (gradient accumulation,
      :mod:`optax_shapley.accumulation`), each with its own ``c``.
  """
  calls: tuple
  fallback: Any
  grads: Any
  plans: tuple[CallPlan, ...]
  fallback_leaves: tuple[int, ...]
  loss_fn: Callable[..., jax.Array]
  params_treedef: Any
  batch_size: int
  reduction: str
  micro_batches: int = 1

  @property
  def scale(self) -> float:
    """``c``: ``1/B`` for a mean reduction (``B`` of one micro-batch), ``1``
    for a sum."""
    return reduction_scale(self.reduction,
                           self.batch_size // self.micro_batches)

  def fallback_batches(self) -> tuple:
    """The loss arguments of the forward-mode fallback, one per
    micro-batch (a 1-tuple without accumulation)."""
    _, args = self.fallback
    return args if self.micro_batches > 1 else (args,)

  def __repr__(self):
    kinds = collections.Counter(type(p.module).__name__ for p in self.plans)
    return (f"Factors(batch_size={self.batch_size}, calls={dict(kinds)}, "
            f"fallback_leaves={len(self.fallback_leaves)})")


jax.tree_util.register_dataclass(
    Factors, data_fields=["calls", "fallback", "grads"],
    meta_fields=["plans", "fallback_leaves", "loss_fn", "params_treedef",
                 "batch_size", "reduction", "micro_batches"])

#: The ways a batch's per-example losses make its gradient.
REDUCTIONS = ("mean", "sum")


def reduction_scale(reduction: str, batch: int) -> float:
  """``c`` of ``x_i = c grad l_i``: ``1/B`` for ``"mean"``, ``1`` for ``"sum"``."""
  return 1.0 / batch if reduction == "mean" else 1.0
